//! The pipeline's settings: the sizes and schedules of every stage, the
//! named presets (`demo`, the shipped model; `tiny`, the smoke test;
//! `probe`, a speed probe) and the JSON files that hold a whole config.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::data::Domain;
use super::looping::Schedule;
use super::pipeline::ADAPTERS;
use crate::model::vq::VqConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderSize {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// BPE target size (specials and bytes included).
    pub text_vocab: usize,
    /// Items of the tokenizer's training corpus.
    pub corpus_items: usize,
    pub vq: VqConfig,
    pub vq_steps: u64,
    pub vq_batch: usize,
    pub vq_learning_rate: f64,
    /// Extra reconstruction weight of shape pixels
    /// ([`crate::train::vq_train::VqTrainConfig::foreground_weight`]).
    #[serde(default)]
    pub vq_foreground_weight: f64,
    /// After training, codes within this L2 distance of a more-used code
    /// take its vector (0: none); see `train::vq_train::merge`.
    #[serde(default)]
    pub vq_merge_distance: f32,
    /// Weight of the VQ's context loss (see `train::vq_train::losses`):
    /// batches become pairs of scenes that differ in one shape, and equal
    /// patches are pulled to equal latents (0: plain batches).
    #[serde(default)]
    pub vq_context_weight: f64,
    /// Weight of the VQ's shape loss (see `train::vq_train::losses`): a few
    /// latent channels must name the shape each cell belongs to (0: off).
    #[serde(default)]
    pub vq_shape_weight: f64,
    /// Weight of the VQ's colour loss: the next latent channels must name
    /// each cell's colour, so that every code says its colour (0: off).
    #[serde(default)]
    pub vq_colour_weight: f64,
    /// Steps of the `vq_decoder` stage (0: skipped): the decoder alone, on
    /// the merged codes.
    #[serde(default)]
    pub vq_decoder_steps: u64,
    pub decoder: DecoderSize,
    /// Packed batch: rows of `batch_len` tokens.
    pub batch_rows: usize,
    pub batch_len: usize,
    /// Loss weight of prompt targets (answers weigh 1).
    pub base_prompt_weight: f32,
    pub adapter_prompt_weight: f32,
    pub base: Schedule,
    /// The modality adapters (text, image).
    pub adapter: Schedule,
    /// The semantic adapters (math, code, caption): their domains are a
    /// small share of every batch's loss, so they move slower.
    pub semantic_adapter: Schedule,
    pub gate: Schedule,
    /// Steps of one adapter where they differ from its schedule's.
    #[serde(default)]
    pub adapter_steps: BTreeMap<String, u64>,
    /// Peak learning rate of one adapter where it differs from its
    /// schedule's.
    #[serde(default)]
    pub adapter_learning_rates: BTreeMap<String, f64>,
    /// How much more (or less) of each mixed-request kind an adapter's data
    /// holds than `pipeline::mixture_for` gives it (1 = as given).
    #[serde(default)]
    pub adapter_mixed_weights: BTreeMap<String, f64>,
    /// Text domains only their semantic adapter learns ([`stage_data`]):
    /// the base, the modality adapters and the other semantic adapters see
    /// them in context but never as targets, so the skill lives in one
    /// LoRA, which a per-sequence server cannot combine with another.
    #[serde(default)]
    pub adapter_only_domains: Vec<Domain>,
    /// Text domains whose own skill (a segment's `skill` ranges,
    /// [`crate::train::data::Segment`]) only their semantic adapter
    /// learns. Arithmetic: the text that chains one step of a worked sum to
    /// the next (" then *3", ". 19*3: "); the base learns every digit
    /// column, so alone it stops after one step. Caption: the answers
    /// about shapes ("a square has 4 sides"). Session 18 named this
    /// `adapter_only_multi_step`, still read.
    #[serde(default, alias = "adapter_only_multi_step")]
    pub adapter_only_skills: Vec<Domain>,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub gate_hidden: usize,
    pub gate_top_k: usize,
    /// Layers before this one carry no semantic adapter, in training as in
    /// serving (written to `gate_config.json`): the first layer's gate sees
    /// only the token's embedding, so it misroutes where the later layers,
    /// which see the context, do not (README, "Skills that live in one
    /// adapter"). The semantic LoRAs' weights there stay at zero.
    #[serde(default)]
    pub first_gated_layer: usize,
    /// Train the decoder with the fused kernels of `train::fused` (same
    /// function, ~1.4x the step speed, different float rounding: a model
    /// trained either way reproduces only under the same setting).
    #[serde(default)]
    pub fused_ops: bool,
}

