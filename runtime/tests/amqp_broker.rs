//! `AmqpBroker` against a real RabbitMQ (default `amqp://guest:guest@127.0.0.1:5672/%2f`,
//! override with `AMQP_URL`): the whole shared conformance suite, then what only
//! RabbitMQ does (Pulse naming, credentials, connection loss and recovery).
//! These tests fail, never skip, when RabbitMQ is unreachable.
#![cfg(feature = "amqp")]

mod client_support;
mod local_services;
mod suite;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client_support::{
    bound_anonymous_queue, declare_transient_exchange, json_message as message, next_body, unique,
};
use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig, PASSWORD_ENV, USERNAME_ENV};
use exchange_runtime::broker::{Broker, BrokerError, ExchangeOptions, QueueOptions};

fn url() -> String {
    local_services::rabbitmq_url()
}

fn config(connection_name: &str) -> AmqpConfig {
    AmqpConfig::from_url(&url())
        .expect("AMQP_URL must be a valid amqp:// URL")
        .with_connection_name(connection_name)
        .with_operation_timeout(Duration::from_secs(20))
        .with_backoff(Duration::from_millis(50), Duration::from_secs(1))
}

async fn connect_named(connection_name: &str) -> AmqpBroker {
    match AmqpBroker::connect(config(connection_name)).await {
        Ok(broker) => broker,
        Err(error) => panic!(
            "RabbitMQ is required for these tests and is unreachable at {} ({error}); start it with \
             `rabbitmq-server -detached` or set AMQP_URL",
            config(connection_name).endpoint()
        ),
    }
}

async fn connect() -> AmqpBroker {
    connect_named("exchange-runtime-tests").await
}

/// A second connection to the same RabbitMQ.
async fn another_connection(_: &AmqpBroker) -> AmqpBroker {
    connect_named("exchange-runtime-tests-other").await
}

suite::conformance_tests!(connect, another_connection);

fn transient_queue() -> QueueOptions {
    QueueOptions {
        auto_delete: false,
        ..QueueOptions::default()
    }
}

