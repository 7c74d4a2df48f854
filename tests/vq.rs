//! The VQ image tokenizer and its trainer, on tiny configurations.
//!
//! Run with `cargo test --release --test vq`. The demo-size measurement is
//! `cargo test --release --test vq -- --ignored --nocapture measure_demo`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use molora::bench::cpu_seconds;
use molora::model::vq::blocks::{AttnBlock, Downsample, ResnetBlock, Upsample};
use molora::model::vq::{rgb_to_tensor, VqConfig, VqModel};
use molora::train::vq_train::{
    ReconLoss, VqTrainConfig, VqTrainer, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, CODEBOOK,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Pins candle's thread count for this process, as `molora` does for its
/// subcommands: without `RAYON_NUM_THREADS` candle 0.11 parses
/// /proc/cpuinfo on every CPU matmul, which doubled this file's run time.
fn pin_threads() {
    static PIN: std::sync::Once = std::sync::Once::new();
    PIN.call_once(|| molora::dispatch::threading::pin_candle_threads(false));
}

/// 16x16 images, 4x4 = 16 codes, 8..16 channels.
fn tiny_config() -> VqConfig {
    serde_json::from_str(
        r#"{"embed_dim": 8, "num_embeddings": 32, "latent_channels": 8, "resolution": 16,
            "in_channels": 3, "base_channels": 8, "channel_multiplier": [1, 2, 2],
            "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0,
            "attn_type": "vanilla", "norm_num_groups": 4}"#,
    )
    .unwrap()
}

/// Channel counts that are multiples of 32 (taming's 32 groups, two or more
/// channels per group), so that every bias has a non-trivial gradient.
fn grad_config() -> VqConfig {
    VqConfig {
        resolution: 8,
        base_channels: 64,
        channel_multiplier: vec![1, 1],
        attn_resolutions: Some(vec![8, 4]),
        norm_num_groups: None,
        ..tiny_config()
    }
}

/// `n` images of `side` pixels: a background colour and one or two
/// axis-aligned rectangles of other colours, in [-1, 1].
fn rectangles(n: usize, side: usize, seed: u64) -> Tensor {
    drawn_rectangles(n, side, 1, seed)
}

/// Like [`rectangles`], with edges on multiples of `align` pixels.
fn drawn_rectangles(n: usize, side: usize, align: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let palette: [[f32; 3]; 6] = [
        [1.0, -1.0, -1.0],
        [-1.0, 1.0, -1.0],
        [-1.0, -1.0, 1.0],
        [1.0, 1.0, -1.0],
        [1.0, 1.0, 1.0],
        [-1.0, -1.0, -1.0],
    ];
    let mut data = vec![0f32; n * 3 * side * side];
    for i in 0..n {
        let bg = palette[rng.random_range(0..palette.len())];
        let img = &mut data[i * 3 * side * side..(i + 1) * 3 * side * side];
        for c in 0..3 {
            img[c * side * side..(c + 1) * side * side].fill(bg[c]);
        }
        for _ in 0..rng.random_range(1..=2) {
            let colour = palette[rng.random_range(0..palette.len())];
            let cells = side / align;
            let (w, h) = (
                rng.random_range(1..=cells / 2),
                rng.random_range(1..=cells / 2),
            );
            let (x0, y0) = (
                rng.random_range(0..=cells - w),
                rng.random_range(0..=cells - h),
            );
            let (w, h, x0, y0) = (w * align, h * align, x0 * align, y0 * align);
            for c in 0..3 {
                for y in y0..y0 + h {
                    for x in x0..x0 + w {
                        img[c * side * side + y * side + x] = colour[c];
                    }
                }
            }
        }
    }
    Tensor::from_vec(data, (n, 3, side, side), &Device::Cpu).unwrap()
}

fn tensors_equal(a: &Tensor, b: &Tensor) -> bool {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a == b
}

