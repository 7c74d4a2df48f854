//! Which adapters serve which token: the vocabulary-range router, the learned
//! gate, and the routing plan they produce for each forward.

pub mod plan;
