//! PEFT files (round trip and every bad-input case) and the adapter path
//! check. The hot-set tests are in `hot_set_tests.rs`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::peft::{resolve_adapter_dir, AdapterConfig, LoraAdapter, CONFIG_FILE, WEIGHTS_FILE};
use super::{AdapterRole, Projection};
use crate::model::config::Config;

/// The tiny chameleon config the adapter tests run on.
pub(super) fn tiny_config() -> Config {
    let cfg: Config = serde_json::from_value(serde_json::json!({
        "model_type": "chameleon",
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "molora": {
            "modalities": [
                {"name": "text", "token_range": [4, 40]},
                {"name": "image", "token_range": [40, 64]}
            ],
            "boi_token_id": 2,
            "eoi_token_id": 3
        }
    }))
    .expect("tiny config parses");
    cfg.validate().expect("tiny config is valid");
    cfg
}

pub(super) fn image_role() -> AdapterRole {
    AdapterRole::Modality {
        modality: "image".into(),
    }
}

pub(super) fn random_adapter(
    name: &str,
    r: usize,
    targets: &[Projection],
    seed: u64,
) -> LoraAdapter {
    LoraAdapter::random(
        name,
        image_role(),
        &tiny_config(),
        r,
        2.0 * r as f64,
        targets,
        seed,
        false,
        &Device::Cpu,
    )
    .expect("random adapter")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A saved random adapter (r = 4, q/v/down) in `root/name`.
fn saved_adapter(root: &Path, name: &str) -> std::path::PathBuf {
    let a = random_adapter(
        name,
        4,
        &[Projection::QProj, Projection::VProj, Projection::DownProj],
        7,
    );
    let dir = root.join(name);
    a.save(&dir).unwrap();
    dir
}

fn read_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap()
}

fn write_tensors(dir: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join(WEIGHTS_FILE)).unwrap();
}

const Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const Q_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

/// Loads `dir` and returns the error message (the full chain).
fn load_error(dir: &Path) -> String {
    match LoraAdapter::load(dir, &tiny_config(), &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should have been refused", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

#[test]
fn peft_save_then_load_gives_identical_tensors() {
    let root = tempfile::tempdir().unwrap();
    let a = random_adapter("img", 4, &Projection::ALL, 11);
    a.save(&root.path().join("img")).unwrap();
    let b = LoraAdapter::load(&root.path().join("img"), &tiny_config(), &Device::Cpu).unwrap();
    assert_eq!(b.name, "img");
    assert_eq!(b.config, a.config);
    assert_eq!(b.scale(), 2.0);
    assert_eq!(b.role(), &image_role());
    assert_eq!(b.weights.len(), 2 * 7);
    for (key, pa) in &a.weights {
        let pb = &b.weights[key];
        assert_eq!(values(&pa.a), values(&pb.a), "A of {key:?}");
        assert_eq!(values(&pa.b), values(&pb.b), "B of {key:?}");
    }
    // PEFT's key layout, and the metadata transformers checks for.
    let bytes = std::fs::read(root.path().join("img").join(WEIGHTS_FILE)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    assert!(read_tensors(&root.path().join("img")).contains_key(Q_A));
}

#[test]
fn random_adapters_are_deterministic_and_zero_b_is_zero() {
    let t = [Projection::QProj];
    let (a1, a2) = (random_adapter("a", 2, &t, 5), random_adapter("a", 2, &t, 5));
    let a3 = random_adapter("a", 2, &t, 6);
    let key = (1, Projection::QProj);
    assert_eq!(values(&a1.weights[&key].a), values(&a2.weights[&key].a));
    assert_eq!(values(&a1.weights[&key].b), values(&a2.weights[&key].b));
    assert_ne!(values(&a1.weights[&key].a), values(&a3.weights[&key].a));
    let bound = 1.0 / 16f32.sqrt();
    assert!(values(&a1.weights[&key].a).iter().all(|v| v.abs() <= bound));
    assert!(values(&a1.weights[&key].b).iter().any(|&v| v != 0.0));
    let z = LoraAdapter::random(
        "z",
        image_role(),
        &tiny_config(),
        2,
        4.0,
        &t,
        5,
        true,
        &Device::Cpu,
    )
    .unwrap();
    assert!(values(&z.weights[&key].b).iter().all(|&v| v == 0.0));
}

#[test]
fn half_precision_weights_load_as_f32() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "half");
    let original = read_tensors(&dir);
    let halved: HashMap<String, Tensor> = original
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F16).unwrap()))
        .collect();
    write_tensors(&dir, &halved);
    let a = LoraAdapter::load(&dir, &tiny_config(), &Device::Cpu).unwrap();
    let qa = &a.weights[&(0, Projection::QProj)].a;
    assert_eq!(qa.dtype(), DType::F32);
    let expect = values(
        &original[Q_A]
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    );
    assert_eq!(values(qa), expect);
}

