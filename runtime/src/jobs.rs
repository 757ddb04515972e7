//! Jobs on a work queue, after tasqueue: enqueue named jobs with a payload,
//! run them with registered handlers, retry failures with exponential
//! backoff, keep the ones that failed for good in a failed (dead-letter)
//! queue with their last error, save results, run chains, groups and
//! `on_success` jobs, enqueue jobs on cron schedules, and observe each job's
//! status — from one process or many sharing a [`StatusStore`] (the Redis
//! store `jobs::redis::RedisStore`, cargo feature `redis`).
//!
//! # Semantics
//!
//! - A job is a message on a [`WorkQueue`] (id = message id; name, retry
//!   options and attempt count in `tc-` headers). [`Jobs::enqueue`] records
//!   the job as [`JobStatus::Queued`] before publishing it (an id that is
//!   already recorded is refused: [`JobError::Duplicate`]).
//! - A worker starts a run with [`StatusStore::begin`], atomically: a job
//!   already `Successful` is acknowledged without running (delivery is at
//!   least once); any other becomes [`Processing`](JobStatus::Processing)
//!   with one more `attempts` and the worker's id. A job whose worker died
//!   mid-run is redelivered by the broker and so runs again, its record
//!   showing both runs.
//! - `Ok` from the handler records [`Successful`](JobStatus::Successful)
//!   (with the result the handler saved, [`JobContext::save_result`]) and
//!   only then acknowledges the message; the store records success once per
//!   job, however many runs finish. An error, a panic, or running past the
//!   job's timeout is a failed attempt: while retries are left the job is
//!   recorded [`Retrying`](JobStatus::Retrying) and put back after
//!   `base * 2^attempt` (capped, and never more than
//!   [`MAX_DELAY`](crate::broker::MAX_DELAY)); after `max_retries` retries it
//!   is recorded [`Failed`](JobStatus::Failed) and moved to the failed queue
//!   (`<queue>.dead`) with the error in its `tc-last-error` header. Moving
//!   a failed job never turns into an uncounted, immediate rerun, even when
//!   the broker refuses its copy (see the [`queue`](crate::queue) module).
//! - A handler that is interrupted — the worker is stopped and its drain
//!   timeout passes, or the handler's future is dropped — is **never**
//!   recorded successful: its message goes back to the queue unchanged
//!   (redelivered later, not counted as a failed attempt) and its status back
//!   to `Queued` (or `Retrying` if it had failed before).
//! - A job's `on_success` jobs ([`Job::on_success`]) are enqueued once it is
//!   successful, before its message is acknowledged, and receive its saved
//!   result ([`JobContext::previous_result`]). Chains and groups are built
//!   on this (see [`Jobs::enqueue_chain`], [`Jobs::enqueue_group`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod flow;
#[cfg(feature = "redis")]
pub mod redis;
mod schedule;
mod store;

pub use flow::{ChainMeta, GroupMeta};
pub use schedule::Schedule;
pub use store::{
    Batch, BatchKind, Begin, JobRecord, JobStatus, MemoryStatusStore, RunStart, Settle,
    StatusStore, StoreError,
};

use crate::broker::{AckHandle, BoxFuture, Broker, BrokerError, Delivery, PendingMessage};
use crate::consumer::{
    Dispatch, HandlerError, Interrupt, NotRunning, OwnedRunner, Runner, RunnerConfig, run_caught,
};
use crate::queue::{
    ATTEMPTS_HEADER, Backoff, LAST_ERROR_HEADER, QueueError, QueueMessage, QueueSettings, Received,
    WorkQueue,
};

/// Header with the job's name (which handler runs it).
pub const JOB_NAME_HEADER: &str = "tc-job-name";
/// Header with the job's maximum number of retries.
pub const MAX_RETRIES_HEADER: &str = "tc-max-retries";
/// Header with the job's backoff base, in milliseconds.
pub const BACKOFF_BASE_HEADER: &str = "tc-backoff-base-ms";
/// Header with the job's backoff cap, in milliseconds.
pub const BACKOFF_CAP_HEADER: &str = "tc-backoff-cap-ms";
/// Header with the job's timeout, in milliseconds (absent: none).
pub const TIMEOUT_HEADER: &str = "tc-timeout-ms";
/// Header with the jobs to enqueue once this one is successful (JSON).
pub const ON_SUCCESS_HEADER: &str = "tc-on-success";
/// Header with the id of the job whose result this one receives.
pub const PREVIOUS_JOB_HEADER: &str = "tc-previous-job";
/// Header with the id of the chain or group the job belongs to.
pub const BATCH_HEADER: &str = "tc-batch";

