//! Load generator for a running `molora serve`: 1, 4, 16 and 64 concurrent
//! clients on a mixed workload (text answers, pictures drawn from a text
//! prompt, text about an input picture), in single_pass and in
//! per_modality_pass. Prints tokens/s, images/s, p50/p99 latency, time to
//! first token and the decoder work per generated token.
//!
//! ```text
//! cargo run --release -- serve &
//! cargo run --release --example load_gen -- --url http://127.0.0.1:8080
//! ```
//!
//! Every request streams (`stream: true`) so that time to first token is
//! measured at the client; lengths are fixed (`stop_at_eos: false`) so both
//! modes do the same number of tokens. Each client runs its requests one
//! after another; the run is bounded by `--requests-per-client` and
//! `--timeout-s`, and only ever talks to `--url`.

use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    clients: Vec<usize>,
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    /// New text tokens of a text answer (an image request adds one picture).
    #[arg(long, default_value_t = 32)]
    text_tokens: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single_pass,per_modality_pass"
    )]
    modes: Vec<String>,
    /// Per request.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Clone)]
struct Sample {
    ok: bool,
    latency: Duration,
    first_token: Option<Duration>,
    tokens: u64,
    images: u64,
    passes: u64,
    token_rows: u64,
}

/// The mixed workload: (prompt, max_tokens).
fn workload(tokens_per_image: usize, text_tokens: usize) -> Vec<(Value, usize)> {
    let picture = {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            if (x as i32 - 16).pow(2) + (y as i32 - 16).pow(2) < 100 {
                image::Rgb([200, 40, 40])
            } else {
                image::Rgb([245, 245, 245])
            }
        });
        let mut png = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode PNG");
        base64::engine::general_purpose::STANDARD.encode(png)
    };
    let draw = tokens_per_image + 2 + text_tokens / 2;
    vec![
        (json!("what is 17 + 25?\n"), text_tokens),
        (
            json!([{"type": "text", "text": "draw a red circle on the left\n"}, {"type": "image_start"}]),
            draw,
        ),
        (
            json!([{"type": "image", "png_base64": picture}, {"type": "text", "text": "describe the picture\n"}]),
            text_tokens,
        ),
        (
            json!("write a function that adds two numbers\n"),
            text_tokens,
        ),
        (
            json!([{"type": "text", "text": "a blue square and a caption\n"}, {"type": "image_start"}]),
            draw,
        ),
    ]
}

async fn one_request(client: &reqwest::Client, url: &str, body: &Value) -> Sample {
    let start = Instant::now();
    let mut s = Sample::default();
    let Ok(r) = client.post(url).json(body).send().await else {
        return s;
    };
    if !r.status().is_success() {
        return s;
    }
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(cut) = buf.find("\n\n") {
            let frame: String = buf.drain(..cut + 2).collect();
            let name = frame
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("");
            let data = frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            match name {
                "token" => {
                    s.first_token.get_or_insert_with(|| start.elapsed());
                }
                "done" => {
                    let d: Value = serde_json::from_str(data).unwrap_or_default();
                    let u = &d["usage"];
                    s.tokens = u["text_tokens"].as_u64().unwrap_or(0)
                        + u["image_tokens"].as_u64().unwrap_or(0);
                    s.images = u["images"].as_u64().unwrap_or(0);
                    s.passes = d["routing"]["passes"].as_u64().unwrap_or(0);
                    s.token_rows = d["routing"]["token_rows"].as_u64().unwrap_or(0);
                    s.ok = true;
                }
                _ => {}
            }
        }
    }
    s.latency = start.elapsed();
    s
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Row {
    mode: String,
    clients: usize,
    requests: usize,
    errors: usize,
    wall: Duration,
    samples: Vec<Sample>,
}

