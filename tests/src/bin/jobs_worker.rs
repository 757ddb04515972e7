//! A job worker process for `tests/tests/jobs_processes.rs`: RabbitMQ +
//! Redis, the handlers the test enqueues for, and one line on stdout per
//! thing it observes. Stops (draining) when its stdin closes.
//!
//! ```sh
//! jobs_worker AMQP_URL REDIS_URL KEY_PREFIX QUEUE WORKER_ID
//! ```
//!
//! Jobs (payload JSON):
//! - `work` `{"n": N, "outcome": "ok" | "fail" | "flaky", "ms": M}`: sleeps M ms;
//!   `ok` saves `2N` as its result, `fail` fails every run, `flaky` fails its
//!   first attempt and saves `2N` after.
//! - `step` `{"add": A, "ms": M}`: saves the previous job's result (0 if
//!   none) plus A.
//!
//! Lines: `RUN <worker> <job> <retried> <previous result or ->`, then
//! `END <worker> <job> <ok|err>`; `SUCCESS <worker> <job>` from the success
//! callback.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use exchange_runtime::broker::amqp::AmqpBroker;
use exchange_runtime::consumer::HandlerError;
use exchange_runtime::jobs::redis::RedisStore;
use exchange_runtime::jobs::{JobCallbacks, JobContext, JobRecord, Jobs};
use tokio::io::AsyncReadExt;

fn say(line: String) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    // The test reads these; a closed stdout ends the worker's usefulness anyway.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn field(value: &serde_json::Value, name: &str) -> Result<u64, HandlerError> {
    value[name]
        .as_u64()
        .ok_or_else(|| HandlerError::msg(format!("payload field `{name}` is not a number")))
}

async fn work(job: JobContext) -> Result<(), HandlerError> {
    let payload: serde_json::Value = job.json()?;
    say(format!("RUN {} {} {} -", job.worker, job.id, job.retried));
    tokio::time::sleep(Duration::from_millis(field(&payload, "ms")?)).await;
    let n = field(&payload, "n")?;
    let outcome = match payload["outcome"].as_str() {
        Some("ok") => Ok(()),
        Some("fail") => Err(HandlerError::msg("fails by design")),
        Some("flaky") if job.retried == 0 => Err(HandlerError::msg("first attempt fails")),
        Some("flaky") => Ok(()),
        other => Err(HandlerError::msg(format!("unknown outcome {other:?}"))),
    };
    if outcome.is_ok() {
        job.save_json(&(2 * n))?;
    }
    let word = if outcome.is_ok() { "ok" } else { "err" };
    say(format!("END {} {} {word}", job.worker, job.id));
    outcome
}

async fn step(job: JobContext) -> Result<(), HandlerError> {
    let payload: serde_json::Value = job.json()?;
    let before: Option<u64> = job.previous_json()?;
    let shown = before.map_or("-".to_owned(), |n| n.to_string());
    say(format!(
        "RUN {} {} {} {shown}",
        job.worker, job.id, job.retried
    ));
    tokio::time::sleep(Duration::from_millis(field(&payload, "ms")?)).await;
    job.save_json(&(before.unwrap_or(0) + field(&payload, "add")?))?;
    say(format!("END {} {} ok", job.worker, job.id));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [amqp_url, redis_url, prefix, queue, worker] = args.as_slice() else {
        return Err("usage: jobs_worker AMQP_URL REDIS_URL KEY_PREFIX QUEUE WORKER_ID".into());
    };
    let broker = AmqpBroker::connect_url(amqp_url).await?;
    let store = RedisStore::connect(redis_url, prefix).await?;
    let success = || {
        let worker = worker.clone();
        JobCallbacks::new()
            .on_success(move |record: &JobRecord| say(format!("SUCCESS {worker} {}", record.id)))
    };
    let jobs = Jobs::builder(broker, queue.as_str())
        .store(Arc::new(store))
        .worker_id(worker.as_str())
        .concurrency(4)
        .register_with("work", work, success())
        .register_with("step", step, success())
        .build()
        .await?;
    jobs.start().await?;
    say(format!("READY {worker}"));
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    jobs.stop()?;
    jobs.wait().await;
    say(format!("STOPPED {worker}"));
    Ok(())
}
