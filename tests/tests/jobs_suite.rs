//! The jobs suite: every case runs on both brokers (the embedded
//! `MemoryBroker` and RabbitMQ at `AMQP_URL`) and both stores (the in-process
//! `MemoryStatusStore` and the Redis `RedisStore` at `REDIS_URL`, default
//! `redis://127.0.0.1:6379/`), as `<case>::{memory,rabbitmq}_broker_{memory,redis}_store`.
//! Neither service is optional: a test binary whose service is down stops
//! with one line naming it. Each Redis case uses its own key prefix and
//! deletes its keys at the end; each case its own queue.
//!
//! Covers: results and delete, listing, callbacks, retries to failure, the
//! atomic transitions (a redelivered successful job is acknowledged without
//! running, a job whose worker died runs again and says so, two runs of a job
//! never both record success), chains, groups, `on_success`, and cron
//! schedules run by two schedulers enqueueing each tick once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exchange_runtime::broker::Broker;
use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::consumer::HandlerError;
use exchange_runtime::jobs::redis::RedisStore;
use exchange_runtime::jobs::{
    JOB_NAME_HEADER, Job, JobCallbacks, JobContext, JobError, JobId, JobRecord, JobStatus, Jobs,
    JobsBuilder, MemoryStatusStore, RunStart, StatusStore,
};
use exchange_runtime::queue::QueueMessage;

/// Generous bound for things that must happen.
const EVENTUALLY: Duration = Duration::from_secs(20);

/// The store a case runs on. A Redis store's keys are deleted as it is
/// dropped, also when the case panics.
struct Store {
    shared: Arc<dyn StatusStore>,
    redis: Option<RedisStore>,
    _keys: Option<common::RedisKeys>,
}

impl Store {
    fn memory() -> Self {
        Store {
            shared: Arc::new(MemoryStatusStore::new()),
            redis: None,
            _keys: None,
        }
    }

    async fn redis() -> Self {
        let url = common::redis_url();
        let prefix = common::unique("tc-jobs-test");
        let store = RedisStore::connect(&url, &prefix)
            .await
            .unwrap_or_else(|error| panic!("Redis is required at {url}: {error}"));
        Store {
            shared: Arc::new(store.clone()),
            redis: Some(store),
            _keys: Some(common::RedisKeys(prefix)),
        }
    }

    fn arc(&self) -> Arc<dyn StatusStore> {
        Arc::clone(&self.shared)
    }

    /// Deletes the case's Redis keys (also done on drop, where a failure is only reported).
    async fn clean(self) {
        if let Some(redis) = &self.redis {
            redis.clear().await.expect("clearing the test's Redis keys");
        }
    }
}

/// Jobs on `queue` over `store`, four at a time, short backoffs.
async fn jobs<B: Broker>(
    broker: &B,
    queue: &str,
    store: &Store,
    register: impl FnOnce(JobsBuilder<B>) -> JobsBuilder<B>,
) -> Jobs<B> {
    register(
        Jobs::builder(broker.clone(), queue)
            .store(store.arc())
            .concurrency(4),
    )
    .build()
    .await
    .expect("jobs build")
}

/// Stops the workers (if running).
async fn stop<B: Broker>(jobs: &Jobs<B>) {
    if jobs.is_running() {
        jobs.stop().unwrap();
        jobs.wait().await;
    }
}

