//! The manifest: a JSON document describing every byte of the container.

use crate::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Largest group size of a quantized base.
pub const MAX_GROUP_SIZE: u32 = 4096;

/// The zstd levels a container may name: libzstd's own range (its
/// fastest negative level to its strongest).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -(1 << 17)..=22;

/// The quantizer of a hot-tier base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseCodec {
    Q4,
    Q8,
}

impl BaseCodec {
    pub const fn name(self) -> &'static str {
        match self {
            BaseCodec::Q4 => "q4",
            BaseCodec::Q8 => "q8",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "q4" => Some(BaseCodec::Q4),
            "q8" => Some(BaseCodec::Q8),
            _ => None,
        }
    }

    /// Smallest code.
    pub const fn q_min(self) -> i32 {
        match self {
            BaseCodec::Q4 => -8,
            BaseCodec::Q8 => -127,
        }
    }

    /// Largest code.
    pub const fn q_max(self) -> i32 {
        match self {
            BaseCodec::Q4 => 7,
            BaseCodec::Q8 => 127,
        }
    }
}

/// Shape of a quantized base: codec, group size and row length. Rows are
/// quantized in groups of `group` elements (the last group of a row may be
/// shorter); each group is a block of an f16 scale and its codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseLayout {
    pub codec: BaseCodec,
    pub group: usize,
    pub cols: usize,
}

impl BaseLayout {
    /// Bytes of one block holding `len` codes.
    pub const fn block_bytes(&self, len: usize) -> usize {
        2 + match self.codec {
            BaseCodec::Q4 => len.div_ceil(2),
            BaseCodec::Q8 => len,
        }
    }

    /// Blocks per row.
    pub const fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// Bytes of one quantized row.
    pub const fn row_bytes(&self) -> usize {
        let full = self.cols / self.group;
        let tail = self.cols % self.group;
        full * self.block_bytes(self.group) + if tail > 0 { self.block_bytes(tail) } else { 0 }
    }

    /// Bytes of `rows` quantized rows, `None` on overflow.
    pub fn bytes_for_rows(&self, rows: u64) -> Option<u64> {
        rows.checked_mul(self.row_bytes() as u64)
    }

    /// Calls `f(col_start, len, block_offset_in_row)` for each group of a row.
    #[inline]
    pub fn for_each_group(&self, mut f: impl FnMut(usize, usize, usize)) {
        let mut col = 0;
        let mut off = 0;
        while col < self.cols {
            let len = self.group.min(self.cols - col);
            f(col, len, off);
            col += len;
            off += self.block_bytes(len);
        }
    }
}

/// Element types a container can carry, with their size in bits. The float
/// types F16, BF16, F32 and F64 may be decomposed into hot and cold tiers;
/// every other type is stored exactly.
pub const DTYPES: &[(&str, u64)] = &[
    ("BOOL", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("C64", 64),
    ("F64", 64),
    ("I64", 64),
    ("U64", 64),
];

/// Bits per element of a safetensors dtype name, `None` if unknown.
pub fn dtype_bits(name: &str) -> Option<u64> {
    DTYPES.iter().find(|(n, _)| *n == name).map(|&(_, b)| b)
}

/// Byte length of a tensor of `dtype` with `shape` (row-major, slowest
/// dimension first). `dtype` is a safetensors name or (format version 2) a
/// ggml type name; a block-quantized ggml type needs whole blocks along the
/// last (contiguous) dimension.
pub fn tensor_byte_len(dtype: &str, shape: &[u64], version: u32) -> Result<u64, String> {
    let numel = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or("element count overflows")?;
    if let Some(bits) = dtype_bits(dtype) {
        let total = numel.checked_mul(bits).ok_or("byte size overflows")?;
        if total % 8 != 0 {
            return Err(format!(
                "{numel} elements of {dtype} are not a whole number of bytes"
            ));
        }
        return Ok(total / 8);
    }
    match crate::ggml::GgmlType::from_name(dtype) {
        Some(t) if version >= 2 => {
            let last = shape.last().copied().unwrap_or(1);
            if last % t.block_elems() != 0 {
                return Err(format!(
                    "last dimension {last} is not a multiple of the {dtype} block size {}",
                    t.block_elems()
                ));
            }
            t.bytes_for(numel)
                .ok_or_else(|| "byte size overflows".into())
        }
        _ => Err(format!("unknown dtype {dtype:?}")),
    }
}

/// Whether a dtype may be decomposed into a base and an exact residual.
pub fn is_decomposable_dtype(name: &str) -> bool {
    matches!(name, "F16" | "BF16" | "F32" | "F64")
}

/// The residual kind of format version 1.
pub const RESIDUAL_EXACT_V1: &str = "exact-v1";
/// The residual kind format version 4 adds: `exact-v1` whose streams may
/// also be split into high and low nibbles.
pub const RESIDUAL_EXACT_V2: &str = "exact-v2";

/// The whole manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// Producer, for example `tpde 0.1.0`. Informational.
    pub created_by: String,
    pub params: PackParams,
    /// Sections in file order.
    pub sections: Vec<Section>,
    /// Source files in the order they are restored.
    pub files: Vec<SourceFile>,
    /// Tensors in execution order (the order of their hot and cold data;
    /// an expert's data lives in its shard, see [`ExpertShard`]).
    pub tensors: Vec<Tensor>,
    /// Format version 3: the expert shards of a mixture-of-experts model,
    /// sorted by layer then expert, in the order of their sections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ExpertShard>,
}

