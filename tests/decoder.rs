//! Decoder invariants on tiny random models: batching, KV caching and mixed
//! prefill/decode batches change nothing; a zero-B adapter changes nothing;
//! both kernel paths compute the same function; bad checkpoints are refused
//! with the tensor and the file named.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use molora::adapters::Projection;
use molora::dispatch::SlotWeights;
use molora::model::config::Config;
use molora::model::decoder::{BatchInput, Decoder, LoraContext};
use molora::model::kv_cache::KvCache;
use molora::model::norms::KernelPath;
use molora::model::weights::{random_weights, save_safetensors, write_random_model};
use molora::routing::plan::{GroupedPlan, RoutingPlan};

const PATHS: [KernelPath; 2] = [KernelPath::HostSlices, KernelPath::TensorOps];

fn tiny_config(extra: serde_json::Value) -> Config {
    let mut v = serde_json::json!({
        "model_type": "chameleon",
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "molora": {
            "modalities": [
                {"name": "text", "token_range": [4, 64]},
                {"name": "image", "token_range": [64, 96]}
            ],
            "boi_token_id": 2,
            "eoi_token_id": 3,
            "image_grid": [2, 2]
        }
    });
    if let (Some(base), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in more {
            base.insert(k.clone(), x.clone());
        }
    }
    serde_json::from_value(v).expect("tiny config parses")
}

fn tiny_model(extra: serde_json::Value, seed: u64) -> (tempfile::TempDir, Decoder) {
    let cfg = tiny_config(extra);
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &cfg, seed).unwrap();
    let model = Decoder::load(dir.path(), &Device::Cpu).unwrap();
    (dir, model)
}

