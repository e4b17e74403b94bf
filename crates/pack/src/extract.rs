//! Reading one expert of a mixture-of-experts model at a chosen fidelity,
//! touching only that expert's own chunks (plus the header, footer and
//! manifest read when the container is opened).
//!
//! In a container with expert shards (format version 3) the expert's data
//! is one contiguous section: it is fetched in one sequential pass (over the
//! whole shard for `exact`, over its hot part for `base`), in groups of
//! chunks that are decoded while the next group is read, and each chunk is
//! checked against its xxh3 before use. An older container is read chunk
//! by chunk.
//!
//! Experts are recognized by naming convention ([`tpde_ingest::moe`]). A
//! tensor stacking every expert of a layer along dimension 0 contributes
//! the expert's slice (its shape without that dimension); `pack` cuts such
//! tensors so that no chunk spans two experts, so nothing else is read.

use crate::container::{align_down, whole_huge_pages, AlignedBuf, Container, HUGE_PAGE};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use tpde_codecs::{residual, FloatDtype};
use tpde_format::{Extent, Storage, SECTION_ALIGN};
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
    /// `data` holds the tensor's base blocks of this layout
    /// ([`ExpertReader::fetch_base_blocks`]) rather than values in `dtype`.
    pub base: Option<tpde_format::BaseLayout>,
}

/// The tensors of expert `expert` of layer `layer` (plans the model's
/// experts on every call; [`ExpertReader`] plans once).
pub fn extract_expert(
    c: &Container,
    layer: u32,
    expert: u32,
    fidelity: Fidelity,
) -> Result<Vec<ExtractedTensor>> {
    ExpertReader::new(c)?.fetch(layer, expert, fidelity)
}

/// Bytes of shard data read before its chunks are handed to the decoders:
/// an eighth of the shard, within these bounds: large enough for efficient
/// reads, small enough for decoding to start early and overlap the disk.
const GROUP_BYTES: std::ops::RangeInclusive<u64> = (64 << 10)..=(2 << 20);

/// With `O_DIRECT`, a shard's part up to this long is read in one request
/// and decoded once it is in; a longer one is read span by span by
/// [`DIRECT_READERS`] threads (two requests in flight) while the team
/// decodes the groups already in. A 624 KiB read took 0.37 ms in one
/// request here, and requests issued together complete together, so small
/// parts gain nothing from splitting; for 24 MiB experts one request left
/// the decode no overlap (19.9-21.6 ms a fetch).
const DIRECT_ONE_READ: u64 = 2 << 20;
const DIRECT_READERS: usize = 2;

/// A span of a shard (its file offset) and the buffer it is read into.
type Part<'b> = (u64, &'b mut [u8]);

/// Checked bytes of an extent; the second argument names it in errors.
type GetExtent<'f, 'a> = dyn Fn(&Extent, &dyn Fn() -> String) -> Result<Cow<'a, [u8]>> + 'f;

/// Fetches experts of one container, as a runtime does when its router
/// picks them: the model's experts are planned once.
pub struct ExpertReader<'c> {
    c: &'c Container,
    plan: moe::MoePlan,
    index: std::collections::HashMap<&'c str, usize>,
    /// The shard bytes of the last fetch, kept so that the next one reads
    /// into memory that is already mapped (a fresh buffer costs a page
    /// fault per 4 KiB, a third of the time of reading a small expert).
    scratch: std::sync::Mutex<Vec<u8>>,
    /// The container opened with `O_DIRECT`, when shards are read that way
    /// ([`ExpertReader::with_direct_reads`]), and its kept buffer.
    direct: Option<std::fs::File>,
    aligned: std::sync::Mutex<AlignedBuf>,
}

/// The size of a kept `O_DIRECT` buffer for reads of `len` bytes: whole
/// huge pages, at least one, so that all of it is backed by them (see
/// [`AlignedBuf`] and [`whole_huge_pages`]) and every later fetch reads
/// into it.
fn kept_len(len: usize) -> u64 {
    whole_huge_pages(len.max(HUGE_PAGE) as u64)
}

/// One chunk (or the part of it that belongs to the expert) of an output tensor.
struct Piece {
    out: usize,
    ti: usize,
    ci: usize,
    /// Bytes of the chunk's output that belong to the expert: original
    /// bytes, or base bytes when `blocks` is set.
    range: std::ops::Range<u64>,
    /// Base blocks asked for (`range` is then in the chunk's base).
    blocks: bool,
}

