//! Hand-written tests of the generated message types: JSON round trips with
//! the fields the seeds document, tolerance of unknown values and fields,
//! validation against `Message::SCHEMA` (with its dependencies, offline), and
//! decoding by exchange.

mod corpus;

use corpus::{message, task_completed};
use exchange_runtime::validate::validate_document;
use exchange_runtime::{Decode, DecodeErrorKind, Exchange, Message};
use serde_json::{Value, json};
use taskcluster_exchanges::purge_cache::{AnyPurgeCacheMessage, PurgeCache, PurgeCacheMessage};
use taskcluster_exchanges::queue::{
    ArtifactCreatedMessage, ArtifactStorageType, QueueMessage, RunInformationReasonCreated,
    RunInformationState, TaskCompleted, TaskCompletedMessage, TaskDefined, TaskDefinedMessage,
    TaskGroupResolvedMessage, TaskPendingMessage, TaskRunningMessage, TaskStatusStructureState,
};
use taskcluster_exchanges::worker_manager::{
    WorkerManagerMessage, WorkerPoolCreated, WorkerPoolMessage, WorkerPoolUpdated,
};

/// Decodes, re-encodes and decodes again: the typed values are equal, and so
/// is the JSON (compared as values; timestamps as instants).
fn round_trip<M: Message + PartialEq>(json: Value) -> M {
    let message: M = serde_json::from_value(json.clone()).unwrap();
    let encoded = serde_json::to_value(&message).unwrap();
    let again: M = serde_json::from_value(encoded.clone()).unwrap();
    assert_eq!(again, message);
    message
}

#[test]
fn task_completed_round_trips() {
    let message: TaskCompletedMessage = round_trip(task_completed());
    assert_eq!(message.version, 1);
    assert_eq!(message.run_id, 0);
    assert_eq!(message.status.task_id, "fN1SbArXTPSVFNUvaOlinQ");
    assert_eq!(message.status.state, TaskStatusStructureState::Completed);
    assert_eq!(message.status.retries_left, 5);
    let run = &message.status.runs[0];
    assert_eq!(run.state, RunInformationState::Completed);
    assert_eq!(run.reason_created, RunInformationReasonCreated::Scheduled);
    assert_eq!(
        run.started.unwrap().to_rfc3339(),
        "2019-10-07T11:00:05.123+00:00"
    );
    assert_eq!(message.task.as_ref().unwrap().tags["purpose"], "build");
    // Optional fields absent stay absent.
    let encoded = serde_json::to_value(&message).unwrap();
    assert_eq!(encoded["status"]["taskId"], "fN1SbArXTPSVFNUvaOlinQ");
    assert_eq!(encoded["status"]["runs"][0]["reasonCreated"], "scheduled");
}

#[test]
fn other_queue_messages_round_trip() {
    let defined: TaskDefinedMessage = round_trip(message("taskDefined"));
    assert!(defined.task.is_none());
    let pending: TaskPendingMessage = round_trip(message("taskPending"));
    assert_eq!(pending.run_id, 1);
    let running: TaskRunningMessage = round_trip(message("taskRunning"));
    assert_eq!(
        running.taken_until.to_rfc3339(),
        "2019-10-07T11:20:00+00:00"
    );
    let artifact: ArtifactCreatedMessage = round_trip(message("artifactCreated"));
    assert_eq!(artifact.artifact.storage_type, ArtifactStorageType::Blob);
    let resolved: TaskGroupResolvedMessage = round_trip(message("taskGroupResolved"));
    assert_eq!(resolved.version, None);
}

#[test]
fn purge_cache_and_worker_pool_messages_round_trip() {
    let purge: PurgeCacheMessage = round_trip(message("purgeCache"));
    assert_eq!(purge.cache_name, "level-3-checkouts");
    let pool: WorkerPoolMessage = round_trip(message("workerPoolCreated"));
    assert_eq!(pool.previous_provider_id.as_deref(), Some("null-provider"));
    assert_eq!(
        serde_json::to_value(&pool).unwrap(),
        json!({"workerPoolId": "aws-provisioner/gaia", "providerId": "aws", "previousProviderId": "null-provider"})
    );
}

