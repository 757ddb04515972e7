//! Jobs on a work queue, after tasqueue: enqueue named jobs with a payload,
//! run them with registered handlers, retry failures with exponential
//! backoff, keep the ones that failed for good in a failed (dead-letter)
//! queue with their last error, and observe each job's status.
//!
//! # Semantics
//!
//! - A job is a message on a [`WorkQueue`] (id = message id; name, retry
//!   options and attempt count in `tc-` headers). [`Jobs::enqueue`] records
//!   the job as [`JobStatus::Queued`] before publishing it.
//! - A worker marks a job [`Processing`](JobStatus::Processing) and runs its
//!   handler. `Ok` acknowledges the message and only *then* records
//!   [`Successful`](JobStatus::Successful). An error, a panic, or running
//!   past the job's timeout is a failed attempt: while retries are left the
//!   job is recorded [`Retrying`](JobStatus::Retrying) and put back after
//!   `base * 2^attempt` (capped, and never more than
//!   [`MAX_DELAY`](crate::broker::MAX_DELAY)); after `max_retries` retries it
//!   is recorded [`Failed`](JobStatus::Failed) and moved to the failed queue
//!   (`<queue>.dead`) with the error in its `tc-last-error` header. Moving
//!   a failed job never turns into an uncounted, immediate rerun, even when
//!   the broker refuses its copy (see the [`queue`](crate::queue) module).
//! - A handler that is interrupted — the worker is stopped and its drain
//!   timeout passes, or the handler's future is dropped — is **never**
//!   recorded successful: its message goes back to the queue unchanged
//!   (redelivered later, not counted as an attempt) and its status back to
//!   `Queued` (or `Retrying` if it had failed before).
//! - Delivery is at least once. A redelivered job whose status is already
//!   `Successful` is acknowledged without running again.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
}

impl Job {
    /// A job with the default options.
    pub fn new(name: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Job {
            name: name.into(),
            payload: payload.into(),
            options: JobOptions::default(),
        }
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

/// Where a job is in its life (tasqueue's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Enqueued, waiting for a worker.
    Queued,
    /// A worker is running it.
    Processing,
    /// Its handler returned `Ok` and its message was acknowledged.
    Successful,
    /// It failed and has no retries left; it is in the failed queue.
    Failed,
    /// It failed and waits for a retry.
    Retrying,
}

impl JobStatus {
    /// The status's name: `queued`, `processing`, `successful`, `failed` or `retrying`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Processing => "processing",
            JobStatus::Successful => "successful",
            JobStatus::Failed => "failed",
            JobStatus::Retrying => "retrying",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the status store knows about a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// The job's name.
    pub name: String,
    /// Its current status.
    pub status: JobStatus,
    /// Failed attempts so far.
    pub retried: u32,
    /// Its maximum number of retries.
    pub max_retries: u32,
    /// The error of its last failed attempt.
    pub last_error: Option<String>,
}

/// A status store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job status store: {0}")]
pub struct StoreError(pub String);

/// Where job statuses are kept. [`MemoryStatusStore`] is the default.
pub trait StatusStore: Send + Sync + 'static {
    /// Records (replaces) a job's record.
    fn put(&self, record: JobRecord) -> BoxFuture<'_, Result<(), StoreError>>;
    /// A job's record.
    fn get<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>>;
    /// The ids of the jobs with a status, in id order.
    fn list(&self, status: JobStatus) -> BoxFuture<'_, Result<Vec<JobId>, StoreError>>;
    /// Forgets a job's record.
    fn delete<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// An in-process [`StatusStore`]; records live as long as the store.
#[derive(Debug, Default)]
pub struct MemoryStatusStore {
    records: Mutex<BTreeMap<JobId, JobRecord>>,
}

impl MemoryStatusStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<JobId, JobRecord>> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl StatusStore for MemoryStatusStore {
    fn put(&self, record: JobRecord) -> BoxFuture<'_, Result<(), StoreError>> {
        self.records().insert(record.id.clone(), record);
        Box::pin(std::future::ready(Ok(())))
    }

    fn get<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>> {
        let found = self.records().get(id).cloned();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn list(&self, status: JobStatus) -> BoxFuture<'_, Result<Vec<JobId>, StoreError>> {
        let ids = self
            .records()
            .values()
            .filter(|record| record.status == status)
            .map(|record| record.id.clone())
            .collect();
        Box::pin(std::future::ready(Ok(ids)))
    }

