//! Benchmark program for `tpde pack`, `verify` and `unpack` on real model
//! files, with `zstd -3` measured on the same files in the same run as the
//! baseline. Not a criterion harness: it drives the release `tpde` binary as
//! a user would, one subprocess per operation, and prints a Markdown table
//! that can be pasted into `benches/RESULTS.md`.
//!
//!     cargo bench --bench pack                      # MiniLM BF16 and F32 fixtures
//!     cargo bench --bench pack -- --reps 5 --json   # more repetitions, JSON on stdout
//!     cargo bench --bench pack -- --help

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "\
tpde benchmark: pack / verify / unpack throughput, ratios and peak RSS, with zstd -3 as baseline

usage: cargo bench --bench pack -- [OPTIONS] [FIXTURE.safetensors|FIXTURE.gguf ...]

Without FIXTURE arguments it uses the MiniLM BF16 and F32 files from $TPDE_FIXTURES
(default ~/.cache/tpde-fixtures); get them with fixtures/fetch.sh.

options:
  --threads N   worker threads passed to `tpde --threads` and to `zstd -T` (default 2)
  --reps N      repetitions of every timed operation (default 3); medians and min..max are reported
  --json        print one JSON object on stdout (the readable report then goes to stderr)
  --tmp DIR     scratch folder for containers and unpacked files (default: the system temp dir)
  --tpde PATH   tpde binary to run (default: target/release/tpde, built if missing)
  --build       run `cargo build --release --bin tpde` first even if the binary exists
  --synthetic-mib N
                also generate a weight-like BF16 model of N MiB (in the scratch folder) and
                benchmark it: shows that peak RSS does not grow with the model size
  -h, --help    this text

Throughputs are original bytes / median of tpde's own `seconds` field (it excludes process
start-up), in MB/s (1 MB = 1e6 bytes). zstd figures use the wall time around the zstd process.
Peak RSS is the maximum over repetitions, as reported by tpde (VmHWM).";

