//! tpde's CPU inference engine: Llama-family and Mixtral-style models
//! computed from a container's weights as the loader delivers them.

pub mod bench;
pub mod cache;
pub mod chat;
pub mod config;
pub mod generate;
pub mod kernels;
pub mod model;
/// The thread team of the forward pass (its own crate: the expert reader
/// uses it too).
pub use tpde_team as team;
pub mod tokenizer;
