//! Where job records, results and chain/group memberships are kept: the
//! [`StatusStore`] trait, whose transitions are atomic (two workers never
//! both record one job successful), and the in-process
//! [`MemoryStatusStore`]. The shared, durable store on Redis is
//! `jobs::redis::RedisStore` (cargo feature `redis`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::JobId;
use crate::broker::BoxFuture;

/// Where a job is in its life (tasqueue's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Enqueued, waiting for a worker.
    Queued,
    /// A worker is running it.
    Processing,
    /// Its handler returned `Ok`; recorded once, before its message is acknowledged.
    Successful,
    /// It failed and has no retries left; it is in the failed queue.
    Failed,
    /// It failed and waits for a retry.
    Retrying,
}

impl JobStatus {
    /// Every status, in declaration order.
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Processing,
        JobStatus::Successful,
        JobStatus::Failed,
        JobStatus::Retrying,
    ];

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

    /// The status named `name` (see [`JobStatus::as_str`]).
    pub fn from_name(name: &str) -> Option<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == name)
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
    /// Runs started so far, counting runs whose worker died or was
    /// interrupted (so it can exceed `retried + 1`).
    pub attempts: u32,
    /// The worker that started its last run.
    pub worker: Option<String>,
}

impl JobRecord {
    /// A job just enqueued: queued, never run.
    pub fn queued(id: JobId, name: impl Into<String>, max_retries: u32) -> Self {
        JobRecord {
            id,
            name: name.into(),
            status: JobStatus::Queued,
            retried: 0,
            max_retries,
            last_error: None,
            attempts: 0,
            worker: None,
        }
    }
}

/// A worker starting a run of a job, for [`StatusStore::begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStart {
    /// The job's id.
    pub id: JobId,
    /// The job's name.
    pub name: String,
    /// Its maximum number of retries.
    pub max_retries: u32,
    /// Failed attempts so far (from its message).
    pub retried: u32,
    /// The error of its last failed attempt (from its message).
    pub last_error: Option<String>,
    /// The worker starting the run.
    pub worker: String,
    /// The job whose saved result this one receives (chains, `on_success`).
    pub previous: Option<JobId>,
}

/// What [`StatusStore::begin`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The job is now `processing`: run it.
    Run {
        /// Runs started, this one included.
        attempts: u32,
        /// The saved result of [`RunStart::previous`], if it saved one.
        previous_result: Option<Vec<u8>>,
    },
    /// The job is already successful: acknowledge its message without running it.
    AlreadySuccessful,
}

/// A run that ended without success, for [`StatusStore::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle {
    /// The job's id.
    pub id: JobId,
    /// `Retrying` or `Failed` after a failed attempt; `Queued` or `Retrying`
    /// when an interrupted run returns its job to the queue.
    pub status: JobStatus,
    /// Failed attempts so far.
    pub retried: u32,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
}

/// Whether a [`Batch`] is a chain or a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchKind {
    /// Jobs run one after another, each receiving the previous one's result.
    Chain,
    /// Jobs run in parallel.
    Group,
}

/// The jobs of a chain or group, in order (their ids are assigned before any runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The chain's or group's id.
    pub id: JobId,
    /// Chain or group.
    pub kind: BatchKind,
    /// Its jobs, in order.
    pub jobs: Vec<JobId>,
}

/// A status store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job status store: {0}")]
pub struct StoreError(pub String);

/// Where job records, results and batches are kept. Every transition is
/// atomic, also across processes sharing the store. [`MemoryStatusStore`]
/// is the default.
pub trait StatusStore: Send + Sync + 'static {
    /// Records a new job unless a record with its id exists; whether it did.
    fn insert(&self, record: JobRecord) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Starts a run: an already successful job is left alone
    /// ([`Begin::AlreadySuccessful`]); any other (or unknown) job becomes
    /// `processing` with one more attempt and `run.worker` as its worker.
    fn begin<'a>(&'a self, run: &'a RunStart) -> BoxFuture<'a, Result<Begin, StoreError>>;
    /// Records a job successful with its result (if any), unless it already
    /// is; whether this call recorded it.
    fn succeed<'a>(
        &'a self,
        id: &'a JobId,
        worker: &'a str,
        result: Option<&'a [u8]>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Records a run's end without success, unless the job is already
    /// successful; whether it did.
    fn settle<'a>(&'a self, settle: &'a Settle) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// A job's record.
    fn get<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>>;
    /// A job's saved result.
    fn result<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>>;
    /// The ids of the jobs with a status, in id order.
    fn list(&self, status: JobStatus) -> BoxFuture<'_, Result<Vec<JobId>, StoreError>>;
    /// Forgets a job's record and result.
    fn delete<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Records a chain or group.
    fn put_batch(&self, batch: Batch) -> BoxFuture<'_, Result<(), StoreError>>;
    /// A chain or group.
    fn batch<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Batch>, StoreError>>;
}

