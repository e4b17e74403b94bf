//! `O_DIRECT` reads of a file while the CPUs are idle and while threads
//! keep them busy: one 8 MiB request at a time (as the raw read of
//! `tpde bench` reads) and four 1 MiB requests in flight (as the loader
//! reads), in alternating rounds. The loader reads while its decode
//! threads work, its baseline (`tpde bench`'s raw read) with the CPUs
//! idle: this asks whether busy threads, or their memory traffic, slow the
//! disk itself (on a virtual machine the host emulates the disk). On this
//! project's VM they did not (0.95-1.08 ×, `benches/RESULTS.md`).
//!
//! ```sh
//! cargo run --release -p tpde-loader --example read_under_load -- model.tpde [ROUNDS] [MIB] [BUSY]
//! ```
//!
//! `BUSY`: busy threads while loaded (default: one per CPU), spinning on
//! registers or writing a 64 MiB buffer over and over.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use tpde_pack::container::AlignedBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: read_under_load FILE [ROUNDS] [MIB] [BUSY]");
        std::process::exit(2);
    };
    let rounds: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(15);
    let mib: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(12);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(cpus);
    let (file, len) = common::open_direct(path, mib);
    let mut buf = AlignedBuf::new(len as u64);
    let buf = buf.get_mut(len);
    buf.fill(1);

    let read = |buf: &mut [u8], piece: usize, threads: usize| {
        common::read_pieces(&file, path, buf, piece, threads)
    };
    // The same reads while `busy` threads spin on registers (`memory`
    // false) or write a 64 MiB buffer over and over (true).
    let loaded = |buf: &mut [u8], piece: usize, threads: usize, memory: bool| -> f64 {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..busy {
                s.spawn(|| {
                    let mut x = 0u64;
                    let mut mem = vec![0u8; if memory { 64 << 20 } else { 0 }];
                    while !stop.load(Relaxed) {
                        if mem.is_empty() {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                            continue;
                        }
                        for c in mem.chunks_mut(1 << 20) {
                            c.fill(x as u8);
                            x += 1;
                            if stop.load(Relaxed) {
                                break;
                            }
                        }
                        std::hint::black_box(&mem);
                    }
                });
            }
            // Let the busy threads take the CPUs first.
            std::thread::sleep(std::time::Duration::from_millis(5));
            let g = read(buf, piece, threads);
            stop.store(true, Relaxed);
            g
        })
    };
    let ways: [(&str, usize, usize); 2] = [
        ("one 8 MiB request at a time", 8 << 20, 1),
        ("four 1 MiB requests in flight", 1 << 20, 4),
    ];
    let mut got = vec![[Vec::new(), Vec::new(), Vec::new()]; ways.len()];
    for _ in 0..rounds {
        for (k, &(_, piece, threads)) in ways.iter().enumerate() {
            got[k][0].push(read(buf, piece, threads));
            got[k][1].push(loaded(buf, piece, threads, false));
            got[k][2].push(loaded(buf, piece, threads, true));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{path}: first {} MiB, O_DIRECT, {rounds} rounds, medians; loaded: {busy} busy threads on {cpus} CPUs",
        len >> 20
    );
    for (k, (name, _, _)) in ways.iter().enumerate() {
        let [idle, spin, mem] = &mut got[k];
        let (idle, spin, mem) = (median(idle), median(spin), median(mem));
        println!(
            "  {name:<31} idle {idle:.2} GB/s, spinning {spin:.2} ({:.2} ×), writing memory {mem:.2} ({:.2} ×)",
            spin / idle,
            mem / idle
        );
    }
}
