//! Benchmark program for fetching one expert of a mixture-of-experts model:
//! `tpde_pack::extract_expert` on a packed container (one read of the
//! expert's shard, checksums, decode) against reading the same expert's
//! original bytes out of the source file, in the same run, with the page
//! cache dropped (`posix_fadvise(DONTNEED)`) before every fetch, again with
//! both sides reading with `O_DIRECT`, and with the page cache warm. Every fetched expert is compared byte for byte with the
//! source. Prints a Markdown table for `benches/RESULTS.md`.
//!
//!     cargo bench --bench expert                       # fixtures + synthetic model
//!     cargo bench --bench expert -- --synthetic-expert-mib 48 --json
//!     cargo bench --bench expert -- --help

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tpde_pack::source::{Source, SourceKind};
use tpde_pack::{Container, ExpertReader, Fidelity, NoProgress, PackOptions};

const USAGE: &str = "\
tpde benchmark: fetch one expert from a container vs read it from the source file

usage: cargo bench --bench expert -- [OPTIONS] [SOURCE ...]

SOURCE is a mixture-of-experts model (safetensors file, model folder or GGUF file). Without
SOURCE arguments it uses moe-minilm-experts (real trained values) and moe-mixtral-tiny-gguf
from $TPDE_FIXTURES (default ~/.cache/tpde-fixtures; get them with fixtures/fetch.sh), plus
a synthetic Qwen-MoE-shaped BF16 model generated in the scratch folder.

options:
  --threads N               rayon threads for pack and decode (default 2)
  --reps N                  passes over every expert (default 3)
  --synthetic-expert-mib N  size of one expert of the synthetic model (default 24; 0: none)
  --tmp DIR                 scratch folder (default: the system temp dir)
  --json                    one JSON object on stdout (the table goes to stderr)
  -h, --help                this text

Each pass fetches every (layer, expert) once each way, back to back, alternating which way goes
first; the speed-up is the median of those pairs' ratios. Cold:
the source files and the container are dropped from the page cache before each fetch (the
container stays open, as a runtime keeps it: its header and manifest are read once). No
readahead: the source read through the page cache from a handle advised POSIX_FADV_RANDOM (the
kernel otherwise reads about 3 MiB ahead of a sub-megabyte expert), against the same tpde fetch.
O_DIRECT:
both sides read around the page cache, tpde with ExpertReader::with_direct_reads, the source in
whole blocks (tensors less than a block apart in one request); the scratch folder must allow
O_DIRECT. Times are medians over all fetches; a ratio > 1 means tpde is faster.";

struct Args {
    threads: usize,
    reps: usize,
    synthetic_mib: usize,
    tmp: Option<PathBuf>,
    json: bool,
    sources: Vec<PathBuf>,
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        threads: 2,
        reps: 3,
        synthetic_mib: 24,
        tmp: None,
        json: false,
        sources: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    let number = |flag: &str, v: Option<String>, min: usize| -> Result<usize> {
        let v = v.ok_or_else(|| anyhow!("{flag} needs a value"))?;
        match v.parse::<usize>() {
            Ok(n) if n >= min => Ok(n),
            _ => bail!("{flag} needs a whole number ≥ {min}, not {v:?}"),
        }
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            // `cargo bench` appends `--bench` to the arguments of every bench target.
            "--bench" => {}
            "-h" | "--help" => return Ok(None),
            "--threads" => a.threads = number(&arg, it.next(), 1)?,
            "--reps" => a.reps = number(&arg, it.next(), 1)?,
            "--synthetic-expert-mib" => a.synthetic_mib = number(&arg, it.next(), 0)?,
            "--json" => a.json = true,
            "--tmp" => {
                a.tmp = Some(
                    it.next()
                        .ok_or_else(|| anyhow!("--tmp needs a path"))?
                        .into(),
                )
            }
            s if s.starts_with('-') => bail!("unknown option {s:?} (see --help)"),
            _ => a.sources.push(arg.into()),
        }
    }
    Ok(Some(a))
}

