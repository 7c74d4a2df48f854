//! Shared helpers for the integration tests: a tiny random model directory
//! written by the real writer, and a runner over it.
#![allow(dead_code)]

use std::path::Path;

use candle_core::{Device, Tensor};
use molora::adapters::hot_set::HotSetConfig;
use molora::engine::runner::{AdapterSelection, ModelRunner, SeqStep};
use molora::model::kv_cache::KvCache;
use molora::random_model::{write_random_model, RandomModelSpec, ADAPTERS_DIR};
use molora::routing::mode::RoutingMode;

pub fn tiny_spec() -> RandomModelSpec {
    RandomModelSpec {
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 64,
        text_vocab: 300,
        image_codes: 64,
        image_grid_side: 4,
        lora_rank: 4,
        lora_alpha: 8.0,
        gate_hidden: 8,
        max_position_embeddings: 256,
        seed: 11,
        ..RandomModelSpec::default()
    }
}

pub fn write_tiny(dir: &Path) -> RandomModelSpec {
    let spec = tiny_spec();
    write_random_model(dir, &spec).expect("write random model");
    spec
}

pub fn runner(dir: &Path, capacity: usize) -> ModelRunner {
    let hot = HotSetConfig {
        capacity,
        max_rank: 8,
    };
    let (runner, refused) =
        ModelRunner::load(dir, &dir.join(ADAPTERS_DIR), hot, &Device::Cpu).expect("load runner");
    assert!(refused.is_empty(), "refused adapters: {refused:?}");
    runner
}

/// Runs each (tokens, mode, selection) in one step and returns the hidden
/// rows of every sequence, in order.
pub fn run_step(
    runner: &ModelRunner,
    seqs: &[(&[u32], RoutingMode, &AdapterSelection)],
) -> Vec<Tensor> {
    let mut pool = vec![];
    let mut ids = vec![];
    for (_, mode, sel) in seqs {
        let n = ModelRunner::caches_needed(*mode, sel);
        let start = pool.len();
        for _ in 0..n {
            pool.push(runner.new_cache().unwrap());
        }
        ids.push((start..start + n).collect::<Vec<_>>());
    }
    let steps: Vec<SeqStep> = seqs
        .iter()
        .zip(&ids)
        .map(|((tokens, mode, sel), c)| SeqStep {
            tokens,
            mode: *mode,
            adapters: sel,
            caches: c,
        })
        .collect();
    let out = runner.forward(&steps, &mut pool).expect("forward");
    let mut rows = vec![];
    let mut at = 0;
    for (tokens, _, _) in seqs {
        rows.push(out.hidden.narrow(0, at, tokens.len()).unwrap());
        at += tokens.len();
    }
    rows
}

/// Runs a single sequence in chunks (prefill then one token at a time) and
/// returns the rows of every chunk concatenated.
pub fn run_chunked(
    runner: &ModelRunner,
    tokens: &[u32],
    prefix: usize,
    mode: RoutingMode,
    sel: &AdapterSelection,
) -> Tensor {
    let n = ModelRunner::caches_needed(mode, sel);
    let mut pool: Vec<KvCache> = (0..n).map(|_| runner.new_cache().unwrap()).collect();
    let ids: Vec<usize> = (0..n).collect();
    let mut chunks = vec![tokens[..prefix].to_vec()];
    chunks.extend(tokens[prefix..].iter().map(|&t| vec![t]));
    let mut rows = vec![];
    for c in &chunks {
        let step = SeqStep {
            tokens: c,
            mode,
            adapters: sel,
            caches: &ids,
        };
        rows.push(runner.forward(&[step], &mut pool).unwrap().hidden);
    }
    Tensor::cat(&rows, 0).unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Rows of `t` at `idx`.
pub fn rows(t: &Tensor, idx: &[usize]) -> Tensor {
    let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let n = idx.len();
    t.index_select(&Tensor::from_vec(idx, n, t.device()).unwrap(), 0)
        .unwrap()
}