    fn delete<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<(), StoreError>> {
        self.records().remove(id);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A job as its handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl JobContext {
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
    /// [`Jobs::stop`] was called while the workers were not running.
    #[error("job workers of queue `{queue}` are not running")]
    NotRunning {
        /// The queue's full name.
        queue: String,
    },
}

type JobFn = Box<dyn Fn(JobContext) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;

/// Configures [`Jobs`].
pub struct JobsBuilder<B: Broker> {
    broker: B,
    queue: String,
    store: Arc<dyn StatusStore>,
    handlers: HashMap<String, JobFn>,
    concurrency: u16,
    drain_timeout: Option<Duration>,
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
            queue_settings: QueueSettings::default(),
        }
    }

    /// How the job queue and its failed queue are declared (default: quorum
    /// queues with a delivery limit; see [`QueueSettings`]).
    pub fn queue_settings(mut self, settings: QueueSettings) -> Self {
        self.queue_settings = settings;
        self
    }

    /// Uses another status store.
    pub fn store(mut self, store: Arc<dyn StatusStore>) -> Self {
        self.store = store;
        self
    }

    /// Registers the handler of jobs named `name` (replacing an earlier one).
    pub fn register<F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handlers
            .insert(name.into(), Box::new(move |job| Box::pin(handler(job))));
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
        let dispatch = Arc::new(JobDispatch {
            queue: queue.clone(),
            store: Arc::clone(&self.store),
            handlers: self.handlers,
        });
        Ok(Jobs {
            runner: Runner::owned(self.broker, dispatch, config),
            queue,
            store: self.store,
            has_handlers,
        })
    }
}

/// Enqueues jobs and runs workers for them; see the [module docs](self).
/// Dropping running workers stops them.
pub struct Jobs<B: Broker> {
    queue: WorkQueue<B>,
    store: Arc<dyn StatusStore>,
    runner: OwnedRunner<B, JobDispatch<B>>,
    has_handlers: bool,
}

impl<B: Broker> Jobs<B> {
    /// A builder (see [`JobsBuilder::new`]).
    pub fn builder(broker: B, queue: impl Into<String>) -> JobsBuilder<B> {
        JobsBuilder::new(broker, queue)
    }

    /// The work queue holding the jobs.
    pub fn queue(&self) -> &WorkQueue<B> {
        &self.queue
    }

    /// Records the job as queued and publishes it; returns its id.
    pub async fn enqueue(&self, job: Job) -> Result<JobId, JobError> {
        if job.name.is_empty() {
            return Err(JobError::Invalid {
                queue: self.queue.name().to_owned(),
                reason: "a job needs a name".to_owned(),
            });
        }
        let id = JobId::generate();
        let options = job.options;
        let mut message = QueueMessage::new(job.payload)
            .with_id(id.as_str())
            .with_header(JOB_NAME_HEADER, job.name.clone())
            .with_header(MAX_RETRIES_HEADER, options.max_retries.to_string())
            .with_header(BACKOFF_BASE_HEADER, millis(options.backoff.base))
            .with_header(BACKOFF_CAP_HEADER, millis(options.backoff.cap));
        if let Some(limit) = options.timeout {
            message = message.with_header(TIMEOUT_HEADER, millis(limit));
        }
        self.store
            .put(JobRecord {
                id: id.clone(),
                name: job.name,
                status: JobStatus::Queued,
                retried: 0,
                max_retries: options.max_retries,
                last_error: None,
            })
            .await?;
        if let Err(error) = self.queue.put(message, options.delay).await {
            // Not enqueued: forget it rather than leave a phantom `queued` job.
            if let Err(store_error) = self.store.delete(&id).await {
                tracing::warn!(job = %id, %store_error, "forgetting a job that was not enqueued failed");
            }
            return Err(error.into());
        }
        Ok(id)
    }

    /// What the store knows about a job.
    pub async fn status(&self, id: &JobId) -> Result<Option<JobRecord>, JobError> {
        Ok(self.store.get(id).await?)
    }

    /// Jobs waiting in the queue, oldest first (not those waiting out a
    /// delay or a retry backoff, nor those being processed).
    pub async fn pending(&self) -> Result<Vec<PendingJob>, JobError> {
        Ok(self
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
            .queue
            .dead_letters()
            .await?
            .into_iter()
            .map(PendingJob::from)
            .collect())
    }

    /// Ids of the jobs recorded as failed.
    pub async fn failed(&self) -> Result<Vec<JobId>, JobError> {
        Ok(self.store.list(JobStatus::Failed).await?)
    }

    /// Ids of the jobs recorded as successful.
    pub async fn successful(&self) -> Result<Vec<JobId>, JobError> {
        Ok(self.store.list(JobStatus::Successful).await?)
    }

    /// Forgets a job's record (not its message, if still queued).
    pub async fn forget(&self, id: &JobId) -> Result<(), JobError> {
        Ok(self.store.delete(id).await?)
    }

