//! Interleaved multimodal token sequences for the benchmark: text, then a
//! block of another modality, then text again ... cycling through every
//! modality of the model. Ids come from the model's vocabulary layout.

use rand::{Rng, SeedableRng};

use crate::model::config::VocabLayout;

/// Text tokens between two non-text blocks.
pub const TEXT_SEGMENT: usize = 16;

/// One interleaved sequence of `len` tokens over the first `k` modalities.
pub fn interleaved_sequence(vocab: &VocabLayout, k: usize, len: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let text = vocab.text_range();
    let mut out = Vec::with_capacity(len + vocab.tokens_per_image + 2);
    out.extend(vocab.bos);
    let mut next_block = 1;
    while out.len() < len {
        for _ in 0..TEXT_SEGMENT {
            out.push(rng.random_range(text.clone()));
        }
        if k > 1 {
            let m = &vocab.modalities[next_block];
            let is_image = Some(next_block) == vocab.image_modality;
            if is_image {
                out.extend(vocab.boi);
            }
            for _ in 0..vocab.tokens_per_image {
                out.push(rng.random_range(m.range.clone()));
            }
            if is_image {
                out.extend(vocab.eoi);
            }
            next_block = next_block % (k - 1) + 1;
        }
    }
    out.truncate(len);
    out
}
