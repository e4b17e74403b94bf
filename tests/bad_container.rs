//! Hostile and damaged containers: every case of the tpde-container list in
//! RELIABILITY.md, every truncation of a small container, random bit flips.

use crate::util::*;
use serde_json::json;
use tpde_pack::NoProgress;

fn small_container() -> Vec<u8> {
    let mut r = Rng(11);
    let t = vec![
        T::new(
            "layers.0.w",
            "BF16",
            &[8, 64],
            floats("BF16", 512, 0.02, &mut r),
        ),
        T::new(
            "layers.0.norm",
            "BF16",
            &[64],
            floats("BF16", 64, 1.0, &mut r),
        ),
    ];
    let (_d, _src, out) = packed(&safetensors(&t, None), &["--min-decompose-elems", "1"]);
    std::fs::read(out).unwrap()
}

fn mixed_container() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let (d, src, out) = packed(&mixed_model(21), &[]);
    let bytes = std::fs::read(&out).unwrap();
    (d, src, bytes)
}

/// `verify` on these bytes; returns the error text.
fn verify_err(bytes: &[u8]) -> String {
    let d = tmp();
    let p = write(d.path(), "c.tpde", bytes);
    match tpde_pack::verify(&p, None, &NoProgress) {
        Ok(_) => panic!("verify accepted a damaged container"),
        Err(e) => {
            let s = e.to_string();
            assert_eq!(s.lines().count(), 1, "{s}");
            s
        }
    }
}

fn rejects(bytes: &[u8], phrase: &str) {
    let e = verify_err(bytes);
    assert!(e.contains(phrase), "expected {phrase:?} in: {e}");
}

fn manifest_edit(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (_d, _s, c) = mixed_container();
    rewrite_manifest(&c, edit)
}

#[test]
fn the_unmodified_container_verifies_and_the_rewriter_is_neutral() {
    let (_d, src, c) = mixed_container();
    let same = rewrite_manifest(&c, |_| {});
    let d = tmp();
    let p = write(d.path(), "c.tpde", &same);
    tpde_pack::verify(&p, Some(&src), &NoProgress).unwrap();
}

#[test]
fn truncation_at_every_byte_offset_is_rejected() {
    let c = small_container();
    let d = tmp();
    let p = write(d.path(), "c.tpde", &c);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    // Shrinking one file step by step visits every length without rewriting it.
    for len in (0..c.len() as u64).rev() {
        f.set_len(len).unwrap();
        let r = tpde_pack::verify(&p, None, &NoProgress);
        assert!(
            r.is_err(),
            "truncated to {len} of {} bytes was accepted",
            c.len()
        );
    }
}

#[test]
fn random_bit_flips_anywhere_are_caught_and_data_flips_name_the_chunk() {
    let (_d, _s, c) = mixed_container();
    let manifest_at = u64::from_le_bytes(c[16..24].try_into().unwrap()) as usize;
    let j: serde_json::Value = {
        let len = u64::from_le_bytes(c[24..32].try_into().unwrap()) as usize;
        serde_json::from_slice(&c[manifest_at..manifest_at + len]).unwrap()
    };
    // Byte ranges owned by tensor chunks.
    let mut owned = vec![];
    for t in j["tensors"].as_array().unwrap() {
        let s = &t["storage"];
        for ch in s["chunks"].as_array().unwrap() {
            let exts: Vec<&serde_json::Value> = if s["kind"] == "raw" {
                vec![ch]
            } else {
                vec![&ch["base"], &ch["cold"]]
            };
            for e in exts {
                let o = e["offset"].as_u64().unwrap() as usize;
                owned.push((o, o + e["len"].as_u64().unwrap() as usize));
            }
        }
    }
    let d = tmp();
    let p = d.path().join("c.tpde");
    let mut rng = Rng(99);
    let mut positions: Vec<usize> = (0..1500)
        .map(|_| rng.below(c.len() as u64) as usize)
        .collect();
    positions.extend(0..64); // every header byte
    positions.extend(c.len() - 64..c.len()); // every footer byte
    for pos in positions {
        let mut b = c.clone();
        b[pos] ^= 1 << rng.below(8);
        std::fs::write(&p, &b).unwrap();
        let e = match tpde_pack::verify(&p, None, &NoProgress) {
            Ok(_) => panic!("flip at byte {pos} of {} not caught", c.len()),
            Err(e) => e.to_string(),
        };
        if owned.iter().any(|&(a, z)| (a..z).contains(&pos)) {
            assert!(e.contains("chunk"), "flip at {pos} in a tensor chunk: {e}");
            assert!(e.contains("checksum mismatch"), "{e}");
        }
    }
}

