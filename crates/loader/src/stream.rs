//! Streaming a container in execution order under a memory budget.
//!
//! [`Loader::open`] plans the steps and the memory (a budget that cannot
//! hold the hot tier is refused there). [`Loader::stream`] then walks the
//! model step by step (`pre`, `layer.0`, `layer.1`, …, `post`). The reads
//! of a pass are planned in the order the steps need them: each step's part
//! of the hot section, into the resident hot buffer (first pass only: the
//! hot tier stays resident), in turns with its streamed sections (its cold
//! section and its expert shards; at base fidelity only the shards' hot
//! parts), into a buffer from a fixed pool; in pieces of about
//! [`PIECE_BYTES`], smaller at the end of the pass. The buffers the disk
//! reads into are on transparent huge pages where the kernel has them
//! ([`AlignedBuf`]). Four reader threads take them in turn, so that the
//! disk has the next requests queued, and announce them in order (a read
//! that finishes before an earlier one is held, and its reader goes on to
//! the next). The calling thread has each chunk checked (xxh3),
//! decompressed and reconstructed on the loader's decode threads (and
//! decodes itself while no read has landed) as soon as the pieces holding
//! it have landed, into the step's output buffer, and hands the step to
//! the consumer when all its chunks are done.
//! The read pool is `pool_buffers` segments, each as large as the largest
//! step's streamed bytes; each step takes a region of a segment in turn
//! (small steps several to a segment) and gives it back once consumed, so
//! the readers run at least `pool_buffers` steps ahead, small steps
//! further, and wait for room when they get there (backpressure); a step's
//! bytes reach the consumer only after every one of their checksums passed.
//!
//! When every streamed byte of a pass is already in the page cache (and the
//! loader reads without `O_DIRECT`), the readers leave the streamed
//! sections alone: each decode job reads its own chunk into a buffer of its
//! thread and checks and decodes it while it is in cache ([`ReadPath`]).

use crate::telemetry;
use rayon::prelude::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};
pub use tpde_codecs::residual::Stores;
use tpde_codecs::{residual, xxh3, FloatDtype};
use tpde_format::{Extent, Section, SectionKind, Storage, SECTION_ALIGN};
use tpde_pack::container::{whole_huge_pages, AlignedBuf};
use tpde_pack::{Container, Error, Fidelity, Result};

/// How to stream.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub fidelity: Fidelity,
    /// Most resident memory of the whole process, bytes; `None`: no limit.
    pub ram_budget: Option<u64>,
    /// The read pool's size, in segments as large as the largest step's
    /// streamed bytes: the readers run at least this many steps ahead of
    /// the consumer (2 is double buffering), smaller steps several to a
    /// segment. Lowered to fit the budget, never below 1.
    pub prefetch: usize,
    /// Read with `O_DIRECT` (aligned buffers, no page cache).
    pub direct: bool,
    /// Keep the hot tier resident (read once, on the first pass). When
    /// false, each step reads its own hot extents on every pass, like its
    /// cold ones: a runtime whose budget cannot hold the model streams
    /// every layer per token.
    pub hot_resident: bool,
    /// Stream expert shards with their layer. When false, tensors held in
    /// expert shards are left out of the steps (a runtime fetches the
    /// experts its router picks on its own).
    pub stream_experts: bool,
    /// The steps this loader streams (and sizes its buffers for).
    pub steps: StepSet,
    /// At base fidelity, deliver each decomposed tensor as its base blocks
    /// (the hot tier's bytes, checked; [`LoadedTensor::base`] says how
    /// they are laid out) rather than as values in its dtype: for a
    /// runtime that computes on the quantized base directly.
    pub base_blocks: bool,
    /// Who reads the streamed sections.
    pub reads: ReadPath,
    /// How the decode threads store the values they rebuild into a step's
    /// buffer (see [`StepStores`]).
    pub stores: StepStores,
}

/// How the decode threads store the values they rebuild into a step's
/// buffer ([`Stores`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStores {
    /// Past the cache for a step whose values are more than half the
    /// last-level cache ([`telemetry::last_level_cache_bytes`]; 32 MiB
    /// where the kernel does not say): they could not stay in it, and each
    /// plain store would first read its line in. Plain stores for a smaller
    /// step: the buffer the consumer gives back, reused for the next step,
    /// is still in the cache, and nothing goes to memory. MiniLM F32, base
    /// fidelity, two threads, an AMD EPYC VM with 32 MiB of L3, four
    /// alternating rounds: warm 20.8–21.4 GB/s against 16.7–18.9 with every
    /// step past the cache and 18.2–20.6 with none; cold (`O_DIRECT`)
    /// 0.64–0.70 × the disk bound against 0.59–0.64 and 0.66–0.78 (memory
    /// writes slow this VM's disk, `benches/RESULTS.md`).
    #[default]
    BySize,
    /// Past the cache for a step with more than this many bytes of values,
    /// plain stores for the others.
    Above(u64),
    /// Plain stores for every step ([`Stores::Cached`]): for a consumer
    /// that computes on each step as soon as it arrives.
    Cached,
    /// Past the cache for every step ([`Stores::PastCache`]; each tensor
    /// starts on a cache line).
    PastCache,
}

/// Who reads a pass's streamed sections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPath {
    /// [`ReadPath::Jobs`] when, as the pass starts, every streamed byte of
    /// it is in the page cache (and the loader reads without `O_DIRECT`);
    /// [`ReadPath::Readers`] otherwise.
    #[default]
    Auto,
    /// Reader threads, ahead of the decoders, into the pool's buffers: the
    /// disk always has the next requests queued.
    Readers,
    /// Each decode job reads its own chunk's extents into a buffer of its
    /// thread, and checks and decodes them while they are in that core's
    /// cache. From the page cache this saves a pass over memory: the bytes
    /// are copied once and read back from cache, not copied by a reader
    /// and read back from memory by a decoder. On MiniLM at exact fidelity,
    /// warm, two threads: 1.06-1.29 × the GB/s delivered
    /// (`benches/RESULTS.md`). From the disk a job would wait for its read
    /// with a core idle, so `Auto` takes this only when the bytes are
    /// cached. Ignored with `O_DIRECT` (the readers read), and for a pass
    /// that streams nothing.
    Jobs,
}

/// Which steps a loader streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StepSet {
    #[default]
    All,
    /// The `layer.N` steps: a runtime that keeps the rest resident streams
    /// these for every token.
    Layers,
    /// `pre` and `post`: the embedding, the output, what is outside the layers.
    OutsideLayers,
}

impl StepSet {
    pub fn contains(self, step_name: &str) -> bool {
        let layer = step_name.starts_with("layer.");
        match self {
            StepSet::All => true,
            StepSet::Layers => layer,
            StepSet::OutsideLayers => !layer,
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            fidelity: Fidelity::Exact,
            ram_budget: None,
            prefetch: 2,
            direct: false,
            hot_resident: true,
            stream_experts: true,
            steps: StepSet::All,
            base_blocks: false,
            reads: ReadPath::Auto,
            stores: StepStores::BySize,
        }
    }
}

/// Where the loader's memory goes, bytes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryPlan {
    /// Resident size of the process once the container is open (the
    /// manifest parsed and validated), before the loader's buffers.
    pub baseline_rss: u64,
    /// The resident hot tier (as read: rounded to whole blocks with `O_DIRECT`).
    pub hot: u64,
    /// The read pool: `pool_buffers` segments of the largest step's
    /// streamed bytes (`pool_buffer_bytes`), which the steps share in turn
    /// (smaller steps several to a segment, read further ahead).
    pub pool_buffers: usize,
    pub pool_buffer_bytes: u64,
    /// The largest step's delivered tensors, each starting on a 64-byte
    /// boundary.
    pub output_bytes: u64,
    /// The loader's decode threads, and what each keeps while decoding:
    /// residual planes as large as the largest chunk it rebuilds (exact
    /// fidelity), a zstd context, its stack, and (without `O_DIRECT`) a
    /// buffer for the chunks it reads itself ([`ReadPath::Jobs`]). The
    /// thread that calls [`Loader::stream`] decodes too, so the plan holds
    /// one allowance more than there are decode threads; that thread keeps
    /// its scratch (planes and zstd context) after the stream returns.
    pub decode_threads: usize,
    pub per_thread_bytes: u64,
    /// Of `per_thread_bytes`, that buffer: the most one job streams.
    pub job_read_bytes: u64,
    /// Bytes added to the hot buffer and to the read pool to make each a
    /// whole number of huge pages, where it is one or more
    /// ([`tpde_pack::container::whole_huge_pages`]): the disk reads into
    /// small pages at about half the speed.
    pub huge_page_slack: u64,
    /// `baseline_rss + hot + pool_buffers × pool_buffer_bytes + output_bytes
    /// + (decode_threads + 1) × per_thread_bytes + huge_page_slack`.
    pub total: u64,
}

/// One step of execution order and what it reads.
#[derive(Clone, Debug)]
pub struct Step {
    /// `pre`, `layer.N` or `post`.
    pub name: String,
    /// Manifest indices of its tensors, in manifest (execution) order.
    pub tensors: Vec<usize>,
    /// Where the step's hot data ends in the file: its chunks wait for the
    /// hot tier to be read this far (first pass).
    pub hot_end: u64,
    /// Byte ranges of the container streamed for this step (every pass),
    /// in file order.
    pub spans: Vec<(u64, u64)>,
    /// Sum of the spans' lengths.
    pub read_bytes: u64,
    /// Original bytes of its tensors.
    pub original_bytes: u64,
    /// Bytes delivered: the original bytes, less what base blocks save.
    pub out_bytes: u64,
}

