//! Bad input over HTTP: every case gets a 4xx JSON error `{error, type}`
//! that names the problem (never a 500 or a panic); a full queue is 429; a
//! client that disconnects mid-stream frees its sequence.

mod common;
mod server_util;

use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use serde_json::{json, Value};
use server_util::*;

async fn generate(body: Value) -> (reqwest::StatusCode, Value) {
    post(&shared().at("/v1/generate"), &body).await
}

async fn raw(
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (reqwest::StatusCode, Value) {
    let r = client()
        .post(shared().at(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await;
    read_json(r.expect("request sent")).await
}

#[tokio::test]
async fn malformed_json_and_wrong_shapes() {
    assert_error(
        &raw("/v1/generate", "application/json", "{\"prompt\": ").await,
        400,
        "malformed_json",
        &["JSON"],
    );
    assert_error(
        &raw("/v1/generate", "application/json", "not json").await,
        400,
        "malformed_json",
        &[],
    );
    // Any content type is read as JSON (curl -d sends a form type by default).
    assert_error(
        &raw("/v1/generate", "text/plain", "{}").await,
        422,
        "invalid_request",
        &["`prompt` is required"],
    );
    let cases = [
        (
            json!({"prompt": "x", "max_tokens": "ten"}),
            "`max_tokens`: invalid type: string \"ten\"",
        ),
        (json!({"prompt": "x", "stream": "yes"}), "`stream`"),
        (
            json!({"prompt": 5}),
            "`prompt` must be a string or an array of parts; given: a number",
        ),
        (
            json!({"prompt": [{"type": "video", "url": "x"}]}),
            "`prompt[0]`",
        ),
        (
            json!({"prompt": [{"type": "text"}]}),
            "`prompt[0]`: missing field `text`",
        ),
        (json!({"max_tokens": 3}), "`prompt` is required"),
        (
            json!({"prompt": "x", "max_token": 3}),
            "unknown field `max_token`",
        ),
        (
            json!({"prompt": "x", "sampling": {"text": {"temp": 1}}}),
            "`sampling`",
        ),
        (
            json!({"prompt": "x", "sampling": {"temprature": 1}}),
            "unknown field `sampling.temprature`",
        ),
        (
            json!({"prompt": "x", "sampling": 3}),
            "`sampling` must be an object",
        ),
        (
            json!({"prompt": "x", "adapters": {"forced": "math"}}),
            "`adapters`",
        ),
        (json!([1, 2]), "JSON object"),
    ];
    for (body, words) in cases {
        assert_error(&generate(body).await, 422, "invalid_request", &[words]);
    }
    let chat = post(
        &shared().at("/v1/chat/completions"),
        &json!({"messages": "hi"}),
    )
    .await;
    assert_error(&chat, 422, "invalid_request", &["`messages`"]);
    let role = json!({"messages": [{"role": "robot", "content": "hi"}]});
    assert_error(
        &post(&shared().at("/v1/chat/completions"), &role).await,
        422,
        "invalid_request",
        &["role", "robot"],
    );
}

#[tokio::test]
async fn unknown_mode_adapter_route_and_method() {
    let mode = generate(json!({"prompt": "x", "routing_mode": "fastest"})).await;
    assert_error(
        &mode,
        422,
        "unknown_routing_mode",
        &["fastest", "single_pass"],
    );
    let adapter =
        json!({"prompt": "x", "routing_mode": "per_sequence", "adapters": {"forced": ["nope"]}});
    assert_error(&generate(adapter).await, 422, "unknown_adapter", &["nope"]);
    let semantic = json!({"prompt": "x", "adapters": {"semantic": ["ghost"]}});
    assert_error(
        &generate(semantic).await,
        422,
        "unknown_adapter",
        &["ghost"],
    );
    let modality = json!({"prompt": "x", "adapters": {"modality": {"smell": "math"}}});
    assert_error(
        &generate(modality).await,
        422,
        "invalid_adapters",
        &["smell"],
    );
    let no_forced = json!({"prompt": "x", "routing_mode": "per_sequence"});
    assert_error(
        &generate(no_forced).await,
        422,
        "invalid_adapters",
        &["adapters.forced"],
    );
    let stray = json!({"prompt": "x", "adapters": {"forced": ["math"]}});
    assert_error(
        &generate(stray).await,
        422,
        "invalid_adapters",
        &["per_sequence"],
    );
    assert_error(
        &get(&shared().at("/v2/nothing")).await,
        404,
        "not_found",
        &["/v2/nothing"],
    );
    assert_error(
        &get(&shared().at("/v1/generate")).await,
        405,
        "method_not_allowed",
        &["GET"],
    );
}

#[tokio::test]
async fn empty_and_too_long_prompts_and_token_limits() {
    for prompt in [
        json!(""),
        json!("   "),
        json!([]),
        json!([{"type": "text", "text": ""}]),
    ] {
        assert_error(
            &generate(json!({"prompt": prompt})).await,
            422,
            "empty_prompt",
            &["`prompt`"],
        );
    }
    let chat = post(
        &shared().at("/v1/chat/completions"),
        &json!({"messages": []}),
    )
    .await;
    assert_error(&chat, 422, "empty_prompt", &[]);
    let long = "lorem ipsum dolor sit amet ".repeat(200);
    let r = generate(json!({"prompt": long})).await;
    assert_error(&r, 422, "prompt_too_long", &["`prompt`", "128", "Given:"]);
    let r = generate(json!({"prompt": "x", "max_tokens": 10_000})).await;
    assert_error(
        &r,
        422,
        "validation",
        &["`max_tokens` must be >= 1 and <= 64. Given: 10000"],
    );
    let r = generate(json!({"prompt": "x", "max_tokens": 0})).await;
    assert_error(&r, 422, "validation", &["`max_tokens`", "Given: 0"]);
    let r = generate(json!({"prompt": "x", "sampling": {"text": {"temperature": -1.0}}})).await;
    assert_error(
        &r,
        422,
        "validation",
        &["`text.temperature` must be >= 0", "Given: -1"],
    );
    let r = generate(json!({"prompt": "x", "sampling": {"image": {"top_p": 1.5}}})).await;
    assert_error(&r, 422, "validation", &["`image.top_p`", "Given: 1.5"]);
    let r = generate(json!({"prompt": "I say <racm3:break> here"})).await;
    assert_error(&r, 422, "invalid_request", &["reserved token"]);
    let start = json!({"prompt": [{"type": "image_start"}, {"type": "text", "text": "x"}]});
    assert_error(
        &generate(start).await,
        422,
        "invalid_request",
        &["last part"],
    );
}

#[tokio::test]
async fn bad_images_and_big_bodies() {
    let part = |b64: &str| json!({"prompt": [{"type": "image", "png_base64": b64}, {"type": "text", "text": "x"}]});
    assert_error(
        &generate(part("!!not base64!!")).await,
        422,
        "invalid_image",
        &["`prompt[0].png_base64`", "base64"],
    );
    use base64::Engine as _;
    let not_png = base64::engine::general_purpose::STANDARD.encode(b"GIF89a, or so it claims");
    assert_error(
        &generate(part(&not_png)).await,
        422,
        "invalid_image",
        &["`prompt[0].png_base64`", "PNG"],
    );
    assert_error(&generate(part("")).await, 422, "invalid_image", &["empty"]);
    let three: Vec<Value> = (0..3)
        .map(|_| json!({"type": "image", "png_base64": png_base64(8, 8)}))
        .collect();
    assert_error(
        &generate(json!({"prompt": three})).await,
        422,
        "validation",
        &["at most 2 images", "Given: 3"],
    );
    let url = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}]}]});
    let r = post(&shared().at("/v1/chat/completions"), &url).await;
    assert_error(
        &r,
        422,
        "invalid_image",
        &[
            "`messages[0].content[0].image_url.url`",
            "data:image/png;base64,",
        ],
    );

    let big = json!({"prompt": "x".repeat(100 * 1024)});
    assert_error(
        &generate(big).await,
        413,
        "payload_too_large",
        &["65536 bytes"],
    );
    // Chunked (no Content-Length): the limit holds while reading.
    let chunks = futures::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 4096])));
    let r = raw(
        "/v1/generate",
        "application/json",
        reqwest::Body::wrap_stream(chunks),
    )
    .await;
    assert_error(&r, 413, "payload_too_large", &["65536"]);
}