#[test]
fn checksum_mismatch_exits_1_and_structural_damage_exits_2() {
    let (_d, _s, c) = mixed_container();
    let d = tmp();
    let mut b = c.clone();
    b[4096 + 10] ^= 0x10; // inside the first hot chunk
    let p = write(d.path(), "flip.tpde", &b);
    let o = tpde(&[&"verify", &p]);
    assert_clean_error(&o, 1, "flip.tpde", "checksum mismatch");
    let p = write(d.path(), "short.tpde", &c[..c.len() - 1]);
    let o = tpde(&[&"verify", &p]);
    assert_clean_error(&o, 2, "short.tpde", "footer");
}

#[test]
fn bad_magic_version_flags() {
    let (_d, _s, c) = mixed_container();
    let mut b = c.clone();
    b[1] = b'X';
    rejects(&b, "bad magic");
    for v in [0u32, tpde_format::FORMAT_VERSION + 1, 99] {
        let mut b = c.clone();
        b[8..12].copy_from_slice(&v.to_le_bytes());
        rejects(&b, "unsupported container version");
    }
    // A readable version in the header that the manifest contradicts.
    let mut b = c.clone();
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    rejects(&b, "differs from the header's version");
    let mut b = c.clone();
    b[12] = 1;
    rejects(&b, "flags");
    rejects(
        b"PK\x03\x04 this is a zip file, not a container",
        "bad magic",
    );
    rejects(b"", "too short");
}

