//! Teacher-forced measurements on held-out sequences with per-token domain
//! labels, through [`ModelRunner::forward`] (the engine's forward):
//!
//! - the gate's routing accuracy: for every text token whose domain has a
//!   semantic adapter among the gate's experts, is the gate's top-1 pick
//!   (at the last layer, as the runner reports it) an adapter of that domain?
//! - each adapter against base on its own domain: the mean next-token loss
//!   over the answer tokens of the adapter's domains with the adapter
//!   switched on and off, where it is served (see [`comparison`]).
//!
//! Invariants:
//! - adapters map to domains only through their role metadata
//!   ([`super::model::role_domains`]);
//! - a token is counted where its own label is known: the gate on the row
//!   of the token itself, the loss on the row that predicts it.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use super::model::{role_domains, AdapterDomain, EvalModel};
use super::tasks::tasks_for;
use crate::adapters::{AdapterRole, SlotId, NULL_SLOT};
use crate::engine::runner::{AdapterSelection, ModelRunner, SeqStep};
use crate::routing::mode::RoutingMode;
use crate::train::data::encode::EncodedSequence;
use crate::train::data::text_domains::sample;
use crate::train::data::{Domain, Scene, Split, Task};

/// Token rows per forward call.
const ROWS_PER_FORWARD: usize = 1024;

/// `n` held-out examples of every task the model can be posed, encoded with
/// their answers and labels, and the task of each.
pub fn held_out_sequences(
    model: &EvalModel,
    n: usize,
    seed: u64,
) -> Result<(Vec<EncodedSequence>, Vec<Task>)> {
    let enc = model.encoder();
    let (mut seqs, mut tasks) = (Vec::new(), Vec::new());
    for task in tasks_for(model) {
        let mut rng = StdRng::seed_from_u64(seed ^ (0x7eac_0000 + task as u64));
        for _ in 0..n {
            let example = sample(&mut rng, task, Split::Test);
            seqs.push(enc.encode_example(&example, &mut |s: &Scene| model.scene_codes(s))?);
            tasks.push(task);
        }
    }
    Ok((seqs, tasks))
}

fn count(tally: &mut (usize, usize), ok: bool) {
    tally.0 += ok as usize;
    tally.1 += 1;
}

/// Runs every sequence through the runner in `mode` with `selection`, in
/// batches; calls `each(sequence index, hidden rows [len, d], top picks)`.
fn forward_all(
    runner: &ModelRunner,
    seqs: &[EncodedSequence],
    mode: RoutingMode,
    selection: &AdapterSelection,
    mut each: impl FnMut(usize, &Tensor, &[SlotId]) -> Result<()>,
) -> Result<()> {
    let per_seq = ModelRunner::caches_needed(mode, selection);
    let mut start = 0;
    while start < seqs.len() {
        let mut end = start;
        let mut rows = 0;
        while end < seqs.len() && (end == start || rows + seqs[end].len() <= ROWS_PER_FORWARD) {
            rows += seqs[end].len();
            end += 1;
        }
        let batch = &seqs[start..end];
        let mut pool = Vec::with_capacity(batch.len() * per_seq);
        let mut cache_ids = Vec::with_capacity(batch.len());
        for _ in batch {
            cache_ids.push((pool.len()..pool.len() + per_seq).collect::<Vec<_>>());
            for _ in 0..per_seq {
                pool.push(runner.new_cache()?);
            }
        }
        let steps: Vec<SeqStep> = batch
            .iter()
            .zip(&cache_ids)
            .map(|(s, caches)| SeqStep {
                tokens: &s.ids,
                mode,
                adapters: selection,
                caches,
            })
            .collect();
        let out = runner.forward(&steps, &mut pool)?;
        let mut row = 0;
        for (k, s) in batch.iter().enumerate() {
            let hidden = out.hidden.narrow(0, row, s.len())?;
            let picks = out.top_picks.get(row..row + s.len()).unwrap_or(&[]);
            each(start + k, &hidden, picks)?;
            row += s.len();
        }
        start = end;
    }
    Ok(())
}

/// Correct and counted tokens, overall and per domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GateTally {
    pub correct: usize,
    pub total: usize,
    pub by_domain: BTreeMap<Domain, (usize, usize)>,
    /// The answer tokens that chain a worked sum's steps (the skill an
    /// `adapter_only_skills` adapter alone learns): routed wrong, no other
    /// adapter can write them.
    pub skill: (usize, usize),
    /// The text tokens of mixed requests, where a token's domain changes
    /// within one answer.
    pub mixed: (usize, usize),
}

impl GateTally {
    pub fn rate(&self) -> Option<f64> {
        (self.total > 0).then(|| self.correct as f64 / self.total as f64)
    }
}

