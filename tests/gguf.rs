//! GGUF in and out: byte-identical round trips (padding, split sets),
//! metadata in `inspect`, and bad GGUF input through the CLI.

use crate::util::*;

fn roundtrip_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let src = write(dir, name, bytes);
    let out = dir.join("m.tpde");
    let p = tpde(&[&"pack", &src, &"-o", &out]);
    assert!(p.status.success(), "pack: {}", stderr(&p));
    let v = tpde(&[&"verify", &out, &"--source", &src]);
    assert!(v.status.success(), "verify: {}", stderr(&v));
    let restored = dir.join("restored");
    let u = tpde(&[&"unpack", &out, &"-o", &restored]);
    assert!(u.status.success(), "unpack: {}", stderr(&u));
    assert_eq!(
        std::fs::read(restored.join(name)).unwrap(),
        bytes,
        "{name} restored byte for byte"
    );
    out
}

#[test]
fn a_gguf_round_trips_byte_identical_with_floats_decomposed_and_blocks_kept() {
    let d = tmp();
    let out = roundtrip_file(d.path(), "tiny.gguf", &gguf_model(1, 0));
    let j: serde_json::Value =
        serde_json::from_slice(&tpde(&[&"inspect", &out, &"--json"]).stdout).unwrap();
    let storage = |n: &str| {
        j["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("{n}"))["storage"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(storage("token_embd.weight"), "q4/g64");
    assert_eq!(storage("blk.0.attn_q.weight"), "q4/g64");
    assert_eq!(storage("blk.0.ffn_up.weight"), "q4/g64");
    assert_eq!(
        storage("blk.0.ffn_down.weight"),
        "raw",
        "Q4_0 blocks are their own base"
    );
    assert_eq!(storage("blk.1.ffn_up.weight"), "raw");
    // Shapes are row-major (GGUF's ne reversed), dtypes are ggml names.
    let t = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "blk.0.ffn_down.weight")
        .unwrap();
    assert_eq!(t["dtype"], "Q4_0");
    assert_eq!(t["shape"], serde_json::json!([64, 128]));
    // Metadata is visible.
    let g = &j["files"][0]["gguf"];
    assert_eq!(j["files"][0]["kind"], "gguf");
    assert_eq!(g["architecture"], "llama");
    assert_eq!(g["metadata"]["llama.block_count"], 2);
    assert_eq!(g["metadata"]["tokenizer.ggml.tokens"]["len"], 96);
    assert_eq!(g["tensor_types"]["Q4_0"], 1);
    let table = stdout(&tpde(&[&"inspect", &out]));
    assert!(
        table.contains("architecture llama") && table.contains("llama.block_count = 2"),
        "{table}"
    );
}

#[test]
fn non_zero_padding_comes_back_exactly() {
    let d = tmp();
    roundtrip_file(d.path(), "padded.gguf", &gguf_model(2, 0xA5));
}

#[test]
fn a_split_gguf_packs_as_one_model_and_unpacks_as_the_same_shards() {
    let d = tmp();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut r = Rng(3);
    let names = [
        "m-00001-of-00003.gguf",
        "m-00002-of-00003.gguf",
        "m-00003-of-00003.gguf",
    ];
    for (i, n) in names.iter().enumerate() {
        let mut kv = vec![
            ("split.no", Gv::U16(i as u16)),
            ("split.count", Gv::U16(3)),
            ("split.tensors.count", Gv::I32(3)),
        ];
        if i == 0 {
            kv.insert(0, ("general.architecture", Gv::Str("llama")));
        }
        let t = Gt {
            name: format!("blk.{i}.ffn_up.weight"),
            dims: vec![64, 64],
            ty: 1,
            data: floats("F16", 4096, 0.02, &mut r),
        };
        std::fs::write(src.join(n), gguf(&kv, &[t], 0)).unwrap();
    }
    let out = d.path().join("m.tpde");
    let p = tpde(&[&"pack", &src.join(names[0]), &"-o", &out]);
    assert!(p.status.success(), "{}", stderr(&p));
    let v = tpde(&[&"verify", &out, &"--source", &src]);
    assert!(v.status.success(), "{}", stderr(&v));
    let restored = d.path().join("restored");
    let u = tpde(&[&"unpack", &out, &"-o", &restored]);
    assert!(u.status.success(), "{}", stderr(&u));
    assert_eq!(entries(&restored), names.to_vec());
    for n in names {
        assert_eq!(sha256(&restored.join(n)), sha256(&src.join(n)), "{n}");
    }
    // A missing shard is named.
    std::fs::remove_file(src.join(names[1])).unwrap();
    let o = tpde(&[
        &"pack",
        &src.join(names[0]),
        &"-o",
        &d.path().join("x.tpde"),
    ]);
    assert_clean_error(&o, 2, "m-00001-of-00003.gguf", "m-00002-of-00003.gguf");
}

#[test]
fn bad_gguf_input_is_a_clean_error_with_nothing_written() {
    let good = gguf_model(4, 0);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad magic",
            [b"GGUX".as_slice(), &good[4..]].concat(),
            "magic",
        ),
        (
            "version 1",
            [&good[..4], &1u32.to_le_bytes(), &good[8..]].concat(),
            "version",
        ),
        ("truncated header", good[..100].to_vec(), ""),
        ("truncated data", good[..good.len() - 40].to_vec(), ""),
    ];
    for (what, bytes, phrase) in cases {
        let d = tmp();
        let src = write(d.path(), "bad.gguf", &bytes);
        let o = tpde(&[&"pack", &src, &"-o", &d.path().join("out.tpde")]);
        assert_clean_error(&o, 2, "bad.gguf", phrase);
        assert_eq!(
            entries(d.path()),
            vec!["bad.gguf"],
            "{what}: nothing written"
        );
    }
}

#[test]
fn a_tensor_with_an_empty_name_is_refused_before_anything_is_written() {
    // GGUF allows it; a container finds tensors by name.
    let t = Gt {
        name: String::new(),
        dims: vec![4],
        ty: 0,
        data: vec![0u8; 16],
    };
    let d = tmp();
    let src = write(d.path(), "m.gguf", &gguf(&[], &[t], 0));
    let o = tpde(&[&"pack", &src, &"-o", &d.path().join("out.tpde")]);
    assert_clean_error(&o, 2, "m.gguf", "tensor 0 has an empty name");
    assert_eq!(entries(d.path()), vec!["m.gguf"]);
}

#[test]
fn a_gguf_without_tensors_round_trips() {
    // Vocabulary-only files (tokenizer, no weights) exist in the wild.
    let d = tmp();
    let kv = vec![
        ("general.architecture", Gv::Str("llama")),
        (
            "tokenizer.ggml.tokens",
            Gv::Strs(vec!["a".into(), "b".into()]),
        ),
    ];
    roundtrip_file(d.path(), "vocab.gguf", &gguf(&kv, &[], 0));
}
