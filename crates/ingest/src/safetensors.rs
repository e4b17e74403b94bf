//! A hardened reader for the header of a safetensors file: it turns the first
//! `8 + N` bytes of a file into a validated [`Header`] or one precise
//! [`SafetensorsError`].
//!
//! ```
//! use tpde_ingest::safetensors::{read_header, Dtype};
//!
//! // A file holding one F32 tensor of shape [2] (8 data bytes).
//! let json = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
//! let mut file = (json.len() as u64).to_le_bytes().to_vec();
//! file.extend_from_slice(json);
//! file.extend_from_slice(&[0u8; 8]);
//!
//! let (header, raw) = read_header(&file[..], file.len() as u64).unwrap();
//! assert_eq!(raw, &file[..8 + json.len()]);
//! assert_eq!(header.data_start, 8 + json.len() as u64);
//! assert_eq!(header.tensors[0].name, "w");
//! assert_eq!(header.tensors[0].dtype, Dtype::F32);
//! assert_eq!(header.tensors[0].byte_len(), 8);
//! ```
//!
//! # Format
//!
//! A safetensors file is an 8-byte little-endian `u64` `N`, then `N` bytes of
//! UTF-8 JSON (possibly padded with trailing spaces), then the data region
//! `[8 + N, file_len)`. The JSON object maps each tensor name to
//! `{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}` (offsets
//! relative to the data region) and may hold one `"__metadata__"` object of
//! string to string.
//!
//! # What is checked
//!
//! Every length is compared with a named limit and with the file length
//! before anything is allocated, every size is computed with checked
//! arithmetic, and every byte of the data region must belong to exactly one
//! tensor (no gap, no overlap, nothing after the last tensor). The limits:
//!
//! - [`MAX_HEADER_LEN`]: the JSON header is at most 100 MB (as upstream);
//! - [`MAX_JSON_DEPTH`]: nesting is checked on the raw bytes before any JSON
//!   parsing, so a header of 100 000 `[` cannot exhaust the stack;
//! - [`MAX_TENSORS`], [`MAX_DIMS`], [`MAX_NAME_LEN`]: tensor count, shape
//!   rank and tensor-name length.
//!
//! Entries are read with "deny unknown fields" semantics, and duplicate tensor
//! names, duplicate fields, duplicate `"__metadata__"` entries and duplicate
//! metadata keys are errors rather than "last one wins".
//!
//! # Why our own reader
//!
//! The `safetensors` crate is used only as a cross-check in tests. tpde needs
//! the exact raw header bytes for a byte-identical unpack, one precise error
//! per rejection reason (upstream folds many into `InvalidOffset` or a serde
//! message), duplicate-name detection (upstream deserializes into a
//! `HashMap`, which silently keeps the last duplicate), and a reader that
//! reads only the `8 + N` header bytes from a file instead of loading or
//! mapping the whole file.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{self, Read};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use thiserror::Error;

/// Largest accepted JSON header, in bytes (the same limit as upstream safetensors).
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Largest accepted number of tensors in one file.
pub const MAX_TENSORS: usize = 1 << 20;
/// Largest accepted number of dimensions of one tensor.
pub const MAX_DIMS: usize = 8;
/// Longest accepted tensor name, in bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Deepest accepted nesting of JSON arrays and objects (a valid header needs 3).
pub const MAX_JSON_DEPTH: usize = 16;

/// Length of the little-endian `u64` that opens every safetensors file.
const PREFIX_LEN: u64 = 8;
/// Longest user-controlled string (dtype, field name, metadata key) quoted in an error.
const PREVIEW_CHARS: usize = 64;

/// Element type of a tensor, spelled as in safetensors.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// Boolean, one byte per element.
    BOOL,
    /// MXFP4 (E2M1), 4 bits per element.
    F4,
    /// MXFP6 E2M3, 6 bits per element.
    F6_E2M3,
    /// MXFP6 E3M2, 6 bits per element.
    F6_E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// FP8 E5M2.
    F8_E5M2,
    /// FP8 E4M3.
    F8_E4M3,
    /// FP8 E8M0 (MX scale).
    F8_E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex number of two IEEE single-precision floats.
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl Dtype {
    /// Every dtype, in the order of the enum.
    pub const ALL: [Dtype; 20] = [
        Dtype::BOOL,
        Dtype::F4,
        Dtype::F6_E2M3,
        Dtype::F6_E3M2,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// The dtype with this exact safetensors spelling (case-sensitive).
    pub fn from_name(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == s)
    }

    /// The safetensors spelling of this dtype.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::F4 => "F4",
            Dtype::F6_E2M3 => "F6_E2M3",
            Dtype::F6_E3M2 => "F6_E3M2",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::C64 => "C64",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Size of one element in bits (`F4` is 4, the `F6_*` are 6, `C64` is 64).
    pub fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6_E2M3 | Dtype::F6_E3M2 => 6,
            Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8_E5M2
            | Dtype::F8_E4M3
            | Dtype::F8_E8M0 => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::C64 | Dtype::F64 | Dtype::I64 | Dtype::U64 => 64,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name, the JSON key.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first (empty for a scalar).
    pub shape: Vec<u64>,
    /// First byte, relative to the start of the data region.
    pub begin: u64,
    /// One past the last byte, relative to the start of the data region.
    pub end: u64,
}

