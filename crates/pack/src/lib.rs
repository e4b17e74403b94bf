//! tpde pipelines: `pack` (source → container), `verify` (every checksum,
//! every digest, every byte rebuilt), `unpack` (container → the original
//! files, byte-identical) and `inspect` (what is inside).
//!
//! Pack, verify and unpack are streaming and parallel: work is cut into
//! chunks of at most a few MiB, run on worker threads with a bounded number
//! in flight, and committed in order. Peak memory is a constant plus those
//! chunks, whatever the model size. Outputs are atomic (see [`atomic`]).
//!
//! ```no_run
//! use tpde_pack::{pack, verify, NoProgress, PackOptions};
//! let s = pack::pack("model.safetensors".as_ref(), "model.tpde".as_ref(), &PackOptions::default(), &NoProgress)?;
//! println!("{} → {} bytes", s.original_bytes, s.container_bytes);
//! verify("model.tpde".as_ref(), Some("model.safetensors".as_ref()), &NoProgress)?;
//! # Ok::<(), tpde_pack::Error>(())
//! ```

pub mod atomic;
pub mod container;
mod digest;
mod error;
pub mod extract;
pub mod inspect;
pub mod pack;
mod pipeline;
pub mod restore;
pub mod source;

pub use container::Container;
pub use error::{Error, Result};
pub use extract::{extract_expert, ExpertReader, ExtractedTensor, Fidelity};
pub use inspect::{inspect, Inspection};
pub use pack::{PackOptions, PackSummary};
pub use restore::{unpack, verify, verify_with, UnpackReport, VerifyOptions, VerifyReport};

/// Progress reporting, so that libraries never depend on a terminal UI.
/// Calls come from one thread at a time.
pub trait Progress: Sync {
    fn begin(&self, _label: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {}
}

/// Reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}
