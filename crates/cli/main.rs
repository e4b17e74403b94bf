//! `tpde`: command-line definition and glue. All work happens in the
//! library crates; this file parses flags, shows progress and prints results.

mod demo;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tpde_pack::{PackOptions, Progress};

/// Tiered, lossless, streamable containers for large language models.
///
/// Exit codes: 0 success, 1 verification found a mismatch, 2 usage, I/O or format error.
#[derive(Parser)]
#[command(name = "tpde", version, propagate_version = true)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Base {
    Q4,
    Q8,
    /// Store every tensor exactly (no hot/cold decomposition).
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum FidelityArg {
    Base,
    Exact,
}

#[derive(Subcommand)]
enum Command {
    /// Pack a .safetensors file or a Hugging Face model folder into one container.
    Pack {
        /// A .safetensors file or a model folder.
        source: PathBuf,
        /// Output container.
        #[arg(short, long)]
        output: PathBuf,
        /// Hot-tier base quantizer.
        #[arg(long, value_enum, default_value = "q4")]
        base: Base,
        /// Elements per quantization group.
        #[arg(long, default_value_t = 64)]
        group_size: u32,
        /// Target original elements per cold chunk (unit of parallel decode and random access).
        #[arg(long, default_value_t = 1 << 18)]
        chunk_elems: u64,
        /// zstd level of the cold tier and carried files.
        #[arg(long, default_value_t = 3)]
        zstd_level: i32,
        /// Float matrices with fewer elements are stored exactly, like norms and biases.
        #[arg(long, default_value_t = 4096)]
        min_decompose_elems: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum and digest and rebuild every tensor bit for bit.
    Verify {
        container: PathBuf,
        /// Also compare every byte with the source file or folder.
        #[arg(long)]
        source: Option<PathBuf>,
        /// Also quantize every rebuilt tensor again and require the hot tier to be identical:
        /// proves the base a runtime loads is the quantization of exactly these weights (slower).
        #[arg(long)]
        requantize: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write the original files back, byte-identical, into a new folder.
    Unpack {
        container: PathBuf,
        /// Destination folder (must not exist, or be empty).
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show layout, tiers and sizes.
    Inspect {
        container: PathBuf,
        /// One JSON object (with per-tensor detail).
        #[arg(long)]
        json: bool,
        /// List every tensor in the table.
        #[arg(long)]
        tensors: bool,
        /// For mixture-of-experts models: a layers × experts table of sizes.
        #[arg(long)]
        experts: bool,
    },
    /// Write one expert of a mixture-of-experts model as a .safetensors file, reading only its chunks.
    Extract {
        container: PathBuf,
        /// Transformer layer.
        #[arg(long)]
        layer: u32,
        /// Expert index within the layer.
        #[arg(long)]
        expert: u32,
        /// `exact`: the original bytes; `base`: the hot tier's quantized values.
        #[arg(long, value_enum, default_value = "exact")]
        fidelity: FidelityArg,
        /// Output .safetensors file.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run pack → verify → unpack → inspect on a small model generated on the spot.
    Demo {
        /// Work folder (default: a new temporary folder, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // SAFETY: restoring the default SIGPIPE disposition before any thread
    // starts; `tpde inspect | head` then ends quietly instead of panicking.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("tpde: error: cannot start {n} threads: {e}");
            return ExitCode::from(2);
        }
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            let integrity = e.chain().any(|c| {
                c.downcast_ref::<tpde_pack::Error>()
                    .is_some_and(|e| e.is_integrity())
            });
            // Library errors already carry their file and cause in one
            // sentence; the chain would repeat them.
            eprintln!("tpde: error: {}", e.to_string().replace('\n', " "));
            ExitCode::from(if integrity { 1 } else { 2 })
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Pack {
            source,
            output,
            base,
            group_size,
            chunk_elems,
            zstd_level,
            min_decompose_elems,
            json,
        } => {
            let opts = PackOptions {
                base: match base {
                    Base::Q4 => Some(tpde_codecs::BaseCodec::Q4),
                    Base::Q8 => Some(tpde_codecs::BaseCodec::Q8),
                    Base::None => None,
                },
                group_size,
                chunk_elems: chunk_elems.max(1),
                zstd_level,
                min_decompose_elems,
            };
            let bar = Bar::new(json);
            let s = tpde_pack::pack::pack(&source, &output, &opts, &bar)?;
            bar.clear();
            for w in &s.warnings {
                eprintln!("tpde: warning: {}: {w}", source.display());
            }
            if json {
                print_json(&with_rss(serde_json::to_value(&s)?));
            } else {
                let r = |b: u64| b as f64 / s.original_bytes.max(1) as f64;
                println!("packed {} → {}", source.display(), output.display());
                println!("  original     {:>14} bytes", s.original_bytes);
                println!(
                    "  container    {:>14} bytes  {:.3} ×",
                    s.container_bytes,
                    r(s.container_bytes)
                );
                println!(
                    "    hot        {:>14} bytes  {:.3} ×",
                    s.hot_bytes,
                    r(s.hot_bytes)
                );
                println!(
                    "    cold       {:>14} bytes  {:.3} ×",
                    s.cold_bytes,
                    r(s.cold_bytes)
                );
                if s.expert_shards > 0 {
                    println!(
                        "    experts    {:>14} bytes  {:.3} ×  ({} shards)",
                        s.expert_bytes,
                        r(s.expert_bytes),
                        s.expert_shards
                    );
                }
                println!(
                    "    files      {:>14} bytes  {:.3} ×",
                    s.files_bytes,
                    r(s.files_bytes)
                );
                println!(
                    "  tensors      {} ({} decomposed, {} stored exactly) in {} file(s)",
                    s.tensors, s.decomposed_tensors, s.raw_tensors, s.files
                );
                println!(
                    "  time         {:.2} s  ({:.0} MB/s of original)",
                    s.seconds,
                    s.original_bytes as f64 / s.seconds / 1e6
                );
                print_rss();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            container,
            source,
            requantize,
            json,
        } => {
            let bar = Bar::new(json);
            let opts = tpde_pack::VerifyOptions { source, requantize };
            let r = tpde_pack::verify_with(&container, &opts, &bar)?;
            bar.clear();
            if json {
                print_json(&with_rss(serde_json::to_value(&r)?));
            } else {
                println!(
                    "ok: {} tensors in {} file(s) rebuilt bit-exact, every checksum and digest matches{}",
                    r.tensors,
                    r.files,
                    if r.compared_with_source { ", identical to the source" } else { "" }
                );
                if r.requantized_hot_tier {
                    println!("  the hot tier is the quantization of the rebuilt weights");
                }
                println!(
                    "  {} original bytes in {:.2} s ({:.0} MB/s)",
                    r.original_bytes,
                    r.seconds,
                    r.original_bytes as f64 / r.seconds / 1e6
                );
                print_rss();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Unpack {
            container,
            output,
            json,
        } => {
            let bar = Bar::new(json);
            let r = tpde_pack::unpack(&container, &output, &bar)?;
            bar.clear();
            if json {
                print_json(&with_rss(serde_json::to_value(&r)?));
            } else {
                println!(
                    "unpacked {} file(s), {} bytes, into {} in {:.2} s",
                    r.files,
                    r.bytes,
                    output.display(),
                    r.seconds
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            container,
            json,
            tensors,
            experts,
        } => {
            let i = tpde_pack::inspect(&container)?;
            if json {
                print_json(&serde_json::to_value(&i)?);
            } else {
                print_inspection(&i, tensors);
                if experts {
                    print_experts(&i);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Extract {
            container,
            layer,
            expert,
            fidelity,
            output,
            json,
        } => {
            let start = std::time::Instant::now();
            let c = tpde_pack::Container::open(&container)?;
            let f = match fidelity {
                FidelityArg::Base => tpde_pack::Fidelity::Base,
                FidelityArg::Exact => tpde_pack::Fidelity::Exact,
            };
            let tensors = tpde_pack::extract_expert(&c, layer, expert, f)?;
            let fname = match fidelity {
                FidelityArg::Base => "base",
                FidelityArg::Exact => "exact",
            };
            let meta = vec![(
                "tpde.extracted".to_string(),
                format!("layer {layer} expert {expert} fidelity {fname}"),
            )];
            let written = tpde_pack::extract::write_safetensors(&output, &tensors, &meta)?;
            let seconds = start.elapsed().as_secs_f64();
            if json {
                print_json(&serde_json::json!({
                    "layer": layer, "expert": expert, "fidelity": fname,
                    "tensors": tensors.len(), "bytes_written": written,
                    "container_bytes_read": c.bytes_read(), "seconds": seconds,
                }));
            } else {
                println!(
                    "expert {expert} of layer {layer} ({fname}): {} tensors, {written} bytes → {}",
                    tensors.len(),
                    output.display()
                );
                println!(
                    "  read {} bytes of the {}-byte container in {seconds:.3} s",
                    c.bytes_read(),
                    c.len
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir } => demo::run(dir.as_deref()),
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string(v).expect("serializable"));
}

/// Peak resident memory of this process (VmHWM), when the system reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn with_rss(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.insert("peak_rss_bytes".into(), peak_rss_bytes().into());
    }
    v
}

fn print_rss() {
    if let Some(b) = peak_rss_bytes() {
        println!("  peak RSS     {:.1} MiB", b as f64 / (1 << 20) as f64);
    }
}

pub fn print_inspection(i: &tpde_pack::Inspection, tensors: bool) {
    println!(
        "{}  (tpde format v{}, {})",
        i.path, i.format_version, i.created_by
    );
    println!(
        "  base {} group {}, cold chunks of {} elements, zstd level {}",
        i.params.base, i.params.group_size, i.params.chunk_elems, i.params.zstd_level
    );
    println!("  {:<10} {:>14} {:>9}", "", "bytes", "× orig");
    println!(
        "  {:<10} {:>14} {:>9}",
        "original", i.original_bytes, "1.000"
    );
    println!(
        "  {:<10} {:>14} {:>9.3}",
        "container", i.container_bytes, i.ratio
    );
    for (name, t) in [
        ("hot", &i.tiers.hot),
        ("cold", &i.tiers.cold),
        ("experts", &i.tiers.experts),
        ("files", &i.tiers.files),
    ] {
        println!("  {:<10} {:>14} {:>9.3}", name, t.bytes, t.ratio);
    }
    println!(
        "  {} files, {} tensors, {} sections",
        i.files.len(),
        i.tensors.len(),
        i.sections.len()
    );
    for f in &i.files {
        println!("    {:<40} {:>12} bytes  {}", f.path, f.bytes, f.kind);
        if let Some(g) = &f.gguf {
            let types: Vec<String> = g
                .tensor_types
                .iter()
                .map(|(t, n)| format!("{t} ×{n}"))
                .collect();
            println!(
                "      GGUF v{}, architecture {}, alignment {}, tensors: {}",
                g.version,
                g.architecture.as_deref().unwrap_or("(none)"),
                g.alignment,
                types.join(", ")
            );
            // Hyper-parameters: the architecture's own scalar keys.
            let prefix = format!("{}.", g.architecture.as_deref().unwrap_or("general"));
            for (k, v) in g
                .metadata
                .iter()
                .filter(|(k, v)| k.starts_with(&prefix) && !v.is_object())
            {
                println!("      {k} = {v}");
            }
        }
    }
    if tensors {
        println!(
            "  {:<48} {:>6} {:>9} {:>12} {:>12} {:>12}",
            "tensor", "dtype", "storage", "original", "hot", "cold"
        );
        for t in &i.tensors {
            println!(
                "  {:<48} {:>6} {:>9} {:>12} {:>12} {:>12}",
                t.name, t.dtype, t.storage, t.original_bytes, t.hot_bytes, t.cold_bytes
            );
        }
    }
}

/// Layers × experts: stored bytes (hot + cold) of each expert, in KiB.
fn print_experts(i: &tpde_pack::Inspection) {
    if i.experts.is_empty() {
        println!("  no mixture-of-experts layers");
        return;
    }
    let n = i.experts.iter().map(|l| l.experts.len()).max().unwrap_or(0);
    let sharded = i
        .experts
        .iter()
        .all(|l| l.experts.iter().all(|x| x.shard.is_some()));
    println!(
        "  experts: stored KiB (hot + cold) per layer × expert; original KiB in brackets; {}",
        if sharded {
            "each expert is one contiguous shard"
        } else {
            "not stored as shards (packed by an older version, or an inconsistent layout)"
        }
    );
    let head: String = (0..n).map(|e| format!("{:>16}", format!("e{e}"))).collect();
    println!("  {:>8}{head}", "layer");
    for l in &i.experts {
        let cells: String = l
            .experts
            .iter()
            .map(|x| {
                let stored = (x.hot_bytes + x.cold_bytes) as f64 / 1024.0;
                format!(
                    "{:>16}",
                    format!("{stored:.0} [{:.0}]", x.original_bytes as f64 / 1024.0)
                )
            })
            .collect();
        println!("  {:>8}{cells}", l.layer);
    }
}

/// indicatif progress on stderr, only when stderr is a terminal and the
/// output is not JSON.
struct Bar(Option<ProgressBar>);

impl Bar {
    fn new(json: bool) -> Bar {
        if json || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        Bar(Some(ProgressBar::hidden()))
    }

    fn clear(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn begin(&self, label: &str, total: u64) {
        if let Some(b) = &self.0 {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b.set_length(total);
            b.set_position(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
        }
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
    fn end(&self) {
        self.clear();
    }
}
