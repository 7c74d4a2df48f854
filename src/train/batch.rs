//! Training batches: sequences of the procedural world, encoded with the
//! model's tokenizer and the VQ model's codes, packed into `B` rows of `T`
//! tokens.
//!
//! Invariants:
//! - a batch is a pure function of (stage seed, step): a resumed run sees
//!   the same batches as an uninterrupted one;
//! - each packed sequence attends only to itself (block-diagonal causal
//!   mask) and its positions start at 0, as at inference;
//! - row `i` predicts token `i + 1` of its own sequence; the last row of a
//!   sequence and padding have weight 0;
//! - every row carries a routing label ([`resolve_labels`]): its own domain,
//!   or for unlabelled ids (specials, the answer separator) the domain of the
//!   next labelled id (the one it predicts), else of the previous one.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

use super::data::encode::{EncodedSequence, Encoder};
use super::data::text_domains::{sample, sample_interleaved, sample_mixed_kind, MixedKind};
use super::data::{Domain, Scene, Segment, Split, Task};
use crate::model::tokenizer::TokenizerLayout;
use crate::model::vq::VqModel;

/// One kind of training item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Task(Task),
    Mixed(MixedKind),
    Interleaved,
    /// `<s> image </s>` alone: what a guided picture's unconditional twin
    /// sees.
    Unconditional,
}

/// Weighted sources of a stage's data.
pub type Mixture = Vec<(f64, Source)>;

/// What one training stage learns from: its items, and how much each
/// target weighs in its loss.
#[derive(Debug, Clone, PartialEq)]
pub struct StageData {
    pub mixture: Mixture,
    /// Loss weight of prompt targets (answer targets weigh 1).
    pub prompt_weight: f32,
    pub unlearned: Unlearned,
}

/// Targets that weigh 0 in a stage: skills it must not learn, left to their
/// own semantic adapter (`adapter_only_domains` and `adapter_only_skills`
/// of the pipeline). They stay in the context the
/// other targets attend to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unlearned {
    /// Every target of these domains.
    pub domains: Vec<Domain>,
    /// The targets of these domains' skill text (see
    /// [`super::data::Segment`]: the chaining of multi-step sums, the
    /// answers about shapes).
    pub skills: Vec<Domain>,
}

impl Unlearned {
    pub fn covers(&self, domain: Domain, skill: bool) -> bool {
        self.domains.contains(&domain) || (skill && self.skills.contains(&domain))
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty() && self.skills.is_empty()
    }
}

/// An encoded sequence ready for packing.
#[derive(Debug, Clone)]
pub struct TrainSeq {
    pub ids: Vec<u32>,
    /// Weight of predicting `ids[i + 1]` from row `i` (last entry unused).
    pub weights: Vec<f32>,
    /// Routing label of each row.
    pub labels: Vec<Option<Domain>>,
}

/// Per-row routing labels: see the module invariants.
pub fn resolve_labels<L: Copy>(domains: &[Option<L>]) -> Vec<Option<L>> {
    let mut out = vec![None; domains.len()];
    let mut next = None;
    for i in (0..domains.len()).rev() {
        if domains[i].is_some() {
            next = domains[i];
        }
        out[i] = domains[i].or(next);
    }
    let mut prev = None;
    for label in out.iter_mut() {
        if label.is_some() {
            prev = *label;
        } else {
            *label = prev;
        }
    }
    out
}

