//! Reading one expert of a mixture-of-experts model at a chosen fidelity,
//! touching only that expert's own chunks (plus the header, footer and
//! manifest read when the container is opened).
//!
//! Experts are recognized by naming convention ([`tpde_ingest::moe`]). A
//! tensor stacking every expert of a layer along dimension 0 contributes
//! the expert's slice (its shape without that dimension); `pack` cuts such
//! tensors so that no chunk spans two experts, so nothing else is read.

use crate::container::Container;
use crate::error::{Error, Result};
use tpde_codecs::{residual, FloatDtype};
use tpde_format::Storage;
use tpde_ingest::moe;

/// What to rebuild.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fidelity {
    /// The hot tier's values: the quantized base, in the tensor's dtype
    /// (tensors stored exactly come back exactly).
    Base,
    /// The original bytes, bit for bit.
    Exact,
}

/// One tensor of an extracted expert.
#[derive(Clone, Debug)]
pub struct ExtractedTensor {
    pub name: String,
    pub dtype: String,
    /// Row-major; a stacked tensor's slice drops the expert dimension.
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

/// The tensors of expert `expert` of layer `layer`.
pub fn extract_expert(
    c: &Container,
    layer: u32,
    expert: u32,
    fidelity: Fidelity,
) -> Result<Vec<ExtractedTensor>> {
    let m = &c.manifest;
    let shapes: Vec<(&str, &[u64])> = m
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let plan = moe::plan(&shapes)
        .map_err(|e| Error::input(&c.path, format!("mixture-of-experts layout: {e}")))?;
    if !plan.is_moe() {
        return Err(Error::input(
            &c.path,
            "not a mixture-of-experts model (no expert tensors)",
        ));
    }
    let Some(l) = plan.layers.iter().find(|l| l.layer == layer) else {
        let have: Vec<String> = plan.layers.iter().map(|l| l.layer.to_string()).collect();
        return Err(Error::input(
            &c.path,
            format!(
                "no experts in layer {layer} (layers with experts: {})",
                have.join(", ")
            ),
        ));
    };
    if expert >= l.experts {
        return Err(Error::input(
            &c.path,
            format!(
                "layer {layer} has {} experts, not {}",
                l.experts,
                expert + 1
            ),
        ));
    }
    let mut out = Vec::new();
    for et in &l.tensors {
        if et.expert.is_some_and(|e| e != expert) {
            continue;
        }
        let ti = m
            .tensors
            .iter()
            .position(|t| t.name == et.name)
            .expect("planned from these tensors");
        let t = &m.tensors[ti];
        // The part of the tensor that belongs to this expert, in rows (decomposed)
        // or bytes (raw), and its shape.
        let (slices, shape) = match et.expert {
            Some(_) => (1, t.shape.clone()),
            None => (l.experts as u64, t.shape[1..].to_vec()),
        };
        let index = if et.expert.is_some() {
            0
        } else {
            expert as u64
        };
        let data = match &t.storage {
            Storage::Raw { chunks } => {
                let per = t.byte_len / slices;
                let (lo, hi) = (index * per, (index + 1) * per);
                let mut data = Vec::with_capacity(per as usize);
                let mut at = 0;
                for (ci, ch) in chunks.iter().enumerate() {
                    let (a, b) = (at, at + ch.len);
                    at = b;
                    if b <= lo || a >= hi {
                        continue;
                    }
                    let bytes = c.read_checked(ch, || format!("tensor {:?} chunk {ci}", t.name))?;
                    data.extend_from_slice(
                        &bytes[(lo.max(a) - a) as usize..(hi.min(b) - a) as usize],
                    );
                }
                data
            }
            Storage::Decomposed {
                chunks, rows, cols, ..
            } => {
                let dtype = FloatDtype::from_name(&t.dtype).expect("validated");
                let layout = t.base_layout().expect("decomposed");
                let row_bytes = *cols * dtype.width() as u64;
                let per = rows / slices;
                let (lo, hi) = (index * per, (index + 1) * per);
                let mut data = Vec::with_capacity((per * row_bytes) as usize);
                let mut r = 0;
                let mut buf = Vec::new();
                for (ci, ch) in chunks.iter().enumerate() {
                    let (a, b) = (r, r + ch.rows);
                    r = b;
                    if b <= lo || a >= hi {
                        continue;
                    }
                    match fidelity {
                        Fidelity::Exact => c.rebuild_chunk_into(ti, ci, &mut buf, false)?,
                        Fidelity::Base => {
                            let base = c.read_checked(&ch.base, || {
                                format!("tensor {:?} chunk {ci} (hot base)", t.name)
                            })?;
                            buf.clear();
                            buf.resize((ch.rows * row_bytes) as usize, 0);
                            residual::base_values(dtype, &layout, &base, &mut buf).map_err(
                                |e| {
                                    Error::integrity(
                                        &c.path,
                                        format!("tensor {:?} chunk {ci}: {e}", t.name),
                                    )
                                },
                            )?;
                        }
                    }
                    let from = ((lo.max(a) - a) * row_bytes) as usize;
                    let to = ((hi.min(b) - a) * row_bytes) as usize;
                    data.extend_from_slice(&buf[from..to]);
                }
                data
            }
        };
        out.push(ExtractedTensor {
            name: t.name.clone(),
            dtype: t.dtype.clone(),
            shape,
            data,
        });
    }
    Ok(out)
}

/// Writes extracted tensors as a safetensors file, atomically. Tensors of
/// ggml block types (Q4_K, Q8_0, …), which safetensors cannot name, are
/// written as `U8` bytes with `tpde.ggml.<name>` = `"<type> <shape>"` in the
/// metadata.
pub fn write_safetensors(
    dest: &std::path::Path,
    tensors: &[ExtractedTensor],
    metadata: &[(String, String)],
) -> Result<u64> {
    use std::io::Write;
    let mut meta: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let mut header = serde_json::Map::new();
    let mut at = 0u64;
    for t in tensors {
        let end = at + t.data.len() as u64;
        let (dtype, shape) = if tpde_format::dtype_bits(&t.dtype).is_some() {
            (t.dtype.clone(), t.shape.clone())
        } else {
            meta.insert(
                format!("tpde.ggml.{}", t.name),
                format!("{} {:?}", t.dtype, t.shape).into(),
            );
            ("U8".to_string(), vec![t.data.len() as u64])
        };
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    header.insert("__metadata__".into(), meta.into());
    let mut hb = serde_json::to_vec(&header).expect("json");
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let out = crate::atomic::AtomicFile::create(dest)?;
    let path = out.tmp_path().to_path_buf();
    let mut w = std::io::BufWriter::new(&out.file);
    let write = |w: &mut std::io::BufWriter<&std::fs::File>, b: &[u8]| w.write_all(b);
    (|| -> std::io::Result<()> {
        write(&mut w, &(hb.len() as u64).to_le_bytes())?;
        write(&mut w, &hb)?;
        for t in tensors {
            write(&mut w, &t.data)?;
        }
        w.flush()
    })()
    .map_err(Error::io(&path, "cannot write"))?;
    drop(w);
    out.commit()?;
    Ok(8 + hb.len() as u64 + at)
}
