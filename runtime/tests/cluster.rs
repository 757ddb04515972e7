//! `AmqpBroker`, work queues and jobs on a three-node RabbitMQ cluster of
//! this test's own (see `node_support/cluster.rs`): quorum queues replicated
//! on every node, and clients that move to another node when theirs stops —
//! none of which touches the shared broker on 5672.
//!
//! The whole binary takes 60–90 s on 2 busy cores: the cluster starts in
//! 30–35 s (boot is CPU-bound), the cases take ~30 s (each stop or start of
//! a node's application ~2 s of `rabbitmqctl`), the parallel stop ~4 s.
//!
//! Starting the cluster takes that long, so there is one
//! `#[test]`: it starts the cluster, runs the cases below in sequence (each in
//! its own task, so one failing case does not hide the others; a case that
//! stops a node starts it again), stops the nodes in parallel and fails
//! naming every failed case. The nodes are also stopped when anything panics
//! (drop). It prints the figures of each case (failover times, lost and
//! duplicated messages) and the cluster's start and stop times.
//! Run one case with `cargo test -p exchange-runtime --test cluster -- --nocapture`
//! and `TCX_CLUSTER_CASES=<name>[,<name>]`.
#![cfg(feature = "amqp")]

mod client_support;
mod node_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use client_support::{json_message, next_body, unique};
use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig};
use exchange_runtime::broker::{Broker, BrokerError, OutgoingMessage, QueueOptions, QueueType};
use exchange_runtime::jobs::{Job, JobContext, JobStatus, Jobs};
use exchange_runtime::queue::{QueueMessage, QueueSettings, WorkQueue};
use futures_util::StreamExt;
use node_support::cluster::RabbitCluster;
use node_support::{RabbitNode, cases};
use tokio::time::Instant;

type Case = cases::Case<RabbitCluster>;

/// `(name, case)` for each `async fn name(cluster: Arc<RabbitCluster>)`.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        &[$((stringify!($case), (|cluster| Box::pin($case(cluster))) as Case)),*]
    };
}

/// Each case's time limit.
const CASE_TIMEOUT: Duration = Duration::from_secs(40);

/// The cluster's size.
const NODES: usize = 3;

#[test]
fn rabbitmq_cluster_cases() {
    let cases: &[(&str, Case)] = cases![
        every_node_serves_and_quorum_queues_span_the_cluster,
        a_thousand_confirmed_messages_survive_stopping_the_leader,
        a_publisher_and_a_consumer_on_a_stopped_node_move_on,
        connecting_fails_naming_every_node_tried,
        a_job_queue_keeps_processing_through_a_node_stop,
        a_message_that_always_fails_is_dead_lettered_after_the_delivery_limit,
    ];
    let selected = cases::select("TCX_CLUSTER_CASES", cases);

    let cluster = Arc::new(RabbitCluster::start(NODES));
    eprintln!(
        "FIGURE cluster of {NODES} nodes {:?} (amqp ports {:?}) started in {:.1?}",
        cluster.names(),
        cluster
            .nodes()
            .iter()
            .map(RabbitNode::amqp_port)
            .collect::<Vec<_>>(),
        cluster.startup
    );
    // A case that failed half-way may have left a node stopped.
    let failed = cases::run(&cluster, selected, CASE_TIMEOUT, restart_stopped_nodes);
    let cluster = Arc::into_inner(cluster).expect("no case keeps the cluster");
    let stopped_in = cluster.stop();
    eprintln!("FIGURE cluster stopped (in parallel) in {stopped_in:.1?}");
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

/// Starts the RabbitMQ application again on every node where it does not listen.
fn restart_stopped_nodes(cluster: &RabbitCluster) {
    for node in cluster.nodes() {
        if !node.listening() {
            eprintln!("  restarting node {} left stopped", node.name());
            node.start_app();
        }
    }
}

/// A config for the URLs of `urls` (tried in that order).
fn config(urls: &[String], connection_name: &str) -> AmqpConfig {
    AmqpConfig::from_url(&urls.join(","))
        .expect("node URLs")
        .with_connection_name(connection_name)
        .with_connect_timeout(Duration::from_secs(10))
        .with_operation_timeout(Duration::from_secs(30))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(500))
}

