//! `inspect`: what a container holds, per tier and per tensor.

use crate::container::Container;
use crate::error::Result;
use serde::Serialize;
use std::path::Path;
use tpde_format::{FileContent, Storage};

#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    pub format_version: u32,
    pub created_by: String,
    pub original_bytes: u64,
    pub container_bytes: u64,
    pub ratio: f64,
    pub params: tpde_format::PackParams,
    pub tiers: Tiers,
    pub sections: Vec<tpde_format::Section>,
    pub files: Vec<FileInfo>,
    pub tensors: Vec<TensorInfo>,
    /// For mixture-of-experts models: bytes per (layer, expert).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ExpertLayer>,
}

/// The routed experts of one layer.
#[derive(Clone, Debug, Serialize)]
pub struct ExpertLayer {
    pub layer: u32,
    pub experts: Vec<ExpertInfo>,
}

/// Bytes of one expert: its own tensors, plus its slice (1/count) of the
/// layer's stacked expert tensors.
#[derive(Clone, Debug, Serialize)]
pub struct ExpertInfo {
    pub expert: u32,
    pub original_bytes: u64,
    pub hot_bytes: u64,
    pub cold_bytes: u64,
    /// The expert's shard (format version 3), where the container has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardInfo>,
}

/// Where an expert's shard lies: one read of `len` bytes at `offset`
/// fetches the expert, of its first `hot_len` bytes its hot data.
#[derive(Clone, Debug, Serialize)]
pub struct ShardInfo {
    pub section: String,
    pub offset: u64,
    pub len: u64,
    pub hot_len: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Tiers {
    /// The hot section: what a runtime keeps resident.
    pub hot: Tier,
    /// Cold sections (residuals of dense tensors).
    pub cold: Tier,
    /// Expert shards: each expert's hot data and residuals (format version 3).
    pub experts: Tier,
    /// Source-file bytes that are not tensor data (headers, configs, tokenizers).
    pub files: Tier,
}

#[derive(Clone, Debug, Serialize)]
pub struct Tier {
    pub bytes: u64,
    /// Share of the original size.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FileInfo {
    pub path: String,
    pub kind: &'static str,
    pub bytes: u64,
    pub blake3: String,
    /// For GGUF files: what their header says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<GgufInfo>,
}

/// The metadata of a GGUF file, read back from its stored header.
#[derive(Clone, Debug, Serialize)]
pub struct GgufInfo {
    pub version: u32,
    pub alignment: u64,
    pub architecture: Option<String>,
    /// Every key/value; arrays longer than [`ARRAY_SHOWN`] are summarized
    /// as `{"array": <element type>, "len": N, "first": [...]}`.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Tensor count per ggml type.
    pub tensor_types: std::collections::BTreeMap<String, usize>,
}

/// Arrays up to this length are shown whole.
pub const ARRAY_SHOWN: usize = 16;

#[derive(Clone, Debug, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub layer: Option<u32>,
    /// `q4`, `q8` (decomposed) or `raw` (stored exactly).
    pub storage: String,
    pub original_bytes: u64,
    pub hot_bytes: u64,
    pub cold_bytes: u64,
    pub chunks: usize,
}

/// Opens and validates a container and describes it.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let c = Container::open(path)?;
    let m = &c.manifest;
    let orig = m.original_bytes();
    let ratio = |b: u64| {
        if orig == 0 {
            0.0
        } else {
            b as f64 / orig as f64
        }
    };
    let by = m.bytes_by_kind();
    let tier = |k: &str| {
        let b = by.get(k).copied().unwrap_or(0);
        Tier {
            bytes: b,
            ratio: ratio(b),
        }
    };
    let experts = expert_table(m);
    Ok(Inspection {
        experts,
        path: path.display().to_string(),
        format_version: m.format_version,
        created_by: m.created_by.clone(),
        original_bytes: orig,
        container_bytes: c.len,
        ratio: ratio(c.len),
        params: m.params.clone(),
        tiers: Tiers {
            hot: tier("hot"),
            cold: tier("cold"),
            experts: tier("experts"),
            files: tier("files"),
        },
        sections: m.sections.clone(),
        files: m
            .files
            .iter()
            .map(|f| -> Result<FileInfo> {
                Ok(FileInfo {
                    path: f.path.clone(),
                    kind: match f.content {
                        FileContent::Safetensors { .. } => "safetensors",
                        FileContent::Blob { .. } => "blob",
                        FileContent::Gguf { .. } => "gguf",
                    },
                    bytes: f.len,
                    blake3: f.blake3.clone(),
                    gguf: match &f.content {
                        FileContent::Gguf { header, .. } => Some(gguf_info(&c, header, f)?),
                        _ => None,
                    },
                })
            })
            .collect::<Result<_>>()?,
        tensors: m
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                dtype: t.dtype.clone(),
                shape: t.shape.clone(),
                layer: t.layer,
                storage: match &t.storage {
                    Storage::Raw { .. } => "raw".into(),
                    Storage::Decomposed {
                        codec, group_size, ..
                    } => format!("{}/g{group_size}", codec.name()),
                },
                original_bytes: t.byte_len,
                hot_bytes: t.hot_bytes(),
                cold_bytes: t.cold_bytes(),
                chunks: match &t.storage {
                    Storage::Raw { chunks } => chunks.len(),
                    Storage::Decomposed { chunks, .. } => chunks.len(),
                },
            })
            .collect(),
    })
}

