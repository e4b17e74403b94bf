use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors of the pack / verify / unpack pipelines. Each names the file it
/// concerns; `Display` is one line.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        source: tpde_ingest::safetensors::SafetensorsError,
    },
    #[error("{}: {source}", path.display())]
    Gguf {
        path: PathBuf,
        source: tpde_ingest::gguf::GgufError,
    },
    #[error("{}: {source}", path.display())]
    Format {
        path: PathBuf,
        source: tpde_format::FormatError,
    },
    /// The input is unusable for a reason of its own.
    #[error("{}: {msg}", path.display())]
    Input { path: PathBuf, msg: String },
    /// The destination cannot be written as asked.
    #[error("{}: {msg}", path.display())]
    Destination { path: PathBuf, msg: String },
    /// Stored data does not match its checksum or digest, or rebuilt data
    /// differs from the source: the container (or the source) is not what
    /// the manifest says.
    #[error("{}: {what}", path.display())]
    Integrity { path: PathBuf, what: String },
}

impl Error {
    /// Whether this error means "verification found a mismatch" (exit 1)
    /// rather than "could not do the job" (exit 2).
    pub fn is_integrity(&self) -> bool {
        matches!(self, Error::Integrity { .. })
    }

    pub(crate) fn io<'a>(
        path: &'a Path,
        op: &'static str,
    ) -> impl FnOnce(std::io::Error) -> Error + 'a {
        move |source| Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    /// An unusable input, named by `path`.
    pub fn input(path: &Path, msg: impl Into<String>) -> Error {
        Error::Input {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    /// Stored data that is not what the manifest says, named by `path`.
    pub fn integrity(path: &Path, what: impl Into<String>) -> Error {
        Error::Integrity {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub(crate) fn format(path: &Path) -> impl FnOnce(tpde_format::FormatError) -> Error + '_ {
        move |source| Error::Format {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
