//! [`RedisStore`]: a [`StatusStore`] on Redis, shared by every worker process
//! that uses the same Redis and key prefix, and durable as that Redis is.
//!
//! # Layout (all keys start with the store's prefix and a colon)
//!
//! - `job:<id>`: a hash with the job's record (`name`, `status`, `retried`,
//!   `max_retries`, `last_error`, `attempts`, `worker`).
//! - `result:<id>`: the job's saved result bytes.
//! - `status:<status>`: a set of the ids of the jobs with that status.
//! - `batch:<id>`: a chain or group, as JSON.
//!
//! Each transition is one Lua script, so it is atomic across processes and
//! costs one round trip: enqueueing, starting and finishing a job
//! successfully take three in all ([`RedisStore::round_trips`] counts them).
//! The scripts derive the status-set keys from the prefix, so the store
//! needs one Redis (not a Redis Cluster).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use super::JobId;
use super::store::{Batch, Begin, JobRecord, JobStatus, RunStart, Settle, StatusStore, StoreError};
use crate::broker::BoxFuture;

const INSERT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'name', ARGV[3], 'status', ARGV[4], 'retried', ARGV[5],
  'max_retries', ARGV[6], 'attempts', ARGV[7])
if ARGV[8] == '1' then redis.call('HSET', KEYS[1], 'last_error', ARGV[9]) end
if ARGV[10] == '1' then redis.call('HSET', KEYS[1], 'worker', ARGV[11]) end
redis.call('SADD', ARGV[1] .. 'status:' .. ARGV[4], ARGV[2])
return 1
";

const BEGIN: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'successful' then return {-1, false} end
if status then redis.call('SREM', ARGV[1] .. 'status:' .. status, ARGV[2]) end
redis.call('HSET', KEYS[1], 'name', ARGV[3], 'status', 'processing', 'max_retries', ARGV[4],
  'retried', ARGV[5], 'worker', ARGV[6])
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[1], 'last_error', ARGV[8])
else
  redis.call('HDEL', KEYS[1], 'last_error')
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SADD', ARGV[1] .. 'status:processing', ARGV[2])
local previous = false
if ARGV[9] == '1' then previous = redis.call('GET', KEYS[2]) end
return {attempts, previous}
";

const SUCCEED: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return redis.error_reply('job ' .. ARGV[2] .. ' has no record to mark successful') end
if status == 'successful' then return 0 end
redis.call('SREM', ARGV[1] .. 'status:' .. status, ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'successful', 'worker', ARGV[3])
redis.call('SADD', ARGV[1] .. 'status:successful', ARGV[2])
if ARGV[4] == '1' then redis.call('SET', KEYS[2], ARGV[5]) end
return 1
";

const SETTLE: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return redis.error_reply('job ' .. ARGV[2] .. ' has no record to mark ' .. ARGV[3]) end
if status == 'successful' then return 0 end
redis.call('SREM', ARGV[1] .. 'status:' .. status, ARGV[2])
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'retried', ARGV[4])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'last_error', ARGV[6])
else
  redis.call('HDEL', KEYS[1], 'last_error')
end
redis.call('SADD', ARGV[1] .. 'status:' .. ARGV[3], ARGV[2])
return 1
";

const DELETE: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if status then redis.call('SREM', ARGV[1] .. 'status:' .. status, ARGV[2]) end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
";

/// The compiled scripts (their SHA1s are computed once).
struct Scripts {
    insert: Script,
    begin: Script,
    succeed: Script,
    settle: Script,
    delete: Script,
}

/// A connection that counts its round trips to Redis.
#[derive(Clone)]
struct Counted {
    inner: ConnectionManager,
    trips: Arc<AtomicU64>,
}