impl TrainSeq {
    /// Loss on answer targets with weight 1, on prompt targets with
    /// `prompt_weight`, and none on `unlearned` targets (an unlabelled id
    /// counts as the segment its label is resolved from).
    pub fn from_encoded(seq: EncodedSequence, prompt_weight: f32, unlearned: &Unlearned) -> Self {
        let n = seq.ids.len();
        let units: Vec<Option<(Domain, bool)>> = (seq.domains.iter().zip(&seq.skill))
            .map(|(domain, &skill)| domain.map(|d| (d, skill)))
            .collect();
        let units = resolve_labels(&units);
        let labels = units.iter().map(|u| u.map(|(d, _)| d)).collect();
        let weights = (0..n)
            .map(|i| {
                if i + 1 >= n || units[i + 1].is_some_and(|(d, m)| unlearned.covers(d, m)) {
                    0.0
                } else if i + 1 >= seq.answer_start {
                    1.0
                } else {
                    prompt_weight
                }
            })
            .collect();
        Self {
            labels,
            ids: seq.ids,
            weights,
        }
    }
}

/// `B` rows of `T` tokens, flattened to `N = B·T`.
pub struct PackedBatch {
    pub rows: usize,
    pub len: usize,
    /// u32 `[N]`
    pub ids: Tensor,
    /// u32 `[N]`
    pub positions: Tensor,
    /// f32 `[B, 1, T, T]` additive mask.
    pub mask: Tensor,
    /// u32 `[N]`
    pub targets: Tensor,
    /// f32 `[N]`
    pub weights: Tensor,
    pub host_ids: Vec<u32>,
    pub labels: Vec<Option<Domain>>,
    /// Tokens of real sequences (not padding).
    pub tokens: usize,
}

impl PackedBatch {
    /// Packs `seqs` in order into `rows` rows of `len`; a sequence that does
    /// not fit in a row's rest starts the next row; one longer than `len` is
    /// cut. Sequences beyond the last row are dropped.
    pub fn pack(
        seqs: &[TrainSeq],
        rows: usize,
        len: usize,
        pad: u32,
        dev: &Device,
    ) -> Result<Self> {
        let n = rows * len;
        let mut ids = vec![pad; n];
        let mut positions = vec![0u32; n];
        let mut targets = vec![pad; n];
        let mut weights = vec![0f32; n];
        let mut labels = vec![None; n];
        // Segment id per slot; padding gets a fresh id per slot.
        let mut segment = vec![0u32; n];
        let mut next_segment = 1u32;
        let (mut row, mut col) = (0usize, 0usize);
        let mut tokens = 0;
        for s in seqs {
            let take = s.ids.len().min(len);
            if col + take > len {
                row += 1;
                col = 0;
            }
            if row >= rows {
                break;
            }
            for i in 0..take {
                let at = row * len + col + i;
                ids[at] = s.ids[i];
                positions[at] = i as u32;
                labels[at] = s.labels[i];
                segment[at] = next_segment;
                if i + 1 < take {
                    targets[at] = s.ids[i + 1];
                    weights[at] = s.weights[i];
                }
            }
            tokens += take;
            next_segment += 1;
            col += take;
        }
        for seg in segment.iter_mut().filter(|s| **s == 0) {
            *seg = next_segment;
            next_segment += 1;
        }
        let mut mask = vec![f32::NEG_INFINITY; rows * len * len];
        for r in 0..rows {
            for i in 0..len {
                for j in 0..=i {
                    if segment[r * len + i] == segment[r * len + j] {
                        mask[(r * len + i) * len + j] = 0.0;
                    }
                }
            }
        }
        Ok(Self {
            rows,
            len,
            ids: Tensor::from_slice(&ids, n, dev)?,
            positions: Tensor::from_vec(positions, n, dev)?,
            mask: Tensor::from_vec(mask, (rows, 1, len, len), dev)?,
            targets: Tensor::from_vec(targets, n, dev)?,
            weights: Tensor::from_vec(weights, n, dev)?,
            host_ids: ids,
            labels,
            tokens,
        })
    }

    /// `[N, 1]` f32: 1 where `keep(row)`, else 0.
    pub fn row_mask(&self, keep: impl Fn(usize) -> bool) -> candle_core::Result<Tensor> {
        let n = self.host_ids.len();
        let v: Vec<f32> = (0..n).map(|i| if keep(i) { 1.0 } else { 0.0 }).collect();
        Tensor::from_vec(v, (n, 1), self.ids.device())
    }
}

