//! `AmqpBroker` against a RabbitMQ node of this test's own (see
//! `node_support`): TLS with a private CA, refusals of servers whose
//! certificate does not fit, recovery after the node closes every
//! connection, and smoke tests of the fault switches later fault tests use
//! (memory alarm, SIGSTOP/SIGCONT, stop_app/start_app) — none of which may
//! touch the shared broker on 5672.
//!
//! Starting a node takes 20–35 s, so there is one `#[test]`: it starts the
//! node, runs the cases below in sequence (each in its own task, so one
//! failing case does not hide the others), stops the node and fails naming
//! every failed case. The node is also stopped when anything panics (drop).
//! Run one case with `cargo test -p exchange-runtime --test rabbit_node -- --nocapture`
//! and `TCX_NODE_CASES=<name>[,<name>]`.
#![cfg(feature = "amqp")]

mod client_support;
mod node_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use client_support::{
    bound_anonymous_queue, declare_transient_exchange, json_message, next_body, unique,
};
use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig};
use exchange_runtime::broker::{Broker, BrokerError, QueueOptions};
use node_support::{RabbitNode, cases, certificate_authority};

type Case = cases::Case<RabbitNode>;

/// `(name, case)` for each `async fn name(node: Arc<RabbitNode>)`.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        &[$((stringify!($case), (|node| Box::pin($case(node))) as Case)),*]
    };
}

/// Each case's time limit.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn own_rabbitmq_node_cases() {
    let cases: &[(&str, Case)] = cases![
        plain_amqp_reaches_the_own_node_only,
        amqps_publishes_and_consumes_with_a_private_ca,
        a_server_certificate_from_an_unknown_ca_is_refused,
        a_server_certificate_for_another_host_is_refused,
        amqps_recovers_after_close_all_connections,
        memory_alarm_is_raised_and_cleared,
        sigstop_freezes_the_node_and_sigcont_thaws_it,
        a_frozen_broker_is_left_by_the_publishing_connection_and_found_again,
        stop_app_closes_the_listeners_and_start_app_reopens_them,
        a_memory_alarm_does_not_stall_consuming,
        a_publish_blocked_by_an_alarm_is_unconfirmed_then_delivered_once,
        a_publish_while_the_broker_is_down_is_unreachable,
        poison_messages_are_set_aside_over_tls,
    ];
    let selected = cases::select("TCX_NODE_CASES", cases);

    let node = Arc::new(RabbitNode::start());
    eprintln!(
        "node {} (amqp {}, amqps {}) started in {:.1?}",
        node.name(),
        node.amqp_port(),
        node.amqps_port(),
        node.startup
    );
    let failed = cases::run(&node, selected, CASE_TIMEOUT, |_| {});
    let node = Arc::into_inner(node).expect("no case keeps the node");
    let stopped_in = node.stop();
    eprintln!("node stopped in {stopped_in:.1?}");
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

fn config(url: &str, connection_name: &str) -> AmqpConfig {
    AmqpConfig::from_url(url)
        .expect("node URL")
        .with_connection_name(connection_name)
        .with_connect_timeout(Duration::from_secs(10))
        .with_operation_timeout(Duration::from_secs(20))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(500))
}

fn tls_config(node: &RabbitNode, connection_name: &str) -> AmqpConfig {
    config(&node.amqps_url(), connection_name)
        .with_ca_certificate_pem(node.ca_pem())
        .expect("the node's CA certificate")
}

async fn connect(config: AmqpConfig) -> AmqpBroker {
    let endpoint = config.endpoint();
    AmqpBroker::connect(config)
        .await
        .unwrap_or_else(|error| panic!("connecting to the test node at {endpoint}: {error}"))
}

/// The connection error of connecting with `config`, which must fail.
async fn refusal(config: AmqpConfig) -> String {
    match AmqpBroker::connect(config).await {
        Ok(_) => panic!("the connection was accepted"),
        Err(BrokerError::Connection(message)) => {
            eprintln!("  refused as expected: {message}");
            message
        }
        Err(other) => panic!("expected a connection error, got {other:?}"),
    }
}

