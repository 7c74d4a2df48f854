//! Micro-benchmarks behind the CPU dispatch choices
//! (`cargo run --release --example dispatch_micro`; prefix `nice -n -15` on a
//! busy machine):
//!
//! 1. products `x[m,k]·w[n,k]ᵀ` under each forced schedule of
//!    `row_gemm::matmul_t_with` (gemm straight into the row-major output on 1 and
//!    2 threads, through a column-major scratch, one gemv per row), the
//!    schedule `row_gemm::matmul_t` picks, and candle's matmul;
//! 2. the LoRA-shaped small products: gemm against a hand-written
//!    chunked-dot loop, and gemm with the weights stored transposed
//!    (`Aᵀ [in, r]`, `Bᵀ [r, out]`), the layout the hot set does not use today;
//! 3. `cpu::routed_linear` against the plain base linear for a fused qkv
//!    projection (d = 256, out = 768), 4 adapter slots of rank 16, every row
//!    with a modality adapter plus a top-2 over the other three, at N = 1,
//!    16 and 64, next to the arithmetic ratio 1 + LoRA FLOPs / base FLOPs.
//!
//! Times are the minimum over many short samples, in microseconds. The
//! numbers measured on the development machine are at the end of this file.

use std::time::Instant;

use candle_core::{Device, Tensor};
use gemm::Parallelism;
use molora::dispatch::threading::Schedule;
use molora::dispatch::{cpu, row_gemm, LoraTarget, SlotWeights};
use molora::routing::plan::RoutingPlan;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Minimum time per call over `samples` samples of `iters` calls each, in µs.
fn time_us(samples: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters.max(3) {
        f();
    }
    let mut best = f64::MAX;
    for _ in 0..samples {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        best = best.min(start.elapsed().as_secs_f64() / iters as f64);
    }
    best * 1e6
}

/// Enough calls per sample for ~0.2 ms, enough samples for ~0.3 s.
fn budget(macs: usize) -> (usize, usize) {
    let est_us = macs as f64 / 20_000.0 + 0.5;
    let iters = ((200.0 / est_us) as usize).clamp(1, 1000);
    let samples = ((300_000.0 / (est_us * iters as f64)) as usize).clamp(20, 2000);
    (samples, iters)
}

fn uniform(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0..1.0f32)).collect()
}

/// Element strides of a matrix: `(i, j)` at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Strides {
    rs: usize,
    cs: usize,
}

const fn row_major(cols: usize) -> Strides {
    Strides { rs: cols, cs: 1 }
}

