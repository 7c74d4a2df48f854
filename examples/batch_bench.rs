//! Batch-job benchmark, in process over loopback HTTP: items/s of a mixed
//! text + image batch in `single_pass` and in `per_modality_pass`, and the
//! latency of interactive `/v1/generate` requests alone and while a batch
//! runs beside them.
//!
//! ```text
//! nice -n 10 cargo run --release --example batch_bench -- --items 1000
//! ```
//!
//! The model is a random one of the demo size (`molora init-random`:
//! d = 256, 6 layers, rank-16 adapters, 8x8 = 64 image codes) plus a random
//! small VQ decoder so that image items draw real PNGs, written to a temp
//! folder unless `--model` names one. Lengths are fixed
//! (`stop_at_eos: false`): a text item generates `--text-tokens`, an image
//! item one picture (`<boi>` in the prompt, 64 codes, `<eoi>`). Only
//! loopback addresses are used; every loop is bounded.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use molora::engine::images::VQ_WEIGHTS_FILE;
use molora::model::config::Config;
use molora::model::vq::{VqConfig, VqModel};
use molora::random_model::{write_random_model, RandomModelSpec};
use molora::server::config::ServerConfig;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
struct Args {
    /// Items of the throughput batch (half text, half image).
    #[arg(long, default_value_t = 1000)]
    items: usize,
    /// New tokens of a text item and of an interactive request.
    #[arg(long, default_value_t = 16)]
    text_tokens: usize,
    /// Interactive requests per latency run (one client, one after another).
    #[arg(long, default_value_t = 60)]
    interactive: usize,
    /// Items of the batch that runs beside the interactive requests.
    #[arg(long, default_value_t = 400)]
    background_items: usize,
    /// Batch items in the engine at once (limits.batch_concurrency).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Batch items in the engine while interactive requests run
    /// (limits.batch_concurrency_busy); one latency run per value.
    #[arg(long, value_delimiter = ',', default_value = "8,2")]
    busy_concurrency: Vec<usize>,
    /// A model directory with a VQ model; default: a random demo-size one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Give up on a batch after this long.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

fn demo_model(dir: &Path) -> Result<()> {
    let spec = RandomModelSpec::default();
    write_random_model(dir, &spec)?;
    let path = dir.join("config.json");
    let mut cfg = Config::from_file(&path)?;
    let vocab = cfg.vocab()?;
    // 32x32 pixels, two downsamplings: an 8x8 grid of codes.
    let vq_json = json!({
        "embed_dim": 8, "n_embed": vocab.image_range().len(), "z_channels": 8, "resolution": 32,
        "ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_type": "none"
    });
    let vq_cfg: VqConfig = serde_json::from_value(vq_json.clone())?;
    anyhow::ensure!(vq_cfg.tokens_per_image() == vocab.tokens_per_image);
    let vm = VarMap::new();
    VqModel::new(
        &vq_cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    vm.save(dir.join(VQ_WEIGHTS_FILE))?;
    cfg.vq_config = Some(vq_json);
    cfg.to_file(&path)?;
    Ok(())
}

fn item_body(i: usize, mode: &str, text_tokens: usize, tokens_per_image: usize) -> Value {
    let sampling = json!({"seed": i, "stop_at_eos": false});
    if i.is_multiple_of(2) {
        json!({"prompt": format!("what is {} + {}?\n", i % 97, i % 89), "max_tokens": text_tokens,
               "routing_mode": mode, "sampling": sampling})
    } else {
        json!({"prompt": [{"type": "text", "text": format!("draw shape {}\n", i % 13)}, {"type": "image_start"}],
               "max_tokens": tokens_per_image + 1, "routing_mode": mode, "sampling": sampling})
    }
}

fn jsonl(n: usize, mode: &str, text_tokens: usize, tpi: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("i{i}"), "body": item_body(i, mode, text_tokens, tpi)})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn submit(client: &reqwest::Client, url: &str, body: String) -> Result<String> {
    let r = client
        .post(format!("{url}/v1/batches"))
        .body(body)
        .send()
        .await?;
    let job: Value = r.json().await?;
    job["id"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("batch refused: {job}"))
}

/// Polls until the job is final; returns (seconds, counts).
async fn wait(
    client: &reqwest::Client,
    url: &str,
    id: &str,
    timeout: Duration,
) -> Result<(f64, Value)> {
    let start = Instant::now();
    loop {
        let job: Value = client
            .get(format!("{url}/v1/batches/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if matches!(
            job["status"].as_str(),
            Some("completed" | "cancelled" | "failed")
        ) {
            return Ok((start.elapsed().as_secs_f64(), job["request_counts"].clone()));
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "batch {id} did not finish: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `n` interactive text requests one after another; sorted latencies in ms.
async fn interactive(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    tokens: usize,
) -> Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let body = json!({"prompt": format!("interactive {i}: what is 3 + 4?\n"), "max_tokens": tokens,
                          "sampling": {"seed": i, "stop_at_eos": false}});
        let t = Instant::now();
        let r = client
            .post(format!("{url}/v1/generate"))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "interactive request failed: {}",
            r.text().await?
        );
        r.bytes().await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

fn start_server(
    model: &Path,
    data: &Path,
    concurrency: usize,
    busy: usize,
) -> Result<molora::server::RunningServer> {
    let mut cfg = ServerConfig {
        bind: "127.0.0.1:0".into(),
        model_dir: model.to_path_buf(),
        data_dir: data.to_path_buf(),
        workers: 2,
        ..ServerConfig::default()
    };
    cfg.limits.batch_concurrency = concurrency;
    cfg.limits.batch_concurrency_busy = busy;
    cfg.validate()?;
    molora::server::start(cfg)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let dir = scratch.path().join("model");
            demo_model(&dir)?;
            dir
        }
    };
    let tpi = Config::from_file(&model.join("config.json"))?
        .vocab()?
        .tokens_per_image;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s))
        .build()?;
    let timeout = Duration::from_secs(args.timeout_s);
    let mut rows = vec![];

