//! The HTTP service end to end: the real server on a loopback port over a
//! tiny random model (with a random VQ model), every endpoint, streaming,
//! and concurrent requests against runs alone. Bad input is in
//! tests/server_errors.rs.

mod common;
mod server_util;

use futures::future::join_all;
use serde_json::{json, Value};
use server_util::*;

#[tokio::test]
async fn health_models_and_metrics() {
    let s = shared();
    let (status, health) = get(&s.at("/health")).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");

    let (status, models) = get(&s.at("/v1/models")).await;
    assert_eq!(status, 200);
    let data = models["data"].as_array().unwrap();
    let base = &data[0];
    assert_eq!(
        (base["kind"].as_str(), base["parent"].is_null()),
        (Some("base"), true)
    );
    let adapters: Vec<&str> = data[1..]
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for name in ["text", "image", "math", "code"] {
        assert!(adapters.contains(&name), "{name} missing from {adapters:?}");
    }
    assert!(
        data[1..].iter().all(|m| m["parent"] == base["id"]),
        "{models}"
    );

    // One generation so that the token counters have samples.
    let (status, _) = post(
        &s.at("/v1/generate"),
        &json!({"prompt": "metrics", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200);
    let text = get_text(&s.at("/metrics")).await;
    for name in [
        "molora_queue_depth",
        "molora_batch_size",
        "molora_tokens_total{modality=\"text\"}",
        "molora_adapter_tokens_total",
        "molora_request_seconds_bucket",
        "molora_time_to_first_token_seconds_bucket",
        "molora_hot_set_hits_total",
        "molora_hot_set_evictions_total",
        "molora_requests_total{route=\"/v1/generate\",status=\"200\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
}

#[tokio::test]
async fn generate_returns_text_usage_and_routing() {
    let s = shared();
    let body = json!({"prompt": "a red circle", "max_tokens": 8, "sampling": greedy(1), "return_tokens": true});
    let (status, r) = post(&s.at("/v1/generate"), &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["finish_reason"], "length");
    let u = &r["usage"];
    assert_eq!(
        u["text_tokens"].as_u64().unwrap() + u["image_tokens"].as_u64().unwrap(),
        8,
        "{r}"
    );
    assert!(u["prompt_tokens"].as_u64().unwrap() > 1);
    assert_eq!(r["routing"]["mode"], "single_pass");
    assert!(r["routing"]["passes"].as_u64().unwrap() >= 1);
    assert!(r["routing"]["token_rows"].as_u64().unwrap() >= 8);
    assert_eq!(r["tokens"].as_array().unwrap().len(), 8);
    // Greedy and seeded: the same request gives the same answer.
    let (_, again) = post(&s.at("/v1/generate"), &body).await;
    assert_eq!(again["parts"], r["parts"]);
}

#[tokio::test]
async fn image_input_and_image_output() {
    let s = shared();
    let tpi = 16;
    let prompt = json!([
        {"type": "image", "png_base64": png_base64(24, 12)},
        {"type": "text", "text": "the same again"},
        {"type": "image_start"}
    ]);
    let body = json!({"prompt": prompt, "max_tokens": tpi + 2, "sampling": seeded(3)});
    let (status, r) = post(&s.at("/v1/generate"), &body).await;
    assert_eq!(status, 200, "{r}");
    // <s>, <boi> 16 codes <eoi>, at least one text token, <boi>.
    let min_prompt = 1 + (tpi + 2) + 1 + 1;
    assert!(
        r["usage"]["prompt_tokens"].as_u64().unwrap() as usize >= min_prompt,
        "{r}"
    );
    assert_eq!(r["usage"]["images"], 1, "{r}");
    let images = images_of(&r["parts"]);
    assert_eq!(images.len(), 1, "{r}");
    assert_eq!(
        (images[0]["width"].as_u64(), images[0]["height"].as_u64()),
        (Some(16), Some(16))
    );
    assert_eq!(
        png_size(images[0]["png_base64"].as_str().unwrap()),
        (16, 16)
    );
    assert_eq!(
        r["parts"][0]["type"], "image",
        "the picture comes first: {r}"
    );
}

#[tokio::test]
async fn streaming_sends_tokens_text_previews_images_and_done() {
    let s = shared();
    let prompt = json!([{"type": "text", "text": "draw"}, {"type": "image_start"}]);
    let body = json!({"prompt": prompt, "max_tokens": 24, "sampling": seeded(5), "stream": true});
    let r = post_response(&s.at("/v1/generate"), &body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = read_sse(r).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert_eq!(
        names.iter().filter(|&&n| n == "token").count(),
        24,
        "{names:?}"
    );
    let previews: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "image_preview")
        .map(|(_, d)| d)
        .collect();
    assert!(!previews.is_empty(), "{names:?}");
    assert!(
        previews
            .iter()
            .all(|p| p["codes_done"].as_u64().unwrap() % 4 == 0),
        "{previews:?}"
    );
    let first_image = names
        .iter()
        .position(|&n| n == "image")
        .expect("an image event");
    assert!(names.iter().position(|&n| n == "image_preview").unwrap() < first_image);
    let tokens: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "token")
        .map(|(_, d)| d)
        .collect();
    assert!(
        tokens[..16]
            .iter()
            .all(|t| t["modality"] == "image" && t["adapter"] == "image"),
        "{tokens:?}"
    );
    let (_, done) = events.last().unwrap();
    assert_eq!(done["usage"]["images"], 1);

    // The same request without streaming gives the same parts.
    let streamed_text: String = events
        .iter()
        .filter(|(n, _)| n == "text")
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect();
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    let (_, r) = post(&s.at("/v1/generate"), &plain).await;
    assert_eq!(text_of(&r["parts"]), streamed_text);
    let image = events.iter().find(|(n, _)| n == "image").unwrap();
    assert_eq!(
        images_of(&r["parts"])[0]["png_base64"],
        image.1["png_base64"]
    );
}

#[tokio::test]
async fn chat_completions_answers_with_content_parts() {
    let s = shared();
    let url = format!("data:image/png;base64,{}", png_base64(16, 16));
    let body = json!({
        "model": "ignored-by-nobody", "max_tokens": 6, "temperature": 0.0, "seed": 2,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                          {"type": "image_url", "image_url": {"url": url}}]}
        ]
    });
    let (status, r) = post(&s.at("/v1/chat/completions"), &body).await;
    assert_error(&(status, r), 404, "model_not_found", &["ignored-by-nobody"]);

    let (_, models) = get(&s.at("/v1/models")).await;
    let mut body = body;
    body["model"] = models["data"][0]["id"].clone();
    let (status, r) = post(&s.at("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    let msg = &r["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    assert!(msg["content"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["type"] == "text" || p["type"] == "image_url"));
    assert_eq!(r["usage"]["completion_tokens"], 6);
    assert_eq!(
        r["usage"]["total_tokens"].as_u64(),
        Some(r["usage"]["prompt_tokens"].as_u64().unwrap() + 6)
    );

    // An adapter's name as the model forces that adapter.
    let forced =
        json!({"model": "math", "max_tokens": 4, "messages": [{"role": "user", "content": "1+1"}]});
    let (status, r) = post(&s.at("/v1/chat/completions"), &forced).await;
    assert_eq!(status, 200, "{r}");

    // Streaming: chunks, then usage, then [DONE].
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let events = read_sse(post_response(&s.at("/v1/chat/completions"), &stream).await).await;
    assert_eq!(events.last().unwrap().1, Value::String("[DONE]".into()));
    let chunks: Vec<&Value> = events
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d.is_object())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "length"),
        "{chunks:?}"
    );
}