struct Args {
    threads: usize,
    reps: usize,
    json: bool,
    tmp: Option<PathBuf>,
    tpde: Option<PathBuf>,
    build: bool,
    synthetic_mib: Option<usize>,
    fixtures: Vec<PathBuf>,
    /// Arguments as the user gave them after `--`, for the report.
    given: Vec<String>,
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        threads: 2,
        reps: 3,
        json: false,
        tmp: None,
        tpde: None,
        build: false,
        synthetic_mib: None,
        fixtures: Vec::new(),
        given: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    let number = |flag: &str, v: Option<String>| -> Result<usize> {
        let v = v.ok_or_else(|| anyhow!("{flag} needs a value"))?;
        match v.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("{flag} needs a positive whole number, not {v:?}"),
        }
    };
    while let Some(arg) = it.next() {
        // `cargo bench` appends `--bench` to the arguments of every bench target.
        if arg == "--bench" {
            continue;
        }
        a.given.push(arg.clone());
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--threads" => {
                let v = it.next();
                a.given.extend(v.clone());
                a.threads = number("--threads", v)?;
            }
            "--reps" => {
                let v = it.next();
                a.given.extend(v.clone());
                a.reps = number("--reps", v)?;
            }
            "--json" => a.json = true,
            "--synthetic-mib" => {
                let v = it.next();
                a.given.push(v.clone().unwrap_or_default());
                a.synthetic_mib = Some(number("--synthetic-mib", v)?);
            }
            "--build" => a.build = true,
            "--tmp" | "--tpde" => {
                let v = it.next().ok_or_else(|| anyhow!("{arg} needs a path"))?;
                a.given.push(v.clone());
                if arg == "--tmp" {
                    a.tmp = Some(v.into());
                } else {
                    a.tpde = Some(v.into());
                }
            }
            s if s.starts_with('-') => bail!("unknown option {s:?} (see --help)"),
            _ => a.fixtures.push(arg.into()),
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
            eprintln!("pack bench: error: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("pack bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// Readable output: stdout normally, stderr when stdout carries the JSON.
struct Out {
    to_stderr: bool,
}

impl Out {
    fn line(&self, s: impl AsRef<str>) {
        if self.to_stderr {
            eprintln!("{}", s.as_ref());
        } else {
            println!("{}", s.as_ref());
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let out = Out {
        to_stderr: args.json,
    };
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    let mut fixtures = if args.fixtures.is_empty() {
        default_fixtures()?
    } else {
        args.fixtures.clone()
    };
    // Kept alive until the end of the run.
    let synthetic_dir;
    if let Some(mib) = args.synthetic_mib {
        let parent = args.tmp.clone().unwrap_or_else(std::env::temp_dir);
        synthetic_dir = tempfile::Builder::new()
            .prefix("tpde-bench-synthetic-")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a scratch folder in {}", parent.display()))?;
        let path = synthetic_dir
            .path()
            .join(format!("synthetic-bf16-{mib}mib.safetensors"));
        out.line(format!(
            "generating a {mib} MiB synthetic BF16 model at {}",
            path.display()
        ));
        write_synthetic_bf16(&path, mib)?;
        fixtures.push(path);
    }
    for f in &fixtures {
        let m = std::fs::metadata(f).with_context(|| {
            format!(
                "fixture {} not found: run fixtures/fetch.sh (or set TPDE_FIXTURES)",
                f.display()
            )
        })?;
        if !m.is_file() {
            bail!(
                "{}: give a .safetensors or .gguf file (folders are not supported by this benchmark)",
                f.display()
            );
        }
    }
    let zstd_version = tool_output("zstd", &["--version"]).map_err(|_| {
        anyhow!("the zstd command-line tool is needed for the baseline: apt-get install zstd")
    })?;
    let tpde = locate_tpde(args, &manifest, &out)?;

    // ---- machine and run description ------------------------------------
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = tool_output("nproc", &[]).unwrap_or_else(|_| {
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into())
    });
    let ram_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb as f64 / (1u64 << 20) as f64)
    });
    let date = utc_now();
    let tpde_version = tool_output(tpde.to_str().unwrap_or("tpde"), &["--version"])?;
    let git = git_commit(&manifest);
    let command = if args.given.is_empty() {
        "cargo bench --bench pack".to_string()
    } else {
        format!("cargo bench --bench pack -- {}", args.given.join(" "))
    };
    let argv: Vec<String> = std::env::args().collect();

    let scratch_base = args.tmp.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix("tpde-bench-")
        .tempdir_in(&scratch_base)
        .with_context(|| {
            format!(
                "cannot create a scratch folder in {}",
                scratch_base.display()
            )
        })?;

    out.line("# tpde pack benchmark");
    out.line("");
    out.line(format!("- date (UTC): {date}"));
    out.line(format!(
        "- machine: {cpu}, {cores} cores{}",
        ram_gib
            .map(|g| format!(", {g:.1} GiB RAM"))
            .unwrap_or_default()
    ));
    out.line(format!(
        "- tpde: {tpde_version} ({}), git {git}",
        tpde.display()
    ));
    out.line(format!("- baseline: {zstd_version}"));
    out.line(format!("- command: {command}"));
    out.line(format!("- argv: {}", argv.join(" ")));
    out.line(format!(
        "- threads {} (tpde --threads, zstd -T), {} repetitions, warm cache (each source read once before timing)",
        args.threads, args.reps
    ));
    out.line(format!("- scratch: {}", scratch.path().display()));
    out.line("");

    let mut results = Vec::new();
    let mut scratch = Some(scratch);
    for f in &fixtures {
        let dir = scratch
            .as_ref()
            .expect("kept only on error")
            .path()
            .to_path_buf();
        let same_fs = same_filesystem(f, &dir);
        out.line(format!(
            "## {}  ({}; scratch on the same filesystem: {})",
            label(f),
            f.display(),
            if same_fs { "yes" } else { "no" }
        ));
        match bench_fixture(args, &tpde, f, &dir, &out) {
            Ok(r) => results.push(r),
            Err(e) => {
                // Leave the evidence (container, unpacked files) for inspection.
                let kept = scratch.take().expect("present").keep();
                return Err(e.context(format!("scratch files kept in {}", kept.display())));
            }
        }
        out.line("");
    }

    // ---- summary table ------------------------------------------------------
    out.line("## Summary");
    out.line("");
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| fixture | orig MB | total × | hot × | cold × | zstd-3 × | pack MB/s | verify MB/s | verify+src MB/s | unpack MB/s | zstd-3 c MB/s | zstd-3 d MB/s | peak RSS pack/verify/unpack MiB |"
    );
    let _ = writeln!(
        t,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &results {
        let _ = writeln!(
            t,
            "| {} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} |",
            r.label,
            r.original as f64 / 1e6,
            r.ratio(r.container),
            r.ratio(r.hot),
            r.ratio(r.cold),
            r.ratio(r.zstd_bytes),
            r.pack.mb_s(r.original),
            r.verify.mb_s(r.original),
            r.verify_src.mb_s(r.original),
            r.unpack.mb_s(r.original),
            r.zstd_c.mb_s_wall(r.original),
            r.zstd_d.mb_s_wall(r.original),
            mib(r.pack.rss),
            mib(r.verify.rss.max(r.verify_src.rss)),
            mib(r.unpack.rss),
        );
    }
    out.line(t.trim_end());
    out.line("");
    for r in &results {
        out.line(format!(
            "Reference: reading {} into memory (std::fs::read, warm cache): {:.0} MB/s.",
            r.label,
            r.read.mb_s_wall(r.original)
        ));
    }
    out.line(format!(
        "× = bytes / original bytes (smaller is better). tpde MB/s = original bytes / median of tpde's own \
         `seconds` (excludes process start) over {} reps; zstd MB/s = original bytes / median wall time of \
         the zstd process (`zstd -3 -T{}`, `zstd -d`). tpde unpack fsyncs its output, zstd -d does not. \
         Peak RSS is the max over reps (VmHWM reported by tpde), to compare with orig MB.",
        args.reps, args.threads
    ));

    if args.json {
        let v = json!({
            "date_utc": date,
            "machine": { "cpu": cpu, "cores": cores, "ram_gib": ram_gib },
            "tpde": { "version": tpde_version, "path": tpde, "git": git },
            "zstd_version": zstd_version,
            "command": command,
            "argv": argv,
            "threads": args.threads,
            "reps": args.reps,
            "throughput_basis": "original bytes / median of tpde's own seconds field (MB = 1e6 bytes); zstd: wall time",
            "fixtures": results.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

fn default_fixtures() -> Result<Vec<PathBuf>> {
    let root = match std::env::var_os("TPDE_FIXTURES") {
        Some(r) => PathBuf::from(r),
        None => PathBuf::from(
            std::env::var_os("HOME")
                .ok_or_else(|| anyhow!("neither TPDE_FIXTURES nor HOME is set"))?,
        )
        .join(".cache/tpde-fixtures"),
    };
    let files: Vec<PathBuf> = [
        "all-minilm-l6-v2-bf16/model.safetensors",
        "all-minilm-l6-v2/model.safetensors",
        "all-minilm-l6-v2-bf16/model.gguf",
        "all-minilm-l6-v2-f16/model.gguf",
        "smollm2-135m-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    let missing: Vec<String> = files
        .iter()
        .filter(|f| !f.is_file())
        .map(|f| f.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "fixture(s) missing: {}\n  run `fixtures/fetch.sh` first (it fills $TPDE_FIXTURES, default ~/.cache/tpde-fixtures)",
            missing.join(", ")
        );
    }
    Ok(files)
}

/// `target/release/tpde` under $CARGO_TARGET_DIR or the workspace, built if missing.
fn locate_tpde(args: &Args, manifest: &Path, out: &Out) -> Result<PathBuf> {
    if let Some(p) = &args.tpde {
        if !p.is_file() {
            bail!("--tpde {}: no such file", p.display());
        }
        return Ok(p.clone());
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => manifest.join(d), // an absolute $CARGO_TARGET_DIR replaces the join
        None => manifest.join("target"),
    };
    let bin = target.join("release").join("tpde");
    if args.build || !bin.is_file() {
        out.line(format!(
            "{}: running `cargo build --release --bin tpde` in {}",
            if bin.is_file() {
                "--build"
            } else {
                "target/release/tpde is missing"
            },
            manifest.display()
        ));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bin", "tpde"])
            .current_dir(manifest)
            .status()
            .context("cannot run cargo")?;
        if !status.success() {
            bail!("cargo build --release --bin tpde failed ({status})");
        }
        if !bin.is_file() {
            bail!(
                "cargo build succeeded but {} is still missing",
                bin.display()
            );
        }
    } else if let Some(newer) = newer_source(manifest, &bin) {
        out.line(format!(
            "warning: {} is older than {}; pass --build (or run `cargo build --release`) to measure the current code",
            bin.display(),
            newer.display()
        ));
    }
    Ok(bin)
}

/// A Rust source or manifest of the workspace modified after `bin`, if any.
fn newer_source(manifest: &Path, bin: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok()?;
    let mut stack = vec![
        manifest.join("crates"),
        manifest.join("Cargo.toml"),
        manifest.join("Cargo.lock"),
    ];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else if (p.extension().is_some_and(|e| e == "rs")
            || p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("Cargo.")))
            && m.modified().is_ok_and(|t| t > built)
        {
            return Some(p);
        }
    }
    None
}

// ---- measurements -----------------------------------------------------------

/// One timed operation over all repetitions.
#[derive(Default)]
struct Timing {
    /// tpde's own `seconds` field (empty for zstd and read).
    tool: Vec<f64>,
    /// Wall time around the subprocess (or the read).
    wall: Vec<f64>,
    /// Max peak RSS over repetitions, bytes (0 when not known).
    rss: u64,
}

impl Timing {
    fn mb_s(&self, bytes: u64) -> f64 {
        bytes as f64 / median(&self.tool) / 1e6
    }
    fn mb_s_wall(&self, bytes: u64) -> f64 {
        bytes as f64 / median(&self.wall) / 1e6
    }
    fn to_json(&self, bytes: u64) -> Value {
        let mut v = json!({ "wall_seconds": self.wall, "wall_median": median(&self.wall) });
        if !self.tool.is_empty() {
            v["seconds"] = json!(self.tool);
            v["seconds_median"] = json!(median(&self.tool));
            v["mb_per_s"] = json!(self.mb_s(bytes));
            v["peak_rss_bytes_max"] = json!(self.rss);
        } else {
            v["mb_per_s_wall"] = json!(self.mb_s_wall(bytes));
        }
        v
    }
}

struct FixtureResult {
    label: String,
    path: PathBuf,
    sha256: String,
    original: u64,
    container: u64,
    hot: u64,
    cold: u64,
    files: u64,
    tensors: u64,
    decomposed: u64,
    zstd_bytes: u64,
    read: Timing,
    pack: Timing,
    verify: Timing,
    verify_src: Timing,
    unpack: Timing,
    zstd_c: Timing,
    zstd_d: Timing,
}

impl FixtureResult {
    fn ratio(&self, b: u64) -> f64 {
        b as f64 / self.original as f64
    }
    fn to_json(&self) -> Value {
        let o = self.original;
        json!({
            "label": self.label,
            "path": self.path,
            "sha256": self.sha256,
            "original_bytes": o,
            "container_bytes": self.container,
            "hot_bytes": self.hot,
            "cold_bytes": self.cold,
            "files_bytes": self.files,
            "tensors": self.tensors,
            "decomposed_tensors": self.decomposed,
            "ratio_total": self.ratio(self.container),
            "ratio_hot": self.ratio(self.hot),
            "ratio_cold": self.ratio(self.cold),
            "zstd3_bytes": self.zstd_bytes,
            "ratio_zstd3": self.ratio(self.zstd_bytes),
            "read": self.read.to_json(o),
            "pack": self.pack.to_json(o),
            "verify": self.verify.to_json(o),
            "verify_source": self.verify_src.to_json(o),
            "unpack": self.unpack.to_json(o),
            "zstd3_compress": self.zstd_c.to_json(o),
            "zstd3_decompress": self.zstd_d.to_json(o),
        })
    }
}

fn bench_fixture(
    args: &Args,
    tpde: &Path,
    src: &Path,
    scratch: &Path,
    out: &Out,
) -> Result<FixtureResult> {
    let reps = args.reps;
    let threads = args.threads.to_string();

    // Warm the page cache and take the reference digest.
    let data = std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
    let original = data.len() as u64;
    let sha = sha256_hex(&data);
    drop(data);

    let mut read = Timing::default();
    for _ in 0..reps {
        let t = Instant::now();
        let d = std::fs::read(src)?;
        read.wall.push(t.elapsed().as_secs_f64());
        std::hint::black_box(&d);
    }

    let src_s = src
        .to_str()
        .ok_or_else(|| anyhow!("{}: path is not UTF-8", src.display()))?;
    let dir = scratch.join(label(src));
    std::fs::create_dir_all(&dir)?;
    let container = dir.join("model.tpde");
    let container_s = container
        .to_str()
        .ok_or_else(|| anyhow!("scratch path is not UTF-8"))?;

    // pack
    let mut pack = Timing::default();
    let mut summary = Value::Null;
    for rep in 0..reps {
        let _ = std::fs::remove_file(&container);
        let (v, wall) = run_tpde(
            tpde,
            &[
                "--threads",
                &threads,
                "pack",
                src_s,
                "-o",
                container_s,
                "--json",
            ],
        )?;
        pack.record(&v, wall)?;
        if rep > 0 && v["container_bytes"] != summary["container_bytes"] {
            bail!("pack is not deterministic: container size differs between repetitions");
        }
        summary = v;
    }
    let field = |k: &str| -> Result<u64> {
        summary[k]
            .as_u64()
            .ok_or_else(|| anyhow!("pack --json has no number {k:?}: {summary}"))
    };
    if field("original_bytes")? != original {
        bail!(
            "pack reports original_bytes {} but the file has {original}",
            field("original_bytes")?
        );
    }
    if std::fs::metadata(&container)?.len() != field("container_bytes")? {
        bail!("container file size differs from the container_bytes pack reports");
    }

    // verify, without and with the source
    let mut verify = Timing::default();
    let mut verify_src = Timing::default();
    for _ in 0..reps {
        let (v, wall) = run_tpde(
            tpde,
            &["--threads", &threads, "verify", container_s, "--json"],
        )?;
        check_verify(&v, original, false)?;
        verify.record(&v, wall)?;
    }
    for _ in 0..reps {
        let (v, wall) = run_tpde(
            tpde,
            &[
                "--threads",
                &threads,
                "verify",
                container_s,
                "--source",
                src_s,
                "--json",
            ],
        )?;
        check_verify(&v, original, true)?;
        verify_src.record(&v, wall)?;
    }

    // unpack into a fresh folder each time, then compare bytes with the source
    let mut unpack = Timing::default();
    let file_name = src
        .file_name()
        .ok_or_else(|| anyhow!("{}: no file name", src.display()))?;
    for rep in 0..reps {
        let udir = dir.join(format!("unpacked-{rep}"));
        let udir_s = udir
            .to_str()
            .ok_or_else(|| anyhow!("scratch path is not UTF-8"))?;
        let (v, wall) = run_tpde(
            tpde,
            &[
                "--threads",
                &threads,
                "unpack",
                container_s,
                "-o",
                udir_s,
                "--json",
            ],
        )?;
        unpack.record(&v, wall)?;
        if v["bytes"].as_u64() != Some(original) {
            bail!(
                "unpack reports {} bytes, the source has {original}",
                v["bytes"]
            );
        }
        let restored = std::fs::read(udir.join(file_name))
            .with_context(|| format!("unpack did not write {}", udir.join(file_name).display()))?;
        let got = sha256_hex(&restored);
        if got != sha {
            bail!(
                "UNPACKED FILE DIFFERS FROM THE SOURCE: {} sha256 {got}, source {} sha256 {sha}",
                udir.join(file_name).display(),
                src.display()
            );
        }
        std::fs::remove_dir_all(&udir)?;
    }

    // zstd -3 baseline on the same file
    let zst = dir.join("model.zst");
    let zout = dir.join("model.zstd-out");
    let t_flag = format!("-T{}", args.threads);
    let zst_s = zst
        .to_str()
        .ok_or_else(|| anyhow!("scratch path is not UTF-8"))?;
    let zout_s = zout
        .to_str()
        .ok_or_else(|| anyhow!("scratch path is not UTF-8"))?;
    let mut zstd_c = Timing::default();
    for _ in 0..reps {
        zstd_c.wall.push(run_timed(
            "zstd",
            &["-3", "-q", "-f", &t_flag, "-o", zst_s, src_s],
        )?);
    }
    let zstd_bytes = std::fs::metadata(&zst)?.len();
    let mut zstd_d = Timing::default();
    for _ in 0..reps {
        zstd_d
            .wall
            .push(run_timed("zstd", &["-d", "-q", "-f", "-o", zout_s, zst_s])?);
    }
    if sha256_hex(&std::fs::read(&zout)?) != sha {
        bail!("zstd round trip of {} is not identical (?)", src.display());
    }
    std::fs::remove_dir_all(&dir)?;

    let r = FixtureResult {
        label: label(src),
        path: src.to_path_buf(),
        sha256: sha,
        original,
        container: field("container_bytes")?,
        hot: field("hot_bytes")?,
        cold: field("cold_bytes")?,
        files: field("files_bytes")?,
        tensors: field("tensors")?,
        decomposed: field("decomposed_tensors")?,
        zstd_bytes,
        read,
        pack,
        verify,
        verify_src,
        unpack,
        zstd_c,
        zstd_d,
    };
    out.line(format!(
        "{} bytes (sha256 {}), {} tensors ({} decomposed); unpacked bytes identical to the source in every rep",
        r.original, r.sha256, r.tensors, r.decomposed
    ));
    out.line(format!(
        "container {} bytes = {:.3} × (hot {:.3} ×, cold {:.3} ×, files {:.5} ×); zstd -3: {} bytes = {:.3} ×",
        r.container,
        r.ratio(r.container),
        r.ratio(r.hot),
        r.ratio(r.cold),
        r.ratio(r.files),
        r.zstd_bytes,
        r.ratio(r.zstd_bytes)
    ));
    out.line("");
    out.line(
        "| operation | tool s median [min..max] | wall s median [min..max] | MB/s | peak RSS MiB |",
    );
    out.line("|---|---:|---:|---:|---:|");
    let row = |name: &str, t: &Timing| {
        let tool = if t.tool.is_empty() {
            "–".to_string()
        } else {
            spread(&t.tool)
        };
        let (rate, rss) = if t.tool.is_empty() {
            (
                format!("{:.0} (wall)", t.mb_s_wall(r.original)),
                "–".to_string(),
            )
        } else {
            (
                format!("{:.0}", t.mb_s(r.original)),
                format!("{:.1}", mib(t.rss)),
            )
        };
        out.line(format!(
            "| {name} | {tool} | {} | {rate} | {rss} |",
            spread(&t.wall)
        ));
    };
    row("tpde pack", &r.pack);
    row("tpde verify", &r.verify);
    row("tpde verify --source", &r.verify_src);
    row("tpde unpack", &r.unpack);
    row(&format!("zstd -3 -T{} compress", args.threads), &r.zstd_c);
    row("zstd -d decompress", &r.zstd_d);
    row("std::fs::read", &r.read);
    Ok(r)
}

impl Timing {
    fn record(&mut self, v: &Value, wall: f64) -> Result<()> {
        let s = v["seconds"]
            .as_f64()
            .ok_or_else(|| anyhow!("tpde --json output has no seconds: {v}"))?;
        self.tool.push(s);
        self.wall.push(wall);
        self.rss = self.rss.max(v["peak_rss_bytes"].as_u64().unwrap_or(0));
        Ok(())
    }
}

fn check_verify(v: &Value, original: u64, with_source: bool) -> Result<()> {
    if v["original_bytes"].as_u64() != Some(original) {
        bail!(
            "verify reports original_bytes {} but the source has {original}",
            v["original_bytes"]
        );
    }
    if v["compared_with_source"].as_bool() != Some(with_source) {
        bail!(
            "verify reports compared_with_source = {}, expected {with_source}",
            v["compared_with_source"]
        );
    }
    Ok(())
}

/// Runs tpde, fails on a non-zero exit, returns its JSON and the wall time.
fn run_tpde(tpde: &Path, args: &[&str]) -> Result<(Value, f64)> {
    let t = Instant::now();
    let o = Command::new(tpde)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", tpde.display()))?;
    let wall = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "`tpde {}` failed ({}): {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let v: Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "`tpde {}` did not print one JSON object: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout)
        )
    })?;
    Ok((v, wall))
}