/// A job's identifier (a random UUID).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// A fresh random id.
    pub fn generate() -> Self {
        JobId(uuid::Uuid::new_v4().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for JobId {
    fn from(id: String) -> Self {
        JobId(id)
    }
}

impl From<&str> for JobId {
    fn from(id: &str) -> Self {
        JobId(id.to_owned())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Retry and timing options of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOptions {
    /// Retries after the first failed attempt (so at most `max_retries + 1` runs). Default 3.
    pub max_retries: u32,
    /// Delay before each retry: `base * 2^retry`, at most `cap` and
    /// [`MAX_DELAY`](crate::broker::MAX_DELAY) (about 49.7 days: longer
    /// delays are clamped to it). Default 1 s, capped at 5 min.
    pub backoff: Backoff,
    /// A run taking longer fails (its handler future is dropped). Default: none.
    pub timeout: Option<Duration>,
    /// Delay before the first run (clamped to
    /// [`MAX_DELAY`](crate::broker::MAX_DELAY)). Default: none.
    pub delay: Duration,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            max_retries: 3,
            backoff: Backoff::default(),
            timeout: None,
            delay: Duration::ZERO,
        }
    }
}

/// A unit of work to enqueue: the name of the handler that runs it, and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The registered handler's name.
    pub name: String,
    /// Opaque to the runtime; see [`Job::json`].
    pub payload: Vec<u8>,
    /// Retries and timing.
    pub options: JobOptions,
    /// Its id; a fresh random one when `None`. Enqueueing an id that the
    /// store already records is refused, which makes enqueueing idempotent.
    pub id: Option<JobId>,
    /// Jobs enqueued once this one is successful (they receive its result).
    pub on_success: Vec<Job>,
}

impl Job {
    /// A job with the default options.
    pub fn new(name: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Job {
            name: name.into(),
            payload: payload.into(),
            options: JobOptions::default(),
            id: None,
            on_success: Vec::new(),
        }
    }

    /// Gives the job its id (instead of a random one).
    pub fn with_id(mut self, id: impl Into<JobId>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Adds a job to enqueue once this one is successful; it receives this
    /// one's saved result as [`JobContext::previous_result`].
    pub fn on_success(mut self, next: Job) -> Self {
        self.on_success.push(next);
        self
    }

    /// A job whose payload is `value` as JSON.
    pub fn json<T: Serialize>(name: impl Into<String>, value: &T) -> Result<Self, JobError> {
        let name = name.into();
        match serde_json::to_vec(value) {
            Ok(payload) => Ok(Job::new(name, payload)),
            Err(source) => Err(JobError::Payload { name, source }),
        }
    }

    /// Sets the maximum number of retries.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.options.max_retries = retries;
        self
    }

    /// Sets the retry backoff (delays clamped to [`MAX_DELAY`](crate::broker::MAX_DELAY)).
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.options.backoff = Backoff { base, cap };
        self
    }

    /// Sets a timeout for each run.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.options.timeout = Some(limit);
        self
    }

    /// Delays the first run (by at most [`MAX_DELAY`](crate::broker::MAX_DELAY)).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.options.delay = delay;
        self
    }
}

/// A job as its handler sees it.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job's id.
    pub id: JobId,
    /// The job's name.
    pub name: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Failed attempts before this one (0 on the first run).
    pub retried: u32,
    /// The error of the last failed attempt, if any.
    pub last_error: Option<String>,
    /// Runs started, this one included (more than `retried + 1` when a
    /// worker died or was stopped during an earlier run).
    pub attempts: u32,
    /// The id of the worker running it.
    pub worker: String,
    /// The job whose success enqueued this one (chains, `on_success`).
    pub previous: Option<JobId>,
    /// The result that job saved, if any.
    pub previous_result: Option<Vec<u8>>,
    result: Arc<Mutex<Option<Vec<u8>>>>,
}

impl JobContext {
    /// Saves `result` as the job's result, recorded with its success (a
    /// later call replaces an earlier one; a failed run's result is dropped).
    pub fn save_result(&self, result: impl Into<Vec<u8>>) {
        *self
            .result
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(result.into());
    }

    /// Saves `value` as JSON as the job's result (see [`JobContext::save_result`]).
    pub fn save_json<T: Serialize>(&self, value: &T) -> Result<(), HandlerError> {
        let bytes = serde_json::to_vec(value).map_err(|error| {
            HandlerError::msg(format!(
                "job `{}` ({}): result cannot be serialized: {error}",
                self.name, self.id
            ))
        })?;
        self.save_result(bytes);
        Ok(())
    }

    /// The previous job's result parsed as JSON (`None` if it saved none).
    pub fn previous_json<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, HandlerError> {
        self.previous_result
            .as_deref()
            .map(|bytes| {
                serde_json::from_slice(bytes).map_err(|error| {
                    HandlerError::msg(format!(
                        "job `{}` ({}): the result of job {} is not the expected JSON: {error}",
                        self.name,
                        self.id,
                        self.previous.as_ref().map_or("?", JobId::as_str)
                    ))
                })
            })
            .transpose()
    }

    fn take_result(&self) -> Option<Vec<u8>> {
        self.result
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// The payload parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.payload).map_err(|error| {
            HandlerError::msg(format!(
                "job `{}` ({}): payload is not the expected JSON: {error}",
                self.name, self.id
            ))
        })
    }
}

