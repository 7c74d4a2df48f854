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
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Batch items submitted to the engine and not yet ended.
    in_engine: Arc<AtomicUsize>,
}

/// Counts one batch item in the engine while it lives.
pub struct InEngine(Arc<AtomicUsize>);

impl Drop for InEngine {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BatchService {
    pub fn new(store: Arc<dyn JobStore>, layout: FilesLayout) -> Self {
        Self {
            store,
            wake: Arc::new(Notify::new()),
            layout,
            in_engine: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Marks one batch item as in the engine until the guard is dropped.
    pub fn enter_engine(&self) -> InEngine {
        self.in_engine.fetch_add(1, Ordering::AcqRel);
        InEngine(self.in_engine.clone())
    }

    /// Interactive requests the engine holds now (queued or running),
    /// estimated as all its requests less the batch items: the engine's
    /// running count is published after each step, so this may read one
    /// too high for a step, never too low for long.
    pub fn interactive_load(&self, engine: &crate::engine::EngineHandle) -> usize {
        let s = engine.stats();
        (s.running + s.queue_depth).saturating_sub(self.in_engine.load(Ordering::Acquire))
    }

    /// The folder a job's `images/` lives in.
    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        match &self.layout {
            FilesLayout::PerJob(root) => root.join(job_id),
            FilesLayout::Single(root) => root.clone(),
        }
    }
}