/// One expert of one layer, stored contiguously in its own section (format
/// version 3): first `hot_len` bytes of hot data (the quantized bases and
/// exactly stored chunks of the expert's tensors), then their residuals. A
/// runtime can fetch an expert with one read of its section, or of its first
/// `hot_len` bytes at base fidelity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertShard {
    pub layer: u32,
    pub expert: u32,
    /// Index of the shard's section in `sections` (kind `expert`).
    pub section: u32,
    /// Bytes of hot data at the start of the section.
    pub hot_len: u64,
}

/// How the container was packed. Informational except where a tensor
/// repeats a value (its own codec and group size are authoritative).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackParams {
    /// `q4`, `q8` or `none`.
    pub base: String,
    pub group_size: u32,
    /// Target original elements per cold chunk.
    pub chunk_elems: u64,
    /// Float tensors with fewer elements (or fewer than 2 dimensions) are stored exactly.
    pub min_decompose_elems: u64,
    pub zstd_level: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SectionKind {
    /// Quantized bases and exactly stored tensors: what a runtime keeps resident.
    Hot,
    /// Compressed exact residuals, one section per execution step.
    Cold,
    /// One expert of one layer (format version 3): its hot data, then its
    /// residuals. Listed in [`Manifest::experts`].
    Expert,
    /// Source-file bytes that are not tensor data (headers, configs, tokenizers).
    Files,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    pub name: String,
    pub kind: SectionKind,
    pub offset: u64,
    pub len: u64,
}

/// A byte range of the container with the xxh3-64 of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub xxh3: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// One zstd frame of a blob: `raw_len` bytes once decompressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobChunk {
    pub offset: u64,
    pub len: u64,
    pub raw_len: u64,
    pub xxh3: u64,
}

