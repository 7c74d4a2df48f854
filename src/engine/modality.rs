//! The modality state machine of one sequence and the logit masks it implies
//! (DESIGN.md, "The unified vocabulary").
//!
//! Invariants:
//! - A sequence is in text mode until `<boi>`; then exactly `tokens_per_image`
//!   image codes follow; then `<eoi>` is forced (never sampled) and text mode
//!   resumes.
//! - In text mode only text tokens, `<boi>` (when the model has an image
//!   modality) and `<eos>` may be sampled; the other specials (`<bos>`, `<pad>`,
//!   `<eoi>`) are excluded even where they fall inside the text range, as in a
//!   plain Chameleon layout. In image mode only image codes may be sampled.
//! - Every id comes from [`VocabLayout`]; no literal ids here.
//! - An [`AllowedSet`] is a handful of sorted, disjoint, non-empty ranges held
//!   inline (no allocation per step); masking fills the gaps between them.

use std::ops::Range;

use crate::model::config::VocabLayout;

/// A token the engine must append without sampling (today only `<eoi>`).
pub type Forced = Option<u32>;

/// Where a sequence stands in the unified vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModalityState {
    #[default]
    Text,
    /// Inside an image block: `emitted` codes so far, fewer than
    /// `tokens_per_image`.
    Image { emitted: usize },
}

/// A token that breaks the image-block grammar (only prompts can hold one:
/// sampled tokens are masked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModalityError {
    #[error("token {token} is an image code but no image block is open (no <boi> before it)")]
    ImageCodeOutsideImage { token: u32 },
    #[error(
        "token {token} is not an image code, but the open image has {emitted} of {expected} codes"
    )]
    NotAnImageCode {
        token: u32,
        emitted: usize,
        expected: usize,
    },
    #[error("image block complete after {expected} codes, but token {token} follows instead of <eoi> {eoi}")]
    MissingEoi {
        token: u32,
        eoi: u32,
        expected: usize,
    },
}

impl ModalityState {
    pub fn is_image(&self) -> bool {
        matches!(self, Self::Image { .. })
    }

    /// The ids that may be sampled next.
    pub fn allowed_mask(&self, vocab: &VocabLayout) -> AllowedSet {
        let mut set = AllowedSet::empty();
        match self {
            Self::Image { .. } => set.insert(vocab.image_range()),
            Self::Text => {
                set.insert(vocab.text_range());
                for special in [vocab.bos, vocab.pad, vocab.eoi, vocab.boi, vocab.eos]
                    .into_iter()
                    .flatten()
                {
                    set.remove(special);
                }
                if vocab.image_modality.is_some() {
                    if let Some(boi) = vocab.boi {
                        set.insert(boi..boi + 1);
                    }
                }
                if let Some(eos) = vocab.eos {
                    set.insert(eos..eos + 1);
                }
            }
        }
        set
    }

    /// Moves past `token` (sampled, forced or from the prompt). Returns the
    /// token the engine must append next without sampling: `<eoi>` once the
    /// image holds `tokens_per_image` codes (the state is then already Text,
    /// and advancing over that `<eoi>` is a no-op).
    pub fn advance(&mut self, token: u32, vocab: &VocabLayout) -> Result<Forced, ModalityError> {
        let expected = vocab.tokens_per_image;
        match *self {
            Self::Text => {
                if vocab.is_image_code(token) {
                    return Err(ModalityError::ImageCodeOutsideImage { token });
                }
                let opens_image = vocab.image_modality.is_some() && vocab.boi == Some(token);
                if opens_image {
                    if expected == 0 {
                        return Ok(vocab.eoi);
                    }
                    *self = Self::Image { emitted: 0 };
                }
                Ok(None)
            }
            Self::Image { emitted } => {
                if !vocab.is_image_code(token) {
                    return Err(ModalityError::NotAnImageCode {
                        token,
                        emitted,
                        expected,
                    });
                }
                let emitted = emitted + 1;
                if emitted >= expected {
                    *self = Self::Text;
                    Ok(vocab.eoi)
                } else {
                    *self = Self::Image { emitted };
                    Ok(None)
                }
            }
        }
    }

    /// The state after a prompt, and the token to force before sampling when
    /// the prompt ends exactly on an image's last code. A completed image
    /// inside the prompt must be followed by `<eoi>`.
    pub fn after_prompt(
        prompt: &[u32],
        vocab: &VocabLayout,
    ) -> Result<(Self, Forced), ModalityError> {
        let mut state = Self::Text;
        let mut pending: Forced = None;
        for &token in prompt {
            if let Some(eoi) = pending.take() {
                if token != eoi {
                    return Err(ModalityError::MissingEoi {
                        token,
                        eoi,
                        expected: vocab.tokens_per_image,
                    });
                }
            }
            pending = state.advance(token, vocab)?;
        }
        Ok((state, pending))
    }
}

/// Most ranges an [`AllowedSet`] holds: the text range split by up to five
/// specials plus `<boi>` and `<eos>`.
const MAX_RANGES: usize = 8;

/// A set of token ids as sorted, disjoint, non-adjacent, non-empty half-open
/// ranges, stored inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedSet {
    ranges: [(u32, u32); MAX_RANGES],
    len: usize,
}

