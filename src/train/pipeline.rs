//! The demo model's training pipeline: the model directory it fills, which
//! data each stage learns from, and the log of what each stage did. The
//! sizes and schedules of the stages are a [`PipelineConfig`] (see
//! [`super::presets`]), written beside the checkpoints.
//!
//! Stages ([`stage_graph`]): tokenizer -> vq -> vq_decoder and, beside it,
//! base -> adapters (text, image, then the semantic math, code, caption) ->
//! gate. Each reads what the earlier ones wrote into the output folder and
//! resumes from its own checkpoint folder under `<out>/checkpoints/<stage>`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::batch::{Mixture, Source, StageData, Unlearned};
use super::data::text_domains::MixedKind;
use super::data::{Domain, Task};
pub use super::presets::{DecoderSize, PipelineConfig};
use crate::adapters::AdapterRole;

/// Folder of checkpoints inside the output folder (not shipped).
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Per-stage summary (losses, steps, seconds) written into the output folder.
pub const TRAIN_LOG: &str = "train_log.json";

/// The adapters the pipeline trains, in order (semantic ones after the
/// modality ones they are trained on top of).
pub const ADAPTERS: [&str; 5] = ["text", "image", "math", "code", "caption"];
/// The stages of `train all` in order, each with the stages whose products
/// it reads (so it starts once they have ended). The base reads only the
/// encoder and codebook, which `vq_decoder` leaves as they are: the two run
/// side by side. The gate comes last, after every other stage.
pub fn stage_graph() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut graph = vec![
        ("tokenizer", vec![]),
        // Not a product it reads: the tokenizer's fraction of a second
        // first, so the VQ stage starts alone and spreads over every core.
        ("vq", vec!["tokenizer"]),
        ("vq_decoder", vec!["vq"]),
        ("base", vec!["tokenizer", "vq"]),
    ];
    let modality: Vec<&str> = (ADAPTERS.iter().copied())
        .filter(|a| !EXPERTS.contains(a))
        .collect();
    for adapter in ADAPTERS {
        let needs = match EXPERTS.contains(&adapter) {
            true => modality.clone(),
            false => vec!["base"],
        };
        graph.push((adapter, needs));
    }
    let mut gate_needs = vec!["vq_decoder"];
    gate_needs.extend(ADAPTERS);
    graph.push(("gate", gate_needs));
    graph
}

/// The gate's experts: the semantic adapters.
pub const EXPERTS: [&str; 3] = ["math", "code", "caption"];

/// The semantic adapter serving tokens of `domain` (image codes are routed
/// by modality; text about images, e.g. the markers around them, is caption).
pub fn expert_for(domain: Domain) -> &'static str {
    match domain {
        Domain::Arithmetic => "math",
        Domain::Code => "code",
        Domain::Caption | Domain::Image => "caption",
    }
}

/// molora's role metadata of a pipeline adapter.
pub fn role_of(name: &str) -> Result<AdapterRole> {
    Ok(match name {
        "text" | "image" => AdapterRole::Modality {
            modality: name.to_string(),
        },
        "math" | "code" | "caption" => AdapterRole::Semantic {
            domain: name.to_string(),
        },
        other => bail!(
            "unknown adapter {other:?}: the pipeline trains {}",
            ADAPTERS.join(", ")
        ),
    })
}

/// The data an adapter (or the base) learns from.
pub fn mixture_for(stage: &str) -> Mixture {
    use MixedKind::*;
    let t = Source::Task;
    let m = Source::Mixed;
    match stage {
        "image" => vec![
            (4.0, t(Task::Draw)),
            (2.0, t(Task::Caption)),
            (1.0, Source::Interleaved),
            (1.0, m(DrawAndSides)),
            (1.0, m(DrawAndCompute)),
        ],
        "math" => vec![
            (4.0, t(Task::Arithmetic)),
            (1.0, m(CodeAndResult)),
            (1.0, m(DrawAndCompute)),
            (1.0, m(DescribeAndCompute)),
        ],
        "code" => vec![(3.0, t(Task::Code)), (1.0, m(CodeAndResult))],
        "caption" => vec![
            (2.0, t(Task::Caption)),
            (2.0, t(Task::Draw)),
            (1.0, Source::Interleaved),
            (1.0, m(DrawAndSides)),
            (1.0, m(DescribeAndCompute)),
        ],
        // base, text, gate: everything. Drawing weighs most: the base's
        // loss on image codes is what limits the drawn pictures. The text
        // and caption LoRAs need the drawings too: a drawing's prompt is
        // text rows they serve, which the picture's codes attend to (trained
        // without drawings, they cost the pictures 10 points of colour:
        // README, "Training the demo model"). Pictures
        // without a caption teach the unconditional distribution that
        // classifier-free guidance (`cfg_scale`) subtracts.
        _ => vec![
            (1.0, Source::Unconditional),
            (4.0, t(Task::Arithmetic)),
            (2.0, t(Task::Code)),
            (2.0, t(Task::Caption)),
            (4.0, t(Task::Draw)),
            (1.0, m(CodeAndResult)),
            (1.0, m(DrawAndSides)),
            (1.0, m(DrawAndCompute)),
            (1.0, m(DescribeAndCompute)),
            (1.0, Source::Interleaved),
        ],
    }
}

