//! `WorkQueue` (tsuru's Q) and `Jobs` (tasqueue) against the embedded
//! `MemoryBroker`: delays, waiting gets, release, handlers with backoff and
//! dead-lettering, job statuses, retries, the failed queue, and interrupted
//! jobs never recorded successful. Retry delays past the brokers' limit and
//! failed moves of a failed message run on both brokers (RabbitMQ at
//! `AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).

mod client_support;
mod local_services;

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_support::{EVENTUALLY, Flaky, eventually, next, unique};
use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig};
use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::broker::{Broker, BrokerError, MAX_DELAY, QueueType};
use exchange_runtime::consumer::HandlerError;
use exchange_runtime::jobs::{
    BACKOFF_CAP_HEADER, Job, JobContext, JobId, JobStatus, Jobs, MemoryStatusStore, StatusStore,
    TIMEOUT_HEADER,
};
use exchange_runtime::queue::{
    ATTEMPTS_HEADER, Backoff, DEFAULT_DELIVERY_LIMIT, HandlerOptions, LAST_ERROR_HEADER,
    QueueError, QueueHandler, QueueMessage, QueueSettings, Received, WorkQueue,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

const NONE_WINDOW: Duration = Duration::from_millis(100);

/// A work queue `name` on a fresh embedded broker.
async fn memory_queue(name: &str) -> WorkQueue<MemoryBroker> {
    WorkQueue::open(MemoryBroker::new(), name).await.unwrap()
}

/// A work queue `name` on a fresh embedded broker, holding `message` (put with no delay).
async fn memory_queue_holding(name: &str, message: QueueMessage) -> WorkQueue<MemoryBroker> {
    let queue = memory_queue(name).await;
    queue.put(message, Duration::ZERO).await.unwrap();
    queue
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_in_order() {
    let queue = memory_queue("plain").await;
    assert_eq!(queue.dead_letter_queue(), "plain.dead");
    queue
        .put(QueueMessage::new("one").with_id("1"), Duration::ZERO)
        .await
        .unwrap();
    queue
        .put(
            QueueMessage::new("two").with_header("kind", "x"),
            Duration::ZERO,
        )
        .await
        .unwrap();
    let first = queue.get(EVENTUALLY).await.unwrap().expect("first message");
    assert_eq!(first.message.body, b"one");
    assert_eq!(first.message.message_id.as_deref(), Some("1"));
    assert_eq!(first.attempts, 0);
    assert!(!first.redelivered);
    // A second get while the first is held returns the next message.
    let second = queue
        .get(EVENTUALLY)
        .await
        .unwrap()
        .expect("second message");
    assert_eq!(second.message.body, b"two");
    assert_eq!(
        second.message.headers.get("kind").map(String::as_str),
        Some("x")
    );
    queue.delete(first).await.unwrap();
    queue.delete(second).await.unwrap();
    assert!(queue.get(NONE_WINDOW).await.unwrap().is_none());
    assert!(queue.pending().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_waits_for_a_message_put_later() {
    let queue = memory_queue("waiting").await;
    let putter = queue.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        putter
            .put(QueueMessage::new("late"), Duration::ZERO)
            .await
            .unwrap();
    });
    let started = Instant::now();
    let message = queue
        .get(EVENTUALLY)
        .await
        .unwrap()
        .expect("the late message");
    assert_eq!(message.message.body, b"late");
    assert!(started.elapsed() < EVENTUALLY);
    queue.delete(message).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_put_is_not_delivered_early() {
    let queue = memory_queue("delayed").await;
    let put_at = Instant::now();
    queue
        .put(QueueMessage::new("later"), Duration::from_millis(500))
        .await
        .unwrap();
    assert!(
        queue.get(NONE_WINDOW).await.unwrap().is_none(),
        "delivered early"
    );
    let message = queue
        .get(EVENTUALLY)
        .await
        .unwrap()
        .expect("delivered after the delay");
    assert!(
        put_at.elapsed() >= Duration::from_millis(500),
        "delivered early"
    );
    queue.delete(message).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_puts_back_after_the_delay_with_one_more_attempt() {
    let queue = memory_queue_holding("released", QueueMessage::new("job").with_id("m1")).await;
    let message = queue.get(EVENTUALLY).await.unwrap().unwrap();
    let released_at = Instant::now();
    queue
        .release(message, Duration::from_millis(400))
        .await
        .unwrap();
    assert!(
        queue.get(NONE_WINDOW).await.unwrap().is_none(),
        "released early"
    );
    let again = queue
        .get(EVENTUALLY)
        .await
        .unwrap()
        .expect("released message");
    assert!(released_at.elapsed() >= Duration::from_millis(400));
    assert_eq!(again.attempts, 1);
    assert_eq!(again.message.message_id.as_deref(), Some("m1"));
    assert_eq!(again.message.headers[ATTEMPTS_HEADER], "1");
    // Released at once: back immediately, attempts counting on.
    queue.release(again, Duration::ZERO).await.unwrap();
    let third = queue.get(EVENTUALLY).await.unwrap().unwrap();
    assert_eq!(third.attempts, 2);
    queue.delete(third).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_message_returns_to_the_queue() {
    let queue = memory_queue_holding("dropped", QueueMessage::new("keep me")).await;
    let message = queue.get(EVENTUALLY).await.unwrap().unwrap();
    drop(message);
    let again = queue
        .get(EVENTUALLY)
        .await
        .unwrap()
        .expect("back in the queue");
    assert_eq!(again.message.body, b"keep me");
    assert!(again.redelivered);
    assert_eq!(again.attempts, 0, "not a failed attempt");
    queue.delete(again).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_moves_a_message_with_its_error() {
    let queue = memory_queue_holding("poison", QueueMessage::new("bad")).await;
    let message = queue.get(EVENTUALLY).await.unwrap().unwrap();
    queue.dead_letter(message, "cannot parse").await.unwrap();
    assert!(queue.pending().await.unwrap().is_empty());
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"bad");
    assert_eq!(dead[0].headers[LAST_ERROR_HEADER], "cannot parse");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_headers_are_refused() {
    let queue = memory_queue("headers").await;
    let error = queue
        .put(
            QueueMessage::new("x").with_header("X-Death", "1"),
            Duration::ZERO,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, QueueError::InvalidHeader { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("`headers`") && error.to_string().contains("X-Death"));
    assert!(queue.pending().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_queue_name_is_refused() {
    let error = WorkQueue::open(MemoryBroker::new(), "").await.unwrap_err();
    assert!(
        matches!(&error, QueueError::InvalidName { name, .. } if name.is_empty()),
        "{error:?}"
    );
    assert!(error.to_string().contains("needs a name"), "{error}");
    let error = Jobs::builder(MemoryBroker::new(), "")
        .build()
        .await
        .err()
        .expect("an empty name is refused");
    assert!(error.to_string().contains("needs a name"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempts_header_at_its_maximum_does_not_overflow() {
    // A foreign message claiming u32::MAX earlier attempts: its first failure
    // dead-letters it, the count staying at the maximum.
    let queue = memory_queue("worn-out").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let handler = queue.handler(move |_received: Received| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Err(HandlerError::msg("still failing")) }
    });
    let worn = QueueMessage::new("old").with_header(ATTEMPTS_HEADER, u32::MAX.to_string());
    queue.put(worn, Duration::ZERO).await.unwrap();
    handler.start().await.unwrap();
    eventually("the message dead-lettered", || async {
        queue.dead_letters().await.unwrap().len() == 1
    })
    .await;
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead[0].headers[ATTEMPTS_HEADER], u32::MAX.to_string());
    assert_eq!(dead[0].headers[LAST_ERROR_HEADER], "still failing");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    handler.stop().unwrap();
    handler.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_handler_deletes_on_success_and_backs_off_then_dead_letters_failures() {
    let queue = memory_queue("handled").await;
    let (sender, mut runs) = mpsc::unbounded_channel::<(Vec<u8>, u32, Instant)>();
    let options = HandlerOptions {
        concurrency: 2,
        max_attempts: Some(3),
        backoff: Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        },
        drain_timeout: None,
    };
    let handler = queue
        .handler_with(options, move |received: Received| {
            let _ = sender.send((
                received.message.body.clone(),
                received.attempts,
                Instant::now(),
            ));
            async move {
                if received.message.body == b"bad" {
                    Err(HandlerError::msg(format!(
                        "failure {}",
                        received.attempts + 1
                    )))
                } else {
                    Ok(())
                }
            }
        })
        .unwrap();
    handler.start().await.unwrap();
    handler.start().await.unwrap();
    queue
        .put(QueueMessage::new("good"), Duration::ZERO)
        .await
        .unwrap();
    queue
        .put(QueueMessage::new("bad"), Duration::ZERO)
        .await
        .unwrap();

    let mut bad_runs = Vec::new();
    let mut good_runs = 0;
    while bad_runs.len() < 3 {
        let (body, attempts, at) = next(&mut runs, "handler runs").await;
        if body == b"bad" {
            bad_runs.push((attempts, at));
        } else {
            good_runs += 1;
        }
    }
    assert_eq!(good_runs, 1);
    assert_eq!(
        bad_runs.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    // Exponential backoff: at least 100 ms, then at least 200 ms.
    assert!(bad_runs[1].1 - bad_runs[0].1 >= Duration::from_millis(100));
    assert!(bad_runs[2].1 - bad_runs[1].1 >= Duration::from_millis(200));

    eventually("the bad message dead-lettered", || async {
        queue.dead_letters().await.unwrap().len() == 1
    })
    .await;
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead[0].body, b"bad");
    assert_eq!(dead[0].headers[LAST_ERROR_HEADER], "failure 3");
    assert_eq!(dead[0].headers[ATTEMPTS_HEADER], "3");
    assert!(queue.pending().await.unwrap().is_empty());

    handler.stop().unwrap();
    handler.wait().await;
    assert!(handler.stop().is_err(), "stopping a stopped handler");
    tokio::time::sleep(NONE_WINDOW).await;
    assert!(runs.try_recv().is_err(), "ran again after dead-lettering");
}

// ---- Jobs ----

async fn jobs_with(
    broker: MemoryBroker,
    queue: &str,
    store: Arc<MemoryStatusStore>,
    drain: Option<Duration>,
    register: impl FnOnce(
        exchange_runtime::jobs::JobsBuilder<MemoryBroker>,
    ) -> exchange_runtime::jobs::JobsBuilder<MemoryBroker>,
) -> Jobs<MemoryBroker> {
    let mut builder = Jobs::builder(broker, queue).store(store);
    if let Some(limit) = drain {
        builder = builder.drain_timeout(limit);
    }
    register(builder).build().await.unwrap()
}

async fn status(jobs: &Jobs<MemoryBroker>, id: &JobId) -> JobStatus {
    jobs.status(id)
        .await
        .unwrap()
        .expect("a recorded job")
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_goes_queued_processing_successful() {
    let release = Arc::new(tokio::sync::Notify::new());
    let release2 = Arc::clone(&release);
    let (sender, mut seen) = mpsc::unbounded_channel::<JobContext>();
    let store = Arc::new(MemoryStatusStore::new());
    let jobs = jobs_with(MemoryBroker::new(), "jobs-ok", store, None, |b| {
        b.register("send-email", move |job: JobContext| {
            let release = Arc::clone(&release2);
            let _ = sender.send(job.clone());
            async move {
                let payload: serde_json::Value = job.json()?;
                assert_eq!(payload["to"], "someone@example.com");
                release.notified().await;
                Ok(())
            }
        })
    })
    .await;

    let id = jobs
        .enqueue(
            Job::json(
                "send-email",
                &serde_json::json!({"to": "someone@example.com"}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(status(&jobs, &id).await, JobStatus::Queued);
    let pending = jobs.pending().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id.as_ref(), Some(&id));
    assert_eq!(pending[0].name.as_deref(), Some("send-email"));

    jobs.start().await.unwrap();
    let context = next(&mut seen, "the job runs").await;
    assert_eq!(context.id, id);
    assert_eq!(context.retried, 0);
    assert_eq!(status(&jobs, &id).await, JobStatus::Processing);
    assert!(
        jobs.pending().await.unwrap().is_empty(),
        "taken off the queue"
    );
    release.notify_one();
    eventually("the job is successful", || async {
        status(&jobs, &id).await == JobStatus::Successful
    })
    .await;
    assert_eq!(jobs.successful().await.unwrap(), vec![id.clone()]);
    assert!(jobs.failed().await.unwrap().is_empty());
    let record = jobs.status(&id).await.unwrap().unwrap();
    assert_eq!((record.retried, record.last_error), (0, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_jobs_retry_with_backoff_then_land_in_the_failed_queue() {
    let (sender, mut seen) = mpsc::unbounded_channel::<(u32, Option<String>, Instant)>();
    let store = Arc::new(MemoryStatusStore::new());
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let (store2, statuses2) = (Arc::clone(&store), Arc::clone(&statuses));
    let jobs = jobs_with(
        MemoryBroker::new(),
        "jobs-fail",
        Arc::clone(&store),
        None,
        |b| {
            b.register("flaky", move |job: JobContext| {
                let _ = sender.send((job.retried, job.last_error.clone(), Instant::now()));
                let (store, statuses) = (Arc::clone(&store2), Arc::clone(&statuses2));
                async move {
                    // The status while running, as seen from inside.
                    let record = store.get(&job.id).await.unwrap().unwrap();
                    statuses
                        .lock()
                        .unwrap()
                        .push((record.status, record.retried));
                    Err(HandlerError::msg(format!("attempt {} failed", job.retried)))
                }
            })
        },
    )
    .await;
    jobs.start().await.unwrap();
    let id = jobs
        .enqueue(
            Job::new("flaky", "payload")
                .max_retries(2)
                .backoff(Duration::from_millis(100), Duration::from_secs(2)),
        )
        .await
        .unwrap();

    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(next(&mut seen, "three runs").await);
    }
    assert_eq!(
        runs.iter()
            .map(|(r, e, _)| (*r, e.clone()))
            .collect::<Vec<_>>(),
        [
            (0, None),
            (1, Some("attempt 0 failed".to_owned())),
            (2, Some("attempt 1 failed".to_owned())),
        ]
    );
    assert!(
        runs[1].2 - runs[0].2 >= Duration::from_millis(100),
        "retried early"
    );
    assert!(
        runs[2].2 - runs[1].2 >= Duration::from_millis(200),
        "no exponential backoff"
    );

    eventually("the job failed for good", || async {
        status(&jobs, &id).await == JobStatus::Failed
    })
    .await;
    let record = jobs.status(&id).await.unwrap().unwrap();
    assert_eq!(record.retried, 3);
    assert_eq!(record.last_error.as_deref(), Some("attempt 2 failed"));
    assert_eq!(jobs.failed().await.unwrap(), vec![id.clone()]);
    assert!(jobs.successful().await.unwrap().is_empty());
    eventually("the job in the failed queue", || async {
        jobs.failed_messages().await.unwrap().len() == 1
    })
    .await;
    let failed = jobs.failed_messages().await.unwrap();
    assert_eq!(failed[0].id.as_ref(), Some(&id));
    assert_eq!(failed[0].last_error.as_deref(), Some("attempt 2 failed"));
    assert_eq!(failed[0].retried, 3);
    assert_eq!(failed[0].payload, b"payload");
    assert_eq!(
        *statuses.lock().unwrap(),
        [
            (JobStatus::Processing, 0),
            (JobStatus::Processing, 1),
            (JobStatus::Processing, 2)
        ]
    );
    tokio::time::sleep(NONE_WINDOW).await;
    assert!(
        seen.try_recv().is_err(),
        "ran more than max_retries + 1 times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_its_retry_is_recorded_retrying() {
    let store = Arc::new(MemoryStatusStore::new());
    let jobs = jobs_with(MemoryBroker::new(), "jobs-retrying", store, None, |b| {
        b.register("once", |_job: JobContext| async {
            Err(HandlerError::msg("not yet"))
        })
    })
    .await;
    jobs.start().await.unwrap();
    let id = jobs
        .enqueue(Job::new("once", "").backoff(Duration::from_secs(60), Duration::from_secs(60)))
        .await
        .unwrap();
    eventually("the job is retrying", || async {
        status(&jobs, &id).await == JobStatus::Retrying
    })
    .await;
    let record = jobs.status(&id).await.unwrap().unwrap();
    assert_eq!(
        (record.retried, record.last_error.as_deref()),
        (1, Some("not yet"))
    );
    // Waiting out its backoff: not ready in the queue.
    assert!(jobs.pending().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_interrupted_by_stop_is_never_successful_and_runs_again() {
    let broker = MemoryBroker::new();
    let store = Arc::new(MemoryStatusStore::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let started2 = Arc::clone(&started);
    let stuck = jobs_with(
        broker.clone(),
        "jobs-interrupted",
        Arc::clone(&store),
        Some(Duration::from_millis(100)),
        |b| {
            b.register("long", move |_job: JobContext| {
                let started = Arc::clone(&started2);
                async move {
                    started.notify_one();
                    // Would run (and succeed) long after the worker stops.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }
            })
        },
    )
    .await;
    stuck.start().await.unwrap();
    let id = stuck.enqueue(Job::new("long", "")).await.unwrap();
    tokio::time::timeout(EVENTUALLY, started.notified())
        .await
        .expect("the job starts");
    assert_eq!(status(&stuck, &id).await, JobStatus::Processing);
    stuck.stop().unwrap();
    tokio::time::timeout(EVENTUALLY, stuck.wait())
        .await
        .expect("the worker stops after its drain timeout");
    assert_eq!(status(&stuck, &id).await, JobStatus::Queued);
    assert!(stuck.successful().await.unwrap().is_empty());
    let pending = stuck.pending().await.unwrap();
    assert_eq!(pending.len(), 1, "the job is back in the queue");
    assert_eq!(
        pending[0].retried, 0,
        "an interruption is not a failed attempt"
    );

    // Another worker on the same queue and store finishes it.
    let runs = Arc::new(AtomicUsize::new(0));
    let runs2 = Arc::clone(&runs);
    let worker = jobs_with(broker, "jobs-interrupted", store, None, |b| {
        b.register("long", move |_job: JobContext| {
            runs2.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
    })
    .await;
    worker.start().await.unwrap();
    eventually("the job succeeds on the second worker", || async {
        status(&worker, &id).await == JobStatus::Successful
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_timeouts_are_failures_never_successes() {
    let store = Arc::new(MemoryStatusStore::new());
    let jobs = jobs_with(MemoryBroker::new(), "jobs-broken", store, None, |b| {
        b.register("panics", |_job: JobContext| async {
            panic!("bug in the handler");
        })
        .register("hangs", |_job: JobContext| async {
            std::future::pending::<()>().await;
            Ok(())
        })
        .concurrency(2)
    })
    .await;
    jobs.start().await.unwrap();
    let panicking = jobs
        .enqueue(Job::new("panics", "").max_retries(0))
        .await
        .unwrap();
    let hanging = jobs
        .enqueue(
            Job::new("hangs", "")
                .max_retries(0)
                .timeout(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let unknown = jobs
        .enqueue(Job::new("nobody-handles-this", "").max_retries(0))
        .await
        .unwrap();
    for (id, error) in [
        (&panicking, "handler panicked: bug in the handler"),
        (&hanging, "timed out after 100ms"),
        (
            &unknown,
            "no handler is registered for job `nobody-handles-this`",
        ),
    ] {
        eventually("the job failed", || async {
            status(&jobs, id).await == JobStatus::Failed
        })
        .await;
        let record = jobs.status(id).await.unwrap().unwrap();
        assert_eq!(record.last_error.as_deref(), Some(error));
    }
    assert!(jobs.successful().await.unwrap().is_empty());
    let mut failed = jobs.failed().await.unwrap();
    failed.sort();
    let mut expected = vec![panicking, hanging, unknown];
    expected.sort();
    assert_eq!(failed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_with_unbounded_durations_still_run() {
    // `Duration::MAX` (no cap, no timeout) has more milliseconds than a
    // header's u64 holds: written as u64::MAX, not as a value workers refuse.
    let store = Arc::new(MemoryStatusStore::new());
    let jobs = jobs_with(MemoryBroker::new(), "jobs-unbounded", store, None, |b| {
        b.register("patient", |_job: JobContext| async { Ok(()) })
    })
    .await;
    let job = Job::new("patient", "")
        .backoff(Duration::from_millis(10), Duration::MAX)
        .timeout(Duration::MAX);
    let id = jobs.enqueue(job).await.unwrap();
    let pending = jobs.queue().pending().await.unwrap();
    assert_eq!(pending[0].headers[TIMEOUT_HEADER], u64::MAX.to_string());
    assert_eq!(pending[0].headers[BACKOFF_CAP_HEADER], u64::MAX.to_string());
    jobs.start().await.unwrap();
    eventually("the job is successful", || async {
        status(&jobs, &id).await == JobStatus::Successful
    })
    .await;
    assert!(jobs.failed_messages().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_handlers_refuse_to_start_and_stop_needs_running_workers() {
    let jobs = Jobs::builder(MemoryBroker::new(), "jobs-empty")
        .build()
        .await
        .unwrap();
    let error = jobs.start().await.unwrap_err();
    assert!(error.to_string().contains("no job handler"), "{error}");
    let error = jobs.stop().unwrap_err();
    assert!(error.to_string().contains("`jobs-empty`"), "{error}");
    // A producer-only instance still enqueues.
    let id = jobs.enqueue(Job::new("later", "x")).await.unwrap();
    assert_eq!(status(&jobs, &id).await, JobStatus::Queued);
    let error = jobs.enqueue(Job::new("", "x")).await.unwrap_err();
    assert!(error.to_string().contains("needs a name"), "{error}");
}

// ---- Delays past the brokers' limit, and failed moves of failed messages ----

/// Longer than the longest delay a broker keeps ([`MAX_DELAY`], about 49.7 days).
const SIXTY_DAYS: Duration = Duration::from_secs(60 * 86_400);
/// How long to watch for runs that must not happen.
const WATCH: Duration = Duration::from_millis(500);

async fn rabbitmq() -> AmqpBroker {
    let url = local_services::rabbitmq_url();
    let config = AmqpConfig::from_url(&url)
        .expect("AMQP_URL must be a valid amqp:// URL")
        .with_connection_name("exchange-runtime-queue-jobs-tests");
    AmqpBroker::connect(config)
        .await
        .unwrap_or_else(|error| panic!("RabbitMQ is required at {url} ({error})"))
}

fn on_rabbitmq<B: Broker>(broker: &B) -> bool {
    (broker as &dyn Any).is::<AmqpBroker>()
}

/// The queue RabbitMQ parks messages delayed by [`MAX_DELAY`] in.
fn longest_tier<B: Broker>(queue: &WorkQueue<B>) -> String {
    format!("{}.delay.{}", queue.name(), MAX_DELAY.as_millis())
}

/// On RabbitMQ, checks that `count` messages wait out [`MAX_DELAY`]; the
/// embedded broker keeps delayed messages in timers, out of sight.
async fn assert_parked<B: Broker>(queue: &WorkQueue<B>, count: usize) {
    if on_rabbitmq(queue.broker()) {
        let parked = queue.broker().pending(&longest_tier(queue)).await;
        assert_eq!(parked.expect("the longest delay's queue").len(), count);
    }
}

/// Deletes a work queue, its dead-letter queue and, on RabbitMQ, its
/// longest delay's queue (whose messages would otherwise wait 49 days).
async fn remove<B: Broker>(queue: &WorkQueue<B>) {
    let broker = queue.broker();
    for name in [queue.name(), queue.dead_letter_queue()] {
        broker.delete_queue(name).await.unwrap();
    }
    if on_rabbitmq(broker) {
        match broker.delete_queue(&longest_tier(queue)).await {
            Ok(()) | Err(BrokerError::QueueNotFound(_)) => {}
            Err(error) => panic!("deleting the longest delay's queue: {error}"),
        }
    }
}

/// Polls `check` until it is true (`true`) or `limit` passes (`false`).
async fn within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// What the always-failing handlers of these tests fail with.
const ALWAYS: &str = "always fails";

/// A quick backoff: 50 ms, doubling up to 1 s.
const QUICK: Backoff = Backoff {
    base: Duration::from_millis(50),
    cap: Duration::from_secs(1),
};

/// A handler of `queue` failing every run, and the attempt counts it ran with.
fn failing_handler<B: Broker>(
    queue: &WorkQueue<B>,
    max_attempts: Option<u32>,
    backoff: Backoff,
) -> (QueueHandler<B>, Arc<Mutex<Vec<u32>>>) {
    let options = HandlerOptions {
        max_attempts,
        backoff,
        ..HandlerOptions::default()
    };
    let runs = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&runs);
    let handler = queue
        .handler_with(options, move |received: Received| {
            record.lock().unwrap().push(received.attempts);
            async { Err(HandlerError::msg(ALWAYS)) }
        })
        .unwrap();
    (handler, runs)
}

/// Whether a message reaches the dead-letter queue within 3 s; then waits
/// [`NONE_WINDOW`] more for runs that must not come.
async fn dead_lettered<B: Broker>(queue: &WorkQueue<B>) -> bool {
    let arrived = within(Duration::from_secs(3), || async {
        queue
            .dead_letters()
            .await
            .is_ok_and(|dead| !dead.is_empty())
    })
    .await;
    tokio::time::sleep(NONE_WINDOW).await;
    arrived
}

/// Work queues are quorum queues by default; a message whose consumer
/// keeps going away without settling it (dropped here, as by a crash) is
/// dead-lettered by the broker once it came back more often than the
/// delivery limit: delivered `limit + 1` times.
async fn a_message_that_keeps_coming_back_is_dead_lettered_past_the_delivery_limit<B: Broker>(
    broker: B,
) {
    assert_eq!(
        QueueSettings::default(),
        QueueSettings {
            queue_type: QueueType::Quorum,
            delivery_limit: Some(DEFAULT_DELIVERY_LIMIT),
        }
    );
    let settings = QueueSettings {
        delivery_limit: Some(2),
        ..QueueSettings::default()
    };
    let queue = WorkQueue::open_with(broker, &unique("delivery-limit"), settings)
        .await
        .unwrap();
    let message = QueueMessage::new("crashes its consumer").with_id("crasher");
    queue.put(message, Duration::ZERO).await.unwrap();
    let mut deliveries = 0;
    while let Some(taken) = queue.get(Duration::from_secs(1)).await.unwrap() {
        deliveries += 1;
        assert_eq!(taken.redelivered, deliveries > 1, "delivery {deliveries}");
        assert!(deliveries <= 3, "delivered more than limit + 1 times");
        drop(taken);
    }
    // On RabbitMQ a dropped message's requeue (its acker's nack) races its
    // subscription's close, so one drop may count as two returns.
    let fewest = if on_rabbitmq(queue.broker()) { 2 } else { 3 };
    assert!(deliveries >= fewest, "delivered {deliveries} times");
    assert!(dead_lettered(&queue).await, "dead-lettered");
    assert!(queue.get(NONE_WINDOW).await.unwrap().is_none());
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message_id.as_deref(), Some("crasher"));
    assert!(!dead[0].headers.contains_key(LAST_ERROR_HEADER));
    let classic_with_limit = QueueSettings {
        delivery_limit: Some(2),
        ..QueueSettings::classic()
    };
    let refused = WorkQueue::open_with(
        queue.broker().clone(),
        &unique("classic-limit"),
        classic_with_limit,
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(QueueError::Broker {
                source: BrokerError::Invalid(_),
                ..
            })
        ),
        "{refused:?}"
    );
    remove(&queue).await;
}

/// A job failing every run with a 60-day backoff runs once, then waits
/// (recorded `retrying`) for its retry, delayed by the longest delay.
async fn a_job_backing_off_past_the_limit_runs_once<B: Broker>(broker: B) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let jobs = Jobs::builder(broker, unique("jobs-sixty-days"))
        .register("fails", move |_job: JobContext| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::msg("always fails")) }
        })
        .build()
        .await
        .unwrap();
    let job = Job::new("fails", "")
        .max_retries(3)
        .backoff(SIXTY_DAYS, SIXTY_DAYS);
    let id = jobs.enqueue(job).await.unwrap();
    jobs.start().await.unwrap();
    eventually("the job ran", || async { runs.load(Ordering::SeqCst) > 0 }).await;
    tokio::time::sleep(WATCH).await;
    let record = jobs.status(&id).await.unwrap().expect("a recorded job");
    assert_eq!(
        (runs.load(Ordering::SeqCst), record.status, record.retried),
        (1, JobStatus::Retrying, 1),
        "runs in {WATCH:?}, status, retried"
    );
    assert!(jobs.pending().await.unwrap().is_empty(), "retried early");
    assert!(jobs.failed_messages().await.unwrap().is_empty());
    assert_parked(jobs.queue(), 1).await;
    jobs.stop().unwrap();
    jobs.wait().await;
    remove(jobs.queue()).await;
}

/// A handler failing every run with a 60-day backoff runs once, its message
/// released for the longest delay.
async fn a_handler_backing_off_past_the_limit_runs_once<B: Broker>(broker: B) {
    let queue = WorkQueue::open(broker, &unique("handler-sixty-days"))
        .await
        .unwrap();
    let sixty_days = Backoff {
        base: SIXTY_DAYS,
        cap: SIXTY_DAYS,
    };
    let (handler, runs) = failing_handler(&queue, Some(3), sixty_days);
    queue
        .put(QueueMessage::new("stubborn"), Duration::ZERO)
        .await
        .unwrap();
    handler.start().await.unwrap();
    eventually("the handler ran", || async {
        !runs.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(WATCH).await;
    assert_eq!(
        *runs.lock().unwrap(),
        [0],
        "attempts of the runs in {WATCH:?}"
    );
    assert!(queue.pending().await.unwrap().is_empty(), "released early");
    assert!(queue.dead_letters().await.unwrap().is_empty());
    assert_parked(&queue, 1).await;
    handler.stop().unwrap();
    handler.wait().await;
    remove(&queue).await;
}

/// A handler failing for good whose dead-letter queue was deleted: the
/// queue is declared again and the message lands there, after one run.
/// Classic queues: RabbitMQ 3.10 finishes deleting a quorum queue after
/// `queue.delete` answers, so declaring it again at once may race the
/// deletion (the copy is then returned and the message runs again).
async fn a_deleted_dead_letter_queue_is_declared_again<B: Broker>(broker: B) {
    let queue = WorkQueue::open_with(broker, &unique("handler-no-dead"), QueueSettings::classic())
        .await
        .unwrap();
    let (handler, runs) = failing_handler(&queue, Some(1), Backoff::default());
    // Started first: subscribing declares the dead-letter queue again.
    handler.start().await.unwrap();
    queue
        .broker()
        .delete_queue(queue.dead_letter_queue())
        .await
        .unwrap();
    queue
        .put(QueueMessage::new("doomed"), Duration::ZERO)
        .await
        .unwrap();
    let dead_lettered = dead_lettered(&queue).await;
    assert_eq!(
        (dead_lettered, runs.lock().unwrap().len()),
        (true, 1),
        "dead-lettered, runs"
    );
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead[0].headers[LAST_ERROR_HEADER], ALWAYS);
    handler.stop().unwrap();
    handler.wait().await;
    remove(&queue).await;
}

/// Runs each generic test on both brokers, as `<test>::in_memory` and `<test>::on_rabbitmq`.
macro_rules! on_both_brokers {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn in_memory() {
                    super::$test(super::MemoryBroker::new()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn on_rabbitmq() {
                    super::$test(super::rabbitmq().await).await;
                }
            }
        )*
    };
}

on_both_brokers!(
    a_message_that_keeps_coming_back_is_dead_lettered_past_the_delivery_limit,
    a_job_backing_off_past_the_limit_runs_once,
    a_handler_backing_off_past_the_limit_runs_once,
    a_deleted_dead_letter_queue_is_declared_again,
);

/// Puts a message into `queue` past `broker`'s injected failures.
async fn put_past(broker: &Flaky, queue: &WorkQueue<Flaky>) {
    let message = QueueMessage::new("stubborn");
    let outgoing = exchange_runtime::broker::OutgoingMessage {
        body: message.body,
        ..Default::default()
    };
    broker
        .inner
        .publish_delayed(queue.name(), outgoing, Duration::ZERO)
        .await
        .unwrap();
}

/// The embedded broker, wrapped to fail every `publish_delayed` with a delay of at least `least`.
fn failing_delays(least: Duration) -> Flaky {
    let broker = Flaky::new(MemoryBroker::new(), 0, 0);
    *broker.fail_delays_from.lock().unwrap() = Some(least);
    broker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_delayed_publish_fails_still_counts_the_attempt() {
    let queue = WorkQueue::open(failing_delays(Duration::from_nanos(1)), "release-fails")
        .await
        .unwrap();
    let (handler, runs) = failing_handler(&queue, Some(3), QUICK);
    queue
        .put(QueueMessage::new("stubborn"), Duration::ZERO)
        .await
        .unwrap();
    handler.start().await.unwrap();
    let dead_lettered = dead_lettered(&queue).await;
    handler.stop().unwrap();
    handler.wait().await;
    let attempts = runs.lock().unwrap().clone();
    assert!(
        dead_lettered && attempts == [0, 1, 2],
        "dead-lettered: {dead_lettered}; {} runs, attempts {:?}...",
        attempts.len(),
        &attempts[..attempts.len().min(10)]
    );
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead[0].headers[ATTEMPTS_HEADER], "3");
    assert!(queue.pending().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_delayed_retry_fails_still_counts_the_attempt() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let jobs = Jobs::builder(failing_delays(Duration::from_nanos(1)), "jobs-retry-fails")
        .register("fails", move |job: JobContext| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Err(HandlerError::msg(format!("run {} failed", job.retried))) }
        })
        .build()
        .await
        .unwrap();
    let job = Job::new("fails", "")
        .max_retries(2)
        .backoff(Duration::from_millis(50), Duration::from_secs(1));
    let id = jobs.enqueue(job).await.unwrap();
    jobs.start().await.unwrap();
    let failed = within(Duration::from_secs(3), || async {
        !jobs.failed_messages().await.unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(NONE_WINDOW).await;
    jobs.stop().unwrap();
    jobs.wait().await;
    assert_eq!(
        (failed, runs.load(Ordering::SeqCst)),
        (true, 3),
        "failed for good, runs"
    );
    let record = jobs.status(&id).await.unwrap().expect("a recorded job");
    assert_eq!((record.status, record.retried), (JobStatus::Failed, 3));
    assert_eq!(record.last_error.as_deref(), Some("run 2 failed"));
    assert_eq!(jobs.failed_messages().await.unwrap()[0].retried, 3);
}

/// A handler always failing on a broker refusing every copy of a failed
/// message: its releases are requeued uncounted, but only after the copy's
/// tries and the hold, never in a tight loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_no_copy_of_which_is_accepted_is_requeued_slowly() {
    let broker = failing_delays(Duration::ZERO);
    let queue = WorkQueue::open(broker.clone(), "release-refused")
        .await
        .unwrap();
    let (handler, runs) = failing_handler(&queue, None, QUICK);
    put_past(&broker, &queue).await;
    handler.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    handler.stop().unwrap();
    handler.wait().await;
    // Each round: three tries of the delayed copy (100 + 200 ms apart), a
    // 50 ms hold, three tries of an immediate copy: at least 650 ms.
    let attempts = runs.lock().unwrap().clone();
    assert!(
        (1..=2).contains(&attempts.len()) && attempts.iter().all(|a| *a == 0),
        "{} runs in 1 s, attempts {:?}...",
        attempts.len(),
        &attempts[..attempts.len().min(10)]
    );
}

/// A failed message that no dead-letter copy of is accepted is rejected to
/// the queue's dead-letter exchange: in the dead-letter queue after one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_no_copy_of_which_is_accepted_is_rejected_to_the_dead_letter_queue() {
    let broker = failing_delays(Duration::ZERO);
    let queue = WorkQueue::open(broker.clone(), "dead-letter-refused")
        .await
        .unwrap();
    let (handler, runs) = failing_handler(&queue, Some(1), Backoff::default());
    put_past(&broker, &queue).await;
    handler.start().await.unwrap();
    let dead_lettered = dead_lettered(&queue).await;
    handler.stop().unwrap();
    handler.wait().await;
    assert_eq!(
        (dead_lettered, runs.lock().unwrap().len()),
        (true, 1),
        "dead-lettered, runs"
    );
    assert!(queue.pending().await.unwrap().is_empty());
}