#[test]
fn unknown_enum_value_decodes_and_reserializes_unchanged() {
    let mut json = task_completed();
    json["status"]["runs"][0]["reasonResolved"] = json!("quantum-fluctuation");
    json["status"]["state"] = json!("paused");
    let message: TaskCompletedMessage = serde_json::from_value(json).unwrap();
    assert_eq!(
        message.status.state,
        TaskStatusStructureState::Unknown("paused".into())
    );
    assert_eq!(message.status.state.as_str(), "paused");
    let encoded = serde_json::to_value(&message).unwrap();
    assert_eq!(encoded["status"]["state"], "paused");
    assert_eq!(
        encoded["status"]["runs"][0]["reasonResolved"],
        "quantum-fluctuation"
    );
}

#[test]
fn unknown_fields_are_tolerated() {
    let mut json = task_completed();
    json["newTopLevelField"] = json!({"nested": [1, 2, 3]});
    json["status"]["someFutureProperty"] = json!(true);
    let message: TaskCompletedMessage = serde_json::from_value(json).unwrap();
    assert_eq!(message.worker_id, "i-0123456789abcdef");
}

#[test]
fn missing_required_field_is_an_error() {
    let mut json = task_completed();
    json["status"].as_object_mut().unwrap().remove("taskId");
    let error = serde_json::from_value::<TaskCompletedMessage>(json).unwrap_err();
    assert!(error.to_string().contains("taskId"), "{error}");
}

/// Whether `value` passes `M`'s schema, validated as the publisher does:
/// through a registry of the schema documents, offline.
fn valid<M: Message>(value: &Value) -> bool {
    match validate_document(M::SCHEMA_ID, M::SCHEMA, M::SCHEMA_DEPENDENCIES, value) {
        Ok(()) => true,
        Err(error) if !error.violations().is_empty() => false,
        Err(error) => panic!("{} does not compile offline: {error}", M::SCHEMA_ID),
    }
}

#[test]
fn schemas_accept_good_and_reject_bad_messages() {
    assert!(valid::<TaskCompletedMessage>(&task_completed()));
    // An encoded typed message is valid too.
    let typed: TaskCompletedMessage = serde_json::from_value(task_completed()).unwrap();
    assert!(valid::<TaskCompletedMessage>(
        &serde_json::to_value(&typed).unwrap()
    ));

    let mut bad_task_id = task_completed();
    bad_task_id["status"]["taskId"] = json!("not a slug id");
    assert!(!valid::<TaskCompletedMessage>(&bad_task_id));
    let mut bad_version = task_completed();
    bad_version["version"] = json!(2);
    assert!(!valid::<TaskCompletedMessage>(&bad_version));
    let mut bad_run = task_completed();
    bad_run["runId"] = json!(1001);
    assert!(!valid::<TaskCompletedMessage>(&bad_run));
    let mut extra = task_completed();
    extra["unexpected"] = json!(1);
    assert!(
        !valid::<TaskCompletedMessage>(&extra),
        "the schema forbids additional properties"
    );
    // A violation in a document reached through `$ref` (task-status.json → task-run.json).
    let mut bad_run_state = task_completed();
    bad_run_state["status"]["runs"][0]["state"] = json!("sleeping");
    assert!(!valid::<TaskCompletedMessage>(&bad_run_state));

    let good = json!({"version": 1, "provisionerId": "p", "workerType": "w", "cacheName": "c"});
    assert!(valid::<PurgeCacheMessage>(&good));
    assert!(!valid::<PurgeCacheMessage>(
        &json!({"version": 1, "provisionerId": "p", "workerType": "w"})
    ));
    let too_long =
        json!({"version": 1, "provisionerId": "p".repeat(23), "workerType": "w", "cacheName": "c"});
    assert!(!valid::<PurgeCacheMessage>(&too_long));

    assert!(valid::<WorkerPoolMessage>(
        &json!({"workerPoolId": "aws/gaia", "providerId": "aws"})
    ));
    assert!(!valid::<WorkerPoolMessage>(
        &json!({"workerPoolId": "no-slash", "providerId": "aws"})
    ));
}