#[test]
fn manifest_or_footer_offsets_past_end_of_file() {
    let (_d, _s, c) = mixed_container();
    let n = c.len();
    let mut b = c.clone();
    for at in [16, n - 64] {
        b[at..at + 8].copy_from_slice(&(n as u64 * 4).to_le_bytes());
    }
    rejects(&b, "manifest at");
    let mut b = c.clone();
    b[n - 16..n - 8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    rejects(&b, "file length");
}

#[test]
fn manifest_over_the_limit() {
    let (_d, _s, c) = mixed_container();
    let n = c.len();
    let mut b = c.clone();
    let huge = tpde_format::MAX_MANIFEST_LEN + 1;
    for at in [24, n - 56] {
        b[at..at + 8].copy_from_slice(&huge.to_le_bytes());
    }
    rejects(&b, "exceeds the limit");
}

#[test]
fn manifest_digest_mismatch() {
    let (_d, _s, c) = mixed_container();
    let at = u64::from_le_bytes(c[16..24].try_into().unwrap()) as usize;
    let mut b = c.clone();
    b[at + 5] ^= 1;
    rejects(&b, "manifest digest mismatch");
}

#[test]
fn manifest_not_json_or_unknown_fields() {
    let (_d, _s, c) = mixed_container();
    let at = u64::from_le_bytes(c[16..24].try_into().unwrap()) as usize;
    rejects(
        &with_manifest_bytes(&c[..at], b"{\"format_version\": 1"),
        "not valid JSON",
    );
    rejects(
        &manifest_edit(|m| m["surprise"] = json!(1)),
        "unknown field",
    );
}

#[test]
fn sections_overlapping_out_of_order_or_with_gaps() {
    rejects(
        &manifest_edit(|m| {
            let o = m["sections"][1]["offset"].as_u64().unwrap();
            m["sections"][1]["offset"] = json!(o - 4096);
        }),
        "overlap",
    );
    rejects(
        &manifest_edit(|m| {
            let s = m["sections"].as_array_mut().unwrap();
            s.swap(1, 2);
        }),
        "out of order",
    );
    rejects(
        &manifest_edit(|m| {
            let o = m["sections"][1]["offset"].as_u64().unwrap();
            m["sections"][1]["offset"] = json!(o + 4096);
        }),
        "gap",
    );
}

#[test]
fn counts_and_sizes_that_overflow() {
    rejects(
        &manifest_edit(|m| {
            m["tensors"][0]["shape"] = json!([4294967296u64, 4294967296u64, 4294967296u64])
        }),
        "overflow",
    );
    rejects(
        &manifest_edit(|m| {
            m["tensors"][0]["storage"]["chunks"][0]["base"]["offset"] = json!(u64::MAX - 3);
        }),
        "extent",
    );
}

#[test]
fn chunk_past_end_of_file_or_over_the_limit() {
    rejects(
        &manifest_edit(|m| {
            let c = &mut m["tensors"][0]["storage"]["chunks"][0]["cold"];
            c["offset"] = json!(1u64 << 40);
        }),
        "not inside",
    );
    rejects(
        &manifest_edit(|m| {
            let raw = m["tensors"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|t| t["storage"]["kind"] == "raw")
                .unwrap();
            raw["storage"]["chunks"][0]["len"] = json!(tpde_format::MAX_CHUNK_LEN + 1);
        }),
        "",
    );
}

#[test]
fn decompressed_length_over_its_recorded_size() {
    // The header blob says it holds one byte less than its zstd frame
    // declares (and the file length agrees), so only the decoder's bound
    // stands between the reader and an overrun.
    let b = manifest_edit(|m| {
        let chunk = &mut m["files"][0]["content"]["header"]["chunks"][0];
        let raw = chunk["raw_len"].as_u64().unwrap();
        chunk["raw_len"] = json!(raw - 1);
        let len = m["files"][0]["len"].as_u64().unwrap();
        m["files"][0]["len"] = json!(len - 1);
    });
    rejects(&b, "declares");
}

#[test]
fn tensor_and_file_references_that_do_not_resolve() {
    rejects(
        &manifest_edit(|m| m["files"][0]["content"]["tensors"][0] = json!(999)),
        "out of range",
    );
    rejects(
        &manifest_edit(|m| {
            let first = m["files"][0]["content"]["tensors"][0].clone();
            m["files"][0]["content"]["tensors"][1] = first;
        }),
        "twice",
    );
    rejects(
        &manifest_edit(|m| {
            let t = m["tensors"][0].clone();
            m["tensors"].as_array_mut().unwrap().push(t);
        }),
        "duplicate tensor",
    );
    rejects(
        &manifest_edit(|m| m["tensors"][0]["file"] = json!(7)),
        "file index",
    );
}

#[test]
fn wrong_shape_or_dtype() {
    rejects(
        &manifest_edit(|m| m["tensors"][0]["shape"] = json!([96, 131])),
        "does not match shape",
    );
    rejects(
        &manifest_edit(|m| m["tensors"][0]["dtype"] = json!("Q9")),
        "unknown dtype",
    );
    // Same width, different type: structurally valid, but not what the
    // file's stored header says.
    rejects(
        &manifest_edit(|m| m["tensors"][0]["dtype"] = json!("F16")),
        "tensor \"model.embed_tokens.weight\": the manifest says F16 [96, 130], 24960 bytes at \
         1088; the file's header says BF16 [96, 130], 24960 bytes at 1088",
    );
    rejects(
        &manifest_edit(|m| m["tensors"][0]["storage"]["residual"] = json!("exact-v9")),
        "residual",
    );
    rejects(
        &manifest_edit(|m| m["tensors"][0]["storage"]["group_size"] = json!(0)),
        "group size",
    );
}

/// Zero-length tensors may share an offset with the next tensor, and the
/// header's order of such ties need not be the manifest's: the cross-check
/// of `verify` and `unpack` matches tensors by name.
#[test]
fn zero_length_tensors_at_a_shared_offset_verify_and_unpack() {
    let mut r = Rng(31);
    for names in [
        ["model.layers.0.b", "model.embed_tokens.weight"],
        ["model.layers.0.b", "model.embed_tokens.z"],
    ] {
        let z = T::new(names[0], "F32", &[0], Vec::new());
        let n = if names[1].ends_with(".z") { 0 } else { 4 };
        let w = T::new(
            names[1],
            "F32",
            &[n],
            floats("F32", n as usize, 0.1, &mut r),
        );
        let (d, src, out) = packed(&safetensors(&[z, w], None), &[]);
        let o = tpde(&[&"verify", &out, &"--source", &src]);
        assert!(o.status.success(), "{names:?}: {}", stderr(&o));
        let un = d.path().join("un");
        let o = tpde(&[&"unpack", &out, &"-o", &un]);
        assert!(o.status.success(), "{names:?}: {}", stderr(&o));
        assert_eq!(sha256(&un.join("model.safetensors")), sha256(&src));
    }
}

/// A manifest edited and signed anew passes every digest; `verify` holds it
/// to the header it restores (`extract`, `run` and `bench` go by the
/// manifest's names and shapes).
#[test]
fn a_manifest_that_disagrees_with_the_stored_header_is_refused() {
    let renamed = manifest_edit(|m| m["tensors"][0]["name"] = json!("x\n  fake line"));
    let e = verify_err(&renamed);
    assert!(
        e.contains("the manifest lists tensor \"x\\n  fake line\", which its header does not"),
        "{e}"
    );
    // A stored tensor given another shape of as many elements.
    let reshaped = manifest_edit(|m| {
        let ts = m["tensors"].as_array_mut().expect("tensors");
        let t = ts
            .iter_mut()
            .find(|t| {
                t["storage"]["kind"] == "raw" && t["shape"].as_array().is_some_and(|s| s.len() == 1)
            })
            .expect("a stored 1-D tensor");
        let n = t["shape"][0].as_u64().expect("n");
        assert!(n % 2 == 0, "{n}");
        t["shape"] = json!([2, n / 2]);
    });
    rejects(&reshaped, "the file's header says");
    // unpack makes the same check, before writing anything.
    let d = tmp();
    let p = write(d.path(), "c.tpde", &renamed);
    let dest = d.path().join("out");
    let e = tpde_pack::unpack(&p, &dest, &NoProgress).expect_err("unpack refuses it");
    assert!(e.to_string().contains("which its header does not"), "{e}");
    assert_eq!(entries(d.path()), ["c.tpde"]);
}

#[test]
fn tensor_digest_mismatch_names_the_tensor() {
    let b = manifest_edit(|m| m["tensors"][0]["blake3"] = json!("00".repeat(32)));
    let e = verify_err(&b);
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("digest"),
        "{e}"
    );
}

