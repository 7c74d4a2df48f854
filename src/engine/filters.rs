//! The numeric kernels behind [`super::sampler::Sampler`]: a vectorisable
//! exp, lane-parallel reductions, top-k selection and the top-p cutoff.
//!
//! Invariants:
//! - Ranks are total ([`by_rank`]): higher logit first, equal logits by lower
//!   id, so every filter keeps the same set whatever order the work is done
//!   in, and results are reproducible.
//! - Nothing here sorts a whole vocabulary: top-k buffers only logits above
//!   the running k-th best; top-p sorts one histogram bin.
//! - Reductions accumulate in a fixed lane order (deterministic results).

use std::cmp::Ordering;

#[derive(Debug, Clone, Copy)]
pub(super) struct Candidate {
    pub(super) id: u32,
    pub(super) logit: f32,
    /// exp((logit − max) / temperature): the unnormalised probability.
    pub(super) weight: f32,
}

/// Most likely first; equal logits by lower id.
pub(super) fn by_rank(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// exp(x) for x <= 0 without a libm call, so loops over it vectorise
/// (Cephes' expf): x = n·ln 2 + r with |r| <= ln2/2 (ln 2 split in two
/// constants so r is exact), e^r by a degree-7 polynomial, 2^n written into
/// the exponent bits. Relative error about 2e-7. Below -86 (e^-86 ≈ 4e-38:
/// no mass next to the maximum's 1) the result is 0, and so for -inf.
#[inline]
// Cephes' expf coefficients, kept as published.
#[allow(clippy::excessive_precision)]
pub(super) fn exp_nonpos(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = if x > -86.0 { x } else { -86.0 };
    // n = round(x·log2 e), read off the mantissa bits too, so that no
    // float-to-int conversion (a saturating cast) stops vectorisation.
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let q = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let e = (q * r * r + r + 1.0) * f32::from_bits(((n_int + 127) as u32) << 23);
    if x >= -86.0 {
        e
    } else {
        0.0
    }
}

/// Independent accumulators in the reductions below, so the compiler can
/// vectorise them (a single running sum or max is a serial dependency).
const LANES: usize = 8;
/// Ids per block of the dense draw.
pub(super) const DRAW_BLOCK: usize = 64;

/// Sum of `ws` in f64, accumulated in `LANES` lanes (a fixed order, so the
/// result is reproducible).
pub(super) fn lane_sum(ws: &[f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = ws.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ch in chunks {
        for j in 0..LANES {
            acc[j] += ch[j] as f64;
        }
    }
    for (j, &w) in rest.iter().enumerate() {
        acc[j] += w as f64;
    }
    acc.iter().sum()
}

/// The smallest finite logit (+inf when there is none).
fn finite_min(logits: &[f32]) -> f32 {
    let mut m = [f32::INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ch in chunks {
        for j in 0..LANES {
            let l = ch[j];
            m[j] = if l.is_finite() && l < m[j] { l } else { m[j] };
        }
    }
    for (j, &l) in rest.iter().enumerate() {
        m[j] = if l.is_finite() && l < m[j] { l } else { m[j] };
    }
    m.iter().fold(f32::INFINITY, |a, &b| a.min(b))
}

/// The largest finite logit (-inf when there is none).
pub(super) fn finite_max(logits: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ch in chunks {
        for j in 0..LANES {
            let l = ch[j];
            m[j] = if l.is_finite() && l > m[j] { l } else { m[j] };
        }
    }
    for (j, &l) in rest.iter().enumerate() {
        m[j] = if l.is_finite() && l > m[j] { l } else { m[j] };
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Top-k streams with a rising bar when k is at most this fraction of the
/// vocabulary (most logits are then rejected by one comparison); otherwise
/// it collects every candidate and selects.
pub(super) const STREAM_TOP_K_DIVISOR: usize = 8;

/// The last token kept by top-p, in rank order: a token is kept when it
/// ranks at or before it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Cutoff {
    pub(super) logit: f32,
    pub(super) id: u32,
}

impl Cutoff {
    #[inline]
    pub(super) fn keeps(cut: Option<Cutoff>, id: u32, logit: f32) -> bool {
        cut.is_none_or(|c| logit > c.logit || (logit == c.logit && id <= c.id))
    }
}

/// Appends to `c` the `k` best finite logits in one pass: a
/// candidate is buffered only when it beats the k-th best seen so far,
/// and the buffer is cut back to k with a selection whenever it holds
/// 2k. After the first cut almost every logit costs one comparison.
pub(super) fn top_k_streamed(logits: &[f32], k: usize, c: &mut Vec<Candidate>) {
    let cap = 2 * k.max(32);
    let (mut bar_logit, mut bar_id) = (f32::NEG_INFINITY, u32::MAX);
    for (id, &logit) in logits.iter().enumerate() {
        let id = id as u32;
        let beats = logit > bar_logit || (logit == bar_logit && id < bar_id);
        if beats && logit.is_finite() {
            c.push(Candidate {
                id,
                logit,
                weight: 0.0,
            });
            if c.len() == cap {
                c.select_nth_unstable_by(k - 1, by_rank);
                c.truncate(k);
                (bar_logit, bar_id) = (c[k - 1].logit, c[k - 1].id);
            }
        }
    }
    if c.len() > k {
        c.select_nth_unstable_by(k - 1, by_rank);
        c.truncate(k);
    }
}

/// Appends to `c` every finite logit, then keeps the `k` best.
pub(super) fn top_k_selected(logits: &[f32], k: usize, c: &mut Vec<Candidate>) {
    c.extend(
        logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(id, &logit)| Candidate {
                id: id as u32,
                logit,
                weight: 0.0,
            }),
    );
    if k < c.len() {
        c.select_nth_unstable_by(k - 1, by_rank);
        c.truncate(k);
    }
}

/// Histogram bins of the top-p search.
const NUCLEUS_BINS: usize = 1024;
/// Up to this many candidates top-p simply sorts them all.
const NUCLEUS_SORT_ALL: usize = 256;

/// Equal-width logit bins from the maximum down: bin 0 holds the best
/// logits. Monotone: a higher logit never lands in a later bin. Logits more
/// than 86·t below the maximum carry no mass (see [`exp_nonpos`]) and share
/// the last bin, as do non-finite ones.
struct Binning {
    max: f32,
    scale: f32,
}

impl Binning {
    fn new(max: f32, lowest: f32, t: f32, n: usize) -> Self {
        let min = lowest.max(max - 86.0 * t);
        let scale = if n > NUCLEUS_SORT_ALL && max > min {
            NUCLEUS_BINS as f32 / (max - min)
        } else {
            0.0 // one bin holds everything
        };
        Self { max, scale }
    }

    /// Bins are rounded, not floored (still monotone), and the integer is
    /// read off the mantissa bits, so a pass over this vectorises.
    #[inline]
    fn bin(&self, logit: f32) -> usize {
        const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
        let v = (self.max - logit) * self.scale;
        // NaN (from -inf · 0 or a NaN logit) and overflow go to the last bin.
        let v = if v < (NUCLEUS_BINS - 1) as f32 {
            v
        } else {
            (NUCLEUS_BINS - 1) as f32
        };
        (v + ROUND).to_bits().wrapping_sub(ROUND.to_bits()) as usize
    }
}

/// The first bin where the running mass reaches `target`, and the mass of
/// the bins before it.
fn boundary_bin(mass: &[f64; NUCLEUS_BINS], target: f64) -> (usize, f64) {
    let mut cum = 0.0f64;
    for (b, &m) in mass.iter().enumerate() {
        if cum + m >= target {
            return (b, cum);
        }
        cum += m;
    }
    (NUCLEUS_BINS - 1, cum - mass[NUCLEUS_BINS - 1])
}

/// Sorts the boundary bin and walks it from `cum` (the mass above it) to
/// `target`. When rounding keeps the mass just under `target`, the bin is
/// kept whole (or, when empty, everything: None).
fn walk_boundary(buf: &mut [Candidate], mut cum: f64, target: f64) -> (Option<Cutoff>, f64) {
    buf.sort_unstable_by(by_rank);
    let mut last = None;
    for x in buf.iter() {
        cum += x.weight as f64;
        last = Some(Cutoff {
            logit: x.logit,
            id: x.id,
        });
        if cum >= target {
            break;
        }
    }
    (last, cum)
}

/// Top-p over `(id, logit, weight)` items (finite logits, `max` the
/// largest): the last token, in rank order, of the smallest best-first
/// prefix whose weight reaches `target`, and that prefix's weight.
///
/// O(n) for any distribution: weights are summed into logit bins; every
/// bin above the one where the running mass crosses `target` is kept whole,
/// and only that boundary bin is collected into `buf` and sorted.
pub(super) fn nucleus_cutoff<I>(
    items: I,
    target: f64,
    max: f32,
    t: f32,
    buf: &mut Vec<Candidate>,
) -> (Option<Cutoff>, f64)
where
    I: Iterator<Item = (u32, f32, f32)> + Clone,
{
    let (n, lowest) = items
        .clone()
        .fold((0usize, max), |(n, m), (_, l, _)| (n + 1, m.min(l)));
    let binning = Binning::new(max, lowest, t, n);
    let mut mass = [0.0f64; NUCLEUS_BINS];
    for (_, l, w) in items.clone() {
        mass[binning.bin(l)] += w as f64;
    }
    let (boundary, cum) = boundary_bin(&mass, target);
    buf.clear();
    buf.extend(
        items
            .filter(|&(_, l, _)| binning.bin(l) == boundary)
            .map(|(id, logit, weight)| Candidate { id, logit, weight }),
    );
    walk_boundary(buf, cum, target)
}

/// [`nucleus_cutoff`] over a whole vocabulary: `weights[id]` is 0 for
/// non-finite logits. Each logit's bin is computed once, in a pass the
/// compiler vectorises, into `bins`.
pub(super) fn nucleus_cutoff_dense(
    logits: &[f32],
    weights: &[f32],
    target: f64,
    max: f32,
    t: f32,
    bins: &mut Vec<u16>,
    buf: &mut Vec<Candidate>,
) -> Option<Cutoff> {
    let binning = Binning::new(max, finite_min(logits), t, logits.len());
    bins.clear();
    bins.extend(logits.iter().map(|&l| binning.bin(l) as u16));
    let mut mass = [0.0f64; NUCLEUS_BINS];
    for (&b, &w) in bins.iter().zip(weights) {
        mass[b as usize] += w as f64;
    }
    let (boundary, cum) = boundary_bin(&mass, target);
    buf.clear();
    for (id, ((&b, &logit), &weight)) in bins.iter().zip(logits).zip(weights).enumerate() {
        if b as usize == boundary && logit.is_finite() {
            buf.push(Candidate {
                id: id as u32,
                logit,
                weight,
            });
        }
    }
    walk_boundary(buf, cum, target).0
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Deterministic pseudo-random logits in [-4, 4).
    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 8.0 - 4.0).collect()
    }

    #[test]
    fn sums_and_max_match_plain_loops() {
        let ws: Vec<f32> = random_logits(1003, 2).iter().map(|l| l.abs()).collect();
        let plain: f64 = ws.iter().map(|&w| w as f64).sum();
        assert!((lane_sum(&ws) - plain).abs() < 1e-9);
        let mut logits = random_logits(1003, 3);
        logits[1001] = 9.0; // in the remainder
        logits[5] = f32::INFINITY;
        logits[6] = f32::NAN;
        assert_eq!(finite_max(&logits), 9.0);
        assert_eq!(finite_max(&[f32::NEG_INFINITY; 9]), f32::NEG_INFINITY);
        logits[1002] = -9.0;
        assert_eq!(finite_min(&logits), -9.0);
    }

    #[test]
    fn nucleus_cutoff_matches_a_full_sort() {
        let cases = [
            // (seed, p, logit scale, temperature, quantum for ties)
            (1u64, 0.1f64, 1.0f32, 1.0f32, 0.0f32),
            (2, 0.5, 1.0, 1.0, 0.0),
            (3, 0.9, 1.0, 0.7, 0.0),
            (4, 0.99, 1.0, 1.0, 0.0),
            (5, 0.9999, 1.0, 1.0, 0.0),
            (6, 0.9, 10.0, 1.0, 0.0),  // peaked
            (7, 0.95, 10.0, 0.3, 0.5), // peaked, many exact ties
            (8, 0.8, 1.0, 1.0, 1.0),   // 9 distinct values only
            (9, 0.9, 1.0, 2.0, 0.0),   // with a far outlier below (set below)
        ];
        for (n, (seed, p, scale, t, quantum)) in
            [5000, 200].into_iter().flat_map(|n| cases.map(|c| (n, c)))
        {
            let mut logits: Vec<f32> = random_logits(n, seed)
                .into_iter()
                .map(|l| {
                    let l = l * scale;
                    if quantum > 0.0 {
                        (l / quantum).round() * quantum
                    } else {
                        l
                    }
                })
                .collect();
            if seed == 9 {
                logits[17] = -1e30;
            }
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
            let mut all: Vec<Candidate> = logits
                .iter()
                .enumerate()
                .map(|(id, &l)| Candidate {
                    id: id as u32,
                    logit: l,
                    weight: exp_nonpos((l - max) / t),
                })
                .collect();
            let total: f64 = all.iter().map(|x| x.weight as f64).sum();
            let items = all.iter().map(|x| (x.id, x.logit, x.weight));
            let (cut, mass) = nucleus_cutoff(items, p * total, max, t, &mut Vec::new());
            let weights: Vec<f32> = all.iter().map(|x| x.weight).collect();
            let dense = nucleus_cutoff_dense(
                &logits,
                &weights,
                p * total,
                max,
                t,
                &mut Vec::new(),
                &mut Vec::new(),
            );
            assert_eq!(dense, cut, "dense and candidate forms agree");
            let mut kept: Vec<u32> = all
                .iter()
                .filter(|x| Cutoff::keeps(cut, x.id, x.logit))
                .map(|x| x.id)
                .collect();

            all.sort_by(by_rank);
            let mut cum = 0.0;
            let want = all
                .iter()
                .position(|x| {
                    cum += x.weight as f64;
                    cum >= p * total
                })
                .map_or(all.len(), |i| i + 1);
            let mut reference: Vec<u32> = all[..want].iter().map(|x| x.id).collect();
            let ref_mass: f64 = all[..want].iter().map(|x| x.weight as f64).sum();
            kept.sort_unstable();
            reference.sort_unstable();
            assert_eq!(kept, reference, "n {n}, seed {seed}");
            assert!((mass - ref_mass).abs() < 1e-9 * total, "n {n}, seed {seed}");
        }
    }

    #[test]
    fn exp_nonpos_matches_std_exp() {
        for i in 0..=100_000 {
            let x = -(i as f32) * 0.00086;
            let (got, want) = (exp_nonpos(x), x.exp());
            assert!((got - want).abs() <= 3e-7 * want, "x {x}: {got} vs {want}");
        }
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-87.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn streamed_and_selected_top_k_keep_the_same_set() {
        let logits: Vec<f32> = random_logits(1000, 4)
            .into_iter()
            .map(|l| (l * 2.0).round()) // many ties
            .collect();
        let mut order: Vec<u32> = (0..1000).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let mut c = Vec::new();
        for k in [1, 7, 100, 125, 600] {
            let mut want = order[..k].to_vec();
            want.sort_unstable();
            c.clear();
            top_k_streamed(&logits, k, &mut c);
            let mut streamed: Vec<u32> = c.iter().map(|x| x.id).collect();
            streamed.sort_unstable();
            c.clear();
            top_k_selected(&logits, k, &mut c);
            let mut select: Vec<u32> = c.iter().map(|x| x.id).collect();
            select.sort_unstable();
            assert_eq!(streamed, want, "k {k}");
            assert_eq!(select, want, "k {k}");
        }
    }
}
