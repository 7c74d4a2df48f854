//! The key/value cache of one sequence, owned by the engine and passed into
//! each forward.
//!
//! Layout per layer: token-major `[capacity, kv_heads · head_dim]`, so that
//! appending a token is one contiguous write and growing keeps the prefix in
//! place. Invariants:
//! - positions `0..len` hold valid keys (after q/k norm and RoPE) and values;
//! - capacity grows in chunks of [`GROW_CHUNK`] tokens (or by half, whichever
//!   is more), never per step;
//! - a forward writes its rows at `len..len + n` in every layer and only then
//!   advances `len`, so a failed forward leaves the cache as it was.
//!
//! On the CPU the buffers are plain vectors the host kernels write directly;
//! on other devices they are tensors written with `slice_set`.

use candle_core::{DType, Device, Error, Result, Tensor};

use super::config::Config;
use super::norms::host_vec;

/// Tokens added per growth step (at least).
pub const GROW_CHUNK: usize = 128;

#[derive(Debug, Clone)]
enum LayerKv {
    Host { k: Vec<f32>, v: Vec<f32> },
    Device { k: Tensor, v: Tensor },
}

#[derive(Debug, Clone)]
pub struct KvCache {
    len: usize,
    capacity: usize,
    kv_dim: usize,
    device: Device,
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache; memory is allocated on the first forward.
    pub fn new(cfg: &Config, device: &Device) -> Result<Self> {
        Self::with_capacity(cfg, device, 0)
    }

    /// A cache with room for `tokens` tokens before it has to grow.
    pub fn with_capacity(cfg: &Config, device: &Device, tokens: usize) -> Result<Self> {
        let kv_dim = cfg.num_kv_heads() * cfg.head_dim();
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok(if device.is_cpu() {
                    LayerKv::Host {
                        k: Vec::new(),
                        v: Vec::new(),
                    }
                } else {
                    let empty = Tensor::zeros((0, kv_dim), DType::F32, device)?;
                    LayerKv::Device {
                        k: empty.clone(),
                        v: empty,
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut cache = Self {
            len: 0,
            capacity: 0,
            kv_dim,
            device: device.clone(),
            layers,
        };
        cache.grow_to(tokens)?;
        Ok(cache)
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens that fit before the next growth.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Forgets every token; keeps the memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `len` tokens (no-op when `len >= self.len()`).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `extra` tokens after `len`.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return Ok(());
        }
        let target = needed.max(self.capacity + self.capacity / 2);
        self.grow_to(target.div_ceil(GROW_CHUNK) * GROW_CHUNK)
    }

    fn grow_to(&mut self, capacity: usize) -> Result<()> {
        if capacity <= self.capacity {
            return Ok(());
        }
        let (kv_dim, len) = (self.kv_dim, self.len);
        for layer in &mut self.layers {
            match layer {
                LayerKv::Host { k, v } => {
                    k.resize(capacity * kv_dim, 0.0);
                    v.resize(capacity * kv_dim, 0.0);
                }
                LayerKv::Device { k, v } => {
                    for t in [k, v] {
                        let bigger = Tensor::zeros((capacity, kv_dim), DType::F32, &self.device)?;
                        if len > 0 {
                            bigger.slice_set(&t.narrow(0, 0, len)?.contiguous()?, 0, 0)?;
                        }
                        *t = bigger;
                    }
                }
            }
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Counts the `n` tokens every layer has written at `len..len + n`.
    pub(crate) fn advance(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.capacity);
        self.len += n;
    }

    /// Host buffers of a layer, `[capacity · kv_dim]` each (CPU caches only).
    pub(crate) fn host_layer_mut(&mut self, layer: usize) -> Result<(&mut [f32], &mut [f32])> {
        match self.layers.get_mut(layer) {
            Some(LayerKv::Host { k, v }) => Ok((k, v)),
            Some(LayerKv::Device { .. }) => Err(Error::Msg(
                "host kernels need a KV cache created on the CPU device".into(),
            )),
            None => Err(Error::Msg(format!("the KV cache has no layer {layer}"))),
        }
    }

    /// Writes `[n, kv_dim]` keys and values at positions `len..len + n` of a
    /// layer (room must have been reserved).
    pub(crate) fn write_layer(
        &mut self,
        layer: usize,
        k_new: &Tensor,
        v_new: &Tensor,
    ) -> Result<()> {
        let (n, _) = k_new.dims2()?;
        let (start, kv_dim) = (self.len, self.kv_dim);
        if start + n > self.capacity {
            return Err(Error::Msg(
                "KV cache write past its reserved capacity".into(),
            ));
        }
        match self.layers.get_mut(layer) {
            Some(LayerKv::Host { k, v }) => {
                k[start * kv_dim..(start + n) * kv_dim].copy_from_slice(&host_vec(k_new)?);
                v[start * kv_dim..(start + n) * kv_dim].copy_from_slice(&host_vec(v_new)?);
                Ok(())
            }
            Some(LayerKv::Device { k, v }) => {
                k.slice_set(&k_new.contiguous()?, 0, start)?;
                v.slice_set(&v_new.contiguous()?, 0, start)
            }
            None => Err(Error::Msg(format!("the KV cache has no layer {layer}"))),
        }
    }

    /// Keys and values of positions `0..upto` of a layer, `[upto, kv_dim]` each.
    pub(crate) fn layer_prefix(&self, layer: usize, upto: usize) -> Result<(Tensor, Tensor)> {
        let kv_dim = self.kv_dim;
        match self.layers.get(layer) {
            Some(LayerKv::Host { k, v }) => Ok((
                Tensor::from_slice(&k[..upto * kv_dim], (upto, kv_dim), &self.device)?,
                Tensor::from_slice(&v[..upto * kv_dim], (upto, kv_dim), &self.device)?,
            )),
            Some(LayerKv::Device { k, v }) => Ok((k.narrow(0, 0, upto)?, v.narrow(0, 0, upto)?)),
            None => Err(Error::Msg(format!("the KV cache has no layer {layer}"))),
        }
    }
}
