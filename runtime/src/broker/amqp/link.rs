//! One live AMQP connection ("link"), the topology to replay on a new one,
//! and the supervisor task that reconnects with backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Event, ExchangeKind};
use tokio::sync::{Mutex, Notify, broadcast, watch};

use super::config::AmqpConfig;
use super::convert::queue_arguments;
use super::raw::{PoisonEvent, RawConnection, SweepTarget};
use crate::broker::{BrokerError, ExchangeOptions, QueueOptions};

/// An open connection plus the long-lived channels shared by operations.
pub(crate) struct Link {
    /// Counts connections made by this broker: 1 for the first.
    pub(crate) generation: u64,
    /// The configuration's node this connection reached (its number, and
    /// that node's configuration alone).
    pub(crate) node: usize,
    pub(crate) node_config: AmqpConfig,
    pub(crate) connection: Connection,
    /// The channel declarations, bindings and deletions take turns on;
    /// reopened after an error closed it. (A channel per operation exhausted
    /// the connection's channel ids on a long-running service.)
    operations: Mutex<Option<Channel>>,
    /// Woken by operations that saw the connection fail, so the supervisor reacts at once.
    pub(crate) broken: Notify,
    /// Channels opened on this connection.
    channels_opened: AtomicU32,
    /// Channels the broker closed with an error (their ids are poisoned in lapin).
    channels_closed_by_broker: AtomicU32,
    /// Set once the connection is to be replaced before its channel ids wrap.
    retiring: AtomicBool,
    /// Set by the supervisor once it saw the connection die: some lapin
    /// futures (`basic.get` after a parse failure) never resolve, so
    /// operations wait on this too.
    dead: watch::Sender<bool>,
}

impl Link {
    pub(crate) fn is_up(&self) -> bool {
        self.connection.status().connected()
    }

    /// Turns true once the supervisor has seen this connection die.
    pub(crate) fn dead_signal(&self) -> watch::Receiver<bool> {
        self.dead.subscribe()
    }

    /// Resolves once the supervisor has seen this connection die.
    pub(crate) async fn died(&self) {
        until_dead(&mut self.dead.subscribe()).await;
    }

    /// Opens a channel. lapin 4.12 remembers the error of every channel the
    /// broker closed under its id and fails whatever later channel reuses
    /// that id with it (its channel ids wrap at the negotiated maximum,
    /// 2,047 on RabbitMQ): stale errors for other calls, then no channel at
    /// all. So a connection on which the broker closed channels is replaced
    /// before its ids wrap, as after a connection loss.
    async fn open_channel(&self) -> Result<Channel, lapin::Error> {
        let opened = self.channels_opened.fetch_add(1, Ordering::SeqCst) + 1;
        let max = u32::from(self.connection.configuration().channel_max()).max(1);
        if opened >= max.saturating_sub(CHANNEL_ID_MARGIN).max(1)
            && self.channels_closed_by_broker.load(Ordering::SeqCst) > 0
            && !self.retiring.swap(true, Ordering::SeqCst)
        {
            tracing::info!(
                generation = self.generation,
                opened,
                "AMQP channel ids about to wrap; replacing the connection"
            );
            self.broken.notify_one();
        }
        self.connection.create_channel().await
    }

    /// Counts a channel the broker closed (a channel-level error).
    pub(crate) fn note_channel_closed_by_broker(&self) {
        self.channels_closed_by_broker
            .fetch_add(1, Ordering::SeqCst);
    }

    /// Whether this connection is to be replaced (see [`open_channel`](Self::open_channel)).
    pub(crate) fn retiring(&self) -> bool {
        self.retiring.load(Ordering::SeqCst)
    }

    /// A fresh channel, for a consumer or a `get` (closed when they end).
    pub(crate) async fn channel(&self) -> Result<Channel, lapin::Error> {
        self.open_channel().await
    }

    /// Runs `operation` on the operations channel, alone: an error one
    /// operation causes closes the channel under no other. A failed
    /// operation's channel is never reused (it may still be closing).
    pub(crate) async fn on_operations<T, F, Fut>(&self, operation: F) -> Result<T, lapin::Error>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<T, lapin::Error>>,
    {
        let mut slot = self.operations.lock().await;
        let channel = match slot.as_ref() {
            Some(channel) if channel.status().connected() => channel.clone(),
            _ => {
                let channel = self.open_channel().await?;
                *slot = Some(channel.clone());
                channel
            }
        };
        let result = operation(channel).await;
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
    /// Tells the supervisor an operation found it down (it may not know yet).
    fn report_broken(&self);
}

impl Supervised for Link {
    fn is_up(&self) -> bool {
        Link::is_up(self)
    }

