//! One test per rejection reason of `shared/RELIABILITY.md`, built from
//! literal bytes with a tiny test-only GGUF writer; accepted edge cases; a
//! property-based round trip; truncation at every offset; and the fuzz seeds.

use super::*;
use proptest::prelude::*;
use std::io::Cursor;
use std::path::PathBuf;

// --- a test-only GGUF writer ------------------------------------------------

/// Appends a GGUF string: `u64` length, bytes.
fn put_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Appends a value without its type id.
fn put_payload(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_str(out, s.as_bytes()),
        Value::Array(elem, items) => {
            out.extend_from_slice(&elem.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_payload(out, item);
            }
        }
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// One encoded key/value: key, type id, value.
fn kv_bytes(key: &[u8], value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, key);
    out.extend_from_slice(&value.value_type().id().to_le_bytes());
    put_payload(&mut out, value);
    out
}

/// One encoded key/value whose value part (type id onwards) is given raw.
fn kv_raw(key: &[u8], type_and_value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, key);
    out.extend_from_slice(type_and_value);
    out
}

/// `u32` type id followed by `payload`.
fn typed(type_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = type_id.to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// An array header: element type id, count.
fn array_header(elem_type_id: u32, len: u64) -> Vec<u8> {
    let mut out = ValueType::Array.id().to_le_bytes().to_vec();
    out.extend_from_slice(&elem_type_id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

/// One tensor info to write.
#[derive(Clone, Debug)]
struct Info {
    name: Vec<u8>,
    dims: Vec<u64>,
    type_id: u32,
    /// `None`: the previous tensor's end rounded up to the alignment.
    offset: Option<u64>,
}

impl Info {
    /// Data bytes for known types and sizes that fit, else 0.
    fn byte_len(&self) -> u64 {
        GgmlType::from_id(self.type_id)
            .zip(checked_numel(&self.dims))
            .and_then(|(t, n)| t.bytes_for(n))
            .unwrap_or(0)
    }
}

/// A test-only GGUF writer that can also write broken files.
#[derive(Clone, Debug)]
struct Gguf {
    magic: [u8; 4],
    version: u32,
    /// Count overrides (the real counts otherwise).
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
    /// Encoded key/values and how many.
    kv: Vec<u8>,
    kv_count: u64,
    infos: Vec<Info>,
    /// Layout alignment (header padding, tensor offsets, tensor padding).
    alignment: u64,
    /// Length of the data section (the tensors' end, padded, otherwise).
    data_len: Option<u64>,
    /// Whether the last tensor is followed by its alignment padding.
    pad_last: bool,
}

impl Gguf {
    fn new() -> Gguf {
        Gguf {
            magic: MAGIC,
            version: 3,
            n_tensors: None,
            n_kv: None,
            kv: Vec::new(),
            kv_count: 0,
            infos: Vec::new(),
            alignment: DEFAULT_ALIGNMENT.into(),
            data_len: None,
            pad_last: true,
        }
    }

    fn magic(mut self, magic: [u8; 4]) -> Gguf {
        self.magic = magic;
        self
    }

    fn version(mut self, version: u32) -> Gguf {
        self.version = version;
        self
    }

    fn counts(mut self, n_tensors: u64, n_kv: u64) -> Gguf {
        self.n_tensors = Some(n_tensors);
        self.n_kv = Some(n_kv);
        self
    }

    fn kv(self, key: &str, value: Value) -> Gguf {
        self.kv_encoded(kv_bytes(key.as_bytes(), &value))
    }

    fn kv_encoded(mut self, bytes: Vec<u8>) -> Gguf {
        self.kv.extend_from_slice(&bytes);
        self.kv_count += 1;
        self
    }

    /// Sets `general.alignment` and lays the file out with it.
    fn alignment(self, alignment: u32) -> Gguf {
        self.kv(ALIGNMENT_KEY, Value::U32(alignment))
            .layout_alignment(alignment.into())
    }

    fn layout_alignment(mut self, alignment: u64) -> Gguf {
        self.alignment = alignment;
        self
    }

    fn tensor(self, name: &str, dims: &[u64], ggml_type: GgmlType) -> Gguf {
        self.tensor_raw(name.as_bytes(), dims, ggml_type.id(), None)
    }

    fn tensor_at(self, name: &str, dims: &[u64], ggml_type: GgmlType, offset: u64) -> Gguf {
        self.tensor_raw(name.as_bytes(), dims, ggml_type.id(), Some(offset))
    }

    fn tensor_raw(mut self, name: &[u8], dims: &[u64], type_id: u32, offset: Option<u64>) -> Gguf {
        self.infos.push(Info {
            name: name.to_vec(),
            dims: dims.to_vec(),
            type_id,
            offset,
        });
        self
    }

    fn data_len(mut self, data_len: u64) -> Gguf {
        self.data_len = Some(data_len);
        self
    }

    fn unpadded_end(mut self) -> Gguf {
        self.pad_last = false;
        self
    }

    /// The offsets the tensor infos get.
    fn offsets(&self) -> Vec<u64> {
        let mut next = 0u64;
        self.infos
            .iter()
            .map(|info| {
                let offset = info.offset.unwrap_or(next);
                let end = offset.saturating_add(info.byte_len());
                next = align_up(end, self.alignment).unwrap_or(u64::MAX);
                offset
            })
            .collect()
    }

    /// Bytes from the magic to the end of the last tensor info.
    fn header(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        let n_tensors = self.n_tensors.unwrap_or(self.infos.len() as u64);
        let n_kv = self.n_kv.unwrap_or(self.kv_count);
        out.extend_from_slice(&n_tensors.to_le_bytes());
        out.extend_from_slice(&n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        for (info, offset) in self.infos.iter().zip(self.offsets()) {
            put_str(&mut out, &info.name);
            out.extend_from_slice(&(info.dims.len() as u32).to_le_bytes());
            for d in &info.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&info.type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        out
    }

    /// The whole file: header, zero padding, data (bytes 1, 2, 3…).
    fn build(&self) -> Vec<u8> {
        let mut out = self.header();
        out.resize(
            align_up(out.len() as u64, self.alignment).unwrap() as usize,
            0,
        );
        let end = self
            .infos
            .iter()
            .zip(self.offsets())
            .map(|(info, offset)| offset.saturating_add(info.byte_len()))
            .max()
            .unwrap_or(0);
        let padded = if self.pad_last {
            align_up(end, self.alignment).unwrap_or(u64::MAX)
        } else {
            end
        };
        // Tensors too large to write are for files rejected before their data.
        let data_len = self
            .data_len
            .unwrap_or(if padded > 1 << 20 { 0 } else { padded });
        out.extend((0..data_len).map(|i| (i % 251) as u8 + 1));
        out
    }
}

/// Re-encodes a parsed header: magic to last tensor info, then zero padding
/// to `data_start`. Equals the raw bytes of any file the writer above made.
fn reencode(header: &Header) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&header.version.to_le_bytes());
    out.extend_from_slice(&(header.tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(header.kv.len() as u64).to_le_bytes());
    for kv in &header.kv {
        out.extend_from_slice(&kv_bytes(kv.key.as_bytes(), &kv.value));
    }
    for t in &header.tensors {
        put_str(&mut out, t.name.as_bytes());
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        out.extend_from_slice(&t.offset.to_le_bytes());
    }
    assert_eq!(out.len() as u64, header.header_len);
    out.resize(header.data_start as usize, 0);
    out
}

// --- helpers ------------------------------------------------------------------

/// Parses `bytes`, which must be accepted, and checks the raw bytes.
fn accept(bytes: &[u8]) -> Header {
    match read_header(bytes, bytes.len() as u64) {
        Ok((header, raw)) => {
            assert_eq!(raw.len() as u64, header.data_start);
            assert_eq!(raw, &bytes[..raw.len()]);
            assert_eq!(header.file_len, bytes.len() as u64);
            header
        }
        Err(e) => panic!("rejected a good file: {e}"),
    }
}

/// Parses `bytes`, which must be rejected; checks the message style and
/// returns the error.
fn reject(bytes: &[u8]) -> GgufError {
    reject_with(bytes, Limits::DEFAULT)
}

fn reject_with(bytes: &[u8], limits: Limits) -> GgufError {
    match read_header_with(bytes, bytes.len() as u64, limits) {
        Ok((header, _)) => panic!("accepted a bad file: {header:?}"),
        Err(e) => {
            assert_message_style(&e);
            e
        }
    }
}

/// One line, lower-case start, no final period.
fn assert_message_style(e: &GgufError) {
    let message = e.to_string();
    assert!(
        !message.contains('\n') && !message.contains('\r'),
        "{message:?}"
    );
    assert!(!message.ends_with('.'), "{message:?}");
    let first = message.chars().next().unwrap_or(' ');
    assert!(!first.is_uppercase() && first != ' ', "{message:?}");
}

/// A small valid file with key/values of several types and two tensors.
fn small_file() -> Gguf {
    Gguf::new()
        .kv(ARCHITECTURE_KEY, Value::String("llama".into()))
        .kv("llama.block_count", Value::U32(1))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(
                ValueType::String,
                vec![Value::String("a".into()), Value::String("<s>".into())],
            ),
        )
        .tensor("token_embd.weight", &[32, 2], GgmlType::Q8_0)
        .tensor("output_norm.weight", &[8], GgmlType::F32)
}

// --- magic and version ----------------------------------------------------------

#[test]
fn bad_magic() {
    for magic in [*b"GGML", *b"gguf", *b"\0\0\0\0", *b"GGJT", *b"UGGF"] {
        let e = reject(&Gguf::new().magic(magic).build());
        assert!(
            matches!(e, GgufError::BadMagic { found } if found == magic),
            "{e:?}"
        );
    }
    // Only the magic: no need for a version to know it is wrong.
    let e = reject(b"ggml");
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e:?}");
}

#[test]
fn big_endian_magic_or_version() {
    let e = reject(&Gguf::new().magic(*b"FUGG").build());
    assert!(
        matches!(e, GgufError::BigEndian { field: Field::Magic, found } if found == u32::from_le_bytes(*b"FUGG")),
        "{e:?}"
    );
    for version in [1u32, 2, 3] {
        let e = reject(&Gguf::new().version(version.swap_bytes()).build());
        assert!(
            matches!(e, GgufError::BigEndian { field: Field::Version, found } if found == version.swap_bytes()),
            "{e:?}"
        );
    }
}

#[test]
fn version_zero() {
    let e = reject(&Gguf::new().version(0).build());
    assert!(matches!(e, GgufError::VersionZero), "{e:?}");
}

#[test]
fn version_one_with_u32_counts() {
    // GGUF v1: u32 tensor count and u32 key/value count.
    let mut file = b"GGUF".to_vec();
    file.extend_from_slice(&1u32.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    let e = reject(&file);
    assert!(matches!(e, GgufError::VersionOne), "{e:?}");
}

#[test]
fn version_too_new() {
    for version in [4u32, 5, 0xffff, u32::MAX] {
        let e = reject(&Gguf::new().version(version).build());
        assert!(
            matches!(e, GgufError::VersionTooNew { version: v, max: 3 } if v == version),
            "{e:?}"
        );
    }
}

#[test]
fn version_2_and_3_with_u64_counts_are_accepted() {
    for version in [2, 3] {
        let file = small_file().version(version).build();
        let header = accept(&file);
        assert_eq!(header.version, version);
        assert_eq!(header.tensors.len(), 2);
        assert_eq!(header.kv.len(), 3);
    }
}

// --- counts -------------------------------------------------------------------------

#[test]
fn tensor_count_over_limit() {
    for count in [MAX_TENSORS + 1, 1 << 40, u64::MAX] {
        let e = reject(&Gguf::new().counts(count, 0).build());
        assert!(
            matches!(e, GgufError::TooManyTensors { count: c, max: MAX_TENSORS } if c == count),
            "{e:?}"
        );
    }
}

#[test]
fn key_value_count_over_limit() {
    for count in [MAX_KEY_VALUES + 1, u64::MAX] {
        let e = reject(&Gguf::new().counts(0, count).build());
        assert!(
            matches!(e, GgufError::TooManyKeyValues { count: c, max: MAX_KEY_VALUES } if c == count),
            "{e:?}"
        );
    }
}

#[test]
fn key_value_count_that_cannot_fit_in_the_file() {
    // 3 key/values need at least 42 bytes; the file has 24 + 20.
    let mut file = Gguf::new().counts(0, 3).header();
    file.extend_from_slice(&[0u8; 20]);
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::KeyValueCountPastEof {
                count: 3,
                min_bytes: 42,
                remaining: 20
            }
        ),
        "{e:?}"
    );
    // At the limit: one count more than fits is rejected before any read.
    let e = reject(&Gguf::new().counts(0, MAX_KEY_VALUES).build());
    assert!(matches!(e, GgufError::KeyValueCountPastEof { .. }), "{e:?}");
}

#[test]
fn tensor_count_that_cannot_fit_in_the_file() {
    // One key/value (at least 14 bytes) and 2 tensor infos (at least 64).
    let mut file = Gguf::new().counts(2, 1).header();
    file.extend_from_slice(&[0u8; 70]);
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::TensorCountPastEof {
                count: 2,
                min_bytes: 64,
                remaining: 56
            }
        ),
        "{e:?}"
    );
    let e = reject(&Gguf::new().counts(MAX_TENSORS, 0).build());
    assert!(matches!(e, GgufError::TensorCountPastEof { .. }), "{e:?}");
}

