//! Routed linear in candle tensor ops, for any device: one gather, two
//! matmuls, one scale and one scatter-add per active slot.

use candle_core::{DType, IndexOp, Result, Tensor};

use super::LoraTarget;
use crate::routing::plan::GroupedPlan;

pub fn routed_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    targets: &[LoraTarget<'_>],
    plan: Option<&GroupedPlan>,
) -> Result<Tensor> {
    // Weights stored in a narrower dtype (f16) are widened for the product.
    let w = &w.to_dtype(x.dtype())?;
    let mut y = x.matmul(&w.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let Some(plan) = plan.filter(|p| !p.is_empty()) else {
        return Ok(y);
    };
    let device = x.device();
    for (slot, rows, weights) in plan.active_slots() {
        let idx = Tensor::from_slice(rows, rows.len(), device)?;
        let xs = x.index_select(&idx, 0)?; // [n_s, in]
        for t in targets {
            let scale = t.slots.scale[slot as usize];
            if scale == 0.0 {
                continue;
            }
            let a = t.slots.a.i(slot as usize)?; // [r, in]
            let b = t.slots.b.i(slot as usize)?; // [out, r]
            let coef: Vec<f32> = weights.iter().map(|w| w * scale).collect();
            let coef = Tensor::from_vec(coef, (rows.len(), 1), device)?.to_dtype(x.dtype())?;
            let delta = xs.matmul(&a.t()?)?.matmul(&b.t()?)?.broadcast_mul(&coef)?; // [n_s, out]
            let out = b.dim(0)?;
            let cols = y.narrow(1, t.out_offset, out)?.contiguous()?;
            let cols = cols.index_add(&idx, &delta, 0)?;
            y = y.slice_assign(&[0..y.dim(0)?, t.out_offset..t.out_offset + out], &cols)?;
        }
    }
    debug_assert_eq!(y.dtype(), x.dtype());
    let _ = DType::F32;
    Ok(y)
}
