//! Which adapters serve which token: the vocabulary-range router (by token
//! id, from the model's vocabulary layout), the learned gate, and the routing
//! plan they produce for each layer of a forward.

pub mod gate;
pub mod mode;
pub mod plan;
pub mod router;
