//! Hardened readers for the model files that tpde packs: each one turns
//! untrusted bytes into validated metadata or one precise error, checking
//! every length against named limits and the file size before allocating.
//!
//! Inside:
//!
//! - [`safetensors`]: the safetensors header reader ([`safetensors::read_header`]),
//!   which keeps the raw header bytes for a byte-identical unpack.
//!
//! A GGUF reader will join it here.

pub mod safetensors;