async fn connect(config: AmqpConfig) -> AmqpBroker {
    let endpoint = config.endpoint();
    AmqpBroker::connect(config)
        .await
        .unwrap_or_else(|error| panic!("connecting to the cluster at {endpoint}: {error}"))
}

/// Runs `f` (blocking: `rabbitmqctl`) with the cluster, off the async workers.
async fn blocking<T: Send + 'static>(
    cluster: &Arc<RabbitCluster>,
    f: impl FnOnce(&RabbitCluster) -> T + Send + 'static,
) -> T {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || f(&cluster))
        .await
        .expect("blocking cluster task")
}

/// `(leader, members)` of quorum queue `queue`, as node `asked` reports them.
fn quorum_status(cluster: &RabbitCluster, asked: usize, queue: &str) -> (String, Vec<String>) {
    let listed = cluster
        .node(asked)
        .rabbitmqctl(&[
            "list_queues",
            "--no-table-headers",
            "name",
            "leader",
            "members",
        ])
        .expect("list_queues");
    let line = listed
        .lines()
        .find(|line| line.split('\t').next() == Some(queue))
        .unwrap_or_else(|| panic!("queue {queue} is not listed: {listed}"));
    let fields: Vec<&str> = line.split('\t').collect();
    let leader = fields.get(1).copied().unwrap_or_default().to_owned();
    let members = fields
        .get(2)
        .copied()
        .unwrap_or_default()
        .split(['[', ']', ',', '\'', ' ', '"'])
        .filter(|part| part.contains('@'))
        .map(str::to_owned)
        .collect();
    (leader, members)
}

fn quorum() -> QueueOptions {
    QueueOptions {
        durable: true,
        queue_type: QueueType::Quorum,
        ..QueueOptions::default()
    }
}

/// Each node takes connections on its own port; a quorum queue declared
/// through one has a member on every node.
async fn every_node_serves_and_quorum_queues_span_the_cluster(cluster: Arc<RabbitCluster>) {
    let queue = unique("cluster-quorum");
    let mut brokers = Vec::new();
    for index in 0..NODES {
        let url = cluster.node(index).amqp_url();
        brokers.push(connect(config(&[url], &format!("tcx-node-{index}"))).await);
    }
    brokers[0]
        .declare_queue(&queue, quorum())
        .await
        .expect("declare quorum queue");
    let (leader, members) = {
        let queue = queue.clone();
        blocking(&cluster, move |cluster| quorum_status(cluster, 1, &queue)).await
    };
    let mut expected = cluster.names();
    let mut members_sorted = members.clone();
    expected.sort();
    members_sorted.sort();
    assert_eq!(members_sorted, expected, "members of {queue}");
    assert!(members.contains(&leader), "leader {leader} of {members:?}");
    // Published through node 1, consumed through node 2.
    let mut stream = brokers[2].consume(&queue, 5).await.expect("consume");
    brokers[1]
        .publish("", &queue, json_message("{\"via\":1}"))
        .await
        .expect("publish");
    assert_eq!(next_body(&mut stream).await, "{\"via\":1}");
    drop(stream);
    brokers[0].delete_queue(&queue).await.expect("delete");
    for broker in brokers {
        broker.close().await;
    }
}

/// Endpoint of node `index` as the broker reports the node it is connected to.
fn endpoint(cluster: &RabbitCluster, index: usize) -> String {
    format!("amqp://127.0.0.1:{}/%2F", cluster.node(index).amqp_port())
}

/// Message number `n` of a test run: persistent, its id `m-<n>`.
fn numbered(n: usize) -> OutgoingMessage {
    OutgoingMessage {
        message_id: Some(format!("m-{n}")),
        ..json_message(&format!("{{\"n\":{n}}}"))
    }
}

/// One confirmed publish: when, and the node the publishing connection was on just after.
struct Confirmed {
    at: Instant,
    node: Option<String>,
}