// --- strings ------------------------------------------------------------------------

#[test]
fn key_length_beyond_the_file() {
    let mut file = Gguf::new().counts(0, 1).header();
    file.extend_from_slice(&1000u64.to_le_bytes());
    file.extend_from_slice(b"general.name");
    file.extend_from_slice(&[0u8; 4]);
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::StringPastEof {
                kind: StringKind::Key { index: 0 },
                offset: 32,
                len: 1000,
                remaining: 16
            }
        ),
        "{e:?}"
    );
}

#[test]
fn string_value_length_beyond_the_file() {
    let mut value = 8u32.to_le_bytes().to_vec();
    value.extend_from_slice(&1_000_000u64.to_le_bytes());
    value.extend_from_slice(b"short");
    let file = Gguf::new()
        .kv_encoded(kv_raw(b"general.name", &value))
        .build();
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::StringPastEof { kind: StringKind::Value { ref key }, len: 1_000_000, .. } if key == "general.name"
        ),
        "{e:?}"
    );
}

#[test]
fn string_array_element_length_beyond_the_file() {
    let mut value = array_header(ValueType::String.id(), 2);
    put_str(&mut value, b"ok");
    value.extend_from_slice(&u64::MAX.to_le_bytes()); // over the limit: StringTooLong
    let e = reject(&Gguf::new().kv_encoded(kv_raw(b"tokens", &value)).build());
    assert!(
        matches!(
            e,
            GgufError::StringTooLong {
                kind: StringKind::ArrayElement { element: 1, .. },
                len: u64::MAX,
                max: MAX_STRING_LEN
            }
        ),
        "{e:?}"
    );
    let mut value = array_header(ValueType::String.id(), 2);
    put_str(&mut value, b"ok");
    value.extend_from_slice(&100u64.to_le_bytes()); // within the limit, past the file
    let e = reject(&Gguf::new().kv_encoded(kv_raw(b"tokens", &value)).header());
    assert!(
        matches!(
            e,
            GgufError::StringPastEof {
                kind: StringKind::ArrayElement { element: 1, .. },
                len: 100,
                remaining: 0,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn string_value_over_the_limit() {
    for len in [MAX_STRING_LEN + 1, 1 << 40, u64::MAX] {
        let mut value = 8u32.to_le_bytes().to_vec();
        value.extend_from_slice(&len.to_le_bytes());
        let e = reject(
            &Gguf::new()
                .kv_encoded(kv_raw(b"general.name", &value))
                .build(),
        );
        assert!(
            matches!(e, GgufError::StringTooLong { kind: StringKind::Value { .. }, len: l, max: MAX_STRING_LEN } if l == len),
            "{e:?}"
        );
    }
}

#[test]
fn tensor_name_length_beyond_the_file() {
    let mut file = Gguf::new().counts(1, 0).header();
    file.extend_from_slice(&40u64.to_le_bytes());
    file.extend_from_slice(&[b'x'; 30]);
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::StringPastEof {
                kind: StringKind::TensorName { index: 0 },
                len: 40,
                remaining: 30,
                ..
            }
        ),
        "{e:?}"
    );
}

// --- keys ---------------------------------------------------------------------------

#[test]
fn empty_key() {
    let file = Gguf::new().kv("", Value::U8(1)).build();
    let e = reject(&file);
    assert!(matches!(e, GgufError::EmptyKey { index: 0 }), "{e:?}");
}

#[test]
fn key_not_ascii() {
    let file = Gguf::new()
        .kv("general.name", Value::U8(1))
        .kv_encoded(kv_bytes("gen\u{e9}ral".as_bytes(), &Value::U8(1)))
        .build();
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::KeyNotAscii {
                index: 1,
                position: 3,
                byte: 0xc3,
                ..
            }
        ),
        "{e:?}"
    );
    // Invalid UTF-8 too.
    let file = Gguf::new()
        .kv_encoded(kv_bytes(b"\xff\xfe", &Value::U8(1)))
        .build();
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::KeyNotAscii {
                index: 0,
                position: 0,
                byte: 0xff,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn key_with_control_characters() {
    for (key, position, byte) in [
        (&b"general.alignment\0x"[..], 17u64, 0u8),
        (b"a\nb", 1, b'\n'),
        (b"\x7f", 0, 0x7f),
        (b"tab\there", 3, b'\t'),
    ] {
        let file = Gguf::new().kv_encoded(kv_bytes(key, &Value::U8(1))).build();
        let e = reject(&file);
        assert!(
            matches!(e, GgufError::KeyControlCharacter { index: 0, position: p, byte: b, .. } if p == position && b == byte),
            "{e:?}"
        );
    }
}

#[test]
fn key_too_long() {
    for len in [MAX_KEY_LEN + 1, 1 << 20, u64::MAX] {
        let mut file = Gguf::new().counts(0, 1).header();
        file.extend_from_slice(&len.to_le_bytes());
        file.extend_from_slice(&[b'k'; 64]);
        let e = reject(&file);
        assert!(
            matches!(e, GgufError::KeyTooLong { index: 0, len: l, max: MAX_KEY_LEN } if l == len),
            "{e:?}"
        );
    }
    // The longest key is accepted.
    let key = "k".repeat(MAX_KEY_LEN as usize);
    let header = accept(&Gguf::new().kv(&key, Value::Bool(true)).build());
    assert_eq!(header.kv[0].key, key);
}

#[test]
fn duplicate_keys() {
    let file = Gguf::new()
        .kv("general.name", Value::String("a".into()))
        .kv("general.type", Value::String("model".into()))
        .kv("general.name", Value::U32(3))
        .build();
    let e = reject(&file);
    assert!(
        matches!(e, GgufError::DuplicateKey { ref key, first: 0, index: 2 } if key == "general.name"),
        "{e:?}"
    );
}

// --- values -------------------------------------------------------------------------

#[test]
fn unknown_value_type() {
    for type_id in [13u32, 100, u32::MAX] {
        let file = Gguf::new()
            .kv_encoded(kv_raw(b"x", &typed(type_id, &[0u8; 8])))
            .build();
        let e = reject(&file);
        assert!(
            matches!(e, GgufError::UnknownValueType { ref key, type_id: t, in_array: false } if key == "x" && t == type_id),
            "{e:?}"
        );
    }
}

#[test]
fn unknown_array_element_type() {
    let mut value = array_header(13, 1);
    value.push(0);
    let e = reject(&Gguf::new().kv_encoded(kv_raw(b"x", &value)).build());
    assert!(
        matches!(
            e,
            GgufError::UnknownValueType {
                type_id: 13,
                in_array: true,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn nested_arrays() {
    // An array of 1 array of 1 u8: llama.cpp rejects it as an invalid type.
    let mut value = array_header(ValueType::Array.id(), 1);
    value.extend_from_slice(&ValueType::U8.id().to_le_bytes());
    value.extend_from_slice(&1u64.to_le_bytes());
    value.push(7);
    let e = reject(&Gguf::new().kv_encoded(kv_raw(b"nested", &value)).build());
    assert!(
        matches!(e, GgufError::NestedArray { ref key } if key == "nested"),
        "{e:?}"
    );
    // Even an empty one.
    let value = array_header(ValueType::Array.id(), 0);
    let e = reject(&Gguf::new().kv_encoded(kv_raw(b"nested", &value)).build());
    assert!(matches!(e, GgufError::NestedArray { .. }), "{e:?}");
}

#[test]
fn array_size_overflows_u64() {
    for (elem, len) in [
        (ValueType::U64, 1u64 << 61),
        (ValueType::U16, u64::MAX),
        (ValueType::F32, 1 << 62),
        (ValueType::String, 1 << 61),
    ] {
        let e = reject(
            &Gguf::new()
                .kv_encoded(kv_raw(b"arr", &array_header(elem.id(), len)))
                .build(),
        );
        assert!(
            matches!(e, GgufError::ArraySizeOverflow { len: l, elem_type, .. } if l == len && elem_type == elem),
            "{e:?}"
        );
    }
}

#[test]
fn array_length_beyond_the_file() {
    let mut value = array_header(ValueType::U32.id(), 1000);
    value.extend_from_slice(&[0u8; 12]);
    let e = reject(&Gguf::new().kv_encoded(kv_raw(b"arr", &value)).header());
    assert!(
        matches!(
            e,
            GgufError::ArrayPastEof {
                len: 1000,
                elem_type: ValueType::U32,
                min_bytes: 4000,
                remaining: 12,
                ..
            }
        ),
        "{e:?}"
    );
    // Strings take at least their 8-byte length each.
    let mut value = array_header(ValueType::String.id(), 3);
    value.extend_from_slice(&[0u8; 23]);
    let e = reject(&Gguf::new().kv_encoded(kv_raw(b"arr", &value)).header());
    assert!(
        matches!(
            e,
            GgufError::ArrayPastEof {
                len: 3,
                elem_type: ValueType::String,
                min_bytes: 24,
                remaining: 23,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn array_over_the_length_limit() {
    // Rejected before any element is read.
    let len = MAX_ARRAY_LEN + 1;
    let mut value = array_header(ValueType::U8.id(), len);
    value.resize(value.len() + len as usize, 0);
    let e = reject(&Gguf::new().kv_encoded(kv_raw(b"arr", &value)).build());
    assert!(
        matches!(e, GgufError::ArrayTooLong { len: l, max: MAX_ARRAY_LEN, .. } if l == len),
        "{e:?}"
    );
}

#[test]
fn arrays_over_the_total_element_limit() {
    let limits = Limits {
        total_array_elements: 10,
        ..Limits::DEFAULT
    };
    let file = Gguf::new()
        .kv("a", Value::Array(ValueType::U8, vec![Value::U8(0); 6]))
        .kv("b", Value::Array(ValueType::U8, vec![Value::U8(0); 4]))
        .kv("c", Value::Array(ValueType::U8, vec![Value::U8(0); 1]))
        .build();
    let e = reject_with(&file, limits);
    assert!(
        matches!(e, GgufError::TooManyArrayElements { ref key, total: 11, max: 10 } if key == "c"),
        "{e:?}"
    );
    assert!(read_header_with(&file[..], file.len() as u64, Limits::DEFAULT).is_ok());
}

#[test]
fn header_over_the_length_limit() {
    let limits = Limits {
        header_len: 100,
        ..Limits::DEFAULT
    };
    let file = Gguf::new()
        .kv("general.name", Value::String("x".repeat(70)))
        .build();
    let e = reject_with(&file, limits);
    assert!(
        matches!(
            e,
            GgufError::HeaderTooLarge {
                len: 126,
                max: 100,
                ..
            }
        ),
        "{e:?}"
    );
    // Fixed-size fields count too.
    let file = Gguf::new()
        .kv("general.name", Value::String("x".repeat(16)))
        .kv("general.size", Value::U64(1))
        .build();
    let e = reject_with(&file, limits);
    assert!(
        matches!(e, GgufError::HeaderTooLarge { ref field, len: 104, max: 100 } if field == "value of key \"general.size\""),
        "{e:?}"
    );
}

#[test]
fn small_limits_on_counts_and_strings() {
    let limits = Limits {
        tensors: 1,
        key_values: 1,
        string_len: 3,
        array_len: 2,
        ..Limits::DEFAULT
    };
    let e = reject_with(&small_file().build(), limits);
    assert!(
        matches!(e, GgufError::TooManyTensors { count: 2, max: 1 }),
        "{e:?}"
    );
    let e = reject_with(
        &Gguf::new()
            .kv("a", Value::U8(0))
            .kv("b", Value::U8(0))
            .build(),
        limits,
    );
    assert!(
        matches!(e, GgufError::TooManyKeyValues { count: 2, max: 1 }),
        "{e:?}"
    );
    let e = reject_with(
        &Gguf::new().kv("a", Value::String("four".into())).build(),
        limits,
    );
    assert!(
        matches!(e, GgufError::StringTooLong { len: 4, max: 3, .. }),
        "{e:?}"
    );
    let e = reject_with(
        &Gguf::new()
            .kv("a", Value::Array(ValueType::I8, vec![Value::I8(0); 3]))
            .build(),
        limits,
    );
    assert!(
        matches!(e, GgufError::ArrayTooLong { len: 3, max: 2, .. }),
        "{e:?}"
    );
}

#[test]
fn bool_not_zero_or_one() {
    for byte in [2u8, 0x80, 0xff] {
        let file = Gguf::new()
            .kv_encoded(kv_raw(b"flag", &typed(ValueType::Bool.id(), &[byte])))
            .build();
        let e = reject(&file);
        assert!(
            matches!(e, GgufError::BoolNotZeroOrOne { ref key, offset: 40, byte: b } if key == "flag" && b == byte),
            "{e:?}"
        );
    }
    // In an array too.
    let mut value = array_header(ValueType::Bool.id(), 3);
    value.extend_from_slice(&[0, 1, 2]);
    let e = reject(&Gguf::new().kv_encoded(kv_raw(b"flags", &value)).build());
    assert!(
        matches!(e, GgufError::BoolNotZeroOrOne { byte: 2, .. }),
        "{e:?}"
    );
}

// --- alignment ----------------------------------------------------------------------

#[test]
fn alignment_of_the_wrong_type() {
    for (value, found) in [
        (Value::U64(32), "u64"),
        (Value::I32(32), "i32"),
        (Value::U16(32), "u16"),
        (Value::String("32".into()), "str"),
        (
            Value::Array(ValueType::U32, vec![Value::U32(32)]),
            "arr[u32]",
        ),
    ] {
        let e = reject(&small_file().kv(ALIGNMENT_KEY, value).build());
        assert!(
            matches!(e, GgufError::AlignmentWrongType { found: ref f } if f == found),
            "{e:?}"
        );
    }
}

#[test]
fn alignment_zero() {
    let e = reject(&small_file().kv(ALIGNMENT_KEY, Value::U32(0)).build());
    assert!(matches!(e, GgufError::AlignmentZero), "{e:?}");
}

#[test]
fn alignment_not_a_power_of_two() {
    for alignment in [3u32, 24, 48, 96, u32::MAX] {
        let e = reject(
            &small_file()
                .kv(ALIGNMENT_KEY, Value::U32(alignment))
                .build(),
        );
        assert!(
            matches!(e, GgufError::AlignmentNotPowerOfTwo { alignment: a } if a == alignment),
            "{e:?}"
        );
    }
}

#[test]
fn alignment_huge() {
    for alignment in [MAX_ALIGNMENT * 2, 1 << 31] {
        let e = reject(
            &small_file()
                .kv(ALIGNMENT_KEY, Value::U32(alignment))
                .build(),
        );
        assert!(
            matches!(e, GgufError::AlignmentTooLarge { alignment: a, max: MAX_ALIGNMENT } if a == alignment),
            "{e:?}"
        );
    }
}

#[test]
fn alignments_that_are_accepted() {
    for alignment in [1u32, 2, 8, 32, 64, 4096, MAX_ALIGNMENT] {
        let file = small_file().alignment(alignment).build();
        let header = accept(&file);
        assert_eq!(header.alignment, u64::from(alignment));
        assert_eq!(header.data_start % u64::from(alignment), 0);
        assert_eq!(reencode(&header), &file[..header.data_start as usize]);
    }
}

// --- tensor infos ------------------------------------------------------------------

#[test]
fn tensor_name_of_64_bytes_or_more() {
    for len in [64u64, 65, 1 << 20, u64::MAX] {
        let mut file = Gguf::new().counts(1, 0).header();
        file.extend_from_slice(&len.to_le_bytes());
        file.extend_from_slice(&[b'n'; 100]);
        let e = reject(&file);
        assert!(
            matches!(e, GgufError::TensorNameTooLong { index: 0, len: l, max: 63 } if l == len),
            "{e:?}"
        );
    }
    let name = "n".repeat(63);
    let header = accept(&Gguf::new().tensor(&name, &[4], GgmlType::F32).build());
    assert_eq!(header.tensors[0].name, name);
}

#[test]
fn tensor_name_not_utf8_or_with_nul() {
    let file = Gguf::new()
        .tensor_raw(b"blk.\xff", &[4], GgmlType::F32.id(), None)
        .build();
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::TensorNameNotUtf8 {
                index: 0,
                position: 4,
                ..
            }
        ),
        "{e:?}"
    );
    let file = Gguf::new()
        .tensor_raw(b"a\0b", &[4], GgmlType::F32.id(), None)
        .build();
    let e = reject(&file);
    assert!(
        matches!(e, GgufError::TensorNameContainsNul { index: 0, ref name } if name == "a\0b"),
        "{e:?}"
    );
}

#[test]
fn empty_tensor_name_is_accepted_as_llama_cpp_does() {
    let header = accept(&Gguf::new().tensor("", &[4], GgmlType::F32).build());
    assert_eq!(header.tensors[0].name, "");
}

#[test]
fn duplicate_tensor_names() {
    let file = Gguf::new()
        .tensor("a", &[8], GgmlType::F32)
        .tensor("b", &[8], GgmlType::F32)
        .tensor("a", &[8], GgmlType::F32)
        .build();
    let e = reject(&file);
    assert!(
        matches!(e, GgufError::DuplicateTensorName { ref name, first: 0, index: 2 } if name == "a"),
        "{e:?}"
    );
}

#[test]
fn zero_dimensions() {
    let e = reject(&Gguf::new().tensor("t", &[], GgmlType::F32).build());
    assert!(
        matches!(e, GgufError::NoDims { ref name } if name == "t"),
        "{e:?}"
    );
}

#[test]
fn more_than_four_dimensions() {
    let e = reject(
        &Gguf::new()
            .tensor("t", &[1, 1, 1, 1, 1], GgmlType::F32)
            .build(),
    );
    assert!(
        matches!(
            e,
            GgufError::TooManyDims {
                n_dims: 5,
                max: 4,
                ..
            }
        ),
        "{e:?}"
    );
    let mut file = Gguf::new().counts(1, 0).header();
    put_str(&mut file, b"t");
    file.extend_from_slice(&u32::MAX.to_le_bytes());
    file.extend_from_slice(&[0u8; 64]);
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::TooManyDims {
                n_dims: u32::MAX,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn dimension_zero() {
    let e = reject(&Gguf::new().tensor("t", &[4, 0, 2], GgmlType::F32).build());
    assert!(
        matches!(e, GgufError::DimensionZero { axis: 1, .. }),
        "{e:?}"
    );
    let e = reject(&Gguf::new().tensor("t", &[0], GgmlType::F32).build());
    assert!(
        matches!(e, GgufError::DimensionZero { axis: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn dimension_negative() {
    for value in [1u64 << 63, u64::MAX, (1 << 63) + 32] {
        let e = reject(&Gguf::new().tensor("t", &[32, value], GgmlType::F32).build());
        assert!(
            matches!(e, GgufError::DimensionNegative { axis: 1, value: v, .. } if v == value),
            "{e:?}"
        );
    }
}

#[test]
fn element_count_overflow() {
    for dims in [
        &[1u64 << 32, 1 << 32][..],
        &[1 << 62, 2],
        &[1 << 40, 1 << 20, 1 << 4],
        &[i64::MAX as u64, 2, 1, 1],
    ] {
        let e = reject(&Gguf::new().tensor("t", dims, GgmlType::F32).build());
        assert!(
            matches!(e, GgufError::ElementCountOverflow { dims: ref d, .. } if d == dims),
            "{e:?}"
        );
    }
}

#[test]
fn byte_size_overflow() {
    // 2^62 elements fit an int64, 2^62 × 8 bytes do not fit a u64.
    let e = reject(
        &Gguf::new()
            .tensor("t", &[1 << 61, 2], GgmlType::F64)
            .build(),
    );
    assert!(
        matches!(
            e,
            GgufError::ByteSizeOverflow {
                ggml_type: GgmlType::F64,
                ..
            }
        ),
        "{e:?}"
    );
    let e = reject(&Gguf::new().tensor("t", &[1 << 62], GgmlType::I32).build());
    assert!(
        matches!(
            e,
            GgufError::ByteSizeOverflow {
                ggml_type: GgmlType::I32,
                ..
            }
        ),
        "{e:?}"
    );
    // Quantized types take under 2 bytes an element: an int64 count never overflows them.
    let header = Gguf::new()
        .tensor("t", &[1 << 56, 1 << 6], GgmlType::Q8_K)
        .data_len(0);
    let e = reject(&header.build());
    assert!(
        matches!(e, GgufError::PastEndOfFile { end, .. } if end == (1 << 54) * 292),
        "{e:?}"
    );
}

#[test]
fn first_dimension_not_a_multiple_of_the_block() {
    for (dims, ggml_type) in [
        (&[33u64][..], GgmlType::Q4_0),
        (&[128, 2], GgmlType::Q4_K),
        (&[16, 16], GgmlType::MXFP4),
        (&[255, 256], GgmlType::TQ1_0),
    ] {
        let e = reject(&Gguf::new().tensor("t", dims, ggml_type).build());
        assert!(
            matches!(e, GgufError::NotBlockMultiple { ggml_type: t, ne0, block_elems, .. }
                if t == ggml_type && ne0 == dims[0] && block_elems == ggml_type.block_elems()),
            "{e:?}"
        );
    }
}

#[test]
fn unknown_tensor_type() {
    for type_id in [42u32, 43, 1000, u32::MAX] {
        let file = Gguf::new().tensor_raw(b"t", &[64], type_id, None).build();
        let e = reject(&file);
        assert!(
            matches!(e, GgufError::UnknownTensorType { type_id: t, .. } if t == type_id),
            "{e:?}"
        );
    }
}

#[test]
fn removed_tensor_type() {
    for type_id in [4u32, 5, 31, 32, 33, 36, 37, 38] {
        let file = Gguf::new().tensor_raw(b"t", &[256], type_id, None).build();
        let e = reject(&file);
        assert!(
            matches!(e, GgufError::RemovedTensorType { type_id: t, .. } if t == type_id),
            "{e:?}"
        );
    }
}

// --- tensor data layout ------------------------------------------------------------

#[test]
fn offset_misaligned() {
    let file = Gguf::new()
        .tensor("a", &[4], GgmlType::F32)
        .tensor_at("b", &[4], GgmlType::F32, 16)
        .build();
    let e = reject(&file);
    assert!(
        matches!(e, GgufError::OffsetMisaligned { ref name, offset: 16, alignment: 32 } if name == "b"),
        "{e:?}"
    );
    let file = Gguf::new().tensor_at("a", &[4], GgmlType::F32, 1).build();
    let e = reject(&file);
    assert!(
        matches!(e, GgufError::OffsetMisaligned { offset: 1, .. }),
        "{e:?}"
    );
}

#[test]
fn offset_out_of_order() {
    let file = Gguf::new()
        .tensor("a", &[8], GgmlType::F32)
        .tensor("b", &[8], GgmlType::F32)
        .tensor_at("c", &[8], GgmlType::F32, 0)
        .build();
    let e = reject(&file);
    assert!(
        matches!(e, GgufError::OffsetOutOfOrder { ref name, offset: 0, ref previous, previous_offset: 32 }
            if name == "c" && previous == "b"),
        "{e:?}"
    );
}

#[test]
fn overlapping_tensors() {
    let file = Gguf::new()
        .tensor("a", &[16], GgmlType::F32) // [0, 64)
        .tensor_at("b", &[8], GgmlType::F32, 32)
        .build();
    let e = reject(&file);
    assert!(
        matches!(e, GgufError::Overlap { ref name, offset: 32, ref previous, previous_end: 64 }
            if name == "b" && previous == "a"),
        "{e:?}"
    );
    // The same offset twice.
    let file = Gguf::new()
        .tensor("a", &[8], GgmlType::F32)
        .tensor_at("b", &[8], GgmlType::F32, 0)
        .build();
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::Overlap {
                offset: 0,
                previous_end: 32,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn gap_between_or_before_tensors() {
    let file = Gguf::new()
        .tensor("a", &[8], GgmlType::F32)
        .tensor_at("b", &[8], GgmlType::F32, 64)
        .build();
    let e = reject(&file);
    assert!(
        matches!(e, GgufError::Gap { ref name, offset: 64, expected: 32 } if name == "b"),
        "{e:?}"
    );
    let file = Gguf::new().tensor_at("a", &[8], GgmlType::F32, 32).build();
    let e = reject(&file);
    assert!(
        matches!(
            e,
            GgufError::Gap {
                offset: 32,
                expected: 0,
                ..
            }
        ),
        "{e:?}"
    );
    // Padding of exactly the alignment is accepted: a 3-byte tensor is followed by 29.
    let header = accept(
        &Gguf::new()
            .tensor("a", &[3], GgmlType::I8)
            .tensor("b", &[3], GgmlType::I8)
            .build(),
    );
    assert_eq!(header.tensors[1].offset, 32);
}

#[test]
fn tensor_past_end_of_file() {
    let good = small_file().build();
    let header = accept(&good);
    let last = header.tensors.last().unwrap();
    let end = header.data_start + last.offset + last.byte_len;
    let cut = &good[..end as usize - 1];
    let e = reject(cut);
    assert!(
        matches!(e, GgufError::PastEndOfFile { ref name, end: e, data_len, .. }
            if *name == last.name && e == last.offset + last.byte_len && data_len == e - 1),
        "{e:?}"
    );
    // An offset so large that offset + size overflows.
    let huge = !31u64;
    let file = Gguf::new()
        .tensor("a", &[8], GgmlType::F32)
        .tensor_at("b", &[8], GgmlType::F32, huge)
        .data_len(32)
        .build();
    let e = reject(&file);
    assert!(
        matches!(e, GgufError::Gap { offset, .. } if offset == huge),
        "{e:?}"
    );
}

#[test]
fn data_start_past_end_of_file() {
    let good = Gguf::new().tensor("a", &[8], GgmlType::F32).build();
    let header = accept(&good);
    assert!(header.data_start > header.header_len);
    let cut = &good[..header.header_len as usize + 1];
    let e = reject(cut);
    assert!(
        matches!(e, GgufError::DataStartPastEof { data_start, file_len }
            if data_start == header.data_start && file_len == header.header_len + 1),
        "{e:?}"
    );
}

#[test]
fn trailing_bytes_after_the_last_tensor() {
    let e = reject(
        &Gguf::new()
            .tensor("a", &[3], GgmlType::I8)
            .data_len(3 + 32)
            .build(),
    );
    assert!(
        matches!(
            e,
            GgufError::TrailingBytes {
                covered: 3,
                data_len: 35,
                alignment: 32
            }
        ),
        "{e:?}"
    );
    // Without tensors, too.
    let e = reject(&Gguf::new().kv("a", Value::U8(1)).data_len(32).build());
    assert!(
        matches!(
            e,
            GgufError::TrailingBytes {
                covered: 0,
                data_len: 32,
                ..
            }
        ),
        "{e:?}"
    );
    // Any padding shorter than the alignment is accepted.
    for data_len in 3..35 {
        accept(
            &Gguf::new()
                .tensor("a", &[3], GgmlType::I8)
                .data_len(data_len)
                .build(),
        );
    }
}

// --- reading ---------------------------------------------------------------------------

#[test]
fn truncated_inside_a_fixed_field() {
    let e = reject(b"GG");
    assert!(
        matches!(
            e,
            GgufError::Truncated {
                field: Field::Magic,
                offset: 0,
                needed: 4,
                file_len: 2
            }
        ),
        "{e:?}"
    );
    let e = reject(b"GGUF\x03\x00\x00\x00\x00\x00");
    assert!(
        matches!(
            e,
            GgufError::Truncated {
                field: Field::TensorCount,
                offset: 8,
                needed: 8,
                file_len: 10
            }
        ),
        "{e:?}"
    );
}

#[test]
fn truncated_at_every_offset() {
    // No trailing padding, so every shorter file is missing tensor bytes.
    let good = small_file()
        .kv("general.alignment", Value::U32(16))
        .layout_alignment(16)
        .unpadded_end()
        .build();
    let header = accept(&good);
    assert_eq!(header.data_start + header.data_len(), good.len() as u64);
    for cut in 0..good.len() {
        let e = reject(&good[..cut]);
        if (cut as u64) < header.data_start {
            // The caller promised the full length: the reader runs dry instead.
            let e = read_header(&good[..cut], good.len() as u64).unwrap_err();
            assert_message_style(&e);
            assert!(
                matches!(e, GgufError::UnexpectedEof { offset, .. } if offset == cut as u64),
                "{cut}: {e:?}"
            );
        } else {
            assert!(matches!(e, GgufError::PastEndOfFile { .. }), "{cut}: {e:?}");
        }
    }
}

#[test]
fn reader_shorter_than_file_len() {
    let good = small_file().build();
    let e = read_header(&good[..100], good.len() as u64).unwrap_err();
    assert!(
        matches!(e, GgufError::UnexpectedEof { offset: 100, file_len } if file_len == good.len() as u64),
        "{e:?}"
    );
}

#[test]
fn file_len_shorter_than_the_reader() {
    // The reader has more bytes than the caller says the file has: only
    // `file_len` counts.
    let good = small_file().build();
    let e = read_header(&good[..], 60).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::KeyValueCountPastEof {
                count: 3,
                min_bytes: 42,
                remaining: 36
            }
        ),
        "{e:?}"
    );
    let e = read_header(&good[..], 200).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::StringPastEof { .. } | GgufError::Truncated { .. }
        ),
        "{e:?}"
    );
}

/// Hands out at most 3 bytes a call and an `Interrupted` error every other call.
struct Trickle<'a> {
    data: &'a [u8],
    calls: u32,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls.is_multiple_of(2) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "again"));
        }
        let n = buf.len().min(3).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn short_and_interrupted_reads() {
    let good = small_file().build();
    let (expected, raw) = read_header(&good[..], good.len() as u64).unwrap();
    let reader = Trickle {
        data: &good,
        calls: 0,
    };
    let (header, raw2) = read_header(reader, good.len() as u64).unwrap();
    assert_eq!(header, expected);
    assert_eq!(raw2, raw);
}

struct Broken;

impl Read for Broken {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::other("disk on fire"))
    }
}

struct Liar;

impl Read for Liar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(buf.len() + 1)
    }
}

#[test]
fn read_errors_are_io_errors() {
    let e = read_header(Broken, 100).unwrap_err();
    assert_message_style(&e);
    assert!(
        matches!(e, GgufError::Io(ref io) if io.to_string() == "disk on fire"),
        "{e:?}"
    );
    let e = read_header(Liar, 100).unwrap_err();
    assert!(
        matches!(e, GgufError::Io(ref io) if io.kind() == io::ErrorKind::InvalidData),
        "{e:?}"
    );
}

#[test]
fn reads_only_the_header() {
    let good = small_file().build();
    let mut cursor = Cursor::new(&good);
    let (header, raw) = read_header(&mut cursor, good.len() as u64).unwrap();
    assert_eq!(cursor.position(), header.data_start);
    assert_eq!(raw.len() as u64, header.data_start);
    assert!(header.data_start < good.len() as u64);
}

// --- accepted files ------------------------------------------------------------------

#[test]
fn small_file_fields() {
    let file = small_file().build();
    let header = accept(&file);
    assert_eq!(header.version, 3);
    assert_eq!(header.alignment, 32);
    assert_eq!(header.architecture(), Some("llama"));
    assert_eq!(header.get("llama.block_count"), Some(&Value::U32(1)));
    assert_eq!(
        header.get("llama.block_count").and_then(Value::as_u64),
        Some(1)
    );
    assert_eq!(header.get("missing"), None);
    let embd = header.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.dims, vec![32, 2]);
    assert_eq!(embd.shape(), vec![2, 32]);
    assert_eq!(embd.numel(), 64);
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.byte_len, 2 * 34);
    assert_eq!(embd.offset, 0);
    let norm = &header.tensors[1];
    assert_eq!(norm.name, "output_norm.weight");
    assert_eq!(norm.offset, 96);
    assert_eq!(norm.byte_len, 32);
    assert_eq!(header.data_start % 32, 0);
    assert_eq!(header.data_len(), 128);
    assert_eq!(reencode(&header), &file[..header.data_start as usize]);
}

#[test]
fn zero_tensors_and_zero_key_values() {
    // Just the 24-byte preamble: no padding needed without tensors.
    let file = Gguf::new().build();
    assert_eq!(file.len(), 32);
    let header = accept(&file);
    assert_eq!((header.header_len, header.data_start), (24, 32));
    let header = accept(&file[..24]);
    assert_eq!(
        (header.header_len, header.data_start, header.file_len),
        (24, 24, 24)
    );
    // A vocabulary-only file as gguf-py writes it: key/values, no padding.
    let vocab = small_file();
    let vocab = Gguf {
        infos: Vec::new(),
        ..vocab
    };
    let bytes = vocab.header();
    let header = accept(&bytes);
    assert!(header.tensors.is_empty());
    assert_eq!(header.data_start, bytes.len() as u64);
    assert_eq!(header.data_start, header.header_len);
}

#[test]
fn every_value_type() {
    let scalars = vec![
        Value::U8(0xfe),
        Value::I8(-3),
        Value::U16(0xfffe),
        Value::I16(-300),
        Value::U32(0xdead_beef),
        Value::I32(-70_000),
        Value::F32(1.5),
        Value::Bool(true),
        Value::Bool(false),
        Value::String("héllo ✓".into()),
        Value::String(String::new()),
        Value::U64(u64::MAX),
        Value::I64(i64::MIN),
        Value::F64(-2.25),
    ];
    let mut gguf = Gguf::new();
    for (i, v) in scalars.iter().enumerate() {
        gguf = gguf.kv(&format!("scalar.{i}"), v.clone());
    }
    for (i, v) in scalars.iter().enumerate() {
        let array = Value::Array(v.value_type(), vec![v.clone(), v.clone()]);
        gguf = gguf.kv(&format!("array.{i}"), array);
    }
    for t in ValueType::ALL {
        if t != ValueType::Array {
            gguf = gguf.kv(&format!("empty.{}", t.name()), Value::Array(t, Vec::new()));
        }
    }
    let file = gguf.tensor("t", &[1], GgmlType::F32).build();
    let header = accept(&file);
    for (i, v) in scalars.iter().enumerate() {
        assert_eq!(header.get(&format!("scalar.{i}")), Some(v));
        assert_eq!(
            header.get(&format!("array.{i}")),
            Some(&Value::Array(v.value_type(), vec![v.clone(), v.clone()]))
        );
    }
    assert_eq!(
        header.get("empty.str"),
        Some(&Value::Array(ValueType::String, Vec::new()))
    );
    assert_eq!(header.kv.len(), 2 * scalars.len() + 12);
    assert_eq!(reencode(&header), &file[..header.data_start as usize]);
}

#[test]
fn arrays_of_strings() {
    let tokens: Vec<Value> = ["<unk>", "<s>", "</s>", "▁the", ""]
        .iter()
        .map(|s| Value::String((*s).into()))
        .collect();
    let file = Gguf::new()
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(ValueType::String, tokens.clone()),
        )
        .build();
    let header = accept(&file);
    assert_eq!(
        header.get("tokenizer.ggml.tokens"),
        Some(&Value::Array(ValueType::String, tokens))
    );
}

#[test]
fn invalid_utf8_in_string_values_is_accepted_and_kept_raw() {
    // llama.cpp does not validate string values; byte-fallback vocabularies
    // can hold any bytes.
    let mut array = array_header(ValueType::String.id(), 2);
    put_str(&mut array, b"\xe2\x96");
    put_str(&mut array, b"ok");
    let mut value = typed(ValueType::String.id(), &[]);
    put_str(&mut value, b"caf\xe9");
    let file = Gguf::new()
        .kv_encoded(kv_raw(b"general.name", &value))
        .kv_encoded(kv_raw(b"tokenizer.ggml.tokens", &array))
        .tensor("t", &[2], GgmlType::F16)
        .build();
    let (header, raw) = read_header(&file[..], file.len() as u64).unwrap();
    assert_eq!(
        header.get("general.name"),
        Some(&Value::String("caf\u{fffd}".into()))
    );
    assert_eq!(
        header.get("tokenizer.ggml.tokens"),
        Some(&Value::Array(
            ValueType::String,
            vec![Value::String("\u{fffd}".into()), Value::String("ok".into())]
        ))
    );
    assert_eq!(raw, &file[..header.data_start as usize]);
}

#[test]
fn every_ggml_type() {
    let mut gguf = Gguf::new();
    for t in GgmlType::all() {
        gguf = gguf.tensor(&format!("t.{}", t.name()), &[t.block_elems() * 2, 3], t);
    }
    let file = gguf.build();
    let header = accept(&file);
    for (info, t) in header.tensors.iter().zip(GgmlType::all()) {
        assert_eq!(info.ggml_type, t);
        assert_eq!(info.byte_len, 6 * t.block_bytes());
        assert_eq!(info.numel(), 6 * t.block_elems());
    }
}

/// (name, type, dims, byte_len, offset) of the tensors in the gguf-py vectors.
type Expected = (&'static str, GgmlType, &'static [u64], u64, u64);

fn check_tensors(header: &Header, expected: &[Expected]) {
    let got: Vec<Expected> = header
        .tensors
        .iter()
        .zip(expected)
        .map(|(t, e)| (e.0, t.ggml_type, e.2, t.byte_len, t.offset))
        .collect();
    assert_eq!(got, expected);
    for (t, e) in header.tensors.iter().zip(expected) {
        assert_eq!((t.name.as_str(), t.dims.as_slice()), (e.0, e.2));
    }
    assert_eq!(header.tensors.len(), expected.len());
}

#[test]
fn files_written_by_gguf_py() {
    // Written by llama.cpp's gguf-py (vectors/make_vectors.py); the numbers
    // are what its GGUFReader reports.
    let tiny = include_bytes!("vectors/gguf-py-tiny.gguf");
    let header = accept(tiny);
    assert_eq!((header.version, header.alignment), (3, 32));
    assert_eq!((header.data_start, header.file_len), (800, 1120));
    let keys: Vec<&str> = header.kv.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "general.architecture",
            "llama.block_count",
            "llama.context_length",
            "llama.embedding_length",
            "llama.attention.layer_norm_rms_epsilon",
            "tpde.flag",
            "tpde.u64",
            "tpde.i8",
            "tpde.f64",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
        ]
    );
    assert_eq!(header.architecture(), Some("llama"));
    assert_eq!(header.get("llama.block_count"), Some(&Value::U32(1)));
    assert_eq!(
        header.get("llama.attention.layer_norm_rms_epsilon"),
        Some(&Value::F32(1e-5))
    );
    assert_eq!(header.get("tpde.flag"), Some(&Value::Bool(true)));
    assert_eq!(header.get("tpde.u64"), Some(&Value::U64((1 << 63) + 1)));
    assert_eq!(header.get("tpde.i8"), Some(&Value::I8(-7)));
    assert_eq!(header.get("tpde.f64"), Some(&Value::F64(-0.5)));
    let tokens = ["<unk>", "<s>", "\u{2581}the", "\u{fffd}"];
    assert_eq!(
        header.get("tokenizer.ggml.tokens"),
        Some(&Value::Array(
            ValueType::String,
            tokens.iter().map(|t| Value::String((*t).into())).collect()
        ))
    );
    assert_eq!(
        header.get("tokenizer.ggml.token_type"),
        Some(&Value::Array(
            ValueType::I32,
            [2, 3, 1, 6].into_iter().map(Value::I32).collect()
        ))
    );
    check_tensors(
        &header,
        &[
            ("token_embd.weight", GgmlType::F32, &[8, 4], 128, 0),
            ("blk.0.attn_norm.weight", GgmlType::F16, &[8], 16, 128),
            ("blk.0.ffn_up.weight", GgmlType::Q8_0, &[32, 2], 68, 160),
            ("output.weight", GgmlType::I32, &[5, 3], 60, 256),
        ],
    );

    let aligned = include_bytes!("vectors/gguf-py-aligned-64.gguf");
    let header = accept(aligned);
    assert_eq!(header.alignment, 64);
    assert_eq!((header.data_start, header.file_len), (832, 1216));
    check_tensors(
        &header,
        &[
            ("token_embd.weight", GgmlType::F32, &[8, 4], 128, 0),
            ("blk.0.attn_norm.weight", GgmlType::F16, &[8], 16, 128),
            ("blk.0.ffn_up.weight", GgmlType::Q8_0, &[32, 2], 68, 192),
            ("output.weight", GgmlType::I32, &[5, 3], 60, 320),
        ],
    );

    // Vocabulary only: no tensor infos and no padding (GGUFReader computes a
    // data offset of 160, past the 132-byte file).
    let vocab = include_bytes!("vectors/gguf-py-vocab-only.gguf");
    let header = accept(vocab);
    assert!(header.tensors.is_empty());
    assert_eq!(
        (header.header_len, header.data_start, header.file_len),
        (132, 132, 132)
    );
    assert_eq!(reencode(&header), vocab);
}

