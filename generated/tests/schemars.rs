//! With the `schemars` feature, the schema each message type derives accepts
//! every message of the test corpus that the message's source schema accepts
//! (`cargo test -p taskcluster-exchanges --features schemars`).
#![cfg(feature = "schemars")]

mod corpus;

use exchange_runtime::Message;
use exchange_runtime::validate::validate_document;
use schemars::JsonSchema;
use serde_json::Value;
use taskcluster_exchanges::purge_cache::PurgeCacheMessage;
use taskcluster_exchanges::queue::{
    ArtifactCreatedMessage, TaskCompletedMessage, TaskDefinedMessage, TaskExceptionMessage,
    TaskFailedMessage, TaskGroupResolvedMessage, TaskPendingMessage, TaskRunningMessage,
};
use taskcluster_exchanges::worker_manager::WorkerPoolMessage;

/// Checks the corpus variants of `entry` against `M`'s derived schema;
/// returns (variants the source schema accepts, variants it rejects).
fn check<M: Message + JsonSchema>(entry: &str) -> (usize, usize) {
    let derived = serde_json::to_value(schemars::schema_for!(M)).unwrap();
    let validator = jsonschema::validator_for(&derived)
        .unwrap_or_else(|e| panic!("the derived schema of {entry} compiles: {e}"));
    let (mut accepted, mut rejected) = (0, 0);
    for message in corpus::variants(entry) {
        let source = validate_document(M::SCHEMA_ID, M::SCHEMA, M::SCHEMA_DEPENDENCIES, &message);
        if let Err(error) = &source {
            assert!(!error.violations().is_empty(), "{error}");
            rejected += 1;
            continue;
        }
        accepted += 1;
        let errors: Vec<String> = validator
            .iter_errors(&message)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{entry}: the source schema accepts {message}, the derived schema rejects it: {errors:?}\nderived: {derived}"
        );
        // The typed value agrees: it decodes, and re-encodes to a message
        // the derived schema accepts.
        let typed: M = serde_json::from_value(message.clone()).unwrap();
        let encoded: Value = serde_json::to_value(&typed).unwrap();
        assert!(validator.is_valid(&encoded), "{entry}: {encoded}");
    }
    (accepted, rejected)
}

#[test]
fn derived_schemas_accept_what_the_source_schemas_accept() {
    let results = [
        check::<TaskDefinedMessage>("taskDefined"),
        check::<TaskPendingMessage>("taskPending"),
        check::<TaskRunningMessage>("taskRunning"),
        check::<ArtifactCreatedMessage>("artifactCreated"),
        check::<TaskCompletedMessage>("taskCompleted"),
        check::<TaskFailedMessage>("taskFailed"),
        check::<TaskExceptionMessage>("taskException"),
        check::<TaskGroupResolvedMessage>("taskGroupResolved"),
        check::<PurgeCacheMessage>("purgeCache"),
        check::<WorkerPoolMessage>("workerPoolCreated"),
        check::<WorkerPoolMessage>("workerPoolUpdated"),
    ];
    assert_eq!(results.len(), corpus::ENTRIES.len(), "every corpus entry");
    let accepted: usize = results.iter().map(|(a, _)| a).sum();
    let rejected: usize = results.iter().map(|(_, r)| r).sum();
    // Each entry's own message is accepted; the variants with undeclared
    // fields are rejected by the (strict) source schemas.
    assert!(accepted >= corpus::ENTRIES.len(), "{accepted}");
    assert!(rejected > 0, "{rejected}");
    println!(
        "derived schemas accept all {accepted} corpus messages the source schemas accept \
         ({rejected} variants the source schemas reject)"
    );
}