/// The node is a separate broker: a queue declared on it is not on the shared one.
async fn plain_amqp_reaches_the_own_node_only(node: Arc<RabbitNode>) {
    assert_ne!(node.amqp_port(), 5672);
    let broker = connect(config(&node.amqp_url(), "tcx-plain")).await;
    let queue = unique("node-only");
    broker
        .declare_queue(&queue, QueueOptions::default())
        .await
        .expect("declare queue");
    let listed = blocking(&node, |node| node.rabbitmqctl(&["list_queues", "name"]))
        .await
        .expect("list_queues on the test node");
    assert!(listed.lines().any(|line| line == queue), "{listed}");
    broker.delete_queue(&queue).await.expect("delete queue");
    broker.close().await;
}

async fn amqps_publishes_and_consumes_with_a_private_ca(node: Arc<RabbitNode>) {
    let connection_name = unique("tcx-tls");
    let config = tls_config(&node, &connection_name);
    assert_eq!(config.extra_ca_certificates(), 1);
    let broker = connect(config).await;
    let exchange = declare_transient_exchange(&broker, "node-exchange").await;
    let queue = bound_anonymous_queue(&broker, &exchange, "#").await;
    let mut stream = broker.consume(&queue, 5).await.expect("consume");
    for body in ["{\"n\":1}", "{\"n\":2}"] {
        broker
            .publish(&exchange, "some.key", json_message(body))
            .await
            .expect("confirmed publish over TLS");
    }
    assert_eq!(next_body(&mut stream).await, "{\"n\":1}");
    assert_eq!(next_body(&mut stream).await, "{\"n\":2}");
    // The server agrees that this connection is TLS.
    let connections = blocking(&node, |node| {
        node.list_connections(&["client_properties", "ssl", "ssl_protocol"])
    })
    .await;
    let ours: Vec<&String> = connections
        .iter()
        .filter(|line| line.contains(&connection_name))
        .collect();
    // Two connections: the main one and the publishing one.
    assert_eq!(ours.len(), 2, "{connections:?}");
    for line in ours {
        assert!(
            line.contains("\ttrue\t") && line.contains("tlsv1."),
            "not TLS: {line}"
        );
    }
    broker.close().await;
}

async fn a_server_certificate_from_an_unknown_ca_is_refused(node: Arc<RabbitNode>) {
    let endpoint = format!("amqps://127.0.0.1:{}/%2F", node.amqps_port());
    // Only the built-in webpki roots.
    let error = refusal(config(&node.amqps_url(), "tcx-no-ca")).await;
    assert!(error.contains(&endpoint), "names the endpoint: {error}");
    assert!(error.contains("UnknownIssuer"), "names the cause: {error}");
    // A private CA, but not the one that signed the server's certificate.
    let (other_ca, _) = certificate_authority("some other CA");
    let error = refusal(
        config(&node.amqps_url(), "tcx-other-ca")
            .with_ca_certificate_pem(&other_ca)
            .expect("CA PEM"),
    )
    .await;
    assert!(error.contains(&endpoint), "names the endpoint: {error}");
    assert!(error.contains("UnknownIssuer"), "names the cause: {error}");
}

async fn a_server_certificate_for_another_host_is_refused(node: Arc<RabbitNode>) {
    let url = node.amqps_url_with_unnamed_host();
    let error = refusal(
        config(&url, "tcx-wrong-host")
            .with_ca_certificate_pem(node.ca_pem())
            .expect("CA PEM"),
    )
    .await;
    let endpoint = format!("amqps://127.0.0.2:{}/%2F", node.amqps_port());
    assert!(error.contains(&endpoint), "names the endpoint: {error}");
    assert!(
        error.contains("not valid for name") && error.contains("127.0.0.2"),
        "names the cause: {error}"
    );
}

