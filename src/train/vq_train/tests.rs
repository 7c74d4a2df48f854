//! The loss weighting and the learning-rate schedule of VQ training.

use candle_core::{DType, Device, Tensor, Var};

use super::losses::{class_loss, context_loss, foreground_weights};
use super::{learning_rate_at, VqTrainConfig};

/// One 4x4 image in [-1, 1]: white background, a red 2x2 block at rows 1-2,
/// columns 2-3.
fn block_image() -> Tensor {
    let mut data = vec![1f32; 3 * 16];
    for (y, x) in [(1, 2), (1, 3), (2, 2), (2, 3)] {
        data[16 + y * 4 + x] = -1.0; // green
        data[2 * 16 + y * 4 + x] = -1.0; // blue
    }
    Tensor::from_vec(data, (1, 3, 4, 4), &Device::Cpu).unwrap()
}

#[test]
fn shape_pixels_weigh_one_plus_the_extra() {
    let w = foreground_weights(&block_image(), 5.0).unwrap();
    assert_eq!(w.dims(), &[1, 1, 4, 4]);
    let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    for (i, &v) in w.iter().enumerate() {
        let (y, x) = (i / 4, i % 4);
        let shape = (1..=2).contains(&y) && (2..=3).contains(&x);
        assert_eq!(v, if shape { 6.0 } else { 1.0 }, "pixel ({y}, {x})");
    }
}

#[test]
fn learning_rate_warms_up_then_decays_to_a_tenth() {
    let tcfg = VqTrainConfig {
        learning_rate: 1e-3,
        warmup_steps: 10,
        decay_steps: 110,
        ..VqTrainConfig::new(0)
    };
    let lr = |s| learning_rate_at(&tcfg, s);
    assert!((lr(0) - 1e-4).abs() < 1e-12);
    assert!((lr(10) - 1e-3).abs() < 1e-12);
    assert!((lr(60) - 0.55e-3).abs() < 1e-9, "halfway: {}", lr(60));
    assert!((lr(110) - 1e-4).abs() < 1e-12);
    assert!((lr(500) - 1e-4).abs() < 1e-12);
    let constant = VqTrainConfig {
        decay_steps: 0,
        ..tcfg.clone()
    };
    assert_eq!(learning_rate_at(&constant, 500), 1e-3);
}

/// Two pairs of 4x4 images on a 2x2 grid of 2x2-pixel cells. Pair 0: the
/// images differ in cell (0, 1) only; pair 1: in no cell. Latents differ by
/// a known amount per cell, so the loss is the mean over equal cells.
#[test]
fn context_loss_averages_latent_differences_of_equal_cells() {
    let dev = Device::Cpu;
    let base = block_image()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut changed = base.clone();
    changed[4 + 3] = 0.5; // red channel of pixel (y 1, x 3): cell (0, 1)
    let images: Vec<f32> = [&base, &changed, &base, &base]
        .iter()
        .flat_map(|v| v.iter().copied())
        .collect();
    let images = Tensor::from_vec(images, (4, 3, 4, 4), &dev).unwrap();
    // Latents (4, C=2, 2, 2): image 1 is image 0 plus 1 in cell (0, 0) and
    // plus 3 in cell (0, 1); image 3 is image 2 plus 2 in cell (1, 1).
    let mut z = vec![0f32; 4 * 2 * 4];
    for c in 0..2 {
        z[8 + c * 4] = 1.0; // image 1, cell (0, 0)
        z[8 + c * 4 + 1] = 3.0; // image 1, cell (0, 1): pixels differ
        z[24 + c * 4 + 3] = 2.0; // image 3, cell (1, 1)
    }
    let z = Tensor::from_vec(z, (4, 2, 2, 2), &dev).unwrap();
    let loss = context_loss(&z, &images)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // Equal cells: 3 in pair 0 (squared differences 1, 0, 0) and 4 in pair 1
    // (0, 0, 0, 4): (1 + 4) / 7.
    assert!((loss - 5.0 / 7.0).abs() < 1e-6, "loss {loss}");
}

/// Latents (1, C=3, 1, 2): two cells whose first two channels are logits
/// over two classes; the third channel is not a class channel.
#[test]
fn class_loss_is_the_cross_entropy_of_its_k_channels() {
    let dev = Device::Cpu;
    // Cell 0: logits (2, 0), class 0. Cell 1: logits (0, 1), class 0.
    let z = Var::from_vec(vec![2f32, 0.0, 0.0, 1.0, 9.0, -9.0], (1, 3, 1, 2), &dev).unwrap();
    let targets = Tensor::from_vec(vec![1f32, 1.0, 0.0, 0.0], (1, 2, 1, 2), &dev).unwrap();
    let loss = class_loss(z.as_tensor(), 0, &targets).unwrap();
    let ce = |own: f32, other: f32| -(own.exp() / (own.exp() + other.exp())).ln();
    let want = (ce(2.0, 0.0) + ce(0.0, 1.0)) / 2.0;
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-6, "loss {got}, want {want}");
    // d/d(logit of the target) = (p - 1) / cells; the third channel gets none.
    let grad = loss
        .backward()
        .unwrap()
        .get(z.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let p0 = 2f32.exp() / (2f32.exp() + 1.0);
    assert!((grad[0] - (p0 - 1.0) / 2.0).abs() < 1e-6, "{grad:?}");
    assert!((grad[2] - (1.0 - p0) / 2.0).abs() < 1e-6, "{grad:?}");
    assert_eq!(&grad[4..], &[0.0, 0.0]);
    // More target classes than latent channels is an error, not a panic.
    let too_many = Tensor::zeros((1, 4, 1, 2), DType::F32, &dev).unwrap();
    assert!(class_loss(z.as_tensor(), 0, &too_many).is_err());
    assert!(class_loss(z.as_tensor(), 2, &targets).is_err());

    // From channel 1 on: cell 0 reads logits (0, 9), cell 1 (1, -9).
    let loss = class_loss(z.as_tensor(), 1, &targets).unwrap();
    let want = (ce(0.0, 9.0) + ce(1.0, -9.0)) / 2.0;
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-4, "loss {got}, want {want}");
}
