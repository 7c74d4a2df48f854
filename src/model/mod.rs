//! The unified-vocabulary decoder (Chameleon layout), its KV cache, the
//! tokenizer, and the model directory's config.

pub mod attention;
pub mod config;
pub mod config_compat;
pub mod decoder;
pub mod kv_cache;
mod lanes;
pub mod mlp;
pub mod norms;
pub mod tokenizer;
pub mod vq;
pub mod weights;

#[cfg(test)]
mod lanes_tests;
