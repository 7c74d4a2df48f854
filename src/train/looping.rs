//! The optimisation loop every decoder-side stage shares: AdamW over the
//! variables of one `VarMap`, linear warm-up then cosine decay, a progress
//! bar, and checkpoints that resume exactly.
//!
//! Invariants:
//! - a checkpoint folder holds `weights.safetensors`, `optimizer.safetensors`
//!   and `state.json`, the state written last (through a rename), so a folder
//!   with a state file always holds a whole checkpoint;
//! - the step function receives the step index and must be a pure function
//!   of it and the variables: then "train N, stop, resume, train to M"
//!   equals "train M".

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use candle_nn::{ParamsAdamW, VarMap};
use serde::{Deserialize, Serialize};

use super::vq_train::AdamW;

pub const WEIGHTS: &str = "weights.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "state.json";

/// Steps and learning-rate schedule of one stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub steps: u64,
    pub learning_rate: f64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_fraction: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    /// A checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
}

impl Schedule {
    pub fn lr_at(&self, step: u64) -> f64 {
        let peak = self.learning_rate;
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = peak * self.min_lr_fraction;
        min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// What a checkpoint's `state.json` records.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoopState {
    /// Steps completed.
    pub step: u64,
    /// Mean loss of each window of `LOG_WINDOW` steps, in order.
    #[serde(flatten)]
    pub losses: LossWindows,
    /// Seconds spent training, summed over resumed runs.
    pub seconds: f64,
    /// Tokens (or images) seen.
    pub items: u64,
}

/// Steps per entry of a [`LossWindows`] log.
pub const LOG_WINDOW: u64 = 25;

/// A run's loss log: the mean of each window of [`LOG_WINDOW`] steps. The
/// open window is kept with it in checkpoints, so a resumed run logs the
/// same means as one that never stopped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LossWindows {
    /// Closed windows' means, in order. (`reconstruction` in VQ checkpoints
    /// written in session 13.)
    #[serde(default, alias = "reconstruction")]
    pub loss_log: Vec<f32>,
    /// The open window: summed loss and steps.
    #[serde(default, alias = "window")]
    open: (f64, u64),
}

impl LossWindows {
    /// Adds one step's loss; returns the window's mean when this step
    /// closes it.
    pub fn add(&mut self, loss: f32) -> Option<f32> {
        self.open = (self.open.0 + loss as f64, self.open.1 + 1);
        if self.open.1 < LOG_WINDOW {
            return None;
        }
        self.close()
    }

    /// Closes the open window early (a run's last steps); returns its mean
    /// if it held any step.
    pub fn close(&mut self) -> Option<f32> {
        if self.open.1 == 0 {
            return None;
        }
        let mean = (self.open.0 / self.open.1 as f64) as f32;
        self.loss_log.push(mean);
        self.open = (0.0, 0);
        Some(mean)
    }
}

/// What one step returns: the loss to minimise and the items it covered.
pub struct StepOut {
    pub loss: Tensor,
    pub items: usize,
}

/// Runs `name`'s steps from where `dir`'s checkpoint stopped to
/// `schedule.steps`; returns the final state.
pub fn run(
    name: &str,
    varmap: &VarMap,
    schedule: &Schedule,
    dir: &Path,
    mut step_fn: impl FnMut(u64) -> Result<StepOut>,
) -> Result<LoopState> {
    let vars = {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    let params = ParamsAdamW {
        lr: schedule.learning_rate,
        weight_decay: schedule.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(vars, params)?;
    let mut state = LoopState::default();
    if dir.join(STATE).exists() {
        state = read_state(dir)?;
        let mut vm = varmap.clone();
        vm.load(dir.join(WEIGHTS))
            .with_context(|| format!("{}: cannot restore weights", dir.display()))?;
        opt.load(&dir.join(OPTIMIZER), state.step)?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let bar = super::progress::bar(name, schedule.steps, state.step);
    let started = Instant::now();
    let base_seconds = state.seconds;
    while state.step < schedule.steps {
        let step = state.step;
        opt.set_learning_rate(schedule.lr_at(step));
        let out = step_fn(step)?;
        let loss = out.loss.to_scalar::<f32>()?;
        anyhow::ensure!(
            loss.is_finite(),
            "{name}: loss became {loss} at step {step}"
        );
        let grads = out.loss.backward()?;
        opt.step(&grads)?;
        state.step += 1;
        state.items += out.items as u64;
        let mut closed = state.losses.add(loss);
        if state.step == schedule.steps {
            closed = closed.or_else(|| state.losses.close());
        }
        if let Some(mean) = closed {
            if bar.is_hidden() {
                eprintln!(
                    "{name}: step {}/{} loss {mean:.4} ({:.0} s)",
                    state.step,
                    schedule.steps,
                    base_seconds + started.elapsed().as_secs_f64()
                );
            }
        }
        bar.set_position(state.step);
        bar.set_message(format!("loss {loss:.4}"));
        let every = schedule.checkpoint_every;
        if state.step == schedule.steps || (every > 0 && state.step.is_multiple_of(every)) {
            state.seconds = base_seconds + started.elapsed().as_secs_f64();
            save(varmap, &opt, &state, dir)?;
        }
    }
    bar.finish();
    Ok(state)
}

pub fn read_state(dir: &Path) -> Result<LoopState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a training state", path.display()))
}

fn save(varmap: &VarMap, opt: &AdamW, state: &LoopState, dir: &Path) -> Result<()> {
    let tmp = |name: &str| dir.join(format!("{name}.tmp"));
    varmap.save(tmp(WEIGHTS))?;
    opt.save(&tmp(OPTIMIZER))?;
    std::fs::write(tmp(STATE), serde_json::to_string_pretty(state)?)?;
    for f in [WEIGHTS, OPTIMIZER, STATE] {
        std::fs::rename(tmp(f), dir.join(f))
            .with_context(|| format!("{}: cannot write {f}", dir.display()))?;
    }
    Ok(())
}
