//! The dispatch kernels held to the naive dense reference on random tensors
//! and random plans (top-1, top-2, empty slots, one slot taking every row,
//! rows with no adapter, mixed), for single and fused (q/k/v) targets.

use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::threading::Schedule;
use super::{cpu, generic, reference, row_gemm, LoraTarget, SlotWeights};
use crate::adapters::SlotId;
use crate::routing::plan::RoutingPlan;

const TOL: f32 = 1e-5;

/// Uniform values in `[-bound, bound]`.
fn uniform(rng: &mut StdRng, len: usize, bound: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-bound..=bound)).collect()
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data")
}

/// One projection's slot weights: slot 0 zero, slot s of rank `ranks[s]`
/// (zero-padded to `r_max`), scale 0 where the rank is 0.
fn slot_weights(
    rng: &mut StdRng,
    d_in: usize,
    out: usize,
    ranks: &[usize],
    r_max: usize,
) -> SlotWeights {
    let slots = ranks.len();
    let mut a = vec![0f32; slots * r_max * d_in];
    let mut b = vec![0f32; slots * out * r_max];
    let mut scale = vec![0f32; slots];
    for (s, &r) in ranks.iter().enumerate().skip(1) {
        if r == 0 {
            continue;
        }
        let a_vals = uniform(rng, r * d_in, 1.0 / (d_in as f32).sqrt());
        a[s * r_max * d_in..][..r * d_in].copy_from_slice(&a_vals);
        for o in 0..out {
            let row = &mut b[(s * out + o) * r_max..][..r];
            row.copy_from_slice(&uniform(rng, r, 1.0 / (r as f32).sqrt()));
        }
        scale[s] = 2.0 / r as f32;
    }
    SlotWeights {
        a: tensor(a, &[slots, r_max, d_in]),
        b: tensor(b, &[slots, out, r_max]),
        scale,
    }
}

/// A random linear with one slot-weight set per target (target widths `outs`,
/// laid side by side in the output).
struct Fixture {
    x: Tensor,
    w: Tensor,
    bias: Tensor,
    slots: Vec<SlotWeights>,
    offsets: Vec<usize>,
}

impl Fixture {
    fn new(
        seed: u64,
        n: usize,
        d_in: usize,
        outs: &[usize],
        ranks: &[usize],
        r_max: usize,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let d_out: usize = outs.iter().sum();
        let x = tensor(uniform(&mut rng, n * d_in, 1.0), &[n, d_in]);
        let w = tensor(
            uniform(&mut rng, d_out * d_in, 1.0 / (d_in as f32).sqrt()),
            &[d_out, d_in],
        );
        let bias = tensor(uniform(&mut rng, d_out, 1.0), &[d_out]);
        let slots = outs
            .iter()
            .map(|&out| slot_weights(&mut rng, d_in, out, ranks, r_max))
            .collect();
        let offsets = outs
            .iter()
            .scan(0, |acc, &o| {
                let start = *acc;
                *acc += o;
                Some(start)
            })
            .collect();
        Self {
            x,
            w,
            bias,
            slots,
            offsets,
        }
    }

    fn targets(&self) -> Vec<LoraTarget<'_>> {
        self.slots
            .iter()
            .zip(&self.offsets)
            .map(|(slots, &out_offset)| LoraTarget { slots, out_offset })
            .collect()
    }

    fn num_slots(&self) -> usize {
        self.slots[0].scale.len()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("same-shape f32 tensors")
}

/// cpu and generic both equal the reference within [`TOL`].
fn assert_matches_reference(fx: &Fixture, plan: &RoutingPlan, what: &str) {
    let targets = fx.targets();
    let grouped = plan.grouped(fx.num_slots());
    let want =
        reference::routed_linear(&fx.x, &fx.w, Some(&fx.bias), &targets, plan).expect("reference");
    let cpu =
        cpu::routed_linear(&fx.x, &fx.w, Some(&fx.bias), &targets, Some(&grouped)).expect("cpu");
    let gen = generic::routed_linear(&fx.x, &fx.w, Some(&fx.bias), &targets, Some(&grouped))
        .expect("generic");
    let (dc, dg) = (max_abs_diff(&cpu, &want), max_abs_diff(&gen, &want));
    assert!(dc <= TOL, "{what}: cpu differs from the reference by {dc}");
    assert!(
        dg <= TOL,
        "{what}: generic differs from the reference by {dg}"
    );
}

