//! Golden tests: the generated crate for the fixture references under
//! `tests/fixtures/<name>/references` must equal `tests/fixtures/<name>/expected`
//! byte for byte. Update the goldens with `UPDATE_EXPECT=1 cargo test -p exchange-codegen --test golden`.

mod common;

use std::collections::BTreeSet;

use common::{
    assert_message_schemas_compile, cargo, cargo_doc, fixture_dir, fixture_sources, read_tree,
    write_scratch_crate,
};
use exchange_codegen::generate;
use expect_test::expect_file;

/// Goldens keep `Cargo.toml` under another name so no tool mistakes them for a package.
fn golden_name(path: &str) -> String {
    if path == "Cargo.toml" {
        "Cargo.toml.golden".to_owned()
    } else {
        path.to_owned()
    }
}

fn check_goldens(fixture: &str) {
    let files = generate(&fixture_sources(fixture)).expect("fixture generates");
    let expected_dir = fixture_dir(fixture).join("expected");
    for (path, contents) in &files {
        let golden = expected_dir.join(golden_name(path));
        if std::env::var_os("UPDATE_EXPECT").is_some() {
            // expect-test writes files but not their directories.
            std::fs::create_dir_all(golden.parent().expect("golden has a parent")).unwrap();
        }
        expect_file![golden].assert_eq(contents);
    }
    // Every golden is still generated (none left over from an older generator).
    if std::env::var_os("UPDATE_EXPECT").is_none() {
        let generated: BTreeSet<String> = files.keys().map(|p| golden_name(p)).collect();
        let goldens: BTreeSet<String> = read_tree(&expected_dir).into_keys().collect();
        assert_eq!(
            goldens, generated,
            "golden files differ from generated files"
        );
    }
}

#[test]
fn constructs_fixture_matches_goldens() {
    check_goldens("constructs");
}

#[test]
fn generation_is_deterministic() {
    let first = generate(&fixture_sources("constructs")).unwrap();
    let second = generate(&fixture_sources("constructs")).unwrap();
    assert_eq!(first, second);
}

#[test]
fn fixture_message_schemas_compile() {
    // thingCreated, thingUpdated/thingRemoved (shared), ircPosted, treeGrown, oddNames,
    // hookFired, tiny.
    assert_eq!(
        assert_message_schemas_compile(&fixture_sources("constructs")),
        7
    );
}

/// The fixture's generated crate passes clippy and its behaviour tests
/// (`tests/fixtures/constructs/behaviour.rs`: serde round trips of every construct;
/// with the `schemars` feature, derived schemas against the source schemas),
/// and its documentation builds without a warning.
#[test]
#[ignore = "builds a scratch crate with cargo (about a minute on 2 cores)"]
fn constructs_fixture_compiles_and_behaves() {
    let behaviour = std::fs::read_to_string(fixture_dir("constructs").join("behaviour.rs"))
        .expect("behaviour test source");
    let dir = write_scratch_crate(
        "fixture-constructs",
        &fixture_sources("constructs"),
        &[("tests/behaviour.rs", behaviour)],
    );
    cargo(
        &dir,
        &[
            "clippy",
            "--all-targets",
            "--all-features",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ],
    );
    cargo(&dir, &["test", "--quiet"]);
    cargo(&dir, &["test", "--all-features", "--quiet"]);
    cargo_doc(&dir);
}
