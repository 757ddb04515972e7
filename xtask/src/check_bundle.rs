//! `cargo xtask check-bundle [PATH]`: generate a reference bundle (default: the
//! v19 corpus) into a scratch crate that depends on `exchange-runtime` by path,
//! then `cargo clippy -D warnings` it (which type-checks it too).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use exchange_codegen::{Manifest, Options, generate_with};

use crate::regenerate::{read_sources, write_generated};
use crate::{Failure, display_path, io_failure, workspace_root};

/// The bundle `check-bundle` reads when given none: `TC_REFERENCES_BUNDLE`,
/// or else the Taskcluster v19 bundle beside the repository
/// (`../shared/corpus/taskcluster-v19/references.json`, which only CI has).
pub fn default_bundle() -> PathBuf {
    std::env::var_os("TC_REFERENCES_BUNDLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("../shared/corpus/taskcluster-v19/references.json")
        })
}

/// The scratch directory holding the crate (`crate/`) and its target dir (`target/`).
pub fn default_scratch() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("check-bundle")
}

/// Writes the generated crate for `references` into `crate_dir`, set up as
/// a standalone crate (with the workspace's `Cargo.lock`, so dependency
/// versions match). Returns the generated files.
pub fn write_scratch_crate(
    references: &Path,
    crate_dir: &Path,
) -> Result<BTreeMap<String, String>, Failure> {
    let sources = read_sources(references)?;
    let options = Options {
        manifest: Manifest::Standalone {
            runtime_path: workspace_root().join("runtime"),
        },
    };
    let files = generate_with(&sources, &options)?;
    write_generated(crate_dir, &files, false, "cargo xtask check-bundle")?;
    let lock = workspace_root().join("Cargo.lock");
    if lock.exists() {
        fs::copy(&lock, crate_dir.join("Cargo.lock")).map_err(io_failure(&lock))?;
    }
    Ok(files)
}

/// Runs `cargo <args>` in `crate_dir` with `target_dir` as target directory.
pub fn cargo_in(crate_dir: &Path, target_dir: &Path, args: &[&str]) -> Result<(), Failure> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(crate_dir)
        .env("CARGO_TARGET_DIR", target_dir)
        .status()
        .map_err(|source| {
            Failure::Other(format!(
                "cannot run {} in {}: {source}",
                cargo.to_string_lossy(),
                display_path(crate_dir)
            ))
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::Other(format!(
            "`cargo {}` failed in {} ({status})",
            args.join(" "),
            display_path(crate_dir)
        )))
    }
}

/// Generates `bundle` into `scratch/crate` and lints it with every feature.
pub fn check_bundle(bundle: &Path, scratch: &Path) -> Result<(), Failure> {
    let crate_dir = scratch.join("crate");
    let files = write_scratch_crate(bundle, &crate_dir)?;
    eprintln!(
        "generated {} files from {} into {}",
        files.len(),
        display_path(bundle),
        display_path(&crate_dir)
    );
    cargo_in(
        &crate_dir,
        &scratch.join("target"),
        &[
            "clippy",
            "--all-features",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ],
    )
}
