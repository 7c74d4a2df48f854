//! CPU kernels for the routed linear (placeholder: delegates to the generic path).

pub use super::generic::routed_linear;