/// Two distinct slots in `lo..hi`.
fn two_slots(rng: &mut StdRng, lo: usize, hi: usize) -> (SlotId, SlotId) {
    let first = rng.random_range(lo..hi);
    let mut second = rng.random_range(lo..hi - 1);
    if second >= first {
        second += 1;
    }
    (first as SlotId, second as SlotId)
}

#[derive(Clone, Copy, Debug)]
enum PlanKind {
    Top1,
    Top2,
    OneSlotEveryRow,
    SomeRowsUnassigned,
    /// A modality adapter (slot 1) alone or with a top-2 over slots 2.., and
    /// some rows with nothing (needs at least 4 slots).
    Mixed,
}

fn random_plan(rng: &mut StdRng, kind: PlanKind, n: usize, num_slots: usize) -> RoutingPlan {
    let mut plan = RoutingPlan::with_capacity(n, 3 * n);
    for _ in 0..n {
        match kind {
            PlanKind::Top1 => plan.push_row([(rng.random_range(1..num_slots) as SlotId, 1.0)]),
            PlanKind::Top2 => {
                let (s1, s2) = two_slots(rng, 1, num_slots);
                let (p, q) = (rng.random_range(0.1..1.0f32), rng.random_range(0.1..1.0f32));
                plan.push_row([(s1, p / (p + q)), (s2, q / (p + q))]);
            }
            PlanKind::OneSlotEveryRow => plan.push_row([(2, 1.0)]),
            PlanKind::SomeRowsUnassigned => {
                if rng.random_bool(0.5) {
                    plan.push_row([(rng.random_range(1..num_slots) as SlotId, 0.7)]);
                } else {
                    plan.push_row([]);
                }
            }
            PlanKind::Mixed => {
                if rng.random_bool(0.2) {
                    plan.push_row([]);
                } else if rng.random_bool(0.4) {
                    plan.push_row([(1, 1.0)]);
                } else {
                    let (s1, s2) = two_slots(rng, 2, num_slots);
                    let p = rng.random_range(0.1..0.9f32);
                    plan.push_row([(1, 1.0), (s1, p), (s2, 1.0 - p)]);
                }
            }
        }
    }
    plan
}

const ALL_KINDS: [PlanKind; 5] = [
    PlanKind::Top1,
    PlanKind::Top2,
    PlanKind::OneSlotEveryRow,
    PlanKind::SomeRowsUnassigned,
    PlanKind::Mixed,
];

#[test]
fn single_target_matches_reference_for_every_plan_kind() {
    // Slot 4 has rank 0 (scale 0) and still appears in random plans.
    let ranks = [0, 4, 8, 3, 0, 6];
    for (i, n) in [1usize, 3, 17, 64].into_iter().enumerate() {
        let fx = Fixture::new(10 + i as u64, n, 32, &[24], &ranks, 8);
        let mut rng = StdRng::seed_from_u64(100 + i as u64);
        for kind in ALL_KINDS {
            let plan = random_plan(&mut rng, kind, n, ranks.len());
            assert_matches_reference(&fx, &plan, &format!("n={n} {kind:?}"));
        }
    }
}

