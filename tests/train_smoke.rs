//! Every stage of `molora train` for a few steps on tiny sizes, then the
//! model directory loads the way `serve` loads it, and a second `all`
//! resumes instead of retraining.

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
    };
    let dev = Device::Cpu;
    stages::all(&run, &dev).unwrap();

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
    stages::all(&run, &dev).unwrap();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
    // Another preset into the same folder is refused.
    let other = Run { seed: 8, ..run };
    assert!(stages::all(&other, &dev).is_err());
}
