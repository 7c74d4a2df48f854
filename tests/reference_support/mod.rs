//! Reading the golden fixtures under tests/fixtures and comparing against them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use molora::adapters::hot_set::HotSetConfig;
use molora::engine::runner::ModelRunner;

/// The tolerance of the issue: max |a - b| / max |b|.
pub const REL_TOL: f32 = 1e-4;

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// `tests/fixtures/reference/NAME.safetensors`, every tensor on the CPU.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixture(&format!("reference/{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `input_ids_0`, `input_ids_1`, ... as u32 sequences.
pub fn input_ids(refs: &HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    (0..)
        .map_while(|i| refs.get(&format!("input_ids_{i}")))
        .map(token_ids)
        .collect()
}

/// A 1-D int64 tensor of token ids (torch's dtype for them) as u32.
pub fn token_ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let a = a.to_vec1::<f32>().unwrap();
    let b = b.to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len(), "shapes differ");
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    diff / scale.max(f32::MIN_POSITIVE)
}

pub fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let r = rel_diff(got, want);
    eprintln!("{what}: relative difference {r:.1e}");
    assert!(
        r <= REL_TOL,
        "{what}: relative difference {r:e} > {REL_TOL:e}"
    );
}

/// The swin checkpoint with its two PEFT adapters (adapters/text, adapters/image).
pub fn swin_runner() -> ModelRunner {
    let dir = fixture("chameleon_swin");
    let hot = HotSetConfig {
        capacity: 4,
        max_rank: 8,
    };
    let (runner, refused) =
        ModelRunner::load(&dir, &dir.join("adapters"), hot, &Device::Cpu).unwrap();
    assert!(refused.is_empty(), "refused adapters: {refused:?}");
    runner
}

/// A copy of a fixture's config.json, edited, in a fresh temp folder.
pub fn edited_config(
    fixture_dir: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(fixture(&format!("{fixture_dir}/config.json"))).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    (dir, path)
}

/// Copies every plain file of a fixture directory into `to`.
pub fn copy_files(fixture_dir: &str, to: &Path) {
    for entry in std::fs::read_dir(fixture(fixture_dir)).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}
