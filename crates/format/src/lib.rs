//! The tpde container format, version 1: constants, the fixed header and
//! footer, the manifest, and their validation. No I/O policy, no CLI, no
//! parallelism: this crate reads `&[u8]` and writes `Vec<u8>`.
//!
//! The normative description is `formats/tpde-v1.md`; every constant there
//! is defined here under the same name.
//!
//! ```
//! use tpde_format::{Header, HEADER_LEN};
//! let h = Header { version: tpde_format::FORMAT_VERSION, manifest_offset: 4096, manifest_len: 10, manifest_blake3: [0; 32] };
//! let bytes = h.encode();
//! assert_eq!(bytes.len(), HEADER_LEN);
//! assert_eq!(Header::decode(&bytes).unwrap(), h);
//! ```
//!
//! Reading a container is: [`Header::decode`] the first [`HEADER_LEN`]
//! bytes, [`Footer::decode`] the last [`FOOTER_LEN`] bytes, check they agree
//! ([`check_header_footer`]), read the manifest bytes, check their blake3, then
//! [`Manifest::parse`], which validates every offset, length and reference
//! against the file length before anything else is read.

pub mod ggml;
mod manifest;

pub use manifest::*;

use thiserror::Error;

/// First 8 bytes of every container.
pub const MAGIC: [u8; 8] = *b"\x89TPDE\r\n\x1a";
/// Last 8 bytes of every container.
pub const FOOTER_MAGIC: [u8; 8] = *b"TPDEEND\n";
/// The format version this crate writes.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format version this crate reads. Version 2 added GGUF
/// source files and ggml tensor types, version 3 expert shards (one
/// section per layer and expert of a mixture-of-experts model), version 4
/// the `exact-v2` residual (split streams); a container of an older
/// version is a valid container of a newer one that uses none of the
/// additions.
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Length of the fixed footer.
pub const FOOTER_LEN: usize = 64;
/// Alignment of every section start and of the manifest (for direct I/O).
pub const SECTION_ALIGN: u64 = 4096;
/// Offset of the first section: the header region is padded with zeros to here.
pub const FIRST_SECTION_OFFSET: u64 = SECTION_ALIGN;
/// Largest manifest accepted.
pub const MAX_MANIFEST_LEN: u64 = 256 << 20;
/// Largest decoded length of one chunk (raw or decompressed).
pub const MAX_CHUNK_LEN: u64 = 256 << 20;
/// Most tensors in one container.
pub const MAX_TENSORS: usize = 1 << 20;
/// Most source files in one container.
pub const MAX_FILES: usize = 1 << 16;
/// Most sections in one container.
pub const MAX_SECTIONS: usize = 1 << 16;
/// Most dimensions of one tensor.
pub const MAX_DIMS: usize = 8;
/// Longest tensor name, in bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Longest relative source path, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Largest zstd window a decoder must accept (log2).
pub const MAX_ZSTD_WINDOW_LOG: u32 = 27;
/// Longest section name or `created_by` label, in bytes.
pub const MAX_LABEL_LEN: usize = 256;

/// Everything that can be wrong with a container's structure.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("file is {len} bytes, too short to be a tpde container (at least {min})")]
    TooShort { len: u64, min: u64 },
    #[error("not a tpde container (bad magic)")]
    BadMagic,
    #[error("unsupported container version {0} (this build reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("unknown header flags {0:#x}")]
    UnknownFlags(u32),
    #[error("bad footer magic (container truncated or not a tpde container)")]
    BadFooterMagic,
    #[error("footer records file length {recorded} but the file is {actual} bytes")]
    FileLenMismatch { recorded: u64, actual: u64 },
    #[error("header and footer disagree on the manifest location or digest")]
    HeaderFooterMismatch,
    #[error("manifest at {offset}+{len} does not end where the footer begins ({footer_at})")]
    ManifestPlacement {
        offset: u64,
        len: u64,
        footer_at: u64,
    },
    #[error("manifest length {0} exceeds the limit {MAX_MANIFEST_LEN}")]
    ManifestTooLarge(u64),
    #[error("manifest is not valid JSON: {0}")]
    ManifestJson(String),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("non-zero byte in padding at offset {0}")]
    NonZeroPadding(u64),
}

