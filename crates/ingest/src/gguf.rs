//! A hardened reader for the header of a GGUF file (llama.cpp's model
//! format): it turns the bytes from the magic to the start of the tensor data
//! into a validated [`Header`] or one precise [`GgufError`].
//!
//! ```
//! use tpde_format::ggml::GgmlType;
//! use tpde_ingest::gguf::{read_header, Value};
//!
//! // GGUF v3, 1 tensor, 1 key/value: general.architecture = "llama".
//! let mut file = b"GGUF".to_vec();
//! file.extend_from_slice(&3u32.to_le_bytes());
//! file.extend_from_slice(&1u64.to_le_bytes()); // tensor count
//! file.extend_from_slice(&1u64.to_le_bytes()); // key/value count
//! file.extend_from_slice(&20u64.to_le_bytes());
//! file.extend_from_slice(b"general.architecture");
//! file.extend_from_slice(&8u32.to_le_bytes()); // value type: string
//! file.extend_from_slice(&5u64.to_le_bytes());
//! file.extend_from_slice(b"llama");
//! // Tensor info: name "w", 2 dimensions (ne[0] = 4, ne[1] = 2), F32, offset 0.
//! file.extend_from_slice(&1u64.to_le_bytes());
//! file.extend_from_slice(b"w");
//! file.extend_from_slice(&2u32.to_le_bytes());
//! file.extend_from_slice(&4u64.to_le_bytes());
//! file.extend_from_slice(&2u64.to_le_bytes());
//! file.extend_from_slice(&0u32.to_le_bytes()); // GGML_TYPE_F32
//! file.extend_from_slice(&0u64.to_le_bytes());
//! let header_len = file.len();
//! file.resize(header_len.next_multiple_of(32), 0); // padding to the default alignment
//! file.extend_from_slice(&[0u8; 32]); // 8 f32 values
//!
//! let (header, raw) = read_header(&file[..], file.len() as u64).unwrap();
//! assert_eq!(header.header_len, header_len as u64);
//! assert_eq!(header.data_start, 128);
//! assert_eq!(raw, &file[..128]);
//! assert_eq!(header.architecture(), Some("llama"));
//! let w = &header.tensors[0];
//! assert_eq!((w.ggml_type, w.shape(), w.byte_len), (GgmlType::F32, vec![2, 4], 32));
//! assert_eq!(header.get("general.architecture"), Some(&Value::String("llama".into())));
//! ```
//!
//! # Format
//!
//! All numbers are little-endian. A GGUF file (versions 2 and 3) is:
//!
//! 1. the magic `GGUF`, a `u32` version, a `u64` tensor count and a `u64`
//!    key/value count (version 1 used `u32` counts and is rejected, as in
//!    llama.cpp);
//! 2. the key/values: a string key, a `u32` value type (0 `u8`, 1 `i8`,
//!    2 `u16`, 3 `i16`, 4 `u32`, 5 `i32`, 6 `f32`, 7 `bool`, 8 string,
//!    9 array, 10 `u64`, 11 `i64`, 12 `f64`) and the value; a string is a
//!    `u64` byte length and the bytes; an array is a `u32` element type, a
//!    `u64` element count and the elements;
//! 3. the tensor infos: a string name, a `u32` dimension count, that many
//!    `u64` dimensions (`ne[0]`, the fastest-varying one, first), a `u32`
//!    ggml type and a `u64` offset relative to the data section;
//! 4. zero padding up to a multiple of the alignment (`general.alignment`,
//!    default 32), where the data section starts;
//! 5. the tensor data, each tensor padded to the alignment.
//!
//! # What is checked
//!
//! Every count and length is compared with a named limit and with the bytes
//! left in the file before anything is read or allocated; every size is
//! computed with checked arithmetic; buffers grow only as bytes actually
//! arrive from the reader. Besides what llama.cpp's `gguf.cpp` rejects (bad
//! magic, version 0, 1 or above 3, empty or duplicate keys, unknown value
//! types, arrays of arrays, `general.alignment` that is not a power-of-two
//! `u32`, tensor names of 64 bytes or more, duplicate tensor names, more than
//! 4 dimensions, element counts or byte sizes that overflow, unknown or
//! removed ggml types, `ne[0]` not a multiple of the block size, offsets that
//! are not exactly the previous tensor's end rounded up to the alignment),
//! this reader also rejects, following `shared/RELIABILITY.md`:
//!
//! - keys that are not printable ASCII or longer than [`MAX_KEY_LEN`];
//! - tensor names that are not UTF-8 or contain a NUL byte (llama.cpp copies
//!   names with `strncpy`, so `a\0b` would be seen as `a`);
//! - bools other than 0 and 1 (llama.cpp reads any non-zero byte as true);
//! - tensors with 0 dimensions or a dimension of 0 (llama.cpp accepts both,
//!   but its own writer never writes `n_dims` 0 and an empty tensor has no
//!   data to pack);
//! - `general.alignment` above [`MAX_ALIGNMENT`];
//! - a data section with bytes after the last tensor beyond its alignment
//!   padding, and a last tensor that ends past the end of the file (llama.cpp
//!   checks the header alone and leaves those to the model loader);
//! - big-endian files (version or magic byte-swapped): tpde reads
//!   little-endian GGUF only.
//!
//! The padding byte values are not checked here: the pack pipeline stores
//! them, so that an unpack is byte-identical even when they are not zero.
//!
//! # Strings
//!
//! GGUF strings are specified as UTF-8, but llama.cpp never validates them
//! and tokenizer vocabularies can hold arbitrary bytes (byte-fallback
//! tokens, broken merges). Because the raw header bytes are kept for a
//! byte-exact restore, string *values* are decoded lossily
//! ([`String::from_utf8_lossy`]): invalid sequences become U+FFFD in
//! [`Value::String`], for display only, and never fail a file. Keys must be
//! printable ASCII and tensor names UTF-8: both become names in the
//! container.
//!
//! # Limits
//!
//! - [`MAX_TENSORS`], [`MAX_KEY_VALUES`]: 2^20 each; real models have a few
//!   thousand tensors and under a hundred key/values.
//! - [`MAX_HEADER_LEN`]: 256 MiB from the magic to the last tensor info; the
//!   largest real headers (256k-token vocabularies with their merges) are
//!   under 16 MiB.
//! - [`MAX_STRING_LEN`]: 64 MiB for one string, enough for a whole
//!   `tokenizer.huggingface.json` (llama.cpp allows 1 GiB, which our header
//!   limit could not hold anyway).
//! - [`MAX_KEY_LEN`]: 65 535 bytes, the bound the GGUF specification gives.
//! - [`MAX_NAME_LEN`]: 63 bytes, as llama.cpp (`GGML_MAX_NAME` is 64,
//!   including the terminating NUL).
//! - [`MAX_ARRAY_LEN`] (2^22 elements in one array, 16 times the largest
//!   vocabulary in use) and [`MAX_TOTAL_ARRAY_ELEMENTS`] (2^24 in the whole
//!   header): a decoded element takes 32 bytes however small it is in the
//!   file, so these bound the memory a header of one-byte elements can cost
//!   to 512 MiB.
//! - [`MAX_ALIGNMENT`]: 64 KiB (the largest page size in use); llama.cpp
//!   only asks for a power of two and writes 32.
//!
//! # Why our own reader
//!
//! The `gguf-rs` crate (0.1.8, checked) cannot meet `RELIABILITY.md`: a
//! tensor type id of 40 (NVFP4 in current ggml) reaches an `unreachable!()`
//! and panics, `read_string` allocates the declared length (up to 1 GiB)
//! before knowing the file has those bytes, duplicate keys silently replace
//! each other in a `BTreeMap`, duplicate tensor names, tensor offsets and
//! `ne[0]` block multiples are not checked, its block size is guessed from
//! the type id (`< 10` → 32, else 256, wrong for `I8`…`BF16` and `MXFP4`),
//! and it keeps neither typed errors nor the raw header bytes that a
//! byte-identical unpack needs.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};