impl BlobChunk {
    pub fn extent(&self) -> Extent {
        Extent {
            offset: self.offset,
            len: self.len,
            xxh3: self.xxh3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    pub chunks: Vec<BlobChunk>,
}

impl Blob {
    /// Sum of decompressed chunk lengths, `None` on overflow.
    pub fn raw_len(&self) -> Option<u64> {
        self.chunks
            .iter()
            .try_fold(0u64, |a, c| a.checked_add(c.raw_len))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// Relative path, `/`-separated, inside the restored folder.
    pub path: String,
    pub len: u64,
    /// blake3 of the whole file, lower-case hex.
    pub blake3: String,
    pub content: FileContent,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileContent {
    /// A safetensors file: its header bytes (length prefix and JSON), then
    /// the listed tensors' bytes in this order.
    Safetensors { header: Blob, tensors: Vec<u32> },
    /// Any other file, kept byte for byte.
    Blob { blob: Blob },
    /// A GGUF file (format version 2): its header bytes (magic through the
    /// alignment padding before the data), then each listed tensor's bytes,
    /// each followed by `pad_after[i]` bytes taken in order from `padding`.
    Gguf {
        header: Blob,
        tensors: Vec<u32>,
        pad_after: Vec<u64>,
        padding: Blob,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub byte_len: u64,
    /// blake3 of the original bytes, lower-case hex.
    pub blake3: String,
    /// Index of the source file holding this tensor.
    pub file: u32,
    /// Transformer layer, when the name has one.
    pub layer: Option<u32>,
    pub storage: Storage,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Storage {
    /// Original bytes in the hot tier, cut into checksummed chunks.
    Raw { chunks: Vec<Extent> },
    /// A quantized base in the hot tier and an exact residual in a cold
    /// section, in chunks of whole rows.
    Decomposed {
        codec: BaseCodec,
        group_size: u32,
        rows: u64,
        cols: u64,
        residual: String,
        chunks: Vec<DecomposedChunk>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecomposedChunk {
    pub rows: u64,
    pub base: Extent,
    pub cold: Extent,
}

impl Tensor {
    pub fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }

    /// The base layout of a decomposed tensor.
    pub fn base_layout(&self) -> Option<BaseLayout> {
        match &self.storage {
            Storage::Decomposed {
                codec,
                group_size,
                cols,
                ..
            } => Some(BaseLayout {
                codec: *codec,
                group: *group_size as usize,
                cols: *cols as usize,
            }),
            Storage::Raw { .. } => None,
        }
    }

    /// Bytes this tensor occupies in the hot tier.
    pub fn hot_bytes(&self) -> u64 {
        match &self.storage {
            Storage::Raw { chunks } => chunks.iter().map(|c| c.len).sum(),
            Storage::Decomposed { chunks, .. } => chunks.iter().map(|c| c.base.len).sum(),
        }
    }

    /// Bytes this tensor occupies in cold sections.
    pub fn cold_bytes(&self) -> u64 {
        match &self.storage {
            Storage::Raw { .. } => 0,
            Storage::Decomposed { chunks, .. } => chunks.iter().map(|c| c.cold.len).sum(),
        }
    }
}

fn bad<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError::Manifest(msg.into()))
}

/// Checks a lower-case hex blake3 digest.
fn check_digest(what: &str, s: &str) -> Result<(), FormatError> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return bad(format!(
            "{what}: blake3 digest is not 64 lower-case hex digits"
        ));
    }
    Ok(())
}

/// Checks that a restored file path is relative, normalized and harmless.
pub fn check_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err(format!("file path of {} bytes", path.len()));
    }
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return Err(format!("file path {path:?} is not a plain relative path"));
    }
    for c in path.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(format!(
                "file path {path:?} has an empty, '.' or '..' component"
            ));
        }
    }
    Ok(())
}

impl Manifest {
    /// Serializes to compact JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }

