//! `molora eval`: the quality evaluation of a model directory, measured not
//! looked at (issue 3, item 4).
//!
//! One run:
//! 1. the image pipeline, mode-independent ([`image_checks`]): the pixel
//!    checker on ground-truth renderings (≥ 99% there before it judges any
//!    generated picture), on VQ reconstructions, and the VQ PSNR;
//! 2. teacher-forced held-out sequences ([`teacher`]): each adapter against
//!    base on its own domain's tokens;
//! 3. per routing mode: held-out prompts of every task generated through the
//!    engine ([`generation`], [`tasks`]) and scored by the world's scorer,
//!    plus the gate's routing accuracy on domain-labelled tokens;
//! 4. tables ([`report`]): targets, pipeline, adapters, one per mode.
//!
//! Invariants: everything is deterministic from `--seed` (greedy decoding
//! by default); every prompt is held out ([`crate::train::data::Split::Test`]);
//! every mode sees the same prompts.

pub mod generation;
pub mod image_checks;
pub mod model;
pub mod provenance;
pub mod report;
pub mod targets;
pub mod tasks;
pub mod teacher;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::routing::mode::RoutingMode;
use generation::Decoding;
use model::EvalModel;
use report::{EvalReport, ModeResult};

/// Sequences the engine runs at once during the evaluation.
const EVAL_BATCH: usize = 32;

/// Held-out items per generation row unless `--n` says otherwise.
pub const DEFAULT_N: usize = 400;

/// `molora eval` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// The model directory to evaluate.
    #[arg(long, default_value = "models/demo")]
    pub model: PathBuf,
    /// Held-out items per generation row (draw, arithmetic, code, caption,
    /// mixed, unseen-pair drawings); the teacher-forced sequences take half
    /// as many per task. The default gives each mixed-request kind 100
    /// prompts (a rate's standard error ~5 points) and keeps a run on the
    /// demo model within about five minutes on two cores.
    #[arg(long, default_value_t = DEFAULT_N)]
    pub n: usize,
    /// Scenes the checker is validated on (ground-truth renderings).
    #[arg(long, default_value_t = 1000)]
    pub checker_n: usize,
    /// Scenes VQ-encoded and decoded for the PSNR and the checker on
    /// reconstructions (the first of the checker's scenes).
    #[arg(long, default_value_t = 200)]
    pub vq_n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Routing modes to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single_pass,per_modality_pass,per_sequence,base"
    )]
    pub modes: Vec<RoutingMode>,
    /// Sample image codes at this temperature (top-k 100) instead of greedily.
    #[arg(long, default_value_t = 0.0)]
    pub image_temperature: f32,
    /// Classifier-free guidance for image codes (the service's `cfg_scale`;
    /// 1 = off): each picture also runs an unconditional twin.
    #[arg(long, default_value_t = 1.0)]
    pub cfg_scale: f32,
    /// One JSON object (report and targets) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also write the tables, the command line, model, date and machine here
    /// (e.g. EVAL.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also save a few pictures here: VQ reconstructions beside their
    /// renderings, and each mode's first drawings named by their caption.
    #[arg(long)]
    pub save_images: Option<PathBuf>,
    /// Print the first N prompts (3 when N is left out) of every row with
    /// what the model produced and its verdict (stderr), for each mode.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "3")]
    pub show: Option<usize>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl EvalArgs {
    /// The defaults, for a model directory (tests and library callers).
    pub fn for_model(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            n: DEFAULT_N,
            checker_n: 1000,
            vq_n: 200,
            seed: 0,
            modes: RoutingMode::ALL.to_vec(),
            image_temperature: 0.0,
            cfg_scale: 1.0,
            json: false,
            out: None,
            save_images: None,
            show: None,
            quiet: true,
        }
    }
}