/// A job waiting in a queue, as listed by [`Jobs::pending`] and [`Jobs::failed_messages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingJob {
    /// The job's id (`None` for a foreign message without one).
    pub id: Option<JobId>,
    /// The job's name (`None` for a foreign message without one).
    pub name: Option<String>,
    /// Failed attempts so far.
    pub retried: u32,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl From<PendingMessage> for PendingJob {
    fn from(message: PendingMessage) -> Self {
        PendingJob {
            id: message.message_id.map(JobId),
            name: message.headers.get(JOB_NAME_HEADER).cloned(),
            retried: message
                .headers
                .get(ATTEMPTS_HEADER)
                .and_then(|text| text.parse().ok())
                .unwrap_or(0),
            last_error: message.headers.get(LAST_ERROR_HEADER).cloned(),
            payload: message.body,
        }
    }
}

/// A jobs operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The queue (broker) failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The status store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A payload could not be serialized.
    #[error("job `{name}`: payload cannot be serialized: {source}")]
    Payload {
        /// The job's name.
        name: String,
        /// Serde's error.
        source: serde_json::Error,
    },
    /// An option or argument is out of range.
    #[error("jobs on queue `{queue}`: {reason}")]
    Invalid {
        /// The queue's full name.
        queue: String,
        /// Why.
        reason: String,
    },
    /// A job with this id is already recorded.
    #[error("jobs on queue `{queue}`: job {id} is already recorded")]
    Duplicate {
        /// The queue's full name.
        queue: String,
        /// The job's id.
        id: JobId,
    },
    /// A cron expression could not be read.
    #[error("schedule `{schedule}`: the cron expression `{expression}` is invalid: {reason}")]
    Cron {
        /// The schedule's name.
        schedule: String,
        /// The expression.
        expression: String,
        /// Why.
        reason: String,
    },
    /// [`Jobs::stop`] was called while the workers were not running.
    #[error("job workers of queue `{queue}` are not running")]
    NotRunning {
        /// The queue's full name.
        queue: String,
    },
}

type JobFn = Box<dyn Fn(JobContext) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;

/// A callback on a job's transition; it receives the job's record as it
/// becomes (see [`JobCallbacks`]).
pub type JobCallback = Arc<dyn Fn(&JobRecord) + Send + Sync>;

/// Callbacks of a job name, after tasqueue's `TaskOpts`: called by the
/// worker that runs the job, after the store has recorded the transition.
#[derive(Clone, Default)]
pub struct JobCallbacks {
    processing: Option<JobCallback>,
    success: Option<JobCallback>,
    retrying: Option<JobCallback>,
    failed: Option<JobCallback>,
}

impl fmt::Debug for JobCallbacks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobCallbacks")
            .field("processing", &self.processing.is_some())
            .field("success", &self.success.is_some())
            .field("retrying", &self.retrying.is_some())
            .field("failed", &self.failed.is_some())
            .finish()
    }
}

impl JobCallbacks {
    /// No callbacks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Called when a run starts (the job is `processing`).
    pub fn on_processing(mut self, callback: impl Fn(&JobRecord) + Send + Sync + 'static) -> Self {
        self.processing = Some(Arc::new(callback));
        self
    }

    /// Called when the job is recorded successful (once per job).
    pub fn on_success(mut self, callback: impl Fn(&JobRecord) + Send + Sync + 'static) -> Self {
        self.success = Some(Arc::new(callback));
        self
    }

    /// Called when a failed attempt leaves retries (the job is `retrying`).
    pub fn on_retrying(mut self, callback: impl Fn(&JobRecord) + Send + Sync + 'static) -> Self {
        self.retrying = Some(Arc::new(callback));
        self
    }

    /// Called when the job fails for good (the job is `failed`).
    pub fn on_failed(mut self, callback: impl Fn(&JobRecord) + Send + Sync + 'static) -> Self {
        self.failed = Some(Arc::new(callback));
        self
    }

    fn call(&self, record: &JobRecord) {
        let callback = match record.status {
            JobStatus::Processing => &self.processing,
            JobStatus::Successful => &self.success,
            JobStatus::Retrying => &self.retrying,
            JobStatus::Failed => &self.failed,
            JobStatus::Queued => &None,
        };
        if let Some(callback) = callback {
            let caught =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(record)));
            if caught.is_err() {
                tracing::error!(job = %record.id, status = %record.status, "a job callback panicked");
            }
        }
    }
}

struct Registered {
    handler: JobFn,
    callbacks: JobCallbacks,
}

/// Configures [`Jobs`].
pub struct JobsBuilder<B: Broker> {
    broker: B,
    queue: String,
    store: Arc<dyn StatusStore>,
    handlers: HashMap<String, Registered>,
    concurrency: u16,
    drain_timeout: Option<Duration>,
    worker: Option<String>,
    queue_settings: QueueSettings,
}

impl<B: Broker> JobsBuilder<B> {
    /// Jobs on the queue `queue` (qualified by [`Broker::qualify_queue_name`]),
    /// with an in-memory status store, one job at a time, no handlers.
    pub fn new(broker: B, queue: impl Into<String>) -> Self {
        JobsBuilder {
            broker,
            queue: queue.into(),
            store: Arc::new(MemoryStatusStore::new()),
            handlers: HashMap::new(),
            concurrency: 1,
            drain_timeout: None,
            worker: None,
            queue_settings: QueueSettings::default(),
        }
    }

