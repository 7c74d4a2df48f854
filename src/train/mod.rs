//! Training the demo model. [`data`] is the procedural world it learns from
//! and is evaluated on; everything there is deterministic from a seed.
//! [`presets`] sizes the stages, [`pipeline`] says what data each learns
//! from, [`stages`] and [`gate_train`] run them
//! (`molora train <stage>`, see [`cli`]), on the differentiable decoder of
//! [`decoder`] with the LoRA pairs of [`lora`], batches of [`batch`] and the
//! loop of [`looping`]; `train all` runs independent stages side by side
//! ([`schedule`], [`threads`]).

pub mod data;

pub mod batch;
pub mod cli;
pub mod decoder;
pub mod fused;
pub mod gate_train;
pub mod looping;
pub mod lora;
pub mod pipeline;
pub mod presets;
pub mod progress;
pub mod schedule;
pub mod stages;
pub mod threads;
pub mod vq_stages;
pub mod vq_train;

#[cfg(test)]
mod tests;
