//! `tpde`: command-line definition and glue. All work happens in the
//! library crates; this file parses flags, shows progress and prints results.

mod budget;
mod demo;
mod run;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tpde_loader::telemetry::peak_rss_bytes;
use tpde_pack::{PackOptions, Progress};

/// Counts the allocations of a thread whose work a model file can make
/// unbounded (a chat template), to end it with an error ([`budget`]).
#[global_allocator]
static ALLOCATOR: budget::Budgeted = budget::Budgeted;

/// Tiered, lossless, streamable containers for large language models.
///
/// Exit codes: 0 success, 1 verification found a mismatch, 2 usage, I/O or format error.
#[derive(Parser)]
#[command(name = "tpde", version, propagate_version = true)]
struct Cli {
    /// Worker threads (default: all cores; at most 1024).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// The most worker threads `--threads` may ask for.
const MAX_THREADS: usize = 1024;

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

impl From<FidelityArg> for tpde_pack::Fidelity {
    fn from(f: FidelityArg) -> Self {
        match f {
            FidelityArg::Base => tpde_pack::Fidelity::Base,
            FidelityArg::Exact => tpde_pack::Fidelity::Exact,
        }
    }
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
    /// Generate text with a packed model (Llama family, Mixtral-style MoE) on the CPU.
    Run {
        container: PathBuf,
        /// The prompt; rendered with the model's chat template unless --raw.
        #[arg(short, long)]
        prompt: String,
        /// Most tokens to generate.
        #[arg(short = 'n', long, default_value_t = 128)]
        tokens: usize,
        /// 0: greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling: the smallest set of tokens holding this much probability.
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// `exact`: the original weights; `base`: the hot tier's quantized weights.
        #[arg(long, value_enum, default_value = "exact")]
        fidelity: FidelityArg,
        /// Memory budget of the whole process, e.g. 256MiB (default: no limit). A budget
        /// that cannot hold the model streams its layers from the container for every token.
        #[arg(long, value_parser = parse_size)]
        ram: Option<u64>,
        /// Read streamed layers with O_DIRECT (bypassing the page cache).
        #[arg(long)]
        direct: bool,
        /// Feed the prompt as it is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// Print the figures as one JSON object on stderr at the end.
        #[arg(long)]
        json: bool,
    },
    /// Run a packed model and report llama-bench-style figures with an audit trail.
    ///
    /// Without `--stream-only`: prompt processing (`pp`, `-p` tokens) and generation (`tg`, `-n`
    /// tokens) in tokens per second, mean ± sd over `--reps`, time to first token and load time.
    /// With `--stream-only`: the loader alone over the whole model, step by step in execution
    /// order, under the `--ram` budget, measured against the raw sequential read of the same file
    /// in the same run.
    Bench {
        container: PathBuf,
        /// Only load: read, check, decompress and reconstruct every tensor, then drop it.
        #[arg(long)]
        stream_only: bool,
        /// Prompt tokens of the pp test (0: skip it).
        #[arg(short = 'p', long, default_value_t = 512)]
        prompt: usize,
        /// Generated tokens of the tg test (0: skip it).
        #[arg(short = 'n', long, default_value_t = 128)]
        gen: usize,
        /// `exact`: the original bytes; `base`: the hot tier's values.
        #[arg(long, value_enum, default_value = "exact")]
        fidelity: FidelityArg,
        /// Memory budget of the whole process, e.g. 512MiB, 2GiB, 100MB (default: no limit).
        #[arg(long, value_parser = parse_size)]
        ram: Option<u64>,
        /// Read with O_DIRECT (aligned buffers, bypassing the page cache).
        #[arg(long)]
        direct: bool,
        /// The read pool's size, in the largest step's reads: steps read ahead
        /// of the consumer, at least (2: double buffering; small steps share one).
        #[arg(long, default_value_t = 2)]
        prefetch: usize,
        /// Keep the page cache warm (default: drop the container from it before each read).
        #[arg(long)]
        warm: bool,
        /// Stream the layers from the container for every token even when --ram could hold them.
        #[arg(long, conflicts_with = "stream_only")]
        stream_layers: bool,
        /// Most memory for the expert cache when layers stream, e.g. 64MiB (default: what --ram
        /// leaves).
        #[arg(long, value_parser = parse_size, conflicts_with = "stream_only")]
        expert_cache: Option<u64>,
        /// Passes (--stream-only: figures are medians) or repetitions of each test.
        #[arg(long, default_value_t = 3)]
        reps: usize,
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Some(n) = cli.threads {
        // A thread that fails to start leaves the pool's builder waiting
        // for it forever: numbers no machine needs are refused up front.
        if n > MAX_THREADS {
            eprintln!("tpde: error: --threads {n}: at most {MAX_THREADS}");
            return ExitCode::from(2);
        }
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
            eprintln!(
                "tpde: error: {}",
                printable(&e.to_string().replace('\n', " "))
            );
            ExitCode::from(if integrity { 1 } else { 2 })
        }
    }
}

/// `--help` and `--version` as clap prints them; any other argument error
/// as one line (clap's first, without its `error: `), like every other
/// error, with where to look for the usage. Exit code 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
    }
    let text = e.render().to_string();
    // clap's message is its first paragraph (a list of missing arguments
    // continues on indented lines); then perhaps a tip, then the usage.
    let first: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty() && !l.starts_with("tip: "))
        .collect();
    let first = first.join(" ");
    let first = first.strip_prefix("error: ").unwrap_or(&first);
    let find = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
    };
    // clap's tip, when it has one, says what was probably meant.
    let tip = find("tip: ").map(|t| format!("; {t}")).unwrap_or_default();
    let usage = find("Usage: ").map_or_else(|| "see tpde --help".into(), |u| format!("usage: {u}"));
    eprintln!("tpde: error: {first}{tip} ({usage})");
    ExitCode::from(2)
}

