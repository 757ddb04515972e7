//! `Publisher` against the embedded `MemoryBroker` (and a wrapper that makes
//! it fail on purpose): schema validation before sending, routing keys,
//! exchange declaration once, retries across connection failures.

mod client_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use client_support::*;
use exchange_runtime::RoutingKeyErrorKind;
use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::broker::{Broker, BrokerError, QueueOptions};
use exchange_runtime::publisher::{PublishError, Publisher, PublisherOptions};

/// A queue bound to everything on both test exchanges.
async fn tap(broker: &impl Broker) -> String {
    declare_test_exchanges(broker).await;
    let queue = broker
        .declare_queue("tap", QueueOptions::default())
        .await
        .unwrap();
    for exchange in [DEFINED, RUNNING] {
        broker.bind_queue(&queue, exchange, "#").await.unwrap();
    }
    queue
}

#[tokio::test]
async fn a_valid_message_is_sent_persistent_json_with_its_key() {
    let broker = MemoryBroker::new();
    let queue = tap(&broker).await;
    let (binding, message) = defined(7, "gaia");
    Publisher::new(broker.clone())
        .publish(&binding, &message)
        .await
        .unwrap();
    let delivery = broker.get(&queue).await.unwrap().expect("the message");
    assert_eq!(delivery.exchange, DEFINED);
    assert_eq!(
        delivery.routing_key,
        format!("primary.{}.gaia._", task_id(7))
    );
    assert_eq!(delivery.content_type.as_deref(), Some("application/json"));
    let body: TaskDefinedMessage = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(body, message);
    delivery.ack().await.unwrap();
}

#[tokio::test]
async fn an_invalid_message_is_refused_with_every_violation_and_nothing_is_sent() {
    let broker = MemoryBroker::new();
    let queue = tap(&broker).await;
    let (binding, mut message) = defined(7, "gaia");
    message.version = 2;
    message.status.task_id = "not-a-slug".to_owned();
    message.status.worker_type = String::new();
    let error = Publisher::new(broker.clone())
        .publish(&binding, &message)
        .await
        .unwrap_err();
    let PublishError::InvalidMessage {
        exchange,
        routing_key,
        source,
    } = &error
    else {
        panic!("expected InvalidMessage, got {error:?}");
    };
    assert_eq!(exchange, DEFINED);
    assert_eq!(routing_key, &format!("primary.{}.gaia._", task_id(7)));
    let mut pointers: Vec<&str> = source
        .violations()
        .iter()
        .map(|v| v.pointer.as_str())
        .collect();
    pointers.sort();
    assert_eq!(
        pointers,
        ["/status/taskId", "/status/workerType", "/version"],
        "{error}"
    );
    let text = error.to_string();
    for needle in [
        DEFINED,
        "/status/taskId",
        "/version",
        "task-defined-message.json",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from: {text}");
    }
    assert!(
        broker.pending(&queue).await.unwrap().is_empty(),
        "something was sent"
    );
}

#[tokio::test]
async fn a_binding_without_a_required_word_is_refused() {
    let broker = MemoryBroker::new();
    let queue = tap(&broker).await;
    let (mut binding, message) = defined(7, "gaia");
    binding.worker_type = None;
    let error = Publisher::new(broker.clone())
        .publish(&binding, &message)
        .await
        .unwrap_err();
    match &error {
        PublishError::RoutingKey(e) => assert_eq!(
            e.kind,
            RoutingKeyErrorKind::MissingRequired { word: "workerType" }
        ),
        other => panic!("expected a routing-key error, got {other:?}"),
    }
    assert!(error.to_string().contains(DEFINED));
    assert!(broker.pending(&queue).await.unwrap().is_empty());
}

fn quick(deadline: Duration) -> PublisherOptions {
    PublisherOptions {
        deadline,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    }
}

#[tokio::test]
async fn connection_failures_are_retried_until_confirmed() {
    let memory = MemoryBroker::new();
    let broker = Flaky::new(memory.clone(), 3, 0);
    let queue = tap(&memory).await;
    let publisher = Publisher::with_options(broker.clone(), quick(Duration::from_secs(10)));
    let (binding, message) = defined(1, "w");
    publisher.publish(&binding, &message).await.unwrap();
    assert_eq!(
        broker.publishes.load(Ordering::SeqCst),
        4,
        "3 failures, then success"
    );
    assert_eq!(memory.pending(&queue).await.unwrap().len(), 1);
    // Every retry sends the same message: its id, its key and its bytes.
    let sent = broker.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 4);
    assert!(sent[0].0.is_some(), "a message id");
    assert_eq!(sent[0].1, format!("primary.{}.w._", task_id(1)));
    assert!(sent.iter().all(|attempt| *attempt == sent[0]), "{sent:?}");

    // The exchange is declared once per publisher, not once per publish.
    for n in 2..5 {
        let (binding, message) = defined(n, "w");
        publisher.publish(&binding, &message).await.unwrap();
    }
    assert_eq!(broker.declarations.load(Ordering::SeqCst), 1);
}

/// Concurrent first publishes wait for one declaration of the exchange
/// (each declaring opened a channel: 1,980 at once on one connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_first_publishes_declare_the_exchange_once() {
    let memory = MemoryBroker::new();
    let broker = Flaky::new(memory.clone(), 0, 0);
    broker.declaration_ms.store(50, Ordering::SeqCst);
    let queue = tap(&memory).await;
    let publisher = std::sync::Arc::new(Publisher::with_options(
        broker.clone(),
        quick(Duration::from_secs(10)),
    ));
    let tasks: Vec<_> = (0..100)
        .map(|n| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                let (binding, message) = defined(n, "w");
                publisher.publish(&binding, &message).await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(broker.declarations.load(Ordering::SeqCst), 1);
    assert_eq!(memory.pending(&queue).await.unwrap().len(), 100);
}

