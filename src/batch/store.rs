//! The job store behind a small trait, so that the embedded SQLite store
//! ([`super::sqlite::SqliteStore`]) can be swapped for a shared one
//! (PostgreSQL) when several replicas drain one job table.
//!
//! Contract every implementation keeps (tests/batch.rs holds the SQLite one
//! to it, through a real server killed with SIGKILL):
//! - `create_job` stores the job and all its items atomically;
//! - `claim` moves pending items of running jobs to `in_flight` atomically,
//!   so two claimers never get the same item;
//! - `record` writes the result row and the item's final status in one
//!   transaction, and only for an item that is `in_flight`: an item
//!   completes exactly once (result rows are keyed by (job, item));
//! - `recover` runs once at start-up, before any claim: items left
//!   `in_flight` by a dead runner go back to `pending` (or fail after
//!   [`MAX_ATTEMPTS`] starts, so that one poisonous item cannot loop forever);
//! - a job becomes `completed` (or `cancelled`) in the same transaction that
//!   finishes its last item.

use anyhow::Result;

use super::model::{ClaimedItem, ItemOutcome, Job, NewJob};

/// Times an item may be claimed before recovery fails it instead of
/// running it again.
pub const MAX_ATTEMPTS: u32 = 3;

/// What start-up recovery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// In-flight items put back to pending.
    pub requeued: usize,
    /// In-flight items failed after too many attempts.
    pub abandoned: usize,
    /// In-flight items of cancelling jobs, now cancelled.
    pub cancelled: usize,
}

pub trait JobStore: Send + Sync {
    /// Stores a job and its items; the job is `in_progress`, or `failed`
    /// when it has no valid item.
    fn create_job(&self, job: &NewJob) -> Result<Job>;

    fn get(&self, id: &str) -> Result<Option<Job>>;

    /// The newest jobs first.
    fn list(&self, limit: usize) -> Result<Vec<Job>>;

    /// Claims up to `max` pending items of `in_progress` jobs (oldest job
    /// first, then input order), marking them `in_flight`.
    fn claim(&self, max: usize) -> Result<Vec<ClaimedItem>>;

    /// Records an in-flight item's outcome. Returns false (and writes
    /// nothing) when the item is not in flight: already recorded, or
    /// released.
    fn record(&self, job_id: &str, index: usize, outcome: &ItemOutcome) -> Result<bool>;

    /// Gives a claimed item back (`in_flight` -> `pending`), e.g. when the
    /// engine's queue is full or the runner stops.
    fn release(&self, job_id: &str, index: usize) -> Result<()>;

    /// Cancels a job: pending items become `cancelled`; the job is
    /// `cancelling` while items are in flight, then `cancelled`. Finished
    /// jobs are returned unchanged. `None` for an unknown id.
    fn cancel(&self, id: &str) -> Result<Option<Job>>;

    /// Result lines (JSON text, one per finished item) in input order,
    /// items with index greater than `after`, at most `limit`. Returns
    /// (item index, line) pairs; `None` when the job is unknown.
    fn results_page(
        &self,
        id: &str,
        after: Option<usize>,
        limit: usize,
    ) -> Result<Option<Vec<(usize, String)>>>;

    /// Start-up recovery (see the module doc).
    fn recover(&self) -> Result<Recovered>;
}

/// Every result line of a job, read page by page.
pub struct ResultLines<'a> {
    store: &'a dyn JobStore,
    id: String,
    after: Option<usize>,
    page: std::vec::IntoIter<(usize, String)>,
    done: bool,
}

/// Lines per store round trip.
pub const RESULT_PAGE: usize = 256;

impl<'a> ResultLines<'a> {
    pub fn new(store: &'a dyn JobStore, id: &str) -> Self {
        Self {
            store,
            id: id.to_string(),
            after: None,
            page: Vec::new().into_iter(),
            done: false,
        }
    }
}

impl Iterator for ResultLines<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((index, line)) = self.page.next() {
                self.after = Some(index);
                return Some(Ok(line));
            }
            if self.done {
                return None;
            }
            match self.store.results_page(&self.id, self.after, RESULT_PAGE) {
                Ok(Some(page)) => {
                    self.done = page.len() < RESULT_PAGE;
                    self.page = page.into_iter();
                }
                Ok(None) => {
                    self.done = true;
                    return Some(Err(anyhow::anyhow!("unknown batch {:?}", self.id)));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}
