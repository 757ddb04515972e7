//! The broker conformance suite: behaviour every [`Broker`] must share, so
//! code tested against the embedded broker behaves the same on RabbitMQ.
//!
//! # Use
//! Each behaviour is a `pub async fn <behaviour><B: Broker>(broker: &B)` that
//! panics on a violation. A broker's test file runs them all with the macro:
//!
//! ```ignore
//! mod suite;
//!
//! async fn broker() -> MyBroker { /* connect */ }
//! async fn another_connection(broker: &MyBroker) -> MyBroker { /* connect again */ }
//!
//! suite::conformance_tests!(broker, another_connection);
//! ```
//!
//! which expands to one `#[tokio::test]` per behaviour, each calling
//! `broker().await` for its own broker handle. Behaviours that need a second
//! connection to the same broker take it as a second argument, from
//! `another_connection(&broker).await`.
//!
//! Every test declares exchanges and queues with unique names (process id,
//! time and a counter), so the suite can run in parallel against one shared
//! RabbitMQ; each deletes its queues when it passes. Named queues go through
//! [`Broker::qualify_queue_name`].
//!
//! Listing ([`Broker::pending`]) may mark the listed messages redelivered
//! (RabbitMQ can only peek by taking and requeueing), so the suite checks
//! `redelivered == false` only on messages never listed.
//!
//! Timing: "eventually" means within [`EVENTUALLY`] (generous, so a loaded
//! machine does not fail a test); "nothing arrives" is checked over
//! [`QUIET`]; delays are checked from below by measuring, never by racing.
#![allow(dead_code)] // Each test binary uses the suite through the macro only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use exchange_runtime::broker::{
    Broker, BrokerError, DEFAULT_EXCHANGE, Delivery, DeliveryStream, ExchangeOptions, MAX_DELAY,
    OutgoingMessage, QueueOptions, QueueType,
};