#[test]
fn unsafe_restore_paths() {
    for bad in [
        "../evil.safetensors",
        "/etc/evil",
        "a/../../b",
        "a//b",
        "",
        "a\\b",
    ] {
        let b = manifest_edit(|m| m["files"][0]["path"] = json!(bad));
        let e = verify_err(&b);
        assert!(e.contains("path"), "{bad:?}: {e}");
    }
}

#[test]
fn non_zero_padding() {
    let (_d, _s, c) = mixed_container();
    let mut b = c.clone();
    b[100] = 1; // header region padding
    rejects(&b, "padding");
}

#[test]
fn unpack_refuses_damaged_containers_and_writes_nothing() {
    let (_d, _s, c) = mixed_container();
    let d = tmp();
    let mut b = c.clone();
    b[4096 + 200] ^= 4; // inside the first hot chunk
    let p = write(d.path(), "flip.tpde", &b);
    let out = d.path().join("out");
    let o = tpde(&[&"unpack", &p, &"-o", &out]);
    assert_clean_error(&o, 1, "flip.tpde", "chunk");
    assert_eq!(
        entries(d.path()),
        vec!["flip.tpde"],
        "no output, no temporary left"
    );
}

#[test]
fn verify_names_the_differing_source_byte() {
    let (d, src, c) = mixed_container();
    let p = write(d.path(), "c.tpde", &c);
    let mut s = std::fs::read(&src).unwrap();
    let n = s.len();
    s[n - 10] ^= 1;
    let other = write(d.path(), "other.safetensors", &s);
    let o = tpde(&[&"verify", &p, &"--source", &other]);
    assert_clean_error(&o, 1, "other.safetensors", &format!("byte {}", n - 10));
}

