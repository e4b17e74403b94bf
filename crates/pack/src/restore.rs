//! Rebuilding source files from a container, byte stream by byte stream,
//! with every checksum and digest checked on the way: the shared core of
//! `verify` and `unpack`.

use crate::atomic::AtomicDir;
use crate::container::Container;
use crate::digest::{Piece, Stream};
use crate::error::{Error, Result};
use crate::pack::read_at;
use crate::Progress;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tpde_format::FileContent;

/// Receives a restored file's bytes in order, with a description of where
/// they come from (for error messages).
pub type Sink<'a> = dyn FnMut(&[u8], &dyn Fn() -> String) -> Result<()> + Send + 'a;

/// One piece of a restored file. Each job also records where its bytes sit
/// in the file and in its tensor (planned from the manifest's lengths), so
/// that the worker hashes them: see [`crate::digest`].
struct Placed {
    job: Job,
    file_at: u64,
    tensor_at: u64,
}

enum Job {
    Blob {
        chunk: usize,
        header: bool,
    },
    Tensor {
        tensor: usize,
        chunk: usize,
        last: bool,
    },
    /// Padding bytes after a tensor, taken in order from the file's padding blob.
    Pad {
        len: u64,
    },
}

/// Reads a blob's content in order, one decompressed chunk at a time.
struct BlobStream<'a> {
    c: &'a Container,
    blob: &'a tpde_format::Blob,
    who: String,
    next: usize,
    buf: Vec<u8>,
    at: usize,
}

impl<'a> BlobStream<'a> {
    fn new(c: &'a Container, blob: &'a tpde_format::Blob, who: String) -> Self {
        BlobStream {
            c,
            blob,
            who,
            next: 0,
            buf: Vec::new(),
            at: 0,
        }
    }

    /// Hands the next `n` bytes to `out`, in pieces.
    fn take(&mut self, mut n: u64, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        while n > 0 {
            if self.at == self.buf.len() {
                let Some(chunk) = self.blob.chunks.get(self.next) else {
                    return Err(Error::integrity(
                        &self.c.path,
                        format!("{}: ends early", self.who),
                    ));
                };
                let i = self.next;
                self.buf = self
                    .c
                    .read_blob_chunk(chunk, || format!("{} chunk {i}", self.who))?;
                self.next += 1;
                self.at = 0;
            }
            let k = (self.buf.len() - self.at).min(n as usize);
            out(&self.buf[self.at..self.at + k])?;
            self.at += k;
            n -= k as u64;
        }
        Ok(())
    }
}

