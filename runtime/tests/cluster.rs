//! `AmqpBroker`, work queues and jobs on a three-node RabbitMQ cluster of
//! this test's own (see `node_support/cluster.rs`): quorum queues replicated
//! on every node, and clients that move to another node when theirs stops —
//! none of which touches the shared broker on 5672.
//!
//! Starting the cluster takes 20–40 s (boot is CPU-bound), so there is one
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

use std::sync::Arc;
use std::time::Duration;

use client_support::{json_message, next_body, unique};
use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig};
use exchange_runtime::broker::{Broker, QueueOptions, QueueType};
use node_support::cluster::RabbitCluster;
use node_support::{RabbitNode, cases};

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
    let cases: &[(&str, Case)] = cases![every_node_serves_and_quorum_queues_span_the_cluster,];
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
