//! The VQ trainer on tiny configurations: gradients, finite differences,
//! loss going down, micro-batches, exact resume (the context and shape
//! losses: `tests/vq_code_losses.rs`).
//!
//! Run with `cargo test --release --test vq_train`. The demo-size measurement
//! is `cargo test --release --test vq_train -- --ignored --nocapture measure_demo`.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use molora::bench::cpu_seconds;
use molora::model::vq::blocks::{AttnBlock, Downsample, ResnetBlock, Upsample};
use molora::model::vq::{VqConfig, VqModel};
use molora::train::looping::LOG_WINDOW;
use molora::train::vq_train::{
    ReconLoss, VqTrainConfig, VqTrainer, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS,
};

mod vq_support;
use vq_support::*;
/// The largest absolute value of a tensor.
fn abs_max(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn every_variable_gets_a_gradient() {
    pin_threads();
    let cfg = grad_config();
    let trainer = VqTrainer::new(&cfg, &VqTrainConfig::new(9), &Device::Cpu).unwrap();
    let (_, grads) = trainer.gradients(rectangles(2, 8, 4)).unwrap();
    let data = trainer.varmap().data().lock().unwrap();
    assert!(data.len() > 40, "only {} variables", data.len());
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let (max, scale) = (abs_max(g), abs_max(var.as_tensor()));
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

/// After a merge the codebook holds one vector per group the report counts
/// (the encoder can pick no other), a distance just above the closest live
/// pair removes groups, and one wider than the codebook leaves one code.
#[test]
fn merging_close_codes_leaves_one_code_per_group() {
    pin_threads();
    let mut trainer = trained_on_rectangles(100);
    let sample = drawn_rectangles(64, 16, 4, 999);
    let ids = code_ids(&trainer, &sample);
    let live = ids.len();
    let book = codebook(&trainer);
    let dist = |a: u32, b: u32| -> f32 {
        let (a, b) = (&book[a as usize], &book[b as usize]);
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt()
    };
    let closest = ids
        .iter()
        .flat_map(|&a| ids.iter().filter(move |&&b| b > a).map(move |&b| (a, b)))
        .map(|(a, b)| dist(a, b))
        .fold(f32::INFINITY, f32::min);

    let report = trainer
        .merge_close_codes(std::slice::from_ref(&sample), closest * 1.01)
        .unwrap();
    assert_eq!(report.live_before, live);
    assert!(report.live_after < live, "{report:?}");
    assert_eq!(distinct_vectors(&trainer), report.live_after);
    assert!(codes_used(&trainer, &sample) <= report.live_after);

    let report = trainer
        .merge_close_codes(std::slice::from_ref(&sample), 1e6)
        .unwrap();
    assert_eq!(report.live_after, 1);
    assert_eq!(distinct_vectors(&trainer), 1);
    assert_eq!(codes_used(&trainer, &sample), 1);
}

/// Decoder-only training, started from saved weights: the reconstruction
/// improves while every encoder and codebook weight stays bit for bit, so
/// every image keeps its codes.
#[test]
fn decoder_only_training_keeps_the_codes() {
    pin_threads();
    let cfg = tiny_config();
    let trainer = trained_on_rectangles(60);
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("vqgan.safetensors");
    trainer.save_weights(&weights).unwrap();

    let decoder_only = VqTrainConfig {
        learning_rate: 3e-3,
        restart_every: 0,
        decoder_only: true,
        ..VqTrainConfig::new(11)
    };
    let batches = |step| Ok(drawn_rectangles(16, 16, 4, 100 + step));
    let mut tuned = VqTrainer::from_weights(&weights, &cfg, &decoder_only, &Device::Cpu).unwrap();
    let held_out = drawn_rectangles(16, 16, 4, 999);
    let recon = |t: &VqTrainer| {
        let l = t.losses(&held_out).unwrap();
        l.reconstruction.to_scalar::<f32>().unwrap()
    };
    let codes = |t: &VqTrainer| {
        t.model()
            .encode(&held_out)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
    };
    let (start, start_codes) = (recon(&tuned), codes(&tuned));
    let before = weights_of(tuned.varmap());
    tuned.run(60, batches, None, |_| {}).unwrap();
    let after = weights_of(tuned.varmap());
    eprintln!(
        "decoder-only reconstruction {start:.4} -> {:.4}",
        recon(&tuned)
    );
    assert!(recon(&tuned) < start, "{start} -> {}", recon(&tuned));
    assert_eq!(codes(&tuned), start_codes);
    for (name, w) in &before {
        let decoder_side = name.starts_with("decoder.") || name.starts_with("post_quant_conv.");
        assert_eq!(
            &after[name] != w,
            decoder_side,
            "{name} changed: {}",
            &after[name] != w
        );
    }
    let restarting = VqTrainConfig {
        restart_every: 25,
        ..decoder_only
    };
    assert!(VqTrainer::new(&cfg, &restarting, &Device::Cpu).is_err());
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

    // Run A: 8 steps straight, the checkpoint at 4.
    let mut a = VqTrainer::new(&cfg, &tcfg, &Device::Cpu).unwrap();
    a.run(4, batches, Some(dir.path()), |_| {}).unwrap();
    let at_four = weights_of(a.varmap());
    let log_at_four = a.run_log().clone();
    a.run(8, batches, None, |_| {}).unwrap();

    // Run B: resume from the step-4 checkpoint.
    let mut b = VqTrainer::resume(dir.path(), &cfg, &tcfg, &Device::Cpu).unwrap();
    assert_eq!(b.step_count(), 4);
    assert_eq!(weights_of(b.varmap()), at_four);
    // The run's seconds come back with it (what train_log.json records).
    assert!(log_at_four.seconds > 0.0);
    assert!((b.run_log().seconds - log_at_four.seconds).abs() < 1e-9);
    b.run(8, batches, None, |_| {}).unwrap();
    assert_eq!(b.step_count(), 8);
    assert_eq!(weights_of(b.varmap()), weights_of(a.varmap()));

    // Its loss log too: the window of steps 1-25 spans the resume.
    a.run(LOG_WINDOW, batches, None, |_| {}).unwrap();
    b.run(LOG_WINDOW, batches, None, |_| {}).unwrap();
    let (la, lb) = (
        &a.run_log().reconstruction.loss_log,
        &b.run_log().reconstruction.loss_log,
    );
    assert_eq!(la.len(), 1);
    assert!((la[0] - lb[0]).abs() < 1e-6, "{la:?} vs {lb:?}");

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
