//! `pack`: source files → one container, streaming and parallel.
//!
//! Every chunk of every tensor (in execution order) is one job. Jobs run in
//! parallel in bounded windows; results are committed in order (digests,
//! hot bytes at their planned offsets, cold bytes appended layer by layer),
//! so memory is bounded by the window, never by the model.

use crate::atomic::AtomicFile;
use crate::digest::{Piece, Stream};
use crate::error::{Error, Result};
use crate::source::{Source, SourceKind};
use crate::Progress;
use rayon::prelude::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;
use tpde_codecs::{base, residual, xxh3, BaseCodec, BaseLayout, FloatDtype};
use tpde_format::{
    align_up, Blob, BlobChunk, DecomposedChunk, ExpertShard, Extent, FileContent, Footer, Header,
    Manifest, PackParams, Section, SectionKind, Storage, Tensor, FIRST_SECTION_OFFSET, FOOTER_LEN,
    FORMAT_VERSION, MAX_CHUNK_LEN,
};

/// Bytes per chunk of an exactly stored tensor or a blob.
pub const RAW_CHUNK_BYTES: u64 = 4 << 20;

/// How to pack.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Hot-tier quantizer; `None` stores every tensor exactly.
    pub base: Option<BaseCodec>,
    pub group_size: u32,
    /// Target original elements per cold chunk.
    pub chunk_elems: u64,
    /// Float tensors with fewer elements are stored exactly.
    pub min_decompose_elems: u64,
    pub zstd_level: i32,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            base: Some(BaseCodec::Q4),
            group_size: 64,
            chunk_elems: 1 << 18,
            min_decompose_elems: 4096,
            zstd_level: 3,
        }
    }
}

/// What a pack produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PackSummary {
    pub original_bytes: u64,
    pub container_bytes: u64,
    pub hot_bytes: u64,
    pub cold_bytes: u64,
    pub files_bytes: u64,
    pub tensors: usize,
    pub decomposed_tensors: usize,
    pub raw_tensors: usize,
    pub files: usize,
    /// Expert shards (one per layer and expert of a mixture-of-experts model).
    pub expert_shards: usize,
    /// Bytes of all expert shards (their hot data and residuals).
    pub expert_bytes: u64,
    /// Things the user should know that did not stop the pack.
    pub warnings: Vec<String>,
    pub seconds: f64,
}

/// Where a tensor's data comes from and goes, in execution order.
struct Planned {
    file: usize,
    /// Absolute offset of the tensor's bytes in its source file.
    src_offset: u64,
    step: String,
    tensor: Tensor,
    /// The expert shard (layer, expert) of each chunk; `None` for dense data.
    shards: Vec<Option<(u32, u32)>>,
}

/// How a tensor belongs to the experts of a mixture-of-experts model.
#[derive(Clone, Copy)]
struct ExpertRole {
    layer: u32,
    /// `None`: the tensor stacks `count` experts along dimension 0.
    expert: Option<u32>,
    count: u32,
}

/// A tensor as a source file describes it.
pub(crate) struct SourceTensor<'a> {
    pub(crate) name: &'a str,
    /// Container dtype name (safetensors name, or ggml type name).
    pub(crate) dtype: &'static str,
    /// Row-major: slowest dimension first.
    pub(crate) shape: Vec<u64>,
    pub(crate) src_offset: u64,
    pub(crate) byte_len: u64,
}

/// The tensors of a source file, in file order.
pub(crate) fn source_tensors(kind: &SourceKind) -> Vec<SourceTensor<'_>> {
    match kind {
        SourceKind::Safetensors { header, .. } => header
            .tensors
            .iter()
            .map(|e| SourceTensor {
                name: &e.name,
                dtype: e.dtype.name(),
                shape: e.shape.clone(),
                src_offset: header.data_start + e.begin,
                byte_len: e.end - e.begin,
            })
            .collect(),
        SourceKind::Gguf { header, .. } => header
            .tensors
            .iter()
            .map(|t| SourceTensor {
                name: &t.name,
                dtype: t.ggml_type.name(),
                shape: t.shape(),
                src_offset: header.data_start + t.offset,
                byte_len: t.byte_len,
            })
            .collect(),
        SourceKind::Blob => Vec::new(),
    }
}

/// One unit of parallel work.
struct Job {
    tensor: usize,
    chunk: usize,
    file: usize,
    /// The expert shard the chunk's data goes to.
    shard: Option<(u32, u32)>,
    /// Set for decomposed tensors: element type, base layout, base bytes.
    decompose: Option<(FloatDtype, BaseLayout, u64)>,
    /// Absolute offset of the chunk's bytes in the source file.
    src_offset: u64,
    src_len: u64,
    /// Offset of the chunk's bytes in its tensor, and the tensor's length.
    tensor_at: u64,
    tensor_len: u64,
}

struct JobOut {
    src: Vec<u8>,
    hot: Vec<u8>,
    cold: Vec<u8>,
    /// The tensor digest's part of this chunk, hashed by the worker.
    digest: Piece,
    /// The file digest's part of this chunk (safetensors and GGUF sources).
    file_piece: Option<Piece>,
    /// xxh3 of what is stored for the chunk: its hot bytes (the source
    /// bytes of a raw chunk) and its residual, hashed by the worker while
    /// they are in its cache (the thread that commits in order has the
    /// writes to do).
    hot_xxh3: u64,
    cold_xxh3: u64,
}

