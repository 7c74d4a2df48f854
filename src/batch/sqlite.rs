//! The embedded job store: one SQLite file (WAL journal, `synchronous =
//! FULL`, so a committed transaction survives SIGKILL and power loss).
//!
//! Tables: `jobs` (one row per job, its refused lines as JSON), `items`
//! (one row per valid line, keyed by (job, index), `custom_id` unique per
//! job) and `results` (one JSON line per finished item, keyed by (job,
//! index): the primary key is what makes "exactly once" a database fact,
//! not a promise of the runner). Every state change that touches two
//! tables runs in one transaction; see [`super::store`] for the contract.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use rand::Rng;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::model::{
    ClaimedItem, ImageOutput, ItemOutcome, ItemStatus, Job, JobStatus, LineError, NewJob,
    RequestCounts, ResultLine,
};
use super::store::{JobStore, Recovered, MAX_ATTEMPTS};

/// The store's file name inside the data folder.
pub const DB_FILE: &str = "batches.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    cancelled_at INTEGER,
    image_output TEXT NOT NULL,
    source       TEXT NOT NULL,
    line_errors  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    job_id    TEXT NOT NULL REFERENCES jobs(id),
    idx       INTEGER NOT NULL,
    line      INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    body      TEXT NOT NULL,
    status    TEXT NOT NULL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx),
    UNIQUE (job_id, custom_id)
);
CREATE INDEX IF NOT EXISTS items_by_status ON items (status, job_id, idx);
CREATE TABLE IF NOT EXISTS results (
    job_id      TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    line_json   TEXT NOT NULL,
    finished_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
);
";

pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn new_job_id() -> String {
    let n: u128 = rand::rng().random();
    format!("batch_{:024x}", n & ((1u128 << 96) - 1))
}

impl SqliteStore {
    /// Opens (creating when absent) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let what = || format!("{}: cannot open the batch store", path.display());
        let conn = Connection::open(path).with_context(what)?;
        conn.busy_timeout(Duration::from_secs(10))
            .with_context(what)?;
        let mode = wal_mode(&conn).with_context(what)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(anyhow!(
                "{}: cannot switch to WAL mode (got {mode})",
                path.display()
            ));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .with_context(what)?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("{}: cannot create the batch tables", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// `<dir>/batches.sqlite`.
    pub fn open_in(dir: &Path) -> Result<Self> {
        Self::open(&dir.join(DB_FILE))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in an immediate (write-locking) transaction.
    fn write<T>(&self, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

fn counts(conn: &Connection, id: &str) -> Result<RequestCounts> {
    let mut stmt = conn
        .prepare_cached("SELECT status, COUNT(*) FROM items WHERE job_id = ?1 GROUP BY status")?;
    let mut c = RequestCounts::default();
    let rows = stmt.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (status, n) = row?;
        let status: ItemStatus = status.parse().map_err(|e: String| anyhow!(e))?;
        c.add(status, n as usize);
    }
    Ok(c)
}

fn load_job(conn: &Connection, id: &str) -> Result<Option<Job>> {
    let row = conn
        .query_row(
            "SELECT status, created_at, finished_at, cancelled_at, image_output, source, line_errors
             FROM jobs WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                ))
            },
        )
        .optional()?;
    let Some((status, created_at, finished_at, cancelled_at, image_output, source, errors)) = row
    else {
        return Ok(None);
    };
    let request_counts = counts(conn, id)?;
    let progress = match request_counts.total {
        0 => 1.0,
        t => request_counts.finished() as f64 / t as f64,
    };
    Ok(Some(Job {
        id: id.to_string(),
        object: "batch".into(),
        status: status.parse().map_err(|e: String| anyhow!(e))?,
        created_at,
        finished_at,
        cancelled_at,
        image_output: image_output.parse().map_err(|e: String| anyhow!(e))?,
        source,
        request_counts,
        progress,
        errors: serde_json::from_str::<Vec<LineError>>(&errors)
            .context("the stored line errors are not valid JSON")?,
    }))
}

/// Moves a running or cancelling job with no pending or in-flight item to
/// its final status.
fn finish_if_done(tx: &Transaction, id: &str) -> Result<()> {
    let open: i64 = tx.query_row(
        "SELECT COUNT(*) FROM items WHERE job_id = ?1 AND status IN ('pending', 'in_flight')",
        [id],
        |r| r.get(0),
    )?;
    if open == 0 {
        tx.execute(
            "UPDATE jobs SET
                status = CASE status WHEN 'in_progress' THEN 'completed' ELSE 'cancelled' END,
                finished_at = ?2
             WHERE id = ?1 AND status IN ('in_progress', 'cancelling')",
            params![id, now()],
        )?;
    }
    Ok(())
}

