//! The VQ image tokenizer: shapes, bad inputs, the quantizer, checkpoints.
//!
//! Run with `cargo test --release --test vq`; the trainer's tests are in
//! tests/vq_train.rs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use molora::model::vq::{rgb_to_tensor, VqConfig, VqModel};
use molora::train::vq_train::{VqTrainConfig, VqTrainer, CODEBOOK};

mod vq_support;
use vq_support::*;

#[test]
fn encode_decode_shapes() {
    pin_threads();
    let cfg = tiny_config();
    let trainer = VqTrainer::new(&cfg, &VqTrainConfig::new(1), &Device::Cpu).unwrap();
    let model = trainer.model();
    let images = rectangles(3, 16, 0);
    let codes = model.encode(&images).unwrap();
    assert_eq!(codes.dims(), &[3, 16]);
    assert_eq!(codes.dtype(), DType::U32);
    assert!(codes
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .iter()
        .all(|&c| c < 32));
    let pixels = model.decode(&codes).unwrap();
    assert_eq!(pixels.dims(), &[3, 3, 16, 16]);

    let one = codes.get(0).unwrap().to_vec1::<u32>().unwrap();
    let rgb = model.decode_to_rgb(&one).unwrap();
    assert_eq!(rgb.dimensions(), (16, 16));
    assert_eq!(model.encode_rgb(&rgb).unwrap().len(), 16);
    // Another size is centre-cropped and resized, not refused.
    let wide = image::RgbImage::from_pixel(40, 20, image::Rgb([200, 10, 10]));
    assert_eq!(model.encode_rgb(&wide).unwrap().len(), 16);
}

#[test]
fn bad_inputs_are_refused() {
    pin_threads();
    let cfg = tiny_config();
    let trainer = VqTrainer::new(&cfg, &VqTrainConfig::new(1), &Device::Cpu).unwrap();
    let model = trainer.model();
    let err = model.encode(&rectangles(1, 8, 0)).unwrap_err().to_string();
    assert!(err.contains("[B, 3, 16, 16]"), "{err}");
    let codes = Tensor::from_vec(vec![32u32; 16], (1, 16), &Device::Cpu).unwrap();
    let err = model.decode(&codes).unwrap_err().to_string();
    assert!(err.contains("code 32"), "{err}");
    let err = model.decode_to_rgb(&[0; 15]).unwrap_err().to_string();
    assert!(err.contains("[B, 16]"), "{err}");
}

#[test]
fn rgb_pixels_round_trip() {
    pin_threads();
    let img = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 50, y as u8 * 60, 255]));
    let t = rgb_to_tensor(std::slice::from_ref(&img), &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 4, 5]);
    let back = molora::model::vq::tensor_to_rgb(&t.get(0).unwrap()).unwrap();
    assert_eq!(back, img);
}

#[test]
fn quantizer_picks_the_nearest_code() {
    pin_threads();
    let cfg = tiny_config();
    let trainer = VqTrainer::new(&cfg, &VqTrainConfig::new(3), &Device::Cpu).unwrap();
    let q = trainer.model().quantizer();
    // Spread the codebook so that distances differ clearly.
    let codebook = Tensor::randn(0f32, 1.0, (32, 8), &Device::Cpu).unwrap();
    let var = trainer.varmap().data().lock().unwrap()[CODEBOOK].clone();
    var.set(&codebook).unwrap();
    let z = Tensor::randn(0f32, 1.0, (2, 8, 4, 4), &Device::Cpu).unwrap();
    let codes = q
        .encode(&z)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let e = codebook.to_vec2::<f32>().unwrap();
    // Rows in (b, y, x) order.
    let rows = z.permute((0, 2, 3, 1)).unwrap().reshape((32, 8)).unwrap();
    let rows = rows.to_vec2::<f32>().unwrap();
    for (row, &code) in rows.iter().zip(&codes) {
        let dist = |c: &Vec<f32>| -> f64 {
            row.iter()
                .zip(c)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum()
        };
        let best = e.iter().map(dist).fold(f64::INFINITY, f64::min);
        let got = dist(&e[code as usize]);
        assert!(got <= best + 1e-5, "code {code} at {got}, best {best}");
    }
    // Decoding the codes returns exactly the codebook rows.
    let codes_t = Tensor::from_vec(codes.clone(), (2, 16), &Device::Cpu).unwrap();
    let zq = q.decode(&codes_t, 4, 4).unwrap();
    let zq_rows = zq.permute((0, 2, 3, 1)).unwrap().reshape((32, 8)).unwrap();
    for (r, &code) in zq_rows.to_vec2::<f32>().unwrap().iter().zip(&codes) {
        assert_eq!(r, &e[code as usize]);
    }
}

