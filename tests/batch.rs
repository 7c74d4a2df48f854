//! Batch jobs end to end: the real server on loopback with a real SQLite
//! file in a temp folder — submit, poll, fetch results, malformed lines,
//! limits, cancel, pictures as files — and `molora serve` killed with
//! SIGKILL in the middle of a batch, then restarted on the same folder.

mod batch_util;
mod common;
mod server_util;

use batch_util::*;
use serde_json::{json, Value};
use server_util::*;

fn server_in(dir: &std::path::Path) -> TestServer {
    let mut cfg = test_config();
    cfg.data_dir = dir.to_path_buf();
    TestServer::start(cfg)
}

#[tokio::test]
async fn submit_poll_and_fetch_results_like_generate_answers() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_in(dir.path());
    let body = text_items(5, 6);
    let (status, job) = submit(&s.at("/v1/batches"), body.clone()).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["object"], "batch");
    assert_eq!(job["request_counts"]["total"], 5);
    let id = job["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("batch_"), "{id}");

    let job = poll_until(&s.at(&format!("/v1/batches/{id}")), 60, is_final).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["request_counts"]["completed"], 5);
    assert_eq!(job["progress"], 1.0);

    let lines = results(&s.at(&format!("/v1/batches/{id}/results"))).await;
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["c0", "c1", "c2", "c3", "c4"]);
    // Each answer is what /v1/generate gives for the same body (seeded, greedy).
    for (line, input) in lines.iter().zip(body.lines()) {
        let input: Value = serde_json::from_str(input).unwrap();
        assert_eq!(line["status"], "completed");
        assert!(line["error"].is_null());
        assert_eq!(line["response"]["status_code"], 200);
        let (status, direct) = post(&s.at("/v1/generate"), &input["body"]).await;
        assert_eq!(status, 200);
        let got = &line["response"]["body"];
        assert_eq!(got["parts"], direct["parts"], "{}", line["custom_id"]);
        assert_eq!(got["usage"], direct["usage"]);
        assert_rounded_routing(&got["routing"]);
    }

    let (status, list) = get(&s.at("/v1/batches")).await;
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["id"], id.as_str());
}

#[tokio::test]
async fn malformed_lines_are_reported_by_number_and_the_good_lines_run() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_in(dir.path());
    let good =
        |id: &str| json!({"custom_id": id, "body": {"prompt": "hi", "max_tokens": 3}}).to_string();
    let body = [
        good("a"),
        "{\"custom_id\": \"b\", \"body\": ".to_string(),
        good("a"),
        json!({"custom_id": "c", "body": {"prompt": "hi", "routing_mode": "fastest"}}).to_string(),
        json!({"custom_id": "d", "body": {"prompt": "hi", "stream": true}}).to_string(),
        String::new(),
        json!({"custom_id": "e", "body": {"prompt": "hi", "adapters": {"forced": ["nope"]}, "routing_mode": "per_sequence"}}).to_string(),
        json!({"body": {"prompt": "hi"}}).to_string(),
        good("f"),
    ]
    .join("\n");
    let (status, job) = submit(&s.at("/v1/batches"), body).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["request_counts"]["total"], 2);
    let errors = job["errors"].as_array().unwrap();
    let lines: Vec<u64> = errors.iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![2, 3, 4, 5, 7, 8], "{job}");
    let msg = |i: usize| errors[i]["message"].as_str().unwrap();
    assert!(msg(0).contains("not valid JSON"), "{}", msg(0));
    assert!(msg(1).contains("duplicate `custom_id` \"a\" (first on line 1)"));
    assert!(
        msg(2).contains("unknown routing mode \"fastest\""),
        "{}",
        msg(2)
    );
    assert!(msg(3).contains("`stream`"));
    assert!(msg(4).contains("unknown adapter \"nope\""), "{}", msg(4));
    assert!(msg(5).contains("`custom_id` is required"));
    assert_eq!(errors[3]["custom_id"], "d");

    let id = job["id"].as_str().unwrap();
    let job = poll_until(&s.at(&format!("/v1/batches/{id}")), 60, is_final).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["request_counts"]["completed"], 2);
    let got = results(&s.at(&format!("/v1/batches/{id}/results"))).await;
    let ids: Vec<&str> = got
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["a", "f"]);
    assert_eq!(got[1]["line"], 9);

    // Every line bad: the job exists, failed, with its reasons.
    let (status, job) = submit(&s.at("/v1/batches"), "[1, {\"custom_id\": \"x\"}]".into()).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "failed");
    assert_eq!(job["errors"].as_array().unwrap().len(), 2);
    assert!(job["errors"][1]["message"]
        .as_str()
        .unwrap()
        .contains("`body`"));
}