/// Turns items of the world into [`TrainSeq`]s; caches each scene's codes.
pub struct SeqMaker<'a> {
    pub tokenizer: &'a Tokenizer,
    pub layout: &'a TokenizerLayout,
    pub vq: &'a VqModel,
    cache: HashMap<String, Vec<u32>>,
}

impl<'a> SeqMaker<'a> {
    pub fn new(tokenizer: &'a Tokenizer, layout: &'a TokenizerLayout, vq: &'a VqModel) -> Self {
        Self {
            tokenizer,
            layout,
            vq,
            cache: HashMap::new(),
        }
    }

    /// The VQ codes of a scene (computed once per distinct scene).
    pub fn codes(&mut self, scene: &Scene) -> Result<Vec<u32>> {
        let key = scene.key();
        if let Some(c) = self.cache.get(&key) {
            return Ok(c.clone());
        }
        let codes = self
            .vq
            .encode_rgb(&scene.render())
            .with_context(|| format!("VQ-encoding scene {key}"))?;
        self.cache.insert(key, codes.clone());
        Ok(codes)
    }

    /// One item of `source` from `split`.
    pub fn make(
        &mut self,
        rng: &mut StdRng,
        source: Source,
        split: Split,
        data: &StageData,
    ) -> Result<TrainSeq> {
        let (tokenizer, layout) = (self.tokenizer, self.layout);
        let enc = Encoder::new(tokenizer, layout);
        let mut codes = |s: &Scene| self.codes(s);
        let seq = match source {
            Source::Task(task) => enc.encode_example(&sample(rng, task, split), &mut codes)?,
            Source::Mixed(kind) => {
                enc.encode_example(&sample_mixed_kind(rng, kind, split), &mut codes)?
            }
            Source::Interleaved => {
                enc.encode_segments(&sample_interleaved(rng, split), &mut codes)?
            }
            Source::Unconditional => {
                let scene = Segment::Image(Scene::random(rng, split));
                enc.encode_segments(&[scene], &mut codes)?
            }
        };
        Ok(TrainSeq::from_encoded(
            seq,
            data.prompt_weight,
            &data.unlearned,
        ))
    }

    /// The batch of `step`: items drawn from `data.mixture` with an RNG
    /// seeded by (seed, step) until `rows` rows of `len` are full.
    pub fn batch(
        &mut self,
        data: &StageData,
        seed: u64,
        step: u64,
        rows: usize,
        len: usize,
        dev: &Device,
    ) -> Result<PackedBatch> {
        let mixture = &data.mixture;
        let mut rng = StdRng::seed_from_u64(mix(seed, step));
        let total: f64 = mixture.iter().map(|m| m.0).sum();
        let mut seqs = Vec::new();
        let (mut row, mut col) = (0usize, 0usize);
        loop {
            let mut pick = rng.random::<f64>() * total;
            let mut source = mixture[0].1;
            for &(w, s) in mixture {
                if pick < w {
                    source = s;
                    break;
                }
                pick -= w;
            }
            let seq = self.make(&mut rng, source, Split::Train, data)?;
            let take = seq.ids.len().min(len);
            if col + take > len {
                row += 1;
                col = 0;
            }
            if row >= rows {
                break;
            }
            col += take;
            seqs.push(seq);
        }
        PackedBatch::pack(&seqs, rows, len, self.layout.pad, dev)
    }
}

