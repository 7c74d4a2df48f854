//! Token ids with per-token domain labels, and the way back from generated
//! ids to text and image runs.
//!
//! Sequence template:
//! - a plain sequence: `<s> segment... </s>`;
//! - an example: `<s> prompt-segment... \n answer-segment... </s>`; the loss
//!   usually covers ids from `answer_start` on.
//!
//! An image is `<racm3:break> code... <eoss>`. Every segment is tokenized on
//! its own, so a token never spans two domains. Labels: text tokens carry
//! their segment's domain, image codes [`Domain::Image`], specials and the
//! separator `None` (no routing target).

use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use tokenizers::Tokenizer;

use super::{Domain, Scene, Segment, TextExample};
use crate::model::tokenizer::TokenizerLayout;

/// Text between prompt and answer.
pub const ANSWER_SEPARATOR: &str = "\n";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedSequence {
    pub ids: Vec<u32>,
    /// One label per id.
    pub domains: Vec<Option<Domain>>,
    /// Per id: it overlaps a segment's skill range (see [`Segment`]).
    pub skill: Vec<bool>,
    /// Index of the first answer id (0 for plain sequences).
    pub answer_start: usize,
}

impl EncodedSequence {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Encodes segments with a trained tokenizer. Image codes come from the
/// caller (the VQ model), one call per scene.
pub struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    layout: &'a TokenizerLayout,
}

impl<'a> Encoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer, layout: &'a TokenizerLayout) -> Self {
        Self { tokenizer, layout }
    }

    /// `<s> segments </s>`.
    pub fn encode_segments(
        &self,
        segments: &[Segment],
        image_codes: &mut dyn FnMut(&Scene) -> Result<Vec<u32>>,
    ) -> Result<EncodedSequence> {
        let mut seq = EncodedSequence::default();
        self.push_special(&mut seq, self.layout.bos);
        for segment in segments {
            self.push_segment(&mut seq, segment, image_codes)?;
        }
        self.push_special(&mut seq, self.layout.eos);
        Ok(seq)
    }

    /// `<s> prompt \n answer </s>`, with `answer_start` after the separator.
    pub fn encode_example(
        &self,
        example: &TextExample,
        image_codes: &mut dyn FnMut(&Scene) -> Result<Vec<u32>>,
    ) -> Result<EncodedSequence> {
        let mut seq = self.encode_prompt(example, image_codes)?;
        for segment in example.answer_segments() {
            self.push_segment(&mut seq, segment, image_codes)?;
        }
        self.push_special(&mut seq, self.layout.eos);
        Ok(seq)
    }

    /// `<s> prompt \n`: what generation starts from.
    pub fn encode_prompt(
        &self,
        example: &TextExample,
        image_codes: &mut dyn FnMut(&Scene) -> Result<Vec<u32>>,
    ) -> Result<EncodedSequence> {
        let mut seq = EncodedSequence::default();
        self.push_special(&mut seq, self.layout.bos);
        for segment in &example.prompt {
            self.push_segment(&mut seq, segment, image_codes)?;
        }
        self.push_text(&mut seq, None, ANSWER_SEPARATOR)?;
        seq.answer_start = seq.len();
        Ok(seq)
    }

    pub fn push_segment(
        &self,
        seq: &mut EncodedSequence,
        segment: &Segment,
        image_codes: &mut dyn FnMut(&Scene) -> Result<Vec<u32>>,
    ) -> Result<()> {
        match segment {
            Segment::Text {
                domain,
                text,
                skill,
            } => self.push_marked_text(seq, Some(*domain), text, skill),
            Segment::Image(scene) => self.push_image(seq, &image_codes(scene)?),
        }
    }

    pub fn push_text(
        &self,
        seq: &mut EncodedSequence,
        domain: Option<Domain>,
        text: &str,
    ) -> Result<()> {
        self.push_marked_text(seq, domain, text, &[])
    }

    /// `text`'s tokens, those overlapping a `skill` byte range marked.
    fn push_marked_text(
        &self,
        seq: &mut EncodedSequence,
        domain: Option<Domain>,
        text: &str,
        skill: &[Range<usize>],
    ) -> Result<()> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        seq.ids.extend_from_slice(enc.get_ids());
        let n = enc.get_ids().len();
        seq.domains.extend(std::iter::repeat_n(domain, n));
        let overlaps =
            |&(start, end): &(usize, usize)| skill.iter().any(|r| start < r.end && r.start < end);
        seq.skill.extend(enc.get_offsets().iter().map(overlaps));
        Ok(())
    }

    /// `<racm3:break> codes <eoss>`.
    pub fn push_image(&self, seq: &mut EncodedSequence, codes: &[u32]) -> Result<()> {
        self.push_special(seq, self.layout.boi);
        for &code in codes {
            let id = self.layout.image_token(code).ok_or_else(|| {
                anyhow!(
                    "image code {code} is outside the tokenizer's {} codes",
                    self.layout.num_image_codes()
                )
            })?;
            seq.ids.push(id);
            seq.domains.push(Some(Domain::Image));
            seq.skill.push(false);
        }
        self.push_special(seq, self.layout.eoi);
        Ok(())
    }

    fn push_special(&self, seq: &mut EncodedSequence, id: u32) {
        seq.ids.push(id);
        seq.domains.push(None);
        seq.skill.push(false);
    }

    /// Cuts generated ids into text and image runs: image codes (with or
    /// without their begin/end markers) form image runs, other ids are decoded
    /// as text; generation ends at `</s>`.
    pub fn split_generated(&self, ids: &[u32]) -> Result<Vec<GeneratedRun>> {
        let mut runs = Vec::new();
        let mut text: Vec<u32> = Vec::new();
        let mut codes: Option<Vec<u32>> = None;
        for &id in ids {
            if id == self.layout.eos {
                break;
            }
            if let Some(code) = id
                .checked_sub(self.layout.image_range.start)
                .filter(|_| self.layout.image_range.contains(&id))
            {
                self.flush_text(&mut text, &mut runs)?;
                codes.get_or_insert_with(Vec::new).push(code);
            } else if id == self.layout.boi || id == self.layout.eoi {
                self.flush_text(&mut text, &mut runs)?;
                if let Some(c) = codes.take() {
                    runs.push(GeneratedRun::Codes(c));
                }
                if id == self.layout.boi {
                    codes = Some(Vec::new());
                }
            } else if id as usize >= self.layout.vocab_size {
                bail!(
                    "generated id {id} is outside the vocabulary ({})",
                    self.layout.vocab_size
                );
            } else {
                if let Some(c) = codes.take() {
                    runs.push(GeneratedRun::Codes(c));
                }
                text.push(id);
            }
        }
        self.flush_text(&mut text, &mut runs)?;
        if let Some(c) = codes.take() {
            runs.push(GeneratedRun::Codes(c));
        }
        Ok(runs)
    }

    fn flush_text(&self, text: &mut Vec<u32>, runs: &mut Vec<GeneratedRun>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let decoded = self
            .tokenizer
            .decode(text, true)
            .map_err(|e| anyhow!("decoding generated text: {e}"))?;
        runs.push(GeneratedRun::Text(decoded));
        text.clear();
        Ok(())
    }
}

