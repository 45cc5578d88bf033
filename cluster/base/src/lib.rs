//! keel-base: what the cluster model and the node's host adapters share, and nothing
//! else: the names of the kernel objects Keel creates and the rule for resource names
//! ([`names`]), the limits the CLI checks before a long upload, the one-line
//! error-chain formatter every crate logs with, and the error of an operation on a named
//! file ([`FileError`]) that many of their error enums carry.

pub mod names;

use std::path::{Path, PathBuf};

/// An I/O error on a named file or directory: what was being done, to which path, and the
/// system's error as the source (so the chain reads "create /var/lib/x: No space left").
#[derive(Debug)]
pub struct FileError {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl FileError {
    /// For `map_err`: `File::create(&p).map_err(FileError::on("create", &p))?`.
    pub fn on<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.op, self.path.display())
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The most cloud-init user data a VM may carry, in bytes: the model refuses more, and the
/// CLI says so before it reads a larger file.
pub const MAX_USER_DATA: usize = 64 * 1024;

/// Formats an error with its whole `source()` chain, for logs and one-line CLI errors.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
