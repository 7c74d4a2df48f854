//! The engine: a dedicated thread owns the model and serves many requests
//! with continuous batching ([`engine`]); the HTTP layer talks to it only
//! through an [`EngineHandle`] and the plain types of [`types`].
//!
//! - [`runner`]: the model runner, one routed forward over every running
//!   sequence (K passes for `per_modality_pass`);
//! - [`handle`]: the handle, its configuration, commands and snapshots;
//! - [`scheduler`]: the waiting queue, adapter admission, the step plan;
//! - [`sequence`]: one running request (sampling, streaming, guidance twin);
//! - [`cache_pool`]: KV caches lent to sequences;
//! - [`images`]: image codes to PNG;
//! - per-token logic: [`params`], [`modality`], [`sampler`], [`detok`].

mod admin;
pub mod cache_pool;
pub mod detok;
#[allow(clippy::module_inception)]
pub mod engine;
mod filters;
pub mod handle;
pub mod images;
pub mod modality;
pub mod params;
pub mod render;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod types;

pub use engine::Engine;
pub use handle::{
    AdapterCommand, AdapterInfo, AdapterReply, EngineConfig, EngineHandle, EngineStats,
    ModelAdapter, ModelInfo, VocabSummary,
};
pub use types::{
    AdapterRequest, Completion, FinishReason, InferEvent, Priority, RoutingStats, SubmitError,
    Usage, ValidRequest,
};