/// Publishes messages `0..count` to `queue` through the default exchange,
/// message `n` not before `pace * n`, `concurrency` at a time, each until
/// it is confirmed: an `Unreachable`,
/// `Unconfirmed` or `Connection` error (a node going away) is retried with
/// the same message id. Counts confirmations in `confirmed`; returns each
/// message's confirmation and how many retries there were.
async fn publish_all(
    broker: &AmqpBroker,
    queue: &str,
    count: usize,
    (pace, concurrency): (Duration, usize),
    confirmed: &AtomicUsize,
) -> (Vec<Confirmed>, usize) {
    let retries = AtomicUsize::new(0);
    let start = Instant::now();
    let publish_one = |n: usize| {
        let retries = &retries;
        async move {
            let offset = u32::try_from(n).map_or(Duration::MAX, |n| pace.saturating_mul(n));
            tokio::time::sleep_until(start + offset).await;
            loop {
                match broker.publish("", queue, numbered(n)).await {
                    Ok(()) => {
                        confirmed.fetch_add(1, Ordering::SeqCst);
                        return Confirmed {
                            at: Instant::now(),
                            node: broker.publishing_node(),
                        };
                    }
                    Err(
                        error @ (BrokerError::Unreachable(_)
                        | BrokerError::Unconfirmed(_)
                        | BrokerError::Connection(_)),
                    ) => {
                        if retries.fetch_add(1, Ordering::SeqCst) < 5 {
                            eprintln!("  publish of m-{n} failed, retrying: {error}");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(error) => panic!("publish of m-{n}: {error}"),
                }
            }
        }
    };
    let confirmations = futures_util::stream::iter(0..count)
        .map(publish_one)
        .buffered(concurrency)
        .collect()
        .await;
    (confirmations, retries.into_inner())
}

/// What a consumer received: deliveries per message id, and each delivery's
/// time and the node its connection was on.
#[derive(Default)]
struct Received {
    per_id: HashMap<String, usize>,
    deliveries: Vec<(Instant, Option<String>)>,
}

impl Received {
    fn distinct(&self) -> usize {
        self.per_id.len()
    }

    fn duplicates(&self) -> usize {
        self.per_id.values().map(|copies| copies - 1).sum()
    }
}

/// Consumes `queue` through `broker` (prefetch 50, acknowledging each
/// delivery) until `count` distinct messages came or `limit` passes.
async fn receive_all(broker: AmqpBroker, queue: String, count: usize, limit: Duration) -> Received {
    let mut stream = broker.consume(&queue, 50).await.expect("consume");
    let deadline = Instant::now() + limit;
    let mut received = Received::default();
    while received.distinct() < count {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let delivery = match next {
            Err(_) => break,
            Ok(None) => panic!("the delivery stream of {queue} ended"),
            Ok(Some(Err(error))) => panic!("consuming {queue}: {error}"),
            Ok(Some(Ok(delivery))) => delivery,
        };
        received
            .deliveries
            .push((Instant::now(), broker.connected_node()));
        let id = delivery.message_id.clone().unwrap_or_default();
        *received.per_id.entry(id).or_default() += 1;
        if let Err(error) = delivery.ack().await {
            // Its connection died: the broker delivers it again.
            eprintln!("  ack failed (redelivered later): {error}");
        }
    }
    // Late copies of what came already.
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(300), stream.next()).await
    {
        let id = delivery.message_id.clone().unwrap_or_default();
        *received.per_id.entry(id).or_default() += 1;
        let _ = delivery.ack().await;
    }
    received
}

/// Stops the RabbitMQ application of node `index` once `confirmed` reaches
/// `after`; returns how long `rabbitmqctl stop_app` took and when the node
/// dropped `watched`'s publishing connection (polled every 2 ms): the
/// instant the failover figures count from.
async fn stop_after(
    cluster: &Arc<RabbitCluster>,
    index: usize,
    confirmed: Arc<AtomicUsize>,
    after: usize,
    watched: AmqpBroker,
) -> (Duration, Instant) {
    while confirmed.load(Ordering::SeqCst) < after {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopped = endpoint(cluster, index);
    let began = Instant::now();
    let stopping = blocking(cluster, move |cluster| cluster.node(index).stop_app());
    let watching = async {
        while watched.publishing_node().as_deref() == Some(stopped.as_str()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Instant::now()
    };
    let ((), dropped) = tokio::join!(stopping, watching);
    (began.elapsed(), dropped)
}

/// The first instant in `events` at or after `since` whose node is known
/// and not `stopped`, as milliseconds after `since`.
fn first_elsewhere<'a>(
    events: impl Iterator<Item = (&'a Instant, &'a Option<String>)>,
    since: Instant,
    stopped: &str,
) -> Option<u128> {
    events
        .filter(|(at, node)| **at >= since && node.as_deref().is_some_and(|node| node != stopped))
        .map(|(at, _)| at.duration_since(since).as_millis())
        .min()
}

/// Figures of one failover run.
struct Failover {
    stop_took: Duration,
    publish_after_ms: Option<u128>,
    delivery_after_ms: Option<u128>,
    lost: usize,
    duplicates: usize,
    retries: usize,
}

/// Publishes `count` messages to a fresh quorum queue through a broker whose
/// nodes are `publisher_order`, consumes them through another whose nodes
/// are `consumer_order`, and stops the node `stop` (`None`: the queue's
/// leader) after `stop_after_confirmed` confirmations. Starts it again at
/// the end. Checks nothing is lost; returns the figures.
async fn failover_run(
    cluster: &Arc<RabbitCluster>,
    label: &str,
    count: usize,
    pace: (Duration, usize),
    stop_after_confirmed: usize,
    orders: impl Fn(usize) -> (usize, Vec<usize>, Vec<usize>),
) -> Failover {
    let queue = unique(label);
    let setup = connect(config(&cluster.amqp_urls(&[0, 1, 2]), "tcx-setup")).await;
    setup
        .declare_queue(&queue, quorum())
        .await
        .expect("declare quorum queue");
    let (leader, _) = {
        let queue = queue.clone();
        blocking(cluster, move |cluster| quorum_status(cluster, 0, &queue)).await
    };
    let leader = cluster
        .index_of(&leader)
        .expect("the leader is a node of ours");
    let (stopped, publisher_order, consumer_order) = orders(leader);
    let publisher = connect(config(
        &cluster.amqp_urls(&publisher_order),
        &format!("tcx-{label}-publisher"),
    ))
    .await;
    let consumer = connect(config(
        &cluster.amqp_urls(&consumer_order),
        &format!("tcx-{label}-consumer"),
    ))
    .await;
    assert_eq!(
        publisher.publishing_node(),
        Some(endpoint(cluster, publisher_order[0]))
    );
    assert_eq!(
        consumer.connected_node(),
        Some(endpoint(cluster, consumer_order[0]))
    );
    let receiving = tokio::spawn(receive_all(
        consumer.clone(),
        queue.clone(),
        count,
        Duration::from_secs(30),
    ));
    let confirmed = Arc::new(AtomicUsize::new(0));
    let stopping = tokio::spawn({
        let (cluster, confirmed) = (cluster.clone(), confirmed.clone());
        let watched = publisher.clone();
        async move { stop_after(&cluster, stopped, confirmed, stop_after_confirmed, watched).await }
    });
    let (confirmations, retries) = publish_all(&publisher, &queue, count, pace, &confirmed).await;
    let (stop_took, stop_began) = stopping.await.expect("stop task");
    let received = receiving.await.expect("consumer task");
    let stopped_endpoint = endpoint(cluster, stopped);
    let figures = Failover {
        stop_took,
        publish_after_ms: first_elsewhere(
            confirmations.iter().map(|c| (&c.at, &c.node)),
            stop_began,
            &stopped_endpoint,
        ),
        delivery_after_ms: first_elsewhere(
            received.deliveries.iter().map(|(at, node)| (at, node)),
            stop_began,
            &stopped_endpoint,
        ),
        lost: count - received.distinct(),
        duplicates: received.duplicates(),
        retries,
    };
    eprintln!(
        "FIGURE {label}: stopped node {stopped} (leader was {leader}; rabbitmqctl stop_app took {:.1?}); \
         first publish confirmed on another node {:?} ms after the node dropped the publisher's \
         connection, first delivery on another node {:?} ms after it; {count} published, lost {}, duplicated {}, publish retries {}",
        figures.stop_took,
        figures.publish_after_ms,
        figures.delivery_after_ms,
        figures.lost,
        figures.duplicates,
        figures.retries,
    );
    blocking(cluster, move |cluster| cluster.node(stopped).start_app()).await;
    assert_eq!(figures.lost, 0, "messages lost");
    setup.delete_queue(&queue).await.expect("delete");
    for broker in [setup, publisher, consumer] {
        broker.close().await;
    }
    figures
}

/// 1,000 confirmed messages on a quorum queue survive stopping the node that
/// leads it, while they are published through that node: the publisher
/// moves on, and a consumer on another node receives every one.
async fn a_thousand_confirmed_messages_survive_stopping_the_leader(cluster: Arc<RabbitCluster>) {
    let pace = (Duration::from_millis(6), 20);
    let figures = failover_run(&cluster, "leader-stop", 1000, pace, 100, |leader| {
        let others: Vec<usize> = (0..NODES).filter(|index| *index != leader).collect();
        let mut publisher = vec![leader];
        publisher.extend(&others);
        let mut consumer = others;
        consumer.push(leader);
        (leader, publisher, consumer)
    })
    .await;
    assert!(
        figures.publish_after_ms.is_some(),
        "the publisher never confirmed a publish on another node"
    );
}

/// A publisher and a consumer connected to a node that stops move to
/// another node by themselves and carry on.
async fn a_publisher_and_a_consumer_on_a_stopped_node_move_on(cluster: Arc<RabbitCluster>) {
    let pace = (Duration::from_millis(10), 4);
    let figures = failover_run(&cluster, "client-move", 300, pace, 50, |_| {
        (0, vec![0, 1, 2], vec![0, 2, 1])
    })
    .await;
    assert!(
        figures.publish_after_ms.is_some() && figures.delivery_after_ms.is_some(),
        "publisher or consumer did not carry on on another node"
    );
}

/// With no node reachable, connecting fails naming each node tried (without
/// its password); with one reachable among unreachable ones, it connects there.
async fn connecting_fails_naming_every_node_tried(cluster: Arc<RabbitCluster>) {
    // Ports nothing listens on (bound, then let go).
    let closed: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("a free port")
                .port()
        })
        .collect();
    let urls: Vec<String> = closed
        .iter()
        .map(|port| format!("amqp://guest:hunter2@127.0.0.1:{port}/%2f"))
        .collect();
    let error = AmqpBroker::connect(config(&urls, "tcx-nowhere"))
        .await
        .expect_err("nothing listens");
    let message = error.to_string();
    for port in &closed {
        assert!(
            message.contains(&format!("amqp://127.0.0.1:{port}/%2F")),
            "names node {port}: {message}"
        );
    }
    assert!(!message.contains("hunter2"), "shows a password: {message}");
    let mut reachable = urls;
    reachable.push(cluster.node(1).amqp_url());
    let broker = connect(config(&reachable, "tcx-third-node")).await;
    assert_eq!(broker.connected_node(), Some(endpoint(&cluster, 1)));
    assert_eq!(broker.publishing_node(), Some(endpoint(&cluster, 1)));
    broker.close().await;
}