/// The data of `stage` under `cfg`. An adapter-only domain is learned by
/// its own semantic adapter alone (the gate still routes it): every other
/// stage gives its targets no weight and drops the tasks made only of it.
pub fn stage_data(cfg: &PipelineConfig, stage: &str) -> StageData {
    let others = |domains: &[Domain]| -> Vec<Domain> {
        match stage {
            "gate" => vec![],
            _ => (domains.iter().copied())
                .filter(|&d| expert_for(d) != stage)
                .collect(),
        }
    };
    let unlearned = Unlearned {
        domains: others(&cfg.adapter_only_domains),
        skills: others(&cfg.adapter_only_skills),
    };
    let only_unlearned = |source: &Source| match source {
        Source::Task(task) => (task.sole_domain()).is_some_and(|d| unlearned.domains.contains(&d)),
        _ => false,
    };
    let mixed_weight = cfg.adapter_mixed_weights.get(stage).copied().unwrap_or(1.0);
    StageData {
        mixture: (mixture_for(stage).into_iter())
            .filter(|(_, source)| !only_unlearned(source))
            .map(|(weight, source)| match source {
                Source::Mixed(_) => (weight * mixed_weight, source),
                _ => (weight, source),
            })
            .collect(),
        prompt_weight: match stage {
            "base" => cfg.base_prompt_weight,
            _ => cfg.adapter_prompt_weight,
        },
        unlearned,
    }
}

/// Where a pipeline run reads and writes.
#[derive(Debug, Clone)]
pub struct Run {
    /// The model directory being filled.
    pub out: PathBuf,
    pub seed: u64,
    pub cfg: PipelineConfig,
    /// Cores a stage may spread its work over (0: all of this machine's).
    /// Only speed depends on it, never a trained weight.
    pub threads: usize,
}

impl Run {
    pub fn threads(&self) -> usize {
        match self.threads {
            0 => super::threads::cores(),
            n => n,
        }
    }

    pub fn checkpoint_dir(&self, stage: &str) -> PathBuf {
        self.out.join(CHECKPOINTS_DIR).join(stage)
    }

    /// The seed of one stage, derived from the run's seed and its name.
    pub fn stage_seed(&self, stage: &str) -> u64 {
        let h = stage.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        super::batch::mix(self.seed, h)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.out.join(file)
    }
}

/// One stage's line in `train_log.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageLog {
    pub stage: String,
    pub steps: u64,
    pub seconds: f64,
    /// Tokens (decoder stages) or images (vq) seen.
    pub items: u64,
    /// Mean loss of the first and last windows.
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    /// Mean loss per window of steps (see `looping::LOG_WINDOW`).
    pub loss_log: Vec<f32>,
}

impl StageLog {
    /// `stage`'s line, its first and last losses read off `loss_log`.
    pub fn new(stage: &str, steps: u64, seconds: f64, items: u64, loss_log: Vec<f32>) -> Self {
        StageLog {
            stage: stage.into(),
            steps,
            seconds,
            items,
            first_loss: loss_log.first().copied(),
            last_loss: loss_log.last().copied(),
            loss_log,
        }
    }
}

