//! One live AMQP connection ("link"), the topology to replay on a new one,
//! and the supervisor task that reconnects with backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Mutex, watch};

use super::config::AmqpConfig;
use super::conn::{AmqpError, Channel, Connection};
use super::convert::{RESOURCE_LOCKED, queue_arguments};
use super::methods;
use super::raw::ClientInfo;
use super::wire::{ShortString, Writer};
use crate::broker::{BrokerError, ExchangeOptions, QueueOptions};

/// An open connection plus the long-lived channel shared by operations.
pub(crate) struct Link {
    /// Counts connections made by this broker: 1 for the first.
    pub(crate) generation: u64,
    /// The configuration's node this connection reached (its number, and
    /// that node's configuration alone).
    pub(crate) node: usize,
    pub(crate) node_config: AmqpConfig,
    pub(crate) connection: Arc<Connection>,
    /// The channel declarations, bindings and deletions take turns on;
    /// reopened after an error closed it. (A channel per operation would
    /// open and close thousands on a long-running service.)
    operations: Mutex<Option<Arc<Channel>>>,
}

impl Link {
    pub(crate) fn is_up(&self) -> bool {
        self.connection.is_up()
    }

    /// Turns true once this connection died.
    pub(crate) fn dead_signal(&self) -> watch::Receiver<bool> {
        self.connection.dead_signal()
    }

    /// Resolves once this connection died.
    pub(crate) async fn died(&self) {
        self.connection.died().await;
    }

    /// A fresh channel, for a consumer or a `get` (closed when dropped).
    pub(crate) async fn channel(&self) -> Result<Channel, AmqpError> {
        self.connection.open_channel().await
    }

    /// Sends `method` on the operations channel, alone (an error one
    /// operation causes closes the channel under no other), and returns the
    /// broker's answer. A failed operation's channel is never reused (it may
    /// still be closing).
    pub(crate) async fn operate(&self, method: Writer) -> Result<super::conn::Reply, AmqpError> {
        let mut slot = self.operations.lock().await;
        let channel = match slot.as_ref() {
            Some(channel) if channel.is_open() => channel.clone(),
            _ => {
                let channel = Arc::new(self.channel().await?);
                *slot = Some(channel.clone());
                channel
            }
        };
        let result = channel.call(method).await;
        if result.is_err() {
            *slot = None;
        }
        result
    }
}

/// A supervised connection, as operations waiting for one see it.
pub(crate) trait Supervised {
    /// Whether it is usable right now.
    fn is_up(&self) -> bool;
}

impl Supervised for Link {
    fn is_up(&self) -> bool {
        Link::is_up(self)
    }
}

/// Resolves once `dead` turns true (or its connection is gone).
pub(crate) async fn until_dead(dead: &mut watch::Receiver<bool>) {
    let _ = dead.wait_for(|dead| *dead).await;
}

/// Resolves once the lane `state` is closed (or gone).
pub(crate) async fn until_closed<L>(state: &mut watch::Receiver<LinkState<L>>) {
    let _ = state
        .wait_for(|state| matches!(state, LinkState::Closed))
        .await;
}

/// The state operations look at to find the connection.
pub(crate) enum LinkState<L = Link> {
    /// Connected, topology replayed.
    Up(Arc<L>),
    /// Reconnecting; the last failure.
    Down(String),
    /// [`AmqpBroker::close`](super::AmqpBroker::close) was called.
    Closed,
}

/// Declarations made through this broker, replayed on every new connection.
#[derive(Debug, Default, Clone)]
pub(crate) struct Topology {
    pub(crate) exchanges: BTreeMap<String, ExchangeOptions>,
    pub(crate) queues: BTreeMap<String, QueueOptions>,
    /// `(queue, exchange, pattern)`.
    pub(crate) bindings: BTreeSet<(String, String, String)>,
}

/// Opens a connection to the first node that answers, trying the
/// configuration's nodes once each from number `first` on (wrapping).
/// Fails naming every node tried and why.
pub(crate) async fn open(
    config: &AmqpConfig,
    generation: u64,
    first: usize,
) -> Result<Arc<Link>, BrokerError> {
    config
        .on_first_answering(first, |node_config, node| {
            open_node(node_config, node, generation)
        })
        .await
}

/// Opens a connection to the one node `config` names (number `node`).
async fn open_node(
    config: AmqpConfig,
    node: usize,
    generation: u64,
) -> Result<Arc<Link>, BrokerError> {
    let client = ClientInfo::named(&config, config.connection_name().to_owned());
    let connection = Connection::open(&config, &client)
        .await
        .map_err(|error| match error {
            BrokerError::Connection(text) => {
                // rustls names the cause (UnknownIssuer, not valid for name ...); say what to do.
                let hint = if text.contains("invalid peer certificate") {
                    " (the server's TLS certificate was refused; a private CA is trusted with \
                     AmqpConfig::with_ca_certificate_pem, and the certificate must name the URL's host)"
                } else {
                    ""
                };
                BrokerError::Connection(format!(
                    "cannot connect to {} as `{}`: {text}{hint}",
                    config.endpoint(),
                    config.username()
                ))
            }
            other => other,
        })?;
    Ok(Arc::new(Link {
        generation,
        node,
        node_config: config,
        connection,
        operations: Mutex::new(None),
    }))
}

