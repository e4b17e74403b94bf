//! One test per rejection reason, built from literal bytes; accepted edge
//! cases; a property-based round trip; and cross-checks against the upstream
//! `safetensors` crate.

use super::*;
use proptest::prelude::*;
use std::io::Cursor;

/// A file made of the prefix for `json`, `json` itself, and `data_len` zero bytes.
fn file(json: &str, data_len: usize) -> Vec<u8> {
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    bytes
}

/// A file whose 8-byte prefix is `n`, followed by `rest`.
fn raw_file(n: u64, rest: &[u8]) -> Vec<u8> {
    let mut bytes = n.to_le_bytes().to_vec();
    bytes.extend_from_slice(rest);
    bytes
}

fn parse(bytes: &[u8]) -> Result<Header, SafetensorsError> {
    read_header(bytes, bytes.len() as u64).map(|(header, _)| header)
}

/// Parses `bytes`, which must be rejected; checks the message style and
/// returns the error.
fn reject(bytes: &[u8]) -> SafetensorsError {
    match parse(bytes) {
        Ok(header) => panic!("accepted a bad file: {header:?}"),
        Err(e) => {
            assert_message_style(&e);
            e
        }
    }
}

/// One line, lower-case start, no final period.
fn assert_message_style(e: &SafetensorsError) {
    let message = e.to_string();
    assert!(
        !message.contains('\n') && !message.contains('\r'),
        "{message:?}"
    );
    assert!(!message.ends_with('.'), "{message:?}");
    let first = message.chars().next().unwrap_or(' ');
    assert!(!first.is_uppercase() && first != ' ', "{message:?}");
}

