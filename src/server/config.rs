//! The server's configuration: `configs/server.toml`, every field overridable
//! on the command line. Built once at start-up and passed down as one value
//! (no environment variables read deep inside constructors).
//!
//! Precedence: command-line flag > the config file > the defaults below.
//! `--config PATH` names the file; without it `configs/server.toml` is read
//! when it exists, and the defaults are used when it does not.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The file read when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "configs/server.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port (tests).
    pub bind: String,
    /// The model directory (config.json, weights, tokenizer.json).
    pub model_dir: PathBuf,
    /// Folder of adapters, one sub-folder each; `<model_dir>/adapters` when unset.
    pub adapter_dir: Option<PathBuf>,
    /// Folder for the service's own files (batch jobs); created at start.
    pub data_dir: PathBuf,
    pub limits: LimitsConfig,
    pub hot_set: HotSetSection,
    /// When set, `/v1/adapters` requires `Authorization: Bearer <admin_key>`.
    pub admin_key: Option<String>,
    /// Streaming: a partial-image preview every this many image tokens (0 = none).
    pub preview_every: usize,
    /// HTTP worker threads (0 = one per CPU core).
    pub workers: usize,
    /// How the decoder stores its projection weights: `f32` (exact) or
    /// `f16` (half the bytes per decode step, f32 accumulation).
    pub weight_dtype: WeightDtype,
}

/// Storage precision of the decoder's projection weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
}

impl WeightDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            WeightDtype::F32 => candle_core::DType::F32,
            WeightDtype::F16 => candle_core::DType::F16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most prompt tokens one request may carry (images count their codes).
    pub max_prompt_tokens: usize,
    /// Most new tokens one request may ask for.
    pub max_tokens: usize,
    /// New tokens when a request gives no `max_tokens` (capped by the context left).
    pub default_max_tokens: usize,
    /// Largest request body accepted; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Requests waiting for a batch slot; more get 429.
    pub max_queue: usize,
    /// Sequences in one engine step.
    pub max_batch_size: usize,
    /// Token rows in one engine step (prefill chunks count in full).
    pub max_batch_tokens: usize,
    pub max_images_per_prompt: usize,
}

/// The adapter hot set: slots preallocated on the device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HotSetSection {
    pub capacity: usize,
    pub max_rank: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            model_dir: PathBuf::from("models/demo"),
            adapter_dir: None,
            data_dir: PathBuf::from("data"),
            limits: LimitsConfig::default(),
            hot_set: HotSetSection::default(),
            admin_key: None,
            preview_every: 16,
            workers: 0,
            weight_dtype: WeightDtype::F32,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_prompt_tokens: 768,
            max_tokens: 512,
            default_max_tokens: 256,
            max_body_bytes: 4 * 1024 * 1024,
            max_queue: 256,
            max_batch_size: 32,
            max_batch_tokens: 2048,
            max_images_per_prompt: 4,
        }
    }
}

impl Default for HotSetSection {
    fn default() -> Self {
        Self {
            capacity: 8,
            max_rank: 16,
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file; unknown keys are refused so that a typo is not
    /// silently ignored.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read server config", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("{}: not a valid server config", path.display()))
    }

    /// The adapter folder in force.
    pub fn adapter_dir(&self) -> PathBuf {
        self.adapter_dir
            .clone()
            .unwrap_or_else(|| self.model_dir.join(crate::random_model::ADAPTERS_DIR))
    }

    /// Checks values that would make the server unusable.
    pub fn validate(&self) -> Result<()> {
        let l = &self.limits;
        for (name, v) in [
            ("limits.max_prompt_tokens", l.max_prompt_tokens),
            ("limits.max_tokens", l.max_tokens),
            ("limits.default_max_tokens", l.default_max_tokens),
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.max_queue", l.max_queue),
            ("limits.max_batch_size", l.max_batch_size),
            ("limits.max_batch_tokens", l.max_batch_tokens),
            ("hot_set.capacity", self.hot_set.capacity),
            ("hot_set.max_rank", self.hot_set.max_rank),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.admin_key.as_deref() == Some("") {
            bail!("admin_key is empty; leave it out to disable admin checks");
        }
        Ok(())
    }
}

/// `molora serve` flags: each one overrides the matching config field.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Server config file (default: configs/server.toml when present).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub bind: Option<String>,
    /// Model directory.
    #[arg(long = "model")]
    pub model_dir: Option<PathBuf>,
    /// Adapter folder (default: <model>/adapters).
    #[arg(long)]
    pub adapter_dir: Option<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long)]
    pub default_max_tokens: Option<usize>,
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    #[arg(long)]
    pub max_queue: Option<usize>,
    #[arg(long)]
    pub max_batch_size: Option<usize>,
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    #[arg(long)]
    pub max_images_per_prompt: Option<usize>,
    #[arg(long)]
    pub hot_set_capacity: Option<usize>,
    #[arg(long)]
    pub hot_set_max_rank: Option<usize>,
    /// Require this bearer key on /v1/adapters.
    #[arg(long)]
    pub admin_key: Option<String>,
    /// Streaming previews every N image tokens (0 = none).
    #[arg(long)]
    pub preview_every: Option<usize>,
    /// HTTP worker threads (0 = one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Projection weight storage: f32 (exact) or f16 (faster decode).
    #[arg(long, value_enum)]
    pub weight_dtype: Option<WeightDtype>,
}

