//! Each fused op against its composed candle counterpart: values and the
//! gradient of every input, on random data (padding rows included).

use candle_core::{Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::super::decoder::{head_norm, rms_norm, rope, HEAD_NORM_EPS};
use super::{head_norm_rope, masked_softmax, silu_mul};

fn random(rng: &mut StdRng, shape: &[usize], spread: f32) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| spread * (rng.random::<f32>() - 0.5))
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Compares `fused` with `composed` on `inputs`: the values, then the
/// gradients of a random weighting of the output.
fn same(inputs: &[&Var], fused: &Tensor, composed: &Tensor, rng: &mut StdRng) {
    assert_eq!(fused.dims(), composed.dims());
    let dv = max_diff(fused, composed);
    assert!(dv < 1e-5, "values differ by {dv}");
    let probe = random(rng, fused.dims(), 2.0);
    let gf = (fused * probe.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gc = (composed * probe.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (a, b) = (
            gf.get(v).expect("fused gradient"),
            gc.get(v).expect("composed gradient"),
        );
        let d = max_diff(a, b);
        assert!(d < 1e-5, "gradient of input {i} differs by {d}");
    }
}

#[test]
fn rms_norm_matches_the_composed_norm() {
    let mut rng = StdRng::seed_from_u64(1);
    let (x, w) = (
        random(&mut rng, &[37, 24], 3.0),
        random(&mut rng, &[24], 2.0),
    );
    let f = super::rms_norm(&x, &w, 1e-5).unwrap();
    let c = rms_norm(&x, &w, 1e-5).unwrap();
    same(&[&x, &w], &f, &c, &mut rng);
}

#[test]
fn head_norm_rope_matches_the_composed_norm_and_rope() {
    let mut rng = StdRng::seed_from_u64(2);
    let (n, heads, hd) = (19, 3, 8);
    let x = random(&mut rng, &[n, heads, hd], 4.0);
    let (w, b) = (
        random(&mut rng, &[heads, hd], 2.0),
        random(&mut rng, &[heads, hd], 1.0),
    );
    let angles = random(&mut rng, &[n, hd / 2], 6.0);
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let f = head_norm_rope(&x, &w, &b, &cos, &sin, HEAD_NORM_EPS).unwrap();
    let wb = (w.as_tensor().clone(), b.as_tensor().clone());
    let c = rope(&head_norm(&x, &wb).unwrap(), &cos, &sin).unwrap();
    same(&[&x, &w, &b], &f, &c, &mut rng);
}

#[test]
fn masked_softmax_matches_the_composed_softmax() {
    let mut rng = StdRng::seed_from_u64(3);
    let (b, h, t) = (2, 3, 9);
    let scores = random(&mut rng, &[b, h, t, t], 8.0);
    // Causal, and row 5 onwards of batch 1 a second sequence.
    let mut mask = vec![f32::NEG_INFINITY; b * t * t];
    for r in 0..b {
        for i in 0..t {
            for j in 0..=i {
                if r == 0 || (i < 5) == (j < 5) {
                    mask[(r * t + i) * t + j] = 0.0;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu).unwrap();
    let f = masked_softmax(&scores, &mask, 0.3).unwrap();
    let c = candle_nn::ops::softmax(
        &(scores.as_tensor() * 0.3)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap(),
        D::Minus1,
    )
    .unwrap();
    same(&[&scores], &f, &c, &mut rng);
}

#[test]
fn silu_mul_matches_the_composed_activation() {
    let mut rng = StdRng::seed_from_u64(4);
    let (g, u) = (
        random(&mut rng, &[13, 7000], 10.0),
        random(&mut rng, &[13, 7000], 2.0),
    );
    let f = silu_mul(&g, &u).unwrap();
    let c = (candle_nn::ops::silu(&g).unwrap() * u.as_tensor()).unwrap();
    same(&[&g, &u], &f, &c, &mut rng);
}