    /// Parses manifest bytes and validates them against a container of
    /// `file_len` bytes whose manifest starts at `manifest_offset`.
    pub fn parse(
        bytes: &[u8],
        manifest_offset: u64,
        file_len: u64,
    ) -> Result<Manifest, FormatError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| FormatError::ManifestJson(e.to_string()))?;
        m.validate(manifest_offset, file_len)?;
        Ok(m)
    }

    /// Every structural rule of the spec: limits, section order and
    /// alignment, each byte of each section owned by exactly one extent,
    /// sizes consistent with dtypes and shapes, references in range and
    /// unique. Checked arithmetic throughout.
    pub fn validate(&self, manifest_offset: u64, file_len: u64) -> Result<(), FormatError> {
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&self.format_version) {
            return Err(FormatError::UnsupportedVersion(self.format_version));
        }
        if self.sections.len() > MAX_SECTIONS {
            return bad(format!(
                "{} sections (limit {MAX_SECTIONS})",
                self.sections.len()
            ));
        }
        if self.files.len() > MAX_FILES {
            return bad(format!("{} files (limit {MAX_FILES})", self.files.len()));
        }
        if self.tensors.len() > MAX_TENSORS {
            return bad(format!(
                "{} tensors (limit {MAX_TENSORS})",
                self.tensors.len()
            ));
        }
        if manifest_offset > file_len {
            return bad("manifest offset past end of file");
        }
        if self.created_by.len() > MAX_LABEL_LEN {
            return bad(format!(
                "created_by of {} bytes (limit {MAX_LABEL_LEN})",
                self.created_by.len()
            ));
        }
        let p = &self.params;
        if !matches!(p.base.as_str(), "q4" | "q8" | "none") {
            return bad(format!("params: unknown base {:?}", p.base));
        }
        if p.group_size == 0 || p.group_size > MAX_GROUP_SIZE || p.chunk_elems == 0 {
            return bad(format!(
                "params: group size {} or chunk size {} out of range",
                p.group_size, p.chunk_elems
            ));
        }
        if !ZSTD_LEVELS.contains(&p.zstd_level) {
            return bad(format!("params: zstd level {} out of range", p.zstd_level));
        }

        // Sections: aligned, in order, separated only by alignment padding.
        let mut expect = FIRST_SECTION_OFFSET;
        let mut names = HashSet::new();
        // Kinds in order: at most one hot section, cold sections, at most one files section.
        // Expert sections (version 3) interleave with cold sections.
        let rank = |k: SectionKind| match k {
            SectionKind::Hot => 0,
            SectionKind::Cold | SectionKind::Expert => 1,
            SectionKind::Files => 2,
        };
        if self.format_version < 3
            && (!self.experts.is_empty()
                || self.sections.iter().any(|s| s.kind == SectionKind::Expert))
        {
            return bad("expert shards need format version 3");
        }
        for w in self.sections.windows(2) {
            let (a, b) = (rank(w[0].kind), rank(w[1].kind));
            if a > b || (a == b && a != 1) {
                return bad(format!(
                    "section {:?} ({:?}) may not follow section {:?} ({:?}): sections are out of order",
                    w[1].name, w[1].kind, w[0].name, w[0].kind
                ));
            }
        }
        for s in &self.sections {
            if s.name.is_empty() || s.name.len() > MAX_LABEL_LEN {
                return bad(format!("section name of {} bytes", s.name.len()));
            }
            if !names.insert(s.name.as_str()) {
                return bad(format!("duplicate section name {:?}", s.name));
            }
            if s.len == 0 {
                return bad(format!("section {:?} is empty", s.name));
            }
            if s.offset != expect {
                return bad(format!(
                    "section {:?} starts at {} but the previous one ends (aligned) at {expect}: sections overlap, are out of order or leave a gap",
                    s.name, s.offset
                ));
            }
            let end = s
                .offset
                .checked_add(s.len)
                .filter(|&e| e <= manifest_offset)
                .ok_or_else(|| {
                    FormatError::Manifest(format!("section {:?} runs past the manifest", s.name))
                })?;
            expect = align_up(end)
                .ok_or_else(|| FormatError::Manifest("section end overflows".into()))?;
        }
        if expect != manifest_offset {
            return bad(format!(
                "manifest starts at {manifest_offset} but the sections end (aligned) at {expect}"
            ));
        }

        // Every extent, tagged with its owner for error messages.
        let mut owned: Vec<Vec<(u64, u64, SectionKind, String)>> =
            vec![Vec::new(); self.sections.len()];
        // Hot and cold data may also sit in an expert shard. Returns the
        // index of the section holding the extent.
        let mut claim =
            |e: &Extent, kind: SectionKind, who: String| -> Result<usize, FormatError> {
                let end = e
                    .offset
                    .checked_add(e.len)
                    .ok_or_else(|| FormatError::Manifest(format!("{who}: extent overflows")))?;
                let i = self.sections.partition_point(|s| s.offset <= e.offset);
                let ok = i > 0 && {
                    let s = &self.sections[i - 1];
                    (s.kind == kind
                        || (s.kind == SectionKind::Expert && kind != SectionKind::Files))
                        && end <= s.offset + s.len
                };
                if !ok {
                    return bad(format!(
                        "{who}: extent {}+{} is not inside a {kind:?} section",
                        e.offset, e.len
                    ));
                }
                if e.len > MAX_CHUNK_LEN {
                    return bad(format!(
                        "{who}: chunk of {} bytes exceeds the limit {MAX_CHUNK_LEN}",
                        e.len
                    ));
                }
                owned[i - 1].push((e.offset, end, kind, who));
                Ok(i - 1)
            };

        let mut tensor_names = HashSet::new();
        for (ti, t) in self.tensors.iter().enumerate() {
            let who = format!("tensor {:?}", t.name);
            if t.name.is_empty() || t.name.len() > MAX_NAME_LEN {
                return bad(format!("tensor {ti}: name of {} bytes", t.name.len()));
            }
            if !tensor_names.insert(t.name.as_str()) {
                return bad(format!("duplicate {who}"));
            }
            check_digest(&who, &t.blake3)?;
            if t.shape.len() > MAX_DIMS {
                return bad(format!(
                    "{who}: {} dimensions (limit {MAX_DIMS})",
                    t.shape.len()
                ));
            }
            let expected = tensor_byte_len(&t.dtype, &t.shape, self.format_version)
                .map_err(|m| FormatError::Manifest(format!("{who}: {m}")))?;
            let numel = t.numel().expect("checked by tensor_byte_len");
            if expected != t.byte_len {
                return bad(format!(
                    "{who}: byte_len {} does not match shape {:?} of {}",
                    t.byte_len, t.shape, t.dtype
                ));
            }
            if t.file as usize >= self.files.len() {
                return bad(format!("{who}: file index {} out of range", t.file));
            }
            match &t.storage {
                Storage::Raw { chunks } => {
                    let mut sum = 0u64;
                    for (ci, c) in chunks.iter().enumerate() {
                        if c.len == 0 {
                            return bad(format!("{who}: chunk {ci} is empty"));
                        }
                        sum = sum.saturating_add(c.len);
                        claim(c, SectionKind::Hot, format!("{who} chunk {ci}"))?;
                    }
                    if sum != t.byte_len {
                        return bad(format!(
                            "{who}: raw chunks hold {sum} bytes, expected {}",
                            t.byte_len
                        ));
                    }
                }
                Storage::Decomposed {
                    codec: _,
                    group_size,
                    rows,
                    cols,
                    residual,
                    chunks,
                } => {
                    if !is_decomposable_dtype(&t.dtype) {
                        return bad(format!("{who}: dtype {} cannot be decomposed", t.dtype));
                    }
                    if residual == RESIDUAL_EXACT_V2 && self.format_version < 4 {
                        return bad(format!(
                            "{who}: residual kind {residual:?} needs format version 4"
                        ));
                    }
                    if residual != RESIDUAL_EXACT_V1 && residual != RESIDUAL_EXACT_V2 {
                        return bad(format!("{who}: unknown residual kind {residual:?}"));
                    }
                    if *group_size == 0 || *group_size > MAX_GROUP_SIZE {
                        return bad(format!("{who}: group size {group_size} out of range"));
                    }
                    if t.shape.len() < 2
                        || t.shape.last() != Some(cols)
                        || rows.checked_mul(*cols) != Some(numel)
                    {
                        return bad(format!(
                            "{who}: rows {rows} × cols {cols} does not match shape {:?}",
                            t.shape
                        ));
                    }
                    if *cols == 0 || *cols > MAX_CHUNK_LEN || *rows == 0 {
                        return bad(format!("{who}: {rows} rows × {cols} columns out of range"));
                    }
                    let layout = t.base_layout().expect("decomposed");
                    let width = dtype_bits(&t.dtype).expect("decomposable") / 8;
                    let mut sum_rows = 0u64;
                    for (ci, c) in chunks.iter().enumerate() {
                        let chunk_who = format!("{who} chunk {ci}");
                        let elems = c.rows.checked_mul(*cols);
                        let raw = elems.and_then(|e| e.checked_mul(width));
                        if c.rows == 0 || raw.is_none_or(|r| r > MAX_CHUNK_LEN) {
                            return bad(format!("{chunk_who}: {} rows out of range", c.rows));
                        }
                        if layout.bytes_for_rows(c.rows) != Some(c.base.len) {
                            return bad(format!(
                                "{chunk_who}: base of {} bytes, expected {} rows × {}",
                                c.base.len,
                                c.rows,
                                layout.row_bytes()
                            ));
                        }
                        if c.cold.len == 0 {
                            return bad(format!("{chunk_who}: empty residual"));
                        }
                        sum_rows = sum_rows.saturating_add(c.rows);
                        let a = claim(&c.base, SectionKind::Hot, format!("{chunk_who} base"))?;
                        let b = claim(&c.cold, SectionKind::Cold, format!("{chunk_who} residual"))?;
                        // A chunk is in one expert shard, base and residual, or in none.
                        let shard = |i: usize| self.sections[i].kind == SectionKind::Expert;
                        if (shard(a) || shard(b)) && a != b {
                            return bad(format!(
                                "{chunk_who}: base and residual are not in the same expert section"
                            ));
                        }
                    }
                    if sum_rows != *rows {
                        return bad(format!(
                            "{who}: chunks cover {sum_rows} rows, expected {rows}"
                        ));
                    }
                }
            }
        }

        // Files: safe unique paths, lengths that add up, each tensor in exactly one file once.
        let mut paths = HashSet::new();
        let mut tensor_owner: Vec<Option<usize>> = vec![None; self.tensors.len()];
        for (fi, f) in self.files.iter().enumerate() {
            let who = format!("file {:?}", f.path);
            check_relative_path(&f.path).map_err(FormatError::Manifest)?;
            if !paths.insert(f.path.as_str()) {
                return bad(format!("duplicate {who}"));
            }
            check_digest(&who, &f.blake3)?;
            let mut claim_blob = |b: &Blob, what: &str| -> Result<u64, FormatError> {
                for (ci, c) in b.chunks.iter().enumerate() {
                    if c.len == 0 || c.raw_len == 0 || c.raw_len > MAX_CHUNK_LEN {
                        return bad(format!(
                            "{who} {what} chunk {ci}: raw length {} out of range",
                            c.raw_len
                        ));
                    }
                    claim(
                        &c.extent(),
                        SectionKind::Files,
                        format!("{who} {what} chunk {ci}"),
                    )?;
                }
                b.raw_len()
                    .ok_or_else(|| FormatError::Manifest(format!("{who}: length overflows")))
            };
            let (header, tensors, extra) = match &f.content {
                FileContent::Blob { blob } => (blob, &[][..], 0),
                FileContent::Safetensors { header, tensors } => (header, &tensors[..], 0),
                FileContent::Gguf {
                    header,
                    tensors,
                    pad_after,
                    padding,
                } => {
                    if self.format_version < 2 {
                        return bad(format!("{who}: GGUF content needs format version 2"));
                    }
                    if pad_after.len() != tensors.len() {
                        return bad(format!(
                            "{who}: {} padding lengths for {} tensors",
                            pad_after.len(),
                            tensors.len()
                        ));
                    }
                    let pads = pad_after
                        .iter()
                        .try_fold(0u64, |a, &p| a.checked_add(p))
                        .ok_or_else(|| {
                            FormatError::Manifest(format!("{who}: padding overflows"))
                        })?;
                    let stored = claim_blob(padding, "padding")?;
                    if stored != pads {
                        return bad(format!(
                            "{who}: padding blob holds {stored} bytes, the tensors' padding adds up to {pads}"
                        ));
                    }
                    (header, &tensors[..], pads)
                }
            };
            let len = {
                let what = if matches!(f.content, FileContent::Blob { .. }) {
                    "blob"
                } else {
                    "header"
                };
                let mut len = claim_blob(header, what)?
                    .checked_add(extra)
                    .ok_or_else(|| FormatError::Manifest(format!("{who}: length overflows")))?;
                {
                    for &ti in tensors {
                        let t = self.tensors.get(ti as usize).ok_or_else(|| {
                            FormatError::Manifest(format!("{who}: tensor index {ti} out of range"))
                        })?;
                        if t.file as usize != fi {
                            return bad(format!(
                                "{who}: lists tensor {:?} which belongs to file {}",
                                t.name, t.file
                            ));
                        }
                        if tensor_owner[ti as usize].replace(fi).is_some() {
                            return bad(format!("{who}: lists tensor {:?} twice", t.name));
                        }
                        len = len.checked_add(t.byte_len).ok_or_else(|| {
                            FormatError::Manifest(format!("{who}: length overflows"))
                        })?;
                    }
                }
                len
            };
            if len != f.len {
                return bad(format!(
                    "{who}: content adds up to {len} bytes, recorded length {}",
                    f.len
                ));
            }
        }
        // Directories must not collide with files ("a" and "a/b").
        for p in &paths {
            let mut at = 0;
            while let Some(i) = p[at..].find('/') {
                if paths.contains(&p[..at + i]) {
                    return bad(format!(
                        "file path {:?} is also a directory of {p:?}",
                        &p[..at + i]
                    ));
                }
                at += i + 1;
            }
        }
        if let Some(ti) = tensor_owner.iter().position(|o| o.is_none()) {
            return bad(format!(
                "tensor {:?} is not listed by its file",
                self.tensors[ti].name
            ));
        }

        // Every byte of every section belongs to exactly one extent.
        for (si, list) in owned.iter_mut().enumerate() {
            let s = &self.sections[si];
            list.sort_unstable_by_key(|&(a, b, _, _)| (a, b));
            let mut at = s.offset;
            for (a, b, _, who) in list.iter() {
                if *a != at {
                    let why = if *a < at {
                        "overlaps the previous extent"
                    } else {
                        "leaves a gap"
                    };
                    return bad(format!(
                        "section {:?}: {who} at {a} {why} (expected {at})",
                        s.name
                    ));
                }
                at = *b;
            }
            if at != s.offset + s.len {
                return bad(format!(
                    "section {:?}: extents end at {at}, section ends at {}",
                    s.name,
                    s.offset + s.len
                ));
            }
        }

        // Expert shards: each expert section listed once, in section order,
        // by ascending (layer, expert), hot data first.
        let mut listed = vec![false; self.sections.len()];
        for (k, x) in self.experts.iter().enumerate() {
            let who = format!("expert shard {k} (layer {} expert {})", x.layer, x.expert);
            let si = x.section as usize;
            let Some(s) = self.sections.get(si) else {
                return bad(format!("{who}: section index {si} out of range"));
            };
            if s.kind != SectionKind::Expert {
                return bad(format!(
                    "{who}: section {:?} is not an expert section",
                    s.name
                ));
            }
            if s.name != format!("expert.{}.{}", x.layer, x.expert) {
                return bad(format!(
                    "{who}: its section is named {:?}, not \"expert.{}.{}\"",
                    s.name, x.layer, x.expert
                ));
            }
            listed[si] = true;
            if let Some(p) = k.checked_sub(1).map(|p| &self.experts[p]) {
                if (p.layer, p.expert) >= (x.layer, x.expert) || p.section >= x.section {
                    return bad(format!(
                        "{who}: shards are not sorted by layer and expert in section order"
                    ));
                }
            }
            let split = s
                .offset
                .checked_add(x.hot_len)
                .filter(|_| x.hot_len <= s.len);
            let Some(split) = split else {
                return bad(format!(
                    "{who}: hot length {} exceeds the section",
                    x.hot_len
                ));
            };
            for (a, b, kind, owner) in &owned[si] {
                let hot = *kind == SectionKind::Hot;
                if (hot && *b > split) || (!hot && *a < split) {
                    return bad(format!(
                        "{who}: {owner} lies on the wrong side of the hot length {}",
                        x.hot_len
                    ));
                }
            }
        }
        if let Some(s) = (0..self.sections.len())
            .find(|&i| self.sections[i].kind == SectionKind::Expert && !listed[i])
            .map(|i| &self.sections[i])
        {
            return bad(format!(
                "expert section {:?} is not listed in experts",
                s.name
            ));
        }
        Ok(())
    }

    /// Byte ranges that must be zero: the header region after the header,
    /// and the alignment padding after each section.
    pub fn padding(&self, manifest_offset: u64) -> Vec<(u64, u64)> {
        let mut out = vec![(HEADER_LEN as u64, FIRST_SECTION_OFFSET.min(manifest_offset))];
        for (i, s) in self.sections.iter().enumerate() {
            let end = s.offset + s.len;
            let next = self
                .sections
                .get(i + 1)
                .map_or(manifest_offset, |n| n.offset);
            out.push((end, next));
        }
        out.retain(|(a, b)| a < b);
        out
    }

    /// Total original bytes of all source files.
    pub fn original_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    /// Bytes per section kind.
    pub fn bytes_by_kind(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for s in &self.sections {
            let k = match s.kind {
                SectionKind::Hot => "hot",
                SectionKind::Cold => "cold",
                SectionKind::Files => "files",
                SectionKind::Expert => "experts",
            };
            *m.entry(k).or_insert(0) += s.len;
        }
        m
    }
}