/// How long something that should happen may take.
pub const EVENTUALLY: Duration = Duration::from_secs(5);
/// How long to watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// Expands to one `#[tokio::test]` per conformance behaviour, each running it
/// against a broker from `$make_broker().await`.
macro_rules! conformance_tests {
    ($make_broker:path, $connect_again:path) => {
        $crate::suite::conformance_tests!(@pairs $make_broker, $connect_again;
            full_queue_is_named_across_connections,
        );
        $crate::suite::conformance_tests!(@owned_pairs $make_broker, $connect_again;
            dropping_every_handle_closes_the_connection_and_its_exclusive_queues,
        );
        $crate::suite::conformance_tests!(@each $make_broker;
            topic_routing_follows_rabbitmq,
            default_exchange_routes_by_queue_name,
            unroutable_message_is_dropped,
            cc_keys_route_each_queue_once,
            delivery_carries_message_properties,
            publish_to_missing_exchange_fails,
            reserved_headers_are_refused,
            declarations_check_existence_and_options,
            server_named_queues_are_unique_and_auto_delete,
            binding_needs_exchange_and_queue,
            missing_queue_operations_fail,
            prefetch_limits_unacknowledged_deliveries,
            acks_after_an_unsettled_delivery_free_the_window,
            nack_with_requeue_redelivers_in_place,
            nack_without_requeue_dead_letters,
            expired_messages_are_dead_lettered,
            delayed_publish_is_not_visible_early,
            delayed_publish_past_the_limit_is_clamped,
            delayed_publish_keeps_its_cc_keys_and_routes_by_them_nowhere,
            get_and_pending,
            cancelled_consumer_requeues_its_deliveries,
            dropped_delivery_is_requeued,
            settling_twice_fails,
            consumers_share_a_queue_in_turn,
            auto_delete_queue_goes_with_its_last_consumer,
            full_queue_rejects_publish,
            full_queue_does_not_stop_other_queues,
            deleted_queue_loses_messages_and_bindings,
            deleted_queue_ends_its_consumers,
            ttl_zero_reaches_a_waiting_consumer,
            exclusive_queue_durability_is_not_compared,
            default_and_amq_exchanges_follow_rabbitmq,
            settling_after_the_queue_is_gone_succeeds,
            settling_consumed_deliveries_after_the_queue_is_gone_succeeds,
            requeued_message_goes_to_the_consumer_in_turn,
            consumers_at_their_limit_rejoin_at_the_back,
            long_fields_are_refused_in_order,
            delays_are_never_early_but_may_reorder,
            delayed_put_goes_to_its_queue_only,
            dead_lettered_put_keeps_to_its_queue,
            quorum_delivery_limit_dead_letters_what_keeps_coming_back,
            quorum_queue_requeues_nacked_messages_at_the_back,
        );
    };
    (@pairs $make_broker:path, $connect_again:path; $($behaviour:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $behaviour() {
                let broker = $make_broker().await;
                let other = $connect_again(&broker).await;
                $crate::suite::$behaviour(&broker, &other).await;
            }
        )*
    };
    (@owned_pairs $make_broker:path, $connect_again:path; $($behaviour:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $behaviour() {
                let broker = $make_broker().await;
                let other = $connect_again(&broker).await;
                $crate::suite::$behaviour(broker, other).await;
            }
        )*
    };
    (@each $make_broker:path; $($behaviour:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $behaviour() {
                let broker = $make_broker().await;
                $crate::suite::$behaviour(&broker).await;
            }
        )*
    };
}
pub(crate) use conformance_tests;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A name no other test, process or earlier run uses.
pub fn unique(what: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!(
        "conformance-{what}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A message whose body and id are `body`.
pub fn message(body: &str) -> OutgoingMessage {
    OutgoingMessage {
        body: body.as_bytes().to_vec(),
        message_id: Some(body.to_owned()),
        ..OutgoingMessage::default()
    }
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.body).into_owned()
}

async fn new_exchange<B: Broker>(broker: &B, what: &str) -> String {
    let name = unique(what);
    broker
        .declare_exchange(&name, ExchangeOptions::default())
        .await
        .unwrap_or_else(|error| panic!("declaring exchange `{name}`: {error}"));
    name
}

async fn new_queue<B: Broker>(broker: &B, what: &str, options: QueueOptions) -> String {
    let name = broker.qualify_queue_name(&unique(what));
    let declared = broker
        .declare_queue(&name, options)
        .await
        .unwrap_or_else(|error| panic!("declaring queue `{name}`: {error}"));
    assert_eq!(declared, name, "a named queue keeps its name");
    name
}

async fn bind<B: Broker>(broker: &B, queue: &str, exchange: &str, pattern: &str) {
    broker
        .bind_queue(queue, exchange, pattern)
        .await
        .unwrap_or_else(|error| {
            panic!("binding `{queue}` to `{exchange}` with `{pattern}`: {error}")
        });
}

async fn publish<B: Broker>(broker: &B, exchange: &str, key: &str, message: OutgoingMessage) {
    broker
        .publish(exchange, key, message)
        .await
        .unwrap_or_else(|error| panic!("publishing to `{exchange}` with key `{key}`: {error}"));
}

/// Publishes `body` straight to `queue` through the default exchange.
async fn send<B: Broker>(broker: &B, queue: &str, body: &str) {
    publish(broker, DEFAULT_EXCHANGE, queue, message(body)).await;
}

async fn pending_bodies<B: Broker>(broker: &B, queue: &str) -> Vec<String> {
    broker
        .pending(queue)
        .await
        .unwrap_or_else(|error| panic!("listing queue `{queue}`: {error}"))
        .into_iter()
        .map(|pending| String::from_utf8_lossy(&pending.body).into_owned())
        .collect()
}

/// Waits until the ready messages of `queue` are `expected` (in order).
async fn assert_pending<B: Broker>(broker: &B, queue: &str, expected: &[&str]) {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let found = pending_bodies(broker, queue).await;
        if found == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queue `{queue}` holds {found:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn consume<B: Broker>(broker: &B, queue: &str, prefetch: u16) -> DeliveryStream {
    broker
        .consume(queue, prefetch)
        .await
        .unwrap_or_else(|error| panic!("consuming `{queue}`: {error}"))
}

async fn next_delivery(stream: &mut DeliveryStream, what: &str) -> Delivery {
    match tokio::time::timeout(EVENTUALLY, stream.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(error))) => panic!("{what}: the consumer failed: {error}"),
        Ok(None) => panic!("{what}: the consumer ended"),
        Err(_) => panic!("{what}: nothing delivered within {EVENTUALLY:?}"),
    }
}

async fn assert_quiet(stream: &mut DeliveryStream, what: &str) {
    if let Ok(item) = tokio::time::timeout(QUIET, stream.next()).await {
        panic!("{what}: expected no delivery, got {item:?}");
    }
}

async fn get<B: Broker>(broker: &B, queue: &str) -> Option<Delivery> {
    broker
        .get(queue)
        .await
        .unwrap_or_else(|error| panic!("getting from `{queue}`: {error}"))
}

/// `get`, retried until a message is there.
async fn get_eventually<B: Broker>(broker: &B, queue: &str) -> Delivery {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        if let Some(delivery) = get(broker, queue).await {
            return delivery;
        }
        assert!(Instant::now() < deadline, "queue `{queue}` stayed empty");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `queue` no longer exists.
async fn assert_queue_goes<B: Broker>(broker: &B, queue: &str) {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        match broker.pending(queue).await {
            Err(BrokerError::QueueNotFound(name)) => {
                assert_eq!(name, queue);
                return;
            }
            Err(error) => panic!("checking for queue `{queue}`: {error}"),
            Ok(_) => assert!(
                Instant::now() < deadline,
                "queue `{queue}` outlived its consumers"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ack(delivery: Delivery) {
    let what = format!("acknowledging `{}`", body(&delivery));
    delivery
        .ack()
        .await
        .unwrap_or_else(|error| panic!("{what}: {error}"));
}

async fn delete_queues<B: Broker>(broker: &B, queues: &[&str]) {
    for queue in queues {
        broker
            .delete_queue(queue)
            .await
            .unwrap_or_else(|error| panic!("deleting queue `{queue}`: {error}"));
    }
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

/// Topic matching: `*` is one word, `#` zero or more, wildcards only as whole
/// words, `a..b` has an empty middle word, and `""` has no words at all.
pub async fn topic_routing_follows_rabbitmq<B: Broker>(broker: &B) {
    const KEYS: [&str; 9] = [
        "a.b.c", "a.b", "", "a..b", ".", "a.", "oneword", "b.c", "a*.b",
    ];
    let cases: [(&str, &[&str]); 13] = [
        ("a.b.c", &["a.b.c"]),
        ("a.*.c", &["a.b.c"]),
        ("a.#.b", &["a.b", "a..b"]),
        ("#", &KEYS),
        ("*", &["oneword"]),
        ("a.#", &["a.b.c", "a.b", "a..b", "a."]),
        ("#.b.#", &["a.b.c", "a.b", "a..b", "b.c", "a*.b"]),
        ("", &[""]),
        ("*.*", &["a.b", ".", "a.", "b.c", "a*.b"]),
        ("a..b", &["a..b"]),
        ("a*.#", &["a*.b"]),
        (
            "*.#",
            &["a.b.c", "a.b", "a..b", ".", "a.", "oneword", "b.c", "a*.b"],
        ),
        ("#.#.#", &KEYS),
    ];
    let exchange = new_exchange(broker, "topic").await;
    let mut queues = Vec::new();
    for (pattern, _) in cases {
        let queue = new_queue(broker, "topic", QueueOptions::default()).await;
        bind(broker, &queue, &exchange, pattern).await;
        queues.push(queue);
    }
    for key in KEYS {
        publish(broker, &exchange, key, message(key)).await;
    }
    for ((pattern, expected), queue) in cases.iter().zip(&queues) {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let found = pending_bodies(broker, queue).await;
            if found == *expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pattern `{pattern}` got keys {found:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    delete_queues(broker, &names).await;
}

pub async fn default_exchange_routes_by_queue_name<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "default", QueueOptions::default()).await;
    send(broker, &queue, "direct").await;
    // A key naming no queue is a mistake, reported.
    let nobody = broker.qualify_queue_name(&unique("nobody"));
    let error = broker
        .publish(DEFAULT_EXCHANGE, &nobody, message("lost"))
        .await
        .expect_err("publishing straight to a missing queue must fail");
    assert!(
        matches!(&error, BrokerError::QueueNotFound(name) if *name == nobody),
        "{error:?}"
    );
    assert_pending(broker, &queue, &["direct"]).await;
    let delivery = get_eventually(broker, &queue).await;
    assert_eq!(delivery.exchange, DEFAULT_EXCHANGE);
    assert_eq!(delivery.routing_key, queue);
    ack(delivery).await;
    delete_queues(broker, &[&queue]).await;
}

pub async fn unroutable_message_is_dropped<B: Broker>(broker: &B) {
    let exchange = new_exchange(broker, "unroutable").await;
    let queue = new_queue(broker, "unroutable", QueueOptions::default()).await;
    bind(broker, &queue, &exchange, "wanted.*").await;
    publish(broker, &exchange, "unwanted.key", message("lost")).await;
    publish(broker, &exchange, "wanted.key", message("kept")).await;
    assert_pending(broker, &queue, &["kept"]).await;
    delete_queues(broker, &[&queue]).await;
}

/// A message is routed by its key and each CC key, and a queue matched by
/// several of them (or by overlapping patterns) gets it once.
pub async fn cc_keys_route_each_queue_once<B: Broker>(broker: &B) {
    let exchange = new_exchange(broker, "cc").await;
    let both = new_queue(broker, "cc-both", QueueOptions::default()).await;
    let cc_only = new_queue(broker, "cc-only", QueueOptions::default()).await;
    let neither = new_queue(broker, "cc-neither", QueueOptions::default()).await;
    let everything = new_queue(broker, "cc-all", QueueOptions::default()).await;
    bind(broker, &both, &exchange, "key.one").await;
    bind(broker, &both, &exchange, "key.two").await;
    bind(broker, &both, &exchange, "#.one").await;
    bind(broker, &cc_only, &exchange, "key.three").await;
    bind(broker, &neither, &exchange, "key.four").await;
    bind(broker, &everything, &exchange, "key.#").await;

    let mut with_cc = message("with-cc");
    with_cc.cc = vec!["key.two".to_owned(), "key.three".to_owned()];
    publish(broker, &exchange, "key.one", with_cc).await;
    publish(broker, &exchange, "key.one", message("plain")).await;

    assert_pending(broker, &both, &["with-cc", "plain"]).await;
    assert_pending(broker, &cc_only, &["with-cc"]).await;
    assert_pending(broker, &everything, &["with-cc", "plain"]).await;
    assert_pending(broker, &neither, &[]).await;

    let delivery = get_eventually(broker, &cc_only).await;
    assert_eq!(
        delivery.routing_key, "key.one",
        "delivered with its own key"
    );
    assert_eq!(delivery.cc, ["key.two", "key.three"]);
    ack(delivery).await;
    delete_queues(broker, &[&both, &cc_only, &neither, &everything]).await;
}

pub async fn delivery_carries_message_properties<B: Broker>(broker: &B) {
    let exchange = new_exchange(broker, "props").await;
    let queue = new_queue(broker, "props", QueueOptions::default()).await;
    bind(broker, &queue, &exchange, "props.#").await;
    let sent = OutgoingMessage {
        body: br#"{"hello":"world"}"#.to_vec(),
        content_type: Some("application/json".to_owned()),
        message_id: Some("job-42".to_owned()),
        persistent: true,
        headers: BTreeMap::from([
            ("attempt".to_owned(), "3".to_owned()),
            ("origin".to_owned(), "suite".to_owned()),
        ]),
        cc: vec!["route.elsewhere".to_owned()],
    };
    publish(broker, &exchange, "props.key", sent.clone()).await;
    let mut stream = consume(broker, &queue, 1).await;
    let delivery = next_delivery(&mut stream, "the published message").await;
    assert_eq!(delivery.exchange, exchange);
    assert_eq!(delivery.routing_key, "props.key");
    assert_eq!(delivery.body, sent.body);
    assert_eq!(delivery.content_type, sent.content_type);
    assert_eq!(delivery.message_id, sent.message_id);
    assert_eq!(delivery.headers, sent.headers);
    assert_eq!(delivery.cc, sent.cc);
    assert!(!delivery.redelivered);
    ack(delivery).await;
    drop(stream);
    delete_queues(broker, &[&queue]).await;
}

pub async fn publish_to_missing_exchange_fails<B: Broker>(broker: &B) {
    let missing = unique("missing");
    let error = broker
        .publish(&missing, "any.key", message("lost"))
        .await
        .expect_err("publishing to a missing exchange must fail");
    assert!(
        matches!(&error, BrokerError::ExchangeNotFound(name) if *name == missing),
        "{error:?}"
    );
}

/// `x-` headers belong to the broker (RabbitMQ 3.13+ drops client-set ones)
/// and `CC`/`BCC` come from `OutgoingMessage::cc`: both brokers refuse them
/// rather than let an attempt counter silently reset, and queue nothing.
pub async fn reserved_headers_are_refused<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "reserved", QueueOptions::default()).await;
    for name in ["x-attempts", "CC", "BCC"] {
        let mut reserved = message("reserved");
        reserved.headers.insert(name.to_owned(), "1".to_owned());
        let error = broker
            .publish(DEFAULT_EXCHANGE, &queue, reserved.clone())
            .await
            .expect_err("a reserved header must be refused");
        assert!(
            matches!(&error, BrokerError::Invalid(text) if text.contains(name)),
            "{name}: {error:?}"
        );
        let error = broker
            .publish_delayed(&queue, reserved, Duration::ZERO)
            .await
            .expect_err("a reserved header must be refused when put directly");
        assert!(
            matches!(&error, BrokerError::Invalid(_)),
            "{name}: {error:?}"
        );
    }
    assert_pending(broker, &queue, &[]).await;
    delete_queues(broker, &[&queue]).await;
}

// ---------------------------------------------------------------------------
// Declarations
// ---------------------------------------------------------------------------

pub async fn declarations_check_existence_and_options<B: Broker>(broker: &B) {
    let name = unique("declared");
    let passive = ExchangeOptions {
        passive: true,
        durable: false,
    };
    let error = broker
        .declare_exchange(&name, passive)
        .await
        .expect_err("a passive declaration of a missing exchange must fail");
    assert!(
        matches!(&error, BrokerError::ExchangeNotFound(missing) if *missing == name),
        "{error:?}"
    );
    broker
        .declare_exchange(&name, ExchangeOptions::default())
        .await
        .expect("declaring the exchange");
    broker
        .declare_exchange(&name, ExchangeOptions::default())
        .await
        .expect("redeclaring the exchange alike");
    broker
        .declare_exchange(&name, passive)
        .await
        .expect("a passive declaration of an existing exchange");
    let durable = ExchangeOptions {
        passive: false,
        durable: true,
    };
    let error = broker
        .declare_exchange(&name, durable)
        .await
        .expect_err("redeclaring with other options must fail");
    assert!(matches!(error, BrokerError::Conflict { .. }), "{error:?}");

    let bounded = QueueOptions {
        max_length: Some(10),
        ..QueueOptions::default()
    };
    let queue = new_queue(broker, "declared", bounded.clone()).await;
    let again = broker
        .declare_queue(&queue, bounded)
        .await
        .expect("redeclaring a queue alike");
    assert_eq!(again, queue);
    let other = QueueOptions {
        max_length: Some(20),
        ..QueueOptions::default()
    };
    let error = broker
        .declare_queue(&queue, other)
        .await
        .expect_err("redeclaring a queue with other options must fail");
    assert!(matches!(error, BrokerError::Conflict { .. }), "{error:?}");
    delete_queues(broker, &[&queue]).await;
}

pub async fn server_named_queues_are_unique_and_auto_delete<B: Broker>(broker: &B) {
    let first = broker
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declaring a server-named queue");
    let second = broker
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declaring a second server-named queue");
    assert!(!first.is_empty());
    assert_ne!(first, second);
    send(broker, &first, "to-first").await;
    assert_pending(broker, &first, &["to-first"]).await;
    assert_pending(broker, &second, &[]).await;
    delete_queues(broker, &[&second]).await;
    // Unnamed queues are auto-delete: gone with their last consumer.
    drop(consume(broker, &first, 1).await);
    assert_queue_goes(broker, &first).await;
}

pub async fn binding_needs_exchange_and_queue<B: Broker>(broker: &B) {
    let exchange = new_exchange(broker, "bind").await;
    let queue = new_queue(broker, "bind", QueueOptions::default()).await;
    let missing_exchange = unique("missing");
    let error = broker
        .bind_queue(&queue, &missing_exchange, "#")
        .await
        .expect_err("binding to a missing exchange must fail");
    assert!(
        matches!(&error, BrokerError::ExchangeNotFound(name) if *name == missing_exchange),
        "{error:?}"
    );
    let missing_queue = broker.qualify_queue_name(&unique("missing"));
    let error = broker
        .bind_queue(&missing_queue, &exchange, "#")
        .await
        .expect_err("binding a missing queue must fail");
    assert!(
        matches!(&error, BrokerError::QueueNotFound(name) if *name == missing_queue),
        "{error:?}"
    );
    // Binding twice is harmless: still one copy per message.
    bind(broker, &queue, &exchange, "twice").await;
    bind(broker, &queue, &exchange, "twice").await;
    publish(broker, &exchange, "twice", message("once")).await;
    assert_pending(broker, &queue, &["once"]).await;
    delete_queues(broker, &[&queue]).await;
}

pub async fn missing_queue_operations_fail<B: Broker>(broker: &B) {
    let missing = broker.qualify_queue_name(&unique("missing"));
    let is_missing =
        |error: &BrokerError| matches!(error, BrokerError::QueueNotFound(name) if *name == missing);
    match broker.consume(&missing, 1).await {
        Err(error) => assert!(is_missing(&error), "consume: {error:?}"),
        Ok(_) => panic!("consuming a missing queue must fail"),
    }
    let error = broker.get(&missing).await.expect_err("get");
    assert!(is_missing(&error), "get: {error:?}");
    let error = broker.pending(&missing).await.expect_err("pending");
    assert!(is_missing(&error), "pending: {error:?}");
}

// ---------------------------------------------------------------------------
// Consuming and settling
// ---------------------------------------------------------------------------

pub async fn prefetch_limits_unacknowledged_deliveries<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "prefetch", QueueOptions::default()).await;
    for n in 0..5 {
        send(broker, &queue, &format!("m{n}")).await;
    }
    let mut stream = consume(broker, &queue, 2).await;
    let m0 = next_delivery(&mut stream, "m0").await;
    let m1 = next_delivery(&mut stream, "m1").await;
    assert_eq!((body(&m0), body(&m1)), ("m0".to_owned(), "m1".to_owned()));
    assert_quiet(&mut stream, "two unacknowledged with prefetch 2").await;
    ack(m0).await;
    let m2 = next_delivery(&mut stream, "m2 after one ack").await;
    assert_eq!(body(&m2), "m2");
    assert_quiet(&mut stream, "two unacknowledged again").await;
    ack(m1).await;
    ack(m2).await;
    let m3 = next_delivery(&mut stream, "m3").await;
    let m4 = next_delivery(&mut stream, "m4").await;
    assert_eq!((body(&m3), body(&m4)), ("m3".to_owned(), "m4".to_owned()));
    ack(m3).await;
    ack(m4).await;
    drop(stream);
    assert_pending(broker, &queue, &[]).await;
    delete_queues(broker, &[&queue]).await;
}

/// A delivery still being handled does not hold back the acks of later ones:
/// they free the prefetch window at once (the RabbitMQ broker sends acks in
/// batches, never waiting for a run of tags to complete).
pub async fn acks_after_an_unsettled_delivery_free_the_window<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "ack-window", QueueOptions::default()).await;
    for n in 0..6 {
        send(broker, &queue, &format!("m{n}")).await;
    }
    let mut stream = consume(broker, &queue, 3).await;
    let m0 = next_delivery(&mut stream, "m0").await;
    let m1 = next_delivery(&mut stream, "m1").await;
    let m2 = next_delivery(&mut stream, "m2").await;
    assert_quiet(&mut stream, "three unacknowledged with prefetch 3").await;
    ack(m2).await;
    ack(m1).await;
    let m3 = next_delivery(&mut stream, "m3 while m0 is unsettled").await;
    let m4 = next_delivery(&mut stream, "m4 while m0 is unsettled").await;
    assert_eq!((body(&m3), body(&m4)), ("m3".to_owned(), "m4".to_owned()));
    assert_quiet(&mut stream, "m0, m3 and m4 unacknowledged").await;
    // A nack before later acks: requeued in place, the acks still count.
    m0.nack(true).await.expect("requeue m0");
    ack(m4).await;
    ack(m3).await;
    // RabbitMQ may hand out m5 (freed by the acks) before the requeued m0: no order asserted.
    let mut last = [
        next_delivery(&mut stream, "m0 again, or m5").await,
        next_delivery(&mut stream, "m5, or m0 again").await,
    ];
    last.sort_by_key(body);
    let [again, m5] = last;
    assert_eq!(
        (body(&again), body(&m5)),
        ("m0".to_owned(), "m5".to_owned())
    );
    assert!(again.redelivered);
    ack(again).await;
    ack(m5).await;
    drop(stream);
    assert_pending(broker, &queue, &[]).await;
    delete_queues(broker, &[&queue]).await;
}

