//! The embedded broker: the whole conformance suite, then what only it
//! promises (connections and exclusive queues, argument checks, its end).

mod suite;

use std::time::Duration;

use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::broker::{
    Broker, BrokerError, DEFAULT_EXCHANGE, ExchangeOptions, QueueOptions,
};

async fn broker() -> MemoryBroker {
    MemoryBroker::new()
}

/// Another connection to the same broker.
async fn another_connection(broker: &MemoryBroker) -> MemoryBroker {
    broker.connect()
}

suite::conformance_tests!(broker, another_connection);

const EVENTUALLY: Duration = suite::EVENTUALLY;

/// A fresh broker whose queue `q` holds one message, `m`.
async fn broker_with_message_m_in_queue_q() -> MemoryBroker {
    let broker = MemoryBroker::new();
    broker
        .declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    broker
        .publish(DEFAULT_EXCHANGE, "q", suite::message("m"))
        .await
        .unwrap();
    broker
}

#[tokio::test]
async fn exclusive_queue_belongs_to_its_connection() {
    let broker = MemoryBroker::new();
    let other = broker.connect();
    let options = QueueOptions {
        exclusive: true,
        ..QueueOptions::default()
    };
    let queue = broker
        .declare_queue("exclusive", options.clone())
        .await
        .unwrap();
    // A clone is the same connection.
    broker.clone().get("exclusive").await.unwrap();
    for error in [
        other.get(&queue).await.err(),
        other.pending(&queue).await.err(),
        other.consume(&queue, 1).await.err(),
        other.declare_queue(&queue, options.clone()).await.err(),
        other.delete_queue(&queue).await.err(),
    ] {
        assert!(
            matches!(&error, Some(BrokerError::Conflict { name, .. }) if name == "exclusive"),
            "{error:?}"
        );
    }
    // Publishing to it is open to everyone.
    other
        .publish(DEFAULT_EXCHANGE, &queue, suite::message("hi"))
        .await
        .unwrap();
    assert_eq!(broker.pending(&queue).await.unwrap().len(), 1);

    // The queue goes when its connection's last handle does.
    let handle = broker.clone();
    drop(broker);
    assert!(other.pending(&queue).await.is_err());
    drop(handle);
    assert!(matches!(
        other.pending(&queue).await,
        Err(BrokerError::QueueNotFound(_))
    ));
}

#[tokio::test]
async fn invalid_arguments_are_refused() {
    let broker = MemoryBroker::new();
    broker
        .declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    broker
        .declare_exchange("x", ExchangeOptions::default())
        .await
        .unwrap();
    let long = "n".repeat(256);
    let results = [
        ("prefetch 0", broker.consume("q", 0).await.err()),
        (
            "long queue name",
            broker
                .declare_queue(&long, QueueOptions::default())
                .await
                .err(),
        ),
        (
            "long exchange name",
            broker
                .declare_exchange(&long, ExchangeOptions::default())
                .await
                .err(),
        ),
        (
            "long routing key",
            broker.publish("x", &long, suite::message("m")).await.err(),
        ),
        (
            "long CC key",
            broker
                .publish(
                    "x",
                    "k",
                    exchange_runtime::OutgoingMessage {
                        cc: vec![long.clone()],
                        ..suite::message("m")
                    },
                )
                .await
                .err(),
        ),
        (
            "long pattern",
            broker.bind_queue("q", "x", &long).await.err(),
        ),
        (
            "binding to the default exchange",
            broker.bind_queue("q", DEFAULT_EXCHANGE, "#").await.err(),
        ),
        (
            "declaring the default exchange",
            broker
                .declare_exchange(DEFAULT_EXCHANGE, ExchangeOptions::default())
                .await
                .err(),
        ),
        (
            "reserved exchange name",
            broker
                .declare_exchange("amq.mine", ExchangeOptions::default())
                .await
                .err(),
        ),
        (
            "reserved queue name",
            broker
                .declare_queue("amq.mine", QueueOptions::default())
                .await
                .err(),
        ),
        (
            "dead-letter key without exchange",
            broker
                .declare_queue(
                    "dl",
                    QueueOptions {
                        dead_letter_routing_key: Some("k".to_owned()),
                        ..QueueOptions::default()
                    },
                )
                .await
                .err(),
        ),
    ];
    for (what, error) in results {
        assert!(
            matches!(error, Some(BrokerError::Invalid(_))),
            "{what}: {error:?}"
        );
    }
}

#[tokio::test]
async fn huge_durations_do_not_overflow() {
    let broker = MemoryBroker::new();
    broker
        .declare_queue(
            "forever",
            QueueOptions {
                message_ttl: Some(exchange_runtime::broker::MAX_DELAY),
                ..QueueOptions::default()
            },
        )
        .await
        .unwrap();
    broker
        .publish(DEFAULT_EXCHANGE, "forever", suite::message("kept"))
        .await
        .unwrap();
    broker
        .publish_delayed("forever", suite::message("never"), Duration::MAX)
        .await
        .unwrap();
    let pending = broker.pending("forever").await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].body, b"kept");
}

