//! Batch-1 decode speed of a real model directory (default: the shipped
//! `models/demo`), next to its floor.
//!
//! ```text
//! cargo run --release --example decode_demo -- [MODEL_DIR] [--weights f16|f32] [--context 144] [--rounds 5]
//! ```
//!
//! `--batch 1,16`: sequences decoding together (default 1 and 16).
//!
//! Each sequence is teacher-forced through a fixed interleaved token stream (16
//! text ids, then an image block of `tokens_per_image` codes, repeated) so
//! that every run does the same work; every step is one forward of one new
//! token, its logits and an argmax, as a served greedy decode does. Rows:
//! - `base`: no adapters (the decoder alone);
//! - `routed`: single_pass with what a request that names no adapters gets
//!   (its modality's adapter on every token, the gate's picks on text tokens),
//!   through the engine's model runner.
//!
//! Rounds alternate the rows; each prints wall tokens/s and tokens per CPU
//! second of this process (the figure that does not depend on other load as
//! long as the decode stays on one thread). The floor is
//! max(weight and cache bytes / bandwidth, FLOPs / matmul rate) with the
//! bandwidth and rate measured here on one core.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use molora::adapters::hot_set::HotSetConfig;
use molora::bench::cpu_seconds;
use molora::engine::runner::{ModelRunner, SeqStep};
use molora::model::decoder::BatchInput;
use molora::routing::mode::RoutingMode;

struct Args {
    model: PathBuf,
    weights: DType,
    context: usize,
    rounds: usize,
    batches: Vec<usize>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: PathBuf::from("models/demo"),
        weights: DType::F16,
        context: 144,
        rounds: 5,
        batches: vec![1, 16],
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--weights" => {
                args.weights = match value("--weights")?.as_str() {
                    "f16" => DType::F16,
                    "f32" => DType::F32,
                    other => anyhow::bail!("--weights {other}: expected f16 or f32"),
                }
            }
            "--context" => args.context = value("--context")?.parse()?,
            "--rounds" => args.rounds = value("--rounds")?.parse()?,
            "--batch" => {
                args.batches = value("--batch")?
                    .split(',')
                    .map(|b| b.parse())
                    .collect::<Result<_, _>>()?
            }
            dir => args.model = PathBuf::from(dir),
        }
    }
    anyhow::ensure!(args.context >= 2, "--context must be at least 2");
    Ok(args)
}

/// 16 text ids, then one image block, repeated, `len` tokens in all.
fn token_stream(runner: &ModelRunner, len: usize) -> Vec<u32> {
    let vocab = &runner.vocab;
    let text = vocab.text_range();
    let image = vocab.image_range();
    let per_image = vocab.tokens_per_image.max(1);
    let mut out = Vec::with_capacity(len);
    let mut i = 0u32;
    while out.len() < len {
        for _ in 0..16 {
            out.push(text.start + (i * 7 + 3) % (text.end - text.start));
            i += 1;
        }
        if !image.is_empty() {
            for _ in 0..per_image {
                out.push(image.start + (i * 13 + 5) % (image.end - image.start));
                i += 1;
            }
        }
    }
    out.truncate(len);
    out
}

/// Seconds (wall, CPU) for decoding `tokens` one step at a time in `batch`
/// sequences at once (sequence s reads the stream from offset 5·s), with or
/// without the routed adapters: per step one forward over `batch` rows, the
/// logits of every row and an argmax each.
fn decode(
    runner: &mut ModelRunner,
    tokens: &[u32],
    batch: usize,
    routed: bool,
) -> Result<(f64, f64)> {
    let selection = runner.default_selection()?;
    let mode = if routed {
        RoutingMode::SinglePass
    } else {
        RoutingMode::Base
    };
    let mut pool = (0..batch)
        .map(|_| runner.new_cache())
        .collect::<Result<Vec<_>>>()?;
    let cache_ids: Vec<[usize; 1]> = (0..batch).map(|s| [s]).collect();
    let mut last = 0u32;
    let (start, cpu0) = (Instant::now(), cpu_seconds());
    for i in 0..tokens.len() {
        let step_tokens: Vec<u32> = (0..batch)
            .map(|s| tokens[(i + 5 * s) % tokens.len()])
            .collect();
        let hidden = if routed {
            let steps: Vec<SeqStep<'_>> = (0..batch)
                .map(|s| SeqStep {
                    tokens: std::slice::from_ref(&step_tokens[s]),
                    mode,
                    adapters: &selection,
                    caches: &cache_ids[s],
                })
                .collect();
            runner.forward(&steps, &mut pool)?.hidden
        } else {
            let mut b = BatchInput::default();
            for (s, t) in step_tokens.iter().enumerate() {
                b.push(s, std::slice::from_ref(t));
            }
            runner.decoder.forward(&b, &mut pool, None)?
        };
        let logits: Vec<f32> = runner.decoder.logits(&hidden)?.flatten_all()?.to_vec1()?;
        for row in logits.chunks_exact(runner.vocab.vocab_size) {
            last = molora::engine::sampler::argmax(row).unwrap_or(0);
        }
    }
    let out = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    std::hint::black_box(last);
    Ok(out)
}

/// One core's streaming read bandwidth (bytes/s) over a buffer of `bytes`.
fn read_bandwidth(bytes: usize) -> f64 {
    let data = vec![1u32; bytes / 4];
    let mut best = f64::INFINITY;
    let mut sink = 0u32;
    for _ in 0..20 {
        let t = Instant::now();
        // Eight independent integer lanes: the loop vectorises, so it is
        // bound by the memory reads, not by an add chain.
        let mut lanes = [0u32; 8];
        for c in data.chunks_exact(8) {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = l.wrapping_add(v);
            }
        }
        sink = sink.wrapping_add(lanes.iter().fold(0, |a, &b| a.wrapping_add(b)));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    bytes as f64 / best
}

