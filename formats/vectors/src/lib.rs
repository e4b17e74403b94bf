//! Committed test vectors of the tpde container format (the current
//! version, `FORMAT_VERSION`, is specified in `formats/tpde-v3.md`; older
//! versions in `formats/tpde-v1.md` and `formats/tpde-v2.md`) and the
//! program that makes them.
//!
//! Each case is a small source model built from literal values and a fixed
//! splitmix64 stream (no random numbers, no clock), packed with fixed
//! options. [`generate`] writes, for each case, into `<out>/<case>/`:
//!
//! - `input/…`: the source files, byte for byte;
//! - `<case>.tpde`: the container `tpde_pack::pack::pack` makes of them;
//! - `expected.json`: the facts a third-party implementation can check
//!   without this code (container length and blake3, the manifest location,
//!   every input file's length and blake3, the sections, the tensors with
//!   their storage kind, and the expert shards if there are any).
//!
//! The committed copies of the current version live next to this crate, in
//! `formats/vectors/v<FORMAT_VERSION>/<case>/`; `tests/drift.rs` fails when
//! the generator's output no longer matches them. The folders of older
//! versions (`formats/vectors/v1/`, `formats/vectors/v2/`) are frozen: the
//! generator never writes them, and the current reader must still verify
//! and unpack them.
//!
//! ```no_run
//! // What `cargo run -p tpde-vectors --bin gen-vectors` does.
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
//!     .join(format!("v{}", tpde_format::FORMAT_VERSION));
//! tpde_vectors::generate(&dir)?;
//! # Ok::<(), tpde_vectors::VectorsError>(())
//! ```
//!
//! This crate has no cargo features.

use half::{bf16, f16};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tpde_codecs::BaseCodec;
use tpde_format::{FileContent, Manifest, SectionKind, Storage};
use tpde_pack::{Container, NoProgress, PackOptions};

/// Why generating the vectors failed.
#[derive(Debug, thiserror::Error)]
pub enum VectorsError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Pack(#[from] tpde_pack::Error),
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> VectorsError + 'a {
    move |source| VectorsError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// One test vector: a source model and how it is packed.
pub struct Case {
    /// Folder name under `formats/vectors/v<FORMAT_VERSION>/`, also the
    /// container's file stem.
    pub name: String,
    /// Source files, sorted by path.
    pub files: SourceFiles,
    pub options: PackOptions,
}

impl Case {
    /// What `pack` reads: the only file of a one-file case, otherwise the
    /// whole input folder.
    pub fn source(&self, input_dir: &Path) -> PathBuf {
        match self.files.as_slice() {
            [(rel, _)] => input_dir.join(rel),
            _ => input_dir.to_path_buf(),
        }
    }
}

/// Source files of a case: relative `/`-separated path and bytes.
pub type SourceFiles = Vec<(String, Vec<u8>)>;

/// Every case: name and source files.
pub fn inputs() -> Vec<(String, SourceFiles)> {
    cases().into_iter().map(|c| (c.name, c.files)).collect()
}

/// The pack options of a case, `None` for an unknown name.
pub fn options(case: &str) -> Option<PackOptions> {
    cases()
        .into_iter()
        .find(|c| c.name == case)
        .map(|c| c.options)
}

/// Every case, in a fixed order.
pub fn cases() -> Vec<Case> {
    vec![
        bf16_q4(),
        float_q8_g32(),
        folder_q4(),
        raw_none(),
        gguf_q4(),
        moe_q4(),
        bf16_split(),
    ]
}

/// Packs every case into `out_dir/<case>/`, replacing what was there.
pub fn generate(out_dir: &Path) -> Result<(), VectorsError> {
    for case in cases() {
        let dir = out_dir.join(&case.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir, "cannot remove"))?;
        }
        let input = dir.join("input");
        for (rel, bytes) in &case.files {
            let path = input.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent, "cannot create folder"))?;
            }
            std::fs::write(&path, bytes).map_err(io(&path, "cannot write"))?;
        }
        let dest = dir.join(format!("{}.tpde", case.name));
        tpde_pack::pack::pack(&case.source(&input), &dest, &case.options, &NoProgress)?;
        let expected = expected_of(&case, &dest)?;
        let path = dir.join("expected.json");
        let mut text = serde_json::to_string_pretty(&expected).expect("plain data serializes");
        text.push('\n');
        std::fs::write(&path, text).map_err(io(&path, "cannot write"))?;
    }
    Ok(())
}

