//! Builds the routing plan of each layer for one forward pass.
//!
//! Each row (token) carries fixed assignments, known before the pass: its
//! modality adapter from the vocabulary-range router, or the forced set of
//! a per-sequence request. Text rows of requests that allow semantic adapters
//! are also *gated*: at every layer the gate scores them on that layer's
//! input and adds its top-k picks (from the gate's `first_gated_layer` on;
//! earlier layers get the fixed assignments alone). The plan of a layer is
//! fixed + gated assignments, grouped by slot for the dispatch kernels.

use std::cell::RefCell;

use candle_core::Tensor;

use crate::adapters::{hot_set::HotSet, Projection, SlotId, NULL_SLOT};
use crate::dispatch::SlotWeights;
use crate::model::decoder::LoraContext;
use crate::routing::gate::Gate;
use crate::routing::plan::{GroupedPlan, RoutingPlan};

/// How one row is routed, before the gate runs.
#[derive(Debug, Clone, Default)]
pub struct RowRoute {
    /// Assignments known before the pass: (slot, weight).
    pub fixed: Vec<(SlotId, f32)>,
    /// Index into [`Router::gate_sets`] of the experts the gate may pick for
    /// this row, or `None` when the gate does not score this row.
    pub gate_set: Option<usize>,
}

/// Where each layer's plan comes from.
enum PlanSource<'a> {
    /// No row is gated: one plan serves every layer.
    Static(GroupedPlan),
    /// Gated rows: the gate runs on each layer's input from its
    /// `first_gated_layer` on; the layers before it share the fixed plan.
    Gated {
        gate: &'a Gate,
        before_first: Option<GroupedPlan>,
    },
}

/// The plan of the rows' fixed assignments alone.
fn fixed_plan(rows: &[RowRoute], num_slots: usize) -> GroupedPlan {
    let mut plan = RoutingPlan::with_capacity(rows.len(), rows.len());
    for r in rows {
        plan.push_row(r.fixed.iter().copied());
    }
    plan.grouped(num_slots)
}

/// The semantic experts one request allows: (gate expert index, slot).
pub type GateSet = Vec<(usize, SlotId)>;

/// A [`LoraContext`] over the hot set for one forward.
pub struct Router<'a> {
    hot_set: &'a HotSet,
    rows: Vec<RowRoute>,
    gate_sets: Vec<GateSet>,
    plans: PlanSource<'a>,
    /// Row-layers routed to each slot, summed over the layers of this pass.
    row_layers: RefCell<Vec<u64>>,
    /// Optional owner (e.g. sequence) of each row, and the number of owners.
    owners: Option<(Vec<u32>, usize)>,
    /// Row-layers per (owner, slot), flat `[owner * slots + slot]`.
    owner_row_layers: RefCell<Vec<u64>>,
    /// The gate's best pick of each row at the last gated layer planned
    /// (NULL_SLOT for rows the gate does not score).
    top_picks: RefCell<Vec<SlotId>>,
}

impl<'a> Router<'a> {
    pub fn new(
        hot_set: &'a HotSet,
        gate: Option<&'a Gate>,
        rows: Vec<RowRoute>,
        gate_sets: Vec<GateSet>,
    ) -> Self {
        let slots = hot_set.num_slots();
        let plans = match gate {
            Some(gate) if rows.iter().any(|r| r.gate_set.is_some()) => PlanSource::Gated {
                gate,
                before_first: (gate.config.first_gated_layer > 0).then(|| fixed_plan(&rows, slots)),
            },
            _ => PlanSource::Static(fixed_plan(&rows, slots)),
        };
        Self {
            hot_set,
            rows,
            gate_sets,
            plans,
            row_layers: RefCell::new(vec![0; slots]),
            owners: None,
            owner_row_layers: RefCell::new(vec![]),
            top_picks: RefCell::new(vec![]),
        }
    }

    /// Also counts row-layers per owner: `owners[row]` < `num_owners`.
    pub fn with_owners(mut self, owners: Vec<u32>, num_owners: usize) -> Self {
        debug_assert_eq!(owners.len(), self.rows.len());
        *self.owner_row_layers.get_mut() = vec![0; num_owners * self.hot_set.num_slots()];
        self.owners = Some((owners, num_owners));
        self
    }

