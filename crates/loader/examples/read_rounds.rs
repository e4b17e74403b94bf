//! When `O_DIRECT` requests in flight complete: the file's first `MIB` MiB
//! (default 12) read by four threads (as the loader reads), once in 1 MiB
//! pieces and once with the first three pieces smaller (256, 512 and
//! 768 KiB, then 1 MiB pieces and what is left), in alternating rounds.
//! Prints each kind's read speed, when its first piece came in, and when
//! each piece of one pass of each came in.
//!
//! On a disk that shares itself between the requests in flight, the
//! smaller first pieces come in sooner and the pieces after them come in
//! one at a time; on one that serves the requests in flight as a batch
//! (this project's VM: all four within 0.1 ms of each other,
//! whatever their sizes), they come in together. Then a pass's last batch
//! is decoded after its last read, however its pieces are cut
//! (`benches/RESULTS.md`, eighth session).
//!
//! ```sh
//! cargo run --release -p tpde-loader --example read_rounds -- model.tpde [ROUNDS] [MIB]
//! ```

#[allow(dead_code)] // this example reads its own way
mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;
use tpde_pack::container::AlignedBuf;

const MIB: usize = 1 << 20;

/// Reads the pieces of `sizes` (in file order, from the file's start) into
/// `buf` with four threads; GB/s and each piece's completion (ms, size),
/// in the order they came in.
fn read(
    file: &std::fs::File,
    path: &str,
    buf: &mut [u8],
    sizes: &[usize],
) -> (f64, Vec<(f64, usize)>) {
    let mut parts: Vec<Mutex<(u64, &mut [u8])>> = Vec::new();
    let (mut rest, mut at) = (buf, 0u64);
    for &n in sizes {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(n);
        parts.push(Mutex::new((at, part)));
        rest = tail;
        at += n as u64;
    }
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::new());
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Relaxed);
                let Some(part) = parts.get(i) else { return };
                let mut part = part.lock().unwrap_or_else(|p| p.into_inner());
                let (offset, ref mut bytes) = *part;
                if let Err(e) = file.read_exact_at(bytes, offset) {
                    eprintln!("{path}: read at {offset}: {e}");
                    std::process::exit(1);
                }
                let ms = t.elapsed().as_secs_f64() * 1e3;
                done.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((ms, bytes.len()));
            });
        }
    });
    let gbps = at as f64 / t.elapsed().as_secs_f64() / 1e9;
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_by(|a, b| a.0.total_cmp(&b.0));
    (gbps, done)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: read_rounds FILE [ROUNDS] [MIB]");
        std::process::exit(2);
    };
    let rounds: usize = args
        .get(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(11)
        .max(1);
    let mib: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(12);
    let (file, len) = common::open_direct(path, mib.max(4));
    if len < 2 * MIB {
        eprintln!("{path}: shorter than 2 MiB");
        std::process::exit(2);
    }
    let mut mem = AlignedBuf::new(len as u64);
    let buf = mem.get_mut(len);
    buf.fill(1);
    let even = vec![MIB; len / MIB];
    let mut staggered = vec![MIB / 4, MIB / 2, 3 * MIB / 4];
    staggered.extend(std::iter::repeat_n(MIB, len / MIB - 2));
    staggered.push(len - staggered.iter().sum::<usize>());
    staggered.retain(|&n| n > 0);
    let kinds = [
        ("1 MiB pieces", &even),
        ("first pieces smaller", &staggered),
    ];
    let mut figures: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); 2];
    let mut last = vec![Vec::new(); 2];
    for round in 0..rounds {
        for k in [round % 2, 1 - round % 2] {
            let (gbps, done) = read(&file, path, buf, kinds[k].1);
            figures[k].0.push(gbps);
            figures[k].1.push(done[0].0);
            last[k] = done;
        }
    }
    println!(
        "{path}: first {} MiB, four requests in flight, {rounds} rounds (medians)",
        len / MIB
    );
    for (k, (name, _)) in kinds.iter().enumerate() {
        let (gbps, first) = std::mem::take(&mut figures[k]);
        println!(
            "{name}: {:.2} GB/s, first piece in at {:.3} ms",
            median(gbps),
            median(first)
        );
        let times: Vec<String> = last[k]
            .iter()
            .map(|(ms, n)| format!("{ms:.3} ({} KiB)", n >> 10))
            .collect();
        println!("  one pass, when each piece came in: {}", times.join(", "));
    }
}