/// Adds or replaces `entry` in `<out>/train_log.json`. A finished stage
/// run again trains nothing (empty log, same steps) and keeps the record of
/// the run that trained it.
pub fn record(out: &Path, entry: StageLog) -> Result<()> {
    // Stages running at once (`train all --jobs`) share the file.
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _writing = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    let path = out.join(TRAIN_LOG);
    let mut all: Vec<StageLog> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let retrained = |old: &StageLog| !entry.loss_log.is_empty() || old.steps != entry.steps;
    if all.iter().any(|e| e.stage == entry.stage && !retrained(e)) {
        return Ok(());
    }
    all.retain(|e| e.stage != entry.stage);
    all.push(entry);
    // In pipeline order, whichever stage ended first.
    let order = stage_graph();
    all.sort_by_key(|e| {
        (order.iter())
            .position(|(stage, _)| *stage == e.stage)
            .unwrap_or(order.len())
    });
    std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::PipelineConfig;

    #[test]
    fn an_adapter_only_domain_is_learned_by_its_adapter_alone() {
        use crate::train::batch::Source;
        use crate::train::data::{Domain, Task};
        let mut cfg = PipelineConfig::tiny();
        cfg.adapter_only_domains = vec![Domain::Arithmetic];
        cfg.adapter_only_skills.clear();
        let arithmetic_items = |cfg: &PipelineConfig, stage: &str| {
            let data = super::stage_data(cfg, stage);
            data.mixture
                .contains(&(4.0, Source::Task(Task::Arithmetic)))
        };
        for stage in ["base", "text", "image", "code", "caption"] {
            let data = super::stage_data(&cfg, stage);
            assert_eq!(data.unlearned.domains, vec![Domain::Arithmetic], "{stage}");
            assert!(!arithmetic_items(&cfg, stage), "{stage}");
        }
        for stage in ["math", "gate"] {
            assert!(
                super::stage_data(&cfg, stage).unlearned.is_empty(),
                "{stage}"
            );
        }
        assert!(arithmetic_items(&cfg, "math") && arithmetic_items(&cfg, "gate"));
        // Without adapter-only domains every stage learns all of its data.
        cfg.adapter_only_domains.clear();
        let base = super::stage_data(&cfg, "base");
        assert!(base.unlearned.is_empty() && arithmetic_items(&cfg, "base"));
        assert_eq!(base.mixture, super::mixture_for("base"));
        assert_eq!(base.prompt_weight, cfg.base_prompt_weight);
    }

    #[test]
    fn adapter_only_skills_are_learned_by_their_adapter_alone() {
        use crate::train::batch::Source;
        use crate::train::data::{Domain, Task};
        let mut cfg = PipelineConfig::tiny();
        cfg.adapter_only_domains.clear();
        cfg.adapter_only_skills = vec![Domain::Arithmetic];
        for stage in ["base", "text", "image", "code", "caption"] {
            let data = super::stage_data(&cfg, stage);
            assert!(data.unlearned.domains.is_empty(), "{stage}");
            assert_eq!(data.unlearned.skills, vec![Domain::Arithmetic], "{stage}");
            // Every sum stays: only the chaining of multi-step answers weighs 0.
            assert_eq!(data.mixture, super::mixture_for(stage), "{stage}");
        }
        for stage in ["math", "gate"] {
            assert!(
                super::stage_data(&cfg, stage).unlearned.is_empty(),
                "{stage}"
            );
        }
        let math = super::stage_data(&cfg, "math");
        assert!(math
            .mixture
            .contains(&(4.0, Source::Task(Task::Arithmetic))));
    }

    #[test]
    fn adapter_mixed_weights_scale_only_that_adapters_mixed_requests() {
        use crate::train::batch::Source;
        let mut cfg = PipelineConfig::tiny();
        cfg.adapter_mixed_weights.insert("math".into(), 2.0);
        let given = super::mixture_for("math");
        let math = super::stage_data(&cfg, "math").mixture;
        assert_eq!(math.len(), given.len());
        assert!(given.iter().any(|(_, s)| matches!(s, Source::Mixed(_))));
        for ((w, source), (given_w, given_source)) in math.iter().zip(&given) {
            assert_eq!(source, given_source);
            let factor = if matches!(source, Source::Mixed(_)) {
                2.0
            } else {
                1.0
            };
            assert_eq!(*w, given_w * factor, "{source:?}");
        }
        cfg.adapter_only_domains.clear();
        assert_eq!(
            super::stage_data(&cfg, "code").mixture,
            super::mixture_for("code")
        );
    }
}
