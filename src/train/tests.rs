//! The training decoder against the inference decoder, gradients of every
//! stage's variables, and exact resume of the loop.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::batch::{PackedBatch, TrainSeq};
use super::data::Domain;
use super::decoder::{init_tensors, set_vars, NoAdapters, TrainDecoder};
use super::gate_train::{gate_loss, TrainGate};
use super::looping::{self, Schedule, StepOut};
use super::lora::TrainLora;
use super::stages::OracleRouting;
use crate::adapters::AdapterRole;
use crate::model::config::Config;
use crate::model::decoder::{BatchInput, Decoder};
use crate::model::kv_cache::KvCache;

const IMAGE_START: u32 = 40;

fn tiny_config() -> Config {
    let cfg: Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
        "molora": {
            "modalities": [
                {"name": "text", "token_range": [0, IMAGE_START]},
                {"name": "image", "token_range": [IMAGE_START, 50]}
            ],
            "boi_token_id": 3, "eoi_token_id": 4, "image_grid": [2, 2]
        }
    }))
    .unwrap();
    cfg.validate().unwrap();
    cfg
}

fn seq(ids: &[u32], labels: &[Option<Domain>]) -> TrainSeq {
    TrainSeq {
        ids: ids.to_vec(),
        weights: vec![1.0; ids.len()],
        labels: labels.to_vec(),
    }
}

fn inference_logits(model: &Decoder, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut caches = vec![KvCache::new(model.config(), &Device::Cpu).unwrap()];
    let mut b = BatchInput::default();
    b.push(0, ids);
    let h = model.forward(&b, &mut caches, None).unwrap();
    model.logits(&h).unwrap().to_vec2::<f32>().unwrap()
}

/// The packed training forward equals the inference decoder on the same
/// weights, for each sequence of a row (positions restart, no cross-talk).
#[test]
fn train_decoder_matches_inference_decoder() {
    for fused in [false, true] {
        train_decoder_matches_inference_decoder_with(fused);
    }
}

fn train_decoder_matches_inference_decoder_with(fused: bool) {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let tensors = init_tensors(&cfg, 3).unwrap();
    let map = tensors.iter().cloned().collect();
    let infer = Decoder::new(&cfg, VarBuilder::from_tensors(map, DType::F32, &dev)).unwrap();
    let map = tensors.into_iter().collect();
    let train = TrainDecoder::new(&cfg, VarBuilder::from_tensors(map, DType::F32, &dev))
        .unwrap()
        .with_fused_ops(fused);

    let a = [1u32, 7, 9, 33, 41, 45, 12];
    let b = [1u32, 20, 21];
    let none = [None; 7];
    let batch = PackedBatch::pack(&[seq(&a, &none), seq(&b, &none[..3])], 1, 12, 0, &dev).unwrap();
    let logits = train
        .logits(&batch, &NoAdapters)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want_a = inference_logits(&infer, &a);
    let want_b = inference_logits(&infer, &b);
    let mut worst = 0f32;
    for (row, want) in want_a.iter().chain(&want_b).enumerate() {
        for (x, y) in logits[row].iter().zip(want) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(
        worst < 1e-4,
        "fused {fused}: largest logit difference {worst}"
    );
}

/// Names and values of variables whose gradient is missing or all zero.
fn dead_vars(varmap: &VarMap, grads: &candle_core::backprop::GradStore) -> Vec<String> {
    let data = varmap.data().lock().unwrap();
    let mut dead = Vec::new();
    for (name, var) in data.iter() {
        let alive = grads
            .get(var.as_tensor())
            .map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
            .unwrap_or(false);
        if !alive {
            dead.push(name.clone());
        }
    }
    dead.sort();
    dead
}

fn labelled_batch(dev: &Device) -> PackedBatch {
    use Domain::*;
    let s1 = seq(
        &[1, 7, 9, 11, 13, 2],
        &[
            None,
            Some(Arithmetic),
            Some(Arithmetic),
            None,
            Some(Code),
            None,
        ],
    );
    let s2 = seq(
        &[1, 5, 3, 41, 42, 43, 44, 4, 8, 2],
        &[
            None,
            Some(Caption),
            None,
            Some(Image),
            Some(Image),
            Some(Image),
            Some(Image),
            None,
            Some(Caption),
            None,
        ],
    );
    let labels = |s: TrainSeq| TrainSeq {
        labels: super::batch::resolve_labels(&s.labels),
        ..s
    };
    PackedBatch::pack(&[labels(s1), labels(s2)], 2, 10, 0, dev).unwrap()
}

#[test]
fn every_base_variable_receives_a_gradient() {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let mut grads_of = Vec::new();
    for fused in [false, true] {
        let varmap = VarMap::new();
        let model = TrainDecoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))
            .unwrap()
            .with_fused_ops(fused);
        set_vars(&varmap, &init_tensors(&cfg, 1).unwrap()).unwrap();
        let batch = labelled_batch(&dev);
        let grads = model.loss(&batch, &NoAdapters).unwrap().backward().unwrap();
        assert_eq!(
            dead_vars(&varmap, &grads),
            Vec::<String>::new(),
            "fused {fused}"
        );
        assert_eq!(
            varmap.all_vars().len(),
            crate::model::weights::expected_tensors(&cfg).len()
        );
        let data = varmap.data().lock().unwrap();
        let mut named: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(name, var)| {
                let g = grads
                    .get(var)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                (name.clone(), g)
            })
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        grads_of.push(named);
    }
    // The fused kernels compute the same gradients, to float rounding.
    for ((name, composed), (_, fused)) in grads_of[0].iter().zip(&grads_of[1]) {
        let scale = composed.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let worst = composed
            .iter()
            .zip(fused)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "{name}: gradients differ by {worst} (largest {scale})"
        );
    }
}