use thiserror::Error;
use tpde_format::ggml::GgmlType;

/// The first four bytes of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The magic as a big-endian file that writes it as a `u32` has it.
const MAGIC_BYTE_SWAPPED: [u8; 4] = *b"FUGG";
/// Newest GGUF version this reader accepts (versions 2 and 3 are read).
pub const MAX_VERSION: u32 = 3;
/// Largest accepted tensor count.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Largest accepted key/value count.
pub const MAX_KEY_VALUES: u64 = 1 << 20;
/// Largest accepted header, in bytes from the magic to the end of the last
/// tensor info (the alignment padding after it is not counted).
pub const MAX_HEADER_LEN: u64 = 1 << 28;
/// Longest accepted string value or array element, in bytes.
pub const MAX_STRING_LEN: u64 = 1 << 26;
/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: u64 = 65_535;
/// Longest accepted tensor name, in bytes (`GGML_MAX_NAME - 1`).
pub const MAX_NAME_LEN: u64 = 63;
/// Most elements in one array value.
pub const MAX_ARRAY_LEN: u64 = 1 << 22;
/// Most array elements in all the array values of one header together.
pub const MAX_TOTAL_ARRAY_ELEMENTS: u64 = 1 << 24;
/// Most dimensions of one tensor (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Alignment of the data section and of each tensor when the file has no
/// `general.alignment`.
pub const DEFAULT_ALIGNMENT: u32 = 32;
/// Largest accepted `general.alignment`.
pub const MAX_ALIGNMENT: u32 = 1 << 16;
/// The key that sets the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// The key that names the model architecture.
pub const ARCHITECTURE_KEY: &str = "general.architecture";

/// Fewest bytes a key/value can take: key length, a 1-byte key, value type, a `u8`.
const MIN_KEY_VALUE_LEN: u64 = 8 + 1 + 4 + 1;
/// Fewest bytes a tensor info can take: name length, an empty name, `n_dims`,
/// one dimension, type, offset.
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 8 + 4 + 8;
/// Ggml type ids that ggml has removed (`Q4_2`, `Q4_3`, the `Q4_0_x_y` and
/// `IQ4_NL_x_y` repacked layouts).
const REMOVED_GGML_TYPE_IDS: [u32; 8] = [4, 5, 31, 32, 33, 36, 37, 38];
/// Most bytes read from the reader in one call, so that memory grows only
/// with bytes that actually arrive.
const READ_CHUNK: usize = 64 * 1024;
/// Most elements or entries reserved ahead of reading them.
const PREALLOCATE_MAX: u64 = 1024;
/// Longest user-controlled string quoted in an error.
const PREVIEW_CHARS: usize = 64;

/// The limits that depend on no format constant; [`read_header`] uses
/// [`Limits::DEFAULT`], tests use smaller ones to reach every limit cheaply.
#[derive(Clone, Copy, Debug)]
struct Limits {
    tensors: u64,
    key_values: u64,
    header_len: u64,
    string_len: u64,
    array_len: u64,
    total_array_elements: u64,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        tensors: MAX_TENSORS,
        key_values: MAX_KEY_VALUES,
        header_len: MAX_HEADER_LEN,
        string_len: MAX_STRING_LEN,
        array_len: MAX_ARRAY_LEN,
        total_array_elements: MAX_TOTAL_ARRAY_ELEMENTS,
    };
}

/// The type of a key/value (or of an array's elements), with its GGUF id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// 0: `u8`.
    U8,
    /// 1: `i8`.
    I8,
    /// 2: `u16`.
    U16,
    /// 3: `i16`.
    I16,
    /// 4: `u32`.
    U32,
    /// 5: `i32`.
    I32,
    /// 6: `f32`.
    F32,
    /// 7: bool, one byte 0 or 1.
    Bool,
    /// 8: string, a `u64` length and the bytes.
    String,
    /// 9: array, a `u32` element type, a `u64` count and the elements.
    Array,
    /// 10: `u64`.
    U64,
    /// 11: `i64`.
    I64,
    /// 12: `f64`.
    F64,
}

impl ValueType {
    /// Every value type, in id order.
    pub const ALL: [ValueType; 13] = [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::F32,
        ValueType::Bool,
        ValueType::String,
        ValueType::Array,
        ValueType::U64,
        ValueType::I64,
        ValueType::F64,
    ];

    /// The type with GGUF id `id`, `None` for an unknown id.
    pub fn from_id(id: u32) -> Option<ValueType> {
        ValueType::ALL.get(usize::try_from(id).ok()?).copied()
    }

    /// The GGUF id.
    pub fn id(self) -> u32 {
        match self {
            ValueType::U8 => 0,
            ValueType::I8 => 1,
            ValueType::U16 => 2,
            ValueType::I16 => 3,
            ValueType::U32 => 4,
            ValueType::I32 => 5,
            ValueType::F32 => 6,
            ValueType::Bool => 7,
            ValueType::String => 8,
            ValueType::Array => 9,
            ValueType::U64 => 10,
            ValueType::I64 => 11,
            ValueType::F64 => 12,
        }
    }

    /// llama.cpp's short name (`u8`, `str`, `arr`…).
    pub fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "str",
            ValueType::Array => "arr",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        }
    }

    /// Size in the file of one value of a fixed-size type; `None` for
    /// strings and arrays.
    pub fn fixed_size(self) -> Option<u64> {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => Some(1),
            ValueType::U16 | ValueType::I16 => Some(2),
            ValueType::U32 | ValueType::I32 | ValueType::F32 => Some(4),
            ValueType::U64 | ValueType::I64 | ValueType::F64 => Some(8),
            ValueType::String | ValueType::Array => None,
        }
    }

    /// Fewest bytes one value of this type takes in the file (a string
    /// takes at least its 8-byte length).
    fn min_size(self) -> u64 {
        self.fixed_size().unwrap_or(8)
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A key/value's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// bool.
    Bool(bool),
    /// A string, decoded lossily: invalid UTF-8 became U+FFFD (the raw
    /// header bytes keep the original).
    String(String),
    /// An array: its element type (never [`ValueType::Array`]) and its
    /// elements, every one of that type.
    Array(ValueType, Vec<Value>),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

impl Value {
    /// The type of this value.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a `u64`, if it is an integer of any width that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// `u8`, `str`, or `arr[str]` for an array of strings.
    fn type_description(&self) -> String {
        match self {
            Value::Array(elem, _) => format!("arr[{elem}]"),
            other => other.value_type().name().to_owned(),
        }
    }
}

/// One key/value, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyValue {
    /// The key (printable ASCII).
    pub key: String,
    /// The value.
    pub value: Value,
}