fn weights_of(varmap: &VarMap) -> HashMap<String, Vec<f32>> {
    let data = varmap.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

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
    trainer.train_step(&rectangles(4, 16, 1)).unwrap();
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
fn every_variable_gets_a_gradient() {
    pin_threads();
    let cfg = grad_config();
    let trainer = VqTrainer::new(&cfg, &VqTrainConfig::new(9), &Device::Cpu).unwrap();
    let (_, grads) = trainer.gradients(&rectangles(2, 8, 4)).unwrap();
    let data = trainer.varmap().data().lock().unwrap();
    assert!(data.len() > 40, "only {} variables", data.len());
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let max = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = var
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.ends_with(".k.bias") {
            // Softmax is shift-invariant along the keys: the key bias adds
            // q.b to every score of a row, so its gradient is zero in exact
            // arithmetic (in taming as well); only rounding remains.
            assert!(max < 1e-5, "{name}: {max}");
        } else {
            assert!(
                max > 1e-7,
                "{name} has an all-zero gradient (|w| max {scale})"
            );
        }
    }
}

/// Central differences of `sum(f(x) * r)` with respect to `x`, in f64,
/// against candle's backward: checks ops whose backward we rely on.
fn check_input_gradient(f: &dyn Fn(&Tensor) -> Tensor, shape: (usize, usize, usize, usize)) {
    let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()).unwrap();
    let out_shape = f(x.as_tensor()).dims().to_vec();
    let r = Tensor::randn(0f64, 1.0, out_shape, &Device::Cpu).unwrap();
    let loss = |t: &Tensor| (f(t) * &r).unwrap().sum_all().unwrap();
    let grads = loss(x.as_tensor()).backward().unwrap();
    let analytic = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
    let analytic = analytic.to_vec1::<f64>().unwrap();
    let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-5;
    for i in (0..base.len()).step_by(7) {
        let at = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            loss(&t).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
            "element {i}: numeric {numeric}, backward {}",
            analytic[i]
        );
    }
}

#[test]
fn block_backward_matches_finite_differences() {
    pin_threads();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let down = Downsample::new(4, vb.pp("down")).unwrap();
    let up = Upsample::new(4, vb.pp("up")).unwrap();
    let res = ResnetBlock::new(4, 6, 2, vb.pp("res")).unwrap();
    let attn = AttnBlock::new(4, 2, vb.pp("attn")).unwrap();
    check_input_gradient(&|x| down.forward(x).unwrap(), (2, 4, 6, 6));
    check_input_gradient(&|x| up.forward(x).unwrap(), (2, 4, 3, 3));
    check_input_gradient(&|x| res.forward(x).unwrap(), (2, 4, 4, 4));
    check_input_gradient(&|x| attn.forward(x).unwrap(), (2, 4, 3, 3));
}

/// The whole model's backward (encoder, quantizer-free path, decoder) against
/// central differences, in f64, for parameters spread over the network.
#[test]
fn model_backward_matches_finite_differences() {
    pin_threads();
    let cfg = VqConfig {
        norm_num_groups: Some(4),
        ..tiny_config()
    };
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = VqModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F64, &dev)).unwrap();
    molora::train::vq_train::init_weights(&varmap, 3).unwrap();
    let x = drawn_rectangles(2, 16, 1, 5).to_dtype(DType::F64).unwrap();
    let loss = || {
        let y = model
            .decode_latents(&model.encode_latents(&x).unwrap())
            .unwrap();
        (y - &x).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let grads = loss().backward().unwrap();
    let names = [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.bias",
        "encoder.down.2.attn.0.q.weight",
        "encoder.mid.attn_1.v.bias",
        "encoder.norm_out.bias",
        "quant_conv.weight",
        "post_quant_conv.bias",
        "decoder.mid.block_1.conv2.weight",
        "decoder.up.2.attn.1.proj_out.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.1.norm2.weight",
        "decoder.conv_out.bias",
    ];
    let data = varmap.data().lock().unwrap();
    for name in names {
        let var = data
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let analytic = analytic.to_vec1::<f64>().unwrap();
        let base = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in [0, base.len() / 2, base.len() - 1] {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
                    .unwrap();
                let l = loss().to_scalar::<f64>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev).unwrap())
                    .unwrap();
                l
            };
            let eps = 1e-6;
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[i]).abs();
            assert!(
                err < 1e-6 + 1e-4 * numeric.abs(),
                "{name}[{i}]: numeric {numeric}, backward {}",
                analytic[i]
            );
        }
    }
}

