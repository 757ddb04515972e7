//! The Taskcluster sniffer from the Go client's docs, in Rust: bind
//! taskDefined and taskRunning for one worker type, print each typed event,
//! acknowledge after processing.
//!
//! ```sh
//! cargo run -p integration-tests --example sniffer                 # embedded broker, with demo events
//! cargo run -p integration-tests --example sniffer -- --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//!
//! On the embedded broker nothing else publishes, so the example publishes two
//! demo events itself and exits once it has printed them. On RabbitMQ it
//! listens until Ctrl-C.

use std::error::Error;

use clap::Parser;
use exchange_runtime::broker::amqp::AmqpBroker;
use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::broker::{Broker, ExchangeOptions};
use exchange_runtime::consumer::{ConsumerBuilder, DeliveryInfo, HandlerError};
use exchange_runtime::publisher::Publisher;
use exchange_runtime::{DecodeError, Exchange};
use taskcluster_exchanges::queue::{QueueMessage, TaskDefined, TaskRunning};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(about = "Print Taskcluster task events for one worker type")]
struct Args {
    /// RabbitMQ to listen on (`amqp://` or `amqps://`); the embedded broker when absent.
    #[arg(long)]
    amqp_url: Option<String>,
    /// The queue name (`queue/<user>/<name>` on Pulse); an exclusive anonymous queue when absent.
    #[arg(long)]
    queue: Option<String>,
    /// Provisioner of the worker type.
    #[arg(long, default_value = "aws-provisioner")]
    provisioner_id: String,
    /// Worker type to watch.
    #[arg(long, default_value = "gaia")]
    worker_type: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    match args.amqp_url.clone() {
        Some(url) => sniff(AmqpBroker::connect_url(&url).await?, args, false).await,
        None => sniff(MemoryBroker::new(), args, true).await,
    }
}

async fn sniff<B: Broker>(broker: B, args: Args, demo: bool) -> Result<(), Box<dyn Error>> {
    if demo {
        // On Pulse the queue service owns these exchanges; here we stand in for it.
        for exchange in [TaskDefined::EXCHANGE, TaskRunning::EXCHANGE] {
            let options = ExchangeOptions {
                passive: false,
                durable: true,
            };
            broker.declare_exchange(exchange, options).await?;
        }
    }
    let (printed, mut printed_rx) = mpsc::unbounded_channel::<()>();
    let mut builder = ConsumerBuilder::new(broker.clone())
        .bind(TaskDefined {
            worker_type: Some(args.worker_type.clone()),
            provisioner_id: Some(args.provisioner_id.clone()),
            ..Default::default()
        })?
        .bind(TaskRunning {
            worker_type: Some(args.worker_type.clone()),
            provisioner_id: Some(args.provisioner_id.clone()),
            ..Default::default()
        })?
        .prefetch(1);
    if let Some(queue) = &args.queue {
        builder = builder.queue(queue);
    }
    let consumer = builder.build(
        move |message: Result<QueueMessage, DecodeError>, info: DeliveryInfo| {
            let printed = printed.clone();
            async move {
                match message? {
                    QueueMessage::TaskDefined(m) => println!("Task {} defined", m.status.task_id),
                    QueueMessage::TaskRunning(m) => println!(
                        "Task {} running, (taken until {} by worker {})",
                        m.status.task_id, m.taken_until, m.worker_id
                    ),
                    other => println!("Unexpected message from {}: {other:?}", info.exchange),
                }
                println!("routing key {} ({:?})", info.routing_key, info.fields);
                println!("===========");
                let _ = printed.send(());
                // Returning Ok acknowledges the message *after* processing.
                Ok::<(), HandlerError>(())
            }
        },
    )?;
    consumer.start().await?;

    if demo {
        publish_demo_events(&broker, &args).await?;
        for _ in 0..2 {
            printed_rx.recv().await;
        }
    } else {
        tokio::signal::ctrl_c().await?;
    }
    consumer.stop()?;
    consumer.wait().await;
    Ok(())
}

async fn publish_demo_events<B: Broker>(broker: &B, args: &Args) -> Result<(), Box<dyn Error>> {
    let task_id = "fXYEnLHcQ3GLbTQb7lhNNQ";
    let status = serde_json::json!({
        "taskId": task_id, "taskGroupId": task_id, "schedulerId": "-",
        "provisionerId": args.provisioner_id, "workerType": args.worker_type,
        "deadline": "2026-11-27T10:00:00.000Z", "expires": "2027-11-26T10:00:00.000Z",
        "retriesLeft": 5, "state": "running",
        "runs": [{"runId": 0, "state": "running", "reasonCreated": "scheduled",
                  "scheduled": "2026-11-26T10:00:00.000Z", "workerGroup": "demo", "workerId": "worker-1"}]
    });
    let publisher = Publisher::new(broker.clone());
    let defined = TaskDefined {
        task_id: Some(task_id.into()),
        provisioner_id: Some(args.provisioner_id.clone()),
        worker_type: Some(args.worker_type.clone()),
        scheduler_id: Some("-".into()),
        task_group_id: Some(task_id.into()),
        ..Default::default()
    };
    let message = serde_json::from_value(serde_json::json!({"version": 1, "status": status}))?;
    publisher.publish(&defined, &message).await?;
    let running = TaskRunning {
        task_id: Some(task_id.into()),
        run_id: Some("0".into()),
        worker_group: Some("demo".into()),
        worker_id: Some("worker-1".into()),
        provisioner_id: Some(args.provisioner_id.clone()),
        worker_type: Some(args.worker_type.clone()),
        scheduler_id: Some("-".into()),
        task_group_id: Some(task_id.into()),
        ..Default::default()
    };
    let message = serde_json::from_value(serde_json::json!({
        "version": 1, "status": status, "runId": 0, "workerGroup": "demo",
        "workerId": "worker-1", "takenUntil": "2026-11-26T10:20:00.000Z"
    }))?;
    publisher.publish(&running, &message).await?;
    Ok(())
}
