//! Decoding a TaskCompleted-shaped message body: typed (through the runtime's
//! `Decode`, i.e. serde into a struct) versus into an untyped
//! `serde_json::Value`, and the cost of schema validation before publishing.
//!
//! The struct mirrors the queue's `task-completed` message as documented in
//! seed 002 (tcqueueevents v19): `runId`, `status` (with `runs`), `task.tags`,
//! `version`, `workerGroup`, `workerId`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use exchange_runtime::{Decode, Message};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunInformation {
    reason_created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason_resolved: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resolved: Option<String>,
    run_id: u32,
    scheduled: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started: Option<String>,
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    taken_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    worker_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    worker_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskStatusStructure {
    deadline: String,
    expires: String,
    provisioner_id: String,
    retries_left: u32,
    runs: Vec<RunInformation>,
    scheduler_id: String,
    state: String,
    task_group_id: String,
    task_id: String,
    worker_type: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskSubset {
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskCompletedMessage {
    run_id: u32,
    status: TaskStatusStructure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<TaskSubset>,
    version: u32,
    worker_group: String,
    worker_id: String,
}

impl Message for TaskCompletedMessage {
    const SCHEMA_ID: &'static str = "/schemas/bench/v1/task-completed-message.json#";
    const SCHEMA: &'static str = r##"{
        "$schema": "http://json-schema.org/draft-06/schema#",
        "$id": "/schemas/bench/v1/task-completed-message.json#",
        "type": "object",
        "properties": {
            "version": {"enum": [1]},
            "runId": {"type": "integer", "minimum": 0, "maximum": 1000},
            "workerGroup": {"type": "string", "pattern": "^([a-zA-Z0-9-_]*)$", "minLength": 1, "maxLength": 38},
            "workerId": {"type": "string", "pattern": "^([a-zA-Z0-9-_]*)$", "minLength": 1, "maxLength": 38},
            "task": {"type": "object", "properties": {"tags": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 4096}}}},
            "status": {"$ref": "#/definitions/status"}
        },
        "required": ["version", "runId", "workerGroup", "workerId", "status"],
        "additionalProperties": false,
        "definitions": {
            "slugid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{8}[Q-T][A-Za-z0-9_-][CGKOSWaeimquy26-][A-Za-z0-9_-]{10}[AQgw]$"},
            "run": {
                "type": "object",
                "properties": {
                    "runId": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "state": {"enum": ["pending", "running", "completed", "failed", "exception"]},
                    "reasonCreated": {"enum": ["scheduled", "retry", "task-retry", "rerun", "exception"]},
                    "reasonResolved": {"type": "string"},
                    "scheduled": {"type": "string", "format": "date-time"},
                    "started": {"type": "string", "format": "date-time"},
                    "resolved": {"type": "string", "format": "date-time"},
                    "takenUntil": {"type": "string", "format": "date-time"},
                    "workerGroup": {"type": "string", "minLength": 1, "maxLength": 38},
                    "workerId": {"type": "string", "minLength": 1, "maxLength": 38}
                },
                "required": ["runId", "state", "reasonCreated", "scheduled"]
            },
            "status": {
                "type": "object",
                "properties": {
                    "taskId": {"$ref": "#/definitions/slugid"},
                    "taskGroupId": {"$ref": "#/definitions/slugid"},
                    "provisionerId": {"type": "string", "pattern": "^[a-zA-Z0-9-_]{1,38}$"},
                    "workerType": {"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,36}[a-z0-9])?$"},
                    "schedulerId": {"type": "string", "minLength": 1, "maxLength": 38},
                    "deadline": {"type": "string", "format": "date-time"},
                    "expires": {"type": "string", "format": "date-time"},
                    "retriesLeft": {"type": "integer", "minimum": 0, "maximum": 999},
                    "state": {"enum": ["unscheduled", "pending", "running", "completed", "failed", "exception"]},
                    "runs": {"type": "array", "items": {"$ref": "#/definitions/run"}}
                },
                "required": ["taskId", "taskGroupId", "provisionerId", "workerType", "schedulerId",
                             "deadline", "expires", "retriesLeft", "state", "runs"]
            }
        }
    }"##;
}

fn sample(runs: usize) -> TaskCompletedMessage {
    let run = |run_id: usize| RunInformation {
        reason_created: if run_id == 0 { "scheduled" } else { "retry" }.to_owned(),
        reason_resolved: Some("completed".to_owned()),
        resolved: Some("2019-10-07T12:04:55.123Z".to_owned()),
        run_id: run_id as u32,
        scheduled: "2019-10-07T12:00:01.000Z".to_owned(),
        started: Some("2019-10-07T12:00:13.555Z".to_owned()),
        state: "completed".to_owned(),
        taken_until: Some("2019-10-07T12:20:13.555Z".to_owned()),
        worker_group: Some("us-west-2".to_owned()),
        worker_id: Some("i-0a1b2c3d4e5f67890".to_owned()),
    };
    TaskCompletedMessage {
        run_id: (runs - 1) as u32,
        status: TaskStatusStructure {
            deadline: "2019-10-08T12:00:00.000Z".to_owned(),
            expires: "2020-10-07T12:00:00.000Z".to_owned(),
            provisioner_id: "aws-provisioner-v1".to_owned(),
            retries_left: 5,
            runs: (0..runs).map(run).collect(),
            scheduler_id: "gecko-level-3".to_owned(),
            state: "completed".to_owned(),
            task_group_id: "dSlITZ4yQgmvxxAi4A8fHQ".to_owned(),
            task_id: "fN1SbArXTPSVFNUvaOlinQ".to_owned(),
            worker_type: "gecko-3-b-linux".to_owned(),
        },
        task: Some(TaskSubset {
            tags: [
                ("kind", "build"),
                ("label", "build-linux64/opt"),
                ("os", "linux"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        }),
        version: 1,
        worker_group: "us-west-2".to_owned(),
        worker_id: "i-0a1b2c3d4e5f67890".to_owned(),
    }
}

const EXCHANGE: &str = "exchange/taskcluster-queue/v1/task-completed";

fn decode(c: &mut Criterion) {
    for runs in [1, 8] {
        let message = sample(runs);
        let body = serde_json::to_vec(&message).expect("the sample serializes");
        let mut group = c.benchmark_group(format!("decode_task_completed_{runs}_runs"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function("typed", |b| {
            b.iter(|| TaskCompletedMessage::decode(EXCHANGE, black_box(&body)).expect("decodes"))
        });
        group.bench_function("serde_json_value", |b| {
            b.iter(|| {
                serde_json::from_slice::<serde_json::Value>(black_box(&body)).expect("parses")
            })
        });
        group.finish();
    }
}

fn validate(c: &mut Criterion) {
    let message = sample(1);
    // Compile and cache the schema outside the measurement.
    exchange_runtime::validate::validate(&message).expect("the sample is valid");
    c.bench_function("validate_task_completed_1_run", |b| {
        b.iter(|| exchange_runtime::validate::validate(black_box(&message)).expect("valid"))
    });
}

criterion_group!(benches, decode, validate);
criterion_main!(benches);
