//! molora: multimodal generation with per-token adapter routing.
//!
//! Layering, each module talking only to its neighbour:
//! `server` -> `engine` -> `routing` + `model` -> `dispatch` + `adapters`.

pub mod adapters;
pub mod batch;
pub mod bench;
pub mod convert_vqgan;
pub mod dispatch;
pub mod engine;
pub mod eval;
pub mod model;
pub mod random_model;
pub mod routing;
pub mod server;
pub mod train;
