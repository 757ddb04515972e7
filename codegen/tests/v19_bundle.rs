//! The whole Taskcluster v19 reference bundle (six services with exchanges,
//! 25 exchanges) read from `../shared/corpus/taskcluster-v19/references.json`.
//!
//! The ignored test builds the generated crate; CI runs it with
//! `cargo test -p exchange-codegen --test v19_bundle -- --ignored`.

mod common;

use std::collections::BTreeMap;

use common::{assert_message_schemas_compile, cargo, v19_bundle, write_scratch_crate};
use exchange_codegen::{Sources, generate};

fn bundle_sources() -> Sources {
    Sources::read_bundle(&v19_bundle()).expect("the v19 bundle is readable")
}

#[test]
fn generates_every_service_and_exchange() {
    let files = generate(&bundle_sources()).expect("the v19 bundle generates");
    let modules: Vec<&str> = files
        .keys()
        .filter_map(|path| path.strip_prefix("src/")?.strip_suffix(".rs"))
        .filter(|module| *module != "lib")
        .collect();
    assert_eq!(
        modules,
        [
            "auth",
            "github",
            "hooks",
            "notify",
            "queue",
            "worker_manager"
        ]
    );
    let exchanges: usize = files
        .values()
        .map(|code| {
            code.matches("impl ::exchange_runtime::Exchange for ")
                .count()
        })
        .sum();
    // 6 + 4 + 3 + 2 + 8 + 2 entries in the bundle's exchanges.json files.
    assert_eq!(exchanges, 25);
    let queue = &files["src/queue.rs"];
    for binding in [
        "TaskDefined",
        "TaskPending",
        "TaskRunning",
        "ArtifactCreated",
        "TaskCompleted",
        "TaskFailed",
        "TaskException",
        "TaskGroupResolved",
    ] {
        assert!(
            queue.contains(&format!("pub struct {binding} {{")),
            "{binding}"
        );
        assert!(
            queue.contains(&format!("pub struct {binding}Message {{")),
            "{binding}Message"
        );
    }
    // Worker-manager's two exchanges share one message type, named by its title.
    let worker_manager = &files["src/worker_manager.rs"];
    assert!(worker_manager.contains("type Message = WorkerTypePulseMessage;"));
    assert_eq!(
        worker_manager
            .matches("pub struct WorkerTypePulseMessage {")
            .count(),
        1
    );
    assert_eq!(
        files["Cargo.toml"]
            .lines()
            .find(|line| line.starts_with("default = ")),
        Some(
            "default = [\"auth\", \"github\", \"hooks\", \"notify\", \"queue\", \"worker_manager\"]"
        )
    );
}

#[test]
fn output_is_deterministic_and_independent_of_layout() {
    let from_bundle = generate(&bundle_sources()).unwrap();
    assert_eq!(from_bundle, generate(&bundle_sources()).unwrap());

    // The same files as a references directory give the same crate.
    let bundle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v19_bundle()).unwrap()).unwrap();
    let mut files = BTreeMap::new();
    for item in bundle.as_array().unwrap() {
        let name = item["filename"].as_str().unwrap();
        let relative = name
            .strip_prefix("references/")
            .filter(|rest| rest.ends_with("/exchanges.json"))
            .or_else(|| name.strip_prefix("schemas/"));
        if let Some(relative) = relative {
            files.insert(relative.to_owned(), item["content"].to_string());
        }
    }
    let from_directory = generate(&Sources::from_directory_files("references", files)).unwrap();
    assert_eq!(from_directory, from_bundle);
}

#[test]
fn every_message_schema_is_self_contained_and_compiles() {
    // 25 exchanges, but a schema shared by several exchanges of a service is one
    // message type: auth 2, github 4, hooks 1, notify 2, queue 8, worker-manager 1.
    let checked = assert_message_schemas_compile(&bundle_sources());
    assert_eq!(checked, 18);
}

/// The generated crate passes `clippy -D warnings` with every feature, and
/// builds with a single feature and with none.
#[test]
#[ignore = "builds the generated crate with cargo (1-3 minutes on 2 cores)"]
fn bundle_crate_compiles_with_any_features() {
    let dir = write_scratch_crate("v19-bundle", &bundle_sources(), &[]);
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
    cargo(
        &dir,
        &[
            "check",
            "--no-default-features",
            "--features",
            "queue",
            "--quiet",
        ],
    );
    cargo(&dir, &["check", "--no-default-features", "--quiet"]);
}
