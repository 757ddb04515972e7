//! `Consumer` against the embedded `MemoryBroker`: typed decoding, routing
//! fields, CC routes, failure handling (requeue once, then dead-letter),
//! lifecycle (start/stop/wait, draining), and flow control.

mod client_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use client_support::*;
use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::broker::{Broker, ExchangeOptions, OutgoingMessage};
use exchange_runtime::consumer::{
    AckMode, ConsumerBuilder, ConsumerError, DeliveryInfo, Handler, HandlerError,
};
use exchange_runtime::publisher::Publisher;
use exchange_runtime::{DecodeError, DecodeErrorKind, ExchangeNames};
use tokio::sync::mpsc;

type Seen = (Result<QueueEvent, DecodeError>, DeliveryInfo);

/// A handler that reports everything it sees and succeeds (through the
/// `Handler` trait, where the other tests use closures).
struct Recorder(mpsc::UnboundedSender<Seen>);

impl Handler<QueueEvent> for Recorder {
    async fn handle(
        &self,
        message: Result<QueueEvent, DecodeError>,
        info: DeliveryInfo,
    ) -> Result<(), HandlerError> {
        let _ = self.0.send((message, info));
        Ok(())
    }
}

fn recorder() -> (Recorder, mpsc::UnboundedReceiver<Seen>) {
    let (sender, receiver) = mpsc::unbounded_channel();
    (Recorder(sender), receiver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_messages_arrive_with_their_routing_fields() {
    let broker = broker_with_test_exchanges().await;
    let (handler, mut seen) = recorder();
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("typed")
        .bind(TaskDefined {
            worker_type: Some("gaia".into()),
            ..Default::default()
        })
        .unwrap()
        .bind(TaskRunning::default())
        .unwrap()
        .max_in_flight(1)
        .build_handler(handler)
        .unwrap();
    consumer.start().await.unwrap();
    assert_eq!(consumer.queue_name().as_deref(), Some("typed"));
    assert_eq!(consumer.dead_letter_queue().as_deref(), Some("typed.dead"));

    let publisher = Publisher::new(broker.clone());
    let (gaia, gaia_message) = defined(1, "gaia");
    let (other, other_message) = defined(2, "other");
    let (run, run_message) = running(3, "other");
    publisher.publish(&gaia, &gaia_message).await.unwrap();
    publisher.publish(&other, &other_message).await.unwrap();
    publisher.publish(&run, &run_message).await.unwrap();

    let (message, info) = next(&mut seen, "the gaia task-defined message").await;
    assert_eq!(message.unwrap(), QueueEvent::TaskDefined(gaia_message));
    assert_eq!(info.exchange, DEFINED);
    assert_eq!(info.routing_key, format!("primary.{}.gaia._", task_id(1)));
    assert_eq!(info.field("taskId"), Some(task_id(1).as_str()));
    assert_eq!(info.field("workerType"), Some("gaia"));
    assert_eq!(info.field("reserved"), None);
    let fields = info.fields.as_ref().unwrap();
    assert!(
        !fields.contains_key("routingKeyKind"),
        "constants are left out"
    );
    assert_eq!(fields.get("reserved"), Some(&None));
    assert_eq!(info.binding::<TaskDefined>().unwrap().unwrap(), gaia);
    assert!(info.binding::<TaskRunning>().is_none());
    assert!(!info.redelivered);
    assert!(info.routes.is_empty() && info.cc.is_empty());

    // The other worker type's task-defined message was published before the
    // task-running one: with one handler at a time, it would have come first.
    let (message, info) = next(&mut seen, "the task-running message").await;
    assert_eq!(message.unwrap(), QueueEvent::TaskRunning(run_message));
    assert_eq!(info.exchange, RUNNING);
    assert_eq!(info.field("workerType"), Some("other"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        seen.try_recv().is_err(),
        "a message the bindings exclude arrived"
    );

    consumer.stop().unwrap();
    consumer.wait().await;
    assert!(
        broker.pending("typed").await.unwrap().is_empty(),
        "all acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc_routes_are_delivered_without_their_prefix() {
    let broker = broker_with_test_exchanges().await;
    let (handler, mut seen) = recorder();
    let consumer = ConsumerBuilder::new(broker.clone())
        // Typed binding that matches nothing itself: gives the exchange's
        // routing-key reference for parsing.
        .bind(TaskDefined {
            worker_type: Some("nobody".into()),
            ..Default::default()
        })
        .unwrap()
        .bind_pattern(DEFINED, "route.notify.#")
        .build_handler(handler)
        .unwrap();
    consumer.start().await.unwrap();

    let publisher = Publisher::new(broker.clone());
    let (plain, plain_message) = defined(1, "w");
    publisher.publish(&plain, &plain_message).await.unwrap();
    let (routed, routed_message) = defined(2, "w");
    publisher
        .publish_with_routes(
            &routed,
            &routed_message,
            &["notify.by-email", "index.project.x"],
        )
        .await
        .unwrap();

    let (message, info) = next(&mut seen, "the routed message").await;
    assert_eq!(message.unwrap(), QueueEvent::TaskDefined(routed_message));
    assert_eq!(info.routes, vec!["notify.by-email", "index.project.x"]);
    assert_eq!(
        info.cc,
        vec!["route.notify.by-email", "route.index.project.x"]
    );
    assert_eq!(info.routing_key, format!("primary.{}.w._", task_id(2)));
    assert_eq!(info.field("taskId"), Some(task_id(2).as_str()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        seen.try_recv().is_err(),
        "the message without routes arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_reach_the_handler_and_are_dead_lettered() {
    let broker = broker_with_test_exchanges().await;
    let (sender, mut seen) = mpsc::unbounded_channel::<Seen>();
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("malformed")
        .bind(TaskDefined::default())
        .unwrap()
        .max_in_flight(1)
        .build(move |message: Result<QueueEvent, DecodeError>, info| {
            let _ = sender.send((message.clone(), info));
            async move {
                message?;
                Ok(())
            }
        })
        .unwrap();
    consumer.start().await.unwrap();

    let key = format!("primary.{}.w._", task_id(1));
    let garbage = OutgoingMessage {
        body: b"{\"version\": 1, \"status\": ".to_vec(),
        ..OutgoingMessage::default()
    };
    broker.publish(DEFINED, &key, garbage).await.unwrap();

    let (first, info) = next(&mut seen, "the malformed message").await;
    let error = first.unwrap_err();
    assert_eq!(error.exchange, DEFINED);
    assert!(matches!(error.kind, DecodeErrorKind::Body(_)), "{error:?}");
    assert!(!info.redelivered);
    let (second, info) = next(&mut seen, "the malformed message, requeued once").await;
    assert!(second.is_err());
    assert!(info.redelivered);

    eventually("the malformed message in the dead-letter queue", || async {
        broker.pending("malformed.dead").await.unwrap().len() == 1
    })
    .await;
    let dead = broker.pending("malformed.dead").await.unwrap();
    assert_eq!(dead[0].body, b"{\"version\": 1, \"status\": ");

    // The consumer keeps going.
    let (good, good_message) = defined(2, "w");
    Publisher::new(broker.clone())
        .publish(&good, &good_message)
        .await
        .unwrap();
    let (message, _) = next(&mut seen, "a good message after the bad one").await;
    assert_eq!(message.unwrap(), QueueEvent::TaskDefined(good_message));
    assert!(consumer.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_and_panics_requeue_once_then_dead_letter() {
    let broker = broker_with_test_exchanges().await;
    let (sender, mut seen) = mpsc::unbounded_channel::<(String, bool)>();
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("failing")
        .bind(TaskDefined::default())
        .unwrap()
        .build(
            move |message: Result<TaskDefinedMessage, DecodeError>, info: DeliveryInfo| {
                let sender = sender.clone();
                // A panic in the handler itself, before it returns a future,
                // is a handler panic too (and must not take the consumer down).
                if let Ok(message) = &message
                    && message.status.worker_type == "panics-early"
                {
                    let _ = sender.send(("panics-early".to_owned(), info.redelivered));
                    panic!("handler bug before its future");
                }
                async move {
                    let message = message?;
                    let worker_type = message.status.worker_type;
                    let _ = sender.send((worker_type.clone(), info.redelivered));
                    match worker_type.as_str() {
                        "fails" => Err(HandlerError::msg("cannot handle this")),
                        "panics" => panic!("handler bug"),
                        _ => Ok(()),
                    }
                }
            },
        )
        .unwrap();
    consumer.start().await.unwrap();

    let publisher = Publisher::new(broker.clone());
    for (n, worker_type) in [
        (1, "panics-early"),
        (2, "fails"),
        (3, "panics"),
        (4, "works"),
    ] {
        let (binding, message) = defined(n, worker_type);
        publisher.publish(&binding, &message).await.unwrap();
    }
    let mut attempts = Vec::new();
    for _ in 0..7 {
        attempts.push(next(&mut seen, "seven handler runs").await);
    }
    attempts.sort();
    assert_eq!(
        attempts,
        vec![
            ("fails".to_owned(), false),
            ("fails".to_owned(), true),
            ("panics".to_owned(), false),
            ("panics".to_owned(), true),
            ("panics-early".to_owned(), false),
            ("panics-early".to_owned(), true),
            ("works".to_owned(), false),
        ]
    );
    eventually("the three failing messages dead-lettered", || async {
        broker.pending("failing.dead").await.unwrap().len() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        seen.try_recv().is_err(),
        "a dead-lettered message came back"
    );
    assert!(broker.pending("failing").await.unwrap().is_empty());
    assert!(consumer.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_lets_in_flight_handlers_finish_and_acknowledge() {
    let broker = broker_with_test_exchanges().await;
    let started = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicBool::new(false));
    let (started2, finished2) = (Arc::clone(&started), Arc::clone(&finished));
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("draining")
        .bind(TaskDefined::default())
        .unwrap()
        .build(
            move |_message: Result<TaskDefinedMessage, DecodeError>, _info| {
                let (started, finished) = (Arc::clone(&started2), Arc::clone(&finished2));
                async move {
                    started.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    finished.store(true, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .unwrap();
    consumer.start().await.unwrap();
    let publisher = Publisher::new(broker.clone());
    let (binding, message) = defined(1, "w");
    publisher.publish(&binding, &message).await.unwrap();
    tokio::time::timeout(EVENTUALLY, started.notified())
        .await
        .expect("the handler starts");

    consumer.stop().unwrap();
    assert!(!consumer.is_running());
    // Published after the stop: must wait in the queue, not be taken.
    let (late, late_message) = defined(2, "w");
    publisher.publish(&late, &late_message).await.unwrap();
    tokio::time::timeout(EVENTUALLY, consumer.wait())
        .await
        .expect("the consumer stops");
    assert!(
        finished.load(Ordering::SeqCst),
        "wait returned before the in-flight handler finished"
    );
    let pending = broker.pending("draining").await.unwrap();
    assert_eq!(pending.len(), 1, "only the late message waits: {pending:?}");
    assert!(String::from_utf8_lossy(&pending[0].body).contains(&task_id(2)));
    assert!(broker.pending("draining.dead").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_idempotent_stop_needs_a_running_consumer_and_restart_resumes() {
    let broker = broker_with_test_exchanges().await;
    let (handler, mut seen) = recorder();
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("lifecycle")
        .bind(TaskDefined::default())
        .unwrap()
        .build_handler(handler)
        .unwrap();

    assert!(matches!(
        consumer.stop(),
        Err(ConsumerError::NotRunning { .. })
    ));
    // Never started: wait returns at once.
    tokio::time::timeout(Duration::from_secs(1), consumer.wait())
        .await
        .expect("wait on a consumer that never ran");

    consumer.start().await.unwrap();
    consumer.start().await.unwrap();
    assert!(consumer.is_running());
    let publisher = Publisher::new(broker.clone());
    let (binding, message) = defined(1, "w");
    publisher.publish(&binding, &message).await.unwrap();
    let (first, _) = next(&mut seen, "the first message").await;
    first.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        seen.try_recv().is_err(),
        "a second subscription duplicated it"
    );

    consumer.stop().unwrap();
    let error = consumer.stop().unwrap_err();
    assert!(error.to_string().contains("`lifecycle`"), "{error}");
    consumer.wait().await;

    // Published while stopped: kept by the durable queue, delivered on restart.
    let (binding, message) = defined(2, "w");
    publisher.publish(&binding, &message).await.unwrap();
    consumer.start().await.unwrap();
    let (message, _) = next(&mut seen, "the message published while stopped").await;
    assert_eq!(message.unwrap(), QueueEvent::TaskDefined(defined(2, "w").1));
}

async fn max_concurrency(prefetch: u16, max_in_flight: usize, messages: u32) -> usize {
    let broker = broker_with_test_exchanges().await;
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (c, p, d) = (Arc::clone(&current), Arc::clone(&peak), Arc::clone(&done));
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("bounded")
        .bind(TaskDefined::default())
        .unwrap()
        .prefetch(prefetch)
        .max_in_flight(max_in_flight)
        .build(
            move |_message: Result<TaskDefinedMessage, DecodeError>, _info| {
                let (current, peak, done) = (Arc::clone(&c), Arc::clone(&p), Arc::clone(&d));
                async move {
                    let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    current.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .unwrap();
    // Declare the queue, then fill it before consuming.
    consumer.start().await.unwrap();
    consumer.stop().unwrap();
    consumer.wait().await;
    let publisher = Publisher::new(broker.clone());
    for n in 0..messages {
        let (binding, message) = defined(n, "w");
        publisher.publish(&binding, &message).await.unwrap();
    }
    consumer.start().await.unwrap();
    eventually("every message handled", || {
        let done = Arc::clone(&done);
        async move { done.load(Ordering::SeqCst) == messages as usize }
    })
    .await;
    peak.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_in_flight_are_bounded_by_max_in_flight() {
    assert_eq!(max_concurrency(10, 3, 15).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_in_flight_are_bounded_by_prefetch() {
    // More handler slots than prefetch: the broker's prefetch is the bound,
    // so the prefetch really reaches the broker.
    assert_eq!(max_concurrency(2, 10, 10).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_interrupts_handlers_and_requeues_their_messages() {
    let broker = broker_with_test_exchanges().await;
    let started = Arc::new(tokio::sync::Notify::new());
    let started2 = Arc::clone(&started);
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("stuck")
        .bind(TaskDefined::default())
        .unwrap()
        .drain_timeout(Duration::from_millis(100))
        .build(
            move |_message: Result<TaskDefinedMessage, DecodeError>, _info| {
                let started = Arc::clone(&started2);
                async move {
                    started.notify_one();
                    std::future::pending::<()>().await;
                    Ok(())
                }
            },
        )
        .unwrap();
    consumer.start().await.unwrap();
    let (binding, message) = defined(1, "w");
    Publisher::new(broker.clone())
        .publish(&binding, &message)
        .await
        .unwrap();
    tokio::time::timeout(EVENTUALLY, started.notified())
        .await
        .expect("the handler starts");
    consumer.stop().unwrap();
    tokio::time::timeout(EVENTUALLY, consumer.wait())
        .await
        .expect("the consumer stops despite the stuck handler");
    let pending = broker.pending("stuck").await.unwrap();
    assert_eq!(pending.len(), 1, "the interrupted message is back");
    assert!(broker.pending("stuck.dead").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_ack_never_requeues() {
    let broker = broker_with_test_exchanges().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let runs2 = Arc::clone(&runs);
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("auto")
        .bind(TaskDefined::default())
        .unwrap()
        .ack_mode(AckMode::Auto)
        .build(
            move |_message: Result<TaskDefinedMessage, DecodeError>, _info| {
                runs2.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::msg("always fails")) }
            },
        )
        .unwrap();
    consumer.start().await.unwrap();
    let (binding, message) = defined(1, "w");
    Publisher::new(broker.clone())
        .publish(&binding, &message)
        .await
        .unwrap();
    eventually("the handler ran", || {
        let runs = Arc::clone(&runs);
        async move { runs.load(Ordering::SeqCst) == 1 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "auto-ack requeued");
    assert!(broker.pending("auto").await.unwrap().is_empty());
    assert!(broker.pending("auto.dead").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_queues_are_private_and_have_a_dead_letter_queue() {
    let broker = broker_with_test_exchanges().await;
    let (handler, mut seen) = recorder();
    let consumer = ConsumerBuilder::new(broker.clone())
        .bind(TaskRunning::default())
        .unwrap()
        .build_handler(handler)
        .unwrap();
    consumer.start().await.unwrap();
    let queue = consumer.queue_name().expect("a broker-chosen name");
    let dead = consumer.dead_letter_queue().expect("a dead-letter queue");
    assert!(!queue.is_empty() && queue != dead);
    let (binding, message) = running(1, "w");
    Publisher::new(broker.clone())
        .publish(&binding, &message)
        .await
        .unwrap();
    let (message, _) = next(&mut seen, "a message on the unnamed queue").await;
    assert!(matches!(message.unwrap(), QueueEvent::TaskRunning(_)));
    assert!(broker.pending(&dead).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_exchanges_and_bad_options_are_reported() {
    let broker = MemoryBroker::new();
    // No exchange declared: the passive declaration fails, naming it.
    let (handler, _seen) = recorder();
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("nowhere")
        .bind(TaskDefined::default())
        .unwrap()
        .build_handler(handler)
        .unwrap();
    let error = consumer.start().await.unwrap_err().to_string();
    assert!(
        error.contains(DEFINED) && error.contains("`nowhere`"),
        "{error}"
    );
    assert!(!consumer.is_running());

    let (handler, _seen) = recorder();
    let error = ConsumerBuilder::new(broker.clone())
        .bind(TaskDefined::default())
        .unwrap()
        .prefetch(0)
        .build_handler(handler)
        .err()
        .expect("prefetch 0 is refused");
    assert!(error.to_string().contains("prefetch"), "{error}");

    let error = ConsumerBuilder::new(broker)
        .bind(TaskDefined {
            task_id: Some("a.b".into()),
            ..Default::default()
        })
        .expect_err("a dot in a single-word value is refused");
    assert!(error.to_string().contains(DEFINED), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_stream_is_resubscribed() {
    let memory = broker_with_test_exchanges().await;
    // The first two subscriptions die at once, as on a lost connection.
    let broker = Flaky::new(memory.clone(), 0, 2);
    let (handler, mut seen) = recorder();
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("resubscribing")
        .bind(TaskDefined::default())
        .unwrap()
        .build_handler(handler)
        .unwrap();
    consumer.start().await.unwrap();
    let (binding, message) = defined(1, "w");
    Publisher::new(memory.clone())
        .publish(&binding, &message)
        .await
        .unwrap();
    let (received, _) = next(&mut seen, "the message after resubscribing").await;
    assert_eq!(received.unwrap(), QueueEvent::TaskDefined(message));
    assert_eq!(broker.subscriptions.load(Ordering::SeqCst), 3);
    assert!(consumer.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_exchanges_meet_and_handlers_see_reference_names() {
    const STAGING: &str = "exchange/staging-queue/v1/task-defined";
    // No exchange under the reference names: the publisher must declare the
    // broker name, and the consumer must bind to it.
    let broker = MemoryBroker::new();
    let names = ExchangeNames::new().rename(DEFINED, STAGING).unwrap();
    let publisher = Publisher::new(broker.clone()).with_exchange_names(names.clone());
    let (gaia, gaia_message) = defined(1, "gaia");
    publisher.publish(&gaia, &gaia_message).await.unwrap();

    let (handler, mut seen) = recorder();
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue("renamed")
        .bind(TaskDefined::default())
        .unwrap()
        .exchange_names(names.clone())
        .build_handler(handler)
        .unwrap();
    consumer.start().await.unwrap();
    publisher.publish(&gaia, &gaia_message).await.unwrap();
    let (message, info) = next(&mut seen, "the message published on the renamed exchange").await;
    assert_eq!(message.unwrap(), QueueEvent::TaskDefined(gaia_message));
    assert_eq!(info.exchange, DEFINED, "handlers see the reference name");
    assert_eq!(info.binding::<TaskDefined>().unwrap().unwrap(), gaia);
    consumer.stop().unwrap();
    consumer.wait().await;

    // The publisher declared the broker name only: nothing is under the
    // reference name (a consumer without the names would not find it).
    let passive = ExchangeOptions {
        passive: true,
        durable: true,
    };
    let missing = broker.declare_exchange(DEFINED, passive).await;
    assert!(missing.is_err(), "{missing:?}");

    // Two bound exchanges under one broker name could not be told apart.
    let (handler, _seen) = recorder();
    let error = ConsumerBuilder::new(broker)
        .bind(TaskDefined::default())
        .unwrap()
        .bind_pattern(STAGING, "#")
        .exchange_names(names)
        .build_handler(handler)
        .err()
        .expect("a collision is refused")
        .to_string();
    assert!(
        error.contains(DEFINED) && error.contains(STAGING),
        "{error}"
    );
}