impl<'c> ExpertReader<'c> {
    pub fn new(c: &'c Container) -> Result<ExpertReader<'c>> {
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
        let index = m
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        Ok(ExpertReader {
            c,
            plan,
            index,
            scratch: Default::default(),
            direct: None,
            aligned: std::sync::Mutex::new(AlignedBuf::new(0)),
        })
    }

    /// Reads each shard with `O_DIRECT` from now on, in whole blocks (up to
    /// two blocks more per request than the bytes it needs), straight
    /// from the disk into an aligned buffer, without the page cache: a
    /// runtime that keeps its own cache of experts does not keep a second
    /// copy in the page cache, but every fetch goes to the disk, even of an
    /// expert the page cache holds. A part of up to 2 MiB is
    /// one request, decoded once it is in (a cold 624 KiB read took 0.37 ms
    /// this way here, against 0.58 ms through the page cache); a larger one
    /// is read span by span while the groups already in decode (24 MiB
    /// experts: 14.8-15.5 ms a fetch, against 17.9-18.4 ms through the page
    /// cache). An error where the file system refuses `O_DIRECT`.
    pub fn with_direct_reads(mut self) -> Result<ExpertReader<'c>> {
        self.direct = Some(self.c.reopen_direct()?);
        Ok(self)
    }

    /// The most memory a reader of `c` keeps between fetches: its read
    /// buffer, as large as the largest expert shard read whole (with
    /// `O_DIRECT`, `direct`: in whole blocks, each span of a large shard
    /// rounded out to them, and whole huge pages, at least one).
    /// Fetching an expert also needs its output, which the caller owns.
    pub fn kept_bytes(c: &Container, direct: bool) -> u64 {
        let m = &c.manifest;
        let largest = m
            .experts
            .iter()
            .filter_map(|x| m.sections.get(x.section as usize))
            .map(|s| s.len)
            .max()
            .unwrap_or(0);
        if direct {
            // A block before the shard's start and one past its end, at
            // most; a shard read span by span (over `DIRECT_ONE_READ`)
            // rounds each span out to blocks: two spans a group, and
            // groups of at least an eighth of the shard (or of
            // `GROUP_BYTES`' bounds), one more for the rest.
            let target = (largest / 8).clamp(*GROUP_BYTES.start(), *GROUP_BYTES.end());
            let spans = 2 * (largest / target + 2);
            let blocks = largest
                .next_multiple_of(SECTION_ALIGN)
                .saturating_add(2 * spans * SECTION_ALIGN);
            kept_len(usize::try_from(blocks).unwrap_or(usize::MAX))
        } else {
            largest
        }
    }

    /// Bytes of the read buffer this reader keeps now: never more than
    /// [`ExpertReader::kept_bytes`] says.
    pub fn kept_capacity(&self) -> u64 {
        if self.direct.is_some() {
            let b = self.aligned.lock().unwrap_or_else(|p| p.into_inner());
            b.capacity() as u64
        } else {
            let b = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
            b.len() as u64
        }
    }

    /// The (layer, number of experts) of every layer with experts.
    pub fn layers(&self) -> Vec<(u32, u32)> {
        self.plan
            .layers
            .iter()
            .map(|l| (l.layer, l.experts))
            .collect()
    }

    /// The tensors of expert `expert` of layer `layer`, at `fidelity`.
    ///
    /// With a shard, the disk is asked for all of it first (readahead, in
    /// two requests), then its bytes are read in order in groups of chunks
    /// (the group's hot bytes, then its residuals) by the members of the
    /// thread team (`tpde_team`), each group by whichever member needs it
    /// first, and each group's chunks are checked and decoded as soon as
    /// the group is in, straight into the output. With
    /// [`ExpertReader::with_direct_reads`] the shard is read with
    /// `O_DIRECT` instead: up to 2 MiB in one request, then decoded; a
    /// larger one span by span by two reader threads, each group decoded
    /// once its spans are in. The team runs one job at a time: do not call
    /// this from inside a team job.
    pub fn fetch(
        &self,
        layer: u32,
        expert: u32,
        fidelity: Fidelity,
    ) -> Result<Vec<ExtractedTensor>> {
        self.fetch_as(layer, expert, fidelity, false)
    }