/// Transformer layer of a tensor name (`…layers.12.…`, `…layer.3.…`, `blk.7.…`, `h.0.…`).
pub fn layer_of(name: &str) -> Option<u32> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        let digits =
            !w[1].is_empty() && w[1].len() <= 9 && w[1].bytes().all(|b| b.is_ascii_digit());
        (matches!(w[0], "layers" | "layer" | "h" | "blocks" | "block" | "blk") && digits)
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
#[test]
fn layer_indices_are_plain_numbers_after_a_layer_word() {
    assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
    assert_eq!(layer_of("encoder.layer.3.output.dense.weight"), Some(3));
    assert_eq!(layer_of("blk.7.attn_q.weight"), Some(7));
    assert_eq!(layer_of("transformer.h.0.attn.c_attn.weight"), Some(0));
    assert_eq!(layer_of("model.layers.+5.w"), None);
    assert_eq!(layer_of("model.layers.x.w"), None);
    assert_eq!(layer_of("model.embed_tokens.weight"), None);
    assert_eq!(layer_of("lm_head.weight"), None);
}

/// Execution step of a tensor: embeddings first, then layers in order, then the rest.
fn step_of(name: &str, layer: Option<u32>) -> (u8, u32, String) {
    match layer {
        Some(l) => (1, l, format!("cold.layer.{l}")),
        None => {
            let lower = name.to_ascii_lowercase();
            if ["embed", "embd", "wte", "wpe", "tok_"]
                .iter()
                .any(|k| lower.contains(k))
            {
                (0, 0, "cold.pre".into())
            } else {
                (2, 0, "cold.post".into())
            }
        }
    }
}

/// An error unless a manifest of `len` bytes is within `limit` (the
/// readers' [`tpde_format::MAX_MANIFEST_LEN`]): a container whose manifest
/// no reader opens must not be written.
fn manifest_fits(src: &Path, manifest: &Manifest, len: u64, limit: u64) -> Result<()> {
    if len <= limit {
        return Ok(());
    }
    Err(Error::input(
        src,
        format!(
            "too many tensors or files for one container: its manifest would be {len} bytes, \
             over the format's limit of {limit} ({} tensors, {} files)",
            manifest.tensors.len(),
            manifest.files.len()
        ),
    ))
}

/// Packs `src` (a `.safetensors` file or a model folder) into `dest`.
pub fn pack(
    src: &Path,
    dest: &Path,
    opts: &PackOptions,
    progress: &dyn Progress,
) -> Result<PackSummary> {
    pack_within(src, dest, opts, progress, tpde_format::MAX_MANIFEST_LEN)
}

