//! AdamW with its state in the open, so that a checkpoint can save and
//! restore the moments and a resumed run continues exactly where it stopped.
//!
//! The update is candle_nn::AdamW's, term for term (decoupled weight decay,
//! bias-corrected moments); candle's keeps its moments private, which would
//! make every resume restart the moments at zero.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::ParamsAdamW;

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    slots: Vec<Slot>,
    step_t: u64,
    params: ParamsAdamW,
}

impl AdamW {
    /// `vars` as (name, var); kept in name order so that state files are
    /// stable.
    pub fn new(mut vars: Vec<(String, Var)>, params: ParamsAdamW) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                Ok(Slot { name, var, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step_t: 0,
            params,
        })
    }

    pub fn step_count(&self) -> u64 {
        self.step_t
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One update of every variable that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(|var| grads.get(var.as_tensor()).cloned())
    }

    /// One update of every variable for which `grad_of` gives a gradient.
    pub fn step_with(&mut self, grad_of: impl Fn(&Var) -> Option<Tensor>) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let t = i32::try_from(self.step_t).unwrap_or(i32::MAX);
        let scale_m = 1.0 / (1.0 - p.beta1.powi(t));
        let scale_v = 1.0 / (1.0 - p.beta2.powi(t));
        for slot in self.slots.iter_mut() {
            let Some(g) = grad_of(&slot.var) else {
                continue;
            };
            let g = &g;
            let m = ((&slot.m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&slot.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&m * scale_m)?;
            let v_hat = (&v * scale_v)?;
            let decayed = (slot.var.as_tensor() * (1.0 - p.lr * p.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            slot.var.set(&(decayed - (update * p.lr)?)?)?;
            slot.m = m;
            slot.v = v;
        }
        Ok(())
    }

    /// Zeroes the moments of rows `rows` (dim 0) of variable `name`, e.g.
    /// after re-initialising dead codebook entries.
    pub fn reset_rows(&mut self, name: &str, rows: &[usize]) -> Result<()> {
        let Some(slot) = self.slots.iter_mut().find(|s| s.name == name) else {
            bail!("optimizer has no variable `{name}`");
        };
        let n = slot.m.dim(0)?;
        let mut keep = vec![1f32; n];
        for &r in rows {
            if r < n {
                keep[r] = 0.0;
            }
        }
        let mut shape = vec![1; slot.m.rank()];
        shape[0] = n;
        let mask = Tensor::from_vec(keep, shape, slot.m.device())?;
        slot.m = slot.m.broadcast_mul(&mask)?;
        slot.v = slot.v.broadcast_mul(&mask)?;
        Ok(())
    }

    /// Writes the moments as `m.<name>` / `v.<name>` tensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for s in &self.slots {
            tensors.insert(format!("m.{}", s.name), s.m.clone());
            tensors.insert(format!("v.{}", s.name), s.v.clone());
        }
        candle_core::safetensors::save(&tensors, path)
            .with_context(|| format!("writing optimizer state {}", path.display()))
    }

    /// Restores moments written by [`AdamW::save`] and the step count.
    pub fn load(&mut self, path: &Path, step_t: u64) -> Result<()> {
        let device = match self.slots.first() {
            Some(s) => s.m.device().clone(),
            None => return Ok(()),
        };
        let mut tensors = candle_core::safetensors::load(path, &device)
            .with_context(|| format!("reading optimizer state {}", path.display()))?;
        for slot in self.slots.iter_mut() {
            for (kind, dst) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let key = format!("{kind}.{}", slot.name);
                let t = tensors.remove(&key).with_context(|| {
                    format!("optimizer state {}: missing tensor `{key}`", path.display())
                })?;
                if t.shape() != dst.shape() {
                    bail!(
                        "optimizer state {}: tensor `{key}` has shape {:?}, expected {:?}",
                        path.display(),
                        t.dims(),
                        dst.dims()
                    );
                }
                *dst = t;
            }
        }
        self.step_t = step_t;
        Ok(())
    }
}
