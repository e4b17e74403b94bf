//! What `pack` reads: a `.safetensors` file, a `.gguf` file (with its
//! sibling shards when it is part of a split set), or a model folder.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use tpde_ingest::gguf;
use tpde_ingest::safetensors::{self as st, Header};

/// Most files read from one model folder.
pub const MAX_FOLDER_FILES: usize = 100_000;

/// One input file.
pub struct SourceFile {
    /// Path inside the restored folder (`/`-separated).
    pub rel: String,
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
    pub modified: Option<std::time::SystemTime>,
    pub kind: SourceKind,
}

pub enum SourceKind {
    /// A safetensors file: parsed header and its raw bytes `[0, 8 + N)`.
    Safetensors { header: Header, raw_header: Vec<u8> },
    /// A GGUF file: parsed header and its raw bytes `[0, data_start)`.
    Gguf {
        header: gguf::Header,
        raw_header: Vec<u8>,
    },
    /// Any other file, carried byte for byte.
    Blob,
}

impl SourceKind {
    /// Names of the tensors this file holds.
    fn tensor_names(&self) -> Vec<&str> {
        match self {
            SourceKind::Safetensors { header, .. } => {
                header.tensors.iter().map(|t| t.name.as_str()).collect()
            }
            SourceKind::Gguf { header, .. } => {
                header.tensors.iter().map(|t| t.name.as_str()).collect()
            }
            SourceKind::Blob => Vec::new(),
        }
    }

    fn is_model(&self) -> bool {
        !matches!(self, SourceKind::Blob)
    }
}

/// All inputs of one pack, in restore order.
pub struct Source {
    pub root: PathBuf,
    pub files: Vec<SourceFile>,
    /// Entries of a folder that are neither files nor folders (FIFOs,
    /// sockets, devices), left out: their paths and what they are.
    pub skipped: Vec<(String, &'static str)>,
}

impl Source {
    /// Opens a `.safetensors` file or a model folder, read-only, and
    /// validates every safetensors header.
    pub fn open(path: &Path) -> Result<Source> {
        let meta = std::fs::metadata(path).map_err(Error::io(path, "cannot read"))?;
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        if meta.is_dir() {
            let mut rels = Vec::new();
            walk(path, path, &mut rels, &mut skipped)?;
            rels.sort();
            for (rel, p) in rels {
                files.push(open_file(&p, rel)?);
            }
            if !files.iter().any(|f| f.kind.is_model()) {
                return Err(Error::input(
                    path,
                    "folder holds no .safetensors or .gguf file",
                ));
            }
            check_index(path, &files)?;
        } else {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::input(path, "file name is not valid UTF-8"))?
                .to_string();
            if name.ends_with(".gguf") {
                for (rel, p) in gguf_set(path, &name)? {
                    files.push(open_file(&p, rel)?);
                }
            } else if name.ends_with(".safetensors") {
                files.push(open_file(path, name)?);
            } else {
                return Err(Error::input(
                    path,
                    "not a .safetensors or .gguf file or a model folder",
                ));
            }
        }
        // Tensor names are the container's identifiers: unique across shards.
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for f in &files {
            for name in f.kind.tensor_names() {
                if let Some(other) = seen.insert(name, &f.rel) {
                    return Err(Error::input(
                        &f.path,
                        format!("tensor {name:?} is also in {other}"),
                    ));
                }
            }
        }
        Ok(Source {
            root: path.to_path_buf(),
            files,
            skipped,
        })
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    /// Fails if any input changed since it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        for f in &self.files {
            let m = f
                .file
                .metadata()
                .map_err(Error::io(&f.path, "cannot read"))?;
            if m.len() != f.len || m.modified().ok() != f.modified {
                return Err(Error::input(
                    &f.path,
                    "file changed while it was being packed",
                ));
            }
        }
        Ok(())
    }
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf)>,
    skipped: &mut Vec<(String, &'static str)>,
) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(Error::io(dir, "cannot list folder"))?;
    for entry in rd {
        let entry = entry.map_err(Error::io(dir, "cannot list folder"))?;
        let p = entry.path();
        // Follows symlinks (Hugging Face caches link files into snapshots).
        let meta = std::fs::metadata(&p).map_err(Error::io(&p, "cannot read"))?;
        if meta.is_dir() {
            if entry.file_name() == ".git" {
                continue;
            }
            walk(root, &p, out, skipped)?;
        } else if meta.is_file() {
            let rel = p
                .strip_prefix(root)
                .ok()
                .and_then(|r| r.to_str())
                .ok_or_else(|| Error::input(&p, "path is not valid UTF-8"))?
                .replace(std::path::MAIN_SEPARATOR, "/");
            tpde_format::check_relative_path(&rel).map_err(|m| Error::input(&p, m))?;
            out.push((rel, p));
            if out.len() > MAX_FOLDER_FILES {
                return Err(Error::input(
                    root,
                    format!("more than {MAX_FOLDER_FILES} files"),
                ));
            }
        } else {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            let what = if t.is_fifo() {
                "a FIFO"
            } else if t.is_socket() {
                "a socket"
            } else {
                "a device"
            };
            let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy();
            skipped.push((rel.into_owned(), what));
        }
    }
    Ok(())
}