pub async fn nack_with_requeue_redelivers_in_place<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "requeue", QueueOptions::default()).await;
    send(broker, &queue, "first").await;
    send(broker, &queue, "second").await;
    let mut stream = consume(broker, &queue, 1).await;
    let first = next_delivery(&mut stream, "first").await;
    assert_eq!(body(&first), "first");
    assert!(!first.redelivered);
    first.nack(true).await.expect("nack with requeue");
    let again = next_delivery(&mut stream, "first, redelivered").await;
    assert_eq!(body(&again), "first", "a requeued message keeps its place");
    assert!(again.redelivered);
    ack(again).await;
    let second = next_delivery(&mut stream, "second").await;
    assert_eq!(body(&second), "second");
    assert!(!second.redelivered);
    ack(second).await;
    drop(stream);
    delete_queues(broker, &[&queue]).await;
}

/// A rejected message goes to the dead-letter exchange, with the dead-letter
/// routing key when the queue has one, else with its own; without a
/// dead-letter exchange it is gone.
pub async fn nack_without_requeue_dead_letters<B: Broker>(broker: &B) {
    let dead_letters = new_exchange(broker, "dlx").await;
    let by_new_key = new_queue(broker, "dl-new-key", QueueOptions::default()).await;
    let by_old_key = new_queue(broker, "dl-old-key", QueueOptions::default()).await;
    bind(broker, &by_new_key, &dead_letters, "dead.#").await;
    bind(broker, &by_old_key, &dead_letters, "original.#").await;

    let with_key = new_queue(
        broker,
        "dl-source-key",
        QueueOptions {
            dead_letter_exchange: Some(dead_letters.clone()),
            dead_letter_routing_key: Some("dead.letter".to_owned()),
            ..QueueOptions::default()
        },
    )
    .await;
    let without_key = new_queue(
        broker,
        "dl-source",
        QueueOptions {
            dead_letter_exchange: Some(dead_letters.clone()),
            ..QueueOptions::default()
        },
    )
    .await;
    let no_dlx = new_queue(broker, "dl-none", QueueOptions::default()).await;
    let source = new_exchange(broker, "dl-source").await;
    bind(broker, &without_key, &source, "original.key").await;

    send(broker, &with_key, "rejected-1").await;
    publish(broker, &source, "original.key", message("rejected-2")).await;
    send(broker, &no_dlx, "rejected-3").await;
    for queue in [&with_key, &without_key, &no_dlx] {
        let delivery = get_eventually(broker, queue).await;
        delivery.nack(false).await.expect("nack without requeue");
    }

    let dead = get_eventually(broker, &by_new_key).await;
    assert_eq!(body(&dead), "rejected-1");
    assert_eq!(dead.exchange, dead_letters);
    assert_eq!(dead.routing_key, "dead.letter");
    ack(dead).await;
    let dead = get_eventually(broker, &by_old_key).await;
    assert_eq!(body(&dead), "rejected-2");
    assert_eq!(dead.exchange, dead_letters);
    assert_eq!(dead.routing_key, "original.key");
    ack(dead).await;
    for queue in [&with_key, &without_key, &no_dlx] {
        assert_pending(broker, queue, &[]).await;
    }
    assert!(get(broker, &no_dlx).await.is_none());
    delete_queues(
        broker,
        &[&by_new_key, &by_old_key, &with_key, &without_key, &no_dlx],
    )
    .await;
}

