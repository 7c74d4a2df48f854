//! Adapter management on the engine thread, between steps (list, load,
//! unload), and the model description the handles publish.
//!
//! Invariants:
//! - a load validates the folder (inside the adapter folder, shapes against
//!   the model, finite values) before anything changes: a bad adapter is an
//!   error and the engine keeps serving with what it had;
//! - an adapter a running sequence holds is never unloaded or replaced;
//! - after every change the catalog the handles check requests against is
//!   republished.

use anyhow::{anyhow, Context, Result};

use super::engine::Engine;
use super::handle::{
    AdapterCommand, AdapterInfo, AdapterReply, ModalityInfo, ModelAdapter, ModelInfo, VocabSummary,
};
use crate::adapters::peft::{resolve_adapter_dir, LoraAdapter};
use crate::adapters::SlotId;
use crate::engine::runner::ModelRunner;

/// Adapter management, between steps.
impl Engine {
    pub(super) fn adapter_command(&mut self, cmd: AdapterCommand) -> Result<AdapterReply> {
        let reply = match cmd {
            AdapterCommand::List => AdapterReply::Status(self.adapter_status()),
            AdapterCommand::Load { name } => {
                let slot = self.load_adapter(&name)?;
                AdapterReply::Loaded { name, slot }
            }
            AdapterCommand::Unload { name } => {
                self.unload_adapter(&name)?;
                AdapterReply::Unloaded { name }
            }
        };
        Ok(reply)
    }

    fn adapter_status(&self) -> Vec<AdapterInfo> {
        let hot = &self.runner.hot_set;
        let slots = hot.status();
        hot.names()
            .into_iter()
            .filter_map(|name| {
                let adapter = hot.adapter(&name)?;
                let slot = hot.slot_of(&name);
                let s = slot.and_then(|id| slots.iter().find(|s| s.slot == id));
                Some(AdapterInfo {
                    role: adapter.role().clone(),
                    rank: adapter.rank(),
                    slot,
                    in_use: s.map_or(0, |s| s.in_use),
                    pinned: s.is_some_and(|s| s.pinned),
                    name,
                })
            })
            .collect()
    }

    /// Reads `<adapter_dir>/<name>`, validates it against the model, registers
    /// it (replacing an idle adapter of that name) and makes it hot.
    fn load_adapter(&mut self, name: &str) -> Result<SlotId> {
        let root = self
            .runner
            .adapter_dir
            .clone()
            .ok_or_else(|| anyhow!("no adapter folder is configured"))?;
        let dir = resolve_adapter_dir(&root, name)?;
        let cfg = self.runner.decoder.config().clone();
        let mut adapter = LoraAdapter::load(&dir, &cfg, self.runner.decoder.device())
            .with_context(|| format!("adapter {name:?} in {} was refused", root.display()))?;
        adapter.name = name.to_string();
        if self.runner.hot_set.role_of(name).is_some() {
            self.check_idle(name, "reloaded")?;
            self.runner.hot_set.unregister(name)?;
        }
        self.runner.hot_set.register(adapter)?;
        self.publish_info();
        // Acquire and release: the adapter becomes hot without being held.
        let slot = self.runner.hot_set.acquire(name).with_context(|| {
            format!("adapter {name:?} is registered but not hot (it loads when a request needs it)")
        })?;
        self.runner.hot_set.release(name)?;
        Ok(slot)
    }

    fn unload_adapter(&mut self, name: &str) -> Result<()> {
        if self.runner.hot_set.role_of(name).is_none() {
            return Err(anyhow!("unknown adapter {name:?}: it is not registered"));
        }
        self.check_idle(name, "unloaded")?;
        self.runner.hot_set.unregister(name)?;
        self.publish_info();
        Ok(())
    }

    fn check_idle(&self, name: &str, what: &str) -> Result<()> {
        let users = self
            .running
            .iter()
            .filter(|s| s.adapters.acquired.iter().any(|a| a == name))
            .count();
        if users > 0 {
            return Err(anyhow!(
                "adapter {name:?} is in use by {users} running request(s) and cannot be {what} now; retry when they finish"
            ));
        }
        Ok(())
    }

    fn publish_info(&self) {
        let info = model_info(&self.runner, self.vq.is_some());
        *self.shared.info.write().unwrap_or_else(|p| p.into_inner()) = info;
    }
}

/// What the model serves, from the runner's current state.
pub(super) fn model_info(runner: &ModelRunner, has_vq: bool) -> ModelInfo {
    let name = runner
        .model_dir
        .as_ref()
        .and_then(|d| d.canonicalize().ok().or_else(|| Some(d.clone())))
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "molora".into());
    let v = &runner.vocab;
    let vocab = VocabSummary {
        vocab_size: v.vocab_size,
        modalities: v
            .modalities
            .iter()
            .map(|m| ModalityInfo {
                name: m.name.clone(),
                start: m.range.start,
                end: m.range.end,
            })
            .collect(),
        bos: v.bos,
        eos: v.eos,
        boi: v.boi,
        eoi: v.eoi,
        tokens_per_image: v.tokens_per_image,
        image_grid: v.image_grid,
    };
    let hot = &runner.hot_set;
    let adapters = hot
        .names()
        .into_iter()
        .filter_map(|n| {
            let a = hot.adapter(&n)?;
            Some(ModelAdapter {
                role: a.role().clone(),
                rank: a.rank(),
                parent: name.clone(),
                name: n,
            })
        })
        .collect();
    ModelInfo {
        vocab,
        adapters,
        gate_experts: runner
            .gate
            .as_ref()
            .map(|g| g.config.experts.clone())
            .unwrap_or_default(),
        has_vq,
        hot_set_capacity: hot.config().capacity,
        name,
    }
}
