//! Hostile safetensors inputs through the CLI: each is rejected with exit
//! 2, one line naming the file and the problem, nothing written. (The
//! reader's own unit tests cover every rejection variant; these prove the
//! whole tool turns them into clean errors.)

use crate::util::*;

/// Header bytes with an 8-byte length prefix and `data` appended.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn rejects(bytes: &[u8], phrase: &str) {
    let d = tmp();
    let src = write(d.path(), "bad.safetensors", bytes);
    let out = d.path().join("out.tpde");
    let o = tpde(&[&"pack", &src, &"-o", &out]);
    assert_clean_error(&o, 2, "bad.safetensors", phrase);
    assert_eq!(
        entries(d.path()),
        vec!["bad.safetensors"],
        "nothing written"
    );
    assert_eq!(std::fs::read(&src).unwrap(), bytes, "source untouched");
}

#[test]
fn file_shorter_than_8_bytes() {
    rejects(b"\x01\x02\x03", "too short");
}

#[test]
fn header_length_zero() {
    rejects(&0u64.to_le_bytes(), "header length");
}

#[test]
fn header_length_larger_than_the_file() {
    let mut v = 1000u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    rejects(&v, "exceeds");
}

#[test]
fn header_length_2_pow_63() {
    let mut v = (1u64 << 63).to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    rejects(&v, "header length");
}

#[test]
fn header_not_utf8() {
    let mut v = raw("{\"a\":1}", b"");
    v[10] = 0xFF; // the 'a' of the key
    rejects(&v, "not utf-8");
}

#[test]
fn header_not_json() {
    rejects(&raw("{not json}", b""), "not valid json");
}

#[test]
fn header_nested_absurdly_deep() {
    let deep = "[".repeat(100_000);
    rejects(&raw(&deep, b""), "deep");
}

#[test]
fn duplicate_tensor_names() {
    let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    rejects(&raw(h, &[0, 0]), "duplicate");
}

#[test]
fn unknown_dtype() {
    let h = r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#;
    rejects(&raw(h, &[0]), "dtype");
}

#[test]
fn element_count_overflows() {
    let h = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
    rejects(&raw(h, &[0; 4]), "overflow");
}

#[test]
fn data_offsets_not_two_integers() {
    let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#;
    rejects(&raw(h, &[0]), "data_offsets");
    let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,-1]}}"#;
    rejects(&raw(h, &[0]), "data_offsets");
}

#[test]
fn end_before_begin() {
    let h = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[1,0]}}"#;
    rejects(&raw(h, &[0]), "end");
}

#[test]
fn gap_between_tensors() {
    let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#;
    rejects(&raw(h, &[0, 0, 0]), "gap");
}

#[test]
fn overlapping_tensors() {
    let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
    rejects(&raw(h, &[0, 0, 0]), "inside tensor");
}

#[test]
fn tensor_past_end_of_file() {
    let h = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#;
    rejects(&raw(h, &[0; 4]), "past");
}

#[test]
fn size_not_elements_times_dtype_size() {
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
    rejects(&raw(h, &[0; 4]), "needs 8");
}

#[test]
fn bytes_left_after_the_last_tensor() {
    let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    rejects(&raw(h, &[0, 9, 9]), "trailing");
}

#[test]
fn folder_with_a_bad_shard_names_the_shard() {
    let d = tmp();
    let src = d.path().join("model");
    write_sharded_folder(&src, 3);
    let shard = src.join("model-00002-of-00002.safetensors");
    let mut b = std::fs::read(&shard).unwrap();
    b.truncate(b.len() - 1);
    std::fs::write(&shard, &b).unwrap();
    let out = d.path().join("m.tpde");
    let o = tpde(&[&"pack", &src, &"-o", &out]);
    assert_clean_error(&o, 2, "model-00002-of-00002.safetensors", "");
    assert!(!out.exists());
}

#[test]
fn index_naming_a_missing_tensor() {
    let d = tmp();
    let src = d.path().join("model");
    write_sharded_folder(&src, 4);
    let ip = src.join("model.safetensors.index.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&ip).unwrap()).unwrap();
    j["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&ip, serde_json::to_vec(&j).unwrap()).unwrap();
    let o = tpde(&[&"pack", &src, &"-o", &d.path().join("m.tpde")]);
    assert_clean_error(&o, 2, "model.safetensors.index.json", "lm_head.weight");
}

#[test]
fn folder_without_safetensors_and_wrong_extensions() {
    let d = tmp();
    std::fs::create_dir(d.path().join("empty")).unwrap();
    let o = tpde(&[
        &"pack",
        &d.path().join("empty"),
        &"-o",
        &d.path().join("m.tpde"),
    ]);
    assert_clean_error(&o, 2, "empty", "no .safetensors");
    let p = write(d.path(), "weights.bin", b"hello");
    let o = tpde(&[&"pack", &p, &"-o", &d.path().join("m.tpde")]);
    assert_clean_error(&o, 2, "weights.bin", "not a .safetensors");
    let o = tpde(&[
        &"pack",
        &d.path().join("missing.safetensors"),
        &"-o",
        &d.path().join("m.tpde"),
    ]);
    assert_clean_error(&o, 2, "missing.safetensors", "No such file");
}

#[test]
fn usage_errors_exit_2() {
    let o = tpde(&[&"pack"]);
    assert_eq!(o.status.code(), Some(2));
    let o = tpde(&[
        &"pack",
        &"x.safetensors",
        &"-o",
        &"y.tpde",
        &"--base",
        &"q3",
    ]);
    assert_eq!(o.status.code(), Some(2));
}