impl Row {
    fn summary(&self) -> Value {
        let ok: Vec<&Sample> = self.samples.iter().filter(|s| s.ok).collect();
        let secs = self.wall.as_secs_f64();
        let mut lat: Vec<f64> = ok.iter().map(|s| s.latency.as_secs_f64() * 1e3).collect();
        let mut ttft: Vec<f64> = ok
            .iter()
            .filter_map(|s| s.first_token)
            .map(|t| t.as_secs_f64() * 1e3)
            .collect();
        lat.sort_by(f64::total_cmp);
        ttft.sort_by(f64::total_cmp);
        let tokens: u64 = ok.iter().map(|s| s.tokens).sum();
        let rows: u64 = ok.iter().map(|s| s.token_rows).sum();
        json!({
            "mode": self.mode, "clients": self.clients, "requests": self.requests, "errors": self.errors,
            "tokens_per_s": tokens as f64 / secs,
            "images_per_s": ok.iter().map(|s| s.images).sum::<u64>() as f64 / secs,
            "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
            "ttft_p50_ms": percentile(&ttft, 0.5), "ttft_p99_ms": percentile(&ttft, 0.99),
            "rows_per_token": if tokens > 0 { rows as f64 / tokens as f64 } else { 0.0 },
            "passes_per_request": ok.iter().map(|s| s.passes).sum::<u64>() as f64 / ok.len().max(1) as f64,
            "wall_s": secs,
        })
    }
}

async fn run_level(args: &Args, mode: &str, clients: usize, items: &[(Value, usize)]) -> Row {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s))
        .pool_max_idle_per_host(clients)
        .build()
        .expect("HTTP client");
    let url = format!("{}/v1/generate", args.url.trim_end_matches('/'));
    let start = Instant::now();
    let tasks = (0..clients).map(|c| {
        let (client, url) = (client.clone(), url.clone());
        let bodies: Vec<Value> = (0..args.requests_per_client)
            .map(|i| {
                let k = c * args.requests_per_client + i;
                let (prompt, max_tokens) = &items[k % items.len()];
                json!({
                    "prompt": prompt, "max_tokens": max_tokens, "routing_mode": mode, "stream": true,
                    "sampling": {"seed": k, "stop_at_eos": false, "text": {"temperature": 0.7}},
                })
            })
            .collect();
        tokio::spawn(async move {
            let mut out = vec![];
            for b in &bodies {
                out.push(one_request(&client, &url, b).await);
            }
            out
        })
    });
    let samples: Vec<Sample> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap_or_default())
        .collect();
    let errors = samples.iter().filter(|s| !s.ok).count();
    Row {
        mode: mode.into(),
        clients,
        requests: samples.len(),
        errors,
        wall: start.elapsed(),
        samples,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let models: Value = reqwest::get(format!("{}/v1/models", args.url.trim_end_matches('/')))
        .await?
        .json()
        .await?;
    let base = &models["data"][0];
    let tpi = base["info"]["vocab"]["tokens_per_image"]
        .as_u64()
        .unwrap_or(64) as usize;
    eprintln!("model {} ({} image tokens per picture)", base["id"], tpi);
    let items = workload(tpi, args.text_tokens);
    if !args.json {
        println!(
            "{:<18} {:>7} {:>5} {:>4} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7}",
            "mode",
            "clients",
            "reqs",
            "err",
            "tok/s",
            "img/s",
            "p50 ms",
            "p99 ms",
            "ttft p50",
            "ttft p99",
            "rows/tok",
            "passes"
        );
    }
    for mode in &args.modes {
        for &c in &args.clients {
            let s = run_level(&args, mode, c, &items).await.summary();
            if args.json {
                println!("{s}");
                continue;
            }
            println!(
                "{:<18} {:>7} {:>5} {:>4} {:>9.1} {:>8.2} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>8.2} {:>7.1}",
                s["mode"].as_str().unwrap_or(""), c, s["requests"], s["errors"],
                s["tokens_per_s"].as_f64().unwrap_or(0.0), s["images_per_s"].as_f64().unwrap_or(0.0),
                s["p50_ms"].as_f64().unwrap_or(f64::NAN), s["p99_ms"].as_f64().unwrap_or(f64::NAN),
                s["ttft_p50_ms"].as_f64().unwrap_or(f64::NAN), s["ttft_p99_ms"].as_f64().unwrap_or(f64::NAN),
                s["rows_per_token"].as_f64().unwrap_or(0.0), s["passes_per_request"].as_f64().unwrap_or(0.0),
            );
        }
    }
    Ok(())
}
