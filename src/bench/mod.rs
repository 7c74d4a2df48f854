//! `molora bench`: single-pass routing against per-modality passes, routed
//! LoRA against the bare base model, and batch-1 decode against the floor the
//! machine allows. Every ratio is measured in the same run on the same model.

mod cpu_time;
mod floor;
mod workload;

use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::adapters::hot_set::HotSetConfig;
use crate::engine::runner::{AdapterSelection, ModelRunner, SeqStep};
use crate::model::kv_cache::KvCache;
use crate::random_model::{write_random_model, RandomModelSpec, ADAPTERS_DIR};
use crate::routing::mode::RoutingMode;

pub use cpu_time::cpu_seconds;
pub use workload::interleaved_sequence;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Tiny model and few steps: a smoke run for tests.
    pub quick: bool,
    /// Tokens per benchmark sequence.
    pub seq_len: usize,
    /// Decode steps timed per measurement.
    pub decode_steps: usize,
    /// Measurements per figure; the fastest is kept.
    pub repeats: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            quick: false,
            seq_len: 192,
            decode_steps: 32,
            repeats: 3,
        }
    }
}

impl BenchOptions {
    pub fn quick() -> Self {
        Self {
            quick: true,
            seq_len: 48,
            decode_steps: 4,
            repeats: 1,
        }
    }

    fn spec(&self, k: usize) -> RandomModelSpec {
        let mut spec = RandomModelSpec::default();
        if self.quick {
            spec = RandomModelSpec {
                hidden_size: 32,
                num_layers: 2,
                num_heads: 2,
                num_kv_heads: 2,
                intermediate_size: 64,
                text_vocab: 300,
                image_codes: 64,
                image_grid_side: 4,
                lora_rank: 4,
                gate_hidden: 8,
                max_position_embeddings: 256,
                ..spec
            };
        }
        spec.extra_modalities = ["audio", "video"]
            .iter()
            .take(k.saturating_sub(2))
            .map(|s| s.to_string())
            .collect();
        spec
    }
}

/// Runs every benchmark; returns one JSON object per table row.
pub fn run(opts: &BenchOptions) -> Result<Vec<Value>> {
    let dir = tempfile::tempdir()?;
    let mut rows = vec![];
    for k in [2, 4] {
        let model_dir = dir.path().join(format!("k{k}"));
        let spec = opts.spec(k);
        write_random_model(&model_dir, &spec)?;
        let mut bench = ModelBench::open(&model_dir, &spec, opts)?;
        for phase in ["prefill", "decode"] {
            for batch in [1, 16] {
                let single = bench.throughput(RoutingMode::SinglePass, phase, batch, k)?;
                let multi = bench.throughput(RoutingMode::PerModalityPass, phase, batch, k)?;
                rows.push(json!({
                    "bench": "modes", "k": k, "phase": phase, "batch": batch,
                    "single_pass_tok_s": single, "per_modality_pass_tok_s": multi,
                    "ratio": single / multi, "target_ratio": 0.9 * k as f64,
                }));
            }
        }
        if k == 2 {
            for batch in [1, 16] {
                rows.push(bench.lora_overhead(batch)?);
            }
            rows.extend(bench.floor_rows()?);
        }
    }
    Ok(rows)
}

struct ModelBench<'a> {
    runner: ModelRunner,
    selection: AdapterSelection,
    base: AdapterSelection,
    opts: &'a BenchOptions,
    spec: RandomModelSpec,
}

impl<'a> ModelBench<'a> {
    fn open(
        model_dir: &std::path::Path,
        spec: &RandomModelSpec,
        opts: &'a BenchOptions,
    ) -> Result<Self> {
        let adapters = 2 + spec.extra_modalities.len() + spec.semantic_adapters.len();
        let hot = HotSetConfig {
            capacity: adapters,
            max_rank: spec.lora_rank,
        };
        let (mut runner, refused) =
            ModelRunner::load(model_dir, &model_dir.join(ADAPTERS_DIR), hot, &Device::Cpu)?;
        anyhow::ensure!(refused.is_empty(), "bench adapters refused: {refused:?}");
        let selection = runner.default_selection()?;
        Ok(Self {
            runner,
            selection,
            base: AdapterSelection::default(),
            opts,
            spec: spec.clone(),
        })
    }

    fn sequences(&self, batch: usize, k: usize) -> Vec<Vec<u32>> {
        (0..batch)
            .map(|i| interleaved_sequence(&self.runner.vocab, k, self.opts.seq_len, i as u64))
            .collect()
    }

    fn caches(
        &self,
        mode: RoutingMode,
        sel: &AdapterSelection,
        batch: usize,
    ) -> Result<(Vec<KvCache>, Vec<Vec<usize>>)> {
        let per = ModelRunner::caches_needed(mode, sel);
        let pool = (0..batch * per)
            .map(|_| self.runner.new_cache())
            .collect::<Result<Vec<_>>>()?;
        let ids = (0..batch)
            .map(|b| (b * per..(b + 1) * per).collect())
            .collect();
        Ok((pool, ids))
    }