/// One tensor info of a validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name (UTF-8, at most [`MAX_NAME_LEN`] bytes, no NUL).
    pub name: String,
    /// Dimensions as in the file: `ne[0]` (the fastest-varying one) first;
    /// 1 to 4 of them, none 0.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// First byte of the data, relative to [`Header::data_start`].
    pub offset: u64,
    /// Bytes of data: `numel / block_elems × block_bytes`.
    pub byte_len: u64,
}

impl TensorInfo {
    /// Number of elements. Never overflows for a parsed header; saturates at
    /// `u64::MAX` for a hand-built info that would.
    pub fn numel(&self) -> u64 {
        checked_numel(&self.dims).unwrap_or(u64::MAX)
    }

    /// Shape in row-major order, slowest-varying dimension first: the
    /// dimensions reversed (a `[ne0, ne1]` weight is `[rows, cols] = [ne1, ne0]`).
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A validated GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// GGUF version: 2 or 3.
    pub version: u32,
    /// Alignment of the data section and of every tensor's data.
    pub alignment: u64,
    /// The key/values, in file order.
    pub kv: Vec<KeyValue>,
    /// The tensor infos, in file order (which is also the order of their data).
    pub tensors: Vec<TensorInfo>,
    /// Bytes from the magic to the end of the last tensor info.
    pub header_len: u64,
    /// Absolute offset of the data section: `header_len` rounded up to
    /// `alignment`, or `file_len` when the file holds no tensors and ends
    /// before that (vocabulary-only files written by gguf-py have no padding).
    pub data_start: u64,
    /// Length of the whole file.
    pub file_len: u64,
}

impl Header {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|kv| kv.key == key).map(|kv| &kv.value)
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get(ARCHITECTURE_KEY).and_then(Value::as_str)
    }

    /// The tensor info named `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Length of the data section, `file_len - data_start`.
    pub fn data_len(&self) -> u64 {
        self.file_len.saturating_sub(self.data_start)
    }
}

/// Which fixed-size field an error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    /// The 4-byte magic.
    Magic,
    /// The `u32` version.
    Version,
    /// The `u64` tensor count.
    TensorCount,
    /// The `u64` key/value count.
    KeyValueCount,
    /// The `u64` length of key number `index` (0-based).
    KeyLen {
        /// Position of the key/value.
        index: u64,
    },
    /// The `u32` value type of `key`.
    ValueType {
        /// The key (at most 64 characters of it).
        key: String,
    },
    /// The `u32` element type and `u64` count of the array `key`.
    ArrayHeader {
        /// The key (at most 64 characters of it).
        key: String,
    },
    /// A fixed-size value of `key` (or one of its array elements).
    Value {
        /// The key (at most 64 characters of it).
        key: String,
    },
    /// The `u64` length of a string (value or array element) of `key`.
    StringLen {
        /// The key (at most 64 characters of it).
        key: String,
    },
    /// The `u64` name length of tensor info number `index` (0-based).
    TensorNameLen {
        /// Position of the tensor info.
        index: u64,
    },
    /// The `u32` dimension count of tensor `name`.
    DimCount {
        /// Tensor name.
        name: String,
    },
    /// Dimension `axis` (a `u64`) of tensor `name`.
    Dim {
        /// Tensor name.
        name: String,
        /// Position of the dimension, 0 for `ne[0]`.
        axis: u32,
    },
    /// The `u32` ggml type of tensor `name`.
    TensorType {
        /// Tensor name.
        name: String,
    },
    /// The `u64` data offset of tensor `name`.
    TensorOffset {
        /// Tensor name.
        name: String,
    },
    /// The alignment padding between the last tensor info and the data section.
    Padding,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Magic => f.write_str("magic"),
            Field::Version => f.write_str("version"),
            Field::TensorCount => f.write_str("tensor count"),
            Field::KeyValueCount => f.write_str("key/value count"),
            Field::KeyLen { index } => write!(f, "length of key {index}"),
            Field::ValueType { key } => write!(f, "value type of key {key:?}"),
            Field::ArrayHeader { key } => write!(f, "array type and count of key {key:?}"),
            Field::Value { key } => write!(f, "value of key {key:?}"),
            Field::StringLen { key } => write!(f, "string length in the value of key {key:?}"),
            Field::TensorNameLen { index } => write!(f, "name length of tensor info {index}"),
            Field::DimCount { name } => write!(f, "dimension count of tensor {name:?}"),
            Field::Dim { name, axis } => write!(f, "dimension {axis} of tensor {name:?}"),
            Field::TensorType { name } => write!(f, "type of tensor {name:?}"),
            Field::TensorOffset { name } => write!(f, "offset of tensor {name:?}"),
            Field::Padding => f.write_str("padding before the data section"),
        }
    }
}

/// Which string an error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringKind {
    /// Key number `index` (0-based).
    Key {
        /// Position of the key/value.
        index: u64,
    },
    /// The string value of `key`.
    Value {
        /// The key (at most 64 characters of it).
        key: String,
    },
    /// Element `element` of the string array `key`.
    ArrayElement {
        /// The key (at most 64 characters of it).
        key: String,
        /// Position in the array.
        element: u64,
    },
    /// The name of tensor info number `index` (0-based).
    TensorName {
        /// Position of the tensor info.
        index: u64,
    },
}

impl fmt::Display for StringKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringKind::Key { index } => write!(f, "key {index}"),
            StringKind::Value { key } => write!(f, "value of key {key:?}"),
            StringKind::ArrayElement { key, element } => {
                write!(f, "element {element} of key {key:?}")
            }
            StringKind::TensorName { index } => write!(f, "name of tensor info {index}"),
        }
    }
}

