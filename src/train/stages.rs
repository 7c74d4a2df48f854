//! The stages of the pipeline (see [`super::pipeline`]): each reads what the
//! earlier stages wrote into the model directory, trains from its own
//! checkpoint folder (resuming when one is there), and writes its product.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::Tokenizer;

use super::batch::{PackedBatch, SeqMaker};
use super::data::text_domains::text_corpus;
use super::decoder::{init_tensors, set_vars, LayerAdapters, Routing, TrainDecoder};
use super::looping::{self, StepOut};
use super::lora::TrainLora;
use super::pipeline::{expert_for, record, role_of, stage_data, stage_graph, Run, StageLog};
use super::schedule;
use crate::adapters::peft::LoraAdapter;
use crate::adapters::AdapterRole;
use crate::engine::images::VQ_WEIGHTS_FILE;
use crate::model::config::{Config, MoloraConfig};
use crate::model::tokenizer::{load_tokenizer, save_tokenizer, train_tokenizer, TokenizerLayout};
use crate::model::vq::VqModel;
use crate::model::weights::SINGLE_FILE;
use crate::random_model::ADAPTERS_DIR;

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const CONFIG_FILE: &str = "config.json";
/// `[seed, recipe]` beside the model: what trained it, which `--preset`
/// reads back, and which adapters' tokens the evaluation leaves out.
pub const RECIPE_FILE: &str = "recipe.json";

/// `tokenizer`: byte-level BPE on the world's text, image codes added.
pub fn tokenizer(run: &Run) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&run.out)
        .with_context(|| format!("{}: cannot create", run.out.display()))?;
    let corpus = text_corpus(run.stage_seed("tokenizer"), run.cfg.corpus_items);
    let (tok, layout) = train_tokenizer(
        corpus.into_iter(),
        run.cfg.text_vocab,
        run.cfg.vq.num_embeddings,
    )?;
    save_tokenizer(&tok, &run.path(TOKENIZER_FILE))?;
    super::progress::println(&format!(
        "tokenizer: {} text ids, {} image codes -> {}",
        layout.text_range.len(),
        layout.num_image_codes(),
        run.path(TOKENIZER_FILE).display()
    ));
    record(
        &run.out,
        StageLog::new(
            "tokenizer",
            0,
            started.elapsed().as_secs_f64(),
            run.cfg.corpus_items as u64,
            vec![],
        ),
    )
}

/// What the decoder stages share: tokenizer, VQ model, model config.
pub struct Assets {
    pub tokenizer: Tokenizer,
    pub layout: TokenizerLayout,
    pub vq: VqModel,
    pub config: Config,
}

impl Assets {
    pub fn load(run: &Run, device: &Device) -> Result<Self> {
        let (tokenizer, layout) =
            load_tokenizer(&run.path(TOKENIZER_FILE)).context("run the tokenizer stage first")?;
        let vq_path = run.path(VQ_WEIGHTS_FILE);
        if !vq_path.exists() {
            bail!("{}: missing; run the vq stage first", vq_path.display());
        }
        let vq = VqModel::load(&vq_path, &run.cfg.vq, device)?;
        let config = model_config(run, &layout)?;
        Ok(Self {
            tokenizer,
            layout,
            vq,
            config,
        })
    }

    pub fn maker(&self) -> SeqMaker<'_> {
        SeqMaker::new(&self.tokenizer, &self.layout, &self.vq)
    }
}

/// The model's `config.json`: Chameleon fields, the tokenizer's ranges, the
/// VQ model's config.
pub fn model_config(run: &Run, layout: &TokenizerLayout) -> Result<Config> {
    let d = &run.cfg.decoder;
    let mut cfg: Config = serde_json::from_value(serde_json::json!({
        "model_type": "chameleon",
        "vocab_size": layout.vocab_size,
        "hidden_size": d.hidden_size,
        "intermediate_size": d.intermediate_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_heads,
        "max_position_embeddings": d.max_position_embeddings,
    }))?;
    cfg.molora = MoloraConfig::default();
    let g = run.cfg.vq.grid_size();
    layout.apply_to_config(&mut cfg, [g, g]);
    cfg.vq_config = Some(serde_json::to_value(&run.cfg.vq)?);
    cfg.validate()
        .context("the pipeline gives an invalid model config")?;
    Ok(cfg)
}

