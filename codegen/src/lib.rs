//! Generates Rust bindings (crate `taskcluster-exchanges`) from Taskcluster
//! exchange references and the JSON Schemas of their messages.
//!
//! The pipeline has one module per stage, each tested on its own:
//!
//! 1. [`load`]: read a references directory or a bundle file, parse the JSON
//!    and validate the exchange references;
//! 2. [`resolve`]: `$ref` resolution across files and JSON-pointer fragments;
//! 3. [`model`]: the intermediate representation — every Rust type and name;
//! 4. [`emit`]: Rust source via `quote`, formatted by `prettyplease`, and
//!    the schema documents as JSON files ([`schema_files`]).
//!
//! [`generate`] runs them all in memory: on any error nothing is produced, and
//! the same input always gives byte-identical output.
//!
//! ```no_run
//! use exchange_codegen::{Sources, generate};
//! let sources = Sources::read(std::path::Path::new("references"))?;
//! for (path, contents) in generate(&sources)? {
//!     println!("{path}: {} bytes", contents.len());
//! }
//! # Ok::<(), exchange_codegen::Error>(())
//! ```
#![deny(missing_docs)]

use std::collections::BTreeMap;

pub mod emit;
pub mod error;
pub mod load;
pub mod model;
pub mod naming;
pub mod resolve;
pub mod schema_files;

pub use emit::Manifest;
pub use error::{Error, Location};
pub use load::Sources;

/// A generated file's path relative to the generated crate's root, with `/`
/// separators (`Cargo.toml`, `src/lib.rs`, `src/queue.rs`).
pub type RelativePath = String;

/// Options of [`generate_with`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// How the generated `Cargo.toml` refers to its dependencies.
    pub manifest: Manifest,
}

/// Generates the crate for this repository's workspace (`generated/`).
pub fn generate(sources: &Sources) -> Result<BTreeMap<RelativePath, String>, Error> {
    generate_with(sources, &Options::default())
}

/// Generates the crate: every file's contents by relative path.
pub fn generate_with(
    sources: &Sources,
    options: &Options,
) -> Result<BTreeMap<RelativePath, String>, Error> {
    let loaded = load::load(sources)?;
    let model = model::build(&loaded)?;
    emit::emit(&model, &loaded.schemas, &options.manifest)
}
