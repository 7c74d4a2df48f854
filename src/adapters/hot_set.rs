//! The hot set: adapters resident in preallocated slot tensors, vLLM style.
//!
//! For every (layer, projection) one [`SlotWeights`] holds all slots stacked:
//! A `[capacity + 1, max_rank, in]`, B `[capacity + 1, out, max_rank]`, and a
//! scale per slot. Activating an adapter copies it into a free slot with
//! `Tensor::slice_set`; nothing is ever reallocated.
//!
//! Invariants:
//! - slot 0 is the null adapter and is always zero (scale 0);
//! - slots never move: an adapter keeps its slot until it is unloaded or
//!   evicted, so a routing plan's slot ids stay valid while it is in use;
//! - a slot that holds no adapter is all zeros; an adapter of rank r < max_rank
//!   fills rows `0..r` of A and columns `0..r` of B, the rest stay zero, as do
//!   the projections it does not target;
//! - an adapter that is acquired (in-use count > 0) or pinned is never evicted;
//! - every registered adapter stays in the cold set (host memory) whether or
//!   not it is also hot, so eviction costs nothing but a later copy.
//!
//! [`SlotWeights::scale`] is host memory: hold `&SlotWeights` from
//! [`HotSet::weights`], not clones, so scale updates are seen.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};

use super::peft::LoraAdapter;
use super::{AdapterRole, Projection, SlotId, NULL_SLOT};
use crate::dispatch::SlotWeights;
use crate::model::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotSetConfig {
    /// Adapter slots, not counting the null slot 0.
    pub capacity: usize,
    /// Largest adapter rank a slot holds; smaller ranks are zero-padded.
    pub max_rank: usize,
}

/// One slot as the status endpoint shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    pub slot: SlotId,
    pub adapter: Option<String>,
    pub rank: usize,
    pub in_use: usize,
    pub pinned: bool,
}

/// Bookkeeping of one slot (index = slot id).
#[derive(Debug, Clone, Default)]
struct Slot {
    adapter: Option<String>,
    rank: usize,
    in_use: usize,
    pinned: bool,
    /// Last-use stamp: its key in [`HotSet::lru`].
    stamp: u64,
}

#[derive(Debug)]
pub struct HotSet {
    cfg: HotSetConfig,
    num_layers: usize,
    /// `(in, out)` per projection, indexed by `Projection as usize`.
    shapes: [(usize, usize); 7],
    device: Device,
    /// Indexed by `layer * 7 + projection`.
    weights: Vec<SlotWeights>,
    /// Every registered adapter (the cold set), on the host.
    adapters: HashMap<String, LoraAdapter>,
    hot: HashMap<String, SlotId>,
    slots: Vec<Slot>,
    /// Free slot ids; popped from the end, so the lowest id goes first.
    free: Vec<SlotId>,
    /// Occupied slots ordered by last use, oldest first.
    lru: BTreeMap<u64, SlotId>,
    clock: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

impl HotSet {
    /// Preallocates zeroed slot weights for every (layer, projection).
    pub fn new(model_cfg: &Config, cfg: HotSetConfig, device: &Device) -> Result<Self> {
        if cfg.max_rank == 0 {
            bail!("hot set max_rank must be at least 1");
        }
        if cfg.capacity >= SlotId::MAX as usize {
            bail!(
                "hot set capacity {} is too large (at most {})",
                cfg.capacity,
                SlotId::MAX - 1
            );
        }
        let n = cfg.capacity + 1;
        let shapes = Projection::ALL.map(|p| p.shape(model_cfg));
        let mut weights = Vec::with_capacity(model_cfg.num_hidden_layers * 7);
        for _ in 0..model_cfg.num_hidden_layers {
            for &(fan_in, fan_out) in &shapes {
                weights.push(SlotWeights {
                    a: Tensor::zeros((n, cfg.max_rank, fan_in), DType::F32, device)?,
                    b: Tensor::zeros((n, fan_out, cfg.max_rank), DType::F32, device)?,
                    scale: vec![0.0; n],
                });
            }
        }
        Ok(Self {
            cfg,
            num_layers: model_cfg.num_hidden_layers,
            shapes,
            device: device.clone(),
            weights,
            adapters: HashMap::new(),
            hot: HashMap::new(),
            slots: vec![Slot::default(); n],
            free: (1..n as SlotId).rev().collect(),
            lru: BTreeMap::new(),
            clock: 0,
            hits: 0,
            misses: 0,
            evictions: 0,
        })
    }

    pub fn config(&self) -> HotSetConfig {
        self.cfg
    }

    /// Slots including the null slot: `capacity + 1`.
    pub fn num_slots(&self) -> usize {
        self.cfg.capacity + 1
    }

    /// The stacked slot weights of one projection.
    ///
    /// # Panics
    /// If `layer` is not below the model's `num_hidden_layers` (a caller bug,
    /// like indexing past a slice).
    pub fn weights(&self, layer: usize, proj: Projection) -> &SlotWeights {
        assert!(
            layer < self.num_layers,
            "layer {layer} out of {}",
            self.num_layers
        );
        &self.weights[layer * 7 + proj as usize]
    }

