//! Decode speed of the decoder on a random model of the demo size
//! (d = 256, 6 layers, 4 heads, intermediate 704, vocab 2048).
//!
//! `cargo run --release --example decode_speed [context] [kv_heads]`
//!
//! For each kernel path (host slices, tensor ops) prints tokens/s and
//! ms/step for batch-1 and batch-16 greedy decode from a 16-token prompt up
//! to `context` tokens (default 300), with no LoraContext and with one whose
//! plan is always None; then the time the projections alone take per step
//! (the part the dispatch kernels own) and a 300-token prefill.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use molora::adapters::Projection;
use molora::bench::cpu_seconds;
use molora::dispatch::{routed_linear, SlotWeights};
use molora::model::config::Config;
use molora::model::decoder::{BatchInput, Decoder, LoraContext};
use molora::model::kv_cache::KvCache;
use molora::model::norms::KernelPath;
use molora::model::weights::write_random_model;
use molora::routing::plan::GroupedPlan;

const PROMPT: usize = 16;

/// A context that never routes anything: measures the hook's own cost.
struct NoAdapters;

impl LoraContext for NoAdapters {
    fn layer_plan(&self, _layer: usize, _x: &Tensor) -> candle_core::Result<Option<GroupedPlan>> {
        Ok(None)
    }
    fn slot_weights(&self, _layer: usize, _proj: Projection) -> Option<&SlotWeights> {
        None
    }
}

fn demo_config(kv_heads: usize) -> Result<Config> {
    Ok(serde_json::from_value(serde_json::json!({
        "model_type": "chameleon",
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 1024,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "molora": {
            "modalities": [
                {"name": "text", "token_range": [4, 1024]},
                {"name": "image", "token_range": [1024, 2048]}
            ],
            "boi_token_id": 2,
            "eoi_token_id": 3,
            "image_grid": [8, 8]
        }
    }))?)
}

/// Wall and CPU seconds per step.
#[derive(Clone, Copy)]
struct StepTime {
    wall: f64,
    cpu: f64,
}

/// Greedy decode of `batch` sequences to `context` tokens; returns the time
/// per step (every step: forward of one token per sequence, logits, argmax).
fn decode(
    model: &Decoder,
    batch: usize,
    context: usize,
    lora: Option<&dyn LoraContext>,
) -> Result<StepTime> {
    let dev = Device::Cpu;
    let mut caches: Vec<KvCache> = (0..batch)
        .map(|_| KvCache::new(model.config(), &dev))
        .collect::<candle_core::Result<_>>()?;
    let mut prefill = BatchInput::default();
    for s in 0..batch {
        let prompt: Vec<u32> = (0..PROMPT)
            .map(|i| (4 + (s * 31 + i * 7) % 1000) as u32)
            .collect();
        prefill.push(s, &prompt);
    }
    let hidden = model.forward(&prefill, &mut caches, lora)?;
    let last: Vec<u32> = (0..batch)
        .map(|s| (s * PROMPT + PROMPT - 1) as u32)
        .collect();
    let mut next = argmax(&model.logits(&hidden.index_select(&Tensor::new(last, &dev)?, 0)?)?)?;
    let steps = context - PROMPT;
    let (start, cpu0) = (Instant::now(), cpu_seconds());
    for _ in 0..steps {
        let mut step = BatchInput::default();
        for (s, &t) in next.iter().enumerate() {
            step.push(s, &[t]);
        }
        let hidden = model.forward(&step, &mut caches, lora)?;
        next = argmax(&model.logits(&hidden)?)?;
    }
    Ok(StepTime {
        wall: start.elapsed().as_secs_f64() / steps as f64,
        cpu: (cpu_seconds() - cpu0) / steps as f64,
    })
}

fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

