//! Integration tests of the `tpde` binary and pipelines: one test binary,
//! modules by topic, helpers in `util.rs`.

mod util;

mod bad_container;
mod bad_safetensors;
mod cli;
mod engine;
mod faults;
mod gguf;
mod loader;
mod moe;
mod real_fixtures;
mod roundtrip;
