//! The engine's KV caches: one pool, indexed by plain ids, lent to sequences
//! for their lifetime.
//!
//! Invariants:
//! - an id is lent to at most one sequence side at a time;
//! - a returned cache is cleared before it is lent again, and keeps its
//!   allocation, so a busy server stops allocating once warm;
//! - at most [`MAX_IDLE`] idle caches keep their memory; beyond that a
//!   returned cache is shrunk to nothing (the slot id stays reusable).

use anyhow::Result;

use crate::engine::runner::ModelRunner;
use crate::model::kv_cache::KvCache;

/// Idle caches that keep their allocation for reuse.
pub const MAX_IDLE: usize = 64;

pub struct CachePool {
    caches: Vec<KvCache>,
    /// Ids not lent to anyone, most recently returned last.
    free: Vec<usize>,
}

impl CachePool {
    pub fn new() -> Self {
        Self {
            caches: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Lends `n` empty caches.
    pub fn alloc(&mut self, n: usize, runner: &ModelRunner) -> Result<Vec<usize>> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            match self.free.pop() {
                Some(id) => ids.push(id),
                None => match runner.new_cache() {
                    Ok(cache) => {
                        self.caches.push(cache);
                        ids.push(self.caches.len() - 1);
                    }
                    Err(e) => {
                        self.release(&ids, runner);
                        return Err(e);
                    }
                },
            }
        }
        Ok(ids)
    }

    /// Takes caches back; they are cleared now, not when lent again, so a
    /// finished sequence's keys never linger.
    pub fn release(&mut self, ids: &[usize], runner: &ModelRunner) {
        for &id in ids {
            debug_assert!(!self.free.contains(&id), "cache {id} returned twice");
            if self.free.len() >= MAX_IDLE {
                if let Ok(empty) = runner.new_cache() {
                    self.caches[id] = empty;
                }
            }
            self.caches[id].clear();
            self.free.push(id);
        }
    }

    /// Caches lent out now.
    pub fn in_use(&self) -> usize {
        self.caches.len() - self.free.len()
    }

    /// The caches, for [`ModelRunner::forward`].
    pub fn caches_mut(&mut self) -> &mut [KvCache] {
        &mut self.caches
    }
}

impl Default for CachePool {
    fn default() -> Self {
        Self::new()
    }
}
