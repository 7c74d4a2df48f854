//! The model runner: one engine step = one routed forward over every running
//! sequence's new tokens, in whatever routing mode each sequence asked for.
//!
//! `single_pass`, `per_sequence` and `base` sequences share one pass: each
//! row carries its own assignments. `per_modality_pass` sequences need one
//! pass per adapter group, each with its own KV cache; pass j carries group j
//! of every such sequence (and pass 0 also carries everyone else). Each
//! token's output row is taken from the pass of its own group.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::adapters::hot_set::{HotSet, HotSetConfig};
use crate::adapters::peft::LoraAdapter;
use crate::adapters::{AdapterRole, SlotId, NULL_SLOT};
use crate::model::config::VocabLayout;
use crate::model::decoder::{BatchInput, Decoder, LoraContext, SeqSlice};
use crate::model::kv_cache::KvCache;
use crate::routing::gate::{Gate, GATE_CONFIG_FILE};
use crate::routing::mode::RoutingMode;
use crate::routing::router::{GateSet, Router, RowRoute};

/// A request's adapters, resolved to hot-set slots by the engine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterSelection {
    /// The adapter slot of each modality (index = modality), `None` = none.
    pub modality: Vec<Option<SlotId>>,
    /// The semantic experts the gate may pick for text tokens.
    pub gate_set: GateSet,
    /// `per_sequence`: the adapters applied to every token, with weights.
    pub forced: Vec<(SlotId, f32)>,
}

impl AdapterSelection {
    /// The adapter groups a `per_modality_pass` sequence runs, in pass order:
    /// the default modality (0) first, then every other modality that has an
    /// adapter. A per-sequence server must keep one pass per adapter the
    /// request may need, so this is what the request costs there.
    pub fn pass_groups(&self) -> Vec<usize> {
        let mut g = vec![0];
        g.extend((1..self.modality.len()).filter(|&m| self.modality[m].is_some()));
        g
    }

    /// How `token` is routed in a pass whose adapters are those of modality
    /// `group` (single_pass: the token's own modality).
    fn route(&self, mode: RoutingMode, group: usize, gate_set: usize) -> RowRoute {
        match mode {
            RoutingMode::Base => RowRoute::default(),
            RoutingMode::PerSequence => RowRoute {
                fixed: self.forced.clone(),
                gate_set: None,
            },
            RoutingMode::SinglePass | RoutingMode::PerModalityPass => RowRoute {
                fixed: self
                    .modality
                    .get(group)
                    .copied()
                    .flatten()
                    .map(|s| (s, 1.0))
                    .into_iter()
                    .collect(),
                gate_set: (group == 0 && !self.gate_set.is_empty()).then_some(gate_set),
            },
        }
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub mode: RoutingMode,
    pub adapters: &'a AdapterSelection,
    /// Cache ids in the pool: one, or one per pass group for per_modality_pass.
    pub caches: &'a [usize],
}

/// What a step did, for the API's routing stats and the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardReport {
    /// Full decoder passes run.
    pub passes: usize,
    /// Token rows pushed through the decoder, over all passes.
    pub rows_processed: usize,
    /// Token rows routed to each adapter, averaged over layers (the gate may
    /// route a row differently at each layer).
    pub rows_per_adapter: BTreeMap<String, f64>,
    pub elapsed: Duration,
    /// The same counts for each entry of `steps`, in order.
    pub per_seq: Vec<SeqReport>,
}

/// One [`SeqStep`]'s share of a forward.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqReport {
    /// Passes its tokens went through (its number of caches).
    pub passes: usize,
    /// Its token rows over all those passes.
    pub rows_processed: usize,
    /// Its rows routed to each adapter, averaged over layers.
    pub rows_per_adapter: BTreeMap<String, f64>,
}

pub struct StepOutput {
    /// `[N, d]`: final hidden state of every new token, in the order of the steps.
    pub hidden: Tensor,
    pub report: ForwardReport,
    /// For each row of `hidden`: the learned gate's best pick at the last
    /// layer (NULL_SLOT where the gate did not score the row), taken from the
    /// pass the row's output came from.
    pub top_picks: Vec<SlotId>,
}

pub struct ModelRunner {
    pub decoder: Decoder,
    pub vocab: VocabLayout,
    pub hot_set: HotSet,
    pub gate: Option<Gate>,
    /// Where the model was loaded from ([`ModelRunner::load`]; `None` for a
    /// runner built in memory).
    pub model_dir: Option<PathBuf>,
    /// The folder adapters are loaded from by name.
    pub adapter_dir: Option<PathBuf>,
}

