//! Chains and groups of jobs (tasqueue's `Chain` and `Group`), built on
//! `on_success` jobs and the store's batches. Their state is derived from
//! their jobs' records, so it is as atomic and as shared as the store.

use std::collections::BTreeMap;

use super::{Batch, BatchKind, Enqueuer, Job, JobError, JobId, JobStatus, Jobs, Spec};
use crate::broker::Broker;

/// A chain's state (tasqueue's `ChainMeta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainMeta {
    /// The chain's id.
    pub id: JobId,
    /// `Queued` before its first job runs; `Processing` while it runs;
    /// `Successful` once its last job is; `Failed` once one of its jobs
    /// failed for good (the jobs after it never run).
    pub status: JobStatus,
    /// Its jobs, in order.
    pub jobs: Vec<JobId>,
    /// The first job not yet successful (the one that failed, on a failed chain).
    pub current: Option<JobId>,
    /// The jobs that finished successfully, in order.
    pub finished: Vec<JobId>,
}

/// A group's state (tasqueue's `GroupMeta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMeta {
    /// The group's id.
    pub id: JobId,
    /// `Successful` when all its jobs are, `Failed` when any failed for
    /// good, `Queued` while none has started, `Processing` otherwise.
    pub status: JobStatus,
    /// Each job's status (`None`: the store has no record of it, e.g. deleted).
    pub jobs: BTreeMap<JobId, Option<JobStatus>>,
}

impl<B: Broker> Enqueuer<B> {
    async fn statuses(&self, jobs: &[JobId]) -> Result<Vec<Option<JobStatus>>, JobError> {
        let mut statuses = Vec::with_capacity(jobs.len());
        for id in jobs {
            statuses.push(self.store.get(id).await?.map(|record| record.status));
        }
        Ok(statuses)
    }

    async fn batch_of(&self, id: &JobId, kind: BatchKind) -> Result<Option<Batch>, JobError> {
        match self.store.batch(id).await? {
            Some(batch) if batch.kind != kind => {
                Err(self.invalid(format!("{id} is a {:?}, not a {kind:?}", batch.kind)))
            }
            found => Ok(found),
        }
    }

    /// Checks `jobs`, assigns their ids and records them as a new batch.
    async fn open_batch(
        &self,
        jobs: Vec<Job>,
        kind: BatchKind,
    ) -> Result<(JobId, Vec<Spec>), JobError> {
        if jobs.is_empty() {
            let what = match kind {
                BatchKind::Chain => "chain",
                BatchKind::Group => "group",
            };
            return Err(self.invalid(format!("a {what} needs at least one job")));
        }
        jobs.iter().try_for_each(|job| self.check(job))?;
        let id = JobId::generate();
        let specs: Vec<Spec> = jobs
            .into_iter()
            .map(|job| Spec::of(job, Some(&id)))
            .collect();
        self.store
            .put_batch(Batch {
                id: id.clone(),
                kind,
                jobs: specs.iter().map(|spec| spec.id.clone()).collect(),
            })
            .await?;
        Ok((id, specs))
    }
}

impl<B: Broker> Jobs<B> {
    /// Enqueues a chain: its jobs run one after another, each once the one
    /// before it is successful, receiving that one's saved result
    /// ([`JobContext::previous_result`](super::JobContext::previous_result)).
    /// A job that fails for good stops the chain. Returns the chain's id.
    pub async fn enqueue_chain(&self, jobs: Vec<Job>) -> Result<JobId, JobError> {
        let enqueuer = &self.enqueuer;
        let (id, specs) = enqueuer.open_batch(jobs, BatchKind::Chain).await?;
        let root = specs
            .into_iter()
            .rev()
            .reduce(|next, mut before| {
                before.on_success.push(next);
                before
            })
            .ok_or_else(|| enqueuer.invalid("a chain needs at least one job".to_owned()))?;
        enqueuer.enqueue(&root).await?;
        Ok(id)
    }

    /// A chain's state; `None` for an unknown id.
    pub async fn chain(&self, id: &JobId) -> Result<Option<ChainMeta>, JobError> {
        let Some(batch) = self.enqueuer.batch_of(id, BatchKind::Chain).await? else {
            return Ok(None);
        };
        let statuses = self.enqueuer.statuses(&batch.jobs).await?;
        let done = statuses
            .iter()
            .take_while(|status| **status == Some(JobStatus::Successful))
            .count();
        let finished = batch.jobs[..done].to_vec();
        let current = batch.jobs.get(done).cloned();
        let status = match statuses.get(done) {
            None => JobStatus::Successful,
            Some(Some(JobStatus::Failed)) => JobStatus::Failed,
            Some(Some(JobStatus::Queued)) if done == 0 => JobStatus::Queued,
            Some(_) => JobStatus::Processing,
        };
        Ok(Some(ChainMeta {
            id: batch.id,
            status,
            jobs: batch.jobs,
            current,
            finished,
        }))
    }

    /// Enqueues a group: its jobs run in parallel. Returns the group's id.
    pub async fn enqueue_group(&self, jobs: Vec<Job>) -> Result<JobId, JobError> {
        let enqueuer = &self.enqueuer;
        let (id, specs) = enqueuer.open_batch(jobs, BatchKind::Group).await?;
        for spec in &specs {
            enqueuer.enqueue(spec).await?;
        }
        Ok(id)
    }

    /// A group's state; `None` for an unknown id.
    pub async fn group(&self, id: &JobId) -> Result<Option<GroupMeta>, JobError> {
        let Some(batch) = self.enqueuer.batch_of(id, BatchKind::Group).await? else {
            return Ok(None);
        };
        let statuses = self.enqueuer.statuses(&batch.jobs).await?;
        let all = |wanted: JobStatus| statuses.iter().all(|status| *status == Some(wanted));
        let status = if statuses.contains(&Some(JobStatus::Failed)) {
            JobStatus::Failed
        } else if all(JobStatus::Successful) {
            JobStatus::Successful
        } else if all(JobStatus::Queued) {
            JobStatus::Queued
        } else {
            JobStatus::Processing
        };
        Ok(Some(GroupMeta {
            id: batch.id,
            status,
            jobs: batch.jobs.into_iter().zip(statuses).collect(),
        }))
    }
}