fn write_result(
    tx: &Transaction,
    job_id: &str,
    index: usize,
    outcome: &ItemOutcome,
) -> Result<bool> {
    let item: Option<(usize, String)> = tx
        .query_row(
            "SELECT line, custom_id FROM items WHERE job_id = ?1 AND idx = ?2 AND status = 'in_flight'",
            params![job_id, index as i64],
            |r| Ok((r.get::<_, i64>(0)? as usize, r.get(1)?)),
        )
        .optional()?;
    let Some((line, custom_id)) = item else {
        return Ok(false);
    };
    let json = serde_json::to_string(&ResultLine::new(job_id, index, line, &custom_id, outcome))?;
    tx.execute(
        "INSERT INTO results (job_id, idx, line_json, finished_at) VALUES (?1, ?2, ?3, ?4)",
        params![job_id, index as i64, json, now()],
    )?;
    tx.execute(
        "UPDATE items SET status = ?3 WHERE job_id = ?1 AND idx = ?2",
        params![job_id, index as i64, outcome.status().as_str()],
    )?;
    finish_if_done(tx, job_id)?;
    Ok(true)
}

impl JobStore for SqliteStore {
    fn create_job(&self, job: &NewJob) -> Result<Job> {
        let id = new_job_id();
        let status = if job.items.is_empty() {
            JobStatus::Failed
        } else {
            JobStatus::InProgress
        };
        self.write(|tx| {
            let created = now();
            tx.execute(
                "INSERT INTO jobs (id, status, created_at, finished_at, image_output, source, line_errors)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    status.as_str(),
                    created,
                    status.is_final().then_some(created),
                    job.image_output.as_str(),
                    job.source,
                    serde_json::to_string(&job.line_errors)?
                ],
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO items (job_id, idx, line, custom_id, body, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
            )?;
            for (i, item) in job.items.iter().enumerate() {
                insert
                    .execute(params![
                        id,
                        i as i64,
                        item.line as i64,
                        item.custom_id,
                        serde_json::to_string(&item.body)?
                    ])
                    .with_context(|| format!("line {}: cannot store the item", item.line))?;
            }
            Ok(())
        })
        .with_context(|| format!("{}: cannot store the new batch", self.path.display()))?;
        self.get(&id)?
            .ok_or_else(|| anyhow!("the new batch {id} vanished"))
    }

    fn get(&self, id: &str) -> Result<Option<Job>> {
        load_job(&self.conn(), id)
    }

