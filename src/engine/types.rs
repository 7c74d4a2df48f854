//! The plain types between the HTTP layer and the engine (TGI's split): a
//! validated request goes in, a stream of events comes out. Nothing here
//! holds a tensor or an HTTP type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::params::GenerationParams;
use crate::routing::mode::RoutingMode;

/// Which adapters a request asks for, by name; the engine resolves names to
/// hot-set slots (loading cold adapters) when the request is admitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterRequest {
    /// Modality name -> adapter name. `None`: each modality's default adapter
    /// (the registered adapter whose role serves that modality).
    #[serde(default)]
    pub modality: Option<BTreeMap<String, String>>,
    /// Semantic adapters the gate may pick for text tokens. `None`: every
    /// expert the gate knows; empty: gate off.
    #[serde(default)]
    pub semantic: Option<Vec<String>>,
    /// `per_sequence` mode: the adapters applied to every token (equal weights).
    #[serde(default)]
    pub forced: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Served first.
    #[default]
    Interactive,
    /// Batch-job items: admitted only when no interactive request waits.
    Batch,
}

/// A request that passed validation: tokenized, every field within limits.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// Prompt token ids (text tokens, and image blocks `<boi> codes <eoi>`).
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    pub mode: RoutingMode,
    pub adapters: AdapterRequest,
    pub priority: Priority,
    /// Send a partial-image preview every this many image tokens (streaming).
    pub preview_every: Option<usize>,
}

/// What the engine streams back for one request, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum InferEvent {
    /// One generated token, with the adapter that served it most (the
    /// playground colours tokens by it).
    Token {
        id: u32,
        modality: String,
        adapter: Option<String>,
    },
    /// New text since the last delta.
    TextDelta(String),
    /// A partial picture: the codes so far, the rest left blank.
    ImagePreview {
        index: usize,
        codes_done: usize,
        png: Vec<u8>,
        width: u32,
        height: u32,
    },
    /// A finished picture.
    Image {
        index: usize,
        png: Vec<u8>,
        width: u32,
        height: u32,
    },
    /// The last event of a successful request.
    End(Completion),
    /// The last event of a failed request.
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model emitted `<eos>`.
    Stop,
    /// `max_tokens` reached.
    Length,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub text_tokens: usize,
    pub image_tokens: usize,
    pub images: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingStats {
    pub mode: String,
    /// Decoder passes run for this request, summed over its steps.
    pub passes: usize,
    /// Token rows the decoder processed for this request (all passes).
    pub token_rows: usize,
    /// Token rows per adapter (averaged over layers), this request only.
    /// Whole numbers (every modality adapter's rows) are written as JSON
    /// integers, the rest (gate picks that vary by layer) to 2 decimals.
    #[serde(serialize_with = "serialize_rows")]
    pub rows_per_adapter: BTreeMap<String, f64>,
    /// Wall time of the forward steps this request took part in.
    #[serde(serialize_with = "serialize_ms")]
    pub forward_ms: f64,
    #[serde(serialize_with = "serialize_ms")]
    pub queue_ms: f64,
    #[serde(serialize_with = "serialize_ms")]
    pub total_ms: f64,
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Row counts per adapter: JSON integers when whole (`64`, not `64.0`),
/// else 2 decimals.
pub fn serialize_rows<S: serde::Serializer>(
    rows: &BTreeMap<String, f64>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(rows.len()))?;
    for (name, &n) in rows {
        let r = round_to(n, 2);
        if r.fract() == 0.0 && (0.0..9.0e15).contains(&r) {
            map.serialize_entry(name, &(r as u64))?;
        } else {
            map.serialize_entry(name, &r)?;
        }
    }
    map.end()
}

/// Milliseconds to the microsecond.
pub fn serialize_ms<S: serde::Serializer>(ms: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_to(*ms, 3))
}

/// Ratios and fractions to 3 decimals.
pub fn serialize_ratio<S: serde::Serializer>(r: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_to(*r, 3))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub routing: RoutingStats,
}

/// Why the engine would not take a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting); retry later")]
    Overloaded(usize),
    #[error("unknown adapter {0:?}")]
    UnknownAdapter(String),
    #[error("{0}")]
    InvalidAdapters(String),
    #[error("the engine has stopped")]
    Stopped,
}
