//! Shared helpers: a safetensors writer, model generators, the CLI runner,
//! and container surgery for corruption tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn tpde_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tpde")
}

/// Runs `tpde` with arguments.
pub fn tpde(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(tpde_bin());
    for a in args {
        c.arg(a.as_ref());
    }
    c.output().expect("run tpde")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the contract for bad input: exit 2, exactly one line on stderr
/// that names `names` and contains `phrase`, nothing on stdout, no panic.
pub fn assert_clean_error(o: &Output, code: i32, names: &str, phrase: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit code; stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err:?}"
    );
    assert!(err.starts_with("tpde: error: "), "{err}");
    assert!(err.contains(names), "error should name {names:?}: {err}");
    assert!(err.contains(phrase), "error should say {phrase:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(o.stdout.is_empty(), "stdout should be empty: {}", stdout(o));
}

/// A tensor to write: name, dtype, shape, raw little-endian bytes.
pub struct T {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl T {
    pub fn new(name: &str, dtype: &'static str, shape: &[u64], data: Vec<u8>) -> T {
        T {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }
}

/// Serializes a safetensors file (header padded with spaces to 8 bytes).
pub fn safetensors(tensors: &[T], metadata: Option<&[(&str, &str)]>) -> Vec<u8> {
    let mut h = serde_json::Map::new();
    if let Some(md) = metadata {
        let m: serde_json::Map<_, _> = md
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        h.insert("__metadata__".into(), m.into());
    }
    let mut at = 0u64;
    for t in tensors {
        let end = at + t.data.len() as u64;
        h.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut hb = serde_json::to_vec(&h).unwrap();
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hb);
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn gauss(&mut self) -> f32 {
        let s: f64 = (0..4)
            .map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64)
            .sum();
        ((s - 2.0) * 1.732) as f32
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Weight-like values of a float dtype.
pub fn floats(dtype: &str, n: usize, std: f32, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        let v = rng.gauss() * std;
        match dtype {
            "BF16" => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            "F16" => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            "F32" => out.extend_from_slice(&v.to_le_bytes()),
            "F64" => out.extend_from_slice(&(v as f64).to_le_bytes()),
            _ => panic!("{dtype}"),
        }
    }
    out
}

/// A small model exercising every storage path: decomposed matrices of each
/// float dtype (with special values), small and 1-D tensors, integer and
/// other dtypes, and a zero-element tensor.
pub fn mixed_model(seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut bf = floats("BF16", 96 * 130, 0.02, &mut r);
    // NaN with payload, -0, +Inf, -Inf, subnormal, max finite.
    for (i, bits) in [0x7FC1u16, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x7F7F]
        .iter()
        .enumerate()
    {
        bf[(i * 997) * 2..(i * 997) * 2 + 2].copy_from_slice(&bits.to_le_bytes());
    }
    let tensors = vec![
        T::new("model.embed_tokens.weight", "BF16", &[96, 130], bf),
        T::new(
            "model.layers.0.mlp.up_proj.weight",
            "F32",
            &[64, 100],
            floats("F32", 6400, 0.05, &mut r),
        ),
        T::new(
            "model.layers.0.self_attn.q_proj.weight",
            "F16",
            &[64, 64],
            floats("F16", 4096, 0.05, &mut r),
        ),
        T::new(
            "model.layers.1.mlp.down_proj.weight",
            "F64",
            &[32, 160],
            floats("F64", 5120, 0.05, &mut r),
        ),
        T::new(
            "model.layers.0.input_layernorm.weight",
            "BF16",
            &[130],
            floats("BF16", 130, 1.0, &mut r),
        ),
        T::new(
            "model.layers.1.small.weight",
            "F32",
            &[8, 8],
            floats("F32", 64, 1.0, &mut r),
        ),
        T::new(
            "model.position_ids",
            "I64",
            &[1, 40],
            (0..40i64).flat_map(|i| i.to_le_bytes()).collect(),
        ),
        T::new(
            "model.mask",
            "BOOL",
            &[3, 5],
            (0..15u8).map(|i| i % 2).collect(),
        ),
        T::new("model.fp8.weight", "F8_E4M3", &[4, 16], (0..64u8).collect()),
        T::new("model.i8", "I8", &[7], vec![1, 2, 3, 4, 5, 6, 7]),
        T::new("model.empty", "F32", &[0, 4], vec![]),
        T::new(
            "model.norm.weight",
            "F32",
            &[],
            1.5f32.to_le_bytes().to_vec(),
        ),
    ];
    safetensors(&tensors, Some(&[("format", "pt")]))
}

/// A small Mixtral-style mixture-of-experts model: two layers, each with a
/// router, an attention matrix and four experts of three BF16 projections.
pub fn moe_model(seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut tensors = vec![T::new(
        "model.embed_tokens.weight",
        "BF16",
        &[64, 64],
        floats("BF16", 4096, 0.02, &mut r),
    )];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        tensors.push(T::new(
            &format!("{p}.self_attn.q_proj.weight"),
            "BF16",
            &[64, 64],
            floats("BF16", 4096, 0.02, &mut r),
        ));
        tensors.push(T::new(
            &format!("{p}.block_sparse_moe.gate.weight"),
            "BF16",
            &[4, 64],
            floats("BF16", 256, 0.02, &mut r),
        ));
        for e in 0..4 {
            for (w, shape) in [("w1", [96u64, 64]), ("w2", [64, 96]), ("w3", [96, 64])] {
                tensors.push(T::new(
                    &format!("{p}.block_sparse_moe.experts.{e}.{w}.weight"),
                    "BF16",
                    &shape,
                    floats("BF16", 96 * 64, 0.02, &mut r),
                ));
            }
        }
    }
    tensors.push(T::new(
        "model.norm.weight",
        "BF16",
        &[64],
        floats("BF16", 64, 1.0, &mut r),
    ));
    safetensors(&tensors, None)
}

/// A mixture-of-experts model whose experts (6 MiB each) span several read
/// groups of the pipelined fetch, and whose one layer streams as an 8 MB step.
pub fn large_expert_model() -> Vec<u8> {
    let mut r = Rng(3);
    let mut tensors = Vec::new();
    for e in 0..2 {
        for w in ["w1", "w2", "w3"] {
            tensors.push(T::new(
                &format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"),
                "BF16",
                &[1024, 1024],
                floats("BF16", 1024 * 1024, 0.02, &mut r),
            ));
        }
    }
    safetensors(&tensors, None)
}

/// Writes a Hugging Face style folder with two shards, an index, a config
/// and a tokenizer in a subfolder.
pub fn write_sharded_folder(dir: &Path, seed: u64) {
    let mut r = Rng(seed);
    std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
    let a = vec![
        T::new(
            "model.embed_tokens.weight",
            "BF16",
            &[128, 64],
            floats("BF16", 8192, 0.02, &mut r),
        ),
        T::new(
            "model.layers.0.mlp.up_proj.weight",
            "BF16",
            &[128, 64],
            floats("BF16", 8192, 0.02, &mut r),
        ),
    ];
    let b = vec![
        T::new(
            "model.layers.1.mlp.up_proj.weight",
            "BF16",
            &[128, 64],
            floats("BF16", 8192, 0.02, &mut r),
        ),
        T::new(
            "model.norm.weight",
            "BF16",
            &[64],
            floats("BF16", 64, 1.0, &mut r),
        ),
    ];
    std::fs::write(
        dir.join("model-00001-of-00002.safetensors"),
        safetensors(&a, None),
    )
    .unwrap();
    std::fs::write(
        dir.join("model-00002-of-00002.safetensors"),
        safetensors(&b, None),
    )
    .unwrap();
    let mut map = serde_json::Map::new();
    for t in &a {
        map.insert(t.name.clone(), "model-00001-of-00002.safetensors".into());
    }
    for t in &b {
        map.insert(t.name.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        br#"{"model_type": "llama", "hidden_size": 64}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        br#"{"do_sample": false}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer/tokenizer.json"),
        br#"{"version": "1.0", "model": {}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("empty.txt"), b"").unwrap();
}

/// A temporary folder.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tpde-test-")
        .tempdir()
        .unwrap()
}

pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

pub fn sha256(p: &Path) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(std::fs::read(p).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Names of the entries of a folder (to check nothing was left behind).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Container surgery: replaces the manifest with `edit(manifest JSON)` and
/// rewrites header and footer so that only the manifest's *content* is
/// wrong. Returns the new container bytes.
pub fn rewrite_manifest(container: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let off = u64::from_le_bytes(container[16..24].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(container[24..32].try_into().unwrap()) as usize;
    let mut m: serde_json::Value = serde_json::from_slice(&container[off..off + len]).unwrap();
    edit(&mut m);
    let mb = serde_json::to_vec(&m).unwrap();
    with_manifest_bytes(&container[..off], &mb)
}

/// Assembles `prefix` (everything before the manifest) + manifest + a
/// consistent header and footer.
pub fn with_manifest_bytes(prefix: &[u8], mb: &[u8]) -> Vec<u8> {
    let off = prefix.len() as u64;
    let digest = *blake3::hash(mb).as_bytes();
    let mut out = prefix.to_vec();
    out.extend_from_slice(mb);
    let file_len = out.len() as u64 + 64;
    out[16..24].copy_from_slice(&off.to_le_bytes());
    out[24..32].copy_from_slice(&(mb.len() as u64).to_le_bytes());
    out[32..64].copy_from_slice(&digest);
    out.extend_from_slice(&off.to_le_bytes());
    out.extend_from_slice(&(mb.len() as u64).to_le_bytes());
    out.extend_from_slice(&digest);
    out.extend_from_slice(&file_len.to_le_bytes());
    out.extend_from_slice(b"TPDEEND\n");
    out
}

/// Packs `bytes` as `model.safetensors` in a fresh folder; returns (dir, source path, container path).
pub fn packed(bytes: &[u8], extra: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tmp();
    let src = write(d.path(), "model.safetensors", bytes);
    let out = d.path().join("model.tpde");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"pack", &src, &"-o", &out];
    for e in extra {
        args.push(e);
    }
    let o = tpde(&args);
    assert!(o.status.success(), "pack failed: {}", stderr(&o));
    (d, src, out)
}

/// A GGUF metadata value for [`gguf`].
pub enum Gv {
    U32(u32),
    U16(u16),
    I32(i32),
    F32(f32),
    Str(&'static str),
    Strs(Vec<String>),
}

/// A GGUF tensor for [`gguf`]: name, dims (ne[0] first), ggml type id, raw bytes.
pub struct Gt {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

/// Serializes a GGUF v3 file (alignment 32) whose padding bytes are `pad`.
pub fn gguf(kv: &[(&str, Gv)], tensors: &[Gt], pad: u8) -> Vec<u8> {
    fn s(out: &mut Vec<u8>, x: &str) {
        out.extend_from_slice(&(x.len() as u64).to_le_bytes());
        out.extend_from_slice(x.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        s(&mut out, k);
        match v {
            Gv::U16(x) => {
                out.extend_from_slice(&2u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Gv::U32(x) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Gv::I32(x) => {
                out.extend_from_slice(&5u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Gv::F32(x) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Gv::Str(x) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                s(&mut out, x);
            }
            Gv::Strs(xs) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
                for x in xs {
                    s(&mut out, x);
                }
            }
        }
    }
    let align = |n: u64| n.div_ceil(32) * 32;
    let mut offset = 0u64;
    for t in tensors {
        s(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = align(offset + t.data.len() as u64);
    }
    while !out.len().is_multiple_of(32) {
        out.push(pad);
    }
    for t in tensors {
        out.extend_from_slice(&t.data);
        while !out.len().is_multiple_of(32) {
            out.push(pad);
        }
    }
    out
}

/// A small Llama-shaped GGUF: F32/F16/BF16 matrices (decomposed), Q4_0
/// and Q8_0 blocks (stored as they are), an F32 norm and an I32 tensor.
pub fn gguf_model(seed: u64, pad: u8) -> Vec<u8> {
    let mut r = Rng(seed);
    let quant = |r: &mut Rng, blocks: usize, bytes: usize| -> Vec<u8> {
        let mut v: Vec<u8> = (0..blocks * bytes).map(|_| r.next() as u8).collect();
        for b in 0..blocks {
            // A finite, modest f16 scale at the start of each block.
            v[b * bytes..b * bytes + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
        v
    };
    let tensors = vec![
        Gt {
            name: "token_embd.weight".into(),
            dims: vec![64, 96],
            ty: 1,
            data: floats("F16", 64 * 96, 0.02, &mut r),
        },
        Gt {
            name: "blk.0.attn_q.weight".into(),
            dims: vec![64, 64],
            ty: 30,
            data: floats("BF16", 4096, 0.02, &mut r),
        },
        Gt {
            name: "blk.0.ffn_up.weight".into(),
            dims: vec![64, 128],
            ty: 0,
            data: floats("F32", 8192, 0.02, &mut r),
        },
        Gt {
            name: "blk.0.ffn_down.weight".into(),
            dims: vec![128, 64],
            ty: 2,
            data: quant(&mut r, 256, 18),
        },
        Gt {
            name: "blk.0.attn_norm.weight".into(),
            dims: vec![64],
            ty: 0,
            data: floats("F32", 64, 1.0, &mut r),
        },
        Gt {
            name: "blk.1.ffn_up.weight".into(),
            dims: vec![64, 33],
            ty: 8,
            data: quant(&mut r, 66, 34),
        },
        Gt {
            name: "output_norm.weight".into(),
            dims: vec![64],
            ty: 0,
            data: floats("F32", 64, 1.0, &mut r),
        },
        Gt {
            name: "rope_freqs.weight".into(),
            dims: vec![3],
            ty: 26,
            data: vec![1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0],
        },
    ];
    let kv = vec![
        ("general.architecture", Gv::Str("llama")),
        ("general.name", Gv::Str("tiny")),
        ("llama.block_count", Gv::U32(2)),
        ("llama.embedding_length", Gv::U32(64)),
        ("llama.attention.layer_norm_rms_epsilon", Gv::F32(1e-5)),
        (
            "tokenizer.ggml.tokens",
            Gv::Strs((0..96).map(|i| format!("tok{i}")).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Gv::I32(1)),
    ];
    gguf(&kv, &tensors, pad)
}

/// A real-weight fixture under $TPDE_FIXTURES (default ~/.cache/tpde-fixtures);
/// missing files fail with the instruction to fetch them rather than skip.
pub fn fixture(rel: &str) -> std::path::PathBuf {
    let root = std::env::var_os("TPDE_FIXTURES")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/tpde-fixtures"))
        })
        .expect("TPDE_FIXTURES or HOME");
    let p = root.join(rel);
    assert!(
        p.exists(),
        "real-weight fixture {} is missing: run `fixtures/fetch.sh` (or set TPDE_FIXTURES)",
        p.display()
    );
    p
}
