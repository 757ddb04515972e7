//! The test corpus: messages as the seeds document them, by exchange entry,
//! each with variants a producer may send (optional parts absent, values
//! unknown when the crate was generated, fields the schema does not declare).
//! Shared by `messages.rs` (round trips, validation) and `schemars.rs`
//! (derived schemas accept what the source schemas accept).
#![allow(dead_code)] // each test binary uses its own subset

use serde_json::{Value, json};

/// A task status with one completed run.
pub fn status() -> Value {
    json!({
        "taskId": "fN1SbArXTPSVFNUvaOlinQ",
        "provisionerId": "aws-provisioner",
        "workerType": "gaia",
        "schedulerId": "-",
        "taskGroupId": "dSlITZ4yQgmvxxAi4A8fHQ",
        "deadline": "2019-10-07T12:00:00.000Z",
        "expires": "2020-10-07T12:00:00.000Z",
        "retriesLeft": 5,
        "state": "completed",
        "runs": [{
            "runId": 0,
            "state": "completed",
            "reasonCreated": "scheduled",
            "reasonResolved": "completed",
            "workerGroup": "us-east-1",
            "workerId": "i-0123456789abcdef",
            "takenUntil": "2019-10-07T11:20:00.000Z",
            "scheduled": "2019-10-07T11:00:00.000Z",
            "started": "2019-10-07T11:00:05.123Z",
            "resolved": "2019-10-07T11:10:00.456Z"
        }]
    })
}

/// A taskCompleted message.
pub fn task_completed() -> Value {
    json!({
        "version": 1,
        "runId": 0,
        "workerGroup": "us-east-1",
        "workerId": "i-0123456789abcdef",
        "status": status(),
        "task": {"tags": {"purpose": "build"}}
    })
}

/// The message of exchange entry `entry` (`taskPending`, `purgeCache`, …).
pub fn message(entry: &str) -> Value {
    match entry {
        "taskDefined" => json!({"version": 1, "status": status()}),
        "taskPending" => json!({
            "version": 1, "runId": 1, "status": status(), "task": {"tags": {}}
        }),
        "taskRunning" => json!({
            "version": 1, "runId": 0, "workerGroup": "wg", "workerId": "wi",
            "takenUntil": "2019-10-07T11:20:00.000Z", "status": status()
        }),
        "artifactCreated" => json!({
            "version": 1, "runId": 0, "workerGroup": "wg", "workerId": "wi", "status": status(),
            "artifact": {
                "storageType": "blob", "name": "public/logs/live.log",
                "expires": "2020-10-07T12:00:00.000Z", "contentType": "text/plain"
            }
        }),
        "taskCompleted" | "taskFailed" | "taskException" => task_completed(),
        "taskGroupResolved" => json!({
            "taskGroupId": "dSlITZ4yQgmvxxAi4A8fHQ", "schedulerId": "-"
        }),
        "purgeCache" => json!({
            "version": 1, "provisionerId": "aws-provisioner", "workerType": "gaia",
            "cacheName": "level-3-checkouts"
        }),
        "workerPoolCreated" | "workerPoolUpdated" => json!({
            "workerPoolId": "aws-provisioner/gaia", "providerId": "aws",
            "previousProviderId": "null-provider"
        }),
        other => panic!("no corpus message for {other}"),
    }
}

/// Every exchange entry the corpus has a message for.
pub const ENTRIES: &[&str] = &[
    "taskDefined",
    "taskPending",
    "taskRunning",
    "artifactCreated",
    "taskCompleted",
    "taskFailed",
    "taskException",
    "taskGroupResolved",
    "purgeCache",
    "workerPoolCreated",
    "workerPoolUpdated",
];

/// The message of `entry` and its variants: with a field the schema does not
/// declare (at the top and in the task status), with unknown enum values,
/// without its optional parts. Some break the schema (strict objects); the
/// tests keep those the source schema accepts.
pub fn variants(entry: &str) -> Vec<Value> {
    let base = message(entry);
    let mut out = vec![base.clone()];
    let mut extra = base.clone();
    extra["newTopLevelField"] = json!({"nested": [1, 2, 3]});
    out.push(extra);
    if base.get("status").is_some() {
        let mut unknown = base.clone();
        unknown["status"]["state"] = json!("paused");
        unknown["status"]["runs"][0]["reasonResolved"] = json!("quantum-fluctuation");
        out.push(unknown);
        let mut future = base.clone();
        future["status"]["someFutureProperty"] = json!(true);
        out.push(future);
        let mut no_runs = base.clone();
        no_runs["status"]["runs"] = json!([]);
        out.push(no_runs);
    }
    for optional in ["task", "version", "previousProviderId", "contentType"] {
        if base.get(optional).is_some() {
            let mut without = base.clone();
            without.as_object_mut().map(|o| o.remove(optional));
            out.push(without);
        }
    }
    out
}