fn main() {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("expert bench: error: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("expert bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// One expert's original bytes in the source: (file index, offset, length) per tensor.
type Ranges = Vec<(usize, u64, u64)>;

/// Every (layer, expert) of the source with the byte ranges of its tensors.
fn expert_ranges(src: &Source) -> Result<Vec<((u32, u32), Ranges)>> {
    let mut by_name = std::collections::HashMap::new();
    for (fi, f) in src.files.iter().enumerate() {
        match &f.kind {
            SourceKind::Safetensors { header, .. } => {
                for t in &header.tensors {
                    by_name.insert(
                        t.name.clone(),
                        (
                            fi,
                            header.data_start + t.begin,
                            t.end - t.begin,
                            t.shape.clone(),
                        ),
                    );
                }
            }
            SourceKind::Gguf { header, .. } => {
                for t in &header.tensors {
                    by_name.insert(
                        t.name.clone(),
                        (fi, header.data_start + t.offset, t.byte_len, t.shape()),
                    );
                }
            }
            SourceKind::Blob => {}
        }
    }
    let shapes: Vec<(&str, &[u64])> = by_name
        .iter()
        .map(|(n, (_, _, _, s))| (n.as_str(), s.as_slice()))
        .collect();
    let plan = tpde_ingest::moe::plan(&shapes).map_err(|e| anyhow!("{e}"))?;
    if !plan.is_moe() {
        bail!("not a mixture-of-experts model");
    }
    let mut out = Vec::new();
    for l in &plan.layers {
        for e in 0..l.experts {
            let mut ranges = Vec::new();
            for t in &l.tensors {
                let (fi, at, len, _) = &by_name[&t.name];
                match t.expert {
                    Some(x) if x == e => ranges.push((*fi, *at, *len)),
                    Some(_) => {}
                    None => {
                        let per = len / l.experts as u64;
                        ranges.push((*fi, at + e as u64 * per, per));
                    }
                }
            }
            out.push(((l.layer, e), ranges));
        }
    }
    Ok(out)
}

/// A Qwen-MoE-shaped BF16 model (2 layers × 8 experts of gate, up and down
/// projections, hidden 2048) whose experts hold about `mib` MiB each, with
/// Gaussian weights of a trained model's scale.
fn synthetic_moe(path: &Path, mib: usize) -> Result<()> {
    let (hidden, experts, layers) = (2048u64, 8u32, 2u32);
    let inter = ((mib as u64) << 20) / (3 * hidden * 2);
    let mut header = serde_json::Map::new();
    let mut at = 0u64;
    let mut names = Vec::new();
    for l in 0..layers {
        for e in 0..experts {
            for (p, shape) in [
                ("gate_proj", [inter, hidden]),
                ("up_proj", [inter, hidden]),
                ("down_proj", [hidden, inter]),
            ] {
                let name = format!("model.layers.{l}.mlp.experts.{e}.{p}.weight");
                let len = shape[0] * shape[1] * 2;
                header.insert(
                    name.clone(),
                    json!({"dtype": "BF16", "shape": shape, "data_offsets": [at, at + len]}),
                );
                names.push(len);
                at += len;
            }
        }
    }
    let mut hb = serde_json::to_vec(&header)?;
    while hb.len() % 8 != 0 {
        hb.push(b' ');
    }
    let f = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
    use std::io::Write;
    w.write_all(&(hb.len() as u64).to_le_bytes())?;
    w.write_all(&hb)?;
    // Box–Muller over splitmix64; σ = 0.02.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut buf = Vec::with_capacity(1 << 20);
    for len in names {
        for _ in 0..len / 4 {
            let (u, v) = (next().max(1e-300), next());
            let r = (-2.0 * u.ln()).sqrt() * 0.02;
            let a = (r * (std::f64::consts::TAU * v).cos()) as f32;
            let b = (r * (std::f64::consts::TAU * v).sin()) as f32;
            buf.extend_from_slice(&half::bf16::from_f32(a).to_le_bytes());
            buf.extend_from_slice(&half::bf16::from_f32(b).to_le_bytes());
            if buf.len() >= 1 << 20 {
                w.write_all(&buf)?;
                buf.clear();
            }
        }
    }
    w.write_all(&buf)?;
    w.flush()?;
    drop(w);
    f.sync_all()?;
    Ok(())
}

/// The median; NaN for none (printed as such: the O_DIRECT columns where
/// O_DIRECT was refused).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Figures for one model.
struct Figures {
    name: String,
    experts: usize,
    expert_bytes: f64,
    shard_bytes: f64,
    /// Largest (bytes read by one exact fetch) / (that expert's shard
    /// bytes): through the page cache, and with `O_DIRECT` (whole blocks).
    read_over_shard: f64,
    read_over_shard_direct: f64,
    cold_src_ms: f64,
    cold_exact_ms: f64,
    /// Median over fetches of (source time ÷ tpde exact time), each pair
    /// measured back to back: robust to the machine's drift.
    speedup: f64,
    /// The source read through the page cache without readahead
    /// (`POSIX_FADV_RANDOM`), and its speed-up the same way.
    cold_src_random_ms: f64,
    speedup_random: f64,
    /// The same with both sides reading with `O_DIRECT`.
    cold_src_direct_ms: f64,
    cold_exact_direct_ms: f64,
    speedup_direct: f64,
    cold_base_ms: f64,
    warm_src_ms: f64,
    warm_exact_ms: f64,
}

/// Reads the expert's tensors from the source files with `O_DIRECT`, as a
/// plain reader that goes around the page cache would: ranges of one file
/// less than a block apart are read together, each run in one request of
/// whole blocks, then the tensors are copied out.
fn read_source_direct(
    files: &[std::fs::File],
    ranges: &Ranges,
    buf: &mut tpde_pack::container::AlignedBuf,
) -> Result<Vec<Vec<u8>>> {
    const BLOCK: u64 = 4096;
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| (ranges[i].0, ranges[i].1));
    let mut out = vec![Vec::new(); ranges.len()];
    let mut k = 0;
    while k < order.len() {
        let (fi, a, _) = ranges[order[k]];
        let mut end = a + ranges[order[k]].2;
        let mut j = k + 1;
        while j < order.len() && ranges[order[j]].0 == fi && ranges[order[j]].1 <= end + BLOCK {
            end = end.max(ranges[order[j]].1 + ranges[order[j]].2);
            j += 1;
        }
        let a0 = a - a % BLOCK;
        let len = (end - a0).div_ceil(BLOCK) * BLOCK;
        if (buf.capacity() as u64) < len {
            // Whole huge pages, at least one, as tpde's kept buffer is.
            let huge = tpde_pack::container::HUGE_PAGE as u64;
            *buf = tpde_pack::container::AlignedBuf::new(tpde_pack::container::whole_huge_pages(
                len.max(huge),
            ));
        }
        let b = buf.get_mut(len as usize);
        let mut got = 0usize;
        while (got as u64) < end - a0 {
            let n = files[fi].read_at(&mut b[got..], a0 + got as u64)?;
            if n == 0 {
                bail!("source file {fi} ends inside an expert");
            }
            got += n;
        }
        for &i in &order[k..j] {
            let (_, at, n) = ranges[i];
            out[i] = b[(at - a0) as usize..(at - a0 + n) as usize].to_vec();
        }
        k = j;
    }
    Ok(out)
}

/// Waits (up to 50 ms) until `device` has no request in flight
/// (/proc/diskstats field 12), so that no fetch pays for the readahead a
/// buffered read before it left running.
fn settle(device: Option<&str>) {
    let Some(device) = device else { return };
    let t = Instant::now();
    while t.elapsed().as_millis() < 50 {
        let busy = std::fs::read_to_string("/proc/diskstats")
            .ok()
            .and_then(|text| {
                let line = text
                    .lines()
                    .find(|l| l.split_whitespace().nth(2) == Some(device))?;
                line.split_whitespace().nth(11)?.parse::<u64>().ok()
            });
        if busy.is_none_or(|n| n == 0) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

fn bench_one(name: &str, source: &Path, tmp: &Path, args: &Args) -> Result<Figures> {
    let container = tmp.join(format!("{name}.tpde"));
    eprintln!("packing {} …", source.display());
    let s = tpde_pack::pack::pack(source, &container, &PackOptions::default(), &NoProgress)?;
    if s.expert_shards == 0 {
        bail!("{}: packed without expert shards", source.display());
    }
    let src = Source::open(source)?;
    let experts = expert_ranges(&src)?;
    let c = Container::open(&container)?;
    let reader = ExpertReader::new(&c)?;
    // Both sides with O_DIRECT, where both file systems allow it.
    let src_direct = src
        .files
        .iter()
        .map(|f| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&f.path)
                .with_context(|| format!("{}: cannot open with O_DIRECT", f.path.display()))
        })
        .collect::<Result<Vec<_>>>();
    let direct = match (ExpertReader::new(&c)?.with_direct_reads(), src_direct) {
        (Ok(r), Ok(files)) => Some((r, files)),
        (Err(e), _) => {
            eprintln!("note: {e:#}; the O_DIRECT columns are left out (--tmp elsewhere)");
            None
        }
        (_, Err(e)) => {
            eprintln!("note: {e:#}; the O_DIRECT columns are left out");
            None
        }
    };
    let mut aligned = tpde_pack::container::AlignedBuf::new(0);
    let shard = |l: u32, e: u32| -> Result<u64> {
        let x = c
            .manifest
            .experts
            .iter()
            .find(|x| (x.layer, x.expert) == (l, e))
            .ok_or_else(|| anyhow!("no shard for layer {l} expert {e}"))?;
        Ok(c.manifest.sections[x.section as usize].len)
    };
    let read_source_with = |files: &[&std::fs::File], ranges: &Ranges| -> Result<Vec<Vec<u8>>> {
        ranges
            .iter()
            .map(|&(fi, at, len)| {
                let mut b = vec![0u8; len as usize];
                files[fi].read_exact_at(&mut b, at)?;
                Ok(b)
            })
            .collect()
    };
    let plain: Vec<&std::fs::File> = src.files.iter().map(|f| &f.file).collect();
    let read_source = |ranges: &Ranges| read_source_with(&plain, ranges);
    // The source opened again and advised POSIX_FADV_RANDOM: a buffered
    // reader that turns the kernel's readahead off.
    let random: Vec<std::fs::File> = src
        .files
        .iter()
        .map(|f| {
            use std::os::unix::io::AsRawFd;
            let h = std::fs::File::open(&f.path)
                .with_context(|| format!("{}: cannot open", f.path.display()))?;
            // SAFETY: advice on a descriptor `h` owns.
            let rc = unsafe { libc::posix_fadvise(h.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
            if rc != 0 {
                bail!("{}: posix_fadvise(RANDOM) failed ({rc})", f.path.display());
            }
            Ok(h)
        })
        .collect::<Result<_>>()?;
    let no_readahead: Vec<&std::fs::File> = random.iter().collect();
    let devices: Vec<Option<String>> = [container.as_path()]
        .into_iter()
        .chain(src.files.iter().map(|f| f.path.as_path()))
        .map(tpde_loader::telemetry::disk_of)
        .collect();
    // Readahead still in flight when the pages are dropped would leave
    // them cached: the disk settles first.
    let drop_all = || {
        for d in &devices {
            settle(d.as_deref());
        }
        for f in &src.files {
            tpde_loader::telemetry::drop_page_cache(&f.file);
        }
        tpde_loader::telemetry::drop_page_cache(&c.file);
    };
    let (mut cs, mut ce, mut cb, mut ws, mut we) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut csd, mut ced) = (vec![], vec![]);
    let (mut csr, mut ratios_random) = (vec![], vec![]);
    let (mut worst, mut worst_direct) = (0f64, if direct.is_some() { 0f64 } else { f64::NAN });
    let (mut ratios, mut ratios_direct) = (Vec::new(), Vec::new());
    let (mut orig_sum, mut shard_sum) = (0u64, 0u64);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    for rep in 0..args.reps {
        for (k, ((l, e), ranges)) in experts.iter().enumerate() {
            let sb = shard(*l, *e)?;
            // The five cold fetches: tpde through the page cache (1) next to
            // both buffered source reads (0, and 4 without readahead), and
            // the O_DIRECT pair (2, 3) back to back; each side of a pair
            // first in half the orders.
            const ORDERS: [[usize; 5]; 4] = [
                [0, 1, 4, 2, 3],
                [4, 1, 0, 3, 2],
                [2, 3, 0, 1, 4],
                [3, 2, 4, 1, 0],
            ];
            let (mut t_src, mut t_tpde, mut t_src_d, mut t_tpde_d) = (0.0, 0.0, 0.0, 0.0);
            let mut t_src_r = 0.0;
            for turn in ORDERS[(rep + k) % 4] {
                if (turn == 2 || turn == 3) && direct.is_none() {
                    continue;
                }
                drop_all();
                let before = c.bytes_read();
                match turn {
                    0 => {
                        let t = Instant::now();
                        let got = read_source(ranges)?;
                        t_src = ms(t);
                        if rep == 0 {
                            orig_sum += got.iter().map(|b| b.len() as u64).sum::<u64>();
                        }
                    }
                    1 => {
                        let t = Instant::now();
                        let got = reader.fetch(*l, *e, Fidelity::Exact)?;
                        t_tpde = ms(t);
                        worst = worst.max((c.bytes_read() - before) as f64 / sb as f64);
                        // Exact means the source's bytes, tensor by tensor.
                        let want = read_source(ranges)?;
                        if got.len() != want.len()
                            || got.iter().zip(&want).any(|(a, b)| a.data != *b)
                        {
                            bail!("{name}: layer {l} expert {e} differs from the source");
                        }
                    }
                    2 => {
                        let t = Instant::now();
                        let (_, files) = direct.as_ref().expect("checked above");
                        let got = read_source_direct(files, ranges, &mut aligned)?;
                        t_src_d = ms(t);
                        if got != read_source(ranges)? {
                            bail!(
                                "{name}: the O_DIRECT source read of layer {l} expert {e} differs"
                            );
                        }
                    }
                    4 => {
                        let t = Instant::now();
                        let got = read_source_with(&no_readahead, ranges)?;
                        t_src_r = ms(t);
                        if got != read_source(ranges)? {
                            bail!("{name}: the source read without readahead differs");
                        }
                    }
                    _ => {
                        let t = Instant::now();
                        let (reader, _) = direct.as_ref().expect("checked above");
                        let got = reader.fetch(*l, *e, Fidelity::Exact)?;
                        t_tpde_d = ms(t);
                        worst_direct =
                            worst_direct.max((c.bytes_read() - before) as f64 / sb as f64);
                        let want = read_source(ranges)?;
                        if got.len() != want.len()
                            || got.iter().zip(&want).any(|(a, b)| a.data != *b)
                        {
                            bail!(
                                "{name}: layer {l} expert {e} (O_DIRECT) differs from the source"
                            );
                        }
                    }
                }
            }
            if rep == 0 {
                shard_sum += sb;
            }
            cs.push(t_src);
            ce.push(t_tpde);
            ratios.push(t_src / t_tpde);
            csr.push(t_src_r);
            ratios_random.push(t_src_r / t_tpde);
            if direct.is_some() {
                csd.push(t_src_d);
                ced.push(t_tpde_d);
                ratios_direct.push(t_src_d / t_tpde_d);
            }
            drop_all();
            let t = Instant::now();
            reader.fetch(*l, *e, Fidelity::Base)?;
            cb.push(ms(t));
            // Warm: both already in the page cache from the fetches above.
            read_source(ranges)?;
            reader.fetch(*l, *e, Fidelity::Exact)?;
            let t = Instant::now();
            read_source(ranges)?;
            ws.push(ms(t));
            let t = Instant::now();
            reader.fetch(*l, *e, Fidelity::Exact)?;
            we.push(ms(t));
        }
    }
    let n = experts.len();
    Ok(Figures {
        name: name.into(),
        experts: n,
        expert_bytes: orig_sum as f64 / n as f64,
        shard_bytes: shard_sum as f64 / n as f64,
        read_over_shard: worst,
        read_over_shard_direct: worst_direct,
        cold_src_ms: median(&mut cs),
        cold_exact_ms: median(&mut ce),
        speedup: median(&mut ratios),
        cold_src_random_ms: median(&mut csr),
        speedup_random: median(&mut ratios_random),
        cold_src_direct_ms: median(&mut csd),
        cold_exact_direct_ms: median(&mut ced),
        speedup_direct: median(&mut ratios_direct),
        cold_base_ms: median(&mut cb),
        warm_src_ms: median(&mut ws),
        warm_exact_ms: median(&mut we),
    })
}

fn run(args: &Args) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .map_err(|e| anyhow!("{e}"))?;
    let scratch = tempfile::Builder::new()
        .prefix("tpde-expert-bench")
        .tempdir_in(args.tmp.clone().unwrap_or_else(std::env::temp_dir))?;
    let mut sources: Vec<(String, PathBuf)> = Vec::new();
    if args.sources.is_empty() {
        let root = std::env::var_os("TPDE_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/tpde-fixtures")
            });
        for (name, rel) in [
            ("moe-minilm-experts", "moe-minilm-experts"),
            ("moe-mixtral-tiny-gguf", "moe-mixtral-tiny-gguf/model.gguf"),
        ] {
            let p = root.join(rel);
            if !p.exists() {
                bail!("{} is missing: run fixtures/fetch.sh", p.display());
            }
            sources.push((name.into(), p));
        }
        if args.synthetic_mib > 0 {
            let p = scratch.path().join("synthetic-moe.safetensors");
            eprintln!(
                "generating a synthetic model with {} MiB experts …",
                args.synthetic_mib
            );
            synthetic_moe(&p, args.synthetic_mib)?;
            sources.push((
                format!("synthetic BF16, {} MiB experts", args.synthetic_mib),
                p,
            ));
        }
    } else {
        for p in &args.sources {
            let name = p
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned());
            sources.push((name, p.clone()));
        }
    }
    let mut figs = Vec::new();
    for (name, p) in &sources {
        let stem: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        figs.push(bench_one(&stem, p, scratch.path(), args).map(|mut f| {
            f.name = name.clone();
            f
        })?);
    }

    let mut t = String::new();
    use std::fmt::Write as _;
    writeln!(t, "| model | experts | expert KiB | shard KiB (×) | read ÷ shard (O_DIRECT) | cold: source ms | cold: tpde exact ms | speed-up | no readahead: source ms | speed-up | O_DIRECT: source ms | O_DIRECT: tpde exact ms | speed-up | cold: tpde base ms | warm: source ms | warm: tpde exact ms |")?;
    writeln!(
        t,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for f in &figs {
        writeln!(
            t,
            "| {} | {} | {:.0} | {:.0} ({:.3}) | {:.3} ({:.3}) | {:.3} | {:.3} | {:.2} × | {:.3} | {:.2} × | {:.3} | {:.3} | {:.2} × | {:.3} | {:.3} | {:.3} |",
            f.name,
            f.experts,
            f.expert_bytes / 1024.0,
            f.shard_bytes / 1024.0,
            f.shard_bytes / f.expert_bytes,
            f.read_over_shard,
            f.read_over_shard_direct,
            f.cold_src_ms,
            f.cold_exact_ms,
            f.speedup,
            f.cold_src_random_ms,
            f.speedup_random,
            f.cold_src_direct_ms,
            f.cold_exact_direct_ms,
            f.speedup_direct,
            f.cold_base_ms,
            f.warm_src_ms,
            f.warm_exact_ms,
        )?;
    }
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let head = format!(
        "expert fetch, git {git}, {cpu}, {} threads, {} passes; median ms per expert; speed-up = median over experts of (cold source ÷ cold tpde exact), each pair back to back; O_DIRECT: both sides read around the page cache (the source in whole blocks, adjacent tensors in one request)",
        args.threads, args.reps
    );
    if args.json {
        eprintln!("{head}\n{t}");
        let rows: Vec<_> = figs
            .iter()
            .map(|f| {
                json!({
                    "model": f.name, "experts": f.experts,
                    "expert_bytes": f.expert_bytes, "shard_bytes": f.shard_bytes,
                    "read_over_shard": f.read_over_shard,
                    "read_over_shard_direct": f.read_over_shard_direct,
                    "cold_source_ms": f.cold_src_ms, "cold_exact_ms": f.cold_exact_ms,
                    "no_readahead_source_ms": f.cold_src_random_ms,
                    "speedup_no_readahead_median_of_pairs": f.speedup_random,
                    "direct_source_ms": f.cold_src_direct_ms,
                    "direct_exact_ms": f.cold_exact_direct_ms,
                    "speedup_direct_median_of_pairs": f.speedup_direct,
                    "cold_base_ms": f.cold_base_ms, "warm_source_ms": f.warm_src_ms,
                    "warm_exact_ms": f.warm_exact_ms,
                    "speedup_median_of_pairs": f.speedup,
                })
            })
            .collect();
        println!(
            "{}",
            json!({"git": git, "cpu": cpu, "threads": args.threads, "reps": args.reps, "results": rows})
        );
    } else {
        println!("{head}\n{t}");
    }
    Ok(())
}
