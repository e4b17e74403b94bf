//! The committed test vectors must stay exactly what the generator makes
//! (`formats/vectors/v<FORMAT_VERSION>/<case>/`, the current version) and
//! must stay readable by the current reader, the frozen vectors of every
//! older readable version (`formats/vectors/v1/<case>/`,
//! `formats/vectors/v2/<case>/`, …) included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tpde_pack::NoProgress;

const REGENERATE: &str =
    "run `cargo run -p tpde-vectors --bin gen-vectors` if the change is intended, \
and bump FORMAT_VERSION if the format changed";

/// Vectors of the version the writer produces now.
fn committed_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("v{}", tpde_format::FORMAT_VERSION))
}

/// Frozen vectors of an older format version (never regenerated).
fn frozen_root(version: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("v{version}"))
}

/// Every file under `dir`, by `/`-separated path relative to it.
fn files_under(dir: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: cannot list: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("under root");
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.insert(rel, p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Names of the committed cases under `root`: folders holding `<name>/<name>.tpde`.
fn cases_in(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .expect("list formats/vectors")
        .filter_map(|e| {
            let p = e.expect("directory entry").path();
            let name = p.file_name()?.to_str()?.to_string();
            p.join(format!("{name}.tpde")).is_file().then_some(name)
        })
        .collect();
    names.sort();
    names
}

fn committed_cases() -> Vec<String> {
    cases_in(&committed_root())
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: cannot read: {e}", p.display()))
}

#[test]
fn generator_reproduces_the_committed_vectors_byte_for_byte() {
    let tmp = tempfile::tempdir().expect("temp dir");
    tpde_vectors::generate(tmp.path()).expect("generate vectors");

    let mut generated_cases: Vec<String> =
        tpde_vectors::inputs().into_iter().map(|(n, _)| n).collect();
    generated_cases.sort();
    assert_eq!(
        committed_cases(),
        generated_cases,
        "the committed cases differ from the generator's; {REGENERATE}"
    );

    for case in &generated_cases {
        let fresh = files_under(&tmp.path().join(case));
        let committed = files_under(&committed_root().join(case));
        for rel in committed.keys() {
            assert!(
                fresh.contains_key(rel),
                "formats/vectors/{case}/{rel} is committed but no longer generated; {REGENERATE}"
            );
        }
        for (rel, path) in &fresh {
            let Some(old) = committed.get(rel) else {
                panic!("formats/vectors/{case}/{rel} is generated but not committed; {REGENERATE}");
            };
            let (new, old) = (read(path), read(old));
            if new != old {
                let at = new.iter().zip(&old).position(|(a, b)| a != b);
                panic!(
                    "formats/vectors/{case}/{rel} drifted ({} bytes committed, {} generated, first difference at {}); {REGENERATE}",
                    old.len(),
                    new.len(),
                    at.map_or("the end of the shorter one".into(), |i| format!("byte {i}")),
                );
            }
        }
    }
}

/// What a case's container was packed from: its only input file, or the folder.
fn source_of(input: &Path) -> PathBuf {
    let files = files_under(input);
    match files.len() {
        1 => files.into_values().next().expect("one file"),
        _ => input.to_path_buf(),
    }
}

#[test]
fn committed_containers_verify_and_unpack_to_the_committed_inputs() {
    check_committed(&committed_root(), tpde_format::FORMAT_VERSION);
}

/// Every older version the reader still reads has its frozen vectors, and
/// they still verify and unpack.
#[test]
fn frozen_containers_of_older_versions_still_verify_and_unpack() {
    for version in tpde_format::OLDEST_READABLE_VERSION..tpde_format::FORMAT_VERSION {
        let root = frozen_root(version);
        assert!(
            root.is_dir(),
            "{}: the frozen vectors of format version {version} are missing",
            root.display()
        );
        check_committed(&root, version);
    }
}

fn check_committed(root: &Path, version: u32) {
    let cases = cases_in(root);
    assert!(
        cases.len() >= 4,
        "expected committed cases in {}, found {cases:?}",
        root.display()
    );
    for case in &cases {
        let dir = root.join(case);
        let container = dir.join(format!("{case}.tpde"));
        let input = dir.join("input");

        // The facts in expected.json hold for the committed container.
        let expected: serde_json::Value =
            serde_json::from_slice(&read(&dir.join("expected.json"))).expect("expected.json");
        let bytes = read(&container);
        assert_eq!(
            expected["container"]["len"].as_u64(),
            Some(bytes.len() as u64),
            "{case}: container length"
        );
        assert_eq!(
            expected["container"]["blake3"].as_str(),
            Some(blake3::hash(&bytes).to_hex().as_str()),
            "{case}: container blake3"
        );

        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")),
            version,
            "{case}: header version"
        );
        let report = tpde_pack::verify(&container, Some(&source_of(&input)), &NoProgress)
            .unwrap_or_else(|e| panic!("{case}: verify failed: {e}"));
        assert!(report.compared_with_source);

        let tmp = tempfile::tempdir().expect("temp dir");
        let out = tmp.path().join("out");
        tpde_pack::unpack(&container, &out, &NoProgress)
            .unwrap_or_else(|e| panic!("{case}: unpack failed: {e}"));
        let want = files_under(&input);
        let got = files_under(&out);
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>(),
            "{case}: unpacked file list"
        );
        for (rel, p) in &want {
            assert!(
                read(p) == read(&got[rel]),
                "{case}: unpacked {rel} differs from the committed input"
            );
            let listed = expected["inputs"]
                .as_array()
                .expect("inputs")
                .iter()
                .find(|f| f["path"] == rel.as_str())
                .unwrap_or_else(|| panic!("{case}: {rel} missing from expected.json"));
            assert_eq!(
                listed["blake3"].as_str(),
                Some(blake3::hash(&read(p)).to_hex().as_str()),
                "{case}: blake3 of input {rel}"
            );
        }
    }
}

