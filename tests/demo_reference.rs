//! The shipped demo model against transformers: scripts/fixtures/demo_check.py
//! opened models/demo with `ChameleonForConditionalGeneration`, loaded the
//! encoder half of its vqgan.safetensors into `model.vqmodel`, and wrote
//! what transformers computes (tests/fixtures/reference/model_demo.safetensors):
//! the image tokens of a test picture and the logits of a text + image
//! sequence. molora must compute the same from the same directory.
//!
//! A retrained demo model fails here until the script is rerun: the fixture
//! belongs to the weights it was made from.

mod reference_support;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use molora::model::config::Config;
use molora::model::decoder::{BatchInput, Decoder};
use molora::model::kv_cache::KvCache;
use molora::server::load_vq;
use reference_support::*;

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo")
}

/// What the script recorded about models/demo in fixtures.json.
fn recorded_check() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("fixtures.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let results = manifest["demo_model"]["results"]
        .as_array()
        .unwrap()
        .clone();
    results
        .into_iter()
        .find(|r| r["path"] == "models/demo")
        .expect("fixtures.json checked models/demo")
}

#[test]
fn transformers_opened_the_demo_model_with_every_weight() {
    let check = recorded_check();
    assert_eq!(check["status"], "ok", "{check:#}");
    assert_eq!(check["missing_keys_outside_vqmodel"], serde_json::json!([]));
    assert_eq!(
        check["vqmodel_keys_not_in_vqgan_safetensors"],
        serde_json::json!([])
    );
    assert_eq!(check["forward_finite"], true);
}

#[test]
fn demo_vq_encoder_and_vocabulary_map_give_transformers_image_tokens() {
    let refs = reference("model_demo");
    let dir = demo_dir();
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let vq = load_vq(&dir, &cfg, &Device::Cpu)
        .unwrap()
        .expect("models/demo has a VQ");
    let pixels = refs["pixel_values"].unsqueeze(0).unwrap();
    let codes: Vec<u32> = vq
        .encode(&pixels)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let vocab = cfg.vocab().unwrap();
    let ours: Vec<u32> = codes.iter().map(|&c| vocab.image_token(c)).collect();
    assert_eq!(ours, token_ids(&refs["image_tokens"]));
}

#[test]
fn demo_decoder_logits_match_transformers() {
    let refs = reference("model_demo");
    let ids = token_ids(&refs["input_ids"]);
    let model = Decoder::load(&demo_dir(), &Device::Cpu).unwrap();
    let mut caches = vec![KvCache::new(model.config(), model.device()).unwrap()];
    let mut batch = BatchInput::default();
    batch.push(0, &ids);
    let hidden = model.forward(&batch, &mut caches, None).unwrap();
    let logits = model.logits(&hidden).unwrap().to_dtype(DType::F32).unwrap();
    assert_close(&logits, &refs["logits"], "demo logits");
}
