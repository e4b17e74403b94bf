//! One expert at a time: `extract` returns exactly an expert's original
//! bytes (or its base), reading only that expert's chunks.

use crate::util::*;
use std::path::Path;
use tpde_pack::{Container, Fidelity};

fn pack(src: &Path, dir: &Path) -> std::path::PathBuf {
    let out = dir.join("moe.tpde");
    let o = tpde(&[&"pack", &src, &"-o", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// Stored bytes of expert `e` of layer `l`, summed from the manifest; also
/// checks that no chunk of a stacked tensor spans two experts, and that
/// every byte of the expert lies in `shard` (offset, length).
fn expert_stored_bytes(c: &Container, l: u32, e: u32, shard: (u64, u64)) -> u64 {
    let inside = |x: &tpde_format::Extent| {
        assert!(
            x.offset >= shard.0 && x.end() <= shard.0 + shard.1,
            "l{l} e{e}: extent {x:?} outside its shard {shard:?}"
        );
        x.len
    };
    let m = &c.manifest;
    let shapes: Vec<(&str, &[u64])> = m
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let plan = tpde_ingest::moe::plan(&shapes).unwrap();
    let layer = plan.layers.iter().find(|x| x.layer == l).unwrap();
    let mut sum = 0;
    for et in &layer.tensors {
        let t = m.tensors.iter().find(|t| t.name == et.name).unwrap();
        let n = if et.expert.is_some() {
            1
        } else {
            layer.experts as u64
        };
        if et.expert.is_some_and(|x| x != e) {
            continue;
        }
        let idx = if et.expert.is_some() { 0 } else { e as u64 };
        match &t.storage {
            tpde_format::Storage::Raw { chunks } => {
                let per = t.byte_len / n;
                let mut at = 0;
                for ch in chunks {
                    let (a, b) = (at, at + ch.len);
                    at = b;
                    assert_eq!(
                        a / per,
                        (b - 1) / per,
                        "{}: a raw chunk spans two experts",
                        t.name
                    );
                    if a / per == idx {
                        sum += inside(ch);
                    }
                }
            }
            tpde_format::Storage::Decomposed { chunks, rows, .. } => {
                let per = rows / n;
                let mut r = 0;
                for ch in chunks {
                    let (a, b) = (r, r + ch.rows);
                    r = b;
                    assert_eq!(
                        a / per,
                        (b - 1) / per,
                        "{}: a chunk spans two experts",
                        t.name
                    );
                    if a / per == idx {
                        sum += inside(&ch.base) + inside(&ch.cold);
                    }
                }
            }
        }
    }
    sum
}

/// The shard of expert `e` of layer `l`: (offset, length, hot length).
/// The chunks of the decomposed tensor whose name ends with `suffix`.
fn decomposed_chunks(c: &Container, suffix: &str) -> Vec<tpde_format::DecomposedChunk> {
    let t = c
        .manifest
        .tensors
        .iter()
        .find(|t| t.name.ends_with(suffix))
        .unwrap_or_else(|| panic!("no tensor named …{suffix}"));
    let tpde_format::Storage::Decomposed { chunks, .. } = &t.storage else {
        panic!("{suffix}: decomposed")
    };
    chunks.clone()
}

fn shard_of(c: &Container, l: u32, e: u32) -> (u64, u64, u64) {
    let m = &c.manifest;
    let x = m
        .experts
        .iter()
        .find(|x| (x.layer, x.expert) == (l, e))
        .unwrap_or_else(|| panic!("no shard for layer {l} expert {e}"));
    let s = &m.sections[x.section as usize];
    assert_eq!(s.name, format!("expert.{l}.{e}"));
    (s.offset, s.len, x.hot_len)
}

#[test]
fn every_expert_is_one_shard_holding_exactly_its_data() {
    for rel in [
        "moe-mixtral-tiny",
        "moe-qwen-tiny",
        "moe-minilm-experts",
        "moe-mixtral-tiny-gguf/model.gguf",
    ] {
        let d = tmp();
        let out = pack(&fixture(rel), d.path());
        let c = Container::open(&out).unwrap();
        let m = &c.manifest;
        assert_eq!(m.format_version, tpde_format::FORMAT_VERSION);
        let layers: Vec<u32> = m.experts.iter().map(|x| x.layer).collect();
        assert!(
            layers.windows(2).all(|w| w[0] <= w[1]),
            "{rel}: layer by layer"
        );
        assert!(m.experts.len() >= 8, "{rel}: {} shards", m.experts.len());
        for x in &m.experts {
            let (at, len, hot) = shard_of(&c, x.layer, x.expert);
            assert!(hot > 0 && hot < len, "{rel}: hot data then residuals");
            assert_eq!(
                expert_stored_bytes(&c, x.layer, x.expert, (at, len)),
                len,
                "{rel} l{} e{}: the shard holds the expert's data and nothing else",
                x.layer,
                x.expert
            );
            // The shard follows its layer's dense residuals.
            let dense = m
                .sections
                .iter()
                .position(|s| s.name == format!("cold.layer.{}", x.layer));
            assert!(
                dense.is_none_or(|d| d < x.section as usize),
                "{rel}: shard before its layer's dense part"
            );
        }
    }
}

#[test]
fn every_expert_comes_back_exactly_reading_only_its_own_chunks() {
    for rel in ["moe-mixtral-tiny", "moe-mixtral-tiny-gguf/model.gguf"] {
        let src = fixture(rel);
        let d = tmp();
        let out = pack(&src, d.path());
        // The source's tensors, by name: (bytes, number of experts stacked in it).
        let mut source: std::collections::HashMap<String, Vec<u8>> = Default::default();
        if src.is_dir() {
            let f = src.join("model.safetensors");
            let bytes = std::fs::read(&f).unwrap();
            let (h, _) =
                tpde_ingest::safetensors::read_header(&bytes[..], bytes.len() as u64).unwrap();
            for t in &h.tensors {
                let a = (h.data_start + t.begin) as usize;
                source.insert(t.name.clone(), bytes[a..a + t.byte_len() as usize].to_vec());
            }
        } else {
            let bytes = std::fs::read(&src).unwrap();
            let (h, _) = tpde_ingest::gguf::read_header(&bytes[..], bytes.len() as u64).unwrap();
            for t in &h.tensors {
                let a = (h.data_start + t.offset) as usize;
                source.insert(t.name.clone(), bytes[a..a + t.byte_len as usize].to_vec());
            }
        }
        for layer in 0..2 {
            for expert in 0..4 {
                let c = Container::open(&out).unwrap();
                let (opened, calls) = (c.bytes_read(), c.reads());
                let tensors =
                    tpde_pack::extract_expert(&c, layer, expert, Fidelity::Exact).unwrap();
                assert_eq!(tensors.len(), 3, "{rel}: three projections per expert");
                let (at, len, hot) = shard_of(&c, layer, expert);
                assert_eq!(expert_stored_bytes(&c, layer, expert, (at, len)), len);
                // One pass over the shard: its hot bytes and its residuals,
                // one read each in a shard this small (under 64 KiB).
                assert!(len < 64 << 10);
                assert_eq!(
                    (c.bytes_read() - opened, c.reads() - calls),
                    (len, 2),
                    "{rel} l{layer} e{expert}: one pass over exactly the expert's shard"
                );
                let (opened, calls) = (c.bytes_read(), c.reads());
                tpde_pack::extract_expert(&c, layer, expert, Fidelity::Base).unwrap();
                assert_eq!(
                    (c.bytes_read() - opened, c.reads() - calls),
                    (hot, 1),
                    "{rel} l{layer} e{expert}: base fidelity reads the shard's hot part once"
                );
                for t in &tensors {
                    let whole = &source[&t.name];
                    let want = if whole.len() == t.data.len() {
                        &whole[..]
                    } else {
                        // A stacked tensor: this expert's slice.
                        let per = whole.len() / 4;
                        &whole[expert as usize * per..(expert as usize + 1) * per]
                    };
                    assert!(
                        t.data == want,
                        "{rel} l{layer} e{expert}: {} differs from the source",
                        t.name
                    );
                }
            }
        }
    }
}

#[test]
fn base_fidelity_gives_the_quantized_values_close_to_the_original() {
    let src = fixture("moe-minilm-experts");
    let d = tmp();
    let out = pack(&src, d.path());
    let c = Container::open(&out).unwrap();
    let exact = tpde_pack::extract_expert(&c, 1, 3, Fidelity::Exact).unwrap();
    let base = tpde_pack::extract_expert(&c, 1, 3, Fidelity::Base).unwrap();
    for (x, b) in exact.iter().zip(&base) {
        assert_eq!((x.name.as_str(), &x.shape), (b.name.as_str(), &b.shape));
        assert_ne!(x.data, b.data, "{}: base is a 4-bit approximation", x.name);
        let vals = |v: &[u8]| -> Vec<f32> {
            v.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        let (xv, bv) = (vals(&x.data), vals(&b.data));
        let err: f32 =
            xv.iter().zip(&bv).map(|(a, b)| (a - b).abs()).sum::<f32>() / xv.len() as f32;
        let mag: f32 = xv.iter().map(|a| a.abs()).sum::<f32>() / xv.len() as f32;
        assert!(
            err < 0.2 * mag,
            "{}: mean error {err} against mean magnitude {mag}",
            x.name
        );
    }
}

/// `fetch_base_blocks` gives each decomposed tensor's base blocks for the
/// expert's rows, reading only the shard's hot part: their values, rounded
/// to the dtype, are what a base fetch delivers. Per-expert tensors
/// (MiniLM-derived) and slices of stacked ones (the GGUF fixture's F16
/// `ffn_*_exps`) alike.
#[test]
fn base_blocks_of_an_expert_are_the_blocks_behind_its_base_values() {
    let d = tmp();
    let mut checked = 0;
    for (i, src) in [
        fixture("moe-minilm-experts"),
        fixture("moe-mixtral-tiny-gguf/model.gguf"),
    ]
    .iter()
    .enumerate()
    {
        let dir = d.path().join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let out = pack(src, &dir);
        let c = Container::open(&out).unwrap();
        let r = tpde_pack::ExpertReader::new(&c).unwrap();
        let (l, _) = r.layers()[0];
        let (_, _, hot_len) = shard_of(&c, l, 1);
        let before = c.bytes_read();
        let blocks = r.fetch_base_blocks(l, 1).unwrap();
        assert!(
            c.bytes_read() - before <= hot_len,
            "only the shard's hot part"
        );
        let values = r.fetch(l, 1, Fidelity::Base).unwrap();
        assert_eq!(blocks.len(), values.len());
        for (b, v) in blocks.iter().zip(&values) {
            assert_eq!((b.name.as_str(), &b.shape), (v.name.as_str(), &v.shape));
            let Some(layout) = b.base else {
                assert_eq!(b.data, v.data, "{}: stored exactly", b.name);
                continue;
            };
            checked += 1;
            let rows = b.shape.iter().product::<u64>() as usize / layout.cols;
            assert_eq!(b.data.len(), rows * layout.row_bytes(), "{}", b.name);
            let f = tpde_engine::kernels::base_values_f32(&layout, rows, &b.data).unwrap();
            let bytes: Vec<u8> = match b.dtype.as_str() {
                "BF16" => f
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                "F16" => f
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                "F32" => f.iter().flat_map(|x| x.to_le_bytes()).collect(),
                d => panic!("dtype {d}"),
            };
            assert!(bytes == v.data, "{}: the blocks' values", b.name);
        }
    }
    assert!(checked > 0, "the fixtures have decomposed expert tensors");
}

#[test]
fn the_cli_writes_a_safetensors_file_and_refuses_what_is_not_there() {
    let src = fixture("moe-qwen-tiny");
    let d = tmp();
    let out = pack(&src, d.path());
    let file = d.path().join("e.safetensors");
    let o = tpde(&[
        &"extract",
        &out,
        &"--layer",
        &"0",
        &"--expert",
        &"1",
        &"-o",
        &file,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a valid safetensors file");
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        vec![
            "model.layers.0.mlp.experts.1.down_proj.weight",
            "model.layers.0.mlp.experts.1.gate_proj.weight",
            "model.layers.0.mlp.experts.1.up_proj.weight"
        ]
    );
    let x = d.path().join("x.safetensors");
    let extract = |layer: &str, expert: &str| {
        tpde(&[
            &"extract",
            &out,
            &"--layer",
            &layer,
            &"--expert",
            &expert,
            &"-o",
            &x,
        ])
    };
    assert_clean_error(&extract("7", "0"), 2, "moe.tpde", "no experts in layer 7");
    assert_clean_error(
        &extract("0", "9"),
        2,
        "moe.tpde",
        "has 4 experts (0 to 3), no expert 9",
    );
    // The largest number there is: named as given, no overflow.
    assert_clean_error(
        &extract("0", "4294967295"),
        2,
        "moe.tpde",
        "no expert 4294967295",
    );
    let (_d2, _s, dense) = packed(&mixed_model(1), &[]);
    let o = tpde(&[
        &"extract",
        &dense,
        &"--layer",
        &"0",
        &"--expert",
        &"0",
        &"-o",
        &d.path().join("x.safetensors"),
    ]);
    assert_clean_error(&o, 2, "model.tpde", "not a mixture-of-experts");
    assert!(!d.path().join("x.safetensors").exists());
}

#[test]
fn a_large_expert_is_fetched_in_one_pass_and_damage_is_caught() {
    let src = large_expert_model();
    let (d, _s, out) = packed(&src, &[]);
    let (h, _) = tpde_ingest::safetensors::read_header(&src[..], src.len() as u64).unwrap();
    let c = Container::open(&out).unwrap();
    let reader = tpde_pack::ExpertReader::new(&c).unwrap();
    for e in 0..2 {
        let (_, len, _) = shard_of(&c, 0, e);
        let (opened, calls) = (c.bytes_read(), c.reads());
        let got = reader.fetch(0, e, Fidelity::Exact).unwrap();
        let groups = len.div_ceil(len / 8);
        assert_eq!(
            c.bytes_read() - opened,
            len,
            "e{e}: the shard's bytes, once"
        );
        assert!(
            (4..=2 * groups + 2).contains(&(c.reads() - calls)),
            "e{e}: {} reads for a shard of {len} bytes",
            c.reads() - calls
        );
        for t in &got {
            let x = h.tensors.iter().find(|x| x.name == t.name).unwrap();
            let a = (h.data_start + x.begin) as usize;
            assert!(t.data == src[a..a + x.byte_len() as usize], "{}", t.name);
        }
    }
    // One flipped byte in a residual of expert 1: its fetch fails naming the
    // chunk; expert 0 still comes back.
    let at = decomposed_chunks(&c, "experts.1.w2.weight")[1].cold.offset + 7;
    let mut bytes = std::fs::read(&out).unwrap();
    bytes[at as usize] ^= 0x10;
    let bad = write(d.path(), "bad.tpde", &bytes);
    let c = Container::open(&bad).unwrap();
    let reader = tpde_pack::ExpertReader::new(&c).unwrap();
    assert!(reader.fetch(0, 0, Fidelity::Exact).is_ok());
    let err = reader.fetch(0, 1, Fidelity::Exact).unwrap_err().to_string();
    assert!(
        err.contains("experts.1.w2.weight\" chunk 1") && err.contains("checksum mismatch"),
        "{err}"
    );
    // Base fidelity does not read residuals, so it is unaffected.
    assert!(reader.fetch(0, 1, Fidelity::Base).is_ok());
}

/// Fetches every expert of `out` at both fidelities with direct reads and
/// compares with the buffered fetch; `None` where O_DIRECT is refused.
/// Returns per (layer, expert, fidelity): (requests, bytes read, part).
fn direct_fetches(out: &Path) -> Option<Vec<(u64, u64, u64)>> {
    let c = Container::open(out).unwrap();
    let buffered = tpde_pack::ExpertReader::new(&c).unwrap();
    let direct = match tpde_pack::ExpertReader::new(&c)
        .unwrap()
        .with_direct_reads()
    {
        Ok(r) => r,
        Err(e) => {
            // tmpfs and some overlay file systems refuse O_DIRECT.
            eprintln!(
                "note: O_DIRECT is not supported where the tests write ({e}); direct expert reads are not tested"
            );
            return None;
        }
    };
    let mut seen = Vec::new();
    for (l, experts) in buffered.layers() {
        for e in 0..experts {
            let (offset, len, hot_len) = shard_of(&c, l, e);
            assert_eq!(offset % 4096, 0);
            for (fidelity, part) in [(Fidelity::Exact, len), (Fidelity::Base, hot_len)] {
                let want = buffered.fetch(l, e, fidelity).unwrap();
                let (bytes, calls) = (c.bytes_read(), c.reads());
                let got = direct.fetch(l, e, fidelity).unwrap();
                seen.push((c.reads() - calls, c.bytes_read() - bytes, part));
                // What the engine's memory budget counts for the reader.
                let kept = tpde_pack::ExpertReader::kept_bytes(&c, true);
                assert!(
                    direct.kept_capacity() <= kept,
                    "l{l} e{e} {fidelity:?}: a kept buffer of {} bytes, {kept} counted",
                    direct.kept_capacity()
                );
                assert!(buffered.kept_capacity() <= tpde_pack::ExpertReader::kept_bytes(&c, false));
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    assert_eq!(a.name, b.name);
                    assert!(
                        a.data == b.data,
                        "l{l} e{e} {fidelity:?}: {} differs",
                        a.name
                    );
                }
            }
        }
    }
    Some(seen)
}

#[test]
fn direct_reads_fetch_the_same_experts_in_whole_blocks() {
    // Small shards: one request each, the part in whole blocks.
    let (_d, _s, out) = packed(&moe_model(5), &[]);
    let Some(small) = direct_fetches(&out) else {
        return;
    };
    // Large ones (6 MiB): over 2 MiB (exact fidelity here), each span of
    // the shard in its own request (two per group of chunks), a block
    // shared by two spans read by both.
    let src = large_expert_model();
    let (d, _s, out) = packed(&src, &[]);
    let large = direct_fetches(&out).expect("O_DIRECT worked above");
    assert!(small.iter().all(|x| x.2 <= 2 << 20));
    assert_eq!(large.iter().filter(|x| x.2 > 2 << 20).count(), 2);
    for &(requests, read, part) in small.iter().chain(&large) {
        if part <= 2 << 20 {
            assert_eq!(requests, 1);
            assert_eq!(read, part.div_ceil(4096) * 4096);
        } else {
            assert!((4..=40).contains(&requests), "{requests} requests");
            assert!(
                read >= part && read <= part + requests * 8192 && read as f64 <= 1.05 * part as f64,
                "{read} bytes read for a part of {part}"
            );
        }
    }
    // Damage in a residual is caught the same way.
    let c = Container::open(&out).unwrap();
    let at = decomposed_chunks(&c, "experts.1.w2.weight")[0].cold.offset;
    let mut bytes = std::fs::read(&out).unwrap();
    bytes[at as usize + 5] ^= 0x01;
    let bad = write(d.path(), "bad.tpde", &bytes);
    let c = Container::open(&bad).unwrap();
    let direct = tpde_pack::ExpertReader::new(&c)
        .unwrap()
        .with_direct_reads()
        .unwrap();
    assert!(direct.fetch(0, 0, Fidelity::Exact).is_ok());
    let err = direct.fetch(0, 1, Fidelity::Exact).unwrap_err().to_string();
    assert!(
        err.contains("experts.1.w2.weight\" chunk 0") && err.contains("checksum mismatch"),
        "{err}"
    );
    // A container cut short inside a shard after it was opened: a clear
    // error naming the shard, no panic or hang.
    let cut = write(d.path(), "cut.tpde", &std::fs::read(&out).unwrap());
    let c = Container::open(&cut).unwrap();
    let direct = tpde_pack::ExpertReader::new(&c)
        .unwrap()
        .with_direct_reads()
        .unwrap();
    let (offset, len, _) = shard_of(&c, 0, 1);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(offset + len / 2)
        .unwrap();
    let err = direct.fetch(0, 1, Fidelity::Exact).unwrap_err().to_string();
    assert!(err.contains("expert.0.1") && err.contains("ends"), "{err}");
}
