//! Hand-written message and binding types for the consumer, publisher,
//! queue and job tests (the generated crate cannot be a dev-dependency of
//! the runtime), plus small async helpers.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::broker::{
    Broker, BrokerError, DeliveryStream, ExchangeOptions, OutgoingMessage, PendingMessage,
    QueueOptions,
};
use exchange_runtime::{Binding, Decode, DecodeError, Delivery, Exchange, Message, RoutingKeyWord};
use serde::{Deserialize, Serialize};

pub const DEFINED: &str = "exchange/test-queue/v1/task-defined";
pub const RUNNING: &str = "exchange/test-queue/v1/task-running";

/// `primary.<taskId>.<workerType>.<reserved...>`, like the queue's keys, shortened.
pub static WORDS: &[RoutingKeyWord] = &[
    RoutingKeyWord {
        name: "routingKeyKind",
        constant: Some("primary"),
        multiple_words: false,
        required: true,
    },
    RoutingKeyWord {
        name: "taskId",
        constant: None,
        multiple_words: false,
        required: true,
    },
    RoutingKeyWord {
        name: "workerType",
        constant: None,
        multiple_words: false,
        required: true,
    },
    RoutingKeyWord {
        name: "reserved",
        constant: None,
        multiple_words: true,
        required: false,
    },
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub task_id: String,
    pub worker_type: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskDefinedMessage {
    pub version: u32,
    pub status: Status,
}

/// The `status` definition both test schemas share (a literal, for `concat!`).
macro_rules! status_schema {
    () => {
        r##""status": {
            "type": "object",
            "properties": {
                "taskId": {"type": "string", "pattern": "^[A-Za-z0-9_-]{22}$"},
                "workerType": {"type": "string", "minLength": 1, "maxLength": 38}
            },
            "required": ["taskId", "workerType"],
            "additionalProperties": false
        }"##
    };
}

impl Message for TaskDefinedMessage {
    const SCHEMA_ID: &'static str = "/schemas/test-queue/v1/task-defined-message.json#";
    const SCHEMA: &'static str = concat!(
        r##"{
        "$schema": "http://json-schema.org/draft-06/schema#",
        "$id": "/schemas/test-queue/v1/task-defined-message.json#",
        "type": "object",
        "properties": {
            "version": {"enum": [1]},
            "status": {"$ref": "#/definitions/status"}
        },
        "required": ["version", "status"],
        "additionalProperties": false,
        "definitions": {"##,
        status_schema!(),
        "}}"
    );
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRunningMessage {
    pub version: u32,
    pub status: Status,
    pub run_id: u32,
    pub worker_id: String,
}

impl Message for TaskRunningMessage {
    const SCHEMA_ID: &'static str = "/schemas/test-queue/v1/task-running-message.json#";
    const SCHEMA: &'static str = concat!(
        r##"{
        "$schema": "http://json-schema.org/draft-06/schema#",
        "$id": "/schemas/test-queue/v1/task-running-message.json#",
        "type": "object",
        "properties": {
            "version": {"enum": [1]},
            "runId": {"type": "integer", "minimum": 0, "maximum": 1000},
            "workerId": {"type": "string", "minLength": 1},
            "status": {"$ref": "#/definitions/status"}
        },
        "required": ["version", "status", "runId", "workerId"],
        "definitions": {"##,
        status_schema!(),
        "}}"
    );
}

macro_rules! binding {
    ($name:ident, $message:ty, $exchange:expr, $entry:expr) => {
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name {
            pub task_id: Option<String>,
            pub worker_type: Option<String>,
            pub reserved: Option<String>,
        }

        impl Exchange for $name {
            type Message = $message;
            const EXCHANGE: &'static str = $exchange;
            const ENTRY: &'static str = $entry;
            const ROUTING_KEY: &'static [RoutingKeyWord] = WORDS;
        }

        impl Binding for $name {
            fn word_values(&self) -> Vec<Option<&str>> {
                vec![
                    None,
                    self.task_id.as_deref(),
                    self.worker_type.as_deref(),
                    self.reserved.as_deref(),
                ]
            }

            fn from_word_values(values: Vec<Option<String>>) -> Self {
                let mut values = values.into_iter().skip(1);
                $name {
                    task_id: values.next().flatten(),
                    worker_type: values.next().flatten(),
                    reserved: values.next().flatten(),
                }
            }
        }
    };
}

binding!(TaskDefined, TaskDefinedMessage, DEFINED, "taskDefined");
binding!(TaskRunning, TaskRunningMessage, RUNNING, "taskRunning");

/// The "service enum" of the two test exchanges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueEvent {
    TaskDefined(TaskDefinedMessage),
    TaskRunning(TaskRunningMessage),
}