    fn list(&self, limit: usize) -> Result<Vec<Job>> {
        let conn = self.conn();
        let ids: Vec<String> = conn
            .prepare_cached("SELECT id FROM jobs ORDER BY seq DESC LIMIT ?1")?
            .query_map([limit as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids.iter()
            .filter_map(|id| load_job(&conn, id).transpose())
            .collect()
    }

    fn claim(&self, max: usize) -> Result<Vec<ClaimedItem>> {
        if max == 0 {
            return Ok(vec![]);
        }
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "UPDATE items SET status = 'in_flight', attempts = attempts + 1
                 WHERE rowid IN (
                     SELECT i.rowid FROM items i JOIN jobs j ON j.id = i.job_id
                     WHERE i.status = 'pending' AND j.status = 'in_progress'
                     ORDER BY j.seq, i.idx LIMIT ?1)
                 RETURNING job_id, idx, line, custom_id, body,
                     (SELECT image_output FROM jobs WHERE id = items.job_id)",
            )?;
            let rows = stmt.query_map([max as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?;
            let mut items = vec![];
            for row in rows {
                let (job_id, index, line, custom_id, body, image_output) = row?;
                items.push(ClaimedItem {
                    job_id,
                    index: index as usize,
                    line: line as usize,
                    custom_id,
                    body: serde_json::from_str(&body)?,
                    image_output: image_output
                        .parse::<ImageOutput>()
                        .map_err(|e| anyhow!(e))?,
                });
            }
            // RETURNING gives rows in no set order.
            items.sort_by(|a, b| (&a.job_id, a.index).cmp(&(&b.job_id, b.index)));
            Ok(items)
        })
    }

    fn record(&self, job_id: &str, index: usize, outcome: &ItemOutcome) -> Result<bool> {
        self.write(|tx| write_result(tx, job_id, index, outcome))
    }

    fn release(&self, job_id: &str, index: usize) -> Result<()> {
        self.write(|tx| {
            let status: Option<String> = tx
                .query_row("SELECT status FROM jobs WHERE id = ?1", [job_id], |r| {
                    r.get(0)
                })
                .optional()?;
            // An item released from a cancelling job is cancelled, not requeued.
            let to = match status.as_deref() {
                Some("in_progress") => "pending",
                _ => "cancelled",
            };
            tx.execute(
                "UPDATE items SET status = ?3, attempts = MAX(attempts - 1, 0)
                 WHERE job_id = ?1 AND idx = ?2 AND status = 'in_flight'",
                params![job_id, index as i64, to],
            )?;
            finish_if_done(tx, job_id)
        })
    }

    fn cancel(&self, id: &str) -> Result<Option<Job>> {
        let found = self.write(|tx| {
            let status: Option<String> = tx
                .query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
                .optional()?;
            match status.as_deref() {
                None => return Ok(false),
                Some("in_progress") => {}
                Some(_) => return Ok(true),
            }
            tx.execute(
                "UPDATE items SET status = 'cancelled' WHERE job_id = ?1 AND status = 'pending'",
                [id],
            )?;
            tx.execute(
                "UPDATE jobs SET status = 'cancelling', cancelled_at = ?2 WHERE id = ?1",
                params![id, now()],
            )?;
            finish_if_done(tx, id)?;
            Ok(true)
        })?;
        if found {
            self.get(id)
        } else {
            Ok(None)
        }
    }

    fn results_page(
        &self,
        id: &str,
        after: Option<usize>,
        limit: usize,
    ) -> Result<Option<Vec<(usize, String)>>> {
        let conn = self.conn();
        let exists: bool = conn
            .query_row("SELECT 1 FROM jobs WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let after = after.map(|a| a as i64).unwrap_or(-1);
        let mut stmt = conn.prepare_cached(
            "SELECT idx, line_json FROM results WHERE job_id = ?1 AND idx > ?2 ORDER BY idx LIMIT ?3",
        )?;
        let page = stmt
            .query_map(params![id, after, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Some(page))
    }

    fn recover(&self) -> Result<Recovered> {
        self.write(|tx| {
            let mut r = Recovered::default();
            let stuck: Vec<(String, i64, i64, String)> = tx
                .prepare(
                    "SELECT i.job_id, i.idx, i.attempts, j.status FROM items i
                     JOIN jobs j ON j.id = i.job_id WHERE i.status = 'in_flight'",
                )?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut touched: Vec<String> = vec![];
            for (job_id, idx, attempts, job_status) in stuck {
                if job_status != "in_progress" {
                    tx.execute(
                        "UPDATE items SET status = 'cancelled' WHERE job_id = ?1 AND idx = ?2",
                        params![job_id, idx],
                    )?;
                    r.cancelled += 1;
                } else if attempts as u32 >= MAX_ATTEMPTS {
                    let outcome = ItemOutcome::Failed {
                        status_code: 500,
                        kind: "abandoned".into(),
                        message: format!(
                            "the server stopped {attempts} times while this item was running; it is not tried again"
                        ),
                    };
                    write_result(tx, &job_id, idx as usize, &outcome)?;
                    r.abandoned += 1;
                } else {
                    tx.execute(
                        "UPDATE items SET status = 'pending' WHERE job_id = ?1 AND idx = ?2",
                        params![job_id, idx],
                    )?;
                    r.requeued += 1;
                }
                if !touched.contains(&job_id) {
                    touched.push(job_id);
                }
            }
            for job_id in touched {
                finish_if_done(tx, &job_id)?;
            }
            Ok(r)
        })
        .with_context(|| format!("{}: start-up recovery failed", self.path.display()))
    }
}

/// Switches `conn` to WAL and returns the journal mode it reports. Two
/// processes (or test servers) opening a new store at the same moment can
/// get SQLITE_BUSY here without SQLite calling the busy handler, so the
/// switch is retried for up to ten seconds.
fn wal_mode(conn: &Connection) -> rusqlite::Result<String> {
    let mut waited = Duration::ZERO;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && waited < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(20));
                waited += Duration::from_millis(20);
            }
            other => return other,
        }
    }
}