/// A SplitMix64 step of (seed, step): independent streams per step.
pub fn mix(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_take_the_next_then_the_previous_domain() {
        use Domain::*;
        let d = [None, Some(Code), None, Some(Arithmetic), None];
        assert_eq!(
            resolve_labels(&d),
            vec![
                Some(Code),
                Some(Code),
                Some(Arithmetic),
                Some(Arithmetic),
                Some(Arithmetic)
            ]
        );
        assert_eq!(resolve_labels::<Domain>(&[None, None]), vec![None, None]);
    }

    #[test]
    fn unlearned_domains_weigh_nothing_but_stay_in_context() {
        use Domain::*;
        // prompt: code, code, separator | answer: code, arithmetic, arithmetic
        let seq = EncodedSequence {
            ids: vec![1, 2, 3, 4, 5, 6],
            domains: vec![
                Some(Code),
                Some(Code),
                None,
                Some(Code),
                Some(Arithmetic),
                Some(Arithmetic),
            ],
            skill: vec![false; 6],
            answer_start: 3,
        };
        let all = TrainSeq::from_encoded(seq.clone(), 0.5, &Unlearned::default());
        assert_eq!(all.weights, vec![0.5, 0.5, 1.0, 1.0, 1.0, 0.0]);
        let arithmetic = Unlearned {
            domains: vec![Arithmetic],
            skills: vec![],
        };
        let masked = TrainSeq::from_encoded(seq, 0.5, &arithmetic);
        assert_eq!(masked.weights, vec![0.5, 0.5, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(masked.ids, all.ids);
        assert_eq!(masked.labels, all.labels);
    }

    #[test]
    fn unlearned_chaining_tokens_weigh_nothing_the_others_do() {
        use Domain::*;
        // answer: two column tokens, two chaining tokens, `</s>` (unlabelled:
        // it counts as the chaining token before it)
        let seq = EncodedSequence {
            ids: vec![1, 2, 3, 4, 5, 6],
            domains: vec![
                None,
                Some(Arithmetic),
                Some(Arithmetic),
                Some(Arithmetic),
                Some(Arithmetic),
                None,
            ],
            skill: vec![false, false, false, true, true, false],
            answer_start: 1,
        };
        let chaining = Unlearned {
            domains: vec![],
            skills: vec![Arithmetic],
        };
        let masked = TrainSeq::from_encoded(seq.clone(), 0.5, &chaining);
        assert_eq!(masked.weights, vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        let code = Unlearned {
            domains: vec![],
            skills: vec![Code],
        };
        let all = TrainSeq::from_encoded(seq, 0.5, &code);
        assert_eq!(all.weights, vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        assert_eq!(masked.labels, all.labels);
    }

    #[test]
    fn packing_masks_each_sequence_to_itself() {
        let seq = |ids: Vec<u32>| TrainSeq {
            weights: vec![1.0; ids.len()],
            labels: vec![None; ids.len()],
            ids,
        };
        let b = PackedBatch::pack(
            &[seq(vec![1, 5, 6]), seq(vec![1, 7]), seq(vec![1, 8, 9, 10])],
            2,
            5,
            0,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(b.host_ids, vec![1, 5, 6, 1, 7, 1, 8, 9, 10, 0]);
        let pos = b.positions.to_vec1::<u32>().unwrap();
        assert_eq!(pos, vec![0, 1, 2, 0, 1, 0, 1, 2, 3, 0]);
        let w = b.weights.to_vec1::<f32>().unwrap();
        assert_eq!(w, vec![1., 1., 0., 1., 0., 1., 1., 1., 0., 0.]);
        let t = b.targets.to_vec1::<u32>().unwrap();
        assert_eq!(&t[..3], &[5, 6, 0]);
        let m = b.mask.to_vec3::<f32>().ok();
        assert!(m.is_none()); // 4-D
        let m = b.mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = |r: usize, i: usize, j: usize| m[(r * 5 + i) * 5 + j];
        assert_eq!(at(0, 4, 3), 0.0); // second sequence sees itself
        assert_eq!(at(0, 3, 2), f32::NEG_INFINITY); // not the first
        assert_eq!(at(0, 1, 2), f32::NEG_INFINITY); // causal
        assert_eq!(at(1, 4, 4), 0.0); // padding sees itself only
        assert_eq!(at(1, 4, 3), f32::NEG_INFINITY);
    }
}