/// The fixed 64-byte header at offset 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version ([`OLDEST_READABLE_VERSION`]..=[`FORMAT_VERSION`]).
    pub version: u32,
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub manifest_blake3: [u8; 32],
}

impl Header {
    /// Serializes: magic, version u32, flags u32 (0), manifest offset u64,
    /// manifest length u64, manifest blake3 (32 bytes).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&0u32.to_le_bytes());
        b[16..24].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[32..64].copy_from_slice(&self.manifest_blake3);
        b
    }

    /// Parses and checks magic, version and flags.
    pub fn decode(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < HEADER_LEN {
            return Err(FormatError::TooShort {
                len: b.len() as u64,
                min: HEADER_LEN as u64,
            });
        }
        if b[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = le_u32(&b[8..12]);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let flags = le_u32(&b[12..16]);
        if flags != 0 {
            return Err(FormatError::UnknownFlags(flags));
        }
        Ok(Header {
            version,
            manifest_offset: le_u64(&b[16..24]),
            manifest_len: le_u64(&b[24..32]),
            manifest_blake3: b[32..64].try_into().expect("32 bytes"),
        })
    }
}

/// The fixed 64-byte footer at the end of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub manifest_blake3: [u8; 32],
    pub file_len: u64,
}

impl Footer {
    /// Serializes: manifest offset u64, manifest length u64, manifest blake3
    /// (32 bytes), file length u64, footer magic.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[16..48].copy_from_slice(&self.manifest_blake3);
        b[48..56].copy_from_slice(&self.file_len.to_le_bytes());
        b[56..64].copy_from_slice(&FOOTER_MAGIC);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Footer, FormatError> {
        if b.len() != FOOTER_LEN {
            return Err(FormatError::TooShort {
                len: b.len() as u64,
                min: FOOTER_LEN as u64,
            });
        }
        if b[56..64] != FOOTER_MAGIC {
            return Err(FormatError::BadFooterMagic);
        }
        Ok(Footer {
            manifest_offset: le_u64(&b[0..8]),
            manifest_len: le_u64(&b[8..16]),
            manifest_blake3: b[16..48].try_into().expect("32 bytes"),
            file_len: le_u64(&b[48..56]),
        })
    }
}

/// Smallest possible container: header region, manifest of at least 2 bytes, footer.
pub const MIN_CONTAINER_LEN: u64 = FIRST_SECTION_OFFSET + 2 + FOOTER_LEN as u64;

/// Checks that header and footer agree with each other and with the file
/// length, and that the manifest sits aligned right before the footer.
pub fn check_header_footer(h: &Header, f: &Footer, file_len: u64) -> Result<(), FormatError> {
    if file_len < MIN_CONTAINER_LEN {
        return Err(FormatError::TooShort {
            len: file_len,
            min: MIN_CONTAINER_LEN,
        });
    }
    if f.file_len != file_len {
        return Err(FormatError::FileLenMismatch {
            recorded: f.file_len,
            actual: file_len,
        });
    }
    if h.manifest_offset != f.manifest_offset
        || h.manifest_len != f.manifest_len
        || h.manifest_blake3 != f.manifest_blake3
    {
        return Err(FormatError::HeaderFooterMismatch);
    }
    if h.manifest_len > MAX_MANIFEST_LEN {
        return Err(FormatError::ManifestTooLarge(h.manifest_len));
    }
    let footer_at = file_len - FOOTER_LEN as u64;
    let placed = h.manifest_offset >= FIRST_SECTION_OFFSET
        && h.manifest_offset.is_multiple_of(SECTION_ALIGN)
        && h.manifest_offset.checked_add(h.manifest_len) == Some(footer_at);
    if !placed {
        return Err(FormatError::ManifestPlacement {
            offset: h.manifest_offset,
            len: h.manifest_len,
            footer_at,
        });
    }
    Ok(())
}