#[tokio::test]
async fn delayed_publish_to_missing_queue_fails() {
    let broker = MemoryBroker::new();
    for delay in [Duration::ZERO, Duration::from_secs(1)] {
        let error = broker
            .publish_delayed("nowhere", suite::message("m"), delay)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, BrokerError::QueueNotFound(name) if name == "nowhere"),
            "{error:?}"
        );
    }
}

#[tokio::test]
async fn stale_delivery_of_a_cancelled_consumer_cannot_be_acknowledged() {
    let broker = broker_with_message_m_in_queue_q().await;
    let mut stream = broker.consume("q", 1).await.unwrap();
    let delivery = stream.next().await.unwrap().unwrap();
    drop(stream);
    // The watcher requeues it once it sees the stream gone.
    tokio::time::timeout(EVENTUALLY, async {
        while broker.pending("q").await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("requeued");
    let error = delivery.ack().await.unwrap_err();
    assert!(matches!(error, BrokerError::AckFailed(_)), "{error:?}");
    assert_eq!(broker.pending("q").await.unwrap().len(), 1);
}

#[tokio::test]
async fn consumer_delivery_settles_after_its_queue_is_deleted() {
    // As on RabbitMQ, whose channel still knows the delivery.
    let broker = broker_with_message_m_in_queue_q().await;
    let mut stream = broker.consume("q", 1).await.unwrap();
    let delivery = stream.next().await.unwrap().unwrap();
    broker.delete_queue("q").await.unwrap();
    broker
        .declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    delivery.acker.nack(true).await.unwrap();
    let error = delivery.acker.ack().await.unwrap_err();
    assert!(matches!(error, BrokerError::AckFailed(_)), "{error:?}");
    assert!(broker.pending("q").await.unwrap().is_empty());
}

#[tokio::test]
async fn dropping_the_broker_ends_consumers_and_acks() {
    let broker = broker_with_message_m_in_queue_q().await;
    let mut stream = broker.consume("q", 1).await.unwrap();
    let delivery = stream.next().await.unwrap().unwrap();
    drop(broker);
    let end = tokio::time::timeout(EVENTUALLY, stream.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none());
    assert!(matches!(delivery.ack().await, Err(BrokerError::Closed)));
}

#[tokio::test]
async fn dead_letter_cycle_stays_bounded() {
    // A queue dead-lettering into itself: each rejection puts the message
    // back at the end, once.
    let broker = MemoryBroker::new();
    broker
        .declare_queue(
            "loop",
            QueueOptions {
                dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
                dead_letter_routing_key: Some("loop".to_owned()),
                ..QueueOptions::default()
            },
        )
        .await
        .unwrap();
    for body in ["a", "b"] {
        broker
            .publish(DEFAULT_EXCHANGE, "loop", suite::message(body))
            .await
            .unwrap();
    }
    let a = broker.get("loop").await.unwrap().unwrap();
    a.nack(false).await.unwrap();
    let bodies: Vec<Vec<u8>> = broker
        .pending("loop")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(bodies, [b"b".to_vec(), b"a".to_vec()]);
}

#[tokio::test]
async fn expiry_cycles_are_broken() {
    // `self` expires into itself; `ping` and `pong` into each other.
    let broker = MemoryBroker::new();
    let ttl = Duration::from_millis(1);
    for (queue, target) in [("self", "self"), ("ping", "pong"), ("pong", "ping")] {
        broker
            .declare_queue(
                queue,
                QueueOptions {
                    message_ttl: Some(ttl),
                    dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
                    dead_letter_routing_key: Some(target.to_owned()),
                    ..QueueOptions::default()
                },
            )
            .await
            .unwrap();
    }
    for queue in ["self", "ping"] {
        broker
            .publish(DEFAULT_EXCHANGE, queue, suite::message(queue))
            .await
            .unwrap();
    }
    // The `ping` message expires once in each queue, then is dropped.
    tokio::time::timeout(EVENTUALLY, async {
        loop {
            let mut left = 0;
            for queue in ["self", "ping", "pong"] {
                left += broker.pending(queue).await.unwrap().len();
            }
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the cycling messages are dropped");
}

#[tokio::test]
async fn rejection_restarts_the_retry_cycle() {
    // work --reject--> retry --expire--> work --reject--> retry ...: never dropped.
    let broker = MemoryBroker::new();
    broker
        .declare_queue(
            "work",
            QueueOptions {
                dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
                dead_letter_routing_key: Some("retry".to_owned()),
                ..QueueOptions::default()
            },
        )
        .await
        .unwrap();
    broker
        .declare_queue(
            "retry",
            QueueOptions {
                message_ttl: Some(Duration::from_millis(20)),
                dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
                dead_letter_routing_key: Some("work".to_owned()),
                ..QueueOptions::default()
            },
        )
        .await
        .unwrap();
    broker
        .publish(DEFAULT_EXCHANGE, "work", suite::message("job"))
        .await
        .unwrap();
    let mut work = broker.consume("work", 1).await.unwrap();
    for attempt in 0..4 {
        let delivery = tokio::time::timeout(EVENTUALLY, work.next())
            .await
            .unwrap_or_else(|_| panic!("attempt {attempt} arrives"))
            .unwrap()
            .unwrap();
        assert_eq!(delivery.body, b"job");
        assert_eq!(
            delivery.routing_key, "work",
            "dead-lettered with the work key"
        );
        if attempt < 3 {
            delivery.nack(false).await.unwrap();
        } else {
            delivery.ack().await.unwrap();
        }
    }
    assert!(broker.pending("retry").await.unwrap().is_empty());
}

#[tokio::test]
async fn dead_letters_into_a_full_queue_are_dropped() {
    let broker = MemoryBroker::new();
    let bounded = QueueOptions {
        max_length: Some(1),
        ..QueueOptions::default()
    };
    broker.declare_queue("full", bounded).await.unwrap();
    broker
        .declare_queue(
            "source",
            QueueOptions {
                dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
                dead_letter_routing_key: Some("full".to_owned()),
                ..QueueOptions::default()
            },
        )
        .await
        .unwrap();
    for (queue, body) in [("full", "resident"), ("source", "rejected")] {
        broker
            .publish(DEFAULT_EXCHANGE, queue, suite::message(body))
            .await
            .unwrap();
    }
    let rejected = broker.get("source").await.unwrap().unwrap();
    rejected.nack(false).await.unwrap();
    let full = broker.pending("full").await.unwrap();
    assert_eq!(full.len(), 1);
    assert_eq!(full[0].body, b"resident");
    assert!(broker.pending("source").await.unwrap().is_empty());
}

#[tokio::test]
async fn requeued_message_keeps_its_expiry() {
    let broker = MemoryBroker::new();
    broker
        .declare_queue("dead", QueueOptions::default())
        .await
        .unwrap();
    let ttl = Duration::from_millis(300);
    broker
        .declare_queue(
            "ttl",
            QueueOptions {
                message_ttl: Some(ttl),
                dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
                dead_letter_routing_key: Some("dead".to_owned()),
                ..QueueOptions::default()
            },
        )
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    broker
        .publish(DEFAULT_EXCHANGE, "ttl", suite::message("m"))
        .await
        .unwrap();
    let mut dead = broker.consume("dead", 1).await.unwrap();
    // Held, then requeued: the TTL still counts from the first enqueue.
    let held = broker.get("ttl").await.unwrap().unwrap();
    tokio::time::sleep(ttl).await;
    held.nack(true).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_millis(200), dead.next())
        .await
        .expect("expired at once after the requeue")
        .unwrap()
        .unwrap();
    assert!(start.elapsed() >= ttl);
    assert_eq!(delivery.body, b"m");
    delivery.ack().await.unwrap();
}

/// Many publishers and consumers at once: every message is delivered once,
/// nothing deadlocks (the lock is never held while a delivery is dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_and_consumers_deliver_each_message_once() {
    const PUBLISHERS: usize = 4;
    const PER_PUBLISHER: usize = 500;
    let broker = MemoryBroker::new();
    broker
        .declare_exchange("events", ExchangeOptions::default())
        .await
        .unwrap();
    broker
        .declare_queue("work", QueueOptions::default())
        .await
        .unwrap();
    broker.bind_queue("work", "events", "task.#").await.unwrap();
    let (seen_sender, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = Vec::new();
    for n in 0..3u16 {
        let mut stream = broker.consume("work", n + 1).await.unwrap();
        let seen_sender = seen_sender.clone();
        consumers.push(tokio::spawn(async move {
            let mut count = 0;
            while let Some(Ok(delivery)) = stream.next().await {
                count += 1;
                let body = delivery.body.clone();
                // Every third is requeued once, some are simply dropped.
                match (count % 3, delivery.redelivered) {
                    (0, false) => delivery.nack(true).await.unwrap(),
                    (1, false) => drop(delivery),
                    _ => {
                        delivery.ack().await.unwrap();
                        if seen_sender.send(body).is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    drop(seen_sender);
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let broker = broker.clone();
        publishers.push(tokio::spawn(async move {
            for n in 0..PER_PUBLISHER {
                let body = format!("{p}-{n}");
                broker
                    .publish("events", "task.done", suite::message(&body))
                    .await
                    .unwrap();
            }
        }));
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let mut bodies = std::collections::BTreeSet::new();
    while bodies.len() < PUBLISHERS * PER_PUBLISHER {
        let body = tokio::time::timeout(EVENTUALLY, seen.recv())
            .await
            .expect("all messages are acknowledged")
            .expect("consumers running");
        assert!(bodies.insert(body), "acknowledged twice");
    }
    assert!(broker.pending("work").await.unwrap().is_empty());
    broker.delete_queue("work").await.unwrap();
    for consumer in consumers {
        tokio::time::timeout(EVENTUALLY, consumer)
            .await
            .expect("consumers end with their queue")
            .unwrap();
    }
}