/// [`pack`], with a manifest of at most `manifest_limit` bytes.
fn pack_within(
    src: &Path,
    dest: &Path,
    opts: &PackOptions,
    progress: &dyn Progress,
    manifest_limit: u64,
) -> Result<PackSummary> {
    let start = Instant::now();
    if opts.group_size == 0 || opts.group_size > tpde_format::MAX_GROUP_SIZE {
        return Err(Error::input(
            src,
            format!("group size {} out of range", opts.group_size),
        ));
    }
    if opts.chunk_elems == 0 {
        return Err(Error::input(src, "chunk size 0 (elements per chunk)"));
    }
    if !tpde_format::ZSTD_LEVELS.contains(&opts.zstd_level) {
        return Err(Error::input(
            src,
            format!(
                "zstd level {} out of range ({} to {})",
                opts.zstd_level,
                tpde_format::ZSTD_LEVELS.start(),
                tpde_format::ZSTD_LEVELS.end()
            ),
        ));
    }
    let source = Source::open(src)?;
    crate::atomic::refuse_inputs(dest, source.files.iter().map(|f| f.path.as_path()))?;

    // Plan every tensor in execution order, with its hot extents.
    // Dense hot data is laid out now; an expert's hot data goes at the
    // start of its shard, whose size is known now and whose place is known
    // when the shard opens.
    let (mut planned, mut warnings) = plan(&source, opts);
    for (rel, what) in &source.skipped {
        warnings.push(format!("{rel} is {what}, not a file: left out"));
    }
    let mut hot_at = FIRST_SECTION_OFFSET;
    let mut shard_hot: std::collections::HashMap<(u32, u32), u64> = Default::default();
    for p in &mut planned {
        let lens: Vec<(&mut u64, u64)> = match &mut p.tensor.storage {
            Storage::Raw { chunks } => chunks.iter_mut().map(|c| (&mut c.offset, c.len)).collect(),
            Storage::Decomposed { chunks, .. } => chunks
                .iter_mut()
                .map(|c| (&mut c.base.offset, c.base.len))
                .collect(),
        };
        for ((offset, len), shard) in lens.into_iter().zip(&p.shards) {
            match shard {
                Some(key) => *shard_hot.entry(*key).or_insert(0) += len,
                None => {
                    *offset = hot_at;
                    hot_at += len;
                }
            }
        }
    }
    let mut sections = Vec::new();
    if hot_at > FIRST_SECTION_OFFSET {
        sections.push(Section {
            name: "hot".into(),
            kind: SectionKind::Hot,
            offset: FIRST_SECTION_OFFSET,
            len: hot_at - FIRST_SECTION_OFFSET,
        });
    }

    let jobs = jobs_of(&planned);
    let out = AtomicFile::create(dest)?;
    let wpath = out.tmp_path().to_path_buf();
    // Writeback starts every few MiB, so the disk writes while the workers
    // compute instead of all at the final fsync.
    const WRITEBACK_EVERY: u64 = 2 << 20;
    let unflushed = std::cell::Cell::new(0u64);
    let write_at = |bytes: &[u8], at: u64| {
        out.file
            .write_all_at(bytes, at)
            .map_err(Error::io(&wpath, "cannot write"))?;
        unflushed.set(unflushed.get() + bytes.len() as u64);
        if unflushed.get() >= WRITEBACK_EVERY {
            unflushed.set(0);
            out.start_writeback();
        }
        Ok(())
    };

    progress.begin("pack", source.total_bytes());

    // Whole-file digests of safetensors and GGUF files: each job also
    // hashes its bytes as a piece of its file (they are in cache then, and
    // the file is not read twice); the pieces are joined in file order at
    // the end, with the bytes between tensors.
    let mut file_pieces: Vec<Vec<Piece>> = source.files.iter().map(|_| Vec::new()).collect();

    // Cold sections and expert shards open as the execution step or the
    // expert changes.
    let mut cursor = align_up(hot_at).expect("small");
    let mut open: Option<Open> = None;
    let mut experts = Vec::new();
    let mut hashers: Vec<Option<Stream>> = planned.iter().map(|_| Some(Stream::new())).collect();
    let mut left: Vec<usize> = planned
        .iter()
        .map(|p| chunk_count(&p.tensor.storage))
        .collect();
    for (ti, n) in left.iter().enumerate() {
        if *n == 0 {
            planned[ti].tensor.blake3 = blake3::hash(&[]).to_hex().to_string();
        }
    }

    // The headers of safetensors and GGUF files (a GGUF header holds the
    // tokenizer: a MiB or more), compressed on a thread beside the
    // pipeline; written with the files section after it.
    let compress_headers = || -> Result<Vec<Option<Vec<Frame>>>> {
        source
            .files
            .iter()
            .map(|f| match &f.kind {
                SourceKind::Safetensors { raw_header, .. }
                | SourceKind::Gguf { raw_header, .. } => {
                    compress_blob(raw_header, opts.zstd_level, &wpath).map(Some)
                }
                SourceKind::Blob => Ok(None),
            })
            .collect()
    };
    let mut headers = std::thread::scope(|scope| -> Result<_> {
        let headers = scope.spawn(compress_headers);
        let pipeline = crate::pipeline::ordered(
            &jobs,
            |job| run_job(&source, job, opts.zstd_level),
            |job, mut r| {
                let p = &mut planned[job.tensor];
                if let Some(piece) = r.file_piece.take() {
                    file_pieces[job.file].push(piece);
                }
                if let Some(h) = hashers[job.tensor].as_mut() {
                    // Chunks of a tensor are committed in their order within it.
                    let in_order = h.add(&r.digest);
                    assert!(in_order, "a tensor's chunks are planned in order");
                }
                // Job order keeps each step's dense chunks together, and each
                // expert's chunks together after them: a section opens once and
                // closes when the next begins.
                let decomposed = matches!(p.tensor.storage, Storage::Decomposed { .. });
                match job.shard {
                    Some(key) if !matches!(open, Some(Open::Shard { key: k, .. }) if k == key) => {
                        close(&mut sections, &mut experts, &mut open, &mut cursor);
                        open = Some(Open::Shard {
                            key,
                            start: cursor,
                            hot_at: cursor,
                            cold_at: cursor + shard_hot[&key],
                        });
                    }
                    None if decomposed
                        && !matches!(&open, Some(Open::Cold { name, .. }) if *name == p.step) =>
                    {
                        close(&mut sections, &mut experts, &mut open, &mut cursor);
                        open = Some(Open::Cold {
                            name: p.step.clone(),
                            start: cursor,
                        });
                    }
                    _ => {}
                }
                // Where this chunk's hot bytes go (dense ones were placed by the
                // plan) and where its residual goes.
                let (hot_place, cold_place) = match &mut open {
                    Some(Open::Shard {
                        hot_at, cold_at, ..
                    }) if job.shard.is_some() => (Some(hot_at), cold_at),
                    _ => (None, &mut cursor),
                };
                let (hot_bytes, hot_extent) = match &mut p.tensor.storage {
                    Storage::Raw { chunks } => (&r.src, &mut chunks[job.chunk]),
                    Storage::Decomposed { chunks, .. } => {
                        let c = &mut chunks[job.chunk];
                        c.cold = Extent {
                            offset: *cold_place,
                            len: r.cold.len() as u64,
                            xxh3: r.cold_xxh3,
                        };
                        write_at(&r.cold, *cold_place)?;
                        *cold_place += r.cold.len() as u64;
                        (&r.hot, &mut c.base)
                    }
                };
                if let Some(at) = hot_place {
                    hot_extent.offset = *at;
                    *at += hot_bytes.len() as u64;
                }
                hot_extent.xxh3 = r.hot_xxh3;
                write_at(hot_bytes, hot_extent.offset)?;
                left[job.tensor] -= 1;
                if left[job.tensor] == 0 {
                    let h = hashers[job.tensor].take().expect("hasher");
                    p.tensor.blake3 = h.finalize().to_hex().to_string();
                }
                progress.advance(job.src_len);
                Ok(())
            },
        );
        let headers = headers.join().expect("the header thread does not panic");
        pipeline?;
        headers
    })?;
    let file_digests: Vec<Option<String>> = source
        .files
        .iter()
        .zip(file_pieces)
        .map(|(f, pieces)| match f.kind {
            SourceKind::Safetensors { .. } | SourceKind::Gguf { .. } => {
                file_digest(&f.file, &f.path, f.len, pieces).map(Some)
            }
            SourceKind::Blob => Ok(None),
        })
        .collect::<Result<_>>()?;
    close(&mut sections, &mut experts, &mut open, &mut cursor);

    // Files section: safetensors headers and every other file, zstd-compressed.
    let files_start = cursor;
    let mut files = Vec::with_capacity(source.files.len());
    for (fi, f) in source.files.iter().enumerate() {
        let (content, digest) = match &f.kind {
            SourceKind::Safetensors { .. } => {
                let frames = headers[fi].take().expect("compressed");
                let header = write_blob(frames, &mut cursor, &write_at)?;
                let tensors = tensor_order(&planned, fi);
                (
                    FileContent::Safetensors { header, tensors },
                    file_digests[fi].clone().expect("hashed"),
                )
            }
            SourceKind::Gguf { .. } => {
                let frames = headers[fi].take().expect("compressed");
                let header = write_blob(frames, &mut cursor, &write_at)?;
                let tensors = tensor_order(&planned, fi);
                // Alignment padding after each tensor (the last one's runs to
                // the end of the file), kept byte for byte.
                let mut pad_after = Vec::with_capacity(tensors.len());
                let mut pads = Vec::new();
                let mut padding = Blob { chunks: Vec::new() };
                for (k, &ti) in tensors.iter().enumerate() {
                    let p = &planned[ti as usize];
                    let end = p.src_offset + p.tensor.byte_len;
                    let next = tensors
                        .get(k + 1)
                        .map_or(f.len, |&n| planned[n as usize].src_offset);
                    let gap = next - end;
                    pad_after.push(gap);
                    if gap > 0 {
                        pads.extend_from_slice(&read_at(&f.file, &f.path, end, gap)?);
                    }
                    if pads.len() as u64 >= RAW_CHUNK_BYTES {
                        padding.chunks.extend(
                            store_blob(&pads, opts.zstd_level, &mut cursor, &write_at, &wpath)?
                                .chunks,
                        );
                        pads.clear();
                    }
                }
                if !pads.is_empty() {
                    padding.chunks.extend(
                        store_blob(&pads, opts.zstd_level, &mut cursor, &write_at, &wpath)?.chunks,
                    );
                }
                (
                    FileContent::Gguf {
                        header,
                        tensors,
                        pad_after,
                        padding,
                    },
                    file_digests[fi].clone().expect("hashed"),
                )
            }
            SourceKind::Blob => {
                let mut hasher = blake3::Hasher::new();
                let mut chunks = Vec::new();
                let mut at = 0;
                while at < f.len {
                    let n = RAW_CHUNK_BYTES.min(f.len - at);
                    let buf = read_at(&f.file, &f.path, at, n)?;
                    hasher.update(&buf);
                    chunks.extend(
                        store_blob(&buf, opts.zstd_level, &mut cursor, &write_at, &wpath)?.chunks,
                    );
                    progress.advance(n);
                    at += n;
                }
                (
                    FileContent::Blob {
                        blob: Blob { chunks },
                    },
                    hasher.finalize().to_hex().to_string(),
                )
            }
        };
        files.push(tpde_format::SourceFile {
            path: f.rel.clone(),
            len: f.len,
            blake3: digest,
            content,
        });
    }
    if cursor > files_start {
        sections.push(Section {
            name: "files".into(),
            kind: SectionKind::Files,
            offset: files_start,
            len: cursor - files_start,
        });
    }

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        created_by: format!("tpde {}", env!("CARGO_PKG_VERSION")),
        params: PackParams {
            base: opts.base.map_or("none", |b| b.name()).into(),
            group_size: opts.group_size,
            chunk_elems: opts.chunk_elems,
            min_decompose_elems: opts.min_decompose_elems,
            zstd_level: opts.zstd_level,
        },
        sections,
        files,
        tensors: planned.into_iter().map(|p| p.tensor).collect(),
        experts,
    };
    let bytes = manifest.to_bytes();
    // A manifest no reader would open: refused before anything is committed.
    manifest_fits(src, &manifest, bytes.len() as u64, manifest_limit)?;
    let manifest_offset = align_up(cursor).expect("small");
    let digest: [u8; 32] = *blake3::hash(&bytes).as_bytes();
    let file_len = manifest_offset + bytes.len() as u64 + FOOTER_LEN as u64;
    // The writer checks its own output against the reader's rules.
    manifest
        .validate(manifest_offset, file_len)
        .map_err(|e| Error::input(src, format!("internal error, invalid manifest: {e}")))?;
    write_at(&bytes, manifest_offset)?;
    let footer = Footer {
        manifest_offset,
        manifest_len: bytes.len() as u64,
        manifest_blake3: digest,
        file_len,
    };
    write_at(&footer.encode(), manifest_offset + bytes.len() as u64)?;
    let header = Header {
        version: FORMAT_VERSION,
        manifest_offset,
        manifest_len: bytes.len() as u64,
        manifest_blake3: digest,
    };
    write_at(&header.encode(), 0)?;
    source.check_unchanged()?;
    out.commit()?;
    progress.end();

    let by = manifest.bytes_by_kind();
    Ok(PackSummary {
        original_bytes: source.total_bytes(),
        container_bytes: file_len,
        hot_bytes: by.get("hot").copied().unwrap_or(0),
        cold_bytes: by.get("cold").copied().unwrap_or(0),
        files_bytes: by.get("files").copied().unwrap_or(0),
        tensors: manifest.tensors.len(),
        decomposed_tensors: manifest
            .tensors
            .iter()
            .filter(|t| matches!(t.storage, Storage::Decomposed { .. }))
            .count(),
        raw_tensors: manifest
            .tensors
            .iter()
            .filter(|t| matches!(t.storage, Storage::Raw { .. }))
            .count(),
        files: manifest.files.len(),
        expert_shards: manifest.experts.len(),
        expert_bytes: by.get("experts").copied().unwrap_or(0),
        warnings,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The section being written.
enum Open {
    /// A step's residuals, appended at the cursor.
    Cold { name: String, start: u64 },
    /// An expert shard: hot data from `start`, residuals after all of it.
    Shard {
        key: (u32, u32),
        start: u64,
        hot_at: u64,
        cold_at: u64,
    },
}

/// Closes the open section (if any) and aligns the cursor for the next.
fn close(
    sections: &mut Vec<Section>,
    experts: &mut Vec<ExpertShard>,
    open: &mut Option<Open>,
    cursor: &mut u64,
) {
    match open.take() {
        Some(Open::Cold { name, start }) => sections.push(Section {
            name,
            kind: SectionKind::Cold,
            offset: start,
            len: *cursor - start,
        }),
        Some(Open::Shard {
            key: (layer, expert),
            start,
            hot_at,
            cold_at,
        }) => {
            experts.push(ExpertShard {
                layer,
                expert,
                section: sections.len() as u32,
                hot_len: hot_at - start,
            });
            sections.push(Section {
                name: format!("expert.{layer}.{expert}"),
                kind: SectionKind::Expert,
                offset: start,
                len: cold_at - start,
            });
            *cursor = cold_at;
        }
        None => {}
    }
    *cursor = align_up(*cursor).expect("small");
}

fn chunk_count(s: &Storage) -> usize {
    match s {
        Storage::Raw { chunks } => chunks.len(),
        Storage::Decomposed { chunks, .. } => chunks.len(),
    }
}

/// Indices (in execution order) of a file's tensors, in file order.
fn tensor_order(planned: &[Planned], file: usize) -> Vec<u32> {
    let mut v: Vec<(u64, u32)> = planned
        .iter()
        .enumerate()
        .filter(|(_, p)| p.file == file)
        .map(|(i, p)| (p.src_offset, i as u32))
        .collect();
    v.sort_unstable();
    v.into_iter().map(|(_, i)| i).collect()
}

/// Every tensor in execution order, with the expert shard of each chunk,
/// and warnings.
fn plan(source: &Source, opts: &PackOptions) -> (Vec<Planned>, Vec<String>) {
    let listed: Vec<(usize, SourceTensor)> = source
        .files
        .iter()
        .enumerate()
        .flat_map(|(fi, f)| source_tensors(&f.kind).into_iter().map(move |t| (fi, t)))
        .collect();
    let (roles, warnings) = expert_roles(&listed);
    let mut all = Vec::new();
    for (fi, t) in listed {
        let layer = layer_of(t.name);
        let (group, l, step) = step_of(t.name, layer);
        let src_offset = t.src_offset;
        let role = roles.get(t.name).copied();
        let (tensor, shards) = plan_tensor(fi, t, layer, role, opts);
        all.push((
            (group, l, all.len()),
            Planned {
                file: fi,
                src_offset,
                step,
                tensor,
                shards,
            },
        ));
    }
    all.sort_by_key(|(k, _)| *k);
    (all.into_iter().map(|(_, p)| p).collect(), warnings)
}

/// The expert tensors by name. A model whose expert tensors do not form a
/// consistent layout is packed without shards (still losslessly), with a
/// warning saying why.
fn expert_roles<'a>(
    listed: &[(usize, SourceTensor<'a>)],
) -> (std::collections::HashMap<&'a str, ExpertRole>, Vec<String>) {
    let shapes: Vec<(&str, &[u64])> = listed
        .iter()
        .map(|(_, t)| (t.name, t.shape.as_slice()))
        .collect();
    let names: std::collections::HashMap<&str, &'a str> =
        listed.iter().map(|(_, t)| (t.name, t.name)).collect();
    let mut roles = std::collections::HashMap::new();
    match tpde_ingest::moe::plan(&shapes) {
        Ok(plan) => {
            for l in &plan.layers {
                for t in &l.tensors {
                    let name = names[t.name.as_str()];
                    roles.insert(
                        name,
                        ExpertRole {
                            layer: l.layer,
                            expert: t.expert,
                            count: l.experts,
                        },
                    );
                }
            }
            (roles, Vec::new())
        }
        Err(e) => (
            roles,
            vec![format!(
                "expert tensors are not stored as per-expert shards: {e}"
            )],
        ),
    }
}

fn plan_tensor(
    file: usize,
    e: SourceTensor,
    layer: Option<u32>,
    role: Option<ExpertRole>,
    opts: &PackOptions,
) -> (Tensor, Vec<Option<(u32, u32)>>) {
    let byte_len = e.byte_len;
    let numel: u64 = e.shape.iter().product();
    let cols = e.shape.last().copied().unwrap_or(0);
    let dtype = FloatDtype::from_name(e.dtype);
    // A tensor stacking every expert of a layer along dimension 0 is cut so
    // that no chunk spans two experts: each slice goes to its expert's shard.
    let slices = match role {
        Some(ExpertRole {
            expert: None,
            count,
            ..
        }) if count > 0 && e.shape.first() == Some(&(count as u64)) => count as u64,
        _ => 1,
    };
    // Chunk start (in rows or bytes) → shard.
    let shard_of = |start: u64, per_slice: u64| match role {
        Some(ExpertRole {
            layer,
            expert: Some(x),
            ..
        }) => Some((layer, x)),
        Some(ExpertRole { layer, .. }) if slices > 1 => Some((layer, (start / per_slice) as u32)),
        _ => None,
    };
    let mut shards = Vec::new();
    let storage = match (opts.base, dtype) {
        (Some(codec), Some(dt))
            if e.shape.len() >= 2
                && numel >= opts.min_decompose_elems.max(1)
                && cols > 0
                && cols * dt.width() as u64 <= MAX_CHUNK_LEN =>
        {
            let layout = BaseLayout {
                codec,
                group: opts.group_size as usize,
                cols: cols as usize,
            };
            let rows = numel / cols;
            let max_rows = MAX_CHUNK_LEN / (cols * dt.width() as u64);
            let per_slice = (rows / slices).max(1);
            // An expert is fetched alone, on all cores: each of its slices
            // is cut into `k` chunks of equal rows (the first `r mod k` one
            // row more), `k` even and at least two where each chunk still
            // holds a quarter of the usual elements or more, so that an
            // expert's chunks decode in parallel and share out evenly over
            // two cores (three chunks of one tensor, or uneven ones, leave
            // one core idle for a chunk).
            let expert_k = role.is_some().then(|| {
                let elems = per_slice * cols;
                let least = (opts.chunk_elems / 4).max(1);
                let mut k = elems.div_ceil(opts.chunk_elems.max(1)).max(2);
                k += k % 2;
                if elems / k < least {
                    k = 1;
                }
                k.max(per_slice.div_ceil(max_rows)).min(per_slice)
            });
            let per_chunk = (opts.chunk_elems / cols).clamp(1, max_rows);
            let mut chunks = Vec::new();
            let mut r = 0;
            while r < rows {
                let slice_start = r / per_slice * per_slice;
                let slice_end = (slice_start + per_slice).min(rows);
                let n = match expert_k {
                    Some(k) => {
                        // The chunk that starts at `r`: of `q + 1` rows
                        // while fewer than `m` chunks precede it.
                        let (len, at) = (slice_end - slice_start, r - slice_start);
                        let k = k.min(len);
                        let (q, m) = (len / k, len % k);
                        if at < m * (q + 1) {
                            q + 1
                        } else {
                            q
                        }
                    }
                    None => per_chunk.min(slice_end - r),
                };
                shards.push(shard_of(r, per_slice));
                chunks.push(DecomposedChunk {
                    rows: n,
                    base: Extent {
                        offset: 0,
                        len: layout.bytes_for_rows(n).expect("bounded by chunk size"),
                        xxh3: 0,
                    },
                    cold: Extent {
                        offset: 0,
                        len: 0,
                        xxh3: 0,
                    },
                });
                r += n;
            }
            Storage::Decomposed {
                codec,
                group_size: opts.group_size,
                rows,
                cols,
                residual: residual::Kind::CURRENT.name().into(),
                chunks,
            }
        }
        _ => {
            let mut chunks = Vec::new();
            let mut at = 0;
            let per_slice = (byte_len / slices).max(1);
            while at < byte_len {
                let slice_end = (at / per_slice + 1) * per_slice;
                let n = RAW_CHUNK_BYTES.min(slice_end.min(byte_len) - at);
                shards.push(shard_of(at, per_slice));
                chunks.push(Extent {
                    offset: 0,
                    len: n,
                    xxh3: 0,
                });
                at += n;
            }
            Storage::Raw { chunks }
        }
    };
    let tensor = Tensor {
        name: e.name.to_string(),
        dtype: e.dtype.into(),
        shape: e.shape,
        byte_len,
        blake3: String::new(),
        file: file as u32,
        layer,
        storage,
    };
    (tensor, shards)
}

/// Every chunk of every tensor as a job, in the order their data is
/// written: step by step, each step's dense chunks first, then each of its
/// experts' chunks together, by expert.
fn jobs_of(planned: &[Planned]) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (ti, p) in planned.iter().enumerate() {
        let base = p.src_offset;
        let mut at = 0;
        match &p.tensor.storage {
            Storage::Raw { chunks } => {
                for (ci, c) in chunks.iter().enumerate() {
                    jobs.push(Job {
                        tensor: ti,
                        chunk: ci,
                        file: p.file,
                        shard: p.shards[ci],
                        decompose: None,
                        src_offset: base + at,
                        src_len: c.len,
                        tensor_at: at,
                        tensor_len: p.tensor.byte_len,
                    });
                    at += c.len;
                }
            }
            Storage::Decomposed { chunks, cols, .. } => {
                let dtype = FloatDtype::from_name(&p.tensor.dtype).expect("decomposable");
                let layout = p.tensor.base_layout().expect("decomposed");
                for (ci, c) in chunks.iter().enumerate() {
                    let len = c.rows * cols * dtype.width() as u64;
                    jobs.push(Job {
                        tensor: ti,
                        chunk: ci,
                        file: p.file,
                        shard: p.shards[ci],
                        decompose: Some((dtype, layout, c.base.len)),
                        src_offset: base + at,
                        src_len: len,
                        tensor_at: at,
                        tensor_len: p.tensor.byte_len,
                    });
                    at += len;
                }
            }
        }
    }
    // A step is named by its first tensor; a shard belongs to the first step
    // holding any of its tensors, so each shard stays in one piece.
    let mut step_rank = vec![0usize; planned.len()];
    for ti in 1..planned.len() {
        step_rank[ti] = if planned[ti].step == planned[ti - 1].step {
            step_rank[ti - 1]
        } else {
            ti
        };
    }
    let mut shard_rank: std::collections::HashMap<(u32, u32), usize> = Default::default();
    for j in &jobs {
        if let Some(key) = j.shard {
            let r = shard_rank.entry(key).or_insert(usize::MAX);
            *r = (*r).min(step_rank[j.tensor]);
        }
    }
    jobs.sort_by_key(|j| match j.shard {
        None => (step_rank[j.tensor], 0, 0, 0, j.tensor, j.chunk),
        Some((l, x)) => (shard_rank[&(l, x)], 1, l, x, j.tensor, j.chunk),
    });
    jobs
}

fn run_job(source: &Source, job: &Job, level: i32) -> Result<JobOut> {
    let f = &source.files[job.file];
    let src = read_at(&f.file, &f.path, job.src_offset, job.src_len)?;
    let digest = Piece::of(&src, job.tensor_at, job.tensor_len);
    let file_piece = match f.kind {
        SourceKind::Safetensors { .. } | SourceKind::Gguf { .. } => {
            Some(Piece::of(&src, job.src_offset, f.len))
        }
        SourceKind::Blob => None,
    };
    let Some((dtype, layout, base_len)) = job.decompose else {
        return Ok(JobOut {
            hot_xxh3: xxh3(&src),
            cold_xxh3: xxh3(&[]),
            src,
            hot: Vec::new(),
            cold: Vec::new(),
            digest,
            file_piece,
        });
    };
    let mut hot = vec![0u8; base_len as usize];
    base::quantize(dtype, &layout, &src, &mut hot);
    let cold = residual::encode(dtype, &layout, &src, &hot, level, residual::Kind::CURRENT)
        .map_err(|e| Error::input(&f.path, format!("cannot encode a chunk: {e}")))?;
    Ok(JobOut {
        hot_xxh3: xxh3(&hot),
        cold_xxh3: xxh3(&cold),
        src,
        hot,
        cold,
        digest,
        file_piece,
    })
}

/// Reads exactly `len` bytes at `offset` into an owned buffer.
pub(crate) fn read_at(file: &std::fs::File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| Error::input(path, "read past memory"))?;
    let mut buf = Vec::with_capacity(len);
    // Exactly `len` bytes: the capacity may be larger than asked.
    pread_exact(file, &mut buf.spare_capacity_mut()[..len], offset)
        .map_err(Error::io(path, "cannot read"))?;
    // SAFETY: `pread_exact` succeeded, so the kernel wrote all `len` bytes.
    unsafe { buf.set_len(len) };
    Ok(buf)
}

/// `pread` until `buf` is full, into memory not yet initialized (the bytes
/// are not zeroed first only to be overwritten: that pass was 2–3 % of
/// pack's time).
fn pread_exact(
    file: &std::fs::File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    offset: u64,
) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let at = offset
            .checked_add(done as u64)
            .and_then(|a| libc::off_t::try_from(a).ok())
            .ok_or_else(|| std::io::Error::other("offset past the file system's range"))?;
        // SAFETY: the pointer and length describe the unwritten rest of `buf`,
        // which the kernel only writes to.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                at,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => done += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// BLAKE3 of a whole file from the pieces the jobs hashed (its tensors'
/// bytes) and the bytes between them, read here (headers, padding). Pieces
/// that overlap, which a validated source does not have, make it read and
/// hash the whole file instead.
fn file_digest(
    file: &std::fs::File,
    path: &Path,
    len: u64,
    mut pieces: Vec<Piece>,
) -> Result<String> {
    // By start, then end: an empty piece at a non-empty one's start comes
    // first, not after it (which would look like an overlap).
    pieces.sort_by_key(|p| (p.offset(), p.end()));
    let mut s = Stream::new();
    let mut at = 0;
    for p in pieces.iter().map(Some).chain([None]) {
        let next = p.map_or(len, Piece::offset);
        if next < at {
            return hash_file(file, path, len);
        }
        while at < next {
            // Hashed as a piece (whole subtrees at once, in SIMD lanes),
            // not chunk by chunk.
            let n = (next - at).min(1 << 20);
            let gap = Piece::of(&read_at(file, path, at, n)?, at, len);
            let in_order = s.add(&gap);
            assert!(in_order, "gaps are joined in order");
            at += n;
        }
        if let Some(p) = p {
            let in_order = s.add(p);
            assert!(in_order, "pieces are joined in order");
            at = p.end();
        }
    }
    Ok(s.finalize().to_hex().to_string())
}

/// BLAKE3 of a whole file, read and hashed in 1 MiB pieces on the rayon
/// pool (four per thread at a time, so memory stays small) and joined in
/// order.
fn hash_file(file: &std::fs::File, path: &Path, len: u64) -> Result<String> {
    const PIECE: u64 = 1 << 20;
    let pieces: Vec<u64> = (0..len.div_ceil(PIECE)).map(|i| i * PIECE).collect();
    let mut s = Stream::new();
    for batch in pieces.chunks(4 * rayon::current_num_threads().max(1)) {
        let parts: Vec<Piece> = batch
            .par_iter()
            .map(|&at| {
                let buf = read_at(file, path, at, PIECE.min(len - at))?;
                Ok(Piece::of(&buf, at, len))
            })
            .collect::<Result<_>>()?;
        for p in &parts {
            let in_order = s.add(p);
            assert!(in_order, "pieces are joined in order");
        }
    }
    Ok(s.finalize().to_hex().to_string())
}

fn store_blob(
    data: &[u8],
    level: i32,
    cursor: &mut u64,
    write_at: &dyn Fn(&[u8], u64) -> Result<()>,
    wpath: &Path,
) -> Result<Blob> {
    write_blob(compress_blob(data, level, wpath)?, cursor, write_at)
}

/// A blob chunk's zstd frame and the length of what it holds.
struct Frame {
    frame: Vec<u8>,
    raw_len: u64,
}

fn compress_blob(data: &[u8], level: i32, wpath: &Path) -> Result<Vec<Frame>> {
    data.chunks(RAW_CHUNK_BYTES as usize)
        .map(|piece| {
            let frame = residual::zstd_compress(piece, level)
                .map_err(|e| Error::input(wpath, format!("compression failed: {e}")))?;
            Ok(Frame {
                frame,
                raw_len: piece.len() as u64,
            })
        })
        .collect()
}

fn write_blob(
    frames: Vec<Frame>,
    cursor: &mut u64,
    write_at: &dyn Fn(&[u8], u64) -> Result<()>,
) -> Result<Blob> {
    let mut chunks = Vec::with_capacity(frames.len());
    for Frame { frame, raw_len } in frames {
        write_at(&frame, *cursor)?;
        chunks.push(BlobChunk {
            offset: *cursor,
            len: frame.len() as u64,
            raw_len,
            xxh3: xxh3(&frame),
        });
        *cursor += frame.len() as u64;
    }
    Ok(Blob { chunks })
}

#[cfg(test)]
mod file_digest_tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, std::fs::File) {
        let mut t = tempfile::NamedTempFile::new().expect("temp file");
        t.write_all(bytes).expect("write");
        let f = std::fs::File::open(t.path()).expect("open");
        (t, f)
    }

    fn bytes(n: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn pieces(b: &[u8], spans: &[(usize, usize)]) -> Vec<Piece> {
        spans
            .iter()
            .map(|&(a, e)| Piece::of(&b[a..e], a as u64, b.len() as u64))
            .collect()
    }

    #[test]
    fn pieces_in_any_order_with_gaps_give_the_files_blake3() {
        let b = bytes(300_001);
        let (t, f) = file_of(&b);
        let want = blake3::hash(&b).to_hex().to_string();
        // Gaps before the first piece, between pieces and after the last;
        // pieces given out of order, as jobs commit in execution order.
        let spans = [(70_000, 200_003), (5_000, 70_000), (210_000, 299_990)];
        let got = file_digest(&f, t.path(), b.len() as u64, pieces(&b, &spans)).expect("digest");
        assert_eq!(got, want);
        // No piece at all: the whole file is read as gaps.
        let got = file_digest(&f, t.path(), b.len() as u64, Vec::new()).expect("digest");
        assert_eq!(got, want);
        // An empty piece at the start of a non-empty one, after it.
        let spans = [(1_000, 5_000), (1_000, 1_000)];
        let got = file_digest(&f, t.path(), b.len() as u64, pieces(&b, &spans)).expect("digest");
        assert_eq!(got, want);
        // Pieces that cover the whole file.
        let spans = [(1024, 300_001), (0, 1024)];
        let got = file_digest(&f, t.path(), b.len() as u64, pieces(&b, &spans)).expect("digest");
        assert_eq!(got, want);
    }

    #[test]
    fn overlapping_pieces_fall_back_to_reading_the_whole_file() {
        let b = bytes(50_000);
        let (t, f) = file_of(&b);
        let spans = [(0, 30_000), (20_000, 50_000)];
        let got = file_digest(&f, t.path(), b.len() as u64, pieces(&b, &spans)).expect("digest");
        assert_eq!(got, blake3::hash(&b).to_hex().to_string());
    }

    #[test]
    fn a_short_read_is_an_error_naming_the_file() {
        let b = bytes(10_000);
        let (t, f) = file_of(&b);
        let e = read_at(&f, t.path(), 9_000, 2_000).expect_err("past the end");
        assert!(
            e.to_string().contains(&t.path().display().to_string()),
            "{e}"
        );
        assert_eq!(
            read_at(&f, t.path(), 1_000, 5_000).expect("read"),
            &b[1_000..6_000]
        );
    }
}