/// Runs a decoder-side loop and records it.
fn train_loop(
    run: &Run,
    stage: &str,
    varmap: &VarMap,
    schedule: &looping::Schedule,
    step_fn: impl FnMut(u64) -> Result<StepOut>,
) -> Result<()> {
    let state = looping::run(stage, varmap, schedule, &run.checkpoint_dir(stage), step_fn)?;
    record(
        &run.out,
        StageLog::new(
            stage,
            state.step,
            state.seconds,
            state.items,
            state.losses.loss_log,
        ),
    )
}

/// `base`: the whole decoder on the mixture of every task.
pub fn base(run: &Run, device: &Device) -> Result<()> {
    let assets = Assets::load(run, device)?;
    let cfg = &assets.config;
    let varmap = VarMap::new();
    let model = TrainDecoder::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?
        .with_fused_ops(run.cfg.fused_ops);
    set_vars(&varmap, &init_tensors(cfg, run.stage_seed("base-init"))?)?;
    let mut maker = assets.maker();
    let (seed, pc) = (run.stage_seed("base"), &run.cfg);
    let data = stage_data(pc, "base");
    train_loop(run, "base", &varmap, &pc.base, |step| {
        let batch = maker.batch(&data, seed, step, pc.batch_rows, pc.batch_len, device)?;
        Ok(StepOut {
            loss: model.loss(&batch, &super::decoder::NoAdapters)?,
            items: batch.tokens,
        })
    })?;
    cfg.to_file(&run.path(CONFIG_FILE))?;
    varmap
        .save(run.path(SINGLE_FILE))
        .with_context(|| format!("{}: cannot write", run.path(SINGLE_FILE).display()))?;
    Ok(())
}

/// The trained base, frozen.
pub fn frozen_base(run: &Run, cfg: &Config, device: &Device) -> Result<TrainDecoder> {
    let path = run.path(SINGLE_FILE);
    if !path.exists() {
        bail!("{}: missing; run the base stage first", path.display());
    }
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, device)? };
    Ok(TrainDecoder::new(cfg, vb)?.with_fused_ops(run.cfg.fused_ops))
}

/// A trained adapter of the model directory, frozen.
pub fn frozen_adapter(run: &Run, name: &str, cfg: &Config, device: &Device) -> Result<TrainLora> {
    let dir = run.path(ADAPTERS_DIR).join(name);
    let adapter = LoraAdapter::load(&dir, cfg, device)
        .with_context(|| format!("adapter {name:?}: train it first"))?;
    Ok(TrainLora::frozen(&adapter))
}

/// Which rows each adapter serves: by modality (token id) or by routing
/// label (semantic adapters on text rows), as inference routes them with an
/// exact gate.
pub struct OracleRouting<'a> {
    pub entries: Vec<(&'a TrainLora, Tensor)>,
    /// Semantic adapters apply from this layer on (`first_gated_layer`).
    pub first_gated_layer: usize,
}

impl<'a> OracleRouting<'a> {
    pub fn new(adapters: &[&'a TrainLora], batch: &PackedBatch, image_start: u32) -> Result<Self> {
        let mut entries = Vec::with_capacity(adapters.len());
        for &a in adapters {
            let is_text = |i: usize| batch.host_ids[i] < image_start;
            let mask = match a.name.as_str() {
                "text" => batch.row_mask(is_text)?,
                "image" => batch.row_mask(|i| !is_text(i))?,
                name => batch.row_mask(|i| {
                    is_text(i) && batch.labels[i].is_some_and(|d| expert_for(d) == name)
                })?,
            };
            entries.push((a, mask));
        }
        Ok(Self {
            entries,
            first_gated_layer: 0,
        })
    }

    pub fn with_first_gated_layer(mut self, layer: usize) -> Self {
        self.first_gated_layer = layer;
        self
    }
}

impl Routing for OracleRouting<'_> {
    fn layer_adapters(&self, layer: usize, _: &Tensor) -> candle_core::Result<LayerAdapters<'_>> {
        let gated = layer >= self.first_gated_layer;
        Ok((self.entries.iter())
            .filter(|(a, _)| gated || matches!(a.role, AdapterRole::Modality { .. }))
            .map(|(a, m)| (*a, m.clone()))
            .collect())
    }
}