fn with_path(model: &Decoder, path: KernelPath) -> Decoder {
    let mut m = model.clone();
    m.set_kernel_path(path).unwrap();
    m
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn caches(model: &Decoder, n: usize) -> Vec<KvCache> {
    (0..n)
        .map(|_| KvCache::new(model.config(), &Device::Cpu).unwrap())
        .collect()
}

/// Runs one sequence's tokens through a fresh cache in one forward.
fn alone(model: &Decoder, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut c = caches(model, 1);
    let mut b = BatchInput::default();
    b.push(0, tokens);
    rows(&model.forward(&b, &mut c, None).unwrap())
}

const SEQS: [&[u32]; 3] = [
    &[0, 5, 9, 2, 70, 71],
    &[0, 40, 41, 42, 43, 44, 45, 46, 47, 2, 64],
    &[0, 12, 13],
];

#[test]
fn batched_prefill_equals_each_sequence_alone() {
    let (_dir, model) = tiny_model(serde_json::json!({}), 1);
    let mut by_path = Vec::new();
    for path in PATHS {
        let m = with_path(&model, path);
        let mut c = caches(&m, 3);
        let mut b = BatchInput::default();
        for (i, s) in SEQS.iter().enumerate() {
            b.push(i, s);
        }
        let out = rows(&m.forward(&b, &mut c, None).unwrap());
        let mut start = 0;
        for s in SEQS {
            let diff = max_diff(&out[start..start + s.len()], &alone(&m, s));
            assert!(diff < 1e-5, "{path:?}: batched vs alone differ by {diff}");
            start += s.len();
        }
        for (c, s) in c.iter().zip(SEQS) {
            assert_eq!(c.len(), s.len());
        }
        by_path.push(out);
    }
    let diff = max_diff(&by_path[0], &by_path[1]);
    assert!(
        diff < 1e-5,
        "host-slice and tensor-op paths differ by {diff}"
    );
}

#[test]
fn kv_cached_decode_equals_full_recomputation() {
    let (_dir, model) = tiny_model(serde_json::json!({}), 2);
    let seq: Vec<u32> = vec![0, 7, 8, 9, 2, 64, 65, 66, 67, 3, 10, 11, 12, 1];
    for path in PATHS {
        let m = with_path(&model, path);
        let mut c = caches(&m, 1);
        let prefill = 5;
        let mut b = BatchInput::default();
        b.push(0, &seq[..prefill]);
        m.forward(&b, &mut c, None).unwrap();
        for t in prefill..seq.len() {
            let mut b = BatchInput::default();
            b.push(0, &seq[t..t + 1]);
            let step = m.logits(&m.forward(&b, &mut c, None).unwrap()).unwrap();
            let full = alone(&m, &seq[..=t]);
            let full_last = Tensor::new(full[t].as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let expect = m.logits(&full_last).unwrap();
            let diff = max_diff(&rows(&step), &rows(&expect));
            assert!(
                diff < 1e-4,
                "{path:?} step {t}: cached vs recomputed logits differ by {diff}"
            );
        }
        assert_eq!(c[0].len(), seq.len());
    }
}

#[test]
fn mixed_prefill_and_decode_batch_equals_separate_runs() {
    let (_dir, model) = tiny_model(serde_json::json!({}), 3);
    let (a, b, c) = (SEQS[1], SEQS[0], SEQS[2]);
    for path in PATHS {
        let m = with_path(&model, path);
        // History: a has 3 tokens cached, b has all but its last, c likewise.
        let mut cs = caches(&m, 3);
        let mut hist = BatchInput::default();
        hist.push(0, &a[..3]);
        hist.push(1, &b[..b.len() - 1]);
        hist.push(2, &c[..c.len() - 1]);
        m.forward(&hist, &mut cs, None).unwrap();
        // Mixed step, sequences listed out of cache order.
        let mut step = BatchInput::default();
        step.push(1, &b[b.len() - 1..]);
        step.push(0, &a[3..8]);
        step.push(2, &c[c.len() - 1..]);
        let out = rows(&m.forward(&step, &mut cs, None).unwrap());
        let fa = alone(&m, &a[..8]);
        let fb = alone(&m, b);
        let fc = alone(&m, c);
        let diffs = [
            max_diff(&out[0..1], &fb[b.len() - 1..]),
            max_diff(&out[1..6], &fa[3..8]),
            max_diff(&out[6..7], &fc[c.len() - 1..]),
        ];
        assert!(diffs.iter().all(|&d| d < 1e-5), "{path:?}: {diffs:?}");
        assert_eq!(
            [cs[0].len(), cs[1].len(), cs[2].len()],
            [8, b.len(), c.len()]
        );
    }
}

/// Every text-or-special row routed to slot 1, image rows to no adapter.
struct TestLora {
    slots: Vec<SlotWeights>, // one per projection, same for every layer
    plans_built: std::cell::Cell<usize>,
}

impl TestLora {
    fn new(model: &Decoder, zero_b: bool, seed: u64) -> Self {
        let cfg = model.config();
        let r = 4;
        let slots = Projection::ALL
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (inp, out) = p.shape(cfg);
                let a1 = Tensor::randn(0f32, 0.5, (1, r, inp), &Device::Cpu).unwrap();
                let b1 = if zero_b {
                    Tensor::zeros((1, out, r), DType::F32, &Device::Cpu).unwrap()
                } else {
                    (Tensor::randn(0f32, 0.5, (1, out, r), &Device::Cpu).unwrap()
                        * (seed + i as u64) as f64)
                        .unwrap()
                };
                SlotWeights {
                    a: Tensor::cat(&[&a1.zeros_like().unwrap(), &a1], 0).unwrap(),
                    b: Tensor::cat(&[&b1.zeros_like().unwrap(), &b1], 0).unwrap(),
                    scale: vec![0.0, 2.0],
                }
            })
            .collect();
        Self {
            slots,
            plans_built: std::cell::Cell::new(0),
        }
    }
}

impl LoraContext for TestLora {
    fn layer_plan(&self, _layer: usize, x: &Tensor) -> candle_core::Result<Option<GroupedPlan>> {
        self.plans_built.set(self.plans_built.get() + 1);
        let n = x.dim(0)?;
        let mut plan = RoutingPlan::with_capacity(n, n);
        for row in 0..n {
            plan.push_row((row % 3 != 2).then_some((1, 1.0)));
        }
        Ok(Some(plan.grouped(2)))
    }