/// `expected.json`: facts about a case's container that need no tpde code to check.
#[derive(Serialize)]
pub struct Expected {
    pub case: String,
    pub format_version: u32,
    /// What was packed, relative to `input/`: one file, or `.` for the folder.
    pub packed: String,
    pub options: ExpectedOptions,
    pub container: ExpectedContainer,
    /// Every input file (sorted by path): what unpack must reproduce.
    pub inputs: Vec<ExpectedFile>,
    /// `manifest.sections`, in file order.
    pub sections: Vec<ExpectedSection>,
    /// `manifest.tensors`, in execution (manifest) order.
    pub tensors: Vec<ExpectedTensor>,
    /// `manifest.experts` (format version 3): the expert shards, by layer
    /// and expert; absent when the container has none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ExpectedExpert>,
}

#[derive(Serialize)]
pub struct ExpectedOptions {
    pub base: String,
    pub group_size: u32,
    pub chunk_elems: u64,
    pub min_decompose_elems: u64,
    pub zstd_level: i32,
}

#[derive(Serialize)]
pub struct ExpectedContainer {
    pub file: String,
    pub len: u64,
    /// blake3 of the whole container, lower-case hex.
    pub blake3: String,
    pub manifest_offset: u64,
    pub manifest_len: u64,
    /// blake3 of the manifest bytes (also in the header and the footer).
    pub manifest_blake3: String,
}

#[derive(Serialize)]
pub struct ExpectedFile {
    pub path: String,
    pub len: u64,
    pub blake3: String,
    /// How the container stores it: `safetensors` or `blob`.
    pub content: String,
}

#[derive(Serialize)]
pub struct ExpectedSection {
    pub name: String,
    pub kind: String,
    pub offset: u64,
    pub len: u64,
}

/// One expert shard: the section holding expert `expert` of layer `layer`,
/// its first `hot_len` bytes the hot data, the rest the residuals.
#[derive(Serialize)]
pub struct ExpectedExpert {
    pub layer: u32,
    pub expert: u32,
    /// The section's name (`expert.<layer>.<expert>`) and place.
    pub section: String,
    pub offset: u64,
    pub len: u64,
    pub hot_len: u64,
}

#[derive(Serialize)]
pub struct ExpectedTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub byte_len: u64,
    /// blake3 of the tensor's original bytes.
    pub blake3: String,
    /// `raw` or `decomposed`.
    pub storage: String,
    /// Base codec and group size of a decomposed tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_size: Option<u32>,
    pub chunks: usize,
}

