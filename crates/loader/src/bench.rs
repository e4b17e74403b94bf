//! `tpde bench --stream-only`: the loader over the whole model, as a
//! consumer would, against the raw sequential read of the same file in the
//! same run, with disk counters, memory and the audit trail.

use crate::stream::{LoadOptions, Loader, MemoryPlan, StageSeconds, StreamReport};
use crate::telemetry;
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Instant, SystemTime};
use tpde_pack::container::AlignedBuf;
use tpde_pack::{Error, Fidelity, Result};

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub load: LoadOptions,
    /// Drop the container from the page cache before each timed read
    /// (`posix_fadvise(DONTNEED)`); `false`: measure warm.
    pub cold: bool,
    /// Passes; each figure is reported as the median over passes.
    pub reps: usize,
    /// The command line, for the audit trail.
    pub argv: Vec<String>,
}

/// Raw sequential reads of the whole container file, GB/s (1e9 bytes/s).
#[derive(Clone, Debug, Serialize)]
pub struct RawRead {
    pub buffered_gbps: f64,
    /// `None` where the file system refuses `O_DIRECT`.
    pub direct_gbps: Option<f64>,
}

/// One pass: the raw reads, then the loader.
#[derive(Clone, Debug, Serialize)]
pub struct Pass {
    pub raw: RawRead,
    /// Opening: header, manifest, validation, planning, and committing the
    /// planned memory (not part of the stream's time).
    pub open_seconds: f64,
    /// The first pass: the hot tier is read as it streams.
    pub stream: StreamReport,
    pub disk: Option<telemetry::DiskCounters>,
}

/// Everything `--json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub results: Results,
    pub passes: Vec<Pass>,
    pub audit: serde_json::Value,
}