impl PipelineConfig {
    /// The shipped demo model: about 90 minutes on this 2-core machine (vq
    /// ~0.73 s/step, vq_decoder ~0.63, base ~0.40 with the fused kernels,
    /// adapters ~0.6-0.7, gate ~0.3; README, "Training the demo model").
    /// The base gets most of the budget; the 2,500 decoder-only steps on the
    /// merged codes cost it nothing (its codes do not move) and take the
    /// colour-loss VQ's shapes read back from 56% to 92%.
    /// Session 19's recipe; the shipped run reused session 15's VQ stages
    /// and session 18's base, text and image stages (the same in this
    /// recipe as in theirs).
    pub fn demo() -> Self {
        let sched = |steps, lr, warmup| Schedule {
            steps,
            learning_rate: lr,
            min_lr_fraction: 0.1,
            warmup_steps: warmup,
            weight_decay: 0.0,
            checkpoint_every: 100,
        };
        Self {
            text_vocab: 1000,
            corpus_items: 4000,
            vq: serde_json::from_str(include_str!("../../configs/vq_demo_small.json"))
                .expect("configs/vq_demo_small.json is a valid VQ config"),
            vq_steps: 1000,
            vq_batch: 16,
            vq_learning_rate: 1e-3,
            vq_foreground_weight: 5.0,
            vq_merge_distance: 0.5,
            vq_context_weight: 2.0,
            vq_shape_weight: 0.3,
            vq_colour_weight: 0.3,
            vq_decoder_steps: 2500,
            decoder: DecoderSize {
                hidden_size: 256,
                num_layers: 4,
                num_heads: 4,
                intermediate_size: 704,
                max_position_embeddings: 1024,
            },
            batch_rows: 4,
            batch_len: 256,
            base_prompt_weight: 0.3,
            adapter_prompt_weight: 0.1,
            base: sched(4000, 1.5e-3, 100),
            // At 2e-3 the text, image and caption LoRAs ended worse than the
            // base on held-out tokens (session 12): a base this close to its
            // data leaves adapters small corrections, which a large step
            // overshoots.
            adapter: sched(120, 5e-4, 10),
            semantic_adapter: sched(250, 5e-4, 10),
            gate: sched(200, 3e-3, 10),
            // The base alone already writes every program right (held-out
            // loss 0.0002 nats): the code LoRA needs few steps to beat it.
            // The image and math LoRAs keep gaining on held-out tokens past
            // their group's default (session 12: image 0.2538 -> 0.2498,
            // math 0.0167 -> 0.0147 nats). The math LoRA learns the chaining
            // of two-step sums from nothing (`adapter_only_skills`), so it
            // gets the most steps and twice the rate.
            adapter_steps: BTreeMap::from([
                ("code".to_string(), 100),
                ("image".to_string(), 360),
                ("math".to_string(), 1100),
            ]),
            adapter_learning_rates: BTreeMap::from([("math".to_string(), 1e-3)]),
            // The math LoRA chains sums asked alone more often than sums in
            // a mixed request, the context it saw least: twice the mixed
            // requests took single_pass from 68.8% to 70.8% on them and
            // draw-and-compute from 35% to 45% (session 19, n = 400).
            adapter_mixed_weights: BTreeMap::from([("math".to_string(), 2.0)]),
            // Not [Arithmetic]: a math LoRA that learns sums from scratch on
            // a base that never saw them got 0% in 700 steps at 2e-3, and
            // the gate then sent 30% of the program tokens to another expert
            // (session 13; README, "Skills that live in one adapter").
            adapter_only_domains: vec![],
            // The chaining of two-step sums only the math LoRA learns: the
            // base alone works one step and stops, so a per-sequence server
            // that picks another adapter cannot finish a sum in a mixed
            // request (session 19: mixed requests 68.8% single_pass against
            // 50.5% per_sequence, n = 400). Not [Caption] (the shape facts):
            // a caption LoRA of this budget did not learn them from nothing
            // (configs/experiments/adapter_only_skills.json).
            adapter_only_skills: vec![Domain::Arithmetic],
            lora_rank: 16,
            lora_alpha: 32.0,
            gate_hidden: 64,
            gate_top_k: 1,
            // The first layer's gate sees no context and routed 11.6% of
            // text rows wrong, enough to break the math LoRA's chaining in
            // single_pass (two-step sums 54.5% against 91.4% with the math
            // LoRA forced); from the second layer on, 98-100% (session 19).
            first_gated_layer: 1,
            fused_ops: true,
        }
    }

