//! The routing plan of one forward: for every token row, a short list of
//! (adapter slot, weight). Slot 0 is the null adapter and never appears.
//!
//! Stored in CSR form (row offsets into flat slot/weight arrays) so that a
//! plan for N rows is three allocations, not N. [`RoutingPlan::grouped`]
//! turns it into the MoE-style layout the dispatch kernels consume:
//! a histogram of assignments per slot and, per slot, its rows and weights.

use crate::adapters::SlotId;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingPlan {
    /// `offsets[i]..offsets[i + 1]` indexes row i's assignments.
    offsets: Vec<usize>,
    slots: Vec<SlotId>,
    weights: Vec<f32>,
}

impl RoutingPlan {
    pub fn with_capacity(rows: usize, assignments: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Self {
            offsets,
            slots: Vec::with_capacity(assignments),
            weights: Vec::with_capacity(assignments),
        }
    }

    /// A plan where every row has no adapter.
    pub fn empty(rows: usize) -> Self {
        Self {
            offsets: vec![0; rows + 1],
            slots: vec![],
            weights: vec![],
        }
    }

    /// Appends the next row. Null-slot (0) and zero-weight entries are dropped.
    pub fn push_row(&mut self, assignments: impl IntoIterator<Item = (SlotId, f32)>) {
        for (slot, w) in assignments {
            if slot != 0 && w != 0.0 {
                self.slots.push(slot);
                self.weights.push(w);
            }
        }
        self.offsets.push(self.slots.len());
    }

    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Total (row, slot) assignments.
    pub fn assignments(&self) -> usize {
        self.slots.len()
    }

    pub fn row(&self, i: usize) -> impl Iterator<Item = (SlotId, f32)> + '_ {
        let r = self.offsets[i]..self.offsets[i + 1];
        self.slots[r.clone()]
            .iter()
            .copied()
            .zip(self.weights[r].iter().copied())
    }

    /// Assignments per slot (index = slot id), over `num_slots` slots.
    pub fn histogram(&self, num_slots: usize) -> Vec<usize> {
        let mut h = vec![0; num_slots];
        for &s in &self.slots {
            h[s as usize] += 1;
        }
        h
    }

    /// The MoE dispatch layout: rows sorted by slot (a counting sort over the
    /// histogram), so each slot's rows are one contiguous run.
    pub fn grouped(&self, num_slots: usize) -> GroupedPlan {
        let hist = self.histogram(num_slots);
        let mut starts = Vec::with_capacity(num_slots + 1);
        starts.push(0);
        for &c in &hist {
            starts.push(starts.last().unwrap() + c);
        }
        let mut cursor = starts.clone();
        let n = self.slots.len();
        let mut rows = vec![0u32; n];
        let mut weights = vec![0f32; n];
        for row in 0..self.rows() {
            for k in self.offsets[row]..self.offsets[row + 1] {
                let s = self.slots[k] as usize;
                rows[cursor[s]] = row as u32;
                weights[cursor[s]] = self.weights[k];
                cursor[s] += 1;
            }
        }
        GroupedPlan {
            num_rows: self.rows(),
            starts,
            rows,
            weights,
        }
    }
}

/// Assignments grouped by slot: `rows[starts[s]..starts[s + 1]]` are the rows
/// routed to slot `s`, with their mixing weights alongside.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupedPlan {
    pub num_rows: usize,
    pub starts: Vec<usize>,
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
}

impl GroupedPlan {
    /// Slots that received at least one row, with their (rows, weights).
    pub fn active_slots(&self) -> impl Iterator<Item = (SlotId, &[u32], &[f32])> + '_ {
        (0..self.starts.len() - 1).filter_map(move |s| {
            let r = self.starts[s]..self.starts[s + 1];
            (!r.is_empty()).then(|| (s as SlotId, &self.rows[r.clone()], &self.weights[r]))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_is_a_stable_counting_sort() {
        let mut p = RoutingPlan::with_capacity(3, 4);
        p.push_row([(2, 0.5), (1, 0.5)]);
        p.push_row([(0, 1.0)]); // null slot dropped
        p.push_row([(2, 1.0)]);
        assert_eq!(p.assignments(), 3);
        assert_eq!(p.histogram(3), vec![0, 1, 2]);
        let g = p.grouped(3);
        let active: Vec<_> = g
            .active_slots()
            .map(|(s, r, w)| (s, r.to_vec(), w.to_vec()))
            .collect();
        assert_eq!(
            active,
            vec![(1, vec![0], vec![0.5]), (2, vec![0, 2], vec![0.5, 1.0])]
        );
    }
}