/// Runs a command, fails on a non-zero exit, returns the wall time.
fn run_timed(prog: &str, args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let o = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {prog}"))?;
    let wall = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(wall)
}

/// First line of a command's stdout.
fn tool_output(prog: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(prog).args(args).output()?;
    if !o.status.success() {
        bail!("{prog} failed");
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

fn git_commit(dir: &Path) -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "--short", "HEAD"]) {
        Some(c) => match run(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{c} (+ uncommitted changes)"),
            _ => c,
        },
        None => "unknown".into(),
    }
}

// ---- small helpers -------------------------------------------------------------

/// `all-minilm-l6-v2-bf16` for `.../all-minilm-l6-v2-bf16/model.safetensors`,
/// `all-minilm-l6-v2-bf16 (gguf)` for its `model.gguf`, else the file name.
fn label(p: &Path) -> String {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match p.parent().and_then(|d| d.file_name()) {
        Some(d) if name == "model.safetensors" => d.to_string_lossy().into_owned(),
        Some(d) if name == "model.gguf" => format!("{} (gguf)", d.to_string_lossy()),
        _ => name,
    }
}

fn same_filesystem(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev(),
        _ => false,
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// "0.123 [0.120..0.130]"
fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.3} [{:.3}..{:.3}]", median(v), lo, hi)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Current time as `YYYY-MM-DD HH:MM:SS UTC`, from the Unix clock.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes a safetensors file of `mib` MiB of BF16 matrices [2048, 2048]
/// (8 MiB each) with weight-like values: a sum of uniforms scaled to σ =
/// 0.02, rounded to BF16. Streams, so it needs no memory of its own size.
fn write_synthetic_bf16(path: &Path, mib: usize) -> Result<()> {
    use std::io::Write;
    let (rows, cols) = (2048u64, 2048u64);
    let per = rows * cols * 2;
    let n = ((mib as u64) << 20).div_ceil(per).max(1);
    let mut header = String::from("{");
    for l in 0..n {
        if l > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"model.layers.{l}.mlp.up_proj.weight\":{{\"dtype\":\"BF16\",\"shape\":[{rows},{cols}],\"data_offsets\":[{},{}]}}",
            l * per,
            (l + 1) * per
        ));
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut state = 0x5EED_u64;
    let mut buf = vec![0u8; per as usize];
    for _ in 0..n {
        for v in buf.chunks_exact_mut(2) {
            let mut s = 0.0f32;
            for _ in 0..4 {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
                s += (r >> 40) as f32 / (1u64 << 24) as f32;
            }
            let x = (s - 2.0) * 1.732 * 0.02;
            let b = x.to_bits();
            let bf = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
            v.copy_from_slice(&bf.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    w.flush()?;
    Ok(())
}
