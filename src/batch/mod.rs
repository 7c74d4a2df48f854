//! Batch generation jobs: many `/v1/generate` requests submitted at once,
//! stored durably, run at low priority beside interactive traffic, and read
//! back as JSONL results — over HTTP (`/v1/batches`) or offline
//! (`molora batch`).
//!
//! - [`model`]: jobs, items, statuses, outcomes, the result line;
//! - [`input`]: JSONL / JSON-array parsing with per-line errors;
//! - [`store`]: the [`JobStore`] trait and its contract; [`sqlite`]: the
//!   embedded implementation;
//! - [`execute`]: one item through validation and the engine;
//! - [`runner`]: the task that drains the store into the engine;
//! - [`cli`]: `molora batch`.
//!
//! Invariants (held by tests/batch.rs and tests/batch_cli.rs with a real
//! server, a real SQLite file and SIGKILL): every valid item is finished
//! exactly once, across crashes and restarts; results survive restarts; a
//! cancelled job runs no new item and keeps what finished; a malformed line
//! is refused alone, with its line number and reason.

pub mod cli;
pub mod execute;
pub mod input;
pub mod model;
pub mod runner;
pub mod sqlite;
#[cfg(test)]
mod sqlite_tests;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;

pub use model::{ImageOutput, Job, JobStatus, RequestCounts};
pub use sqlite::SqliteStore;
pub use store::JobStore;

/// Where a job's files (pictures) go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilesLayout {
    /// `<root>/<job id>/` (the server: many jobs in one data folder).
    PerJob(PathBuf),
    /// `<root>/` (the CLI: one job per `--out` folder).
    Single(PathBuf),
}

/// What the HTTP handlers and the runner share.
pub struct BatchService {
    pub store: Arc<dyn JobStore>,
    /// Wakes the runner when a job arrives.
    pub wake: Arc<Notify>,
    pub layout: FilesLayout,
}

impl BatchService {
    pub fn new(store: Arc<dyn JobStore>, layout: FilesLayout) -> Self {
        Self {
            store,
            wake: Arc::new(Notify::new()),
            layout,
        }
    }

    /// The folder a job's `images/` lives in.
    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        match &self.layout {
            FilesLayout::PerJob(root) => root.join(job_id),
            FilesLayout::Single(root) => root.clone(),
        }
    }
}