#[derive(Debug, Default)]
struct Tables {
    records: BTreeMap<JobId, JobRecord>,
    results: HashMap<JobId, Vec<u8>>,
    batches: HashMap<JobId, Batch>,
}

/// An in-process [`StatusStore`]; records live as long as the store.
#[derive(Debug, Default)]
pub struct MemoryStatusStore {
    tables: Mutex<Tables>,
}

impl MemoryStatusStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, Result<T, StoreError>> {
    Box::pin(std::future::ready(Ok(value)))
}

impl StatusStore for MemoryStatusStore {
    fn insert(&self, record: JobRecord) -> BoxFuture<'_, Result<bool, StoreError>> {
        let mut tables = self.tables();
        let inserted = !tables.records.contains_key(&record.id);
        if inserted {
            tables.records.insert(record.id.clone(), record);
        }
        ready(inserted)
    }

    fn begin<'a>(&'a self, run: &'a RunStart) -> BoxFuture<'a, Result<Begin, StoreError>> {
        let mut tables = self.tables();
        let previous_result = run
            .previous
            .as_ref()
            .and_then(|previous| tables.results.get(previous).cloned());
        let record = tables
            .records
            .entry(run.id.clone())
            .or_insert_with(|| JobRecord::queued(run.id.clone(), &run.name, run.max_retries));
        if record.status == JobStatus::Successful {
            return ready(Begin::AlreadySuccessful);
        }
        record.name.clone_from(&run.name);
        record.status = JobStatus::Processing;
        record.retried = run.retried;
        record.max_retries = run.max_retries;
        record.last_error.clone_from(&run.last_error);
        record.attempts = record.attempts.saturating_add(1);
        record.worker = Some(run.worker.clone());
        ready(Begin::Run {
            attempts: record.attempts,
            previous_result,
        })
    }

    fn succeed<'a>(
        &'a self,
        id: &'a JobId,
        worker: &'a str,
        result: Option<&'a [u8]>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut guard = self.tables();
        let tables = &mut *guard;
        let Some(record) = tables.records.get_mut(id) else {
            return Box::pin(std::future::ready(Err(StoreError(format!(
                "job {id} has no record to mark successful"
            )))));
        };
        if record.status == JobStatus::Successful {
            return ready(false);
        }
        record.status = JobStatus::Successful;
        record.worker = Some(worker.to_owned());
        if let Some(result) = result {
            tables.results.insert(id.clone(), result.to_vec());
        }
        ready(true)
    }

    fn settle<'a>(&'a self, settle: &'a Settle) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut tables = self.tables();
        let Some(record) = tables.records.get_mut(&settle.id) else {
            return Box::pin(std::future::ready(Err(StoreError(format!(
                "job {} has no record to mark {}",
                settle.id, settle.status
            )))));
        };
        if record.status == JobStatus::Successful {
            return ready(false);
        }
        record.status = settle.status;
        record.retried = settle.retried;
        record.last_error.clone_from(&settle.last_error);
        ready(true)
    }

    fn get<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>> {
        ready(self.tables().records.get(id).cloned())
    }

    fn result<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        ready(self.tables().results.get(id).cloned())
    }

    fn list(&self, status: JobStatus) -> BoxFuture<'_, Result<Vec<JobId>, StoreError>> {
        let ids: BTreeSet<JobId> = self
            .tables()
            .records
            .values()
            .filter(|record| record.status == status)
            .map(|record| record.id.clone())
            .collect();
        ready(ids.into_iter().collect())
    }

    fn delete<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut tables = self.tables();
        tables.records.remove(id);
        tables.results.remove(id);
        ready(())
    }

    fn put_batch(&self, batch: Batch) -> BoxFuture<'_, Result<(), StoreError>> {
        self.tables().batches.insert(batch.id.clone(), batch);
        ready(())
    }

    fn batch<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Batch>, StoreError>> {
        ready(self.tables().batches.get(id).cloned())
    }
}
