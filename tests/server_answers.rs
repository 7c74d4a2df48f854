//! What the answers promise, over the real server on loopback: `max_tokens`
//! is a hard limit even when it cuts an image block; `/v1/generate` puts the
//! answer separator after the prompt as chat does (`raw` opts out); the runs
//! of `/v1/compare` never share a step, so each one's figures are its own;
//! routing stats are rounded (row counts as integers).

mod common;
mod server_util;

use std::time::Instant;

use serde_json::{json, Value};
use server_util::*;

/// Codes per image in the test model.
const TPI: u64 = 16;

fn completion_tokens(r: &Value) -> u64 {
    r["usage"]["text_tokens"].as_u64().unwrap() + r["usage"]["image_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn max_tokens_is_a_hard_limit_when_it_ends_an_image_block() {
    let s = shared();
    let prompt = json!([{"type": "text", "text": "draw"}, {"type": "image_start"}]);
    for max in [TPI - 6, TPI - 1, TPI, TPI + 1, TPI + 2] {
        let body = json!({"prompt": prompt, "max_tokens": max, "sampling": seeded(7), "return_tokens": true});
        let (status, r) = post(&s.at("/v1/generate"), &body).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(completion_tokens(&r), max, "max_tokens {max}: {r}");
        assert_eq!(r["tokens"].as_array().unwrap().len() as u64, max);
        assert_eq!(r["finish_reason"], "length");
        assert_eq!(r["usage"]["image_tokens"].as_u64(), Some(max.min(TPI)));
        // An image whose codes all fit is delivered (its <eoi> may not
        // fit); one cut short is dropped.
        let complete = max >= TPI;
        assert_eq!(
            r["usage"]["images"], complete as u64,
            "max_tokens {max}: {r}"
        );
        assert_eq!(
            images_of(&r["parts"]).len(),
            complete as usize,
            "max_tokens {max}"
        );
    }

    // Streaming: as many token events as max_tokens, and the image.
    let body = json!({"prompt": prompt, "max_tokens": TPI, "sampling": seeded(7), "stream": true});
    let events = read_sse(post_response(&s.at("/v1/generate"), &body).await).await;
    let count = |name: &str| events.iter().filter(|(n, _)| n == name).count() as u64;
    assert_eq!(count("token"), TPI);
    assert_eq!(count("image"), 1);
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done");
    assert_eq!(completion_tokens(done), TPI, "{done}");
}

#[tokio::test]
async fn generate_adds_the_answer_separator_like_chat() {
    let s = shared();
    let question = "what is 6 * 7";
    let sampling = json!({"seed": 2, "text": {"temperature": 0.0}});
    let gen = |prompt: Value, raw: bool| {
        let mut body = json!({"prompt": prompt, "max_tokens": 6, "sampling": sampling});
        if raw {
            body["raw"] = json!(true);
        }
        body
    };
    let (status, g) = post(&s.at("/v1/generate"), &gen(json!(question), false)).await;
    assert_eq!(status, 200, "{g}");
    let chat = json!({"messages": [{"role": "user", "content": question}], "max_tokens": 6,
                      "temperature": 0.0, "seed": 2});
    let (status, c) = post(&s.at("/v1/chat/completions"), &chat).await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(
        g["usage"]["prompt_tokens"], c["usage"]["prompt_tokens"],
        "generate and chat see the same prompt: {g} {c}"
    );
    assert_eq!(
        text_of(&g["parts"]),
        text_of(&c["choices"][0]["message"]["content"])
    );

    // `raw` sends the prompt as it is: one token less, and the same answer
    // as spelling the separator out as its own part.
    let (_, raw) = post(&s.at("/v1/generate"), &gen(json!(question), true)).await;
    let prompt_len = |r: &Value| r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(prompt_len(&raw) + 1, prompt_len(&g), "{raw}");
    let spelled = json!([{"type": "text", "text": question}, {"type": "text", "text": "\n"}]);
    let (_, spelled) = post(&s.at("/v1/generate"), &gen(spelled, true)).await;
    assert_eq!(spelled["parts"], g["parts"]);
    // A prompt that already ends with the separator does not get a second.
    let (_, ends) = post(
        &s.at("/v1/generate"),
        &gen(json!(format!("{question}\n")), false),
    )
    .await;
    assert_eq!(prompt_len(&ends), prompt_len(&g));
    assert_eq!(ends["parts"], g["parts"]);

    // Before a trailing image_start: the picture is the answer.
    let draw = |text: &str, raw: bool| {
        json!({"prompt": [{"type": "text", "text": text}, {"type": "image_start"}], "max_tokens": 4,
               "sampling": greedy(3), "raw": raw, "return_tokens": true})
    };
    let (_, sep) = post(&s.at("/v1/generate"), &draw("draw", false)).await;
    let spelled = json!({"prompt": [{"type": "text", "text": "draw"}, {"type": "text", "text": "\n"},
                                    {"type": "image_start"}],
                         "max_tokens": 4, "sampling": greedy(3), "raw": true, "return_tokens": true});
    let (_, by_hand) = post(&s.at("/v1/generate"), &spelled).await;
    assert_eq!(sep["tokens"], by_hand["tokens"]);
    assert_eq!(prompt_len(&sep), prompt_len(&by_hand));
    let (_, raw) = post(&s.at("/v1/generate"), &draw("draw", true)).await;
    assert_eq!(prompt_len(&raw) + 1, prompt_len(&sep));
}

/// A `/v1/compare` answer and the milliseconds the client waited for it.
async fn timed_compare(body: &Value) -> (Value, f64) {
    let started = Instant::now();
    let (status, r) = post(&shared().at("/v1/compare"), body).await;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status, 200, "{r}");
    (r, elapsed_ms)
}