/// A message left in a queue past its TTL is dead-lettered on time, though
/// nobody consumes the queue (the retry-tier pattern: wait, then back to work).
pub async fn expired_messages_are_dead_lettered<B: Broker>(broker: &B) {
    let ttl = Duration::from_millis(200);
    let work = new_queue(broker, "ttl-work", QueueOptions::default()).await;
    let retry = new_queue(
        broker,
        "ttl-retry",
        QueueOptions {
            message_ttl: Some(ttl),
            dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
            dead_letter_routing_key: Some(work.clone()),
            ..QueueOptions::default()
        },
    )
    .await;
    let mut stream = consume(broker, &work, 1).await;
    let start = Instant::now();
    send(broker, &retry, "retried").await;
    let delivery = next_delivery(&mut stream, "the expired message").await;
    assert!(
        start.elapsed() >= ttl,
        "expired after {:?}",
        start.elapsed()
    );
    assert_eq!(body(&delivery), "retried");
    assert_eq!(delivery.exchange, DEFAULT_EXCHANGE);
    assert_eq!(delivery.routing_key, work);
    ack(delivery).await;
    assert_pending(broker, &retry, &[]).await;
    drop(stream);
    delete_queues(broker, &[&work, &retry]).await;
}

pub async fn delayed_publish_is_not_visible_early<B: Broker>(broker: &B) {
    let delay = Duration::from_millis(400);
    let queue = new_queue(broker, "delayed", QueueOptions::default()).await;
    let start = Instant::now();
    broker
        .publish_delayed(&queue, message("later"), delay)
        .await
        .expect("publishing with a delay");
    tokio::time::sleep(Duration::from_millis(150).saturating_sub(start.elapsed())).await;
    let found = pending_bodies(broker, &queue).await;
    // Only a look that ended before the delay can catch the message early.
    let looked = start.elapsed();
    assert!(
        found.is_empty() || looked >= delay,
        "visible after {looked:?}: {found:?}"
    );
    let mut stream = consume(broker, &queue, 1).await;
    let delivery = next_delivery(&mut stream, "the delayed message").await;
    assert!(
        start.elapsed() >= delay,
        "delivered after {:?}",
        start.elapsed()
    );
    assert_eq!(body(&delivery), "later");
    ack(delivery).await;

    broker
        .publish_delayed(&queue, message("now"), Duration::ZERO)
        .await
        .expect("publishing without a delay");
    let delivery = next_delivery(&mut stream, "the undelayed message").await;
    assert_eq!(body(&delivery), "now");
    ack(delivery).await;
    drop(stream);
    delete_queues(broker, &[&queue]).await;
}

/// A delayed message goes to its queue only, after the delay, with its CC
/// keys: a queue named like a CC key gets no copy (RabbitMQ would route one
/// at once by a `CC` header through the default exchange).
pub async fn delayed_publish_keeps_its_cc_keys_and_routes_by_them_nowhere<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "delayed-cc", QueueOptions::default()).await;
    let bystander = new_queue(broker, "delayed-cc-bystander", QueueOptions::default()).await;
    for delay in [Duration::from_millis(150), Duration::ZERO] {
        let cc_message = OutgoingMessage {
            cc: vec![bystander.clone(), "route.a.b".to_owned()],
            ..message("with cc")
        };
        broker
            .publish_delayed(&queue, cc_message, delay)
            .await
            .expect("publishing with a delay and CC keys");
        let mut stream = consume(broker, &queue, 1).await;
        let delivery = next_delivery(&mut stream, "the delayed message").await;
        assert_eq!(
            delivery.cc,
            [bystander.clone(), "route.a.b".to_owned()],
            "{delay:?}"
        );
        assert!(delivery.headers.is_empty(), "{:?}", delivery.headers);
        ack(delivery).await;
        drop(stream);
        assert!(
            pending_bodies(broker, &bystander).await.is_empty(),
            "a CC-named queue got a copy ({delay:?})"
        );
    }
    delete_queues(broker, &[&queue, &bystander]).await;
}

/// A delay past [`MAX_DELAY`] is accepted, clamped to it: the message waits
/// (RabbitMQ's broker parks it in the delay queue `<queue>.delay.<ms>`).
pub async fn delayed_publish_past_the_limit_is_clamped<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "delayed-max", QueueOptions::default()).await;
    for (body, delay) in [
        ("sixty days", Duration::from_secs(60 * 86_400)),
        ("forever", Duration::MAX),
    ] {
        broker
            .publish_delayed(&queue, message(body), delay)
            .await
            .unwrap_or_else(|error| {
                panic!("publishing `{body}` with a delay of {delay:?}: {error}")
            });
    }
    let mut stream = consume(broker, &queue, 1).await;
    assert_quiet(&mut stream, "messages delayed past the limit").await;
    drop(stream);
    delete_queues(broker, &[&queue]).await;
    // Only the RabbitMQ broker has a delay queue; deleting it drops the
    // waiting messages (the embedded broker has none: error ignored).
    let parked = format!("{queue}.delay.{}", MAX_DELAY.as_millis());
    let _ = broker.delete_queue(&parked).await;
}

pub async fn get_and_pending<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "get", QueueOptions::default()).await;
    for n in 0..3 {
        let mut sent = message(&format!("m{n}"));
        sent.headers.insert("n".to_owned(), n.to_string());
        publish(broker, DEFAULT_EXCHANGE, &queue, sent).await;
    }
    let pending = broker.pending(&queue).await.expect("pending");
    assert_eq!(pending.len(), 3, "{pending:?}");
    for (n, waiting) in pending.iter().enumerate() {
        assert_eq!(
            waiting.message_id.as_deref(),
            Some(format!("m{n}").as_str())
        );
        assert_eq!(waiting.routing_key, queue);
        assert_eq!(waiting.headers.get("n"), Some(&n.to_string()));
        assert_eq!(waiting.body, format!("m{n}").into_bytes());
    }
    // Listing takes nothing.
    assert_pending(broker, &queue, &["m0", "m1", "m2"]).await;

    let m0 = get_eventually(broker, &queue).await;
    assert_eq!(body(&m0), "m0");
    assert_pending(broker, &queue, &["m1", "m2"]).await;
    let m1 = get_eventually(broker, &queue).await;
    assert_eq!(body(&m1), "m1");
    m1.nack(true).await.expect("nack with requeue");
    assert_pending(broker, &queue, &["m1", "m2"]).await;
    ack(m0).await;
    let m1 = get_eventually(broker, &queue).await;
    assert_eq!(body(&m1), "m1");
    assert!(m1.redelivered);
    ack(m1).await;
    let m2 = get_eventually(broker, &queue).await;
    assert_eq!(body(&m2), "m2");
    ack(m2).await;
    assert!(get(broker, &queue).await.is_none());
    assert_pending(broker, &queue, &[]).await;
    delete_queues(broker, &[&queue]).await;
}

pub async fn cancelled_consumer_requeues_its_deliveries<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "cancel", QueueOptions::default()).await;
    for n in 0..3 {
        send(broker, &queue, &format!("m{n}")).await;
    }
    let mut stream = consume(broker, &queue, 2).await;
    let held_0 = next_delivery(&mut stream, "m0").await;
    let held_1 = next_delivery(&mut stream, "m1").await;
    drop(stream);
    // Cancelling happens in the background: wait for the requeue, in place.
    assert_pending(broker, &queue, &["m0", "m1", "m2"]).await;

    let mut stream = consume(broker, &queue, 3).await;
    let mut received = Vec::new();
    for _ in 0..3 {
        let delivery = next_delivery(&mut stream, "after the first consumer ended").await;
        received.push((body(&delivery), delivery.redelivered));
        ack(delivery).await;
    }
    // (`m2` may be flagged redelivered too: listing can mark messages.)
    assert_eq!(
        received[..2],
        [("m0".to_owned(), true), ("m1".to_owned(), true)]
    );
    assert_eq!(received[2].0, "m2");
    // The old consumer's deliveries were requeued already; letting them go
    // brings nothing back.
    drop((held_0, held_1));
    assert_quiet(&mut stream, "nothing after all were acknowledged").await;
    drop(stream);
    assert_pending(broker, &queue, &[]).await;
    delete_queues(broker, &[&queue]).await;
}