/// A delivered step: its tensors in `data`, in order, each starting on a
/// 64-byte boundary of memory (the bytes between them mean nothing). The consumer may
/// take `data` (`std::mem::take`) and own it; otherwise the loader reuses
/// the buffer for the next step.
#[derive(Debug, Default)]
pub struct LoadedStep {
    /// The step's name (`pre`, `layer.N`, `post`).
    pub name: String,
    pub tensors: Vec<LoadedTensor>,
    pub data: Vec<u8>,
}

impl LoadedStep {
    /// The bytes of one of this step's tensors.
    pub fn bytes(&self, t: &LoadedTensor) -> &[u8] {
        &self.data[t.range.clone()]
    }
}

/// A tensor of a delivered step. At `exact` fidelity its bytes are the
/// original ones; at `base` the hot tier's values in the tensor's dtype
/// (tensors stored exactly come back exactly).
#[derive(Clone, Debug)]
pub struct LoadedTensor {
    /// Index in the manifest.
    pub index: usize,
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Where its bytes are in [`LoadedStep::data`].
    pub range: std::ops::Range<usize>,
    /// Delivered as base blocks of this layout (`base_blocks`), rows'
    /// blocks back to back; `None`: values in `dtype`.
    pub base: Option<tpde_format::BaseLayout>,
}

/// Seconds each stage was busy, summed over the threads that ran it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StageSeconds {
    /// Wall time during which a thread was inside `pread` (any of them: the
    /// readers, or the decode jobs reading their own chunks).
    pub read: f64,
    /// xxh3 of every extent read.
    pub checksum: f64,
    /// zstd frames of the residuals (exact fidelity).
    pub decompress: f64,
    /// Values rebuilt from bases and residuals, or from bases alone, or copied.
    pub reconstruct: f64,
    /// The consumer's callback.
    pub consume: f64,
}

/// What one pass over the model did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StreamReport {
    pub steps: usize,
    pub tensors: usize,
    /// Bytes read from the container: the hot tier (first pass) and every
    /// streamed section.
    pub read_bytes: u64,
    /// Of which the hot tier.
    pub hot_bytes: u64,
    /// Bytes delivered to the consumer: original bytes, or base blocks
    /// where `base_blocks` asked for them.
    pub delivered_bytes: u64,
    pub wall_seconds: f64,
    pub stages: StageSeconds,
    /// The loader's decode threads, which ran the checksum, decompress and
    /// reconstruct stages with the calling thread.
    pub decode_threads: usize,
    /// Jobs (chunks) the calling thread decoded while no read waited to be
    /// announced.
    pub caller_jobs: usize,
    /// Who read the streamed sections: [`ReadPath::Readers`] or
    /// [`ReadPath::Jobs`].
    pub streamed_reads: ReadPath,
}

/// What a decode thread keeps besides its residual planes: a zstd
/// decompression context (about 160 KiB) and the touched part of its stack.
const PER_THREAD_BYTES: u64 = 512 << 10;

/// Original bytes of the largest decomposed chunk: the residual planes a
/// decode thread keeps are this large.
fn largest_decomposed_chunk(c: &Container) -> u64 {
    c.manifest
        .tensors
        .iter()
        .filter(|t| matches!(t.storage, Storage::Decomposed { .. }))
        .flat_map(|t| c.chunk_lens(t))
        .max()
        .unwrap_or(0)
}

/// The extents chunk `ci` of `t` reads at `fidelity`: its base (or raw
/// bytes), and its residual at exact fidelity.
fn job_extents(t: &tpde_format::Tensor, ci: usize, fidelity: Fidelity) -> (Extent, Option<Extent>) {
    match &t.storage {
        Storage::Raw { chunks } => (chunks[ci], None),
        Storage::Decomposed { chunks, .. } => (
            chunks[ci].base,
            (fidelity == Fidelity::Exact).then_some(chunks[ci].cold),
        ),
    }
}

/// The most bytes one job of `steps` streams (its extents outside the
/// resident hot range `[hot_at, hot_at + hot_len)`).
fn largest_streamed_job(
    c: &Container,
    options: &LoadOptions,
    steps: &[Step],
    (hot_at, hot_len): (u64, u64),
) -> u64 {
    let in_hot = |e: &Extent| e.offset >= hot_at && e.end() <= hot_at + hot_len;
    let m = &c.manifest;
    steps
        .iter()
        .flat_map(|s| s.tensors.iter())
        .flat_map(|&ti| {
            let t = &m.tensors[ti];
            (0..c.chunk_lens(t).len()).map(move |ci| {
                let (a, b) = job_extents(t, ci, options.fidelity);
                std::iter::once(a)
                    .chain(b)
                    .filter(|e| !in_hot(e))
                    .map(|e| e.len)
                    .sum::<u64>()
            })
        })
        .max()
        .unwrap_or(0)
}

/// Bytes delivered for each chunk of `t`: its original bytes, or with
/// `blocks` (base blocks asked for) a decomposed chunk's base.
fn delivered_chunk_lens(c: &Container, t: &tpde_format::Tensor, blocks: bool) -> Vec<u64> {
    match &t.storage {
        Storage::Decomposed { chunks, .. } if blocks => {
            chunks.iter().map(|ch| ch.base.len).collect()
        }
        _ => c.chunk_lens(t),
    }
}

/// Bytes read at once while streaming: large enough for efficient reads,
/// small enough that decoding starts soon after a step's first read. On
/// MiniLM BF16, exact, `O_DIRECT`, three rounds with four readers: 1 MiB
/// pieces reached 0.81-0.87 × the disk bound, 2 MiB 0.67-0.71, 512 KiB
/// 0.73-0.90; F32 0.86-1.00 with any of them.
pub const PIECE_BYTES: u64 = 1 << 20;

/// A buffer that one thread fills in disjoint ranges while others read the
/// ranges already filled. The synchronization is the loader's messages: a
/// range is read only after the message saying it was filled, and is not
/// written again while anything may read it.
struct Shared {
    _buf: AlignedBuf,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: access goes through `fill` and `filled`, whose callers uphold
// the exclusivity rules stated there.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// Touches every page of a fresh buffer, in parallel, so that the memory
/// is committed now (page faults cost about a microsecond per 4 KiB page
/// here: a third of the disk's speed if they happened while streaming).
fn commit(buf: &mut [u8]) {
    buf.par_chunks_mut(1 << 20).for_each(|c| {
        for i in (0..c.len()).step_by(4096) {
            c[i] = 0;
        }
    });
}

fn committed(mut v: Vec<u8>) -> Vec<u8> {
    advise_huge(&mut v);
    commit(&mut v);
    v
}

/// Huge pages for a fresh step buffer large enough to be a mapping of its
/// own (the advice would outlive a smaller one on the allocator's heap).
fn advise_huge(v: &mut [u8]) {
    if v.len() >= tpde_pack::container::OWN_MAPPING {
        tpde_pack::container::advise_huge_pages(v);
    }
}

impl Shared {
    /// A buffer of `len` bytes, committed ([`commit`]).
    fn committed(len: u64) -> Shared {
        let mut buf = AlignedBuf::new(len);
        let s = buf.get_mut(len as usize);
        commit(s);
        let (ptr, len) = (s.as_mut_ptr(), s.len());
        Shared {
            _buf: buf,
            ptr,
            len,
        }
    }

    /// # Safety
    ///
    /// Nothing else reads or writes `[a, b)` while the result lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn fill(&self, a: usize, b: usize) -> &mut [u8] {
        assert!(a <= b && b <= self.len, "range in the buffer");
        std::slice::from_raw_parts_mut(self.ptr.add(a), b - a)
    }

    /// # Safety
    ///
    /// `[a, b)` was filled before (and that is synchronized with this
    /// thread), and is not filled again while the result lives.
    unsafe fn filled(&self, a: usize, b: usize) -> &[u8] {
        assert!(a <= b && b <= self.len, "range in the buffer");
        std::slice::from_raw_parts(self.ptr.add(a), b - a)
    }
}

/// An open container ready to stream.
pub struct Loader {
    pub container: Container,
    pub options: LoadOptions,
    pub memory: MemoryPlan,
    steps: Vec<Step>,
    /// The file read while streaming (opened with `O_DIRECT` when asked).
    file: File,
    /// The hot section as read (whole blocks with `O_DIRECT`), resident,
    /// and the file offset of its first byte.
    hot: Shared,
    hot_at: u64,
    hot_len: u64,
    /// Whether a complete pass read and checked the hot tier.
    hot_loaded: bool,
    /// The read pool: `memory.pool_buffers × memory.pool_buffer_bytes`
    /// bytes, in which each step's streamed bytes get a region of their
    /// own, handed out and given back in step order ([`Ring`]).
    pool: Shared,
    /// The decode threads: as many as the global rayon pool has, at a
    /// lower scheduling priority than the reader, so that on a machine
    /// whose cores are all decoding the reader still issues its next read
    /// as soon as the last one completes.
    decoders: rayon::ThreadPool,
    /// The step buffer given back by the consumer, reused.
    spare: Vec<u8>,
    /// Each decode thread's buffer for the chunks it reads itself
    /// ([`ReadPath::Jobs`]; `memory.job_read_bytes` each, none with
    /// `O_DIRECT`), indexed by the thread's index in `decoders`.
    job_buffers: Vec<Shared>,
    /// With [`StepStores::BySize`]: a step with more bytes of values than
    /// this stores them past the cache.
    past_cache_above: u64,
}

fn align_down(x: u64) -> u64 {
    x - x % SECTION_ALIGN
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(SECTION_ALIGN) * SECTION_ALIGN
}

/// Reads `buf.len()` bytes at `offset`; a failed read (an I/O error, or a
/// file cut short since it was opened) is an input error naming `what()`
/// (built only then), not a mismatch: nothing was compared.
fn read_into(
    file: &File,
    path: &Path,
    offset: u64,
    buf: &mut [u8],
    what: impl FnOnce() -> String,
) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        Error::input(
            path,
            format!(
                "{}: cannot read {} bytes at {offset}: {e}",
                what(),
                buf.len()
            ),
        )
    })
}