/// Streams the original bytes of file `fi` to `sink` in order, checking
/// chunk checksums, tensor digests, the file digest and its length.
/// `sink` gets the bytes and a description of where they come from.
pub fn restore_file(
    c: &Container,
    fi: usize,
    requantize: bool,
    progress: &dyn Progress,
    sink: &mut Sink,
) -> Result<()> {
    let f = &c.manifest.files[fi];
    let mut jobs = Vec::new();
    let no_pads: &[u64] = &[];
    let (blob, tensors, pad_after, padding) = match &f.content {
        FileContent::Blob { blob } => (blob, &[][..], no_pads, None),
        FileContent::Safetensors { header, tensors } => (header, &tensors[..], no_pads, None),
        FileContent::Gguf {
            header,
            tensors,
            pad_after,
            padding,
        } => (header, &tensors[..], &pad_after[..], Some(padding)),
    };
    let is_header = !matches!(f.content, FileContent::Blob { .. });
    let mut file_at = 0u64;
    for (ci, chunk) in blob.chunks.iter().enumerate() {
        jobs.push(Placed {
            job: Job::Blob {
                chunk: ci,
                header: is_header,
            },
            file_at,
            tensor_at: 0,
        });
        file_at = file_at.saturating_add(chunk.raw_len);
    }
    {
        for (k, &ti) in tensors.iter().enumerate() {
            let t = &c.manifest.tensors[ti as usize];
            let lens = c.chunk_lens(t);
            let n = lens.len();
            if n == 0 && t.blake3 != blake3::hash(&[]).to_hex().as_str() {
                return Err(Error::integrity(
                    &c.path,
                    format!("tensor {:?}: digest mismatch", t.name),
                ));
            }
            let mut tensor_at = 0u64;
            for (ci, len) in lens.into_iter().enumerate() {
                jobs.push(Placed {
                    job: Job::Tensor {
                        tensor: ti as usize,
                        chunk: ci,
                        last: ci + 1 == n,
                    },
                    file_at,
                    tensor_at,
                });
                file_at = file_at.saturating_add(len);
                tensor_at = tensor_at.saturating_add(len);
            }
            if let Some(&len) = pad_after.get(k).filter(|&&l| l > 0) {
                jobs.push(Placed {
                    job: Job::Pad { len },
                    file_at,
                    tensor_at: 0,
                });
                file_at = file_at.saturating_add(len);
            }
        }
    }
    let mut pads = padding.map(|b| BlobStream::new(c, b, format!("file {:?} padding", f.path)));

    // The file's and the current tensor's BLAKE3, joined from what the
    // workers hashed of each piece.
    let mut file_hash = Stream::new();
    let mut tensor_hash = Stream::new();
    let mut total = 0u64;
    let what = |header: bool| if header { "header" } else { "blob" };
    // Output buffers go back to a pool after their commit: no zero-filled
    // allocation per chunk.
    let pool = std::sync::Mutex::new(Vec::<Vec<u8>>::new());
    let out_of_place = |what: String| {
        Error::integrity(
            &c.path,
            format!("{what}: rebuilt to another length than the manifest's"),
        )
    };
    crate::pipeline::ordered(
        &jobs,
        |placed| {
            let bytes = match &placed.job {
                Job::Blob { chunk, header } => c.read_blob_chunk(&blob.chunks[*chunk], || {
                    format!("file {:?} {} chunk {chunk}", f.path, what(*header))
                })?,
                Job::Pad { .. } => Vec::new(),
                Job::Tensor { tensor, chunk, .. } => {
                    let mut out = pool.lock().expect("pool").pop().unwrap_or_default();
                    c.rebuild_chunk_into(*tensor, *chunk, &mut out, requantize)?;
                    out
                }
            };
            let in_file = Piece::of(&bytes, placed.file_at, f.len);
            let in_tensor = match placed.job {
                Job::Tensor { tensor, .. } => Some(Piece::of(
                    &bytes,
                    placed.tensor_at,
                    c.manifest.tensors[tensor].byte_len,
                )),
                _ => None,
            };
            Ok((bytes, in_file, in_tensor))
        },
        |placed, (bytes, in_file, in_tensor)| {
            let job = &placed.job;
            if !matches!(job, Job::Pad { .. }) && !file_hash.add(&in_file) {
                return Err(out_of_place(format!("file {:?}", f.path)));
            }
            total += bytes.len() as u64;
            match job {
                Job::Blob { chunk, header } => {
                    sink(&bytes, &|| {
                        format!("file {:?} {} chunk {chunk}", f.path, what(*header))
                    })?;
                }
                Job::Tensor {
                    tensor,
                    chunk,
                    last,
                    ..
                } => {
                    let t = &c.manifest.tensors[*tensor];
                    if !in_tensor.is_some_and(|p| tensor_hash.add(&p)) {
                        return Err(out_of_place(format!("tensor {:?}", t.name)));
                    }
                    sink(&bytes, &|| format!("tensor {:?} chunk {chunk}", t.name))?;
                    if *last {
                        let got = std::mem::take(&mut tensor_hash).finalize();
                        if got.to_hex().as_str() != t.blake3 {
                            return Err(Error::integrity(
                                &c.path,
                                format!("tensor {:?}: blake3 of the rebuilt bytes does not match the recorded digest", t.name),
                            ));
                        }
                    }
                }
                Job::Pad { len } => {
                    let pads = pads
                        .as_mut()
                        .expect("padding jobs come with a padding blob");
                    pads.take(*len, &mut |b: &[u8]| {
                        file_hash.bytes(b);
                        total += b.len() as u64;
                        progress.advance(b.len() as u64);
                        sink(b, &|| format!("file {:?} padding", f.path))
                    })?;
                }
            }
            progress.advance(bytes.len() as u64);
            pool.lock().expect("pool").push(bytes);
            Ok(())
        },
    )?;
    if total != f.len {
        return Err(Error::integrity(
            &c.path,
            format!(
                "file {:?}: rebuilt {total} bytes, recorded {}",
                f.path, f.len
            ),
        ));
    }
    if file_hash.finalize().to_hex().as_str() != f.blake3 {
        return Err(Error::integrity(
            &c.path,
            format!(
                "file {:?}: blake3 of the rebuilt file does not match the recorded digest",
                f.path
            ),
        ));
    }
    Ok(())
}

