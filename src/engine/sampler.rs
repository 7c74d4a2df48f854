//! Drawing the next token of one sequence from its logits.
//!
//! Invariants:
//! - One [`Sampler`] (one seeded `StdRng`) per sequence, and exactly one
//!   uniform draw per non-greedy token, so a request with a seed yields the
//!   same tokens whatever batch it runs in and whatever its neighbours do.
//! - Greedy (temperature 0) draws nothing: argmax, ties to the lowest id.
//! - Order of the filters: temperature, top-k, top-p on the softmax of what
//!   top-k kept (as Hugging Face's warpers), then a categorical draw.
//! - Non-finite logits (a mask's -inf, a model's NaN) are never sampled.
//! - Ranks are total: equal logits are ordered by lower id, so every filter
//!   keeps the same set whatever order the work is done in (see `filters`).
//! - Cost, n = vocabulary: no sort of the vocabulary, ever. Without top-k,
//!   a few branch-light passes over dense arrays (max, exp, and for top-p a
//!   mass histogram over logit bins plus a sort of the one bin where the mass
//!   crosses p). With top-k, one pass that buffers only logits above the
//!   running k-th best and cuts the buffer with `select_nth_unstable`, then
//!   work on k.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::filters::{
    exp_nonpos, finite_max, lane_sum, nucleus_cutoff, nucleus_cutoff_dense, top_k_selected,
    top_k_streamed, Candidate, Cutoff, DRAW_BLOCK, STREAM_TOP_K_DIVISOR,
};
use super::modality::{apply_mask, Forced, ModalityError, ModalityState};
use super::params::{GenerationParams, SamplingParams};
use crate::model::config::VocabLayout;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("no token can be sampled: all {vocab} logits are masked or not finite")]
    NoCandidate { vocab: usize },
    #[error("classifier-free guidance needs logits of one length: conditional {cond}, unconditional {uncond}")]
    CfgLengthMismatch { cond: usize, uncond: usize },
    #[error(transparent)]
    Modality(#[from] ModalityError),
}

/// The per-sequence sampler: its random stream plus reusable buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: StdRng,
    /// Candidates after top-k.
    scratch: Vec<Candidate>,
    /// The boundary bin of top-p.
    boundary: Vec<Candidate>,
    /// Dense weights, one per vocabulary id (paths without top-k).
    weights: Vec<f32>,
    /// Sums of `DRAW_BLOCK` consecutive weights.
    block_sums: Vec<f64>,
    /// Top-p bin of every vocabulary id.
    bins: Vec<u16>,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            scratch: Vec::new(),
            boundary: Vec::new(),
            weights: Vec::new(),
            block_sums: Vec::new(),
            bins: Vec::new(),
        }
    }

    /// Draws one token id from `logits` (length = vocabulary size).
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
    ) -> Result<u32, SamplingError> {
        let no_candidate = SamplingError::NoCandidate {
            vocab: logits.len(),
        };
        // Written so that a NaN temperature is greedy too.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(params.temperature > 0.0) {
            return argmax(logits).ok_or(no_candidate);
        }
        let top_p = params.top_p.filter(|&p| p > 0.0 && p < 1.0);
        let drawn = match params.top_k.filter(|&k| k >= 1 && k < logits.len()) {
            None => self.sample_dense(logits, params.temperature, top_p),
            Some(k) => {
                self.scratch.clear();
                if k <= logits.len() / STREAM_TOP_K_DIVISOR {
                    top_k_streamed(logits, k, &mut self.scratch);
                } else {
                    top_k_selected(logits, k, &mut self.scratch);
                }
                self.sample_candidates(params.temperature, top_p)
            }
        };
        drawn.ok_or(no_candidate)
    }

    /// Without top-k: weights over the whole vocabulary, top-p by cutoff,
    /// the draw in id order, located through sums of 64-id blocks.
    fn sample_dense(&mut self, logits: &[f32], t: f32, top_p: Option<f32>) -> Option<u32> {
        let max = finite_max(logits);
        if max == f32::NEG_INFINITY {
            return None;
        }
        let inv_t = 1.0 / t;
        let weights = &mut self.weights;
        weights.resize(logits.len(), 0.0);
        for (w, &l) in weights.iter_mut().zip(logits) {
            let e = exp_nonpos((l - max) * inv_t);
            *w = if l.is_finite() { e } else { 0.0 };
        }
        if let Some(p) = top_p {
            let target = p as f64 * lane_sum(weights);
            let (bins, boundary) = (&mut self.bins, &mut self.boundary);
            let cut = nucleus_cutoff_dense(logits, weights, target, max, t, bins, boundary);
            if let Some(cut) = cut {
                // Branch-free form of `Cutoff::keeps`, so the pass vectorises.
                for (id, (w, &l)) in weights.iter_mut().zip(logits).enumerate() {
                    let keep = (l > cut.logit) | ((l == cut.logit) & (id as u32 <= cut.id));
                    *w = if keep { *w } else { 0.0 };
                }
            }
        }
        self.block_sums.clear();
        self.block_sums
            .extend(weights.chunks(DRAW_BLOCK).map(lane_sum));
        let mass: f64 = self.block_sums.iter().sum();

        let u = self.rng.random::<f64>() * mass;
        let mut cum = 0.0f64;
        for (b, &block) in self.block_sums.iter().enumerate() {
            if u >= cum + block {
                cum += block;
                continue;
            }
            let start = b * DRAW_BLOCK;
            for (j, &w) in weights[start..].iter().take(DRAW_BLOCK).enumerate() {
                cum += w as f64;
                if u < cum && w > 0.0 {
                    return Some((start + j) as u32);
                }
            }
        }
        // Rounding left u at the very top: the last token with mass.
        weights.iter().rposition(|&w| w > 0.0).map(|i| i as u32)
    }

    /// After top-k: weights over the kept candidates, top-p by cutoff, the
    /// draw in the candidates' (deterministic) order.
    fn sample_candidates(&mut self, t: f32, top_p: Option<f32>) -> Option<u32> {
        let c = &mut self.scratch;
        let max = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.logit));
        if c.is_empty() {
            return None;
        }
        let inv_t = 1.0 / t;
        let mut total = 0.0f64;
        for cand in c.iter_mut() {
            cand.weight = exp_nonpos((cand.logit - max) * inv_t);
            total += cand.weight as f64;
        }
        if let Some(p) = top_p {
            let items = c.iter().map(|x| (x.id, x.logit, x.weight));
            let (cut, mass) = nucleus_cutoff(items, p as f64 * total, max, t, &mut self.boundary);
            c.retain(|x| Cutoff::keeps(cut, x.id, x.logit));
            total = mass;
        }
        let u = self.rng.random::<f64>() * total;
        let mut cum = 0.0f64;
        for cand in c.iter() {
            cum += cand.weight as f64;
            if u < cum {
                return Some(cand.id);
            }
        }
        c.iter().rev().find(|x| x.weight > 0.0).map(|x| x.id)
    }
}