/// What the reader tells the calling thread, in order.
enum Msg {
    /// The hot buffer is filled up to this file offset.
    Hot(u64),
    /// The read pool's region at `slot` holds step `step`'s streamed bytes
    /// up to `upto`.
    Streamed {
        step: usize,
        slot: usize,
        upto: usize,
    },
    /// Everything of step `step` was read; `slot` is its region of the read pool.
    StepRead {
        step: usize,
        slot: Option<usize>,
    },
    Failed(Error),
}

/// Reader threads: four, so that requests stay queued at the disk while
/// the readers of the ones before wait for the CPU (both cores decode). On
/// MiniLM F32, exact, `O_DIRECT`, in rounds where the disk read 1.5-1.65
/// GB/s raw, four readers reached 0.84-0.87 × the disk bound and two
/// 0.64-0.87; BF16 (less to read per byte decoded) did not change.
const READERS: usize = 4;

/// One read of a pass, in the order the steps need them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// File range `[a, b)` of the hot tier.
    Hot { a: u64, b: u64 },
    /// `len` bytes at file offset `offset` into step `step`'s region of the pool
    /// at `at`.
    Streamed {
        step: usize,
        offset: u64,
        at: u64,
        len: u64,
    },
    /// Step `step` was read.
    StepEnd { step: usize },
}

/// Hands out a pass's reads in order (with the pool region of the step a
/// streamed read belongs to) and announces them in the same order,
/// whichever reader finishes first.
#[derive(Default)]
struct ReadOrder {
    /// The next read to hand out, and the buffer of the step whose
    /// streamed reads are being handed out.
    next: Mutex<(usize, Option<(usize, usize)>)>,
    /// Reads announced so far, and the messages of later reads that
    /// finished before an earlier one.
    sent: Mutex<Announced>,
    /// Set when an announcement failed (a read error, once sent in its
    /// turn; or the consumer gone), or a reader panicked: the readers stop.
    /// Until a read error's turn comes, the other readers read on.
    stop: std::sync::atomic::AtomicBool,
}

/// The next read to announce, and the messages of later reads that
/// finished first.
#[derive(Default)]
struct Announced {
    next: usize,
    held: std::collections::BTreeMap<usize, Msg>,
}

impl ReadOrder {
    /// The next read and its step's region of the read pool; waits for
    /// room in the pool (backpressure) at a step's first streamed read, for
    /// the step's `step_bytes`. `None`: nothing left, or stopping.
    fn take(
        &self,
        reads: &[Read],
        pool: &Ring,
        step_bytes: &[u64],
    ) -> Option<(usize, Option<usize>)> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        if self.stop.load(Relaxed) {
            return None;
        }
        let t = next.0;
        let r = *reads.get(t)?;
        let slot = match r {
            Read::Hot { .. } => None,
            Read::Streamed { step, .. } | Read::StepEnd { step } => match next.1 {
                Some((s, k)) if s == step => Some(k),
                _ if matches!(r, Read::Streamed { .. }) => {
                    let k = pool.take(step_bytes[step])? as usize;
                    next.1 = Some((step, k));
                    Some(k)
                }
                _ => None,
            },
        };
        next.0 = t + 1;
        Some((t, slot))
    }

    /// Stops the readers if the calling reader unwinds while this is alive
    /// (closing `pool` too, for a reader waiting for room in it).
    fn stop_on_panic<'a>(&'a self, pool: &'a Ring) -> StopOnPanic<'a> {
        StopOnPanic(self, pool)
    }

    /// Sends read `t`'s message, and those of later reads held back for
    /// it, once every earlier read's was sent; until then it is held and
    /// the reader goes on to its next read. (A reader that waited for its
    /// turn left the disk with fewer requests queued whenever requests
    /// issued together finished out of order: on a cold exact pass of
    /// MiniLM the readers spent up to 25 ms waiting, summed, in a 19 ms
    /// pass, and the disk sat idle for 0.6 ms at a time.) False when the
    /// readers are to stop.
    fn announce(&self, t: usize, msg: Msg, tx: &mpsc::Sender<Msg>) -> bool {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        if self.stop.load(Relaxed) {
            return false;
        }
        sent.held.insert(t, msg);
        loop {
            let next = sent.next;
            let Some(msg) = sent.held.remove(&next) else {
                return true;
            };
            let failed = matches!(msg, Msg::Failed(_));
            // A failure is sent too (the consumer reports it), then stops
            // the readers.
            if tx.send(msg).is_err() || failed {
                self.stop.store(true, Relaxed);
                sent.held.clear();
                return false;
            }
            sent.next = next + 1;
        }
    }
}

struct StopOnPanic<'a>(&'a ReadOrder, &'a Ring);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop.store(true, Relaxed);
            self.1.close();
        }
    }
}

/// The read pool's regions. The pool is `pool_buffers` segments, each as
/// large as the largest step's streamed bytes; each step with streamed
/// bytes gets one contiguous region inside a segment: after the newest
/// region if its segment has room, otherwise at the start of the next
/// segment (in turn, wrapping) once that segment is wholly given back.
/// Regions are given back once consumed, in the same order. So the readers
/// are always at least `pool_buffers` steps ahead, as with one buffer per
/// step, and small steps, several to a segment, further ahead.
struct Ring {
    state: Mutex<RingState>,
    room: std::sync::Condvar,
}

struct RingState {
    /// The segments' size, and how many there are.
    seg: u64,
    segs: u64,
    /// Regions handed out and not yet given back, oldest first: (start, length).
    held: std::collections::VecDeque<(u64, u64)>,
    /// Set when the pass ends (or a reader unwinds): waiting stops.
    closed: bool,
}

impl RingState {
    /// Where a region of `n` bytes (`0 < n <= seg`) would go now, if anywhere.
    fn fit(&self, n: u64) -> Option<u64> {
        debug_assert!(n > 0 && n <= self.seg, "a region of 1 to seg bytes");
        let Some(&(last, last_len)) = self.held.back() else {
            return Some(0);
        };
        let k = last / self.seg;
        let end = last + last_len;
        if end + n <= (k + 1) * self.seg {
            return Some(end);
        }
        let next = (k + 1) % self.segs;
        let free = self.held.iter().all(|&(at, _)| at / self.seg != next);
        free.then_some(next * self.seg)
    }
}

impl Ring {
    /// A pool of `segs` segments of `seg` bytes.
    fn new(seg: u64, segs: u64) -> Ring {
        Ring {
            state: Mutex::new(RingState {
                seg,
                segs,
                held: Default::default(),
                closed: false,
            }),
            room: std::sync::Condvar::new(),
        }
    }

    /// A region of `n` bytes (its start), once there is room; `None` once
    /// closed, or for more bytes than a segment holds.
    fn take(&self, n: u64) -> Option<u64> {
        // A step takes a region only when it streams something.
        debug_assert!(n > 0, "a step that streams nothing takes no region");
        let n = n.max(1);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.closed || n > st.seg || st.segs == 0 {
                return None;
            }
            if let Some(at) = st.fit(n) {
                st.held.push_back((at, n));
                return Some(at);
            }
            st = self.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Gives back the oldest region, which starts at `at`.
    fn give_back(&self, at: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        debug_assert_eq!(st.held.front().map(|r| r.0), Some(at as u64), "in order");
        st.held.pop_front();
        drop(st);
        self.room.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.room.notify_all();
    }

    /// Closes the ring when dropped.
    fn closer(&self) -> RingCloser<'_> {
        RingCloser(self)
    }
}

struct RingCloser<'a>(&'a Ring);

impl Drop for RingCloser<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The last bytes of a pass read in smaller pieces, [`TAIL_PIECE_BYTES`]
/// each: requests issued together complete together, so the pass's last
/// bytes arrive as one batch of up to [`READERS`] pieces and everything in
/// it is decoded after the disk has finished. Smaller pieces at the end
/// make that batch, and the decode left after the last read, smaller.
/// Small pieces read slower (four 256 KiB requests: 1.6-1.9 GB/s, four of
/// 1 MiB: 2.3-2.7), so the tail is short. MiniLM BF16, cold `O_DIRECT`,
/// base, × the disk bound (A/B, three rounds of 11 passes): 1 MiB pieces
/// to the end 0.73-0.74; the last 1 MiB in 256 KiB pieces 0.74-0.79; the
/// last 2 MiB in 512 KiB pieces 0.76-0.77; in 256 KiB pieces 0.78-0.80.
const TAIL_BYTES: u64 = 2 << 20;
const TAIL_PIECE_BYTES: u64 = 256 << 10;

/// `reads` with every read that ends in the last `tail` bytes of the pass
/// cut into pieces of at most `piece` bytes (a multiple of the block, so
/// only a read's last piece can end off a block, where the read did).
fn small_tail(reads: Vec<Read>, tail: u64, piece: u64) -> Vec<Read> {
    let len = |r: &Read| match *r {
        Read::Hot { a, b } => b - a,
        Read::Streamed { len, .. } => len,
        Read::StepEnd { .. } => 0,
    };
    let total: u64 = reads.iter().map(len).sum();
    let mut out = Vec::with_capacity(reads.len());
    let mut before = 0u64;
    for r in reads {
        let n = len(&r);
        before += n;
        if n <= piece || before <= total.saturating_sub(tail) {
            out.push(r);
            continue;
        }
        for k in (0..n).step_by(piece as usize) {
            let m = piece.min(n - k);
            out.push(match r {
                Read::Hot { a, .. } => Read::Hot {
                    a: a + k,
                    b: a + k + m,
                },
                Read::Streamed {
                    step, offset, at, ..
                } => Read::Streamed {
                    step,
                    offset: offset + k,
                    at: at + k,
                    len: m,
                },
                Read::StepEnd { .. } => unreachable!("a read of no bytes is never cut"),
            });
        }
    }
    out
}