    fn slot_weights(&self, _layer: usize, proj: Projection) -> Option<&SlotWeights> {
        let i = Projection::ALL.iter().position(|&p| p == proj)?;
        Some(&self.slots[i])
    }
}

#[test]
fn zero_b_adapter_is_exactly_the_base_and_nonzero_b_is_not() {
    let (_dir, model) = tiny_model(serde_json::json!({}), 4);
    for path in PATHS {
        let m = with_path(&model, path);
        let mut b = BatchInput::default();
        b.push(0, SEQS[0]);
        b.push(1, SEQS[1]);
        let run = |lora: Option<&dyn LoraContext>| {
            rows(&m.forward(&b, &mut caches(&m, 2), lora).unwrap())
        };
        let base = run(None);
        let zero = TestLora::new(&m, true, 1);
        assert_eq!(base, run(Some(&zero)), "{path:?}: B = 0 changed the output");
        assert_eq!(
            zero.plans_built.get(),
            m.config().num_hidden_layers,
            "one plan per layer"
        );
        let live = TestLora::new(&m, false, 1);
        let diff = max_diff(&base, &run(Some(&live)));
        assert!(
            diff > 1e-3,
            "{path:?}: a non-zero adapter changed nothing ({diff})"
        );
    }
}

#[test]
fn swin_norm_and_biases_run_and_paths_agree() {
    for extra in [
        serde_json::json!({"swin_norm": true}),
        serde_json::json!({"swin_norm": false, "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": true}),
        serde_json::json!({"qk_layernorm": false, "num_key_value_heads": 4}),
    ] {
        let (_dir, model) = tiny_model(extra.clone(), 5);
        let outs: Vec<_> = PATHS
            .iter()
            .map(|&p| alone(&with_path(&model, p), SEQS[1]))
            .collect();
        assert!(outs[0].iter().flatten().all(|v| v.is_finite()), "{extra}");
        let diff = max_diff(&outs[0], &outs[1]);
        assert!(diff < 1e-5, "{extra}: paths differ by {diff}");
        let logits = model
            .logits(&Tensor::new(outs[0].clone(), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(logits.dims(), &[SEQS[1].len(), 96]);
    }
    let (_d1, pre) = tiny_model(serde_json::json!({"swin_norm": false}), 6);
    let (_d2, swin) = tiny_model(serde_json::json!({"swin_norm": true}), 6);
    assert!(max_diff(&alone(&pre, SEQS[0]), &alone(&swin, SEQS[0])) > 1e-3);
}

fn load_error(dir: &Path) -> String {
    format!(
        "{:#}",
        Decoder::load(dir, &Device::Cpu).expect_err("load must fail")
    )
}

#[test]
fn bad_checkpoints_are_refused_naming_tensor_and_file() {
    let cfg = tiny_config(serde_json::json!({}));
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &cfg, 7).unwrap();
    let file = dir.path().join("model.safetensors");
    let good = random_weights(&cfg, 7).unwrap();

    let missing = "model.layers.1.self_attn.k_norm.bias";
    let without: Vec<_> = good.iter().filter(|(n, _)| n != missing).cloned().collect();
    save_safetensors(&file, &without).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(missing) && err.contains("model.safetensors") && err.contains("missing"),
        "{err}"
    );

    let wrong = "model.layers.0.mlp.up_proj.weight";
    let reshaped: Vec<_> = good
        .iter()
        .map(|(n, t)| {
            let t = if n == wrong {
                Tensor::zeros((65, 32), DType::F32, &Device::Cpu).unwrap()
            } else {
                t.clone()
            };
            (n.clone(), t)
        })
        .collect();
    save_safetensors(&file, &reshaped).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(wrong) && err.contains("[65, 32]") && err.contains("[64, 32]"),
        "{err}"
    );

    save_safetensors(&file, &good).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::remove_file(&file).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors.index.json"), "{err}");
}

