//! Writes a random-initialised model directory of any size: config.json,
//! model.safetensors, tokenizer.json, one adapter per modality, semantic
//! adapters, and the gate. Tests and benchmarks use it before (and beside)
//! the trained demo model; it has exactly the trained model's layout.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::adapters::peft::LoraAdapter;
use crate::adapters::{AdapterRole, Projection};
use crate::model::config::{Config, ModalitySpec, MoloraConfig};
use crate::model::tokenizer::build_default_tokenizer;
use crate::model::weights::write_random_model as write_random_weights;
use crate::routing::gate::{Gate, GateConfig};

/// Folder of a model directory that holds its adapters, one sub-folder each.
pub const ADAPTERS_DIR: &str = "adapters";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RandomModelSpec {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub text_vocab: usize,
    /// Codebook size of the image modality (and of each extra modality).
    pub image_codes: usize,
    /// Side of the square image grid: tokens_per_image = side².
    pub image_grid_side: usize,
    /// Modalities beyond text and image (e.g. "audio", "video"), each with
    /// its own code range of `image_codes` ids, for K > 2 benchmarks.
    pub extra_modalities: Vec<String>,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// Semantic adapters the gate chooses between.
    pub semantic_adapters: Vec<String>,
    pub gate_hidden: usize,
    pub gate_top_k: usize,
    pub max_position_embeddings: usize,
    /// Also write a small random VQ model (vq_config + vqgan.safetensors) so
    /// the service can turn image tokens into (noise) pictures.
    pub with_vq: bool,
    pub seed: u64,
}

impl Default for RandomModelSpec {
    /// The demo size: ~5M parameters (d = 256, 6 layers), rank-16 adapters.
    fn default() -> Self {
        Self {
            hidden_size: 256,
            num_layers: 6,
            num_heads: 4,
            num_kv_heads: 4,
            intermediate_size: 704,
            text_vocab: 1000,
            image_codes: 512,
            image_grid_side: 8,
            extra_modalities: vec![],
            lora_rank: 16,
            lora_alpha: 32.0,
            semantic_adapters: ["math", "code", "caption", "chat"]
                .map(String::from)
                .to_vec(),
            gate_hidden: 64,
            gate_top_k: 2,
            max_position_embeddings: 1024,
            with_vq: true,
            seed: 0,
        }
    }
}

/// Writes the model directory `dir` (created if needed) and returns its config.
pub fn write_random_model(dir: &Path, spec: &RandomModelSpec) -> Result<Config> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let (tokenizer, layout) = build_default_tokenizer(spec.text_vocab, spec.image_codes)?;
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("{}: cannot write tokenizer: {e}", dir.display()))?;

    // The specials sit at the start of the tokenizer's text range; the text
    // modality (what text mode may sample) starts after them.
    let specials = [layout.pad, layout.bos, layout.eos, layout.boi, layout.eoi];
    let text_start = specials
        .iter()
        .max()
        .map_or(layout.text_range.start, |&s| s + 1);
    let mut modalities = vec![
        ModalitySpec {
            name: "text".into(),
            token_range: Some([text_start, layout.text_range.end]),
        },
        ModalitySpec {
            name: "image".into(),
            token_range: Some([layout.image_range.start, layout.image_range.end]),
        },
    ];
    let mut vocab_size = layout.vocab_size;
    for name in &spec.extra_modalities {
        let start = vocab_size as u32;
        vocab_size += spec.image_codes;
        modalities.push(ModalitySpec {
            name: name.clone(),
            token_range: Some([start, vocab_size as u32]),
        });
    }
    let side = spec.image_grid_side;
    let vq_config = spec
        .with_vq
        .then(|| random_vq_config(side, spec.image_codes));
    let cfg = Config {
        model_type: "chameleon".into(),
        vocab_size,
        hidden_size: spec.hidden_size,
        intermediate_size: spec.intermediate_size,
        num_hidden_layers: spec.num_layers,
        num_attention_heads: spec.num_heads,
        num_key_value_heads: Some(spec.num_kv_heads),
        max_position_embeddings: spec.max_position_embeddings,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        hidden_act: "silu".into(),
        attention_bias: false,
        mlp_bias: false,
        swin_norm: false,
        tie_word_embeddings: false,
        qk_layernorm: true,
        bos_token_id: Some(layout.bos),
        eos_token_id: Some(layout.eos),
        pad_token_id: Some(layout.pad),
        vocabulary_map: Some(layout.vocabulary_map.clone()),
        vq_config: vq_config.clone(),
        molora: MoloraConfig {
            modalities,
            boi_token_id: Some(layout.boi),
            eoi_token_id: Some(layout.eoi),
            tokens_per_image: Some(side * side),
            image_grid: Some([side, side]),
        },
    };
    cfg.validate()
        .context("the random model spec gives an invalid config")?;
    write_random_weights(dir, &cfg, spec.seed)?;
    if let Some(v) = &vq_config {
        write_random_vq(dir, v)?;
    }

    let device = Device::Cpu;
    let adapters = dir.join(ADAPTERS_DIR);
    let roles = cfg
        .vocab()?
        .modalities
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                AdapterRole::Modality {
                    modality: m.name.clone(),
                },
            )
        })
        .chain(
            spec.semantic_adapters
                .iter()
                .map(|d| (d.clone(), AdapterRole::Semantic { domain: d.clone() })),
        )
        .collect::<Vec<_>>();
    for (i, (name, role)) in roles.into_iter().enumerate() {
        let adapter = LoraAdapter::random(
            &name,
            role,
            &cfg,
            spec.lora_rank,
            spec.lora_alpha,
            &Projection::ALL,
            spec.seed.wrapping_add(1 + i as u64),
            false,
            &device,
        )?;
        adapter.save(&adapters.join(&name))?;
    }
    if !spec.semantic_adapters.is_empty() {
        let gate_cfg = GateConfig {
            experts: spec.semantic_adapters.clone(),
            top_k: spec.gate_top_k,
            hidden_size: spec.gate_hidden,
            first_gated_layer: 0,
        };
        Gate::random(
            gate_cfg,
            spec.num_layers,
            spec.hidden_size,
            spec.seed ^ 0x9a7e,
            &device,
        )?
        .save(dir)?;
    }
    Ok(cfg)
}

/// A small VQ (weights from candle's unseeded CPU initialiser: only the
/// decoder weights and adapters are reproducible from the seed) whose code grid is `side` x `side` (three downsamplings of an
/// image 8·side pixels wide) over `codes` codebook entries.
fn random_vq_config(side: usize, codes: usize) -> serde_json::Value {
    serde_json::json!({
        "embed_dim": 4, "n_embed": codes, "z_channels": 4, "resolution": 8 * side,
        "ch": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_type": "none",
        "norm_num_groups": 4
    })
}

fn write_random_vq(dir: &Path, vq_json: &serde_json::Value) -> Result<()> {
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};

    use crate::engine::images::VQ_WEIGHTS_FILE;
    use crate::model::vq::{VqConfig, VqModel};

    let cfg = VqConfig::from_value(vq_json).context("the random VQ config is invalid")?;
    let vm = VarMap::new();
    VqModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let path = dir.join(VQ_WEIGHTS_FILE);
    vm.save(&path)
        .with_context(|| format!("{}: cannot write the random VQ", path.display()))
}