#[cfg(test)]
mod manifest_limit_tests {
    use super::*;

    /// A safetensors file of `n` one-byte tensors.
    fn many_tensors(n: usize) -> Vec<u8> {
        let header: serde_json::Map<String, serde_json::Value> = (0..n)
            .map(|i| {
                let v =
                    serde_json::json!({"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]});
                (format!("t{i:05}"), v)
            })
            .collect();
        let mut h = serde_json::to_vec(&header).expect("json");
        h.resize(h.len().next_multiple_of(8), b' ');
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend(std::iter::repeat_n(7u8, n));
        out
    }

    #[test]
    fn a_manifest_over_the_limit_is_refused_and_nothing_is_written() {
        let d = tempfile::tempdir().expect("temp dir");
        let src = d.path().join("many.safetensors");
        std::fs::write(&src, many_tensors(200)).expect("write");
        let dest = d.path().join("many.tpde");
        let opts = PackOptions::default();
        // Within the limit the same model packs (and its manifest's size
        // is what the refusal below is measured against).
        let fits = pack_within(&src, &dest, &opts, &crate::NoProgress, u64::MAX).expect("packs");
        let c = crate::Container::open(&dest).expect("opens");
        let len = c.header.manifest_len;
        assert!(fits.container_bytes > len && len > 200 * 40, "{len}");
        std::fs::remove_file(&dest).expect("remove");

        let e = pack_within(&src, &dest, &opts, &crate::NoProgress, len - 1)
            .expect_err("a manifest one byte over the limit");
        let msg = e.to_string();
        assert!(msg.contains("many.safetensors"), "{msg}");
        assert!(
            msg.contains(&format!("manifest would be {len} bytes")) && msg.contains("200 tensors"),
            "{msg}"
        );
        assert!(!dest.exists(), "nothing at the destination");
        let left: Vec<_> = std::fs::read_dir(d.path()).expect("list").collect();
        assert_eq!(left.len(), 1, "only the source is left: {left:?}");
        // Exactly at the limit it packs.
        pack_within(&src, &dest, &opts, &crate::NoProgress, len).expect("at the limit");
    }
}
