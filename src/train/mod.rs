//! Training: procedural data and the training loops of each stage.

pub mod vq_train;
