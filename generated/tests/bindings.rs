//! Hand-written tests of the generated binding structs: routing-key patterns,
//! concrete keys and parsing, using the exchanges documented in the seeds.

use exchange_runtime::{Binding, Exchange, RoutingKeyErrorKind};
use taskcluster_exchanges::purge_cache::PurgeCache;
use taskcluster_exchanges::queue::{TaskCompleted, TaskDefined, TaskGroupResolved, TaskRunning};
use taskcluster_exchanges::worker_manager::{WorkerPoolCreated, WorkerPoolUpdated};

#[test]
fn task_defined_binding_from_the_go_example() {
    // The Go package's example: TaskDefined{WorkerType: "gaia", ProvisionerID: "aws-provisioner"}.
    let binding = TaskDefined {
        worker_type: Some("gaia".into()),
        provisioner_id: Some("aws-provisioner".into()),
        ..Default::default()
    };
    // primary, then taskId, runId, workerGroup, workerId, provisionerId,
    // workerType, schedulerId, taskGroupId and the multi-word reserved entry.
    assert_eq!(
        binding.pattern().unwrap(),
        "primary.*.*.*.*.aws-provisioner.gaia.*.*.#"
    );
    assert_eq!(
        TaskDefined::EXCHANGE,
        "exchange/taskcluster-queue/v1/task-defined"
    );
    assert_eq!(TaskDefined::ENTRY, "taskDefined");
}

#[test]
fn task_completed_by_task_group() {
    let binding = TaskCompleted {
        task_group_id: Some("abc".into()),
        ..Default::default()
    };
    assert_eq!(binding.pattern().unwrap(), "primary.*.*.*.*.*.*.*.abc.#");
    assert_eq!(
        TaskCompleted::default().pattern().unwrap(),
        "primary.*.*.*.*.*.*.*.*.#"
    );
}

#[test]
fn routing_key_words_mirror_the_reference() {
    let words = TaskRunning::ROUTING_KEY;
    assert_eq!(words.len(), 10);
    assert_eq!(words[0].name, "routingKeyKind");
    assert_eq!(words[0].constant, Some("primary"));
    assert!(words[1].required && !words[1].multiple_words);
    assert_eq!(words[9].name, "reserved");
    assert!(words[9].multiple_words && !words[9].required);
    // taskDefined's runId is optional (no run yet); taskRunning's is required.
    assert!(!TaskDefined::ROUTING_KEY[2].required);
    assert!(TaskRunning::ROUTING_KEY[2].required);
}

#[test]
fn concrete_keys_and_parsing_round_trip() {
    let binding = TaskDefined {
        task_id: Some("fN1SbArXTPSVFNUvaOlinQ".into()),
        provisioner_id: Some("aws-provisioner".into()),
        worker_type: Some("gaia".into()),
        scheduler_id: Some("-".into()),
        task_group_id: Some("dSlITZ4yQgmvxxAi4A8fHQ".into()),
        ..Default::default()
    };
    let key = binding.routing_key().unwrap();
    assert_eq!(
        key,
        "primary.fN1SbArXTPSVFNUvaOlinQ._._._.aws-provisioner.gaia.-.dSlITZ4yQgmvxxAi4A8fHQ._"
    );
    assert_eq!(TaskDefined::parse_routing_key(&key).unwrap(), binding);

    let with_reserved = "primary.t.0.wg.wi.p.w.s.g.more.words";
    let parsed = TaskCompleted::parse_routing_key(with_reserved).unwrap();
    assert_eq!(parsed.run_id.as_deref(), Some("0"));
    assert_eq!(parsed.reserved.as_deref(), Some("more.words"));
    assert_eq!(parsed.routing_key().unwrap(), with_reserved);
}

#[test]
fn required_words_and_bad_values_are_reported() {
    let missing = TaskCompleted {
        task_id: Some("t".into()),
        ..Default::default()
    }
    .routing_key()
    .unwrap_err();
    assert_eq!(missing.exchange, TaskCompleted::EXCHANGE);
    assert_eq!(
        missing.kind,
        RoutingKeyErrorKind::MissingRequired { word: "runId" }
    );

    let dotted = TaskGroupResolved {
        task_group_id: Some("a.b".into()),
        ..Default::default()
    }
    .pattern()
    .unwrap_err();
    assert!(matches!(
        dotted.kind,
        RoutingKeyErrorKind::DotInSingleWord {
            word: "taskGroupId",
            ..
        }
    ));

    let wrong_constant = TaskGroupResolved::parse_routing_key("route.g.s._").unwrap_err();
    assert!(matches!(
        wrong_constant.kind,
        RoutingKeyErrorKind::ConstantMismatch {
            word: "routingKeyKind",
            ..
        }
    ));
}

#[test]
fn purge_cache_and_worker_manager_bindings() {
    let purge = PurgeCache {
        provisioner_id: Some("aws-provisioner".into()),
        worker_type: Some("gaia".into()),
    };
    assert_eq!(purge.pattern().unwrap(), "primary.aws-provisioner.gaia");
    assert_eq!(purge.routing_key().unwrap(), "primary.aws-provisioner.gaia");
    assert_eq!(
        PurgeCache::EXCHANGE,
        "exchange/taskcluster-purge-cache/v1/purge-cache"
    );

    assert_eq!(WorkerPoolCreated::default().pattern().unwrap(), "primary.#");
    assert_eq!(
        WorkerPoolUpdated::default().routing_key().unwrap(),
        "primary._"
    );
    assert_eq!(
        WorkerPoolUpdated::EXCHANGE,
        "exchange/taskcluster-worker-manager/v1/worker-pool-updated"
    );
}