impl TensorEntry {
    /// Length of the tensor's data in bytes (`end - begin`; 0 if `end < begin`,
    /// which a parsed header never has).
    pub fn byte_len(&self) -> u64 {
        self.end.saturating_sub(self.begin)
    }

    /// Number of elements (1 for a scalar). Never overflows for a parsed
    /// header; saturates at `u64::MAX` for a hand-built entry that would.
    pub fn numel(&self) -> u64 {
        checked_numel(&self.shape).unwrap_or(u64::MAX)
    }
}

/// A validated safetensors header.
#[derive(Clone, Debug)]
pub struct Header {
    /// `N`, the length of the JSON header (including any padding).
    pub header_len: u64,
    /// Absolute offset of the data region, `8 + N`.
    pub data_start: u64,
    /// Length of the whole file.
    pub file_len: u64,
    /// The `"__metadata__"` object, if present.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Every tensor, sorted by `begin` (the order of their data in the file).
    pub tensors: Vec<TensorEntry>,
}

impl Header {
    /// Length of the data region, `file_len - data_start`.
    pub fn data_len(&self) -> u64 {
        self.file_len.saturating_sub(self.data_start)
    }

    /// The tensor with this name, if any.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// The kind of a JSON value, for "expected X, found Y" errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonKind {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool,
    /// An integer below zero.
    NegativeInteger,
    /// A non-negative integer that fits in a `u64`.
    Integer,
    /// A number with a fraction or exponent, or an integer too large for a `u64`.
    OtherNumber,
    /// A string.
    String,
    /// An array.
    Array,
    /// An object.
    Object,
}

impl fmt::Display for JsonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JsonKind::Null => "null",
            JsonKind::Bool => "a boolean",
            JsonKind::NegativeInteger => "a negative integer",
            JsonKind::Integer => "an integer",
            JsonKind::OtherNumber => "a non-integer or out-of-range number",
            JsonKind::String => "a string",
            JsonKind::Array => "an array",
            JsonKind::Object => "an object",
        })
    }
}

