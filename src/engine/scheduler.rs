//! The waiting queue and the per-step token plan (vLLM's scheduler half; the
//! model runner is the other half, and plain types pass between them).
//!
//! Invariants:
//! - interactive requests leave the queue before batch requests; within a
//!   priority, first in, first out;
//! - a step feeds at most `budget` token rows (prefill is chunked to fit),
//!   decoding sequences first, then prefills in admission order;
//! - a sequence with an unconditional twin (classifier-free guidance) feeds
//!   the *final* pending token of both sides in the same step, because it
//!   samples only when both sides' last rows come out of one forward; a
//!   partial (chunked) take therefore holds back each side's final token;
//! - with a budget of at least 2 every step makes progress.

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

use anyhow::{anyhow, Result};
use tokio::sync::mpsc::UnboundedSender;

use super::sequence::Resolved;
use super::types::{AdapterRequest, InferEvent, Priority, ValidRequest};
use crate::engine::runner::{AdapterSelection, ModelRunner};
use crate::routing::mode::RoutingMode;

/// A request waiting for a place in the running batch.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub req: ValidRequest,
    pub events: UnboundedSender<InferEvent>,
    pub enqueued: Instant,
}

impl Entry {
    /// Whether the client stopped listening.
    pub fn is_abandoned(&self) -> bool {
        self.events.is_closed()
    }
}

/// Waiting requests, one FIFO per priority.
#[derive(Debug, Default)]
pub struct Queue {
    interactive: VecDeque<Entry>,
    batch: VecDeque<Entry>,
}

impl Queue {
    pub fn push(&mut self, entry: Entry) {
        match entry.req.priority {
            Priority::Interactive => self.interactive.push_back(entry),
            Priority::Batch => self.batch.push_back(entry),
        }
    }

    /// The next request to admit.
    pub fn front(&self) -> Option<&Entry> {
        self.interactive.front().or_else(|| self.batch.front())
    }

    pub fn pop_front(&mut self) -> Option<Entry> {
        self.interactive
            .pop_front()
            .or_else(|| self.batch.pop_front())
    }

    pub fn len(&self) -> usize {
        self.interactive.len() + self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the requests whose client went away; returns how many.
    pub fn drop_abandoned(&mut self) -> usize {
        let before = self.len();
        self.interactive.retain(|e| !e.is_abandoned());
        self.batch.retain(|e| !e.is_abandoned());
        before - self.len()
    }
}

/// What one running sequence still has to feed: its own pending tokens and
/// those of its unconditional twin, if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub cond: usize,
    pub twin: Option<usize>,
}

impl Pending {
    fn total(&self) -> usize {
        self.cond + self.twin.unwrap_or(0)
    }
}

/// How many pending tokens of each side sequence `seq` feeds this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    pub seq: usize,
    pub cond: usize,
    pub twin: usize,
}

/// A sequence whose pending rows are at most this many is decoding (one
/// token per side, two after a forced `<eoi>`), and goes first.
const DECODE_ROWS: usize = 4;

/// Splits `budget` rows over the running sequences (index = position in
/// `pending`). Decoding sequences are served first, then prefills in order;
/// a prefill that does not fit is chunked, holding back its final tokens.
pub fn plan_step(pending: &[Pending], budget: usize) -> Vec<Take> {
    let mut budget = budget.max(2);
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.sort_by_key(|&i| (pending[i].total() > DECODE_ROWS, i));
    let mut takes = Vec::with_capacity(pending.len());
    for i in order {
        if budget == 0 {
            break;
        }
        let p = pending[i];
        let twin = p.twin.unwrap_or(0);
        let (c, t) = if p.total() <= budget {
            (p.cond, twin)
        } else {
            // Only non-final tokens: no side may reach its end alone.
            let c = p.cond.saturating_sub(1).min(budget);
            let t = twin.saturating_sub(1).min(budget - c);
            (c, t)
        };
        if c + t > 0 {
            budget -= c + t;
            takes.push(Take {
                seq: i,
                cond: c,
                twin: t,
            });
        }
    }
    takes.sort_by_key(|t| t.seq);
    takes
}

