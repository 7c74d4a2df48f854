//! The batch runner: a thread with its own small tokio runtime that claims
//! pending items from the store and feeds them to the engine at batch
//! priority, at most `concurrency` at a time, sharing the continuous
//! batcher with interactive requests.
//!
//! Invariants:
//! - only the holder of the data folder's lock runs a runner (one per
//!   store file), and it runs the store's recovery before its first claim;
//! - at most `concurrency` items are in flight; keep it below the engine's
//!   `max_batch_size` so interactive requests find a free place in the
//!   running batch at once (the engine admits them before batch items);
//!   while the engine holds interactive requests, new items start only
//!   below `busy_concurrency`, so each step carries fewer batch rows and
//!   interactive latency stays near what it is alone;
//! - every claimed item ends recorded or released: on stop, items still
//!   running are released back to pending (a crash leaves them in flight,
//!   and recovery requeues them at the next start).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::task::JoinSet;

use super::execute::{run_item, NotNow};
use super::model::ClaimedItem;
use super::store::Recovered;
use crate::server::AppState;

/// How long the runner stays at `busy_concurrency` after it last saw an
/// interactive request (a client sending one request after another leaves
/// gaps shorter than this between them).
pub const BUSY_HOLD: Duration = Duration::from_secs(1);

/// The lock file beside the store.
pub const LOCK_FILE: &str = "batches.lock";

/// Exclusive use of a data folder's batch store (an OS file lock, released
/// when the process dies, however it dies).
pub struct DataLock {
    _file: File,
    pub path: PathBuf,
}

impl DataLock {
    /// `Ok(None)` when another runner holds the folder.
    pub fn try_acquire(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open the lock file", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self { _file: file, path })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("{}: cannot lock", path.display()))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunnerOptions {
    /// Items in flight at most.
    pub concurrency: usize,
    /// Items in flight at most while interactive requests run, and for
    /// [`BUSY_HOLD`] after the engine last held one.
    pub busy_concurrency: usize,
    /// Exit when no item is pending or running (the CLI); the server's
    /// runner waits for new jobs instead.
    pub stop_when_idle: bool,
    /// How often an idle runner looks for work it was not woken for.
    pub poll: Duration,
}

/// What a runner did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    pub recovered: Recovered,
    /// Items recorded (completed or failed) by this runner.
    pub recorded: usize,
    /// Items given back to pending at stop.
    pub released: usize,
}

/// A running runner.
pub struct Runner {
    thread: JoinHandle<Result<RunStats>>,
    stop: Arc<AtomicBool>,
    state: Arc<AppState>,
}

