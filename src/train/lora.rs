//! LoRA pairs for training: trainable (variables of a `VarMap`, named by
//! their PEFT keys) or frozen (loaded from a PEFT folder), convertible to a
//! [`LoraAdapter`] to be written in PEFT's format.
//!
//! Initialisation as PEFT's: A ~ U(-1/√in, 1/√in), B = 0, so a fresh adapter
//! leaves the model unchanged.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};

use crate::adapters::peft::{AdapterConfig, LoraAdapter, LoraPair};
use crate::adapters::{AdapterRole, Projection};
use crate::model::config::Config;

pub struct TrainLora {
    pub name: String,
    pub role: AdapterRole,
    pub rank: usize,
    pub alpha: f64,
    pairs: BTreeMap<(usize, Projection), LoraPair>,
}

impl TrainLora {
    /// A fresh trainable adapter on every projection of every layer; its
    /// variables live in `varmap`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_trainable(
        name: &str,
        role: AdapterRole,
        cfg: &Config,
        rank: usize,
        alpha: f64,
        seed: u64,
        varmap: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        // candle's CPU RNG cannot be seeded: A is drawn here and set.
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
        let mut pairs = BTreeMap::new();
        let mut init = Vec::new();
        for layer in 0..cfg.num_hidden_layers {
            for proj in Projection::ALL {
                let (fan_in, fan_out) = proj.shape(cfg);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let path = proj.module_path(layer);
                let a_name = format!("{path}.lora_A.weight");
                let a = vb.get_with_hints((rank, fan_in), &a_name, Init::Const(0.0))?;
                let values: Vec<f32> = (0..rank * fan_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                init.push((a_name, Tensor::from_vec(values, (rank, fan_in), device)?));
                let b = vb.get_with_hints(
                    (fan_out, rank),
                    &format!("{path}.lora_B.weight"),
                    Init::Const(0.0),
                )?;
                pairs.insert((layer, proj), LoraPair { a, b });
            }
        }
        super::decoder::set_vars(varmap, &init)?;
        Ok(Self {
            name: name.to_string(),
            role,
            rank,
            alpha,
            pairs,
        })
    }

    /// A frozen adapter (constants: no gradient flows into it).
    pub fn frozen(adapter: &LoraAdapter) -> Self {
        Self {
            name: adapter.name.clone(),
            role: adapter.role().clone(),
            rank: adapter.rank(),
            alpha: adapter.config.lora_alpha,
            pairs: adapter.weights.clone(),
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// `x·Aᵀ·Bᵀ·scale` for `x` `[N, in]`, or None where the adapter has no pair.
    pub fn delta(
        &self,
        layer: usize,
        p: Projection,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(pair) = self.pairs.get(&(layer, p)) else {
            return Ok(None);
        };
        let low = x.matmul(&pair.a.t()?)?;
        Ok(Some((low.matmul(&pair.b.t()?)? * self.scale())?))
    }

    /// The adapter in the form PEFT files are written from.
    pub fn to_adapter(&self) -> Result<LoraAdapter> {
        let mut weights = BTreeMap::new();
        for (&key, pair) in &self.pairs {
            weights.insert(
                key,
                LoraPair {
                    a: pair.a.detach().copy()?,
                    b: pair.b.detach().copy()?,
                },
            );
        }
        Ok(LoraAdapter {
            name: self.name.clone(),
            config: AdapterConfig::new(self.role.clone(), self.rank, self.alpha, &Projection::ALL),
            weights,
        })
    }
}
