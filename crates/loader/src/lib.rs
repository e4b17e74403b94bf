//! The tpde runtime loader: turns a container on SSD into ready-to-use
//! weights, in execution order, under a memory budget, as fast as the disk
//! allows ([`Loader`]); and the measurements around it ([`telemetry`]:
//! block-device counters, resident memory, the audit trail of the machine
//! and build).

pub mod bench;
pub mod stream;
pub mod telemetry;

pub use stream::{
    LoadOptions, LoadedStep, LoadedTensor, Loader, MemoryPlan, ReadPath, StageSeconds, Step,
    StepSet, StepStores, Stores, StreamReport,
};
