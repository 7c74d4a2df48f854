//! Where a result came from: the date, the machine, the size of the model
//! directory; and the EVAL.md page that keeps a run with its command.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Bytes a model directory ships: every regular file under `dir` but the
/// training pipeline's `checkpoints/`, which a run leaves beside the model
/// and nobody serves.
pub fn model_bytes(dir: &Path) -> Result<u64> {
    let checkpoints = dir.join(crate::train::pipeline::CHECKPOINTS_DIR);
    let all = dir_bytes(dir)?;
    Ok(match checkpoints.is_dir() {
        true => all - dir_bytes(&checkpoints)?,
        false => all,
    })
}

/// Bytes of every regular file under `dir` (symlinks not followed).
pub fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += dir_bytes(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// "2026-11-25 21:50 UTC" for a Unix time.
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60
    )
}

pub fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_date(secs)
}

/// "<cpu model>, N cores" from /proc/cpuinfo where available.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores ({})", std::env::consts::OS)
}

/// The EVAL.md page: how the numbers were made, then the tables.
pub fn eval_page(command: &str, model_dir: &Path, wall_s: f64, tables: &str) -> String {
    format!(
        "# Evaluation\n\n\
         Produced by `molora eval` (src/eval/); rerun it to reproduce these numbers.\n\n\
         - command: `{command}`\n\
         - model: `{}`\n\
         - date: {}\n\
         - machine: {} (CPU only)\n\
         - wall time: {wall_s:.0} s\n\n\
         Decoding is greedy (text and images) unless the command sets \
         `--image-temperature`, without classifier-free guidance unless it sets \
         `--cfg-scale`; every prompt is held out (test split by content key). \
         `per_sequence` forces the adapters of the answer's first domain on the whole \
         request, as a per-sequence server would route it.\n\n{tables}",
        model_dir.display(),
        now_utc(),
        machine(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        // 2000-02-29 12:34 (a leap day).
        assert_eq!(utc_date(951_827_640), "2000-02-29 12:34 UTC");
        assert_eq!(utc_date(1_795_629_600), "2026-11-25 18:00 UTC");
    }

    #[test]
    fn a_models_size_leaves_out_training_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), [0u8; 300]).unwrap();
        std::fs::create_dir(dir.path().join("adapters")).unwrap();
        std::fs::write(dir.path().join("adapters/a.safetensors"), [0u8; 20]).unwrap();
        assert_eq!(model_bytes(dir.path()).unwrap(), 320);
        let base = dir.path().join("checkpoints/base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("step.safetensors"), [0u8; 4000]).unwrap();
        assert_eq!(dir_bytes(dir.path()).unwrap(), 4320);
        assert_eq!(model_bytes(dir.path()).unwrap(), 320);
    }
}
