//! The message and binding the typed benchmarks share (`benches/typed.rs`
//! and `examples/amqp_throughput.rs`): a schema-valid `TaskPendingMessage`
//! of about 1 KiB on an exchange of the benchmarks' own.
//!
//! The criterion bench publishes on the exchange of [`BenchPending`];
//! the throughput example uses the generated `TaskPending` binding inside
//! (`.0`) with its exchange renamed to one of the run's own.

use exchange_runtime::{Binding, Exchange, RoutingKeyWord};
use taskcluster_exchanges::queue::{TaskPending, TaskPendingMessage};

/// The benchmarks' own exchange, so that no real exchange is touched.
pub const EXCHANGE: &str = "exchange/tc-exchanges-bench/v1/task-pending";

/// The task-pending binding on the benchmarks' own exchange.
#[derive(Debug, Clone, Default)]
pub struct BenchPending(pub TaskPending);

impl Exchange for BenchPending {
    type Message = TaskPendingMessage;
    const EXCHANGE: &'static str = EXCHANGE;
    const ENTRY: &'static str = TaskPending::ENTRY;
    const ROUTING_KEY: &'static [RoutingKeyWord] = TaskPending::ROUTING_KEY;
}

impl Binding for BenchPending {
    fn word_values(&self) -> Vec<Option<&str>> {
        self.0.word_values()
    }
    fn from_word_values(values: Vec<Option<String>>) -> Self {
        BenchPending(TaskPending::from_word_values(values))
    }
}

/// A schema-valid task-pending message of about 1 KiB (eight runs).
pub fn task_pending_message() -> Result<TaskPendingMessage, String> {
    let task_id = "fXYEnLHcQ3GLbTQb7lhNNQ";
    let runs: Vec<_> = (0..8)
        .map(|run| {
            serde_json::json!({
                "runId": run,
                "state": if run < 7 { "exception" } else { "pending" },
                "reasonCreated": if run == 0 { "scheduled" } else { "retry" },
                "scheduled": "2026-11-26T10:00:00.000Z",
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "version": 1,
        "status": {
            "taskId": task_id,
            "provisionerId": "proj-bench",
            "workerType": "bench-worker",
            "schedulerId": "-",
            "taskGroupId": task_id,
            "deadline": "2026-11-27T10:00:00.000Z",
            "expires": "2027-11-26T10:00:00.000Z",
            "retriesLeft": 5,
            "state": "pending",
            "runs": runs,
        },
        "runId": 7,
    }))
    .map_err(|error| format!("the bench message does not fit TaskPendingMessage: {error}"))
}

/// A binding with every routing-key word of the message set.
#[allow(
    dead_code,
    reason = "used by the criterion bench, not the throughput example"
)]
pub fn binding() -> BenchPending {
    binding_for_run("bench-worker")
}

/// A binding with every routing-key word set, its worker type being `run`
/// (one word: no dots), the word that keeps one run's messages its own.
pub fn binding_for_run(run: &str) -> BenchPending {
    BenchPending(TaskPending {
        task_id: Some("fXYEnLHcQ3GLbTQb7lhNNQ".into()),
        run_id: Some("7".into()),
        provisioner_id: Some("proj-bench".into()),
        worker_type: Some(run.into()),
        scheduler_id: Some("-".into()),
        task_group_id: Some("fXYEnLHcQ3GLbTQb7lhNNQ".into()),
        ..TaskPending::default()
    })
}

/// The consumer's binding for one run: every message whose worker-type
/// word is `run`, only those.
#[allow(
    dead_code,
    reason = "used by the throughput example, not the criterion bench"
)]
pub fn run_pattern(run: &str) -> BenchPending {
    BenchPending(TaskPending {
        worker_type: Some(run.into()),
        ..TaskPending::default()
    })
}