/// A job queue (a quorum queue by default) keeps processing while the node
/// its worker and enqueuer are connected to stops: every job ends
/// successful, some may run twice (their acknowledgement was lost with the
/// node), a delayed job (a quorum delay tier) still arrives, and none is lost.
async fn a_job_queue_keeps_processing_through_a_node_stop(cluster: Arc<RabbitCluster>) {
    const JOBS: usize = 60;
    let stopped = 1;
    let broker = connect(config(&cluster.amqp_urls(&[stopped, 2, 0]), "tcx-jobs")).await;
    let runs = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let record = runs.clone();
    let jobs = Jobs::builder(broker.clone(), unique("cluster-jobs"))
        .concurrency(4)
        .register("work", move |job: JobContext| {
            let record = record.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                *record
                    .lock()
                    .unwrap()
                    .entry(job.id.to_string())
                    .or_default() += 1;
                Ok(())
            }
        })
        .build()
        .await
        .expect("jobs on the cluster");
    let queue_name = jobs.queue().name().to_owned();
    let (_, members) = {
        let queue_name = queue_name.clone();
        blocking(&cluster, move |cluster| {
            quorum_status(cluster, 0, &queue_name)
        })
        .await
    };
    assert_eq!(
        members.len(),
        NODES,
        "the job queue is a quorum queue on every node"
    );
    let mut ids = Vec::new();
    for n in 0..JOBS {
        let job = Job::new("work", format!("{{\"n\":{n}}}"));
        let job = if n == 0 {
            job.delay(Duration::from_secs(3))
        } else {
            job
        };
        ids.push(jobs.enqueue(job).await.expect("enqueue"));
    }
    jobs.start().await.expect("start the worker");
    let done = |runs: &std::sync::Mutex<HashMap<String, usize>>| runs.lock().unwrap().len();
    while done(&runs) < JOBS / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let began = Instant::now();
    blocking(&cluster, move |cluster| cluster.node(stopped).stop_app()).await;
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut unfinished = ids.clone();
    while !unfinished.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for id in unfinished {
            let record = jobs.status(&id).await.expect("status");
            if record.is_none_or(|record| record.status != JobStatus::Successful) {
                still.push(id);
            }
        }
        unfinished = still;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let finished_after = began.elapsed();
    jobs.stop().expect("stop the worker");
    jobs.wait().await;
    let runs = runs.lock().unwrap().clone();
    let twice = runs.values().filter(|count| **count > 1).count();
    eprintln!(
        "FIGURE jobs through a node stop: {JOBS} jobs, {} finished, all {:.1?} after the stop began; \
         {twice} ran more than once; worker now on {:?}",
        JOBS - unfinished.len(),
        finished_after,
        broker.connected_node()
    );
    blocking(&cluster, move |cluster| cluster.node(stopped).start_app()).await;
    assert!(
        unfinished.is_empty(),
        "jobs never successful: {unfinished:?}"
    );
    assert_ne!(
        broker.connected_node(),
        Some(endpoint(&cluster, stopped)),
        "the worker moved"
    );
    for name in [
        queue_name.clone(),
        jobs.queue().dead_letter_queue().to_owned(),
    ] {
        broker.delete_queue(&name).await.expect("delete");
    }
    broker.close().await;
}