#[tokio::test]
async fn compare_runs_both_modes_with_one_seed() {
    let s = shared();
    let prompt = json!([{"type": "text", "text": "compare"}, {"type": "image_start"}]);
    let body = json!({"prompt": prompt, "max_tokens": 20, "seed": 11, "per_sequence": ["math"],
                      "sampling": {"stop_at_eos": false}});
    let (status, r) = post(&s.at("/v1/compare"), &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["seed"], 11);
    let modes: Vec<&str> = r["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["single_pass", "per_modality_pass", "per_sequence"]);
    let runs = r["runs"].as_array().unwrap();
    for run in runs {
        assert!(run["wall_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(run["token_ids"].as_array().unwrap().len(), 20, "{run}");
        assert!(run["routing"]["rows_per_adapter"].is_object());
    }
    // Two modalities: per_modality_pass runs two passes over every token.
    let (sp, pmp) = (&runs[0]["routing"], &runs[1]["routing"]);
    assert!(
        pmp["passes"].as_u64() > sp["passes"].as_u64(),
        "{sp} vs {pmp}"
    );
    assert!(r["work_ratio"].as_f64().unwrap() > 1.5, "{r}");
    let identical = runs[0]["token_ids"] == runs[1]["token_ids"];
    assert_eq!(r["identical"], identical);
    // The same seed twice gives the same runs.
    let (_, again) = post(&s.at("/v1/compare"), &body).await;
    assert_eq!(again["runs"][1]["token_ids"], runs[1]["token_ids"]);
}

#[tokio::test]
async fn adapters_are_listed_loaded_and_unloaded_by_the_admin() {
    let s = shared();
    let adapters = s.at("/v1/adapters");
    let (status, body) = get(&adapters).await;
    assert_error(&(status, body), 401, "unauthorized", &["Bearer"]);
    let admin = |r: reqwest::RequestBuilder| r.bearer_auth(ADMIN_KEY);
    let wrong = client()
        .get(&adapters)
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let (status, list) = read_json(admin(client().get(&adapters)).send().await.unwrap()).await;
    assert_eq!(status, 200, "{list}");
    assert!(list["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == "math"));

    // A new adapter folder appears after start: load it, use it, unload it.
    let dir = model_dir().join("adapters");
    copy_dir(&dir.join("math"), &dir.join("extra"));
    let load = |name: &str| admin(client().post(&adapters)).json(&json!({"name": name}));
    let (status, r) = read_json(load("extra").send().await.unwrap()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["loaded"], "extra");
    assert!(r["slot"].as_u64().unwrap() > 0);
    let (_, models) = get(&s.at("/v1/models")).await;
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "extra" && m["parent"] == models["data"][0]["id"]));
    let gen = json!({"prompt": "x", "max_tokens": 2, "routing_mode": "per_sequence", "adapters": {"forced": ["extra"]}});
    assert_eq!(post(&s.at("/v1/generate"), &gen).await.0, 200);
    let (status, r) = read_json(
        admin(client().delete(s.at("/v1/adapters/extra")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), r["unloaded"].as_str()),
        (200, Some("extra")),
        "{r}"
    );
    let gone = post(&s.at("/v1/generate"), &gen).await;
    assert_error(&gone, 422, "unknown_adapter", &["extra"]);

    // Missing, unsafe and broken adapters are refused; the service keeps serving.
    assert_error(
        &read_json(load("nope").send().await.unwrap()).await,
        404,
        "adapter_not_found",
        &["nope"],
    );
    assert_error(
        &read_json(load("../math").send().await.unwrap()).await,
        422,
        "validation",
        &["`name`"],
    );
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("adapter_config.json"), "{not json").unwrap();
    assert_error(
        &read_json(load("broken").send().await.unwrap()).await,
        422,
        "adapter_refused",
        &["broken"],
    );
    let missing = admin(client().delete(s.at("/v1/adapters/nope")))
        .send()
        .await
        .unwrap();
    assert_error(
        &read_json(missing).await,
        404,
        "adapter_not_found",
        &["nope"],
    );
    assert_eq!(
        post(
            &s.at("/v1/generate"),
            &json!({"prompt": "still here", "max_tokens": 2})
        )
        .await
        .0,
        200
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test]
async fn concurrent_requests_match_each_run_alone() {
    let s = shared();
    let img = json!([{"type": "text", "text": "a picture"}, {"type": "image_start"}]);
    let bodies = vec![
        json!({"prompt": "single pass", "max_tokens": 12, "sampling": seeded(1)}),
        json!({"prompt": "per modality", "max_tokens": 12, "sampling": greedy(2), "routing_mode": "per_modality_pass"}),
        json!({"prompt": "forced", "max_tokens": 12, "sampling": seeded(3), "routing_mode": "per_sequence",
               "adapters": {"forced": ["math", "code"]}}),
        json!({"prompt": "base", "max_tokens": 12, "sampling": seeded(4), "routing_mode": "base"}),
        json!({"prompt": img, "max_tokens": 20, "sampling": seeded(5)}),
        json!({"prompt": img, "max_tokens": 20, "sampling": seeded(6), "routing_mode": "per_modality_pass",
               "adapters": {"semantic": ["code"], "modality": {"text": "chat"}}}),
    ];
    let url = s.at("/v1/generate");
    let mut alone = vec![];
    for b in &bodies {
        let (status, r) = post(&url, b).await;
        assert_eq!(status, 200, "{r}");
        alone.push(r["parts"].clone());
    }
    let together = join_all(bodies.iter().map(|b| post(&url, b))).await;
    for (i, ((status, r), a)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(*status, 200, "{r}");
        assert_eq!(&r["parts"], a, "request {i} differs when run concurrently");
    }
}

#[tokio::test]
async fn the_playground_is_served() {
    let s = shared();
    let r = client().get(s.at("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = r.text().await.unwrap();
    for needle in [
        "/v1/generate",
        "/v1/compare",
        "image_preview",
        "per_modality_pass",
    ] {
        assert!(html.contains(needle), "{needle}");
    }
}
