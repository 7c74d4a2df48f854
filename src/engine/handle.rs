//! The engine's public face: [`EngineHandle`], which HTTP handlers clone and
//! hold, and the plain types that cross it.
//!
//! Invariants:
//! - `submit` answers at once: it never waits for the engine thread. The
//!   queue bound is an atomic count of requests submitted and not yet
//!   admitted (or dropped), so a full queue is `Overloaded` without a
//!   round trip;
//! - adapter names are checked against the engine's catalog before a request
//!   is queued; the catalog is republished by the engine thread whenever an
//!   adapter is loaded or unloaded;
//! - `stats` and `model_info` read snapshots the engine thread publishes;
//!   they never block on a step.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use anyhow::{anyhow, Result};
use serde::Serialize;
use tokio::sync::{mpsc as tmpsc, oneshot};

use super::scheduler::Entry;
use super::types::{AdapterRequest, InferEvent, SubmitError, ValidRequest};
use crate::adapters::{AdapterRole, SlotId};
use crate::routing::mode::RoutingMode;

/// Limits of the engine, set once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EngineConfig {
    /// Sequences in the running batch at most.
    pub max_batch_size: usize,
    /// Requests waiting for a place at most; one more is `Overloaded`.
    pub max_queue: usize,
    /// Token rows per step at most (prefill is chunked to fit). Should be
    /// above twice `max_batch_size` so prefills progress while the batch
    /// decodes (each decoding sequence feeds one or two rows per step).
    pub max_batch_tokens: usize,
    /// Prompt plus generated tokens of one sequence at most.
    pub max_context: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 16,
            max_queue: 256,
            max_batch_tokens: 512,
            max_context: 1024,
        }
    }
}

/// Adapter management, run on the engine thread between steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterCommand {
    /// Every registered adapter with its hot-set state.
    List,
    /// Reads `<adapter_dir>/<name>`, registers it and makes it hot.
    Load { name: String },
    /// Unregisters an adapter (refused while a running sequence uses it).
    Unload { name: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum AdapterReply {
    Status(Vec<AdapterInfo>),
    Loaded { name: String, slot: SlotId },
    Unloaded { name: String },
}

/// One registered adapter as the adapters endpoint shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub role: AdapterRole,
    /// Its hot-set slot, `None` when only in the cold set.
    pub slot: Option<SlotId>,
    pub rank: usize,
    /// Running sequences holding it.
    pub in_use: usize,
    pub pinned: bool,
}

/// A cheap snapshot of the engine's counters (the metrics endpoint).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineStats {
    /// Requests submitted and not yet admitted.
    pub queue_depth: usize,
    /// Sequences in the running batch.
    pub running: usize,
    /// Sequences the last step served.
    pub last_batch_size: usize,
    /// Token rows the last step fed (all passes).
    pub last_batch_rows: usize,
    /// Wall time of the last step (forward, sampling, events).
    pub last_step_ms: f64,
    pub steps: u64,
    /// Generated tokens per modality name.
    pub tokens_by_modality: BTreeMap<String, u64>,
    /// Generated tokens per adapter that served them most ("none": base).
    pub tokens_by_adapter: BTreeMap<String, u64>,
    pub requests_finished: u64,
    pub requests_failed: u64,
    pub hot_set_hits: u64,
    pub hot_set_misses: u64,
    pub hot_set_evictions: u64,
}

/// A modality's id range, for clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModalityInfo {
    pub name: String,
    pub start: u32,
    pub end: u32,
}

/// The vocabulary layout in brief.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VocabSummary {
    pub vocab_size: usize,
    pub modalities: Vec<ModalityInfo>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub boi: Option<u32>,
    pub eoi: Option<u32>,
    pub tokens_per_image: usize,
    pub image_grid: [usize; 2],
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelAdapter {
    pub name: String,
    pub role: AdapterRole,
    /// The base model's name.
    pub parent: String,
    pub rank: usize,
}

/// What the model serves: the base, its adapters and the gate's experts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// The model directory's name.
    pub name: String,
    pub vocab: VocabSummary,
    pub adapters: Vec<ModelAdapter>,
    /// Semantic adapters the gate scores, in its order.
    pub gate_experts: Vec<String>,
    /// Whether image codes can be decoded to pictures.
    pub has_vq: bool,
    pub hot_set_capacity: usize,
}

