//! VQ training checkpoints: a folder with the weights (taming names, the
//! file `VqModel::load` reads), the AdamW moments, and a JSON state written
//! last, so that a folder with a state file always holds a whole checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::{RunLog, VqTrainConfig, VqTrainer};
use crate::model::vq::VqConfig;

pub const CHECKPOINT_WEIGHTS: &str = "vq.safetensors";
pub const CHECKPOINT_OPTIMIZER: &str = "optimizer.safetensors";
pub const CHECKPOINT_STATE: &str = "state.json";

#[derive(Debug, Serialize, Deserialize)]
struct State {
    step: u64,
    seed: u64,
    optimizer_step: u64,
    /// Uses of each code since the last dead-code check.
    code_usage: Vec<u64>,
    vq_config: VqConfig,
    train_config: VqTrainConfig,
    /// Absent in checkpoints written before session 13.
    #[serde(default)]
    log: RunLog,
}

/// `path` with `.tmp` appended: written first, then renamed over `path`.
fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path)
        .with_context(|| format!("moving {} to {}", tmp.display(), path.display()))
}

pub(super) fn save_weights(varmap: &VarMap, path: &Path) -> Result<()> {
    let tmp = temp_path(path);
    varmap
        .save(&tmp)
        .with_context(|| format!("writing VQ weights {}", tmp.display()))?;
    rename_into_place(&tmp, path)
}

pub(super) fn save(trainer: &VqTrainer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating checkpoint folder {}", dir.display()))?;
    save_weights(&trainer.varmap, &dir.join(CHECKPOINT_WEIGHTS))?;
    let opt_path = dir.join(CHECKPOINT_OPTIMIZER);
    let opt_tmp = temp_path(&opt_path);
    trainer.opt.save(&opt_tmp)?;
    rename_into_place(&opt_tmp, &opt_path)?;
    let state = State {
        step: trainer.step,
        seed: trainer.tcfg.seed,
        optimizer_step: trainer.opt.step_count(),
        code_usage: trainer.usage.clone(),
        vq_config: trainer.cfg.clone(),
        train_config: trainer.tcfg.clone(),
        log: trainer.log.clone(),
    };
    let state_path = dir.join(CHECKPOINT_STATE);
    let state_tmp = temp_path(&state_path);
    std::fs::write(&state_tmp, serde_json::to_string_pretty(&state)?)
        .with_context(|| format!("writing {}", state_tmp.display()))?;
    rename_into_place(&state_tmp, &state_path)
}

pub(super) fn restore(trainer: &mut VqTrainer, dir: &Path) -> Result<()> {
    let state_path = dir.join(CHECKPOINT_STATE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("reading checkpoint state {}", state_path.display()))?;
    let state: State = serde_json::from_str(&text)
        .with_context(|| format!("parsing checkpoint state {}", state_path.display()))?;
    if state.vq_config != trainer.cfg {
        bail!(
            "checkpoint {} was trained with another vq_config: {}",
            state_path.display(),
            serde_json::to_string(&state.vq_config)?
        );
    }
    if state.seed != trainer.tcfg.seed {
        bail!(
            "checkpoint {} has seed {}, but this run asks for seed {}",
            state_path.display(),
            state.seed,
            trainer.tcfg.seed
        );
    }
    if state.code_usage.len() != trainer.cfg.num_embeddings {
        bail!(
            "checkpoint {}: `code_usage` has {} entries, expected {}",
            state_path.display(),
            state.code_usage.len(),
            trainer.cfg.num_embeddings
        );
    }
    load_weights(&trainer.varmap, &dir.join(CHECKPOINT_WEIGHTS))?;
    trainer
        .opt
        .load(&dir.join(CHECKPOINT_OPTIMIZER), state.optimizer_step)?;
    trainer.step = state.step;
    trainer.usage = state.code_usage;
    trainer.log = state.log;
    Ok(())
}

/// Sets every variable from `path`, naming the tensor that is missing or
/// has the wrong shape.
fn load_weights(varmap: &VarMap, path: &Path) -> Result<()> {
    let device = candle_core::Device::Cpu;
    let mut tensors = candle_core::safetensors::load(path, &device)
        .with_context(|| format!("reading VQ weights {}", path.display()))?;
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let t = tensors
            .remove(name.as_str())
            .with_context(|| format!("VQ weights {}: missing tensor `{name}`", path.display()))?;
        if t.shape() != var.shape() {
            bail!(
                "VQ weights {}: tensor `{name}` has shape {:?}, expected {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}
