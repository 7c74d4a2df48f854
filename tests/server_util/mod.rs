//! Helpers for the HTTP tests: a tiny random model directory with a random
//! VQ model (so images can be read and drawn), servers on loopback ports,
//! and a small SSE parser.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use molora::engine::images::VQ_WEIGHTS_FILE;
use molora::model::config::Config;
use molora::model::vq::{VqConfig, VqModel};
use molora::random_model::{write_random_model, RandomModelSpec};
use molora::server::config::{HotSetSection, LimitsConfig, ServerConfig};
use molora::server::RunningServer;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common;

pub const ADMIN_KEY: &str = "test-admin-key";

/// The tiny model (tests/common, with a 2048-token context) plus a random VQ for its 4x4 grid of 64
/// codes (16x16 pixels), written once per test process under target/tmp.
pub fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // One folder per test binary, rewritten each run (cargo runs test
        // binaries one after another).
        let exe = std::env::current_exe().expect("test binary path");
        let name = exe
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("model-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        // A long context so that a stream outlasts a client's disconnect.
        let spec = RandomModelSpec {
            max_position_embeddings: 2048,
            ..common::tiny_spec()
        };
        write_random_model(&dir, &spec).expect("write the tiny model");
        let path = dir.join("config.json");
        let mut cfg = Config::from_file(&path).expect("tiny config");
        let vocab = cfg.vocab().unwrap();
        let vq_json = json!({
            "embed_dim": 4, "n_embed": vocab.image_range().len(), "z_channels": 4, "resolution": 16,
            "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_type": "none"
        });
        let vq_cfg: VqConfig = serde_json::from_value(vq_json.clone()).unwrap();
        assert_eq!(vq_cfg.tokens_per_image(), vocab.tokens_per_image);
        let vm = VarMap::new();
        VqModel::new(
            &vq_cfg,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .expect("tiny vq");
        vm.save(dir.join(VQ_WEIGHTS_FILE)).expect("save vq");
        cfg.vq_config = Some(vq_json);
        cfg.to_file(&path).unwrap();
        dir
    })
}

/// Small limits, an admin key, previews every 4 image codes.
pub fn test_config() -> ServerConfig {
    let model = model_dir();
    ServerConfig {
        bind: "127.0.0.1:0".into(),
        model_dir: model.to_path_buf(),
        adapter_dir: None,
        data_dir: model.join("data"),
        limits: LimitsConfig {
            max_prompt_tokens: 128,
            max_tokens: 64,
            default_max_tokens: 16,
            max_body_bytes: 64 * 1024,
            max_queue: 64,
            max_batch_size: 8,
            max_batch_tokens: 64,
            max_images_per_prompt: 2,
            max_batch_items: 64,
            max_batch_bytes: 1024 * 1024,
            batch_concurrency: 4,
            batch_concurrency_busy: 2,
        },
        hot_set: HotSetSection {
            capacity: 8,
            max_rank: 8,
        },
        admin_key: Some(ADMIN_KEY.into()),
        preview_every: 4,
        workers: 2,
        ..ServerConfig::default()
    }
}

pub struct TestServer {
    pub url: String,
    server: Option<RunningServer>,
}

impl TestServer {
    pub fn start(cfg: ServerConfig) -> Self {
        let server = molora::server::start(cfg).expect("server starts");
        Self {
            url: server.url(),
            server: Some(server),
        }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            // Stopping from inside a test's async runtime would block it; a
            // plain thread does not care.
            let _ = std::thread::spawn(move || s.stop()).join();
        }
    }
}

/// One server shared by the tests that do not need special limits.
pub fn shared() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(test_config()))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap()
}

/// POSTs JSON and returns the status and the JSON body.
pub async fn post(url: &str, body: &Value) -> (StatusCode, Value) {
    let r = client()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent");
    read_json(r).await
}

pub async fn get(url: &str) -> (StatusCode, Value) {
    read_json(client().get(url).send().await.expect("request sent")).await
}