    fn report_broken(&self) {
        self.broken.notify_one();
    }
}

/// Resolves once `dead` turns true (or its link is gone).
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

/// Connection events (errors, blocked, ...).
pub(crate) type Events = std::pin::Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>;

/// Opens a connection to the first node that answers, trying the
/// configuration's nodes once each from number `first` on (wrapping), and
/// returns it with its event stream (created before anything can fail, so no
/// error event is missed). Fails naming every node tried and why.
pub(crate) async fn open(
    config: &AmqpConfig,
    generation: u64,
    first: usize,
) -> Result<(Arc<Link>, Events), BrokerError> {
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
) -> Result<(Arc<Link>, Events), BrokerError> {
    let name = config.connection_name().to_owned();
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let runtime = lapin::runtime::default_runtime().map_err(|error| {
        BrokerError::Connection(format!(
            "cannot connect to {}: no async runtime: {error}",
            config.endpoint()
        ))
    })?;
    // The TLS config carries the extra trusted CAs (`AmqpConfig::with_ca_certificate_pem`).
    let connect = Connection::connect_uri_with_config(
        config.lapin_uri(),
        properties,
        config.lapin_tls_config(),
        runtime,
    );
    let connection = match tokio::time::timeout(config.connect_timeout(), connect).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            let text = error.to_string();
            // rustls names the cause (UnknownIssuer, not valid for name ...); say what to do.
            let hint = if text.contains("invalid peer certificate") {
                " (the server's TLS certificate was refused; a private CA is trusted with \
                 AmqpConfig::with_ca_certificate_pem, and the certificate must name the URL's host)"
            } else {
                ""
            };
            return Err(BrokerError::Connection(format!(
                "cannot connect to {} as `{}`: {text}{hint}",
                config.endpoint(),
                config.username()
            )));
        }
        Err(_) => {
            return Err(BrokerError::Connection(format!(
                "cannot connect to {} as `{}`: no answer within {:?}",
                config.endpoint(),
                config.username(),
                config.connect_timeout()
            )));
        }
    };
    let events: Events = Box::pin(connection.events_listener());
    let link = Arc::new(Link {
        generation,
        node,
        node_config: config,
        connection,
        operations: Mutex::new(None),
        channels_opened: AtomicU32::new(0),
        channels_closed_by_broker: AtomicU32::new(0),
        retiring: AtomicBool::new(false),
        broken: Notify::new(),
        dead: watch::Sender::new(false),
    });
    Ok((link, events))
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
    pub(crate) async fn start(
        config: &AmqpConfig,
        readers: Arc<Readers>,
        poison: broadcast::Sender<PoisonEvent>,
    ) -> Result<Lane, BrokerError> {
        let (link, events) = open(config, 1, 0).await?;
        let lane = Lane {
            state: Arc::new(watch::Sender::new(LinkState::Up(link.clone()))),
            topology: Arc::default(),
            recoveries: Arc::default(),
        };
        let handles = SupervisorHandles {
            config: config.clone(),
            state: Arc::downgrade(&lane.state),
            topology: Arc::downgrade(&lane.topology),
            recoveries: lane.recoveries.clone(),
            readers,
            poison,
        };
        tokio::spawn(supervise(handles, link, events));
        Ok(lane)
    }

    /// Marks the lane closed (ending its supervisor) and returns the link that was up.
    pub(crate) fn close(&self) -> Option<Arc<Link>> {
        close_lane(&self.state)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Ends the supervisor, which drops (and so closes) the connection.
        self.state.send_replace(LinkState::Closed);
    }
}

/// Why a replay stopped.
enum ReplayError {
    /// The new connection died too: reconnect again.
    ConnectionLost(lapin::Error),
}