    /// Tokens per second of `mode` in `phase`, the best of `repeats` runs.
    fn throughput(&self, mode: RoutingMode, phase: &str, batch: usize, k: usize) -> Result<f64> {
        let seqs = self.sequences(batch, k);
        let mut best = Duration::MAX;
        let mut tokens = 0;
        for _ in 0..self.opts.repeats {
            let (t, n) = match phase {
                "prefill" => self.time_prefill(mode, &self.selection, &seqs)?,
                _ => self.time_decode(mode, &self.selection, &seqs)?,
            };
            best = best.min(t);
            tokens = n;
        }
        Ok(tokens as f64 / best.as_secs_f64())
    }

    fn time_prefill(
        &self,
        mode: RoutingMode,
        sel: &AdapterSelection,
        seqs: &[Vec<u32>],
    ) -> Result<(Duration, usize)> {
        let (mut pool, ids) = self.caches(mode, sel, seqs.len())?;
        let steps: Vec<SeqStep> = seqs
            .iter()
            .zip(&ids)
            .map(|(s, c)| SeqStep {
                tokens: s,
                mode,
                adapters: sel,
                caches: c,
            })
            .collect();
        let start = Instant::now();
        self.runner.forward(&steps, &mut pool)?;
        Ok((start.elapsed(), seqs.iter().map(Vec::len).sum()))
    }

    /// Prefills all but the last `decode_steps` tokens, then times decoding
    /// those one token per sequence per step (teacher-forced, so the
    /// modalities keep interleaving).
    fn time_decode(
        &self,
        mode: RoutingMode,
        sel: &AdapterSelection,
        seqs: &[Vec<u32>],
    ) -> Result<(Duration, usize)> {
        let (mut pool, ids) = self.caches(mode, sel, seqs.len())?;
        let prefix = self.opts.seq_len - self.opts.decode_steps;
        let steps: Vec<SeqStep> = seqs
            .iter()
            .zip(&ids)
            .map(|(s, c)| SeqStep {
                tokens: &s[..prefix],
                mode,
                adapters: sel,
                caches: c,
            })
            .collect();
        self.runner.forward(&steps, &mut pool)?;
        let start = Instant::now();
        for pos in prefix..self.opts.seq_len {
            let steps: Vec<SeqStep> = seqs
                .iter()
                .zip(&ids)
                .map(|(s, c)| SeqStep {
                    tokens: &s[pos..pos + 1],
                    mode,
                    adapters: sel,
                    caches: c,
                })
                .collect();
            self.runner.forward(&steps, &mut pool)?;
        }
        Ok((start.elapsed(), seqs.len() * self.opts.decode_steps))
    }

    /// Routed LoRA (modality adapter + top-2 gate) against no adapters, decode.
    fn lora_overhead(&self, batch: usize) -> Result<Value> {
        let seqs = self.sequences(batch, 2);
        let (mut t_base, mut t_routed) = (Duration::MAX, Duration::MAX);
        let mut n = 0;
        for _ in 0..self.opts.repeats {
            let (t, tokens) = self.time_decode(RoutingMode::Base, &self.base, &seqs)?;
            t_base = t_base.min(t);
            n = tokens;
            t_routed = t_routed.min(
                self.time_decode(RoutingMode::SinglePass, &self.selection, &seqs)?
                    .0,
            );
        }
        let adapters_per_token = self.adapters_per_token(&seqs)?;
        let flops = floor::Flops::of(
            self.runner.decoder.config(),
            self.spec.lora_rank,
            self.opts.seq_len,
            self.runner.decoder.weight_dtype(),
        );
        let arithmetic = 1.0 + adapters_per_token * flops.lora_per_adapter / flops.base_per_token;
        let measured = t_routed.as_secs_f64() / t_base.as_secs_f64();
        Ok(json!({
            "bench": "lora_overhead", "batch": batch,
            "base_tok_s": n as f64 / t_base.as_secs_f64(),
            "routed_tok_s": n as f64 / t_routed.as_secs_f64(),
            "measured_ratio": measured, "arithmetic_ratio": arithmetic,
            "adapters_per_token": adapters_per_token,
            "measured_over_arithmetic": measured / arithmetic,
            "target": if batch == 1 { 1.3 } else { 1.1 },
        }))
    }