#[test]
fn value_type_ids() {
    for (id, t) in ValueType::ALL.into_iter().enumerate() {
        assert_eq!(t.id(), id as u32);
        assert_eq!(ValueType::from_id(id as u32), Some(t));
    }
    assert_eq!(ValueType::from_id(13), None);
    assert_eq!(ValueType::from_id(u32::MAX), None);
}

#[test]
fn numel_and_shape_of_hand_built_infos() {
    let info = TensorInfo {
        name: "x".into(),
        dims: vec![u64::MAX, 2],
        ggml_type: GgmlType::F32,
        offset: 0,
        byte_len: 0,
    };
    assert_eq!(info.numel(), u64::MAX);
    assert_eq!(info.shape(), vec![2, u64::MAX]);
}

#[test]
fn split_names() {
    assert_eq!(
        split_name("Qwen3-Coder-Q8_0-00001-of-00004.gguf"),
        Some(("Qwen3-Coder-Q8_0".into(), 1, 4))
    );
    assert_eq!(
        split_name("m-00003-of-00003.gguf"),
        Some(("m".into(), 3, 3))
    );
    assert_eq!(
        split_name("m-123456-of-200000.gguf"),
        Some(("m".into(), 123_456, 200_000))
    );
    assert_eq!(
        split_name("a-b-00002-of-00010.gguf"),
        Some(("a-b".into(), 2, 10))
    );
    for bad in [
        "model.gguf",
        "m-00001-of-00003.bin",
        "m-00004-of-00003.gguf",
        "m-00000-of-00003.gguf",
        "m-1-of-3.gguf",
        "m-0001-of-00003.gguf",
        "m-+0001-of-00003.gguf",
        "-00001-of-00003.gguf",
        "m-00001-of-00000.gguf",
        "m-000001-of-00003.gguf",
        "m-00001-of-99999999999.gguf",
        "m_00001-of-00003.gguf",
        "",
    ] {
        assert_eq!(split_name(bad), None, "{bad}");
    }
}

