//! The `molora` command line: serve, generate, benchmark, make models.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use molora::bench::{self, BenchOptions};
use molora::random_model::{write_random_model, RandomModelSpec};
use molora::server::config::ServeArgs;

#[derive(Parser)]
#[command(
    name = "molora",
    version,
    about = "Multimodal generation with per-token adapter routing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and the playground (reads configs/server.toml when
    /// present; every field can be overridden by a flag).
    Serve(ServeArgs),
    /// Run a batch file (JSONL `{custom_id, body}` lines) offline on the local
    /// model; resumable: rerun the same command after an interruption.
    Batch(molora::batch::cli::BatchArgs),
    /// Write a random-initialised model directory (config, weights, tokenizer,
    /// modality and semantic adapters, gate).
    InitRandom {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 256)]
        hidden: usize,
        #[arg(long, default_value_t = 6)]
        layers: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 4)]
        kv_heads: usize,
        #[arg(long, default_value_t = 704)]
        intermediate: usize,
        #[arg(long, default_value_t = 1000)]
        text_vocab: usize,
        #[arg(long, default_value_t = 512)]
        image_codes: usize,
        /// Modalities beyond text and image, each with its own code range.
        #[arg(long, value_delimiter = ',')]
        extra_modalities: Vec<String>,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Semantic adapters the gate picks from.
        #[arg(long, value_delimiter = ',', default_value = "math,code,caption,chat")]
        semantic: Vec<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a taming-transformers VQGAN state dict (exported to
    /// safetensors) into a model directory's vqgan.safetensors, validated.
    ConvertVqgan {
        /// The exported state dict (.safetensors).
        input: PathBuf,
        /// Output folder: a model directory, or any folder.
        #[arg(long)]
        out: PathBuf,
        /// VQ config JSON (Chameleon's vq_config or taming's); default: the
        /// output model's config.json vq_config.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Train the demo model, one stage or all (`molora train all --out models/demo`).
    Train(molora::train::cli::TrainArgs),
    /// Measure a model's quality: pictures read back by the pixel checker,
    /// exact match per text domain and on mixed requests, gate routing
    /// accuracy, each adapter against base; one table per routing mode.
    Eval(molora::eval::EvalArgs),
    /// Benchmark routing modes, LoRA overhead and decode speed on random models
    /// of the demo size; prints tables (or JSON lines).
    Bench {
        /// One JSON object per line instead of tables.
        #[arg(long)]
        json: bool,
        /// A tiny model and few steps (a smoke run).
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 192)]
        seq_len: usize,
        #[arg(long, default_value_t = 32)]
        decode_steps: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any other thread exists; serving runs candle's element-wise ops inline.
    let serving = matches!(cli.command, Command::Serve(_) | Command::Batch(_));
    molora::dispatch::threading::pin_candle_threads(serving);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn try_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => molora::server::serve(args.resolve()?),
        Command::Batch(args) => molora::batch::cli::run(&args),
        Command::Train(args) => molora::train::cli::run(args),
        Command::InitRandom {
            out,
            hidden,
            layers,
            heads,
            kv_heads,
            intermediate,
            text_vocab,
            image_codes,
            extra_modalities,
            rank,
            semantic,
            seed,
        } => {
            let spec = RandomModelSpec {
                hidden_size: hidden,
                num_layers: layers,
                num_heads: heads,
                num_kv_heads: kv_heads,
                intermediate_size: intermediate,
                text_vocab,
                image_codes,
                extra_modalities,
                lora_rank: rank,
                lora_alpha: 2.0 * rank as f64,
                semantic_adapters: semantic.into_iter().filter(|s| !s.is_empty()).collect(),
                seed,
                ..RandomModelSpec::default()
            };
            let cfg = write_random_model(&out, &spec)?;
            println!(
                "wrote {} (vocab {}, d {}, {} layers)",
                out.display(),
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.num_hidden_layers
            );
            Ok(())
        }
        Command::ConvertVqgan { input, out, config } => {
            let report = molora::convert_vqgan::convert_vqgan(&input, &out, config.as_deref())?;
            println!("{report}");
            Ok(())
        }
        Command::Eval(args) => molora::eval::cli(args),
        Command::Bench {
            json,
            quick,
            seq_len,
            decode_steps,
            repeats,
        } => {
            let opts = if quick {
                BenchOptions::quick()
            } else {
                BenchOptions {
                    quick: false,
                    seq_len,
                    decode_steps,
                    repeats,
                }
            };
            anyhow::ensure!(
                opts.decode_steps < opts.seq_len,
                "--decode-steps ({}) must be below --seq-len ({})",
                opts.decode_steps,
                opts.seq_len
            );
            let rows = bench::run(&opts)?;
            if json {
                for r in &rows {
                    println!("{r}");
                }
            } else {
                bench::print_tables(&rows);
            }
            Ok(())
        }
    }
}