/// Every adapter variable gets a gradient once B has left zero (one step:
/// at the start B = 0 and A's gradient is zero by construction).
#[test]
fn every_adapter_variable_receives_a_gradient() {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let map = init_tensors(&cfg, 2).unwrap().into_iter().collect();
    let base = TrainDecoder::new(&cfg, VarBuilder::from_tensors(map, DType::F32, &dev)).unwrap();
    let batch = labelled_batch(&dev);
    for name in ["text", "image", "math", "code", "caption"] {
        let varmap = VarMap::new();
        let role = super::pipeline::role_of(name).unwrap();
        let lora = TrainLora::new_trainable(name, role, &cfg, 4, 8.0, 5, &varmap, &dev).unwrap();
        let schedule = Schedule {
            steps: 1,
            learning_rate: 1e-2,
            min_lr_fraction: 1.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            checkpoint_every: 0,
        };
        let dir = tempfile::tempdir().unwrap();
        let loss = || {
            let routing = OracleRouting::new(&[&lora], &batch, IMAGE_START)?;
            base.loss(&batch, &routing).map_err(anyhow::Error::from)
        };
        looping::run(name, &varmap, &schedule, dir.path(), |_| {
            Ok(StepOut {
                loss: loss()?,
                items: 1,
            })
        })
        .unwrap();
        let grads = loss().unwrap().backward().unwrap();
        assert_eq!(
            dead_vars(&varmap, &grads),
            Vec::<String>::new(),
            "adapter {name}"
        );
        assert_eq!(varmap.all_vars().len(), 2 * 7 * cfg.num_hidden_layers);
    }
    // A frozen adapter passes no gradient and changes nothing while B = 0.
    let varmap = VarMap::new();
    let role = AdapterRole::Semantic {
        domain: "math".into(),
    };
    let lora = TrainLora::new_trainable("math", role, &cfg, 4, 8.0, 5, &varmap, &dev).unwrap();
    let routing = OracleRouting::new(&[&lora], &batch, IMAGE_START).unwrap();
    let with = base
        .loss(&batch, &routing)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let without = base
        .loss(&batch, &NoAdapters)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((with - without).abs() < 1e-6);
}

#[test]
fn every_gate_variable_receives_a_gradient() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let gate = TrainGate::new(2, 8, 4, 3, 9, &varmap, &dev).unwrap();
    let inputs: Vec<Tensor> = (0..2)
        .map(|l| Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap() * (l + 1) as f64)
        .collect::<candle_core::Result<_>>()
        .unwrap();
    let (loss, accuracy) = gate_loss(&gate, 0, &inputs, &[0, 2, 3, 5], &[0, 1, 2, 1]).unwrap();
    assert_eq!(accuracy.len(), 2, "one accuracy per layer");
    assert!(accuracy.iter().all(|a| (0.0..=1.0).contains(a)));
    let grads = loss.backward().unwrap();
    assert_eq!(dead_vars(&varmap, &grads), Vec::<String>::new());
    assert_eq!(varmap.all_vars().len(), 8);
}

/// With `first_gated_layer` 1 a semantic adapter is absent from the first
/// layer (its B there gets no gradient, so stays zero) and present after
/// it; a modality adapter keeps every layer. At B = 0 every A is dead by
/// construction, so the B's tell.
#[test]
fn semantic_adapters_skip_the_layers_before_the_first_gated_one() {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let map = init_tensors(&cfg, 2).unwrap().into_iter().collect();
    let base = TrainDecoder::new(&cfg, VarBuilder::from_tensors(map, DType::F32, &dev)).unwrap();
    let batch = labelled_batch(&dev);
    for name in ["text", "math"] {
        let varmap = VarMap::new();
        let role = super::pipeline::role_of(name).unwrap();
        let lora = TrainLora::new_trainable(name, role, &cfg, 4, 8.0, 5, &varmap, &dev).unwrap();
        let routing = OracleRouting::new(&[&lora], &batch, IMAGE_START)
            .unwrap()
            .with_first_gated_layer(1);
        let grads = base.loss(&batch, &routing).unwrap().backward().unwrap();
        let dead_b: Vec<String> = (dead_vars(&varmap, &grads).into_iter())
            .filter(|n| n.contains("lora_B"))
            .collect();
        let in_first_layer = dead_b.iter().filter(|n| n.contains(".layers.0.")).count();
        match name {
            "text" => assert_eq!(dead_b, Vec::<String>::new()),
            _ => {
                assert_eq!(in_first_layer, 7, "{dead_b:?}");
                assert_eq!(dead_b.len(), 7, "only the first layer: {dead_b:?}");
            }
        }
    }
}