/// Decodes a GGUF file's stored header and describes it.
fn gguf_info(
    c: &Container,
    header: &tpde_format::Blob,
    f: &tpde_format::SourceFile,
) -> Result<GgufInfo> {
    // Chunk by chunk, as far as the parser reads.
    let mut reader = crate::restore::BlobReader::new(c, header, &f.path);
    let parsed = tpde_ingest::gguf::read_header(&mut reader, f.len);
    if let Some(e) = reader.failed.take() {
        return Err(e);
    }
    let (h, _) = parsed.map_err(|source| crate::Error::Gguf {
        path: c.path.join(&f.path),
        source,
    })?;
    let mut metadata = serde_json::Map::new();
    for kv in &h.kv {
        metadata.insert(kv.key.clone(), value_json(&kv.value));
    }
    let mut tensor_types = std::collections::BTreeMap::new();
    for t in &h.tensors {
        *tensor_types
            .entry(t.ggml_type.name().to_string())
            .or_insert(0) += 1;
    }
    Ok(GgufInfo {
        version: h.version,
        alignment: h.alignment,
        architecture: h.architecture().map(str::to_string),
        metadata,
        tensor_types,
    })
}

fn value_json(v: &tpde_ingest::gguf::Value) -> serde_json::Value {
    use tpde_ingest::gguf::Value as V;
    match v {
        V::U8(x) => (*x).into(),
        V::I8(x) => (*x).into(),
        V::U16(x) => (*x).into(),
        V::I16(x) => (*x).into(),
        V::U32(x) => (*x).into(),
        V::I32(x) => (*x).into(),
        V::U64(x) => (*x).into(),
        V::I64(x) => (*x).into(),
        V::F32(x) => {
            serde_json::Number::from_f64(*x as f64).map_or(serde_json::Value::Null, Into::into)
        }
        V::F64(x) => serde_json::Number::from_f64(*x).map_or(serde_json::Value::Null, Into::into),
        V::Bool(x) => (*x).into(),
        V::String(x) => x.clone().into(),
        V::Array(_, items) if items.len() <= ARRAY_SHOWN => items.iter().map(value_json).collect(),
        V::Array(ty, items) => serde_json::json!({
            "array": ty.name(),
            "len": items.len(),
            "first": items.iter().take(3).map(value_json).collect::<Vec<_>>(),
        }),
    }
}

/// Bytes per (layer, expert), from the tensors' names and shapes; empty
/// for a dense model, or when the names do not form a consistent set of
/// experts (inspect describes; it does not judge the layout).
fn expert_table(m: &tpde_format::Manifest) -> Vec<ExpertLayer> {
    use tpde_ingest::moe;
    let shapes: Vec<(&str, &[u64])> = m
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let Ok(plan) = moe::plan(&shapes) else {
        return Vec::new();
    };
    let by_name: std::collections::HashMap<&str, &tpde_format::Tensor> =
        m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    plan.layers
        .iter()
        .map(|l| {
            let mut experts: Vec<ExpertInfo> = (0..l.experts)
                .map(|e| ExpertInfo {
                    expert: e,
                    original_bytes: 0,
                    hot_bytes: 0,
                    cold_bytes: 0,
                    shard: None,
                })
                .collect();
            for x in m.experts.iter().filter(|x| x.layer == l.layer) {
                let s = &m.sections[x.section as usize];
                if let Some(e) = experts.get_mut(x.expert as usize) {
                    e.shard = Some(ShardInfo {
                        section: s.name.clone(),
                        offset: s.offset,
                        len: s.len,
                        hot_len: x.hot_len,
                    });
                }
            }
            for et in &l.tensors {
                let t = by_name[et.name.as_str()];
                let (orig, hot, cold) = (t.byte_len, t.hot_bytes(), t.cold_bytes());
                match et.expert {
                    Some(e) => {
                        let x = &mut experts[e as usize];
                        x.original_bytes += orig;
                        x.hot_bytes += hot;
                        x.cold_bytes += cold;
                    }
                    None => {
                        // A stacked tensor: every expert holds an equal slice.
                        let n = l.experts.max(1) as u64;
                        for x in &mut experts {
                            x.original_bytes += orig / n;
                            x.hot_bytes += hot / n;
                            x.cold_bytes += cold / n;
                        }
                    }
                }
            }
            ExpertLayer {
                layer: l.layer,
                experts,
            }
        })
        .collect()
}