#[test]
fn save_load_round_trip_is_exact() {
    pin_threads();
    let cfg = tiny_config();
    let mut trainer = VqTrainer::new(&cfg, &VqTrainConfig::new(5), &Device::Cpu).unwrap();
    trainer.train_step(rectangles(4, 16, 1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vq.safetensors");
    trainer.save_weights(&path).unwrap();
    let loaded = VqModel::load(&path, &cfg, &Device::Cpu).unwrap();
    let images = rectangles(4, 16, 2);
    let a = trainer.model().encode(&images).unwrap();
    let b = loaded.encode(&images).unwrap();
    assert_eq!(a.to_vec2::<u32>().unwrap(), b.to_vec2::<u32>().unwrap());
    assert!(tensors_equal(
        &trainer.model().decode(&a).unwrap(),
        &loaded.decode(&b).unwrap()
    ));
}

/// Writes `path`'s tensors back after `edit`.
fn edit_checkpoint(path: &Path, out: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, out).unwrap();
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    pin_threads();
    let cfg = tiny_config();
    let trainer = VqTrainer::new(&cfg, &VqTrainConfig::new(5), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("vq.safetensors");
    trainer.save_weights(&good).unwrap();

    let missing = dir.path().join("missing.safetensors");
    edit_checkpoint(&good, &missing, |t| {
        t.remove("decoder.up.1.block.0.conv2.weight");
    });
    let err = format!(
        "{:#}",
        VqModel::load(&missing, &cfg, &Device::Cpu).unwrap_err()
    );
    assert!(err.contains("decoder.up.1.block.0.conv2.weight"), "{err}");
    assert!(err.contains("missing"), "{err}");
    assert!(err.contains("missing.safetensors"), "{err}");

    let wrong = dir.path().join("wrong.safetensors");
    edit_checkpoint(&good, &wrong, |t| {
        t.insert(
            CODEBOOK.into(),
            Tensor::zeros((31, 8), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = format!(
        "{:#}",
        VqModel::load(&wrong, &cfg, &Device::Cpu).unwrap_err()
    );
    assert!(err.contains(CODEBOOK) && err.contains("[31, 8]"), "{err}");

    let nan = dir.path().join("nan.safetensors");
    edit_checkpoint(&good, &nan, |t| {
        let bad = Tensor::full(f32::NAN, 8, &Device::Cpu).unwrap();
        t.insert("quant_conv.bias".into(), bad);
    });
    let err = format!("{:#}", VqModel::load(&nan, &cfg, &Device::Cpu).unwrap_err());
    assert!(
        err.contains("quant_conv.bias") && err.contains("non-finite"),
        "{err}"
    );

    let truncated = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!(
        "{:#}",
        VqModel::load(&truncated, &cfg, &Device::Cpu).unwrap_err()
    );
    assert!(err.contains("truncated.safetensors"), "{err}");

    // A prefixed checkpoint (as inside a Chameleon model file) loads with
    // its prefix and names the full key when something is missing.
    let prefixed = dir.path().join("prefixed.safetensors");
    edit_checkpoint(&good, &prefixed, |t| {
        let old: Vec<_> = t.drain().collect();
        t.extend(
            old.into_iter()
                .map(|(k, v)| (format!("model.vqmodel.{k}"), v)),
        );
        t.remove("model.vqmodel.encoder.conv_in.bias");
    });
    let err = format!(
        "{:#}",
        VqModel::load_prefixed(&prefixed, "model.vqmodel.", &cfg, &Device::Cpu).unwrap_err()
    );
    assert!(err.contains("model.vqmodel.encoder.conv_in.bias"), "{err}");
}

#[test]
fn demo_config_file_is_valid() {
    pin_threads();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vq_demo.json");
    let cfg = VqConfig::from_file(&path).unwrap();
    assert_eq!(cfg.resolution, 64);
    assert_eq!(cfg.grid_size(), 8);
    assert_eq!(cfg.tokens_per_image(), 64);
}