#[test]
fn sharded_and_half_precision_checkpoints_load() {
    let cfg = tiny_config(serde_json::json!({}));
    let (_dir, reference) = tiny_model(serde_json::json!({}), 8);
    let dir = tempfile::tempdir().unwrap();
    cfg.to_file(&dir.path().join("config.json")).unwrap();
    let weights = random_weights(&cfg, 8).unwrap();
    let (first, second) = weights.split_at(weights.len() / 2);
    let mut map = serde_json::Map::new();
    for (part, name) in [
        (first, "model-00001-of-00002.safetensors"),
        (second, "model-00002-of-00002.safetensors"),
    ] {
        let half: Vec<_> = part
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(DType::BF16).unwrap()))
            .collect();
        save_safetensors(&dir.path().join(name), &half).unwrap();
        for (n, _) in part {
            map.insert(n.clone(), name.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = Decoder::load(dir.path(), &Device::Cpu).unwrap();
    let diff = max_diff(&alone(&reference, SEQS[0]), &alone(&sharded, SEQS[0]));
    assert!(diff > 0.0 && diff < 0.1, "bf16 shards vs f32: {diff}");
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let (_dir, model) = tiny_model(serde_json::json!({}), 9);
    let mut c = caches(&model, 2);
    let mut b = BatchInput::default();
    b.push(0, &[5, 96]);
    let err = model.forward(&b, &mut c, None).unwrap_err().to_string();
    assert!(err.contains("96") && err.contains("vocab"), "{err}");
    let mut b = BatchInput::default();
    b.push(0, &[5, 6]);
    b.push(0, &[7]);
    assert!(model.forward(&b, &mut c, None).is_err(), "one cache twice");
    let mut b = BatchInput::default();
    b.push(5, &[5]);
    assert!(
        model.forward(&b, &mut c, None).is_err(),
        "cache index out of range"
    );
    let b = BatchInput {
        tokens: vec![5, 6, 7],
        seqs: vec![molora::model::decoder::SeqSlice {
            cache: 0,
            rows: 0..2,
        }],
    };
    assert!(model.forward(&b, &mut c, None).is_err(), "rows not covered");
    assert!(
        c.iter().all(|c| c.is_empty()),
        "failed forwards leave the caches empty"
    );
    let mut b = BatchInput::default();
    b.push(0, &vec![5; 257]);
    assert!(
        model.forward(&b, &mut c, None).is_err(),
        "beyond max_position_embeddings"
    );
}

/// f16 weight storage computes exactly the f32 product of the rounded
/// weights (both the few-row kernel and the widen-then-gemm path), and stays
/// close to the f32 checkpoint.
#[test]
fn f16_weights_compute_the_rounded_f32_model() {
    let (_dir, model) = tiny_model(serde_json::json!({}), 7);
    let mut half = model.clone();
    half.set_weight_dtype(DType::F16).unwrap();
    assert_eq!(half.weight_dtype(), DType::F16);
    let mut rounded = half.clone();
    rounded.set_weight_dtype(DType::F32).unwrap();
    // SEQS[1] has 11 rows (widened path), the others 6 and 3 (kernel path).
    for s in SEQS {
        let (h, r, f) = (alone(&half, s), alone(&rounded, s), alone(&model, s));
        let exact = max_diff(&h, &r);
        assert!(exact < 1e-4, "f16 storage vs rounded f32 differ by {exact}");
        let close = max_diff(&h, &f);
        assert!(close < 5e-2, "f16 vs f32 checkpoint differ by {close}");
        let logits = |m: &Decoder| {
            let mut c = caches(m, 1);
            let mut b = BatchInput::default();
            b.push(0, s);
            rows(&m.logits(&m.forward(&b, &mut c, None).unwrap()).unwrap())
        };
        let diff = max_diff(&logits(&half), &logits(&rounded));
        assert!(diff < 1e-4, "logits differ by {diff}");
    }
    assert!(model.clone().set_weight_dtype(DType::BF16).is_err());
}