/// `rabbitmqctl list_connections` of the given fields, one connection a line.
fn list_connections(fields: &[&str]) -> String {
    let listing = Command::new("rabbitmqctl")
        .args(["-q", "list_connections"])
        .args(fields)
        .output()
        .expect("rabbitmqctl must be installed to run the connection tests");
    assert!(
        listing.status.success(),
        "rabbitmqctl list_connections failed: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    String::from_utf8_lossy(&listing.stdout).into_owned()
}

/// Closes this test's own connection(s) from the server side (by connection name),
/// leaving other connections to the node alone.
fn close_connections_named(connection_name: &str) -> usize {
    let stdout = list_connections(&["pid", "client_properties"]);
    let pids: Vec<&str> = stdout
        .lines()
        // Both of the broker's connections: the main one and the publishing one.
        .filter(|line| {
            line.contains(&format!("\"{connection_name}\""))
                || line.contains(&format!("\"{connection_name} (publish)\""))
        })
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for pid in &pids {
        let closed = Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test"])
            .output()
            .expect("rabbitmqctl close_connection");
        assert!(
            closed.status.success(),
            "rabbitmqctl close_connection {pid} failed: {}",
            String::from_utf8_lossy(&closed.stderr)
        );
    }
    pids.len()
}

async fn wait_for_recoveries(broker: &AmqpBroker, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.recoveries() < at_least
        || broker.publisher_recoveries() < at_least
        || !broker.is_connected()
    {
        assert!(
            Instant::now() < deadline,
            "connection not recovered: {} recoveries, want {at_least}",
            broker.recoveries()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_unbounded_operation_timeout_is_not_a_panic() {
    // `Instant + Duration::MAX` would panic: the deadline is far away instead.
    let config = config("exchange-runtime-unbounded").with_operation_timeout(Duration::MAX);
    let broker = AmqpBroker::connect(config).await.expect("connect");
    let queue = broker
        .declare_queue(
            &broker.qualify_queue_name(&unique("unbounded")),
            transient_queue(),
        )
        .await
        .expect("declare queue");
    broker
        .publish("", &queue, message("{}"))
        .await
        .expect("publish");
    assert_eq!(broker.pending(&queue).await.expect("pending").len(), 1);
    broker.delete_queue(&queue).await.expect("delete queue");
    broker.close().await;
}

#[tokio::test]
async fn publishes_and_consumes_with_headers_and_cc() {
    let broker = connect().await;
    let exchange = declare_transient_exchange(&broker, "exchange/guest/roundtrip").await;
    let queue = broker
        .declare_queue(
            &broker.qualify_queue_name(&unique("roundtrip")),
            transient_queue(),
        )
        .await
        .expect("declare queue");
    broker
        .bind_queue(&queue, &exchange, "task.*.completed")
        .await
        .expect("bind");
    broker
        .bind_queue(&queue, &exchange, "route.#")
        .await
        .expect("bind cc route");
    let mut stream = broker.consume(&queue, 10).await.expect("consume");

    let mut outgoing = message(r#"{"n":1}"#);
    outgoing.headers = BTreeMap::from([("attempt".to_owned(), "2".to_owned())]);
    outgoing.cc = vec!["route.notify.email".to_owned()];
    broker
        .publish(&exchange, "task.abc.completed", outgoing)
        .await
        .expect("publish");
    // Routed only by its CC key.
    let mut by_cc = message("cc-only");
    by_cc.cc = vec!["route.index".to_owned()];
    broker
        .publish(&exchange, "unbound.key", by_cc)
        .await
        .expect("publish cc");

    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("delivery")
        .expect("open")
        .expect("ok");
    assert_eq!(first.exchange, exchange);
    assert_eq!(first.routing_key, "task.abc.completed");
    assert_eq!(first.body, br#"{"n":1}"#);
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.message_id.as_deref(), Some(r#"{"n":1}"#));
    assert_eq!(
        first.headers,
        BTreeMap::from([("attempt".to_owned(), "2".to_owned())])
    );
    assert_eq!(first.cc, vec!["route.notify.email".to_owned()]);
    assert!(!first.redelivered);
    first.ack().await.expect("ack");
    assert_eq!(next_body(&mut stream).await, "cc-only");

    drop(stream);
    broker.delete_queue(&queue).await.expect("delete queue");
    broker
        .delete_exchange(&exchange)
        .await
        .expect("delete exchange");
    let passive = ExchangeOptions {
        passive: true,
        durable: false,
    };
    assert!(matches!(
        broker.declare_exchange(&exchange, passive).await,
        Err(BrokerError::ExchangeNotFound(name)) if name == exchange
    ));
}

#[tokio::test]
async fn pulse_queue_naming_and_exclusive_unnamed_queues() {
    let broker = connect().await;
    assert_eq!(broker.qualify_queue_name("workers"), "queue/guest/workers");
    let ephemeral = broker
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare unnamed");
    assert!(
        ephemeral.starts_with("queue/guest/ephemeral-"),
        "{ephemeral}"
    );
    let another = broker
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare unnamed");
    assert_ne!(ephemeral, another);

    // Exclusive: another connection may not use it.
    let other = connect_named("exchange-runtime-tests-other").await;
    match other.consume(&ephemeral, 1).await {
        Err(BrokerError::Conflict { name, .. }) => assert_eq!(name, ephemeral),
        Err(other) => {
            panic!("expected Conflict for another connection's exclusive queue, got {other:?}")
        }
        Ok(_) => panic!("consumed another connection's exclusive queue"),
    }
    // Auto-deleted with its connection.
    broker.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match other.get(&ephemeral).await {
            Err(BrokerError::QueueNotFound(name)) => {
                assert_eq!(name, ephemeral);
                break;
            }
            result => assert!(
                Instant::now() < deadline,
                "exclusive queue still there after its connection closed: {result:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        broker.get(&another).await,
        Err(BrokerError::Closed)
    ));
}

#[tokio::test]
async fn credentials_come_from_the_environment_when_the_url_has_none() {
    let without_credentials = "amqp://127.0.0.1:5672/%2f";
    let env = |name: &str| match name {
        USERNAME_ENV => Some("guest".to_owned()),
        PASSWORD_ENV => Some("guest".to_owned()),
        _ => None,
    };
    let config = AmqpConfig::from_url_and_env(without_credentials, env).expect("valid URL");
    let broker = AmqpBroker::connect(config)
        .await
        .expect("connect with env credentials");
    assert_eq!(broker.qualify_queue_name("q"), "queue/guest/q");
    let queue = broker
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare");
    assert!(broker.pending(&queue).await.expect("pending").is_empty());

    let wrong = |name: &str| match name {
        USERNAME_ENV => Some("guest".to_owned()),
        PASSWORD_ENV => Some("not-the-password".to_owned()),
        _ => None,
    };
    let config = AmqpConfig::from_url_and_env(without_credentials, wrong).expect("valid URL");
    match AmqpBroker::connect(config).await {
        Err(BrokerError::Connection(message)) => {
            assert!(
                message.contains("127.0.0.1:5672") && message.contains("guest"),
                "{message}"
            );
            assert!(
                !message.contains("not-the-password"),
                "password leaked: {message}"
            );
        }
        other => panic!("expected a connection error for bad credentials, got {other:?}"),
    }
}

#[tokio::test]
async fn full_queue_rejects_publishes() {
    let broker = connect().await;
    let queue = broker
        .declare_queue(
            &broker.qualify_queue_name(&unique("bounded")),
            QueueOptions {
                max_length: Some(2),
                ..transient_queue()
            },
        )
        .await
        .expect("declare bounded queue");
    broker
        .publish("", &queue, message("1"))
        .await
        .expect("first fits");
    broker
        .publish_delayed(&queue, message("2"), Duration::ZERO)
        .await
        .expect("second fits");
    match broker.publish("", &queue, message("3")).await {
        Err(BrokerError::QueueFull(name)) => assert_eq!(name, queue),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    // Room again once one is taken.
    let taken = broker.get(&queue).await.expect("get").expect("a message");
    taken.ack().await.expect("ack");
    broker
        .publish("", &queue, message("4"))
        .await
        .expect("fits again");
    let bodies: Vec<Vec<u8>> = broker
        .pending(&queue)
        .await
        .expect("pending")
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(bodies, vec![b"2".to_vec(), b"4".to_vec()]);
    broker.delete_queue(&queue).await.expect("delete");
}

#[tokio::test]
async fn missing_exchange_and_queue_errors_leave_the_broker_working() {
    let broker = connect().await;
    let missing = unique("exchange/guest/missing");
    match broker
        .declare_exchange(
            &missing,
            ExchangeOptions {
                passive: true,
                durable: false,
            },
        )
        .await
    {
        Err(BrokerError::ExchangeNotFound(name)) => assert_eq!(name, missing),
        other => panic!("expected ExchangeNotFound, got {other:?}"),
    }
    match broker.publish(&missing, "a.b", message("x")).await {
        Err(BrokerError::ExchangeNotFound(name)) => assert_eq!(name, missing),
        other => panic!("expected ExchangeNotFound on publish, got {other:?}"),
    }
    let missing_queue = broker.qualify_queue_name(&unique("missing"));
    assert!(
        matches!(broker.consume(&missing_queue, 1).await, Err(BrokerError::QueueNotFound(q)) if q == missing_queue)
    );
    assert!(
        matches!(broker.get(&missing_queue).await, Err(BrokerError::QueueNotFound(q)) if q == missing_queue)
    );
    assert!(matches!(
        broker.publish_delayed(&missing_queue, message("x"), Duration::ZERO).await,
        Err(BrokerError::QueueNotFound(q)) if q == missing_queue
    ));
    assert!(
        matches!(broker.publish("", &missing_queue, message("x")).await, Err(BrokerError::QueueNotFound(q)) if q == missing_queue)
    );
    assert!(
        matches!(broker.delete_queue(&missing_queue).await, Err(BrokerError::QueueNotFound(q)) if q == missing_queue)
    );

    // Still working, on the same connection.
    let exchange = unique("exchange/guest/present");
    broker
        .declare_exchange(
            &exchange,
            ExchangeOptions {
                passive: false,
                durable: false,
            },
        )
        .await
        .expect("declare after errors");
    broker
        .declare_exchange(
            &exchange,
            ExchangeOptions {
                passive: true,
                durable: false,
            },
        )
        .await
        .expect("passive declare of an existing exchange");
    let queue = broker
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare queue");
    match broker.bind_queue(&queue, &missing, "#").await {
        Err(BrokerError::ExchangeNotFound(name)) => assert_eq!(name, missing),
        other => panic!("expected ExchangeNotFound on bind, got {other:?}"),
    }
    broker
        .bind_queue(&queue, &exchange, "#")
        .await
        .expect("bind");
    broker
        .publish(&exchange, "k", message("after"))
        .await
        .expect("publish after errors");
    let got = broker.get(&queue).await.expect("get").expect("message");
    assert_eq!(got.body, b"after");
    got.ack().await.expect("ack");
    assert_eq!(
        broker.recoveries(),
        0,
        "channel errors must not cost the connection"
    );
    broker
        .delete_exchange(&exchange)
        .await
        .expect("delete exchange");
}

#[tokio::test]
async fn a_failed_publish_does_not_fail_concurrent_ones() {
    let broker = connect().await;
    let exchange = declare_transient_exchange(&broker, "exchange/guest/concurrent").await;
    let queue = bound_anonymous_queue(&broker, &exchange, "#").await;
    let missing = unique("exchange/guest/absent");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let broker = broker.clone();
        let (exchange, missing) = (exchange.clone(), missing.clone());
        tasks.push(tokio::spawn(async move {
            let target = if i % 4 == 0 { &missing } else { &exchange };
            (
                i,
                broker.publish(target, "k", message(&i.to_string())).await,
            )
        }));
    }
    let mut delivered = BTreeSet::new();
    for task in tasks {
        let (i, result) = task.await.expect("task");
        match result {
            Ok(()) => {
                assert_ne!(i % 4, 0, "publish to a missing exchange succeeded");
                delivered.insert(i.to_string());
            }
            Err(BrokerError::ExchangeNotFound(name)) => {
                assert_eq!(i % 4, 0, "publish {i} to a present exchange failed");
                assert_eq!(name, missing);
            }
            Err(other) => panic!("publish {i}: unexpected {other:?}"),
        }
    }
    assert_eq!(delivered.len(), 30);
    let pending: BTreeSet<String> = broker
        .pending(&queue)
        .await
        .expect("pending")
        .into_iter()
        .map(|m| String::from_utf8(m.body).expect("utf-8"))
        .collect();
    // At-least-once: a publish caught by another's channel error is resent, never lost.
    assert_eq!(pending, delivered);
    broker
        .delete_exchange(&exchange)
        .await
        .expect("delete exchange");
}

#[tokio::test]
async fn conflicting_declarations_are_reported() {
    let broker = connect().await;
    let name = broker.qualify_queue_name(&unique("conflict"));
    broker
        .declare_queue(&name, transient_queue())
        .await
        .expect("declare");
    match broker
        .declare_queue(
            &name,
            QueueOptions {
                max_length: Some(5),
                ..transient_queue()
            },
        )
        .await
    {
        Err(BrokerError::Conflict {
            name: conflicting,
            detail,
        }) => {
            assert_eq!(conflicting, name);
            assert!(detail.contains("x-max-length"), "{detail}");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    broker
        .declare_queue(&name, transient_queue())
        .await
        .expect("same declaration again");
    broker.delete_queue(&name).await.expect("delete");
    let long = "q".repeat(300);
    assert!(
        matches!(broker.declare_queue(&long, transient_queue()).await, Err(BrokerError::Invalid(m)) if m.contains("255"))
    );
}

#[tokio::test]
async fn delayed_messages_are_never_early() {
    let broker = connect().await;
    let queue = broker
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare");
    let mut stream = broker.consume(&queue, 5).await.expect("consume");
    let start = Instant::now();
    broker
        .publish_delayed(&queue, message("late"), Duration::from_millis(700))
        .await
        .expect("publish delayed");
    broker
        .publish_delayed(&queue, message("later"), Duration::from_millis(1100))
        .await
        .expect("publish delayed");
    broker
        .publish_delayed(&queue, message("now"), Duration::ZERO)
        .await
        .expect("publish now");
    assert_eq!(next_body(&mut stream).await, "now");
    assert!(
        start.elapsed() < Duration::from_millis(700),
        "zero delay was delayed"
    );
    assert_eq!(next_body(&mut stream).await, "late");
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "delivered early: {:?}",
        start.elapsed()
    );
    assert_eq!(next_body(&mut stream).await, "later");
    assert!(
        start.elapsed() >= Duration::from_millis(1100),
        "delivered early: {:?}",
        start.elapsed()
    );

    let missing = broker.qualify_queue_name(&unique("no-such-queue"));
    assert!(matches!(
        broker.publish_delayed(&missing, message("x"), Duration::from_secs(1)).await,
        Err(BrokerError::QueueNotFound(q)) if q == missing
    ));
}

#[tokio::test]
async fn deleting_a_consumed_queue_ends_the_stream_with_queue_not_found() {
    let broker = connect().await;
    let queue = broker
        .declare_queue(
            &broker.qualify_queue_name(&unique("deleted")),
            transient_queue(),
        )
        .await
        .expect("declare");
    let mut stream = broker.consume(&queue, 1).await.expect("consume");
    broker.delete_queue(&queue).await.expect("delete");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("stream reacts to the deletion");
    match end {
        Some(Err(BrokerError::QueueNotFound(name))) => assert_eq!(name, queue),
        other => panic!("expected QueueNotFound, got {other:?}"),
    }
    assert!(stream.next().await.is_none(), "stream ends after the error");
}

/// The channels RabbitMQ counts on this test's main connection.
async fn channels_of(connection_name: &str) -> usize {
    let stdout =
        tokio::task::spawn_blocking(|| list_connections(&["client_properties", "channels"]))
            .await
            .expect("rabbitmqctl task");
    let line = stdout
        .lines()
        .find(|line| line.contains(&format!("\"{connection_name}\"")))
        .unwrap_or_else(|| panic!("no connection named {connection_name}: {stdout}"));
    line.split_whitespace()
        .last()
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no channel count in {line}"))
}

/// A consumer the broker cancels (its queue deleted) leaves no channel open
/// behind it: its ack batcher lets go of the channel once nothing holds it.
#[tokio::test]
async fn a_cancelled_consumer_leaves_no_channel_open() {
    let connection_name = unique("exchange-runtime-channels");
    let broker = connect_named(&connection_name).await;
    let queue = broker
        .declare_queue(
            &broker.qualify_queue_name(&unique("cancelled")),
            transient_queue(),
        )
        .await
        .expect("declare");
    let before = channels_of(&connection_name).await;
    let mut stream = broker.consume(&queue, 5).await.expect("consume");
    broker.delete_queue(&queue).await.expect("delete");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    assert!(
        matches!(end, Ok(Some(Err(BrokerError::QueueNotFound(_))))),
        "{end:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = channels_of(&connection_name).await;
        if now <= before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{now} channels open, {before} before the consumer"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stream);
}

/// The connection is closed from the server three times while N confirmed
/// publishes are consumed with manual acks: every confirmed message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_mid_stream_loses_no_confirmed_message() {
    const MESSAGES: usize = 600;
    const KILLS: u64 = 3;
    let connection_name = unique("exchange-runtime-recovery");
    let broker = connect_named(&connection_name).await;
    let exchange = unique("exchange/guest/recovery");
    broker
        .declare_exchange(
            &exchange,
            ExchangeOptions {
                passive: false,
                durable: true,
            },
        )
        .await
        .expect("declare exchange");
    let queue = broker
        .declare_queue(
            &broker.qualify_queue_name(&unique("recovery")),
            transient_queue(),
        )
        .await
        .expect("declare queue");
    broker
        .bind_queue(&queue, &exchange, "jobs.#")
        .await
        .expect("bind");
    let mut stream = broker.consume(&queue, 20).await.expect("consume");

    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let publisher = {
        let (broker, exchange, confirmed) = (broker.clone(), exchange.clone(), confirmed.clone());
        tokio::spawn(async move {
            // The publishing connection's recovery count at each confirm.
            let mut recoveries_seen = BTreeSet::new();
            for i in 0..MESSAGES {
                if i == MESSAGES / 2 {
                    // The second half goes out after the first kill whatever `rabbitmqctl`'s
                    // start-up time, so publishing surely continues through a recovery.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while broker.publisher_recoveries() == 0 && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                let id = format!("{i:04}");
                broker
                    .publish(&exchange, "jobs.run", message(&id))
                    .await
                    .unwrap_or_else(|error| panic!("publish {id} failed across recovery: {error}"));
                confirmed.lock().expect("lock").insert(id);
                recoveries_seen.insert(broker.publisher_recoveries());
                // Keeps publishing while the kills happen.
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            recoveries_seen
        })
    };
    // Kills at evenly spaced points of the consumer's progress, so each one lands mid-stream.
    let kill_threshold =
        |kill: u64| MESSAGES * usize::try_from(kill).expect("small") / (KILLS as usize + 1);
    let progress = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (broker, connection_name, progress) =
            (broker.clone(), connection_name.clone(), progress.clone());
        tokio::spawn(async move {
            for kill in 1..=KILLS {
                while progress.load(Ordering::SeqCst) < kill_threshold(kill) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let closed = tokio::task::spawn_blocking({
                    let connection_name = connection_name.clone();
                    move || close_connections_named(&connection_name)
                })
                .await
                .expect("rabbitmqctl task");
                assert_eq!(
                    closed, 2,
                    "expected exactly this test's two connections to close"
                );
                wait_for_recoveries(&broker, kill).await;
            }
        })
    };

    let mut received = BTreeSet::new();
    let mut ack_failures = 0;
    let mut redelivered = 0;
    let mut next_kill = 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "only {} of {MESSAGES} received",
            received.len()
        );
        let delivery = match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(error))) => panic!("consumer failed: {error}"),
            Ok(None) => panic!("consumer stream ended"),
            Err(_) => panic!(
                "no delivery for 30 s; {} of {MESSAGES} received",
                received.len()
            ),
        };
        redelivered += usize::from(delivery.redelivered);
        let id = String::from_utf8(delivery.body.clone()).expect("utf-8");
        if next_kill <= KILLS && received.len() >= kill_threshold(next_kill) {
            // Hold this delivery (and a full prefetch window) while the connection is killed.
            progress.store(received.len(), Ordering::SeqCst);
            wait_for_recoveries(&broker, next_kill).await;
            next_kill += 1;
        }
        match delivery.ack().await {
            Ok(()) => {
                received.insert(id);
            }
            // Its channel died with the connection: it will come again.
            Err(BrokerError::AckFailed(_)) => ack_failures += 1,
            Err(other) => panic!("ack: unexpected {other:?}"),
        }
    }
    killer.await.expect("killer");
    // Whether a publish in flight meets a kill is down to timing (`rabbitmqctl`
    // takes a while to start); that publishing goes on through recoveries is not.
    let recoveries_seen = publisher.await.expect("publisher");
    assert!(
        recoveries_seen.contains(&0) && recoveries_seen.iter().any(|&seen| seen > 0),
        "publishes did not go on through a recovery: recovery counts seen at confirms {recoveries_seen:?}"
    );
    let confirmed = confirmed.lock().expect("lock").clone();
    assert_eq!(confirmed.len(), MESSAGES);
    let missing: Vec<_> = confirmed.difference(&received).collect();
    assert!(
        missing.is_empty(),
        "confirmed but never received: {missing:?}"
    );
    assert!(
        broker.recoveries() >= KILLS,
        "recoveries: {}",
        broker.recoveries()
    );
    // Each kill caught at least the held delivery in flight: its ack failed and it came
    // again, flagged as redelivered.
    assert!(
        ack_failures >= KILLS && redelivered >= KILLS as usize,
        "ack failures {ack_failures}, redelivered {redelivered}"
    );
    eprintln!(
        "recoveries {}, ack failures {ack_failures}, redelivered {redelivered}, \
         publisher recovery counts seen {recoveries_seen:?}",
        broker.recoveries()
    );
    drop(stream);
    broker.delete_queue(&queue).await.expect("delete queue");
    broker
        .delete_exchange(&exchange)
        .await
        .expect("delete exchange");
}

/// An unnamed (exclusive) queue is re-declared under the same name and rebound
/// after reconnection, and its consumer resumes.
#[tokio::test]
async fn exclusive_queue_and_bindings_are_restored_after_reconnection() {
    let connection_name = unique("exchange-runtime-restore");
    let broker = connect_named(&connection_name).await;
    let exchange = declare_transient_exchange(&broker, "exchange/guest/restore").await;
    let queue = bound_anonymous_queue(&broker, &exchange, "a.*").await;
    let mut stream = broker.consume(&queue, 3).await.expect("consume");
    broker
        .publish(&exchange, "a.before", message("before"))
        .await
        .expect("publish");
    assert_eq!(next_body(&mut stream).await, "before");

    let closed = tokio::task::spawn_blocking(move || close_connections_named(&connection_name))
        .await
        .expect("rabbitmqctl task");
    assert_eq!(closed, 2, "the main and the publishing connection");
    wait_for_recoveries(&broker, 1).await;

    broker
        .publish(&exchange, "a.after", message("after"))
        .await
        .expect("publish after");
    broker
        .publish(&exchange, "b.after", message("unbound"))
        .await
        .expect("publish unbound");
    assert_eq!(next_body(&mut stream).await, "after");
    assert!(broker.pending(&queue).await.expect("pending").is_empty());
    broker
        .delete_exchange(&exchange)
        .await
        .expect("delete exchange");
}

/// A long-running service makes many operations, some of them refused:
/// every one gets its own answer. (A channel per operation wrapped lapin's
/// channel ids at 2,047, and lapin fails a reused id with the error of the
/// channel the broker closed under it: answers went to the wrong calls, then
/// every call failed. Declarations now share one channel, and a connection
/// whose channels the broker closed is replaced before its ids wrap.)
#[tokio::test]
async fn twenty_thousand_mixed_operations_answer_correctly() {
    const OPERATIONS: usize = 20_000;
    const TASKS: usize = 4;
    let broker = connect_named(&unique("many-operations")).await;
    let exchange = unique("many-ops-exchange");
    broker
        .declare_exchange(&exchange, ExchangeOptions::default())
        .await
        .expect("declare exchange");
    let queue = broker
        .declare_queue(&unique("many-ops-queue"), transient_queue())
        .await
        .expect("declare queue");
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (broker, exchange, queue) = (broker.clone(), exchange.clone(), queue.clone());
            tokio::spawn(async move {
                let missing_exchange = unique("missing-exchange");
                let missing_queue = unique("missing-queue");
                for n in (task..OPERATIONS).step_by(TASKS) {
                    let outcome = match n % 5 {
                        0 => broker
                            .declare_exchange(&exchange, ExchangeOptions::default())
                            .await
                            .map(|()| "ok".to_owned()),
                        1 => broker
                            .declare_exchange(
                                &missing_exchange,
                                ExchangeOptions {
                                    passive: true,
                                    durable: false,
                                },
                            )
                            .await
                            .map(|()| "ok".to_owned()),
                        2 => broker
                            .bind_queue(&queue, &exchange, "never.#")
                            .await
                            .map(|()| "ok".to_owned()),
                        3 => broker
                            .publish(&missing_exchange, "k", message("lost"))
                            .await
                            .map(|()| "ok".to_owned()),
                        _ => broker
                            .delete_queue(&missing_queue)
                            .await
                            .map(|()| "ok".to_owned()),
                    };
                    let expected = match n % 5 {
                        0 | 2 => Ok("ok".to_owned()),
                        1 | 3 => Err(format!("ExchangeNotFound(\"{missing_exchange}\")")),
                        _ => Err(format!("QueueNotFound(\"{missing_queue}\")")),
                    };
                    assert_eq!(
                        outcome.map_err(|error| format!("{error:?}")),
                        expected,
                        "operation {n}"
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("operations task");
    }
    println!(
        "{OPERATIONS} operations in {:.1?}; connections replaced before their channel ids wrapped: {} main, {} publishing",
        started.elapsed(),
        broker.recoveries(),
        broker.publisher_recoveries()
    );
    // Each refused operation costs a channel; a connection is replaced only
    // before its 2,047 channel ids wrap.
    let refused = (OPERATIONS * 3 / 5) as u64;
    assert!(broker.recoveries() <= refused / 1500, "{broker:?}");
    assert!(
        broker.publisher_recoveries() <= refused / 1500,
        "{broker:?}"
    );
    broker.delete_queue(&queue).await.expect("delete queue");
    broker
        .delete_exchange(&exchange)
        .await
        .expect("delete exchange");
}

/// Publishing is not exclusive: a delayed publish to another connection's
/// exclusive queue is delivered there (it was refused as a `Conflict`).
#[tokio::test]
async fn delayed_publish_reaches_another_connections_exclusive_queue() {
    let owner = connect_named(&unique("exclusive-owner")).await;
    let other = connect_named(&unique("exclusive-other")).await;
    let queue = owner
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare exclusive queue");
    let mut stream = owner.consume(&queue, 1).await.expect("consume");
    for delay in [Duration::from_millis(100), Duration::ZERO] {
        other
            .publish_delayed(&queue, message("for the owner"), delay)
            .await
            .expect("publish to another connection's exclusive queue");
        assert_eq!(next_body(&mut stream).await, "for the owner");
    }
    owner.close().await;
    other.close().await;
}

/// A delivery acked just before its consumer stream is dropped stays acked:
/// the stream's closing waits for a flush already under way, so the channel
/// is never closed before the ack went out (which would requeue the message).
/// A race: many rounds, each a fresh consumer; a message put back shows up
/// as the next round's delivery instead of that round's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_just_before_the_stream_is_dropped_is_not_undone() {
    let broker = connect().await;
    let queue = broker
        .declare_queue(
            &broker.qualify_queue_name(&unique("ack-then-drop")),
            transient_queue(),
        )
        .await
        .expect("declare queue");
    for round in 0..150 {
        broker
            .publish("", &queue, message(&format!("{{\"round\":{round}}}")))
            .await
            .expect("publish");
        let mut stream = broker.consume(&queue, 1).await.expect("consume");
        let delivery = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a delivery within 10 s")
            .expect("the stream goes on")
            .expect("a delivery");
        assert_eq!(
            String::from_utf8_lossy(&delivery.body),
            format!("{{\"round\":{round}}}"),
            "an acked message of an earlier round came back"
        );
        delivery.ack().await.expect("ack");
        drop(stream);
    }
    // The last round's channel closes too: nothing comes back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(broker.pending(&queue).await.expect("pending").len(), 0);
    broker.delete_queue(&queue).await.expect("delete queue");
    broker.close().await;
}
