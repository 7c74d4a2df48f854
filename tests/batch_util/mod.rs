//! Helpers for the batch tests: JSONL bodies, polling, and `molora` as a
//! child process (so that it can be killed with SIGKILL).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::server_util::{client, get, read_json};

/// A JSONL body of `n` text items `c0..c{n-1}`, greedy and seeded, each
/// generating exactly `max_tokens` tokens.
pub fn text_items(n: usize, max_tokens: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "body": {
                "prompt": format!("item {i}: say something"),
                "max_tokens": max_tokens,
                "sampling": {"seed": i, "stop_at_eos": false, "text": {"temperature": 0.0}}
            }})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// POSTs a raw batch body.
pub async fn submit(url: &str, body: String) -> (reqwest::StatusCode, Value) {
    let r = client()
        .post(url)
        .header("content-type", "application/jsonl")
        .body(body)
        .send()
        .await
        .expect("request sent");
    read_json(r).await
}

/// Polls `GET url` until `done(job)` or the deadline.
pub async fn poll_until(url: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, job) = get(url).await;
        assert_eq!(status, 200, "{job}");
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "timed out; last state {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn is_final(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("completed" | "cancelled" | "failed")
    )
}

/// The results of a job, one JSON value per line.
pub async fn results(url: &str) -> Vec<Value> {
    let r = client().get(url).send().await.expect("request sent");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/jsonl"
    );
    let text = r.text().await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `molora` binary. `MOLORA_BIN` overrides cargo's path: with a target
/// folder shared by several checkouts, `target/release/molora` may be
/// another checkout's build by the time the test runs.
pub fn molora_bin() -> std::path::PathBuf {
    std::env::var_os("MOLORA_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_molora").into())
}

/// `molora serve` as a child on a free loopback port; the URL comes from
/// its log line, and its stderr is drained so that it never blocks.
pub struct ServeChild {
    pub child: Child,
    pub url: String,
}

impl ServeChild {
    pub fn start(model: &Path, data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(molora_bin())
            .arg("serve")
            .arg("--model")
            .arg(model)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--bind", "127.0.0.1:0", "--workers", "2"])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start molora serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("listening on http://") {
                    let url: String = line[at + "listening on ".len()..]
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
                        .collect();
                    let _ = tx.send(Ok(url));
                } else if line.contains("error") {
                    let _ = tx.send(Err(line));
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(url)) => url,
            Ok(Err(line)) => panic!("molora serve failed: {line}"),
            Err(e) => panic!("molora serve did not start: {e}"),
        };
        Self { child, url }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// SIGKILL: no clean-up runs.
    pub fn kill_9(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
