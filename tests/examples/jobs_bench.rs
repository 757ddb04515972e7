//! Jobs throughput: enqueues no-op jobs, then runs them, and prints jobs per
//! second for both phases and the store's round trips per job (counted by
//! `RedisStore::round_trips`: every request sent to Redis, script loads
//! included). Runs the embedded pair (`MemoryBroker` + `MemoryStatusStore`)
//! and, with `--amqp-url` and `--redis-url`, RabbitMQ + Redis.
//!
//! ```sh
//! cargo run --release -p integration-tests --example jobs_bench -- \
//!     --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f --redis-url redis://127.0.0.1:6379/
//! ```

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use exchange_runtime::broker::Broker;
use exchange_runtime::broker::amqp::AmqpBroker;
use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::consumer::HandlerError;
use exchange_runtime::jobs::redis::RedisStore;
use exchange_runtime::jobs::{Job, JobCallbacks, JobContext, Jobs, MemoryStatusStore, StatusStore};

#[derive(Parser)]
#[command(about = "Jobs per second and store round trips per job for no-op jobs")]
struct Args {
    /// How many jobs.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Jobs a worker runs at once, and enqueueing tasks.
    #[arg(long, default_value_t = 64)]
    concurrency: u16,
    /// RabbitMQ for the second run (needs --redis-url too).
    #[arg(long, requires = "redis_url")]
    amqp_url: Option<String>,
    /// Redis for the second run (needs --amqp-url too).
    #[arg(long, requires = "amqp_url")]
    redis_url: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let queue = format!("jobs-bench-{}", std::process::id());
    run(
        "MemoryBroker + MemoryStatusStore",
        MemoryBroker::new(),
        Arc::new(MemoryStatusStore::new()),
        None,
        &queue,
        &args,
    )
    .await?;
    if let (Some(amqp_url), Some(redis_url)) = (&args.amqp_url, &args.redis_url) {
        let store = RedisStore::connect(redis_url, &queue).await?;
        let result = run(
            "RabbitMQ + Redis",
            AmqpBroker::connect_url(amqp_url).await?,
            Arc::new(store.clone()),
            Some(&store),
            &queue,
            &args,
        )
        .await;
        store.clear().await?;
        result?;
    }
    Ok(())
}

async fn run<B: Broker>(
    label: &str,
    broker: B,
    store: Arc<dyn StatusStore>,
    redis: Option<&RedisStore>,
    queue: &str,
    args: &Args,
) -> Result<(), Box<dyn Error>> {
    let done = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(tokio::sync::Notify::new());
    let (count, all, wanted) = (Arc::clone(&done), Arc::clone(&finished), args.jobs);
    let jobs = Jobs::builder(broker.clone(), queue)
        .store(store)
        .concurrency(args.concurrency)
        .register_with(
            "noop",
            |_job: JobContext| async { Ok::<(), HandlerError>(()) },
            JobCallbacks::new().on_success(move |_| {
                if count.fetch_add(1, Ordering::SeqCst) + 1 == wanted {
                    all.notify_one();
                }
            }),
        )
        .build()
        .await?;
    let trips = || redis.map_or(0, RedisStore::round_trips);

    let before = trips();
    let enqueueing = Instant::now();
    // `concurrency` enqueuers at once: one alone waits out each publish confirm.
    let jobs = Arc::new(jobs);
    let mut enqueuers = tokio::task::JoinSet::new();
    let lanes = usize::from(args.concurrency.max(1));
    for lane in 0..lanes {
        let jobs = Arc::clone(&jobs);
        let share = args.jobs / lanes + usize::from(lane < args.jobs % lanes);
        enqueuers.spawn(async move {
            for _ in 0..share {
                jobs.enqueue(Job::new("noop", "")).await?;
            }
            Ok::<(), exchange_runtime::jobs::JobError>(())
        });
    }
    while let Some(finished) = enqueuers.join_next().await {
        finished??;
    }
    let enqueued = enqueueing.elapsed();
    let enqueue_trips = trips() - before;

    let before = trips();
    let running = Instant::now();
    jobs.start().await?;
    if tokio::time::timeout(Duration::from_secs(600), finished.notified())
        .await
        .is_err()
    {
        return Err(format!(
            "{label}: only {} of {} jobs ran within 10 minutes",
            done.load(Ordering::SeqCst),
            args.jobs
        )
        .into());
    }
    let ran = running.elapsed();
    let run_trips = trips() - before;
    jobs.stop()?;
    jobs.wait().await;
    for name in [jobs.queue().name(), jobs.queue().dead_letter_queue()] {
        broker.delete_queue(name).await?;
    }

    let n = args.jobs as f64;
    println!(
        "{label}: {} no-op jobs, {} enqueueing tasks, worker concurrency {}",
        args.jobs, args.concurrency, args.concurrency
    );
    println!(
        "  enqueue: {:>9.0} jobs/s ({enqueued:.2?})",
        n / enqueued.as_secs_f64()
    );
    println!(
        "  run:     {:>9.0} jobs/s ({ran:.2?})",
        n / ran.as_secs_f64()
    );
    if redis.is_some() {
        println!(
            "  Redis round trips per successful job: {:.3} (enqueue {:.3} + run {:.3})",
            (enqueue_trips + run_trips) as f64 / n,
            enqueue_trips as f64 / n,
            run_trips as f64 / n
        );
    } else {
        println!("  store round trips per job: none (in-process store)");
    }
    Ok(())
}
