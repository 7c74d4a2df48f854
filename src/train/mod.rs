//! Training the demo model. [`data`] is the procedural world it learns from
//! and is evaluated on; everything there is deterministic from a seed.

pub mod data;

pub mod vq_train;
