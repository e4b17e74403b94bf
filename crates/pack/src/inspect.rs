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
}

#[derive(Clone, Debug, Serialize)]
pub struct Tiers {
    pub hot: Tier,
    pub cold: Tier,
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
}

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
    Ok(Inspection {
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
            files: tier("files"),
        },
        sections: m.sections.clone(),
        files: m
            .files
            .iter()
            .map(|f| FileInfo {
                path: f.path.clone(),
                kind: match f.content {
                    FileContent::Safetensors { .. } => "safetensors",
                    FileContent::Blob { .. } => "blob",
                    FileContent::Gguf { .. } => "gguf",
                },
                bytes: f.len,
                blake3: f.blake3.clone(),
            })
            .collect(),
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