    /// Adds an adapter to the cold set (moved to host memory). Its name must
    /// be new, its rank at most `max_rank`, its shapes this model's.
    pub fn register(&mut self, adapter: LoraAdapter) -> Result<()> {
        let name = &adapter.name;
        if name.is_empty() {
            bail!("adapter name is empty");
        }
        if self.adapters.contains_key(name) {
            bail!("adapter {name:?} is already registered");
        }
        if adapter.rank() > self.cfg.max_rank {
            bail!(
                "adapter {name:?} has rank {}, above the hot set's max_rank {}",
                adapter.rank(),
                self.cfg.max_rank
            );
        }
        let r = adapter.rank();
        let mut host = adapter.clone();
        for (&(layer, proj), pair) in host.weights.iter_mut() {
            let (fan_in, fan_out) = self.shapes[proj as usize];
            if layer >= self.num_layers {
                bail!(
                    "adapter {name:?}: layer {layer} is beyond the model's {} layers",
                    self.num_layers
                );
            }
            if pair.a.dims() != [r, fan_in] || pair.b.dims() != [fan_out, r] {
                bail!(
                    "adapter {name:?}: layer {layer} {}: A {:?} and B {:?} do not fit this \
                     model (expected [{r}, {fan_in}] and [{fan_out}, {r}])",
                    proj.module_name(),
                    pair.a.dims(),
                    pair.b.dims()
                );
            }
            pair.a = pair.a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            pair.b = pair.b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        }
        self.adapters.insert(host.name.clone(), host);
        Ok(())
    }

    /// Removes an adapter from the hot and cold sets; refused while it is in
    /// use or pinned.
    pub fn unregister(&mut self, name: &str) -> Result<LoraAdapter> {
        self.unload(name)?;
        self.adapters
            .remove(name)
            .ok_or_else(|| unknown_adapter(name))
    }

    /// The slot of `name`, copying it in (evicting the least recently used
    /// idle adapter if no slot is free) when it is not hot. Counts one use;
    /// pair with [`HotSet::release`].
    pub fn acquire(&mut self, name: &str) -> Result<SlotId> {
        let slot = self.make_hot(name)?;
        self.slots[slot as usize].in_use += 1;
        Ok(slot)
    }

    /// Ends one use begun by [`HotSet::acquire`].
    pub fn release(&mut self, name: &str) -> Result<()> {
        let slot = self.hot_slot(name)?;
        let s = &mut self.slots[slot as usize];
        if s.in_use == 0 {
            bail!("adapter {name:?} released more often than acquired");
        }
        s.in_use -= 1;
        Ok(())
    }

    /// Makes `name` hot and keeps it there until [`HotSet::unpin`].
    pub fn pin(&mut self, name: &str) -> Result<SlotId> {
        let slot = self.make_hot(name)?;
        self.slots[slot as usize].pinned = true;
        Ok(slot)
    }

    pub fn unpin(&mut self, name: &str) -> Result<()> {
        self.check_registered(name)?;
        if let Some(&slot) = self.hot.get(name) {
            self.slots[slot as usize].pinned = false;
        }
        Ok(())
    }

    /// Frees the slot of `name` (it stays in the cold set). Refused while it
    /// is in use or pinned; a no-op when it is not hot.
    pub fn unload(&mut self, name: &str) -> Result<()> {
        self.check_registered(name)?;
        let Some(&slot) = self.hot.get(name) else {
            return Ok(());
        };
        let s = &self.slots[slot as usize];
        if s.in_use > 0 {
            bail!("adapter {name:?} is in use by {} requests", s.in_use);
        }
        if s.pinned {
            bail!("adapter {name:?} is pinned; unpin it first");
        }
        self.free_slot(slot)
    }

    pub fn slot_of(&self, name: &str) -> Option<SlotId> {
        self.hot.get(name).copied()
    }

    pub fn role_of(&self, name: &str) -> Option<&AdapterRole> {
        self.adapters.get(name).map(|a| a.role())
    }

    pub fn adapter(&self, name: &str) -> Option<&LoraAdapter> {
        self.adapters.get(name)
    }

    /// Every registered adapter, hot or not, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.adapters.keys().cloned().collect();
        names.sort();
        names
    }

    /// Registered adapters that hold no slot, sorted.
    pub fn cold_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .adapters
            .keys()
            .filter(|n| !self.hot.contains_key(*n))
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The adapter slots `1..=capacity` (the null slot is left out).
    pub fn status(&self) -> Vec<SlotStatus> {
        (1..self.slots.len())
            .map(|i| {
                let s = &self.slots[i];
                SlotStatus {
                    slot: i as SlotId,
                    adapter: s.adapter.clone(),
                    rank: s.rank,
                    in_use: s.in_use,
                    pinned: s.pinned,
                }
            })
            .collect()
    }