fn print_model_bench(r: &tpde_engine::bench::BenchReport) {
    let x = &r.results;
    let m = &r.model;
    println!(
        "model    {} · {} layers · width {} · vocab {}{}",
        m.arch,
        m.layers,
        m.d_model,
        m.vocab,
        if m.experts > 0 {
            format!(" · {} experts, {} used", m.experts, m.experts_used)
        } else {
            String::new()
        }
    );
    let p = r.audit["prompt_tokens"].as_u64().unwrap_or(0);
    let n = r.audit["gen_tokens"].as_u64().unwrap_or(0);
    if let Some(pp) = x.pp {
        println!("pp{p:<6} {:>9.1} ± {:.1} tok/s", pp.mean, pp.sd);
    }
    if let Some(tg) = x.tg {
        println!("tg{n:<6} {:>9.1} ± {:.1} tok/s", tg.mean, tg.sd);
    }
    if let Some(t) = x.ttft_ms {
        println!("first token      {t:.1} ms (pp{p} + choice)");
    }
    println!(
        "load             {:.3} s ({} bytes read)",
        x.load_seconds, x.bytes_read
    );
    let ls = &x.load_stream;
    println!(
        "load stages      read {:.4} s · checksum {:.4} s · decompress {:.4} s · reconstruct {:.4} s (busy, summed over threads); {:.2} GB/s delivered",
        ls.stages.read,
        ls.stages.checksum,
        ls.stages.decompress,
        ls.stages.reconstruct,
        x.load_effective_gbps
    );
    if let (Some(d), Some(iops)) = (&x.disk, x.disk_iops) {
        println!(
            "disk {:<11} {:.1} MiB read in {} requests ({iops:.0} IOPS) during the tg tests; page cache {}",
            d.device,
            d.read_bytes as f64 / (1u64 << 20) as f64,
            d.reads,
            x.page_cache
        );
    }
    println!(
        "streamed/token   {:.0} bytes{}",
        x.bytes_streamed_per_token,
        if x.bytes_streamed_per_token == 0.0 {
            " (every weight resident)"
        } else {
            ""
        }
    );
    if x.streamed {
        println!(
            "placement        layers streamed per token ({} reads); resident: {} bytes of weights, {} for the KV cache and activations",
            if x.direct { "O_DIRECT" } else { "buffered: the page cache may serve them" },
            x.placement.resident_weight_bytes,
            x.placement.session_bytes
        );
    }
    if let (Some([a, b]), Some(bound), Some(ratio)) =
        (x.raw_read_gbps, x.physical_bound_tps, x.tg_vs_bound)
    {
        println!(
            "physical bound   {bound:.1} tok/s (raw read {a:.2} / {b:.2} GB/s before / after ÷ bytes per token); tg ÷ bound {ratio:.2}"
        );
        if let Some(g) = x.container_read_gbps {
            println!("container read   {g:.2} GB/s while a read was in flight (the loader, over the run)");
        }
    }
    if let Some(h) = x.expert_cache_hit_rate {
        match &x.expert_cache {
            Some(c) => println!(
                "expert cache     {:.1} % hits ({} hits, {} misses, {} evicted; {} of {} bytes at most)",
                h * 100.0,
                c.hits,
                c.misses,
                c.evictions,
                c.peak_bytes,
                c.capacity_bytes
            ),
            None => println!("expert hits      {:.1} % (every expert resident)", h * 100.0),
        }
    }
    println!(
        "memory           RAM {} · GPU {} · SSD {} bytes; peak RSS {}",
        x.memory.ram_bytes,
        x.memory.gpu_bytes,
        x.memory.ssd_bytes,
        x.peak_rss_bytes.map_or("?".into(), |b| b.to_string())
    );
    let env = &r.audit["environment"];
    println!(
        "audit            tpde {} ({}) · {} threads · {} · {}",
        env["tpde_version"].as_str().unwrap_or("?"),
        env["git_commit"].as_str().unwrap_or("?"),
        x.threads,
        env["cpu_model"].as_str().unwrap_or("?"),
        r.audit["started"].as_str().unwrap_or("?")
    );
}