/// Index of the largest finite logit, the lowest id among equals; None when
/// no logit is finite.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    // Two cheap passes (a lane-parallel max, then the first position holding
    // it) beat one pass carrying an index through a serial comparison chain.
    let max = finite_max(logits);
    if max == f32::NEG_INFINITY {
        return None;
    }
    logits.iter().position(|&l| l == max).map(|i| i as u32)
}

/// Classifier-free guidance on the image-code range only:
/// cond = uncond + scale · (cond − uncond). Logits outside the range, and
/// entries where either side is not finite, stay as they are. Scale 1 is a
/// no-op.
pub fn apply_cfg(
    cond: &mut [f32],
    uncond: &[f32],
    scale: f32,
    vocab: &VocabLayout,
) -> Result<(), SamplingError> {
    if cond.len() != uncond.len() {
        return Err(SamplingError::CfgLengthMismatch {
            cond: cond.len(),
            uncond: uncond.len(),
        });
    }
    if scale == 1.0 {
        return Ok(());
    }
    let r = vocab.image_range();
    let (a, b) = (
        (r.start as usize).min(cond.len()),
        (r.end as usize).min(cond.len()),
    );
    for (c, &u) in cond[a..b].iter_mut().zip(&uncond[a..b]) {
        if c.is_finite() && u.is_finite() {
            *c = u + scale * (*c - u);
        }
    }
    Ok(())
}

/// What one decoding step produced for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chosen {
    /// The sampled token.
    pub token: u32,
    /// A token to append right after it without sampling (`<eoi>`).
    pub forced: Forced,
}

/// One decoding step of one sequence: guidance (image mode, when the request
/// uses it and the engine ran the unconditional sequence), the modality mask,
/// the draw with the current modality's settings, and the state update.
pub fn choose_next(
    state: &mut ModalityState,
    sampler: &mut Sampler,
    logits: &mut [f32],
    uncond: Option<&[f32]>,
    params: &GenerationParams,
    vocab: &VocabLayout,
) -> Result<Chosen, SamplingError> {
    if let (true, Some(uncond)) = (state.is_image() && params.uses_cfg(), uncond) {
        apply_cfg(logits, uncond, params.cfg_scale, vocab)?;
    }
    apply_mask(logits, &state.allowed_mask(vocab));
    let token = sampler.sample(logits, params.sampling_for(state))?;
    let forced = state.advance(token, vocab)?;
    Ok(Chosen { token, forced })
}

#[cfg(test)]
mod tests;
