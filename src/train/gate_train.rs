//! `gate`: the per-layer router over the semantic adapters, trained last
//! with base and adapters frozen.
//!
//! Loss: at every layer, cross-entropy between the gate's scores of each
//! labelled text row and the row's expert ([`super::pipeline::expert_for`]
//! of its routing label). The layer inputs come from a forward with the
//! exact (label) routing the adapters were trained under, so a gate that
//! picks right reproduces that forward at inference (top-1).
//!
//! The variables carry [`crate::routing::gate::Gate`]'s names
//! (`layers.{i}.fc1.weight`, ...), so the saved file loads there.

use std::cell::RefCell;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use super::batch::PackedBatch;
use super::decoder::{set_vars, LayerAdapters, Routing};
use super::looping::{self, StepOut};
use super::lora::TrainLora;
use super::pipeline::{expert_for, record, stage_data, Run, StageLog, ADAPTERS, EXPERTS};
use super::stages::{frozen_adapter, frozen_base, Assets, OracleRouting};
use crate::routing::gate::{GateConfig, GATE_CONFIG_FILE};

/// The gate's trainable layers: `fc1` `[h, d]` + silu + `fc2` `[E, h]`.
pub struct TrainGate {
    layers: Vec<[Tensor; 4]>,
}

impl TrainGate {
    pub fn new(
        layers: usize,
        d: usize,
        h: usize,
        e: usize,
        seed: u64,
        varmap: &VarMap,
        dev: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, dev);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut init = Vec::new();
        let mut out = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut get = |name: &str, shape: &[usize], bound: f32| -> Result<Tensor> {
                let full = format!("layers.{l}.{name}");
                let t = vb.get_with_hints(shape, &full, Init::Const(0.0))?;
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
                init.push((full, Tensor::from_vec(v, shape, dev)?));
                Ok(t)
            };
            let (bd, bh) = (1.0 / (d as f32).sqrt(), 1.0 / (h as f32).sqrt());
            out.push([
                get("fc1.weight", &[h, d], bd)?,
                get("fc1.bias", &[h], bd)?,
                get("fc2.weight", &[e, h], bh)?,
                get("fc2.bias", &[e], bh)?,
            ]);
        }
        set_vars(varmap, &init)?;
        Ok(Self { layers: out })
    }

    /// Scores `[N, E]` of layer `l` (as `Gate::scores`).
    pub fn scores(&self, l: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let [w1, b1, w2, b2] = &self.layers[l];
        let h = x.matmul(&w1.t()?)?.broadcast_add(b1)?.silu()?;
        h.matmul(&w2.t()?)?.broadcast_add(b2)
    }
}

/// Label routing that also keeps each layer's normalised input.
struct Recording<'a> {
    inner: OracleRouting<'a>,
    inputs: RefCell<Vec<Tensor>>,
}

impl Routing for Recording<'_> {
    fn layer_adapters(&self, layer: usize, xn: &Tensor) -> candle_core::Result<LayerAdapters<'_>> {
        self.inputs.borrow_mut().push(xn.detach());
        self.inner.layer_adapters(layer, xn)
    }
}

/// Rows the gate is trained on, and their expert indices.
fn gated_rows(batch: &PackedBatch, image_start: u32) -> (Vec<u32>, Vec<u32>) {
    let mut rows = Vec::new();
    let mut experts = Vec::new();
    for (i, label) in batch.labels.iter().enumerate() {
        let is_text = batch.host_ids[i] < image_start;
        if let (true, Some(d)) = (is_text, label) {
            let e = EXPERTS
                .iter()
                .position(|&x| x == expert_for(*d))
                .unwrap_or(0);
            rows.push(i as u32);
            experts.push(e as u32);
        }
    }
    (rows, experts)
}

