//! `tpde bench` (without `--stream-only`): the model itself, as
//! llama-bench measures one: prompt processing (`pp`) and generation
//! (`tg`) tokens per second over repetitions, time to first token and load
//! time, with the loader's figures and the audit trail.

use crate::cache::CacheStats;
use crate::generate::argmax;
use crate::model::{LoadReport, Model, Placement, Placing};
use serde::Serialize;
use std::path::Path;
use std::time::{Instant, SystemTime};
use tpde_loader::bench::Composition;
use tpde_loader::{telemetry, LoadOptions};
use tpde_pack::{Error, Result};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub load: LoadOptions,
    /// Prompt tokens of the `pp` test (0: skip).
    pub prompt: usize,
    /// Generated tokens of the `tg` test (0: skip).
    pub gen: usize,
    pub reps: usize,
    /// Stream the layers even when the budget could hold them.
    pub stream_layers: bool,
    /// At most this much for the expert cache (streamed layers).
    pub expert_cache: Option<u64>,
    /// The command line, for the audit trail.
    pub argv: Vec<String>,
}

/// Mean and sample standard deviation.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MeanSd {
    pub mean: f64,
    pub sd: f64,
}

impl MeanSd {
    pub fn of(v: &[f64]) -> MeanSd {
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = if v.len() > 1 {
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        MeanSd {
            mean,
            sd: var.sqrt(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    /// `pp{prompt}` tokens per second.
    pub pp_tps: Option<f64>,
    pub pp: Option<MeanSd>,
    /// `tg{gen}` tokens per second.
    pub tg_tps: Option<f64>,
    pub tg: Option<MeanSd>,
    /// Prompt of `prompt` tokens processed and the first token chosen, mean.
    pub ttft_ms: Option<f64>,
    pub load_seconds: f64,
    /// Whether the layers streamed from the container for every token
    /// (the budget could not hold the model), and how reads were made.
    pub streamed: bool,
    pub direct: bool,
    /// Bytes read from the container per generated token (0: every weight resident).
    pub bytes_streamed_per_token: f64,
    /// Streamed: the raw sequential read of the container file, made the
    /// same way (cold) just before and just after the `tg` test, GB/s.
    pub raw_read_gbps: Option<[f64; 2]>,
    /// Streamed: their mean ÷ bytes streamed per token, and `tg` ÷ that.
    pub physical_bound_tps: Option<f64>,
    /// Streamed: the loader's container read throughput over the run
    /// (layer bytes ÷ wall seconds with a read in flight), GB/s.
    pub container_read_gbps: Option<f64>,
    pub tg_vs_bound: Option<f64>,
    /// Experts served from memory ÷ experts used (every expert resident: 1);
    /// `None` for a dense model.
    pub expert_cache_hit_rate: Option<f64>,
    /// Streamed mixture-of-experts models: the expert cache over the run.
    pub expert_cache: Option<CacheStats>,
    /// Streamed: passes over the layers, bytes, wall and read seconds
    /// over the whole run (warm-ups and `pp` included).
    pub stream: Option<crate::model::StreamStats>,
    /// How the page cache stood: `cold (O_DIRECT)` or `buffered` (the page
    /// cache may serve reads).
    pub page_cache: &'static str,
    /// The loading pass as the loader reports it: bytes, wall time and the
    /// busy seconds of each stage (read, checksum, decompress, reconstruct).
    pub load_stream: tpde_loader::StreamReport,
    /// Bytes delivered by the load ÷ its wall time, GB/s.
    pub load_effective_gbps: f64,
    /// The block device holding the container, from /proc/diskstats over
    /// the `tg` tests (warm-up excluded), and reads ÷ their seconds.
    pub disk: Option<telemetry::DiskCounters>,
    pub disk_iops: Option<f64>,
    pub placement: Placement,
    /// Bytes read while loading, and the original bytes delivered.
    pub bytes_read: u64,
    pub original_bytes: u64,
    pub weight_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
    pub ram_budget_bytes: Option<u64>,
    /// Resident RAM, GPU memory, and bytes left on SSD.
    pub memory: Composition,
    pub threads: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: ModelSummary,
    pub results: Results,
    pub audit: serde_json::Value,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    pub arch: String,
    pub layers: usize,
    pub d_model: usize,
    pub vocab: usize,
    pub experts: usize,
    pub experts_used: usize,
}

/// Deterministic token ids for the tests (as llama-bench, the values do
/// not matter, only their count).
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

pub fn run(path: &Path, opts: &BenchOptions) -> Result<BenchReport> {
    let started = SystemTime::now();
    let ctx = opts.prompt.max(opts.gen).saturating_add(1);
    let placing = Placing {
        ctx,
        stream: opts.stream_layers,
        expert_cache: opts.expert_cache,
    };
    let err = |m: String| Error::input(path, m);
    // `-p` comes from the command line and may be anything: checked
    // against the model's context before its weights are loaded.
    let ctx_len = crate::model::Metadata::read(&tpde_pack::Container::open(path)?)?
        .config(path)?
        .ctx_len;
    if opts.prompt > ctx_len {
        return Err(err(format!(
            "a prompt of {} tokens does not fit the model's context of {ctx_len} positions",
            opts.prompt
        )));
    }
    let (model, _meta, load): (Model, _, LoadReport) =
        Model::load_with(path, opts.load.clone(), &placing)?;
    let c = &model.config;
    let reps = opts.reps.max(1);
    let ctx = ctx.min(c.ctx_len);
    let streamed = model.is_streamed();
    let raw = || -> Result<f64> {
        tpde_loader::bench::raw_read(path, opts.load.direct, true)?
            .ok_or_else(|| Error::input(path, "cannot open with O_DIRECT for the raw read"))
    };
    let mut session = model.session(ctx);
    // One warm-up of each test, as llama-bench does.
    let (mut pp, mut ttft, mut tg) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tg_bytes, mut raw_before) = (0u64, None);
    let device = telemetry::disk_of(path);
    let (mut disk, mut tg_seconds) = (None::<telemetry::DiskCounters>, 0.0);
    for rep in 0..=reps {
        if opts.prompt > 0 {
            session.reset();
            let p = tokens(opts.prompt, c.vocab, rep as u64 + 1);
            let t = Instant::now();
            let logits = session.forward(&p, false).map_err(err)?;
            std::hint::black_box(argmax(&logits));
            let s = t.elapsed().as_secs_f64();
            if rep > 0 {
                pp.push(opts.prompt as f64 / s);
                ttft.push(s * 1e3);
            }
        }
        if opts.gen > 0 {
            session.reset();
            if streamed && rep == 1 {
                raw_before = Some(raw()?);
            }
            let before = model.stream_stats().map_or(0, |s| s.bytes());
            let disk_before = device.as_deref().and_then(telemetry::disk_counters);
            let mut tok = tokens(1, c.vocab, rep as u64 + 99)[0];
            let t = Instant::now();
            for _ in 0..opts.gen {
                let logits = session.forward(&[tok], false).map_err(err)?;
                tok = argmax(&logits);
            }
            if rep > 0 {
                let secs = t.elapsed().as_secs_f64();
                tg.push(opts.gen as f64 / secs);
                tg_seconds += secs;
                tg_bytes += model.stream_stats().map_or(0, |s| s.bytes()) - before;
                let after = device.as_deref().and_then(telemetry::disk_counters);
                if let Some(d) = after.zip(disk_before).map(|(a, b)| a.since(&b)) {
                    disk = Some(match disk {
                        None => d,
                        Some(x) => telemetry::DiskCounters {
                            device: d.device,
                            reads: x.reads + d.reads,
                            read_bytes: x.read_bytes + d.read_bytes,
                            read_ms: x.read_ms + d.read_ms,
                        },
                    });
                }
            }
        }
    }
    let raw_read_gbps = match raw_before {
        Some(a) => Some([a, raw()?]),
        None => None,
    };
    let per_token = match tg.len() {
        0 => 0.0,
        k => tg_bytes as f64 / (k * opts.gen) as f64,
    };
    let bound = raw_read_gbps
        .filter(|_| per_token > 0.0)
        .map(|[a, b]| (a + b) / 2.0 * 1e9 / per_token);
    let stats = model.stream_stats();
    let cache = stats.map(|s| s.cache).filter(|_| c.n_experts > 0);
    let pp = (!pp.is_empty()).then(|| MeanSd::of(&pp));
    let tg = (!tg.is_empty()).then(|| MeanSd::of(&tg));
    let container_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let results = Results {
        pp_tps: pp.map(|m| m.mean),
        pp,
        tg_tps: tg.map(|m| m.mean),
        tg,
        ttft_ms: (!ttft.is_empty()).then(|| MeanSd::of(&ttft).mean),
        load_seconds: load.seconds,
        streamed,
        direct: opts.load.direct,
        bytes_streamed_per_token: per_token,
        raw_read_gbps,
        physical_bound_tps: bound,
        container_read_gbps: stats
            .filter(|s| s.read_seconds > 0.0)
            .map(|s| s.layer_bytes as f64 / s.read_seconds / 1e9),
        tg_vs_bound: bound.zip(tg).map(|(b, t)| t.mean / b),
        expert_cache_hit_rate: match cache {
            Some(s) => s.hit_rate(),
            None => (c.n_experts > 0).then_some(1.0),
        },
        expert_cache: cache,
        stream: stats,
        page_cache: if opts.load.direct {
            "cold (O_DIRECT)"
        } else {
            "buffered"
        },
        load_effective_gbps: load.stream.delivered_bytes as f64
            / load.stream.wall_seconds.max(1e-9)
            / 1e9,
        load_stream: load.stream.clone(),
        disk_iops: disk
            .as_ref()
            .filter(|_| tg_seconds > 0.0)
            .map(|d| d.reads as f64 / tg_seconds),
        disk,
        placement: load.placement.clone(),
        bytes_read: load.stream.read_bytes,
        original_bytes: load.stream.delivered_bytes,
        weight_bytes: model.weight_bytes as u64,
        peak_rss_bytes: telemetry::peak_rss_bytes(),
        ram_budget_bytes: opts.load.ram_budget,
        memory: Composition {
            ram_bytes: model.weight_bytes as u64 + cache.map_or(0, |s| s.peak_bytes),
            gpu_bytes: 0,
            // Streamed, the layers stay there; resident, what loading did not read.
            ssd_bytes: if streamed {
                container_bytes.saturating_sub(load.placement.resident_weight_bytes)
            } else {
                container_bytes.saturating_sub(load.stream.read_bytes)
            },
        },
        threads: rayon::current_num_threads(),
    };
    let audit = serde_json::json!({
        "environment": telemetry::environment(),
        "container": {
            "path": path.display().to_string(),
            "bytes": container_bytes,
            "format_version": load.format_version,
            "manifest_blake3": load.manifest_blake3,
        },
        "flags": opts.argv,
        "threads": rayon::current_num_threads(),
        "reps": reps,
        "prompt_tokens": opts.prompt,
        "gen_tokens": opts.gen,
        "started": telemetry::utc_rfc3339(started),
        "ended": telemetry::utc_rfc3339(SystemTime::now()),
    });
    Ok(BenchReport {
        model: ModelSummary {
            arch: c.arch.clone(),
            layers: c.n_layers,
            d_model: c.d_model,
            vocab: c.vocab,
            experts: c.n_experts,
            experts_used: c.n_experts_used,
        },
        results,
        audit,
    })
}
