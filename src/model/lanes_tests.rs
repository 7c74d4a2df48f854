//! The vector primitives of the host kernels: the AVX2 copy (where the CPU
//! has it) computes what the portable copy does, including exp's edges.

use super::lanes::{Lanes, Portable};

fn inputs() -> Vec<f32> {
    let mut v: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.97).collect();
    v.extend([
        -88.0,
        -87.5,
        -100.0,
        88.0,
        95.0,
        0.0,
        -0.0,
        1e-7,
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NAN,
    ]);
    v
}

#[test]
fn exp_shifted_matches_std_exp() {
    #[cfg(target_arch = "x86_64")]
    {
        let Some(lanes) = super::lanes::Avx2Fma::detect() else {
            return;
        };
        for shift in [0.0f32, 3.5, -20.0] {
            let mut fast = inputs();
            let mut slow = inputs();
            let sum_fast = lanes.exp_shifted(&mut fast, shift);
            let sum_slow = Portable.exp_shifted(&mut slow, shift);
            for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                let close = (a - b).abs() <= 4e-7 * b.abs() + 1e-37;
                let same_special = (a.is_nan() && b.is_nan()) || a == b;
                assert!(close || same_special, "shift {shift} [{i}]: {a} vs {b}");
            }
            assert!(sum_fast.is_nan() && sum_slow.is_nan(), "NaN input: NaN sum");
        }
        // The softmax case: finite inputs at or below the shift.
        let mut fast: Vec<f32> = (0..37).map(|i| -(i as f32) * 0.7).collect();
        let mut slow = fast.clone();
        let (a, b) = (
            lanes.exp_shifted(&mut fast, 0.0),
            Portable.exp_shifted(&mut slow, 0.0),
        );
        assert!((a - b).abs() <= 1e-6 * b, "sum {a} vs {b}");
    }
}

#[test]
fn silu_mul_matches_the_portable_copy() {
    #[cfg(target_arch = "x86_64")]
    {
        let Some(lanes) = super::lanes::Avx2Fma::detect() else {
            return;
        };
        let g = inputs();
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 - i as f32 * 0.01).collect();
        let mut fast = vec![0f32; g.len()];
        let mut slow = vec![0f32; g.len()];
        lanes.silu_mul(&g, &u, &mut fast);
        Portable.silu_mul(&g, &u, &mut slow);
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            let close = (a - b).abs() <= 1e-6 * b.abs() + 1e-30;
            let same_special = (a.is_nan() && b.is_nan()) || a == b;
            assert!(close || same_special, "[{i}] g={}: {a} vs {b}", g[i]);
        }
    }
}