#[test]
fn error_messages() {
    let e = reject(&Gguf::new().tensor("w", &[33], GgmlType::Q4_0).build());
    assert_eq!(
        e.to_string(),
        "tensor \"w\": first dimension 33 is not a multiple of the 32-element block of Q4_0"
    );
    let e = reject(
        &Gguf::new()
            .kv("k", Value::U8(1))
            .kv("k", Value::U8(1))
            .build(),
    );
    assert_eq!(e.to_string(), "duplicate key \"k\" (key/values 0 and 1)");
    let e = reject(&Gguf::new().version(1).build());
    assert_eq!(
        e.to_string(),
        "gguf version 1 (32-bit counts) is no longer supported"
    );
}

// --- properties ------------------------------------------------------------------------

fn scalar_strategy(t: ValueType) -> BoxedStrategy<Value> {
    match t {
        ValueType::U8 => any::<u8>().prop_map(Value::U8).boxed(),
        ValueType::I8 => any::<i8>().prop_map(Value::I8).boxed(),
        ValueType::U16 => any::<u16>().prop_map(Value::U16).boxed(),
        ValueType::I16 => any::<i16>().prop_map(Value::I16).boxed(),
        ValueType::U32 => any::<u32>().prop_map(Value::U32).boxed(),
        ValueType::I32 => any::<i32>().prop_map(Value::I32).boxed(),
        ValueType::F32 => any::<u32>()
            .prop_map(|b| Value::F32(f32::from_bits(b)))
            .boxed(),
        ValueType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ValueType::String => "\\PC{0,12}".prop_map(Value::String).boxed(),
        ValueType::U64 => any::<u64>().prop_map(Value::U64).boxed(),
        ValueType::I64 => any::<i64>().prop_map(Value::I64).boxed(),
        ValueType::F64 => any::<u64>()
            .prop_map(|b| Value::F64(f64::from_bits(b)))
            .boxed(),
        ValueType::Array => Just(Value::U8(0)).boxed(),
    }
}

