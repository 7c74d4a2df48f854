//! config.json validation: every bad vocabulary layout is refused with an
//! error that names the file and the problem.

use std::collections::BTreeMap;

use molora::model::config::{image_token_name, Config};
use serde_json::{json, Value};

fn base() -> Value {
    json!({
        "model_type": "chameleon",
        "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2,
        "molora": {
            "modalities": [{"name": "text", "token_range": [5, 60]}, {"name": "image", "token_range": [60, 76]}],
            "boi_token_id": 3, "eoi_token_id": 4, "tokens_per_image": 16, "image_grid": [4, 4]
        }
    })
}

fn load(v: &Value) -> anyhow::Result<Config> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, v.to_string()).unwrap();
    Config::from_file(&path)
}

fn error_of(v: &Value) -> String {
    format!("{:#}", load(v).expect_err("config should be refused"))
}

#[test]
fn a_good_config_resolves_its_vocabulary() {
    let cfg = load(&base()).unwrap();
    let v = cfg.vocab().unwrap();
    assert_eq!(v.text_range(), 5..60);
    assert_eq!(v.image_range(), 60..76);
    assert_eq!(
        v.modality_of(1),
        0,
        "specials belong to the default modality"
    );
    assert_eq!(v.modality_of(61), 1);
    assert_eq!((v.boi, v.eoi, v.tokens_per_image), (Some(3), Some(4), 16));
    assert_eq!(v.image_code(63), Some(3));
    assert_eq!(v.image_token(3), 63);
}

#[test]
fn overlapping_ranges_are_refused() {
    let mut v = base();
    v["molora"]["modalities"][1]["token_range"] = json!([50, 70]);
    let e = error_of(&v);
    assert!(e.contains("config.json") && e.contains("overlap"), "{e}");
}

#[test]
fn ranges_beyond_the_embedding_are_refused() {
    let mut v = base();
    v["molora"]["modalities"][1]["token_range"] = json!([60, 120]);
    let e = error_of(&v);
    assert!(
        e.contains("config.json") && e.contains("exceeds vocab_size 100"),
        "{e}"
    );
}

#[test]
fn special_tokens_inside_the_image_range_are_refused() {
    let mut v = base();
    v["molora"]["boi_token_id"] = json!(65);
    let e = error_of(&v);
    assert!(
        e.contains("boi_token_id 65") && e.contains("image-code range"),
        "{e}"
    );
}

#[test]
fn grid_and_tokens_per_image_must_agree() {
    let mut v = base();
    v["molora"]["tokens_per_image"] = json!(15);
    assert!(error_of(&v).contains("tokens_per_image is 15"));
}

#[test]
fn unknown_model_type_and_bad_heads_are_refused() {
    let mut v = base();
    v["model_type"] = json!("llama");
    assert!(error_of(&v).contains("model_type"));
    let mut v = base();
    v["num_key_value_heads"] = json!(3);
    assert!(error_of(&v).contains("num_key_value_heads"));
    let e = format!(
        "{:#}",
        Config::from_file(std::path::Path::new("/nonexistent/config.json")).unwrap_err()
    );
    assert!(e.contains("/nonexistent/config.json"), "{e}");
}

#[test]
fn image_range_comes_from_a_chameleon_vocabulary_map() {
    let mut v = base();
    v["molora"] = json!({"image_grid": [4, 4]});
    let mut map = BTreeMap::new();
    map.insert("<racm3:break>".to_string(), 3u32);
    map.insert("<eoss>".to_string(), 4u32);
    for code in 0..16u32 {
        map.insert(image_token_name(code), 4 + 80 + code);
    }
    v["vocabulary_map"] = serde_json::to_value(&map).unwrap();
    let cfg = load(&v).unwrap();
    let layout = cfg.vocab().unwrap();
    assert_eq!(layout.image_range(), 84..100);
    assert_eq!(layout.text_range(), 0..84);
    assert_eq!(layout.boi, Some(3));
    assert_eq!(image_token_name(10), "IMGIMGBAZ");

    // A vocabulary map without image tokens cannot define the image modality.
    let mut v = base();
    v["molora"] = json!({});
    v["vocabulary_map"] = json!({"<racm3:break>": 3, "<eoss>": 4});
    assert!(error_of(&v).contains("image"), "{}", error_of(&v));
}
