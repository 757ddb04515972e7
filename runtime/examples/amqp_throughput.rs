//! Client CPU and throughput of the RabbitMQ data path, at the `Broker`
//! level and through the typed `Publisher` / `ConsumerBuilder`.
//!
//! ```text
//! cargo run --release -p exchange-runtime --example amqp_throughput -- --messages N
//! ```
//!
//! Against the RabbitMQ at `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`): a durable topic exchange and
//! durable queues, all of names unique to the run (the exchange
//! `exchange/tc-exchanges-bench/<run>/task-pending`), deleted afterwards.
//! The typed layer uses the generated `TaskPending` binding with its
//! exchange renamed to that one (`ExchangeNames`), so that no real exchange
//! is touched. The message is a schema-valid `TaskPendingMessage` of about
//! 1 KiB, persistent, published with the binding's full routing key.
//!
//! `--layer broker` or `--layer typed` runs one layer only (for profiling).
//!
//! Per layer, two phases, each measured alone:
//! - `publish_confirmed`: all N publishes in flight at once, each returning
//!   when the broker confirmed it (typed: serialized, validated against its
//!   schema, published with the binding's routing key);
//! - `consume_ack`: a consumer with prefetch 100 takes the N messages, one
//!   ack per message (typed: decoded, handled by a no-op handler, acked once
//!   it returned `Ok`).
//!
//! Each phase prints one line, CPU being user + system time of this process
//! (`getrusage`) over the phase, per message:
//!
//! ```text
//! RESULT phase=publish_confirmed layer=broker msgs_per_s=F cpu_us_per_msg=F
//! RESULT phase=consume_ack layer=broker msgs_per_s=F cpu_us_per_msg=F
//! RESULT phase=publish_confirmed layer=typed msgs_per_s=F cpu_us_per_msg=F
//! RESULT phase=consume_ack layer=typed msgs_per_s=F cpu_us_per_msg=F
//! ```
//!
//! and a `MEMORY` line per publish phase: the most heap this process held
//! during the phase beyond what it held at its start (counted by the bench's
//! global allocator), divided by N, since all N were in flight at once:
//! everything a publish in flight costs the client, its future included.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig};
use exchange_runtime::broker::{Broker, ExchangeOptions, OutgoingMessage, QueueOptions};
use exchange_runtime::consumer::{ConsumerBuilder, DeliveryInfo, HandlerError};
use exchange_runtime::publisher::Publisher;
use exchange_runtime::{Binding, DecodeError, Exchange, ExchangeNames};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use taskcluster_exchanges::queue::{TaskPending, TaskPendingMessage};

#[path = "../benches/support/mod.rs"]
mod support;
use support::{binding_for_run, run_pattern, task_pending_message};

const PREFETCH: u16 = 100;
/// How long a phase may take before the bench gives up.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