    /// A few steps of every stage on tiny sizes (the smoke test).
    pub fn tiny() -> Self {
        let sched = |steps| Schedule {
            steps,
            learning_rate: 1e-3,
            min_lr_fraction: 0.1,
            warmup_steps: 1,
            weight_decay: 0.0,
            checkpoint_every: 1,
        };
        let vq: VqConfig = serde_json::from_value(serde_json::json!({
            "embed_dim": 12, "num_embeddings": 32, "double_latent": false,
            "latent_channels": 12, "resolution": 16, "in_channels": 3,
            "base_channels": 8, "channel_multiplier": [1, 1, 1], "num_res_blocks": 1,
            "attn_resolutions": [], "dropout": 0.0, "attn_type": "vanilla",
            "initializer_range": 0.02, "norm_num_groups": 4
        }))
        .expect("the tiny VQ config is valid");
        Self {
            text_vocab: 300,
            corpus_items: 200,
            vq,
            vq_steps: 2,
            vq_batch: 2,
            vq_learning_rate: 1e-3,
            vq_foreground_weight: 5.0,
            vq_merge_distance: 0.7,
            vq_context_weight: 1.0,
            vq_shape_weight: 1.0,
            // 5 shape and 7 colour channels: the tiny VQ's 12.
            vq_colour_weight: 1.0,
            vq_decoder_steps: 2,
            decoder: DecoderSize {
                hidden_size: 32,
                num_layers: 2,
                num_heads: 2,
                intermediate_size: 64,
                max_position_embeddings: 256,
            },
            batch_rows: 2,
            batch_len: 96,
            base_prompt_weight: 0.3,
            adapter_prompt_weight: 0.1,
            base: sched(2),
            adapter: sched(2),
            semantic_adapter: sched(2),
            gate: sched(2),
            adapter_steps: BTreeMap::new(),
            adapter_learning_rates: BTreeMap::new(),
            adapter_mixed_weights: BTreeMap::new(),
            adapter_only_domains: vec![Domain::Arithmetic],
            adapter_only_skills: vec![Domain::Caption],
            lora_rank: 4,
            lora_alpha: 8.0,
            gate_hidden: 8,
            gate_top_k: 1,
            first_gated_layer: 0,
            fused_ops: true,
        }
    }

    /// The demo sizes with a few steps per stage: measures each stage's speed.
    pub fn probe() -> Self {
        let mut cfg = Self::demo();
        cfg.vq_steps = 10;
        cfg.vq_decoder_steps = 10;
        cfg.adapter_steps.clear();
        cfg.adapter_learning_rates.clear();
        for (s, n) in [
            (&mut cfg.base, 10),
            (&mut cfg.adapter, 5),
            (&mut cfg.semantic_adapter, 5),
            (&mut cfg.gate, 5),
        ] {
            s.steps = n;
            s.warmup_steps = 1;
        }
        cfg
    }