/// What `verify` checked.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifyReport {
    pub files: usize,
    pub tensors: usize,
    pub original_bytes: u64,
    pub container_bytes: u64,
    pub compared_with_source: bool,
    pub requantized_hot_tier: bool,
    pub seconds: f64,
}

/// What `verify` checks beyond every checksum, digest and rebuilt byte.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The packed file or folder: compare every byte with it.
    pub source: Option<PathBuf>,
    /// Quantize every rebuilt tensor again and require the hot tier to be
    /// identical (slower).
    pub requantize: bool,
}

/// Checks every checksum and digest, rebuilds every tensor, and with
/// `source` (the packed file or folder) compares every byte with it.
pub fn verify(path: &Path, source: Option<&Path>, progress: &dyn Progress) -> Result<VerifyReport> {
    let opts = VerifyOptions {
        source: source.map(Path::to_path_buf),
        requantize: false,
    };
    verify_with(path, &opts, progress)
}

/// [`verify`] with every option.
pub fn verify_with(
    path: &Path,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let start = Instant::now();
    let source = opts.source.as_deref();
    let c = Container::open(path)?;
    c.check_padding()?;
    let m = &c.manifest;
    for fi in 0..m.files.len() {
        headers_agree(&c, fi)?;
    }
    let sources: Option<Vec<PathBuf>> = source.map(|s| source_paths(&c, s)).transpose()?;
    progress.begin("verify", m.original_bytes());
    for fi in 0..m.files.len() {
        match &sources {
            None => restore_file(&c, fi, opts.requantize, progress, &mut |_, _| Ok(()))?,
            Some(paths) => {
                let sp = &paths[fi];
                let sf =
                    crate::source::open_regular(sp).map_err(Error::io(sp, "cannot open source"))?;
                let slen = sf
                    .metadata()
                    .map_err(Error::io(sp, "cannot read source"))?
                    .len();
                if slen != m.files[fi].len {
                    return Err(Error::integrity(
                        sp,
                        format!(
                            "source is {slen} bytes, the container holds {}",
                            m.files[fi].len
                        ),
                    ));
                }
                let mut at = 0u64;
                restore_file(&c, fi, opts.requantize, progress, &mut |bytes, who| {
                    let theirs = read_at(&sf, sp, at, bytes.len() as u64)?;
                    if let Some(i) = bytes.iter().zip(&theirs).position(|(a, b)| a != b) {
                        return Err(Error::integrity(
                            sp,
                            format!(
                                "differs from the container at byte {} ({})",
                                at + i as u64,
                                who()
                            ),
                        ));
                    }
                    at += bytes.len() as u64;
                    Ok(())
                })?;
            }
        }
    }
    progress.end();
    Ok(VerifyReport {
        files: m.files.len(),
        tensors: m.tensors.len(),
        original_bytes: m.original_bytes(),
        container_bytes: c.len,
        compared_with_source: source.is_some(),
        requantized_hot_tier: opts.requantize,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// An integrity error unless the tensors the manifest lists for file `fi`
/// are the ones its stored header describes: the same names, and for each
/// the same dtype, shape, length and place in the rebuilt file (the places
/// follow from the manifest's order, as restoring lays the file out; tensors
/// are matched by name, and a zero-length one has no place to check, so
/// that zero-length tensors sharing an offset may come in either order). `extract`, `run` and `bench` go by the manifest,
/// `unpack` restores the header: a container whose two descriptions differ
/// (a manifest edited and signed anew) passes every digest, but is not what
/// it claims.
fn headers_agree(c: &Container, fi: usize) -> Result<()> {
    let f = &c.manifest.files[fi];
    let (blob, tensors, pad_after): (_, &[u32], &[u64]) = match &f.content {
        FileContent::Blob { .. } => return Ok(()),
        FileContent::Safetensors { header, tensors } => (header, tensors, &[]),
        FileContent::Gguf {
            header,
            tensors,
            pad_after,
            ..
        } => (header, tensors, pad_after),
    };
    let bad = |what: String| Error::integrity(&c.path, format!("file {:?}: {what}", f.path));
    // The parsers read only the header's own bytes, chunk by chunk.
    let mut reader = BlobReader::new(c, blob, &f.path);
    let kind = match &f.content {
        FileContent::Gguf { .. } => tpde_ingest::gguf::read_header(&mut reader, f.len)
            .map(|(header, raw_header)| crate::source::SourceKind::Gguf { header, raw_header })
            .map_err(|e| e.to_string()),
        _ => tpde_ingest::safetensors::read_header(&mut reader, f.len)
            .map(
                |(header, raw_header)| crate::source::SourceKind::Safetensors {
                    header,
                    raw_header,
                },
            )
            .map_err(|e| e.to_string()),
    };
    if let Some(e) = reader.failed.take() {
        return Err(e);
    }
    let kind = kind.map_err(|e| bad(format!("its stored header does not parse: {e}")))?;
    let listed = crate::pack::source_tensors(&kind);
    if listed.len() != tensors.len() {
        return Err(bad(format!(
            "its header lists {} tensors, the manifest {}",
            listed.len(),
            tensors.len()
        )));
    }
    let by_name: std::collections::HashMap<&str, &crate::pack::SourceTensor> =
        listed.iter().map(|s| (s.name, s)).collect();
    // Where restoring puts each tensor: after the header, one after the
    // other in the manifest's order, with the padding kept after each.
    let mut at: u64 = blob
        .chunks
        .iter()
        .map(|ch| ch.raw_len)
        .fold(0, u64::saturating_add);
    for (k, &ti) in tensors.iter().enumerate() {
        let Some(t) = c.manifest.tensors.get(ti as usize) else {
            return Err(bad(format!("tensor index {ti} out of range")));
        };
        let Some(s) = by_name.get(t.name.as_str()) else {
            return Err(bad(format!(
                "the manifest lists tensor {:?}, which its header does not",
                t.name
            )));
        };
        // A tensor of no bytes has no place of its own: the header may put
        // it at either end of a neighbour.
        let place = |x: u64| if s.byte_len == 0 { 0 } else { x };
        if (t.dtype.as_str(), &t.shape[..], t.byte_len, place(at))
            != (s.dtype, &s.shape[..], s.byte_len, place(s.src_offset))
        {
            return Err(bad(format!(
                "tensor {:?}: the manifest says {} {:?}, {} bytes at {at}; the file's header \
                 says {} {:?}, {} bytes at {}",
                t.name, t.dtype, t.shape, t.byte_len, s.dtype, s.shape, s.byte_len, s.src_offset
            )));
        }
        at = at
            .saturating_add(t.byte_len)
            .saturating_add(pad_after.get(k).copied().unwrap_or(0));
    }
    Ok(())
}

/// The content of a blob as a reader: each chunk checked and decompressed
/// when the reading gets to it (a parser reads only what it needs). A
/// failed chunk ends the reading, its error kept in `failed`.
pub(crate) struct BlobReader<'a> {
    c: &'a Container,
    chunks: &'a [tpde_format::BlobChunk],
    next: usize,
    buf: Vec<u8>,
    at: usize,
    /// The file the blob belongs to, for errors.
    who: &'a str,
    pub(crate) failed: Option<Error>,
}

impl<'a> BlobReader<'a> {
    pub(crate) fn new(c: &'a Container, blob: &'a tpde_format::Blob, who: &'a str) -> Self {
        BlobReader {
            c,
            chunks: &blob.chunks,
            next: 0,
            buf: Vec::new(),
            at: 0,
            who,
            failed: None,
        }
    }
}

impl std::io::Read for BlobReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            let Some(chunk) = self.chunks.get(self.next) else {
                return Ok(0);
            };
            let i = self.next;
            self.next += 1;
            match self
                .c
                .read_blob_chunk(chunk, || format!("file {:?} header chunk {i}", self.who))
            {
                Ok(b) => (self.buf, self.at) = (b, 0),
                Err(e) => {
                    let msg = e.to_string();
                    self.failed = Some(e);
                    return Err(std::io::Error::other(msg));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Source path of each container file: `source` itself for a one-file
/// container packed from a file, else `source/<path>`.
fn source_paths(c: &Container, source: &Path) -> Result<Vec<PathBuf>> {
    let files = &c.manifest.files;
    if source.is_dir() {
        Ok(files.iter().map(|f| source.join(&f.path)).collect())
    } else if files.len() == 1 {
        Ok(vec![source.to_path_buf()])
    } else {
        Err(Error::input(
            source,
            format!(
                "the container holds {} files: give the folder they came from",
                files.len()
            ),
        ))
    }
}

/// What `unpack` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UnpackReport {
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Writes the original files into the folder `dest` (which must not exist
/// or be empty), atomically: all files, verified, or nothing.
pub fn unpack(path: &Path, dest: &Path, progress: &dyn Progress) -> Result<UnpackReport> {
    let start = Instant::now();
    let c = Container::open(path)?;
    c.check_padding()?;
    let out = AtomicDir::create(dest)?;
    for fi in 0..c.manifest.files.len() {
        headers_agree(&c, fi)?;
    }
    let mut dirs = Vec::new();
    progress.begin("unpack", c.manifest.original_bytes());
    for (fi, f) in c.manifest.files.iter().enumerate() {
        let target = out.tmp.join(&f.path);
        if let Some(parent) = target.parent() {
            if !parent.exists() {
                std::fs::create_dir_all(parent)
                    .map_err(Error::io(parent, "cannot create folder"))?;
            }
            let mut p = parent.to_path_buf();
            while p != out.tmp && !dirs.contains(&p) {
                dirs.push(p.clone());
                if !p.pop() {
                    break;
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(Error::io(&target, "cannot create"))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        restore_file(&c, fi, false, progress, &mut |bytes, _| {
            w.write_all(bytes)
                .map_err(Error::io(&target, "cannot write"))
        })?;
        let file = w.into_inner().map_err(|e| Error::Io {
            path: target.clone(),
            op: "cannot write",
            source: e.into_error(),
        })?;
        file.sync_all()
            .map_err(Error::io(&target, "cannot fsync"))?;
    }
    out.commit(&dirs)?;
    progress.end();
    Ok(UnpackReport {
        files: c.manifest.files.len(),
        bytes: c.manifest.original_bytes(),
        seconds: start.elapsed().as_secs_f64(),
    })
}