    for mode in ["single_pass", "per_modality_pass"] {
        let data = scratch.path().join(format!("data-{mode}"));
        let server = start_server(&model, &data, args.concurrency, args.concurrency)?;
        let url = server.url();
        let id = submit(
            &client,
            &url,
            jsonl(args.items, mode, args.text_tokens, tpi),
        )
        .await?;
        let (secs, counts) = wait(&client, &url, &id, timeout).await?;
        let done = counts["completed"].as_u64().unwrap_or(0);
        println!(
            "{mode}: {} items ({} completed, {} failed) in {secs:.1} s = {:.1} items/s",
            args.items,
            done,
            counts["failed"],
            done as f64 / secs
        );
        rows.push(format!(
            "| batch throughput | {mode} | {} | {secs:.1} s | {:.1} items/s |",
            args.items,
            done as f64 / secs
        ));
        let stopper = std::thread::spawn(move || server.stop());
        stopper
            .join()
            .map_err(|_| anyhow::anyhow!("stop panicked"))??;
    }

    for (run, &busy) in args.busy_concurrency.iter().enumerate() {
        let data = scratch.path().join(format!("data-latency-{run}"));
        let server = start_server(&model, &data, args.concurrency, busy)?;
        let url = server.url();
        interactive(&client, &url, 3, args.text_tokens).await?; // warm-up
        let alone = interactive(&client, &url, args.interactive, args.text_tokens).await?;
        let body = jsonl(args.background_items, "single_pass", args.text_tokens, tpi);
        let id = submit(&client, &url, body).await?;
        // Let the batch fill its places before the interactive run starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        let beside = interactive(&client, &url, args.interactive, args.text_tokens).await?;
        let during = t.elapsed().as_secs_f64();
        let job: Value = client
            .get(format!("{url}/v1/batches/{id}"))
            .send()
            .await?
            .json()
            .await?;
        let done_during = job["request_counts"]["completed"].as_u64().unwrap_or(0);
        let still_running = job["status"] != "completed";
        let (secs, counts) = wait(&client, &url, &id, timeout).await?;
        std::thread::spawn(move || server.stop())
            .join()
            .map_err(|_| anyhow::anyhow!("stop panicked"))??;
        let setting = format!("batch_concurrency {} / busy {busy}", args.concurrency);
        for (name, lat) in [("alone", &alone), ("beside a batch", &beside)] {
            let (p50, p99) = (percentile(lat, 0.5), percentile(lat, 0.99));
            println!(
                "{setting}: interactive {name}: p50 {p50:.1} ms, p99 {p99:.1} ms ({} requests)",
                lat.len()
            );
            rows.push(format!(
                "| interactive latency {name} | {setting} | {} | p50 {p50:.1} ms | p99 {p99:.1} ms |",
                lat.len()
            ));
        }
        println!(
            "{setting}: background batch of {} items: {done_during} done during the {during:.1} s interactive run (still running: {still_running}), all {} in {secs:.1} s more",
            args.background_items, counts["completed"]
        );
        rows.push(format!(
            "| batch items/s beside interactive | {setting} | {done_during} | {during:.1} s | {:.1} items/s |",
            done_during as f64 / during
        ));
    }
    println!("\n| what | mode / setting | n | time | figure |\n| --- | --- | --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