/// "Train 3 steps" equals "train 2, stop, resume, train to 3".
#[test]
fn interrupted_training_resumes_exactly() {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let schedule = Schedule {
        steps: 3,
        learning_rate: 1e-2,
        min_lr_fraction: 0.1,
        warmup_steps: 1,
        weight_decay: 0.01,
        checkpoint_every: 1,
    };
    let train = |dir: &std::path::Path, fail_at: Option<u64>| {
        let varmap = VarMap::new();
        let model =
            TrainDecoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        set_vars(&varmap, &init_tensors(&cfg, 4).unwrap()).unwrap();
        let result = looping::run("base", &varmap, &schedule, dir, |step| {
            anyhow::ensure!(Some(step) != fail_at, "interrupted");
            let ids: Vec<u32> = (0..8)
                .map(|i| 5 + ((i * 7 + step as u32 * 3) % 30))
                .collect();
            let batch = PackedBatch::pack(&[seq(&ids, &[None; 8])], 1, 8, 0, &dev)?;
            Ok(StepOut {
                loss: model.loss(&batch, &NoAdapters)?,
                items: 8,
            })
        });
        (varmap, result)
    };
    let straight = tempfile::tempdir().unwrap();
    let (a, r) = train(straight.path(), None);
    r.unwrap();
    let resumed = tempfile::tempdir().unwrap();
    assert!(train(resumed.path(), Some(2)).1.is_err());
    let (b, r) = train(resumed.path(), None);
    let state = r.unwrap();
    assert_eq!(state.step, 3);
    let (a, b) = (a.data().lock().unwrap(), b.data().lock().unwrap());
    for (name, var) in a.iter() {
        let x = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = b[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(x, y, "{name}");
    }
}

/// A stage run again after it finished trains nothing and keeps the record
/// of the run that trained it; a run that trains replaces it.
#[test]
fn a_finished_stage_run_again_keeps_its_record() {
    use super::pipeline::{record, StageLog};
    let dir = tempfile::tempdir().unwrap();
    let entry =
        |seconds: f64, loss_log: Vec<f32>| StageLog::new("base", 100, seconds, 1000, loss_log);
    let read = || -> Vec<StageLog> {
        let text = std::fs::read_to_string(dir.path().join("train_log.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    record(dir.path(), entry(80.0, vec![2.0, 1.0])).unwrap();
    record(dir.path(), entry(0.01, vec![])).unwrap();
    assert_eq!(read().len(), 1);
    assert_eq!(read()[0].seconds, 80.0);
    record(dir.path(), entry(90.0, vec![1.5])).unwrap();
    assert_eq!(read().len(), 1);
    assert_eq!(read()[0].seconds, 90.0);
}

/// The loss log windows steps, closes a short last window on request, and
/// reads the checkpoints written before it was one type: a decoder stage's
/// `loss_log` and session 13's VQ `reconstruction` / `window`.
#[test]
fn loss_windows_close_and_read_older_checkpoints() {
    use super::looping::{LoopState, LossWindows, LOG_WINDOW};
    use super::vq_train::RunLog;
    let mut log = LossWindows::default();
    let closed: Vec<Option<f32>> = (0..LOG_WINDOW + 2).map(|_| log.add(2.0)).collect();
    assert_eq!(closed.iter().flatten().count(), 1);
    assert_eq!(closed[LOG_WINDOW as usize - 1], Some(2.0));
    assert_eq!(log.close(), Some(2.0));
    assert_eq!(log.close(), None);
    assert_eq!(log.loss_log, vec![2.0, 2.0]);

    let decoder: LoopState =
        serde_json::from_str(r#"{"step":50,"loss_log":[3.0,2.5],"seconds":9.0,"items":800}"#)
            .unwrap();
    assert_eq!(decoder.losses.loss_log, vec![3.0, 2.5]);
    let written = serde_json::to_value(&decoder).unwrap();
    assert_eq!(written["loss_log"], serde_json::json!([3.0, 2.5]));

    let mut vq: RunLog =
        serde_json::from_str(r#"{"seconds":4.0,"reconstruction":[0.5],"window":[0.75,3]}"#)
            .unwrap();
    assert_eq!(vq.reconstruction.loss_log, vec![0.5]);
    assert_eq!(vq.reconstruction.close(), Some(0.25));
}