/// The tensors of a committed one-file safetensors input: name → (shape, bytes).
fn safetensors_tensors(bytes: &[u8]) -> BTreeMap<String, (Vec<u64>, Vec<u8>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors header");
    let data = &bytes[8 + n..];
    header
        .as_object()
        .expect("header object")
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, t)| {
            let shape = t["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dimension"))
                .collect();
            let at = |i: usize| t["data_offsets"][i].as_u64().expect("offset") as usize;
            (name.clone(), (shape, data[at(0)..at(1)].to_vec()))
        })
        .collect()
}

/// Format version 3: each expert shard listed in `expected.json` is where
/// the manifest says, and reading it (the whole section for exact fidelity,
/// its hot part for the base, nothing else) yields exactly that expert's
/// tensors: its own ones whole, its slice of each stacked one.
#[test]
fn expert_shards_hold_exactly_their_experts() {
    let mut shards = 0;
    for case in committed_cases() {
        let dir = committed_root().join(&case);
        let expected: serde_json::Value =
            serde_json::from_slice(&read(&dir.join("expected.json"))).expect("expected.json");
        let Some(listed) = expected.get("experts").and_then(|x| x.as_array()) else {
            continue;
        };
        let input = source_of(&dir.join("input"));
        let originals = safetensors_tensors(&read(&input));
        let c = tpde_pack::Container::open(&dir.join(format!("{case}.tpde")))
            .unwrap_or_else(|e| panic!("{case}: open failed: {e}"));
        let m = &c.manifest;
        assert_eq!(m.experts.len(), listed.len(), "{case}: number of shards");
        for (x, want) in m.experts.iter().zip(listed) {
            let s = &m.sections[x.section as usize];
            let who = format!("{case}: expert {} of layer {}", x.expert, x.layer);
            assert_eq!(want["layer"].as_u64(), Some(u64::from(x.layer)), "{who}");
            assert_eq!(want["expert"].as_u64(), Some(u64::from(x.expert)), "{who}");
            assert_eq!(want["section"].as_str(), Some(s.name.as_str()), "{who}");
            assert_eq!(s.name, format!("expert.{}.{}", x.layer, x.expert), "{who}");
            assert_eq!(want["offset"].as_u64(), Some(s.offset), "{who}");
            assert_eq!(want["len"].as_u64(), Some(s.len), "{who}");
            assert_eq!(want["hot_len"].as_u64(), Some(x.hot_len), "{who}");

            let before = c.bytes_read();
            let exact =
                tpde_pack::extract_expert(&c, x.layer, x.expert, tpde_pack::Fidelity::Exact)
                    .unwrap_or_else(|e| panic!("{who}: extract failed: {e}"));
            assert_eq!(
                c.bytes_read() - before,
                s.len,
                "{who}: exact extract reads the whole shard and nothing else"
            );
            assert!(!exact.is_empty(), "{who}: no tensors");
            for t in &exact {
                let (shape, bytes) = &originals[&t.name];
                let want: &[u8] = if shape.len() == t.shape.len() {
                    bytes
                } else {
                    // A stacked tensor: the expert's slice along dimension 0.
                    assert_eq!(&shape[1..], t.shape.as_slice(), "{who}: {}", t.name);
                    let per = bytes.len() / shape[0] as usize;
                    &bytes[x.expert as usize * per..(x.expert as usize + 1) * per]
                };
                assert!(t.data == want, "{who}: {} differs from the source", t.name);
            }

            let before = c.bytes_read();
            let base = tpde_pack::extract_expert(&c, x.layer, x.expert, tpde_pack::Fidelity::Base)
                .unwrap_or_else(|e| panic!("{who}: base extract failed: {e}"));
            assert_eq!(
                c.bytes_read() - before,
                x.hot_len,
                "{who}: base extract reads the shard's hot part and nothing else"
            );
            assert_eq!(
                base.iter()
                    .map(|t| (&t.name, t.data.len()))
                    .collect::<Vec<_>>(),
                exact
                    .iter()
                    .map(|t| (&t.name, t.data.len()))
                    .collect::<Vec<_>>(),
                "{who}: base and exact tensors"
            );
            shards += 1;
        }
    }
    assert!(shards > 0, "no committed case has expert shards");
}