/// A message whose consumer always goes away without settling it (dropped,
/// as by a crash) is dead-lettered by the cluster once it came back more
/// often than the delivery limit, with RabbitMQ's reason `delivery_limit`.
async fn a_message_that_always_fails_is_dead_lettered_after_the_delivery_limit(
    cluster: Arc<RabbitCluster>,
) {
    const LIMIT: u32 = 3;
    let broker = connect(config(&cluster.amqp_urls(&[2, 0, 1]), "tcx-limit")).await;
    let settings = QueueSettings {
        delivery_limit: Some(LIMIT),
        ..QueueSettings::default()
    };
    let queue = WorkQueue::open_with(broker.clone(), &unique("cluster-limit"), settings)
        .await
        .expect("quorum work queue");
    let message = QueueMessage::new("{\"poison\":true}").with_id("always-fails");
    queue.put(message, Duration::ZERO).await.expect("put");
    let mut deliveries = 0;
    while let Some(taken) = queue.get(Duration::from_secs(2)).await.expect("get") {
        deliveries += 1;
        assert!(deliveries <= LIMIT + 1, "delivered past the limit");
        drop(taken);
    }
    // A dropped message's requeue may race its subscription's close (two returns).
    assert!(deliveries > LIMIT / 2, "delivered {deliveries} times");
    let reasons = death_reasons(&cluster.node(0).amqp_url(), queue.dead_letter_queue()).await;
    eprintln!(
        "FIGURE delivery limit {LIMIT}: delivered {deliveries} times, then dead-lettered with x-death reasons {reasons:?}"
    );
    assert_eq!(reasons, ["delivery_limit"]);
    for name in [queue.name(), queue.dead_letter_queue()] {
        broker.delete_queue(name).await.expect("delete");
    }
    broker.close().await;
}

/// The `x-death` reasons of the first message in `queue` (taken off it), read
/// with lapin directly: the runtime leaves broker-added headers out.
async fn death_reasons(url: &str, queue: &str) -> Vec<String> {
    use lapin::options::BasicGetOptions;
    use lapin::types::AMQPValue;
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("lapin connection");
    let channel = connection.create_channel().await.expect("channel");
    let deadline = Instant::now() + Duration::from_secs(5);
    let message = loop {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        if let Some(message) = got {
            break message;
        }
        assert!(Instant::now() < deadline, "nothing in {queue}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let headers = message
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death header: {headers:?}");
    };
    let reasons = deaths
        .as_slice()
        .iter()
        .filter_map(|death| match death {
            AMQPValue::FieldTable(table) => match table.inner().get("reason") {
                Some(AMQPValue::LongString(reason)) => Some(reason.to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let _ = connection.close(200, "done".into()).await;
    reasons
}
