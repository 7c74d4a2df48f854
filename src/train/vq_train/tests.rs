//! The loss weighting and the learning-rate schedule of VQ training.

use candle_core::{Device, Tensor};

use super::losses::foreground_weights;
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
