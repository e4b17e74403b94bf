//! Times fetching every expert of a container at exact fidelity, warm or
//! with the container dropped from the page cache before each fetch: a
//! tool for looking at one fetch's parts (run it under `perf`); the figures
//! of record come from `cargo bench --bench expert`.
//!
//! ```sh
//! cargo run --release -p tpde-pack --example expert_fetch -- moe.tpde [REPS] [cold] [direct]
//! ```

use std::os::unix::io::AsRawFd;
use std::time::Instant;
use tpde_pack::{Container, ExpertReader, Fidelity};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: expert_fetch CONTAINER [REPS] [cold] [direct]");
        std::process::exit(2);
    };
    let reps: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(50);
    let rest: Vec<String> = args.collect();
    let cold = rest.iter().any(|a| a == "cold");
    let direct = rest.iter().any(|a| a == "direct");
    let c = Container::open(std::path::Path::new(&path)).expect("open");
    let f = std::fs::File::open(&path).expect("open");
    // SAFETY: a plain system call on a descriptor `f` owns; advice only.
    let drop_cache = || unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    };
    let mut r = ExpertReader::new(&c).expect("experts");
    if direct {
        r = r.with_direct_reads().expect("O_DIRECT");
    }
    let mut times = Vec::new();
    for _ in 0..reps {
        for (layer, experts) in r.layers() {
            for e in 0..experts {
                if cold {
                    drop_cache();
                }
                let t = Instant::now();
                let got = r.fetch(layer, e, Fidelity::Exact).expect("fetch");
                times.push(t.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(got);
            }
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{} fetches ({}{}), median {:.3} ms, p10 {:.3}, p90 {:.3}",
        times.len(),
        if cold { "cold" } else { "warm" },
        if direct { ", O_DIRECT" } else { "" },
        times[times.len() / 2],
        times[times.len() / 10],
        times[times.len() * 9 / 10]
    );
}