/// One supervised connection: the state operations wait on, and what its
/// supervisor restores after a loss.
pub(crate) struct Lane {
    pub(crate) state: Arc<watch::Sender<LinkState>>,
    pub(crate) topology: Arc<std::sync::Mutex<Topology>>,
    pub(crate) recoveries: Arc<AtomicU64>,
}

impl Lane {
    /// Connects (one attempt) and starts the supervisor.
    pub(crate) async fn start(config: &AmqpConfig) -> Result<Lane, BrokerError> {
        let link = open(config, 1, 0).await?;
        let lane = Lane {
            state: Arc::new(watch::Sender::new(LinkState::Up(link.clone()))),
            topology: Arc::default(),
            recoveries: Arc::default(),
        };
        let (reconnect_config, topology) = (config.clone(), Arc::downgrade(&lane.topology));
        tokio::spawn(supervise(
            "AMQP connection",
            config.clone(),
            Arc::downgrade(&lane.state),
            lane.recoveries.clone(),
            link,
            move |generation, first| {
                reconnect(
                    reconnect_config.clone(),
                    topology.clone(),
                    generation,
                    first,
                )
            },
        ));
        Ok(lane)
    }

    /// Marks the lane closed (ending its supervisor) and returns the link that was up.
    pub(crate) fn close(&self) -> Option<Arc<Link>> {
        close_lane(&self.state)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Ends the supervisor, which closes the connection.
        self.state.send_replace(LinkState::Closed);
    }
}

/// Re-declares `topology` on `link`. Items that fail with a channel-level error
/// (an exchange deleted behind our back, a conflicting redeclaration) are logged
/// and skipped so one bad item cannot block recovery of the rest.
pub(crate) async fn replay(link: &Link, topology: &Topology) -> Result<(), BrokerError> {
    let lost = |error: AmqpError| {
        BrokerError::Connection(format!("connection lost while restoring topology: {error}"))
    };
    let mut channel = link.channel().await.map_err(lost)?;
    let mut steps: Vec<(String, Writer)> = Vec::new();
    for (name, options) in &topology.exchanges {
        let Ok(exchange) = ShortString::try_new(name.as_str()) else {
            continue; // Validated when first declared.
        };
        let declare = methods::exchange_declare(&exchange, false, options.durable);
        steps.push((format!("exchange `{name}`"), declare));
    }
    for (name, options) in &topology.queues {
        let (Ok(queue), Ok(arguments)) = (
            ShortString::try_new(name.as_str()),
            queue_arguments(name, options),
        ) else {
            continue; // Validated when first declared.
        };
        let declare = methods::queue_declare(&queue, &methods::QueueFlags::of(options), &arguments);
        steps.push((format!("queue `{name}`"), declare));
    }
    for (queue, exchange, pattern) in &topology.bindings {
        let (Ok(queue_name), Ok(exchange_name), Ok(key)) = (
            ShortString::try_new(queue.as_str()),
            ShortString::try_new(exchange.as_str()),
            ShortString::try_new(pattern.as_str()),
        ) else {
            continue;
        };
        let bind = methods::queue_bind(&queue_name, &exchange_name, &key);
        let what = format!("binding of queue `{queue}` to exchange `{exchange}` by `{pattern}`");
        steps.push((what, bind));
    }
    for (what, step) in steps {
        retry_item(link, &mut channel, &what, step)
            .await
            .map_err(lost)?;
    }
    Ok(())
}

