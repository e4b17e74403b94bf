//! Opening a container: fixed header and footer, manifest digest, full
//! structural validation, then checked reads of extents into owned buffers
//! (never memory maps: a file changed under the reader yields errors, not
//! crashes or unverified bytes).

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tpde_codecs::{residual, xxh3, FloatDtype};
use tpde_format::{
    check_header_footer, BlobChunk, Extent, Footer, FormatError, Header, Manifest, Storage, Tensor,
    FOOTER_LEN, HEADER_LEN, MIN_CONTAINER_LEN, SECTION_ALIGN,
};

thread_local! {
    /// Per-thread buffers for a chunk's base and residual bytes.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Sets a buffer's length; a reused buffer is not cleared (every caller
/// overwrites all of it), a new one is zero-filled as it grows.
pub(crate) fn set_len(buf: &mut Vec<u8>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    buf.truncate(n);
}

/// A buffer whose usable part starts at a [`SECTION_ALIGN`]-aligned
/// address, as `O_DIRECT` requires (with offsets and lengths in whole
/// blocks, which section starts are).
///
/// One of [`HUGE_PAGE`] bytes or more is mapped on its own, aligned to
/// [`HUGE_PAGE`], and asked to be backed by transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`, where the kernel allows them: its mode
/// `madvise` or `always`). Reads into memory of 4 KiB pages were the
/// slower part of streaming here: the loader's `O_DIRECT` reads of a pass,
/// replayed into one large buffer, ran at 1.28–1.32 GB/s on 4 KiB pages
/// and 1.92–1.96 GB/s on huge pages (this project's VM, alternating runs).
pub struct AlignedBuf {
    mem: Mem,
    start: usize,
    cap: usize,
}

enum Mem {
    Heap(Vec<u8>),
    /// An anonymous mapping of `len` bytes (zero-filled by the kernel).
    Mapped {
        ptr: *mut u8,
        len: usize,
    },
}

// SAFETY: the mapping is owned by the buffer alone, like the Vec.
unsafe impl Send for Mem {}
unsafe impl Sync for Mem {}

/// The size of a transparent huge page on x86-64 and most 64-bit Linux
/// systems; buffers from this size up are mapped aligned to it.
pub const HUGE_PAGE: usize = 2 << 20;

/// The bytes to allocate for a buffer that the disk reads `len` bytes
/// into: from one huge page up, a whole number of huge pages, so that its
/// last bytes are not on 4 KiB pages (an [`AlignedBuf`] maps a partial
/// huge page at its end with small pages). On this project's VM, four
/// 256 KiB `O_DIRECT` requests in flight read 1.10 GB/s into 4 KiB pages
/// and 2.10 into huge pages (the `read_pages` example of `tpde-loader`):
/// the loader's last 2 MiB of a pass, read in such pieces into the end of
/// its hot buffer, took twice as long as they had to. Below one huge page,
/// `len` itself.
pub fn whole_huge_pages(len: u64) -> u64 {
    let huge = HUGE_PAGE as u64;
    if len < huge {
        return len;
    }
    len.checked_next_multiple_of(huge).unwrap_or(len)
}

/// From this size up, glibc's allocator gives every allocation a mapping
/// of its own (its largest mmap threshold on 64-bit systems).
pub const OWN_MAPPING: usize = 32 << 20;

impl AlignedBuf {
    /// A zero-filled buffer of `cap` usable bytes.
    pub fn new(cap: u64) -> AlignedBuf {
        let cap = usize::try_from(cap).expect("a buffer that fits in memory");
        if cap >= HUGE_PAGE {
            if let Some(b) = Self::mapped(cap) {
                return b;
            }
        }
        let raw = vec![0u8; cap + SECTION_ALIGN as usize];
        let addr = raw.as_ptr() as usize;
        let start = addr.next_multiple_of(SECTION_ALIGN as usize) - addr;
        AlignedBuf {
            mem: Mem::Heap(raw),
            start,
            cap,
        }
    }

    /// `cap` bytes of a fresh anonymous mapping, starting on a huge page;
    /// `None` if the mapping fails (the caller falls back to the heap).
    fn mapped(cap: usize) -> Option<AlignedBuf> {
        let page = SECTION_ALIGN as usize;
        let len = cap.checked_add(HUGE_PAGE)?.checked_next_multiple_of(page)?;
        let keep = cap.checked_next_multiple_of(page)?;
        // SAFETY: a fresh private anonymous mapping; nothing else refers
        // to it. Its parts before the first huge page boundary and after
        // `keep` bytes from there are unmapped at once; the rest once, in
        // `drop`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let raw = ptr as *mut u8;
        // The mapping is page-aligned, so the head is whole pages, less
        // than a huge page; the tail is whole pages too.
        let head = (raw as usize).next_multiple_of(HUGE_PAGE) - raw as usize;
        // SAFETY: `head + keep <= len` (`head < HUGE_PAGE`, `keep` rounds
        // `cap` up to a page and `len` rounds `cap + HUGE_PAGE` up); both
        // ranges lie inside the mapping and are never used again.
        let ptr = unsafe {
            if head > 0 {
                libc::munmap(raw.cast(), head);
            }
            if len > head + keep {
                libc::munmap(raw.add(head + keep).cast(), len - head - keep);
            }
            raw.add(head)
        };
        // The mapping now ends where the usable bytes do (rounded to a
        // page): a partial huge page at its end cannot be a huge page,
        // whatever the kernel's mode, so what is resident is what is
        // touched (the loader's memory plan counts bytes). The whole huge
        // pages are asked for before any page is touched.
        #[cfg(target_os = "linux")]
        // SAFETY: advice on whole pages of the mapping kept above. Failure
        // (a kernel without huge pages) changes nothing.
        unsafe {
            libc::madvise(ptr.cast(), cap / HUGE_PAGE * HUGE_PAGE, libc::MADV_HUGEPAGE);
        }
        Some(AlignedBuf {
            mem: Mem::Mapped { ptr, len: keep },
            start: 0,
            cap,
        })
    }

    /// Usable bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The first `len` usable bytes (all of them if fewer).
    pub fn get_mut(&mut self, len: usize) -> &mut [u8] {
        let n = len.min(self.cap);
        match &mut self.mem {
            Mem::Heap(raw) => &mut raw[self.start..self.start + n],
            // SAFETY: `start + cap <= len` (`mapped`), the mapping is
            // readable and writable, zero-filled or written through this
            // buffer only, and borrowed mutably from `self`.
            Mem::Mapped { ptr, .. } => unsafe {
                std::slice::from_raw_parts_mut(ptr.add(self.start), n)
            },
        }
    }
}

/// Asks for the whole huge pages inside `buf` to be transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`): call it on fresh memory before its pages are
/// touched. Advice only; a no-op where the kernel has no such pages. The
/// advice outlives `buf` on its memory: give it only memory of its own
/// mapping (see [`OWN_MAPPING`]), not a part of the allocator's heap that
/// will serve other allocations later.
pub fn advise_huge_pages(buf: &mut [u8]) {
    let addr = buf.as_mut_ptr() as usize;
    let a = addr.next_multiple_of(HUGE_PAGE);
    let b = (addr + buf.len()) / HUGE_PAGE * HUGE_PAGE;
    #[cfg(target_os = "linux")]
    if b > a {
        // SAFETY: advice on whole pages inside memory this slice borrows
        // mutably; it does not change the contents.
        unsafe {
            libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Mem::Mapped { ptr, len } = self.mem {
            // SAFETY: the mapping made in `mapped`, unmapped once; no slice
            // of it outlives `self` (they borrow it).
            unsafe {
                libc::munmap(ptr.cast(), len);
            }
        }
    }
}

/// `x` rounded down to a multiple of [`SECTION_ALIGN`].
pub fn align_down(x: u64) -> u64 {
    x - x % SECTION_ALIGN
}

/// An open, structurally validated container.
pub struct Container {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
    pub header: Header,
    pub manifest: Manifest,
    /// Bytes read from the file so far: header, footer, manifest and every
    /// checked extent (what random access costs, for tests and figures).
    bytes_read: std::sync::atomic::AtomicU64,
    /// Read calls made so far, counted like `bytes_read`.
    reads: std::sync::atomic::AtomicU64,
}

impl Container {
    pub fn open(path: &Path) -> Result<Container> {
        let file = crate::source::open_regular(path).map_err(Error::io(path, "cannot open"))?;
        let meta = file.metadata().map_err(Error::io(path, "cannot read"))?;
        if meta.is_dir() {
            return Err(Error::input(path, "is a folder, not a tpde container"));
        }
        let len = meta.len();
        let fmt = Error::format(path);
        if len < MIN_CONTAINER_LEN {
            // Read what there is, so a non-container gets "bad magic" rather than "too short".
            let mut head = vec![0u8; (len as usize).min(HEADER_LEN)];
            file.read_exact_at(&mut head, 0)
                .map_err(Error::io(path, "cannot read"))?;
            if head.len() >= 8 && head[..8] != tpde_format::MAGIC {
                return Err(fmt(FormatError::BadMagic));
            }
            return Err(fmt(FormatError::TooShort {
                len,
                min: MIN_CONTAINER_LEN,
            }));
        }
        let mut hb = [0u8; HEADER_LEN];
        file.read_exact_at(&mut hb, 0)
            .map_err(Error::io(path, "cannot read"))?;
        let header = Header::decode(&hb).map_err(Error::format(path))?;
        let mut fb = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut fb, len - FOOTER_LEN as u64)
            .map_err(Error::io(path, "cannot read"))?;
        let footer = Footer::decode(&fb).map_err(Error::format(path))?;
        check_header_footer(&header, &footer, len).map_err(Error::format(path))?;
        let mut mb = vec![0u8; header.manifest_len as usize];
        file.read_exact_at(&mut mb, header.manifest_offset)
            .map_err(Error::io(path, "cannot read"))?;
        if blake3::hash(&mb).as_bytes() != &header.manifest_blake3 {
            return Err(Error::integrity(
                path,
                "manifest digest mismatch (manifest corrupted)",
            ));
        }
        let manifest =
            Manifest::parse(&mb, header.manifest_offset, len).map_err(Error::format(path))?;
        if manifest.format_version != header.version {
            return Err(Error::Format {
                path: path.to_path_buf(),
                source: FormatError::Manifest(format!(
                    "format_version {} differs from the header's version {}",
                    manifest.format_version, header.version
                )),
            });
        }
        let opened = (HEADER_LEN + FOOTER_LEN) as u64 + header.manifest_len;
        Ok(Container {
            path: path.to_path_buf(),
            file,
            len,
            header,
            manifest,
            bytes_read: opened.into(),
            reads: 3.into(),
        })
    }

    /// Reads an extent and checks its xxh3; `who` names it in errors.
    pub fn read_checked(&self, e: &Extent, who: impl Fn() -> String) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_checked_into(e, &mut buf, who)?;
        Ok(buf)
    }

    /// Bytes read from the container so far (see the field).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Read calls made so far: 3 to open (header, footer, manifest), then
    /// one per checked extent or span.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_read(&self, len: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.bytes_read.fetch_add(len, Relaxed);
        self.reads.fetch_add(1, Relaxed);
    }

    /// [`Container::read_checked`] into a reusable buffer (resized to the extent).
    pub fn read_checked_into(
        &self,
        e: &Extent,
        buf: &mut Vec<u8>,
        who: impl Fn() -> String,
    ) -> Result<()> {
        set_len(buf, e.len as usize);
        self.count_read(e.len);
        self.file
            .read_exact_at(buf, e.offset)
            .map_err(|err| Error::input(&self.path, format!("{}: cannot read: {err}", who())))?;
        self.check(e, buf, who)
    }

    /// Reads `len` bytes at `offset` in one read, unchecked: the caller
    /// checks each extent in it with [`Container::check`]. `who` names the
    /// range in errors.
    pub fn read_span(&self, offset: u64, len: u64, who: impl Fn() -> String) -> Result<Vec<u8>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(Error::integrity(
                &self.path,
                format!(
                    "{}: {len} bytes at {offset} run past the end of the file",
                    who()
                ),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.count_read(len);
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|err| Error::input(&self.path, format!("{}: cannot read: {err}", who())))?;
        Ok(buf)
    }

    /// The container's file opened again with `O_DIRECT`: reads that go
    /// to the disk without the page cache, into aligned buffers
    /// ([`AlignedBuf`]) at whole blocks. An error if the file system refuses
    /// `O_DIRECT`, or if another file was put at the path since this one
    /// was opened.
    pub fn reopen_direct(&self) -> Result<File> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .map_err(|e| {
                Error::input(
                    &self.path,
                    format!("cannot open with O_DIRECT (does the file system support it?): {e}"),
                )
            })?;
        let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino()));
        match (id(&self.file), id(&f)) {
            (Ok(a), Ok(b)) if a == b => Ok(f),
            _ => Err(Error::input(
                &self.path,
                "the file changed while it was being opened",
            )),
        }
    }

    /// Reads whole blocks at `offset` (a multiple of [`SECTION_ALIGN`]) from
    /// `direct` ([`Container::reopen_direct`]) into `buf` (a multiple of
    /// [`SECTION_ALIGN`] long, aligned), in one request; the first `need`
    /// bytes must come (the rest may lie past the end of the file). Counted
    /// in [`Container::bytes_read`] as the bytes asked for.
    pub fn read_direct(
        &self,
        direct: &File,
        offset: u64,
        buf: &mut [u8],
        need: usize,
        who: impl Fn() -> String,
    ) -> Result<()> {
        let len = buf.len() as u64;
        let block = SECTION_ALIGN as usize;
        if need > buf.len()
            || !offset.is_multiple_of(SECTION_ALIGN)
            || !buf.len().is_multiple_of(block)
            || !(buf.as_ptr() as usize).is_multiple_of(block)
        {
            return Err(Error::input(
                &self.path,
                format!(
                    "{}: an O_DIRECT read of {need} bytes at {offset} into {} bytes at {:p} \
                     is not in whole aligned blocks",
                    who(),
                    buf.len(),
                    buf.as_ptr()
                ),
            ));
        }
        if offset.checked_add(need as u64).is_none_or(|e| e > self.len) {
            return Err(Error::integrity(
                &self.path,
                format!(
                    "{}: {need} bytes at {offset} run past the end of the file",
                    who()
                ),
            ));
        }
        self.count_read(len);
        let mut got = 0;
        while got < need {
            match direct.read_at(&mut buf[got..], offset + got as u64) {
                // The file was cut short since it was opened (its length
                // then was checked above): an input error, as a failed read.
                Ok(0) => {
                    return Err(Error::input(
                        &self.path,
                        format!("{}: the file ends {got} bytes into a read of {need}", who()),
                    ))
                }
                // Short of `need` only at the end of the file; a next
                // request must start on a block.
                Ok(n) if (got + n) % block != 0 && got + n < need => {
                    return Err(Error::input(
                        &self.path,
                        format!(
                            "{}: the file ends {} bytes into a read of {need}",
                            who(),
                            got + n
                        ),
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::input(
                        &self.path,
                        format!("{}: cannot read: {e}", who()),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Asks the kernel to start reading `len` bytes at `offset` into the
    /// page cache now, asynchronously (`posix_fadvise(WILLNEED)`): the reads
    /// that follow then find the disk already busy on the whole range
    /// instead of waiting out one request at a time. Advice only; failures
    /// are ignored, and so is an empty range (which `posix_fadvise` would
    /// take to mean the rest of the file).
    pub fn will_need(&self, offset: u64, len: u64) {
        use std::os::unix::io::AsRawFd;
        if len == 0 {
            return;
        }
        if let (Ok(o), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) {
            // SAFETY: a plain system call on a descriptor this value owns; it
            // only advises the kernel and touches no memory of ours.
            unsafe {
                libc::posix_fadvise(self.file.as_raw_fd(), o, n, libc::POSIX_FADV_WILLNEED);
            }
        }
    }

    /// [`Container::read_span`] into `buf` (all of it, at `offset`).
    pub fn read_span_into(
        &self,
        offset: u64,
        buf: &mut [u8],
        who: impl Fn() -> String,
    ) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Error::integrity(
                &self.path,
                format!(
                    "{}: {len} bytes at {offset} run past the end of the file",
                    who()
                ),
            ));
        }
        self.count_read(len);
        self.file
            .read_exact_at(buf, offset)
            .map_err(|err| Error::input(&self.path, format!("{}: cannot read: {err}", who())))
    }

    /// Checks bytes read for extent `e` against its xxh3.
    pub fn check(&self, e: &Extent, bytes: &[u8], who: impl Fn() -> String) -> Result<()> {
        if bytes.len() as u64 != e.len || xxh3(bytes) != e.xxh3 {
            return Err(Error::integrity(
                &self.path,
                format!(
                    "{}: checksum mismatch (xxh3 of bytes {}..{})",
                    who(),
                    e.offset,
                    e.end()
                ),
            ));
        }
        Ok(())
    }

    /// Reads and decompresses one blob chunk.
    pub fn read_blob_chunk(&self, c: &BlobChunk, who: impl Fn() -> String) -> Result<Vec<u8>> {
        let frame = self.read_checked(&c.extent(), &who)?;
        let mut out = vec![0u8; c.raw_len as usize];
        residual::zstd_decompress_exact(&frame, &mut out)
            .map_err(|e| Error::integrity(&self.path, format!("{}: {e}", who())))?;
        Ok(out)
    }

    /// Rebuilds the original bytes of chunk `ci` of tensor `ti` at full
    /// fidelity into `out` (resized to the chunk's original length). With
    /// `requantize`, also quantizes the rebuilt values again and requires the
    /// stored base to be identical: the hot tier is then proven to be the
    /// quantization of exactly these weights.
    pub fn rebuild_chunk_into(
        &self,
        ti: usize,
        ci: usize,
        out: &mut Vec<u8>,
        requantize: bool,
    ) -> Result<()> {
        let t = &self.manifest.tensors[ti];
        let who = || format!("tensor {:?} chunk {ci}", t.name);
        match &t.storage {
            Storage::Raw { chunks } => self.read_checked_into(&chunks[ci], out, who),
            Storage::Decomposed {
                chunks,
                cols,
                residual: kind,
                ..
            } => {
                let c = &chunks[ci];
                let kind = residual::Kind::from_name(kind).expect("validated");
                SCRATCH.with(|s| {
                    let (base, cold) = &mut *s.borrow_mut();
                    self.read_checked_into(&c.base, base, || format!("{} (hot base)", who()))?;
                    self.read_checked_into(&c.cold, cold, || format!("{} (cold residual)", who()))?;
                    let dtype = FloatDtype::from_name(&t.dtype).expect("validated");
                    let layout = t.base_layout().expect("decomposed");
                    set_len(out, (c.rows * cols) as usize * dtype.width());
                    residual::decode(dtype, &layout, base, cold, out, kind)
                        .map_err(|e| Error::integrity(&self.path, format!("{}: {e}", who())))?;
                    if requantize {
                        // `cold` is free again: reuse it for the fresh base.
                        set_len(cold, base.len());
                        tpde_codecs::base::quantize(dtype, &layout, out, cold);
                        if cold != base {
                            return Err(Error::integrity(
                                &self.path,
                                format!(
                                    "{} (hot base): not the quantization of the rebuilt weights",
                                    who()
                                ),
                            ));
                        }
                    }
                    Ok(())
                })
            }
        }
    }

    /// Original bytes of each chunk of a tensor.
    pub fn chunk_lens(&self, t: &Tensor) -> Vec<u64> {
        match &t.storage {
            Storage::Raw { chunks } => chunks.iter().map(|c| c.len).collect(),
            Storage::Decomposed { chunks, cols, .. } => {
                let w = t.byte_len / t.numel().unwrap_or(1).max(1);
                chunks.iter().map(|c| c.rows * cols * w).collect()
            }
        }
    }

    /// Checks that every padding byte is zero.
    pub fn check_padding(&self) -> Result<()> {
        for (a, b) in self.manifest.padding(self.header.manifest_offset) {
            let mut at = a;
            while at < b {
                let n = (b - at).min(1 << 20);
                let buf = crate::pack::read_at(&self.file, &self.path, at, n)?;
                if let Some(i) = buf.iter().position(|&x| x != 0) {
                    return Err(Error::integrity(
                        &self.path,
                        FormatError::NonZeroPadding(at + i as u64).to_string(),
                    ));
                }
                at += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_huge_pages_rounds_from_one_huge_page_up() {
        let h = HUGE_PAGE as u64;
        for (len, want) in [
            (0, 0),
            (4096, 4096),
            (h - 1, h - 1),
            (h, h),
            (h + 1, 2 * h),
            (5 * h + 12_345, 6 * h),
            (u64::MAX, u64::MAX),
        ] {
            assert_eq!(whole_huge_pages(len), want, "{len}");
        }
    }

    #[test]
    fn aligned_buffers_are_zeroed_aligned_and_hold_what_is_written() {
        // Below a huge page (on the heap), exactly one, and past one (mapped).
        for cap in [0, 4096, 12_345, HUGE_PAGE, 3 * HUGE_PAGE + 777] {
            let mut b = AlignedBuf::new(cap as u64);
            assert_eq!(b.capacity(), cap);
            let s = b.get_mut(usize::MAX);
            assert_eq!(s.len(), cap, "get_mut gives at most the capacity");
            assert!(s.iter().all(|&x| x == 0), "{cap}: zero-filled");
            if cap > 0 {
                assert!((s.as_ptr() as usize).is_multiple_of(SECTION_ALIGN as usize));
            }
            if cap >= HUGE_PAGE {
                assert!(
                    (s.as_ptr() as usize).is_multiple_of(HUGE_PAGE),
                    "{cap}: starts on a huge page"
                );
            }
            for (i, x) in s.iter_mut().enumerate() {
                *x = (i % 251) as u8;
            }
            // Moving the buffer moves no byte.
            let mut moved = b;
            let s = moved.get_mut(cap);
            assert!(s.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
            assert_eq!(moved.get_mut(10).len(), cap.min(10));
        }
    }

    #[test]
    fn huge_page_advice_leaves_the_bytes_alone() {
        for len in [0usize, 1, 4096, HUGE_PAGE + 1, 3 * HUGE_PAGE] {
            let mut v: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            advise_huge_pages(&mut v);
            assert!(v.iter().enumerate().all(|(i, &x)| x == (i % 253) as u8));
            // On fresh memory, before it is touched.
            let mut z = vec![0u8; len];
            advise_huge_pages(&mut z);
            assert!(z.iter().all(|&x| x == 0));
        }
    }
}
