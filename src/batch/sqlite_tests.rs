//! The SQLite store against the [`super::store`] contract, on real files.

use serde_json::json;

use super::model::*;
use super::sqlite::SqliteStore;
use super::store::{JobStore, Recovered, ResultLines, MAX_ATTEMPTS};

fn job(n: usize) -> NewJob {
    NewJob {
        items: (0..n)
            .map(|i| NewItem {
                line: i + 1,
                custom_id: format!("c{i}"),
                body: json!({"prompt": format!("p{i}")}),
            })
            .collect(),
        line_errors: vec![LineError {
            line: n + 1,
            custom_id: None,
            message: "not valid JSON".into(),
        }],
        image_output: ImageOutput::Base64,
        source: "test".into(),
    }
}

fn done(i: usize) -> ItemOutcome {
    ItemOutcome::Completed {
        body: json!({"parts": [{"type": "text", "text": format!("answer {i}")}]}),
    }
}

#[test]
fn items_are_claimed_once_and_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in(dir.path()).unwrap();
    let j = store.create_job(&job(5)).unwrap();
    assert_eq!(j.status, JobStatus::InProgress);
    assert_eq!((j.request_counts.total, j.request_counts.pending), (5, 5));
    assert_eq!(j.errors.len(), 1);

    let first = store.claim(3).unwrap();
    let second = store.claim(3).unwrap();
    let idx: Vec<usize> = first.iter().chain(&second).map(|c| c.index).collect();
    assert_eq!(idx, vec![0, 1, 2, 3, 4]);
    assert!(store.claim(3).unwrap().is_empty());
    assert_eq!(first[0].body, json!({"prompt": "p0"}));

    assert!(store.record(&j.id, 0, &done(0)).unwrap());
    assert!(
        !store.record(&j.id, 0, &done(0)).unwrap(),
        "a second record is refused"
    );
    store.release(&j.id, 1).unwrap();
    assert!(
        !store.record(&j.id, 1, &done(1)).unwrap(),
        "a released item is not in flight"
    );
    assert_eq!(store.claim(9).unwrap().len(), 1);
    for i in 1..5 {
        let o = if i == 3 {
            ItemOutcome::Failed {
                status_code: 422,
                kind: "prompt_too_long".into(),
                message: "long".into(),
            }
        } else {
            done(i)
        };
        assert!(store.record(&j.id, i, &o).unwrap());
    }
    let j = store.get(&j.id).unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Completed);
    assert_eq!(
        (j.request_counts.completed, j.request_counts.failed),
        (4, 1)
    );
    assert_eq!(j.progress, 1.0);
    assert!(j.finished_at.is_some());

    let lines: Vec<ResultLine> = ResultLines::new(&store, &j.id)
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let ids: Vec<&str> = lines.iter().map(|l| l.custom_id.as_str()).collect();
    assert_eq!(ids, vec!["c0", "c1", "c2", "c3", "c4"]);
    assert_eq!(lines[3].error.as_ref().unwrap().code, "prompt_too_long");
    assert_eq!(lines[2].response.body["parts"][0]["text"], "answer 2");
}

#[test]
fn a_reopened_store_requeues_in_flight_items_and_gives_up_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = SqliteStore::open_in(dir.path()).unwrap();
        let j = store.create_job(&job(3)).unwrap();
        store.claim(2).unwrap();
        assert!(store.record(&j.id, 0, &done(0)).unwrap());
        j.id
        // Dropped with item 1 in flight: what a SIGKILL leaves.
    };
    let store = SqliteStore::open_in(dir.path()).unwrap();
    assert_eq!(
        store.recover().unwrap(),
        Recovered {
            requeued: 1,
            ..Default::default()
        }
    );
    let j = store.get(&id).unwrap().unwrap();
    assert_eq!(
        (j.request_counts.completed, j.request_counts.pending),
        (1, 2)
    );
    // Item 1 keeps dying: at its MAX_ATTEMPTS-th start recovery fails it.
    for attempt in 2..=MAX_ATTEMPTS {
        let c = store.claim(1).unwrap();
        assert_eq!(c[0].index, 1);
        let r = store.recover().unwrap();
        if attempt < MAX_ATTEMPTS {
            assert_eq!((r.requeued, r.abandoned), (1, 0));
        } else {
            assert_eq!((r.requeued, r.abandoned), (0, 1));
        }
    }
    let j = store.get(&id).unwrap().unwrap();
    assert_eq!((j.request_counts.failed, j.request_counts.pending), (1, 1));
    let c = store.claim(5).unwrap();
    assert_eq!(c.len(), 1);
    assert!(store.record(&id, 2, &done(2)).unwrap());
    assert_eq!(
        store.get(&id).unwrap().unwrap().status,
        JobStatus::Completed
    );
}

#[test]
fn cancel_stops_pending_items_and_keeps_finished_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in(dir.path()).unwrap();
    let j = store.create_job(&job(4)).unwrap();
    store.claim(2).unwrap();
    assert!(store.record(&j.id, 0, &done(0)).unwrap());
    let c = store.cancel(&j.id).unwrap().unwrap();
    assert_eq!(c.status, JobStatus::Cancelling);
    assert_eq!(
        (
            c.request_counts.completed,
            c.request_counts.in_flight,
            c.request_counts.cancelled
        ),
        (1, 1, 2)
    );
    assert!(store.claim(4).unwrap().is_empty(), "nothing new runs");
    assert!(store.record(&j.id, 1, &done(1)).unwrap());
    let c = store.get(&j.id).unwrap().unwrap();
    assert_eq!(c.status, JobStatus::Cancelled);
    assert_eq!(
        store.cancel(&j.id).unwrap().unwrap().status,
        JobStatus::Cancelled
    );
    assert!(store.cancel("batch_nope").unwrap().is_none());
    assert!(store.results_page("batch_nope", None, 5).unwrap().is_none());
    assert_eq!(
        store.results_page(&j.id, None, 5).unwrap().unwrap().len(),
        2
    );
}

#[test]
fn a_job_without_valid_lines_is_failed_and_listing_is_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in(dir.path()).unwrap();
    let a = store.create_job(&job(0)).unwrap();
    assert_eq!(a.status, JobStatus::Failed);
    assert_eq!(a.progress, 1.0);
    let b = store.create_job(&job(1)).unwrap();
    let ids: Vec<String> = store.list(10).unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![b.id, a.id]);
}