impl ConnectionLike for Counted {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.trips.fetch_add(1, Ordering::Relaxed);
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.trips.fetch_add(1, Ordering::Relaxed);
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// A [`StatusStore`] on Redis; see the [module docs](self). Cloning shares
/// the connection.
#[derive(Clone)]
pub struct RedisStore {
    connection: Counted,
    prefix: String,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://host:port/db`) and keeps its
    /// keys under `prefix` (for example `myapp-jobs`). The connection
    /// reconnects by itself later; an error if Redis cannot be reached now.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let failed = |error: redis::RedisError| {
            StoreError(format!("connecting to Redis at {url} failed: {error}"))
        };
        if prefix.is_empty() {
            return Err(StoreError(format!(
                "Redis store at {url}: the key prefix is empty"
            )));
        }
        let client = redis::Client::open(url).map_err(failed)?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let inner = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(failed)?;
        Ok(RedisStore {
            connection: Counted {
                inner,
                trips: Arc::new(AtomicU64::new(0)),
            },
            prefix: format!("{prefix}:"),
            scripts: Arc::new(Scripts {
                insert: Script::new(INSERT),
                begin: Script::new(BEGIN),
                succeed: Script::new(SUCCEED),
                settle: Script::new(SETTLE),
                delete: Script::new(DELETE),
            }),
        })
    }

    /// Round trips to Redis made through this store (and its clones) so far.
    pub fn round_trips(&self) -> u64 {
        self.connection.trips.load(Ordering::Relaxed)
    }

    /// The key prefix, with its trailing colon.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Deletes every key under the store's prefix (for tests and resets).
    pub async fn clear(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let pattern = format!("{}*", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut connection)
                .await
                .map_err(|error| self.error("listing keys to clear", error))?;
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<()>(&mut connection)
                    .await
                    .map_err(|error| self.error("clearing keys", error))?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    fn error(&self, what: &str, error: redis::RedisError) -> StoreError {
        StoreError(format!(
            "Redis store `{}`: {what} failed: {error}",
            self.prefix
        ))
    }

    fn job_key(&self, id: &JobId) -> String {
        format!("{}job:{id}", self.prefix)
    }

    fn result_key(&self, id: &JobId) -> String {
        format!("{}result:{id}", self.prefix)
    }

    fn batch_key(&self, id: &JobId) -> String {
        format!("{}batch:{id}", self.prefix)
    }

    fn record(
        &self,
        id: &JobId,
        mut fields: HashMap<String, String>,
    ) -> Result<JobRecord, StoreError> {
        let key = self.job_key(id);
        let mut take = |field: &str| {
            fields
                .remove(field)
                .ok_or_else(|| StoreError(format!("Redis hash `{key}` has no field `{field}`")))
        };
        let number = |field: &str, text: String| {
            text.parse::<u32>().map_err(|_| {
                StoreError(format!(
                    "Redis hash `{}` has the unreadable `{field}` value `{text}`",
                    self.job_key(id)
                ))
            })
        };
        let name = take("name")?;
        let status_text = take("status")?;
        let status = JobStatus::from_name(&status_text).ok_or_else(|| {
            StoreError(format!(
                "Redis hash `{}` has the unknown status `{status_text}`",
                self.job_key(id)
            ))
        })?;
        let retried = number("retried", take("retried")?)?;
        let max_retries = number("max_retries", take("max_retries")?)?;
        let attempts = number("attempts", take("attempts")?)?;
        Ok(JobRecord {
            id: id.clone(),
            name,
            status,
            retried,
            max_retries,
            attempts,
            last_error: fields.remove("last_error"),
            worker: fields.remove("worker"),
        })
    }
}