/// Why a GGUF header was rejected: one variant per reason.
#[derive(Debug, Error)]
pub enum GgufError {
    /// A fixed-size field extends past the end of the file.
    #[error(
        "file of {file_len} bytes ends inside the {field} ({needed} bytes at offset {offset})"
    )]
    Truncated {
        /// The field being read.
        field: Field,
        /// Absolute offset of the field.
        offset: u64,
        /// Size of the field.
        needed: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The reader ended before the bytes that the file length promised.
    #[error(
        "reader ended at offset {offset}, before the {file_len} bytes the file length promised"
    )]
    UnexpectedEof {
        /// How many bytes the reader gave.
        offset: u64,
        /// Length of the file as given by the caller.
        file_len: u64,
    },
    /// The first four bytes are not `GGUF`.
    #[error("bad magic {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The magic or the version is byte-swapped: a big-endian file.
    #[error(
        "file is big-endian (the {field} reads {found:#010x}); only little-endian gguf is read"
    )]
    BigEndian {
        /// [`Field::Magic`] (`FUGG`) or [`Field::Version`] (1 to 3 byte-swapped).
        field: Field,
        /// That field read as a little-endian `u32`.
        found: u32,
    },
    /// Version 0.
    #[error("gguf version 0 is invalid")]
    VersionZero,
    /// Version 1, which used 32-bit counts and lengths.
    #[error("gguf version 1 (32-bit counts) is no longer supported")]
    VersionOne,
    /// A version newer than [`MAX_VERSION`].
    #[error("gguf version {version} is newer than the supported version {max}")]
    VersionTooNew {
        /// The version found.
        version: u32,
        /// The newest supported version, [`MAX_VERSION`].
        max: u32,
    },
    /// More tensors than [`MAX_TENSORS`].
    #[error("tensor count {count} exceeds the limit of {max}")]
    TooManyTensors {
        /// The tensor count.
        count: u64,
        /// The limit, [`MAX_TENSORS`].
        max: u64,
    },
    /// More key/values than [`MAX_KEY_VALUES`].
    #[error("key/value count {count} exceeds the limit of {max}")]
    TooManyKeyValues {
        /// The key/value count.
        count: u64,
        /// The limit, [`MAX_KEY_VALUES`].
        max: u64,
    },
    /// The key/values cannot fit in the rest of the file, even at their smallest.
    #[error("{count} key/values need at least {min_bytes} bytes but only {remaining} remain in the file")]
    KeyValueCountPastEof {
        /// The key/value count.
        count: u64,
        /// Bytes they need at the least (14 each).
        min_bytes: u64,
        /// Bytes left in the file after the counts.
        remaining: u64,
    },
    /// The tensor infos cannot fit in the rest of the file (after the
    /// smallest possible key/values), even at their smallest.
    #[error("{count} tensor infos need at least {min_bytes} bytes but only {remaining} remain in the file")]
    TensorCountPastEof {
        /// The tensor count.
        count: u64,
        /// Bytes they need at the least (32 each).
        min_bytes: u64,
        /// Bytes left in the file after the counts and the smallest key/values.
        remaining: u64,
    },
    /// The header would grow past [`MAX_HEADER_LEN`].
    #[error("header would reach {len} bytes (at the {field}), over the limit of {max}")]
    HeaderTooLarge {
        /// Where the header was being read.
        field: String,
        /// The header length it would reach.
        len: u64,
        /// The limit, [`MAX_HEADER_LEN`].
        max: u64,
    },
    /// A key is empty.
    #[error("key {index} is empty")]
    EmptyKey {
        /// Position of the key/value.
        index: u64,
    },
    /// A key is longer than [`MAX_KEY_LEN`].
    #[error("key {index} is {len} bytes, longer than the limit of {max}")]
    KeyTooLong {
        /// Position of the key/value.
        index: u64,
        /// Declared length.
        len: u64,
        /// The limit, [`MAX_KEY_LEN`].
        max: u64,
    },
    /// A key has a byte that is not ASCII.
    #[error("key {index} ({key:?}) has the non-ascii byte {byte:#04x} at position {position}")]
    KeyNotAscii {
        /// Position of the key/value.
        index: u64,
        /// The key decoded lossily (at most 64 characters of it).
        key: String,
        /// Position of the byte in the key.
        position: u64,
        /// The byte.
        byte: u8,
    },
    /// A key has an ASCII control character (NUL, newline, DEL…).
    #[error("key {index} ({key:?}) has the control character {byte:#04x} at position {position}")]
    KeyControlCharacter {
        /// Position of the key/value.
        index: u64,
        /// The key (at most 64 characters of it).
        key: String,
        /// Position of the byte in the key.
        position: u64,
        /// The byte.
        byte: u8,
    },
    /// Two key/values have the same key.
    #[error("duplicate key {key:?} (key/values {first} and {index})")]
    DuplicateKey {
        /// The key (at most 64 characters of it).
        key: String,
        /// Position of its first occurrence.
        first: u64,
        /// Position of the repeat.
        index: u64,
    },
    /// A string is longer than [`MAX_STRING_LEN`].
    #[error("{kind} is a string of {len} bytes, longer than the limit of {max}")]
    StringTooLong {
        /// Which string.
        kind: StringKind,
        /// Declared length.
        len: u64,
        /// The limit, [`MAX_STRING_LEN`].
        max: u64,
    },
    /// A string's length goes past the end of the file.
    #[error("{kind} is a string of {len} bytes at offset {offset}, but only {remaining} bytes remain in the file")]
    StringPastEof {
        /// Which string.
        kind: StringKind,
        /// Absolute offset of the string's bytes.
        offset: u64,
        /// Declared length.
        len: u64,
        /// Bytes left in the file.
        remaining: u64,
    },
    /// A value type id is not one of the 13 GGUF types.
    #[error("key {key:?}: unknown {} type {type_id}", if *.in_array { "array element" } else { "value" })]
    UnknownValueType {
        /// The key (at most 64 characters of it).
        key: String,
        /// The type id found.
        type_id: u32,
        /// Whether it is the element type of an array.
        in_array: bool,
    },
    /// An array whose elements are arrays (llama.cpp rejects them too).
    #[error("key {key:?}: arrays of arrays are not supported")]
    NestedArray {
        /// The key (at most 64 characters of it).
        key: String,
    },
    /// An array's element count × element size overflows a `u64`.
    #[error("key {key:?}: {len} elements of {elem_type} overflow a 64-bit size")]
    ArraySizeOverflow {
        /// The key (at most 64 characters of it).
        key: String,
        /// Declared element count.
        len: u64,
        /// Element type.
        elem_type: ValueType,
    },
    /// An array cannot fit in the rest of the file.
    #[error("key {key:?}: {len} elements of {elem_type} need at least {min_bytes} bytes but only {remaining} remain in the file")]
    ArrayPastEof {
        /// The key (at most 64 characters of it).
        key: String,
        /// Declared element count.
        len: u64,
        /// Element type.
        elem_type: ValueType,
        /// Bytes the elements need at the least.
        min_bytes: u64,
        /// Bytes left in the file.
        remaining: u64,
    },
    /// An array has more than [`MAX_ARRAY_LEN`] elements.
    #[error("key {key:?}: array of {len} elements exceeds the limit of {max}")]
    ArrayTooLong {
        /// The key (at most 64 characters of it).
        key: String,
        /// Declared element count.
        len: u64,
        /// The limit, [`MAX_ARRAY_LEN`].
        max: u64,
    },
    /// The arrays of the header have more than [`MAX_TOTAL_ARRAY_ELEMENTS`] elements together.
    #[error(
        "key {key:?}: array brings the header's array elements to {total}, over the limit of {max}"
    )]
    TooManyArrayElements {
        /// The key whose array went over (at most 64 characters of it).
        key: String,
        /// Elements of all arrays so far, this one included.
        total: u64,
        /// The limit, [`MAX_TOTAL_ARRAY_ELEMENTS`].
        max: u64,
    },
    /// A bool is neither 0 nor 1.
    #[error("key {key:?}: bool at offset {offset} is {byte}, not 0 or 1")]
    BoolNotZeroOrOne {
        /// The key (at most 64 characters of it).
        key: String,
        /// Absolute offset of the byte.
        offset: u64,
        /// The byte.
        byte: u8,
    },
    /// `general.alignment` is not a `u32`.
    #[error("general.alignment must be a u32, found {found}")]
    AlignmentWrongType {
        /// The type found (`u64`, `arr[u32]`…).
        found: String,
    },
    /// `general.alignment` is 0.
    #[error("general.alignment is 0")]
    AlignmentZero,
    /// `general.alignment` is not a power of two.
    #[error("general.alignment {alignment} is not a power of two")]
    AlignmentNotPowerOfTwo {
        /// The alignment found.
        alignment: u32,
    },
    /// `general.alignment` is above [`MAX_ALIGNMENT`].
    #[error("general.alignment {alignment} exceeds the limit of {max}")]
    AlignmentTooLarge {
        /// The alignment found.
        alignment: u32,
        /// The limit, [`MAX_ALIGNMENT`].
        max: u32,
    },
    /// A tensor name is [`MAX_NAME_LEN`]` + 1` bytes or longer.
    #[error("name of tensor info {index} is {len} bytes, longer than the limit of {max}")]
    TensorNameTooLong {
        /// Position of the tensor info.
        index: u64,
        /// Declared length.
        len: u64,
        /// The limit, [`MAX_NAME_LEN`].
        max: u64,
    },
    /// A tensor name is not UTF-8.
    #[error("name of tensor info {index} ({name:?}) is not utf-8 at byte {position}")]
    TensorNameNotUtf8 {
        /// Position of the tensor info.
        index: u64,
        /// The name decoded lossily.
        name: String,
        /// Position of the first invalid byte.
        position: u64,
    },
    /// A tensor name contains a NUL byte.
    #[error("name of tensor info {index} ({name:?}) contains a nul byte")]
    TensorNameContainsNul {
        /// Position of the tensor info.
        index: u64,
        /// The name.
        name: String,
    },
    /// Two tensor infos have the same name.
    #[error("duplicate tensor name {name:?} (tensor infos {first} and {index})")]
    DuplicateTensorName {
        /// The name.
        name: String,
        /// Position of its first occurrence.
        first: u64,
        /// Position of the repeat.
        index: u64,
    },
    /// A tensor has 0 dimensions.
    #[error("tensor {name:?} has 0 dimensions")]
    NoDims {
        /// Tensor name.
        name: String,
    },
    /// A tensor has more than [`MAX_DIMS`] dimensions.
    #[error("tensor {name:?} has {n_dims} dimensions, more than the limit of {max}")]
    TooManyDims {
        /// Tensor name.
        name: String,
        /// Declared dimension count.
        n_dims: u32,
        /// The limit, [`MAX_DIMS`].
        max: u32,
    },
    /// A dimension is 0.
    #[error("tensor {name:?}: dimension {axis} is 0")]
    DimensionZero {
        /// Tensor name.
        name: String,
        /// Position of the dimension, 0 for `ne[0]`.
        axis: u32,
    },
    /// A dimension is negative as ggml's `int64_t` (2^63 or more as a `u64`).
    #[error("tensor {name:?}: dimension {axis} is {value}, negative as a signed 64-bit count")]
    DimensionNegative {
        /// Tensor name.
        name: String,
        /// Position of the dimension, 0 for `ne[0]`.
        axis: u32,
        /// The dimension as a `u64`.
        value: u64,
    },
    /// The element count overflows ggml's `int64_t`.
    #[error("tensor {name:?}: element count of {dims:?} overflows a signed 64-bit count")]
    ElementCountOverflow {
        /// Tensor name.
        name: String,
        /// The dimensions, `ne[0]` first.
        dims: Vec<u64>,
    },
    /// The type id is not a ggml type.
    #[error("tensor {name:?}: unknown ggml type {type_id}")]
    UnknownTensorType {
        /// Tensor name.
        name: String,
        /// The type id found.
        type_id: u32,
    },
    /// The type id is one that ggml has removed.
    #[error("tensor {name:?}: ggml type {type_id} has been removed from ggml")]
    RemovedTensorType {
        /// Tensor name.
        name: String,
        /// The type id found.
        type_id: u32,
    },
    /// `ne[0]` is not a multiple of the type's block size.
    #[error("tensor {name:?}: first dimension {ne0} is not a multiple of the {block_elems}-element block of {ggml_type:?}")]
    NotBlockMultiple {
        /// Tensor name.
        name: String,
        /// Element type.
        ggml_type: GgmlType,
        /// `ne[0]`.
        ne0: u64,
        /// Elements per block of the type.
        block_elems: u64,
    },
    /// The byte size overflows a `u64`.
    #[error("tensor {name:?}: byte size of {ggml_type:?} {dims:?} overflows u64")]
    ByteSizeOverflow {
        /// Tensor name.
        name: String,
        /// Element type.
        ggml_type: GgmlType,
        /// The dimensions, `ne[0]` first.
        dims: Vec<u64>,
    },
    /// The file has tensors but ends before the data section starts.
    #[error("file of {file_len} bytes ends before its data section at offset {data_start}")]
    DataStartPastEof {
        /// Where the data section would start.
        data_start: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A tensor offset is not a multiple of the alignment.
    #[error("tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}")]
    OffsetMisaligned {
        /// Tensor name.
        name: String,
        /// Declared offset (relative to the data section).
        offset: u64,
        /// The alignment.
        alignment: u64,
    },
    /// A tensor's data starts before the previous tensor's (in info order).
    #[error("tensor {name:?}: offset {offset} is before the offset {previous_offset} of the previous tensor {previous:?}")]
    OffsetOutOfOrder {
        /// Tensor name.
        name: String,
        /// Declared offset.
        offset: u64,
        /// Name of the previous tensor info.
        previous: String,
        /// Its offset.
        previous_offset: u64,
    },
    /// A tensor's data starts inside the previous tensor's.
    #[error("tensor {name:?}: offset {offset} is inside the previous tensor {previous:?}, which ends at {previous_end}")]
    Overlap {
        /// Tensor name.
        name: String,
        /// Declared offset.
        offset: u64,
        /// Name of the previous tensor info.
        previous: String,
        /// End of its data.
        previous_end: u64,
    },
    /// Bytes before a tensor's data belong to no tensor and are more than
    /// alignment padding.
    #[error("tensor {name:?}: offset {offset} leaves a gap, expected {expected}")]
    Gap {
        /// Tensor name.
        name: String,
        /// Declared offset.
        offset: u64,
        /// The previous tensor's end rounded up to the alignment (0 for the first tensor).
        expected: u64,
    },
    /// A tensor's data ends past the end of the file.
    #[error("tensor {name:?}: data [{offset}, {end}) is past the end of the {data_len}-byte data section")]
    PastEndOfFile {
        /// Tensor name.
        name: String,
        /// Declared offset.
        offset: u64,
        /// End of its data (saturated at `u64::MAX`).
        end: u64,
        /// Length of the data section, `file_len - data_start`.
        data_len: u64,
    },
    /// The data section continues after the last tensor beyond its padding.
    #[error("data section is {data_len} bytes but the tensors end at {covered}, leaving {} trailing bytes (alignment {alignment})", .data_len.saturating_sub(*.covered))]
    TrailingBytes {
        /// End of the last tensor's data (0 without tensors).
        covered: u64,
        /// Length of the data section.
        data_len: u64,
        /// The alignment (fewer trailing bytes than this are padding).
        alignment: u64,
    },
    /// Reading failed.
    #[error("i/o error while reading the gguf header: {0}")]
    Io(#[from] io::Error),
}

/// Reads and validates a GGUF header from `reader`, positioned at the start
/// of a file of `file_len` bytes.
///
/// Reads the bytes `[0, data_start)` and never more; compares every count
/// and length with the named limits and the bytes left in the file before
/// reading or allocating; grows its buffers only as bytes arrive. Returns the
/// header and the raw bytes `[0, data_start)` exactly as in the file (the
/// magic, counts, key/values, tensor infos and alignment padding).
pub fn read_header<R: Read>(reader: R, file_len: u64) -> Result<(Header, Vec<u8>), GgufError> {
    read_header_with(reader, file_len, Limits::DEFAULT)
}

fn read_header_with<R: Read>(
    reader: R,
    file_len: u64,
    limits: Limits,
) -> Result<(Header, Vec<u8>), GgufError> {
    let mut src = Source::new(reader, file_len, limits.header_len);

    let magic: [u8; 4] = src.fixed(|| Field::Magic)?;
    if magic == MAGIC_BYTE_SWAPPED {
        return Err(GgufError::BigEndian {
            field: Field::Magic,
            found: u32::from_le_bytes(magic),
        });
    }
    if magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = u32::from_le_bytes(src.fixed(|| Field::Version)?);
    check_version(version)?;
    let n_tensors = u64::from_le_bytes(src.fixed(|| Field::TensorCount)?);
    let n_kv = u64::from_le_bytes(src.fixed(|| Field::KeyValueCount)?);
    check_counts(n_tensors, n_kv, src.remaining(), limits)?;

    let mut parser = Parser {
        src,
        limits,
        array_elements: 0,
    };
    let kv = parser.key_values(n_kv)?;
    let alignment = alignment(&kv)?;
    let tensors = parser.tensor_infos(n_tensors)?;

    let mut src = parser.src;
    let header_len = src.pos();
    let padded = align_up(header_len, alignment).unwrap_or(u64::MAX);
    let data_start = if padded <= file_len {
        padded
    } else if tensors.is_empty() {
        file_len
    } else {
        return Err(GgufError::DataStartPastEof {
            data_start: padded,
            file_len,
        });
    };
    src.skip_padding(data_start - header_len)?;
    check_tiling(&tensors, alignment, file_len - data_start)?;

    let header = Header {
        version,
        alignment,
        kv,
        tensors,
        header_len,
        data_start,
        file_len,
    };
    Ok((header, src.raw))
}

/// Parses a split-file name `<prefix>-00001-of-00003.gguf` into
/// `(prefix, index, count)`, with `index` starting at 1.
///
/// The numbers must be written as llama.cpp's `%05d` writes them (at least
/// five digits, zero-padded, no sign), `1 <= index <= count` and the prefix
/// non-empty; anything else is `None`.
pub fn split_name(file_name: &str) -> Option<(String, u32, u32)> {
    let stem = file_name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, index) = rest.rsplit_once('-')?;
    let index = parse_split_number(index)?;
    let count = parse_split_number(count)?;
    if prefix.is_empty() || index == 0 || index > count {
        return None;
    }
    Some((prefix.to_owned(), index, count))
}