impl Runner {
    /// Recovers the store, then starts the runner thread. `lock` proves this
    /// process owns the store.
    pub fn spawn(state: Arc<AppState>, opts: RunnerOptions, lock: DataLock) -> Result<Self> {
        anyhow::ensure!(
            opts.concurrency >= 1 && opts.busy_concurrency >= 1,
            "batch concurrency must be at least 1"
        );
        let store = state.batches.store.clone();
        let recovered = store.recover()?;
        if recovered != Recovered::default() {
            tracing::warn!(
                requeued = recovered.requeued,
                abandoned = recovered.abandoned,
                cancelled = recovered.cancelled,
                "batch items left running by a stopped server were recovered"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (st, flag) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("molora-batch".into())
            .spawn(move || {
                let _lock = lock;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the batch runner's runtime")?;
                let mut stats = rt.block_on(drive(st, opts, flag))?;
                stats.recovered = recovered;
                Ok(stats)
            })?;
        Ok(Self {
            thread,
            stop,
            state,
        })
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the runner to end by itself (`stop_when_idle`).
    pub fn join(self) -> Result<RunStats> {
        self.thread
            .join()
            .map_err(|_| anyhow!("the batch runner panicked"))?
    }

    /// Stops claiming, releases what is running, and waits.
    pub fn stop(self) -> Result<RunStats> {
        self.stop.store(true, Ordering::Release);
        self.state.batches.wake.notify_one();
        self.join()
    }
}

type Key = (String, usize);

enum Ended {
    Recorded,
    /// Given back (busy engine) or not recorded (store error, logged).
    Returned,
    EngineStopped,
}

async fn drive(
    state: Arc<AppState>,
    opts: RunnerOptions,
    stop: Arc<AtomicBool>,
) -> Result<RunStats> {
    let svc = &state.batches;
    let mut tasks: JoinSet<(Key, Ended)> = JoinSet::new();
    let mut running: HashSet<Key> = HashSet::new();
    let mut stats = RunStats::default();
    let mut engine_stopped = false;
    let mut last_busy: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Acquire) && !engine_stopped {
        if svc.interactive_load(&state.engine) > 0 {
            last_busy = Some(std::time::Instant::now());
        }
        let cap = match last_busy {
            Some(t) if t.elapsed() < BUSY_HOLD => opts.busy_concurrency.min(opts.concurrency),
            _ => opts.concurrency,
        };
        let free = cap.saturating_sub(tasks.len());
        if free > 0 {
            let store = svc.store.clone();
            match tokio::task::spawn_blocking(move || store.claim(free)).await? {
                Ok(items) => {
                    for item in items {
                        running.insert((item.job_id.clone(), item.index));
                        tasks.spawn(process(state.clone(), item));
                    }
                }
                Err(e) => tracing::error!("batch store: cannot claim items: {e:#}"),
            }
        }
        if tasks.is_empty() {
            if opts.stop_when_idle {
                break;
            }
            tokio::select! {
                _ = svc.wake.notified() => {}
                _ = tokio::time::sleep(opts.poll) => {}
            }
            continue;
        }
        let room = tasks.len() < cap;
        tokio::select! {
            Some(done) = tasks.join_next() => match done {
                Ok((key, ended)) => {
                    running.remove(&key);
                    match ended {
                        Ended::Recorded => stats.recorded += 1,
                        Ended::Returned => {}
                        Ended::EngineStopped => engine_stopped = true,
                    }
                }
                Err(e) => tracing::error!("a batch item task failed: {e}"),
            },
            _ = svc.wake.notified(), if room => {}
            _ = tokio::time::sleep(opts.poll) => {}
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    for (job, index) in running {
        let store = svc.store.clone();
        let released = tokio::task::spawn_blocking(move || store.release(&job, index)).await?;
        match released {
            Ok(()) => stats.released += 1,
            Err(e) => tracing::error!("batch store: cannot release an item: {e:#}"),
        }
    }
    if engine_stopped {
        tracing::error!("the engine has stopped; the batch runner stops");
    }
    Ok(stats)
}

/// Runs one item and records its outcome (or gives it back).
async fn process(state: Arc<AppState>, item: ClaimedItem) -> (Key, Ended) {
    let key = (item.job_id.clone(), item.index);
    let job_dir = state.batches.job_dir(&item.job_id);
    let store = state.batches.store.clone();
    let ended = match run_item(&state, &item, &job_dir).await {
        Ok(outcome) => {
            let (job, index) = key.clone();
            let recorded =
                tokio::task::spawn_blocking(move || store.record(&job, index, &outcome)).await;
            match recorded {
                Ok(Ok(true)) => Ended::Recorded,
                Ok(Ok(false)) => {
                    tracing::warn!(job = %key.0, item = key.1, "batch item was no longer in flight; its result is dropped");
                    Ended::Returned
                }
                Ok(Err(e)) => {
                    tracing::error!(job = %key.0, item = key.1, "batch store: cannot record a result: {e:#}");
                    Ended::Returned
                }
                Err(e) => {
                    tracing::error!("batch store task failed: {e}");
                    Ended::Returned
                }
            }
        }
        Err(not_now) => {
            if not_now == NotNow::Busy {
                // The engine's queue is full (interactive traffic): wait a little.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (job, index) = key.clone();
            if let Ok(Err(e)) =
                tokio::task::spawn_blocking(move || store.release(&job, index)).await
            {
                tracing::error!("batch store: cannot release an item: {e:#}");
            }
            match not_now {
                NotNow::Busy => Ended::Returned,
                NotNow::Stopped => Ended::EngineStopped,
            }
        }
    };
    (key, ended)
}
