//! Client CPU and throughput of the RabbitMQ data path, at the `Broker`
//! level and through the typed `Publisher` / `ConsumerBuilder`.
//!
//! ```text
//! cargo run --release -p exchange-runtime --example amqp_throughput -- --messages N
//! ```
//!
//! Against the RabbitMQ at `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`): a durable topic exchange
//! (`exchange/tc-exchanges-bench/v1/task-pending`, a Binding of the bench's
//! own, so that no real exchange is touched) and durable queues of unique
//! names. The message is a schema-valid `TaskPendingMessage` of about 1 KiB,
//! persistent.
//!
//! Runs at the same time stay apart: the exchange name is the binding's
//! constant, but each run publishes with a routing-key word of its own
//! (`bench.<run>.broker`; the typed binding's worker type is `<run>`) and
//! binds its queues to that word only. Afterwards the run deletes its
//! queues, then the exchange *if unused* (`exchange.delete` with
//! `if-unused`, sent on a connection of the bench's own): while another
//! run's queues are bound to it, RabbitMQ keeps it and that run deletes it
//! when it is done. A run that finds the exchange deleted under it before
//! it bound its first queue declares it again.
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

use exchange_runtime::DecodeError;
use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig};
use exchange_runtime::broker::{
    Broker, BrokerError, ExchangeOptions, OutgoingMessage, QueueOptions,
};
use exchange_runtime::consumer::{ConsumerBuilder, DeliveryInfo, HandlerError};
use exchange_runtime::publisher::Publisher;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use taskcluster_exchanges::queue::TaskPendingMessage;

#[path = "../benches/support/mod.rs"]
mod support;
use support::{EXCHANGE, binding_for_run, run_pattern, task_pending_message};

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
            broker.publish(EXCHANGE, routing_key, message)
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
            .bind(run_pattern(run))
            .map_err(|error| error.to_string())?
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

    let publisher = Publisher::new(broker.clone());
    let binding = binding_for_run(run);
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

