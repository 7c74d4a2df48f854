//! `molora train <stage>`: the command line of the training pipeline.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use super::pipeline::{PipelineConfig, Run};
use super::{gate_train, stages, vq_stages};

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    pub stage: Stage,
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The model directory to fill (checkpoints go to <out>/checkpoints).
    #[arg(long, default_value = "models/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sizes and schedules: `demo` (the shipped model), `probe` (a few steps
    /// of each stage at demo sizes), `tiny` (seconds), or a JSON file (e.g.
    /// an edited copy of a run's checkpoints/pipeline.json).
    #[arg(long, default_value = "demo")]
    pub preset: String,
}

#[derive(Debug, Subcommand)]
pub enum Stage {
    /// BPE tokenizer on the world's text, image codes as added tokens.
    Tokenizer(Common),
    /// The VQ-VAE on shapes-world images, then the merge of close codes.
    Vq(Common),
    /// More steps for the VQ's decoder alone, codes unchanged.
    VqDecoder(Common),
    /// The base decoder on the mixture of every task.
    Base(Common),
    /// One LoRA adapter (text, image, math, code, caption), base frozen.
    Adapter {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// The gate over the semantic adapters, base and adapters frozen.
    Gate(Common),
    /// Every stage, resuming finished and interrupted ones; stages that do
    /// not read each other's products run side by side.
    All {
        /// Stages at once (0: one per core). The trained weights are the
        /// same for any value.
        #[arg(long, default_value_t = 0)]
        jobs: usize,
        #[command(flatten)]
        common: Common,
    },
}

fn run_of(c: &Common) -> Result<Run> {
    Ok(Run {
        out: c.out.clone(),
        seed: c.seed,
        cfg: PipelineConfig::preset(&c.preset)?,
        threads: 0,
    })
}

pub fn run(args: TrainArgs) -> Result<()> {
    let device = crate::server::device()?;
    match &args.stage {
        Stage::Tokenizer(c) => stages::tokenizer(&run_of(c)?),
        Stage::Vq(c) => vq_stages::vq(&run_of(c)?, &device),
        Stage::VqDecoder(c) => vq_stages::vq_decoder(&run_of(c)?, &device),
        Stage::Base(c) => stages::base(&run_of(c)?, &device),
        Stage::Adapter { name, common } => stages::adapter(&run_of(common)?, name, &device),
        Stage::Gate(c) => gate_train::gate(&run_of(c)?, &device),
        Stage::All { jobs, common } => stages::all(&run_of(common)?, &device, *jobs),
    }
}