/// Re-declares `topology` on `link`. Items that fail with a channel-level error
/// (an exchange deleted behind our back, a conflicting redeclaration) are logged
/// and skipped so one bad item cannot block recovery of the rest.
pub(crate) async fn replay(link: &Link, topology: &Topology) -> Result<(), BrokerError> {
    match replay_inner(link, topology).await {
        Ok(()) => Ok(()),
        Err(ReplayError::ConnectionLost(error)) => Err(BrokerError::Connection(format!(
            "connection lost while restoring topology: {error}"
        ))),
    }
}

async fn replay_inner(link: &Link, topology: &Topology) -> Result<(), ReplayError> {
    let mut channel = link.channel().await.map_err(ReplayError::ConnectionLost)?;
    for (name, options) in &topology.exchanges {
        let declare = |channel: Channel| {
            let name = name.clone();
            let options = *options;
            async move {
                channel
                    .exchange_declare(
                        name.into(),
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            passive: false,
                            durable: options.durable,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
            }
        };
        retry_item(link, &mut channel, &format!("exchange `{name}`"), declare).await?;
    }
    for (name, options) in &topology.queues {
        let Ok(arguments) = queue_arguments(name, options) else {
            continue; // Validated when first declared.
        };
        let declare = |channel: Channel| {
            let name = name.clone();
            let arguments = arguments.clone();
            let options = QueueDeclareOptions {
                passive: false,
                durable: options.durable,
                exclusive: options.exclusive,
                auto_delete: options.auto_delete,
                nowait: false,
            };
            async move {
                channel
                    .queue_declare(name.into(), options, arguments)
                    .await
                    .map(|_| ())
            }
        };
        retry_item(link, &mut channel, &format!("queue `{name}`"), declare).await?;
    }
    for (queue, exchange, pattern) in &topology.bindings {
        let bind = |channel: Channel| {
            let (queue, exchange, pattern) = (queue.clone(), exchange.clone(), pattern.clone());
            async move {
                channel
                    .queue_bind(
                        queue.into(),
                        exchange.into(),
                        pattern.into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
            }
        };
        let what = format!("binding of queue `{queue}` to exchange `{exchange}` by `{pattern}`");
        retry_item(link, &mut channel, &what, bind).await?;
    }
    Ok(())
}

/// Runs one replay step; on a channel error opens a fresh channel. An exclusive
/// queue of the dead connection may linger briefly (RESOURCE_LOCKED): retried.
async fn retry_item<F, Fut>(
    link: &Link,
    channel: &mut Channel,
    what: &str,
    step: F,
) -> Result<(), ReplayError>
where
    F: Fn(Channel) -> Fut,
    Fut: Future<Output = Result<(), lapin::Error>>,
{
    const LOCKED_RETRIES: u32 = 50;
    let mut attempt = 0;
    loop {
        let error = match step(channel.clone()).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if !link.is_up() {
            return Err(ReplayError::ConnectionLost(error));
        }
        *channel = link.channel().await.map_err(ReplayError::ConnectionLost)?;
        let locked = matches!(
            error.kind(),
            lapin::ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED))
        );
        if locked && attempt < LOCKED_RETRIES {
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        tracing::error!(%error, "AMQP recovery could not restore {what}; skipping it");
        return Ok(());
    }
}

/// How many channel ids before the wrap a connection with broker-closed channels is replaced.
const CHANNEL_ID_MARGIN: u32 = 64;

/// Queues being read (consumed or fetched) through the broker, each with how
/// many messages from its head its readers may hold: where a message that
/// broke the connection can be.
#[derive(Debug, Default)]
pub(crate) struct Readers(std::sync::Mutex<BTreeMap<String, Vec<u32>>>);

/// One reader's registration; dropping it unregisters.
pub(crate) struct ReadGuard {
    readers: Arc<Readers>,
    queue: String,
    depth: u32,
}

impl Readers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u32>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a reader of `queue` holding up to `depth` messages.
    pub(crate) fn register(self: &Arc<Self>, queue: &str, depth: u32) -> ReadGuard {
        self.lock().entry(queue.to_owned()).or_default().push(depth);
        ReadGuard {
            readers: self.clone(),
            queue: queue.to_owned(),
            depth,
        }
    }

    /// Each queue read now, with the sum of its readers' depths.
    pub(crate) fn snapshot(&self) -> Vec<(String, u32)> {
        self.lock()
            .iter()
            .map(|(queue, depths)| {
                let depth = depths.iter().fold(0u32, |sum, d| sum.saturating_add(*d));
                (queue.clone(), depth)
            })
            .collect()
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut readers = self.readers.lock();
        if let Some(depths) = readers.get_mut(&self.queue) {
            if let Some(index) = depths.iter().position(|d| *d == self.depth) {
                depths.swap_remove(index);
            }
            if depths.is_empty() {
                readers.remove(&self.queue);
            }
        }
    }
}

