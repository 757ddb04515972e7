//! The typed layer's own CPU cost per message, on the embedded broker (no
//! network): what `Publisher::publish` and a typed consumer add on top of
//! `Broker::publish` and a raw delivery stream, and the publish-side pieces
//! (serializing, validating) alone. The message is the 1 KiB
//! `TaskPendingMessage` of the RabbitMQ throughput example.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::broker::{Broker, ExchangeOptions, OutgoingMessage, QueueOptions};
use exchange_runtime::consumer::{ConsumerBuilder, DeliveryInfo, HandlerError};
use exchange_runtime::publisher::Publisher;
use exchange_runtime::{Binding, DecodeError, Message};
use taskcluster_exchanges::queue::TaskPendingMessage;

mod support;
use support::{BenchPending, EXCHANGE, binding, task_pending_message};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A runtime, an embedded broker with the exchange declared, the message and its body.
fn embedded() -> (
    tokio::runtime::Runtime,
    MemoryBroker,
    TaskPendingMessage,
    Vec<u8>,
) {
    let rt = runtime();
    let broker = MemoryBroker::new();
    let message = task_pending_message().expect("the bench message");
    let body = serde_json::to_vec(&message).expect("serializes");
    let durable = ExchangeOptions {
        passive: false,
        durable: true,
    };
    rt.block_on(broker.declare_exchange(EXCHANGE, durable))
        .expect("declared");
    (rt, broker, message, body)
}

/// The pieces of preparing a body: serializing, checking against the schema.
fn publish_body(c: &mut Criterion) {
    let message = task_pending_message().expect("the bench message");
    let value = serde_json::to_value(&message).expect("serializes");
    let body = serde_json::to_vec(&message).expect("serializes");
    let check = |value: &serde_json::Value| {
        exchange_runtime::validate::validate_document(
            TaskPendingMessage::SCHEMA_ID,
            TaskPendingMessage::SCHEMA,
            TaskPendingMessage::SCHEMA_DEPENDENCIES,
            value,
        )
        .expect("valid")
    };
    check(&value);
    let mut group = c.benchmark_group("publish_body");
    group.bench_function("validate_then_write", |b| {
        b.iter(|| {
            let value = exchange_runtime::validate::validate(black_box(&message)).expect("valid");
            serde_json::to_vec(&value).expect("writes")
        })
    });
    group.bench_function("validated_body", |b| {
        b.iter(|| {
            exchange_runtime::validate::validated_body(black_box(&message), 1024).expect("valid")
        })
    });
    group.bench_function("to_value", |b| {
        b.iter(|| serde_json::to_value(black_box(&message)).expect("serializes"))
    });
    group.bench_function("to_vec", |b| {
        b.iter(|| serde_json::to_vec(black_box(&message)).expect("serializes"))
    });
    group.bench_function("parse_value", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(&body)).expect("parses"))
    });
    group.bench_function("is_valid", |b| b.iter(|| check(black_box(&value))));
    group.bench_function("routing_key", |b| {
        let binding = binding();
        b.iter(|| black_box(&binding).routing_key().expect("a key"))
    });
    group.finish();
}

/// A whole publish on the embedded broker (an exchange without queues):
/// `Broker::publish` of ready bytes vs the typed `Publisher::publish`.
fn publish_memory(c: &mut Criterion) {
    let (rt, broker, message, body) = embedded();
    let publisher = Publisher::new(broker.clone());
    let binding = binding();
    let key = binding.routing_key().expect("a key");
    let mut group = c.benchmark_group("publish_memory");
    group.bench_function("broker", |b| {
        b.iter(|| {
            let message = OutgoingMessage {
                body: body.clone(),
                content_type: Some("application/json".to_owned()),
                persistent: true,
                ..OutgoingMessage::default()
            };
            rt.block_on(broker.publish(EXCHANGE, &key, message))
                .expect("published")
        })
    });
    group.bench_function("typed", |b| {
        b.iter(|| {
            rt.block_on(publisher.publish(&binding, black_box(&message)))
                .expect("published")
        })
    });
    group.finish();
}

/// Fills the queues bound to the exchange with `count` copies of the message at the broker level.
fn fill(rt: &tokio::runtime::Runtime, broker: &MemoryBroker, body: &[u8], count: u64) {
    let key = binding().routing_key().expect("a key");
    rt.block_on(async {
        for _ in 0..count {
            let message = OutgoingMessage {
                body: body.to_vec(),
                content_type: Some("application/json".to_owned()),
                persistent: true,
                ..OutgoingMessage::default()
            };
            broker
                .publish(EXCHANGE, &key, message)
                .await
                .expect("published");
        }
    });
}

/// Consuming and acknowledging on the embedded broker: a raw delivery
/// stream vs a typed consumer (decode, no-op handler, ack), prefetch 100.
fn consume_memory(c: &mut Criterion) {
    let (rt, broker, _, body) = embedded();
    let raw_queue = "bench-raw";
    rt.block_on(async {
        broker
            .declare_queue(raw_queue, QueueOptions::default())
            .await?;
        broker.bind_queue(raw_queue, EXCHANGE, "#").await
    })
    .expect("raw queue");
    let mut group = c.benchmark_group("consume_memory");
    group.bench_function("broker", |b| {
        b.iter_custom(|iters| {
            fill(&rt, &broker, &body, iters);
            let started = Instant::now();
            rt.block_on(async {
                let mut stream = broker.consume(raw_queue, 100).await.expect("consumes");
                for _ in 0..iters {
                    let delivery = stream.next().await.expect("a delivery").expect("no error");
                    delivery.ack().await.expect("acked");
                }
            });
            started.elapsed()
        })
    });
    rt.block_on(broker.delete_queue(raw_queue))
        .expect("deleted");

    let handled = Arc::new(AtomicUsize::new(0));
    let wanted = Arc::new(AtomicUsize::new(usize::MAX));
    let all_handled = Arc::new(tokio::sync::Notify::new());
    let consumer = {
        let (handled, wanted, all_handled) = (handled.clone(), wanted.clone(), all_handled.clone());
        ConsumerBuilder::new(broker.clone())
            .queue("bench-typed")
            .bind(BenchPending::default())
            .expect("binds")
            .prefetch(100)
            .build(
                move |message: Result<TaskPendingMessage, DecodeError>, _: DeliveryInfo| {
                    let (handled, wanted, all_handled) =
                        (handled.clone(), wanted.clone(), all_handled.clone());
                    async move {
                        black_box(message?);
                        if handled.fetch_add(1, Ordering::Relaxed) + 1
                            == wanted.load(Ordering::Relaxed)
                        {
                            all_handled.notify_one();
                        }
                        Ok::<(), HandlerError>(())
                    }
                },
            )
            .expect("builds")
    };
    rt.block_on(consumer.start()).expect("starts");
    consumer.stop().expect("stops");
    rt.block_on(consumer.wait());
    group.bench_function("typed", |b| {
        b.iter_custom(|iters| {
            fill(&rt, &broker, &body, iters);
            handled.store(0, Ordering::Relaxed);
            wanted.store(iters as usize, Ordering::Relaxed);
            let started = Instant::now();
            rt.block_on(async {
                consumer.start().await.expect("starts");
                tokio::time::timeout(Duration::from_secs(60), all_handled.notified())
                    .await
                    .expect("all handled in time");
                consumer.stop().expect("stops");
                consumer.wait().await;
            });
            started.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, publish_body, publish_memory, consume_memory);
criterion_main!(benches);
