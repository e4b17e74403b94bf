//! Hardened readers for the model files that tpde packs: each one turns
//! untrusted bytes into validated metadata or one precise error, checking
//! every length against named limits and the file size before allocating.
//!
//! Inside:
//!
//! - [`safetensors`]: the safetensors header reader ([`safetensors::read_header`]),
//!   which keeps the raw header bytes for a byte-identical unpack.
//! - [`gguf`]: the GGUF (llama.cpp) header reader ([`gguf::read_header`]),
//!   which validates key/values, tensor infos and the tensor data layout and
//!   also keeps the raw header bytes.
//! - [`moe`]: recognises the routed experts of mixture-of-experts models from
//!   tensor names and shapes ([`moe::classify`], [`moe::plan`]).
//!
//! Both readers are our own rather than the `safetensors` and `gguf-rs`
//! crates: tpde needs the raw header bytes for byte-identical restores, one
//! error variant per rejection reason, and (for GGUF) limits that `gguf-rs`
//! does not enforce (it allocates strings before checking their length,
//! panics on unknown type ids, and lets duplicate keys overwrite each other).
//! The module docs give the details. Fuzz targets for both are in `fuzz/`.

pub mod gguf;
pub mod moe;
mod read;
pub mod safetensors;
