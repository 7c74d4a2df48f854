//! The engine: per-sequence generation logic (sampling, the modality state
//! machine, request parameters, streaming detokenisation) and the plain
//! types it exchanges with the HTTP layer. The engine thread, scheduler and
//! server that use them are in progress (issue 4).

pub mod detok;
mod filters;
pub mod modality;
pub mod params;
pub mod sampler;
pub mod types;
