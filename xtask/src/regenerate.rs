//! `cargo xtask regenerate [--references PATH] [--out DIR] [--check]`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use exchange_codegen::{Options, Sources, generate_with};

use crate::{Failure, display_path, io_failure};

/// What happened (or, with `--check`, would happen) to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The file did not exist.
    Missing,
    /// The file's contents differ from the generated ones.
    Stale,
    /// A file under `src/` or `schemas/` that is no longer generated.
    Orphaned,
}

/// The files that were (or, with `--check`, would be) created, updated or removed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every changed file, sorted by path.
    pub changes: BTreeMap<PathBuf, Change>,
    /// The command that regenerates, for `--check` messages.
    pub fix_command: String,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (path, change) in &self.changes {
            let what = match change {
                Change::Missing => "is missing",
                Change::Stale => "is stale",
                Change::Orphaned => "is no longer generated (orphaned)",
            };
            writeln!(f, "{} {what}", display_path(path))?;
        }
        write!(
            f,
            "run `{}` to update the generated files",
            self.fix_command
        )
    }
}

/// Makes `path` hold `contents`: writes it when it differs (creating parent
/// directories), or with `check` only reports the difference. Unchanged files
/// are not touched, so their modification times stay.
pub fn ensure_file_contents(
    path: &Path,
    contents: &str,
    check: bool,
) -> Result<Option<Change>, Failure> {
    let change = match fs::read(path) {
        Ok(existing) if existing == contents.as_bytes() => return Ok(None),
        Ok(_) => Change::Stale,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Change::Missing,
        Err(error) => return Err(io_failure(path)(error)),
    };
    if !check {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_failure(parent))?;
        }
        fs::write(path, contents).map_err(io_failure(path))?;
    }
    Ok(Some(change))
}

/// Every file below `dir` (recursively); none if it does not exist.
fn files_below(dir: &Path, out: &mut BTreeSet<PathBuf>) -> Result<(), Failure> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io_failure(dir)(error)),
    };
    for entry in entries {
        let entry = entry.map_err(io_failure(dir))?;
        let path = entry.path();
        if entry.file_type().map_err(io_failure(&path))?.is_dir() {
            files_below(&path, out)?;
        } else {
            out.insert(path);
        }
    }
    Ok(())
}

/// The directories of the generated crate that hold generated files only.
pub const GENERATED_DIRS: &[&str] = &["schemas", "src"];

/// Writes `files` (paths relative to `out`) into `out`, removing files under
/// `out/src/` and `out/schemas/` that are not among them (those directories
/// are entirely generated); with `check`, changes nothing and fails listing
/// the differences.
pub fn write_generated(
    out: &Path,
    files: &BTreeMap<String, String>,
    check: bool,
    fix_command: &str,
) -> Result<Report, Failure> {
    let mut report = Report {
        changes: BTreeMap::new(),
        fix_command: fix_command.to_owned(),
    };
    for (relative, contents) in files {
        let path = out.join(relative);
        if let Some(change) = ensure_file_contents(&path, contents, check)? {
            report.changes.insert(path, change);
        }
    }
    let expected: BTreeSet<PathBuf> = files.keys().map(|relative| out.join(relative)).collect();
    let mut existing = BTreeSet::new();
    for dir in GENERATED_DIRS {
        files_below(&out.join(dir), &mut existing)?;
    }
    for orphan in existing.difference(&expected) {
        if !check {
            fs::remove_file(orphan).map_err(io_failure(orphan))?;
        }
        report.changes.insert(orphan.clone(), Change::Orphaned);
    }
    if check && !report.changes.is_empty() {
        return Err(Failure::Stale(report));
    }
    Ok(report)
}

/// Reads the references (a directory, or a bundle file), generates the crate
/// in memory and writes it into `out` (see [`write_generated`]). Nothing is
/// written when generation fails.
pub fn regenerate(
    references: &Path,
    out: &Path,
    check: bool,
    fix_command: &str,
) -> Result<Report, Failure> {
    let sources = read_sources(references)?;
    let files = generate_with(&sources, &Options::default())?;
    write_generated(out, &files, check, fix_command)
}

/// Reads sources, naming a directory inside the workspace relative to its root.
pub fn read_sources(references: &Path) -> Result<Sources, Failure> {
    if !references.exists() {
        return Err(Failure::Other(format!(
            "{}: no such references directory or bundle file",
            display_path(references)
        )));
    }
    if references.is_dir() {
        // Read here rather than by `Sources::read_directory` to name files in
        // errors as the user knows them (`references/queue/…`).
        let mut files = BTreeMap::new();
        collect_json(references, references, &mut files)?;
        Ok(Sources::from_directory_files(
            display_path(references),
            files,
        ))
    } else {
        Ok(Sources::read_bundle(references)?)
    }
}

fn collect_json(
    root: &Path,
    dir: &Path,
    files: &mut BTreeMap<String, String>,
) -> Result<(), Failure> {
    let mut paths = BTreeSet::new();
    files_below(dir, &mut paths)?;
    for path in paths {
        if path.extension().is_some_and(|e| e == "json") {
            let relative = path.strip_prefix(root).map_err(|_| {
                Failure::Other(format!("{} is outside {}", path.display(), root.display()))
            })?;
            let relative: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let text = fs::read_to_string(&path).map_err(io_failure(&path))?;
            files.insert(relative.join("/"), text);
        }
    }
    Ok(())
}
