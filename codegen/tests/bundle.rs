//! A whole deployment's reference bundle (a JSON array of `{filename, content}`,
//! e.g. the Taskcluster v19 one), named by the `TC_REFERENCES_BUNDLE`
//! environment variable. Opt-in: without the variable every test here is
//! skipped, printing why. CI sets it to the v19 bundle.
//!
//! The ignored test builds the generated crate; CI runs it with
//! `cargo test -p exchange-codegen -- --ignored`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{
    assert_message_schemas_compile, cargo, cargo_doc, references_bundle, write_scratch_crate,
};
use exchange_codegen::{Sources, generate, load, naming};

fn bundle_sources(bundle: &Path) -> Sources {
    Sources::read_bundle(bundle)
        .unwrap_or_else(|e| panic!("{}: the bundle is unreadable: {e}", bundle.display()))
}

#[test]
fn generates_every_service_and_exchange() {
    let Some(bundle) = references_bundle("generates_every_service_and_exchange") else {
        return;
    };
    let sources = bundle_sources(&bundle);
    let loaded = load::load(&sources).expect("the bundle loads");
    let files = generate(&sources).expect("the bundle generates");

    // One module (and cargo feature) per service with exchanges.
    let expected: BTreeSet<String> = loaded
        .references
        .iter()
        .map(|reference| naming::module_name(&reference.service_name).expect("module name"))
        .collect();
    let modules: BTreeSet<String> = files
        .keys()
        .filter_map(|path| path.strip_prefix("src/")?.strip_suffix(".rs"))
        .filter(|module| !["lib", "schemas"].contains(module))
        .map(str::to_owned)
        .collect();
    assert_eq!(modules, expected);
    let features = expected
        .iter()
        .map(|module| format!("{module:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    assert_eq!(
        files["Cargo.toml"]
            .lines()
            .find(|line| line.starts_with("default = ")),
        Some(format!("default = [{features}]").as_str())
    );

    // One `Exchange` implementation per entry of each exchanges.json.
    let entries: usize = loaded.references.iter().map(|r| r.entries.len()).sum();
    let exchanges: usize = files
        .values()
        .map(|code| {
            code.matches("impl ::exchange_runtime::Exchange for ")
                .count()
        })
        .sum();
    assert_eq!(exchanges, entries);
}

#[test]
fn output_is_deterministic_and_independent_of_layout() {
    let Some(bundle) = references_bundle("output_is_deterministic_and_independent_of_layout")
    else {
        return;
    };
    let from_bundle = generate(&bundle_sources(&bundle)).unwrap();
    assert_eq!(from_bundle, generate(&bundle_sources(&bundle)).unwrap());

    // The same files as a references directory give the same crate.
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bundle).unwrap()).unwrap();
    let mut files = BTreeMap::new();
    for item in parsed.as_array().unwrap() {
        let name = item["filename"].as_str().unwrap();
        let relative = name
            .strip_prefix("references/")
            .filter(|rest| rest.ends_with("/exchanges.json"))
            .or_else(|| name.strip_prefix("schemas/"));
        if let Some(relative) = relative {
            let content = match &item["content"] {
                serde_json::Value::String(text) => text.clone(),
                json => json.to_string(),
            };
            files.insert(relative.to_owned(), content);
        }
    }
    let from_directory = generate(&Sources::from_directory_files("references", files)).unwrap();
    assert_eq!(from_directory, from_bundle);
}

#[test]
fn every_message_schema_compiles_offline() {
    let Some(bundle) = references_bundle("every_message_schema_compiles_offline") else {
        return;
    };
    let sources = bundle_sources(&bundle);
    // A schema shared by several exchanges of a service is one message type
    // (in v19: 25 exchanges, 18 message types).
    let loaded = load::load(&sources).expect("the bundle loads");
    let distinct: BTreeSet<(&str, &str)> = loaded
        .references
        .iter()
        .flat_map(|reference| {
            reference
                .entries
                .iter()
                .map(|entry| (reference.service_name.as_str(), entry.schema.as_str()))
        })
        .collect();
    let checked = assert_message_schemas_compile(&sources);
    assert_eq!(checked, distinct.len());
}

/// The generated crate passes `clippy -D warnings` with every feature, builds
/// with a single feature and with none, and documents without a warning.
#[test]
#[ignore = "builds the generated crate with cargo (1-3 minutes on 2 cores)"]
fn bundle_crate_compiles_with_any_features() {
    let Some(bundle) = references_bundle("bundle_crate_compiles_with_any_features") else {
        return;
    };
    let sources = bundle_sources(&bundle);
    let dir = write_scratch_crate("references-bundle", &sources, &[]);
    cargo(
        &dir,
        &[
            "clippy",
            "--all-features",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ],
    );
    let loaded = load::load(&sources).expect("the bundle loads");
    if let Some(first) = loaded.references.first() {
        let module = naming::module_name(&first.service_name).expect("module name");
        cargo(
            &dir,
            &[
                "check",
                "--no-default-features",
                "--features",
                &module,
                "--quiet",
            ],
        );
    }
    cargo(&dir, &["check", "--no-default-features", "--quiet"]);
    cargo_doc(&dir);
}
