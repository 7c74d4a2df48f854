//! The learned gate: per decoder layer, a small map from the layer's
//! normalised input to one score per semantic adapter ("expert"). Text tokens
//! only; softmax over the experts a request allows, top-k, weights
//! renormalised to sum to one.
//!
//! Files beside the model: `gate_config.json` (expert names = adapter names,
//! top_k, hidden size; 0 = a linear gate) and `gate.safetensors` with keys
//! `layers.{i}.fc1.weight` [h, d], `layers.{i}.fc1.bias` [h],
//! `layers.{i}.fc2.weight` [E, h], `layers.{i}.fc2.bias` [E] (MLP), or
//! `layers.{i}.proj.weight` [E, d], `layers.{i}.proj.bias` [E] (linear).
//! Adding an adapter adds a row to the last map of every layer.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::dispatch::linear;

pub const GATE_CONFIG_FILE: &str = "gate_config.json";
pub const GATE_WEIGHTS_FILE: &str = "gate.safetensors";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateConfig {
    /// Semantic adapter names, in score order.
    pub experts: Vec<String>,
    /// 1 or 2.
    pub top_k: usize,
    /// Hidden width of the two-layer MLP; 0 = a single linear map.
    #[serde(default)]
    pub hidden_size: usize,
    /// Layers before this one get no semantic adapter. The first layer's
    /// gate sees only the token's embedding, no context, and so cannot tell
    /// a digit of a sum from a digit of a program (88% of rows right in a
    /// session-19 model whose later layers got 100%); adapters trained with
    /// the same setting (`PipelineConfig::first_gated_layer`) never rely on
    /// that layer.
    #[serde(default)]
    pub first_gated_layer: usize,
}

#[derive(Debug, Clone)]
struct GateLayer {
    /// `[h, d]` and `[h]` (MLP) — absent for a linear gate.
    fc1: Option<(Tensor, Tensor)>,
    /// `[E, h or d]`, `[E]`.
    out: (Tensor, Tensor),
}

#[derive(Debug, Clone)]
pub struct Gate {
    pub config: GateConfig,
    layers: Vec<GateLayer>,
}

/// One row's semantic picks: (expert index, renormalised weight), best first.
pub type Picks = Vec<(usize, f32)>;

impl Gate {
    pub fn new(config: GateConfig, num_layers: usize, vb: VarBuilder) -> Result<Self> {
        if !(1..=2).contains(&config.top_k) {
            bail!("top_k is {}; the gate supports 1 or 2", config.top_k);
        }
        if config.experts.is_empty() {
            bail!("the gate lists no experts");
        }
        if config.first_gated_layer >= num_layers {
            bail!(
                "first_gated_layer is {} but the model has {num_layers} layers: the gate would route none",
                config.first_gated_layer
            );
        }
        let e = config.experts.len();
        let d = vb
            .get_unchecked_dtype("layers.0.fc1.weight", DType::F32)
            .or_else(|_| vb.get_unchecked_dtype("layers.0.proj.weight", DType::F32));
        let d = d
            .context("no layers.0.fc1.weight or layers.0.proj.weight")?
            .dim(1)?;
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let vb = vb.pp(format!("layers.{i}"));
            let layer = if config.hidden_size > 0 {
                let h = config.hidden_size;
                let fc1 = (vb.get((h, d), "fc1.weight")?, vb.get(h, "fc1.bias")?);
                let fc2 = (vb.get((e, h), "fc2.weight")?, vb.get(e, "fc2.bias")?);
                GateLayer {
                    fc1: Some(fc1),
                    out: fc2,
                }
            } else {
                GateLayer {
                    fc1: None,
                    out: (vb.get((e, d), "proj.weight")?, vb.get(e, "proj.bias")?),
                }
            };
            layers.push(layer);
        }
        Ok(Self { config, layers })
    }

    /// Loads `gate_config.json` + `gate.safetensors` from `dir`.
    pub fn load(
        dir: &Path,
        num_layers: usize,
        hidden_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let cfg_path = dir.join(GATE_CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("{}: cannot read gate config", cfg_path.display()))?;
        let config: GateConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid gate config", cfg_path.display()))?;
        let weights = dir.join(GATE_WEIGHTS_FILE);
        // SAFETY: the file is not modified while mapped (model files are read-only in use).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("{}: cannot read gate weights", weights.display()))?;
        let gate = Self::new(config, num_layers, vb)
            .with_context(|| format!("{}: invalid gate", weights.display()))?;
        let d = gate.input_size();
        if d != hidden_size {
            bail!(
                "{}: gate input size {d} does not match the model's hidden_size {hidden_size}",
                weights.display()
            );
        }
        Ok(gate)
    }

    /// A deterministic random gate (for random models and tests).
    pub fn random(
        config: GateConfig,
        num_layers: usize,
        hidden: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let tensors = random_tensors(&config, num_layers, hidden, seed, device)?;
        let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, device);
        Self::new(config, num_layers, vb)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut map = std::collections::HashMap::new();
        for (i, l) in self.layers.iter().enumerate() {
            match &l.fc1 {
                Some((w, b)) => {
                    map.insert(format!("layers.{i}.fc1.weight"), w.clone());
                    map.insert(format!("layers.{i}.fc1.bias"), b.clone());
                    map.insert(format!("layers.{i}.fc2.weight"), l.out.0.clone());
                    map.insert(format!("layers.{i}.fc2.bias"), l.out.1.clone());
                }
                None => {
                    map.insert(format!("layers.{i}.proj.weight"), l.out.0.clone());
                    map.insert(format!("layers.{i}.proj.bias"), l.out.1.clone());
                }
            }
        }
        candle_core::safetensors::save(&map, dir.join(GATE_WEIGHTS_FILE))?;
        std::fs::write(
            dir.join(GATE_CONFIG_FILE),
            serde_json::to_string_pretty(&self.config)?,
        )?;
        Ok(())
    }

    pub fn num_experts(&self) -> usize {
        self.config.experts.len()
    }

    pub fn input_size(&self) -> usize {
        match &self.layers[0].fc1 {
            Some((w, _)) => w.dims()[1],
            None => self.layers[0].out.0.dims()[1],
        }
    }

    pub fn expert_index(&self, name: &str) -> Option<usize> {
        self.config.experts.iter().position(|e| e == name)
    }

    /// Raw scores `[N, E]` of layer `layer` for the rows of `x` `[N, d]`.
    pub fn scores(&self, layer: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let l = &self.layers[layer];
        let h = match &l.fc1 {
            Some((w, b)) => linear(x, w, Some(b))?.silu()?,
            None => x.clone(),
        };
        linear(&h, &l.out.0, Some(&l.out.1))
    }

    /// Softmax over the `allowed` experts of one score row, top-k, renormalised.
    pub fn pick(&self, scores: &[f32], allowed: &[usize]) -> Picks {
        top_k_renormalised(scores, allowed, self.config.top_k)
    }
}

