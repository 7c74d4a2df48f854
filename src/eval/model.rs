//! The model under evaluation: everything `molora eval` reads from a model
//! directory, loaded once, and the map from adapters to the [`Domain`]s of
//! the procedural world.
//!
//! Invariants:
//! - an adapter's domain comes only from its role metadata
//!   (`AdapterRole::Semantic { domain }` / `Modality { modality }`), never
//!   from its folder name;
//! - the hot set has a slot for every adapter in the folder and a rank that
//!   fits the largest, so no evaluation step ever waits for or evicts one.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use tokenizers::Tokenizer;

use crate::adapters::hot_set::HotSetConfig;
use crate::adapters::peft::{AdapterConfig, CONFIG_FILE};
use crate::adapters::AdapterRole;
use crate::engine::runner::ModelRunner;
use crate::engine::{Engine, EngineConfig, EngineHandle};
use crate::model::config::Config;
use crate::model::tokenizer::{load_tokenizer, TokenizerLayout};
use crate::model::vq::{rgb_to_tensor, tensor_to_rgb, VqModel};
use crate::random_model::ADAPTERS_DIR;
use crate::server::load_vq;
use crate::train::batch::Unlearned;
use crate::train::data::encode::Encoder;
use crate::train::data::shapes::IMAGE_SIZE;
use crate::train::data::{Domain, Scene};
use crate::train::pipeline::{stage_data, PipelineConfig, ADAPTERS};
use crate::train::stages::RECIPE_FILE;

/// Images encoded or decoded by the VQ model in one call.
const VQ_BATCH: usize = 16;

/// One registered adapter and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterDomain {
    pub name: String,
    pub role: AdapterRole,
    /// The domains whose tokens the adapter is for: one for a semantic or
    /// image adapter, every text domain for the text adapter, none for a
    /// domain the procedural world does not have (e.g. "chat").
    pub domains: Vec<Domain>,
    /// Targets of those domains the adapter's recipe left to another
    /// adapter (`recipe.json` beside the model: `adapter_only_domains`,
    /// `adapter_only_skills`); empty without a recipe.
    pub unlearned: Unlearned,
}

/// The recipe the model was trained with, where the pipeline left one.
fn load_recipe(dir: &Path) -> Result<Option<PipelineConfig>> {
    let path = dir.join(RECIPE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let path = path.to_string_lossy();
    PipelineConfig::preset(&path)
        .map(Some)
        .with_context(|| format!("{path}: the recipe beside the model"))
}

/// The domain a role's name stands for ("math" and "arithmetic" alike).
pub fn domain_named(name: &str) -> Option<Domain> {
    match name.to_ascii_lowercase().as_str() {
        "arithmetic" | "math" | "maths" => Some(Domain::Arithmetic),
        "code" | "coding" => Some(Domain::Code),
        "caption" | "captioning" | "captions" | "shapes" => Some(Domain::Caption),
        "image" | "images" => Some(Domain::Image),
        _ => None,
    }
}

/// The domains an adapter of `role` serves.
pub fn role_domains(role: &AdapterRole) -> Vec<Domain> {
    match role {
        AdapterRole::Semantic { domain } => domain_named(domain).into_iter().collect(),
        AdapterRole::Modality { modality } if modality == "text" => {
            vec![Domain::Arithmetic, Domain::Code, Domain::Caption]
        }
        AdapterRole::Modality { modality } => domain_named(modality).into_iter().collect(),
    }
}

pub struct EvalModel {
    pub dir: PathBuf,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub layout: TokenizerLayout,
    pub vq: Option<VqModel>,
    /// The runner of teacher-forced measurements (generation gets its own,
    /// owned by the engine thread).
    pub runner: ModelRunner,
    pub adapters: Vec<AdapterDomain>,
    hot: HotSetConfig,
}

impl EvalModel {
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = Config::from_file(&config_path)
            .with_context(|| format!("{}: cannot read the model config", dir.display()))?;
        let (tokenizer, layout) = load_tokenizer(&dir.join("tokenizer.json"))?;
        let vocab = config.vocab()?;
        if layout.image_range.start != vocab.image_range().start && !vocab.image_range().is_empty()
        {
            anyhow::bail!(
                "{}: tokenizer.json puts image codes at {:?} but config.json at {:?}",
                dir.display(),
                layout.image_range,
                vocab.image_range()
            );
        }
        let device = Device::Cpu;
        let vq = load_vq(dir, &config, &device)?;
        let hot = hot_set_for(&dir.join(ADAPTERS_DIR))?;
        let runner = load_runner(dir, hot)?;
        let recipe = load_recipe(dir)?;
        let adapters = runner
            .hot_set
            .names()
            .into_iter()
            .filter_map(|name| {
                let role = runner.hot_set.role_of(&name)?.clone();
                Some(AdapterDomain {
                    domains: role_domains(&role),
                    unlearned: recipe
                        .as_ref()
                        .filter(|_| ADAPTERS.contains(&name.as_str()))
                        .map(|cfg| stage_data(cfg, &name).unlearned)
                        .unwrap_or_default(),
                    name,
                    role,
                })
            })
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            layout,
            vq,
            runner,
            adapters,
            hot,
        })
    }

    /// Starts an engine thread over a fresh runner of the same directory,
    /// sized to take `max_queue` requests at once.
    pub fn start_engine(&self, max_queue: usize, max_batch_size: usize) -> Result<EngineHandle> {
        let runner = load_runner(&self.dir, self.hot)?;
        let cfg = EngineConfig {
            max_batch_size,
            max_queue: max_queue.max(1),
            max_batch_tokens: 512.max(4 * max_batch_size),
            max_context: self.config.max_position_embeddings,
        };
        Ok(Engine::start(
            runner,
            self.tokenizer.clone(),
            self.vq.clone(),
            cfg,
        ))
    }

    pub fn encoder(&self) -> Encoder<'_> {
        Encoder::new(&self.tokenizer, &self.layout)
    }

    pub fn tokens_per_image(&self) -> usize {
        self.runner.vocab.tokens_per_image
    }

    /// The adapter registered for a modality ("text", "image"), by role.
    pub fn modality_adapter(&self, modality: &str) -> Option<&AdapterDomain> {
        self.adapters
            .iter()
            .find(|a| matches!(&a.role, AdapterRole::Modality { modality: m } if m == modality))
    }

    /// The semantic adapter of a text domain, by role.
    pub fn semantic_adapter(&self, domain: Domain) -> Option<&AdapterDomain> {
        self.adapters
            .iter()
            .find(|a| matches!(a.role, AdapterRole::Semantic { .. }) && a.domains.contains(&domain))
    }

    fn require_vq(&self) -> Result<&VqModel> {
        self.vq.as_ref().ok_or_else(|| {
            anyhow!(
                "{}: the model has no VQ model (vq_config and vqgan.safetensors)",
                self.dir.display()
            )
        })
    }

    /// The image codes of a scene (its rendering through the VQ encoder).
    pub fn scene_codes(&self, scene: &Scene) -> Result<Vec<u32>> {
        self.require_vq()?.encode_rgb(&scene.render())
    }

    /// Codes of many images, in batches.
    pub fn encode_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<u32>>> {
        let vq = self.require_vq()?;
        let side = vq.config().resolution as u32;
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(VQ_BATCH) {
            let fitted: Vec<RgbImage> = chunk
                .iter()
                .map(|i| crate::model::vq::pixels::fit_square(i, side))
                .collect();
            let codes = vq.encode(&rgb_to_tensor(&fitted, vq.device())?)?;
            out.extend(codes.to_vec2::<u32>()?);
        }
        Ok(out)
    }

    /// Pictures of many code grids, in batches, at the VQ's resolution.
    pub fn decode_images(&self, codes: &[Vec<u32>]) -> Result<Vec<RgbImage>> {
        let vq = self.require_vq()?;
        let mut out = Vec::with_capacity(codes.len());
        for chunk in codes.chunks(VQ_BATCH) {
            let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
            let t = Tensor::from_vec(flat, (chunk.len(), chunk[0].len()), vq.device())?;
            let pixels = vq.decode(&t)?;
            for i in 0..chunk.len() {
                out.push(tensor_to_rgb(&pixels.get(i)?)?);
            }
        }
        Ok(out)
    }
}