    /// How the job queue and its failed queue are declared (default: quorum
    /// queues with a delivery limit; see [`QueueSettings`]).
    pub fn queue_settings(mut self, settings: QueueSettings) -> Self {
        self.queue_settings = settings;
        self
    }

    /// Uses another status store (shared by all workers of the queue, for
    /// example `jobs::redis::RedisStore`).
    pub fn store(mut self, store: Arc<dyn StatusStore>) -> Self {
        self.store = store;
        self
    }

    /// Registers the handler of jobs named `name` (replacing an earlier one).
    pub fn register<F, Fut>(self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.register_with(name, handler, JobCallbacks::new())
    }

    /// Registers the handler of jobs named `name` with callbacks on their
    /// transitions (replacing an earlier one).
    pub fn register_with<F, Fut>(
        mut self,
        name: impl Into<String>,
        handler: F,
        callbacks: JobCallbacks,
    ) -> Self
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handlers.insert(
            name.into(),
            Registered {
                handler: Box::new(move |job| Box::pin(handler(job))),
                callbacks,
            },
        );
        self
    }

    /// How many jobs a worker runs at once (at least 1; default 1).
    pub fn concurrency(mut self, jobs: u16) -> Self {
        self.concurrency = jobs;
        self
    }

    /// How long [`Jobs::stop`] lets running jobs finish before interrupting
    /// them (they return to the queue; default: no limit).
    pub fn drain_timeout(mut self, limit: Duration) -> Self {
        self.drain_timeout = Some(limit);
        self
    }

    /// The worker id recorded with the runs this worker starts (default: the
    /// process id and a random suffix).
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker = Some(id.into());
        self
    }

    /// Declares the queue and its failed queue.
    pub async fn build(self) -> Result<Jobs<B>, JobError> {
        let queue =
            WorkQueue::open_with(self.broker.clone(), &self.queue, self.queue_settings).await?;
        if self.concurrency == 0 {
            return Err(JobError::Invalid {
                queue: queue.name().to_owned(),
                reason: "concurrency must be at least 1".to_owned(),
            });
        }
        let config = RunnerConfig {
            prefetch: self.concurrency,
            max_in_flight: usize::from(self.concurrency),
            drain_timeout: self.drain_timeout,
            ..RunnerConfig::default()
        };
        let has_handlers = !self.handlers.is_empty();
        let worker = self.worker.unwrap_or_else(|| {
            let random = uuid::Uuid::new_v4().simple().to_string();
            format!("{}-{}", std::process::id(), &random[..8])
        });
        let enqueuer = Enqueuer {
            queue,
            store: self.store,
        };
        let dispatch = Arc::new(JobDispatch {
            enqueuer: enqueuer.clone(),
            handlers: self.handlers,
            worker: worker.clone(),
        });
        Ok(Jobs {
            runner: Runner::owned(self.broker, dispatch, config),
            enqueuer,
            has_handlers,
            worker,
        })
    }
}

/// What enqueues jobs: the queue and the store (shared by [`Jobs`], its
/// workers and its schedules).
struct Enqueuer<B: Broker> {
    queue: WorkQueue<B>,
    store: Arc<dyn StatusStore>,
}

impl<B: Broker> Clone for Enqueuer<B> {
    fn clone(&self) -> Self {
        Enqueuer {
            queue: self.queue.clone(),
            store: Arc::clone(&self.store),
        }
    }
}

/// A job with its id and its `on_success` jobs' ids assigned, as carried in
/// [`ON_SUCCESS_HEADER`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    id: JobId,
    name: String,
    payload: Vec<u8>,
    max_retries: u32,
    backoff_base_ms: String,
    backoff_cap_ms: String,
    timeout_ms: Option<String>,
    delay_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    on_success: Vec<Spec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch: Option<JobId>,
}

impl Spec {
    /// `job` with ids assigned (its own unless it has one), in `batch` if any.
    fn of(job: Job, batch: Option<&JobId>) -> Spec {
        let options = job.options;
        Spec {
            id: job.id.unwrap_or_else(JobId::generate),
            name: job.name,
            payload: job.payload,
            max_retries: options.max_retries,
            backoff_base_ms: millis(options.backoff.base),
            backoff_cap_ms: millis(options.backoff.cap),
            timeout_ms: options.timeout.map(millis),
            delay_ms: u64::try_from(options.delay.as_millis()).unwrap_or(u64::MAX),
            on_success: job
                .on_success
                .into_iter()
                .map(|next| Spec::of(next, batch))
                .collect(),
            batch: batch.cloned(),
        }
    }

