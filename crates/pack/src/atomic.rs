//! Atomic outputs: write beside the destination, fsync, rename, fsync the
//! folder. A process killed at any moment leaves either nothing or the
//! previous file at the destination (plus, at worst, a temporary file whose
//! name starts with `.` and contains `.tpde-tmp-`).

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Marker in the names of temporary outputs.
pub const TMP_MARKER: &str = ".tpde-tmp-";

fn tmp_name(dest: &Path) -> Result<(PathBuf, PathBuf)> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Destination {
            path: dest.to_path_buf(),
            msg: "destination has no file name".into(),
        })?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Destination {
            path: dest.to_path_buf(),
            msg: "destination folder does not exist".into(),
        });
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = parent.join(format!(".{name}{TMP_MARKER}{}-{nanos}", std::process::id()));
    Ok((parent, tmp))
}

/// Refuses to write `dest` when it is one of `inputs` (the same file, by
/// device and inode: another path, a hard link or a symbolic link to it
/// included). Nothing at `dest` is a pass.
pub fn refuse_inputs<'a>(dest: &Path, inputs: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(d) = id(dest) else {
        return Ok(());
    };
    if inputs.into_iter().any(|p| id(p) == Some(d)) {
        return Err(Error::Destination {
            path: dest.to_path_buf(),
            msg: "destination is one of the inputs".into(),
        });
    }
    Ok(())
}

/// Refuses a destination that exists and is not a regular file (a folder, a
/// device such as `/dev/null`, a FIFO, a socket): renaming the output onto
/// it would replace it, or fail only after all the work.
fn refuse_special(dest: &Path) -> Result<()> {
    match std::fs::metadata(dest) {
        Ok(m) if m.is_dir() => Err(Error::Destination {
            path: dest.to_path_buf(),
            msg: "destination is a folder".into(),
        }),
        Ok(m) if !m.is_file() => Err(Error::Destination {
            path: dest.to_path_buf(),
            msg: "destination exists and is not a regular file".into(),
        }),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir, "cannot fsync folder"))
}

/// A file being written; becomes `dest` on [`AtomicFile::commit`], is
/// removed if dropped before.
pub struct AtomicFile {
    pub file: File,
    tmp: PathBuf,
    dest: PathBuf,
    parent: PathBuf,
    done: bool,
}

impl AtomicFile {
    /// Starts writing `dest`, which must not exist or be a regular file
    /// (which [`AtomicFile::commit`] replaces).
    pub fn create(dest: &Path) -> Result<AtomicFile> {
        refuse_special(dest)?;
        let (parent, tmp) = tmp_name(dest)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(Error::io(&tmp, "cannot create"))?;
        Ok(AtomicFile {
            file,
            tmp,
            dest: dest.to_path_buf(),
            parent,
            done: false,
        })
    }

    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Starts writeback of the file's dirty pages without waiting for it, so
    /// the disk writes while the caller computes and [`AtomicFile::commit`]'s
    /// fsync finds little left to do. A hint only: errors are left to that
    /// fsync, which reports them.
    pub fn start_writeback(&self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: a plain syscall on a file descriptor this value owns;
            // offset 0 and length 0 mean the whole file.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
    }

    pub fn commit(mut self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(Error::io(&self.tmp, "cannot fsync"))?;
        std::fs::rename(&self.tmp, &self.dest)
            .map_err(Error::io(&self.dest, "cannot rename into place"))?;
        self.done = true;
        sync_dir(&self.parent)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A folder being filled; becomes `dest` on [`AtomicDir::commit`]. `dest`
/// must not exist, or be an empty folder.
pub struct AtomicDir {
    pub tmp: PathBuf,
    dest: PathBuf,
    parent: PathBuf,
    done: bool,
}

impl AtomicDir {
    pub fn create(dest: &Path) -> Result<AtomicDir> {
        // Refused before any work: the rename at the end would fail on it
        // (a link to a folder is not replaced by one). Without its
        // trailing separators, so that `link/` is not followed.
        let own = dest.components().as_path();
        if std::fs::symlink_metadata(own).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::Destination {
                path: dest.to_path_buf(),
                msg: "destination is a symbolic link (name the folder itself)".into(),
            });
        }
        if let Ok(mut rd) = std::fs::read_dir(dest) {
            if rd.next().is_some() {
                return Err(Error::Destination {
                    path: dest.to_path_buf(),
                    msg: "destination folder exists and is not empty".into(),
                });
            }
        } else if dest.exists() {
            return Err(Error::Destination {
                path: dest.to_path_buf(),
                msg: "destination exists and is not a folder".into(),
            });
        }
        let (parent, tmp) = tmp_name(dest)?;
        std::fs::create_dir(&tmp).map_err(Error::io(&tmp, "cannot create folder"))?;
        Ok(AtomicDir {
            tmp,
            dest: dest.to_path_buf(),
            parent,
            done: false,
        })
    }

    /// fsyncs every folder under the temporary one, then renames it into place.
    pub fn commit(mut self, subdirs: &[PathBuf]) -> Result<()> {
        for d in subdirs {
            sync_dir(d)?;
        }
        sync_dir(&self.tmp)?;
        if self.dest.is_dir() {
            // Empty (checked at creation); rename cannot replace a folder on every system.
            std::fs::remove_dir(&self.dest)
                .map_err(Error::io(&self.dest, "cannot replace empty folder"))?;
        }
        std::fs::rename(&self.tmp, &self.dest)
            .map_err(Error::io(&self.dest, "cannot rename into place"))?;
        self.done = true;
        sync_dir(&self.parent)
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
