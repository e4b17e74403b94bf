//! `O_DIRECT` reads of a file while the CPUs are idle and while threads
//! keep them busy: one 8 MiB request at a time (as the raw read of
//! `tpde bench` reads) and four 1 MiB requests in flight (as the loader
//! reads), in alternating rounds. The loader reads while its decode
//! threads work, its baseline (`tpde bench`'s raw read) with the CPUs
//! idle: this asks whether busy threads, or their memory traffic, slow the
//! disk itself (on a virtual machine the host emulates the disk, copying
//! what it reads into the guest's memory). On this project's VM, threads
//! that only compute do not (0.95-1.02 ×); threads writing memory at
//! 24-26 GB/s cut the reads to about half, with plain stores or past the
//! cache alike (`benches/RESULTS.md`).
//!
//! ```sh
//! cargo run --release -p tpde-loader --example read_under_load -- model.tpde [ROUNDS] [MIB] [BUSY] [GBPS]
//! ```
//!
//! `BUSY`: busy threads while loaded (default: one per CPU), spinning on
//! registers or writing a 64 MiB buffer of their own over and over.
//! `GBPS`: at most this many GB/s written by them together (default: as
//! fast as they can).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
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
    // A cap on what the busy threads write together, GB/s (they spin
    // between chunks to keep to it): what a decoder writing at a given
    // rate costs the reads.
    let cap: f64 = args
        .get(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::INFINITY);
    let (file, len) = common::open_direct(path, mib);
    let mut buf = AlignedBuf::new(len as u64);
    let buf = buf.get_mut(len);
    buf.fill(1);

    let read = |buf: &mut [u8], piece: usize, threads: usize| {
        common::read_pieces(&file, path, buf, piece, threads)
    };
    // The same reads while `busy` threads spin on registers, write a
    // 64 MiB buffer over and over with plain stores (`fill`), or store it
    // past the cache (non-temporal stores, as the loader's base values);
    // also the GB/s the busy threads wrote together.
    // Each busy thread's buffer, written once here so that no page fault
    // (the kernel zeroing a fresh page) is part of the load.
    let mut mems: Vec<Vec<u8>> = (0..busy).map(|_| vec![1u8; 64 << 20]).collect();
    let mut loaded = |buf: &mut [u8], piece: usize, threads: usize, load: Load| -> (f64, f64) {
        let stop = AtomicBool::new(false);
        let written = AtomicUsize::new(0);
        let t = std::time::Instant::now();
        let g = std::thread::scope(|s| {
            for mem in mems.iter_mut() {
                let (stop, written, t) = (&stop, &written, &t);
                s.spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Relaxed) {
                        if load == Load::Spin {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                            continue;
                        }
                        for c in mem.chunks_mut(1 << 20) {
                            if load == Load::Stream {
                                stream_fill(c, x as u8);
                            } else {
                                c.fill(x as u8);
                            }
                            let total = written.fetch_add(c.len(), Relaxed) + c.len();
                            while (total as f64) / 1e9 / cap > t.elapsed().as_secs_f64()
                                && !stop.load(Relaxed)
                            {
                                std::hint::spin_loop();
                            }
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
        });
        (
            g,
            written.load(Relaxed) as f64 / t.elapsed().as_secs_f64() / 1e9,
        )
    };
    let ways: [(&str, usize, usize); 2] = [
        ("one 8 MiB request at a time", 8 << 20, 1),
        ("four 1 MiB requests in flight", 1 << 20, 4),
    ];
    let loads = [Load::Spin, Load::Fill, Load::Stream];
    let mut idle = vec![Vec::new(); ways.len()];
    let mut got = vec![[Vec::new(), Vec::new(), Vec::new()]; ways.len()];
    let mut wrote = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (k, &(_, piece, threads)) in ways.iter().enumerate() {
            idle[k].push(read(buf, piece, threads));
            for (l, &load) in loads.iter().enumerate() {
                let (g, w) = loaded(buf, piece, threads, load);
                got[k][l].push(g);
                wrote[l].push(w);
            }
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
        let idle = median(&mut idle[k]);
        let [spin, fill, stream] = &mut got[k];
        let (spin, fill, stream) = (median(spin), median(fill), median(stream));
        println!(
            "  {name:<31} idle {idle:.2} GB/s, spinning {spin:.2} ({:.2} ×), plain stores {fill:.2} ({:.2} ×), stores past the cache {stream:.2} ({:.2} ×)",
            spin / idle,
            fill / idle,
            stream / idle
        );
    }
    println!(
        "  the busy threads wrote {:.1} GB/s with plain stores, {:.1} past the cache",
        median(&mut wrote[1]),
        median(&mut wrote[2])
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Spin,
    Fill,
    Stream,
}

/// Fills `c` with non-temporal stores (past the cache, as
/// `tpde_codecs::residual::base_values` stores values); plain stores where
/// there are none.
fn stream_fill(c: &mut [u8], v: u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_set1_epi8, _mm_sfence, _mm_stream_si128};
        let (head, body, tail) = unsafe { c.align_to_mut::<__m128i>() };
        head.fill(v);
        tail.fill(v);
        // SAFETY: SSE2 is part of x86_64; each store is to an aligned
        // 16-byte element of `body`.
        unsafe {
            let x = _mm_set1_epi8(v as i8);
            for p in body.iter_mut() {
                _mm_stream_si128(p, x);
            }
            _mm_sfence();
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    c.fill(v);
}
