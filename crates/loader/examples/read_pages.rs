//! `O_DIRECT` reads into 4 KiB pages against reads into transparent huge
//! pages: the first MiB of a file read in 1 MiB pieces by four threads (as
//! the loader reads), each piece into its own region of one large buffer,
//! in alternating rounds. The measurement behind `AlignedBuf`'s huge pages,
//! and (with `PIECE_KIB` 256, the size of the loader's last pieces of a
//! pass) behind the loader's buffers being whole huge pages
//! (`tpde_pack::container::whole_huge_pages`).
//!
//! ```sh
//! cargo run --release -p tpde-loader --example read_pages -- model.tpde [ROUNDS] [MIB] [PIECE_KIB]
//! ```

mod common;

use tpde_pack::container::{AlignedBuf, HUGE_PAGE};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: read_pages FILE [ROUNDS] [MIB] [PIECE_KIB]");
        std::process::exit(2);
    };
    let rounds: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(7);
    let mib: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(64);
    let piece_kib: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(1024);
    let piece = (piece_kib.max(4) / 4 * 4) << 10;
    let (file, len) = common::open_direct(path, mib);

    // 4 KiB pages: an aligned region of a heap buffer asked not to be huge.
    let mut small = vec![1u8; len + HUGE_PAGE];
    let at = small.as_ptr().align_offset(HUGE_PAGE);
    let small = &mut small[at..at + len];
    #[cfg(target_os = "linux")]
    // SAFETY: advice on whole pages of memory borrowed mutably here.
    unsafe {
        libc::madvise(small.as_mut_ptr().cast(), len, libc::MADV_NOHUGEPAGE);
    }
    // Huge pages: `AlignedBuf`, committed like the loader's buffers.
    let mut huge = AlignedBuf::new(len as u64);
    let huge = huge.get_mut(len);
    huge.fill(1);

    let read_into = |buf: &mut [u8]| common::read_pieces(&file, path, buf, piece, 4);
    let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (x, y) = if round % 2 == 0 {
            let x = read_into(small);
            (x, read_into(huge))
        } else {
            let y = read_into(huge);
            (read_into(small), y)
        };
        a.push(x);
        b.push(y);
        r.push(y / x);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{path}: {} MiB, O_DIRECT, {} KiB pieces, 4 threads, {rounds} rounds: 4 KiB pages {:.2} GB/s, huge pages {:.2} GB/s, huge ÷ 4 KiB {:.2} (medians)",
        len >> 20,
        piece >> 10,
        median(&mut a),
        median(&mut b),
        median(&mut r)
    );
}