/// Pieces of `[0, len)` of about [`PIECE_BYTES`] (multiples of the
/// alignment when `len` is one).
fn pieces(len: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(PIECE_BYTES)).map(move |k| {
        let a = k * PIECE_BYTES;
        (a, (a + PIECE_BYTES).min(len))
    })
}

impl Loader {
    /// Opens `path`, plans the steps and the memory, and commits the
    /// planned buffers (hot tier, read buffers, one step's output), so that
    /// streaming never waits on a page fault. A budget that cannot hold the
    /// hot tier, or one step besides it, is an error here, before anything
    /// big is allocated.
    pub fn open(path: &Path, options: LoadOptions) -> Result<Loader> {
        Loader::with_container(Container::open(path)?, options)
    }

    /// [`Loader::open`] on a container already open.
    pub fn with_container(container: Container, options: LoadOptions) -> Result<Loader> {
        let path = &container.path.clone();
        let baseline_rss = telemetry::rss_bytes().unwrap_or(0);
        let direct = options.direct;
        let file = if direct {
            container.reopen_direct()?
        } else {
            container
                .file
                .try_clone()
                .map_err(|e| Error::input(path, format!("cannot reopen: {e}")))?
        };
        let (steps, memory, (hot_at, hot_len)) = plan(&container, &options, baseline_rss)?;
        let (slot, out, threads, buffers) = (
            memory.pool_buffer_bytes,
            memory.output_bytes,
            memory.decode_threads,
            memory.pool_buffers,
        );
        let job_bytes = memory.job_read_bytes;
        Ok(Loader {
            container,
            options,
            memory,
            steps,
            file,
            hot: Shared::committed(whole_huge_pages(hot_len)),
            hot_at,
            hot_len,
            hot_loaded: false,
            pool: Shared::committed(whole_huge_pages(buffers as u64 * slot)),
            decoders: rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("tpde-decode-{i}"))
                .start_handler(|_| {
                    // SAFETY: lowers this thread's own priority (nice +5);
                    // a plain system call that touches no memory of ours.
                    unsafe {
                        libc::setpriority(libc::PRIO_PROCESS, 0, 5);
                    }
                })
                .build()
                .map_err(|e| Error::input(path, format!("cannot start decode threads: {e}")))?,
            spare: committed(vec![0u8; out as usize]),
            job_buffers: (0..threads)
                .filter(|_| !direct && job_bytes > 0)
                .map(|_| Shared::committed(job_bytes))
                .collect(),
            past_cache_above: telemetry::last_level_cache_bytes().unwrap_or(32 << 20) / 2,
        })
    }

    /// Who reads this pass's streamed sections.
    fn read_path(&self) -> ReadPath {
        let mut spans = self
            .steps
            .iter()
            .flat_map(|s| s.spans.iter().copied())
            .filter(|&(_, n)| n > 0)
            .peekable();
        let jobs = !self.options.direct
            && spans.peek().is_some()
            && self.job_buffers.len() == self.memory.decode_threads
            && match self.options.reads {
                ReadPath::Readers => false,
                ReadPath::Jobs => true,
                ReadPath::Auto => telemetry::in_page_cache(&self.file, &self.container.path, spans),
            };
        if jobs {
            ReadPath::Jobs
        } else {
            ReadPath::Readers
        }
    }

    /// What [`Loader::with_container`] would plan for `c` and `options` in
    /// this process now, without allocating it (a budget too small is the
    /// same error).
    pub fn memory_plan(c: &Container, options: &LoadOptions) -> Result<MemoryPlan> {
        let baseline_rss = telemetry::rss_bytes().unwrap_or(0);
        plan(c, options, baseline_rss).map(|(_, m, _)| m)
    }

    /// The steps, in the order [`Loader::stream`] delivers them.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Bytes of the hot tier (as read: whole blocks with `O_DIRECT`).
    pub fn hot_bytes(&self) -> u64 {
        self.hot_len
    }

    /// Streams every step in order to `consume`. The first error (a read, a
    /// checksum, a decode, or the consumer's) stops the stream and is
    /// returned; no step is delivered after it (a read error of a later
    /// step also stops the one being decoded).
    pub fn stream(
        &mut self,
        mut consume: impl FnMut(&mut LoadedStep) -> Result<()>,
    ) -> Result<StreamReport> {
        let wall = Instant::now();
        let mut spare = std::mem::take(&mut self.spare);
        let this = &*self;
        let path = &this.container.path;
        let first_pass = !this.hot_loaded;
        let clock = ReadClock::default();
        let timers = Timers::default();
        let mut consume_ns = 0u64;
        let mut caller_jobs = 0usize;
        let ring = Ring::new(
            this.memory.pool_buffer_bytes,
            this.memory.pool_buffers as u64,
        );
        let step_bytes: Vec<u64> = this.steps.iter().map(|s| s.read_bytes).collect();
        let (tx, rx) = mpsc::channel::<Msg>();
        let mut delivered = (0u64, 0usize);
        let read_path = this.read_path();
        let reads = this.reads(first_pass, read_path);
        let order = ReadOrder::default();
        let result = std::thread::scope(|scope| -> Result<()> {
            // The reads of the whole pass, in the order the steps need
            // them: each step's part of the hot tier (first pass only; the
            // hot tier stays resident) in turns with its streamed sections. The
            // reader threads take them in turn, so that the disk always has
            // the next requests queued while a reader waits for the CPU, and
            // announce them in order. (One reader for the hot tier front to
            // back beside one for the streamed sections split the disk
            // between bytes needed now and bytes needed only at the last
            // layer: the first step waited on both.)
            let (reads, order, ring, step_bytes, clock) =
                (&reads, &order, &ring, &step_bytes, &clock);
            for _ in 0..READERS {
                let tx = tx.clone();
                scope.spawn(move || {
                    // A reader that panics stops the others; its sender
                    // goes with it and its read is never announced, so the
                    // consumer's `recv` fails once the others are gone.
                    let _stop = order.stop_on_panic(ring);
                    while let Some((t, slot)) = order.take(reads, ring, step_bytes) {
                        let msg = match reads[t] {
                            Read::Hot { a, b } => {
                                let at = (a - this.hot_at) as usize;
                                // SAFETY: each hot range is read once, by
                                // one reader, and is readable only after
                                // its message, sent once it is read.
                                let buf = unsafe { this.hot.fill(at, at + (b - a) as usize) };
                                clock
                                    .time(|| {
                                        read_into(&this.file, path, a, buf, || "hot tier".into())
                                    })
                                    .map(|()| Msg::Hot(b))
                            }
                            Read::Streamed {
                                step,
                                offset,
                                at,
                                len,
                            } => {
                                let k = slot.expect("a streamed read has its region");
                                let (a, b) = (k + at as usize, k + (at + len) as usize);
                                // SAFETY: the region at `k` was handed out
                                // for this step and nothing else uses it
                                // until the step is given back; its ranges
                                // are read once each and announced once read.
                                let buf = unsafe { this.pool.fill(a, b) };
                                let what = || format!("step {}", this.steps[step].name);
                                clock
                                    .time(|| read_into(&this.file, path, offset, buf, what))
                                    .map(|()| Msg::Streamed {
                                        step,
                                        slot: k,
                                        upto: (at + len) as usize,
                                    })
                            }
                            Read::StepEnd { step } => Ok(Msg::StepRead { step, slot }),
                        };
                        let failed = msg.is_err();
                        if !order.announce(t, msg.unwrap_or_else(Msg::Failed), &tx) || failed {
                            return;
                        }
                    }
                });
            }
            // Only the readers hold senders: when they are all gone, the
            // consumer's `recv` fails instead of waiting forever.
            drop(tx);
            // The channel moves in here, and the pool closes with this
            // scope, so that an early return stops the readers instead of
            // leaving them waiting forever.
            let rx = rx;
            let _closed = ring.closer();
            let mut deferred: Vec<Msg> = Vec::new();
            let mut hot_upto = if first_pass {
                this.hot_at
            } else {
                this.hot_at + this.hot_len
            };
            for (i, step) in this.steps.iter().enumerate() {
                let mut loaded = this.layout(step, &mut spare);
                let jobs = this.jobs(step, &mut loaded, read_path);
                let failed = Mutex::new(None::<(usize, Error)>);
                let mut slot = None;
                let mut streamed_upto = 0usize;
                let mut done = false;
                // Jobs by when their streamed bytes are in, then (a heap) by
                // when their hot bytes are: each job is looked at a bounded
                // number of times, whatever the number of pieces.
                let mut jobs = jobs;
                jobs.sort_by_key(|j| std::cmp::Reverse(j.streamed_end));
                let mut by_hot: std::collections::BinaryHeap<ByHot> = Default::default();
                // Messages of this step that arrived while the previous
                // one was finishing.
                let mut early = std::mem::take(&mut deferred).into_iter();
                // Ready jobs go to a queue that every decode thread serves
                // for the whole step (a broadcast task each): jobs spawned
                // one by one from this thread were taken by one worker
                // while the other slept, so steps of 20 chunks ran on one
                // core.
                let queue = JobQueue::default();
                // How far the hot tier is read once this step is (first pass).
                let hot_goal = if first_pass {
                    align_up(step.hot_end).min(this.hot_at + this.hot_len)
                } else {
                    0
                };
                this.decoders.in_place_scope(|s| -> Result<()> {
                    let _closed = queue.closer();
                    let (queue, failed, timers) = (&queue, &failed, &timers);
                    let run = move |(job, slot): QueuedJob, own| {
                        let order = job.order;
                        let r = this.run_job(step, job, slot, first_pass, timers, own);
                        if let Err(e) = r {
                            let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                            if f.as_ref().is_none_or(|(k, _)| order < *k) {
                                *f = Some((order, e));
                            }
                        }
                    };
                    s.spawn_broadcast(move |_, ctx| {
                        // Where this thread reads its jobs' streamed bytes.
                        let own = (read_path == ReadPath::Jobs).then(|| (ctx.index(), clock));
                        while let Some(queued) = queue.next() {
                            run(queued, own);
                        }
                    });
                    // This thread decodes too whenever no message waits
                    // (with the readers reading: a job of the other read
                    // path reads into its decode thread's own buffer). A
                    // decode thread woken for new jobs was often queued
                    // behind the other one on the same CPU while this
                    // thread slept on the second: whole steps ran on one
                    // thread (a per-job trace of cold MiniLM passes).
                    let help = read_path != ReadPath::Jobs;
                    // (Early messages of later steps are passed on in order.)
                    while !(done && jobs.is_empty() && by_hot.is_empty()) || early.len() > 0 {
                        let msg = match early.next() {
                            Some(m) => Ok(m),
                            None => match rx.try_recv() {
                                Ok(m) => Ok(m),
                                Err(mpsc::TryRecvError::Disconnected) => Err(mpsc::RecvError),
                                Err(mpsc::TryRecvError::Empty) => {
                                    if let Some(queued) = help.then(|| queue.try_next()).flatten() {
                                        run(queued, None);
                                        caller_jobs += 1;
                                        continue;
                                    }
                                    rx.recv()
                                }
                            },
                        };
                        match msg {
                            Ok(Msg::Hot(upto)) => hot_upto = upto,
                            Ok(m @ (Msg::Streamed { .. } | Msg::StepRead { .. }))
                                if m.step() != i =>
                            {
                                deferred.push(m)
                            }
                            Ok(Msg::Streamed { slot: k, upto, .. }) => {
                                slot = Some(k);
                                streamed_upto = upto;
                            }
                            Ok(Msg::StepRead { slot: k, .. }) => {
                                slot = slot.or(k);
                                done = true;
                            }
                            Ok(Msg::Failed(e)) => return Err(e),
                            Err(_) => {
                                return Err(Error::integrity(path, "the reader stopped early"))
                            }
                        }
                        while jobs.last().is_some_and(|j| j.streamed_end <= streamed_upto) {
                            by_hot.push(ByHot(jobs.pop().expect("checked")));
                        }
                        let mut now = Vec::new();
                        while by_hot.peek().is_some_and(|j| j.0.hot_end <= hot_upto) {
                            now.push(by_hot.pop().expect("checked").0);
                        }
                        // Reads are announced in order, so once the step's
                        // end is in, so is its part of the hot tier.
                        let all_read = done && hot_upto >= hot_goal;
                        if all_read && !(jobs.is_empty() && by_hot.is_empty()) {
                            return Err(Error::integrity(
                                path,
                                format!("step {}: chunks outside what was read", step.name),
                            ));
                        }
                        queue.push(now.into_iter().map(|job| (job, slot)));
                    }
                    while let Some(queued) = help.then(|| queue.try_next()).flatten() {
                        run(queued, None);
                        caller_jobs += 1;
                    }
                    Ok(())
                })?;
                if let Some((_, e)) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    return Err(e);
                }
                delivered.0 += step.out_bytes;
                delivered.1 += loaded.tensors.len();
                let t = Instant::now();
                consume(&mut loaded)?;
                consume_ns += t.elapsed().as_nanos() as u64;
                spare = std::mem::take(&mut loaded.data);
                if let Some(k) = slot {
                    ring.give_back(k);
                }
            }
            // The part of the hot tier no step streamed (a loader of some
            // steps only) is read last: wait for it, so that the next pass
            // finds the whole hot tier resident.
            while first_pass && hot_upto < this.hot_at + this.hot_len {
                match rx.recv() {
                    Ok(Msg::Hot(upto)) => hot_upto = upto,
                    Ok(Msg::Failed(e)) => return Err(e),
                    Ok(_) => {}
                    Err(_) => return Err(Error::integrity(path, "the reader stopped early")),
                }
            }
            Ok(())
        });
        self.spare = spare;
        result?;
        self.hot_loaded = true;
        let s = |ns: u64| Duration::from_nanos(ns).as_secs_f64();
        let hot_bytes = if first_pass { self.hot_len } else { 0 };
        Ok(StreamReport {
            steps: self.steps.len(),
            tensors: delivered.1,
            read_bytes: hot_bytes + self.steps.iter().map(|s| s.read_bytes).sum::<u64>(),
            hot_bytes,
            delivered_bytes: delivered.0,
            wall_seconds: wall.elapsed().as_secs_f64(),
            stages: StageSeconds {
                read: clock.seconds(),
                checksum: s(timers.checksum.load(Relaxed)),
                decompress: s(timers.decompress.load(Relaxed)),
                reconstruct: s(timers.reconstruct.load(Relaxed)),
                consume: s(consume_ns),
            },
            decode_threads: self.decoders.current_num_threads(),
            caller_jobs,
            streamed_reads: read_path,
        })
    }

    /// A pass's reads in the order the steps need them: each step's part
    /// of the hot tier (on the first pass) in turns with its streamed
    /// sections, then its end; the rest of the hot tier (of steps not streamed)
    /// comes last. Ranges are pieces of at most [`PIECE_BYTES`], whole
    /// blocks with `O_DIRECT` (the hot range as read, and every section,
    /// starts on a block).
    fn reads(&self, first_pass: bool, path: ReadPath) -> Vec<Read> {
        let mut reads = Vec::new();
        let hot_end = self.hot_at + self.hot_len;
        let mut hot = self.hot_at;
        let mut hot_to = |reads: &mut Vec<Read>, to: u64| {
            while first_pass && hot < to {
                let b = (hot + PIECE_BYTES).min(to);
                reads.push(Read::Hot { a: hot, b });
                hot = b;
            }
        };
        for (i, step) in self.steps.iter().enumerate() {
            let mut hot_part = Vec::new();
            hot_to(&mut hot_part, align_up(step.hot_end).min(hot_end));
            let mut streamed = Vec::new();
            let mut at = 0u64;
            let spans = if path == ReadPath::Readers {
                &step.spans[..]
            } else {
                &[]
            };
            for &(offset, len) in spans {
                for (a, b) in pieces(len) {
                    streamed.push(Read::Streamed {
                        step: i,
                        offset: offset + a,
                        at: at + a,
                        len: b - a,
                    });
                }
                at += len;
            }
            // The step's hot pieces and streamed pieces interleaved, each
            // list as far along as the other: a chunk needs its hot bytes
            // and its residual, which lie in the same order in their
            // sections, so chunks become ready from the first pieces on
            // rather than once the step's whole hot part is in.
            let (nh, ns) = (hot_part.len(), streamed.len());
            let (mut hot_part, mut streamed) = (hot_part.into_iter(), streamed.into_iter());
            let (mut h, mut k) = (0, 0);
            while h < nh || k < ns {
                // Hot first on ties: h / nh <= k / ns.
                if k == ns || (h < nh && h * ns <= k * nh) {
                    reads.extend(hot_part.next());
                    h += 1;
                } else {
                    reads.extend(streamed.next());
                    k += 1;
                }
            }
            reads.push(Read::StepEnd { step: i });
        }
        hot_to(&mut reads, hot_end);
        small_tail(reads, TAIL_BYTES, TAIL_PIECE_BYTES)
    }

    /// How the decode threads store `step`'s values.
    fn stores(&self, step: &Step) -> Stores {
        stores_for(self.options.stores, step.out_bytes, self.past_cache_above)
    }

    /// Whether tensor `t` is delivered as its base blocks.
    fn blocks(&self, t: &tpde_format::Tensor) -> bool {
        self.options.base_blocks
            && self.options.fidelity == Fidelity::Base
            && matches!(t.storage, Storage::Decomposed { .. })
    }

    /// A step's output: one buffer (the spare one, grown as needed), the
    /// tensors in order, each on a cache line.
    fn layout(&self, step: &Step, spare: &mut Vec<u8>) -> LoadedStep {
        let m = &self.container.manifest;
        let n = step_buffer_bytes(step) as usize;
        // Every byte of a tensor is written by the decoders: a reused
        // buffer is not cleared, and a new one (the consumer kept the last)
        // comes zeroed from the allocator rather than filled here. A reused
        // buffer keeps its committed memory when it grows within its
        // capacity (a step larger than the one before, after a smaller
        // one: `resize` zeroes the new part, a fresh buffer would fault in
        // every page).
        let mut data = std::mem::take(spare);
        if data.capacity() < n {
            data = vec![0u8; n];
            advise_huge(&mut data);
        }
        data.resize(n, 0);
        // Each tensor starts on a cache line of the buffer as it lies in
        // memory, so that whole rows of values can be stored past the
        // cache (see `residual::base_values`); the bytes between tensors
        // are left as they were.
        let line = |at: usize| at + (data.as_ptr() as usize + at).wrapping_neg() % OUT_ALIGN;
        let mut at = line(0);
        let tensors: Vec<LoadedTensor> = step
            .tensors
            .iter()
            .map(|&ti| {
                let t = &m.tensors[ti];
                let blocks = self.blocks(t);
                let len: u64 = delivered_chunk_lens(&self.container, t, blocks)
                    .iter()
                    .sum();
                let range = at..at + len as usize;
                at = line(range.end);
                LoadedTensor {
                    index: ti,
                    name: t.name.clone(),
                    dtype: t.dtype.clone(),
                    shape: t.shape.clone(),
                    range,
                    base: if blocks { t.base_layout() } else { None },
                }
            })
            .collect();
        data.truncate(tensors.last().map_or(0, |t| t.range.end));
        LoadedStep {
            name: step.name.clone(),
            tensors,
            data,
        }
    }

    /// Every chunk of a step as a job, with what it waits for and where it writes.
    fn jobs<'a>(&self, step: &Step, loaded: &'a mut LoadedStep, path: ReadPath) -> Vec<Job<'a>> {
        let LoadedStep { tensors, data, .. } = loaded;
        let c = &self.container;
        let m = &c.manifest;
        // Where a streamed extent ends in the step's region of the pool.
        let streamed_end = |e: &Extent| -> Option<usize> {
            let mut at = 0u64;
            for &(offset, len) in &step.spans {
                if e.offset >= offset && e.end() <= offset + len {
                    return Some((at + e.end() - offset) as usize);
                }
                at += len;
            }
            None
        };
        let hot_end = self.hot_at + self.hot_len;
        let in_hot = |e: &Extent| e.offset >= self.hot_at && e.end() <= hot_end;
        let mut jobs = Vec::new();
        let mut rest = &mut data[..];
        let mut at = 0;
        for t in tensors.iter() {
            // Skip to the tensor's start (it starts on a cache line).
            rest = &mut std::mem::take(&mut rest)[t.range.start - at..];
            at = t.range.end;
            let tensor = &m.tensors[t.index];
            let blocks = self.blocks(tensor);
            for (ci, len) in delivered_chunk_lens(c, tensor, blocks)
                .into_iter()
                .enumerate()
            {
                let (out, tail) = std::mem::take(&mut rest).split_at_mut(len as usize);
                rest = tail;
                let (hot, cold) = job_extents(tensor, ci, self.options.fidelity);
                let mut job = Job {
                    order: jobs.len(),
                    ti: t.index,
                    ci,
                    out,
                    hot_end: 0,
                    streamed_end: 0,
                };
                for e in std::iter::once(hot).chain(cold) {
                    if in_hot(&e) {
                        job.hot_end = job.hot_end.max(e.end());
                    } else if let Some(end) = streamed_end(&e) {
                        // (Read by the job itself: ready as soon as its hot bytes are.)
                        if path == ReadPath::Readers {
                            job.streamed_end = job.streamed_end.max(end);
                        }
                    } else {
                        // Not read for this step: never ready, reported by `stream`.
                        job.streamed_end = usize::MAX;
                    }
                }
                jobs.push(job);
            }
        }
        jobs
    }

    /// Checks, decompresses and reconstructs one chunk into its place.
    fn run_job(
        &self,
        step: &Step,
        job: Job,
        slot: Option<usize>,
        check_hot: bool,
        timers: &Timers,
        own: Option<(usize, &ReadClock)>,
    ) -> Result<()> {
        let c = &self.container;
        let Job { ti, ci, out, .. } = job;
        let t = &c.manifest.tensors[ti];
        let who = || format!("tensor {:?} chunk {ci}", t.name);
        let hot_end = self.hot_at + self.hot_len;
        // With `own` (`ReadPath::Jobs`): this thread's own read buffer, and
        // how much of it this job has filled.
        let region = own.and_then(|(i, _)| self.job_buffers.get(i));
        let used = std::cell::Cell::new(0usize);
        // An extent's bytes, checked (resident hot bytes only on the first pass).
        let get = |e: &Extent, what: &str| -> Result<&[u8]> {
            let (b, check) = if e.offset >= self.hot_at && e.end() <= hot_end {
                let a = (e.offset - self.hot_at) as usize;
                // SAFETY: the job became ready after the hot buffer was filled
                // past this extent, and the hot buffer is not written again
                // during this pass.
                (unsafe { self.hot.filled(a, a + e.len as usize) }, check_hot)
            } else {
                let mut at = 0u64;
                let mut found = None;
                for &(offset, len) in &step.spans {
                    if e.offset >= offset && e.end() <= offset + len {
                        found = Some((at + e.offset - offset) as usize);
                        break;
                    }
                    at += len;
                }
                if let (Some(_), Some(buf), Some((_, clock))) = (found, region, own) {
                    let (a, b) = (used.get(), used.get() + e.len as usize);
                    if b > buf.len {
                        return Err(Error::integrity(
                            &c.path,
                            format!("{}{what}: larger than planned", who()),
                        ));
                    }
                    used.set(b);
                    // SAFETY: this buffer belongs to this decode thread (by
                    // its index in `decoders`), which runs one job at a
                    // time, and each job hands out disjoint parts of it.
                    let bytes = unsafe { buf.fill(a, b) };
                    let what = || format!("{}{what}", who());
                    clock.time(|| read_into(&self.file, &c.path, e.offset, bytes, what))?;
                    (&*bytes, true)
                } else {
                    let (Some(a), Some(k)) = (found, slot) else {
                        return Err(Error::integrity(
                            &c.path,
                            format!("{}{what}: not read", who()),
                        ));
                    };
                    // SAFETY: the job became ready after this part of the
                    // step's region of the pool was filled, and the region is
                    // given back only after the step's jobs are done.
                    (
                        unsafe { self.pool.filled(k + a, k + a + e.len as usize) },
                        true,
                    )
                }
            };
            if check {
                let t0 = Instant::now();
                let ok = xxh3(b) == e.xxh3;
                timers.add(&timers.checksum, t0);
                if !ok {
                    return Err(Error::integrity(
                        &c.path,
                        format!(
                            "{}{what}: checksum mismatch (xxh3 of bytes {}..{})",
                            who(),
                            e.offset,
                            e.end()
                        ),
                    ));
                }
            }
            Ok(b)
        };
        match &t.storage {
            Storage::Raw { chunks } => {
                let b = get(&chunks[ci], "")?;
                let t0 = Instant::now();
                out.copy_from_slice(b);
                timers.add(&timers.reconstruct, t0);
            }
            Storage::Decomposed {
                chunks,
                residual: kind,
                ..
            } => {
                let ch = &chunks[ci];
                let dtype = FloatDtype::from_name(&t.dtype).expect("validated");
                let layout = t.base_layout().expect("decomposed");
                let kind = residual::Kind::from_name(kind).expect("validated");
                let base = get(&ch.base, " (hot base)")?;
                let bad = |e| Error::integrity(&c.path, format!("{}: {e}", who()));
                if self.blocks(t) {
                    let t0 = Instant::now();
                    out.copy_from_slice(base);
                    timers.add(&timers.reconstruct, t0);
                } else if self.options.fidelity == Fidelity::Exact {
                    let cold = get(&ch.cold, " (cold residual)")?;
                    let stores = self.stores(step);
                    let (z, g) =
                        residual::decode_timed(dtype, &layout, base, cold, out, kind, stores)
                            .map_err(bad)?;
                    timers.decompress.fetch_add(z.as_nanos() as u64, Relaxed);
                    timers.reconstruct.fetch_add(g.as_nanos() as u64, Relaxed);
                } else {
                    let t0 = Instant::now();
                    residual::base_values_with(dtype, &layout, base, out, self.stores(step))
                        .map_err(bad)?;
                    timers.add(&timers.reconstruct, t0);
                }
            }
        }
        Ok(())
    }
}