/// Why a safetensors header was rejected: one variant per reason.
#[derive(Debug, Error)]
pub enum SafetensorsError {
    /// The file cannot even hold the 8-byte header length.
    #[error("file is {file_len} bytes, too short for the 8-byte header length prefix")]
    FileTooShort {
        /// Length of the file.
        file_len: u64,
    },
    /// The header length prefix is 0.
    #[error("header length is 0")]
    HeaderLenZero,
    /// The header length prefix is over [`MAX_HEADER_LEN`].
    #[error("header length {header_len} exceeds the limit of {max} bytes")]
    HeaderTooLarge {
        /// The header length read from the prefix.
        header_len: u64,
        /// The limit, [`MAX_HEADER_LEN`].
        max: u64,
    },
    /// `8 + N` is larger than the file.
    #[error("header length {header_len} (plus the 8-byte prefix) exceeds file size {file_len}")]
    HeaderPastEof {
        /// The header length read from the prefix.
        header_len: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The reader ended before the `8 + N` header bytes that the file length promised.
    #[error("file ended after {got} of the {needed} bytes of the prefix and header")]
    UnexpectedEof {
        /// Bytes needed, `8 + N` (or 8 while reading the prefix).
        needed: u64,
        /// Bytes actually read.
        got: u64,
    },
    /// The header bytes are not UTF-8.
    #[error("header is not utf-8: invalid byte at header offset {offset}")]
    HeaderNotUtf8 {
        /// Offset of the first invalid byte within the header.
        offset: u64,
    },
    /// JSON arrays and objects nest deeper than [`MAX_JSON_DEPTH`].
    #[error("header json nests deeper than {max} levels at header offset {offset}")]
    JsonTooDeep {
        /// Offset of the bracket that went one level too deep.
        offset: u64,
        /// The limit, [`MAX_JSON_DEPTH`].
        max: usize,
    },
    /// The header is not well-formed JSON.
    #[error("header is not valid json: {message}")]
    InvalidJson {
        /// Line of the error within the header (1-based).
        line: usize,
        /// Column of the error within the header (1-based).
        column: usize,
        /// The JSON parser's description, including line and column.
        message: String,
    },
    /// The header is valid JSON but not an object.
    #[error("header json must be an object, found {found}")]
    HeaderNotObject {
        /// What was found instead.
        found: JsonKind,
    },
    /// Two entries have the same tensor name.
    #[error("duplicate tensor name {name:?}")]
    DuplicateTensorName {
        /// The repeated name.
        name: String,
    },
    /// `"__metadata__"` appears more than once.
    #[error("duplicate \"__metadata__\" entry")]
    DuplicateMetadata,
    /// `"__metadata__"` is not an object.
    #[error("\"__metadata__\" must be an object, found {found}")]
    MetadataNotObject {
        /// What was found instead.
        found: JsonKind,
    },
    /// A `"__metadata__"` value is not a string.
    #[error("\"__metadata__\" value for key {key:?} must be a string, found {found}")]
    MetadataValueNotString {
        /// The key (at most 64 characters of it).
        key: String,
        /// What was found instead.
        found: JsonKind,
    },
    /// A key appears twice in `"__metadata__"`.
    #[error("duplicate \"__metadata__\" key {key:?}")]
    DuplicateMetadataKey {
        /// The key (at most 64 characters of it).
        key: String,
    },
    /// A tensor name is the empty string.
    #[error("tensor name is empty")]
    EmptyTensorName,
    /// A tensor name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("tensor name {prefix:?}... is {len} bytes, longer than the limit of {max}")]
    TensorNameTooLong {
        /// The first 64 characters of the name.
        prefix: String,
        /// Length of the name in bytes.
        len: usize,
        /// The limit, [`MAX_NAME_LEN`].
        max: usize,
    },
    /// More than [`MAX_TENSORS`] tensors.
    #[error("header has more than {max} tensors")]
    TooManyTensors {
        /// The limit, [`MAX_TENSORS`].
        max: usize,
    },
    /// A tensor entry is not a JSON object.
    #[error("tensor {name:?}: entry must be an object, found {found}")]
    EntryNotObject {
        /// Tensor name.
        name: String,
        /// What was found instead.
        found: JsonKind,
    },
    /// A tensor entry has a field other than `dtype`, `shape`, `data_offsets`.
    #[error("tensor {name:?}: unknown field {field:?}")]
    UnknownField {
        /// Tensor name.
        name: String,
        /// The field (at most 64 characters of it).
        field: String,
    },
    /// A tensor entry has the same field twice.
    #[error("tensor {name:?}: duplicate field {field:?}")]
    DuplicateField {
        /// Tensor name.
        name: String,
        /// The repeated field.
        field: &'static str,
    },
    /// A tensor entry lacks a required field.
    #[error("tensor {name:?}: missing field {field:?}")]
    MissingField {
        /// Tensor name.
        name: String,
        /// The missing field.
        field: &'static str,
    },
    /// `dtype` is not a string.
    #[error("tensor {name:?}: dtype must be a string, found {found}")]
    DtypeNotString {
        /// Tensor name.
        name: String,
        /// What was found instead.
        found: JsonKind,
    },
    /// `dtype` is not one of the [`Dtype`] spellings.
    #[error("tensor {name:?}: unknown dtype {dtype:?}")]
    UnknownDtype {
        /// Tensor name.
        name: String,
        /// The dtype string (at most 64 characters of it).
        dtype: String,
    },
    /// `shape` is not an array.
    #[error("tensor {name:?}: shape must be an array, found {found}")]
    ShapeNotArray {
        /// Tensor name.
        name: String,
        /// What was found instead.
        found: JsonKind,
    },
    /// `shape` has more than [`MAX_DIMS`] dimensions.
    #[error("tensor {name:?}: shape has {dims} dimensions, more than the limit of {max}")]
    TooManyDims {
        /// Tensor name.
        name: String,
        /// Number of dimensions found.
        dims: u64,
        /// The limit, [`MAX_DIMS`].
        max: usize,
    },
    /// A `shape` dimension is not a non-negative integer that fits in a `u64`.
    #[error("tensor {name:?}: shape[{index}] must be a non-negative integer, found {found}")]
    ShapeDimNotInteger {
        /// Tensor name.
        name: String,
        /// Position of the dimension.
        index: usize,
        /// What was found instead.
        found: JsonKind,
    },
    /// `data_offsets` is not an array.
    #[error("tensor {name:?}: data_offsets must be an array, found {found}")]
    DataOffsetsNotArray {
        /// Tensor name.
        name: String,
        /// What was found instead.
        found: JsonKind,
    },
    /// `data_offsets` does not have exactly two elements.
    #[error("tensor {name:?}: data_offsets must have 2 elements, found {count}")]
    DataOffsetsCount {
        /// Tensor name.
        name: String,
        /// Number of elements found.
        count: u64,
    },
    /// A `data_offsets` element is not a non-negative integer that fits in a `u64`.
    #[error(
        "tensor {name:?}: data_offsets[{index}] must be a non-negative integer, found {found}"
    )]
    DataOffsetNotInteger {
        /// Tensor name.
        name: String,
        /// Position of the element (0 or 1).
        index: usize,
        /// What was found instead.
        found: JsonKind,
    },
    /// `data_offsets` end is before its begin.
    #[error("tensor {name:?}: data_offsets end {end} < begin {begin}")]
    OffsetsReversed {
        /// Tensor name.
        name: String,
        /// Declared begin.
        begin: u64,
        /// Declared end.
        end: u64,
    },
    /// The element count, or the size in bits, overflows a `u64`.
    #[error("tensor {name:?}: size of {dtype} {shape:?} overflows u64")]
    SizeOverflow {
        /// Tensor name.
        name: String,
        /// Element type.
        dtype: Dtype,
        /// Declared shape.
        shape: Vec<u64>,
    },
    /// A sub-byte dtype whose total bit count is not a whole number of bytes.
    #[error("tensor {name:?}: {numel} elements of {dtype} are not a whole number of bytes")]
    PartialByte {
        /// Tensor name.
        name: String,
        /// Element type.
        dtype: Dtype,
        /// Number of elements.
        numel: u64,
    },
    /// `end - begin` differs from the size implied by dtype and shape.
    #[error(
        "tensor {name:?}: data_offsets span {got} bytes but {dtype} {shape:?} needs {expected}"
    )]
    SizeMismatch {
        /// Tensor name.
        name: String,
        /// Element type.
        dtype: Dtype,
        /// Declared shape.
        shape: Vec<u64>,
        /// Size implied by dtype and shape, in bytes.
        expected: u64,
        /// `end - begin`.
        got: u64,
    },
    /// Bytes of the data region before this tensor belong to no tensor.
    #[error(
        "tensor {name:?}: begins at data offset {begin}, leaving a gap after offset {expected}"
    )]
    DataGap {
        /// Tensor name.
        name: String,
        /// Declared begin.
        begin: u64,
        /// Where the previous tensor ended (0 for the first tensor).
        expected: u64,
    },
    /// This tensor starts inside the previous one (in file order).
    #[error(
        "tensor {name:?}: begins at data offset {begin}, inside tensor {previous:?} which ends at {previous_end}"
    )]
    Overlap {
        /// Tensor name.
        name: String,
        /// Declared begin.
        begin: u64,
        /// Name of the tensor it overlaps.
        previous: String,
        /// End of that tensor.
        previous_end: u64,
    },
    /// This tensor ends past the end of the file.
    #[error("tensor {name:?}: data_offsets end {end} is past the end of the {data_len}-byte data region")]
    PastEndOfFile {
        /// Tensor name.
        name: String,
        /// Declared end.
        end: u64,
        /// Length of the data region, `file_len - 8 - N`.
        data_len: u64,
    },
    /// The data region continues after the last tensor.
    #[error("data region is {data_len} bytes but the tensors cover only {covered}, leaving trailing bytes")]
    TrailingBytes {
        /// Bytes covered by tensors (the end of the last one).
        covered: u64,
        /// Length of the data region.
        data_len: u64,
    },
    /// Reading the file failed.
    #[error("i/o error while reading the header: {0}")]
    Io(#[from] io::Error),
}