/// A number exactly as `%05d` prints it.
fn parse_split_number(s: &str) -> Option<u32> {
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = s.parse().ok()?;
    (format!("{n:05}") == s).then_some(n)
}

fn check_version(version: u32) -> Result<(), GgufError> {
    match version {
        0 => Err(GgufError::VersionZero),
        1 => Err(GgufError::VersionOne),
        2..=MAX_VERSION => Ok(()),
        // A big-endian v1..v3 file reads as 0x01000000..0x03000000 here.
        v if (1..=MAX_VERSION).contains(&v.swap_bytes()) => Err(GgufError::BigEndian {
            field: Field::Version,
            found: v,
        }),
        v => Err(GgufError::VersionTooNew {
            version: v,
            max: MAX_VERSION,
        }),
    }
}

/// Checks both counts against their limits and against the bytes left
/// (a cheap lower bound: the smallest possible key/value and tensor info).
fn check_counts(
    n_tensors: u64,
    n_kv: u64,
    remaining: u64,
    limits: Limits,
) -> Result<(), GgufError> {
    if n_tensors > limits.tensors {
        return Err(GgufError::TooManyTensors {
            count: n_tensors,
            max: limits.tensors,
        });
    }
    if n_kv > limits.key_values {
        return Err(GgufError::TooManyKeyValues {
            count: n_kv,
            max: limits.key_values,
        });
    }
    // Both counts are at most 2^20, so neither product can overflow.
    let kv_bytes = n_kv * MIN_KEY_VALUE_LEN;
    if kv_bytes > remaining {
        return Err(GgufError::KeyValueCountPastEof {
            count: n_kv,
            min_bytes: kv_bytes,
            remaining,
        });
    }
    let tensor_bytes = n_tensors * MIN_TENSOR_INFO_LEN;
    if tensor_bytes > remaining - kv_bytes {
        return Err(GgufError::TensorCountPastEof {
            count: n_tensors,
            min_bytes: tensor_bytes,
            remaining: remaining - kv_bytes,
        });
    }
    Ok(())
}