/// The system allocator, counting the bytes held and the most held since the last reset.
struct CountingAllocator;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller promised for `layout`.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            let held = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(held, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: as the caller promised: allocated here with `layout`.
        unsafe { System.dealloc(pointer, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as the caller promised for `pointer`, `layout` and `new_size`.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            if new_size >= layout.size() {
                let held = HELD.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(held, Ordering::Relaxed);
            } else {
                HELD.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The bytes held now; the peak starts again from here.
fn reset_peak() -> usize {
    let held = HELD.load(Ordering::Relaxed);
    PEAK.store(held, Ordering::Relaxed);
    held
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Measures one phase and prints its RESULT line.
struct Phase {
    name: &'static str,
    layer: &'static str,
    started: Instant,
    cpu: Duration,
    held: usize,
}

impl Phase {
    fn start(name: &'static str, layer: &'static str) -> Phase {
        let held = reset_peak();
        Phase {
            name,
            layer,
            started: Instant::now(),
            cpu: cpu_time(),
            held,
        }
    }

    fn finish(self, messages: usize) {
        let elapsed = self.started.elapsed();
        let cpu = cpu_time();
        let peak = PEAK.load(Ordering::Relaxed);
        let n = messages as f64;
        println!(
            "RESULT phase={} layer={} msgs_per_s={:.0} cpu_us_per_msg={:.1}",
            self.name,
            self.layer,
            n / elapsed.as_secs_f64(),
            (cpu - self.cpu).as_secs_f64() * 1e6 / n,
        );
        if self.name == "publish_confirmed" {
            println!(
                "MEMORY phase={} layer={} heap_bytes_per_in_flight={:.0}",
                self.name,
                self.layer,
                peak.saturating_sub(self.held) as f64 / n,
            );
        }
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(PHASE_LIMIT, future)
        .await
        .map_err(|_| format!("{what} did not finish within {PHASE_LIMIT:?}"))
}

/// Publishes `count` copies of `body` at the `Broker` level, all in flight, then consumes them.
async fn broker_layer(
    broker: &AmqpBroker,
    exchange: &str,
    queue: &str,
    routing_key: &str,
    body: &[u8],
    count: usize,
) -> Result<(), String> {
    let phase = Phase::start("publish_confirmed", "broker");
    let mut publishes: FuturesUnordered<_> = (0..count)
        .map(|_| {
            let message = OutgoingMessage {
                body: body.to_vec(),
                content_type: Some("application/json".to_owned()),
                persistent: true,
                ..OutgoingMessage::default()
            };
            broker.publish(exchange, routing_key, message)
        })
        .collect();
    within("broker publish", async {
        while let Some(result) = publishes.next().await {
            result.map_err(|error| error.to_string())?;
        }
        Ok::<_, String>(())
    })
    .await??;
    phase.finish(count);

    let phase = Phase::start("consume_ack", "broker");
    let mut stream = broker
        .consume(queue, PREFETCH)
        .await
        .map_err(|error| error.to_string())?;
    within("broker consume", async {
        for _ in 0..count {
            let delivery = stream
                .next()
                .await
                .ok_or("the consumer ended")?
                .map_err(|error| error.to_string())?;
            delivery.ack().await.map_err(|error| error.to_string())?;
        }
        Ok::<_, String>(())
    })
    .await??;
    drop(stream);
    phase.finish(count);
    Ok(())
}

/// Publishes `count` typed messages, all in flight, then consumes them with a typed consumer.
async fn typed_layer(
    broker: &AmqpBroker,
    names: &ExchangeNames,
    queue_name: &str,
    run: &str,
    message: &TaskPendingMessage,
    count: usize,
) -> Result<(), String> {
    let handled = Arc::new(AtomicUsize::new(0));
    let all_handled = Arc::new(tokio::sync::Notify::new());
    let consumer = {
        let handled = handled.clone();
        let all_handled = all_handled.clone();
        ConsumerBuilder::new(broker.clone())
            .queue(queue_name)
            .bind(run_pattern(run).0)
            .map_err(|error| error.to_string())?
            .exchange_names(names.clone())
            .prefetch(PREFETCH)
            .build(
                move |message: Result<TaskPendingMessage, DecodeError>, _info: DeliveryInfo| {
                    let handled = handled.clone();
                    let all_handled = all_handled.clone();
                    async move {
                        message?;
                        if handled.fetch_add(1, Ordering::Relaxed) + 1 == count {
                            all_handled.notify_one();
                        }
                        Ok::<(), HandlerError>(())
                    }
                },
            )
            .map_err(|error| error.to_string())?
    };
    // Declares and binds the queue, so that it keeps what is published next.
    consumer.start().await.map_err(|error| error.to_string())?;
    consumer.stop().map_err(|error| error.to_string())?;
    consumer.wait().await;

    let publisher = Publisher::new(broker.clone()).with_exchange_names(names.clone());
    let binding = binding_for_run(run).0;
    let phase = Phase::start("publish_confirmed", "typed");
    let mut publishes: FuturesUnordered<_> = (0..count)
        .map(|_| publisher.publish(&binding, message))
        .collect();
    within("typed publish", async {
        while let Some(result) = publishes.next().await {
            result.map_err(|error| error.to_string())?;
        }
        Ok::<_, String>(())
    })
    .await??;
    drop(publishes);
    phase.finish(count);

    let phase = Phase::start("consume_ack", "typed");
    consumer.start().await.map_err(|error| error.to_string())?;
    within("typed consume", all_handled.notified()).await?;
    consumer.stop().map_err(|error| error.to_string())?;
    consumer.wait().await;
    phase.finish(count);
    let full_name = consumer
        .queue_name()
        .ok_or("the typed consumer has no queue")?;
    let dead_letter = consumer
        .dead_letter_queue()
        .ok_or("the typed consumer has no dead-letter queue")?;
    for queue in [full_name, dead_letter] {
        broker
            .delete_queue(&queue)
            .await
            .map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// Which layers a run measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layers {
    Both,
    Broker,
    Typed,
}

fn arguments() -> Result<(usize, Layers), String> {
    let usage = "usage: --messages N [--layer broker|typed]";
    let mut args = std::env::args().skip(1);
    let mut messages = 20_000;
    let mut layers = Layers::Both;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--messages" => {
                let value = args.next().ok_or("--messages needs a number")?;
                messages = value
                    .parse()
                    .map_err(|error| format!("--messages `{value}`: {error}"))?;
            }
            "--layer" => {
                layers = match args.next().as_deref() {
                    Some("broker") => Layers::Broker,
                    Some("typed") => Layers::Typed,
                    _ => return Err(format!("--layer takes broker or typed ({usage})")),
                };
            }
            other => return Err(format!("unknown argument `{other}` ({usage})")),
        }
    }
    if messages == 0 {
        return Err("--messages must be at least 1".to_owned());
    }
    Ok((messages, layers))
}

/// A word no other run uses (no dots: it is one routing-key word).
fn run_word() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("bench-{}-{nanos:x}", std::process::id())
}

async fn run() -> Result<(), String> {
    let (messages, layers) = arguments()?;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let config = AmqpConfig::from_url(&url)
        .map_err(|error| error.to_string())?
        .with_connection_name("exchange-runtime-throughput");
    let broker = AmqpBroker::connect(config)
        .await
        .map_err(|error| error.to_string())?;
    let message = task_pending_message()?;
    let body = serde_json::to_vec(&message).map_err(|error| error.to_string())?;
    println!(
        "{messages} persistent messages of {} B, prefetch {PREFETCH}, RabbitMQ at {}",
        body.len(),
        broker.config().endpoint()
    );

    let run = run_word();
    let exchange = format!("exchange/tc-exchanges-bench/{run}/task-pending");
    let names = ExchangeNames::new()
        .rename(TaskPending::EXCHANGE, exchange.as_str())
        .map_err(|error| error.to_string())?;
    let outcome = async {
        let durable = ExchangeOptions {
            passive: false,
            durable: true,
        };
        broker
            .declare_exchange(&exchange, durable)
            .await
            .map_err(|error| error.to_string())?;
        if layers != Layers::Typed {
            let queue = broker
                .declare_queue(
                    &broker.qualify_queue_name(&format!("throughput-broker-{run}")),
                    QueueOptions {
                        durable: true,
                        ..QueueOptions::default()
                    },
                )
                .await
                .map_err(|error| error.to_string())?;
            let layer = async {
                broker
                    .bind_queue(&queue, &exchange, "#")
                    .await
                    .map_err(|error| error.to_string())?;
                // The typed layer's key, so that both layers route alike.
                let key = binding_for_run(&run)
                    .0
                    .routing_key()
                    .map_err(|error| error.to_string())?;
                broker_layer(&broker, &exchange, &queue, &key, &body, messages).await
            }
            .await;
            broker
                .delete_queue(&queue)
                .await
                .map_err(|error| error.to_string())?;
            layer?;
        }
        if layers != Layers::Broker {
            let typed_queue = format!("throughput-typed-{run}");
            typed_layer(&broker, &names, &typed_queue, &run, &message, messages).await?;
        }
        Ok::<_, String>(())
    }
    .await;
    let deleted = broker.delete_exchange(&exchange).await;
    broker.close().await;
    deleted.map_err(|error| format!("exchange `{exchange}` not deleted: {error}"))?;
    outcome
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // On a worker thread, as an application's consumers and publishers run:
    // `main`'s own future runs on a thread of its own, which every delivery
    // and confirm would have to wake.
    let outcome = match tokio::spawn(run()).await {
        Ok(outcome) => outcome,
        Err(error) => Err(format!("the bench's task failed: {error}")),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("amqp_throughput: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