/// The steps, the memory plan and the resident hot range (as read) of
/// `c` streamed with `options` by a process of `baseline_rss` bytes; a
/// budget too small is an error.
fn plan(
    c: &Container,
    options: &LoadOptions,
    baseline_rss: u64,
) -> Result<(Vec<Step>, MemoryPlan, (u64, u64))> {
    let path = &c.path;
    let direct = options.direct;
    let span = |offset: u64, len: u64| {
        if direct {
            let a = align_down(offset);
            (a, align_up(offset + len) - a)
        } else {
            (offset, len)
        }
    };
    let m = &c.manifest;
    let hot_section = m.sections.iter().find(|s| s.kind == SectionKind::Hot);
    let hot_range = hot_section.map_or((0, 0), |s| (s.offset, s.len));
    let steps = plan_steps(c, options, &span, hot_range);
    // What stays resident: the hot section as read, or nothing.
    let (hot_at, hot_len) = match hot_section {
        Some(s) if options.hot_resident => span(s.offset, s.len),
        _ => (0, 0),
    };
    let slot = steps.iter().map(|s| s.read_bytes).max().unwrap_or(0);
    let out = steps.iter().map(step_buffer_bytes).max().unwrap_or(0);
    let threads = rayon::current_num_threads();
    // Exact fidelity: the residual's planes (as many bytes as the chunk),
    // and the high nibbles of a split stream (at most a quarter of them: a
    // plane holds one byte per element, and elements are 2 bytes or more).
    // A buffer for the chunks a job reads itself (`ReadPath::Jobs`).
    let job_bytes = if direct {
        0
    } else {
        largest_streamed_job(c, options, &steps, (hot_at, hot_len))
    };
    let per_thread = PER_THREAD_BYTES
        + job_bytes
        + match options.fidelity {
            Fidelity::Exact => {
                let largest = largest_decomposed_chunk(c);
                largest + largest.div_ceil(4)
            }
            Fidelity::Base => 0,
        };
    // The buffers the disk reads into, in whole huge pages.
    let hot_buf = whole_huge_pages(hot_len);
    let pool = |n: u64| whole_huge_pages(n * slot);
    // The decode threads and the calling thread, which decodes too.
    let fixed = baseline_rss + hot_buf + out + (threads as u64 + 1) * per_thread;
    let need = |n: u64| fixed + pool(n);
    // A count from the command line may be anything: at most one segment
    // more than there are steps (more would never be used).
    let mut buffers = options.prefetch.clamp(1, steps.len() + 1);
    if let Some(budget) = options.ram_budget {
        if baseline_rss + hot_buf > budget {
            return Err(Error::input(
                path,
                format!(
                    "memory budget of {budget} bytes cannot hold the hot tier ({hot_buf} bytes \
                     in memory) besides the process itself ({baseline_rss} bytes resident)"
                ),
            ));
        }
        while buffers > 1 && need(buffers as u64) > budget {
            buffers -= 1;
        }
        if need(buffers as u64) > budget {
            return Err(Error::input(
                path,
                format!(
                    "memory budget of {budget} bytes is too small to stream: it needs {} bytes \
                     (process {baseline_rss}, hot tier {hot_buf}, one read buffer {}, \
                     the largest step's tensors {out}, {threads} decode threads and the \
                     calling thread × {per_thread})",
                    need(1),
                    pool(1)
                ),
            ));
        }
    }
    let memory = MemoryPlan {
        baseline_rss,
        hot: hot_len,
        pool_buffers: buffers,
        pool_buffer_bytes: slot,
        output_bytes: out,
        decode_threads: threads,
        per_thread_bytes: per_thread,
        job_read_bytes: job_bytes,
        huge_page_slack: hot_buf - hot_len + pool(buffers as u64) - buffers as u64 * slot,
        total: need(buffers as u64),
    };
    Ok((steps, memory, (hot_at, hot_len)))
}