/// Opens `path` to read, without blocking on what is not a regular file: a
/// FIFO's `open` would wait for a writer forever, so the file is opened
/// non-blocking, and anything but a regular file or a folder (a FIFO, a
/// device, a socket) is refused before a byte is read. Folders are left to
/// the caller, which names them in its own words.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let t = file.metadata()?.file_type();
    let what = if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        // A regular file or a folder: reads block as usual from here on.
        // SAFETY: plain `fcntl` calls on a descriptor `file` owns.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags < 0
                || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        return Ok(file);
    };
    Err(std::io::Error::other(format!(
        "not a regular file ({what})"
    )))
}

fn open_file(path: &Path, rel: String) -> Result<SourceFile> {
    let file = open_regular(path).map_err(Error::io(path, "cannot open"))?;
    let meta = file.metadata().map_err(Error::io(path, "cannot read"))?;
    let len = meta.len();
    let kind =
        if rel.ends_with(".gguf") {
            let (header, raw_header) = gguf::read_header(std::io::BufReader::new(&file), len)
                .map_err(|source| Error::Gguf {
                    path: path.to_path_buf(),
                    source,
                })?;
            SourceKind::Gguf { header, raw_header }
        } else if rel.ends_with(".safetensors") {
            let (header, raw_header) = st::read_header(std::io::BufReader::new(&file), len)
                .map_err(|source| Error::Safetensors {
                    path: path.to_path_buf(),
                    source,
                })?;
            SourceKind::Safetensors { header, raw_header }
        } else {
            SourceKind::Blob
        };
    // The formats allow a tensor named "" (GGUF does; safetensors' JSON
    // does); a container finds tensors by name, so it cannot hold one.
    let names: Vec<&str> = match &kind {
        SourceKind::Gguf { header, .. } => header.tensors.iter().map(|t| &*t.name).collect(),
        SourceKind::Safetensors { header, .. } => header.tensors.iter().map(|t| &*t.name).collect(),
        SourceKind::Blob => Vec::new(),
    };
    if let Some(i) = names.iter().position(|n| n.is_empty()) {
        return Err(Error::input(
            path,
            format!("tensor {i} has an empty name, which a tpde container cannot hold"),
        ));
    }
    Ok(SourceFile {
        rel,
        path: path.to_path_buf(),
        file,
        len,
        modified: meta.modified().ok(),
        kind,
    })
}

/// When a folder has `model.safetensors.index.json`, every entry of its
/// `weight_map` must name a tensor that is in the shard it says.
fn check_index(root: &Path, files: &[SourceFile]) -> Result<()> {
    let Some(index) = files
        .iter()
        .find(|f| f.rel.ends_with(".safetensors.index.json"))
    else {
        return Ok(());
    };
    let text = std::fs::read(&index.path).map_err(Error::io(&index.path, "cannot read"))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::input(&index.path, format!("not valid JSON: {e}")))?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::input(&index.path, "no \"weight_map\" object"));
    };
    let dir = index.rel.rsplit_once('/').map_or("", |(d, _)| d);
    let mut where_is: HashMap<&str, &str> = HashMap::new();
    for f in files {
        if let SourceKind::Safetensors { header, .. } = &f.kind {
            for t in &header.tensors {
                where_is.insert(&t.name, &f.rel);
            }
        }
    }
    for (name, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            Error::input(
                &index.path,
                format!("weight_map entry {name:?} is not a string"),
            )
        })?;
        let want = if dir.is_empty() {
            shard.to_string()
        } else {
            format!("{dir}/{shard}")
        };
        match where_is.get(name.as_str()) {
            Some(&got) if got == want => {}
            Some(&got) => {
                return Err(Error::input(
                    &index.path,
                    format!("weight_map puts tensor {name:?} in {shard} but it is in {got}"),
                ))
            }
            None => {
                return Err(Error::input(
                    &index.path,
                    format!(
                        "weight_map names tensor {name:?} in {shard}, which is not in the folder"
                    ),
                ))
            }
        }
    }
    let _ = root;
    Ok(())
}

/// The files of a GGUF model given one of them: itself, or for a split
/// file (`<prefix>-00001-of-00003.gguf`) every shard, in order, all of
/// which must be present beside it.
fn gguf_set(path: &Path, name: &str) -> Result<Vec<(String, PathBuf)>> {
    let Some((prefix, _, count)) = gguf::split_name(name) else {
        return Ok(vec![(name.to_string(), path.to_path_buf())]);
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut set = Vec::with_capacity(count as usize);
    for i in 1..=count {
        let shard = format!("{prefix}-{i:05}-of-{count:05}.gguf");
        let p = dir.join(&shard);
        if !p.is_file() {
            return Err(Error::input(
                path,
                format!("split GGUF shard {shard} of {count} is missing"),
            ));
        }
        set.push((shard, p));
    }
    Ok(set)
}