    /// The message carrying the job; `previous` is the job whose success enqueues it.
    fn message(&self, previous: Option<&JobId>) -> Result<QueueMessage, String> {
        let mut message = QueueMessage::new(self.payload.clone())
            .with_id(self.id.as_str())
            .with_header(JOB_NAME_HEADER, self.name.clone())
            .with_header(MAX_RETRIES_HEADER, self.max_retries.to_string())
            .with_header(BACKOFF_BASE_HEADER, self.backoff_base_ms.clone())
            .with_header(BACKOFF_CAP_HEADER, self.backoff_cap_ms.clone());
        if let Some(limit) = &self.timeout_ms {
            message = message.with_header(TIMEOUT_HEADER, limit.clone());
        }
        if !self.on_success.is_empty() {
            let next = serde_json::to_string(&self.on_success).map_err(|error| {
                format!(
                    "job {}: its on_success jobs cannot be written: {error}",
                    self.id
                )
            })?;
            message = message.with_header(ON_SUCCESS_HEADER, next);
        }
        if let Some(previous) = previous {
            message = message.with_header(PREVIOUS_JOB_HEADER, previous.as_str());
        }
        if let Some(batch) = &self.batch {
            message = message.with_header(BATCH_HEADER, batch.as_str());
        }
        Ok(message)
    }
}

impl<B: Broker> Enqueuer<B> {
    fn invalid(&self, reason: String) -> JobError {
        JobError::Invalid {
            queue: self.queue.name().to_owned(),
            reason,
        }
    }

    fn check(&self, job: &Job) -> Result<(), JobError> {
        if job.name.is_empty() {
            return Err(self.invalid("a job needs a name".to_owned()));
        }
        job.on_success.iter().try_for_each(|next| self.check(next))
    }

    /// Records `spec` as queued (refusing a recorded id) and publishes it.
    async fn enqueue(&self, spec: &Spec) -> Result<JobId, JobError> {
        let message = spec.message(None).map_err(|reason| self.invalid(reason))?;
        let record = JobRecord::queued(spec.id.clone(), &spec.name, spec.max_retries);
        if !self.store.insert(record).await? {
            return Err(JobError::Duplicate {
                queue: self.queue.name().to_owned(),
                id: spec.id.clone(),
            });
        }
        if let Err(error) = self
            .queue
            .put(message, Duration::from_millis(spec.delay_ms))
            .await
        {
            // Not enqueued: forget it rather than leave a phantom `queued` job.
            if let Err(store_error) = self.store.delete(&spec.id).await {
                tracing::warn!(job = %spec.id, %store_error, "forgetting a job that was not enqueued failed");
            }
            return Err(error.into());
        }
        Ok(spec.id.clone())
    }

    /// Publishes `spec`, enqueued by the success of `previous`, then records
    /// it as queued unless it is recorded already (a worker may have started
    /// it). Publishing first means a worker that dies in between leaves a
    /// job that runs rather than a record that never does.
    async fn follow(&self, spec: &Spec, previous: &JobId) -> Result<(), JobError> {
        let message = spec
            .message(Some(previous))
            .map_err(|reason| self.invalid(reason))?;
        self.queue
            .put(message, Duration::from_millis(spec.delay_ms))
            .await?;
        self.store
            .insert(JobRecord::queued(
                spec.id.clone(),
                &spec.name,
                spec.max_retries,
            ))
            .await?;
        Ok(())
    }
}

/// Enqueues jobs and runs workers for them; see the [module docs](self).
/// Dropping running workers stops them.
pub struct Jobs<B: Broker> {
    enqueuer: Enqueuer<B>,
    runner: OwnedRunner<B, JobDispatch<B>>,
    has_handlers: bool,
    worker: String,
}

impl<B: Broker> Jobs<B> {
    /// A builder (see [`JobsBuilder::new`]).
    pub fn builder(broker: B, queue: impl Into<String>) -> JobsBuilder<B> {
        JobsBuilder::new(broker, queue)
    }

    /// The work queue holding the jobs.
    pub fn queue(&self) -> &WorkQueue<B> {
        &self.enqueuer.queue
    }

    /// The status store.
    pub fn store(&self) -> &Arc<dyn StatusStore> {
        &self.enqueuer.store
    }

    /// The id this worker records with the runs it starts.
    pub fn worker_id(&self) -> &str {
        &self.worker
    }

    /// Records the job (and nothing of its `on_success` jobs yet) as queued
    /// and publishes it; returns its id. An id already recorded is refused
    /// ([`JobError::Duplicate`]).
    pub async fn enqueue(&self, job: Job) -> Result<JobId, JobError> {
        self.enqueuer.check(&job)?;
        self.enqueuer.enqueue(&Spec::of(job, None)).await
    }

    /// What the store knows about a job.
    pub async fn status(&self, id: &JobId) -> Result<Option<JobRecord>, JobError> {
        Ok(self.enqueuer.store.get(id).await?)
    }

    /// The result a successful job saved ([`JobContext::save_result`]).
    pub async fn result(&self, id: &JobId) -> Result<Option<Vec<u8>>, JobError> {
        Ok(self.enqueuer.store.result(id).await?)
    }

    /// Jobs waiting in the queue, oldest first (not those waiting out a
    /// delay or a retry backoff, nor those being processed).
    pub async fn pending(&self) -> Result<Vec<PendingJob>, JobError> {
        Ok(self
            .enqueuer
            .queue
            .pending()
            .await?
            .into_iter()
            .map(PendingJob::from)
            .collect())
    }