    /// The expert at base fidelity, its decomposed tensors as their base
    /// blocks (checked, the rows of the expert's slice), for a runtime that
    /// computes on the blocks; tensors stored exactly come as they are.
    pub fn fetch_base_blocks(&self, layer: u32, expert: u32) -> Result<Vec<ExtractedTensor>> {
        self.fetch_as(layer, expert, Fidelity::Base, true)
    }

    fn fetch_as(
        &self,
        layer: u32,
        expert: u32,
        fidelity: Fidelity,
        blocks: bool,
    ) -> Result<Vec<ExtractedTensor>> {
        let c = self.c;
        let m = &c.manifest;
        let Some(l) = self.plan.layers.iter().find(|l| l.layer == layer) else {
            let have: Vec<String> = self
                .plan
                .layers
                .iter()
                .map(|l| l.layer.to_string())
                .collect();
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
                    "layer {layer} has {} experts (0 to {}), no expert {expert}",
                    l.experts,
                    l.experts.saturating_sub(1)
                ),
            ));
        }
        // The shard's entry, and its bytes asked of the disk before anything
        // is planned (advice only: what is read is checked below).
        let entry = m
            .experts
            .iter()
            .find(|x| x.layer == layer && x.expert == expert)
            .and_then(|x| {
                let s = m.sections.get(x.section as usize)?;
                let end = match fidelity {
                    Fidelity::Exact => s.offset.checked_add(s.len)?,
                    Fidelity::Base => s.offset.checked_add(x.hot_len)?,
                };
                Some((s, end))
            });
        if let Some((s, end)) = entry.filter(|_| self.direct.is_none()) {
            // In two requests: the first quarter alone reaches the disk
            // sooner (asking for a range costs the kernel about 0.1 µs a
            // KiB before its I/O starts), so the first groups come in and
            // decode earlier. One request for a 624 KiB shard: cold fetch
            // 0.68-0.73 ms; these two: 0.64-0.67 (A/B, this project's VM).
            let len = end - s.offset;
            let first = (len / 4).next_multiple_of(SECTION_ALIGN).min(len);
            c.will_need(s.offset, first);
            c.will_need(s.offset + first, len - first);
        }
        // Which part of which chunk goes where, in output order.
        let mut out = Vec::new();
        let mut pieces: Vec<Piece> = Vec::new();
        for et in &l.tensors {
            if et.expert.is_some_and(|e| e != expert) {
                continue;
            }
            let ti = self.index[et.name.as_str()];
            let t = &m.tensors[ti];
            // The part of the tensor that belongs to this expert, and its shape.
            let (slices, shape, index) = match et.expert {
                Some(_) => (1, t.shape.clone(), 0),
                None => (l.experts as u64, t.shape[1..].to_vec(), expert as u64),
            };
            let per = t.byte_len / slices;
            let (lo, hi) = (index * per, (index + 1) * per);
            let mut at = 0;
            for (ci, len) in c.chunk_lens(t).into_iter().enumerate() {
                let (a, b) = (at, at + len);
                at = b;
                if b > lo && a < hi {
                    pieces.push(Piece {
                        out: out.len(),
                        ti,
                        ci,
                        range: lo.max(a) - a..hi.min(b) - a,
                        blocks: false,
                    });
                }
            }
            let layout = t.base_layout().filter(|_| blocks);
            let mut len = per;
            if let Some(layout) = layout {
                // Base blocks: whole rows of the original (a stacked slice
                // and a chunk are both whole rows) become rows of blocks.
                let row = t.byte_len / t.numel().unwrap_or(1).max(1) * layout.cols as u64;
                let row_blocks = layout.row_bytes() as u64;
                for p in pieces.iter_mut().filter(|p| p.out == out.len()) {
                    let (ra, rb) = (p.range.start / row, p.range.end / row);
                    p.blocks = true;
                    p.range = ra * row_blocks..rb * row_blocks;
                }
                len = per / row * row_blocks;
            }
            out.push(ExtractedTensor {
                name: t.name.clone(),
                dtype: t.dtype.clone(),
                shape,
                data: vec![0u8; len as usize],
                base: layout,
            });
        }
        // Each piece's place in the output.
        let mut dest: Vec<Option<&mut [u8]>> = Vec::with_capacity(pieces.len());
        {
            let mut rest: Vec<&mut [u8]> = out.iter_mut().map(|t| &mut t.data[..]).collect();
            for p in &pieces {
                let r = std::mem::take(&mut rest[p.out]);
                let (head, tail) = r.split_at_mut((p.range.end - p.range.start) as usize);
                rest[p.out] = tail;
                dest.push(Some(head));
            }
        }
        // The shard, if the container has one holding every piece (a valid
        // container may place them elsewhere: then they are read one by one).
        let shard = entry.filter(|(s, end)| {
            pieces.iter().all(|p| {
                let (hot, cold) = self.extents(p, fidelity);
                [Some(hot), cold]
                    .into_iter()
                    .flatten()
                    .all(|e| e.offset >= s.offset && e.end() <= *end)
            })
        });
        let failed = std::sync::Mutex::new(None::<(usize, Error)>);
        let fail = |k: usize, e: Error| {
            let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
            if f.as_ref().is_none_or(|(j, _)| k < *j) {
                *f = Some((k, e));
            }
        };
        match shard {
            Some((s, end)) => {
                // Pieces in the order of their hot bytes (the order of their
                // residuals too), cut into groups of about GROUP_BYTES.
                let mut order: Vec<usize> = (0..pieces.len()).collect();
                order.sort_by_key(|&k| self.hot_extent(&pieces[k]).offset);
                let bytes = |k: usize| {
                    let (hot, cold) = self.extents(&pieces[k], fidelity);
                    hot.len + cold.map_or(0, |e| e.len)
                };
                let total: u64 = order.iter().map(|&k| bytes(k)).sum();
                let target = (total / 8).clamp(*GROUP_BYTES.start(), *GROUP_BYTES.end());
                let mut groups: Vec<Vec<usize>> = Vec::new();
                let mut size = u64::MAX;
                for k in order {
                    if size >= target {
                        groups.push(Vec::new());
                        size = 0;
                    }
                    size += bytes(k);
                    groups.last_mut().expect("pushed").push(k);
                }
                // Each group's hot bytes and residuals: two contiguous spans of
                // the shard; all the spans together tile the part read.
                let spans: Vec<[Option<(u64, u64)>; 2]> = groups
                    .iter()
                    .map(|g| {
                        let span = |pick: &dyn Fn(&Piece) -> Option<Extent>| {
                            let all: Vec<Extent> =
                                g.iter().filter_map(|&k| pick(&pieces[k])).collect();
                            let a = all.iter().map(|e| e.offset).min()?;
                            let b = all.iter().map(|e| e.end()).max()?;
                            Some((a, b))
                        };
                        [
                            span(&|p| Some(self.hot_extent(p))),
                            span(&|p| self.extents(p, fidelity).1),
                        ]
                    })
                    .collect();
                // The spans in file order; a valid shard's never overlap
                // (refuse rather than read a byte twice).
                let mut by_offset: Vec<(u64, u64, usize, usize)> = Vec::new();
                for (gi, two) in spans.iter().enumerate() {
                    for (j, sp) in two.iter().enumerate() {
                        if let Some((a, b)) = *sp {
                            by_offset.push((a, b, gi, j));
                        }
                    }
                }
                by_offset.sort_unstable();
                let mut at = s.offset;
                for &(a, b, _, _) in &by_offset {
                    if a < at || b > end {
                        return Err(Error::integrity(
                            &c.path,
                            format!("{}: chunks of the expert overlap", s.name),
                        ));
                    }
                    at = b;
                }
                let n_groups = groups.len();
                // The buffers read into: the kept ones when no other fetch
                // holds them.
                let (mut own, mut own_aligned) = (Vec::new(), None);
                let direct = self.direct.is_some();
                let mut kept = self.scratch.try_lock().ok().filter(|_| !direct);
                let mut kept_aligned = self.aligned.try_lock().ok().filter(|_| direct);
                // Each group's spans, as read (offset, bytes), once they are in.
                type Spans<'b> = Vec<(u64, &'b [u8])>;
                let ready: Vec<OnceLock<Spans>> = (0..n_groups).map(|_| OnceLock::new()).collect();
                let mut parts: Vec<[Option<Part>; 2]> =
                    (0..n_groups).map(|_| [None, None]).collect();
                // Spans still to be read with O_DIRECT, in file order, by
                // the reader threads below: (file offset of the region read,
                // the region, bytes that must come, the span, its group).
                type DirectJob<'b> = (u64, &'b mut [u8], usize, u64, u64, usize);
                let mut direct_jobs: Vec<Mutex<Option<DirectJob>>> = Vec::new();
                let aligned_len =
                    |a: u64, b: u64| (b - align_down(a)).next_multiple_of(SECTION_ALIGN) as usize;
                match &self.direct {
                    Some(_) if end - s.offset > DIRECT_ONE_READ => {
                        // Each span in its own request of whole blocks (a
                        // block shared by two spans is read by both), into
                        // its own region of one buffer.
                        let len: usize = by_offset
                            .iter()
                            .map(|&(a, b, _, _)| aligned_len(a, b))
                            .sum();
                        let buf = match kept_aligned.as_deref_mut() {
                            Some(b) if b.capacity() >= len => b,
                            Some(b) => {
                                *b = AlignedBuf::new(kept_len(len));
                                b
                            }
                            None => {
                                own_aligned.insert(AlignedBuf::new(whole_huge_pages(len as u64)))
                            }
                        };
                        let mut rest = buf.get_mut(len);
                        for &(a, b, gi, _) in &by_offset {
                            let (region, tail) =
                                std::mem::take(&mut rest).split_at_mut(aligned_len(a, b));
                            rest = tail;
                            let a0 = align_down(a);
                            direct_jobs.push(Mutex::new(Some((
                                a0,
                                region,
                                (b - a0) as usize,
                                a,
                                b,
                                gi,
                            ))));
                        }
                    }
                    Some(direct) => {
                        // One request for the whole part of the shard, in
                        // whole blocks; every group is in once it returns.
                        let a0 = align_down(s.offset);
                        let need = (end - a0) as usize;
                        let len = need.next_multiple_of(SECTION_ALIGN as usize);
                        let buf = match kept_aligned.as_deref_mut() {
                            Some(b) if b.capacity() >= len => b,
                            Some(b) => {
                                *b = AlignedBuf::new(kept_len(len));
                                b
                            }
                            None => {
                                own_aligned.insert(AlignedBuf::new(whole_huge_pages(len as u64)))
                            }
                        };
                        let buf = buf.get_mut(len);
                        c.read_direct(direct, a0, buf, need, || s.name.clone())?;
                        let buf = &*buf;
                        let mut per: Vec<Spans> = vec![Vec::new(); n_groups];
                        for &(a, b, gi, _) in &by_offset {
                            per[gi].push((a, &buf[(a - a0) as usize..(b - a0) as usize]));
                        }
                        for (cell, spans) in ready.iter().zip(per) {
                            let _ = cell.set(spans);
                        }
                    }
                    None => {
                        let buf = kept.as_deref_mut().unwrap_or(&mut own);
                        let len = (end - s.offset) as usize;
                        if buf.len() < len {
                            *buf = vec![0u8; len];
                        }
                        let mut rest = &mut buf[..len];
                        let mut at = s.offset;
                        for &(a, b, gi, j) in &by_offset {
                            let (_, tail) =
                                std::mem::take(&mut rest).split_at_mut((a - at) as usize);
                            let (mine, tail) = tail.split_at_mut((b - a) as usize);
                            rest = tail;
                            at = b;
                            parts[gi][j] = Some((a, mine));
                        }
                    }
                }
                // One job on the thread team (`tpde_team`). Every member
                // takes pieces in order; one whose group is not in yet reads
                // the next unread group itself (groups are read in order, by
                // whichever member gets there first) or waits for the member
                // reading it. So both cores decode while later groups are
                // still on their way (when one member read every group, the
                // other decoded alone until the last group was in). The
                // team's helper spins between jobs, so it is awake when the
                // first group lands (a rayon worker woke 0.1-0.25 ms after
                // its piece was spawned).
                let order: Vec<(usize, usize)> = groups
                    .iter()
                    .enumerate()
                    .flat_map(|(gi, g)| g.iter().map(move |&k| (gi, k)))
                    .collect();
                let outs: Vec<Mutex<Option<&mut [u8]>>> =
                    dest.iter_mut().map(|d| Mutex::new(d.take())).collect();
                let to_read: Vec<Mutex<Option<[Option<Part>; 2]>>> =
                    parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
                // With direct reads no member reads: every group is in
                // already, or the reader threads below bring it.
                let read_next = AtomicUsize::new(if self.direct.is_some() { n_groups } else { 0 });
                let abort = AtomicBool::new(false);
                let next = AtomicUsize::new(0);
                // Group `gi`'s spans, reading groups up to it (or the one
                // after it, while another member reads it); `None` once a
                // read has failed.
                let group = |gi: usize| -> Option<&Spans> {
                    let mut spins = 0u32;
                    loop {
                        if let Some(b) = ready[gi].get() {
                            return Some(b);
                        }
                        if abort.load(Ordering::Acquire) {
                            return None;
                        }
                        // Rather than wait for a group another member is
                        // reading, read the one after it.
                        let j = read_next.load(Ordering::Acquire);
                        if j <= gi + 1
                            && j < n_groups
                            && read_next
                                .compare_exchange(j, j + 1, Ordering::AcqRel, Ordering::Relaxed)
                                .is_ok()
                        {
                            let two = to_read[j]
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .take()
                                .expect("each group read once");
                            let mut bufs: Spans = Vec::new();
                            for (a, part) in two.into_iter().flatten() {
                                if let Err(e) = c.read_span_into(a, part, || s.name.clone()) {
                                    fail(groups[j][0], e);
                                    abort.store(true, Ordering::Release);
                                    return None;
                                }
                                bufs.push((a, part));
                            }
                            let _ = ready[j].set(bufs);
                        } else {
                            tpde_team::backoff(&mut spins);
                        }
                    }
                };
                // The O_DIRECT readers of a large shard: each takes the next
                // span, reads it, and hands its group over once the group's
                // spans are all in.
                let spans_of: Vec<usize> = (0..n_groups)
                    .map(|gi| by_offset.iter().filter(|x| x.2 == gi).count())
                    .collect();
                let arrived: Vec<Mutex<Spans>> =
                    (0..n_groups).map(|_| Mutex::new(Vec::new())).collect();
                let next_job = AtomicUsize::new(0);
                let reader = || {
                    // A reader that panics still lets the members stop.
                    struct AbortOnPanic<'f>(&'f AtomicBool);
                    impl Drop for AbortOnPanic<'_> {
                        fn drop(&mut self) {
                            if std::thread::panicking() {
                                self.0.store(true, Ordering::Release);
                            }
                        }
                    }
                    let _guard = AbortOnPanic(&abort);
                    let Some(direct) = &self.direct else { return };
                    while !abort.load(Ordering::Acquire) {
                        let i = next_job.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = direct_jobs.get(i) else {
                            return;
                        };
                        let (a0, region, need, a, b, gi) = job
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .take()
                            .expect("each span read once");
                        if let Err(e) = c.read_direct(direct, a0, region, need, || s.name.clone()) {
                            fail(groups[gi][0], e);
                            abort.store(true, Ordering::Release);
                            return;
                        }
                        let region: &[u8] = region;
                        let span = (a, &region[(a - a0) as usize..(b - a0) as usize]);
                        let mut got = arrived[gi].lock().unwrap_or_else(|p| p.into_inner());
                        got.push(span);
                        if got.len() == spans_of[gi] {
                            let _ = ready[gi].set(std::mem::take(&mut *got));
                        }
                    }
                };
                let job = |_: usize, _: usize| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(gi, k)) = order.get(i) else { return };
                    let Some(bufs) = group(gi) else { return };
                    let get = |e: &Extent, who: &dyn Fn() -> String| {
                        let (a, v) = bufs
                            .iter()
                            .find(|(a, v)| e.offset >= *a && e.end() <= a + v.len() as u64)
                            .expect("read with its group");
                        let (a, v) = (*a, *v);
                        let b = &v[(e.offset - a) as usize..(e.end() - a) as usize];
                        c.check(e, b, who)?;
                        Ok(Cow::Borrowed(b))
                    };
                    let to = outs[k]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                        .expect("each piece once");
                    if let Err(e) = self.decode(&pieces[k], fidelity, &get, to) {
                        fail(k, e);
                    }
                };
                if direct_jobs.is_empty() {
                    tpde_team::Team::global().run(&job);
                } else {
                    std::thread::scope(|scope| {
                        // Without any reader nothing would come: an error.
                        let mut started = 0;
                        let mut refused = None;
                        for _ in 0..DIRECT_READERS {
                            match std::thread::Builder::new()
                                .name("tpde-expert-read".into())
                                .spawn_scoped(scope, reader)
                            {
                                Ok(_) => started += 1,
                                Err(e) => refused = Some(e),
                            }
                        }
                        if let (0, Some(e)) = (started, refused) {
                            fail(
                                0,
                                Error::io(&c.path, "starting a thread to read a shard")(e),
                            );
                            abort.store(true, Ordering::Release);
                        }
                        tpde_team::Team::global().run(&job);
                    });
                }
            }
            None => {
                // No shard (a container of format version 1 or 2): each
                // extent is read on its own.
                let get = |e: &Extent, who: &dyn Fn() -> String| -> Result<Cow<'_, [u8]>> {
                    Ok(Cow::Owned(c.read_checked(e, who)?))
                };
                pieces
                    .par_iter()
                    .zip(dest.par_iter_mut())
                    .enumerate()
                    .for_each(|(k, (p, to))| {
                        let to = to.take().expect("each piece once");
                        if let Err(e) = self.decode(p, fidelity, &get, to) {
                            fail(k, e);
                        }
                    });
            }
        }
        if let Some((_, e)) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        Ok(out)
    }

    /// The piece's hot extent: its base, or its raw chunk.
    fn hot_extent(&self, p: &Piece) -> Extent {
        match &self.c.manifest.tensors[p.ti].storage {
            Storage::Raw { chunks } => chunks[p.ci],
            Storage::Decomposed { chunks, .. } => chunks[p.ci].base,
        }
    }

    /// The extents a piece needs at `fidelity`: hot, and the residual.
    fn extents(&self, p: &Piece, fidelity: Fidelity) -> (Extent, Option<Extent>) {
        match &self.c.manifest.tensors[p.ti].storage {
            Storage::Decomposed { chunks, .. } if fidelity == Fidelity::Exact => {
                (chunks[p.ci].base, Some(chunks[p.ci].cold))
            }
            _ => (self.hot_extent(p), None),
        }
    }

    /// Rebuilds a piece into `to`, getting (checked) extent bytes from `get`.
    fn decode<'a>(
        &self,
        p: &Piece,
        fidelity: Fidelity,
        get: &GetExtent<'_, 'a>,
        to: &mut [u8],
    ) -> Result<()> {
        let c = self.c;
        let t = &c.manifest.tensors[p.ti];
        let ci = p.ci;
        let who = || format!("tensor {:?} chunk {ci}", t.name);
        let (a, b) = (p.range.start as usize, p.range.end as usize);
        match &t.storage {
            Storage::Raw { chunks } => {
                let bytes = get(&chunks[ci], &who)?;
                to.copy_from_slice(&bytes[a..b]);
            }
            Storage::Decomposed { chunks, .. } if p.blocks => {
                let base = get(&chunks[ci].base, &|| format!("{} (hot base)", who()))?;
                if b > base.len() {
                    return Err(Error::integrity(
                        &c.path,
                        format!("{}: base shorter than its rows", who()),
                    ));
                }
                to.copy_from_slice(&base[a..b]);
            }
            Storage::Decomposed {
                chunks,
                cols,
                residual: kind,
                ..
            } => {
                let kind = residual::Kind::from_name(kind).expect("validated");
                let ch = &chunks[ci];
                let dtype = FloatDtype::from_name(&t.dtype).expect("validated");
                let layout = t.base_layout().expect("decomposed");
                let len = (ch.rows * cols) as usize * dtype.width();
                let base = get(&ch.base, &|| format!("{} (hot base)", who()))?;
                let cold = match fidelity {
                    Fidelity::Exact => {
                        Some(get(&ch.cold, &|| format!("{} (cold residual)", who()))?)
                    }
                    Fidelity::Base => None,
                };
                // Whole chunks decode in place; a part of one (only in
                // containers without shards) goes through a scratch buffer.
                let mut scratch = Vec::new();
                let whole = a == 0 && b == len;
                let buf: &mut [u8] = if whole {
                    to
                } else {
                    scratch.resize(len, 0);
                    &mut scratch
                };
                match &cold {
                    Some(cold) => residual::decode(dtype, &layout, &base, cold, buf, kind),
                    None => residual::base_values(dtype, &layout, &base, buf),
                }
                .map_err(|e| Error::integrity(&c.path, format!("{}: {e}", who())))?;
                if !whole {
                    to.copy_from_slice(&scratch[a..b]);
                }
            }
        }
        Ok(())
    }
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