/// The headline figures (medians over passes).
#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub fidelity: &'static str,
    pub direct: bool,
    /// `cold (O_DIRECT)`, `cold (posix_fadvise DONTNEED before each read)` or `warm`.
    pub page_cache: String,
    /// Who read the streamed sections ([`crate::ReadPath`]): `readers`,
    /// `jobs`, `readers and jobs` when the passes differed, or `nothing
    /// streamed` (base fidelity without expert shards: only the hot tier).
    pub streamed_reads: String,
    pub container_bytes: u64,
    pub original_bytes: u64,
    /// Hot tier plus every streamed section, per pass.
    pub bytes_read: u64,
    /// The raw read the figures compare with, made the way the loader
    /// reads: `O_DIRECT` with `--direct`, otherwise buffered (cold unless
    /// `--warm`). One reader, 8 MiB requests, one at a time; the loader
    /// keeps two reads in flight, so on a disk that rewards queue depth the
    /// ratios below can exceed 1.
    pub raw_read_gbps: f64,
    pub raw_buffered_gbps: f64,
    pub raw_direct_gbps: Option<f64>,
    /// Bytes read ÷ the time the loader spent reading them.
    pub container_read_gbps: f64,
    /// Original bytes delivered ÷ the stream's wall time (from the first
    /// read of the hot tier to the last step delivered).
    pub effective_gbps: f64,
    /// The same, counting the open (manifest, planning, committing memory) too.
    pub effective_with_open_gbps: f64,
    /// The loader's read throughput ÷ the raw read (goal ≥ 0.9). This and
    /// the next two ratios are medians of per-pass ratios, each pass's
    /// loader compared with the raw read made just before it: robust to the
    /// disk's drift over the run.
    pub read_vs_raw: f64,
    /// Effective bandwidth ÷ (raw read × original_bytes ÷ bytes_read) (goal ≥ 0.9).
    pub effective_vs_bound: f64,
    /// Effective bandwidth ÷ raw read.
    pub effective_vs_raw: f64,
    /// Per-stage busy seconds (summed over threads) and throughput per busy
    /// second, of the median pass.
    pub stages: StageSeconds,
    pub stage_gbps: StageRates,
    /// Of the median pass's jobs (chunks), those the calling thread decoded
    /// between reads, beside the loader's decode threads.
    pub caller_jobs: usize,
    /// The slowest stage's time (parallel stages divided by their
    /// threads) ÷ the stream's wall time: 1.0 means the stages overlap
    /// perfectly behind the slowest.
    pub overlap_efficiency: f64,
    pub bottleneck: &'static str,
    pub peak_rss_bytes: Option<u64>,
    pub ram_budget: Option<u64>,
    pub memory: MemoryPlan,
    /// Bytes by place: resident in RAM (hot tier and read buffers), on the
    /// GPU (no GPU backend yet: 0), left on SSD (the rest of the container).
    pub composition: Composition,
    pub disk: Option<DiskFigures>,
    pub steps: usize,
    pub tensors: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageRates {
    pub read: f64,
    pub checksum: f64,
    pub decompress: f64,
    pub reconstruct: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Composition {
    pub ram_bytes: u64,
    pub gpu_bytes: u64,
    pub ssd_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskFigures {
    pub device: String,
    /// Over the loader's pass (open and stream).
    pub read_bytes: u64,
    pub reads: u64,
    /// Reads ÷ the pass's seconds (open and stream).
    pub iops: f64,
    pub read_ms: u64,
    pub seconds: f64,
}

/// Block size of the raw reads.
const RAW_BLOCK: u64 = 8 << 20;

/// Reads the whole file sequentially in 8 MiB reads, GB/s; `None`
/// when the file cannot be opened with `O_DIRECT` (`direct`). `cold`: the
/// file's pages are dropped from the page cache first.
pub fn raw_read(path: &Path, direct: bool, cold: bool) -> Result<Option<f64>> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = match o.open(path) {
        Ok(f) => f,
        Err(_) if direct => return Ok(None),
        Err(e) => return Err(Error::input(path, format!("cannot open: {e}"))),
    };
    let len = f
        .metadata()
        .map_err(|e| Error::input(path, format!("cannot read: {e}")))?
        .len();
    if cold {
        telemetry::drop_page_cache(&f);
    }
    let mut buf = AlignedBuf::new(RAW_BLOCK);
    let t = Instant::now();
    let mut at = 0;
    while at < len {
        let n = RAW_BLOCK.min(len - at);
        // With O_DIRECT the last read asks for whole blocks and gets the tail.
        let want = if direct { n.div_ceil(4096) * 4096 } else { n };
        let got = f
            .read_at(buf.get_mut(want as usize), at)
            .map_err(|e| Error::input(path, format!("raw read at {at}: {e}")))?;
        if got == 0 {
            return Err(Error::input(
                path,
                format!("raw read: unexpected end at {at}"),
            ));
        }
        at += got as u64;
    }
    Ok(Some(len as f64 / t.elapsed().as_secs_f64() / 1e9))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark on the container at `path`.
pub fn run(path: &Path, opts: &BenchOptions) -> Result<BenchReport> {
    let started = SystemTime::now();
    // Opened the way the container is (a FIFO would block the raw read).
    let container_bytes = tpde_pack::source::open_regular(path)
        .and_then(|f| f.metadata())
        .map_err(|e| Error::input(path, format!("cannot open: {e}")))?
        .len();
    let device = telemetry::disk_of(path);
    let mut passes = Vec::new();
    let mut last: Option<Loader> = None;
    for _ in 0..opts.reps.max(1) {
        let raw = RawRead {
            buffered_gbps: raw_read(path, false, opts.cold)?.unwrap_or(0.0),
            direct_gbps: raw_read(path, true, opts.cold)?,
        };
        if opts.cold {
            if let Ok(f) = File::open(path) {
                telemetry::drop_page_cache(&f);
            }
        }
        drop(last.take());
        let before = device.as_deref().and_then(telemetry::disk_counters);
        let t = Instant::now();
        let mut loader = Loader::open(path, opts.load.clone())?;
        let open_seconds = t.elapsed().as_secs_f64();
        // The consumer leaves each step's buffer to the loader to reuse.
        let stream = loader.stream(|_| Ok(()))?;
        let after = device.as_deref().and_then(telemetry::disk_counters);
        passes.push(Pass {
            raw,
            open_seconds,
            stream,
            disk: after.zip(before).map(|(a, b)| a.since(&b)),
        });
        last = Some(loader);
    }
    let loader = last.expect("at least one pass");
    let peak_rss_bytes = telemetry::peak_rss_bytes();

    let p_raw_direct: Vec<f64> = passes.iter().filter_map(|p| p.raw.direct_gbps).collect();
    let raw_direct_gbps = (!p_raw_direct.is_empty()).then(|| median(p_raw_direct));
    let raw_buffered_gbps = median(passes.iter().map(|p| p.raw.buffered_gbps).collect());
    let raw_read_gbps = if opts.load.direct {
        raw_direct_gbps.unwrap_or(raw_buffered_gbps)
    } else {
        raw_buffered_gbps
    };
    let bytes_read = passes[0].stream.read_bytes;
    let original_bytes = passes[0].stream.delivered_bytes;
    let container_read = |p: &Pass| bytes_read as f64 / p.stream.stages.read / 1e9;
    let effective = |p: &Pass| original_bytes as f64 / p.stream.wall_seconds / 1e9;
    let with_open =
        |p: &Pass| original_bytes as f64 / (p.open_seconds + p.stream.wall_seconds) / 1e9;
    let container_read_gbps = median(passes.iter().map(container_read).collect());
    let raw_of = |p: &Pass| {
        if opts.load.direct {
            p.raw.direct_gbps.unwrap_or(p.raw.buffered_gbps)
        } else {
            p.raw.buffered_gbps
        }
    };
    let paired = |f: &dyn Fn(&Pass) -> f64| median(passes.iter().map(f).collect());
    let read_vs_raw = paired(&|p| container_read(p) / raw_of(p));
    let effective_vs_raw = paired(&|p| effective(p) / raw_of(p));
    let ratio = original_bytes as f64 / bytes_read.max(1) as f64;
    let effective_vs_bound = paired(&|p| effective(p) / (raw_of(p) * ratio));
    let effective_gbps = median(passes.iter().map(effective).collect());
    let effective_with_open_gbps = median(passes.iter().map(with_open).collect());
    // The median pass by effective bandwidth, for the stage breakdown.
    let mut order: Vec<usize> = (0..passes.len()).collect();
    order.sort_by(|&a, &b| effective(&passes[a]).total_cmp(&effective(&passes[b])));
    let mid = &passes[order[order.len() / 2]];
    let st = &mid.stream.stages;
    // The threads that decoded: the calling thread too, when it did. (Busy
    // time is wall time inside jobs, preemption included, so it is divided
    // by the threads, not by the cores they shared.)
    let threads =
        (mid.stream.decode_threads + usize::from(mid.stream.caller_jobs > 0)).max(1) as f64;
    let rate = |bytes: u64, s: f64| if s > 0.0 { bytes as f64 / s / 1e9 } else { 0.0 };
    let streamed = mid.stream.read_bytes;
    let delivered = mid.stream.delivered_bytes;
    // Checksum, decompress and reconstruct run one after the other in the
    // same jobs on the same threads: together they are the decode stage.
    let candidates = [
        ("read", st.read),
        (
            "decode (checksum + decompress + reconstruct)",
            (st.checksum + st.decompress + st.reconstruct) / threads,
        ),
        ("consume", st.consume),
    ];
    let (bottleneck, slowest) = candidates
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("stages");
    let memory = loader.memory.clone();
    let fidelity = match opts.load.fidelity {
        Fidelity::Exact => "exact",
        Fidelity::Base => "base",
    };
    let results = Results {
        fidelity,
        direct: opts.load.direct,
        page_cache: if opts.load.direct {
            "cold (O_DIRECT)".into()
        } else if opts.cold {
            "cold (posix_fadvise DONTNEED before each read)".into()
        } else {
            "warm".into()
        },
        streamed_reads: {
            let streamed = |x: &Pass| x.stream.read_bytes > x.stream.hot_bytes;
            let by = |p: crate::ReadPath| {
                passes
                    .iter()
                    .any(|x| streamed(x) && x.stream.streamed_reads == p)
            };
            match (by(crate::ReadPath::Readers), by(crate::ReadPath::Jobs)) {
                (true, true) => "readers and jobs",
                (false, true) => "jobs",
                (true, false) => "readers",
                (false, false) => "nothing streamed",
            }
            .into()
        },
        container_bytes,
        original_bytes,
        bytes_read,
        raw_read_gbps,
        raw_buffered_gbps,
        raw_direct_gbps,
        container_read_gbps,
        effective_gbps,
        effective_with_open_gbps,
        read_vs_raw,
        effective_vs_bound,
        effective_vs_raw,
        stages: st.clone(),
        stage_gbps: StageRates {
            read: rate(bytes_read, st.read),
            checksum: rate(streamed, st.checksum),
            decompress: rate(delivered, st.decompress),
            reconstruct: rate(delivered, st.reconstruct),
        },
        caller_jobs: mid.stream.caller_jobs,
        overlap_efficiency: slowest / mid.stream.wall_seconds,
        bottleneck,
        peak_rss_bytes,
        ram_budget: opts.load.ram_budget,
        composition: Composition {
            ram_bytes: memory.hot + memory.pool_buffers as u64 * memory.pool_buffer_bytes,
            gpu_bytes: 0,
            ssd_bytes: container_bytes.saturating_sub(memory.hot),
        },
        memory,
        disk: mid.disk.as_ref().map(|d| DiskFigures {
            device: d.device.clone(),
            read_bytes: d.read_bytes,
            reads: d.reads,
            iops: d.reads as f64 / (mid.open_seconds + mid.stream.wall_seconds),
            seconds: mid.open_seconds + mid.stream.wall_seconds,
            read_ms: d.read_ms,
        }),
        steps: mid.stream.steps,
        tensors: mid.stream.tensors,
    };
    let header = loader.container.header;
    let audit = serde_json::json!({
        "environment": telemetry::environment(),
        "container": {
            "path": path.display().to_string(),
            "bytes": container_bytes,
            "format_version": header.version,
            "manifest_blake3": tpde_format::hex(&header.manifest_blake3),
            "created_by": loader.container.manifest.created_by,
        },
        "flags": opts.argv,
        "threads": rayon::current_num_threads(),
        "reps": opts.reps.max(1),
        "started": telemetry::utc_rfc3339(started),
        "ended": telemetry::utc_rfc3339(SystemTime::now()),
    });
    Ok(BenchReport {
        results,
        passes,
        audit,
    })
}