fn scalar_type() -> impl Strategy<Value = ValueType> {
    proptest::sample::select(
        ValueType::ALL
            .into_iter()
            .filter(|&t| t != ValueType::Array)
            .collect::<Vec<_>>(),
    )
}

fn value_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => scalar_type().prop_flat_map(scalar_strategy),
        1 => scalar_type().prop_flat_map(|t| {
            proptest::collection::vec(scalar_strategy(t), 0..6).prop_map(move |v| Value::Array(t, v))
        }),
    ]
}

/// (name, dims, type) with `ne[0]` a whole number of blocks.
fn tensor_strategy() -> impl Strategy<Value = (Vec<u64>, GgmlType)> {
    (
        proptest::sample::select(GgmlType::all().collect::<Vec<_>>()),
        1u64..3,
        proptest::collection::vec(1u64..4, 0..3),
    )
        .prop_map(|(t, blocks, rest)| {
            let mut dims = vec![blocks * t.block_elems()];
            dims.extend(rest);
            (dims, t)
        })
}

/// A writer, the key/values it writes and its tensors (name, dims, type).
type FileCase = (
    Gguf,
    Vec<(String, Value)>,
    Vec<(String, Vec<u64>, GgmlType)>,
);

fn file_strategy() -> impl Strategy<Value = FileCase> {
    (
        proptest::collection::btree_map("[a-z][a-z0-9_.]{0,24}", value_strategy(), 0..8),
        proptest::collection::btree_map("[a-zA-Z0-9_.]{0,63}", tensor_strategy(), 0..6),
        proptest::sample::select(vec![
            None,
            Some(1u32),
            Some(4),
            Some(16),
            Some(64),
            Some(256),
        ]),
        2u32..4,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(kvs, tensors, alignment, version, pad_last, order)| {
            let mut kvs: Vec<(String, Value)> = kvs
                .into_iter()
                .filter(|(k, _)| k != ALIGNMENT_KEY)
                .collect();
            let mut tensors: Vec<(String, Vec<u64>, GgmlType)> =
                tensors.into_iter().map(|(n, (d, t))| (n, d, t)).collect();
            // Not only sorted orders.
            let (n_kv, n_tensors) = (kvs.len().max(1) as u64, tensors.len().max(1) as u64);
            kvs.rotate_left((order % n_kv) as usize);
            tensors.rotate_left((order % n_tensors) as usize);
            let mut gguf = Gguf::new().version(version);
            if let Some(a) = alignment {
                kvs.push((ALIGNMENT_KEY.into(), Value::U32(a)));
                gguf = gguf.layout_alignment(a.into());
            }
            for (k, v) in &kvs {
                gguf = gguf.kv(k, v.clone());
            }
            for (n, d, t) in &tensors {
                gguf = gguf.tensor(n, d, *t);
            }
            if !pad_last {
                gguf = gguf.unpadded_end();
            }
            (gguf, kvs, tensors)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn round_trip((gguf, kvs, tensors) in file_strategy()) {
        let file = gguf.build();
        let (header, raw) = read_header(&file[..], file.len() as u64).unwrap();
        prop_assert_eq!(&raw[..], &file[..header.data_start as usize]);
        prop_assert_eq!(reencode(&header), raw);
        prop_assert_eq!(header.version, gguf.version);
        prop_assert_eq!(header.alignment, gguf.alignment);
        let keys: Vec<&str> = header.kv.iter().map(|kv| kv.key.as_str()).collect();
        let expected_keys: Vec<&str> = kvs.iter().map(|(k, _)| k.as_str()).collect();
        prop_assert_eq!(keys, expected_keys);
        for ((_, expected), kv) in kvs.iter().zip(&header.kv) {
            // Floats compare by encoding, so that NaN equals itself.
            prop_assert_eq!(kv_bytes(b"", expected), kv_bytes(b"", &kv.value));
        }
        prop_assert_eq!(header.tensors.len(), tensors.len());
        let mut next = 0;
        for ((name, dims, t), info) in tensors.iter().zip(&header.tensors) {
            prop_assert_eq!(&info.name, name);
            prop_assert_eq!(&info.dims, dims);
            prop_assert_eq!(info.ggml_type, *t);
            prop_assert_eq!(info.offset, next);
            prop_assert_eq!(Some(info.byte_len), t.bytes_for(checked_numel(dims).unwrap()));
            next = align_up(info.offset + info.byte_len, header.alignment).unwrap();
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_header(&bytes[..], bytes.len() as u64);
        let mut with_magic = MAGIC.to_vec();
        with_magic.extend_from_slice(&3u32.to_le_bytes());
        with_magic.extend_from_slice(&bytes);
        let _ = read_header(&with_magic[..], with_magic.len() as u64);
    }

    #[test]
    fn mutated_files_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut file = small_file().build();
        for (at, byte) in flips {
            let i = at.index(file.len());
            file[i] = byte;
        }
        if let Err(e) = read_header(&file[..], file.len() as u64) {
            assert_message_style(&e);
        }
        let cut = cut.index(file.len() + 1);
        let _ = read_header(&file[..cut], file.len() as u64);
    }
}

// --- fuzz seeds ------------------------------------------------------------------------

/// The seed corpus of the `gguf_header` fuzz target: small valid files that
/// reach every part of the reader.
fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("seed-small.gguf", small_file().build()),
        ("seed-empty.gguf", Gguf::new().build()),
        (
            "seed-vocab-only.gguf",
            Gguf {
                infos: Vec::new(),
                ..small_file()
            }
            .header(),
        ),
        (
            "seed-v2-aligned-64.gguf",
            small_file().version(2).alignment(64).unpadded_end().build(),
        ),
        ("seed-every-type.gguf", {
            let mut gguf = Gguf::new().alignment(8);
            for (i, t) in ValueType::ALL.into_iter().enumerate() {
                let value = match t {
                    ValueType::Array => Value::Array(ValueType::Bool, vec![Value::Bool(true)]),
                    ValueType::String => Value::String("s".into()),
                    ValueType::Bool => Value::Bool(false),
                    _ => scalar_from_u8(t, i as u8),
                };
                gguf = gguf.kv(&format!("k{i}"), value);
            }
            for t in [GgmlType::F16, GgmlType::BF16, GgmlType::Q4_0, GgmlType::I8] {
                gguf = gguf.tensor(&format!("t.{}", t.name()), &[t.block_elems(), 1, 2], t);
            }
            gguf.build()
        }),
    ]
}