impl ServeArgs {
    /// The config file (or the defaults) with these flags laid over it.
    pub fn resolve(&self) -> Result<ServerConfig> {
        let mut cfg = match &self.config {
            Some(path) => ServerConfig::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                ServerConfig::from_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => ServerConfig::default(),
        };
        self.apply(&mut cfg);
        cfg.validate().context("invalid server configuration")?;
        Ok(cfg)
    }

    pub fn apply(&self, cfg: &mut ServerConfig) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut cfg.bind, &self.bind);
        set(&mut cfg.model_dir, &self.model_dir);
        if self.adapter_dir.is_some() {
            cfg.adapter_dir = self.adapter_dir.clone();
        }
        set(&mut cfg.data_dir, &self.data_dir);
        let l = &mut cfg.limits;
        set(&mut l.max_prompt_tokens, &self.max_prompt_tokens);
        set(&mut l.max_tokens, &self.max_tokens);
        set(&mut l.default_max_tokens, &self.default_max_tokens);
        set(&mut l.max_body_bytes, &self.max_body_bytes);
        set(&mut l.max_queue, &self.max_queue);
        set(&mut l.max_batch_size, &self.max_batch_size);
        set(&mut l.max_batch_tokens, &self.max_batch_tokens);
        set(&mut l.max_images_per_prompt, &self.max_images_per_prompt);
        set(&mut cfg.hot_set.capacity, &self.hot_set_capacity);
        set(&mut cfg.hot_set.max_rank, &self.hot_set_max_rank);
        if self.admin_key.is_some() {
            cfg.admin_key = self.admin_key.clone();
        }
        set(&mut cfg.preview_every, &self.preview_every);
        set(&mut cfg.workers, &self.workers);
        set(&mut cfg.weight_dtype, &self.weight_dtype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_file_parses_and_matches_the_defaults_it_documents() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let cfg = ServerConfig::from_file(&path).expect("configs/server.toml parses");
        cfg.validate().expect("configs/server.toml is valid");
        assert_eq!(cfg.bind, "127.0.0.1:8080");
        assert_eq!(cfg.model_dir, PathBuf::from("models/demo"));
    }

    #[test]
    fn flags_override_the_file_and_unknown_keys_are_refused() {
        let mut cfg: ServerConfig =
            toml::from_str("bind = \"0.0.0.0:1\"\n[limits]\nmax_tokens = 7\n").unwrap();
        assert_eq!(
            (cfg.limits.max_tokens, cfg.limits.max_queue),
            (7, LimitsConfig::default().max_queue)
        );
        let args = ServeArgs {
            bind: Some("127.0.0.1:9".into()),
            max_queue: Some(3),
            ..Default::default()
        };
        args.apply(&mut cfg);
        assert_eq!(
            (
                cfg.bind.as_str(),
                cfg.limits.max_tokens,
                cfg.limits.max_queue
            ),
            ("127.0.0.1:9", 7, 3)
        );
        let err = toml::from_str::<ServerConfig>("[limits]\nmax_tokenz = 7\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_tokenz"), "{err}");
    }

    #[test]
    fn zero_limits_are_refused_by_name() {
        let mut cfg = ServerConfig::default();
        cfg.limits.max_queue = 0;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("limits.max_queue"));
    }
}
