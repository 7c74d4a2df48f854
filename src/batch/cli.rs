//! `molora batch input.jsonl --out results/`: runs a batch file offline on
//! the local model, with the server's engine, validation and result format.
//!
//! `--out` holds everything: `batches.sqlite` (the job store, the same as
//! the server's), `images/` (with `--image-output files`), and at the end
//! `results.jsonl` and `errors.jsonl`. Invariants: a rerun on the same
//! `--out` with the same input resumes (finished items are kept, items left
//! running by a killed run are run again, none twice); a different input in
//! a used `--out` is refused; two runs on one `--out` at once are refused.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::execute::check_body;
use super::input::parse_input;
use super::model::{ImageOutput, Job, NewJob, ResultLine};
use super::runner::{DataLock, Runner, RunnerOptions};
use super::store::ResultLines;
use super::{BatchService, FilesLayout};
use crate::server::config::ServeArgs;

pub const RESULTS_FILE: &str = "results.jsonl";
pub const ERRORS_FILE: &str = "errors.jsonl";

#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// JSONL lines `{"custom_id": ..., "body": {/v1/generate request}}`, or a JSON array of them.
    pub input: PathBuf,
    /// Output folder: results.jsonl, errors.jsonl, images/ and the job store.
    #[arg(long)]
    pub out: PathBuf,
    /// Model directory (default: the server config's model_dir).
    #[arg(long = "model")]
    pub model_dir: Option<PathBuf>,
    /// Server config file for limits (default: configs/server.toml when present).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Pictures as `base64` inside results.jsonl, or as PNG `files` in <out>/images/.
    #[arg(long, default_value = "base64")]
    pub image_output: String,
    /// Items in the engine at once (default: limits.batch_concurrency).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// FNV-1a, 64 bits: a stable digest of the input (std's hasher may change
/// between Rust versions; a resumed run must recognise its input).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub fn run(args: &BatchArgs) -> Result<()> {
    let image_output: ImageOutput = args.image_output.parse().map_err(|_| {
        anyhow::anyhow!(
            "--image-output must be base64 or files; given {:?}",
            args.image_output
        )
    })?;
    let bytes = std::fs::read(&args.input)
        .with_context(|| format!("{}: cannot read the batch input", args.input.display()))?;
    let digest = format!("fnv1a64:{:016x}", fnv1a64(&bytes));
    let source = format!("file:{} {digest}", args.input.display());
    let cfg = ServeArgs {
        config: args.config.clone(),
        model_dir: args.model_dir.clone(),
        data_dir: Some(args.out.clone()),
        batch_concurrency: args.concurrency,
        ..Default::default()
    }
    .resolve()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create the output folder", args.out.display()))?;
    let Some(lock) = DataLock::try_acquire(&args.out)? else {
        bail!(
            "{}: another `molora batch` is running in this folder",
            args.out.display()
        );
    };
    let mut state = crate::server::build_state(cfg)?;
    state.batches = BatchService::new(
        state.batches.store.clone(),
        FilesLayout::Single(args.out.clone()),
    );
    let state = Arc::new(state);
    let store = state.batches.store.clone();

    let existing = store.list(2)?;
    let job = match existing.as_slice() {
        [] => {
            let info = state.engine.model_info();
            let parsed = parse_input(&bytes, state.config.limits.max_batch_items, |b| {
                check_body(&state, &info, b)
            })
            .with_context(|| format!("{}", args.input.display()))?;
            store.create_job(&NewJob {
                items: parsed.items,
                line_errors: parsed.errors,
                image_output,
                source,
            })?
        }
        [job] if job.source.ends_with(&digest) => {
            eprintln!(
                "resuming {}: {} of {} items already finished",
                job.id,
                job.request_counts.finished(),
                job.request_counts.total
            );
            job.clone()
        }
        [job, ..] => bail!(
            "{}: this folder holds the run of another input ({}); use a new --out folder",
            args.out.display(),
            job.source
        ),
    };
    for e in &job.errors {
        eprintln!("{}:{}: {}", args.input.display(), e.line, e.message);
    }

    let opts = RunnerOptions {
        concurrency: state.config.limits.batch_concurrency,
        // Offline: no interactive traffic to make room for.
        busy_concurrency: state.config.limits.batch_concurrency,
        stop_when_idle: true,
        poll: Duration::from_millis(100),
    };
    let runner = Runner::spawn(state.clone(), opts, lock)?;
    let bar = progress_bar(&job, args.quiet);
    while !runner.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(j) = store.get(&job.id)? {
            bar.set_position(j.request_counts.finished() as u64);
        }
    }
    runner.join()?;
    let job = store
        .get(&job.id)?
        .context("the job vanished from the store")?;
    bar.set_position(job.request_counts.finished() as u64);
    bar.finish_and_clear();
    let failed = write_outputs(&args.out, &job, &*store)?;
    for f in &failed {
        eprintln!(
            "{}:{}: item {:?} failed: {}",
            args.input.display(),
            f.line,
            f.custom_id,
            f.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
        );
    }
    let c = job.request_counts;
    println!(
        "{}: {} items, {} completed, {} failed, {} cancelled; {} lines refused; results in {}",
        job.id,
        c.total,
        c.completed,
        c.failed,
        c.cancelled,
        job.errors.len(),
        args.out.join(RESULTS_FILE).display()
    );
    if c.pending + c.in_flight > 0 {
        bail!(
            "{} items did not run (the engine stopped?); run the same command again to resume",
            c.pending + c.in_flight
        );
    }
    Ok(())
}

fn progress_bar(job: &Job, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(job.request_counts.total as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} items  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar.set_position(job.request_counts.finished() as u64);
    bar
}

/// Writes results.jsonl and errors.jsonl (each through a temp file and a
/// rename, so a reader never sees half a file); returns the failed items.
fn write_outputs(out: &Path, job: &Job, store: &dyn super::JobStore) -> Result<Vec<ResultLine>> {
    let mut failed = vec![];
    let results = out.join(RESULTS_FILE);
    write_atomic(&results, |w| {
        for line in ResultLines::new(store, &job.id) {
            let line = line?;
            let parsed: ResultLine = serde_json::from_str(&line)?;
            if parsed.error.is_some() {
                failed.push(parsed);
            }
            writeln!(w, "{line}")?;
        }
        Ok(())
    })?;
    write_atomic(&out.join(ERRORS_FILE), |w| {
        for e in &job.errors {
            let v = json!({"line": e.line, "custom_id": e.custom_id, "stage": "input", "message": e.message});
            writeln!(w, "{v}")?;
        }
        for f in &failed {
            let message = f.error.as_ref().map(|e| e.message.clone());
            let v = json!({"line": f.line, "custom_id": f.custom_id, "stage": "run", "message": message});
            writeln!(w, "{v}")?;
        }
        Ok(())
    })?;
    Ok(failed)
}

fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    fill(&mut w).with_context(|| format!("{}: cannot write", tmp.display()))?;
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename", path.display()))
}