    /// Starts the workers; returns once subscribed. Safe to call while running.
    /// An error if no handler is registered.
    pub async fn start(&self) -> Result<(), JobError> {
        if !self.has_handlers {
            return Err(JobError::Invalid {
                queue: self.queue.name().to_owned(),
                reason: "no job handler is registered, so workers would fail every job".to_owned(),
            });
        }
        self.runner.start().await.map_err(|source| {
            JobError::Queue(QueueError::Broker {
                queue: self.queue.name().to_owned(),
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
                queue: self.queue.name().to_owned(),
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
        id,
        name,
    })
}

struct JobDispatch<B: Broker> {
    queue: WorkQueue<B>,
    store: Arc<dyn StatusStore>,
    handlers: HashMap<String, JobFn>,
}

/// Puts a job's status back to waiting if its run is abandoned without an
/// outcome (its future dropped): never left looking successful or running.
struct AbandonGuard {
    store: Arc<dyn StatusStore>,
    record: Option<JobRecord>,
}

impl AbandonGuard {
    fn disarm(&mut self) {
        self.record = None;
    }
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            let store = Arc::clone(&self.store);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        let id = record.id.clone();
                        if let Err(error) = store.put(record).await {
                            tracing::warn!(job = %id, %error, "recording an abandoned job failed");
                        }
                    });
                }
                Err(_) => {
                    tracing::warn!(job = %record.id, "job abandoned outside a runtime; its status stays `processing`")
                }
            }
        }
    }
}

impl<B: Broker> JobDispatch<B> {
    async fn record(&self, record: JobRecord) {
        let id = record.id.clone();
        let status = record.status;
        if let Err(error) = self.store.put(record).await {
            tracing::warn!(job = %id, %status, %error, "recording the job status failed");
        }
    }

    async fn run(&self, received: Received, acker: Box<dyn AckHandle>, mut interrupt: Interrupt) {
        let queue = self.queue.name().to_owned();
        let job = match incoming(&received) {
            Ok(job) => job,
            Err(reason) => {
                tracing::error!(%queue, %reason, "not a job message; moving it to the failed queue");
                if let Err(error) = self
                    .queue
                    .settle_failure(&received, &*acker, None, &reason)
                    .await
                {
                    tracing::warn!(%error, "dead-lettering a foreign message failed");
                }
                return;
            }
        };
        let base = JobRecord {
            id: job.id.clone(),
            name: job.name.clone(),
            status: JobStatus::Processing,
            retried: received.attempts,
            max_retries: job.max_retries,
            last_error: received.last_error().map(str::to_owned),
        };
        let waiting = JobRecord {
            status: if received.attempts == 0 {
                JobStatus::Queued
            } else {
                JobStatus::Retrying
            },
            ..base.clone()
        };
        match self.store.get(&job.id).await {
            Ok(Some(record)) if record.status == JobStatus::Successful => {
                tracing::info!(job = %job.id, "job already successful; acknowledging its redelivery");
                if let Err(error) = acker.ack().await {
                    tracing::warn!(job = %job.id, %error, "acknowledging failed");
                }
                return;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(job = %job.id, %error, "reading the job status failed"),
        }
        self.record(base.clone()).await;
        let mut guard = AbandonGuard {
            store: Arc::clone(&self.store),
            record: Some(waiting.clone()),
        };
        let context = JobContext {
            id: job.id.clone(),
            name: job.name.clone(),
            payload: received.message.body.clone(),
            retried: received.attempts,
            last_error: received.last_error().map(str::to_owned),
        };
        let run = async {
            let Some(handler) = self.handlers.get(&job.name) else {
                return Err(format!("no handler is registered for job `{}`", job.name));
            };
            let attempt = run_caught(handler(context));
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
                self.record(waiting).await;
                return;
            }
        };
        guard.disarm();
        match outcome {
            Ok(()) => match acker.ack().await {
                Ok(()) => {
                    self.record(JobRecord {
                        status: JobStatus::Successful,
                        ..base
                    })
                    .await
                }
                Err(error) => {
                    // Redelivered later; not successful until acknowledged.
                    tracing::warn!(job = %job.id, %error, "acknowledging a finished job failed");
                    self.record(waiting).await;
                }
            },
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
                self.record(JobRecord {
                    status,
                    retried,
                    last_error: Some(error.clone()),
                    ..base
                })
                .await;
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
        Box::pin(self.queue.declare())
    }

    fn process(
        self: Arc<Self>,
        delivery: Delivery,
        interrupt: Interrupt,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let (received, acker) = Received::from_delivery(self.queue.name(), delivery);
            self.run(received, acker, interrupt).await;
        })
    }
}
