//! The unified-vocabulary decoder (Chameleon layout), its KV cache, and the
//! model directory's config.

pub mod config;
pub mod vq;
