//! Three (or more) [`RabbitNode`]s of the tests' own joined into one RabbitMQ
//! cluster on loopback, for failover and quorum-queue tests.
//!
//! Each node is a [`RabbitNode`] (own name, ports, directory, config files,
//! the test process's cookie); their `rabbitmq.conf` lists all of them for
//! classic-config peer discovery, so they form the cluster while they boot,
//! started at once. [`RabbitCluster::start`] waits (up to
//! [`START_TIMEOUT`](super::START_TIMEOUT) per node, booting in parallel)
//! until every node runs and each one reports all of them as running
//! cluster members; it panics naming the node at fault otherwise.
//! [`RabbitCluster::stop`] (and drop) stops the nodes in parallel.

use std::thread;
use std::time::{Duration, Instant};

use super::{RabbitNode, START_TIMEOUT, check_prerequisites, reap_stale_nodes};

/// A RabbitMQ cluster owned by this test process.
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
    /// How long [`start`](Self::start) took, until every node saw the whole cluster.
    pub startup: Duration,
}

impl RabbitCluster {
    /// Starts `size` nodes at once as one cluster and waits until each node
    /// lists all of them as running. Panics with the cause if it cannot.
    pub fn start(size: usize) -> RabbitCluster {
        assert!(size >= 1, "a cluster needs a node");
        let began = Instant::now();
        check_prerequisites();
        reap_stale_nodes();
        let mut nodes: Vec<RabbitNode> = (0..size).map(|_| RabbitNode::prepare()).collect();
        let names: Vec<String> = nodes.iter().map(|node| node.name().to_owned()).collect();
        // Dropping `cluster` (a panic below) stops what was launched.
        for node in &mut nodes {
            node.launch(&names);
        }
        let mut cluster = RabbitCluster {
            nodes,
            startup: Duration::ZERO,
        };
        thread::scope(|scope| {
            for node in &mut cluster.nodes {
                scope.spawn(move || node.await_started(began));
            }
        });
        cluster.await_members(began + START_TIMEOUT);
        cluster.startup = began.elapsed();
        cluster
    }

    /// Waits until every node lists every node as a running member.
    fn await_members(&self, deadline: Instant) {
        for node in &self.nodes {
            loop {
                let running = node.running_members();
                if self
                    .nodes
                    .iter()
                    .all(|member| running.iter().any(|name| name == member.name()))
                {
                    break;
                }
                if Instant::now() > deadline {
                    node.fail(&format!(
                        "the cluster did not form within {START_TIMEOUT:?}: it runs {running:?}, \
                         expected {:?}",
                        self.names()
                    ));
                }
                thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// The nodes, in start order.
    pub fn nodes(&self) -> &[RabbitNode] {
        &self.nodes
    }

    /// Node number `index`.
    pub fn node(&self, index: usize) -> &RabbitNode {
        &self.nodes[index]
    }

    /// The nodes' Erlang names.
    pub fn names(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| node.name().to_owned())
            .collect()
    }

    /// The index of the node named `name` (as RabbitMQ reports node names).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name() == name)
    }

    /// The index of the node listening for AMQP on `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|node| node.amqp_port() == port)
    }

    /// The plain AMQP URLs of the nodes numbered `order`, in that order.
    pub fn amqp_urls(&self, order: &[usize]) -> Vec<String> {
        order
            .iter()
            .map(|index| self.nodes[*index].amqp_url())
            .collect()
    }

    /// Stops every node in parallel; how long that took. Panics if one had to be killed.
    pub fn stop(mut self) -> Duration {
        let began = Instant::now();
        let graceful = self.shut_down();
        assert!(
            graceful.iter().all(|(_, graceful)| *graceful),
            "nodes that did not stop gracefully: {:?}",
            graceful
                .iter()
                .filter(|(_, graceful)| !graceful)
                .map(|(name, _)| name)
                .collect::<Vec<_>>()
        );
        began.elapsed()
    }

    /// Stops the nodes in parallel: each node's name and whether it stopped gracefully.
    fn shut_down(&mut self) -> Vec<(String, bool)> {
        let nodes = std::mem::take(&mut self.nodes);
        thread::scope(|scope| {
            let stopping: Vec<_> = nodes
                .into_iter()
                .map(|mut node| {
                    scope.spawn(move || {
                        let graceful = node.shut_down();
                        (node.name().to_owned(), graceful)
                    })
                })
                .collect();
            stopping
                .into_iter()
                .map(|handle| handle.join().unwrap_or_else(|_| ("?".to_owned(), false)))
                .collect()
        })
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        self.shut_down();
    }
}
