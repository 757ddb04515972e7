//! Project automation behind `cargo xtask` (see `main.rs` for the commands).
//!
//! - [`regenerate`]: regenerate `generated/` from `references/` (or check it is fresh);
//! - [`check_bundle`]: generate a reference bundle into a scratch crate and lint it;
//! - [`fetch`]: download a deployment's exchange references and their schemas.
#![deny(missing_docs)]

pub mod check_bundle;
pub mod fetch;
pub mod regenerate;

use std::fmt;
use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `path` relative to the workspace root when it is inside it, for messages.
pub fn display_path(path: &Path) -> String {
    let root = workspace_root();
    match path.strip_prefix(&root) {
        Ok(relative) if !relative.as_os_str().is_empty() => relative.display().to_string(),
        _ => path.display().to_string(),
    }
}

/// Why a command failed.
#[derive(Debug)]
pub enum Failure {
    /// The generator rejected its input (the message names file and JSON pointer).
    Codegen(exchange_codegen::Error),
    /// A file could not be read or written.
    Io {
        /// The path.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// `--check` found files that differ from what would be generated.
    Stale(regenerate::Report),
    /// Anything else, described.
    Other(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Codegen(error) => write!(f, "{error}"),
            Failure::Io { path, source } => write!(f, "{}: {source}", display_path(path)),
            Failure::Stale(report) => write!(f, "{report}"),
            Failure::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Failure {}

impl From<exchange_codegen::Error> for Failure {
    fn from(error: exchange_codegen::Error) -> Self {
        Failure::Codegen(error)
    }
}

pub(crate) fn io_failure(path: &Path) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    move |source| Failure::Io {
        path: path.to_path_buf(),
        source,
    }
}