/// How a step of `bytes` bytes of values is stored under `mode`, where
/// [`StepStores::BySize`] stores past the cache above `by_size` bytes.
fn stores_for(mode: StepStores, bytes: u64, by_size: u64) -> Stores {
    let above = match mode {
        StepStores::Cached => return Stores::Cached,
        StepStores::PastCache => return Stores::PastCache,
        StepStores::BySize => by_size,
        StepStores::Above(n) => n,
    };
    if bytes > above {
        Stores::PastCache
    } else {
        Stores::Cached
    }
}

/// Where each delivered tensor starts in memory: a multiple of this.
const OUT_ALIGN: usize = 64;

/// The buffer a step's tensors need: their bytes, and room to start each
/// on an [`OUT_ALIGN`] boundary wherever the buffer lies.
fn step_buffer_bytes(step: &Step) -> u64 {
    step.out_bytes + (OUT_ALIGN as u64 - 1) * (step.tensors.len() as u64 + 1)
}

/// A job ordered for a min-heap on `hot_end`.
struct ByHot<'a>(Job<'a>);

impl PartialEq for ByHot<'_> {
    fn eq(&self, o: &Self) -> bool {
        self.0.hot_end == o.0.hot_end
    }
}
impl Eq for ByHot<'_> {}
impl PartialOrd for ByHot<'_> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for ByHot<'_> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.hot_end.cmp(&self.0.hot_end)
    }
}