impl Decode for QueueEvent {
    fn decode(exchange: &str, body: &[u8]) -> Result<Self, DecodeError> {
        match exchange {
            DEFINED => TaskDefinedMessage::decode(exchange, body).map(QueueEvent::TaskDefined),
            RUNNING => TaskRunningMessage::decode(exchange, body).map(QueueEvent::TaskRunning),
            other => Err(DecodeError::unknown_exchange(other)),
        }
    }
}

/// Declares [`DEFINED`] and [`RUNNING`] (durable), as a deployment would have them.
pub async fn declare_test_exchanges(broker: &impl Broker) {
    for exchange in [DEFINED, RUNNING] {
        broker
            .declare_exchange(
                exchange,
                ExchangeOptions {
                    passive: false,
                    durable: true,
                },
            )
            .await
            .expect("declaring a test exchange");
    }
}

/// A fresh embedded broker with [`DEFINED`] and [`RUNNING`] declared.
pub async fn broker_with_test_exchanges() -> MemoryBroker {
    let broker = MemoryBroker::new();
    declare_test_exchanges(&broker).await;
    broker
}

/// A 22-character slug id made from a number.
pub fn task_id(n: u32) -> String {
    format!("{n:0>22}")
}

pub fn defined(n: u32, worker_type: &str) -> (TaskDefined, TaskDefinedMessage) {
    (
        TaskDefined {
            task_id: Some(task_id(n)),
            worker_type: Some(worker_type.to_owned()),
            reserved: None,
        },
        TaskDefinedMessage {
            version: 1,
            status: Status {
                task_id: task_id(n),
                worker_type: worker_type.to_owned(),
            },
        },
    )
}

pub fn running(n: u32, worker_type: &str) -> (TaskRunning, TaskRunningMessage) {
    (
        TaskRunning {
            task_id: Some(task_id(n)),
            worker_type: Some(worker_type.to_owned()),
            reserved: None,
        },
        TaskRunningMessage {
            version: 1,
            status: Status {
                task_id: task_id(n),
                worker_type: worker_type.to_owned(),
            },
            run_id: 0,
            worker_id: "worker-1".to_owned(),
        },
    )
}

/// Generous bound for things that must happen.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// Polls `check` until it is true or [`EVENTUALLY`] passes (then panics with `what`).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next item of a channel within [`EVENTUALLY`], or a panic naming `what`.
pub async fn next<T>(receiver: &mut tokio::sync::mpsc::UnboundedReceiver<T>, what: &str) -> T {
    match tokio::time::timeout(EVENTUALLY, receiver.recv()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("channel closed while waiting for: {what}"),
        Err(_) => panic!("timed out waiting for: {what}"),
    }
}

/// A JSON message whose body is `body` and whose message id is the body too, persistent.
pub fn json_message(body: &str) -> OutgoingMessage {
    OutgoingMessage {
        body: body.as_bytes().to_vec(),
        content_type: Some("application/json".to_owned()),
        message_id: Some(body.to_owned()),
        persistent: true,
        ..OutgoingMessage::default()
    }
}

/// Declares a fresh non-durable exchange named `unique(prefix)` and returns its name.
pub async fn declare_transient_exchange(broker: &impl Broker, prefix: &str) -> String {
    let exchange = unique(prefix);
    broker
        .declare_exchange(
            &exchange,
            ExchangeOptions {
                passive: false,
                durable: false,
            },
        )
        .await
        .expect("declare exchange");
    exchange
}

/// Declares an unnamed (exclusive) queue bound to `exchange` by `pattern`.
pub async fn bound_anonymous_queue(broker: &impl Broker, exchange: &str, pattern: &str) -> String {
    let queue = broker
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare queue");
    broker
        .bind_queue(&queue, exchange, pattern)
        .await
        .expect("bind");
    queue
}