pub async fn dropped_delivery_is_requeued<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "dropped", QueueOptions::default()).await;
    send(broker, &queue, "forgotten").await;
    let delivery = get_eventually(broker, &queue).await;
    drop(delivery);
    assert_pending(broker, &queue, &["forgotten"]).await;

    let mut stream = consume(broker, &queue, 1).await;
    let delivery = next_delivery(&mut stream, "requeued after get").await;
    assert_eq!(body(&delivery), "forgotten");
    assert!(delivery.redelivered);
    drop(delivery);
    let delivery = next_delivery(&mut stream, "requeued after a consumer's delivery").await;
    assert_eq!(body(&delivery), "forgotten");
    assert!(delivery.redelivered);
    ack(delivery).await;
    drop(stream);
    assert_pending(broker, &queue, &[]).await;
    delete_queues(broker, &[&queue]).await;
}

pub async fn settling_twice_fails<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "twice", QueueOptions::default()).await;
    send(broker, &queue, "once").await;
    let delivery = get_eventually(broker, &queue).await;
    delivery.acker.ack().await.expect("first ack");
    let error = delivery.acker.ack().await.expect_err("second ack");
    assert!(matches!(error, BrokerError::AckFailed(_)), "{error:?}");
    let error = delivery.acker.nack(true).await.expect_err("nack after ack");
    assert!(matches!(error, BrokerError::AckFailed(_)), "{error:?}");
    drop(delivery);
    assert_pending(broker, &queue, &[]).await;
    assert!(get(broker, &queue).await.is_none());
    delete_queues(broker, &[&queue]).await;
}

pub async fn consumers_share_a_queue_in_turn<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "shared", QueueOptions::default()).await;
    let mut first = consume(broker, &queue, 1).await;
    let mut second = consume(broker, &queue, 1).await;
    for round in 0..2 {
        send(broker, &queue, &format!("r{round}-a")).await;
        send(broker, &queue, &format!("r{round}-b")).await;
        let a = next_delivery(&mut first, "the first consumer's share").await;
        let b = next_delivery(&mut second, "the second consumer's share").await;
        let mut bodies = [body(&a), body(&b)];
        bodies.sort();
        assert_eq!(bodies, [format!("r{round}-a"), format!("r{round}-b")]);
        assert_quiet(&mut first, "each message goes to one consumer").await;
        ack(a).await;
        ack(b).await;
    }
    drop((first, second));
    assert_pending(broker, &queue, &[]).await;
    delete_queues(broker, &[&queue]).await;
}

pub async fn auto_delete_queue_goes_with_its_last_consumer<B: Broker>(broker: &B) {
    let options = QueueOptions {
        auto_delete: true,
        ..QueueOptions::default()
    };
    let queue = new_queue(broker, "auto-delete", options).await;
    // Never consumed yet: stays.
    send(broker, &queue, "waiting").await;
    assert_pending(broker, &queue, &["waiting"]).await;
    let first = consume(broker, &queue, 1).await;
    let second = consume(broker, &queue, 1).await;
    drop(first);
    tokio::time::sleep(QUIET).await;
    broker
        .pending(&queue)
        .await
        .expect("the queue stays while a consumer is left");
    drop(second);
    assert_queue_goes(broker, &queue).await;
}

// ---------------------------------------------------------------------------
// Bounded queues and deletion
// ---------------------------------------------------------------------------

/// A full queue refuses a publish at once (backpressure) instead of blocking
/// or dropping; only ready messages count.
pub async fn full_queue_rejects_publish<B: Broker>(broker: &B) {
    let options = QueueOptions {
        max_length: Some(2),
        ..QueueOptions::default()
    };
    let queue = new_queue(broker, "bounded", options).await;
    send(broker, &queue, "m0").await;
    send(broker, &queue, "m1").await;
    let error = broker
        .publish(DEFAULT_EXCHANGE, &queue, message("m2"))
        .await
        .expect_err("publishing into a full queue must fail");
    assert!(matches!(error, BrokerError::QueueFull(_)), "{error:?}");
    assert_pending(broker, &queue, &["m0", "m1"]).await;

    let m0 = get_eventually(broker, &queue).await;
    send(broker, &queue, "m2").await;
    let error = broker
        .publish(DEFAULT_EXCHANGE, &queue, message("m3"))
        .await
        .expect_err("full again (the unacknowledged message does not count)");
    assert!(matches!(error, BrokerError::QueueFull(_)), "{error:?}");
    ack(m0).await;
    assert_pending(broker, &queue, &["m1", "m2"]).await;
    delete_queues(broker, &[&queue]).await;
}

/// A message routed to a full queue and to queues with room: the publish
/// fails, the full queue does not get it, the others do (as with RabbitMQ's
/// `reject-publish`). The error is [`BrokerError::QueueFull`] or, where the
/// broker cannot tell which queue refused, [`BrokerError::NotConfirmed`].
pub async fn full_queue_does_not_stop_other_queues<B: Broker>(broker: &B) {
    let exchange = new_exchange(broker, "fanout-full").await;
    let bounded = new_queue(
        broker,
        "fanout-bounded",
        QueueOptions {
            max_length: Some(1),
            ..QueueOptions::default()
        },
    )
    .await;
    let open = new_queue(broker, "fanout-open", QueueOptions::default()).await;
    bind(broker, &bounded, &exchange, "event").await;
    bind(broker, &open, &exchange, "event").await;
    publish(broker, &exchange, "event", message("m0")).await;
    let error = broker
        .publish(&exchange, "event", message("m1"))
        .await
        .expect_err("one target queue is full");
    // The broker may not know which queue was full (RabbitMQ's nack does not say).
    assert!(
        matches!(
            error,
            BrokerError::QueueFull(_) | BrokerError::NotConfirmed { .. }
        ),
        "{error:?}"
    );
    assert_pending(broker, &bounded, &["m0"]).await;
    assert_pending(broker, &open, &["m0", "m1"]).await;
    delete_queues(broker, &[&bounded, &open]).await;
}

pub async fn deleted_queue_loses_messages_and_bindings<B: Broker>(broker: &B) {
    let exchange = new_exchange(broker, "delete").await;
    let queue = new_queue(broker, "delete", QueueOptions::default()).await;
    bind(broker, &queue, &exchange, "key").await;
    publish(broker, &exchange, "key", message("before")).await;
    assert_pending(broker, &queue, &["before"]).await;
    delete_queues(broker, &[&queue]).await;
    let error = broker.pending(&queue).await.expect_err("the queue is gone");
    assert!(matches!(error, BrokerError::QueueNotFound(_)), "{error:?}");
    let error = broker
        .delete_queue(&queue)
        .await
        .expect_err("deleting a missing queue must fail");
    assert!(
        matches!(&error, BrokerError::QueueNotFound(name) if *name == queue),
        "{error:?}"
    );

    let again = broker
        .declare_queue(&queue, QueueOptions::default())
        .await
        .expect("redeclaring the deleted queue");
    assert_eq!(again, queue);
    publish(broker, &exchange, "key", message("after")).await;
    send(broker, &queue, "direct").await;
    assert_pending(broker, &queue, &["direct"]).await;
    delete_queues(broker, &[&queue]).await;
}

pub async fn deleted_queue_ends_its_consumers<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "delete-consumed", QueueOptions::default()).await;
    let mut stream = consume(broker, &queue, 1).await;
    delete_queues(broker, &[&queue]).await;
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(None) => break,
            // A broker may report why the consumer ended before ending.
            Ok(Some(Err(_))) => continue,
            Ok(Some(Ok(delivery))) => panic!("unexpected delivery {delivery:?}"),
            Err(_) => panic!("the consumer of deleted queue `{queue}` did not end"),
        }
    }
}

// ---------------------------------------------------------------------------
// Parity with RabbitMQ (issue 11)
// ---------------------------------------------------------------------------

/// A message TTL of zero: a consumer with room gets the message; without
/// one, it expires at once (dead-lettered). A requeued message keeps its
/// expiry, so it expires then instead of being redelivered.
pub async fn ttl_zero_reaches_a_waiting_consumer<B: Broker>(broker: &B) {
    let dead = new_queue(broker, "ttl0-dead", QueueOptions::default()).await;
    let queue = new_queue(
        broker,
        "ttl0",
        QueueOptions {
            message_ttl: Some(Duration::ZERO),
            dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
            dead_letter_routing_key: Some(dead.clone()),
            ..QueueOptions::default()
        },
    )
    .await;
    send(broker, &queue, "no-consumer").await;
    assert_pending(broker, &dead, &["no-consumer"]).await;
    let mut stream = consume(broker, &queue, 1).await;
    let mut roomy = consume(broker, &queue, 2).await;
    send(broker, &queue, "taken").await;
    let taken = next_delivery(&mut stream, "a TTL-0 message with a consumer waiting").await;
    assert_eq!(body(&taken), "taken");
    send(broker, &queue, "roomy-1").await;
    let roomy_1 = next_delivery(&mut roomy, "the next consumer's turn").await;
    // The first consumer, in turn but at its limit, passes it on to the
    // second, which has room.
    send(broker, &queue, "roomy-2").await;
    let roomy_2 = next_delivery(&mut roomy, "a TTL-0 message, first in turn busy").await;
    assert_eq!(body(&roomy_2), "roomy-2");
    send(broker, &queue, "consumer-busy").await;
    assert_pending(broker, &dead, &["no-consumer", "consumer-busy"]).await;
    taken.nack(true).await.expect("nack with requeue");
    assert_pending(broker, &dead, &["no-consumer", "consumer-busy", "taken"]).await;
    assert_quiet(&mut stream, "the requeued message expired").await;
    for delivery in [roomy_1, roomy_2] {
        ack(delivery).await;
    }
    assert_quiet(&mut roomy, "nothing else").await;
    drop(roomy);
    assert!(get(broker, &queue).await.is_none());
    drop(stream);
    delete_queues(broker, &[&queue, &dead]).await;
}