/// Validates the 8-byte prefix against the file length; returns N.
pub fn header_len(prefix: [u8; 8], file_len: u64) -> Result<u64, SafetensorsError> {
    let n = u64::from_le_bytes(prefix);
    check_header_len(n, file_len)?;
    Ok(n)
}

/// Parses and validates the JSON header bytes (exactly N bytes) for a file of `file_len` bytes.
pub fn parse_header(json: &[u8], file_len: u64) -> Result<Header, SafetensorsError> {
    let header_len = u64::try_from(json.len()).unwrap_or(u64::MAX);
    let data_start = check_header_len(header_len, file_len)?;
    // `check_header_len` guarantees `data_start <= file_len`.
    let data_len = file_len - data_start;

    let text = std::str::from_utf8(json).map_err(|e| SafetensorsError::HeaderNotUtf8 {
        offset: e.valid_up_to() as u64,
    })?;
    check_depth(json)?;
    let parsed = parse_json(text)?;
    let tensors = check_tiling(parsed.tensors, data_len)?;
    Ok(Header {
        header_len,
        data_start,
        file_len,
        metadata: parsed.metadata,
        tensors,
    })
}

/// Reads and validates a header from a reader positioned at the file start.
///
/// Reads `8 + N` bytes only, never more, and allocates `N` only after `N`
/// was checked against [`MAX_HEADER_LEN`] and `file_len`. Returns the header
/// and the raw bytes `[0, 8 + N)` exactly as they are in the file.
pub fn read_header<R: Read>(
    mut reader: R,
    file_len: u64,
) -> Result<(Header, Vec<u8>), SafetensorsError> {
    if file_len < PREFIX_LEN {
        return Err(SafetensorsError::FileTooShort { file_len });
    }
    let mut prefix = [0u8; 8];
    let got = read_until_full_or_eof(&mut reader, &mut prefix)?;
    if got < prefix.len() {
        return Err(SafetensorsError::UnexpectedEof {
            needed: PREFIX_LEN,
            got: got as u64,
        });
    }
    let n = header_len(prefix, file_len)?;
    // n <= MAX_HEADER_LEN, so neither conversion nor addition can fail.
    let total = usize::try_from(PREFIX_LEN + n).map_err(|_| SafetensorsError::HeaderTooLarge {
        header_len: n,
        max: MAX_HEADER_LEN,
    })?;
    let mut raw = Vec::new();
    raw.try_reserve_exact(total).map_err(|e| {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("cannot allocate {total} bytes for the header: {e}"),
        )
    })?;
    raw.extend_from_slice(&prefix);
    raw.resize(total, 0);
    let json = &mut raw[prefix.len()..];
    let got = read_until_full_or_eof(&mut reader, json)?;
    if got < json.len() {
        return Err(SafetensorsError::UnexpectedEof {
            needed: PREFIX_LEN + n,
            got: PREFIX_LEN + got as u64,
        });
    }
    let header = parse_header(&raw[prefix.len()..], file_len)?;
    Ok((header, raw))
}