/// `adapter --name NAME`: one LoRA on its own data, base frozen; semantic
/// adapters train on top of the (frozen) modality adapters they are served
/// with.
pub fn adapter(run: &Run, name: &str, device: &Device) -> Result<()> {
    let role = role_of(name)?;
    let mut schedule = match role {
        AdapterRole::Modality { .. } => run.cfg.adapter,
        AdapterRole::Semantic { .. } => run.cfg.semantic_adapter,
    };
    if let Some(&steps) = run.cfg.adapter_steps.get(name) {
        schedule.steps = steps;
    }
    if let Some(&lr) = run.cfg.adapter_learning_rates.get(name) {
        schedule.learning_rate = lr;
    }
    let assets = Assets::load(run, device)?;
    let cfg = &assets.config;
    let base = frozen_base(run, cfg, device)?;
    let frozen: Vec<TrainLora> = match name {
        "text" | "image" => vec![],
        _ => ["text", "image"]
            .iter()
            .map(|m| frozen_adapter(run, m, cfg, device))
            .collect::<Result<_>>()?,
    };
    let varmap = VarMap::new();
    let pc = &run.cfg;
    let lora = TrainLora::new_trainable(
        name,
        role,
        cfg,
        pc.lora_rank,
        pc.lora_alpha,
        run.stage_seed(&format!("{name}-init")),
        &varmap,
        device,
    )?;
    let mut maker = assets.maker();
    let seed = run.stage_seed(name);
    let data = stage_data(pc, name);
    let image_start = assets.layout.image_range.start;
    train_loop(run, name, &varmap, &schedule, |step| {
        let batch = maker.batch(&data, seed, step, pc.batch_rows, pc.batch_len, device)?;
        let mut all: Vec<&TrainLora> = frozen.iter().collect();
        all.push(&lora);
        let routing = OracleRouting::new(&all, &batch, image_start)?
            .with_first_gated_layer(pc.first_gated_layer);
        Ok(StepOut {
            loss: base.loss(&batch, &routing)?,
            items: batch.tokens,
        })
    })?;
    lora.to_adapter()?.save(&run.path(ADAPTERS_DIR).join(name))
}

/// `all`: every stage of [`stage_graph`], up to `jobs` at once (0: one per
/// core); finished stages resume at their last step and only write their
/// product again.
pub fn all(run: &Run, device: &Device, jobs: usize) -> Result<()> {
    let started = Instant::now();
    let pipeline = run
        .path(super::pipeline::CHECKPOINTS_DIR)
        .join("pipeline.json");
    std::fs::create_dir_all(pipeline.parent().unwrap())?;
    if let Ok(text) = std::fs::read_to_string(&pipeline) {
        let (seed, saved): (u64, super::pipeline::PipelineConfig) = serde_json::from_str(&text)
            .with_context(|| format!("{}: unreadable", pipeline.display()))?;
        if seed != run.seed || saved != run.cfg {
            bail!(
                "{} holds a run with another seed or preset; use another --out or delete it",
                pipeline.display()
            );
        }
    }
    let record = serde_json::to_string_pretty(&(run.seed, &run.cfg))?;
    std::fs::write(&pipeline, &record)?;
    std::fs::create_dir_all(&run.out)?;
    std::fs::write(run.path(RECIPE_FILE), &record)
        .with_context(|| format!("{}: cannot write", run.path(RECIPE_FILE).display()))?;
    let graph = stage_graph();
    let jobs_of_graph = graph
        .into_iter()
        .map(|(name, needs)| schedule::Job {
            name,
            needs,
            work: Box::new(move |threads| {
                let run = &Run {
                    threads,
                    ..run.clone()
                };
                match name {
                    "tokenizer" if run.path(TOKENIZER_FILE).exists() => Ok(()),
                    "tokenizer" => tokenizer(run),
                    "vq" => super::vq_stages::vq(run, device),
                    "vq_decoder" => super::vq_stages::vq_decoder(run, device),
                    "base" => base(run, device),
                    "gate" => super::gate_train::gate(run, device),
                    adapter_name => adapter(run, adapter_name, device),
                }
            }),
        })
        .collect::<Vec<_>>();
    let cores = run.threads();
    let at_once = match jobs {
        0 => cores,
        n => n,
    };
    schedule::run(&jobs_of_graph, at_once, cores)?;
    super::progress::println(&format!(
        "pipeline done in {:.1} min -> {}",
        started.elapsed().as_secs_f64() / 60.0,
        run.out.display()
    ));
    Ok(())
}