    /// A named preset, or a JSON file holding a whole config (e.g. a copy
    /// of a run's `checkpoints/pipeline.json`, `[seed, config]`, edited).
    pub fn preset(name: &str) -> Result<Self> {
        let cfg = match name {
            "demo" => Self::demo(),
            "probe" => Self::probe(),
            "tiny" => Self::tiny(),
            path if path.ends_with(".json") => Self::from_file(Path::new(path))?,
            other => bail!("unknown preset {other:?}: name demo, probe or tiny, or a .json file"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the pipeline config", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        // A run's pipeline.json is `[seed, config]`; a bare config works too.
        let config = match value {
            serde_json::Value::Array(mut pair) if pair.len() == 2 => pair.remove(1),
            other => other,
        };
        serde_json::from_value(config)
            .with_context(|| format!("{}: not a pipeline config", path.display()))
    }

    /// Rejects settings no stage would read, rather than ignoring them.
    pub fn validate(&self) -> Result<()> {
        let steps = self.adapter_steps.keys().map(|n| ("adapter_steps", n));
        let rates = (self.adapter_learning_rates.keys()).map(|n| ("adapter_learning_rates", n));
        let mixed = (self.adapter_mixed_weights.keys()).map(|n| ("adapter_mixed_weights", n));
        for (field, name) in steps.chain(rates).chain(mixed) {
            if !ADAPTERS.contains(&name.as_str()) {
                bail!(
                    "{field} names {name:?}, which the pipeline does not train (it trains {})",
                    ADAPTERS.join(", ")
                );
            }
        }
        for (name, &weight) in &self.adapter_mixed_weights {
            if !(weight.is_finite() && weight >= 0.0) {
                bail!("adapter_mixed_weights gives {name:?} {weight}: a weight is a number ≥ 0");
            }
        }
        if self.adapter_only_domains.contains(&Domain::Image) {
            bail!("adapter_only_domains names image: only text domains have a semantic adapter");
        }
        if self.adapter_only_skills.contains(&Domain::Image) {
            bail!("adapter_only_skills names image: only text domains have a semantic adapter");
        }
        if self.first_gated_layer >= self.decoder.num_layers {
            bail!(
                "first_gated_layer is {} but the decoder has {} layers: the gate would route none",
                self.first_gated_layer,
                self.decoder.num_layers
            );
        }
        use crate::train::vq_train::{COLOUR_CLASSES, SHAPE_CLASSES};
        let on = |weight: f64, classes: usize| if weight > 0.0 { classes } else { 0 };
        let classes =
            on(self.vq_shape_weight, SHAPE_CLASSES) + on(self.vq_colour_weight, COLOUR_CLASSES);
        if self.vq.embed_dim < classes {
            bail!(
                "vq_shape_weight and vq_colour_weight need {classes} latent channels to name a cell's shape and colour, but vq.embed_dim is {}",
                self.vq.embed_dim
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::PipelineConfig;

    #[test]
    fn a_run_record_or_a_bare_config_loads_as_a_preset() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = PipelineConfig::tiny();
        cfg.vq_steps = 7;
        let record = dir.path().join("pipeline.json");
        std::fs::write(&record, serde_json::to_string(&(3u64, &cfg)).unwrap()).unwrap();
        assert_eq!(
            PipelineConfig::preset(record.to_str().unwrap()).unwrap(),
            cfg
        );
        let bare = dir.path().join("bare.json");
        std::fs::write(&bare, serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(PipelineConfig::preset(bare.to_str().unwrap()).unwrap(), cfg);
    }

    /// `models/demo/recipe.json`, written by the run that trained the shipped
    /// model, is the demo recipe with seed 0.
    #[test]
    fn the_shipped_model_was_trained_with_the_demo_recipe() {
        let path = "models/demo/recipe.json";
        let text = std::fs::read_to_string(path).unwrap();
        let (seed, cfg): (u64, PipelineConfig) = serde_json::from_str(&text).unwrap();
        assert_eq!(seed, 0);
        assert_eq!(
            cfg,
            PipelineConfig::demo(),
            "{path} differs from the demo recipe"
        );
    }

    /// The two experiments of sessions 18 and 19 differ from the demo
    /// recipe in what they tried, nothing else.
    #[test]
    fn the_experiment_recipes_are_the_demo_recipe_with_one_change_each() {
        let path = "configs/experiments/adapter_only_chaining.json";
        let mut cfg = PipelineConfig::preset(path).unwrap();
        assert_eq!(cfg.first_gated_layer, 0);
        cfg.first_gated_layer = 1;
        cfg.adapter_steps.insert("math".into(), 1100);
        cfg.adapter_mixed_weights.insert("math".into(), 2.0);
        assert_eq!(cfg, PipelineConfig::demo(), "{path} drifted");
        let path = "configs/experiments/adapter_only_skills.json";
        let mut cfg = PipelineConfig::preset(path).unwrap();
        assert_eq!(
            cfg.adapter_only_skills,
            vec![super::Domain::Arithmetic, super::Domain::Caption]
        );
        cfg.adapter_only_skills.pop();
        cfg.first_gated_layer = 1;
        cfg.adapter_mixed_weights.insert("math".into(), 2.0);
        assert_eq!(cfg, PipelineConfig::demo(), "{path} drifted");
    }

    #[test]
    fn unknown_presets_and_adapter_names_are_refused() {
        let err = PipelineConfig::preset("huge").unwrap_err().to_string();
        assert!(err.contains("huge") && err.contains(".json"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = PipelineConfig::tiny();
        cfg.adapter_steps.insert("maths".into(), 5);
        let path = dir.path().join("typo.json");
        std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let err = format!(
            "{:#}",
            PipelineConfig::preset(path.to_str().unwrap()).unwrap_err()
        );
        assert!(
            err.contains("\"maths\"") && err.contains("math, code"),
            "{err}"
        );
        let missing = format!(
            "{:#}",
            PipelineConfig::preset("/nonexistent/p.json").unwrap_err()
        );
        assert!(missing.contains("cannot read"), "{missing}");
        let mut cfg = PipelineConfig::tiny();
        cfg.adapter_learning_rates.insert("chat".into(), 1e-3);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("adapter_learning_rates names \"chat\""),
            "{err}"
        );
        let mut cfg = PipelineConfig::tiny();
        cfg.adapter_only_domains
            .push(crate::train::data::Domain::Image);
        assert!(cfg.validate().is_err());
        let mut cfg = PipelineConfig::tiny();
        cfg.first_gated_layer = cfg.decoder.num_layers;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("first_gated_layer"), "{err}");
        cfg.first_gated_layer -= 1;
        cfg.validate().unwrap();
        cfg.adapter_mixed_weights.insert("math".into(), -1.0);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("adapter_mixed_weights gives \"math\" -1"),
            "{err}"
        );
        cfg.adapter_mixed_weights.clear();
        cfg.adapter_mixed_weights.insert("maths".into(), 2.0);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("adapter_mixed_weights names \"maths\""),
            "{err}"
        );
    }
}