/// A run of generated output before image decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneratedRun {
    Text(String),
    /// Codebook indices (not token ids).
    Codes(Vec<u32>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::build_default_tokenizer;
    use crate::train::data::text_domains::{sample_interleaved, sample_mixed_kind, MixedKind};
    use crate::train::data::{Check, Split};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Stand-in for the VQ model: 16 codes derived from the scene.
    fn fake_codes(scene: &Scene) -> Result<Vec<u32>> {
        let seed = scene.key().len() as u32;
        Ok((0..16).map(|i| (seed + i) % 64).collect())
    }

    #[test]
    fn examples_encode_with_labels_and_split_back() {
        let (tok, layout) = build_default_tokenizer(600, 64).unwrap();
        let enc = Encoder::new(&tok, &layout);
        let mut rng = StdRng::seed_from_u64(31);

        let ex = sample_mixed_kind(&mut rng, MixedKind::CodeAndResult, Split::Train);
        let seq = enc.encode_example(&ex, &mut fake_codes).unwrap();
        assert_eq!(seq.ids.len(), seq.domains.len());
        assert_eq!(seq.ids[0], layout.bos);
        assert_eq!(*seq.ids.last().unwrap(), layout.eos);
        let answer_labels: Vec<Option<Domain>> = seq.domains[seq.answer_start..].to_vec();
        assert_eq!(answer_labels.first(), Some(&Some(Domain::Code)));
        assert!(answer_labels.contains(&Some(Domain::Arithmetic)));
        // The answer decodes back to the gold text.
        let runs = enc.split_generated(&seq.ids[seq.answer_start..]).unwrap();
        let gold: String = ex.texts().skip(ex.prompt.len()).collect();
        assert_eq!(runs, vec![GeneratedRun::Text(gold)]);

        let ex = sample_mixed_kind(&mut rng, MixedKind::DrawAndSides, Split::Train);
        let seq = enc.encode_example(&ex, &mut fake_codes).unwrap();
        let runs = enc.split_generated(&seq.ids[seq.answer_start..]).unwrap();
        let Segment::Image(scene) = &ex.answer[0].segment else {
            panic!("draw-and-sides answers with an image first")
        };
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0], GeneratedRun::Codes(fake_codes(scene).unwrap()));
        let image_labels = seq
            .domains
            .iter()
            .filter(|d| **d == Some(Domain::Image))
            .count();
        assert_eq!(image_labels, 16);
    }

    #[test]
    fn skill_marks_cover_the_whole_answer_about_a_shape_and_nothing_else() {
        let (tok, layout) = build_default_tokenizer(600, 64).unwrap();
        let enc = Encoder::new(&tok, &layout);
        let mut rng = StdRng::seed_from_u64(5);
        let ex = sample_mixed_kind(&mut rng, MixedKind::DrawAndSides, Split::Train);
        let seq = enc.encode_example(&ex, &mut fake_codes).unwrap();
        let marked: Vec<u32> = (0..seq.len())
            .filter(|&i| seq.skill[i])
            .map(|i| seq.ids[i])
            .collect();
        let Check::Exact(fact) = &ex.answer[1].check else {
            panic!("the sides answer is checked exactly")
        };
        assert!(fact.ends_with(" sides"), "{fact}");
        assert_eq!(tok.decode(&marked, false).unwrap(), *fact);
        assert!((0..seq.len()).all(|i| !seq.skill[i] || seq.domains[i] == Some(Domain::Caption)));
    }

    #[test]
    fn skill_marks_cover_the_chaining_text_of_two_operation_answers() {
        use crate::train::data::text_domains::sample_arithmetic;
        let (tok, layout) = build_default_tokenizer(600, 64).unwrap();
        let enc = Encoder::new(&tok, &layout);
        let mut rng = StdRng::seed_from_u64(33);
        let mut seen = [false; 2];
        for _ in 0..40 {
            let ex = sample_arithmetic(&mut rng, Split::Train);
            let Segment::Text { text, .. } = &ex.answer[0].segment else {
                panic!("an arithmetic answer is text")
            };
            let seq = enc.encode_example(&ex, &mut fake_codes).unwrap();
            assert_eq!(seq.skill.len(), seq.ids.len());
            assert!(!seq.skill[..seq.answer_start].iter().any(|&m| m));
            let answer = seq.answer_start..seq.len() - 1;
            let text_of = |marked: bool| {
                let ids: Vec<u32> = (answer.clone())
                    .filter(|&i| seq.skill[i] == marked)
                    .map(|i| seq.ids[i])
                    .collect();
                tok.decode(&ids, false).unwrap()
            };
            let (marked, unmarked) = (text_of(true), text_of(false));
            // A two-operation answer chains its steps ("12+7 then *3: ...
            // so 19. 19*3: ..."); the chaining is marked, the columns not.
            let two_steps = text.contains(" then ");
            seen[two_steps as usize] = true;
            assert_eq!(marked.contains("then"), two_steps, "{text}: {marked:?}");
            assert!(!unmarked.contains("then"), "{text}: {unmarked:?}");
            assert_eq!(
                unmarked.matches('=').count(),
                text.matches('=').count(),
                "{text}"
            );
        }
        assert_eq!(seen, [true, true], "40 sums have both kinds");
    }

    #[test]
    fn interleaved_sequences_alternate_text_and_images() {
        let (tok, layout) = build_default_tokenizer(600, 64).unwrap();
        let enc = Encoder::new(&tok, &layout);
        let segments = sample_interleaved(&mut StdRng::seed_from_u64(32), Split::Train);
        let seq = enc.encode_segments(&segments, &mut fake_codes).unwrap();
        let images = segments
            .iter()
            .filter(|s| matches!(s, Segment::Image(_)))
            .count();
        assert!(images >= 2);
        assert_eq!(
            seq.ids.iter().filter(|&&id| id == layout.boi).count(),
            images
        );
        let runs = enc.split_generated(&seq.ids[1..]).unwrap();
        // Consecutive text segments come back as one text run.
        let groups = segments
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                *i == 0
                    || matches!(s, Segment::Image(_))
                    || matches!(segments[i - 1], Segment::Image(_))
            })
            .count();
        assert_eq!(runs.len(), groups);
        assert!(enc
            .push_image(&mut EncodedSequence::default(), &[64])
            .is_err());
    }
}
