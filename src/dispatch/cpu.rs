//! CPU kernels for the routed linear, working on the raw f32 slices of the
//! tensors: no candle op per slot or per token, one output allocation per
//! call, gemm threading chosen per product by size ([`super::threading`]).
//!
//! The math, for `x [N, in]`, `W [out_total, in]` and each target `t` owning
//! the output columns `off_t .. off_t + out_t`:
//!
//! ```text
//! y = x·Wᵀ + bias                                           (base, one gemm)
//! for every slot s the plan uses, with rows R_s and weights ω_i:
//!     for every target t with scale_t[s] ≠ 0:
//!         u   = x[R_s] · A_t[s]ᵀ                  [n_s, r_max]   (shrink)
//!         u_i ← u_i · ω_i · scale_t[s]                           (row scale)
//!         y[R_s, off_t ..] += u · B_t[s]ᵀ         [n_s, out_t]   (expand)
//! ```
//!
//! Invariants:
//! - every input is f32 on the CPU; anything else goes to the generic path;
//! - shapes, slot ids and row ids are checked up front and give an error,
//!   never a panic; the `gemm` call is the only `unsafe`, behind bound checks;
//! - a slot's rows are gathered into one contiguous buffer (skipped when the
//!   rows already are one contiguous run of x), and its output rows are
//!   written straight into y when they form a run or the group is small,
//!   otherwise expanded into a scratch buffer and scatter-added;
//! - the trailing rank columns of `u` that are exactly zero (zero-padded
//!   ranks, or all-zero adapters) are dropped before the expand, so padding
//!   to `r_max` costs only the shrink.

use candle_core::{bail, DType, Device, Result, Storage, StorageRef, Tensor};

use super::half_weights;
use super::row_gemm::{gemm_nt, Rows};
use super::{generic, LoraTarget, SlotWeights};
use crate::routing::plan::GroupedPlan;

/// Groups of at most this many rows that are not one contiguous run expand
/// row by row straight into y (a gemv each, 0.78 µs for 1x256x16) instead of
/// through a scratch buffer and a scatter-add (gemm 4x256x16: 2.0 µs, so
/// from 3 rows on the grouped product wins).
const EXPAND_ROW_BY_ROW_MAX: usize = 2;

/// `x·wᵀ (+ bias)` for `x [..., in]`, `w [out, in]`, `bias [out]`; the
/// leading dims of x are kept. f32 CPU tensors take the raw-slice kernel;
/// anything else falls back to candle ops.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let on_cpu_f32 = x.device().is_cpu()
        && [Some(x), Some(w), bias]
            .into_iter()
            .flatten()
            .all(|t| t.dtype() == DType::F32);
    if !on_cpu_f32 {
        let y = x.broadcast_matmul(&w.t()?)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let (d_out, d_in) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&d_in) {
        bail!("linear: x is {:?} but w is [{d_out}, {d_in}]", x.shape());
    }
    let rows = x.elem_count() / d_in.max(1);
    let x2 = x.reshape((rows, d_in))?;
    let y = base_product(&x2, w, bias)?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = d_out;
    }
    Tensor::from_vec(y, out_dims, x.device())
}

/// See [`super::routed_linear`]; the math is in the module doc.
pub fn routed_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    targets: &[LoraTarget<'_>],
    plan: Option<&GroupedPlan>,
) -> Result<Tensor> {
    let f32_tensors = [Some(x), bias]
        .into_iter()
        .flatten()
        .chain(targets.iter().flat_map(|t| [&t.slots.a, &t.slots.b]));
    let mut all_f32 =
        x.device().is_cpu() && w.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::F16);
    for t in f32_tensors {
        all_f32 &= t.dtype() == DType::F32 && t.device().is_cpu();
    }
    if !all_f32 {
        return generic::routed_linear(x, w, bias, targets, plan);
    }

    let (n, d_in) = x.dims2()?;
    let (d_out, w_in) = w.dims2()?;
    if w_in != d_in {
        bail!("routed_linear: x is [{n}, {d_in}] but w is [{d_out}, {w_in}]");
    }
    let mut y = base_product(x, w, bias)?;
    let Some(plan) = plan.filter(|p| !p.is_empty()) else {
        return Tensor::from_vec(y, (n, d_out), &Device::Cpu);
    };
    check_plan(plan, n)?;

    // Contiguous handles first, then read locks on them, then the slices.
    let x = x.contiguous()?;
    let mut shapes = Vec::with_capacity(targets.len());
    let mut handles = Vec::with_capacity(2 * targets.len());
    for (i, t) in targets.iter().enumerate() {
        shapes.push(check_target(i, t, d_in, d_out, plan)?);
        handles.push(t.slots.a.contiguous()?);
        handles.push(t.slots.b.contiguous()?);
    }
    let x_read = F32Read::new(&x)?;
    let reads = handles
        .iter()
        .map(F32Read::new)
        .collect::<Result<Vec<_>>>()?;
    let slices = reads
        .iter()
        .map(F32Read::slice)
        .collect::<Result<Vec<_>>>()?;
    let lora: Vec<TargetSlices<'_>> = targets
        .iter()
        .zip(shapes)
        .zip(slices.chunks_exact(2))
        .map(|((t, shape), ab)| TargetSlices {
            a: ab[0],
            b: ab[1],
            scale: &t.slots.scale,
            rank: shape.rank,
            out: shape.out,
            offset: t.out_offset,
        })
        .collect();

    add_lora(x_read.slice()?, d_in, &mut y, d_out, &lora, plan);
    Tensor::from_vec(y, (n, d_out), &Device::Cpu)
}