#[test]
fn fused_qkv_targets_match_reference() {
    // q, k, v of different widths in one fused output; unused slot 5.
    let ranks = [0, 8, 4, 8, 2, 0];
    for (i, n) in [1usize, 3, 17, 64].into_iter().enumerate() {
        // d_in 64 and 128 fused columns: N = 3..64 take the column-major schedule.
        let fx = Fixture::new(20 + i as u64, n, 64, &[64, 32, 32], &ranks, 8);
        let mut rng = StdRng::seed_from_u64(200 + i as u64);
        for kind in ALL_KINDS {
            let plan = random_plan(&mut rng, kind, n, 5);
            assert_matches_reference(&fx, &plan, &format!("qkv n={n} {kind:?}"));
        }
    }
}

#[test]
fn targets_covering_part_of_the_output_match_reference() {
    // Two targets with a gap between them and no adapter on the last columns.
    let ranks = [0, 4, 4, 4];
    let mut fx = Fixture::new(30, 17, 16, &[8, 8, 8, 8], &ranks, 4);
    fx.slots = vec![fx.slots[0].clone(), fx.slots[2].clone()];
    fx.offsets = vec![0, 16];
    let mut rng = StdRng::seed_from_u64(300);
    for kind in ALL_KINDS {
        let plan = random_plan(&mut rng, kind, 17, ranks.len());
        assert_matches_reference(&fx, &plan, &format!("gapped {kind:?}"));
    }
}

#[test]
fn large_batch_matches_reference() {
    let ranks = [0, 16, 16, 16, 16];
    let fx = Fixture::new(40, 256, 128, &[128, 64, 64], &ranks, 16);
    let mut rng = StdRng::seed_from_u64(400);
    let plan = random_plan(&mut rng, PlanKind::Mixed, 256, ranks.len());
    assert_matches_reference(&fx, &plan, "n=256 mixed");
}

#[test]
fn zero_b_leaves_base_output_unchanged_exactly() {
    let ranks = [0, 8, 8, 8];
    let mut fx = Fixture::new(50, 17, 32, &[32, 16, 16], &ranks, 8);
    for s in &mut fx.slots {
        s.b = s.b.zeros_like().expect("zeros");
    }
    let targets = fx.targets();
    let mut rng = StdRng::seed_from_u64(500);
    let plan = random_plan(&mut rng, PlanKind::Mixed, 17, ranks.len()).grouped(ranks.len());
    let bias = Some(&fx.bias);
    let base = cpu::routed_linear(&fx.x, &fx.w, bias, &targets, None).expect("cpu base");
    let cpu = cpu::routed_linear(&fx.x, &fx.w, bias, &targets, Some(&plan)).expect("cpu");
    let gen = generic::routed_linear(&fx.x, &fx.w, bias, &targets, Some(&plan)).expect("generic");
    let gen_base =
        generic::routed_linear(&fx.x, &fx.w, bias, &targets, None).expect("generic base");
    assert_eq!(max_abs_diff(&cpu, &base), 0.0);
    assert_eq!(max_abs_diff(&gen, &gen_base), 0.0);
}

fn plain_linear(x: &Tensor, w: &Tensor, bias: &Tensor) -> Tensor {
    x.matmul(&w.t().expect("t"))
        .and_then(|y| y.broadcast_add(bias))
        .expect("plain linear")
}

#[test]
fn no_plan_or_empty_plan_is_plain_linear() {
    let fx = Fixture::new(60, 17, 32, &[32, 16], &[0, 4, 4], 4);
    let targets = fx.targets();
    let want = plain_linear(&fx.x, &fx.w, &fx.bias);
    let empty = RoutingPlan::empty(17).grouped(3);
    for plan in [None, Some(&empty)] {
        let got = cpu::routed_linear(&fx.x, &fx.w, Some(&fx.bias), &targets, plan).expect("cpu");
        assert!(max_abs_diff(&got, &want) <= TOL);
    }
    let no_bias = cpu::routed_linear(&fx.x, &fx.w, None, &targets, None).expect("cpu");
    let want_no_bias = fx.x.matmul(&fx.w.t().expect("t")).expect("matmul");
    assert!(max_abs_diff(&no_bias, &want_no_bias) <= TOL);
}