/// Shared pieces the supervisor needs; it holds the broker weakly so dropping
/// every broker handle ends it.
pub(crate) struct SupervisorHandles {
    pub(crate) config: AmqpConfig,
    pub(crate) state: Weak<watch::Sender<LinkState>>,
    pub(crate) topology: Weak<std::sync::Mutex<Topology>>,
    pub(crate) recoveries: Arc<AtomicU64>,
    pub(crate) readers: Arc<Readers>,
    pub(crate) poison: broadcast::Sender<PoisonEvent>,
}

fn is_parse_error(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ParsingError(_))
}

/// Whether the dead link's events say it died failing to parse a frame.
/// The error event may trail the status change that woke the supervisor.
async fn died_parsing(events: &mut Events) -> bool {
    let look = async {
        while let Some(event) = events.next().await {
            if let Event::Error(error) = event {
                return is_parse_error(&error);
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_millis(200), look)
        .await
        .unwrap_or(false)
}

/// After a connection died failing to parse a frame: sets aside the messages
/// that lapin cannot read from the head of every queue being read, before
/// readers resubscribe. Returns how many were set aside.
async fn sweep_poison(
    config: &AmqpConfig,
    topology: &Topology,
    readers: &Readers,
    poison: &broadcast::Sender<PoisonEvent>,
) -> usize {
    let reading = readers.snapshot();
    let queues: Vec<String> = reading.iter().map(|(queue, _)| queue.clone()).collect();
    let mut lost = Vec::new();
    let targets: Vec<SweepTarget> = reading
        .into_iter()
        .filter_map(|(queue, depth)| {
            let options = topology.queues.get(&queue);
            // An exclusive queue died with the connection, poison and all.
            if options.is_some_and(|options| options.exclusive) {
                lost.push(queue);
                return None;
            }
            let dead_letter = options.and_then(|options| {
                options
                    .dead_letter_exchange
                    .clone()
                    .map(|exchange| (exchange, options.dead_letter_routing_key.clone()))
            });
            Some(SweepTarget {
                queue,
                depth,
                dead_letter,
            })
        })
        .collect();
    let lost = (!lost.is_empty()).then(|| {
        format!("exclusive queues {lost:?} died with the connection, with the messages in them")
    });
    let unresolved = |error: String| {
        let error = match &lost {
            Some(lost) => format!("{error}; {lost}"),
            None => error,
        };
        tracing::error!(?queues, %error, "AMQP connection failed parsing a message that could not be set aside");
        let _ = poison.send(PoisonEvent::Unresolved {
            queues: queues.clone(),
            error,
        });
    };
    if targets.is_empty() {
        unresolved("no queue to look in".to_owned());
        return 0;
    }
    let mut connection = match RawConnection::connect(config).await {
        Ok(connection) => connection,
        Err(error) => {
            unresolved(error.to_string());
            return 0;
        }
    };
    let mut moved = 0;
    let mut errors = Vec::new();
    for target in &targets {
        match connection.set_aside(target).await {
            Ok(events) => {
                moved += events.len();
                for event in events {
                    let _ = poison.send(event);
                }
            }
            Err(error @ BrokerError::QueueNotFound(_)) => errors.push(error.to_string()),
            Err(error) => {
                errors.push(error.to_string());
                break; // The raw connection is unusable.
            }
        }
    }
    connection.close().await;
    if moved == 0 {
        let error = if errors.is_empty() {
            "no message with an invalid short string at the head of these queues".to_owned()
        } else {
            errors.join("; ")
        };
        unresolved(error);
    }
    moved
}

/// Watches `link`; when it dies, reconnects with capped exponential backoff,
/// replays the topology and publishes the new link. Ends when the broker is
/// closed or dropped.
pub(crate) async fn supervise(handles: SupervisorHandles, mut link: Arc<Link>, mut events: Events) {
    let SupervisorHandles {
        config,
        state,
        topology,
        recoveries,
        readers,
        poison,
    } = handles;
    // Parse failures in a row that no sweep explained: each one waits longer.
    let mut unexplained_parse_failures = 0u32;
    loop {
        // Wait for the link to die (or the broker to go away).
        let mut poll = tokio::time::interval(Duration::from_millis(250));
        let mut parse_failure = false;
        let reason = loop {
            let Some(state) = state.upgrade() else {
                return;
            };
            let mut watcher = state.subscribe();
            drop(state);
            if matches!(*watcher.borrow_and_update(), LinkState::Closed) {
                return;
            }
            tokio::select! {
                event = events.next() => match event {
                    Some(Event::Error(error)) if !link.is_up() => {
                        parse_failure = is_parse_error(&error);
                        break error.to_string();
                    }
                    Some(Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(endpoint = %link.node_config.endpoint(), %reason, "RabbitMQ blocks the AMQP connection");
                    }
                    Some(Event::ConnectionUnblocked) => {
                        tracing::info!(endpoint = %link.node_config.endpoint(), "RabbitMQ unblocked the AMQP connection");
                    }
                    None if !link.is_up() => break "connection ended".to_owned(),
                    Some(_) => {}
                    None => tokio::time::sleep(Duration::from_millis(50)).await,
                },
                _ = link.broken.notified() => {}
                _ = poll.tick() => {}
                _ = watcher.changed() => {}
            }
            if !link.is_up() {
                parse_failure = died_parsing(&mut events).await;
                break "connection closed".to_owned();
            }
            if link.retiring() {
                // Operations on it fail and wait for the next connection, as after a loss.
                let _ = link
                    .connection
                    .close(200, "replaced before channel ids wrap".into())
                    .await;
                break "replaced before its channel ids wrap".to_owned();
            }
        };
        link.dead.send_replace(true);
        // The nodes after the lost one are tried first (it may be going away).
        let next_node = link.node + 1;
        tracing::warn!(
            endpoint = %link.node_config.endpoint(),
            generation = link.generation,
            %reason,
            "AMQP connection lost; reconnecting"
        );
        let Some(sender) = state.upgrade() else {
            return;
        };
        if matches!(*sender.borrow(), LinkState::Closed) {
            return;
        }
        sender.send_replace(LinkState::Down(reason));
        drop(sender);
        drop(link);

        // A message that cannot be parsed comes back at once: wait longer each time it is not found.
        let mut attempt = if parse_failure {
            unexplained_parse_failures
        } else {
            0
        };
        let generation = recoveries.load(Ordering::SeqCst) + 2;
        (link, events) = loop {
            let Some(sender) = state.upgrade() else {
                return;
            };
            if matches!(*sender.borrow(), LinkState::Closed) {
                return;
            }
            let mut closed = sender.subscribe();
            drop(sender);
            let delay = config.backoff(attempt);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = closed.wait_for(|state| matches!(state, LinkState::Closed)) => return,
            }
            attempt = attempt.saturating_add(1);
            let (candidate, candidate_events) = match open(&config, generation, next_node).await {
                Ok(opened) => opened,
                Err(error) => {
                    tracing::warn!(%error, attempt, "AMQP reconnect failed");
                    set_down(&state, error.to_string());
                    continue;
                }
            };
            let Some(snapshot) = topology
                .upgrade()
                .map(|topology| topology.lock().unwrap_or_else(|e| e.into_inner()).clone())
            else {
                return;
            };
            match replay(&candidate, &snapshot).await {
                Ok(()) => {
                    if parse_failure {
                        // On the node this connection reached: the messages are there.
                        let node = &candidate.node_config;
                        if sweep_poison(node, &snapshot, &readers, &poison).await > 0 {
                            unexplained_parse_failures = 0;
                        } else {
                            unexplained_parse_failures =
                                unexplained_parse_failures.saturating_add(1);
                        }
                    }
                    break (candidate, candidate_events);
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "AMQP topology replay failed");
                    set_down(&state, error.to_string());
                }
            }
        };
        let Some(sender) = state.upgrade() else {
            return;
        };
        if matches!(*sender.borrow(), LinkState::Closed) {
            return;
        }
        recoveries.fetch_add(1, Ordering::SeqCst);
        tracing::info!(endpoint = %link.node_config.endpoint(), generation = link.generation, "AMQP connection recovered");
        sender.send_replace(LinkState::Up(link.clone()));
    }
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