/// A picture at the checker's size: VQ models of another resolution (tiny
/// test models) are scaled with nearest-neighbour, which keeps colours pure.
pub fn at_checker_size(img: RgbImage) -> RgbImage {
    if img.dimensions() == (IMAGE_SIZE, IMAGE_SIZE) || img.width() == 0 {
        return img;
    }
    image::imageops::resize(
        &img,
        IMAGE_SIZE,
        IMAGE_SIZE,
        image::imageops::FilterType::Nearest,
    )
}

fn load_runner(dir: &Path, hot: HotSetConfig) -> Result<ModelRunner> {
    let (runner, refused) = ModelRunner::load(dir, &dir.join(ADAPTERS_DIR), hot, &Device::Cpu)?;
    if let Some(first) = refused.first() {
        anyhow::bail!(
            "{}: {} adapter(s) refused, first: {first}",
            dir.display(),
            refused.len()
        );
    }
    Ok(runner)
}

/// A hot set with one slot per adapter folder and the largest rank among them.
fn hot_set_for(adapter_dir: &Path) -> Result<HotSetConfig> {
    let mut capacity = 0;
    let mut max_rank = 1;
    if adapter_dir.is_dir() {
        let entries = std::fs::read_dir(adapter_dir)
            .with_context(|| format!("{}: cannot list adapters", adapter_dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            let cfg_path = path.join(CONFIG_FILE);
            if !cfg_path.is_file() {
                continue;
            }
            let cfg = AdapterConfig::from_file(&cfg_path)?;
            capacity += 1;
            max_rank = max_rank.max(cfg.r);
        }
    }
    Ok(HotSetConfig {
        capacity: capacity.max(1),
        max_rank,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_map_to_domains_by_their_metadata() {
        let semantic = |d: &str| AdapterRole::Semantic { domain: d.into() };
        let modality = |m: &str| AdapterRole::Modality { modality: m.into() };
        assert_eq!(role_domains(&semantic("math")), [Domain::Arithmetic]);
        assert_eq!(role_domains(&semantic("Arithmetic")), [Domain::Arithmetic]);
        assert_eq!(role_domains(&semantic("code")), [Domain::Code]);
        assert_eq!(role_domains(&semantic("caption")), [Domain::Caption]);
        assert!(role_domains(&semantic("chat")).is_empty());
        assert_eq!(role_domains(&modality("image")), [Domain::Image]);
        assert_eq!(role_domains(&modality("text")).len(), 3);
        assert!(role_domains(&modality("audio")).is_empty());
    }
}