    /// Row-layers per (owner, slot), flat `[owner * slots + slot]` (empty
    /// without [`Router::with_owners`]).
    pub fn owner_row_layers(&self) -> Vec<u64> {
        self.owner_row_layers.borrow().clone()
    }

    /// The gate's best pick of each row at the last layer planned so far
    /// (NULL_SLOT where the gate did not score the row); empty when no row
    /// is gated.
    pub fn top_picks(&self) -> Vec<SlotId> {
        self.top_picks.borrow().clone()
    }

    /// Whether any row has an adapter at all (else the pass needs no router).
    pub fn is_empty(&self) -> bool {
        matches!(&self.plans, PlanSource::Static(p) if p.is_empty())
    }

    /// Row-layers per slot accumulated by the layers planned so far.
    pub fn row_layers(&self) -> Vec<u64> {
        self.row_layers.borrow().clone()
    }

    fn plan_with_gate(
        &self,
        gate: &Gate,
        layer: usize,
        x: &Tensor,
    ) -> candle_core::Result<RoutingPlan> {
        let gated: Vec<u32> = (0..self.rows.len() as u32)
            .filter(|&i| self.rows[i as usize].gate_set.is_some())
            .collect();
        let xs = if gated.len() == self.rows.len() {
            x.clone()
        } else {
            x.index_select(&Tensor::from_slice(&gated, gated.len(), x.device())?, 0)?
        };
        let scores = gate.scores(layer, &xs)?.flatten_all()?.to_vec1::<f32>()?;
        let e = gate.num_experts();
        let mut plan =
            RoutingPlan::with_capacity(self.rows.len(), self.rows.len() * (1 + gate.config.top_k));
        let mut next_gated = 0;
        let mut allowed = Vec::with_capacity(e);
        let mut top = self.top_picks.borrow_mut();
        top.clear();
        top.resize(self.rows.len(), NULL_SLOT);
        for (i, row) in self.rows.iter().enumerate() {
            let picks = match row.gate_set {
                Some(set) => {
                    let set = &self.gate_sets[set];
                    allowed.clear();
                    allowed.extend(set.iter().map(|&(expert, _)| expert));
                    let s = &scores[next_gated * e..(next_gated + 1) * e];
                    next_gated += 1;
                    let picks: Vec<(SlotId, f32)> = gate
                        .pick(s, &allowed)
                        .into_iter()
                        .map(|(expert, w)| {
                            (set.iter().find(|p| p.0 == expert).map_or(0, |p| p.1), w)
                        })
                        .collect();
                    top[i] = picks.first().map_or(NULL_SLOT, |p| p.0);
                    picks
                }
                None => vec![],
            };
            plan.push_row(row.fixed.iter().copied().chain(picks));
        }
        Ok(plan)
    }
}

impl LoraContext for Router<'_> {
    fn layer_plan(&self, layer: usize, x: &Tensor) -> candle_core::Result<Option<GroupedPlan>> {
        let plan = match &self.plans {
            PlanSource::Static(p) => p.clone(),
            PlanSource::Gated {
                gate,
                before_first: Some(p),
            } if layer < gate.config.first_gated_layer => p.clone(),
            PlanSource::Gated { gate, .. } => self
                .plan_with_gate(gate, layer, x)?
                .grouped(self.hot_set.num_slots()),
        };
        let mut counts = self.row_layers.borrow_mut();
        let mut by_owner = self.owner_row_layers.borrow_mut();
        let slots = self.hot_set.num_slots();
        for (slot, rows, _) in plan.active_slots() {
            counts[slot as usize] += rows.len() as u64;
            if let Some((owners, _)) = &self.owners {
                for &r in rows {
                    by_owner[owners[r as usize] as usize * slots + slot as usize] += 1;
                }
            }
        }
        Ok((!plan.is_empty()).then_some(plan))
    }

    fn slot_weights(&self, layer: usize, proj: Projection) -> Option<&SlotWeights> {
        Some(self.hot_set.weights(layer, proj))
    }
}