fn scalar_from_u8(t: ValueType, v: u8) -> Value {
    match t {
        ValueType::U8 => Value::U8(v),
        ValueType::I8 => Value::I8(v as i8),
        ValueType::U16 => Value::U16(v.into()),
        ValueType::I16 => Value::I16(v.into()),
        ValueType::U32 => Value::U32(v.into()),
        ValueType::I32 => Value::I32(v.into()),
        ValueType::F32 => Value::F32(v.into()),
        ValueType::U64 => Value::U64(v.into()),
        ValueType::I64 => Value::I64(v.into()),
        ValueType::F64 => Value::F64(v.into()),
        _ => Value::Bool(true),
    }
}

/// The committed seeds equal what [`fuzz_seeds`] writes; run with
/// `TPDE_WRITE_FUZZ_SEEDS=1` to rewrite them.
#[test]
fn fuzz_seeds_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf_header");
    let write = std::env::var_os("TPDE_WRITE_FUZZ_SEEDS").is_some();
    for (name, bytes) in fuzz_seeds() {
        accept(&bytes);
        assert!(bytes.len() < 4096, "{name} is {} bytes", bytes.len());
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else {
            let committed = std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (run with TPDE_WRITE_FUZZ_SEEDS=1)", path.display())
            });
            assert!(
                committed == bytes,
                "{} is stale (run with TPDE_WRITE_FUZZ_SEEDS=1)",
                path.display()
            );
        }
    }
}