#[tokio::test]
async fn compare_runs_do_not_share_steps_and_report_their_own_work() {
    // Text prompts, greedy: an answer of one modality (no picture started)
    // must come out the same in both modes.
    let mut one_modality = 0;
    for prompt in ["tell me about it", "and then", "say more", "why not"] {
        let body = json!({"prompt": prompt, "max_tokens": 12, "seed": 5,
                          "sampling": {"stop_at_eos": false, "text": {"temperature": 0.0}}});
        let (r, elapsed_ms) = timed_compare(&body).await;
        let runs = r["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        for run in runs {
            let routing = &run["routing"];
            let wall = run["wall_ms"].as_f64().unwrap();
            let forward = routing["forward_ms"].as_f64().unwrap();
            assert!(wall > 0.0 && forward > 0.0, "{run}");
            assert!(
                forward <= wall + 1e-3,
                "forward time beyond the run's wall time: {run}"
            );
            assert!(routing["passes"].as_u64().unwrap() >= 12, "{run}");
            let prompt_len = run["usage"]["prompt_tokens"].as_u64().unwrap();
            assert!(
                routing["token_rows"].as_u64().unwrap() >= prompt_len + 11,
                "{run}"
            );
        }
        let (sp, pmp) = (&runs[0]["routing"], &runs[1]["routing"]);
        assert!(
            pmp["passes"].as_u64() >= sp["passes"].as_u64(),
            "{sp} {pmp}"
        );
        assert!(pmp["token_rows"].as_u64() >= sp["token_rows"].as_u64());
        assert!(r["time_ratio"].as_f64().unwrap() > 0.0, "{r}");
        let walls: f64 = runs.iter().map(|x| x["wall_ms"].as_f64().unwrap()).sum();
        assert!(
            walls <= elapsed_ms,
            "{walls:.1} ms of runs in {elapsed_ms:.1} ms"
        );
        if runs.iter().all(|x| x["usage"]["image_tokens"] == 0) {
            one_modality += 1;
            assert_eq!(r["identical"], true, "{r}");
            assert_eq!(runs[0]["token_ids"], runs[1]["token_ids"]);
        }
    }
    assert!(one_modality > 0, "every greedy answer started a picture");

    // Long runs, one after another: their wall times add up within the
    // request's (runs sharing steps would each last about the whole request).
    let prompt = json!([{"type": "text", "text": "a picture"}, {"type": "image_start"}]);
    let body = json!({"prompt": prompt, "max_tokens": 64, "seed": 6, "per_sequence": ["math"],
                      "sampling": {"stop_at_eos": false}});
    let (r, elapsed_ms) = timed_compare(&body).await;
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    let walls: Vec<f64> = runs
        .iter()
        .map(|x| x["wall_ms"].as_f64().unwrap())
        .collect();
    assert!(
        walls.iter().sum::<f64>() <= elapsed_ms,
        "runs overlapped: walls {walls:?} ms in a {elapsed_ms:.1} ms request"
    );
    let (sp, pmp) = (&runs[0]["routing"], &runs[1]["routing"]);
    assert!(pmp["passes"].as_u64() > sp["passes"].as_u64(), "{sp} {pmp}");
}

#[tokio::test]
async fn routing_stats_are_rounded() {
    let s = shared();
    let prompt = json!([{"type": "text", "text": "a picture"}, {"type": "image_start"}]);
    let body = json!({"prompt": prompt, "max_tokens": 24, "sampling": seeded(9)});
    let (status, r) = post(&s.at("/v1/generate"), &body).await;
    assert_eq!(status, 200, "{r}");
    assert_rounded_routing(&r["routing"]);
    assert_eq!(
        r["routing"]["rows_per_adapter"]["image"].as_u64(),
        Some(TPI),
        "{r}"
    );

    // Thirds and sums of many steps: integers stay integers, the rest keep
    // two decimals.
    let mut stats = molora::engine::types::RoutingStats::default();
    stats.rows_per_adapter.insert("math".into(), 37.0 / 3.0);
    stats
        .rows_per_adapter
        .insert("text".into(), (0..10).map(|_| 0.1).sum::<f64>() * 40.0);
    stats.forward_ms = 1.0 / 3.0;
    let v = serde_json::to_value(&stats).unwrap();
    assert_eq!(v["rows_per_adapter"], json!({"math": 12.33, "text": 40}));
    assert_eq!(v["forward_ms"], json!(0.333));
}