impl AllowedSet {
    pub fn empty() -> Self {
        Self {
            ranges: [(0, 0); MAX_RANGES],
            len: 0,
        }
    }

    pub fn ranges(&self) -> impl Iterator<Item = Range<u32>> + '_ {
        self.ranges[..self.len].iter().map(|&(a, b)| a..b)
    }

    pub fn contains(&self, id: u32) -> bool {
        self.ranges[..self.len]
            .iter()
            .any(|&(a, b)| a <= id && id < b)
    }

    /// Number of ids in the set.
    pub fn count(&self) -> usize {
        self.ranges[..self.len]
            .iter()
            .map(|&(a, b)| (b - a) as usize)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a range, merging with overlapping or adjacent ones.
    fn insert(&mut self, r: Range<u32>) {
        if r.start >= r.end {
            return;
        }
        let (mut lo, mut hi) = (r.start, r.end);
        let mut kept = [(0, 0); MAX_RANGES];
        let mut n = 0;
        for &(a, b) in &self.ranges[..self.len] {
            if b < lo || a > hi {
                kept[n] = (a, b);
                n += 1;
            } else {
                lo = lo.min(a);
                hi = hi.max(b);
            }
        }
        // Merging only shrinks the count, so there is room unless the set was
        // full of disjoint ranges; the callers in this file add at most two
        // ranges to a split text range, well under MAX_RANGES.
        debug_assert!(n < MAX_RANGES, "AllowedSet capacity exceeded");
        if n < MAX_RANGES {
            kept[n] = (lo, hi);
            n += 1;
        }
        kept[..n].sort_unstable();
        self.ranges = kept;
        self.len = n;
    }

    /// Removes one id, splitting the range that holds it.
    fn remove(&mut self, id: u32) {
        let Some(i) = self.ranges[..self.len]
            .iter()
            .position(|&(a, b)| a <= id && id < b)
        else {
            return;
        };
        let (a, b) = self.ranges[i];
        let pieces = [(a, id), (id + 1, b)];
        let mut kept = [(0, 0); MAX_RANGES];
        let mut n = 0;
        for (j, &r) in self.ranges[..self.len].iter().enumerate() {
            if j != i {
                kept[n] = r;
                n += 1;
            }
        }
        for p in pieces {
            if p.0 < p.1 && n < MAX_RANGES {
                kept[n] = p;
                n += 1;
            }
        }
        kept[..n].sort_unstable();
        self.ranges = kept;
        self.len = n;
    }
}

/// Sets every logit outside `allowed` to -inf: one `fill` per gap, each id
/// touched at most once. Ranges beyond the slice are clipped.
pub fn apply_mask(logits: &mut [f32], allowed: &AllowedSet) {
    let n = logits.len();
    let mut next = 0usize;
    for r in allowed.ranges() {
        let (a, b) = ((r.start as usize).min(n), (r.end as usize).min(n));
        logits[next..a.max(next)].fill(f32::NEG_INFINITY);
        next = next.max(b);
    }
    logits[next..].fill(f32::NEG_INFINITY);
}

