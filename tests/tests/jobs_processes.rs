//! The proof with real processes: three worker processes (`jobs_worker`,
//! this package's binary) on the real RabbitMQ (`AMQP_URL`) and Redis
//! (`REDIS_URL`) run 1,000 jobs — 750 single jobs (some fail for good, some
//! fail once), 50 chains of 3 and 20 groups of 5 — while one worker is
//! SIGKILLed mid-run and a replacement started. Then every job must have
//! ended as its handler decided, none recorded successful twice, the chains
//! in order with their results passed along, the groups' statuses matching
//! their jobs, and the store agreeing with what the handlers printed.
//! Bounded: about 15 s here, at most 90 s (then it fails).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exchange_runtime::broker::Broker;
use exchange_runtime::broker::amqp::AmqpBroker;
use exchange_runtime::jobs::redis::RedisStore;
use exchange_runtime::jobs::{Job, JobId, JobStatus, Jobs};
use serde_json::json;

const WORKER: &str = env!("CARGO_BIN_EXE_jobs_worker");
/// The whole test's bound.
const LIMIT: Duration = Duration::from_secs(90);

type Lines = Arc<Mutex<Vec<String>>>;

/// Starts a worker process whose stdout lines go to `lines`; returns once it is subscribed.
fn start_worker(args: &[String], name: &str, lines: &Lines, deadline: Instant) -> Child {
    let mut child = Command::new(WORKER)
        .args(args)
        .arg(name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("starting {WORKER}: {error}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let sink = Arc::clone(lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let ready = format!("READY {name}");
    while !lines.lock().unwrap().contains(&ready) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("worker {name} exited before it was ready: {status}");
        }
        assert!(Instant::now() < deadline, "worker {name} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// What the workers printed about one job.
#[derive(Debug, Default)]
struct Seen {
    runs: Vec<(String, String)>,
    ends: Vec<(String, String)>,
    successes: Vec<String>,
}

fn parse(lines: &[String]) -> BTreeMap<String, Seen> {
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    for line in lines {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["RUN", worker, job, _retried, previous] => seen
                .entry((*job).to_owned())
                .or_default()
                .runs
                .push(((*worker).to_owned(), (*previous).to_owned())),
            ["END", worker, job, outcome] => seen
                .entry((*job).to_owned())
                .or_default()
                .ends
                .push(((*worker).to_owned(), (*outcome).to_owned())),
            ["SUCCESS", worker, job] => seen
                .entry((*job).to_owned())
                .or_default()
                .successes
                .push((*worker).to_owned()),
            ["READY", _] | ["STOPPED", _] => {}
            _ => panic!("unexpected worker line `{line}`"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_one_killed_mid_run() {
    let started = Instant::now();
    let deadline = started + LIMIT;
    let amqp_url = common::amqp_url();
    let redis_url = common::redis_url();
    let prefix = common::unique("tc-jobs-processes");
    let queue = common::unique("jobs-processes");
    let _keys = common::RedisKeys(prefix.clone());
    let store = RedisStore::connect(&redis_url, &prefix)
        .await
        .unwrap_or_else(|error| panic!("Redis is required at {redis_url}: {error}"));
    let broker = common::rabbitmq().await;
    let client: Jobs<AmqpBroker> = Jobs::builder(broker.clone(), queue.as_str())
        .store(Arc::new(store.clone()))
        .build()
        .await
        .unwrap();

    let args = [amqp_url, redis_url, prefix, queue.clone()];
    let lines: Lines = Arc::default();
    let mut workers: Vec<(String, Child)> = ["w0", "w1", "w2"]
        .into_iter()
        .map(|name| (name.to_owned(), start_worker(&args, name, &lines, deadline)))
        .collect();

    // 750 single jobs: every 15th fails for good, every 7th fails once.
    let backoff = Duration::from_millis(50);
    let mut singles = Vec::new();
    for n in 0..750_u64 {
        let outcome = if n % 15 == 0 {
            "fail"
        } else if n % 7 == 0 {
            "flaky"
        } else {
            "ok"
        };
        let job = Job::json(
            "work",
            &json!({"n": n, "outcome": outcome, "ms": 20 + n % 3 * 10}),
        )
        .unwrap()
        .max_retries(1)
        .backoff(backoff, backoff);
        singles.push((client.enqueue(job).await.unwrap(), n, outcome));
    }
    // 50 chains of 3: results a, a + 10a, a + 10a + 100a.
    let mut chains = Vec::new();
    for c in 1..=50_u64 {
        let steps = [c, 10 * c, 100 * c]
            .map(|add| Job::json("step", &json!({"add": add, "ms": 20})).unwrap());
        chains.push((client.enqueue_chain(steps.to_vec()).await.unwrap(), c));
    }
    // 20 groups of 5: every 4th has a job that fails for good.
    let mut groups = Vec::new();
    for g in 0..20_u64 {
        let failing = g % 4 == 0;
        let jobs = (0..5_u64)
            .map(|k| {
                let outcome = if failing && k == 2 { "fail" } else { "ok" };
                Job::json("work", &json!({"n": k, "outcome": outcome, "ms": 30}))
                    .unwrap()
                    .max_retries(1)
                    .backoff(backoff, backoff)
            })
            .collect();
        groups.push((client.enqueue_group(jobs).await.unwrap(), failing));
    }

    // SIGKILL one worker mid-run, start a replacement.
    while client.successful().await.unwrap().len() < 250 {
        assert!(Instant::now() < deadline, "too slow before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (killed, mut victim) = workers.remove(0);
    victim.kill().expect("SIGKILL the worker");
    victim.wait().unwrap();
    workers.push(("w3".to_owned(), start_worker(&args, "w3", &lines, deadline)));

    // Every job ends: 1,000 records, each successful or failed.
    loop {
        let ended = client.successful().await.unwrap().len() + client.failed().await.unwrap().len();
        if ended == 1_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {ended} of 1000 jobs ended within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (name, mut child) in workers {
        drop(child.stdin.take());
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("worker {name} did not stop");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let seen = parse(&lines.lock().unwrap());
    let of = |id: &JobId| seen.get(id.as_str());

    // Single jobs and group jobs end as their handlers decided.
    let mut expected: Vec<(JobId, bool, Option<u64>)> = singles
        .iter()
        .map(|(id, n, outcome)| (id.clone(), *outcome != "fail", Some(2 * n)))
        .collect();
    for (group, failing) in &groups {
        let meta = client.group(group).await.unwrap().expect("the group");
        let wanted = if *failing {
            JobStatus::Failed
        } else {
            JobStatus::Successful
        };
        assert_eq!(meta.status, wanted, "group {group}");
        let statuses: Vec<Option<JobStatus>> = meta.jobs.values().copied().collect();
        let failed = statuses
            .iter()
            .filter(|status| **status == Some(JobStatus::Failed))
            .count();
        assert_eq!(failed, usize::from(*failing), "group {group}: {statuses:?}");
        let batch = client
            .store()
            .batch(group)
            .await
            .unwrap()
            .expect("the group's jobs");
        for (k, id) in batch.jobs.into_iter().enumerate() {
            let ok = !(*failing && k == 2);
            expected.push((id, ok, ok.then_some(2 * k as u64)));
        }
    }
    for (id, ok, result) in &expected {
        let record = client.status(id).await.unwrap().expect("a record");
        let wanted = if *ok {
            JobStatus::Successful
        } else {
            JobStatus::Failed
        };
        assert_eq!(record.status, wanted, "job {id}");
        let seen = of(id).unwrap_or_else(|| panic!("no worker ran job {id}"));
        if *ok {
            if let Some(result) = result {
                let saved = client.result(id).await.unwrap().expect("a saved result");
                assert_eq!(saved, result.to_string().into_bytes(), "job {id}");
            }
        } else {
            assert_eq!(record.retried, 2, "job {id}");
            assert!(
                seen.ends.iter().all(|(_, outcome)| outcome == "err"),
                "failed job {id} had a successful run: {seen:?}"
            );
        }
    }

    // Chains: in order, each step receiving the one before's result.
    for (chain, c) in &chains {
        let meta = client.chain(chain).await.unwrap().expect("the chain");
        assert_eq!(meta.status, JobStatus::Successful, "chain {chain}");
        assert_eq!(meta.finished, meta.jobs);
        let sums = [c, &(11 * c), &(111 * c)];
        for (k, id) in meta.jobs.iter().enumerate() {
            let saved = client.result(id).await.unwrap().expect("a saved result");
            assert_eq!(
                saved,
                sums[k].to_string().into_bytes(),
                "chain {chain} step {k}"
            );
            let previous = if k == 0 {
                "-".to_owned()
            } else {
                sums[k - 1].to_string()
            };
            let runs = &of(id).expect("the step ran").runs;
            assert!(
                runs.iter().all(|(_, got)| *got == previous),
                "chain {chain} step {k} saw {runs:?}, not {previous}"
            );
        }
    }

    // The store agrees with the handlers; no job recorded successful twice.
    let successful: BTreeSet<JobId> = client.successful().await.unwrap().into_iter().collect();
    let mut orphans = 0;
    for (job, seen) in &seen {
        let id = JobId::from(job.as_str());
        let record = client.status(&id).await.unwrap().expect("a record");
        assert!(
            seen.successes.len() <= 1,
            "job {job} recorded successful twice: {seen:?}"
        );
        let ran_ok = seen.ends.iter().any(|(_, outcome)| outcome == "ok");
        assert_eq!(
            successful.contains(&id),
            ran_ok,
            "job {job}: {record:?} vs {seen:?}"
        );
        let workers: BTreeSet<&str> = seen.runs.iter().map(|(w, _)| w.as_str()).collect();
        let last = record.worker.as_deref().expect("a worker");
        assert!(
            workers.contains(last),
            "job {job}: {last} never ran it ({seen:?})"
        );
        assert!(
            record.attempts as usize >= seen.runs.len(),
            "job {job}: {record:?} vs {seen:?}"
        );
        let runs_by_killed = seen.runs.iter().filter(|(w, _)| *w == killed).count();
        let cut = runs_by_killed > seen.ends.iter().filter(|(w, _)| *w == killed).count();
        if cut {
            // Its worker died mid-run: it ran again elsewhere, and the record says so.
            orphans += 1;
            assert!(record.attempts >= 2, "job {job}: {record:?}");
            assert_ne!(last, killed, "job {job}: {record:?}");
        } else if record.status == JobStatus::Successful && runs_by_killed == 0 {
            assert_eq!(seen.successes.len(), 1, "job {job}: {seen:?}");
        }
    }
    assert!(
        orphans > 0,
        "the kill interrupted no job; the test proved nothing"
    );
    assert_eq!(
        successful.len() + client.failed().await.unwrap().len(),
        1_000
    );

    for name in [client.queue().name(), client.queue().dead_letter_queue()] {
        broker.delete_queue(name).await.unwrap();
    }
    store.clear().await.unwrap();
    eprintln!(
        "1000 jobs on 3 worker processes, one killed ({orphans} jobs cut mid-run), in {:?}",
        started.elapsed()
    );
}