#[tokio::test]
async fn a_full_queue_answers_429_and_the_rest_succeed() {
    let mut cfg = test_config();
    cfg.limits.max_batch_size = 1;
    cfg.limits.max_queue = 1;
    cfg.limits.max_tokens = 400;
    let server = TestServer::start(cfg);
    let url = server.at("/v1/generate");
    // Long enough that all twelve arrive while the first one runs.
    let body = json!({"prompt": "busy", "max_tokens": 400, "sampling": seeded(1)});
    let answers = join_all((0..12).map(|_| post(&url, &body))).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let full: Vec<_> = answers.iter().filter(|(s, _)| *s == 429).collect();
    assert_eq!(ok + full.len(), answers.len(), "{answers:?}");
    assert!(
        ok >= 1 && !full.is_empty(),
        "ok {ok}, overloaded {}",
        full.len()
    );
    assert_error(full[0], 429, "overloaded", &["queue is full"]);
    let metrics = get_text(&server.at("/metrics")).await;
    assert!(
        metrics.contains("molora_errors_total{type=\"overloaded\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    let mut cfg = test_config();
    cfg.limits.max_tokens = 2000;
    cfg.limits.max_batch_size = 1;
    let server = TestServer::start(cfg);
    // 2000 tokens take far longer than noticing the disconnect.
    let body =
        json!({"prompt": "go on", "max_tokens": 2000, "sampling": seeded(2), "stream": true});
    let r = post_response(&server.at("/v1/generate"), &body).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.expect("a first frame").unwrap();
    assert!(first.starts_with(b"event: "), "{first:?}");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, h) = get(&server.at("/health")).await;
        if h["running"] == 0 && h["queue_depth"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "sequence still running: {h}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let metrics = get_text(&server.at("/metrics")).await;
    assert!(
        metrics.contains("molora_requests_finished_total 0"),
        "the request ran to its end:\n{metrics}"
    );
    // The server keeps serving.
    let ok = post(
        &server.at("/v1/generate"),
        &json!({"prompt": "next", "max_tokens": 2}),
    )
    .await;
    assert_eq!(ok.0, 200, "{}", ok.1);
}