/// `{"<name>": {"dtype": ..., "shape": ..., "data_offsets": ...}}` for one entry body.
fn one(name: &str, body: &str) -> String {
    format!(r#"{{"{name}":{body}}}"#)
}

const U8X4: &str = r#"{"dtype":"U8","shape":[4],"data_offsets":[0,4]}"#;

// --- prefix and header length -------------------------------------------

#[test]
fn file_shorter_than_8_bytes() {
    for len in 0..8 {
        let bytes = vec![1u8; len];
        let e = reject(&bytes);
        assert!(matches!(e, SafetensorsError::FileTooShort { file_len } if file_len == len as u64));
    }
    let e = header_len([2, 0, 0, 0, 0, 0, 0, 0], 3).unwrap_err();
    assert!(matches!(e, SafetensorsError::FileTooShort { file_len: 3 }));
}

#[test]
fn reader_shorter_than_file_len() {
    // The caller says 100 bytes, the reader has 3, then 20.
    let e = read_header(&[1u8, 2, 3][..], 100).unwrap_err();
    assert_message_style(&e);
    assert!(matches!(
        e,
        SafetensorsError::UnexpectedEof { needed: 8, got: 3 }
    ));
    let bytes = file("{}", 0);
    let e = read_header(&bytes[..9], 10).unwrap_err();
    assert!(matches!(
        e,
        SafetensorsError::UnexpectedEof { needed: 10, got: 9 }
    ));
}

#[test]
fn header_length_zero() {
    let e = reject(&raw_file(0, b""));
    assert!(matches!(e, SafetensorsError::HeaderLenZero));
    let e = reject(&raw_file(0, b"{}"));
    assert!(matches!(e, SafetensorsError::HeaderLenZero));
}

#[test]
fn header_length_past_end_of_file() {
    let bytes = raw_file(1000, b"{}{}{}{}{}{}");
    let e = reject(&bytes);
    assert!(matches!(
        e,
        SafetensorsError::HeaderPastEof {
            header_len: 1000,
            file_len: 20
        }
    ));
    assert_eq!(
        e.to_string(),
        "header length 1000 (plus the 8-byte prefix) exceeds file size 20"
    );
    // One byte short.
    let mut bytes = file("{}", 0);
    bytes.pop();
    let e = reject(&bytes);
    assert!(matches!(
        e,
        SafetensorsError::HeaderPastEof {
            header_len: 2,
            file_len: 9
        }
    ));
}

#[test]
fn header_length_over_limit() {
    for n in [MAX_HEADER_LEN + 1, 1 << 32, 1 << 63, u64::MAX] {
        // A tiny file and a huge claimed file: neither may allocate or overflow.
        let bytes = raw_file(n, b"{}");
        let e = reject(&bytes);
        assert!(
            matches!(e, SafetensorsError::HeaderTooLarge { header_len, max } if header_len == n && max == MAX_HEADER_LEN),
            "{e:?}"
        );
        let e = read_header(&bytes[..], u64::MAX).unwrap_err();
        assert!(
            matches!(e, SafetensorsError::HeaderTooLarge { .. }),
            "{e:?}"
        );
        let e = header_len(n.to_le_bytes(), u64::MAX).unwrap_err();
        assert!(
            matches!(e, SafetensorsError::HeaderTooLarge { .. }),
            "{e:?}"
        );
    }
}

#[test]
fn header_length_at_limit_is_checked_against_the_file() {
    let e = header_len(MAX_HEADER_LEN.to_le_bytes(), MAX_HEADER_LEN + 7).unwrap_err();
    assert!(matches!(e, SafetensorsError::HeaderPastEof { .. }));
    assert_eq!(
        header_len(MAX_HEADER_LEN.to_le_bytes(), MAX_HEADER_LEN + 8).unwrap(),
        MAX_HEADER_LEN
    );
}

// --- JSON syntax ------------------------------------------------------------

#[test]
fn header_not_utf8() {
    let e = reject(&raw_file(6, b"{\"\xff\":1}"));
    assert!(
        matches!(e, SafetensorsError::HeaderNotUtf8 { offset: 2 }),
        "{e:?}"
    );
}

#[test]
fn header_not_json() {
    for json in ["{", "{\"a\":", "nope", "{}}", "{}x", "{\"a\" 1}", "{}\0\0"] {
        let e = reject(&file(json, 0));
        assert!(
            matches!(e, SafetensorsError::InvalidJson { .. }),
            "{json}: {e:?}"
        );
    }
}

#[test]
fn header_not_an_object() {
    let cases = [
        ("[]", JsonKind::Array),
        ("\"x\"", JsonKind::String),
        ("12", JsonKind::Integer),
        ("-1", JsonKind::NegativeInteger),
        ("1.5", JsonKind::OtherNumber),
        ("null", JsonKind::Null),
        ("true", JsonKind::Bool),
    ];
    for (json, kind) in cases {
        let e = reject(&file(json, 0));
        assert!(
            matches!(e, SafetensorsError::HeaderNotObject { found } if found == kind),
            "{json}: {e:?}"
        );
    }
}

#[test]
fn header_nested_absurdly_deep() {
    let json = "[".repeat(100_000);
    let e = reject(&file(&json, 0));
    assert!(
        matches!(e, SafetensorsError::JsonTooDeep { offset, max } if offset == MAX_JSON_DEPTH as u64 && max == MAX_JSON_DEPTH),
        "{e:?}"
    );
    // Deep objects inside an otherwise plausible entry.
    let json = format!(
        r#"{{"a":{}1{}}}"#,
        r#"{"x":"#.repeat(100_000),
        "}".repeat(100_000)
    );
    let e = reject(&file(&json, 0));
    assert!(matches!(e, SafetensorsError::JsonTooDeep { .. }), "{e:?}");
}

#[test]
fn depth_limit_is_exact_and_ignores_strings() {
    let at_limit = format!(
        "{}{}",
        "[".repeat(MAX_JSON_DEPTH),
        "]".repeat(MAX_JSON_DEPTH)
    );
    assert!(check_depth(at_limit.as_bytes()).is_ok());
    let over = format!("[{at_limit}]");
    assert!(check_depth(over.as_bytes()).is_err());
    // Brackets inside strings, including after escaped quotes, do not count.
    let json = format!(r#"{{"__metadata__":{{"k\"[":"{}"}}}}"#, "[{".repeat(1000));
    let header = parse(&file(&json, 0)).unwrap();
    assert_eq!(header.metadata.unwrap()["k\"["].len(), 2000);
}

// --- top-level entries -------------------------------------------------------

#[test]
fn duplicate_tensor_name() {
    let json = format!(
        r#"{{"x":{U8X4},"x":{}}}"#,
        r#"{"dtype":"U8","shape":[4],"data_offsets":[4,8]}"#
    );
    let e = reject(&file(&json, 8));
    assert!(
        matches!(&e, SafetensorsError::DuplicateTensorName { name } if name == "x"),
        "{e:?}"
    );
    assert_eq!(e.to_string(), r#"duplicate tensor name "x""#);
}

#[test]
fn duplicate_metadata() {
    let json = r#"{"__metadata__":{},"__metadata__":{"a":"b"}}"#;
    let e = reject(&file(json, 0));
    assert!(matches!(e, SafetensorsError::DuplicateMetadata), "{e:?}");
}

#[test]
fn metadata_not_an_object_of_strings() {
    for (json, kind) in [
        (r#"{"__metadata__":[]}"#, JsonKind::Array),
        (r#"{"__metadata__":"x"}"#, JsonKind::String),
        (r#"{"__metadata__":null}"#, JsonKind::Null),
    ] {
        let e = reject(&file(json, 0));
        assert!(
            matches!(e, SafetensorsError::MetadataNotObject { found } if found == kind),
            "{json}: {e:?}"
        );
    }
    for (json, kind) in [
        (r#"{"__metadata__":{"k":1}}"#, JsonKind::Integer),
        (r#"{"__metadata__":{"k":null}}"#, JsonKind::Null),
        (r#"{"__metadata__":{"k":{}}}"#, JsonKind::Object),
        (r#"{"__metadata__":{"k":["v"]}}"#, JsonKind::Array),
    ] {
        let e = reject(&file(json, 0));
        assert!(
            matches!(&e, SafetensorsError::MetadataValueNotString { key, found } if key == "k" && *found == kind),
            "{json}: {e:?}"
        );
    }
}

#[test]
fn duplicate_metadata_key() {
    let e = reject(&file(r#"{"__metadata__":{"k":"a","k":"b"}}"#, 0));
    assert!(
        matches!(&e, SafetensorsError::DuplicateMetadataKey { key } if key == "k"),
        "{e:?}"
    );
}

#[test]
fn tensor_name_empty() {
    let e = reject(&file(&one("", U8X4), 4));
    assert!(matches!(e, SafetensorsError::EmptyTensorName), "{e:?}");
}

#[test]
fn tensor_name_too_long() {
    let name = "n".repeat(MAX_NAME_LEN + 1);
    let e = reject(&file(&one(&name, U8X4), 4));
    assert!(
        matches!(&e, SafetensorsError::TensorNameTooLong { prefix, len, max } if prefix.len() == PREVIEW_CHARS && *len == MAX_NAME_LEN + 1 && *max == MAX_NAME_LEN),
        "{e:?}"
    );
    // Exactly at the limit is fine.
    let name = "n".repeat(MAX_NAME_LEN);
    assert_eq!(
        parse(&file(&one(&name, U8X4), 4)).unwrap().tensors[0].name,
        name
    );
}

#[test]
fn too_many_tensors() {
    // MAX_TENSORS zero-length tensors are fine; one more is not.
    let mut json = String::with_capacity(60 * (MAX_TENSORS + 1));
    json.push('{');
    for i in 0..=MAX_TENSORS {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            r#""{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#
        ));
    }
    json.push('}');
    let e = reject(&file(&json, 0));
    assert!(
        matches!(e, SafetensorsError::TooManyTensors { max } if max == MAX_TENSORS),
        "{e:?}"
    );
}

// --- one entry ----------------------------------------------------------------

#[test]
fn entry_not_an_object() {
    for (body, kind) in [
        ("1", JsonKind::Integer),
        ("[0,4]", JsonKind::Array),
        ("\"U8\"", JsonKind::String),
        ("null", JsonKind::Null),
    ] {
        let e = reject(&file(&one("a", body), 4));
        assert!(
            matches!(&e, SafetensorsError::EntryNotObject { name, found } if name == "a" && *found == kind),
            "{body}: {e:?}"
        );
    }
}

#[test]
fn entry_missing_field() {
    for (body, missing) in [
        (r#"{"shape":[4],"data_offsets":[0,4]}"#, "dtype"),
        (r#"{"dtype":"U8","data_offsets":[0,4]}"#, "shape"),
        (r#"{"dtype":"U8","shape":[4]}"#, "data_offsets"),
        (r#"{}"#, "dtype"),
    ] {
        let e = reject(&file(&one("a", body), 4));
        assert!(
            matches!(&e, SafetensorsError::MissingField { name, field } if name == "a" && *field == missing),
            "{body}: {e:?}"
        );
    }
}

#[test]
fn entry_unknown_field() {
    let body = r#"{"dtype":"U8","shape":[4],"data_offsets":[0,4],"offset":0}"#;
    let e = reject(&file(&one("a", body), 4));
    assert!(
        matches!(&e, SafetensorsError::UnknownField { name, field } if name == "a" && field == "offset"),
        "{e:?}"
    );
}

#[test]
fn entry_duplicate_field() {
    let body = r#"{"dtype":"U8","dtype":"I8","shape":[4],"data_offsets":[0,4]}"#;
    let e = reject(&file(&one("a", body), 4));
    assert!(
        matches!(&e, SafetensorsError::DuplicateField { name, field } if name == "a" && *field == "dtype"),
        "{e:?}"
    );
}

#[test]
fn unknown_dtype() {
    for dtype in ["F33", "f32", "", "float32", "C128"] {
        let body = format!(r#"{{"dtype":"{dtype}","shape":[4],"data_offsets":[0,4]}}"#);
        let e = reject(&file(&one("a", &body), 4));
        assert!(
            matches!(&e, SafetensorsError::UnknownDtype { name, dtype: d } if name == "a" && d == dtype),
            "{dtype}: {e:?}"
        );
    }
}

#[test]
fn dtype_not_a_string() {
    let body = r#"{"dtype":32,"shape":[4],"data_offsets":[0,4]}"#;
    let e = reject(&file(&one("a", body), 4));
    assert!(
        matches!(
            e,
            SafetensorsError::DtypeNotString {
                found: JsonKind::Integer,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn shape_not_an_array_of_integers() {
    let body = r#"{"dtype":"U8","shape":4,"data_offsets":[0,4]}"#;
    let e = reject(&file(&one("a", body), 4));
    assert!(
        matches!(
            e,
            SafetensorsError::ShapeNotArray {
                found: JsonKind::Integer,
                ..
            }
        ),
        "{e:?}"
    );
    for (shape, kind) in [
        ("[-4]", JsonKind::NegativeInteger),
        ("[4.0]", JsonKind::OtherNumber),
        ("[\"4\"]", JsonKind::String),
        ("[18446744073709551616]", JsonKind::OtherNumber),
        ("[null]", JsonKind::Null),
    ] {
        let body = format!(r#"{{"dtype":"U8","shape":{shape},"data_offsets":[0,4]}}"#);
        let e = reject(&file(&one("a", &body), 4));
        assert!(
            matches!(e, SafetensorsError::ShapeDimNotInteger { index: 0, found, .. } if found == kind),
            "{shape}: {e:?}"
        );
    }
}

#[test]
fn shape_with_too_many_dims() {
    let body = r#"{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1,4],"data_offsets":[0,4]}"#;
    let e = reject(&file(&one("a", body), 4));
    assert!(
        matches!(
            e,
            SafetensorsError::TooManyDims {
                dims: 10,
                max: MAX_DIMS,
                ..
            }
        ),
        "{e:?}"
    );
    // MAX_DIMS dimensions are fine.
    let body = r#"{"dtype":"U8","shape":[1,1,1,1,1,1,1,4],"data_offsets":[0,4]}"#;
    assert_eq!(
        parse(&file(&one("a", body), 4)).unwrap().tensors[0]
            .shape
            .len(),
        MAX_DIMS
    );
}

#[test]
fn shape_size_overflows_u64() {
    for (dtype, shape) in [
        // The element count itself overflows.
        ("U8", "[4294967296,4294967296]"),
        ("U8", "[18446744073709551615,2]"),
        // The element count fits but the bit count does not.
        ("F32", "[2305843009213693952]"),
        ("F4", "[18446744073709551615]"),
    ] {
        let body = format!(r#"{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,4]}}"#);
        let e = reject(&file(&one("a", &body), 4));
        assert!(
            matches!(e, SafetensorsError::SizeOverflow { .. }),
            "{shape}: {e:?}"
        );
    }
}

#[test]
fn sub_byte_dtype_not_a_whole_number_of_bytes() {
    for (dtype, numel) in [("F4", 3u64), ("F6_E2M3", 1), ("F6_E3M2", 6)] {
        let body = format!(r#"{{"dtype":"{dtype}","shape":[{numel}],"data_offsets":[0,1]}}"#);
        let e = reject(&file(&one("a", &body), 1));
        assert!(
            matches!(e, SafetensorsError::PartialByte { numel: n, .. } if n == numel),
            "{dtype}: {e:?}"
        );
    }
}

#[test]
fn data_offsets_not_two_integers() {
    let e = reject(&file(
        &one("a", r#"{"dtype":"U8","shape":[4],"data_offsets":4}"#),
        4,
    ));
    assert!(
        matches!(
            e,
            SafetensorsError::DataOffsetsNotArray {
                found: JsonKind::Integer,
                ..
            }
        ),
        "{e:?}"
    );
    for (offsets, count) in [("[]", 0), ("[0]", 1), ("[0,4,8]", 3), ("[0,4,\"x\",[]]", 4)] {
        let body = format!(r#"{{"dtype":"U8","shape":[4],"data_offsets":{offsets}}}"#);
        let e = reject(&file(&one("a", &body), 4));
        assert!(
            matches!(e, SafetensorsError::DataOffsetsCount { count: c, .. } if c == count),
            "{offsets}: {e:?}"
        );
    }
    for (offsets, index, kind) in [
        ("[-1,4]", 0, JsonKind::NegativeInteger),
        ("[0,-4]", 1, JsonKind::NegativeInteger),
        ("[0.0,4]", 0, JsonKind::OtherNumber),
        ("[0,4e0]", 1, JsonKind::OtherNumber),
        ("[\"0\",4]", 0, JsonKind::String),
        ("[0,18446744073709551616]", 1, JsonKind::OtherNumber),
        ("[true,4]", 0, JsonKind::Bool),
    ] {
        let body = format!(r#"{{"dtype":"U8","shape":[4],"data_offsets":{offsets}}}"#);
        let e = reject(&file(&one("a", &body), 4));
        assert!(
            matches!(e, SafetensorsError::DataOffsetNotInteger { index: i, found, .. } if i == index && found == kind),
            "{offsets}: {e:?}"
        );
    }
}

#[test]
fn data_offsets_end_before_begin() {
    let body = r#"{"dtype":"F32","shape":[2],"data_offsets":[16,8]}"#;
    let e = reject(&file(&one("a.weight", body), 16));
    assert!(
        matches!(
            e,
            SafetensorsError::OffsetsReversed {
                begin: 16,
                end: 8,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        r#"tensor "a.weight": data_offsets end 8 < begin 16"#
    );
}

#[test]
fn data_offsets_size_mismatch() {
    let body = r#"{"dtype":"F32","shape":[2],"data_offsets":[0,4]}"#;
    let e = reject(&file(&one("a", body), 4));
    assert!(
        matches!(
            e,
            SafetensorsError::SizeMismatch {
                expected: 8,
                got: 4,
                dtype: Dtype::F32,
                ..
            }
        ),
        "{e:?}"
    );
}

// --- tiling of the data region ---------------------------------------------------

#[test]
fn gap_before_first_tensor() {
    let body = r#"{"dtype":"U8","shape":[4],"data_offsets":[4,8]}"#;
    let e = reject(&file(&one("a", body), 8));
    assert!(
        matches!(
            e,
            SafetensorsError::DataGap {
                begin: 4,
                expected: 0,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn gap_between_tensors() {
    let json = format!(
        r#"{{"a":{U8X4},"b":{}}}"#,
        r#"{"dtype":"U8","shape":[4],"data_offsets":[8,12]}"#
    );
    let e = reject(&file(&json, 12));
    assert!(
        matches!(&e, SafetensorsError::DataGap { name, begin: 8, expected: 4 } if name == "b"),
        "{e:?}"
    );
}

#[test]
fn overlapping_tensors() {
    let json = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}"#;
    let e = reject(&file(json, 12));
    assert!(
        matches!(&e, SafetensorsError::Overlap { name, begin: 4, previous, previous_end: 8 } if name == "b" && previous == "a"),
        "{e:?}"
    );
    // Identical offsets, and a zero-length tensor inside another one.
    let json = format!(r#"{{"a":{U8X4},"b":{U8X4}}}"#);
    assert!(matches!(
        reject(&file(&json, 4)),
        SafetensorsError::Overlap { .. }
    ));
    let json = format!(
        r#"{{"a":{U8X4},"z":{}}}"#,
        r#"{"dtype":"U8","shape":[0],"data_offsets":[2,2]}"#
    );
    assert!(matches!(
        reject(&file(&json, 4)),
        SafetensorsError::Overlap { .. }
    ));
}

#[test]
fn tensor_past_end_of_file() {
    let body = r#"{"dtype":"U8","shape":[16],"data_offsets":[0,16]}"#;
    let e = reject(&file(&one("a", body), 8));
    assert!(
        matches!(
            e,
            SafetensorsError::PastEndOfFile {
                end: 16,
                data_len: 8,
                ..
            }
        ),
        "{e:?}"
    );
    // Offsets near u64::MAX: no overflow anywhere.
    let body =
        r#"{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}"#;
    let e = reject(&file(&one("a", body), 0));
    assert!(matches!(e, SafetensorsError::DataGap { .. }), "{e:?}");
}

#[test]
fn bytes_left_after_last_tensor() {
    let e = reject(&file(&one("a", U8X4), 5));
    assert!(
        matches!(
            e,
            SafetensorsError::TrailingBytes {
                covered: 4,
                data_len: 5
            }
        ),
        "{e:?}"
    );
    let e = reject(&file("{}", 1));
    assert!(
        matches!(
            e,
            SafetensorsError::TrailingBytes {
                covered: 0,
                data_len: 1
            }
        ),
        "{e:?}"
    );
}

// --- accepted edge cases ----------------------------------------------------------

#[test]
fn empty_header_and_empty_data() {
    let bytes = file("{}", 0);
    let (header, raw) = read_header(&bytes[..], bytes.len() as u64).unwrap();
    assert_eq!(raw, bytes);
    assert_eq!(header.header_len, 2);
    assert_eq!(header.data_start, 10);
    assert_eq!(header.file_len, 10);
    assert_eq!(header.data_len(), 0);
    assert!(header.metadata.is_none());
    assert!(header.tensors.is_empty());
}

#[test]
fn zero_element_tensors() {
    let json = r#"{"z1":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"z2":{"dtype":"F4","shape":[3,0],"data_offsets":[4,4]}}"#;
    let header = parse(&file(json, 4)).unwrap();
    let names: Vec<_> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["z1", "a", "z2"]);
    assert_eq!(header.tensors[0].numel(), 0);
    assert_eq!(header.tensors[0].byte_len(), 0);
    // Only zero-length tensors, empty data region.
    let json = r#"{"z":{"dtype":"BF16","shape":[0],"data_offsets":[0,0]}}"#;
    assert_eq!(parse(&file(json, 0)).unwrap().tensors.len(), 1);
}

#[test]
fn scalar_tensor() {
    let json = r#"{"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}}"#;
    let header = parse(&file(json, 8)).unwrap();
    let t = &header.tensors[0];
    assert_eq!((t.numel(), t.byte_len(), t.shape.len()), (1, 8, 0));
}

#[test]
fn trailing_spaces_in_header() {
    let json = format!("{}        ", one("a", U8X4));
    let bytes = file(&json, 4);
    let (header, raw) = read_header(&bytes[..], bytes.len() as u64).unwrap();
    assert_eq!(header.header_len, json.len() as u64);
    assert_eq!(raw, bytes[..8 + json.len()]);
}

#[test]
fn sub_byte_dtypes_in_whole_bytes() {
    let json = r#"{"a":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]},"b":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[3,6]},"c":{"dtype":"F6_E3M2","shape":[2,2],"data_offsets":[6,9]}}"#;
    let header = parse(&file(json, 9)).unwrap();
    let lens: Vec<_> = header.tensors.iter().map(|t| t.byte_len()).collect();
    assert_eq!(lens, [3, 3, 3]);
}

#[test]
fn tensors_sorted_by_offset_and_metadata_kept() {
    let json = r#"{"b":{"dtype":"I16","shape":[2],"data_offsets":[4,8]},"__metadata__":{"format":"pt","x":""},"a":{"dtype":"C64","shape":[1,1],"data_offsets":[8,16]},"c":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
    let header = parse(&file(json, 16)).unwrap();
    let names: Vec<_> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["c", "b", "a"]);
    let metadata = header.metadata.as_ref().unwrap();
    assert_eq!(metadata.get("format").map(String::as_str), Some("pt"));
    assert_eq!(metadata.len(), 2);
    assert_eq!(
        header.tensor("a"),
        Some(&TensorEntry {
            name: "a".into(),
            dtype: Dtype::C64,
            shape: vec![1, 1],
            begin: 8,
            end: 16
        })
    );
}

#[test]
fn read_header_reads_only_the_header() {
    let json = one("a", U8X4);
    let bytes = file(&json, 4);
    let mut cursor = Cursor::new(&bytes);
    let (_, raw) = read_header(&mut cursor, bytes.len() as u64).unwrap();
    assert_eq!(cursor.position(), 8 + json.len() as u64);
    assert_eq!(raw, bytes[..8 + json.len()]);
}

#[test]
fn parse_header_matches_read_header() {
    let json = one("a", U8X4);
    let bytes = file(&json, 4);
    let header = parse_header(json.as_bytes(), bytes.len() as u64).unwrap();
    assert_eq!(header.tensors, parse(&bytes).unwrap().tensors);
    // parse_header applies the same length checks.
    assert!(matches!(
        parse_header(b"", 8),
        Err(SafetensorsError::HeaderLenZero)
    ));
    assert!(matches!(
        parse_header(json.as_bytes(), 8),
        Err(SafetensorsError::HeaderPastEof { .. })
    ));
}

/// A reader that is interrupted before every successful read of one byte.
struct Stuttering<'a> {
    bytes: &'a [u8],
    interrupt: bool,
}

impl Read for Stuttering<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let Some((&first, rest)) = self.bytes.split_first() else {
            return Ok(0);
        };
        match buf.first_mut() {
            Some(slot) => {
                *slot = first;
                self.bytes = rest;
                Ok(1)
            }
            None => Ok(0),
        }
    }
}

#[test]
fn read_header_retries_interrupted_short_reads() {
    let bytes = file(&one("a", U8X4), 4);
    let reader = Stuttering {
        bytes: &bytes,
        interrupt: false,
    };
    let (header, _) = read_header(reader, bytes.len() as u64).unwrap();
    assert_eq!(header.tensors.len(), 1);
}

/// A reader that fails.
struct Broken;

impl Read for Broken {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::other("disk on fire"))
    }
}

/// A reader that claims to have read more than it was given room for.
struct Liar;

impl Read for Liar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(buf.len() + 1)
    }
}

#[test]
fn read_errors_are_io_errors() {
    for e in [
        read_header(Broken, 100).unwrap_err(),
        read_header(Liar, 100).unwrap_err(),
    ] {
        assert_message_style(&e);
        assert!(matches!(e, SafetensorsError::Io(_)), "{e:?}");
    }
}

#[test]
fn truncated_at_every_offset() {
    let json = r#"{"__metadata__":{"k":"v"},"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[3],"data_offsets":[4,7]}}"#;
    let bytes = file(json, 7);
    assert!(parse(&bytes).is_ok());
    for len in 0..bytes.len() {
        let e = reject(&bytes[..len]);
        let _ = e.to_string();
    }
}

#[test]
fn dtype_table() {
    for dtype in Dtype::ALL {
        assert_eq!(Dtype::from_name(dtype.name()), Some(dtype));
        assert_eq!(dtype.to_string(), dtype.name());
        assert_eq!(Dtype::from_name(&dtype.name().to_lowercase()), None);
    }
    let bits: Vec<_> = Dtype::ALL.iter().map(|d| d.bits()).collect();
    assert_eq!(
        bits,
        [8, 4, 6, 6, 8, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32, 64, 64, 64, 64]
    );
}

#[test]
fn dtype_bits_match_upstream() {
    for dtype in Dtype::ALL {
        let json = format!("\"{}\"", dtype.name());
        match serde_json::from_str::<safetensors::Dtype>(&json) {
            Ok(upstream) => assert_eq!(upstream.bitsize() as u64, dtype.bits(), "{dtype}"),
            // safetensors 0.6 has no complex dtype.
            Err(_) => assert_eq!(dtype, Dtype::C64),
        }
    }
}

// --- upstream cross-checks ---------------------------------------------------------

#[test]
fn upstream_also_rejects_malformed_files() {
    let deep = "[".repeat(100_000);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("short file", vec![1, 2, 3]),
        ("header past eof", raw_file(1000, b"{}{}")),
        ("header over limit", raw_file(MAX_HEADER_LEN + 1, b"{}")),
        ("header 2^63", raw_file(1 << 63, b"{}")),
        ("header u64::MAX", raw_file(u64::MAX, b"{}")),
        ("not utf-8", raw_file(6, b"{\"\xff\":1}")),
        ("not json", file("{\"a\":", 0)),
        ("not an object", file("[]", 0)),
        ("too deep", file(&deep, 0)),
        (
            "unknown dtype",
            file(
                &one("a", r#"{"dtype":"F33","shape":[4],"data_offsets":[0,4]}"#),
                4,
            ),
        ),
        (
            "size overflow",
            file(
                &one(
                    "a",
                    r#"{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,4]}"#,
                ),
                4,
            ),
        ),
        (
            "partial byte",
            file(
                &one("a", r#"{"dtype":"F4","shape":[3],"data_offsets":[0,1]}"#),
                1,
            ),
        ),
        (
            "one offset",
            file(
                &one("a", r#"{"dtype":"U8","shape":[4],"data_offsets":[0]}"#),
                4,
            ),
        ),
        (
            "negative offset",
            file(
                &one("a", r#"{"dtype":"U8","shape":[4],"data_offsets":[-1,4]}"#),
                4,
            ),
        ),
        (
            "float offset",
            file(
                &one("a", r#"{"dtype":"U8","shape":[4],"data_offsets":[0.0,4]}"#),
                4,
            ),
        ),
        (
            "string offset",
            file(
                &one("a", r#"{"dtype":"U8","shape":[4],"data_offsets":["0",4]}"#),
                4,
            ),
        ),
        (
            "end before begin",
            file(
                &one("a", r#"{"dtype":"F32","shape":[2],"data_offsets":[16,8]}"#),
                16,
            ),
        ),
        (
            "size mismatch",
            file(
                &one("a", r#"{"dtype":"F32","shape":[2],"data_offsets":[0,4]}"#),
                4,
            ),
        ),
        (
            "gap before first",
            file(
                &one("a", r#"{"dtype":"U8","shape":[4],"data_offsets":[4,8]}"#),
                8,
            ),
        ),
        (
            "overlap",
            file(
                r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}"#,
                12,
            ),
        ),
        (
            "past end",
            file(
                &one("a", r#"{"dtype":"U8","shape":[16],"data_offsets":[0,16]}"#),
                8,
            ),
        ),
        ("trailing bytes", file(&one("a", U8X4), 5)),
        (
            "metadata value not a string",
            file(r#"{"__metadata__":{"k":1}}"#, 0),
        ),
    ];
    for (what, bytes) in &cases {
        assert!(parse(bytes).is_err(), "{what}: we accept it");
        assert!(
            safetensors::SafeTensors::deserialize(bytes).is_err(),
            "{what}: upstream accepts it"
        );
    }

    // Cases where upstream safetensors 0.6 is laxer than we are (it accepts
    // them); we only check that we reject them:
    // - duplicate tensor names and duplicate "__metadata__" (serde keeps the last one),
    //   duplicate metadata keys (HashMap, last one wins);
    // - unknown fields in an entry (no deny_unknown_fields), duplicate fields;
    // - "__metadata__": null (deserialized as Option::None);
    // - tensor names that are empty or longer than MAX_NAME_LEN, more than
    //   MAX_TENSORS tensors, more than MAX_DIMS dimensions (no such limits);
    // - header length 0 is rejected by upstream too, but as a JSON error.
    let lax: Vec<(&str, Vec<u8>)> = vec![
        (
            "duplicate name",
            file(
                &format!(
                    r#"{{"x":{U8X4},"x":{}}}"#,
                    r#"{"dtype":"U8","shape":[4],"data_offsets":[0,4]}"#
                ),
                4,
            ),
        ),
        (
            "duplicate metadata",
            file(r#"{"__metadata__":{},"__metadata__":{}}"#, 0),
        ),
        (
            "unknown field",
            file(
                &one(
                    "a",
                    r#"{"dtype":"U8","shape":[4],"data_offsets":[0,4],"x":1}"#,
                ),
                4,
            ),
        ),
        ("null metadata", file(r#"{"__metadata__":null}"#, 0)),
        ("empty name", file(&one("", U8X4), 4)),
        (
            "nine dims",
            file(
                &one(
                    "a",
                    r#"{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,4],"data_offsets":[0,4]}"#,
                ),
                4,
            ),
        ),
    ];
    for (what, bytes) in &lax {
        assert!(parse(bytes).is_err(), "{what}: we accept it");
    }
}

/// A tensor to write in a generated file.
#[derive(Clone, Debug)]
struct Spec {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
}

impl Spec {
    fn byte_len(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.bits() / 8
    }
}

/// Test-only writer of the standard format: data in `specs` order, JSON keys
/// in `json_order`, metadata first or last, `padding` trailing spaces.
fn write_file(
    specs: &[Spec],
    json_order: &[usize],
    metadata: Option<&BTreeMap<String, String>>,
    metadata_first: bool,
    padding: usize,
) -> Vec<u8> {
    let mut offsets = Vec::new();
    let mut next = 0u64;
    for spec in specs {
        offsets.push((next, next + spec.byte_len()));
        next += spec.byte_len();
    }
    let mut entries = Vec::new();
    for &i in json_order {
        let (spec, (begin, end)) = (&specs[i], offsets[i]);
        entries.push(format!(
            r#"{}:{{"dtype":"{}","shape":{},"data_offsets":[{begin},{end}]}}"#,
            serde_json::to_string(&spec.name).unwrap(),
            spec.dtype.name(),
            serde_json::to_string(&spec.shape).unwrap(),
        ));
    }
    if let Some(metadata) = metadata {
        let entry = format!(
            r#""__metadata__":{}"#,
            serde_json::to_string(metadata).unwrap()
        );
        if metadata_first {
            entries.insert(0, entry);
        } else {
            entries.push(entry);
        }
    }
    let json = format!("{{{}}}{}", entries.join(","), " ".repeat(padding));
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    // Data bytes: a position-dependent pattern, irrelevant to the header.
    bytes.extend((0..next).map(|i| (i % 251) as u8));
    bytes
}

fn spec_strategy() -> impl Strategy<Value = (Dtype, Vec<u64>)> {
    (
        proptest::sample::select(Dtype::ALL.to_vec()),
        proptest::collection::vec(0u64..6, 0..4),
    )
        .prop_map(|(dtype, mut shape)| {
            let numel: u64 = shape.iter().product();
            if (numel * dtype.bits()) & 7 != 0 {
                shape.push(8);
            }
            (dtype, shape)
        })
}

fn name_strategy() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9_.]{1,24}", "\\PC{1,12}"].prop_filter("reserved", |n| n != "__metadata__")
}

fn file_strategy() -> impl Strategy<Value = (Vec<Spec>, Vec<usize>)> {
    proptest::collection::btree_map(name_strategy(), spec_strategy(), 0..10).prop_flat_map(
        |tensors| {
            let specs: Vec<Spec> = tensors
                .into_iter()
                .map(|(name, (dtype, shape))| Spec { name, dtype, shape })
                .collect();
            let order: Vec<usize> = (0..specs.len()).collect();
            (Just(specs), Just(order).prop_shuffle())
        },
    )
}

proptest! {
    #[test]
    fn round_trip(
        (specs, json_order) in file_strategy(),
        metadata in proptest::option::of(proptest::collection::btree_map("\\PC{0,8}", "\\PC{0,8}", 0..4)),
        metadata_first in any::<bool>(),
        padding in 0usize..9,
    ) {
        let bytes = write_file(&specs, &json_order, metadata.as_ref(), metadata_first, padding);
        let mut cursor = Cursor::new(&bytes);
        let (header, raw) = read_header(&mut cursor, bytes.len() as u64).unwrap();
        let data_start = header.data_start;
        prop_assert_eq!(cursor.position(), data_start);
        prop_assert_eq!(&raw[..], &bytes[..data_start as usize]);
        prop_assert_eq!(header.header_len + 8, data_start);
        prop_assert_eq!(header.file_len, bytes.len() as u64);
        prop_assert_eq!(&header.metadata, &metadata);
        prop_assert_eq!(header.tensors.len(), specs.len());

        // Our tensors are in data order, which is `specs` order (up to the
        // order of zero-length tensors at the same offset).
        let mut begin = 0;
        for spec in &specs {
            let t = header.tensor(&spec.name).unwrap();
            prop_assert_eq!(t.dtype, spec.dtype);
            prop_assert_eq!(&t.shape, &spec.shape);
            prop_assert_eq!(t.begin, begin);
            prop_assert_eq!(t.byte_len(), spec.byte_len());
            prop_assert_eq!(t.numel(), spec.shape.iter().product::<u64>());
            begin = t.end;
        }
        prop_assert!(header.tensors.windows(2).all(|w| w[0].begin <= w[1].begin));

        // Upstream agrees, except that safetensors 0.6 does not know C64.
        let upstream = safetensors::SafeTensors::read_metadata(&bytes);
        if specs.iter().any(|s| s.dtype == Dtype::C64) {
            prop_assert!(upstream.is_err());
            return Ok(());
        }
        let (n, upstream) = upstream.unwrap();
        prop_assert_eq!(n as u64, header.header_len);
        let upstream_metadata = upstream.metadata().as_ref().map(|m| {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>()
        });
        prop_assert_eq!(&upstream_metadata, &header.metadata);
        let loaded = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        prop_assert_eq!(loaded.len(), header.tensors.len());
        for t in &header.tensors {
            let info = upstream.info(&t.name).unwrap();
            prop_assert_eq!(info.dtype.to_string(), t.dtype.name());
            let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
            prop_assert_eq!(&shape, &t.shape);
            prop_assert_eq!((info.data_offsets.0 as u64, info.data_offsets.1 as u64), (t.begin, t.end));
            let view = loaded.tensor(&t.name).unwrap();
            prop_assert_eq!(view.data().len() as u64, t.byte_len());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = parse(&bytes) {
            assert_message_style(&e);
        }
    }

    #[test]
    fn arbitrary_headers_never_panic(json in "[{}\\[\\]\",:0-9a-zA-Z_ -]{0,200}", data_len in 0usize..64) {
        if let Err(e) = parse(&file(&json, data_len)) {
            assert_message_style(&e);
        }
    }
}