/// Stops the workers (if running) and deletes the queue and its failed queue.
async fn finish<B: Broker>(jobs: &Jobs<B>) {
    stop(jobs).await;
    let broker = jobs.queue().broker();
    for name in [jobs.queue().name(), jobs.queue().dead_letter_queue()] {
        broker.delete_queue(name).await.unwrap();
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status<B: Broker>(jobs: &Jobs<B>, id: &JobId) -> Option<JobStatus> {
    jobs.status(id).await.unwrap().map(|record| record.status)
}

async fn record<B: Broker>(jobs: &Jobs<B>, id: &JobId) -> JobRecord {
    jobs.status(id).await.unwrap().expect("a recorded job")
}

async fn until_status<B: Broker>(jobs: &Jobs<B>, id: &JobId, wanted: JobStatus) {
    eventually(&format!("job {id} is {wanted}"), || async {
        status(jobs, id).await == Some(wanted)
    })
    .await;
}

/// A job `add` with payload `n`: saves the previous result (0 if none) plus `n`.
fn add(n: u64) -> Job {
    Job::json("add", &n).unwrap()
}

/// A job `fail` that fails every run, with no retries.
fn fail() -> Job {
    Job::new("fail", "").max_retries(0)
}

type Runs = Arc<Mutex<Vec<JobId>>>;

/// Registers `add` (see [`add`]) and `fail`, both noting their runs in `runs`.
fn adder<B: Broker>(runs: &Runs) -> impl FnOnce(JobsBuilder<B>) -> JobsBuilder<B> {
    let add_runs = Arc::clone(runs);
    let fail_runs = Arc::clone(runs);
    move |builder| {
        builder
            .register("add", move |job: JobContext| {
                add_runs.lock().unwrap().push(job.id.clone());
                async move {
                    let n: u64 = job.json()?;
                    let before: u64 = job.previous_json()?.unwrap_or(0);
                    job.save_json(&(before + n))
                }
            })
            .register("fail", move |job: JobContext| {
                fail_runs.lock().unwrap().push(job.id.clone());
                async { Err::<(), _>(HandlerError::msg("always fails")) }
            })
    }
}

async fn result_number<B: Broker>(jobs: &Jobs<B>, id: &JobId) -> Option<u64> {
    jobs.result(id)
        .await
        .unwrap()
        .map(|bytes| serde_json::from_slice(&bytes).expect("a JSON number"))
}

async fn results_are_saved_and_delete_forgets_them<B: Broker>(broker: B, store: Store) {
    let jobs = jobs(&broker, &common::unique("jobs-results"), &store, |b| {
        b.register("square", |job: JobContext| async move {
            let n: u64 = job.json()?;
            job.save_json(&(n * n))
        })
    })
    .await;
    jobs.start().await.unwrap();
    let id = jobs
        .enqueue(Job::json("square", &7).unwrap())
        .await
        .unwrap();
    until_status(&jobs, &id, JobStatus::Successful).await;
    assert_eq!(jobs.result(&id).await.unwrap(), Some(b"49".to_vec()));
    let done = record(&jobs, &id).await;
    assert_eq!(
        (done.attempts, done.retried, done.worker.as_deref()),
        (1, 0, Some(jobs.worker_id()))
    );
    assert_eq!(jobs.successful().await.unwrap(), vec![id.clone()]);
    jobs.delete(&id).await.unwrap();
    assert_eq!(jobs.status(&id).await.unwrap(), None);
    assert_eq!(jobs.result(&id).await.unwrap(), None);
    assert!(jobs.successful().await.unwrap().is_empty());
    finish(&jobs).await;
    store.clean().await;
}

async fn listing_callbacks_and_retries_to_failure<B: Broker>(broker: B, store: Store) {
    let seen: Arc<Mutex<Vec<(JobId, JobStatus)>>> = Arc::default();
    let note = |seen: &Arc<Mutex<Vec<(JobId, JobStatus)>>>| {
        let seen = Arc::clone(seen);
        move |record: &JobRecord| {
            seen.lock()
                .unwrap()
                .push((record.id.clone(), record.status))
        }
    };
    let callbacks = JobCallbacks::new()
        .on_processing(note(&seen))
        .on_success(note(&seen))
        .on_retrying(note(&seen))
        .on_failed(note(&seen));
    let jobs = jobs(&broker, &common::unique("jobs-listing"), &store, |b| {
        b.register_with(
            "maybe",
            |job: JobContext| async move {
                if job.payload == b"fail" {
                    return Err(HandlerError::msg(format!("attempt {} fails", job.retried)));
                }
                Ok(())
            },
            callbacks,
        )
    })
    .await;
    let backoff = Duration::from_millis(20);
    let good = jobs.enqueue(Job::new("maybe", "ok")).await.unwrap();
    let bad = jobs
        .enqueue(
            Job::new("maybe", "fail")
                .max_retries(1)
                .backoff(backoff, backoff),
        )
        .await
        .unwrap();
    let mut both = vec![good.clone(), bad.clone()];
    both.sort();
    assert_eq!(jobs.waiting().await.unwrap(), both);
    assert_eq!(jobs.list(JobStatus::Queued).await.unwrap(), both);
    jobs.start().await.unwrap();
    until_status(&jobs, &good, JobStatus::Successful).await;
    until_status(&jobs, &bad, JobStatus::Failed).await;
    assert_eq!(jobs.failed().await.unwrap(), vec![bad.clone()]);
    assert_eq!(jobs.successful().await.unwrap(), vec![good.clone()]);
    assert!(jobs.waiting().await.unwrap().is_empty());
    let failed = record(&jobs, &bad).await;
    assert_eq!((failed.retried, failed.attempts), (2, 2));
    assert_eq!(failed.last_error.as_deref(), Some("attempt 1 fails"));
    eventually("the failed job is in the failed queue", || async {
        jobs.failed_messages().await.unwrap().len() == 1
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let of = |id: &JobId| -> Vec<JobStatus> {
        seen.iter()
            .filter(|(job, _)| job == id)
            .map(|(_, status)| *status)
            .collect()
    };
    use JobStatus::{Failed, Processing, Retrying, Successful};
    assert_eq!(of(&good), [Processing, Successful]);
    assert_eq!(of(&bad), [Processing, Retrying, Processing, Failed]);
    finish(&jobs).await;
    store.clean().await;
}

/// Publishes the message of job `id` named `name` as a worker would get it.
async fn publish<B: Broker>(jobs: &Jobs<B>, id: &JobId, name: &str) {
    jobs.queue()
        .put(
            QueueMessage::new("1")
                .with_id(id.as_str())
                .with_header(JOB_NAME_HEADER, name),
            Duration::ZERO,
        )
        .await
        .unwrap();
}

fn run_start(id: &JobId, name: &str, worker: &str) -> RunStart {
    RunStart {
        id: id.clone(),
        name: name.to_owned(),
        max_retries: 3,
        retried: 0,
        last_error: None,
        worker: worker.to_owned(),
        previous: None,
    }
}

async fn a_redelivered_successful_job_is_acknowledged_without_running<B: Broker>(
    broker: B,
    store: Store,
) {
    let runs: Runs = Arc::default();
    let jobs = jobs(
        &broker,
        &common::unique("jobs-redelivered"),
        &store,
        adder(&runs),
    )
    .await;
    // A run elsewhere recorded it successful; its message comes back.
    let id = JobId::from(common::unique("done"));
    let shared = store.arc();
    assert!(
        shared
            .insert(JobRecord::queued(id.clone(), "add", 3))
            .await
            .unwrap()
    );
    shared
        .begin(&run_start(&id, "add", "earlier"))
        .await
        .unwrap();
    assert!(shared.succeed(&id, "earlier", Some(b"41")).await.unwrap());
    assert!(
        !shared.succeed(&id, "again", Some(b"0")).await.unwrap(),
        "recorded twice"
    );
    publish(&jobs, &id, "add").await;
    jobs.start().await.unwrap();
    eventually("the redelivered message is acknowledged", || async {
        jobs.pending().await.unwrap().is_empty()
    })
    .await;
    let later = jobs.enqueue(add(1)).await.unwrap();
    until_status(&jobs, &later, JobStatus::Successful).await;
    finish(&jobs).await;
    assert_eq!(*runs.lock().unwrap(), vec![later], "only the new job ran");
    let kept = record(&jobs, &id).await;
    assert_eq!(
        (kept.status, kept.attempts, kept.worker.as_deref()),
        (JobStatus::Successful, 1, Some("earlier"))
    );
    assert_eq!(result_number(&jobs, &id).await, Some(41));
    store.clean().await;
}

async fn a_job_whose_worker_died_runs_again_and_says_so<B: Broker>(broker: B, store: Store) {
    let runs: Runs = Arc::default();
    let jobs = jobs(&broker, &common::unique("jobs-died"), &store, adder(&runs)).await;
    // A worker started it and died: its record says `processing`, its message is back.
    let id = JobId::from(common::unique("orphan"));
    let shared = store.arc();
    shared
        .insert(JobRecord::queued(id.clone(), "add", 3))
        .await
        .unwrap();
    shared.begin(&run_start(&id, "add", "died")).await.unwrap();
    let orphan = record(&jobs, &id).await;
    assert_eq!(
        (orphan.status, orphan.attempts, orphan.worker.as_deref()),
        (JobStatus::Processing, 1, Some("died"))
    );
    publish(&jobs, &id, "add").await;
    jobs.start().await.unwrap();
    until_status(&jobs, &id, JobStatus::Successful).await;
    let done = record(&jobs, &id).await;
    assert_eq!(
        (done.attempts, done.retried, done.worker.as_deref()),
        (2, 0, Some(jobs.worker_id()))
    );
    assert_eq!(*runs.lock().unwrap(), vec![id]);
    finish(&jobs).await;
    store.clean().await;
}

async fn two_runs_of_a_job_never_both_record_success<B: Broker>(broker: B, store: Store) {
    let queue = common::unique("jobs-twice");
    let runs = Arc::new(Mutex::new(0_u32));
    let successes = Arc::new(Mutex::new(0_u32));
    let worker = |runs: &Arc<Mutex<u32>>, successes: &Arc<Mutex<u32>>| {
        let runs = Arc::clone(runs);
        let successes = Arc::clone(successes);
        move |builder: JobsBuilder<B>| {
            builder.register_with(
                "slow",
                move |_job: JobContext| {
                    *runs.lock().unwrap() += 1;
                    async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok(())
                    }
                },
                JobCallbacks::new().on_success(move |_| *successes.lock().unwrap() += 1),
            )
        }
    };
    let first = jobs(&broker, &queue, &store, worker(&runs, &successes)).await;
    let second = jobs(&broker, &queue, &store, worker(&runs, &successes)).await;
    let id = JobId::from(common::unique("twice"));
    store
        .arc()
        .insert(JobRecord::queued(id.clone(), "slow", 3))
        .await
        .unwrap();
    // At-least-once delivery: the same job arrives twice, at two workers at once.
    publish(&first, &id, "slow").await;
    publish(&first, &id, "slow").await;
    first.start().await.unwrap();
    second.start().await.unwrap();
    until_status(&first, &id, JobStatus::Successful).await;
    eventually("both copies are settled", || async {
        first.pending().await.unwrap().is_empty() && *runs.lock().unwrap() >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop(&second).await;
    finish(&first).await;
    assert_eq!(*successes.lock().unwrap(), 1, "success recorded once");
    assert_eq!(first.successful().await.unwrap(), vec![id.clone()]);
    let done = record(&first, &id).await;
    assert_eq!(done.attempts, *runs.lock().unwrap(), "every run counted");
    store.clean().await;
}

async fn chains_run_in_order_passing_results_and_stop_at_a_failure<B: Broker>(
    broker: B,
    store: Store,
) {
    let runs: Runs = Arc::default();
    let jobs = jobs(&broker, &common::unique("jobs-chain"), &store, adder(&runs)).await;
    let chain = jobs
        .enqueue_chain(vec![add(1), add(2), add(3)])
        .await
        .unwrap();
    let meta = jobs.chain(&chain).await.unwrap().expect("the chain");
    assert_eq!((meta.status, meta.jobs.len()), (JobStatus::Queued, 3));
    assert_eq!(meta.current.as_ref(), Some(&meta.jobs[0]));
    assert_eq!(
        status(&jobs, &meta.jobs[1]).await,
        None,
        "later jobs wait for the ones before"
    );
    let broken = jobs
        .enqueue_chain(vec![add(1), fail(), add(5)])
        .await
        .unwrap();
    jobs.start().await.unwrap();
    eventually("the chains end", || async {
        jobs.chain(&chain).await.unwrap().unwrap().status == JobStatus::Successful
            && jobs.chain(&broken).await.unwrap().unwrap().status == JobStatus::Failed
    })
    .await;
    let done = jobs.chain(&chain).await.unwrap().unwrap();
    assert_eq!(
        (done.finished.clone(), done.current),
        (done.jobs.clone(), None)
    );
    let mut results = Vec::new();
    for id in &done.jobs {
        results.push(result_number(&jobs, id).await);
    }
    assert_eq!(results, [Some(1), Some(3), Some(6)]);
    let failed = jobs.chain(&broken).await.unwrap().unwrap();
    assert_eq!(failed.finished, failed.jobs[..1]);
    assert_eq!(failed.current.as_ref(), Some(&failed.jobs[1]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status(&jobs, &failed.jobs[2]).await, None, "never enqueued");
    finish(&jobs).await;
    let runs = runs.lock().unwrap().clone();
    let position = |id: &JobId| runs.iter().position(|run| run == id).expect("ran");
    assert!(position(&done.jobs[0]) < position(&done.jobs[1]));
    assert!(position(&done.jobs[1]) < position(&done.jobs[2]));
    assert!(!runs.contains(&failed.jobs[2]));
    assert_eq!(runs.len(), 5, "each job that ran ran once: {runs:?}");
    store.clean().await;
}

async fn groups_report_each_job_and_fail_when_one_fails<B: Broker>(broker: B, store: Store) {
    let runs: Runs = Arc::default();
    let jobs = jobs(&broker, &common::unique("jobs-group"), &store, adder(&runs)).await;
    let good = jobs
        .enqueue_group(vec![add(1), add(2), add(3)])
        .await
        .unwrap();
    let bad = jobs
        .enqueue_group(vec![add(1), fail(), add(3)])
        .await
        .unwrap();
    assert_eq!(
        jobs.group(&good).await.unwrap().unwrap().status,
        JobStatus::Queued
    );
    assert!(jobs.chain(&good).await.is_err(), "a group is not a chain");
    jobs.start().await.unwrap();
    eventually("the groups end", || async {
        jobs.group(&good).await.unwrap().unwrap().status == JobStatus::Successful
            && jobs.group(&bad).await.unwrap().unwrap().status == JobStatus::Failed
    })
    .await;
    let good = jobs.group(&good).await.unwrap().unwrap();
    assert!(
        good.jobs
            .values()
            .all(|status| *status == Some(JobStatus::Successful))
    );
    eventually("the failed group's other jobs succeed", || async {
        let meta = jobs.group(&bad).await.unwrap().unwrap();
        let statuses: Vec<_> = meta.jobs.values().copied().collect();
        statuses
            .iter()
            .filter(|s| **s == Some(JobStatus::Successful))
            .count()
            == 2
            && statuses.contains(&Some(JobStatus::Failed))
    })
    .await;
    finish(&jobs).await;
    assert_eq!(runs.lock().unwrap().len(), 6);
    store.clean().await;
}

async fn on_success_jobs_wait_for_their_parent_and_get_its_result<B: Broker>(
    broker: B,
    store: Store,
) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let runs: Runs = Arc::default();
    let opened = Arc::clone(&gate);
    let jobs = jobs(&broker, &common::unique("jobs-on-success"), &store, |b| {
        adder(&runs)(b).register("gate", move |job: JobContext| {
            let gate = Arc::clone(&opened);
            async move {
                gate.notified().await;
                job.save_json(&10_u64)
            }
        })
    })
    .await;
    let child = JobId::from(common::unique("child"));
    let parent = jobs
        .enqueue(Job::new("gate", "").on_success(add(5).with_id(child.clone())))
        .await
        .unwrap();
    jobs.start().await.unwrap();
    until_status(&jobs, &parent, JobStatus::Processing).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        status(&jobs, &child).await,
        None,
        "not before its parent succeeded"
    );
    assert!(runs.lock().unwrap().is_empty());
    gate.notify_one();
    until_status(&jobs, &child, JobStatus::Successful).await;
    assert_eq!(result_number(&jobs, &child).await, Some(15));
    finish(&jobs).await;
    store.clean().await;
}

async fn schedules_enqueue_each_tick_once_across_schedulers<B: Broker>(broker: B, store: Store) {
    let queue = common::unique("jobs-cron");
    let ran: Arc<Mutex<Vec<JobId>>> = Arc::default();
    let noted = Arc::clone(&ran);
    let worker = jobs(&broker, &queue, &store, |b| {
        b.register("tick", move |job: JobContext| {
            noted.lock().unwrap().push(job.id.clone());
            async { Ok(()) }
        })
    })
    .await;
    let other = jobs(&broker, &queue, &store, |b| b).await;
    assert!(matches!(
        worker.schedule("bad", "not a cron line", Job::new("tick", "")),
        Err(JobError::Cron { .. })
    ));
    worker.start().await.unwrap();
    let name = common::unique("every-second");
    let schedules = [
        worker
            .schedule(&name, "* * * * * *", Job::new("tick", ""))
            .unwrap(),
        other
            .schedule(&name, "* * * * * *", Job::new("tick", ""))
            .unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    drop(schedules);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let successful = worker.successful().await.unwrap();
    eventually("every tick's job ran", || async {
        ran.lock().unwrap().len() >= successful.len()
    })
    .await;
    finish(&worker).await;
    let ran = ran.lock().unwrap().clone();
    let distinct: BTreeSet<&JobId> = ran.iter().collect();
    assert_eq!(distinct.len(), ran.len(), "a tick ran twice: {ran:?}");
    assert!(ran.len() >= 2, "ticks in 3.3 s: {ran:?}");
    let seconds: BTreeMap<i64, &JobId> = ran
        .iter()
        .map(|id| {
            let tick = id
                .as_str()
                .strip_prefix(&format!("{name}@"))
                .expect("tick id");
            (tick.parse().expect("Unix seconds"), id)
        })
        .collect();
    assert_eq!(seconds.len(), ran.len());
    store.clean().await;
}

/// Runs each case as `<case>::{memory,rabbitmq}_broker_{memory,redis}_store`.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::{MemoryBroker, Store, common};

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory_broker_memory_store() {
                    super::$case(MemoryBroker::new(), Store::memory()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory_broker_redis_store() {
                    super::$case(MemoryBroker::new(), Store::redis().await).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn rabbitmq_memory_store() {
                    super::$case(common::rabbitmq().await, Store::memory()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn rabbitmq_redis_store() {
                    super::$case(common::rabbitmq().await, Store::redis().await).await;
                }
            }
        )*
    };
}

suite!(
    results_are_saved_and_delete_forgets_them,
    listing_callbacks_and_retries_to_failure,
    a_redelivered_successful_job_is_acknowledged_without_running,
    a_job_whose_worker_died_runs_again_and_says_so,
    two_runs_of_a_job_never_both_record_success,
    chains_run_in_order_passing_results_and_stop_at_a_failure,
    groups_report_each_job_and_fail_when_one_fails,
    on_success_jobs_wait_for_their_parent_and_get_its_result,
    schedules_enqueue_each_tick_once_across_schedulers,
);

/// Enqueueing, starting and recording a job successful take one Redis round
/// trip each (the scripts loaded by an earlier job): three per job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_job_costs_three_redis_round_trips() {
    let store = Store::redis().await;
    let redis = store.redis.clone().expect("a Redis store");
    let (done, mut successes) = tokio::sync::mpsc::unbounded_channel();
    let jobs = jobs(&MemoryBroker::new(), "jobs-trips", &store, |b| {
        b.register_with(
            "noop",
            |_job: JobContext| async { Ok::<(), HandlerError>(()) },
            JobCallbacks::new().on_success(move |record| {
                let _ = done.send(record.id.clone());
            }),
        )
    })
    .await;
    jobs.start().await.unwrap();
    let mut costs = Vec::new();
    for _ in 0..3 {
        let before = redis.round_trips();
        let id = jobs.enqueue(Job::new("noop", "")).await.unwrap();
        let succeeded = tokio::time::timeout(EVENTUALLY, successes.recv())
            .await
            .expect("the job succeeds");
        assert_eq!(succeeded, Some(id));
        // The callback runs after the success is recorded, before the ack.
        costs.push(redis.round_trips() - before);
    }
    // The first job also loads the scripts (NOSCRIPT, SCRIPT LOAD, again).
    assert_eq!(costs[1..], [3, 3], "round trips per job: {costs:?}");
    finish(&jobs).await;
    store.clean().await;
}