async fn amqps_recovers_after_close_all_connections(node: Arc<RabbitNode>) {
    let broker = connect(tls_config(&node, &unique("tcx-recovery"))).await;
    let exchange = declare_transient_exchange(&broker, "node-exchange").await;
    let queue = bound_anonymous_queue(&broker, &exchange, "#").await;
    broker
        .publish(&exchange, "before", json_message("{\"before\":true}"))
        .await
        .expect("publish before");
    blocking(&node, RabbitNode::close_all_connections).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.recoveries() < 1 || !broker.is_connected() {
        assert!(Instant::now() < deadline, "no recovery: {broker:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The exclusive queue died with the connection; recovery re-declared it
    // and its binding, over TLS again.
    let mut stream = broker
        .consume(&queue, 5)
        .await
        .expect("consume after recovery");
    broker
        .publish(&exchange, "after", json_message("{\"after\":true}"))
        .await
        .expect("publish after recovery");
    assert_eq!(next_body(&mut stream).await, "{\"after\":true}");
    broker.close().await;
}

/// Runs `f` (blocking: `rabbitmqctl`, signals) with the node, off the async workers.
async fn blocking<T: Send + 'static>(
    node: &Arc<RabbitNode>,
    f: impl FnOnce(&RabbitNode) -> T + Send + 'static,
) -> T {
    let node = node.clone();
    tokio::task::spawn_blocking(move || f(&node))
        .await
        .expect("blocking node task")
}

/// Smoke test of the switch later fault tests use.
async fn memory_alarm_is_raised_and_cleared(node: Arc<RabbitNode>) {
    assert!(!blocking(&node, RabbitNode::memory_alarm).await);
    blocking(&node, |node| node.set_memory_alarm(true)).await;
    assert!(
        blocking(&node, RabbitNode::memory_alarm).await,
        "alarm raised"
    );
    blocking(&node, |node| node.set_memory_alarm(false)).await;
    assert!(
        !blocking(&node, RabbitNode::memory_alarm).await,
        "alarm cleared"
    );
}

/// A frozen VM accepts TCP (the kernel does) but never answers AMQP.
async fn sigstop_freezes_the_node_and_sigcont_thaws_it(node: Arc<RabbitNode>) {
    let quick = |name: &str| {
        config(&node.amqp_url(), name).with_connect_timeout(Duration::from_millis(1500))
    };
    blocking(&node, RabbitNode::sigstop).await;
    let error = refusal(quick("tcx-frozen")).await;
    blocking(&node, RabbitNode::sigcont).await;
    assert!(error.contains("no answer within"), "{error}");
    connect(quick("tcx-thawed")).await.close().await;
}

/// A broker frozen mid-connection (SIGSTOP) answers nothing, heartbeats
/// included: the publishing connection leaves it after two heartbeat
/// intervals, a publish sent into the freeze fails within the operation
/// timeout instead of hanging, and publishing recovers once it thaws.
async fn a_frozen_broker_is_left_by_the_publishing_connection_and_found_again(
    node: Arc<RabbitNode>,
) {
    let config = config(&node.amqp_url(), "tcx-heartbeats")
        .with_heartbeat(Duration::from_secs(1))
        .with_connect_timeout(Duration::from_millis(1500))
        .with_operation_timeout(Duration::from_secs(4));
    let broker = connect(config).await;
    let queue = filled_queue(&broker, "frozen", 1).await;
    assert!(broker.publishing_node().is_some());

    blocking(&node, RabbitNode::sigstop).await;
    let started = std::time::Instant::now();
    let frozen = broker.publish("", &queue, json_message("{\"n\":1}")).await;
    let waited = started.elapsed();
    let left = broker.publishing_node().is_none();
    blocking(&node, RabbitNode::sigcont).await;
    match frozen {
        Err(BrokerError::Unconfirmed(attempt)) => eprintln!("  during the freeze: {attempt:?}"),
        other => panic!("a publish into a frozen broker must be unconfirmed, got {other:?}"),
    }
    assert!(
        waited < Duration::from_secs(8),
        "the publish waited {waited:?}"
    );
    assert!(
        left,
        "the publishing connection still counted the frozen broker as up"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match broker.publish("", &queue, json_message("{\"n\":2}")).await {
            Ok(()) => break,
            Err(error) if std::time::Instant::now() < deadline => {
                eprintln!("  not yet back: {error}");
            }
            Err(error) => panic!("publishing did not recover after the thaw: {error}"),
        }
    }
    assert!(
        broker.publisher_recoveries() >= 1,
        "the publishing connection was replaced"
    );
    let _ = broker.delete_queue(&queue).await;
    broker.close().await;
}

async fn stop_app_closes_the_listeners_and_start_app_reopens_them(node: Arc<RabbitNode>) {
    blocking(&node, RabbitNode::stop_app).await;
    assert!(!node.listening(), "AMQP still listens after stop_app");
    blocking(&node, RabbitNode::start_app).await;
    connect(config(&node.amqp_url(), "tcx-restarted"))
        .await
        .close()
        .await;
}

/// A durable queue of `count` persistent messages, published through `broker`.
async fn filled_queue(broker: &AmqpBroker, prefix: &str, count: usize) -> String {
    let queue = unique(prefix);
    let durable = QueueOptions {
        durable: true,
        ..QueueOptions::default()
    };
    broker
        .declare_queue(&queue, durable)
        .await
        .expect("declare");
    for n in 0..count {
        broker
            .publish("", &queue, json_message(&format!("{{\"n\":{n}}}")))
            .await
            .expect("publish before the alarm");
    }
    queue
}

/// During a memory alarm RabbitMQ blocks a connection once it publishes, and
/// a blocked connection sends nothing, acks included. One broker handle both
/// publishing and consuming must still consume: publishes have a connection
/// of their own. (Before: 20 messages handled in 20 s.)
async fn a_memory_alarm_does_not_stall_consuming(node: Arc<RabbitNode>) {
    let name = unique("tcx-alarm");
    let broker = connect(config(&node.amqp_url(), &name)).await;
    let queue = filled_queue(&broker, "alarm-queue", 300).await;
    blocking(&node, |node| node.set_memory_alarm(true)).await;
    // A publish during the alarm gets the publishing connection blocked.
    let blocked = {
        let (broker, queue) = (broker.clone(), queue.clone());
        tokio::spawn(async move {
            broker
                .publish("", &queue, json_message("{\"late\":true}"))
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !blocking(&node, {
        let watched = name.clone();
        move |node| {
            node.list_connections(&["client_properties", "state"])
                .iter()
                .any(|line| line.contains(&watched) && line.ends_with("\tblocked"))
        }
    })
    .await
    {
        assert!(
            Instant::now() < deadline,
            "the publishing connection was never blocked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = broker.consume(&queue, 10).await.expect("consume");
    let started = Instant::now();
    for handled in 0..300 {
        let delivery = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap_or_else(|_| panic!("consuming stalled after {handled} messages"))
            .expect("stream open")
            .expect("delivery");
        delivery.ack().await.expect("ack during the alarm");
    }
    eprintln!(
        "  300 consumed and acked during the alarm in {:.1?}",
        started.elapsed()
    );
    assert!(
        !blocked.is_finished(),
        "the publish went through during the alarm"
    );
    blocking(&node, |node| node.set_memory_alarm(false)).await;
    blocked
        .await
        .expect("publish task")
        .expect("the blocked publish is confirmed once the alarm clears");
    drop(stream);
    broker.delete_queue(&queue).await.expect("delete");
    broker.close().await;
}

/// A publish the alarm holds up says "sent but not confirmed, may be
/// delivered" and names the block; retrying it sends no second copy; once
/// the alarm clears it is delivered exactly once, under its message id.
async fn a_publish_blocked_by_an_alarm_is_unconfirmed_then_delivered_once(node: Arc<RabbitNode>) {
    let broker = connect(
        config(&node.amqp_url(), &unique("tcx-unconfirmed"))
            .with_operation_timeout(Duration::from_secs(2)),
    )
    .await;
    let queue = filled_queue(&broker, "unconfirmed-queue", 0).await;
    blocking(&node, |node| node.set_memory_alarm(true)).await;
    let message = exchange_runtime::broker::OutgoingMessage {
        message_id: Some("job-42".to_owned()),
        ..json_message("{\"once\":true}")
    };
    for attempt in 0..3 {
        match broker.publish("", &queue, message.clone()).await {
            Err(BrokerError::Unconfirmed(publish)) => {
                assert_eq!(publish.message_id, "job-42");
                assert!(
                    publish.reason.contains("blocked"),
                    "attempt {attempt}: {}",
                    publish.reason
                );
            }
            other => panic!("attempt {attempt}: expected Unconfirmed, got {other:?}"),
        }
    }
    blocking(&node, |node| node.set_memory_alarm(false)).await;
    broker
        .publish("", &queue, message.clone())
        .await
        .expect("confirmed once the alarm clears");
    let mut stream = broker.consume(&queue, 10).await.expect("consume");
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the message is delivered")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(first.message_id.as_deref(), Some("job-42"));
    first.ack().await.expect("ack");
    let again = tokio::time::timeout(Duration::from_millis(700), stream.next()).await;
    assert!(again.is_err(), "a second copy was delivered: {again:?}");
    drop(stream);
    broker.delete_queue(&queue).await.expect("delete");
    broker.close().await;
}

/// With the broker down, a publish says it was never sent and for how long
/// the broker was unreachable — not "no confirmation".
async fn a_publish_while_the_broker_is_down_is_unreachable(node: Arc<RabbitNode>) {
    let broker = connect(
        config(&node.amqp_url(), &unique("tcx-unreachable"))
            .with_operation_timeout(Duration::from_secs(2)),
    )
    .await;
    blocking(&node, RabbitNode::stop_app).await;
    let result = broker.publish("", "any-queue", json_message("{}")).await;
    blocking(&node, RabbitNode::start_app).await;
    match result {
        Err(BrokerError::Unreachable(publish)) => {
            assert!(publish.waited >= Duration::from_millis(1500), "{publish:?}");
            let text = BrokerError::Unreachable(publish).to_string();
            assert!(
                text.contains("not sent, the broker was unreachable for"),
                "{text}"
            );
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    broker.close().await;
}

/// Over TLS with the private CA too, a poison message is read and its copy
/// set aside over the publishing connection.
async fn poison_messages_are_set_aside_over_tls(node: Arc<RabbitNode>) {
    use exchange_runtime::broker::amqp::PoisonEvent;
    use exchange_runtime::broker::amqp::raw::{POISON_REASON_HEADER, RawConnection, RawMessage};
    let config = tls_config(&node, &unique("tcx-poison-tls"));
    let broker = connect(config.clone()).await;
    let mut events = broker.poison_events();
    let queue = filled_queue(&broker, "poison-tls", 0).await;
    let dead = format!("{queue}.dead");
    let mut raw = RawConnection::connect(&config)
        .await
        .expect("raw TLS connection");
    let mut poison = RawMessage {
        routing_key: queue.clone().into_bytes(),
        body: b"poison".to_vec(),
        ..RawMessage::default()
    };
    poison
        .properties
        .insert("message-id".into(), vec![0xff, 0xfe]);
    raw.publish(&poison).await.expect("raw publish");
    let valid = RawMessage {
        body: b"valid".to_vec(),
        ..poison.clone()
    };
    let valid = RawMessage {
        properties: Default::default(),
        ..valid
    };
    raw.publish(&valid).await.expect("raw publish");
    raw.close().await;
    let mut stream = broker.consume(&queue, 5).await.expect("consume");
    let delivery = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("the valid message is handled")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(delivery.body, b"valid");
    delivery.ack().await.expect("ack");
    drop(stream);
    let event = tokio::time::timeout(Duration::from_secs(15), events.recv())
        .await
        .expect("the poison is reported")
        .expect("an event");
    assert!(
        matches!(&event, PoisonEvent::SetAside { destination, .. } if destination.contains(&dead)),
        "{event:?}"
    );
    let dead_lettered = broker.get(&dead).await.expect("get").expect("the poison");
    assert!(
        dead_lettered
            .headers
            .get(POISON_REASON_HEADER)
            .is_some_and(|r| r.starts_with("message-id")),
        "{dead_lettered:?}"
    );
    dead_lettered.ack().await.expect("ack");
    broker.delete_queue(&queue).await.expect("delete");
    broker.delete_queue(&dead).await.expect("delete");
    broker.close().await;
}