/// The small layout the engine tests share: vocab 128, specials bos 1,
/// eos 2, boi 3, eoi 4, text [5, 60), image [60, 124), ids 124..128 unused,
/// 16 codes per image on a 4x4 grid.
#[cfg(test)]
pub(crate) fn test_layout(with_image: bool) -> VocabLayout {
    let modalities = if with_image {
        r#"[{"name": "text", "token_range": [5, 60]}, {"name": "image", "token_range": [60, 124]}]"#
    } else {
        r#"[{"name": "text", "token_range": [5, 60]}]"#
    };
    let json = format!(
        r#"{{"vocab_size": 128, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
            "molora": {{"modalities": {modalities}, "boi_token_id": 3, "eoi_token_id": 4,
                        "tokens_per_image": 16, "image_grid": [4, 4]}}}}"#
    );
    let cfg: crate::model::config::Config = serde_json::from_str(&json).expect("test config");
    cfg.vocab().expect("test layout")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(set: &AllowedSet, vocab_size: u32) -> Vec<u32> {
        (0..vocab_size).filter(|&i| set.contains(i)).collect()
    }

    #[test]
    fn state_machine_walks_text_image_forced_eoi_text() {
        let v = test_layout(true);
        let (boi, eoi) = (v.boi.unwrap(), v.eoi.unwrap());
        let mut s = ModalityState::Text;
        assert_eq!(s.advance(10, &v), Ok(None));
        assert_eq!(s, ModalityState::Text);
        assert_eq!(s.advance(boi, &v), Ok(None));
        assert_eq!(s, ModalityState::Image { emitted: 0 });
        for i in 0..v.tokens_per_image - 1 {
            assert_eq!(s.advance(v.image_token(i as u32), &v), Ok(None));
            assert_eq!(s, ModalityState::Image { emitted: i + 1 });
        }
        // The 16th code completes the image: <eoi> is forced and text resumes.
        assert_eq!(s.advance(v.image_token(7), &v), Ok(Some(eoi)));
        assert_eq!(s, ModalityState::Text);
        assert_eq!(s.advance(eoi, &v), Ok(None), "the forced <eoi> is a no-op");
        assert_eq!(s, ModalityState::Text);
        assert_eq!(s.advance(11, &v), Ok(None));
        assert_eq!(s, ModalityState::Text);
    }

    #[test]
    fn out_of_grammar_tokens_are_errors() {
        let v = test_layout(true);
        let mut s = ModalityState::Text;
        assert_eq!(
            s.advance(60, &v),
            Err(ModalityError::ImageCodeOutsideImage { token: 60 })
        );
        let mut s = ModalityState::Image { emitted: 5 };
        let err = s.advance(10, &v).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token 10 is not an image code, but the open image has 5 of 16 codes"
        );
        assert_eq!(
            s,
            ModalityState::Image { emitted: 5 },
            "state unchanged on error"
        );
    }

    #[test]
    fn without_an_image_modality_boi_is_plain_and_never_allowed() {
        let v = test_layout(false);
        let mut s = ModalityState::Text;
        assert_eq!(s.advance(3, &v), Ok(None));
        assert_eq!(s, ModalityState::Text);
        let set = s.allowed_mask(&v);
        let mut want: Vec<u32> = (5..60).collect();
        want.insert(0, v.eos.unwrap());
        assert_eq!(ids(&set, 128), want);
    }

    #[test]
    fn masks_allow_exactly_the_documented_sets() {
        let v = test_layout(true);
        let text = ModalityState::Text.allowed_mask(&v);
        // eos 2, boi 3 and the text range [5, 60).
        let mut want = vec![2, 3];
        want.extend(5..60);
        assert_eq!(ids(&text, 128), want);
        assert_eq!(text.ranges().collect::<Vec<_>>(), vec![2..4, 5..60]);
        assert_eq!(text.count(), 57);

        let image = ModalityState::Image { emitted: 3 }.allowed_mask(&v);
        assert_eq!(ids(&image, 128), (60..124).collect::<Vec<_>>());
        assert_eq!(image.ranges().collect::<Vec<_>>(), vec![60..124]);
    }

    #[test]
    fn specials_inside_the_text_range_are_cut_out() {
        // A plain-Chameleon-like layout: text [0, 60) holds every special.
        let mut v = test_layout(true);
        v.modalities[0].range = 0..60;
        v.pad = Some(0);
        let set = ModalityState::Text.allowed_mask(&v);
        let mut want = vec![2, 3];
        want.extend(5..60);
        assert_eq!(ids(&set, 128), want, "bos 1, pad 0 and eoi 4 excluded");
    }

    #[test]
    fn apply_mask_sets_exactly_the_disallowed_logits_to_neg_inf() {
        let v = test_layout(true);
        for state in [ModalityState::Text, ModalityState::Image { emitted: 0 }] {
            let set = state.allowed_mask(&v);
            let mut logits: Vec<f32> = (0..128).map(|i| i as f32 * 0.5 - 3.0).collect();
            apply_mask(&mut logits, &set);
            for (id, &l) in logits.iter().enumerate() {
                if set.contains(id as u32) {
                    assert_eq!(l, id as f32 * 0.5 - 3.0, "id {id} kept");
                } else {
                    assert_eq!(l, f32::NEG_INFINITY, "id {id} masked");
                }
            }
        }
        // Ranges past the slice are clipped, not a panic.
        let mut short = vec![0.0f32; 70];
        apply_mask(
            &mut short,
            &ModalityState::Image { emitted: 0 }.allowed_mask(&v),
        );
        assert!(short[..60].iter().all(|l| *l == f32::NEG_INFINITY));
        assert!(short[60..].iter().all(|l| *l == 0.0));
    }

    #[test]
    fn after_prompt_tracks_open_and_closed_images() {
        let v = test_layout(true);
        let (boi, eoi) = (v.boi.unwrap(), v.eoi.unwrap());
        let codes: Vec<u32> = (0..16).map(|c| v.image_token(c)).collect();

        let mut prompt = vec![v.bos.unwrap(), 7, boi];
        prompt.extend(&codes);
        prompt.extend([eoi, 8, boi, codes[0], codes[1]]);
        assert_eq!(
            ModalityState::after_prompt(&prompt, &v),
            Ok((ModalityState::Image { emitted: 2 }, None))
        );

        let mut ends_on_last_code = vec![boi];
        ends_on_last_code.extend(&codes);
        assert_eq!(
            ModalityState::after_prompt(&ends_on_last_code, &v),
            Ok((ModalityState::Text, Some(eoi)))
        );

        let mut unclosed = ends_on_last_code.clone();
        unclosed.push(9);
        assert_eq!(
            ModalityState::after_prompt(&unclosed, &v),
            Err(ModalityError::MissingEoi {
                token: 9,
                eoi,
                expected: 16
            })
        );

        let mut short_image = vec![boi];
        short_image.extend(&codes[..3]);
        short_image.push(eoi);
        assert!(matches!(
            ModalityState::after_prompt(&short_image, &v),
            Err(ModalityError::NotAnImageCode { emitted: 3, .. })
        ));
    }
}