#[tokio::test]
async fn limits_unknown_ids_and_bad_queries_answer_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_in(dir.path());
    let max = test_config().limits.max_batch_items;
    let got = submit(&s.at("/v1/batches"), text_items(max + 1, 2)).await;
    assert_error(
        &got,
        413,
        "batch_too_large",
        &["65 items", "at most 64", "max_batch_items"],
    );
    let huge = "x".repeat(test_config().limits.max_batch_bytes + 1);
    let got = submit(&s.at("/v1/batches"), huge).await;
    assert_error(&got, 413, "batch_too_large", &["max_batch_bytes"]);
    let got = submit(&s.at("/v1/batches"), "\n\n".into()).await;
    assert_error(&got, 422, "invalid_batch", &["empty"]);
    let got = submit(&s.at("/v1/batches?image_output=jpeg"), text_items(1, 2)).await;
    assert_error(&got, 422, "validation", &["image_output", "jpeg"]);
    let got = submit(&s.at("/v1/batches?colour=red"), text_items(1, 2)).await;
    assert_error(&got, 422, "invalid_request", &["colour"]);

    for path in ["/v1/batches/batch_nope", "/v1/batches/batch_nope/results"] {
        assert_error(
            &get(&s.at(path)).await,
            404,
            "batch_not_found",
            &["batch_nope"],
        );
    }
    let got = post(&s.at("/v1/batches/batch_nope/cancel"), &json!({})).await;
    assert_error(&got, 404, "batch_not_found", &["batch_nope"]);
    let got = get(&s.at("/v1/batches?limit=0")).await;
    assert_error(&got, 422, "validation", &["`limit`"]);
    let r = client().delete(s.at("/v1/batches")).send().await.unwrap();
    assert_error(&read_json(r).await, 405, "method_not_allowed", &[]);
}

#[tokio::test]
async fn cancel_stops_the_job_and_keeps_what_finished() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_in(dir.path());
    let (status, job) = submit(&s.at("/v1/batches"), text_items(40, 48)).await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let url = s.at(&format!("/v1/batches/{id}"));
    poll_until(&url, 60, |j| {
        j["request_counts"]["completed"].as_u64() >= Some(1)
    })
    .await;
    let (status, job) = post(&s.at(&format!("/v1/batches/{id}/cancel")), &json!({})).await;
    assert_eq!(status, 200, "{job}");
    assert!(
        matches!(job["status"].as_str(), Some("cancelling" | "cancelled")),
        "{job}"
    );
    let job = poll_until(&url, 60, is_final).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let c = &job["request_counts"];
    let (done, cancelled) = (
        c["completed"].as_u64().unwrap(),
        c["cancelled"].as_u64().unwrap(),
    );
    assert!(done >= 1 && cancelled >= 1, "{job}");
    assert_eq!(done + c["failed"].as_u64().unwrap() + cancelled, 40);
    let lines = results(&s.at(&format!("/v1/batches/{id}/results"))).await;
    assert_eq!(lines.len() as u64, done);
    // Nothing runs after the cancel has settled.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (_, later) = get(&url).await;
    assert_eq!(later["request_counts"], job["request_counts"]);
}

#[tokio::test]
async fn pictures_can_be_written_as_files_and_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_in(dir.path());
    let body = json!({"custom_id": "pic", "body": {
        "prompt": [{"type": "text", "text": "draw"}, {"type": "image_start"}],
        "max_tokens": 40, "sampling": greedy(3)
    }})
    .to_string();
    let (status, job) = submit(&s.at("/v1/batches?image_output=files"), body).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["image_output"], "files");
    let id = job["id"].as_str().unwrap();
    poll_until(&s.at(&format!("/v1/batches/{id}")), 60, is_final).await;
    let lines = results(&s.at(&format!("/v1/batches/{id}/results"))).await;
    let parts = lines[0]["response"]["body"]["parts"].as_array().unwrap();
    let image = parts
        .iter()
        .find(|p| p["type"] == "image")
        .expect("an image part");
    assert!(image.get("png_base64").is_none(), "{image}");
    let file = image["file"].as_str().unwrap();
    assert_eq!(file, "images/0_0.png");
    assert!(dir.path().join("batches").join(id).join(file).is_file());
    let r = client()
        .get(s.at(&format!("/v1/batches/{id}/{file}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let png = r.bytes().await.unwrap();
    let img = image::load_from_memory(&png).expect("a PNG");
    assert_eq!((img.width(), img.height()), (16, 16));
    let got = get(&s.at(&format!("/v1/batches/{id}/images/..%2Fx.png"))).await;
    assert_eq!(got.0, 404);
}

#[tokio::test]
async fn a_server_killed_mid_batch_finishes_every_item_exactly_once_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir();
    let flags = ["--batch-concurrency", "2", "--max-tokens", "512"];
    let n = 40;
    let first = ServeChild::start(model, dir.path(), &flags);
    let (status, job) = submit(&first.at("/v1/batches"), text_items(n, 160)).await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let job = poll_until(&first.at(&format!("/v1/batches/{id}")), 60, |j| {
        j["request_counts"]["completed"].as_u64() >= Some(3)
    })
    .await;
    first.kill_9();
    let done_at_kill = job["request_counts"]["completed"].as_u64().unwrap();
    assert!(
        done_at_kill < n as u64,
        "the batch finished before the kill: {job}"
    );

    let second = ServeChild::start(model, dir.path(), &flags);
    let url = second.at(&format!("/v1/batches/{id}"));
    let job = poll_until(&url, 120, is_final).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["request_counts"]["completed"], n);
    let lines = results(&second.at(&format!("/v1/batches/{id}/results"))).await;
    let mut ids: Vec<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), n, "one line per item");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "no item twice");
    drop(second);

    // The store itself: one result row per item, and only the items that
    // were in flight at the kill ran twice.
    let db = rusqlite::Connection::open(dir.path().join("batches.sqlite")).unwrap();
    let (rows, attempts): (i64, i64) = db
        .query_row(
            "SELECT (SELECT COUNT(*) FROM results WHERE job_id = ?1),
                    (SELECT SUM(attempts) FROM items WHERE job_id = ?1)",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows, n as i64);
    assert!(
        attempts <= n as i64 + 2,
        "{attempts} runs for {n} items with 2 in flight at the kill"
    );
}