/// Checks `n` against zero, [`MAX_HEADER_LEN`] and the file; returns `8 + n`.
fn check_header_len(n: u64, file_len: u64) -> Result<u64, SafetensorsError> {
    if file_len < PREFIX_LEN {
        return Err(SafetensorsError::FileTooShort { file_len });
    }
    if n == 0 {
        return Err(SafetensorsError::HeaderLenZero);
    }
    if n > MAX_HEADER_LEN {
        return Err(SafetensorsError::HeaderTooLarge {
            header_len: n,
            max: MAX_HEADER_LEN,
        });
    }
    match PREFIX_LEN.checked_add(n) {
        Some(data_start) if data_start <= file_len => Ok(data_start),
        _ => Err(SafetensorsError::HeaderPastEof {
            header_len: n,
            file_len,
        }),
    }
}

use crate::read::read_until_full_or_eof;

/// Rejects JSON nesting deeper than [`MAX_JSON_DEPTH`], scanning the raw
/// bytes so that no recursive parser ever sees a deep document. Brackets
/// inside strings are skipped; malformed input is left to the JSON parser.
fn check_depth(json: &[u8]) -> Result<(), SafetensorsError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (offset, &byte) in json.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(SafetensorsError::JsonTooDeep {
                        offset: offset as u64,
                        max: MAX_JSON_DEPTH,
                    });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Product of the dimensions, `None` on overflow.
fn checked_numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// At most [`PREVIEW_CHARS`] characters of an untrusted string, for errors.
fn preview(s: &str) -> String {
    s.chars().take(PREVIEW_CHARS).collect()
}

/// Sorts the tensors into file order and checks that they tile `[0, data_len)`.
fn check_tiling(
    mut tensors: Vec<TensorEntry>,
    data_len: u64,
) -> Result<Vec<TensorEntry>, SafetensorsError> {
    // Stable: zero-length tensors at the same offset keep their JSON order.
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut covered = 0u64;
    let mut previous: Option<&TensorEntry> = None;
    for t in &tensors {
        if t.begin < covered {
            if let Some(p) = previous {
                return Err(SafetensorsError::Overlap {
                    name: t.name.clone(),
                    begin: t.begin,
                    previous: p.name.clone(),
                    previous_end: p.end,
                });
            }
        }
        if t.begin != covered {
            return Err(SafetensorsError::DataGap {
                name: t.name.clone(),
                begin: t.begin,
                expected: covered,
            });
        }
        if t.end > data_len {
            return Err(SafetensorsError::PastEndOfFile {
                name: t.name.clone(),
                end: t.end,
                data_len,
            });
        }
        covered = t.end;
        previous = Some(t);
    }
    if covered != data_len {
        return Err(SafetensorsError::TrailingBytes { covered, data_len });
    }
    Ok(tensors)
}

/// Validates one complete entry: offsets order, size arithmetic, size match.
fn check_entry(entry: TensorEntry) -> Result<TensorEntry, SafetensorsError> {
    if entry.end < entry.begin {
        return Err(SafetensorsError::OffsetsReversed {
            name: entry.name,
            begin: entry.begin,
            end: entry.end,
        });
    }
    let bits = checked_numel(&entry.shape).and_then(|n| n.checked_mul(entry.dtype.bits()));
    let Some(bits) = bits else {
        return Err(SafetensorsError::SizeOverflow {
            name: entry.name,
            dtype: entry.dtype,
            shape: entry.shape,
        });
    };
    // Upstream's rule: the total bit count must be a whole number of bytes.
    // (`u64::is_multiple_of` needs Rust 1.87; the workspace targets 1.80.)
    if bits & 7 != 0 {
        let numel = entry.numel();
        return Err(SafetensorsError::PartialByte {
            name: entry.name,
            dtype: entry.dtype,
            numel,
        });
    }
    let expected = bits / 8;
    let got = entry.end - entry.begin;
    if got != expected {
        return Err(SafetensorsError::SizeMismatch {
            name: entry.name,
            dtype: entry.dtype,
            shape: entry.shape,
            expected,
            got,
        });
    }
    Ok(entry)
}