#[test]
fn training_reduces_reconstruction_loss() {
    pin_threads();
    let cfg = tiny_config();
    let tcfg = VqTrainConfig {
        learning_rate: 3e-3,
        recon_loss: ReconLoss::Mse,
        restart_every: 25,
        ..VqTrainConfig::new(11)
    };
    let mut trainer = VqTrainer::new(&cfg, &tcfg, &Device::Cpu).unwrap();
    // Rectangles on the 4-pixel code grid: each code can hold one colour.
    let held_out = drawn_rectangles(16, 16, 4, 999);
    let eval = |t: &VqTrainer| {
        let l = t.losses(&held_out).unwrap();
        l.reconstruction.to_scalar::<f32>().unwrap()
    };
    let start = eval(&trainer);
    let mut restarted = 0;
    let batches = |step| Ok(drawn_rectangles(16, 16, 4, 100 + step));
    trainer
        .run(250, batches, None, |s| restarted += s.restarted)
        .unwrap();
    let end = eval(&trainer);
    let codes = trainer.model().encode(&held_out).unwrap();
    let mut used = codes.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    used.sort();
    used.dedup();
    eprintln!(
        "reconstruction MSE {start:.4} -> {end:.4}; {restarted} codes restarted; {} of 32 codes used on held-out images",
        used.len()
    );
    assert!(end < 0.5 * start, "loss {start} -> {end}");
    assert!(used.len() >= 6, "only {} codes in use", used.len());
}

/// A batch split into micro-batches gives the same update as one pass over
/// the whole batch (up to rounding), and the thread count changes nothing
/// at all.
#[test]
fn micro_batches_match_single_pass() {
    pin_threads();
    let cfg = tiny_config();
    let images = drawn_rectangles(5, 16, 1, 77);
    let run = |threads, micro_batch| {
        let tcfg = VqTrainConfig {
            threads,
            micro_batch,
            ..VqTrainConfig::new(4)
        };
        let mut trainer = VqTrainer::new(&cfg, &tcfg, &Device::Cpu).unwrap();
        trainer.train_step(&images).unwrap();
        trainer.train_step(&images).unwrap();
        weights_of(trainer.varmap())
    };
    let whole = run(1, 0);
    let micro = run(1, 2);
    assert_eq!(micro, run(2, 2), "thread count changed the result");
    assert_eq!(micro, run(3, 2), "thread count changed the result");
    for (name, a) in &whole {
        if name.ends_with(".k.bias") {
            // Its gradient is zero up to rounding (see
            // every_variable_gets_a_gradient); Adam turns that noise into
            // +-lr steps whose sign depends on summation order.
            continue;
        }
        let b = &micro[name];
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{name} differs by {diff}");
    }
}