/// Runs the whole evaluation.
pub fn run(args: &EvalArgs) -> Result<EvalReport> {
    if args.n == 0 || args.checker_n == 0 || args.vq_n == 0 {
        bail!("--n, --checker-n and --vq-n must be at least 1");
    }
    if !(args.image_temperature.is_finite() && args.image_temperature >= 0.0) {
        bail!(
            "--image-temperature must be >= 0. Given: {}",
            args.image_temperature
        );
    }
    if !(args.cfg_scale.is_finite() && args.cfg_scale >= 1.0) {
        bail!(
            "--cfg-scale must be >= 1 (1 = off). Given: {}",
            args.cfg_scale
        );
    }
    let start = Instant::now();
    let say = |what: &str| {
        if !args.quiet {
            eprintln!("[eval {:6.1} s] {what}", start.elapsed().as_secs_f64());
        }
    };
    let mut model = EvalModel::load(&args.model)?;
    say("model loaded");

    let scenes = image_checks::held_out_scenes(args.checker_n.max(args.vq_n), args.seed);
    let checker_ground_truth = image_checks::checker_on_ground_truth(&scenes[..args.checker_n]);
    say("checker on ground truth done");
    let vq = match model.vq {
        Some(_) => Some(image_checks::checker_on_vq(&model, &scenes[..args.vq_n])?),
        None => None,
    };
    say("VQ reconstructions done");

    // Teacher-forced losses average over many tokens per sequence: half the
    // generation rows' count is plenty.
    let (seqs, seq_tasks) = teacher::held_out_sequences(&model, args.n.div_ceil(2), args.seed)?;
    let adapter_rows = model.adapters.clone();
    let adapters = teacher::adapters_vs_base(&mut model.runner, &adapter_rows, &seqs)?;
    say("adapters against base done");

    let suite = tasks::build_suite(&model, args.n, args.seed)?;
    let engine = model.start_engine(suite.items.len(), EVAL_BATCH)?;
    let decoding = Decoding {
        image_temperature: args.image_temperature,
        cfg_scale: args.cfg_scale,
        seed: args.seed,
    };
    let mut modes = Vec::new();
    for &mode in &args.modes {
        let scores = tasks::run_suite(
            &model,
            &engine,
            &suite,
            mode,
            decoding,
            args.show.unwrap_or(0),
        )?;
        let gate = teacher::gate_accuracy(&mut model.runner, &seqs, &seq_tasks, mode)?;
        say(&format!(
            "{mode}: {} tokens generated in {:.1} s",
            scores.generated_tokens, scores.wall_s
        ));
        if args.show.is_some() {
            for line in &scores.shown {
                eprintln!("  [{mode}] {line}");
            }
        }
        modes.push(ModeResult {
            mode,
            tasks: scores,
            gate,
        });
    }
    Ok(EvalReport {
        model_dir: args.model.display().to_string(),
        model_bytes: provenance::model_bytes(&args.model)?,
        n: args.n,
        seed: args.seed,
        image_temperature: args.image_temperature,
        cfg_scale: args.cfg_scale,
        checker_ground_truth,
        vq,
        adapters,
        modes,
        wall_s: start.elapsed().as_secs_f64(),
    })
}

/// The command: runs, prints, and writes `--out`.
pub fn cli(args: EvalArgs) -> Result<()> {
    let report = run(&args)?;
    let tables = report::markdown(&report);
    if args.json {
        let out = serde_json::json!({
            "report": report,
            "targets": targets::targets(&report),
        });
        println!("{out}");
    } else {
        print!("{tables}");
    }
    if let Some(dir) = &args.save_images {
        save_images(&report, dir)?;
    }
    if let Some(path) = &args.out {
        let command: Vec<String> = std::env::args().collect();
        let page = provenance::eval_page(&command.join(" "), &args.model, report.wall_s, &tables);
        std::fs::write(path, page).with_context(|| format!("{}: cannot write", path.display()))?;
        if !args.quiet {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Writes the pictures kept by the report as PNG files under `dir`.
fn save_images(report: &EvalReport, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let save = |name: String, img: &image::RgbImage| -> Result<()> {
        if img.width() == 0 {
            return Ok(()); // an incomplete image block: nothing to show
        }
        let path = dir.join(name);
        img.save(&path)
            .with_context(|| format!("{}: cannot write", path.display()))
    };
    if let Some(vq) = &report.vq {
        for (i, (render, recon)) in vq.samples.iter().enumerate() {
            save(format!("vq-{i}-rendering.png"), render)?;
            save(format!("vq-{i}-reconstruction.png"), recon)?;
        }
    }
    for m in &report.modes {
        for (i, (caption, img)) in m.tasks.drawings.iter().enumerate() {
            let caption = caption.replace(' ', "_");
            save(format!("{}-{i}-{caption}.png", m.mode), img)?;
        }
    }
    Ok(())
}