    /// The jobs in the failed queue, with their last error, oldest first.
    pub async fn failed_messages(&self) -> Result<Vec<PendingJob>, JobError> {
        Ok(self
            .enqueuer
            .queue
            .dead_letters()
            .await?
            .into_iter()
            .map(PendingJob::from)
            .collect())
    }

    /// Ids of the jobs the store records with `status`, in id order (all
    /// workers' jobs when the store is shared).
    pub async fn list(&self, status: JobStatus) -> Result<Vec<JobId>, JobError> {
        Ok(self.enqueuer.store.list(status).await?)
    }

    /// Ids of the jobs recorded as waiting to run: queued, or retrying after
    /// a failed attempt (in id order).
    pub async fn waiting(&self) -> Result<Vec<JobId>, JobError> {
        let mut ids = self.list(JobStatus::Queued).await?;
        ids.extend(self.list(JobStatus::Retrying).await?);
        ids.sort();
        Ok(ids)
    }

    /// Ids of the jobs recorded as failed.
    pub async fn failed(&self) -> Result<Vec<JobId>, JobError> {
        self.list(JobStatus::Failed).await
    }

    /// Ids of the jobs recorded as successful.
    pub async fn successful(&self) -> Result<Vec<JobId>, JobError> {
        self.list(JobStatus::Successful).await
    }

    /// Forgets a job's record and result (not its message, if still queued:
    /// a worker that takes it records it again).
    pub async fn delete(&self, id: &JobId) -> Result<(), JobError> {
        Ok(self.enqueuer.store.delete(id).await?)
    }

    /// Starts the workers; returns once subscribed. Safe to call while running.
    /// An error if no handler is registered.
    pub async fn start(&self) -> Result<(), JobError> {
        if !self.has_handlers {
            return Err(JobError::Invalid {
                queue: self.queue().name().to_owned(),
                reason: "no job handler is registered, so workers would fail every job".to_owned(),
            });
        }
        self.runner.start().await.map_err(|source| {
            JobError::Queue(QueueError::Broker {
                queue: self.queue().name().to_owned(),
                operation: "start workers",
                source,
            })
        })
    }

    /// Stops taking jobs; running jobs finish (or are interrupted after the
    /// drain timeout). An error if not running.
    pub fn stop(&self) -> Result<(), JobError> {
        self.runner
            .stop()
            .map_err(|NotRunning| JobError::NotRunning {
                queue: self.queue().name().to_owned(),
            })
    }

    /// Resolves once the workers have stopped (at once if not running).
    pub async fn wait(&self) {
        self.runner.wait().await;
    }

    /// Whether the workers are running (started and not asked to stop).
    pub fn is_running(&self) -> bool {
        self.runner.is_running()
    }
}

/// A duration as a header value, in whole milliseconds. One too long for a
/// `u64` of them (over 500 million years: `Duration::MAX` for "no cap") is
/// written as `u64::MAX`, just as unbounded, so that workers can read it back.
fn millis(duration: Duration) -> String {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .to_string()
}

/// The job carried by a message, or why it carries none.
struct Incoming {
    id: JobId,
    name: String,
    max_retries: u32,
    backoff: Backoff,
    timeout: Option<Duration>,
    previous: Option<JobId>,
    on_success: Vec<Spec>,
}

fn header<T: FromStr>(
    headers: &BTreeMap<String, String>,
    name: &'static str,
) -> Result<Option<T>, String> {
    headers
        .get(name)
        .map(|text| {
            text.parse()
                .map_err(|_| format!("header `{name}` has the unreadable value `{text}`"))
        })
        .transpose()
}

fn incoming(received: &Received) -> Result<Incoming, String> {
    let message = &received.message;
    let id = message
        .message_id
        .clone()
        .map(JobId)
        .ok_or("the message has no message id (job id)")?;
    let headers = &message.headers;
    let name = headers
        .get(JOB_NAME_HEADER)
        .cloned()
        .ok_or_else(|| format!("job {id}: no `{JOB_NAME_HEADER}` header"))?;
    let defaults = JobOptions::default();
    let with_id = |reason: String| format!("job {id}: {reason}");
    let ms = |value: Option<u64>| value.map(Duration::from_millis);
    let on_success = match headers.get(ON_SUCCESS_HEADER) {
        None => Vec::new(),
        Some(text) => serde_json::from_str(text).map_err(|error| {
            with_id(format!(
                "header `{ON_SUCCESS_HEADER}` is unreadable: {error}"
            ))
        })?,
    };
    Ok(Incoming {
        max_retries: header(headers, MAX_RETRIES_HEADER)
            .map_err(with_id)?
            .unwrap_or(defaults.max_retries),
        backoff: Backoff {
            base: ms(header(headers, BACKOFF_BASE_HEADER).map_err(with_id)?)
                .unwrap_or(defaults.backoff.base),
            cap: ms(header(headers, BACKOFF_CAP_HEADER).map_err(with_id)?)
                .unwrap_or(defaults.backoff.cap),
        },
        timeout: ms(header(headers, TIMEOUT_HEADER).map_err(with_id)?),
        previous: headers.get(PREVIOUS_JOB_HEADER).cloned().map(JobId),
        on_success,
        id,
        name,
    })
}