/// `dst[m,n] = lhs[m,k]·rhs[k,n]` with arbitrary strides, through gemm: for
/// the weight-layout experiment only (molora's products go through `cpu`).
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    ds: Strides,
    lhs: &[f32],
    ls: Strides,
    rhs: &[f32],
    rs: Strides,
    par: Parallelism,
) {
    let last = |s: Strides, r: usize, c: usize| (r - 1) * s.rs + (c - 1) * s.cs;
    assert!(dst.len() > last(ds, m, n) && lhs.len() > last(ls, m, k) && rhs.len() > last(rs, k, n));
    // SAFETY: the assert bounds the last (hence every) index of each matrix.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            ds.cs as isize,
            ds.rs as isize,
            false,
            lhs.as_ptr(),
            ls.cs as isize,
            ls.rs as isize,
            rhs.as_ptr(),
            rs.cs as isize,
            rs.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// The hand-written alternative: one 8-lane chunked dot product per output.
fn hand_loop(x: &[f32], (m, n, k): (usize, usize, usize), w: &[f32], out: &mut [f32]) {
    for (x_i, out_i) in x.chunks_exact(k).take(m).zip(out.chunks_exact_mut(n)) {
        for (o, w_j) in out_i.iter_mut().zip(w.chunks_exact(k)) {
            let mut lanes = [0f32; 8];
            let (xc, wc) = (x_i.chunks_exact(8), w_j.chunks_exact(8));
            let tail: f32 = xc
                .remainder()
                .iter()
                .zip(wc.remainder())
                .map(|(a, b)| a * b)
                .sum();
            for (a, b) in xc.zip(wc) {
                for (l, (a, b)) in lanes.iter_mut().zip(a.iter().zip(b)) {
                    *l += a * b;
                }
            }
            *o = lanes.iter().sum::<f32>() + tail;
        }
    }
}

fn products_table(rng: &mut StdRng) -> candle_core::Result<()> {
    println!("## 1. x[m,k]·w[n,k]ᵀ (µs)");
    println!(
        "{:>15} {:>10} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "m x n x k",
        "MACs",
        "direct1t",
        "direct2t",
        "2t/1t",
        "colmaj1t",
        "byrow1t",
        "matmul_t",
        "candle"
    );
    let shapes = [
        (1, 256, 256),
        (1, 768, 256),
        (2, 768, 256),
        (4, 768, 256),
        (8, 768, 256),
        (16, 256, 256),
        (16, 768, 256),
        (32, 768, 256),
        (64, 256, 768),
        (64, 768, 256),
        (128, 768, 256),
        (256, 256, 768),
        (256, 768, 256),
        (1024, 256, 256),
        (1024, 768, 256),
    ];
    for (m, n, k) in shapes {
        let (x, w) = (uniform(rng, m * k), uniform(rng, n * k));
        let mut out = vec![0f32; m * n];
        let (samples, iters) = budget(m * n * k);
        let time = |f: &mut dyn FnMut()| time_us(samples, iters, f);
        let mut forced = |schedule| {
            time(&mut || row_gemm::matmul_t_with(schedule, &x, m, k, &w, n, &mut out, false))
        };
        let one = forced(Schedule::Direct { threads: 1 });
        let two = forced(Schedule::Direct { threads: 2 });
        let colmaj = forced(Schedule::ColumnMajor);
        let by_row = forced(Schedule::RowByRow);
        let scheduled = time(&mut || row_gemm::matmul_t(&x, m, k, &w, n, &mut out, false));
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)?.t()?;
        let candle = time(&mut || {
            let _ = xt.matmul(&wt);
        });
        println!(
            "{:>15} {:>10} {:>9.2} {:>9.2} {:>6.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            format!("{m}x{n}x{k}"),
            m * n * k,
            one,
            two,
            two / one,
            colmaj,
            by_row,
            scheduled,
            candle
        );
    }
    Ok(())
}

fn lora_products_table(rng: &mut StdRng) {
    println!("\n## 2. LoRA-shaped products, one thread (µs)");
    println!(
        "{:>15} {:>9} {:>9} {:>13}",
        "m x n x k", "gemm", "hand", "gemm, wᵀ kept"
    );
    let shapes = [
        (1, 16, 256),
        (4, 16, 256),
        (12, 16, 256),
        (16, 16, 256),
        (1, 256, 16),
        (4, 256, 16),
        (12, 256, 16),
        (16, 256, 16),
        (64, 256, 16),
    ];
    for (m, n, k) in shapes {
        let (x, w) = (uniform(rng, m * k), uniform(rng, n * k));
        let mut out = vec![0f32; m * n];
        let (samples, iters) = budget(m * n * k);
        let g = time_us(samples, iters, || {
            row_gemm::matmul_t_with(
                Schedule::Direct { threads: 1 },
                &x,
                m,
                k,
                &w,
                n,
                &mut out,
                false,
            )
        });
        let h = time_us(samples, iters, || hand_loop(&x, (m, n, k), &w, &mut out));
        // The weight stored as wᵀ [k, n] row-major: rhs (kk, j) = wt[kk·n + j].
        let t = time_us(samples, iters, || {
            gemm_strided(
                (m, n, k),
                &mut out,
                row_major(n),
                &x,
                row_major(k),
                &w,
                row_major(n),
                Parallelism::None,
            )
        });
        println!(
            "{:>15} {:>9.2} {:>9.2} {:>13.2}",
            format!("{m}x{n}x{k}"),
            g,
            h,
            t
        );
    }
}