    /// Acquires and pins that found their adapter already hot.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Acquires and pins that had to copy their adapter into a slot.
    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// Adapters pushed back to the cold set to free a slot.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    fn check_registered(&self, name: &str) -> Result<()> {
        if self.adapters.contains_key(name) {
            Ok(())
        } else {
            Err(unknown_adapter(name))
        }
    }

    fn hot_slot(&self, name: &str) -> Result<SlotId> {
        self.check_registered(name)?;
        self.hot
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("adapter {name:?} is not loaded in the hot set"))
    }

    /// The slot of `name`, loading it if needed; marks it most recently used.
    fn make_hot(&mut self, name: &str) -> Result<SlotId> {
        self.check_registered(name)?;
        let slot = match self.hot.get(name) {
            Some(&slot) => {
                self.hits += 1;
                slot
            }
            None => {
                let slot = match self.free.pop() {
                    Some(slot) => slot,
                    None => self.evict_lru()?,
                };
                if let Err(e) = self.write_slot(slot, name) {
                    // Leave no half-written adapter behind.
                    self.zero_slot(slot)?;
                    self.free.push(slot);
                    return Err(e);
                }
                self.misses += 1;
                self.hot.insert(name.to_string(), slot);
                self.slots[slot as usize] = Slot {
                    adapter: Some(name.to_string()),
                    rank: self.adapters[name].rank(),
                    ..Slot::default()
                };
                slot
            }
        };
        self.touch(slot);
        Ok(slot)
    }

    fn touch(&mut self, slot: SlotId) {
        let s = &mut self.slots[slot as usize];
        self.lru.remove(&s.stamp); // stamp 0 (never used) is in no entry
        self.clock += 1;
        s.stamp = self.clock;
        self.lru.insert(self.clock, slot);
    }

    /// Frees the least recently used slot that is neither in use nor pinned.
    fn evict_lru(&mut self) -> Result<SlotId> {
        let victim = self.lru.values().copied().find(|&slot| {
            let s = &self.slots[slot as usize];
            s.in_use == 0 && !s.pinned
        });
        let Some(slot) = victim else {
            bail!(
                "hot set full: {} slots all in use (acquired or pinned)",
                self.cfg.capacity
            );
        };
        self.vacate(slot)?;
        self.evictions += 1;
        Ok(slot)
    }

    /// Empties a slot and returns it to the free list.
    fn free_slot(&mut self, slot: SlotId) -> Result<()> {
        self.vacate(slot)?;
        self.free.push(slot);
        Ok(())
    }

    /// Zeroes a slot and forgets its adapter, which goes back to being only
    /// cold. The caller decides what becomes of the slot.
    fn vacate(&mut self, slot: SlotId) -> Result<()> {
        self.zero_slot(slot)?;
        let s = std::mem::take(&mut self.slots[slot as usize]);
        self.lru.remove(&s.stamp);
        if let Some(name) = s.adapter {
            self.hot.remove(&name);
        }
        Ok(())
    }

    /// Copies adapter `name` into `slot` for every (layer, projection),
    /// zero-padded to `max_rank`; projections it does not target get zeros.
    fn write_slot(&mut self, slot: SlotId, name: &str) -> Result<()> {
        debug_assert_ne!(slot, NULL_SLOT);
        let adapter = &self.adapters[name];
        let (r, max_rank, scale) = (adapter.rank(), self.cfg.max_rank, adapter.scale());
        for layer in 0..self.num_layers {
            for proj in Projection::ALL {
                let w = &mut self.weights[layer * 7 + proj as usize];
                let (fan_in, fan_out) = self.shapes[proj as usize];
                let (a, b, s) = match adapter.weights.get(&(layer, proj)) {
                    Some(pair) => (
                        pair.a
                            .to_device(&self.device)?
                            .pad_with_zeros(0, 0, max_rank - r)?,
                        pair.b
                            .to_device(&self.device)?
                            .pad_with_zeros(1, 0, max_rank - r)?,
                        scale,
                    ),
                    None => (
                        Tensor::zeros((max_rank, fan_in), DType::F32, &self.device)?,
                        Tensor::zeros((fan_out, max_rank), DType::F32, &self.device)?,
                        0.0,
                    ),
                };
                w.a.slice_set(&a.unsqueeze(0)?.contiguous()?, 0, slot as usize)?;
                w.b.slice_set(&b.unsqueeze(0)?.contiguous()?, 0, slot as usize)?;
                w.scale[slot as usize] = s;
            }
        }
        Ok(())
    }

    fn zero_slot(&mut self, slot: SlotId) -> Result<()> {
        let max_rank = self.cfg.max_rank;
        for (i, w) in self.weights.iter_mut().enumerate() {
            let (fan_in, fan_out) = self.shapes[i % 7];
            let a = Tensor::zeros((1, max_rank, fan_in), DType::F32, &self.device)?;
            let b = Tensor::zeros((1, fan_out, max_rank), DType::F32, &self.device)?;
            w.a.slice_set(&a, 0, slot as usize)?;
            w.b.slice_set(&b, 0, slot as usize)?;
            w.scale[slot as usize] = 0.0;
        }
        Ok(())
    }
}

fn unknown_adapter(name: &str) -> anyhow::Error {
    anyhow!("unknown adapter {name:?}: it is not registered")
}