/// The alignment: `general.alignment` if present (a power-of-two `u32` in
/// `1..=MAX_ALIGNMENT`), else [`DEFAULT_ALIGNMENT`].
fn alignment(kv: &[KeyValue]) -> Result<u64, GgufError> {
    let Some(value) = kv
        .iter()
        .find(|kv| kv.key == ALIGNMENT_KEY)
        .map(|kv| &kv.value)
    else {
        return Ok(DEFAULT_ALIGNMENT.into());
    };
    let Value::U32(alignment) = *value else {
        return Err(GgufError::AlignmentWrongType {
            found: value.type_description(),
        });
    };
    if alignment == 0 {
        return Err(GgufError::AlignmentZero);
    }
    if !alignment.is_power_of_two() {
        return Err(GgufError::AlignmentNotPowerOfTwo { alignment });
    }
    if alignment > MAX_ALIGNMENT {
        return Err(GgufError::AlignmentTooLarge {
            alignment,
            max: MAX_ALIGNMENT,
        });
    }
    Ok(alignment.into())
}

/// Checks that the tensors, in info order, tile the data section: the first
/// at 0, each next at the previous end rounded up to the alignment, all
/// offsets aligned, the last ending within the file and followed by less
/// than one alignment of padding.
fn check_tiling(tensors: &[TensorInfo], alignment: u64, data_len: u64) -> Result<(), GgufError> {
    let mut expected = 0u64;
    let mut covered = 0u64;
    let mut previous: Option<&TensorInfo> = None;
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::OffsetMisaligned {
                name: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        if let Some(p) = previous {
            if t.offset < p.offset {
                return Err(GgufError::OffsetOutOfOrder {
                    name: t.name.clone(),
                    offset: t.offset,
                    previous: p.name.clone(),
                    previous_offset: p.offset,
                });
            }
            if t.offset < covered {
                return Err(GgufError::Overlap {
                    name: t.name.clone(),
                    offset: t.offset,
                    previous: p.name.clone(),
                    previous_end: covered,
                });
            }
        }
        if t.offset != expected {
            return Err(GgufError::Gap {
                name: t.name.clone(),
                offset: t.offset,
                expected,
            });
        }
        let end = t
            .offset
            .checked_add(t.byte_len)
            .filter(|&end| end <= data_len);
        let Some(end) = end else {
            return Err(GgufError::PastEndOfFile {
                name: t.name.clone(),
                offset: t.offset,
                end: t.offset.saturating_add(t.byte_len),
                data_len,
            });
        };
        covered = end;
        // `end <= data_len`, so a failure here means no tensor can follow.
        expected = align_up(end, alignment).unwrap_or(u64::MAX);
        previous = Some(t);
    }
    if data_len - covered >= alignment {
        return Err(GgufError::TrailingBytes {
            covered,
            data_len,
            alignment,
        });
    }
    Ok(())
}