/// The gate's routing accuracy in `mode`; `None` where the gate does not run
/// (`per_sequence`, `base`, or a model without a gate).
pub fn gate_accuracy(
    runner: &mut ModelRunner,
    seqs: &[EncodedSequence],
    tasks: &[Task],
    mode: RoutingMode,
) -> Result<Option<GateTally>> {
    let experts = match &runner.gate {
        Some(gate) => gate.config.experts.clone(),
        None => return Ok(None),
    };
    if !matches!(mode, RoutingMode::SinglePass | RoutingMode::PerModalityPass) {
        return Ok(None);
    }
    let selection = runner.default_selection()?;
    // Slot -> the domains its adapter serves; and the domains any allowed
    // expert serves (only those tokens can be routed right).
    let mut slot_domains: BTreeMap<SlotId, Vec<Domain>> = BTreeMap::new();
    let mut routable: Vec<Domain> = Vec::new();
    for &(expert, slot) in &selection.gate_set {
        let domains = runner
            .hot_set
            .role_of(&experts[expert])
            .map(role_domains)
            .unwrap_or_default();
        routable.extend(domains.iter().copied().filter(|d| *d != Domain::Image));
        slot_domains.insert(slot, domains);
    }
    let mut tally = GateTally::default();
    forward_all(runner, seqs, mode, &selection, |i, _, picks| {
        let seq = &seqs[i];
        let is_mixed = tasks.get(i) == Some(&Task::Mixed);
        for (t, (label, &pick)) in seq.domains.iter().zip(picks).enumerate() {
            let Some(domain) = label.filter(|d| routable.contains(d)) else {
                continue;
            };
            let ok = pick != NULL_SLOT
                && slot_domains
                    .get(&pick)
                    .is_some_and(|ds| ds.contains(&domain));
            tally.correct += ok as usize;
            tally.total += 1;
            count(tally.by_domain.entry(domain).or_default(), ok);
            if seq.skill[t] && t >= seq.answer_start {
                count(&mut tally.skill, ok);
            }
            if is_mixed {
                count(&mut tally.mixed, ok);
            }
        }
        Ok(())
    })?;
    Ok(Some(tally))
}

/// One adapter switched on and off on its own domain's tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterVsBase {
    pub adapter: String,
    pub domains: Vec<Domain>,
    /// What the adapter is added to: "base", or "base + text + image" for a
    /// semantic adapter (it is trained and served on top of the modality
    /// adapters).
    pub baseline: String,
    /// Answer tokens of those domains the losses average over.
    pub tokens: usize,
    /// Mean next-token loss (nats) of the baseline.
    pub base_loss: f64,
    /// The same with the adapter switched on.
    pub adapter_loss: f64,
}

impl AdapterVsBase {
    pub fn beats_base(&self) -> bool {
        self.tokens > 0 && self.adapter_loss < self.base_loss
    }
}

/// Per-sequence next-token losses: `nll[i]` is the loss of predicting
/// `ids[i + 1]`, `None` where it is not counted (prompt, last position).
fn token_losses(
    runner: &ModelRunner,
    seqs: &[EncodedSequence],
    mode: RoutingMode,
    selection: &AdapterSelection,
) -> Result<Vec<Vec<Option<f32>>>> {
    let mut out = vec![Vec::new(); seqs.len()];
    forward_all(runner, seqs, mode, selection, |i, hidden, _| {
        let s = &seqs[i];
        let logits = runner.decoder.logits(hidden)?.to_vec2::<f32>()?;
        out[i] = (0..s.len())
            .map(|p| {
                let target = *s.ids.get(p + 1)? as usize;
                (p + 1 >= s.answer_start).then(|| nll(&logits[p], target))
            })
            .collect();
        Ok(())
    })?;
    Ok(out)
}

fn nll(logits: &[f32], target: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    max + sum.ln() - logits[target]
}

/// Mean loss over the counted positions whose target is of `domains`.
fn mean_loss(
    seqs: &[EncodedSequence],
    losses: &[Vec<Option<f32>>],
    adapter: &AdapterDomain,
) -> (f64, usize) {
    let (mut sum, mut n) = (0f64, 0usize);
    for (s, l) in seqs.iter().zip(losses) {
        for (p, loss) in l.iter().enumerate() {
            let label = s.domains.get(p + 1).copied().flatten();
            let skill = s.skill.get(p + 1).copied().unwrap_or(false);
            if let (Some(loss), Some(d)) = (loss, label) {
                if adapter.domains.contains(&d) && !adapter.unlearned.covers(d, skill) {
                    sum += *loss as f64;
                    n += 1;
                }
            }
        }
    }
    (if n > 0 { sum / n as f64 } else { f64::NAN }, n)
}

