//! The naive dense reference: every row on its own, every assignment on its
//! own, no grouping. Slow on purpose; the tests hold the real kernels to it.

use candle_core::{IndexOp, Result, Tensor};

use super::LoraTarget;
use crate::routing::plan::RoutingPlan;

pub fn routed_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    targets: &[LoraTarget<'_>],
    plan: &RoutingPlan,
) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(plan.rows());
    for i in 0..plan.rows() {
        let xi = x.i(i..i + 1)?; // [1, in]
        let mut yi = xi.matmul(&w.t()?)?; // [1, out_total]
        if let Some(b) = bias {
            yi = yi.broadcast_add(b)?;
        }
        for (slot, weight) in plan.row(i) {
            for t in targets {
                let scale = t.slots.scale[slot as usize] as f64 * weight as f64;
                let a = t.slots.a.i(slot as usize)?;
                let b = t.slots.b.i(slot as usize)?;
                let out = b.dim(0)?;
                let delta = (xi.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
                let total = yi.dim(1)?;
                let delta = delta.pad_with_zeros(1, t.out_offset, total - t.out_offset - out)?;
                yi = (yi + delta)?;
            }
        }
        rows.push(yi);
    }
    Tensor::cat(&rows, 0)
}