/// `x` rounded up to a multiple of `alignment` (a power of two), `None` on overflow.
fn align_up(x: u64, alignment: u64) -> Option<u64> {
    let mask = alignment.checked_sub(1)?;
    x.checked_add(mask).map(|v| v & !mask)
}

/// Product of the dimensions, `None` on overflow.
fn checked_numel(dims: &[u64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// At most [`PREVIEW_CHARS`] characters of an untrusted string, for errors.
fn preview(s: &str) -> String {
    s.chars().take(PREVIEW_CHARS).collect()
}

/// The bytes read so far and the reader they came from.
struct Source<R> {
    reader: R,
    /// Every byte read, from offset 0.
    raw: Vec<u8>,
    file_len: u64,
    /// Longest header: [`MAX_HEADER_LEN`] but in tests.
    max_header_len: u64,
}

impl<R: Read> Source<R> {
    fn new(reader: R, file_len: u64, max_header_len: u64) -> Self {
        Source {
            reader,
            raw: Vec::new(),
            file_len,
            max_header_len,
        }
    }

    /// Absolute offset of the next byte.
    fn pos(&self) -> u64 {
        self.raw.len() as u64
    }

    /// Bytes left in the file.
    fn remaining(&self) -> u64 {
        self.file_len.saturating_sub(self.pos())
    }

    /// Checks that `n` more bytes fit in the file and in [`MAX_HEADER_LEN`].
    fn check_room(&self, n: u64, field: impl FnOnce() -> Field) -> Result<(), GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                field: field(),
                offset: self.pos(),
                needed: n,
                file_len: self.file_len,
            });
        }
        self.check_header_limit(n, || field().to_string())
    }

    fn check_header_limit(&self, n: u64, field: impl FnOnce() -> String) -> Result<(), GgufError> {
        let len = self.pos().saturating_add(n);
        if len > self.max_header_len {
            return Err(GgufError::HeaderTooLarge {
                field: field(),
                len,
                max: self.max_header_len,
            });
        }
        Ok(())
    }

    /// Reads a fixed-size field.
    fn fixed<const N: usize>(
        &mut self,
        field: impl FnOnce() -> Field,
    ) -> Result<[u8; N], GgufError> {
        self.check_room(N as u64, field)?;
        let start = self.raw.len();
        self.append(N)?;
        let mut out = [0u8; N];
        // `append` added exactly N bytes at `start`.
        out.copy_from_slice(&self.raw[start..]);
        Ok(out)
    }

    /// Reads `len` bytes of a string whose length was checked against the
    /// file and the limits; returns where they start in `raw`.
    fn bytes(&mut self, len: u64, field: impl FnOnce() -> String) -> Result<usize, GgufError> {
        self.check_header_limit(len, field)?;
        let start = self.raw.len();
        // `len` is at most MAX_HEADER_LEN (checked above), so it fits a usize.
        let len = usize::try_from(len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                "string length does not fit in memory",
            )
        })?;
        self.append(len)?;
        Ok(start)
    }

    /// Reads the alignment padding, which is not counted in the header limit.
    fn skip_padding(&mut self, n: u64) -> Result<(), GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                field: Field::Padding,
                offset: self.pos(),
                needed: n,
                file_len: self.file_len,
            });
        }
        // n < MAX_ALIGNMENT.
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        self.append(n)
    }

    /// Appends exactly `n` bytes from the reader to `raw`, in chunks, so that
    /// memory grows only with bytes that arrive; the caller has checked that
    /// the file has them.
    fn append(&mut self, n: usize) -> Result<(), GgufError> {
        let mut left = n;
        while left > 0 {
            let chunk = left.min(READ_CHUNK);
            let start = self.raw.len();
            self.raw.try_reserve(chunk).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!("cannot grow the header buffer by {chunk} bytes: {e}"),
                )
            })?;
            self.raw.resize(start + chunk, 0);
            let got = read_until_full_or_eof(&mut self.reader, &mut self.raw[start..])?;
            self.raw.truncate(start + got);
            if got < chunk {
                return Err(GgufError::UnexpectedEof {
                    offset: self.pos(),
                    file_len: self.file_len,
                });
            }
            left -= chunk;
        }
        Ok(())
    }
}

use crate::read::read_until_full_or_eof;

/// The key/value and tensor-info layer over a [`Source`].
struct Parser<R> {
    src: Source<R>,
    limits: Limits,
    /// Array elements read so far, for [`MAX_TOTAL_ARRAY_ELEMENTS`].
    array_elements: u64,
}

