//! Routed low-rank matmul: the base projection over all N rows plus, for every
//! adapter slot the plan uses, `x·Aᵀ·Bᵀ·scale·weight` on that slot's rows,
//! scatter-added onto the base output. Structured like MoE dispatch
//! (histogram -> gather rows per slot -> grouped matmul -> scatter-add).
//!
//! One interface, one implementation per platform, chosen here:
//! - `cpu`: hand-scheduled kernels on the raw f32 slices (gemm with the
//!   thread count chosen by problem size; no per-op overhead);
//! - `generic`: the same algorithm in candle tensor ops, for any device;
//! - `reference`: a naive dense per-token loop, for tests only;
//! - `row_gemm`: the gemm call the CPU kernels share, with its schedules;
//! - `half_weights`: base weights stored in f16, computed in f32 (CPU).

pub mod cpu;
pub mod generic;
pub mod half_weights;
pub mod reference;
pub mod row_gemm;
pub mod threading;

#[cfg(test)]
mod tests;

use candle_core::{Result, Tensor};

use crate::routing::plan::GroupedPlan;

/// Stacked adapter weights of one projection across all hot-set slots
/// (vLLM's `[max_loras, rank, in]` layout). Slot 0 is the null adapter and is
/// all zeros; ranks below `r_max` are zero-padded, which adds nothing.
#[derive(Debug, Clone)]
pub struct SlotWeights {
    /// `[slots, r_max, in]`
    pub a: Tensor,
    /// `[slots, out, r_max]`
    pub b: Tensor,
    /// `lora_alpha / r` per slot (0 for an empty slot).
    pub scale: Vec<f32>,
}

/// One projection's adapters inside a (possibly fused) linear: its slot
/// weights and where its output columns start in the fused output.
#[derive(Debug, Clone, Copy)]
pub struct LoraTarget<'a> {
    pub slots: &'a SlotWeights,
    pub out_offset: usize,
}

/// `y = x·Wᵀ (+ bias) + Σ_slot Σ_{rows of slot} weight · scale[slot] · (x·A[slot]ᵀ)·B[slot]ᵀ`
///
/// - `x`: `[N, in]`, `w`: `[out_total, in]`, `bias`: `[out_total]`;
/// - each target adds into columns `out_offset..out_offset + out` of `y`;
/// - `plan`: `None` or an empty plan means no adapter work at all.
pub fn routed_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    targets: &[LoraTarget<'_>],
    plan: Option<&GroupedPlan>,
) -> Result<Tensor> {
    if x.device().is_cpu() {
        cpu::routed_linear(x, w, bias, targets, plan)
    } else {
        generic::routed_linear(x, w, bias, targets, plan)
    }
}

/// `y = x·Wᵀ + bias` without adapters, on the platform's fastest path.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    routed_linear(x, w, bias, &[], None)
}