/// FLOP/s of the projections' own kernel at batch 1 (1 x 1408 x 256, the
/// MLP's gate/up shape), f16 or f32 weights, best of many.
fn gemv_rate(dtype: DType) -> Result<f64> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.05, (1408, 256), &dev)?.to_dtype(dtype)?;
    let x = Tensor::randn(0f32, 1.0, (1, 256), &dev)?;
    let mut best = f64::INFINITY;
    for _ in 0..2000 {
        let t = Instant::now();
        std::hint::black_box(molora::dispatch::linear(&x, &w, None)?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * 1408.0 * 256.0 / best)
}

/// What one picture costs the engine: the VQ decode of a full grid of codes
/// (a streamed image also decodes a preview every `preview_every` codes).
fn vq_decode_time(model: &std::path::Path, cfg: &molora::model::config::Config) -> Result<()> {
    let Some(vq) = molora::server::load_vq(model, cfg, &Device::Cpu)? else {
        return Ok(());
    };
    let codes: Vec<u32> = (0..runner_cells(cfg))
        .map(|i| (i * 37 % 500) as u32)
        .collect();
    // As the server's render thread runs it: in a one-thread rayon pool.
    let pool = molora::dispatch::threading::single_thread_pool("vq").context("rayon pool")?;
    let times = pool.install(|| -> Result<Vec<f64>> {
        let mut times = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            std::hint::black_box(vq.decode_to_rgb(&codes)?);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(times)
    });
    let mut times = times?;
    times.sort_by(f64::total_cmp);
    println!(
        "VQ decode of one picture ({} codes): median {:.2} ms, best {:.2} ms",
        codes.len(),
        times[times.len() / 2],
        times[0]
    );
    Ok(())
}

fn runner_cells(cfg: &molora::model::config::Config) -> usize {
    cfg.vocab().map(|v| v.tokens_per_image).unwrap_or(64)
}

fn main() -> Result<()> {
    molora::dispatch::threading::pin_candle_threads(true); // as `molora serve` does
    let args = parse_args()?;
    let hot = HotSetConfig {
        capacity: 8,
        max_rank: 16,
    };
    let adapter_dir = args.model.join("adapters");
    let (mut runner, refused) = ModelRunner::load(&args.model, &adapter_dir, hot, &Device::Cpu)?;
    anyhow::ensure!(refused.is_empty(), "adapters refused: {refused:?}");
    runner.decoder.set_weight_dtype(args.weights)?;
    let cfg = runner.decoder.config().clone();
    let tokens = token_stream(&runner, args.context);

    // The floor: every projection weight and the cached keys and values are
    // read once per token; two FLOPs per weight.
    let (d, i, v, l) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_hidden_layers,
    );
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let weights = l * (d * (d + 2 * kv) + d * d + 2 * i * d + i * d) + v * d;
    let wbytes = weights * args.weights.size_in_bytes();
    let mean_ctx = args.context / 2;
    let cache_bytes = l * 2 * kv * 4 * mean_ctx;
    let flops = 2 * weights + l * 4 * d * mean_ctx;
    let bandwidth = read_bandwidth(wbytes + cache_bytes);
    let rate = gemv_rate(args.weights)?;
    let floor_s = ((wbytes + cache_bytes) as f64 / bandwidth).max(flops as f64 / rate);
    println!(
        "{}: d={d} layers={l} inter={i} vocab={v}; {weights} projection weights in {:?} = {:.2} MB, \
         KV cache read {:.2} MB/token at mean context {mean_ctx}, {:.1} MFLOP/token",
        args.model.display(),
        args.weights,
        wbytes as f64 / 1e6,
        cache_bytes as f64 / 1e6,
        flops as f64 / 1e6
    );
    println!(
        "one core: read {:.1} GB/s over {:.1} MB, batch-1 projection kernel {:.1} GFLOP/s \
         -> floor {:.0} tokens/s ({:.3} ms/token)",
        bandwidth / 1e9,
        (wbytes + cache_bytes) as f64 / 1e6,
        rate / 1e9,
        1.0 / floor_s,
        floor_s * 1e3
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "decode {} tokens one at a time; load average {}",
        args.context,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:<6} {:<7} {:>5} {:>9} {:>9} {:>10}",
        "round", "row", "batch", "ms/step", "tokens/s", "tok/cpu-s"
    );
    decode(&mut runner, &tokens[..16.min(tokens.len())], 1, true)?; // warm-up
    let rows: Vec<(usize, bool)> = args
        .batches
        .iter()
        .flat_map(|&b| [(b, false), (b, true)])
        .collect();
    let mut best = vec![(0f64, 0f64); rows.len()];
    for round in 0..args.rounds {
        for (r, &(batch, routed)) in rows.iter().enumerate() {
            let (wall, cpu) = decode(&mut runner, &tokens, batch, routed)?;
            let n = (tokens.len() * batch) as f64;
            let (tps, tpc) = (n / wall, n / cpu.max(1e-9));
            best[r] = (best[r].0.max(tps), best[r].1.max(tpc));
            println!(
                "{:<6} {:<7} {:>5} {:>9.3} {:>9.0} {:>10.0}",
                round,
                if routed { "routed" } else { "base" },
                batch,
                wall / tokens.len() as f64 * 1e3,
                tps,
                tpc
            );
        }
    }
    vq_decode_time(&args.model, &cfg)?;
    for (r, &(batch, routed)) in rows.iter().enumerate() {
        println!(
            "best {} batch {batch}: {:.0} tokens/s wall, {:.0} tokens per CPU-second",
            if routed { "routed" } else { "base" },
            best[r].0,
            best[r].1
        );
    }
    Ok(())
}