struct JobDispatch<B: Broker> {
    enqueuer: Enqueuer<B>,
    handlers: HashMap<String, Registered>,
    worker: String,
}

/// Puts a job's status back to waiting if its run is abandoned without an
/// outcome (its future dropped): never left looking successful or running.
struct AbandonGuard {
    store: Arc<dyn StatusStore>,
    waiting: Option<Settle>,
}

impl AbandonGuard {
    fn disarm(&mut self) {
        self.waiting = None;
    }
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if let Some(waiting) = self.waiting.take() {
            let store = Arc::clone(&self.store);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        if let Err(error) = store.settle(&waiting).await {
                            tracing::warn!(job = %waiting.id, %error, "recording an abandoned job failed");
                        }
                    });
                }
                Err(_) => {
                    tracing::warn!(job = %waiting.id, "job abandoned outside a runtime; its status stays `processing`")
                }
            }
        }
    }
}

/// How long a worker waits before returning a job to the queue when the
/// store cannot record its run (so that an unreachable store does not turn
/// into a tight redelivery loop).
const STORE_RETRY_PAUSE: Duration = Duration::from_secs(1);

impl<B: Broker> JobDispatch<B> {
    async fn settle(&self, settle: &Settle) {
        if let Err(error) = self.enqueuer.store.settle(settle).await {
            tracing::warn!(job = %settle.id, status = %settle.status, %error, "recording the job status failed");
        }
    }

    /// Returns the message to the queue after a pause: its run could not be
    /// recorded (nor, so, trusted).
    async fn put_back(&self, id: &JobId, acker: &dyn AckHandle) {
        tokio::time::sleep(STORE_RETRY_PAUSE).await;
        if let Err(error) = acker.nack(true).await {
            tracing::warn!(job = %id, %error, "returning the job to the queue failed");
        }
    }

    /// Enqueues the `on_success` jobs of a successful job. `again`: the
    /// job's success was recorded by an earlier run, which may have enqueued
    /// some already (those with a record are skipped).
    async fn follow_up(&self, job: &Incoming, again: bool) -> Result<(), JobError> {
        for next in &job.on_success {
            if again && self.enqueuer.store.get(&next.id).await?.is_some() {
                continue;
            }
            self.enqueuer.follow(next, &job.id).await?;
        }
        Ok(())
    }