/// Mean cross-entropy over the layers from `first_layer` on (`inputs` are
/// theirs) and the gated rows; also each layer's accuracy
/// of its top pick (the first layer's gate sees only the token's embedding,
/// no context, so it is the one that can tell the domains apart least).
pub fn gate_loss(
    gate: &TrainGate,
    first_layer: usize,
    inputs: &[Tensor],
    rows: &[u32],
    experts: &[u32],
) -> Result<(Tensor, Vec<f32>)> {
    let dev = inputs[0].device();
    let idx = Tensor::from_slice(rows, rows.len(), dev)?;
    let target = Tensor::from_slice(experts, experts.len(), dev)?;
    let mut total: Option<Tensor> = None;
    let mut accuracy = Vec::with_capacity(inputs.len());
    for (l, x) in inputs.iter().enumerate() {
        let s = gate.scores(first_layer + l, &x.index_select(&idx, 0)?)?;
        let log_p = candle_nn::ops::log_softmax(&s, D::Minus1)?;
        let nll = log_p.gather(&target.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
        total = Some(match total {
            Some(t) => (t + nll)?,
            None => nll,
        });
        let pick = s.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let hits = pick.iter().zip(experts).filter(|(a, b)| a == b).count();
        accuracy.push(hits as f32 / experts.len().max(1) as f32);
    }
    let total = total.context("the model has no layers")?;
    Ok(((total / inputs.len() as f64)?, accuracy))
}

pub fn gate(run: &Run, device: &Device) -> Result<()> {
    let assets = Assets::load(run, device)?;
    let cfg = &assets.config;
    let base = frozen_base(run, cfg, device)?;
    let adapters: Vec<TrainLora> = ADAPTERS
        .iter()
        .map(|a| frozen_adapter(run, a, cfg, device))
        .collect::<Result<_>>()?;
    let pc = &run.cfg;
    let varmap = VarMap::new();
    let gate = TrainGate::new(
        cfg.num_hidden_layers,
        cfg.hidden_size,
        pc.gate_hidden,
        EXPERTS.len(),
        run.stage_seed("gate-init"),
        &varmap,
        device,
    )?;
    let mut maker = assets.maker();
    let seed = run.stage_seed("gate");
    let data = stage_data(pc, "gate");
    let image_start = assets.layout.image_range.start;
    let refs: Vec<&TrainLora> = adapters.iter().collect();
    // None when the stage was already finished and no batch ran.
    let mut last_accuracy = None;
    let state = looping::run(
        "gate",
        &varmap,
        &pc.gate,
        &run.checkpoint_dir("gate"),
        |step| {
            let batch = maker.batch(&data, seed, step, pc.batch_rows, pc.batch_len, device)?;
            let routing = Recording {
                inner: OracleRouting::new(&refs, &batch, image_start)?
                    .with_first_gated_layer(pc.first_gated_layer),
                inputs: RefCell::new(Vec::new()),
            };
            base.hidden(&batch, &routing)?;
            let (rows, experts) = gated_rows(&batch, image_start);
            let inputs = &routing.inputs.borrow()[pc.first_gated_layer..];
            let (loss, acc) = gate_loss(&gate, pc.first_gated_layer, inputs, &rows, &experts)?;
            last_accuracy = Some(acc);
            Ok(StepOut {
                loss,
                items: rows.len(),
            })
        },
    )?;
    if let Some(accuracy) = last_accuracy {
        let per_layer: Vec<String> = (accuracy.iter().enumerate())
            .map(|(l, a)| format!("layer {} {:.1}%", pc.first_gated_layer + l, 100.0 * a))
            .collect();
        super::progress::println(&format!(
            "gate: routing accuracy on the last batch: {}",
            per_layer.join(", ")
        ));
    }
    varmap.save(run.path(crate::routing::gate::GATE_WEIGHTS_FILE))?;
    let gate_cfg = GateConfig {
        experts: EXPERTS.iter().map(|s| s.to_string()).collect(),
        top_k: pc.gate_top_k,
        hidden_size: pc.gate_hidden,
        first_gated_layer: pc.first_gated_layer,
    };
    std::fs::write(
        run.path(GATE_CONFIG_FILE),
        serde_json::to_string_pretty(&gate_cfg)?,
    )?;
    record(
        &run.out,
        StageLog::new(
            "gate",
            state.step,
            state.seconds,
            state.items,
            state.losses.loss_log,
        ),
    )
}