/// `x·wᵀ (+ bias)` into a fresh `[rows, out]` vector; x and bias f32, w f32
/// or f16 ([`super::half_weights`]), all on the CPU.
fn base_product(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Vec<f32>> {
    let (n, d_in) = x.dims2()?;
    let (d_out, _) = w.dims2()?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let x_read = F32Read::new(&x)?;
    let mut y = vec![0f32; n * d_out];
    let accumulate = match bias {
        Some(b) => {
            if b.dims() != [d_out] {
                bail!("linear: bias is {:?}, expected [{d_out}]", b.shape());
            }
            let b = b.contiguous()?;
            let b_read = F32Read::new(&b)?;
            let b = b_read.slice()?;
            for row in y.chunks_exact_mut(d_out) {
                row.copy_from_slice(b);
            }
            true
        }
        None => false,
    };
    let product = |x: &[f32], w: &[f32], y: &mut [f32], accumulate: bool| {
        let (x, w) = (Rows::new(x, n, d_in, d_in), Rows::new(w, d_out, d_in, d_in));
        gemm_nt(x, w, y, d_out, accumulate, &mut Vec::new())
    };
    let x = x_read.slice()?;
    if w.dtype() == DType::F16 {
        let (storage, layout) = w.storage_and_layout();
        let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets())
        else {
            bail!("linear: f16 weights must be contiguous on the CPU");
        };
        let w16 = &cpu.as_slice::<half::f16>()?[start..end];
        // Each widened block of output columns accumulates onto what
        // `product` prepared, rows `d_out` apart.
        let mut scratch = Vec::new();
        let widened = |x: &[f32], w: &[f32], cols: usize, y: &mut [f32]| {
            let (x, w) = (Rows::new(x, n, d_in, d_in), Rows::new(w, cols, d_in, d_in));
            gemm_nt(x, w, y, d_out, true, &mut scratch)
        };
        half_weights::product(x, n, d_in, w16, d_out, &mut y, accumulate, widened);
    } else {
        product(x, F32Read::new(&w)?.slice()?, &mut y, accumulate);
    }
    Ok(y)
}

/// The slices and shape of one target's stacked slot weights.
struct TargetSlices<'a> {
    /// `[slots, rank, in]`
    a: &'a [f32],
    /// `[slots, out, rank]`
    b: &'a [f32],
    scale: &'a [f32],
    rank: usize,
    out: usize,
    offset: usize,
}

/// Scratch buffers shared by all slots and targets of one call.
#[derive(Default)]
struct Scratch {
    gathered: Vec<f32>,
    shrunk: Vec<f32>,
    expanded: Vec<f32>,
    /// Backs [`Schedule::ColumnMajor`] products.
    column_major: Vec<f32>,
}