    /// Adapters applied per decoded token, counted from the router's plans.
    fn adapters_per_token(&self, seqs: &[Vec<u32>]) -> Result<f64> {
        let (mut pool, ids) = self.caches(RoutingMode::SinglePass, &self.selection, seqs.len())?;
        let prefix = self.opts.seq_len - self.opts.decode_steps;
        let steps: Vec<SeqStep> = seqs
            .iter()
            .zip(&ids)
            .map(|(s, c)| SeqStep {
                tokens: &s[prefix..],
                mode: RoutingMode::SinglePass,
                adapters: &self.selection,
                caches: c,
            })
            .collect();
        let out = self.runner.forward(&steps, &mut pool)?;
        let assigned: f64 = out.report.rows_per_adapter.values().sum();
        Ok(assigned / out.report.rows_processed as f64)
    }

    /// Batch-1 decode without adapters next to the floor from bytes and
    /// FLOPs, with the projection weights stored in f32 and then in f16
    /// (this leaves the runner's weights in f16).
    fn floor_rows(&mut self) -> Result<Vec<Value>> {
        let mut rows = vec![];
        for dtype in [DType::F32, DType::F16] {
            self.runner.decoder.set_weight_dtype(dtype)?;
            let seqs = self.sequences(1, 2);
            let mut best = Duration::MAX;
            let mut n = 0;
            for _ in 0..self.opts.repeats {
                let (t, tokens) = self.time_decode(RoutingMode::Base, &self.base, &seqs)?;
                best = best.min(t);
                n = tokens;
            }
            let tok_s = n as f64 / best.as_secs_f64();
            let cfg = self.runner.decoder.config();
            let flops = floor::Flops::of(cfg, self.spec.lora_rank, self.opts.seq_len, dtype);
            let machine = floor::Machine::measure(flops.weight_bytes)?;
            let floor_s = (flops.bytes_per_token / machine.bytes_per_s)
                .max(flops.base_per_token / machine.flops_per_s);
            rows.push(json!({
                "bench": "decode_floor", "batch": 1, "weights": format!("{dtype:?}").to_lowercase(),
                "tok_s": tok_s, "floor_tok_s": 1.0 / floor_s,
                "bytes_per_token": flops.bytes_per_token, "flops_per_token": flops.base_per_token,
                "measured_gb_s": machine.bytes_per_s / 1e9, "measured_gflop_s": machine.flops_per_s / 1e9,
                "parameters": flops.parameters, "target_tok_s": 1000.0,
            }));
        }
        Ok(rows)
    }
}

/// Prints the rows as human-readable tables.
pub fn print_tables(rows: &[Value]) {
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    println!("single_pass vs per_modality_pass (interleaved sequences; target ratio >= 0.9 K)");
    println!(
        "{:>3} {:>8} {:>6} {:>18} {:>24} {:>7} {:>7}",
        "K", "phase", "batch", "single_pass tok/s", "per_modality_pass tok/s", "ratio", "target"
    );
    for r in rows.iter().filter(|r| r["bench"] == "modes") {
        println!(
            "{:>3} {:>8} {:>6} {:>18.0} {:>24.0} {:>7.2} {:>7.2}",
            u(r, "k"),
            r["phase"].as_str().unwrap_or(""),
            u(r, "batch"),
            f(r, "single_pass_tok_s"),
            f(r, "per_modality_pass_tok_s"),
            f(r, "ratio"),
            f(r, "target_ratio")
        );
    }
    println!("\nrouted LoRA (modality adapter + top-2 gate) over base, decode");
    println!(
        "{:>6} {:>11} {:>13} {:>9} {:>11} {:>10} {:>8} {:>7}",
        "batch",
        "base tok/s",
        "routed tok/s",
        "measured",
        "arithmetic",
        "adapters/t",
        "meas/ari",
        "target"
    );
    for r in rows.iter().filter(|r| r["bench"] == "lora_overhead") {
        println!(
            "{:>6} {:>11.0} {:>13.0} {:>9.3} {:>11.3} {:>10.2} {:>8.3} {:>7.2}",
            u(r, "batch"),
            f(r, "base_tok_s"),
            f(r, "routed_tok_s"),
            f(r, "measured_ratio"),
            f(r, "arithmetic_ratio"),
            f(r, "adapters_per_token"),
            f(r, "measured_over_arithmetic"),
            f(r, "target")
        );
    }
    println!("\nbatch-1 decode against the floor (no adapters)");
    for r in rows.iter().filter(|r| r["bench"] == "decode_floor") {
        println!(
            "{} weights: tok/s {:.0}   floor {:.0} tok/s   ({:.1} MB/token at {:.1} GB/s; {:.1} MFLOP/token at {:.1} GFLOP/s; {:.2}M parameters)   target {:.0}",
            r["weights"].as_str().unwrap_or(""), f(r, "tok_s"), f(r, "floor_tok_s"), f(r, "bytes_per_token") / 1e6, f(r, "measured_gb_s"),
            f(r, "flops_per_token") / 1e6, f(r, "measured_gflop_s"), f(r, "parameters") / 1e6, f(r, "target_tok_s")
        );
    }
}
