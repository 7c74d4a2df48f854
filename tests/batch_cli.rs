//! `molora batch` as a child process: a file with a malformed line, killed
//! with SIGKILL mid-run, rerun to the end (every item exactly once), rerun
//! again (nothing to do), and refused on another input in the same folder.

mod batch_util;
mod common;
mod server_util;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_util::model_dir;

fn batch_cmd(input: &Path, out: &Path) -> Command {
    let mut c = Command::new(batch_util::molora_bin());
    c.arg("batch")
        .arg(input)
        .arg("--out")
        .arg(out)
        .arg("--model")
        .arg(model_dir())
        .args(["--concurrency", "2", "--quiet"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn run_to_end(input: &Path, out: &Path) -> (Output, String) {
    let o = batch_cmd(input, out).output().expect("run molora batch");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, stderr)
}

/// Result rows in the store, or None while it is not there yet.
fn finished_rows(db: &Path) -> Option<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row("SELECT COUNT(*) FROM results", [], |r| r.get(0))
        .ok()
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_cli_reports_bad_lines_survives_a_kill_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let n = 40;
    let mut lines: Vec<String> = (0..n)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "body": {
                "prompt": format!("item {i}"), "max_tokens": 160,
                "sampling": {"seed": i, "stop_at_eos": false, "text": {"temperature": 0.0}}
            }})
            .to_string()
        })
        .collect();
    lines.insert(5, "{\"custom_id\": \"broken\", \"body\": [1]}".into());
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    let db = out.join("batches.sqlite");

    // First run: killed once a few items are done.
    let mut child = batch_cmd(&input, &out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start molora batch");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if finished_rows(&db).is_some_and(|r| r >= 3) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the kill"
        );
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = finished_rows(&db).unwrap();
    assert!(at_kill < n, "the run finished before the kill");
    assert!(!out.join("results.jsonl").exists());

    // Second run: resumes and finishes.
    let (o, stderr) = run_to_end(&input, &out);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("resuming batch_"), "{stderr}");
    assert!(stderr.contains("input.jsonl:6: `body` must be"), "{stderr}");
    let results = read_jsonl(&out.join("results.jsonl"));
    let mut ids: Vec<&str> = results
        .iter()
        .map(|r| r["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n as usize);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n as usize, "no item twice");
    assert!(results.iter().all(|r| r["status"] == "completed"));
    let errors = read_jsonl(&out.join("errors.jsonl"));
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (errors[0]["line"].as_u64(), errors[0]["stage"].as_str()),
        (Some(6), Some("input"))
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    let attempts: i64 = conn
        .query_row("SELECT SUM(attempts) FROM items", [], |r| r.get(0))
        .unwrap();
    assert!(
        attempts <= n + 2,
        "{attempts} runs for {n} items, 2 in flight at the kill"
    );
    drop(conn);

    // Third run: nothing left; the same results.
    let started = Instant::now();
    let (o, stderr) = run_to_end(&input, &out);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{n} of {n} items already finished")),
        "{stderr}"
    );
    assert_eq!(read_jsonl(&out.join("results.jsonl")), results);
    assert!(started.elapsed() < Duration::from_secs(30));

    // Another input in the same folder is refused.
    let other = dir.path().join("other.jsonl");
    std::fs::write(&other, &lines[0]).unwrap();
    let (o, stderr) = run_to_end(&other, &out);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("another input"), "{stderr}");
}

#[test]
fn a_bad_input_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (o, stderr) = run_to_end(&dir.path().join("missing.jsonl"), &dir.path().join("out"));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr.contains("missing.jsonl: cannot read the batch input"),
        "{stderr}"
    );
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let (o, stderr) = run_to_end(&empty, &dir.path().join("out2"));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr.contains("empty.jsonl: the batch is empty"),
        "{stderr}"
    );
}