/// Adds every active slot's low-rank update onto `y [n, d_out]`.
fn add_lora(
    x: &[f32],
    d_in: usize,
    y: &mut [f32],
    d_out: usize,
    targets: &[TargetSlices<'_>],
    plan: &GroupedPlan,
) {
    let Scratch {
        gathered,
        shrunk,
        expanded,
        column_major,
    } = &mut Scratch::default();
    for (slot, rows, weights) in plan.active_slots() {
        let slot = slot as usize;
        if targets.iter().all(|t| t.scale[slot] == 0.0) {
            continue;
        }
        let n_s = rows.len();
        let first = rows[0] as usize;
        let is_run = rows.windows(2).all(|p| p[1] == p[0] + 1);
        let xs: &[f32] = if is_run {
            &x[first * d_in..(first + n_s) * d_in]
        } else {
            gathered.clear();
            for &r in rows {
                let r = r as usize;
                gathered.extend_from_slice(&x[r * d_in..(r + 1) * d_in]);
            }
            gathered
        };
        for t in targets {
            let scale = t.scale[slot];
            if scale == 0.0 {
                continue;
            }
            let (r, out) = (t.rank, t.out);
            let a = &t.a[slot * r * d_in..(slot + 1) * r * d_in];
            let b = &t.b[slot * out * r..(slot + 1) * out * r];

            // Shrink and scale: u[i] = ω_i·scale · x_i·Aᵀ.
            let u = &mut *shrunk;
            u.resize(n_s * r, 0.0);
            let (xs_rows, a_rows) = (Rows::new(xs, n_s, d_in, d_in), Rows::new(a, r, d_in, d_in));
            gemm_nt(xs_rows, a_rows, u, r, false, column_major);
            for (u_i, &w_i) in u.chunks_exact_mut(r).zip(weights) {
                let coef = w_i * scale;
                u_i.iter_mut().for_each(|v| *v *= coef);
            }
            let r_eff = effective_rank(u, r);
            if r_eff == 0 {
                continue;
            }

            // Expand: y[rows, offset..offset + out] += u·Bᵀ.
            let b_rows = Rows::new(b, out, r_eff, r);
            if is_run {
                let dst = &mut y[first * d_out + t.offset..];
                gemm_nt(
                    Rows::new(u, n_s, r_eff, r),
                    b_rows,
                    dst,
                    d_out,
                    true,
                    column_major,
                );
            } else if n_s <= EXPAND_ROW_BY_ROW_MAX {
                for (i, &row) in rows.iter().enumerate() {
                    let dst = &mut y[row as usize * d_out + t.offset..][..out];
                    let u_i = Rows::new(&u[i * r..], 1, r_eff, r);
                    gemm_nt(u_i, b_rows, dst, out, true, column_major);
                }
            } else {
                let delta = &mut *expanded;
                delta.resize(n_s * out, 0.0);
                gemm_nt(
                    Rows::new(u, n_s, r_eff, r),
                    b_rows,
                    delta,
                    out,
                    false,
                    column_major,
                );
                for (&row, d) in rows.iter().zip(delta.chunks_exact(out)) {
                    let dst = &mut y[row as usize * d_out + t.offset..][..out];
                    dst.iter_mut().zip(d).for_each(|(y, d)| *y += d);
                }
            }
        }
    }
}

/// One more than the last rank column of `u [n, r]` holding a non-zero.
fn effective_rank(u: &[f32], r: usize) -> usize {
    (0..r)
        .rev()
        .find(|&j| u.chunks_exact(r).any(|row| row[j] != 0.0))
        .map_or(0, |j| j + 1)
}

/// A read lock on a contiguous CPU tensor and its element range.
struct F32Read<'a> {
    storage: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> F32Read<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("dispatch::cpu: tensor {:?} is not contiguous", t.shape());
        };
        Ok(Self {
            storage,
            start,
            end,
        })
    }

    fn slice(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[self.start..self.end]),
            _ => bail!("dispatch::cpu: tensor is not on the CPU"),
        }
    }
}

/// Shape of one target's slot weights, after checking it against x, W and the plan.
struct TargetShape {
    rank: usize,
    out: usize,
}

fn check_target(
    index: usize,
    t: &LoraTarget<'_>,
    d_in: usize,
    d_out: usize,
    plan: &GroupedPlan,
) -> Result<TargetShape> {
    let SlotWeights { a, b, scale } = t.slots;
    let (slots, rank, a_in) = a.dims3()?;
    let (b_slots, out, b_rank) = b.dims3()?;
    if a_in != d_in || b_slots != slots || b_rank != rank || scale.len() != slots {
        bail!(
            "routed_linear: target {index}: A is {:?}, B is {:?}, {} scales; \
             expected A [slots, r, {d_in}], B [slots, out, r], one scale per slot",
            a.shape(),
            b.shape(),
            scale.len()
        );
    }
    if t.out_offset + out > d_out {
        bail!(
            "routed_linear: target {index}: columns {}..{} exceed the output width {d_out}",
            t.out_offset,
            t.out_offset + out
        );
    }
    if let Some((slot, _, _)) = plan.active_slots().find(|(s, _, _)| *s as usize >= slots) {
        bail!("routed_linear: target {index}: plan uses slot {slot} but only {slots} slots exist");
    }
    Ok(TargetShape { rank, out })
}

fn check_plan(plan: &GroupedPlan, n: usize) -> Result<()> {
    if plan.num_rows != n {
        bail!("routed_linear: plan has {} rows, x has {n}", plan.num_rows);
    }
    let consistent = plan.starts.first() == Some(&0)
        && plan.starts.windows(2).all(|p| p[0] <= p[1])
        && plan.starts.last() == Some(&plan.rows.len())
        && plan.weights.len() == plan.rows.len();
    if !consistent {
        bail!("routed_linear: malformed grouped plan (starts, rows and weights disagree)");
    }
    if let Some(r) = plan.rows.iter().find(|&&r| r as usize >= n) {
        bail!("routed_linear: plan routes row {r} but x has {n} rows");
    }
    Ok(())
}
