//! What the `O_DIRECT` read examples share: opening the file, and reading
//! its first bytes in pieces on a few threads.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

/// `path` opened with `O_DIRECT`, and how many of its first `mib` MiB to
/// read (whole MiB); exits with a message where that cannot be.
pub fn open_direct(path: &str, mib: usize) -> (File, usize) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| {
            eprintln!("{path}: cannot open with O_DIRECT: {e}");
            std::process::exit(2)
        });
    let file_len = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let len = (mib << 20).min(file_len) >> 20 << 20;
    if len == 0 {
        eprintln!("{path}: shorter than 1 MiB");
        std::process::exit(2);
    }
    (file, len)
}

/// Reads the file's first `buf.len()` bytes into `buf` in `piece`-byte
/// requests, `threads` in flight; GB/s.
pub fn read_pieces(file: &File, path: &str, buf: &mut [u8], piece: usize, threads: usize) -> f64 {
    let len = buf.len();
    let next = AtomicUsize::new(0);
    let parts: Vec<std::sync::Mutex<&mut [u8]>> =
        buf.chunks_mut(piece).map(std::sync::Mutex::new).collect();
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Relaxed);
                let Some(part) = parts.get(i) else { return };
                let mut part = part.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = file.read_exact_at(&mut part, (i * piece) as u64) {
                    eprintln!("{path}: read at {}: {e}", i * piece);
                    std::process::exit(1);
                }
            });
        }
    });
    len as f64 / t.elapsed().as_secs_f64() / 1e9
}