fn expected_of(case: &Case, container: &Path) -> Result<Expected, VectorsError> {
    let bytes = std::fs::read(container).map_err(io(container, "cannot read"))?;
    let c = Container::open(container)?;
    let m: &Manifest = &c.manifest;
    let o = &case.options;
    let mut inputs: Vec<ExpectedFile> = case
        .files
        .iter()
        .map(|(rel, b)| {
            let content = match m.files.iter().find(|f| &f.path == rel).map(|f| &f.content) {
                Some(FileContent::Safetensors { .. }) => "safetensors",
                Some(FileContent::Blob { .. }) => "blob",
                Some(FileContent::Gguf { .. }) => "gguf",
                None => "missing",
            };
            ExpectedFile {
                path: rel.clone(),
                len: b.len() as u64,
                blake3: blake3::hash(b).to_hex().to_string(),
                content: content.into(),
            }
        })
        .collect();
    inputs.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Expected {
        case: case.name.clone(),
        format_version: m.format_version,
        packed: match case.files.as_slice() {
            [(rel, _)] => rel.clone(),
            _ => ".".into(),
        },
        options: ExpectedOptions {
            base: o.base.map_or("none", |b| b.name()).into(),
            group_size: o.group_size,
            chunk_elems: o.chunk_elems,
            min_decompose_elems: o.min_decompose_elems,
            zstd_level: o.zstd_level,
        },
        container: ExpectedContainer {
            file: container
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .into(),
            len: bytes.len() as u64,
            blake3: blake3::hash(&bytes).to_hex().to_string(),
            manifest_offset: c.header.manifest_offset,
            manifest_len: c.header.manifest_len,
            manifest_blake3: tpde_format::hex(&c.header.manifest_blake3),
        },
        inputs,
        sections: m
            .sections
            .iter()
            .map(|s| ExpectedSection {
                name: s.name.clone(),
                kind: match s.kind {
                    SectionKind::Hot => "hot",
                    SectionKind::Cold => "cold",
                    SectionKind::Expert => "expert",
                    SectionKind::Files => "files",
                }
                .into(),
                offset: s.offset,
                len: s.len,
            })
            .collect(),
        tensors: m
            .tensors
            .iter()
            .map(|t| {
                let (storage, codec, group_size, chunks) = match &t.storage {
                    Storage::Raw { chunks } => ("raw", None, None, chunks.len()),
                    Storage::Decomposed {
                        codec,
                        group_size,
                        chunks,
                        ..
                    } => (
                        "decomposed",
                        Some(codec.name().to_string()),
                        Some(*group_size),
                        chunks.len(),
                    ),
                };
                ExpectedTensor {
                    name: t.name.clone(),
                    dtype: t.dtype.clone(),
                    shape: t.shape.clone(),
                    byte_len: t.byte_len,
                    blake3: t.blake3.clone(),
                    storage: storage.into(),
                    codec,
                    group_size,
                    chunks,
                }
            })
            .collect(),
        experts: m
            .experts
            .iter()
            .map(|x| {
                let s = &m.sections[x.section as usize];
                ExpectedExpert {
                    layer: x.layer,
                    expert: x.expert,
                    section: s.name.clone(),
                    offset: s.offset,
                    len: s.len,
                    hot_len: x.hot_len,
                }
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------
// Source models.

/// The fixed splitmix64 generator (Steele, Lea, Flood 2014): the only source
/// of "weights" here, so every byte is reproducible everywhere.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, 53 bits.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A bell-shaped weight in `(-1.5 s, 1.5 s)`: the sum of three uniforms.
    fn weight(&mut self, s: f64) -> f64 {
        (self.unit() + self.unit() + self.unit() - 1.5) * s
    }
}

/// A tensor to write into a safetensors file.
struct St {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    data: Vec<u8>,
}

impl St {
    fn new(name: impl Into<String>, dtype: &'static str, shape: &[u64], data: Vec<u8>) -> St {
        St {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }
}

/// A safetensors file: tensors' data in the given order; the JSON header
/// written by hand (so its bytes are fixed), `__metadata__` first, padded
/// with spaces to a multiple of 8 bytes as the reference writer does.
fn safetensors(tensors: &[St], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut json = String::from("{");
    let mut entries = Vec::new();
    if !metadata.is_empty() {
        let kv: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("\"{k}\":\"{v}\""))
            .collect();
        entries.push(format!("\"__metadata__\":{{{}}}", kv.join(",")));
    }
    let mut at = 0usize;
    for t in tensors {
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        entries.push(format!(
            "\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            t.name,
            t.dtype,
            shape.join(","),
            at,
            at + t.data.len()
        ));
        at += t.data.len();
    }
    json.push_str(&entries.join(","));
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

fn bf16_bytes(bits: &[u16]) -> Vec<u8> {
    bits.iter().flat_map(|b| b.to_le_bytes()).collect()
}

/// `n` BF16 weights of spread `s`, as bit patterns.
fn bf16_weights(rng: &mut SplitMix64, n: usize, s: f64) -> Vec<u16> {
    (0..n)
        .map(|_| bf16::from_f64(rng.weight(s)).to_bits())
        .collect()
}

/// `[4, 80]` BF16 with every special class of value placed where it
/// exercises a rule of the q4 base (group 64: one full group and a tail
/// group of 16 per row).
fn special_bf16_matrix() -> Vec<u8> {
    const COLS: usize = 80;
    let mut rng = SplitMix64(0x7470_6465_0000_0001);
    let mut v = bf16_weights(&mut rng, 4 * COLS, 0.05);
    // Row 0, tail group: all zeros and one −0: scale −0 (m = +0, m / −8 = −0), every code 0.
    for x in &mut v[64..COLS] {
        *x = 0x0000;
    }
    v[67] = 0x8000;
    // Row 1, first group, among ordinary weights: a signalling NaN with
    // payload, a negative quiet NaN with payload, −0, +Inf, −Inf and
    // subnormals of both signs.
    let r1 = COLS;
    for (i, bits) in [0x7FA5, 0xFFC3, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x8003]
        .into_iter()
        .enumerate()
    {
        v[r1 + 3 * i + 1] = bits;
    }
    // Row 2, tail group: the largest finite values; the scale clamps to
    // −f16::MAX and the other codes round to 0.
    v[2 * COLS + 70] = 0x7F7F;
    v[2 * COLS + 71] = 0xFF7F;
    // Row 3, first group: a tie for the largest magnitude (−0.5 comes first,
    // so d = +0.0625 and +0.5 saturates to code 7).
    v[3 * COLS + 10] = bf16::from_f32(-0.5).to_bits();
    v[3 * COLS + 20] = bf16::from_f32(0.5).to_bits();
    // Row 3, tail group: only NaN and infinities: no finite element, scale −0.
    for (i, x) in v[3 * COLS + 64..4 * COLS].iter_mut().enumerate() {
        *x = [0x7FC0, 0x7F80, 0xFF80, 0xFFFF][i % 4];
    }
    bf16_bytes(&v)
}

/// (a) One BF16 file: a `[4, 80]` matrix with special values (q4, group 64,
/// a tail group of 16, two cold chunks), a 1-D norm and an I64 tensor.
fn bf16_q4() -> Case {
    let mut rng = SplitMix64(0x7470_6465_0000_0002);
    let norm: Vec<u16> = (0..80)
        .map(|_| bf16::from_f64(1.0 + rng.weight(0.1)).to_bits())
        .collect();
    let ids: Vec<u8> = [0i64, 1, 2, -1, i64::MAX, i64::MIN]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let file = safetensors(
        &[
            St::new(
                "model.layers.0.mlp.down_proj.weight",
                "BF16",
                &[4, 80],
                special_bf16_matrix(),
            ),
            St::new(
                "model.layers.0.post_attention_layernorm.weight",
                "BF16",
                &[80],
                bf16_bytes(&norm),
            ),
            St::new("model.rotary_emb.position_ids", "I64", &[6], ids),
        ],
        &[("format", "pt")],
    );
    Case {
        name: "bf16-q4".into(),
        files: vec![("model.safetensors".into(), file)],
        options: PackOptions {
            base: Some(BaseCodec::Q4),
            group_size: 64,
            chunk_elems: 160,
            min_decompose_elems: 256,
            zstd_level: 3,
        },
    }
}

/// (g) A BF16 `[64, 512]` matrix of bell-shaped weights, one chunk: its
/// residual classes are large enough (thousands of elements) for the writer
/// to split the planes whose low nibbles are noise (`exact-v2`, format
/// version 4), so the vectors hold split streams beside plain frames.
fn bf16_split() -> Case {
    let mut rng = SplitMix64(0x7470_6465_0000_0007);
    let w = bf16_weights(&mut rng, 64 * 512, 0.04);
    let file = safetensors(
        &[St::new(
            "model.layers.0.mlp.up_proj.weight",
            "BF16",
            &[64, 512],
            bf16_bytes(&w),
        )],
        &[("format", "pt")],
    );
    Case {
        name: "bf16-split".into(),
        files: vec![("model.safetensors".into(), file)],
        options: PackOptions {
            base: Some(BaseCodec::Q4),
            group_size: 64,
            chunk_elems: 1 << 15,
            min_decompose_elems: 256,
            zstd_level: 3,
        },
    }
}

/// (b) F32, F16 and F64 `[3, 70]` matrices with special values, q8 group 32
/// (groups of 32, 32 and a tail of 6).
fn float_q8_g32() -> Case {
    const N: usize = 3 * 70;
    let mut rng = SplitMix64(0x7470_6465_0000_0003);

    let mut f32s: Vec<u32> = (0..N)
        .map(|_| (rng.weight(0.02) as f32).to_bits())
        .collect();
    for (i, bits) in [
        0x7F80_0001, // signalling NaN, payload 1
        0xFFC0_0123, // negative quiet NaN with payload
        0x8000_0000, // −0
        0x7F80_0000, // +Inf
        0xFF80_0000, // −Inf
        0x0000_0001, // smallest subnormal
        0x807F_FFFF, // largest negative subnormal
    ]
    .into_iter()
    .enumerate()
    {
        f32s[2 * i] = bits;
    }
    f32s[70 + 64] = f32::MAX.to_bits();
    f32s[70 + 65] = f32::MIN.to_bits();
    for x in &mut f32s[140 + 32..140 + 64] {
        *x = 0; // an all-zero group: scale +0, every code 0
    }

    let mut f16s: Vec<u16> = (0..N)
        .map(|_| f16::from_f64(rng.weight(0.02)).to_bits())
        .collect();
    for (i, bits) in [0x7C01, 0xFE05, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x83FF]
        .into_iter()
        .enumerate()
    {
        f16s[2 * i + 1] = bits;
    }
    f16s[70 + 66] = f16::MAX.to_bits();
    f16s[70 + 67] = f16::MIN.to_bits();

    let mut f64s: Vec<u64> = (0..N).map(|_| rng.weight(0.02).to_bits()).collect();
    for (i, bits) in [
        0x7FF0_0000_0000_0001, // signalling NaN, payload 1
        0xFFF8_0000_0000_0ABC, // negative quiet NaN with payload
        0x8000_0000_0000_0000, // −0
        0x7FF0_0000_0000_0000, // +Inf
        0xFFF0_0000_0000_0000, // −Inf
        0x0000_0000_0000_0001, // smallest subnormal
        0x800F_FFFF_FFFF_FFFF, // largest negative subnormal
    ]
    .into_iter()
    .enumerate()
    {
        f64s[3 * i + 2] = bits;
    }
    // Values that do not survive widening to f32: the largest f64 and 1e300
    // become +Inf (and take no part in the scale), 1e-300 becomes 0, 1e-40
    // an f32 subnormal.
    f64s[70 + 5] = f64::MAX.to_bits();
    f64s[70 + 6] = 1e300f64.to_bits();
    f64s[70 + 7] = (-1e-300f64).to_bits();
    f64s[70 + 8] = 1e-40f64.to_bits();

    let bytes32: Vec<u8> = f32s.iter().flat_map(|b| b.to_le_bytes()).collect();
    let bytes16: Vec<u8> = f16s.iter().flat_map(|b| b.to_le_bytes()).collect();
    let bytes64: Vec<u8> = f64s.iter().flat_map(|b| b.to_le_bytes()).collect();
    let file = safetensors(
        &[
            St::new(
                "model.layers.0.self_attn.q_proj.weight",
                "F32",
                &[3, 70],
                bytes32,
            ),
            St::new(
                "model.layers.0.self_attn.k_proj.weight",
                "F16",
                &[3, 70],
                bytes16,
            ),
            St::new(
                "model.layers.1.self_attn.v_proj.weight",
                "F64",
                &[3, 70],
                bytes64,
            ),
        ],
        &[],
    );
    Case {
        name: "float-q8-g32".into(),
        files: vec![("model.safetensors".into(), file)],
        options: PackOptions {
            base: Some(BaseCodec::Q8),
            group_size: 32,
            chunk_elems: 140,
            min_decompose_elems: 64,
            zstd_level: 3,
        },
    }
}

/// (c) A Hugging Face style folder: two shards, their index and a config.
/// Tensors land in `cold.pre` (embeddings), `cold.layer.0`, `cold.layer.1`
/// and `cold.post`; the `[3, 75]` matrices end each row with a q4 tail
/// group of 11 elements (an odd length: one zero padding nibble).
fn folder_q4() -> Case {
    let mut rng = SplitMix64(0x7470_6465_0000_0004);
    let mut w = |n: usize, s: f64| bf16_bytes(&bf16_weights(&mut rng, n, s));
    let embed = w(16 * 64, 0.5);
    let up0 = w(3 * 75, 0.05);
    let norm0 = w(64, 0.1);
    let up1 = w(3 * 75, 0.05);
    let norm = w(64, 0.1);
    let head = w(16 * 64, 0.05);

    let shard1 = [
        St::new("model.embed_tokens.weight", "BF16", &[16, 64], embed),
        St::new(
            "model.layers.0.input_layernorm.weight",
            "BF16",
            &[64],
            norm0,
        ),
        St::new("model.layers.0.mlp.up_proj.weight", "BF16", &[3, 75], up0),
    ];
    let shard2 = [
        St::new("lm_head.weight", "BF16", &[16, 64], head),
        St::new("model.layers.1.mlp.up_proj.weight", "BF16", &[3, 75], up1),
        St::new("model.norm.weight", "BF16", &[64], norm),
    ];
    let (n1, n2) = (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    );
    let total: usize = shard1.iter().chain(&shard2).map(|t| t.data.len()).sum();
    let mut map: Vec<(&str, &str)> = shard1
        .iter()
        .map(|t| (t.name.as_str(), n1))
        .chain(shard2.iter().map(|t| (t.name.as_str(), n2)))
        .collect();
    map.sort();
    let lines: Vec<String> = map
        .iter()
        .map(|(t, f)| format!("    \"{t}\": \"{f}\""))
        .collect();
    let index = format!(
        "{{\n  \"metadata\": {{\n    \"total_size\": {total}\n  }},\n  \"weight_map\": {{\n{}\n  }}\n}}\n",
        lines.join(",\n")
    );
    let config = concat!(
        "{\n",
        "  \"architectures\": [\"LlamaForCausalLM\"],\n",
        "  \"hidden_size\": 64,\n",
        "  \"intermediate_size\": 75,\n",
        "  \"model_type\": \"llama\",\n",
        "  \"num_attention_heads\": 4,\n",
        "  \"num_hidden_layers\": 2,\n",
        "  \"rms_norm_eps\": 1e-05,\n",
        "  \"torch_dtype\": \"bfloat16\",\n",
        "  \"vocab_size\": 16\n",
        "}\n"
    );
    let mut files = vec![
        ("config.json".to_string(), config.as_bytes().to_vec()),
        (n1.to_string(), safetensors(&shard1, &[("format", "pt")])),
        (n2.to_string(), safetensors(&shard2, &[("format", "pt")])),
        (
            "model.safetensors.index.json".to_string(),
            index.into_bytes(),
        ),
    ];
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Case {
        name: "folder-q4".into(),
        files,
        options: PackOptions {
            base: Some(BaseCodec::Q4),
            group_size: 64,
            chunk_elems: 512,
            min_decompose_elems: 128,
            zstd_level: 3,
        },
    }
}

/// (d) Base `none`: every tensor stored exactly in the hot tier, including
/// a BF16 matrix, a zero-length tensor, a scalar and non-float types.
fn raw_none() -> Case {
    let mut rng = SplitMix64(0x7470_6465_0000_0005);
    let matrix = bf16_bytes(&bf16_weights(&mut rng, 2 * 80, 0.05));
    let ids: Vec<u8> = [7i32, -1, i32::MAX]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let file = safetensors(
        &[
            St::new(
                "model.layers.0.self_attn.o_proj.weight",
                "BF16",
                &[2, 80],
                matrix,
            ),
            St::new(
                "model.layers.0.attn_mask",
                "BOOL",
                &[5],
                vec![1, 0, 1, 1, 0],
            ),
            St::new(
                "model.byte_table",
                "U8",
                &[7],
                vec![0, 1, 2, 127, 128, 254, 255],
            ),
            St::new("model.empty", "F32", &[0, 4], Vec::new()),
            St::new(
                "model.logit_scale",
                "F32",
                &[],
                1.5f32.to_le_bytes().to_vec(),
            ),
            St::new("model.ids", "I32", &[3], ids),
        ],
        &[("format", "pt")],
    );
    Case {
        name: "raw-none".into(),
        files: vec![("model.safetensors".into(), file)],
        options: PackOptions {
            base: None,
            group_size: 64,
            chunk_elems: 1 << 18,
            min_decompose_elems: 4096,
            zstd_level: 3,
        },
    }
}

/// A minimal GGUF v3 writer for the GGUF case: key/values of a few types,
/// tensors at `alignment`-aligned offsets, padding bytes of value `pad`.
fn gguf(
    kv: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, &[u64], u32, Vec<u8>)],
    alignment: usize,
    pad: u8,
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (key, ty, value) in kv {
        string(&mut out, key);
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(value);
    }
    let mut offset = 0usize;
    for (name, dims, ty, data) in tensors {
        string(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims.iter() {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + data.len()).div_ceil(alignment) * alignment;
    }
    let pad_to = |out: &mut Vec<u8>| {
        while !out.len().is_multiple_of(alignment) {
            out.push(pad);
        }
    };
    pad_to(&mut out);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
        pad_to(&mut out);
    }
    out
}

/// (e) GGUF (since format version 2): an F16 matrix with special values
/// (decomposed, tail group), a BF16 matrix (decomposed), Q4_0 and Q8_0
/// blocks (stored as their own base), an F32 norm and an I32 tensor;
/// key/values of several types including an array of strings; alignment 64
/// with non-zero padding bytes, which must come back as they are.
fn gguf_q4() -> Case {
    let mut rng = SplitMix64(0x7470_6465_0000_0006);
    let mut f16: Vec<u8> = (0..3 * 70)
        .flat_map(|_| half::f16::from_f64(rng.weight(0.05)).to_le_bytes())
        .collect();
    // NaN with payload, -0, +Inf, -Inf, smallest subnormal, largest finite.
    for (i, bits) in [0x7E01u16, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x7BFF]
        .iter()
        .enumerate()
    {
        f16[i * 2 * 13..i * 2 * 13 + 2].copy_from_slice(&bits.to_le_bytes());
    }
    let bf16 = bf16_bytes(&bf16_weights(&mut rng, 4 * 64, 0.02));
    let blocks = |rng: &mut SplitMix64, n: usize, size: usize| -> Vec<u8> {
        let mut v: Vec<u8> = (0..n * size).map(|_| rng.next_u64() as u8).collect();
        for b in 0..n {
            v[b * size..b * size + 2].copy_from_slice(&half::f16::from_f32(0.0125).to_le_bytes());
        }
        v
    };
    let q4_0 = blocks(&mut rng, 2 * 3, 18);
    let q8_0 = blocks(&mut rng, 2, 34);
    let norm: Vec<u8> = (0..64)
        .flat_map(|i| (1.0f32 + i as f32 / 64.0).to_le_bytes())
        .collect();
    let ids: Vec<u8> = [3i32, -7, i32::MIN]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let string = |s: &str| -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    };
    let mut tokens = 8u32.to_le_bytes().to_vec(); // array of strings
    tokens.extend_from_slice(&3u64.to_le_bytes());
    for t in ["<s>", "</s>", "héllo"] {
        tokens.extend_from_slice(&string(t));
    }
    let kv = vec![
        ("general.architecture", 8, string("llama")),
        ("general.alignment", 4, 64u32.to_le_bytes().to_vec()),
        ("llama.block_count", 4, 2u32.to_le_bytes().to_vec()),
        ("llama.rope.freq_base", 6, 10000f32.to_le_bytes().to_vec()),
        ("llama.use_parallel_residual", 7, vec![1]),
        ("tokenizer.ggml.tokens", 9, tokens),
    ];
    let tensors: Vec<(&str, &[u64], u32, Vec<u8>)> = vec![
        ("token_embd.weight", &[70, 3], 1, f16),
        ("blk.0.attn_q.weight", &[64, 4], 30, bf16),
        ("blk.0.attn_norm.weight", &[64], 0, norm),
        ("blk.0.ffn_down.weight", &[64, 3], 2, q4_0),
        ("blk.1.ffn_up.weight", &[64], 8, q8_0),
        ("rope_ids", &[3], 26, ids),
    ];
    Case {
        name: "gguf-q4".into(),
        files: vec![("model.gguf".into(), gguf(&kv, &tensors, 64, 0xEE))],
        options: PackOptions {
            base: Some(BaseCodec::Q4),
            group_size: 64,
            chunk_elems: 1 << 18,
            min_decompose_elems: 64,
            zstd_level: 3,
        },
    }
}

/// (f) A mixture-of-experts model (format version 3: expert shards).
/// Layer 0: a router, a dense attention matrix and two experts with one
/// tensor per expert and part, named as Qwen2/3-MoE name them
/// (`….mlp.experts.{e}.{gate,up}_proj.weight` `[4, 64]`,
/// `….down_proj.weight` `[64, 4]`, and a `down_proj.bias` `[64]` stored
/// raw). Layer 1: a norm, a router and fused tensors stacking both experts
/// along dimension 0 (`….mlp.experts.gate_up_proj` `[2, 8, 64]`,
/// `….down_proj` `[2, 64, 4]`, `….gate_up_proj_bias` `[2, 8]` stored raw).
/// The writer cuts each expert's part of a tensor into an even number of
/// equal chunks (at least a quarter of the 192 elements asked for each):
/// two of 2 rows of 64, four of 2 rows of 64 in a stacked slice, two of 32
/// rows of 4; the stacked `down_proj` then has chunks of 32 and 32 rows per
/// expert, cut at the expert boundary. Each expert's data goes to its own section
/// `expert.<l>.<e>`, after its layer's `cold.layer.<l>` (when it has one)
/// and before `cold.post` (the output head).
fn moe_q4() -> Case {
    let mut rng = SplitMix64(0x7470_6465_0000_0007);
    let mut w = |n: usize, s: f64| bf16_bytes(&bf16_weights(&mut rng, n, s));
    let mut tensors = vec![
        St::new(
            "model.embed_tokens.weight",
            "BF16",
            &[8, 64],
            w(8 * 64, 0.5),
        ),
        St::new(
            "model.layers.0.mlp.gate.weight",
            "BF16",
            &[2, 64],
            w(2 * 64, 0.1),
        ),
    ];
    for e in 0..2 {
        let p = format!("model.layers.0.mlp.experts.{e}");
        tensors.extend([
            St::new(
                format!("{p}.gate_proj.weight"),
                "BF16",
                &[4, 64],
                w(4 * 64, 0.05),
            ),
            St::new(
                format!("{p}.up_proj.weight"),
                "BF16",
                &[4, 64],
                w(4 * 64, 0.05),
            ),
            St::new(
                format!("{p}.down_proj.weight"),
                "BF16",
                &[64, 4],
                w(64 * 4, 0.05),
            ),
            St::new(format!("{p}.down_proj.bias"), "BF16", &[64], w(64, 0.05)),
        ]);
    }
    tensors.extend([
        St::new(
            "model.layers.0.self_attn.o_proj.weight",
            "BF16",
            &[4, 64],
            w(4 * 64, 0.05),
        ),
        St::new(
            "model.layers.1.input_layernorm.weight",
            "BF16",
            &[64],
            w(64, 0.1),
        ),
        St::new(
            "model.layers.1.mlp.gate.weight",
            "BF16",
            &[2, 64],
            w(2 * 64, 0.1),
        ),
        St::new(
            "model.layers.1.mlp.experts.gate_up_proj",
            "BF16",
            &[2, 8, 64],
            w(2 * 8 * 64, 0.05),
        ),
        St::new(
            "model.layers.1.mlp.experts.gate_up_proj_bias",
            "BF16",
            &[2, 8],
            w(2 * 8, 0.05),
        ),
        St::new(
            "model.layers.1.mlp.experts.down_proj",
            "BF16",
            &[2, 64, 4],
            w(2 * 64 * 4, 0.05),
        ),
        St::new("model.norm.weight", "BF16", &[64], w(64, 0.1)),
        St::new("lm_head.weight", "BF16", &[8, 64], w(8 * 64, 0.05)),
    ]);
    Case {
        name: "moe-q4".into(),
        files: vec![(
            "model.safetensors".into(),
            safetensors(&tensors, &[("format", "pt")]),
        )],
        options: PackOptions {
            base: Some(BaseCodec::Q4),
            group_size: 64,
            chunk_elems: 192,
            min_decompose_elems: 256,
            zstd_level: 3,
        },
    }
}
