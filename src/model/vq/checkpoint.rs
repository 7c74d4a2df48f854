//! Loading VQ weights from safetensors with errors that name the tensor.
//!
//! The model's constructor asks for every tensor by its taming name and
//! shape; [`CheckedTensors`] answers from the file's tensors and refuses a
//! missing name, a wrong shape or a non-finite value with a message naming
//! the tensor. Tensors the model does not ask for (a taming `.ckpt` also
//! carries the GAN discriminator under `loss.*`) are ignored.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// A VarBuilder backend over a loaded safetensors file, with a prefix that
/// the file's names carry in front of taming's (e.g. `model.vqmodel.`).
pub struct CheckedTensors {
    tensors: HashMap<String, Tensor>,
    prefix: String,
}

impl CheckedTensors {
    /// Reads every tensor of `path` (safetensors) onto `device`.
    pub fn read(path: &Path, prefix: &str, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading VQ checkpoint {}", path.display()))?;
        Ok(Self {
            tensors,
            prefix: prefix.to_string(),
        })
    }

    /// Answers from tensors already in memory (names carrying `prefix`).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, prefix: &str) -> Self {
        Self {
            tensors,
            prefix: prefix.to_string(),
        }
    }

    pub fn into_var_builder(self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), DType::F32, device.clone())
    }

    fn full_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().all(|v| v.is_finite()))
}

impl SimpleBackend for CheckedTensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let full = self.full_name(name);
        let t = self.tensors.get(&full).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "missing tensor `{full}` (expected shape {:?})",
                s.dims()
            ))
        })?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor `{full}` has shape {:?}, expected {:?}",
                t.dims(),
                s.dims()
            );
        }
        if !all_finite(t)? {
            candle_core::bail!("tensor `{full}` holds non-finite values");
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let full = self.full_name(name);
        let t = self
            .tensors
            .get(&full)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{full}`")))?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(&self.full_name(name))
    }
}