#[test]
fn config_keeps_unknown_peft_keys_and_reads_peft_forms() {
    let text = r#"{
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"], "use_rslora": true,
        "layers_to_transform": 1, "bias": "none", "fan_in_fan_out": false,
        "task_type": "CAUSAL_LM", "inference_mode": true, "rank_pattern": {},
        "modules_to_save": null,
        "molora": {"kind": "semantic", "domain": "math"}
    }"#;
    let cfg = AdapterConfig::from_json(text).unwrap();
    assert_eq!(cfg.layers_to_transform, Some(vec![1]));
    assert_eq!(cfg.scale(), 16.0 / 8f32.sqrt());
    assert_eq!(
        cfg.molora,
        AdapterRole::Semantic {
            domain: "math".into()
        }
    );
    assert_eq!(cfg.extra["lora_dropout"], serde_json::json!(0.05));
    let written = cfg.to_json().unwrap();
    let value: serde_json::Value = serde_json::from_str(&written).unwrap();
    assert_eq!(value["lora_alpha"], serde_json::json!(16));
    assert_eq!(value["inference_mode"], serde_json::json!(true));
    assert_eq!(value["molora"]["kind"], serde_json::json!("semantic"));
    assert_eq!(AdapterConfig::from_json(&written).unwrap(), cfg);
}

#[test]
fn config_refuses_what_molora_cannot_serve() {
    let base = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "molora": {"kind": "modality", "modality": "text"}
    });
    let with = |key: &str, v: serde_json::Value| {
        let mut j = base.clone();
        j[key] = v;
        format!(
            "{:#}",
            AdapterConfig::from_json(&j.to_string()).unwrap_err()
        )
    };
    assert_mentions(
        &with("target_modules", "q_proj|v_proj".into()),
        &["must be a list"],
    );
    assert_mentions(&with("fan_in_fan_out", true.into()), &["fan_in_fan_out"]);
    assert_mentions(&with("bias", "all".into()), &["bias"]);
    assert_mentions(&with("peft_type", "IA3".into()), &["peft_type"]);
    assert_mentions(&with("r", 0.into()), &["r must be"]);
    assert_mentions(&with("use_dora", true.into()), &["use_dora"]);
    let mut no_role = base.clone();
    no_role.as_object_mut().unwrap().remove("molora");
    let msg = format!(
        "{:#}",
        AdapterConfig::from_json(&no_role.to_string()).unwrap_err()
    );
    assert_mentions(&msg, &["molora"]);
}

#[test]
fn missing_files_are_named() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "a");
    std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    assert_mentions(&load_error(&dir), &[WEIGHTS_FILE, "cannot read"]);
    let dir = saved_adapter(root.path(), "b");
    std::fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
    assert_mentions(&load_error(&dir), &[CONFIG_FILE, "cannot read"]);
}

#[test]
fn truncated_and_corrupt_safetensors_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "a");
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 1, 7, 0] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert_mentions(&load_error(&dir), &[WEIGHTS_FILE, "truncated or corrupt"]);
    }
    std::fs::write(&path, b"{\"not\": \"safetensors\"}").unwrap();
    assert_mentions(&load_error(&dir), &[WEIGHTS_FILE, "truncated or corrupt"]);
}

