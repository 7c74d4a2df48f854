//! The engine: per-sequence generation logic (sampling, the modality state
//! machine, request parameters, streaming detokenisation).

pub mod detok;
mod filters;
pub mod modality;
pub mod params;
pub mod sampler;