/// Time per step spent in the projections alone: same shapes, same calls,
/// distinct weights per layer (so they stream from memory as in the model).
fn projections_only(cfg: &Config, batch: usize, weights: DType) -> Result<StepTime> {
    let dev = Device::Cpu;
    let (d, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let w = |o: usize, inp: usize| Tensor::randn(0f32, 0.05, (o, inp), &dev)?.to_dtype(weights);
    let layers = (0..cfg.num_hidden_layers)
        .map(|_| Ok([w(d + 2 * kv, d)?, w(d, d)?, w(2 * i, d)?, w(d, i)?]))
        .collect::<Result<Vec<_>>>()?;
    let head = w(v, d)?;
    let xd = Tensor::randn(0f32, 1.0, (batch, d), &dev)?;
    let xi = Tensor::randn(0f32, 1.0, (batch, i), &dev)?;
    let reps = 200;
    let (start, cpu0) = (Instant::now(), cpu_seconds());
    for _ in 0..reps {
        for [qkv, o, gu, down] in &layers {
            routed_linear(&xd, qkv, None, &[], None)?;
            routed_linear(&xd, o, None, &[], None)?;
            routed_linear(&xd, gu, None, &[], None)?;
            routed_linear(&xi, down, None, &[], None)?;
        }
        routed_linear(&xd, &head, None, &[], None)?;
    }
    Ok(StepTime {
        wall: start.elapsed().as_secs_f64() / reps as f64,
        cpu: (cpu_seconds() - cpu0) / reps as f64,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let context: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(300);
    let kv_heads: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(4);
    anyhow::ensure!(
        context > PROMPT,
        "context must exceed the {PROMPT}-token prompt"
    );
    let cfg = demo_config(kv_heads)?;
    let dir = tempfile::tempdir()?;
    write_random_model(dir.path(), &cfg, 42)?;
    // DECODE_SPEED_WEIGHTS=f16 stores the projection weights in f16.
    let weights = match std::env::var("DECODE_SPEED_WEIGHTS").as_deref() {
        Ok("f16") => DType::F16,
        _ => DType::F32,
    };
    let mut base = Decoder::load(dir.path(), &Device::Cpu)?;
    base.set_weight_dtype(weights)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    println!(
        "decoder d={} layers={} heads={} kv_heads={} inter={} vocab={}; decode {PROMPT} -> {context} tokens; RAYON_NUM_THREADS={threads}; weights {weights:?}",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.intermediate_size,
        cfg.vocab_size
    );
    println!(
        "{:<12} {:>5} {:<10} {:>9} {:>9} {:>10} {:>10}",
        "path", "batch", "lora", "wall ms", "cpu ms", "tokens/s", "tok/cpu-s"
    );
    // DECODE_SPEED_ONLY=HostSlices:1 runs one row of the table (for profiling).
    let only = std::env::var("DECODE_SPEED_ONLY").ok();
    for path in [KernelPath::HostSlices, KernelPath::TensorOps] {
        let mut model = base.clone();
        model.set_kernel_path(path)?;
        for batch in [1, 16] {
            if only
                .as_ref()
                .is_some_and(|o| *o != format!("{path:?}:{batch}"))
            {
                continue;
            }
            for (name, lora) in [
                ("none", None),
                ("plan=None", Some(&NoAdapters as &dyn LoraContext)),
            ] {
                let t = decode(&model, batch, context, lora)?;
                println!(
                    "{:<12} {:>5} {:<10} {:>9.3} {:>9.3} {:>10.0} {:>10.0}",
                    format!("{path:?}"),
                    batch,
                    name,
                    t.wall * 1e3,
                    t.cpu * 1e3,
                    batch as f64 / t.wall,
                    batch as f64 / t.cpu
                );
            }
        }
    }
    if only.is_some() {
        return Ok(());
    }
    for batch in [1, 16] {
        let t = projections_only(&cfg, batch, weights)?;
        println!(
            "projections alone (4 per layer + lm_head), batch {batch}: {:.3} ms/step wall, {:.3} cpu",
            t.wall * 1e3,
            t.cpu * 1e3
        );
    }
    for path in [KernelPath::HostSlices, KernelPath::TensorOps] {
        let mut model = base.clone();
        model.set_kernel_path(path)?;
        let tokens: Vec<u32> = (0..300).map(|i| (4 + i * 13 % 1000) as u32).collect();
        let mut caches = vec![KvCache::new(&cfg, &Device::Cpu)?];
        let mut b = BatchInput::default();
        b.push(0, &tokens);
        let start = Instant::now();
        let h = model.forward(&b, &mut caches, None)?;
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(h.dtype() == DType::F32);
        println!(
            "{path:?} prefill of 300 tokens: {:.1} ms ({:.0} tokens/s)",
            secs * 1e3,
            300.0 / secs
        );
    }
    Ok(())
}