/// Softmax restricted to `allowed`, then the k best, weights renormalised to
/// sum to one. Ties keep the lower expert index first.
pub fn top_k_renormalised(scores: &[f32], allowed: &[usize], k: usize) -> Picks {
    if allowed.is_empty() {
        return vec![];
    }
    let max = allowed
        .iter()
        .map(|&e| scores[e])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = allowed
        .iter()
        .map(|&e| (e, (scores[e] - max).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    probs.truncate(k.max(1));
    let sum: f32 = probs.iter().map(|p| p.1).sum();
    for p in &mut probs {
        p.1 /= sum;
    }
    probs
}

fn random_tensors(
    config: &GateConfig,
    num_layers: usize,
    hidden: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |shape: &[usize], std: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std)
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    };
    let e = config.experts.len();
    let mut out = vec![];
    for i in 0..num_layers {
        if config.hidden_size > 0 {
            let h = config.hidden_size;
            out.push((
                format!("layers.{i}.fc1.weight"),
                t(&[h, hidden], 1.0 / (hidden as f32).sqrt())?,
            ));
            out.push((format!("layers.{i}.fc1.bias"), t(&[h], 0.1)?));
            out.push((
                format!("layers.{i}.fc2.weight"),
                t(&[e, h], 1.0 / (h as f32).sqrt())?,
            ));
            out.push((format!("layers.{i}.fc2.bias"), t(&[e], 0.1)?));
        } else {
            out.push((
                format!("layers.{i}.proj.weight"),
                t(&[e, hidden], 1.0 / (hidden as f32).sqrt())?,
            ));
            out.push((format!("layers.{i}.proj.bias"), t(&[e], 0.1)?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_renormalises_over_allowed_experts() {
        let scores = [3.0, 1.0, 2.0, 0.0];
        let picks = top_k_renormalised(&scores, &[1, 2, 3], 2);
        assert_eq!(picks.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 1]);
        let sum: f32 = picks.iter().map(|p| p.1).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let expect = 1.0 / (1.0 + (-1.0f32).exp());
        assert!((picks[0].1 - expect).abs() < 1e-6);
        assert_eq!(top_k_renormalised(&scores, &[3], 2), vec![(3, 1.0)]);
        assert!(top_k_renormalised(&scores, &[], 2).is_empty());
    }

    #[test]
    fn gate_round_trips_through_files() {
        let dev = Device::Cpu;
        let cfg = GateConfig {
            experts: vec!["math".into(), "code".into(), "caption".into()],
            top_k: 2,
            hidden_size: 8,
            first_gated_layer: 0,
        };
        let gate = Gate::random(cfg, 2, 16, 7, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        gate.save(dir.path()).unwrap();
        let back = Gate::load(dir.path(), 2, 16, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 16), &dev).unwrap();
        let a = gate.scores(1, &x).unwrap().to_vec2::<f32>().unwrap();
        let b = back.scores(1, &x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
        assert!(Gate::load(dir.path(), 2, 32, &dev)
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
    }
}