/// Runs one replay step; on a channel error opens a fresh channel. An exclusive
/// queue of the dead connection may linger briefly (RESOURCE_LOCKED): retried.
async fn retry_item(
    link: &Link,
    channel: &mut Channel,
    what: &str,
    step: Writer,
) -> Result<(), AmqpError> {
    const LOCKED_RETRIES: u32 = 50;
    let mut attempt = 0;
    loop {
        let error = match channel.call(step.clone()).await {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        if !link.is_up() {
            return Err(error);
        }
        *channel = link.channel().await?;
        let locked = matches!(&error, AmqpError::Closed { code, .. } if *code == RESOURCE_LOCKED);
        if locked && attempt < LOCKED_RETRIES {
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        tracing::error!(%error, "AMQP recovery could not restore {what}; skipping it");
        return Ok(());
    }
}

/// A connection a supervisor watches and replaces.
pub(crate) trait Watched: Supervised + Send + Sync + 'static {
    /// Which of the configuration's nodes it reached.
    fn node(&self) -> usize;
    /// Counts connections of its kind made by this broker: 1 for the first.
    fn generation(&self) -> u64;
    /// Where it goes.
    fn endpoint(&self) -> String;
    /// Why it died.
    fn death_reason(&self) -> String;
    /// Resolves once it died.
    fn died(&self) -> impl Future<Output = ()> + Send;
    /// Closes it politely.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

impl Watched for Link {
    fn node(&self) -> usize {
        self.node
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn endpoint(&self) -> String {
        self.node_config.endpoint()
    }

    fn death_reason(&self) -> String {
        self.connection.death_reason()
    }

    async fn died(&self) {
        self.connection.died().await;
    }

    async fn close(&self) {
        self.connection.close("closed by application").await;
    }
}

/// Watches `link`; when it dies, reconnects with capped exponential backoff
/// through `reconnect(generation, first node to try)` (which also restores
/// what the connection needs, such as the topology) and publishes the new
/// connection in `state`. Ends, closing the connection, when the lane is
/// closed or dropped. `what` names the connection in logs.
pub(crate) async fn supervise<L, F, Fut>(
    what: &'static str,
    config: AmqpConfig,
    state: Weak<watch::Sender<LinkState<L>>>,
    recoveries: Arc<AtomicU64>,
    mut link: Arc<L>,
    reconnect: F,
) where
    L: Watched,
    F: Fn(u64, usize) -> Fut,
    Fut: Future<Output = Result<Arc<L>, BrokerError>>,
{
    let closed = |state: &Weak<watch::Sender<LinkState<L>>>| {
        state
            .upgrade()
            .map(|sender| sender.subscribe())
            .filter(|watcher| !matches!(*watcher.borrow(), LinkState::Closed))
    };
    loop {
        let Some(mut watcher) = closed(&state) else {
            link.close().await;
            return;
        };
        tokio::select! {
            () = link.died() => {}
            () = until_closed(&mut watcher) => {
                link.close().await;
                return;
            }
        }
        let reason = link.death_reason();
        tracing::warn!(
            endpoint = %link.endpoint(),
            generation = link.generation(),
            %reason,
            "{what} lost; reconnecting"
        );
        set_down(&state, reason);
        // The nodes after the lost one are tried first (it may be going away).
        let next_node = link.node() + 1;
        drop(link);
        let generation = recoveries.load(Ordering::SeqCst) + 2;
        let mut attempt = 0;
        link = loop {
            let Some(mut watcher) = closed(&state) else {
                return;
            };
            tokio::select! {
                () = tokio::time::sleep(config.backoff(attempt)) => {}
                () = until_closed(&mut watcher) => return,
            }
            attempt = attempt.saturating_add(1);
            match reconnect(generation, next_node).await {
                Ok(link) => break link,
                Err(error) => {
                    tracing::warn!(%error, attempt, "{what}: reconnecting failed");
                    set_down(&state, error.to_string());
                }
            }
        };
        let Some(sender) = state.upgrade() else {
            link.close().await;
            return;
        };
        let replaced = sender.send_if_modified(|current| {
            if matches!(current, LinkState::Closed) {
                false
            } else {
                *current = LinkState::Up(link.clone());
                true
            }
        });
        drop(sender);
        if !replaced {
            link.close().await;
            return;
        }
        recoveries.fetch_add(1, Ordering::SeqCst);
        tracing::info!(endpoint = %link.endpoint(), generation = link.generation(), "{what} recovered");
    }
}

/// Opens a main connection from node `first` on and replays `topology` on it.
async fn reconnect(
    config: AmqpConfig,
    topology: Weak<std::sync::Mutex<Topology>>,
    generation: u64,
    first: usize,
) -> Result<Arc<Link>, BrokerError> {
    let link = open(&config, generation, first).await?;
    let Some(snapshot) = topology
        .upgrade()
        .map(|topology| topology.lock().unwrap_or_else(|e| e.into_inner()).clone())
    else {
        link.connection.close("closed by application").await;
        return Err(BrokerError::Closed);
    };
    if let Err(error) = replay(&link, &snapshot).await {
        link.connection.close("topology replay failed").await;
        return Err(error);
    }
    Ok(link)
}

/// Marks a lane closed and returns the connection that was up.
pub(crate) fn close_lane<L>(state: &watch::Sender<LinkState<L>>) -> Option<Arc<L>> {
    match state.send_replace(LinkState::Closed) {
        LinkState::Up(link) => Some(link),
        _ => None,
    }
}

/// Records why a lane is down (unless it was closed meanwhile).
pub(crate) fn set_down<L>(state: &Weak<watch::Sender<LinkState<L>>>, reason: String) {
    if let Some(sender) = state.upgrade() {
        sender.send_if_modified(|current| {
            if matches!(current, LinkState::Closed) {
                false
            } else {
                *current = LinkState::Down(reason);
                true
            }
        });
    }
}
