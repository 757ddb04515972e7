//! Jobs after tasqueue: enqueue, retry with backoff, fail into the failed
//! queue with the last error, watch statuses, and run a chain whose jobs pass
//! their results along. On the embedded broker and store by default; on
//! RabbitMQ and a shared Redis store with the options.
//!
//! ```sh
//! cargo run -p integration-tests --example jobs
//! cargo run -p integration-tests --example jobs -- --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f \
//!     --redis-url redis://127.0.0.1:6379/
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
use exchange_runtime::jobs::redis::RedisStore;
use exchange_runtime::jobs::{
    Job, JobContext, JobId, JobStatus, Jobs, MemoryStatusStore, StatusStore,
};

#[derive(Parser)]
#[command(about = "Run three jobs: one succeeds, one succeeds on retry, one fails for good")]
struct Args {
    /// RabbitMQ to use (`amqp://` or `amqps://`); the embedded broker when absent.
    #[arg(long)]
    amqp_url: Option<String>,
    /// Redis to keep job records and results in (shared by every worker
    /// using it); an in-process store when absent.
    #[arg(long)]
    redis_url: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let redis = match &args.redis_url {
        Some(url) => Some(RedisStore::connect(url, "example-jobs").await?),
        None => None,
    };
    let store: Arc<dyn StatusStore> = match &redis {
        Some(redis) => Arc::new(redis.clone()),
        None => Arc::new(MemoryStatusStore::new()),
    };
    let outcome = match args.amqp_url {
        Some(url) => run(AmqpBroker::connect_url(&url).await?, store).await,
        None => run(MemoryBroker::new(), store).await,
    };
    if let Some(redis) = redis {
        // The example's records are not worth keeping.
        redis.clear().await?;
    }
    outcome
}

async fn run<B: Broker>(broker: B, store: Arc<dyn StatusStore>) -> Result<(), Box<dyn Error>> {
    let flaky_attempts = Arc::new(AtomicU32::new(0));
    let attempts = flaky_attempts.clone();
    let jobs = Jobs::builder(broker, "example-jobs")
        .store(store)
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
        .register("add", |job: JobContext| async move {
            // Adds its payload to the previous chain step's result.
            let n: u64 = job.json()?;
            let before: u64 = job.previous_json()?.unwrap_or(0);
            job.save_json(&(before + n))
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

    let chain = jobs
        .enqueue_chain(vec![
            Job::json("add", &1)?,
            Job::json("add", &2)?,
            Job::json("add", &3)?,
        ])
        .await?;
    loop {
        let meta = jobs
            .chain(&chain)
            .await?
            .ok_or("the chain is not recorded")?;
        if matches!(meta.status, JobStatus::Successful | JobStatus::Failed) {
            let last = meta.jobs.last().ok_or("an empty chain")?;
            let result = jobs.result(last).await?.unwrap_or_default();
            println!(
                "chain {}: {} after {} jobs, result {}",
                meta.id,
                meta.status,
                meta.finished.len(),
                String::from_utf8_lossy(&result)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
