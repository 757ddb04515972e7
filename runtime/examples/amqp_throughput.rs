//! Throughput of `AmqpBroker` against a local RabbitMQ: confirmed publishes
//! (one at a time, and many in flight) and consume + ack with prefetch 100.
//!
//! ```text
//! cargo run --release -p exchange-runtime --example amqp_throughput -- [messages] [in-flight]
//! ```
//! Defaults: 20000 messages of 1 KiB, 64 publishes in flight. `AMQP_URL`
//! overrides `amqp://guest:guest@127.0.0.1:5672/%2f`.

use std::time::{Duration, Instant};

use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig};
use exchange_runtime::broker::{Broker, ExchangeOptions, OutgoingMessage, QueueOptions};
use futures_util::StreamExt;

const BODY_SIZE: usize = 1024;
const PREFETCH: u16 = 100;

fn argument(position: usize, default: usize) -> Result<usize, String> {
    match std::env::args().nth(position) {
        None => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|error| format!("argument {position} `{text}`: {error}")),
    }
}

fn rate(count: usize, elapsed: Duration) -> String {
    format!(
        "{count} msgs in {:.2} s = {:.0} msgs/s",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    )
}

fn message(n: usize) -> OutgoingMessage {
    let mut body = format!("{{\"n\":{n},\"pad\":\"").into_bytes();
    body.resize(BODY_SIZE - 2, b'x');
    body.extend_from_slice(b"\"}");
    OutgoingMessage {
        body,
        content_type: Some("application/json".to_owned()),
        message_id: Some(n.to_string()),
        persistent: true,
        ..OutgoingMessage::default()
    }
}

/// Consumes `count` messages from `queue`, acknowledging each.
async fn consume_all(broker: &AmqpBroker, queue: &str, count: usize) -> Result<Duration, String> {
    let start = Instant::now();
    let mut stream = broker
        .consume(queue, PREFETCH)
        .await
        .map_err(|error| error.to_string())?;
    for _ in 0..count {
        let delivery = stream
            .next()
            .await
            .ok_or("consumer ended")?
            .map_err(|error| error.to_string())?;
        delivery.ack().await.map_err(|error| error.to_string())?;
    }
    Ok(start.elapsed())
}

async fn run() -> Result<(), String> {
    let messages = argument(1, 20_000)?;
    let in_flight = argument(2, 64)?.max(1);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let config = AmqpConfig::from_url(&url)
        .map_err(|error| error.to_string())?
        .with_connection_name("exchange-runtime-throughput");
    println!("RabbitMQ at {}", config.endpoint());
    let broker = AmqpBroker::connect(config)
        .await
        .map_err(|error| error.to_string())?;
    let suffix = std::process::id();
    let exchange = format!("exchange/guest/throughput-{suffix}");
    broker
        .declare_exchange(&exchange, ExchangeOptions::default())
        .await
        .map_err(|error| error.to_string())?;
    let queue = broker
        .declare_queue(
            &broker.qualify_queue_name(&format!("throughput-{suffix}")),
            QueueOptions::default(),
        )
        .await
        .map_err(|error| error.to_string())?;
    broker
        .bind_queue(&queue, &exchange, "bench.#")
        .await
        .map_err(|error| error.to_string())?;
    println!("{messages} persistent messages of {BODY_SIZE} B through topic exchange `{exchange}`");

    // One confirmed publish at a time: latency-bound.
    let sequential = (messages / 4).max(1);
    let start = Instant::now();
    for n in 0..sequential {
        broker
            .publish(&exchange, "bench.one", message(n))
            .await
            .map_err(|error| error.to_string())?;
    }
    println!(
        "publish, confirmed, 1 in flight:        {}",
        rate(sequential, start.elapsed())
    );
    let elapsed = consume_all(&broker, &queue, sequential).await?;
    println!(
        "consume + ack, prefetch {PREFETCH}:           {}",
        rate(sequential, elapsed)
    );

    // Many confirmed publishes in flight on the shared confirm channel.
    let start = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..messages)
        .map(|n| {
            let broker = broker.clone();
            let exchange = exchange.clone();
            async move { broker.publish(&exchange, "bench.many", message(n)).await }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let published = start.elapsed();
    if let Some(error) = results.into_iter().find_map(Result::err) {
        return Err(error.to_string());
    }
    println!(
        "publish, confirmed, {in_flight} in flight:       {}",
        rate(messages, published)
    );
    let elapsed = consume_all(&broker, &queue, messages).await?;
    println!(
        "consume + ack, prefetch {PREFETCH}:           {}",
        rate(messages, elapsed)
    );

    broker
        .delete_queue(&queue)
        .await
        .map_err(|error| error.to_string())?;
    broker
        .delete_exchange(&exchange)
        .await
        .map_err(|error| error.to_string())?;
    broker.close().await;
    Ok(())
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