impl StatusStore for RedisStore {
    fn insert(&self, record: JobRecord) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let inserted: i64 = self
                .scripts
                .insert
                .key(self.job_key(&record.id))
                .arg(&self.prefix)
                .arg(record.id.as_str())
                .arg(&record.name)
                .arg(record.status.as_str())
                .arg(record.retried)
                .arg(record.max_retries)
                .arg(record.attempts)
                .arg(flag(record.last_error.is_some()))
                .arg(record.last_error.as_deref().unwrap_or(""))
                .arg(flag(record.worker.is_some()))
                .arg(record.worker.as_deref().unwrap_or(""))
                .invoke_async(&mut connection)
                .await
                .map_err(|error| self.error(&format!("inserting job {}", record.id), error))?;
            Ok(inserted == 1)
        })
    }

    fn begin<'a>(&'a self, run: &'a RunStart) -> BoxFuture<'a, Result<Begin, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let previous_key = match &run.previous {
                Some(previous) => self.result_key(previous),
                None => self.result_key(&run.id),
            };
            let (attempts, previous_result): (i64, Option<Vec<u8>>) = self
                .scripts
                .begin
                .key(self.job_key(&run.id))
                .key(previous_key)
                .arg(&self.prefix)
                .arg(run.id.as_str())
                .arg(&run.name)
                .arg(run.max_retries)
                .arg(run.retried)
                .arg(&run.worker)
                .arg(flag(run.last_error.is_some()))
                .arg(run.last_error.as_deref().unwrap_or(""))
                .arg(flag(run.previous.is_some()))
                .invoke_async(&mut connection)
                .await
                .map_err(|error| self.error(&format!("starting job {}", run.id), error))?;
            if attempts < 0 {
                return Ok(Begin::AlreadySuccessful);
            }
            Ok(Begin::Run {
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                previous_result,
            })
        })
    }

    fn succeed<'a>(
        &'a self,
        id: &'a JobId,
        worker: &'a str,
        result: Option<&'a [u8]>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let recorded: i64 = self
                .scripts
                .succeed
                .key(self.job_key(id))
                .key(self.result_key(id))
                .arg(&self.prefix)
                .arg(id.as_str())
                .arg(worker)
                .arg(flag(result.is_some()))
                .arg(result.unwrap_or_default())
                .invoke_async(&mut connection)
                .await
                .map_err(|error| self.error(&format!("recording job {id} successful"), error))?;
            Ok(recorded == 1)
        })
    }

    fn settle<'a>(&'a self, settle: &'a Settle) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let recorded: i64 = self
                .scripts
                .settle
                .key(self.job_key(&settle.id))
                .arg(&self.prefix)
                .arg(settle.id.as_str())
                .arg(settle.status.as_str())
                .arg(settle.retried)
                .arg(flag(settle.last_error.is_some()))
                .arg(settle.last_error.as_deref().unwrap_or(""))
                .invoke_async(&mut connection)
                .await
                .map_err(|error| {
                    self.error(
                        &format!("recording job {} {}", settle.id, settle.status),
                        error,
                    )
                })?;
            Ok(recorded == 1)
        })
    }

    fn get<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let fields: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.job_key(id))
                .query_async(&mut connection)
                .await
                .map_err(|error| self.error(&format!("reading job {id}"), error))?;
            if fields.is_empty() {
                return Ok(None);
            }
            self.record(id, fields).map(Some)
        })
    }

    fn result<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            redis::cmd("GET")
                .arg(self.result_key(id))
                .query_async(&mut connection)
                .await
                .map_err(|error| self.error(&format!("reading the result of job {id}"), error))
        })
    }

    fn list(&self, status: JobStatus) -> BoxFuture<'_, Result<Vec<JobId>, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(format!("{}status:{status}", self.prefix))
                .query_async(&mut connection)
                .await
                .map_err(|error| self.error(&format!("listing {status} jobs"), error))?;
            ids.sort();
            Ok(ids.into_iter().map(JobId::from).collect())
        })
    }

    fn delete<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let _: i64 = self
                .scripts
                .delete
                .key(self.job_key(id))
                .key(self.result_key(id))
                .arg(&self.prefix)
                .arg(id.as_str())
                .invoke_async(&mut connection)
                .await
                .map_err(|error| self.error(&format!("deleting job {id}"), error))?;
            Ok(())
        })
    }

    fn put_batch(&self, batch: Batch) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let text = serde_json::to_string(&batch)
                .map_err(|error| StoreError(format!("batch {}: {error}", batch.id)))?;
            redis::cmd("SET")
                .arg(self.batch_key(&batch.id))
                .arg(text)
                .query_async::<()>(&mut connection)
                .await
                .map_err(|error| self.error(&format!("recording batch {}", batch.id), error))
        })
    }

    fn batch<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Batch>, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let text: Option<String> = redis::cmd("GET")
                .arg(self.batch_key(id))
                .query_async(&mut connection)
                .await
                .map_err(|error| self.error(&format!("reading batch {id}"), error))?;
            text.map(|text| {
                serde_json::from_str(&text).map_err(|error| {
                    StoreError(format!(
                        "Redis key `{}` does not hold a batch: {error}",
                        self.batch_key(id)
                    ))
                })
            })
            .transpose()
        })
    }
}