#[test]
fn linear_keeps_leading_dims_and_matches_candle() -> Result<()> {
    let fx = Fixture::new(70, 12, 32, &[40], &[0, 4], 4);
    let x3 = fx.x.reshape((3, 4, 32))?;
    let got = cpu::linear(&x3, &fx.w, Some(&fx.bias))?;
    assert_eq!(got.dims(), [3, 4, 40]);
    let want = plain_linear(&fx.x, &fx.w, &fx.bias).reshape((3, 4, 40))?;
    assert!(max_abs_diff(&got, &want) <= TOL);
    // A transposed (non-contiguous) weight view gives the same answer.
    let wt = fx.w.t()?.contiguous()?.t()?;
    let got_t = cpu::linear(&fx.x, &wt, None)?;
    let want_t = fx.x.matmul(&fx.w.t()?)?;
    assert!(max_abs_diff(&got_t, &want_t) <= TOL);
    // Non-f32 input takes the candle fallback.
    let got64 = cpu::linear(
        &fx.x.to_dtype(DType::F64)?,
        &fx.w.to_dtype(DType::F64)?,
        None,
    )?;
    assert_eq!(got64.dtype(), DType::F64);
    assert!(max_abs_diff(&got64.to_dtype(DType::F32)?, &want_t) <= TOL);
    Ok(())
}

#[test]
fn padded_rank_equals_unpadded() -> Result<()> {
    let (n, d_in, out, r) = (17, 32, 24, 3);
    let padded = Fixture::new(80, n, d_in, &[out], &[0, r, r], 8);
    let mut unpadded = Fixture::new(80, n, d_in, &[out], &[0, r, r], 8);
    let s = &padded.slots[0];
    unpadded.slots[0] = SlotWeights {
        a: s.a.narrow(1, 0, r)?.contiguous()?,
        b: s.b.narrow(2, 0, r)?.contiguous()?,
        scale: s.scale.clone(),
    };
    let mut rng = StdRng::seed_from_u64(800);
    let plan = random_plan(&mut rng, PlanKind::Top2, n, 3).grouped(3);
    let run =
        |fx: &Fixture| cpu::routed_linear(&fx.x, &fx.w, Some(&fx.bias), &fx.targets(), Some(&plan));
    assert!(max_abs_diff(&run(&padded)?, &run(&unpadded)?) <= TOL);
    Ok(())
}

#[test]
fn f64_inputs_fall_back_to_generic() -> Result<()> {
    let fx = Fixture::new(90, 5, 16, &[16], &[0, 4, 4], 4);
    let mut rng = StdRng::seed_from_u64(900);
    let plan = random_plan(&mut rng, PlanKind::Top2, 5, 3);
    let want = reference::routed_linear(&fx.x, &fx.w, Some(&fx.bias), &fx.targets(), &plan)?;
    let to64 = |t: &Tensor| t.to_dtype(DType::F64);
    let slots64 = SlotWeights {
        a: to64(&fx.slots[0].a)?,
        b: to64(&fx.slots[0].b)?,
        scale: fx.slots[0].scale.clone(),
    };
    let targets = [LoraTarget {
        slots: &slots64,
        out_offset: 0,
    }];
    let (x, w, b) = (to64(&fx.x)?, to64(&fx.w)?, to64(&fx.bias)?);
    let got = cpu::routed_linear(&x, &w, Some(&b), &targets, Some(&plan.grouped(3)))?;
    assert_eq!(got.dtype(), DType::F64);
    assert!(max_abs_diff(&got.to_dtype(DType::F32)?, &want) <= TOL);
    Ok(())
}