fn slot_weights(
    rng: &mut StdRng,
    slots: usize,
    rank: usize,
    d_in: usize,
    out: usize,
) -> candle_core::Result<SlotWeights> {
    let mut a = uniform(rng, slots * rank * d_in);
    let mut b = uniform(rng, slots * out * rank);
    a[..rank * d_in].fill(0.0); // slot 0: the null adapter
    b[..out * rank].fill(0.0);
    let mut scale = vec![2.0; slots];
    scale[0] = 0.0;
    Ok(SlotWeights {
        a: Tensor::from_vec(a, (slots, rank, d_in), &Device::Cpu)?,
        b: Tensor::from_vec(b, (slots, out, rank), &Device::Cpu)?,
        scale,
    })
}

fn routed_table(rng: &mut StdRng) -> candle_core::Result<()> {
    let (d, r, adapters) = (256usize, 16usize, 4usize);
    let outs = [256usize, 256, 256];
    let d_out: usize = outs.iter().sum();
    let slots: Vec<SlotWeights> = outs
        .iter()
        .map(|&o| slot_weights(rng, adapters + 1, r, d, o))
        .collect::<candle_core::Result<_>>()?;
    let targets: Vec<LoraTarget<'_>> = slots
        .iter()
        .zip([0, 256, 512])
        .map(|(slots, out_offset)| LoraTarget { slots, out_offset })
        .collect();
    let w = Tensor::from_vec(uniform(rng, d_out * d), (d_out, d), &Device::Cpu)?;

    // Per row three adapters: the modality adapter (slot 1) and a top-2 over slots 2..=4.
    let lora_macs_per_adapter: usize = outs.iter().map(|&o| r * d + o * r).sum();
    let arithmetic = 1.0 + (3 * lora_macs_per_adapter) as f64 / (d * d_out) as f64;
    println!(
        "\n## 3. routed_linear vs base linear, d={d}, out={d_out} (fused qkv), \
         {adapters} slots r={r}, modality + top-2 per row (µs)"
    );
    println!(
        "{:>4} {:>9} {:>9} {:>9} {:>7} {:>7} {:>11} {:>7}",
        "N", "candle", "base", "routed", "ratio", "arith", "ratio/arith", "target"
    );
    for n in [1usize, 16, 64] {
        let x = Tensor::from_vec(uniform(rng, n * d), (n, d), &Device::Cpu)?;
        let mut plan = RoutingPlan::with_capacity(n, 3 * n);
        for _ in 0..n {
            let skip = rng.random_range(2..=4u16);
            let mut semantic = (2..=4u16).filter(|&s| s != skip);
            let (first, second) = (semantic.next().unwrap_or(2), semantic.next().unwrap_or(3));
            let p = rng.random_range(0.5..1.0f32);
            plan.push_row([(1, 1.0), (first, p), (second, 1.0 - p)]);
        }
        let grouped = plan.grouped(adapters + 1);
        let (samples, iters) = budget(n * d * d_out * 2);
        let wt = w.t()?;
        let candle = time_us(samples, iters, || {
            let _ = x.matmul(&wt);
        });
        let base = time_us(samples, iters, || {
            let _ = cpu::linear(&x, &w, None);
        });
        let routed = time_us(samples, iters, || {
            let _ = cpu::routed_linear(&x, &w, None, &targets, Some(&grouped));
        });
        let ratio = routed / base;
        let target = if n == 1 { "<=1.3" } else { "<=1.1" };
        println!(
            "{:>4} {:>9.2} {:>9.2} {:>9.2} {:>7.3} {:>7.3} {:>11.3} {:>7}",
            n,
            candle,
            base,
            routed,
            ratio,
            arithmetic,
            ratio / arithmetic,
            target
        );
    }
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    println!("rayon threads: {}", rayon::current_num_threads());
    products_table(&mut rng)?;
    lora_products_table(&mut rng);
    routed_table(&mut rng)
}

// MEASURED (filled in below after the final run)