#[test]
fn section_kinds_out_of_order_and_bad_labels() {
    // A files section before the cold sections, with offsets kept valid.
    rejects(
        &manifest_edit(|m| {
            let n = m["sections"].as_array().unwrap().len();
            m["sections"][n - 1]["kind"] = json!("hot");
        }),
        "out of order",
    );
    rejects(
        &manifest_edit(|m| m["sections"][0]["name"] = json!("")),
        "section name",
    );
    rejects(
        &manifest_edit(|m| m["created_by"] = json!("x".repeat(1000))),
        "created_by",
    );
}

#[test]
fn empty_blob_chunks_zero_row_tensors_and_bad_params() {
    rejects(
        &manifest_edit(|m| m["files"][0]["content"]["header"]["chunks"][0]["len"] = json!(0)),
        "out of range",
    );
    // The empty [0, 4] F32 tensor dressed up as a decomposed one of 0 rows.
    rejects(
        &manifest_edit(|m| {
            let t = m["tensors"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|t| t["name"] == "model.empty")
                .unwrap();
            t["storage"] = json!({"kind": "decomposed", "codec": "q4", "group_size": 64, "rows": 0, "cols": 4,
                                  "residual": "exact-v1", "chunks": []});
        }),
        "0 rows × 4 columns out of range",
    );
    rejects(
        &manifest_edit(|m| m["params"]["base"] = json!("q5")),
        "unknown base",
    );
    rejects(
        &manifest_edit(|m| m["params"]["group_size"] = json!(0)),
        "out of range",
    );
    rejects(
        &manifest_edit(|m| m["params"]["zstd_level"] = json!(99)),
        "zstd level",
    );
}