/// Rounds `x` up to a multiple of [`SECTION_ALIGN`].
pub fn align_up(x: u64) -> Option<u64> {
    x.checked_add(SECTION_ALIGN - 1)
        .map(|v| v / SECTION_ALIGN * SECTION_ALIGN)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Header, Footer) {
        let h = Header {
            version: FORMAT_VERSION,
            manifest_offset: 8192,
            manifest_len: 100,
            manifest_blake3: [7; 32],
        };
        let f = Footer {
            manifest_offset: 8192,
            manifest_len: 100,
            manifest_blake3: [7; 32],
            file_len: 8192 + 100 + 64,
        };
        (h, f)
    }

    #[test]
    fn header_and_footer_round_trip() {
        let (h, f) = pair();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        assert_eq!(Footer::decode(&f.encode()).unwrap(), f);
        check_header_footer(&h, &f, f.file_len).unwrap();
    }

    #[test]
    fn header_rejections_are_specific() {
        let (h, _) = pair();
        let mut b = h.encode();
        b[0] ^= 1;
        assert_eq!(Header::decode(&b), Err(FormatError::BadMagic));
        let mut b = h.encode();
        b[8] = FORMAT_VERSION as u8 + 1;
        assert_eq!(
            Header::decode(&b),
            Err(FormatError::UnsupportedVersion(FORMAT_VERSION + 1))
        );
        let mut b = h.encode();
        b[8] = 1;
        assert_eq!(
            Header::decode(&b).unwrap().version,
            1,
            "version 1 still reads"
        );
        let mut b = h.encode();
        b[8] = 0;
        assert_eq!(Header::decode(&b), Err(FormatError::UnsupportedVersion(0)));
        let mut b = h.encode();
        b[13] = 1;
        assert_eq!(Header::decode(&b), Err(FormatError::UnknownFlags(0x100)));
        assert!(matches!(
            Header::decode(&b[..10]),
            Err(FormatError::TooShort { .. })
        ));
    }

    #[test]
    fn footer_rejections_are_specific() {
        let (h, f) = pair();
        let mut b = f.encode();
        b[63] ^= 1;
        assert_eq!(Footer::decode(&b), Err(FormatError::BadFooterMagic));
        assert!(matches!(
            check_header_footer(&h, &f, f.file_len + 1),
            Err(FormatError::FileLenMismatch { .. })
        ));
        let mut h2 = h.clone();
        h2.manifest_blake3[0] = 0;
        assert_eq!(
            check_header_footer(&h2, &f, f.file_len),
            Err(FormatError::HeaderFooterMismatch)
        );
        let mut h3 = h.clone();
        let mut f3 = f.clone();
        h3.manifest_offset = u64::MAX - 10;
        f3.manifest_offset = u64::MAX - 10;
        assert!(matches!(
            check_header_footer(&h3, &f3, f.file_len),
            Err(FormatError::ManifestPlacement { .. })
        ));
        let mut h4 = h.clone();
        let mut f4 = f.clone();
        h4.manifest_len = MAX_MANIFEST_LEN + 1;
        f4.manifest_len = MAX_MANIFEST_LEN + 1;
        assert!(matches!(
            check_header_footer(&h4, &f4, f.file_len),
            Err(FormatError::ManifestTooLarge(_))
        ));
        for len in [0, 10, 63, 64] {
            let mut f5 = f.clone();
            f5.file_len = len;
            assert!(matches!(
                check_header_footer(&h, &f5, len),
                Err(FormatError::TooShort { .. })
            ));
        }
    }
}