#[test]
fn a_container_of_a_newer_version_is_rejected() {
    let case = committed_cases()
        .into_iter()
        .next()
        .expect("a committed case");
    let mut bytes = read(&committed_root().join(&case).join(format!("{case}.tpde")));
    let newer = tpde_format::FORMAT_VERSION + 1;
    bytes[8..12].copy_from_slice(&newer.to_le_bytes());
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("newer.tpde");
    std::fs::write(&path, &bytes).expect("write");
    let err = match tpde_pack::Container::open(&path) {
        Ok(_) => panic!("a version {newer} container was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("unsupported container version"),
        "unexpected error: {err}"
    );
}

/// The current version's vectors hold residual streams of both forms of
/// `exact-v2`: plain zstd frames and split streams (table entry bit 31),
/// so that a reader checked against them has decoded both.
#[test]
fn the_current_vectors_hold_split_and_plain_residual_streams() {
    let (mut split, mut plain) = (0, 0);
    for name in committed_cases() {
        let path = committed_root().join(&name).join(format!("{name}.tpde"));
        let c = tpde_pack::Container::open(&path).expect("open");
        for t in &c.manifest.tensors {
            let tpde_format::Storage::Decomposed {
                chunks, residual, ..
            } = &t.storage
            else {
                continue;
            };
            assert_eq!(residual, "exact-v2", "{name}: {}", t.name);
            let width = tpde_format::dtype_bits(&t.dtype).expect("a float dtype") / 8;
            let streams = 9 * width as usize;
            for ch in chunks {
                let bytes = c.read_checked(&ch.cold, || t.name.clone()).expect("read");
                for i in 0..streams {
                    let e = u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
                    match (e >> 31, e & 0x7FFF_FFFF) {
                        (_, 0) => {}
                        (1, _) => split += 1,
                        _ => plain += 1,
                    }
                }
            }
        }
    }
    assert!(
        split > 0 && plain > 0,
        "{split} split and {plain} plain streams"
    );
}