#[test]
fn wrong_shapes_name_the_tensor_and_both_shapes() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "a");
    let mut t = read_tensors(&dir);
    t.insert(
        Q_A.into(),
        Tensor::zeros((4, 17), DType::F32, &Device::Cpu).unwrap(),
    );
    write_tensors(&dir, &t);
    assert_mentions(
        &load_error(&dir),
        &[WEIGHTS_FILE, Q_A, "expected", "[4, 16]", "found [4, 17]"],
    );
    t.insert(
        Q_A.into(),
        Tensor::zeros((4, 16, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    write_tensors(&dir, &t);
    assert_mentions(
        &load_error(&dir),
        &[WEIGHTS_FILE, Q_A, "wrong shape", "[4, 16, 1]"],
    );
}

#[test]
fn rank_disagreeing_with_r_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "a");
    let mut t = read_tensors(&dir);
    t.insert(
        Q_B.into(),
        Tensor::zeros((16, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    write_tensors(&dir, &t);
    assert_mentions(
        &load_error(&dir),
        &[WEIGHTS_FILE, Q_B, "rank 3 disagrees with r = 4"],
    );
}

#[test]
fn non_finite_values_name_the_tensor() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "a");
    for bad in [f32::NAN, f32::INFINITY] {
        let mut t = read_tensors(&dir);
        let mut v = values(&t[Q_B]);
        v[5] = bad;
        t.insert(
            Q_B.into(),
            Tensor::from_vec(v, (16, 4), &Device::Cpu).unwrap(),
        );
        write_tensors(&dir, &t);
        assert_mentions(&load_error(&dir), &[WEIGHTS_FILE, Q_B, "non-finite"]);
    }
}

#[test]
fn unknown_modules_and_stray_keys_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "a");
    let original = read_tensors(&dir);
    let renamed = |from: &str, to: &str| {
        let mut t = original.clone();
        let v = t.remove(from).unwrap();
        t.insert(to.to_string(), v);
        write_tensors(&dir, &t);
        load_error(&dir)
    };
    let foo = Q_A.replace("q_proj", "foo_proj");
    assert_mentions(
        &renamed(Q_A, &foo),
        &[WEIGHTS_FILE, &foo, "unknown target module \"foo_proj\""],
    );
    let head = "base_model.model.lm_head.lora_A.weight";
    assert_mentions(
        &renamed(Q_A, head),
        &[WEIGHTS_FILE, "unknown target module"],
    );
    let untargeted = Q_A.replace("q_proj", "k_proj");
    assert_mentions(
        &renamed(Q_A, &untargeted),
        &[WEIGHTS_FILE, "not in target_modules"],
    );
    let wrong_block = Q_A.replace("self_attn", "mlp");
    assert_mentions(&renamed(Q_A, &wrong_block), &[WEIGHTS_FILE, "lives at"]);
    let bias = Q_A.replace("lora_A.weight", "bias");
    assert_mentions(&renamed(Q_A, &bias), &[WEIGHTS_FILE, "not a LoRA weight"]);
    let deep = Q_A.replace("layers.0", "layers.5");
    assert_mentions(
        &renamed(Q_A, &deep),
        &[WEIGHTS_FILE, "layer 5 is beyond", "2 layers"],
    );
}

#[test]
fn unknown_target_module_in_config_is_named() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "a");
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    std::fs::write(
        dir.join(CONFIG_FILE),
        text.replace("\"down_proj\"", "\"lm_head\""),
    )
    .unwrap();
    assert_mentions(
        &load_error(&dir),
        &[CONFIG_FILE, "unknown target module \"lm_head\""],
    );
}

#[test]
fn missing_half_of_a_pair_is_named() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "a");
    let mut t = read_tensors(&dir);
    t.remove(Q_B);
    write_tensors(&dir, &t);
    assert_mentions(&load_error(&dir), &[WEIGHTS_FILE, "missing tensor", Q_B]);
}

#[test]
fn layers_to_transform_is_checked_against_the_model() {
    let root = tempfile::tempdir().unwrap();
    let dir = saved_adapter(root.path(), "a");
    let mut cfg = AdapterConfig::from_file(&dir.join(CONFIG_FILE)).unwrap();
    cfg.layers_to_transform = Some(vec![0, 3]);
    std::fs::write(dir.join(CONFIG_FILE), cfg.to_json().unwrap()).unwrap();
    assert_mentions(
        &load_error(&dir),
        &[CONFIG_FILE, "layer 3", "num_hidden_layers"],
    );
    cfg.layers_to_transform = Some(vec![1]);
    std::fs::write(dir.join(CONFIG_FILE), cfg.to_json().unwrap()).unwrap();
    assert_mentions(
        &load_error(&dir),
        &[WEIGHTS_FILE, "not in layers_to_transform"],
    );
    // With only layer 1's tensors it loads.
    let t: HashMap<String, Tensor> = read_tensors(&dir)
        .into_iter()
        .filter(|(k, _)| k.contains("layers.1."))
        .collect();
    write_tensors(&dir, &t);
    let a = LoraAdapter::load(&dir, &tiny_config(), &Device::Cpu).unwrap();
    assert_eq!(a.weights.len(), 3);
}

#[test]
fn adapter_dir_must_stay_inside_the_root() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    saved_adapter(root.path(), "good");
    let ok = resolve_adapter_dir(root.path(), "good").unwrap();
    assert!(ok.ends_with("good"));
    let refuse = |name: &str| format!("{:#}", resolve_adapter_dir(root.path(), name).unwrap_err());
    assert_mentions(&refuse(""), &["empty"]);
    assert_mentions(&refuse(".."), &["relative path component"]);
    assert_mentions(&refuse("../good"), &["path separator"]);
    assert_mentions(&refuse("a/b"), &["path separator"]);
    assert_mentions(&refuse("a\\b"), &["path separator"]);
    assert_mentions(&refuse("/etc"), &["absolute path"]);
    assert_mentions(&refuse("nothere"), &["not found"]);
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        assert_mentions(&refuse("escape"), &["outside the adapter folder"]);
    }
    std::fs::write(root.path().join("file"), b"x").unwrap();
    assert_mentions(&refuse("file"), &["not a folder"]);
}