/// Whether a request's adapters can be made hot now.
pub enum Admission {
    Ready(Resolved),
    /// The hot set is full of adapters running sequences hold: wait for
    /// one of them to finish.
    Wait,
    Refuse(String),
}

/// The adapter names a request needs, by use.
struct Wanted {
    /// Per modality (index = modality), the adapter name or none.
    modality: Vec<Option<String>>,
    /// (gate expert index, name).
    gate: Vec<(usize, String)>,
    forced: Vec<String>,
}

fn wanted(runner: &ModelRunner, req: &AdapterRequest, mode: RoutingMode) -> Result<Wanted> {
    let mut w = Wanted {
        modality: vec![None; runner.vocab.modalities.len()],
        gate: vec![],
        forced: vec![],
    };
    match mode {
        RoutingMode::Base => {}
        RoutingMode::PerSequence => w.forced = req.forced.clone(),
        RoutingMode::SinglePass | RoutingMode::PerModalityPass => {
            // Modalities the request's map leaves out keep their default adapter.
            for (i, m) in runner.vocab.modalities.iter().enumerate() {
                let named = req
                    .modality
                    .as_ref()
                    .and_then(|map| map.get(&m.name).cloned());
                w.modality[i] = named.or_else(|| runner.modality_adapter(&m.name));
            }
            let experts = runner
                .gate
                .as_ref()
                .map(|g| g.config.experts.clone())
                .unwrap_or_default();
            let allowed: Vec<String> = match &req.semantic {
                None => experts
                    .iter()
                    .filter(|e| runner.hot_set.role_of(e).is_some())
                    .cloned()
                    .collect(),
                Some(list) => list.clone(),
            };
            for name in allowed {
                let idx = experts.iter().position(|e| *e == name).ok_or_else(|| {
                    anyhow!("adapter {name:?} is not one of the gate's experts {experts:?}")
                })?;
                w.gate.push((idx, name));
            }
        }
    }
    let all = w
        .modality
        .iter()
        .flatten()
        .chain(w.gate.iter().map(|g| &g.1))
        .chain(&w.forced);
    for name in all {
        if runner.hot_set.role_of(name).is_none() {
            return Err(anyhow!(
                "unknown adapter {name:?}: it is not registered (was it unloaded?)"
            ));
        }
    }
    Ok(w)
}

/// Resolves a request's adapter names to hot-set slots, acquiring each
/// (released by [`release`] when the sequence ends).
pub fn resolve_adapters(
    runner: &mut ModelRunner,
    req: &AdapterRequest,
    mode: RoutingMode,
) -> Admission {
    let w = match wanted(runner, req, mode) {
        Ok(w) => w,
        Err(e) => return Admission::Refuse(format!("{e:#}")),
    };
    let names: BTreeSet<&String> = w
        .modality
        .iter()
        .flatten()
        .chain(w.gate.iter().map(|g| &g.1))
        .chain(&w.forced)
        .collect();
    let hot = &runner.hot_set;
    let missing = names.iter().filter(|n| hot.slot_of(n).is_none()).count();
    let room = hot
        .status()
        .iter()
        .filter(|s| match &s.adapter {
            None => true,
            Some(a) => s.in_use == 0 && !s.pinned && !names.contains(a),
        })
        .count();
    if missing > room {
        return Admission::Wait;
    }
    let mut r = Resolved::default();
    let mut take = |r: &mut Resolved, name: &str| -> Result<u16> {
        let slot = runner.hot_set.acquire(name)?;
        r.acquired.push(name.to_string());
        if !r.slot_names.iter().any(|(s, _)| *s == slot) {
            r.slot_names.push((slot, name.to_string()));
        }
        Ok(slot)
    };
    let mut selection = AdapterSelection::default();
    let outcome = (|| -> Result<()> {
        for m in &w.modality {
            selection.modality.push(match m {
                Some(name) => Some(take(&mut r, name)?),
                None => None,
            });
        }
        for (idx, name) in &w.gate {
            selection.gate_set.push((*idx, take(&mut r, name)?));
        }
        for name in &w.forced {
            // Each forced adapter at full weight, as PEFT sums active adapters.
            selection.forced.push((take(&mut r, name)?, 1.0));
        }
        Ok(())
    })();
    match outcome {
        Ok(()) => {
            r.selection = selection;
            Admission::Ready(r)
        }
        Err(e) => {
            release(runner, &r);
            Admission::Refuse(format!("cannot load the request's adapters: {e:#}"))
        }
    }
}