impl<R: Read> Parser<R> {
    fn u32(&mut self, field: impl FnOnce() -> Field) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.src.fixed(field)?))
    }

    fn u64(&mut self, field: impl FnOnce() -> Field) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.src.fixed(field)?))
    }

    fn key_values(&mut self, n_kv: u64) -> Result<Vec<KeyValue>, GgufError> {
        let mut kv = Vec::with_capacity(n_kv.min(PREALLOCATE_MAX) as usize);
        let mut seen: HashMap<String, u64> = HashMap::new();
        for index in 0..n_kv {
            let key = self.key(index)?;
            if let Some(&first) = seen.get(&key) {
                return Err(GgufError::DuplicateKey {
                    key: preview(&key),
                    first,
                    index,
                });
            }
            let type_id = self.u32(|| Field::ValueType { key: preview(&key) })?;
            let value = self.value(&key, type_id)?;
            seen.insert(key.clone(), index);
            kv.push(KeyValue { key, value });
        }
        Ok(kv)
    }

    /// A key: 1 to [`MAX_KEY_LEN`] bytes of printable ASCII.
    fn key(&mut self, index: u64) -> Result<String, GgufError> {
        let len = self.u64(|| Field::KeyLen { index })?;
        if len == 0 {
            return Err(GgufError::EmptyKey { index });
        }
        if len > MAX_KEY_LEN {
            return Err(GgufError::KeyTooLong {
                index,
                len,
                max: MAX_KEY_LEN,
            });
        }
        let start = self.string_bytes(len, || StringKind::Key { index })?;
        let bytes = &self.src.raw[start..];
        let lossy = || preview(&String::from_utf8_lossy(bytes));
        for (position, &byte) in bytes.iter().enumerate() {
            if !byte.is_ascii() {
                return Err(GgufError::KeyNotAscii {
                    index,
                    key: lossy(),
                    position: position as u64,
                    byte,
                });
            }
            if byte.is_ascii_control() {
                return Err(GgufError::KeyControlCharacter {
                    index,
                    key: lossy(),
                    position: position as u64,
                    byte,
                });
            }
        }
        // All bytes are ASCII, so this conversion is lossless.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// Checks a string length against the bytes left, then reads the bytes;
    /// returns where they start in the raw buffer.
    /// `kind` is called only for an error: a string array's elements would
    /// otherwise each build their description.
    fn string_bytes(
        &mut self,
        len: u64,
        kind: impl Fn() -> StringKind,
    ) -> Result<usize, GgufError> {
        let remaining = self.src.remaining();
        if len > remaining {
            return Err(GgufError::StringPastEof {
                kind: kind(),
                offset: self.src.pos(),
                len,
                remaining,
            });
        }
        self.src.bytes(len, || kind().to_string())
    }

    /// A string value or array element, decoded lossily.
    fn string_value(
        &mut self,
        key: &str,
        kind: impl Fn() -> StringKind,
    ) -> Result<String, GgufError> {
        let len = self.u64(|| Field::StringLen { key: preview(key) })?;
        if len > self.limits.string_len {
            return Err(GgufError::StringTooLong {
                kind: kind(),
                len,
                max: self.limits.string_len,
            });
        }
        let start = self.string_bytes(len, kind)?;
        Ok(String::from_utf8_lossy(&self.src.raw[start..]).into_owned())
    }

    fn value(&mut self, key: &str, type_id: u32) -> Result<Value, GgufError> {
        let Some(value_type) = ValueType::from_id(type_id) else {
            return Err(GgufError::UnknownValueType {
                key: preview(key),
                type_id,
                in_array: false,
            });
        };
        match value_type {
            ValueType::String => {
                Ok(Value::String(self.string_value(key, || {
                    StringKind::Value { key: preview(key) }
                })?))
            }
            ValueType::Array => self.array(key),
            scalar => self.scalar(key, scalar),
        }
    }

    /// A value of a fixed-size type.
    fn scalar(&mut self, key: &str, value_type: ValueType) -> Result<Value, GgufError> {
        let field = || Field::Value { key: preview(key) };
        Ok(match value_type {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.src.fixed(field)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.src.fixed(field)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.src.fixed(field)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.src.fixed(field)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.src.fixed(field)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.src.fixed(field)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.src.fixed(field)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.src.fixed(field)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.src.fixed(field)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.src.fixed(field)?)),
            ValueType::Bool => {
                let offset = self.src.pos();
                let [byte] = self.src.fixed(field)?;
                match byte {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    _ => {
                        return Err(GgufError::BoolNotZeroOrOne {
                            key: preview(key),
                            offset,
                            byte,
                        })
                    }
                }
            }
            ValueType::String | ValueType::Array => {
                // Callers pass only fixed-size types; answer as for a nested
                // array rather than panic.
                return Err(GgufError::NestedArray { key: preview(key) });
            }
        })
    }

    fn array(&mut self, key: &str) -> Result<Value, GgufError> {
        let header = || Field::ArrayHeader { key: preview(key) };
        let type_id = self.u32(header)?;
        let len = self.u64(header)?;
        let Some(elem_type) = ValueType::from_id(type_id) else {
            return Err(GgufError::UnknownValueType {
                key: preview(key),
                type_id,
                in_array: true,
            });
        };
        if elem_type == ValueType::Array {
            return Err(GgufError::NestedArray { key: preview(key) });
        }
        let Some(min_bytes) = len.checked_mul(elem_type.min_size()) else {
            return Err(GgufError::ArraySizeOverflow {
                key: preview(key),
                len,
                elem_type,
            });
        };
        let remaining = self.src.remaining();
        if min_bytes > remaining {
            return Err(GgufError::ArrayPastEof {
                key: preview(key),
                len,
                elem_type,
                min_bytes,
                remaining,
            });
        }
        if len > self.limits.array_len {
            return Err(GgufError::ArrayTooLong {
                key: preview(key),
                len,
                max: self.limits.array_len,
            });
        }
        // Both terms are at most the limits, 2^24 and 2^22.
        let total = self.array_elements.saturating_add(len);
        if total > self.limits.total_array_elements {
            return Err(GgufError::TooManyArrayElements {
                key: preview(key),
                total,
                max: self.limits.total_array_elements,
            });
        }
        self.array_elements = total;
        let mut items = Vec::with_capacity(len.min(PREALLOCATE_MAX) as usize);
        for element in 0..len {
            let item = if elem_type == ValueType::String {
                Value::String(self.string_value(key, || StringKind::ArrayElement {
                    key: preview(key),
                    element,
                })?)
            } else {
                self.scalar(key, elem_type)?
            };
            items.push(item);
        }
        Ok(Value::Array(elem_type, items))
    }

    fn tensor_infos(&mut self, n_tensors: u64) -> Result<Vec<TensorInfo>, GgufError> {
        let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOCATE_MAX) as usize);
        let mut seen: HashMap<String, u64> = HashMap::new();
        for index in 0..n_tensors {
            let name = self.tensor_name(index)?;
            if let Some(&first) = seen.get(&name) {
                return Err(GgufError::DuplicateTensorName { name, first, index });
            }
            let info = self.tensor_info(name)?;
            seen.insert(info.name.clone(), index);
            tensors.push(info);
        }
        Ok(tensors)
    }

    /// A tensor name: at most [`MAX_NAME_LEN`] bytes of UTF-8 without NUL.
    fn tensor_name(&mut self, index: u64) -> Result<String, GgufError> {
        let len = self.u64(|| Field::TensorNameLen { index })?;
        if len > MAX_NAME_LEN {
            return Err(GgufError::TensorNameTooLong {
                index,
                len,
                max: MAX_NAME_LEN,
            });
        }
        let start = self.string_bytes(len, || StringKind::TensorName { index })?;
        let bytes = &self.src.raw[start..];
        let name = match std::str::from_utf8(bytes) {
            Ok(name) => name.to_owned(),
            Err(e) => {
                return Err(GgufError::TensorNameNotUtf8 {
                    index,
                    name: String::from_utf8_lossy(bytes).into_owned(),
                    position: e.valid_up_to() as u64,
                })
            }
        };
        if name.contains('\0') {
            return Err(GgufError::TensorNameContainsNul { index, name });
        }
        Ok(name)
    }

    /// The rest of a tensor info: dimensions, type, offset.
    fn tensor_info(&mut self, name: String) -> Result<TensorInfo, GgufError> {
        let n_dims = self.u32(|| Field::DimCount { name: name.clone() })?;
        if n_dims == 0 {
            return Err(GgufError::NoDims { name });
        }
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                name,
                n_dims,
                max: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(MAX_DIMS as usize);
        for axis in 0..n_dims {
            let dim = self.u64(|| Field::Dim {
                name: name.clone(),
                axis,
            })?;
            if dim == 0 {
                return Err(GgufError::DimensionZero { name, axis });
            }
            if dim > i64::MAX as u64 {
                return Err(GgufError::DimensionNegative {
                    name,
                    axis,
                    value: dim,
                });
            }
            dims.push(dim);
        }
        let Some(numel) = checked_numel(&dims).filter(|&n| n <= i64::MAX as u64) else {
            return Err(GgufError::ElementCountOverflow { name, dims });
        };
        let type_id = self.u32(|| Field::TensorType { name: name.clone() })?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            if REMOVED_GGML_TYPE_IDS.contains(&type_id) {
                return Err(GgufError::RemovedTensorType { name, type_id });
            }
            return Err(GgufError::UnknownTensorType { name, type_id });
        };
        let block_elems = ggml_type.block_elems();
        // `dims` is not empty: n_dims >= 1.
        let ne0 = dims.first().copied().unwrap_or(0);
        if block_elems == 0 || ne0 % block_elems != 0 {
            return Err(GgufError::NotBlockMultiple {
                name,
                ggml_type,
                ne0,
                block_elems,
            });
        }
        let Some(byte_len) = ggml_type.bytes_for(numel) else {
            return Err(GgufError::ByteSizeOverflow {
                name,
                ggml_type,
                dims,
            });
        };
        let offset = self.u64(|| Field::TensorOffset { name: name.clone() })?;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            byte_len,
        })
    }
}

#[cfg(test)]
mod tests;
