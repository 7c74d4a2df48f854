//! LoRA adapters: PEFT files on disk ([`peft`]) and the hot set of
//! preallocated slots the forward pass reads ([`hot_set`]).

pub mod hot_set;
pub mod peft;

#[cfg(test)]
mod hot_set_tests;
#[cfg(test)]
mod tests;

pub use hot_set::{HotSet, HotSetConfig, SlotStatus};
pub use peft::{resolve_adapter_dir, AdapterConfig, LoraAdapter, LoraPair};

use serde::{Deserialize, Serialize};

/// Index of a hot-set slot. Slot 0 is the null adapter (all zeros).
pub type SlotId = u16;
pub const NULL_SLOT: SlotId = 0;

/// The seven projections of a Chameleon decoder layer that adapters target,
/// named as in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Projection::QProj,
        Projection::KProj,
        Projection::VProj,
        Projection::OProj,
        Projection::GateProj,
        Projection::UpProj,
        Projection::DownProj,
    ];

    /// The module name PEFT's `target_modules` uses ("q_proj", ...).
    pub fn module_name(self) -> &'static str {
        match self {
            Projection::QProj => "q_proj",
            Projection::KProj => "k_proj",
            Projection::VProj => "v_proj",
            Projection::OProj => "o_proj",
            Projection::GateProj => "gate_proj",
            Projection::UpProj => "up_proj",
            Projection::DownProj => "down_proj",
        }
    }

    pub fn from_module_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.module_name() == name)
    }

    /// Checkpoint path of this projection in layer `layer`, e.g.
    /// `model.layers.3.self_attn.q_proj`.
    pub fn module_path(self, layer: usize) -> String {
        let block = match self {
            Projection::QProj | Projection::KProj | Projection::VProj | Projection::OProj => {
                "self_attn"
            }
            _ => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.module_name())
    }

    /// (in_features, out_features) of this projection in a model.
    pub fn shape(self, cfg: &crate::model::config::Config) -> (usize, usize) {
        let d = cfg.hidden_size;
        let kv = cfg.num_kv_heads() * cfg.head_dim();
        match self {
            Projection::QProj | Projection::OProj => (d, d),
            Projection::KProj | Projection::VProj => (d, kv),
            Projection::GateProj | Projection::UpProj => (d, cfg.intermediate_size),
            Projection::DownProj => (cfg.intermediate_size, d),
        }
    }
}

/// What an adapter is for: molora's metadata beside PEFT's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdapterRole {
    /// Serves every token of one modality ("text", "image", ...), chosen by the
    /// vocabulary-range router.
    Modality { modality: String },
    /// Serves a semantic domain ("math", "code", ...), chosen per token by the
    /// learned gate.
    Semantic { domain: String },
}