/// RabbitMQ keeps exclusive queues transient whatever `durable` says, so a
/// redeclaration may say either; the other options must still match.
pub async fn exclusive_queue_durability_is_not_compared<B: Broker>(broker: &B) {
    let exclusive = QueueOptions {
        exclusive: true,
        durable: true,
        ..QueueOptions::default()
    };
    let queue = new_queue(broker, "exclusive-durable", exclusive.clone()).await;
    for durable in [false, true] {
        let again = QueueOptions {
            durable,
            ..exclusive.clone()
        };
        let redeclared = broker
            .declare_queue(&queue, again)
            .await
            .unwrap_or_else(|error| panic!("redeclaring with durable {durable}: {error}"));
        assert_eq!(redeclared, queue);
    }
    for (what, other) in [
        (
            "auto_delete",
            QueueOptions {
                auto_delete: true,
                ..exclusive.clone()
            },
        ),
        (
            "exclusive",
            QueueOptions {
                exclusive: false,
                ..exclusive.clone()
            },
        ),
        (
            "max_length",
            QueueOptions {
                max_length: Some(3),
                ..exclusive.clone()
            },
        ),
    ] {
        let error = broker
            .declare_queue(&queue, other)
            .await
            .expect_err("other options still conflict");
        assert!(
            matches!(error, BrokerError::Conflict { .. }),
            "{what}: {error:?}"
        );
    }
    // A shared queue does not become exclusive either.
    let shared = new_queue(broker, "shared-durable", QueueOptions::default()).await;
    let error = broker
        .declare_queue(&shared, exclusive)
        .await
        .expect_err("a shared queue redeclared exclusive");
    assert!(matches!(error, BrokerError::Conflict { .. }), "{error:?}");
    delete_queues(broker, &[&queue, &shared]).await;
}

/// The default exchange cannot be declared, not even passively; the `amq.*`
/// exchanges RabbitMQ predeclares exist, durable, and route by their type;
/// a new `amq.` name is refused.
pub async fn default_and_amq_exchanges_follow_rabbitmq<B: Broker>(broker: &B) {
    let declare = |name: &str, passive: bool, durable: bool| {
        let name = name.to_owned();
        async move {
            broker
                .declare_exchange(&name, ExchangeOptions { passive, durable })
                .await
        }
    };
    for passive in [true, false] {
        let error = declare(DEFAULT_EXCHANGE, passive, false)
            .await
            .expect_err("the default exchange cannot be declared");
        assert!(
            matches!(error, BrokerError::Invalid(_)),
            "passive {passive}: {error:?}"
        );
    }
    for name in [
        "amq.topic",
        "amq.direct",
        "amq.fanout",
        "amq.headers",
        "amq.match",
        "amq.rabbitmq.trace",
    ] {
        declare(name, true, false)
            .await
            .unwrap_or_else(|error| panic!("`{name}` exists: {error}"));
    }
    declare("amq.topic", false, true)
        .await
        .expect("amq.topic redeclared as it is: durable topic");
    for (name, durable) in [
        ("amq.topic", false),
        ("amq.direct", true),
        ("amq.rabbitmq.trace", true),
    ] {
        let error = declare(name, false, durable)
            .await
            .expect_err("a predeclared exchange redeclared otherwise");
        assert!(
            matches!(error, BrokerError::Conflict { .. }),
            "{name} durable {durable}: {error:?}"
        );
    }
    let reserved = format!("amq.{}", unique("mine"));
    let error = declare(&reserved, true, false)
        .await
        .expect_err("a missing amq. exchange");
    assert!(
        matches!(&error, BrokerError::ExchangeNotFound(name) if *name == reserved),
        "{error:?}"
    );
    let error = declare(&reserved, false, false)
        .await
        .expect_err("a new amq. exchange");
    assert!(matches!(error, BrokerError::Invalid(_)), "{error:?}");

    // Routing by type (keys unique to this test: the exchanges are shared).
    let word = unique("word");
    let queue = new_queue(broker, "amq", QueueOptions::default()).await;
    bind(broker, &queue, "amq.topic", &format!("{word}.*")).await;
    bind(broker, &queue, "amq.direct", &format!("{word}.*")).await;
    bind(broker, &queue, "amq.rabbitmq.trace", &format!("{word}.#")).await;
    publish(
        broker,
        "amq.topic",
        &format!("{word}.topic"),
        message("topic"),
    )
    .await;
    publish(
        broker,
        "amq.direct",
        &format!("{word}.x"),
        message("direct-x"),
    )
    .await;
    publish(
        broker,
        "amq.direct",
        &format!("{word}.*"),
        message("direct-*"),
    )
    .await;
    let error = broker
        .publish("amq.rabbitmq.trace", &format!("{word}.t"), message("trace"))
        .await
        .expect_err("publishing to an internal exchange");
    assert!(matches!(error, BrokerError::Invalid(_)), "{error:?}");
    let error = broker
        .bind_queue(&queue, DEFAULT_EXCHANGE, "#")
        .await
        .expect_err("binding to the default exchange");
    assert!(matches!(error, BrokerError::Invalid(_)), "{error:?}");
    assert_pending(broker, &queue, &["topic", "direct-*"]).await;
    delete_queues(broker, &[&queue]).await;
}

/// Settling a delivery (from `get`) whose queue was deleted succeeds and
/// does nothing, as RabbitMQ's channel still knows the delivery; settling it
/// again fails.
pub async fn settling_after_the_queue_is_gone_succeeds<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "settle-gone", QueueOptions::default()).await;
    for n in 0..3 {
        send(broker, &queue, &format!("m{n}")).await;
    }
    let acked = get_eventually(broker, &queue).await;
    let requeued = get_eventually(broker, &queue).await;
    let rejected = get_eventually(broker, &queue).await;
    delete_queues(broker, &[&queue]).await;
    // Even with a new queue of the same name: nothing comes back into it.
    broker
        .declare_queue(&queue, QueueOptions::default())
        .await
        .expect("redeclaring the queue");
    acked
        .acker
        .ack()
        .await
        .expect("ack after the queue is gone");
    requeued
        .acker
        .nack(true)
        .await
        .expect("requeue after the queue is gone");
    rejected
        .acker
        .nack(false)
        .await
        .expect("reject after the queue is gone");
    let error = acked.acker.ack().await.expect_err("a second ack");
    assert!(matches!(error, BrokerError::AckFailed(_)), "{error:?}");
    drop((acked, requeued, rejected));
    assert_pending(broker, &queue, &[]).await;
    delete_queues(broker, &[&queue]).await;
}

/// As above, for deliveries a consumer held when its queue was deleted (the
/// broker cancels the consumer; what it holds can still be settled).
pub async fn settling_consumed_deliveries_after_the_queue_is_gone_succeeds<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "settle-gone-consumed", QueueOptions::default()).await;
    for n in 0..2 {
        send(broker, &queue, &format!("m{n}")).await;
    }
    let mut stream = consume(broker, &queue, 2).await;
    let acked = next_delivery(&mut stream, "the first message").await;
    let rejected = next_delivery(&mut stream, "the second message").await;
    delete_queues(broker, &[&queue]).await;
    acked
        .acker
        .ack()
        .await
        .expect("ack after the queue is gone");
    rejected
        .acker
        .nack(false)
        .await
        .expect("reject after the queue is gone");
    drop((acked, rejected, stream));
}

/// Waits until a settlement (which RabbitMQ does not answer) has reached the
/// queue: a look into the queue goes through the queue after it.
async fn settled<B: Broker>(broker: &B, queue: &str) {
    broker
        .pending(queue)
        .await
        .unwrap_or_else(|error| panic!("listing queue `{queue}`: {error}"));
}

/// Acknowledges `delivery` and waits until `queue` has seen it.
async fn ack_settled<B: Broker>(broker: &B, queue: &str, delivery: Delivery) {
    ack(delivery).await;
    settled(broker, queue).await;
}

/// A queue with three consumers of prefetch 1 (in that turn order), each
/// holding one message (`m0` to `m2`), and `m3` waiting: every consumer was
/// found at its limit, so each rejoins the turn when it settles.
async fn three_busy_consumers<B: Broker>(
    broker: &B,
    what: &str,
) -> (String, Vec<DeliveryStream>, [Delivery; 3]) {
    let queue = new_queue(broker, what, QueueOptions::default()).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(consume(broker, &queue, 1).await);
    }
    for n in 0..4 {
        send(broker, &queue, &format!("m{n}")).await;
    }
    let mut held = Vec::new();
    for (n, stream) in streams.iter_mut().enumerate() {
        let delivery = next_delivery(stream, "one message each, in turn").await;
        assert_eq!(body(&delivery), format!("m{n}"));
        held.push(delivery);
    }
    for stream in &mut streams {
        assert_quiet(stream, "everyone is at the limit").await;
    }
    let held = held.try_into().expect("three deliveries");
    (queue, streams, held)
}