/// POSTs JSON and returns the response unread (for streams and headers).
pub async fn post_response(url: &str, body: &Value) -> reqwest::Response {
    client()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

/// GETs a text body (`/metrics`, the playground page).
pub async fn get_text(url: &str) -> String {
    let r = client().get(url).send().await.expect("request sent");
    r.text().await.expect("a text body")
}

/// The text of an answer's parts, concatenated.
pub fn text_of(parts: &Value) -> String {
    parts
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect()
}

/// The image parts of an answer.
pub fn images_of(parts: &Value) -> Vec<&Value> {
    parts
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "image")
        .collect()
}

pub async fn read_json(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text:?} (status {status})"));
    (status, v)
}

/// Checks a JSON error: status, stable type, and words the message must hold.
pub fn assert_error(got: &(StatusCode, Value), status: u16, kind: &str, words: &[&str]) {
    let (s, body) = got;
    assert_eq!(s.as_u16(), status, "{body}");
    assert_eq!(body["type"], kind, "{body}");
    let msg = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {body}"));
    for w in words {
        assert!(msg.contains(w), "error message {msg:?} lacks {w:?}");
    }
}

/// Reads a whole SSE body into (event name, data) pairs; `data: [DONE]`
/// comes back as a string value.
pub async fn read_sse(r: reqwest::Response) -> Vec<(String, Value)> {
    use futures::StreamExt;
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    let mut events = vec![];
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("utf-8"));
        while let Some(cut) = buf.find("\n\n") {
            let frame: String = buf.drain(..cut + 2).collect();
            events.push(parse_frame(&frame));
        }
    }
    assert!(buf.trim().is_empty(), "trailing partial frame {buf:?}");
    events
}

pub fn parse_frame(frame: &str) -> (String, Value) {
    let mut name = "message".to_string();
    let mut data = String::new();
    for line in frame.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            data.push_str(d);
        }
    }
    let value = serde_json::from_str(&data).unwrap_or(Value::String(data));
    (name, value)
}

/// A PNG of `w`x`h` pixels with a coloured square, as base64.
pub fn png_base64(w: u32, h: u32) -> String {
    use base64::Engine as _;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        if x > w / 4 && x < 3 * w / 4 && y > h / 4 && y < 3 * h / 4 {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([240, 240, 240])
        }
    });
    let mut png = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

/// Decodes a base64 PNG and returns its size.
pub fn png_size(b64: &str) -> (u32, u32) {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    let img = image::load_from_memory(&bytes).expect("a PNG");
    (img.width(), img.height())
}

/// Greedy sampling for both modalities with a seed.
pub fn greedy(seed: u64) -> Value {
    json!({"seed": seed, "stop_at_eos": false, "text": {"temperature": 0.0}, "image": {"temperature": 0.0}})
}

/// Seeded sampling at temperature 1 (draws depend on the seed only).
pub fn seeded(seed: u64) -> Value {
    json!({"seed": seed, "stop_at_eos": false, "text": {"temperature": 1.0}, "image": {"temperature": 1.0}})
}

/// Whether `x` has at most `decimals` decimal places.
fn has_decimals_at_most(x: f64, decimals: i32) -> bool {
    let scaled = x * 10f64.powi(decimals);
    (scaled.round() - scaled).abs() < 1e-6
}

/// Routing stats as the API writes them: whole row counts are JSON
/// integers, the others have at most 2 decimals; times at most 3.
pub fn assert_rounded_routing(routing: &Value) {
    let rows = routing["rows_per_adapter"]
        .as_object()
        .unwrap_or_else(|| panic!("no rows_per_adapter: {routing}"));
    for (name, n) in rows {
        let x = n
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: {n} is not a number"));
        if x.fract() == 0.0 {
            assert!(n.is_u64(), "{name}: a whole count written as {n}");
        } else {
            assert!(has_decimals_at_most(x, 2), "{name}: {n} is not rounded");
        }
    }
    for key in ["forward_ms", "queue_ms", "total_ms"] {
        let x = routing[key]
            .as_f64()
            .unwrap_or_else(|| panic!("no {key}: {routing}"));
        assert!(has_decimals_at_most(x, 3), "{key}: {x} is not rounded");
    }
}
