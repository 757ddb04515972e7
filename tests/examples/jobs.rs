//! Jobs after tasqueue, on the embedded broker: enqueue, retry with backoff,
//! fail into the failed queue with the last error, and watch statuses.
//!
//! ```sh
//! cargo run -p integration-tests --example jobs
//! cargo run -p integration-tests --example jobs -- --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use clap::Parser;
use exchange_runtime::broker::Broker;
use exchange_runtime::broker::amqp::AmqpBroker;
use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::consumer::HandlerError;
use exchange_runtime::jobs::{Job, JobContext, JobId, JobStatus, Jobs};

#[derive(Parser)]
#[command(about = "Run three jobs: one succeeds, one succeeds on retry, one fails for good")]
struct Args {
    /// RabbitMQ to use (`amqp://` or `amqps://`); the embedded broker when absent.
    #[arg(long)]
    amqp_url: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    match Args::parse().amqp_url {
        Some(url) => run(AmqpBroker::connect_url(&url).await?).await,
        None => run(MemoryBroker::new()).await,
    }
}

async fn run<B: Broker>(broker: B) -> Result<(), Box<dyn Error>> {
    let flaky_attempts = Arc::new(AtomicU32::new(0));
    let attempts = flaky_attempts.clone();
    let jobs = Jobs::builder(broker, "example-jobs")
        .register("greet", |job: JobContext| async move {
            let name: String = job.json()?;
            println!("hello, {name}");
            Ok::<(), HandlerError>(())
        })
        .register("flaky", move |job: JobContext| {
            let attempts = attempts.clone();
            async move {
                if attempts.fetch_add(1, Ordering::SeqCst) < 2 {
                    return Err(HandlerError::msg(format!(
                        "attempt {} failed",
                        job.retried + 1
                    )));
                }
                println!(
                    "flaky job {} succeeded after {} retries",
                    job.id, job.retried
                );
                Ok(())
            }
        })
        .register("doomed", |_job: JobContext| async move {
            Err(HandlerError::msg("the disk is on fire"))
        })
        .build()
        .await?;

    let backoff = (Duration::from_millis(50), Duration::from_millis(400));
    let greet = jobs.enqueue(Job::json("greet", &"world")?).await?;
    let flaky = jobs
        .enqueue(
            Job::new("flaky", Vec::new())
                .max_retries(3)
                .backoff(backoff.0, backoff.1),
        )
        .await?;
    let doomed = jobs
        .enqueue(
            Job::new("doomed", Vec::new())
                .max_retries(2)
                .backoff(backoff.0, backoff.1),
        )
        .await?;
    println!("pending before start: {}", jobs.pending().await?.len());

    jobs.start().await?;
    for id in [&greet, &flaky, &doomed] {
        let record = wait_until_settled(&jobs, id).await?;
        println!(
            "job {} ({}): {} after {} retries{}",
            record.id,
            record.name,
            record.status,
            record.retried,
            record
                .last_error
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }
    println!("failed jobs: {:?}", jobs.failed().await?);
    jobs.stop()?;
    jobs.wait().await;
    Ok(())
}

async fn wait_until_settled<B: Broker>(
    jobs: &Jobs<B>,
    id: &JobId,
) -> Result<exchange_runtime::jobs::JobRecord, Box<dyn Error>> {
    loop {
        if let Some(record) = jobs.status(id).await?
            && matches!(record.status, JobStatus::Successful | JobStatus::Failed)
        {
            return Ok(record);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