/// Each message's schema is its upstream document (`$ref`s kept), its
/// dependencies are the documents those `$ref`s reach, and together they
/// compile offline.
#[test]
fn every_schema_compiles_offline() {
    fn check<M: Message>() {
        let id = M::SCHEMA_ID;
        assert!(
            id.starts_with("/schemas/") && id.ends_with(".json#"),
            "{id}"
        );
        let schema: Value = serde_json::from_str(M::SCHEMA).unwrap();
        assert_eq!(schema["$id"], id, "SCHEMA is the document {id}");
        for dependency in M::SCHEMA_DEPENDENCIES {
            let document: Value = serde_json::from_str(dependency.text).unwrap();
            assert_eq!(document["$id"], dependency.id);
        }
        // Compiles (an empty object is merely invalid, not an error).
        valid::<M>(&json!({}));
    }
    check::<TaskDefinedMessage>();
    check::<TaskPendingMessage>();
    check::<TaskRunningMessage>();
    check::<ArtifactCreatedMessage>();
    check::<TaskCompletedMessage>();
    check::<TaskGroupResolvedMessage>();
    check::<PurgeCacheMessage>();
    check::<WorkerPoolMessage>();
    let ids: Vec<&str> = TaskCompletedMessage::SCHEMA_DEPENDENCIES
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(
        ids,
        [
            "/schemas/queue/v1/task-pulse-definition.json#",
            "/schemas/queue/v1/task-run.json#",
            "/schemas/queue/v1/task-status.json#"
        ]
    );
}

#[test]
fn queue_message_decodes_by_exchange() {
    let body = serde_json::to_vec(&task_completed()).unwrap();
    let decoded = QueueMessage::decode(TaskCompleted::EXCHANGE, &body).unwrap();
    let QueueMessage::TaskCompleted(message) = &decoded else {
        panic!("wrong variant: {decoded:?}")
    };
    assert_eq!(message.worker_group, "us-east-1");
    assert_eq!(decoded.exchange(), TaskCompleted::EXCHANGE);

    // The same body is a valid task-defined message too (it has version and status).
    let defined = QueueMessage::decode(TaskDefined::EXCHANGE, &body).unwrap();
    assert!(matches!(defined, QueueMessage::TaskDefined(_)));

    let body_error =
        QueueMessage::decode("exchange/taskcluster-queue/v1/task-running", &body).unwrap_err();
    assert_eq!(
        body_error.exchange,
        "exchange/taskcluster-queue/v1/task-running"
    );
    assert!(
        matches!(&body_error.kind, DecodeErrorKind::Body(reason) if reason.contains("takenUntil")),
        "{body_error}"
    );
    assert!(
        body_error
            .to_string()
            .contains("exchange/taskcluster-queue/v1/task-running")
    );

    let unknown = QueueMessage::decode("exchange/taskcluster-queue/v1/nope", &body).unwrap_err();
    assert_eq!(unknown.kind, DecodeErrorKind::UnknownExchange);
    assert_eq!(unknown.exchange, "exchange/taskcluster-queue/v1/nope");
}

#[test]
fn shared_message_type_gives_one_variant_per_exchange() {
    let body = br#"{"workerPoolId": "aws/gaia", "providerId": "aws"}"#;
    let created = WorkerManagerMessage::decode(WorkerPoolCreated::EXCHANGE, body).unwrap();
    let updated = WorkerManagerMessage::decode(WorkerPoolUpdated::EXCHANGE, body).unwrap();
    assert!(matches!(
        created,
        WorkerManagerMessage::WorkerPoolCreated(_)
    ));
    assert!(matches!(
        updated,
        WorkerManagerMessage::WorkerPoolUpdated(_)
    ));
    assert_eq!(updated.exchange(), WorkerPoolUpdated::EXCHANGE);

    let purge = AnyPurgeCacheMessage::decode(
        PurgeCache::EXCHANGE,
        br#"{"version": 1, "provisionerId": "p", "workerType": "w", "cacheName": "c"}"#,
    )
    .unwrap();
    assert!(matches!(purge, AnyPurgeCacheMessage::PurgeCache(_)));
}