    async fn run(&self, received: Received, acker: Box<dyn AckHandle>, mut interrupt: Interrupt) {
        let queue = self.enqueuer.queue.name().to_owned();
        let store = &self.enqueuer.store;
        let job = match incoming(&received) {
            Ok(job) => job,
            Err(reason) => {
                tracing::error!(%queue, %reason, "not a job message; moving it to the failed queue");
                if let Err(error) = self
                    .enqueuer
                    .queue
                    .settle_failure(&received, &*acker, None, &reason)
                    .await
                {
                    tracing::warn!(%error, "dead-lettering a foreign message failed");
                }
                return;
            }
        };
        let last_error = received.last_error().map(str::to_owned);
        let start = RunStart {
            id: job.id.clone(),
            name: job.name.clone(),
            max_retries: job.max_retries,
            retried: received.attempts,
            last_error: last_error.clone(),
            worker: self.worker.clone(),
            previous: job.previous.clone(),
        };
        let (attempts, previous_result) = match store.begin(&start).await {
            Ok(Begin::Run {
                attempts,
                previous_result,
            }) => (attempts, previous_result),
            Ok(Begin::AlreadySuccessful) => {
                tracing::info!(job = %job.id, "job already successful; acknowledging its redelivery");
                if let Err(error) = self.follow_up(&job, true).await {
                    tracing::error!(job = %job.id, %error, "enqueueing the jobs that follow a successful job failed; returning it to the queue");
                    self.put_back(&job.id, &*acker).await;
                    return;
                }
                if let Err(error) = acker.ack().await {
                    tracing::warn!(job = %job.id, %error, "acknowledging failed");
                }
                return;
            }
            Err(error) => {
                tracing::error!(job = %job.id, %error, "recording the start of a run failed; returning the job to the queue");
                self.put_back(&job.id, &*acker).await;
                return;
            }
        };
        let record = |status: JobStatus, retried: u32, last_error: Option<String>| JobRecord {
            id: job.id.clone(),
            name: job.name.clone(),
            status,
            retried,
            max_retries: job.max_retries,
            last_error,
            attempts,
            worker: Some(self.worker.clone()),
        };
        let registered = self.handlers.get(&job.name);
        let callbacks = registered.map(|registered| &registered.callbacks);
        let notify = |record: &JobRecord| {
            if let Some(callbacks) = callbacks {
                callbacks.call(record);
            }
        };
        notify(&record(
            JobStatus::Processing,
            received.attempts,
            last_error.clone(),
        ));
        let waiting = Settle {
            id: job.id.clone(),
            status: if received.attempts == 0 {
                JobStatus::Queued
            } else {
                JobStatus::Retrying
            },
            retried: received.attempts,
            last_error: last_error.clone(),
        };
        let mut guard = AbandonGuard {
            store: Arc::clone(store),
            waiting: Some(waiting.clone()),
        };
        let context = JobContext {
            id: job.id.clone(),
            name: job.name.clone(),
            payload: received.message.body.clone(),
            retried: received.attempts,
            last_error: last_error.clone(),
            attempts,
            worker: self.worker.clone(),
            previous: job.previous.clone(),
            previous_result,
            result: Arc::default(),
        };
        let run = async {
            let Some(registered) = registered else {
                return Err(format!("no handler is registered for job `{}`", job.name));
            };
            let attempt = run_caught(|| (registered.handler)(context.clone()));
            match job.timeout {
                None => attempt.await,
                Some(limit) => tokio::time::timeout(limit, attempt)
                    .await
                    .unwrap_or_else(|_| Err(format!("timed out after {limit:?}"))),
            }
        };
        let outcome = tokio::select! {
            outcome = run => outcome,
            () = interrupt.interrupted() => {
                tracing::warn!(job = %job.id, "job interrupted by stop; returning it to the queue");
                if let Err(error) = acker.nack(true).await {
                    tracing::warn!(job = %job.id, %error, "returning the job failed");
                }
                guard.disarm();
                self.settle(&waiting).await;
                return;
            }
        };
        guard.disarm();
        match outcome {
            Ok(()) => {
                let result = context.take_result();
                match store
                    .succeed(&job.id, &self.worker, result.as_deref())
                    .await
                {
                    Ok(true) => {
                        notify(&record(
                            JobStatus::Successful,
                            received.attempts,
                            last_error,
                        ));
                        if let Err(error) = self.follow_up(&job, false).await {
                            // Redelivered: the already-successful path enqueues what is missing.
                            tracing::error!(job = %job.id, %error, "enqueueing the jobs that follow a successful job failed; returning it to the queue");
                            self.put_back(&job.id, &*acker).await;
                            return;
                        }
                    }
                    Ok(false) => {
                        tracing::info!(job = %job.id, "another run of the job was recorded successful first");
                    }
                    Err(error) => {
                        // Runs again: success is only what the store records.
                        tracing::error!(job = %job.id, %error, "recording a finished job successful failed; returning it to the queue");
                        self.put_back(&job.id, &*acker).await;
                        return;
                    }
                }
                if let Err(error) = acker.ack().await {
                    // Redelivered later, and then acknowledged without running.
                    tracing::warn!(job = %job.id, %error, "acknowledging a successful job failed");
                }
            }
            Err(error) => {
                let retried = received.attempts.saturating_add(1);
                let retry = received.attempts < job.max_retries;
                let status = if retry {
                    JobStatus::Retrying
                } else {
                    JobStatus::Failed
                };
                // Recorded before the message moves, so that a quick retry's
                // `processing` is not overwritten by this attempt's outcome.
                let failed = Settle {
                    id: job.id.clone(),
                    status,
                    retried,
                    last_error: Some(error.clone()),
                };
                match store.settle(&failed).await {
                    Ok(true) => notify(&record(status, retried, Some(error.clone()))),
                    Ok(false) => {
                        // Another run succeeded meanwhile: this one's failure changes nothing.
                        tracing::info!(job = %job.id, %error, "a run failed after another run of the job succeeded; acknowledging it");
                        if let Err(error) = acker.ack().await {
                            tracing::warn!(job = %job.id, %error, "acknowledging failed");
                        }
                        return;
                    }
                    Err(store_error) => {
                        tracing::warn!(job = %job.id, %status, %store_error, "recording the job status failed")
                    }
                }
                let retry_in = if retry {
                    let delay = job.backoff.delay(received.attempts);
                    tracing::warn!(job = %job.id, %error, retry_in = ?delay, "job failed; retrying");
                    Some(delay)
                } else {
                    tracing::error!(job = %job.id, %error, "job failed with no retries left");
                    None
                };
                // Never an uncounted, immediate redelivery: see `settle_failure`.
                if let Err(move_error) = self
                    .enqueuer
                    .queue
                    .settle_failure(&received, &*acker, retry_in, &error)
                    .await
                {
                    tracing::warn!(job = %job.id, %move_error, "moving the failed job failed");
                }
            }
        }
    }
}

impl<B: Broker> Dispatch for JobDispatch<B> {
    fn prepare(&self) -> BoxFuture<'_, Result<String, BrokerError>> {
        // Declared by `WorkQueue::open` already; again on every (re)subscription.
        Box::pin(self.enqueuer.queue.declare())
    }

    fn process(
        self: Arc<Self>,
        delivery: Delivery,
        interrupt: Interrupt,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let (received, acker) = Received::from_delivery(self.enqueuer.queue.name(), delivery);
            self.run(received, acker, interrupt).await;
        })
    }
}