/// One chunk to rebuild.
struct Job<'a> {
    /// Position in the step (the first failing job's error is reported).
    order: usize,
    ti: usize,
    ci: usize,
    out: &'a mut [u8],
    /// Ready when the hot buffer is filled to this file offset…
    hot_end: u64,
    /// …and the step's region of the pool to this offset.
    streamed_end: usize,
}

impl Msg {
    /// The step a streamed-section message is about.
    fn step(&self) -> usize {
        match self {
            Msg::Streamed { step, .. } | Msg::StepRead { step, .. } => *step,
            _ => usize::MAX,
        }
    }
}

/// The ready jobs of a step, served by every decode thread until the step
/// has handed out its last job (or failed: the queue is closed when the
/// step's dispatch ends, however it ends).
#[derive(Default)]
struct JobQueue<'a> {
    /// The jobs (each with its step's pool region), and whether the step
    /// has handed out its last one.
    state: Mutex<(std::collections::VecDeque<QueuedJob<'a>>, bool)>,
    ready: std::sync::Condvar,
}

/// A ready job and the pool region of its step.
type QueuedJob<'a> = (Job<'a>, Option<usize>);

impl<'a> JobQueue<'a> {
    fn push(&self, jobs: impl Iterator<Item = QueuedJob<'a>>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = st.0.len();
        st.0.extend(jobs);
        let added = st.0.len() - before;
        drop(st);
        match added {
            0 => {}
            1 => self.ready.notify_one(),
            _ => self.ready.notify_all(),
        }
    }

    /// The next job if one is queued, without waiting.
    fn try_next(&self) -> Option<QueuedJob<'a>> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .pop_front()
    }

    /// The next job; `None` once the queue is closed and empty.
    fn next(&self) -> Option<QueuedJob<'a>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(j) = st.0.pop_front() {
                return Some(j);
            }
            if st.1 {
                return None;
            }
            st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Closes the queue when dropped: the decode threads finish what is in
    /// it and return.
    fn closer(&self) -> QueueCloser<'_, 'a> {
        QueueCloser(self)
    }
}

struct QueueCloser<'q, 'a>(&'q JobQueue<'a>);

impl Drop for QueueCloser<'_, '_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.0.ready.notify_all();
    }
}

/// Wall time during which at least one read was in flight.
#[derive(Default)]
struct ReadClock {
    state: Mutex<(u32, Option<Instant>, Duration)>,
}

impl ReadClock {
    fn time<T>(&self, read: impl FnOnce() -> T) -> T {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.0 == 0 {
                s.1 = Some(Instant::now());
            }
            s.0 += 1;
        }
        let r = read();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 -= 1;
        if s.0 == 0 {
            if let Some(t) = s.1.take() {
                s.2 += t.elapsed();
            }
        }
        r
    }

    fn seconds(&self) -> f64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .2
            .as_secs_f64()
    }
}

/// Busy nanoseconds of the decode stages, summed over threads.
#[derive(Default)]
struct Timers {
    checksum: AtomicU64,
    decompress: AtomicU64,
    reconstruct: AtomicU64,
}

impl Timers {
    fn add(&self, to: &AtomicU64, since: Instant) {
        to.fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
    }
}

/// The section holding byte `offset`, by binary search.
fn section_at(sections: &[Section], offset: u64) -> Option<usize> {
    let i = sections.partition_point(|s| s.offset <= offset);
    (i > 0 && offset < sections[i - 1].offset + sections[i - 1].len).then(|| i - 1)
}