/// How one adapter is switched on and off.
struct Comparison {
    baseline: String,
    without: AdapterSelection,
    with: AdapterSelection,
    /// The mode both run in.
    mode: RoutingMode,
}

/// The comparison of one adapter:
///
/// - A modality adapter serves the rows of its modality (by token id), as
///   the vocabulary-range router routes it; without it, the base.
/// - A semantic adapter is added to the modality adapters as the only expert
///   the gate may pick, so every text row gets it at full weight; without
///   it, the modality adapters alone. A model without a gate forces it with
///   the text adapter on every row instead.
fn comparison(runner: &mut ModelRunner, adapter: &AdapterDomain) -> Result<Comparison> {
    let modalities: Vec<String> = runner
        .vocab
        .modalities
        .iter()
        .map(|m| m.name.clone())
        .collect();
    let slot = runner.hot_set.acquire(&adapter.name)?;
    match &adapter.role {
        AdapterRole::Modality { modality } => {
            let with = AdapterSelection {
                modality: modalities
                    .iter()
                    .map(|m| (m == modality).then_some(slot))
                    .collect(),
                ..AdapterSelection::default()
            };
            Ok(Comparison {
                baseline: "base".into(),
                without: AdapterSelection::default(),
                with,
                mode: RoutingMode::SinglePass,
            })
        }
        AdapterRole::Semantic { .. } => {
            let mut under = AdapterSelection::default();
            let mut names = vec!["base".to_string()];
            for m in &modalities {
                let name = runner.modality_adapter(m);
                under.modality.push(match &name {
                    Some(n) => Some(runner.hot_set.acquire(n)?),
                    None => None,
                });
                names.extend(name);
            }
            let expert = runner
                .gate
                .as_ref()
                .and_then(|g| g.expert_index(&adapter.name));
            let (with, mode) = match expert {
                Some(e) => (
                    AdapterSelection {
                        gate_set: vec![(e, slot)],
                        ..under.clone()
                    },
                    RoutingMode::SinglePass,
                ),
                None => {
                    // Forced on every row (per_sequence with nothing forced
                    // is the base).
                    let text = under.modality.first().copied().flatten();
                    let without = AdapterSelection {
                        forced: text.map(|s| (s, 1.0)).into_iter().collect(),
                        ..AdapterSelection::default()
                    };
                    let mut with = without.clone();
                    with.forced.push((slot, 1.0));
                    let baseline = match text {
                        Some(_) => "base + text (forced)".to_string(),
                        None => "base".to_string(),
                    };
                    return Ok(Comparison {
                        baseline,
                        without,
                        with,
                        mode: RoutingMode::PerSequence,
                    });
                }
            };
            Ok(Comparison {
                baseline: names.join(" + "),
                without: under,
                with,
                mode,
            })
        }
    }
}

/// Every adapter that serves a domain of the world, switched on and off.
pub fn adapters_vs_base(
    runner: &mut ModelRunner,
    adapters: &[AdapterDomain],
    seqs: &[EncodedSequence],
) -> Result<Vec<AdapterVsBase>> {
    // Baselines are shared (the base, the modality adapters): run each once.
    let mut memo = Vec::new();
    let mut out = Vec::new();
    for a in adapters.iter().filter(|a| !a.domains.is_empty()) {
        let c = comparison(runner, a)?;
        let off = memo_losses(&mut memo, runner, seqs, c.mode, &c.without)?;
        let on = memo_losses(&mut memo, runner, seqs, c.mode, &c.with)?;
        let (base_loss, tokens) = mean_loss(seqs, &memo[off].2, a);
        let (adapter_loss, _) = mean_loss(seqs, &memo[on].2, a);
        out.push(AdapterVsBase {
            adapter: a.name.clone(),
            domains: a.domains.clone(),
            baseline: c.baseline,
            tokens,
            base_loss,
            adapter_loss,
        });
    }
    Ok(out)
}

type Memo = Vec<(RoutingMode, AdapterSelection, Vec<Vec<Option<f32>>>)>;

/// The index in `memo` of the losses of (`mode`, `selection`), computed once.
fn memo_losses(
    memo: &mut Memo,
    runner: &ModelRunner,
    seqs: &[EncodedSequence],
    mode: RoutingMode,
    selection: &AdapterSelection,
) -> Result<usize> {
    if let Some(i) = memo.iter().position(|m| m.0 == mode && &m.1 == selection) {
        return Ok(i);
    }
    let losses = token_losses(runner, seqs, mode, selection)?;
    memo.push((mode, selection.clone(), losses));
    Ok(memo.len() - 1)
}