// ---------------------------------------------------------------------------
// JSON layer.
//
// serde_json drives hand-written visitors so that duplicates are seen (no
// HashMap in between), unknown fields are refused, and nothing larger than
// the limits is ever collected. A visitor that rejects something stores the
// precise `SafetensorsError` in `Ctx` and returns a placeholder serde error to
// stop the parser; `parse_json` then returns the stored error. Errors that no
// visitor stored are JSON syntax errors.

/// Result of the JSON layer: metadata and individually valid entries.
struct ParsedJson {
    metadata: Option<BTreeMap<String, String>>,
    tensors: Vec<TensorEntry>,
}

/// Where a visitor leaves the precise reason for stopping the parser.
#[derive(Default)]
struct Ctx {
    error: RefCell<Option<SafetensorsError>>,
}

impl Ctx {
    /// Records `error` (the first one wins) and returns a serde error that stops parsing.
    fn fail<E: de::Error>(&self, error: SafetensorsError) -> E {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            *slot = Some(error);
        }
        E::custom("rejected by tpde safetensors validation")
    }
}

fn parse_json(text: &str) -> Result<ParsedJson, SafetensorsError> {
    let ctx = Ctx::default();
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = HeaderSeed { ctx: &ctx }
        .deserialize(&mut de)
        .and_then(|parsed| de.end().map(|()| parsed));
    match parsed {
        Ok(parsed) => Ok(parsed),
        Err(e) => Err(ctx
            .error
            .into_inner()
            .unwrap_or_else(|| SafetensorsError::InvalidJson {
                line: e.line(),
                column: e.column(),
                message: e.to_string().replace(['\n', '\r'], " "),
            })),
    }
}

/// Implements the `visit_*` methods of a `deserialize_any` visitor for JSON
/// kinds it does not accept, each one failing with `self.wrong_kind(kind)`.
macro_rules! reject_kinds {
    ($de:lifetime; $($kind:ident),* $(,)?) => { $( reject_kinds!(@one $de; $kind); )* };
    (@one $de:lifetime; Null) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(self.wrong_kind(JsonKind::Null))
        }
    };
    (@one $de:lifetime; Bool) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(self.wrong_kind(JsonKind::Bool))
        }
    };
    (@one $de:lifetime; Integers) => {
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Err(self.wrong_kind(if v < 0 { JsonKind::NegativeInteger } else { JsonKind::Integer }))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(self.wrong_kind(JsonKind::Integer))
        }
    };
    (@one $de:lifetime; OtherNumber) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(self.wrong_kind(JsonKind::OtherNumber))
        }
    };
    (@one $de:lifetime; String) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Err(self.wrong_kind(JsonKind::String))
        }
    };
    (@one $de:lifetime; Array) => {
        fn visit_seq<A: SeqAccess<$de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(self.wrong_kind(JsonKind::Array))
        }
    };
    (@one $de:lifetime; Object) => {
        fn visit_map<A: MapAccess<$de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(self.wrong_kind(JsonKind::Object))
        }
    };
}

/// The top-level object.
#[derive(Clone, Copy)]
struct HeaderSeed<'c> {
    ctx: &'c Ctx,
}

impl HeaderSeed<'_> {
    fn wrong_kind<E: de::Error>(self, found: JsonKind) -> E {
        self.ctx.fail(SafetensorsError::HeaderNotObject { found })
    }
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = ParsedJson;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ParsedJson, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed<'_> {
    type Value = ParsedJson;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    reject_kinds!('de; Null, Bool, Integers, OtherNumber, String, Array);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ParsedJson, A::Error> {
        let ctx = self.ctx;
        let mut metadata = None;
        let mut tensors = Vec::new();
        let mut names = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "__metadata__" {
                if metadata.is_some() {
                    return Err(ctx.fail(SafetensorsError::DuplicateMetadata));
                }
                metadata = Some(map.next_value_seed(MetadataSeed { ctx })?);
                continue;
            }
            if key.is_empty() {
                return Err(ctx.fail(SafetensorsError::EmptyTensorName));
            }
            if key.len() > MAX_NAME_LEN {
                return Err(ctx.fail(SafetensorsError::TensorNameTooLong {
                    prefix: preview(&key),
                    len: key.len(),
                    max: MAX_NAME_LEN,
                }));
            }
            if tensors.len() >= MAX_TENSORS {
                return Err(ctx.fail(SafetensorsError::TooManyTensors { max: MAX_TENSORS }));
            }
            if !names.insert(key.clone()) {
                return Err(ctx.fail(SafetensorsError::DuplicateTensorName { name: key }));
            }
            let entry = map.next_value_seed(EntrySeed { ctx, name: &key })?;
            tensors.push(check_entry(entry).map_err(|e| ctx.fail(e))?);
        }
        Ok(ParsedJson { metadata, tensors })
    }
}

/// The `"__metadata__"` object.
#[derive(Clone, Copy)]
struct MetadataSeed<'c> {
    ctx: &'c Ctx,
}