/// Execution steps from the manifest's tensor order (execution order, as
/// tpde's writer lays it out): tensors before the first layer are `pre`,
/// each layer's tensors one step, the rest `post`. (A manifest that
/// interleaves them gets more steps, with repeated names; every tensor is
/// still delivered once.) Each step reads the sections that hold its
/// streamed extents: cold sections (exact fidelity) and expert shards (their
/// hot part only at base fidelity), and, when the hot tier is not resident,
/// the range of the hot section that holds its hot extents; `span` maps a
/// range to what is read (whole blocks with `O_DIRECT`). Without
/// `stream_experts`, tensors held in expert shards are left out.
fn plan_steps(
    c: &Container,
    options: &LoadOptions,
    span: &dyn Fn(u64, u64) -> (u64, u64),
    (hot_at, hot_len): (u64, u64),
) -> Vec<Step> {
    let fidelity = options.fidelity;
    let m = &c.manifest;
    // Per step: the step, its streamed sections, the end of its hot
    // extents, and the range of them (for a hot tier that is not resident).
    type Planned = (Step, Vec<usize>, u64, (u64, u64));
    let mut steps: Vec<Planned> = Vec::new();
    let mut seen_layer = false;
    let in_hot = |e: &Extent| e.offset >= hot_at && e.end() <= hot_at + hot_len;
    let in_shard = |e: &Extent| {
        section_at(&m.sections, e.offset)
            .is_some_and(|si| m.sections[si].kind == SectionKind::Expert)
    };
    for (ti, t) in m.tensors.iter().enumerate() {
        if !options.stream_experts {
            let first = match &t.storage {
                Storage::Raw { chunks } => chunks.first().copied(),
                Storage::Decomposed { chunks, .. } => chunks.first().map(|c| c.base),
            };
            if first.is_some_and(|e| in_shard(&e)) {
                continue;
            }
        }
        let name = match t.layer {
            Some(l) => {
                seen_layer = true;
                format!("layer.{l}")
            }
            None if !seen_layer => "pre".to_string(),
            None => "post".to_string(),
        };
        if steps.last().map(|(s, ..)| &s.name) != Some(&name) {
            steps.push((
                Step {
                    name,
                    tensors: Vec::new(),
                    hot_end: 0,
                    spans: Vec::new(),
                    read_bytes: 0,
                    original_bytes: 0,
                    out_bytes: 0,
                },
                Vec::new(),
                0,
                (u64::MAX, 0),
            ));
        }
        let (step, sections, hot_end, hot_range) = steps.last_mut().expect("pushed");
        step.tensors.push(ti);
        step.original_bytes += t.byte_len;
        let blocks = options.base_blocks && options.fidelity == Fidelity::Base;
        step.out_bytes += delivered_chunk_lens(c, t, blocks).iter().sum::<u64>();
        let mut note = |e: &Extent, cold: bool| {
            if in_hot(e) {
                if options.hot_resident {
                    *hot_end = (*hot_end).max(e.end());
                } else if e.len > 0 {
                    hot_range.0 = hot_range.0.min(e.offset);
                    hot_range.1 = hot_range.1.max(e.end());
                }
            } else if let Some(si) = section_at(&m.sections, e.offset) {
                let kind = m.sections[si].kind;
                if kind == SectionKind::Expert || (cold && fidelity == Fidelity::Exact) {
                    sections.push(si);
                }
            }
        };
        match &t.storage {
            Storage::Raw { chunks } => chunks.iter().for_each(|c| note(c, false)),
            Storage::Decomposed { chunks, .. } => {
                for ch in chunks {
                    note(&ch.base, false);
                    if fidelity == Fidelity::Exact {
                        note(&ch.cold, true);
                    }
                }
            }
        }
    }
    steps
        .into_iter()
        .filter(|(step, ..)| options.steps.contains(&step.name))
        .map(|(mut step, mut sections, hot_end, (lo, hi))| {
            step.hot_end = hot_end;
            if hi > lo {
                let (a, n) = span(lo, hi - lo);
                step.spans.push((a, n));
                step.read_bytes += n;
            }
            sections.sort_unstable();
            sections.dedup();
            for si in sections {
                let s = &m.sections[si];
                let len = match (s.kind, fidelity) {
                    (SectionKind::Expert, Fidelity::Base) => m
                        .experts
                        .iter()
                        .find(|x| x.section as usize == si)
                        .map_or(s.len, |x| x.hot_len),
                    _ => s.len,
                };
                if len > 0 {
                    let (a, n) = span(s.offset, len);
                    step.spans.push((a, n));
                    step.read_bytes += n;
                }
            }
            step
        })
        .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn steps_are_stored_past_the_cache_only_above_their_threshold() {
        use Stores::{Cached, PastCache};
        for (mode, bytes, want) in [
            (StepStores::BySize, 16, Cached),
            (StepStores::BySize, 17, PastCache),
            (StepStores::Above(100), 100, Cached),
            (StepStores::Above(100), 101, PastCache),
            (StepStores::Above(0), 1, PastCache),
            (StepStores::Cached, u64::MAX, Cached),
            (StepStores::PastCache, 0, PastCache),
        ] {
            assert_eq!(stores_for(mode, bytes, 16), want, "{mode:?} {bytes}");
        }
    }
    use super::{small_tail, stores_for, Msg, Read, ReadOrder, Ring, StepStores, Stores};

    #[test]
    fn reads_finished_out_of_order_are_announced_in_order_without_waiting() {
        let (tx, rx) = std::sync::mpsc::channel();
        let order = ReadOrder::default();
        let got = |rx: &std::sync::mpsc::Receiver<Msg>| -> Vec<u64> {
            rx.try_iter()
                .map(|m| match m {
                    Msg::Hot(b) => b,
                    Msg::Failed(_) => u64::MAX,
                    _ => unreachable!("only these are sent here"),
                })
                .collect()
        };
        // Read 2 finishes first: held, and its reader is free at once.
        assert!(order.announce(2, Msg::Hot(30), &tx));
        assert!(got(&rx).is_empty());
        assert!(order.announce(0, Msg::Hot(10), &tx));
        assert_eq!(got(&rx), [10]);
        // Read 1 lets 2 out behind it.
        assert!(order.announce(1, Msg::Hot(20), &tx));
        assert_eq!(got(&rx), [20, 30]);
        // A failure held behind an earlier read is sent in its turn, and
        // stops the readers: what came after it is not sent.
        let e = tpde_pack::Error::integrity(std::path::Path::new("c.tpde"), "cut");
        assert!(order.announce(4, Msg::Failed(e), &tx));
        assert!(order.announce(5, Msg::Hot(60), &tx));
        assert!(!order.announce(3, Msg::Hot(40), &tx));
        assert_eq!(got(&rx), [40, u64::MAX]);
        assert!(!order.announce(6, Msg::Hot(70), &tx));
        assert!(got(&rx).is_empty());
    }

    #[test]
    fn only_the_reads_ending_in_the_tail_are_cut_and_the_pieces_tile_them() {
        let reads = vec![
            Read::Hot { a: 0, b: 1000 },
            Read::Streamed {
                step: 0,
                offset: 5000,
                at: 0,
                len: 1000,
            },
            Read::StepEnd { step: 0 },
            Read::Hot { a: 1000, b: 1250 },
            Read::Streamed {
                step: 1,
                offset: 9000,
                at: 0,
                len: 900,
            },
            Read::StepEnd { step: 1 },
        ];
        // 3150 bytes in all; the last 1100 are the tail, from 2050 on: the
        // reads ending in it are the last two with bytes (the 1000-byte
        // streamed read ends at 2000, before it).
        let cut = small_tail(reads.clone(), 1100, 400);
        assert_eq!(&cut[..3], &reads[..3]);
        assert_eq!(
            &cut[3..],
            &[
                // 250 bytes: no larger than a piece, left whole.
                Read::Hot { a: 1000, b: 1250 },
                Read::Streamed {
                    step: 1,
                    offset: 9000,
                    at: 0,
                    len: 400
                },
                Read::Streamed {
                    step: 1,
                    offset: 9400,
                    at: 400,
                    len: 400
                },
                Read::Streamed {
                    step: 1,
                    offset: 9800,
                    at: 800,
                    len: 100
                },
                Read::StepEnd { step: 1 },
            ]
        );
        // A tail larger than the pass cuts every read; none cuts nothing.
        let all = small_tail(reads.clone(), u64::MAX, 500);
        assert_eq!(all.len(), reads.len() + 3);
        assert_eq!(small_tail(reads.clone(), 0, 400), reads);
    }

    #[test]
    fn tail_pieces_of_block_aligned_reads_stay_on_blocks() {
        // As with O_DIRECT: every read starts on a block; only the last
        // read of a section or of the hot tier may end off one.
        const B: u64 = 4096;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        for _ in 0..50 {
            let mut reads = Vec::new();
            let (mut hot, mut off) = (0u64, 1 << 30);
            for step in 0..1 + next(6) as usize {
                for _ in 0..next(4) {
                    let n = (1 + next(300)) * B - if next(3) == 0 { next(B) } else { 0 };
                    reads.push(Read::Hot { a: hot, b: hot + n });
                    hot = (hot + n).next_multiple_of(B);
                    let len = (1 + next(300)) * B - if next(3) == 0 { next(B) } else { 0 };
                    reads.push(Read::Streamed {
                        step,
                        offset: off,
                        at: 0,
                        len,
                    });
                    off = (off + len).next_multiple_of(B);
                }
                reads.push(Read::StepEnd { step });
            }
            let cut = small_tail(reads.clone(), (1 + next(4)) << 20, 256 << 10);
            let ends: Vec<u64> = reads
                .iter()
                .filter_map(|r| match *r {
                    Read::Hot { b, .. } => Some(b),
                    Read::Streamed { offset, len, .. } => Some(offset + len),
                    Read::StepEnd { .. } => None,
                })
                .collect();
            for r in &cut {
                let (a, b) = match *r {
                    Read::Hot { a, b } => (a, b),
                    Read::Streamed { offset, len, .. } => (offset, offset + len),
                    Read::StepEnd { .. } => continue,
                };
                assert_eq!(a % B, 0, "{r:?} starts off a block");
                assert!(b % B == 0 || ends.contains(&b), "{r:?} ends off a block");
            }
        }
    }

    #[test]
    fn the_read_pool_hands_out_regions_in_turn_and_wraps() {
        // Two segments of 100.
        let r = Ring::new(100, 2);
        let fit = |n| r.state.lock().unwrap().fit(n);
        assert_eq!(r.take(50), Some(0));
        // Too large for what is left of segment 0: the start of segment 1.
        assert_eq!(r.take(100), Some(100));
        // Neither segment has room for 60 until segment 0 is wholly back.
        assert_eq!(fit(60), None);
        r.give_back(0);
        assert_eq!(r.take(60), Some(0), "as with one buffer per step");
        // Small steps pack into a segment behind the newest region.
        assert_eq!(r.take(30), Some(60));
        assert_eq!(fit(11), None);
        assert_eq!(r.take(10), Some(90));
        r.give_back(100);
        r.give_back(0);
        r.give_back(60);
        // Segment 0 is still held (by the region at 90): segment 1 is next.
        assert_eq!(r.take(100), Some(100));
        r.give_back(90);
        r.give_back(100);
        assert_eq!(r.take(101), None, "more than a segment holds");
        // Empty: from the start.
        assert_eq!(r.take(1), Some(0));
    }

    #[test]
    fn regions_never_overlap_and_fewer_than_all_segments_held_always_leave_room() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (seg, segs) in [(1u64, 1u64), (7, 1), (9, 2), (64, 3), (100, 4)] {
            let r = Ring::new(seg, segs);
            for _ in 0..20_000 {
                let held = r.state.lock().unwrap().held.clone();
                // Give the oldest back half the time (always when full).
                let n = 1 + next() % seg;
                let fits = r.state.lock().unwrap().fit(n);
                if (held.len() as u64) < segs {
                    assert!(fits.is_some(), "{seg}×{segs}: room with {held:?} for {n}");
                }
                if fits.is_none() || next() % 2 == 0 {
                    if let Some(&(at, _)) = held.front() {
                        r.give_back(at as usize);
                    }
                    continue;
                }
                let at = r.take(n).expect("fits");
                assert_eq!(Some(at), fits);
                assert_eq!(at / seg, (at + n - 1) / seg, "inside one segment");
                assert!(at + n <= seg * segs, "inside the pool");
                for &(a, m) in &held {
                    assert!(at + n <= a || a + m <= at, "{at}+{n} overlaps {a}+{m}");
                }
            }
        }
    }

    #[test]
    fn a_reader_waiting_for_room_stops_when_the_pool_closes() {
        let r = Ring::new(10, 1);
        assert_eq!(r.take(8), Some(0));
        std::thread::scope(|s| {
            let waiting = s.spawn(|| r.take(8));
            std::thread::sleep(std::time::Duration::from_millis(20));
            r.close();
            assert_eq!(waiting.join().unwrap(), None);
        });
        // And one that gets room once the consumer gives some back.
        let r = Ring::new(10, 1);
        assert_eq!(r.take(8), Some(0));
        std::thread::scope(|s| {
            let waiting = s.spawn(|| r.take(8));
            std::thread::sleep(std::time::Duration::from_millis(20));
            r.give_back(0);
            assert_eq!(waiting.join().unwrap(), Some(0));
        });
    }
}
