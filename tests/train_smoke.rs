//! Every stage of `molora train` for a few steps on tiny sizes, then the
//! model directory loads the way `serve` loads it, a second `all` resumes
//! instead of retraining, and stages run side by side write the same bytes
//! as stages run one at a time.

use candle_core::Device;
use molora::adapters::HotSetConfig;
use molora::engine::runner::ModelRunner;
use molora::train::pipeline::{PipelineConfig, Run, TRAIN_LOG};
use molora::train::stages;

#[test]
fn every_stage_runs_and_the_model_directory_serves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    let mut cfg = PipelineConfig::tiny();
    // One adapter's own step count overrides its schedule's.
    cfg.adapter_steps.insert("code".into(), 1);
    let run = Run {
        out: out.clone(),
        seed: 7,
        cfg,
        // Two cores shared by two stages, even on a one-core machine.
        threads: 2,
    };
    let dev = Device::Cpu;
    stages::all(&run, &dev, 2).unwrap();

    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vqgan.safetensors",
        "gate_config.json",
        "gate.safetensors",
        TRAIN_LOG,
        stages::RECIPE_FILE,
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    // The recipe beside the model retrains it.
    let recipe = out.join(stages::RECIPE_FILE);
    assert_eq!(
        PipelineConfig::preset(recipe.to_str().unwrap()).unwrap(),
        run.cfg
    );
    let hot = HotSetConfig {
        capacity: 8,
        max_rank: 16,
    };
    let (runner, refused) = ModelRunner::load(&out, &out.join("adapters"), hot, &dev).unwrap();
    assert!(refused.is_empty(), "refused adapters: {refused:?}");
    assert!(runner.gate.is_some());
    let cfg = molora::model::config::Config::from_file(&out.join("config.json")).unwrap();
    assert!(molora::server::load_vq(&out, &cfg, &dev).unwrap().is_some());

    let log: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join(TRAIN_LOG)).unwrap()).unwrap();
    let stages: Vec<&str> = log.iter().map(|e| e["stage"].as_str().unwrap()).collect();
    for s in [
        "tokenizer",
        "vq",
        "base",
        "text",
        "image",
        "math",
        "code",
        "caption",
        "gate",
    ] {
        assert!(stages.contains(&s), "{s} not in {stages:?}");
    }
    let steps = |stage: &str| {
        let entry = log.iter().find(|e| e["stage"] == stage).unwrap();
        entry["steps"].as_u64().unwrap()
    };
    assert_eq!(steps("code"), 1);
    assert_eq!(steps("math"), run.cfg.semantic_adapter.steps);
    assert!(run.cfg.semantic_adapter.steps > 1);
    let weights = std::fs::read(out.join("model.safetensors")).unwrap();
    // A finished run resumes at its last step: nothing changes.
    stages::all(&run, &dev, 2).unwrap();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
    // Another preset into the same folder is refused.
    let other = Run {
        seed: 8,
        ..run.clone()
    };
    assert!(stages::all(&other, &dev, 2).is_err());

    // One stage at a time: the same products, byte for byte.
    let sequential = Run {
        out: dir.path().join("sequential"),
        ..run
    };
    stages::all(&sequential, &dev, 1).unwrap();
    let products = |root: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.strip_prefix(root).unwrap().display().to_string();
                if path.is_dir() {
                    if name != "checkpoints" {
                        stack.push(path);
                    }
                } else if name != TRAIN_LOG {
                    files.push((name, std::fs::read(&path).unwrap()));
                }
            }
        }
        files.sort();
        files
    };
    let (side_by_side, one_at_a_time) = (products(&out), products(&sequential.out));
    let names = |files: &[(String, Vec<u8>)]| files.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&side_by_side), names(&one_at_a_time));
    assert!(side_by_side.len() >= 10, "{:?}", names(&side_by_side));
    for ((name, a), (_, b)) in side_by_side.iter().zip(&one_at_a_time) {
        assert!(a == b, "{name} differs between --jobs 2 and --jobs 1");
    }
}
