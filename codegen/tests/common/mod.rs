//! Helpers shared by the integration tests: fixture sources and scratch crates.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use exchange_codegen::{Manifest, Options, Sources, generate_with, load, model, schema_files};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("codegen has a parent directory")
        .to_path_buf()
}

/// `codegen/tests/fixtures/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The environment variable naming a reference bundle (a JSON array of
/// `{filename, content}`) for the opt-in bundle tests.
pub const BUNDLE_ENV: &str = "TC_REFERENCES_BUNDLE";

/// The reference bundle named by [`BUNDLE_ENV`]. When it is unset, prints why
/// `test` is skipped (past the test harness's output capture) and returns
/// `None`; when it names no file, the test fails naming the path.
pub fn references_bundle(test: &str) -> Option<PathBuf> {
    use std::io::Write as _;
    let Some(path) = std::env::var_os(BUNDLE_ENV) else {
        // Written to the process's stderr directly: `eprintln!` would be captured.
        let _ = writeln!(
            std::io::stderr(),
            "skipped {test}: set {BUNDLE_ENV} to a reference bundle (see README)"
        );
        return None;
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{BUNDLE_ENV}={}: no such file",
        path.display()
    );
    Some(path)
}

/// Every file below `dir`, by `/`-separated path relative to it.
pub fn read_tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .expect("below root")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let text =
                    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                out.insert(relative, text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The references of a fixture, named `references/…` in errors.
pub fn fixture_sources(name: &str) -> Sources {
    Sources::from_directory_files(
        "references",
        read_tree(&fixture_dir(name).join("references")),
    )
}

/// Generates `sources` as a standalone crate in `CARGO_TARGET_TMPDIR/<name>`,
/// adding `extra` files (e.g. tests), and returns the crate directory.
pub fn write_scratch_crate(name: &str, sources: &Sources, extra: &[(&str, String)]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).expect("clean scratch crate");
    }
    let options = Options {
        manifest: Manifest::Standalone {
            runtime_path: workspace_root().join("runtime"),
        },
    };
    let files = generate_with(sources, &options).expect("generation succeeds");
    let extra = extra
        .iter()
        .map(|(path, text)| ((*path).to_owned(), text.clone()));
    for (relative, contents) in files.into_iter().chain(extra) {
        let path = dir.join(relative);
        fs::create_dir_all(path.parent().expect("file has a parent")).expect("mkdir");
        fs::write(&path, contents).expect("write generated file");
    }
    // The workspace's lock file keeps dependency versions (and downloads) the same.
    fs::copy(workspace_root().join("Cargo.lock"), dir.join("Cargo.lock")).expect("copy Cargo.lock");
    dir
}

/// Runs `cargo <args>` in `dir` with a target directory shared by the scratch crates.
pub fn cargo(dir: &Path, args: &[&str]) {
    cargo_with_env(dir, args, &[]);
}

/// Documents the crate in `dir` with every feature; any rustdoc warning
/// (a broken intra-doc link, say) fails.
pub fn cargo_doc(dir: &Path) {
    cargo_with_env(
        dir,
        &["doc", "--no-deps", "--all-features", "--quiet"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    );
}

/// [`cargo`] with extra environment variables.
pub fn cargo_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scratch-target");
    let status = Command::new(cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "`cargo {}` failed in {}",
        args.join(" "),
        dir.display()
    );
}

/// Every message's schema compiles offline through a registry of the schema
/// files it needs (its document and the documents its `$ref`s reach), as the
/// publisher validates it. Returns how many schemas were checked.
pub fn assert_message_schemas_compile(sources: &Sources) -> usize {
    use exchange_runtime::SchemaDocument;
    let loaded = load::load(sources).expect("sources load");
    let model = model::build(&loaded).expect("model builds");
    let files = schema_files::collect(&model, &loaded.schemas).expect("schema files");
    // The runtime caches validators for the process: ids and texts are 'static.
    let leak = |text: String| -> &'static str { Box::leak(text.into_boxed_str()) };
    let mut checked = 0;
    for service in &model.services {
        for def in service.types.values() {
            let Some(info) = &def.message else { continue };
            let document = files.file_of(&info.schema).expect("the message's file");
            let dependencies: Vec<SchemaDocument> = files.dependencies[&info.schema]
                .iter()
                .map(|id| SchemaDocument {
                    id: leak(format!("{id}#")),
                    text: leak(files.files[id].contents.clone()),
                })
                .collect();
            let result = exchange_runtime::validate::validate_document(
                leak(info.schema_id.clone()),
                leak(document.contents.clone()),
                &dependencies,
                &serde_json::json!({}),
            );
            if let Err(error) = result {
                assert!(
                    !error.violations().is_empty(),
                    "{} does not compile: {error}",
                    info.schema_id
                );
            }
            checked += 1;
        }
    }
    checked
}