/// RabbitMQ's turn order: the consumer that got a message goes to the back;
/// one found at its limit leaves the turn, and rejoins at the back once it
/// settles. So the message a consumer requeues goes back to that consumer
/// when it is first in turn, not to the next one in declaration order.
pub async fn requeued_message_goes_to_the_consumer_in_turn<B: Broker>(broker: &B) {
    let (queue, mut streams, [a, b, c]) = three_busy_consumers(broker, "turns").await;
    ack(c).await;
    let m3 = next_delivery(&mut streams[2], "m3 to the consumer with room").await;
    assert_eq!(body(&m3), "m3");
    ack_settled(broker, &queue, b).await;
    ack_settled(broker, &queue, a).await;
    // The third consumer is first in turn: it never left it.
    m3.nack(true).await.expect("nack with requeue");
    let again = next_delivery(&mut streams[2], "m3 requeued to the consumer in turn").await;
    assert_eq!(body(&again), "m3");
    assert!(again.redelivered);
    // Then the second (rejoined first), then the first.
    send(broker, &queue, "m4").await;
    let m4 = next_delivery(&mut streams[1], "m4 to the consumer that rejoined first").await;
    assert_eq!(body(&m4), "m4");
    send(broker, &queue, "m5").await;
    let m5 = next_delivery(&mut streams[0], "m5 to the consumer that rejoined last").await;
    assert_eq!(body(&m5), "m5");
    for stream in &mut streams {
        assert_quiet(stream, "no more messages").await;
    }
    for delivery in [again, m4, m5] {
        ack(delivery).await;
    }
    drop(streams);
    delete_queues(broker, &[&queue]).await;
}

/// Consumers at their prefetch limit, freed in another order than they got
/// their messages, take the next messages in the order they were freed.
pub async fn consumers_at_their_limit_rejoin_at_the_back<B: Broker>(broker: &B) {
    let (queue, mut streams, [a, b, c]) = three_busy_consumers(broker, "rejoin").await;
    ack(b).await;
    let m3 = next_delivery(&mut streams[1], "m3 to the first freed").await;
    assert_eq!(body(&m3), "m3");
    ack_settled(broker, &queue, a).await;
    ack_settled(broker, &queue, c).await;
    ack_settled(broker, &queue, m3).await;
    // In turn: the second (never left after `m3`), the first, the third.
    let expected = [(1, "m4"), (0, "m5"), (2, "m6")];
    for (consumer, name) in expected {
        send(broker, &queue, name).await;
        let delivery = next_delivery(&mut streams[consumer], name).await;
        assert_eq!(body(&delivery), name, "consumer {consumer}");
        ack_settled(broker, &queue, delivery).await;
    }
    drop(streams);
    delete_queues(broker, &[&queue]).await;
}

/// Asserts `result` is [`BrokerError::Invalid`] whose text starts with `what`.
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, BrokerError>, what: &str) {
    match result {
        Err(BrokerError::Invalid(text)) if text.starts_with(what) => {}
        other => panic!("expected an invalid {what}, got {other:?}"),
    }
}

/// Names and fields AMQP carries as short strings (at most 255 bytes) are
/// refused, checked in one order: exchange, routing key, content type,
/// message id, reserved header names, header names, CC keys; for queues the
/// name, then the dead-letter exchange and key. A delayed message's queue
/// must exist before its fields are looked at.
pub async fn long_fields_are_refused_in_order<B: Broker>(broker: &B) {
    let long = "n".repeat(256);
    let queue = new_queue(broker, "long", QueueOptions::default()).await;
    let exchange = new_exchange(broker, "long").await;
    let everything_long = OutgoingMessage {
        content_type: Some(long.clone()),
        message_id: Some(long.clone()),
        headers: BTreeMap::from([
            (long.clone(), "v".to_owned()),
            ("x-a".to_owned(), "v".to_owned()),
        ]),
        cc: vec![long.clone()],
        ..message("long")
    };
    let mut cases = Vec::new();
    let mut sent = everything_long.clone();
    cases.push(("content type", sent.clone()));
    sent.content_type = None;
    cases.push(("message id", sent.clone()));
    sent.message_id = None;
    cases.push(("header `x-a` is reserved", sent.clone()));
    sent.headers.remove("x-a");
    cases.push(("header name", sent.clone()));
    sent.headers.clear();
    cases.push(("CC routing key", sent.clone()));
    for (what, sent) in cases {
        assert_invalid(broker.publish(&exchange, "k", sent.clone()).await, what);
        assert_invalid(
            broker.publish(DEFAULT_EXCHANGE, &queue, sent.clone()).await,
            what,
        );
        assert_invalid(
            broker.publish_delayed(&queue, sent, Duration::ZERO).await,
            what,
        );
    }
    assert_invalid(
        broker.publish(&long, &long, everything_long.clone()).await,
        "exchange",
    );
    assert_invalid(
        broker
            .publish(&exchange, &long, everything_long.clone())
            .await,
        "routing key",
    );
    assert_invalid(
        broker
            .publish_delayed(&long, everything_long.clone(), Duration::ZERO)
            .await,
        "routing key",
    );
    // Delayed: the queue is checked before the message.
    let missing = broker.qualify_queue_name(&unique("missing"));
    let error = broker
        .publish_delayed(&missing, everything_long.clone(), Duration::from_secs(1))
        .await
        .expect_err("a delayed message to a missing queue");
    assert!(
        matches!(&error, BrokerError::QueueNotFound(name) if *name == missing),
        "{error:?}"
    );
    for (what, options) in [
        (
            "dead-letter exchange",
            QueueOptions {
                dead_letter_exchange: Some(long.clone()),
                dead_letter_routing_key: Some(long.clone()),
                ..QueueOptions::default()
            },
        ),
        (
            "dead-letter routing key",
            QueueOptions {
                dead_letter_exchange: Some(exchange.clone()),
                dead_letter_routing_key: Some(long.clone()),
                ..QueueOptions::default()
            },
        ),
        (
            "queue",
            QueueOptions {
                dead_letter_routing_key: Some(long.clone()),
                ..QueueOptions::default()
            },
        ),
    ] {
        let name = broker.qualify_queue_name(&unique("long"));
        assert_invalid(broker.declare_queue(&name, options.clone()).await, what);
        assert_invalid(broker.declare_queue(&long, options).await, "queue");
    }
    assert_invalid(broker.bind_queue(&long, &long, &long).await, "queue");
    assert_invalid(broker.bind_queue(&queue, &long, &long).await, "exchange");
    assert_invalid(
        broker.bind_queue(&queue, &exchange, &long).await,
        "routing-key pattern",
    );
    assert_invalid(broker.delete_queue(&long).await, "queue");
    assert_invalid(broker.get(&long).await, "queue");
    assert_invalid(broker.pending(&long).await, "queue");
    assert_invalid(broker.consume(&long, 1).await.map(|_| ()), "queue");
    assert_pending(broker, &queue, &[]).await;
    delete_queues(broker, &[&queue]).await;
}

/// Delayed messages are never delivered early. Their order is not kept:
/// the RabbitMQ broker rounds a delay up to a tier (at most 12.5 % longer),
/// and a tier releases its messages in publish order, so of two messages
/// delayed 104 ms then 100 ms (one tier) the first arrives first there,
/// while the embedded broker, exact, delivers the second first.
pub async fn delays_are_never_early_but_may_reorder<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "delay-order", QueueOptions::default()).await;
    let start = Instant::now();
    let delays = [("longer", 104), ("shorter", 100)];
    for (name, ms) in delays {
        broker
            .publish_delayed(&queue, message(name), Duration::from_millis(ms))
            .await
            .unwrap_or_else(|error| panic!("publishing `{name}` delayed: {error}"));
    }
    let mut stream = consume(broker, &queue, 2).await;
    let mut arrived = Vec::new();
    for _ in delays {
        let delivery = next_delivery(&mut stream, "a delayed message").await;
        let name = body(&delivery);
        let (_, ms) = delays
            .iter()
            .find(|(expected, _)| *expected == name)
            .unwrap_or_else(|| panic!("unexpected message {name}"));
        assert!(
            start.elapsed() >= Duration::from_millis(*ms),
            "{name} after {:?}",
            start.elapsed()
        );
        arrived.push(name);
        ack(delivery).await;
    }
    arrived.sort();
    assert_eq!(arrived, ["longer", "shorter"]);
    drop(stream);
    delete_queues(broker, &[&queue]).await;
}

/// A full queue declared on another connection: a publish straight to it
/// fails with [`BrokerError::QueueFull`] naming it.
pub async fn full_queue_is_named_across_connections<B: Broker>(broker: &B, other: &B) {
    let options = QueueOptions {
        max_length: Some(1),
        ..QueueOptions::default()
    };
    let queue = new_queue(other, "full-elsewhere", options).await;
    send(broker, &queue, "m0").await;
    let error = broker
        .publish(DEFAULT_EXCHANGE, &queue, message("m1"))
        .await
        .expect_err("the queue is full");
    assert!(
        matches!(&error, BrokerError::QueueFull(name) if *name == queue),
        "{error:?}"
    );
    assert_pending(broker, &queue, &["m0"]).await;
    delete_queues(broker, &[&queue]).await;
}

