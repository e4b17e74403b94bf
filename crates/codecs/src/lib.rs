//! tpde codecs: the hot-tier quantizers (`q4`, `q8`), the exact bit-pattern
//! residual of the cold tier (`exact-v1`), and bounded zstd framing; and
//! [`ggml`], the dequantizers of GGUF's ggml block types.
//!
//! Every fast path here has a plain reference beside it
//! ([`base::quantize_reference`], [`residual::encode_reference`],
//! [`residual::decode_reference`]) and tests that hold them bit-identical.
//!
//! ```
//! use tpde_codecs::{base, residual, BaseCodec, BaseLayout, FloatDtype};
//! let vals: Vec<u8> = [0.5f32, -1.25, 3.0, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
//! let layout = BaseLayout { codec: BaseCodec::Q4, group: 64, cols: 4 };
//! let mut hot = vec![0u8; layout.row_bytes()];
//! base::quantize(FloatDtype::F32, &layout, &vals, &mut hot);
//! let cold = residual::encode(FloatDtype::F32, &layout, &vals, &hot, 3, residual::Kind::CURRENT).unwrap();
//! let mut back = vec![0u8; vals.len()];
//! residual::decode(FloatDtype::F32, &layout, &hot, &cold, &mut back, residual::Kind::CURRENT).unwrap();
//! assert_eq!(back, vals); // bit-exact, NaN included
//! ```

pub mod base;
pub mod float;
pub mod ggml;
pub mod rans;
pub mod residual;

pub use float::FloatDtype;
pub use tpde_format::{BaseCodec, BaseLayout};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("{0}")]
    Shape(String),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
}

/// xxh3-64 of a byte slice: the checksum of every stored chunk.
#[inline]
pub fn xxh3(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}