/// Releases what [`resolve_adapters`] acquired.
pub fn release(runner: &mut ModelRunner, r: &Resolved) {
    for name in &r.acquired {
        if let Err(e) = runner.hot_set.release(name) {
            tracing::error!("releasing adapter {name:?}: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(cond: usize, twin: Option<usize>) -> Pending {
        Pending { cond, twin }
    }

    #[test]
    fn decoders_first_then_prefill_chunked_to_the_budget() {
        let plan = plan_step(&[p(100, None), p(1, None), p(1, None)], 10);
        assert_eq!(
            plan,
            vec![
                Take {
                    seq: 0,
                    cond: 8,
                    twin: 0
                },
                Take {
                    seq: 1,
                    cond: 1,
                    twin: 0
                },
                Take {
                    seq: 2,
                    cond: 1,
                    twin: 0
                }
            ]
        );
        let plan = plan_step(&[p(5, None), p(7, None)], 10);
        assert_eq!(
            plan,
            vec![
                Take {
                    seq: 0,
                    cond: 5,
                    twin: 0
                },
                Take {
                    seq: 1,
                    cond: 5,
                    twin: 0
                }
            ]
        );
    }

    #[test]
    fn a_chunk_never_finishes_one_side_of_a_twin_alone() {
        // cond needs 3, twin 4; budget 5: neither final token may go.
        let plan = plan_step(&[p(3, Some(4))], 5);
        assert_eq!(
            plan,
            vec![Take {
                seq: 0,
                cond: 2,
                twin: 3
            }]
        );
        // Then 1 + 1 remain and go together.
        let plan = plan_step(&[p(1, Some(1))], 5);
        assert_eq!(
            plan,
            vec![Take {
                seq: 0,
                cond: 1,
                twin: 1
            }]
        );
    }

    #[test]
    fn every_step_makes_progress_even_with_a_tiny_budget() {
        for budget in [0, 1, 2, 3] {
            let mut left = [p(7, Some(3)), p(1, None), p(2, Some(2))];
            for _ in 0..100 {
                if left.iter().all(|x| x.total() == 0) {
                    break;
                }
                let live: Vec<usize> = (0..3).filter(|&i| left[i].total() > 0).collect();
                let view: Vec<Pending> = live.iter().map(|&i| left[i]).collect();
                let plan = plan_step(&view, budget);
                assert!(!plan.is_empty(), "budget {budget}: no progress");
                for t in plan {
                    let s = &mut left[live[t.seq]];
                    s.cond -= t.cond;
                    if let Some(tw) = s.twin.as_mut() {
                        *tw -= t.twin;
                    }
                    // Final tokens of a twin pair go together.
                    if let Some(tw) = s.twin {
                        assert_eq!(s.cond == 0, tw == 0, "a side finished alone");
                    }
                }
            }
            assert!(
                left.iter().all(|x| x.total() == 0),
                "budget {budget}: not drained"
            );
        }
    }

    #[test]
    fn interactive_requests_leave_the_queue_first() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mk = |id, priority| Entry {
            id,
            req: ValidRequest {
                prompt: vec![1],
                params: Default::default(),
                mode: Default::default(),
                adapters: Default::default(),
                priority,
                preview_every: None,
            },
            events: tx.clone(),
            enqueued: Instant::now(),
        };
        let mut q = Queue::default();
        q.push(mk(1, Priority::Batch));
        q.push(mk(2, Priority::Interactive));
        q.push(mk(3, Priority::Batch));
        q.push(mk(4, Priority::Interactive));
        let ids: Vec<u64> = std::iter::from_fn(|| q.pop_front().map(|e| e.id)).collect();
        assert_eq!(ids, vec![2, 4, 1, 3]);
    }
}