/// Declares the exchange and binds `queue` to it with `pattern`; declares
/// it again when another run deleted it (unused) in between.
async fn declare_and_bind(broker: &AmqpBroker, queue: &str, pattern: &str) -> Result<(), String> {
    let durable = ExchangeOptions {
        passive: false,
        durable: true,
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        broker
            .declare_exchange(EXCHANGE, durable)
            .await
            .map_err(|error| error.to_string())?;
        match broker.bind_queue(queue, EXCHANGE, pattern).await {
            Ok(()) => return Ok(()),
            Err(BrokerError::ExchangeNotFound(_)) if attempts < 5 => {}
            Err(error) => return Err(error.to_string()),
        }
    }
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
    // Bound until the end (whatever the layers): the exchange is in use,
    // so no other run's if-unused delete takes it away meanwhile.
    let outcome = async {
        declare_and_bind(&broker, &queue, &format!("bench.{run}.#")).await?;
        if layers != Layers::Typed {
            let key = format!("bench.{run}.broker");
            broker_layer(&broker, &queue, &key, &body, messages).await?;
        }
        if layers != Layers::Broker {
            let typed_queue = format!("throughput-typed-{run}");
            typed_layer(&broker, &typed_queue, &run, &message, messages).await?;
        }
        Ok::<_, String>(())
    }
    .await;
    broker
        .delete_queue(&queue)
        .await
        .map_err(|error| error.to_string())?;
    broker.close().await;
    match raw::delete_exchange_if_unused(&url, EXCHANGE).await {
        Ok(true) => {}
        Ok(false) => println!("exchange `{EXCHANGE}` still in use by another run: left to it"),
        Err(error) => eprintln!("amqp_throughput: exchange `{EXCHANGE}` not deleted: {error}"),
    }
    outcome
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("amqp_throughput: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `exchange.delete` with `if-unused` (which the runtime's broker does not
/// offer), on a plain AMQP connection of the bench's own.
mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A method frame's arguments.
    struct Method(Vec<u8>);

    impl Method {
        fn new(class: u16, method: u16) -> Method {
            let mut bytes = class.to_be_bytes().to_vec();
            bytes.extend_from_slice(&method.to_be_bytes());
            Method(bytes)
        }
        fn u8(mut self, value: u8) -> Method {
            self.0.push(value);
            self
        }
        fn u16(mut self, value: u16) -> Method {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }
        fn u32(mut self, value: u32) -> Method {
            self.0.extend_from_slice(&value.to_be_bytes());
            self
        }
        fn short(mut self, value: &str) -> Method {
            self.0.push(value.len() as u8);
            self.0.extend_from_slice(value.as_bytes());
            self
        }
        fn long(mut self, value: &[u8]) -> Method {
            self = self.u32(value.len() as u32);
            self.0.extend_from_slice(value);
            self
        }
    }

    struct Connection {
        stream: TcpStream,
    }

    impl Connection {
        async fn send(&mut self, channel: u16, method: Method) -> std::io::Result<()> {
            let mut frame = vec![1];
            frame.extend_from_slice(&channel.to_be_bytes());
            frame.extend_from_slice(&(method.0.len() as u32).to_be_bytes());
            frame.extend_from_slice(&method.0);
            frame.push(0xCE);
            self.stream.write_all(&frame).await
        }

        /// The next method frame: class, method, arguments (heartbeats and content skipped).
        async fn method(&mut self) -> std::io::Result<(u16, u16, Vec<u8>)> {
            loop {
                let mut header = [0; 7];
                self.stream.read_exact(&mut header).await?;
                let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
                let mut payload = vec![0; size as usize + 1];
                self.stream.read_exact(&mut payload).await?;
                if header[0] == 1 && payload.len() >= 5 {
                    let class = u16::from_be_bytes([payload[0], payload[1]]);
                    let method = u16::from_be_bytes([payload[2], payload[3]]);
                    payload.truncate(size as usize);
                    return Ok((class, method, payload.split_off(4)));
                }
            }
        }

        async fn expect(&mut self, class: u16, method: u16) -> Result<Vec<u8>, String> {
            let (got_class, got_method, arguments) =
                self.method().await.map_err(|error| error.to_string())?;
            if (got_class, got_method) != (class, method) {
                return Err(format!(
                    "expected method {class}.{method}, got {got_class}.{got_method}"
                ));
            }
            Ok(arguments)
        }
    }

    /// `amqp://user:password@host:port/vhost` (percent-encoded vhost).
    fn parse(url: &str) -> Result<(String, String, String, String), String> {
        let rest = url
            .strip_prefix("amqp://")
            .ok_or("only plain amqp:// URLs are supported here")?;
        let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let (credentials, host) = authority
            .rsplit_once('@')
            .unwrap_or(("guest:guest", authority));
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        let host = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:5672")
        };
        let decode = |text: &str| -> String {
            let bytes = text.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok());
                match (bytes[i], hex) {
                    (b'%', Some(byte)) => {
                        out.push(byte);
                        i += 3;
                    }
                    (byte, _) => {
                        out.push(byte);
                        i += 1;
                    }
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        let vhost = if vhost.is_empty() {
            "/".to_owned()
        } else {
            decode(vhost)
        };
        Ok((host, decode(user), decode(password), vhost))
    }

    /// Deletes `exchange` unless queues are bound to it: `Ok(false)` when it is in use.
    pub async fn delete_exchange_if_unused(url: &str, exchange: &str) -> Result<bool, String> {
        let (host, user, password, vhost) = parse(url)?;
        let io = |error: std::io::Error| error.to_string();
        let stream = TcpStream::connect(&host).await.map_err(io)?;
        let mut connection = Connection { stream };
        connection
            .stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .map_err(io)?;
        connection.expect(10, 10).await?;
        let mut response = vec![0];
        response.extend_from_slice(user.as_bytes());
        response.push(0);
        response.extend_from_slice(password.as_bytes());
        let start_ok = Method::new(10, 11)
            .long(&[])
            .short("PLAIN")
            .long(&response)
            .short("en_US");
        connection.send(0, start_ok).await.map_err(io)?;
        let tune = connection.expect(10, 30).await?;
        let frame_max = tune.get(2..6).map_or(131_072, |bytes| {
            u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
        });
        let tune_ok = Method::new(10, 31).u16(1).u32(frame_max).u16(0);
        connection.send(0, tune_ok).await.map_err(io)?;
        let open = Method::new(10, 40).short(&vhost).short("").u8(0);
        connection.send(0, open).await.map_err(io)?;
        connection.expect(10, 41).await?;
        connection
            .send(1, Method::new(20, 10).short(""))
            .await
            .map_err(io)?;
        connection.expect(20, 11).await?;
        // Ticket, exchange, bits: if-unused (1), no-wait (2).
        let delete = Method::new(40, 20).u16(0).short(exchange).u8(1);
        connection.send(1, delete).await.map_err(io)?;
        let (class, method, arguments) = connection.method().await.map_err(io)?;
        let deleted = match (class, method) {
            (40, 21) => Ok(true),
            // channel.close: 406 PRECONDITION_FAILED is "in use".
            (20, 40) if arguments.starts_with(&406u16.to_be_bytes()) => Ok(false),
            (20, 40) => Err(format!(
                "refused: {}",
                String::from_utf8_lossy(arguments.get(3..).unwrap_or_default())
            )),
            other => Err(format!("unexpected answer {other:?}")),
        };
        let close = Method::new(10, 50).u16(200).short("done").u16(0).u16(0);
        if connection.send(0, close).await.is_ok() {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), connection.expect(10, 51))
                    .await;
        }
        deleted
    }
}