#[test]
fn bad_shapes_and_plans_are_errors_not_panics() {
    let fx = Fixture::new(95, 4, 16, &[16], &[0, 4, 4], 4);
    let targets = fx.targets();
    let mut too_many_rows = RoutingPlan::with_capacity(5, 5);
    let mut unknown_slot = RoutingPlan::with_capacity(4, 4);
    for _ in 0..5 {
        too_many_rows.push_row([(1, 1.0)]);
    }
    for _ in 0..4 {
        unknown_slot.push_row([(7, 1.0)]);
    }
    let call = |plan: &RoutingPlan, num_slots| {
        cpu::routed_linear(
            &fx.x,
            &fx.w,
            Some(&fx.bias),
            &targets,
            Some(&plan.grouped(num_slots)),
        )
    };
    assert!(call(&too_many_rows, 3).is_err());
    assert!(call(&unknown_slot, 8).is_err());
    let wrong_w = fx.w.narrow(1, 0, 8).expect("narrow");
    assert!(cpu::routed_linear(&fx.x, &wrong_w, None, &targets, None).is_err());
    let offset_past_end = [LoraTarget {
        slots: &fx.slots[0],
        out_offset: 4,
    }];
    let plan = random_plan(&mut StdRng::seed_from_u64(1), PlanKind::Top1, 4, 3).grouped(3);
    assert!(cpu::routed_linear(&fx.x, &fx.w, None, &offset_past_end, Some(&plan)).is_err());
}

#[test]
fn matmul_t_matches_naive_loop_and_accumulates() {
    let mut rng = StdRng::seed_from_u64(99);
    // Every schedule: gemv, row by row, column-major scratch, direct, threaded.
    for (m, k, n) in [
        (1, 7, 5),
        (2, 64, 96),
        (3, 16, 9),
        (17, 64, 80),
        (33, 40, 70),
        (128, 128, 300),
        (512, 256, 256),
    ] {
        let x = uniform(&mut rng, m * k, 1.0);
        let w = uniform(&mut rng, n * k, 1.0);
        let want: Vec<f32> = (0..m * n)
            .map(|ij| {
                (0..k)
                    .map(|kk| x[ij / n * k + kk] * w[ij % n * k + kk])
                    .sum()
            })
            .collect();
        let mut out = vec![f32::NAN; m * n];
        row_gemm::matmul_t(&x, m, k, &w, n, &mut out, false);
        let diff = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= 1e-4, "{m}x{n}x{k}: {diff}");
        row_gemm::matmul_t(&x, m, k, &w, n, &mut out, true);
        let diff = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - 2.0 * b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= 2e-4, "{m}x{n}x{k} accumulate: {diff}");
    }
}

#[test]
fn every_forced_schedule_gives_the_same_product() {
    let mut rng = StdRng::seed_from_u64(98);
    let schedules = [
        Schedule::Direct { threads: 1 },
        Schedule::Direct { threads: 2 },
        Schedule::RowByRow,
        Schedule::ColumnMajor,
    ];
    // 96x200x160 is above gemm's own threading threshold, so two threads split it.
    for (m, k, n) in [(1, 64, 64), (5, 70, 33), (96, 160, 200)] {
        let x = uniform(&mut rng, m * k, 1.0);
        let w = uniform(&mut rng, n * k, 1.0);
        let bias = uniform(&mut rng, m * n, 1.0);
        let mut want = bias.clone();
        row_gemm::matmul_t_with(
            Schedule::Direct { threads: 1 },
            &x,
            m,
            k,
            &w,
            n,
            &mut want,
            true,
        );
        for schedule in schedules {
            let mut out = bias.clone();
            row_gemm::matmul_t_with(schedule, &x, m, k, &w, n, &mut out, true);
            let diff = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff <= 1e-4, "{schedule:?} {m}x{n}x{k}: {diff}");
            let mut fresh = vec![f32::NAN; m * n];
            row_gemm::matmul_t_with(schedule, &x, m, k, &w, n, &mut fresh, false);
            let diff = fresh
                .iter()
                .zip(want.iter().zip(&bias))
                .map(|(a, (wb, b))| (a - (wb - b)).abs())
                .fold(0.0, f32::max);
            assert!(diff <= 1e-4, "{schedule:?} {m}x{n}x{k} overwrite: {diff}");
        }
    }
}
