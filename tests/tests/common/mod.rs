//! Shared fixtures: seed-shaped queue messages and broker connections.

#![allow(dead_code)] // each test binary uses a different subset

#[path = "../../../runtime/tests/local_services/mod.rs"]
mod local_services;

use exchange_runtime::broker::amqp::AmqpBroker;
use serde_json::json;
use taskcluster_exchanges::queue::{TaskDefinedMessage, TaskRunningMessage, TaskStatusStructure};

/// The RabbitMQ the broker tests use: `AMQP_URL`, or the local one.
pub fn amqp_url() -> String {
    local_services::rabbitmq_url()
}

/// The Redis the job-store tests use: `REDIS_URL`, or the local one (started if down).
pub fn redis_url() -> String {
    local_services::redis_url()
}

/// Deletes the Redis keys under its prefix when dropped — also when a test
/// panics (on a fresh connection, on a runtime of its own: the test's
/// runtime may be unwinding).
pub struct RedisKeys(pub String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let prefix = self.0.clone();
        let cleared = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                exchange_runtime::jobs::redis::RedisStore::connect(&redis_url(), &prefix)
                    .await?
                    .clear()
                    .await
            })
        })
        .join();
        if !matches!(cleared, Ok(Ok(()))) {
            eprintln!("the Redis keys under `{}` were not deleted", self.0);
        }
    }
}

/// Connects to RabbitMQ; a test that needs it fails (never skips) when it is down.
pub async fn rabbitmq() -> AmqpBroker {
    let url = amqp_url();
    AmqpBroker::connect_url(&url)
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ at {url} is required for this test (start it with `rabbitmq-server -detached`): {e}"))
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A task status as the queue reports it, with one run claimed by `worker_id`.
pub fn status(task_id: &str, worker_type: &str) -> TaskStatusStructure {
    serde_json::from_value(json!({
        "taskId": task_id,
        "provisionerId": "aws-provisioner",
        "workerType": worker_type,
        "schedulerId": "-",
        "taskGroupId": task_id,
        "deadline": "2026-11-27T10:00:00.000Z",
        "expires": "2027-11-26T10:00:00.000Z",
        "retriesLeft": 5,
        "state": "running",
        "runs": [{
            "runId": 0,
            "state": "running",
            "reasonCreated": "scheduled",
            "scheduled": "2026-11-26T10:00:00.000Z",
            "started": "2026-11-26T10:00:05.000Z",
            "takenUntil": "2026-11-26T10:20:05.000Z",
            "workerGroup": "us-east-1",
            "workerId": "i-0123"
        }]
    }))
    .expect("fixture task status matches the generated type")
}

/// A taskDefined message for the task.
pub fn task_defined(task_id: &str, worker_type: &str) -> TaskDefinedMessage {
    serde_json::from_value(json!({
        "version": 1,
        "status": status(task_id, worker_type),
        "task": {"tags": {"purpose": "build"}}
    }))
    .expect("fixture taskDefined message matches the generated type")
}

/// A taskRunning message for the task's run 0.
pub fn task_running(task_id: &str, worker_type: &str) -> TaskRunningMessage {
    serde_json::from_value(json!({
        "version": 1,
        "status": status(task_id, worker_type),
        "runId": 0,
        "workerGroup": "us-east-1",
        "workerId": "i-0123",
        "takenUntil": "2026-11-26T10:20:05.000Z"
    }))
    .expect("fixture taskRunning message matches the generated type")
}