/// The publishes waiting for another one's declaration go on when that
/// one fails or is dropped: one of them declares the exchange then.
/// Publishes the `n`th task-defined message in a task of its own.
fn spawn_publish(
    publisher: &std::sync::Arc<Publisher<Flaky>>,
    n: u32,
) -> tokio::task::JoinHandle<Result<(), PublishError>> {
    let publisher = publisher.clone();
    tokio::spawn(async move {
        let (binding, message) = defined(n, "w");
        publisher.publish(&binding, &message).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declaration_that_fails_or_is_dropped_is_made_by_a_waiting_publish() {
    let memory = MemoryBroker::new();
    let broker = Flaky::new(memory.clone(), 0, 0);
    broker.declaration_ms.store(100, Ordering::SeqCst);
    broker.fail_declarations.store(1, Ordering::SeqCst);
    let queue = tap(&memory).await;
    let publisher = std::sync::Arc::new(Publisher::with_options(
        broker.clone(),
        quick(Duration::from_secs(10)),
    ));
    let publish = |n: u32| spawn_publish(&publisher, n);
    // The first declares (and its declaration will fail); the next wait for it.
    let first = publish(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let waiting: Vec<_> = (1..20).map(publish).collect();
    first.await.unwrap().unwrap();
    for task in waiting {
        task.await.unwrap().unwrap();
    }
    assert_eq!(
        broker.declarations.load(Ordering::SeqCst),
        2,
        "failed once, then declared"
    );
    assert_eq!(memory.pending(&queue).await.unwrap().len(), 20);

    // A declaring publish that is dropped: a waiting one declares instead.
    let publisher = std::sync::Arc::new(Publisher::with_options(
        broker.clone(),
        quick(Duration::from_secs(10)),
    ));
    let publish = |n: u32| spawn_publish(&publisher, n);
    let dropped = publish(100);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let waiting = publish(101);
    dropped.abort();
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting publish does not hang")
        .unwrap()
        .unwrap();
    assert_eq!(broker.declarations.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn the_deadline_bounds_retries_and_the_error_names_exchange_and_key() {
    let memory = MemoryBroker::new();
    let broker = Flaky::new(memory.clone(), u32::MAX, 0);
    let queue = tap(&memory).await;
    let publisher = Publisher::with_options(broker.clone(), quick(Duration::from_millis(300)));
    let (binding, message) = defined(1, "w");
    let started = tokio::time::Instant::now();
    let error = publisher.publish(&binding, &message).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "gave up late");
    let PublishError::Broker {
        exchange,
        routing_key,
        attempts,
        source,
    } = &error
    else {
        panic!("expected a broker error, got {error:?}");
    };
    assert_eq!(exchange, DEFINED);
    assert_eq!(routing_key, &format!("primary.{}.w._", task_id(1)));
    assert!(*attempts > 1, "retried: {attempts}");
    assert!(matches!(source, BrokerError::Connection(_)));
    assert!(memory.pending(&queue).await.unwrap().is_empty());
}

#[tokio::test]
async fn unbounded_deadline_and_backoff_are_not_a_panic() {
    // `Duration::MAX` deadline: retried until confirmed, as with any deadline.
    let memory = MemoryBroker::new();
    let queue = tap(&memory).await;
    let options = PublisherOptions {
        deadline: Duration::MAX,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::MAX,
    };
    let publisher = Publisher::with_options(Flaky::new(memory.clone(), 3, 0), options);
    let (binding, message) = defined(1, "w");
    publisher.publish(&binding, &message).await.unwrap();
    assert_eq!(memory.pending(&queue).await.unwrap().len(), 1);

    // A first backoff too long to represent is past the deadline: no retry.
    let options = PublisherOptions {
        initial_backoff: Duration::MAX,
        ..quick(Duration::from_secs(10))
    };
    let broker = Flaky::new(memory.clone(), u32::MAX, 0);
    let publisher = Publisher::with_options(broker.clone(), options);
    let error = publisher.publish(&binding, &message).await.unwrap_err();
    assert!(
        matches!(
            &error,
            PublishError::Broker {
                attempts: 1,
                source: BrokerError::Connection(_),
                ..
            }
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn errors_that_retrying_cannot_fix_are_not_retried() {
    // A queue-full rejection is backpressure, not a lost connection.
    let memory = MemoryBroker::new();
    let broker = Flaky::new(memory.clone(), 0, 0);
    tap(&memory).await;
    let full = memory
        .declare_queue(
            "full",
            QueueOptions {
                max_length: Some(1),
                ..QueueOptions::default()
            },
        )
        .await
        .unwrap();
    memory.bind_queue(&full, RUNNING, "#").await.unwrap();
    let publisher = Publisher::with_options(broker.clone(), quick(Duration::from_secs(10)));
    let (binding, message) = running(1, "w");
    publisher.publish(&binding, &message).await.unwrap();
    let error = publisher.publish(&binding, &message).await.unwrap_err();
    assert!(
        matches!(
            &error,
            PublishError::Broker {
                attempts: 1,
                source: BrokerError::QueueFull(_),
                ..
            }
        ),
        "{error:?}"
    );
}