#[test]
fn resume_continues_exactly() {
    pin_threads();
    let cfg = tiny_config();
    let tcfg = VqTrainConfig {
        checkpoint_every: 4,
        restart_every: 3,
        ..VqTrainConfig::new(21)
    };
    let batches = |step: u64| Ok(rectangles(4, 16, 500 + step));
    let dir = tempfile::tempdir().unwrap();

    // Run A: 8 steps straight, checkpoints at 4 and 8.
    let mut a = VqTrainer::new(&cfg, &tcfg, &Device::Cpu).unwrap();
    a.run(4, batches, Some(dir.path()), |_| {}).unwrap();
    let at_four = weights_of(a.varmap());
    a.run(8, batches, None, |_| {}).unwrap();

    // Run B: resume from the step-4 checkpoint.
    let mut b = VqTrainer::resume(dir.path(), &cfg, &tcfg, &Device::Cpu).unwrap();
    assert_eq!(b.step_count(), 4);
    assert_eq!(weights_of(b.varmap()), at_four);
    b.run(8, batches, None, |_| {}).unwrap();
    assert_eq!(b.step_count(), 8);
    assert_eq!(weights_of(b.varmap()), weights_of(a.varmap()));

    // A different seed is refused rather than silently mixed.
    let other = VqTrainConfig {
        seed: 22,
        ..tcfg.clone()
    };
    let err = format!(
        "{:#}",
        VqTrainer::resume(dir.path(), &cfg, &other, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("seed"), "{err}");
    assert!(dir.path().join(CHECKPOINT_STATE).exists());
    // The checkpoint's weights are a loadable model file.
    VqModel::load(&dir.path().join(CHECKPOINT_WEIGHTS), &cfg, &Device::Cpu).unwrap();
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

fn parameter_count(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

/// Wall and CPU seconds of `f`.
fn timed(f: impl FnOnce()) -> (f64, f64) {
    let (t, c) = (Instant::now(), cpu_seconds());
    f();
    (t.elapsed().as_secs_f64(), cpu_seconds() - c)
}

/// Training images/s and decode ms/image for the demo configuration (or
/// the config file in VQ_CONFIG). Prints wall time and CPU time: on a
/// shared machine the CPU time is what an idle core would take.
#[test]
#[ignore]
fn measure_demo() {
    pin_threads();
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vq_demo.json");
    let path = std::env::var("VQ_CONFIG")
        .map(Into::into)
        .unwrap_or(default);
    let cfg = VqConfig::from_file(&path).unwrap();
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let (batch, steps) = (env("VQ_BATCH", 16) as usize, env("VQ_STEPS", 5));
    let tcfg = VqTrainConfig {
        threads: env("VQ_THREADS", 1) as usize,
        micro_batch: env("VQ_MICRO", 2) as usize,
        ..VqTrainConfig::new(1)
    };
    let mut trainer = VqTrainer::new(&cfg, &tcfg, &Device::Cpu).unwrap();
    eprintln!(
        "{}: {} parameters; {} threads, micro-batch {}",
        path.display(),
        parameter_count(trainer.varmap()),
        tcfg.threads,
        tcfg.micro_batch
    );
    let batches: Vec<Tensor> = (0..=steps).map(|s| rectangles(batch, 64, s)).collect();
    trainer.train_step(&batches[0]).unwrap(); // warm-up
    let (wall, cpu) = timed(|| {
        for b in &batches[1..] {
            trainer.train_step(b).unwrap();
        }
    });
    let images = (steps as usize * batch) as f64;
    eprintln!(
        "train batch {batch}: {:.1} images/s wall, {:.1} images per CPU-second ({:.0} ms wall/step)",
        images / wall,
        images / cpu,
        wall * 1e3 / steps as f64
    );
    let model = trainer.model();
    let codes = model.encode(&batches[0]).unwrap();
    for b in [1usize, batch] {
        let c = codes.narrow(0, 0, b).unwrap();
        model.decode(&c).unwrap();
        let reps = if b == 1 { 10 } else { 2 };
        let (wall, cpu) = timed(|| {
            for _ in 0..reps {
                model.decode(&c).unwrap();
            }
        });
        let n = (reps * b) as f64;
        eprintln!(
            "decode batch {b}: {:.1} ms/image wall, {:.1} CPU-ms/image",
            wall * 1e3 / n,
            cpu * 1e3 / n
        );
    }
}