impl ModelRunner {
    pub fn new(decoder: Decoder, hot_set: HotSet, gate: Option<Gate>) -> Result<Self> {
        let vocab = decoder.config().vocab()?;
        Ok(Self {
            decoder,
            vocab,
            hot_set,
            gate,
            model_dir: None,
            adapter_dir: None,
        })
    }

    /// Number of KV caches a sequence needs in `mode`.
    pub fn caches_needed(mode: RoutingMode, adapters: &AdapterSelection) -> usize {
        match mode {
            RoutingMode::PerModalityPass => adapters.pass_groups().len(),
            _ => 1,
        }
    }

    pub fn new_cache(&self) -> Result<KvCache> {
        Ok(KvCache::new(self.decoder.config(), self.decoder.device())?)
    }

    /// Runs one step over `steps`, reading and extending the caches of `pool`.
    pub fn forward(&self, steps: &[SeqStep<'_>], pool: &mut [KvCache]) -> Result<StepOutput> {
        let start = Instant::now();
        for s in steps {
            let want = Self::caches_needed(s.mode, s.adapters);
            if s.caches.len() != want {
                bail!(
                    "a {} sequence needs {want} KV caches, got {}",
                    s.mode,
                    s.caches.len()
                );
            }
        }
        let num_passes = steps.iter().map(|s| s.caches.len()).max().unwrap_or(0);
        let mut outputs = Vec::with_capacity(num_passes);
        // Where each pass's rows start in the concatenated pass outputs.
        let mut pass_offsets = Vec::with_capacity(num_passes);
        let slots = self.hot_set.num_slots();
        let mut row_layers = vec![0u64; slots];
        let mut owner_layers = vec![0u64; steps.len() * slots];
        let mut picks = Vec::new();
        let mut rows_processed = 0;
        for pass in 0..num_passes {
            let mut batch = BatchInput {
                tokens: vec![],
                seqs: vec![],
            };
            let mut rows = vec![];
            let mut gate_sets = vec![];
            let mut owners = vec![];
            for (owner, s) in steps
                .iter()
                .enumerate()
                .filter(|(_, s)| pass < s.caches.len())
            {
                owners.extend(std::iter::repeat_n(owner as u32, s.tokens.len()));
                let group = s.adapters.pass_groups()[pass];
                let gs = gate_sets.len();
                gate_sets.push(s.adapters.gate_set.clone());
                let start = batch.tokens.len();
                for &t in s.tokens {
                    let g = match s.mode {
                        RoutingMode::PerModalityPass => group,
                        _ => self.vocab.modality_of(t),
                    };
                    rows.push(s.adapters.route(s.mode, g, gs));
                }
                batch.tokens.extend_from_slice(s.tokens);
                batch.seqs.push(SeqSlice {
                    cache: s.caches[pass],
                    rows: start..batch.tokens.len(),
                });
            }
            pass_offsets.push(rows_processed);
            rows_processed += batch.tokens.len();
            let n_rows = rows.len();
            let router = Router::new(&self.hot_set, self.gate.as_ref(), rows, gate_sets)
                .with_owners(owners, steps.len());
            let lora: Option<&dyn LoraContext> = (!router.is_empty()).then_some(&router);
            outputs.push(self.decoder.forward(&batch, pool, lora)?);
            for (acc, n) in row_layers.iter_mut().zip(router.row_layers()) {
                *acc += n;
            }
            for (acc, n) in owner_layers.iter_mut().zip(router.owner_row_layers()) {
                *acc += n;
            }
            let mut top = router.top_picks();
            top.resize(n_rows, NULL_SLOT);
            picks.extend(top);
        }
        let (hidden, top_picks) = match self.pass_index(steps, num_passes, &pass_offsets) {
            None => (self.first_or_empty(&outputs)?, picks),
            Some(index) => {
                let top_picks = index.iter().map(|&i| picks[i as usize]).collect();
                let all = Tensor::cat(&outputs, 0)?;
                let n = index.len();
                (
                    all.index_select(&Tensor::from_vec(index, n, all.device())?, 0)?,
                    top_picks,
                )
            }
        };
        let per_seq = steps
            .iter()
            .enumerate()
            .map(|(i, s)| SeqReport {
                passes: s.caches.len(),
                rows_processed: s.tokens.len() * s.caches.len(),
                rows_per_adapter: self.name_rows(&owner_layers[i * slots..(i + 1) * slots]),
            })
            .collect();
        let report = ForwardReport {
            passes: num_passes,
            rows_processed,
            rows_per_adapter: self.name_rows(&row_layers),
            elapsed: start.elapsed(),
            per_seq,
        };
        Ok(StepOutput {
            hidden,
            report,
            top_picks,
        })
    }

    fn first_or_empty(&self, outputs: &[Tensor]) -> Result<Tensor> {
        Ok(outputs.first().cloned().unwrap_or(Tensor::zeros(
            (0, self.decoder.config().hidden_size),
            candle_core::DType::F32,
            self.decoder.device(),
        )?))
    }

    /// Where each token's output row sits in the concatenated pass outputs:
    /// the pass of its own group. `None` when there is at most one pass
    /// (the rows are already in order).
    fn pass_index(
        &self,
        steps: &[SeqStep<'_>],
        num_passes: usize,
        pass_offsets: &[usize],
    ) -> Option<Vec<u32>> {
        if num_passes <= 1 {
            return None;
        }
        // Row cursor of each pass while walking the steps in order.
        let mut cursor = pass_offsets.to_vec();
        let mut index = Vec::new();
        for s in steps {
            let groups = s.adapters.pass_groups();
            let n = s.tokens.len();
            for (i, &t) in s.tokens.iter().enumerate() {
                let pass = match s.mode {
                    RoutingMode::PerModalityPass => {
                        let m = self.vocab.modality_of(t);
                        groups.iter().position(|&g| g == m).unwrap_or(0)
                    }
                    _ => 0,
                };
                index.push((cursor[pass] + i) as u32);
            }
            for c in cursor.iter_mut().take(s.caches.len()) {
                *c += n;
            }
        }
        Some(index)
    }

    fn name_rows(&self, row_layers: &[u64]) -> BTreeMap<String, f64> {
        let layers = self.decoder.config().num_hidden_layers as f64;
        self.hot_set
            .status()
            .into_iter()
            .filter_map(|s| {
                let n = row_layers[s.slot as usize];
                (n > 0).then(|| {
                    (
                        s.adapter.unwrap_or_else(|| format!("slot{}", s.slot)),
                        n as f64 / layers,
                    )
                })
            })
            .collect()
    }
}

/// Loading a model directory and resolving adapter names to slots.
impl ModelRunner {
    /// Loads the decoder from `model_dir`, registers every adapter folder under
    /// `adapter_dir` in the cold set, and the gate if the model has one.
    /// Returns the runner and the adapters that were refused, with the reason
    /// (a bad adapter never stops the service).
    pub fn load(
        model_dir: &Path,
        adapter_dir: &Path,
        hot: HotSetConfig,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        let decoder = Decoder::load(model_dir, device)?;
        let cfg = decoder.config().clone();
        let mut hot_set = HotSet::new(&cfg, hot, device)?;
        let mut refused = vec![];
        if adapter_dir.is_dir() {
            let mut dirs: Vec<_> = std::fs::read_dir(adapter_dir)
                .with_context(|| format!("{}: cannot list adapters", adapter_dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            for dir in dirs {
                match LoraAdapter::load(&dir, &cfg, device).and_then(|a| hot_set.register(a)) {
                    Ok(()) => {}
                    Err(e) => refused.push(format!("{e:#}")),
                }
            }
        }
        let gate = if model_dir.join(GATE_CONFIG_FILE).exists() {
            Some(Gate::load(
                model_dir,
                cfg.num_hidden_layers,
                cfg.hidden_size,
                device,
            )?)
        } else {
            None
        };
        let mut runner = Self::new(decoder, hot_set, gate)?;
        runner.model_dir = Some(model_dir.to_path_buf());
        runner.adapter_dir = Some(adapter_dir.to_path_buf());
        Ok((runner, refused))
    }

    /// The adapter registered for modality `m`, by its role.
    pub fn modality_adapter(&self, modality: &str) -> Option<String> {
        // Every registered adapter, hot or cold (`cold_names` leaves hot ones out).
        self.hot_set.names().into_iter().find(|n| {
            matches!(self.hot_set.role_of(n), Some(AdapterRole::Modality { modality: m }) if m == modality)
        })
    }

    /// Acquires every modality adapter and every gate expert present: what a
    /// request that names no adapters gets.
    pub fn default_selection(&mut self) -> Result<AdapterSelection> {
        let names: Vec<Option<String>> = self
            .vocab
            .modalities
            .iter()
            .map(|m| self.modality_adapter(&m.name))
            .collect();
        let mut modality = Vec::with_capacity(names.len());
        for n in names {
            modality.push(match n {
                Some(n) => Some(self.hot_set.acquire(&n)?),
                None => None,
            });
        }
        let experts: Vec<String> = self
            .gate
            .as_ref()
            .map(|g| g.config.experts.clone())
            .unwrap_or_default();
        let mut gate_set = vec![];
        for (i, e) in experts.iter().enumerate() {
            if self.hot_set.role_of(e).is_some() {
                gate_set.push((i, self.hot_set.acquire(e)?));
            }
        }
        Ok(AdapterSelection {
            modality,
            gate_set,
            forced: vec![],
        })
    }
}
