//! Codebook consolidation after training: every code whose vector lies
//! within `distance` of a more-used code takes that code's vector, so the
//! encoder can no longer tell them apart (and codes a sample of training
//! scenes never chose take the nearest kept vector).
//!
//! Why: dead-code restarts re-seed unused codes on random encoder outputs,
//! and most outputs are flat background, so a trained codebook splits one
//! background colour over a hundred nearly equal codes. Which of them a
//! patch gets depends on tiny context-dependent differences in the
//! encoder's output. Reconstructions do not care; the decoder that has to
//! predict the codes does. In session 6's VQ the same 8x8 patch of pixels
//! took 4.0 nats of code entropy over 511 codes; merged within 0.7 it kept
//! under 30 codes and about 1.3 nats, and its reconstructions read back
//! nearly the same colours and shapes (docs/VQ.md, "Choosing the VQ";
//! `examples/vq_merge_probe`). With the context loss (`losses`) the codes
//! are far less noisy to begin with, and the demo merges within 0.5.
//!
//! The vocabulary keeps all `num_embeddings` codes: a merged code is a
//! duplicate of its representative, and nearest-code search returns the
//! first of equal entries, so only one of them is ever produced.

/// For every code, the code whose vector it takes. A code the sample used
/// takes the first code (by usage, most used first; ties by index) within
/// `distance` of it in L2, or keeps its own; an unused code takes the
/// nearest kept one, so a merged codebook holds exactly as many distinct
/// vectors as the sample has groups. `codebook` is row-major (n, dim).
pub fn representatives(codebook: &[f32], dim: usize, usage: &[u64], distance: f32) -> Vec<usize> {
    let n = usage.len();
    assert_eq!(codebook.len(), n * dim, "codebook is not {n} x {dim}");
    let row = |c: usize| &codebook[c * dim..(c + 1) * dim];
    let dist = |a: usize, b: usize| -> f32 {
        let sq: f32 = row(a)
            .iter()
            .zip(row(b))
            .map(|(x, y)| (x - y) * (x - y))
            .sum();
        sq.sqrt()
    };
    let mut order: Vec<usize> = (0..n).filter(|&c| usage[c] > 0).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(usage[c]), c));
    let mut kept: Vec<usize> = Vec::new();
    let mut rep_of: Vec<usize> = (0..n).collect();
    for c in order {
        match kept.iter().copied().find(|&r| dist(r, c) < distance) {
            Some(r) => rep_of[c] = r,
            None => kept.push(c),
        }
    }
    for c in (0..n).filter(|&c| usage[c] == 0) {
        let nearest = kept
            .iter()
            .copied()
            .min_by(|&a, &b| dist(a, c).total_cmp(&dist(b, c)));
        rep_of[c] = nearest.unwrap_or(c);
    }
    rep_of
}

/// `codebook` with every row replaced by its representative's row.
pub fn merged(codebook: &[f32], dim: usize, rep_of: &[usize]) -> Vec<f32> {
    rep_of
        .iter()
        .flat_map(|&r| codebook[r * dim..(r + 1) * dim].iter().copied())
        .collect()
}

/// What a merge did: live codes are those the usage sample chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeReport {
    pub live_before: usize,
    pub live_after: usize,
}

impl MergeReport {
    pub fn new(usage: &[u64], rep_of: &[usize]) -> Self {
        let mut reps: Vec<usize> = (0..usage.len())
            .filter(|&c| usage[c] > 0)
            .map(|c| rep_of[c])
            .collect();
        reps.sort_unstable();
        reps.dedup();
        Self {
            live_before: usage.iter().filter(|&&u| u > 0).count(),
            live_after: reps.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Codes 0 and 2 are 0.1 apart, code 1 is far from both.
    const BOOK: [f32; 6] = [0.0, 0.0, 5.0, 5.0, 0.1, 0.0];

    #[test]
    fn a_close_code_takes_the_more_used_vector() {
        let rep_of = representatives(&BOOK, 2, &[3, 9, 7], 0.5);
        assert_eq!(rep_of, vec![2, 1, 2]);
        let book = merged(&BOOK, 2, &rep_of);
        assert_eq!(book, vec![0.1, 0.0, 5.0, 5.0, 0.1, 0.0]);
        let report = MergeReport::new(&[3, 9, 7], &rep_of);
        assert_eq!((report.live_before, report.live_after), (3, 2));
    }

    #[test]
    fn distance_zero_or_far_codes_merge_nothing() {
        assert_eq!(representatives(&BOOK, 2, &[3, 9, 7], 0.0), vec![0, 1, 2]);
        assert_eq!(representatives(&BOOK, 2, &[3, 9, 7], 0.05), vec![0, 1, 2]);
        // Everything within 10: all take the most used code's vector.
        assert_eq!(representatives(&BOOK, 2, &[3, 9, 7], 10.0), vec![1, 1, 1]);
    }

    #[test]
    fn equal_usage_prefers_the_lower_index() {
        assert_eq!(representatives(&BOOK, 2, &[4, 1, 4], 0.5), vec![0, 1, 0]);
    }

    #[test]
    fn an_unused_code_takes_the_nearest_kept_vector() {
        // Code 2 is unused and nearer code 0 than code 1, at any distance.
        assert_eq!(representatives(&BOOK, 2, &[4, 1, 0], 0.0), vec![0, 1, 0]);
        // Nothing used: nothing to merge into.
        assert_eq!(representatives(&BOOK, 2, &[0, 0, 0], 0.5), vec![0, 1, 2]);
    }
}