/// The body of the next delivery on `stream` (within 10 s), acknowledged.
pub async fn next_body(stream: &mut DeliveryStream) -> String {
    let delivery = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a delivery within 10 s")
        .expect("stream open")
        .expect("no broker error");
    let body = String::from_utf8(delivery.body.clone()).expect("utf-8 body");
    delivery.ack().await.expect("ack");
    body
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// What one publish attempt sent: its message id, routing key and body.
pub type SentAttempt = (Option<String>, String, Vec<u8>);

/// Wraps a `MemoryBroker` to fail on purpose: the next `fail_publishes`
/// publishes fail with a connection error, the next `broken_streams`
/// subscriptions end at once (as a dropped connection ends them), and while
/// `fail_delays_from` is `Some(least)` every `publish_delayed` with a delay of
/// at least `least` fails with a connection error. Counts publishes,
/// exchange declarations and subscriptions, and keeps what each publish
/// attempt sent (message id, routing key and body).
#[derive(Clone)]
pub struct Flaky {
    pub inner: MemoryBroker,
    pub fail_publishes: Arc<AtomicU32>,
    pub broken_streams: Arc<AtomicU32>,
    pub fail_delays_from: Arc<Mutex<Option<Duration>>>,
    pub publishes: Arc<AtomicU32>,
    /// `(message id, routing key, body)` of every publish attempt, failed ones included.
    pub sent: Arc<Mutex<Vec<SentAttempt>>>,
    pub declarations: Arc<AtomicU32>,
    /// The next this many exchange declarations fail with a connection error.
    pub fail_declarations: Arc<AtomicU32>,
    /// Milliseconds each exchange declaration takes.
    pub declaration_ms: Arc<AtomicU32>,
    pub subscriptions: Arc<AtomicU32>,
}

impl Flaky {
    pub fn new(inner: MemoryBroker, fail_publishes: u32, broken_streams: u32) -> Self {
        Flaky {
            inner,
            fail_publishes: Arc::new(AtomicU32::new(fail_publishes)),
            broken_streams: Arc::new(AtomicU32::new(broken_streams)),
            fail_delays_from: Arc::new(Mutex::new(None)),
            publishes: Arc::new(AtomicU32::new(0)),
            sent: Arc::default(),
            declarations: Arc::new(AtomicU32::new(0)),
            fail_declarations: Arc::new(AtomicU32::new(0)),
            declaration_ms: Arc::new(AtomicU32::new(0)),
            subscriptions: Arc::new(AtomicU32::new(0)),
        }
    }
}

/// Takes one from a counter of injected failures; whether there was one.
fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
            left.checked_sub(1)
        })
        .is_ok()
}

impl Broker for Flaky {
    async fn declare_exchange(
        &self,
        name: &str,
        options: ExchangeOptions,
    ) -> Result<(), BrokerError> {
        self.declarations.fetch_add(1, Ordering::SeqCst);
        let pause = self.declaration_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(pause.into())).await;
        if take_one(&self.fail_declarations) {
            return Err(BrokerError::Connection("injected failure".to_owned()));
        }
        self.inner.declare_exchange(name, options).await
    }

    async fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
    ) -> Result<String, BrokerError> {
        self.inner.declare_queue(name, options).await
    }

    async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        self.inner.delete_queue(name).await
    }

    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        pattern: &str,
    ) -> Result<(), BrokerError> {
        self.inner.bind_queue(queue, exchange, pattern).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        self.publishes.fetch_add(1, Ordering::SeqCst);
        self.sent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((
                message.message_id.clone(),
                routing_key.to_owned(),
                message.body.clone(),
            ));
        if take_one(&self.fail_publishes) {
            return Err(BrokerError::Connection("injected failure".to_owned()));
        }
        self.inner.publish(exchange, routing_key, message).await
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        message: OutgoingMessage,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        let failing = *self
            .fail_delays_from
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if failing.is_some_and(|least| delay >= least) {
            return Err(BrokerError::Connection(
                "injected failure of a delayed publish".to_owned(),
            ));
        }
        self.inner.publish_delayed(queue, message, delay).await
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<DeliveryStream, BrokerError> {
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.broken_streams) {
            let (sender, receiver) = tokio::sync::mpsc::channel(1);
            // A stream that reports a lost connection, then ends.
            let _ = sender.try_send(Err(BrokerError::Connection(
                "injected: connection lost".to_owned(),
            )));
            return Ok(DeliveryStream::new(receiver));
        }
        self.inner.consume(queue, prefetch).await
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>, BrokerError> {
        self.inner.get(queue).await
    }

    async fn pending(&self, queue: &str) -> Result<Vec<PendingMessage>, BrokerError> {
        self.inner.pending(queue).await
    }
}