impl ModelInfo {
    /// Checks a request's adapter names against this catalog.
    pub fn check_adapters(
        &self,
        req: &AdapterRequest,
        mode: RoutingMode,
    ) -> Result<(), SubmitError> {
        let known = |name: &String| -> Result<(), SubmitError> {
            if self.adapters.iter().any(|a| &a.name == name) {
                Ok(())
            } else {
                Err(SubmitError::UnknownAdapter(name.clone()))
            }
        };
        let mut distinct = BTreeSet::new();
        if let Some(map) = &req.modality {
            for (modality, adapter) in map {
                if !self.vocab.modalities.iter().any(|m| &m.name == modality) {
                    let names: Vec<&str> = self
                        .vocab
                        .modalities
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect();
                    return Err(SubmitError::InvalidAdapters(format!(
                        "unknown modality {modality:?} in `adapters.modality`; the model has {names:?}"
                    )));
                }
                known(adapter)?;
                distinct.insert(adapter);
            }
        }
        if let Some(semantic) = &req.semantic {
            for name in semantic {
                known(name)?;
                if !self.gate_experts.contains(name) {
                    return Err(SubmitError::InvalidAdapters(format!(
                        "adapter {name:?} in `adapters.semantic` is not one of the gate's experts {:?}",
                        self.gate_experts
                    )));
                }
                distinct.insert(name);
            }
        }
        for name in &req.forced {
            known(name)?;
            distinct.insert(name);
        }
        match (mode, req.forced.is_empty()) {
            (RoutingMode::PerSequence, true) => {
                return Err(SubmitError::InvalidAdapters(
                    "routing mode per_sequence needs at least one adapter in `adapters.forced`".into(),
                ))
            }
            (RoutingMode::PerSequence, false) | (_, true) => {}
            (other, false) => {
                return Err(SubmitError::InvalidAdapters(format!(
                    "`adapters.forced` is used by routing mode per_sequence only; this request asks for {other}"
                )))
            }
        }
        if distinct.len() > self.hot_set_capacity {
            return Err(SubmitError::InvalidAdapters(format!(
                "the request names {} adapters but the hot set holds {}",
                distinct.len(),
                self.hot_set_capacity
            )));
        }
        Ok(())
    }
}

/// What the handle sends the engine thread.
pub(crate) enum Message {
    Submit(Box<Entry>),
    Adapter(AdapterCommand, oneshot::Sender<Result<AdapterReply>>),
}

/// State shared by the handles and the engine thread.
pub(crate) struct Shared {
    pub cfg: EngineConfig,
    /// Submitted and not yet admitted or dropped.
    pub waiting: AtomicUsize,
    pub stopped: AtomicBool,
    pub next_id: AtomicUsize,
    pub stats: Mutex<EngineStats>,
    pub info: RwLock<ModelInfo>,
}

impl Shared {
    pub fn new(cfg: EngineConfig, info: ModelInfo) -> Self {
        Self {
            cfg,
            waiting: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            next_id: AtomicUsize::new(1),
            stats: Mutex::new(EngineStats::default()),
            info: RwLock::new(info),
        }
    }

    /// One request left the waiting set (admitted, failed or abandoned).
    pub fn left_queue(&self, n: usize) {
        if n > 0 {
            self.waiting.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// The handle HTTP handlers hold: cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) tx: mpsc::Sender<Message>,
    pub(crate) shared: Arc<Shared>,
}

impl EngineHandle {
    /// Queues a request and returns its event stream, or refuses it at once:
    /// unknown adapters, a full queue, a stopped engine.
    pub fn submit(
        &self,
        req: ValidRequest,
    ) -> Result<tmpsc::UnboundedReceiver<InferEvent>, SubmitError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(SubmitError::Stopped);
        }
        read(&self.shared.info).check_adapters(&req.adapters, req.mode)?;
        let max = self.shared.cfg.max_queue;
        self.shared
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max).then_some(w + 1)
            })
            .map_err(SubmitError::Overloaded)?;
        let (events, rx) = tmpsc::unbounded_channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let entry = Entry {
            id,
            req,
            events,
            enqueued: std::time::Instant::now(),
        };
        if self.tx.send(Message::Submit(Box::new(entry))).is_err() {
            self.shared.left_queue(1);
            return Err(SubmitError::Stopped);
        }
        Ok(rx)
    }

    /// Runs an adapter command on the engine thread, between steps.
    pub async fn adapter_command(&self, cmd: AdapterCommand) -> Result<AdapterReply> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Adapter(cmd, reply))
            .map_err(|_| anyhow!("the engine has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("the engine stopped before answering"))?
    }

    /// The engine's counters now.
    pub fn stats(&self) -> EngineStats {
        let mut s = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        s.queue_depth = self.shared.waiting.load(Ordering::Acquire);
        s
    }

    pub fn model_info(&self) -> ModelInfo {
        read(&self.shared.info).clone()
    }

    pub fn config(&self) -> EngineConfig {
        self.shared.cfg
    }

    /// Whether the engine thread has ended (it ends when every handle is
    /// dropped and the work is done, or on a fatal error).
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}
