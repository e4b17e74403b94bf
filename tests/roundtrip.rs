//! Lossless round trips through the CLI: every dtype and storage path,
//! every base, single files and sharded folders.

use crate::util::*;

fn roundtrip(bytes: &[u8], extra: &[&str]) {
    let (d, src, out) = packed(bytes, extra);
    let v = tpde(&[&"verify", &out, &"--source", &src]);
    assert!(v.status.success(), "verify: {}", stderr(&v));
    assert!(stdout(&v).starts_with("ok:"), "{}", stdout(&v));
    let restored = d.path().join("restored");
    let u = tpde(&[&"unpack", &out, &"-o", &restored]);
    assert!(u.status.success(), "unpack: {}", stderr(&u));
    assert_eq!(entries(&restored), vec!["model.safetensors"]);
    assert_eq!(sha256(&restored.join("model.safetensors")), sha256(&src));
    assert_eq!(
        std::fs::read(restored.join("model.safetensors")).unwrap(),
        bytes
    );
}

#[test]
fn every_dtype_and_special_value_round_trips_with_q4() {
    roundtrip(&mixed_model(1), &[]);
}

#[test]
fn q8_base_round_trips() {
    roundtrip(&mixed_model(2), &["--base", "q8", "--group-size", "32"]);
}

#[test]
fn no_base_stores_everything_exactly() {
    let (_d, _src, out) = packed(&mixed_model(3), &["--base", "none"]);
    let i = tpde(&[&"inspect", &out, &"--json"]);
    let j: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap();
    assert_eq!(j["tiers"]["cold"]["bytes"], 0);
    assert!(j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["storage"] == "raw"));
    roundtrip(&mixed_model(3), &["--base", "none"]);
}

#[test]
fn tiny_chunks_and_odd_groups_round_trip() {
    roundtrip(
        &mixed_model(4),
        &["--chunk-elems", "7", "--group-size", "5"],
    );
}

#[test]
fn an_empty_model_round_trips() {
    roundtrip(&safetensors(&[], None), &[]);
}

#[test]
fn a_sharded_folder_round_trips_with_every_file() {
    let d = tmp();
    let src = d.path().join("model");
    write_sharded_folder(&src, 7);
    let out = d.path().join("m.tpde");
    let p = tpde(&[&"pack", &src, &"-o", &out]);
    assert!(p.status.success(), "{}", stderr(&p));
    let v = tpde(&[&"verify", &out, &"--source", &src]);
    assert!(v.status.success(), "{}", stderr(&v));
    let restored = d.path().join("restored");
    let u = tpde(&[&"unpack", &out, &"-o", &restored]);
    assert!(u.status.success(), "{}", stderr(&u));
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer/tokenizer.json",
        "empty.txt",
    ] {
        assert_eq!(sha256(&restored.join(f)), sha256(&src.join(f)), "{f}");
    }
    assert_eq!(entries(&restored), entries(&src));
}

#[test]
fn inspect_json_reports_tiers_and_sizes() {
    let (_d, src, out) = packed(&mixed_model(5), &[]);
    let o = tpde(&[&"inspect", &out, &"--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "one JSON object on one line"
    );
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let orig = std::fs::metadata(&src).unwrap().len();
    assert_eq!(j["original_bytes"], orig);
    assert_eq!(j["container_bytes"], std::fs::metadata(&out).unwrap().len());
    let hot = j["tiers"]["hot"]["bytes"].as_u64().unwrap();
    let cold = j["tiers"]["cold"]["bytes"].as_u64().unwrap();
    assert!(hot > 0 && cold > 0);
    let tensors = j["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 12);
    let emb = tensors
        .iter()
        .find(|t| t["name"] == "model.embed_tokens.weight")
        .unwrap();
    assert_eq!(emb["storage"], "q4/g64");
    // Execution order: embeddings, then layer 0, then layer 1, then the rest.
    let layers: Vec<i64> = tensors
        .iter()
        .map(|t| t["layer"].as_i64().unwrap_or(-1))
        .collect();
    let first_l1 = layers.iter().position(|&l| l == 1).unwrap();
    assert!(layers[..first_l1].iter().all(|&l| l <= 0));
    // The table form mentions the tiers too.
    let t = tpde(&[&"inspect", &out]);
    assert!(stdout(&t).contains("hot") && stdout(&t).contains("cold"));
}

#[test]
fn pack_and_verify_print_json_with_peak_rss() {
    let d = tmp();
    let src = write(d.path(), "model.safetensors", &mixed_model(6));
    let out = d.path().join("m.tpde");
    let o = tpde(&[&"pack", &src, &"-o", &out, &"--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(j["original_bytes"], std::fs::metadata(&src).unwrap().len());
    assert!(o.stderr.is_empty(), "no progress when not a terminal");
    let v = tpde(&[&"verify", &out, &"--json"]);
    let j: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(j["tensors"], 12);
}

#[test]
fn demo_runs_end_to_end() {
    let d = tmp();
    let o = tpde(&[&"demo", &"--dir", &d.path()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("identical to the source"), "{s}");
    assert!(s.contains("model.safetensors: blake3"), "{s}");
}

#[test]
fn repacking_is_deterministic() {
    let (d, src, out) = packed(&mixed_model(8), &[]);
    let out2 = d.path().join("again.tpde");
    let o = tpde(&[&"--threads", &"1", &"pack", &src, &"-o", &out2]);
    assert!(o.status.success());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}

#[test]
fn every_safetensors_dtype_round_trips() {
    // One tensor per dtype the container can carry; floats big enough to be
    // decomposed, everything else stored exactly. Sub-byte types need an
    // element count whose bits fill whole bytes.
    let mut r = Rng(77);
    let mut tensors = Vec::new();
    for &(dtype, bits) in tpde_format::DTYPES {
        let shape: &[u64] = if tpde_format::is_decomposable_dtype(dtype) {
            &[16, 256]
        } else {
            &[4, 8]
        };
        let n: u64 = shape.iter().product();
        let bytes = (n * bits / 8) as usize;
        let data = if tpde_format::is_decomposable_dtype(dtype) {
            floats(dtype, n as usize, 0.02, &mut r)
        } else {
            (0..bytes).map(|_| r.next() as u8).collect()
        };
        tensors.push(T::new(&format!("layers.0.{dtype}"), dtype, shape, data));
    }
    let bytes = safetensors(&tensors, None);
    roundtrip(&bytes, &[]);
    let (_d, _src, out) = packed(&bytes, &[]);
    let j: serde_json::Value =
        serde_json::from_slice(&tpde(&[&"inspect", &out, &"--json"]).stdout).unwrap();
    for t in j["tensors"].as_array().unwrap() {
        let decomposed = t["storage"] != "raw";
        let float = tpde_format::is_decomposable_dtype(t["dtype"].as_str().unwrap());
        assert_eq!(decomposed, float, "{}", t["name"]);
    }
}
