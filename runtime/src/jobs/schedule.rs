//! Jobs enqueued on cron schedules. Each tick's job has the id
//! `<schedule>@<tick, in Unix seconds>` and is enqueued through the store's
//! atomic insert, so several processes running the same schedule on a
//! shared store enqueue each tick exactly once.

use std::str::FromStr;

use chrono::Utc;
use croner::Cron;

use super::{Enqueuer, Job, JobError, Jobs, Spec};
use crate::broker::Broker;

/// A running schedule; dropping it (or [`Schedule::cancel`]) stops it.
#[derive(Debug)]
pub struct Schedule {
    name: String,
    task: tokio::task::JoinHandle<()>,
}

impl Schedule {
    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops enqueueing.
    pub fn cancel(self) {}
}

impl Drop for Schedule {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<B: Broker> Jobs<B> {
    /// Enqueues a copy of `job` at every tick of the cron expression
    /// `expression` (UTC; five fields, or six with seconds first), until the
    /// returned [`Schedule`] is dropped. Each tick's job gets the id
    /// `<name>@<Unix seconds>`: other processes running the schedule `name`
    /// on the same store do not enqueue it again. Needs a Tokio runtime.
    pub fn schedule(&self, name: &str, expression: &str, job: Job) -> Result<Schedule, JobError> {
        let invalid = |reason: String| JobError::Cron {
            schedule: name.to_owned(),
            expression: expression.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("the schedule needs a name".to_owned()));
        }
        self.enqueuer.check(&job)?;
        let cron = Cron::from_str(expression).map_err(|error| invalid(error.to_string()))?;
        // Fails now rather than in the task if the expression never matches.
        cron.find_next_occurrence(&Utc::now(), false)
            .map_err(|error| invalid(error.to_string()))?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| invalid("schedules need a Tokio runtime".to_owned()))?;
        let task = runtime.spawn(tick(self.enqueuer.clone(), name.to_owned(), cron, job));
        Ok(Schedule {
            name: name.to_owned(),
            task,
        })
    }
}

async fn tick<B: Broker>(enqueuer: Enqueuer<B>, name: String, cron: Cron, job: Job) {
    let mut after = Utc::now();
    loop {
        let next = match cron.find_next_occurrence(&after, false) {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(schedule = %name, %error, "no next tick; the schedule stops");
                return;
            }
        };
        if let Ok(wait) = (next - Utc::now()).to_std() {
            tokio::time::sleep(wait).await;
        }
        let id = format!("{name}@{}", next.timestamp());
        match enqueuer
            .enqueue(&Spec::of(job.clone().with_id(id.as_str()), None))
            .await
        {
            Ok(_) => tracing::debug!(schedule = %name, job = %id, "scheduled job enqueued"),
            Err(JobError::Duplicate { .. }) => {
                tracing::debug!(schedule = %name, job = %id, "tick already enqueued by another scheduler")
            }
            Err(error) => {
                tracing::error!(schedule = %name, job = %id, %error, "enqueueing a scheduled job failed")
            }
        }
        after = next;
    }
}