/// A put, delayed or not, goes to its queue only: it keeps its CC keys,
/// which route nothing.
pub async fn delayed_put_goes_to_its_queue_only<B: Broker>(broker: &B) {
    let queue = new_queue(broker, "put-cc", QueueOptions::default()).await;
    let other = new_queue(broker, "put-cc-other", QueueOptions::default()).await;
    let delay = Duration::from_millis(100);
    let with_cc = |body: &str| OutgoingMessage {
        cc: vec![other.clone()],
        ..message(body)
    };
    let start = Instant::now();
    broker
        .publish_delayed(&queue, with_cc("later"), delay)
        .await
        .expect("a delayed put");
    broker
        .publish_delayed(&queue, with_cc("now"), Duration::ZERO)
        .await
        .expect("a put");
    let mut stream = consume(broker, &queue, 2).await;
    let now = next_delivery(&mut stream, "the undelayed put").await;
    assert_eq!(body(&now), "now");
    let later = next_delivery(&mut stream, "the delayed put").await;
    assert!(start.elapsed() >= delay, "after {:?}", start.elapsed());
    assert_eq!(body(&later), "later");
    for delivery in [&now, &later] {
        assert_eq!(delivery.cc, std::slice::from_ref(&other));
        assert_eq!(delivery.routing_key, queue);
    }
    assert_pending(broker, &other, &[]).await;
    for delivery in [now, later] {
        ack(delivery).await;
    }
    drop(stream);
    delete_queues(broker, &[&queue, &other]).await;
}

/// A put's CC keys route nothing when it is dead-lettered either: rejected
/// into the default exchange by its own key, it goes back to its queue only,
/// CC keys kept.
pub async fn dead_lettered_put_keeps_to_its_queue<B: Broker>(broker: &B) {
    let other = new_queue(broker, "dl-put-other", QueueOptions::default()).await;
    let queue = new_queue(
        broker,
        "dl-put",
        QueueOptions {
            dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
            ..QueueOptions::default()
        },
    )
    .await;
    let put = OutgoingMessage {
        cc: vec![other.clone()],
        ..message("put")
    };
    broker
        .publish_delayed(&queue, put, Duration::ZERO)
        .await
        .expect("a put");
    let delivery = get_eventually(broker, &queue).await;
    delivery.nack(false).await.expect("reject");
    let again = get_eventually(broker, &queue).await;
    assert_eq!(body(&again), "put");
    assert_eq!(again.cc, std::slice::from_ref(&other));
    ack(again).await;
    assert_pending(broker, &other, &[]).await;
    delete_queues(broker, &[&queue, &other]).await;
}

/// Dropping every handle of a connection closes it even while a consumer
/// reads its exclusive queue: the stream ends and the queue is gone (seen
/// from `observer`, another connection to the same broker).
pub async fn dropping_every_handle_closes_the_connection_and_its_exclusive_queues<B: Broker>(
    broker: B,
    observer: B,
) {
    let queue = broker
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare exclusive queue");
    let mut stream = consume(&broker, &queue, 1).await;
    drop(broker);
    let end = tokio::time::timeout(EVENTUALLY, stream.next())
        .await
        .expect("the stream ends");
    assert!(
        matches!(end, None | Some(Err(BrokerError::Closed))),
        "{end:?}"
    );
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        match observer.get(&queue).await {
            Err(BrokerError::QueueNotFound(_)) => break,
            other => assert!(
                Instant::now() < deadline,
                "the exclusive queue outlived its connection: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A quorum queue's options with a delivery limit, dead-lettering to `dead`
/// through the default exchange.
fn quorum_with_limit(limit: u32, dead: &str) -> QueueOptions {
    QueueOptions {
        durable: true,
        queue_type: QueueType::Quorum,
        delivery_limit: Some(limit),
        dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
        dead_letter_routing_key: Some(dead.to_owned()),
        ..QueueOptions::default()
    }
}

/// A quorum queue counts every return of a message — a nack with requeue, a
/// dropped delivery, a listing — and dead-letters it when it comes back
/// more often than its delivery limit, so it is delivered `limit + 1` times.
/// A delivery limit on a classic queue is refused; a redeclaration with
/// another limit conflicts.
pub async fn quorum_delivery_limit_dead_letters_what_keeps_coming_back<B: Broker>(broker: &B) {
    let dead = new_queue(broker, "limit-dead", QueueOptions::default()).await;
    let queue = new_queue(broker, "limit", quorum_with_limit(2, &dead)).await;

    send(broker, &queue, "nacked").await;
    let mut stream = consume(broker, &queue, 1).await;
    for delivery_number in 1..=3 {
        let delivery = next_delivery(&mut stream, "nacked").await;
        assert_eq!(body(&delivery), "nacked");
        assert_eq!(
            delivery.redelivered,
            delivery_number > 1,
            "{delivery_number}"
        );
        delivery.nack(true).await.expect("nack with requeue");
    }
    assert_quiet(&mut stream, "returned past its limit").await;
    drop(stream);
    assert_pending(broker, &dead, &["nacked"]).await;

    send(broker, &queue, "dropped").await;
    for _ in 1..=3 {
        let delivery = get_eventually(broker, &queue).await;
        assert_eq!(body(&delivery), "dropped");
        drop(delivery);
    }
    assert_pending(broker, &dead, &["nacked", "dropped"]).await;

    // Listing takes every message and returns it: two listings are two returns.
    send(broker, &queue, "listed").await;
    assert_eq!(pending_bodies(broker, &queue).await, ["listed"]);
    assert_eq!(pending_bodies(broker, &queue).await, ["listed"]);
    let delivery = get_eventually(broker, &queue).await;
    assert_eq!(body(&delivery), "listed");
    assert!(
        delivery.redelivered,
        "listed messages come back redelivered"
    );
    delivery.nack(true).await.expect("nack with requeue");
    assert_pending(broker, &dead, &["nacked", "dropped", "listed"]).await;
    assert!(
        get(broker, &queue).await.is_none(),
        "the quorum queue is empty"
    );

    let classic = QueueOptions {
        delivery_limit: Some(2),
        ..QueueOptions::default()
    };
    assert_invalid(
        broker
            .declare_queue(
                &broker.qualify_queue_name(&unique("classic-limit")),
                classic,
            )
            .await,
        "queue `",
    );
    let redeclared = broker
        .declare_queue(&queue, quorum_with_limit(5, &dead))
        .await;
    assert!(
        matches!(redeclared, Err(BrokerError::Conflict { .. })),
        "another delivery limit: {redeclared:?}"
    );
    delete_queues(broker, &[&queue, &dead]).await;
}

/// Where a message that comes back to a quorum queue goes (RabbitMQ 3.10):
/// a nacked one to the back of the queue, after the messages never
/// delivered; a cancelled consumer's to the front, in their order — not to
/// their old places, as in a classic queue. Each comes back redelivered.
pub async fn quorum_queue_requeues_nacked_messages_at_the_back<B: Broker>(broker: &B) {
    let quorum = QueueOptions {
        durable: true,
        queue_type: QueueType::Quorum,
        ..QueueOptions::default()
    };
    let queue = new_queue(broker, "quorum-order", quorum).await;
    for body in ["a", "b", "c", "d"] {
        send(broker, &queue, body).await;
    }
    // Nacked: the consumer's next delivery (it has room once b is nacked)
    // shows where b went.
    let mut stream = consume(broker, &queue, 2).await;
    let a = next_delivery(&mut stream, "a").await;
    let b = next_delivery(&mut stream, "b").await;
    assert_eq!((body(&a), body(&b)), ("a".to_owned(), "b".to_owned()));
    b.nack(true).await.expect("nack b");
    let c = next_delivery(&mut stream, "after nacking b").await;
    assert_eq!((body(&c), c.redelivered), ("c".to_owned(), false));
    a.nack(true).await.expect("nack a");
    let mut order = vec![(body(&c), c.redelivered)];
    ack(c).await;
    for _ in 0..3 {
        let delivery = next_delivery(&mut stream, "the rest").await;
        order.push((body(&delivery), delivery.redelivered));
        ack(delivery).await;
    }
    let expected = |bodies: [(&str, bool); 4]| bodies.map(|(body, again)| (body.to_owned(), again));
    assert_eq!(
        order,
        expected([("c", false), ("d", false), ("b", true), ("a", true)])
    );
    // Cancelled with e and f held: they go back to the front. (New bodies:
    // the RabbitMQ broker sends a message it just had confirmed only once.)
    for body in ["e", "f", "g", "h"] {
        send(broker, &queue, body).await;
    }
    let held = [
        next_delivery(&mut stream, "e").await,
        next_delivery(&mut stream, "f").await,
    ];
    drop(stream);
    // The cancellation is not answered: give it time to reach the queue
    // before the held deliveries go (their own requeue would race it).
    tokio::time::sleep(QUIET).await;
    drop(held);
    let mut order = Vec::new();
    for _ in 0..4 {
        let delivery = get_eventually(broker, &queue).await;
        order.push((body(&delivery), delivery.redelivered));
        ack(delivery).await;
    }
    assert_eq!(
        order,
        expected([("e", true), ("f", true), ("g", false), ("h", false)])
    );
    delete_queues(broker, &[&queue]).await;
}