/// A byte count with an optional unit: B, KB, MB, GB, TB (powers of 1000)
/// or KiB, MiB, GiB, TiB (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (for example 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" | "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    let v = n * mult;
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Bench {
            container,
            stream_only,
            fidelity,
            ram,
            direct,
            prefetch,
            warm,
            stream_layers,
            expert_cache,
            reps,
            json,
            prompt,
            gen,
        } => {
            let load = tpde_loader::LoadOptions {
                fidelity: fidelity.into(),
                ram_budget: ram,
                prefetch: prefetch.max(1),
                direct,
                ..Default::default()
            };
            if !stream_only {
                let opts = tpde_engine::bench::BenchOptions {
                    load,
                    prompt,
                    gen,
                    reps,
                    stream_layers,
                    expert_cache,
                    argv: std::env::args().collect(),
                };
                if !json && std::io::stderr().is_terminal() {
                    eprintln!(
                        "tpde bench: pp{prompt} and tg{gen}, {} repetition(s) …",
                        reps.max(1)
                    );
                }
                let r = tpde_engine::bench::run(&container, &opts)?;
                if json {
                    print_json(&serde_json::to_value(&r)?);
                } else {
                    print_model_bench(&r);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let opts = tpde_loader::bench::BenchOptions {
                load,
                cold: !warm,
                reps: reps.max(1),
                argv: std::env::args().collect(),
            };
            if !json && std::io::stderr().is_terminal() {
                eprintln!(
                    "tpde bench: {} pass(es) over {} …",
                    opts.reps,
                    container.display()
                );
            }
            let r = tpde_loader::bench::run(&container, &opts)?;
            if json {
                print_json(&serde_json::to_value(&r)?);
            } else {
                print_bench(&r);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            container,
            prompt,
            tokens,
            temperature,
            top_p,
            seed,
            fidelity,
            ram,
            direct,
            raw,
            json,
        } => {
            let opts = run::RunOptions {
                load: tpde_loader::LoadOptions {
                    fidelity: fidelity.into(),
                    ram_budget: ram,
                    direct,
                    ..Default::default()
                },
                prompt,
                tokens,
                temperature,
                top_p,
                seed,
                raw,
                json,
            };
            run::run(&container, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
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
                eprintln!("tpde: warning: {}: {}", source.display(), printable(w));
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
            tpde_pack::atomic::refuse_inputs(&output, [container.as_path()])?;
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

/// The readable report of `tpde bench --stream-only`.
fn print_bench(b: &tpde_loader::bench::BenchReport) {
    let r = &b.results;
    let gb = |x: f64| format!("{x:.3} GB/s");
    let mib = |x: u64| format!("{:.1} MiB", x as f64 / (1 << 20) as f64);
    let env = &b.audit["environment"];
    println!(
        "tpde bench --stream-only: fidelity {}, {}, page cache {}, {} pass(es), {} decode threads",
        r.fidelity,
        if r.direct {
            "O_DIRECT"
        } else {
            "buffered reads"
        },
        r.page_cache,
        b.passes.len(),
        b.audit["threads"]
    );
    println!(
        "  container {}  ({} original bytes, {} steps, {} tensors)",
        b.audit["container"]["path"].as_str().unwrap_or(""),
        r.original_bytes,
        r.steps,
        r.tensors
    );
    println!(
        "  {:<34} {:>14}",
        "raw read, O_DIRECT",
        r.raw_direct_gbps.map_or("n/a".into(), gb)
    );
    println!(
        "  {:<34} {:>14}",
        "raw read, buffered",
        gb(r.raw_buffered_gbps)
    );
    println!(
        "  {:<34} {:>14}  {:.2} × raw (goal ≥ 0.9)",
        "container read",
        gb(r.container_read_gbps),
        r.read_vs_raw
    );
    println!(
        "  {:<34} {:>14}  {:.2} × raw; {:.2} × the disk bound raw × original ÷ read (goal ≥ 0.9)",
        "effective (original bytes / s)",
        gb(r.effective_gbps),
        r.effective_vs_raw,
        r.effective_vs_bound
    );
    println!(
        "  {:<34} {:>14}  (open: manifest, planning, committing {} of memory)",
        "effective, counting the open",
        gb(r.effective_with_open_gbps),
        mib(r.memory.total - r.memory.baseline_rss)
    );
    println!(
        "  {:<34} {:>14}  ({:.3} × original)",
        "bytes read",
        r.bytes_read,
        r.bytes_read as f64 / r.original_bytes.max(1) as f64
    );
    println!(
        "  streamed sections: {}",
        match r.streamed_reads.as_str() {
            "jobs" => "read by the decode jobs, each its own chunk, checked and decoded while in cache (the file was in the page cache)",
            "readers" => "read by the reader threads, ahead of the decode",
            "nothing streamed" => "none at this fidelity (only the hot tier is read)",
            other => other,
        }
    );
    println!(
        "  stages (busy seconds summed over the decode threads and the calling thread, which \
         decoded {} chunks between reads; GB/s per busy second):",
        r.caller_jobs
    );
    let st = &r.stages;
    for (name, s, g) in [
        ("read", st.read, Some(r.stage_gbps.read)),
        ("checksum", st.checksum, Some(r.stage_gbps.checksum)),
        ("decompress", st.decompress, Some(r.stage_gbps.decompress)),
        (
            "reconstruct",
            st.reconstruct,
            Some(r.stage_gbps.reconstruct),
        ),
        ("consume", st.consume, None),
    ] {
        println!(
            "    {:<12} {:>9.4} s  {}",
            name,
            s,
            g.map_or(String::new(), gb)
        );
    }
    println!(
        "  bottleneck {}; overlap efficiency {:.2} (slowest stage ÷ wall)",
        r.bottleneck, r.overlap_efficiency
    );
    println!(
        "  memory: peak RSS {} (budget {}); plan: process {} + hot {} + read pool {} × {} + {} output + {} × {} per decoding thread",
        r.peak_rss_bytes.map_or("n/a".into(), mib),
        r.ram_budget.map_or("none".into(), mib),
        mib(r.memory.baseline_rss),
        mib(r.memory.hot),
        r.memory.pool_buffers,
        mib(r.memory.pool_buffer_bytes),
        mib(r.memory.output_bytes),
        r.memory.decode_threads + 1,
        mib(r.memory.per_thread_bytes)
    );
    println!(
        "  by place: RAM {}, GPU {}, left on SSD {}",
        mib(r.composition.ram_bytes),
        mib(r.composition.gpu_bytes),
        mib(r.composition.ssd_bytes)
    );
    match &r.disk {
        Some(d) => println!(
            "  disk {}: {} read in {} requests ({:.0} IOPS) during the median pass",
            d.device,
            mib(d.read_bytes),
            d.reads,
            d.iops
        ),
        None => println!("  disk: no block-device counters for this file system"),
    }
    println!(
        "  audit: tpde {} ({}), {}, {}, {}, {} cores, {} RAM; started {}, ended {}",
        env["tpde_version"].as_str().unwrap_or("?"),
        env["git_commit"].as_str().unwrap_or("?"),
        env["rustc"].as_str().unwrap_or("?"),
        env["os"].as_str().unwrap_or("?"),
        env["cpu_model"].as_str().unwrap_or("?"),
        env["logical_cores"],
        env["ram_bytes"].as_u64().map_or("?".into(), mib),
        b.audit["started"].as_str().unwrap_or("?"),
        b.audit["ended"].as_str().unwrap_or("?"),
    );
    println!("  (--json prints everything, the audit trail included)");
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string(v).expect("serializable"));
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

/// `s` with its control characters escaped (`\n`, `\u{1b}`, …): text
/// from a file goes to the terminal as text, never as line breaks or
/// terminal commands.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

pub fn print_inspection(i: &tpde_pack::Inspection, tensors: bool) {
    println!(
        "{}  (tpde format v{}, {})",
        i.path,
        i.format_version,
        printable(&i.created_by)
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
        println!(
            "    {:<40} {:>12} bytes  {}",
            printable(&f.path),
            f.bytes,
            f.kind
        );
        if let Some(g) = &f.gguf {
            let types: Vec<String> = g
                .tensor_types
                .iter()
                .map(|(t, n)| format!("{t} ×{n}"))
                .collect();
            println!(
                "      GGUF v{}, architecture {}, alignment {}, tensors: {}",
                g.version,
                printable(g.architecture.as_deref().unwrap_or("(none)")),
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
                println!("      {} = {v}", printable(k));
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
                printable(&t.name),
                printable(&t.dtype),
                t.storage,
                t.original_bytes,
                t.hot_bytes,
                t.cold_bytes
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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_with_and_without_units() {
        use super::parse_size;
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        for bad in ["", "MiB", "12 parsecs", "0", "-5MiB", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}