impl MetadataSeed<'_> {
    fn wrong_kind<E: de::Error>(self, found: JsonKind) -> E {
        self.ctx.fail(SafetensorsError::MetadataNotObject { found })
    }
}

impl<'de> DeserializeSeed<'de> for MetadataSeed<'_> {
    type Value = BTreeMap<String, String>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed<'_> {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of string to string")
    }

    reject_kinds!('de; Null, Bool, Integers, OtherNumber, String, Array);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(MetadataValueSeed {
                ctx: self.ctx,
                key: &key,
            })?;
            if out.contains_key(&key) {
                return Err(self
                    .ctx
                    .fail(SafetensorsError::DuplicateMetadataKey { key: preview(&key) }));
            }
            out.insert(key, value);
        }
        Ok(out)
    }
}

/// One `"__metadata__"` value, which must be a string.
#[derive(Clone, Copy)]
struct MetadataValueSeed<'c, 'k> {
    ctx: &'c Ctx,
    key: &'k str,
}

impl MetadataValueSeed<'_, '_> {
    fn wrong_kind<E: de::Error>(self, found: JsonKind) -> E {
        self.ctx.fail(SafetensorsError::MetadataValueNotString {
            key: preview(self.key),
            found,
        })
    }
}

impl<'de> DeserializeSeed<'de> for MetadataValueSeed<'_, '_> {
    type Value = String;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MetadataValueSeed<'_, '_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    reject_kinds!('de; Null, Bool, Integers, OtherNumber, Array, Object);

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
}

/// The fields of a tensor entry.
#[derive(Clone, Copy)]
enum Field {
    Dtype,
    Shape,
    DataOffsets,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Dtype => "dtype",
            Field::Shape => "shape",
            Field::DataOffsets => "data_offsets",
        }
    }
}

/// One tensor entry: `{"dtype", "shape", "data_offsets"}` and nothing else.
#[derive(Clone, Copy)]
struct EntrySeed<'c, 'n> {
    ctx: &'c Ctx,
    name: &'n str,
}

impl EntrySeed<'_, '_> {
    fn wrong_kind<E: de::Error>(self, found: JsonKind) -> E {
        self.ctx.fail(SafetensorsError::EntryNotObject {
            name: self.name.to_owned(),
            found,
        })
    }

    fn fail<E: de::Error>(self, error: SafetensorsError) -> E {
        self.ctx.fail(error)
    }
}

impl<'de> DeserializeSeed<'de> for EntrySeed<'_, '_> {
    type Value = TensorEntry;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<TensorEntry, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_, '_> {
    type Value = TensorEntry;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tensor entry object")
    }

    reject_kinds!('de; Null, Bool, Integers, OtherNumber, String, Array);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TensorEntry, A::Error> {
        let name = self.name;
        let mut dtype = None;
        let mut shape = None;
        let mut offsets = None;
        while let Some(key) = map.next_key::<String>()? {
            let field = match key.as_str() {
                "dtype" => Field::Dtype,
                "shape" => Field::Shape,
                "data_offsets" => Field::DataOffsets,
                _ => {
                    return Err(self.fail(SafetensorsError::UnknownField {
                        name: name.to_owned(),
                        field: preview(&key),
                    }))
                }
            };
            let already_seen = match field {
                Field::Dtype => dtype.is_some(),
                Field::Shape => shape.is_some(),
                Field::DataOffsets => offsets.is_some(),
            };
            if already_seen {
                return Err(self.fail(SafetensorsError::DuplicateField {
                    name: name.to_owned(),
                    field: field.name(),
                }));
            }
            let ctx = self.ctx;
            match field {
                Field::Dtype => dtype = Some(map.next_value_seed(DtypeSeed { ctx, name })?),
                Field::Shape => shape = Some(map.next_value_seed(ShapeSeed { ctx, name })?),
                Field::DataOffsets => {
                    offsets = Some(map.next_value_seed(OffsetsSeed { ctx, name })?)
                }
            }
        }
        let missing = |field: Field| {
            self.fail(SafetensorsError::MissingField {
                name: name.to_owned(),
                field: field.name(),
            })
        };
        let dtype = dtype.ok_or_else(|| missing(Field::Dtype))?;
        let shape = shape.ok_or_else(|| missing(Field::Shape))?;
        let (begin, end) = offsets.ok_or_else(|| missing(Field::DataOffsets))?;
        Ok(TensorEntry {
            name: name.to_owned(),
            dtype,
            shape,
            begin,
            end,
        })
    }
}

/// The `dtype` string.
#[derive(Clone, Copy)]
struct DtypeSeed<'c, 'n> {
    ctx: &'c Ctx,
    name: &'n str,
}

impl DtypeSeed<'_, '_> {
    fn wrong_kind<E: de::Error>(self, found: JsonKind) -> E {
        self.ctx.fail(SafetensorsError::DtypeNotString {
            name: self.name.to_owned(),
            found,
        })
    }
}