#[test]
fn requantize_catches_a_hot_tier_that_is_not_the_quantization_of_the_weights() {
    // q8 codes are symmetric, so negating a block's scale and all its codes
    // predicts exactly the same values: the residual still rebuilds the
    // original bit for bit, but the base is not what the quantizer makes.
    let (d, src, out) = packed(&mixed_model(61), &["--base", "q8"]);
    let mut c = std::fs::read(&out).unwrap();
    let at = u64::from_le_bytes(c[16..24].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(c[24..32].try_into().unwrap()) as usize;
    let m: serde_json::Value = serde_json::from_slice(&c[at..at + len]).unwrap();
    let base = &m["tensors"][0]["storage"]["chunks"][0]["base"];
    let (off, blen) = (
        base["offset"].as_u64().unwrap() as usize,
        base["len"].as_u64().unwrap() as usize,
    );
    // Rows of 130 columns: blocks of 64, 64 and 2 codes (66 + 66 + 4 bytes).
    // Code 0 predicts +0 under d but −0 under −d, so take a full block
    // without zero codes and with a finite non-zero scale.
    let block = (0..blen / 136)
        .flat_map(|r| [off + r * 136, off + r * 136 + 66])
        .find(|&b| {
            c[b + 2..b + 66].iter().all(|&q| q != 0)
                && c[b + 1] & 0x7C != 0x7C
                && (c[b] | c[b + 1] & 0x7F) != 0
        })
        .expect("a block without zero codes");
    c[block + 1] ^= 0x80;
    for q in &mut c[block + 2..block + 66] {
        *q = (*q as i8).wrapping_neg() as u8;
    }
    let new_xxh3 = xxhash_rust::xxh3::xxh3_64(&c[off..off + blen]);
    let c = rewrite_manifest(&c, |m| {
        m["tensors"][0]["storage"]["chunks"][0]["base"]["xxh3"] = json!(new_xxh3)
    });
    let p = write(d.path(), "flipped.tpde", &c);
    let o = tpde(&[&"verify", &p, &"--source", &src]);
    assert!(o.status.success(), "still an exact rebuild: {}", stderr(&o));
    let o = tpde(&[&"verify", &p, &"--requantize"]);
    assert_clean_error(&o, 1, "flipped.tpde", "not the quantization");
    let o = tpde(&[&"verify", &out, &"--requantize"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A container with expert shards (format version 3), edited.
fn moe_edit(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (_d, _s, out) = packed(&moe_model(5), &[]);
    let c = std::fs::read(out).unwrap();
    rewrite_manifest(&c, edit)
}

#[test]
fn expert_shards_that_break_the_rules() {
    assert!(
        verify_ok(&moe_edit(|_| {})),
        "the unedited container verifies"
    );
    // An expert section nobody lists.
    rejects(
        &moe_edit(|m| {
            m["experts"].as_array_mut().unwrap().remove(3);
        }),
        "is not listed in experts",
    );
    // Two entries for one shard, or out of order.
    rejects(
        &moe_edit(|m| m["experts"][1] = m["experts"][0].clone()),
        "not sorted",
    );
    rejects(
        &moe_edit(|m| {
            let a = m["experts"][0].clone();
            m["experts"][0] = m["experts"][1].clone();
            m["experts"][1] = a;
        }),
        "not sorted",
    );
    // A shard pointing at a cold section, or past the sections.
    rejects(
        &moe_edit(|m| m["experts"][0]["section"] = json!(1)),
        "is not an expert section",
    );
    rejects(
        &moe_edit(|m| m["experts"][0]["section"] = json!(10_000)),
        "out of range",
    );
    // A hot length that cuts a base off, puts a residual on the hot side,
    // or runs past the section.
    rejects(
        &moe_edit(|m| {
            let h = m["experts"][2]["hot_len"].as_u64().unwrap();
            m["experts"][2]["hot_len"] = json!(h - 1);
        }),
        "wrong side of the hot length",
    );
    rejects(
        &moe_edit(|m| {
            let h = m["experts"][2]["hot_len"].as_u64().unwrap();
            m["experts"][2]["hot_len"] = json!(h + 1);
        }),
        "wrong side of the hot length",
    );
    rejects(
        &moe_edit(|m| m["experts"][2]["hot_len"] = json!(u64::MAX)),
        "exceeds the section",
    );
    // A shard labelled with another expert than its section's name says.
    rejects(
        &moe_edit(|m| {
            let l = m["experts"][0]["layer"].as_u64().unwrap();
            m["experts"][0]["layer"] = json!(l + 5);
        }),
        "is named",
    );
    // Two chunks of different shards swap residuals: each shard is still
    // tiled, but a chunk's base and residual are now in different shards.
    rejects(
        &moe_edit(|m| {
            let tensors = m["tensors"].as_array_mut().unwrap();
            let find = |tensors: &[serde_json::Value], e: u32| {
                tensors
                    .iter()
                    .position(|t| {
                        t["name"]
                            == format!("model.layers.0.block_sparse_moe.experts.{e}.w1.weight")
                    })
                    .unwrap()
            };
            let (a, b) = (find(tensors, 0), find(tensors, 1));
            let ca = tensors[a]["storage"]["chunks"][0]["cold"].clone();
            let cb = tensors[b]["storage"]["chunks"][0]["cold"].clone();
            tensors[a]["storage"]["chunks"][0]["cold"] = cb;
            tensors[b]["storage"]["chunks"][0]["cold"] = ca;
        }),
        "not in the same expert section",
    );
    // Shards in a container that claims an older version.
    let mut older = moe_edit(|m| m["format_version"] = json!(2));
    older[8..12].copy_from_slice(&2u32.to_le_bytes());
    rejects(&older, "expert shards need format version 3");
    // The exact-v2 residual in a container that claims version 3, and an
    // unknown residual kind.
    let mut v3 = moe_edit(|m| m["format_version"] = json!(3));
    v3[8..12].copy_from_slice(&3u32.to_le_bytes());
    rejects(&v3, "needs format version 4");
    rejects(
        &moe_edit(|m| {
            let t = m["tensors"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|t| t["storage"]["residual"].is_string())
                .unwrap();
            t["storage"]["residual"] = json!("exact-v3");
        }),
        "unknown residual kind",
    );
    // A file blob moved into an expert section is not allowed there.
    rejects(
        &moe_edit(|m| {
            let kinds: Vec<String> = m["sections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["kind"].as_str().unwrap().to_string())
                .collect();
            let files = kinds.iter().position(|k| k == "files").unwrap();
            m["sections"][files]["kind"] = json!("expert");
        }),
        "is not inside a Files section",
    );
}

fn verify_ok(bytes: &[u8]) -> bool {
    let d = tmp();
    let p = write(d.path(), "c.tpde", bytes);
    tpde_pack::verify(&p, None, &NoProgress).is_ok()
}