impl<'de> DeserializeSeed<'de> for DtypeSeed<'_, '_> {
    type Value = Dtype;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Dtype, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DtypeSeed<'_, '_> {
    type Value = Dtype;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a dtype string")
    }

    reject_kinds!('de; Null, Bool, Integers, OtherNumber, Array, Object);

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Dtype, E> {
        Dtype::from_name(v).ok_or_else(|| {
            self.ctx.fail(SafetensorsError::UnknownDtype {
                name: self.name.to_owned(),
                dtype: preview(v),
            })
        })
    }
}

/// Which integer array an [`IntSeed`] element belongs to.
#[derive(Clone, Copy)]
enum IntArray {
    Shape,
    DataOffsets,
}

/// One non-negative integer of `shape` or `data_offsets`.
#[derive(Clone, Copy)]
struct IntSeed<'c, 'n> {
    ctx: &'c Ctx,
    name: &'n str,
    array: IntArray,
    index: usize,
}

impl IntSeed<'_, '_> {
    fn wrong_kind<E: de::Error>(self, found: JsonKind) -> E {
        let (name, index) = (self.name.to_owned(), self.index);
        self.ctx.fail(match self.array {
            IntArray::Shape => SafetensorsError::ShapeDimNotInteger { name, index, found },
            IntArray::DataOffsets => SafetensorsError::DataOffsetNotInteger { name, index, found },
        })
    }
}

impl<'de> DeserializeSeed<'de> for IntSeed<'_, '_> {
    type Value = u64;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IntSeed<'_, '_> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer")
    }

    reject_kinds!('de; Null, Bool, OtherNumber, String, Array, Object);

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| self.wrong_kind(JsonKind::NegativeInteger))
    }
}

/// The `shape` array: at most [`MAX_DIMS`] non-negative integers.
#[derive(Clone, Copy)]
struct ShapeSeed<'c, 'n> {
    ctx: &'c Ctx,
    name: &'n str,
}

impl ShapeSeed<'_, '_> {
    fn wrong_kind<E: de::Error>(self, found: JsonKind) -> E {
        self.ctx.fail(SafetensorsError::ShapeNotArray {
            name: self.name.to_owned(),
            found,
        })
    }
}

impl<'de> DeserializeSeed<'de> for ShapeSeed<'_, '_> {
    type Value = Vec<u64>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<u64>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ShapeSeed<'_, '_> {
    type Value = Vec<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a shape array")
    }

    reject_kinds!('de; Null, Bool, Integers, OtherNumber, String, Object);

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
        let mut shape = Vec::new();
        while shape.len() < MAX_DIMS {
            let seed = IntSeed {
                ctx: self.ctx,
                name: self.name,
                array: IntArray::Shape,
                index: shape.len(),
            };
            match seq.next_element_seed(seed)? {
                Some(dim) => shape.push(dim),
                None => return Ok(shape),
            }
        }
        // Count the excess without storing it, for the error message.
        let mut dims = MAX_DIMS as u64;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            dims = dims.saturating_add(1);
        }
        if dims > MAX_DIMS as u64 {
            return Err(self.ctx.fail(SafetensorsError::TooManyDims {
                name: self.name.to_owned(),
                dims,
                max: MAX_DIMS,
            }));
        }
        Ok(shape)
    }
}

/// The `data_offsets` array: exactly two non-negative integers.
#[derive(Clone, Copy)]
struct OffsetsSeed<'c, 'n> {
    ctx: &'c Ctx,
    name: &'n str,
}

impl OffsetsSeed<'_, '_> {
    fn wrong_kind<E: de::Error>(self, found: JsonKind) -> E {
        self.ctx.fail(SafetensorsError::DataOffsetsNotArray {
            name: self.name.to_owned(),
            found,
        })
    }
}

impl<'de> DeserializeSeed<'de> for OffsetsSeed<'_, '_> {
    type Value = (u64, u64);
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(u64, u64), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for OffsetsSeed<'_, '_> {
    type Value = (u64, u64);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a data_offsets array")
    }

    reject_kinds!('de; Null, Bool, Integers, OtherNumber, String, Object);

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(u64, u64), A::Error> {
        let mut values = [0u64; 2];
        let mut count = 0u64;
        for (index, slot) in values.iter_mut().enumerate() {
            let seed = IntSeed {
                ctx: self.ctx,
                name: self.name,
                array: IntArray::DataOffsets,
                index,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => {
                    *slot = v;
                    count += 1;
                }
                None => break,
            }
        }
        if count == 2 {
            while seq.next_element::<IgnoredAny>()?.is_some() {
                count = count.saturating_add(1);
            }
        }
        if count != 2 {
            return Err(self.ctx.fail(SafetensorsError::DataOffsetsCount {
                name: self.name.to_owned(),
                count,
            }));
        }
        let [begin, end] = values;
        Ok((begin, end))
    }
}

#[cfg(test)]
mod tests;
