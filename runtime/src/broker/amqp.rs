//! RabbitMQ (AMQP 0-9-1) broker, following Pulse's conventions, over
//! connections of this module's own that run on the tokio runtime: `conn`
//! for declarations, consumers, gets and acks, `pipe` for publishes, both on
//! the lenient codec in `wire` (an AMQP client's own I/O thread cost more
//! CPU per message than the rest of the message).
//!
//! - Named queues are `queue/<user>/<name>` ([`Broker::qualify_queue_name`]);
//!   an unnamed queue (`declare_queue("")`) gets a client-generated name
//!   `queue/<user>/ephemeral-<random>` and is exclusive and auto-deleted.
//!   (Client-generated rather than server-named: Pulse only lets a user
//!   configure `queue/<user>/...`, and the name survives reconnection.)
//! - [`publish`](Broker::publish) waits for a publisher confirm; a nack is
//!   [`BrokerError::QueueFull`] (classic queues nack only for `x-overflow:
//!   reject-publish`), naming the bounded queue found full among those the
//!   message routes to by the bindings made through this broker. Publishing
//!   straight to a missing queue (default exchange, or `publish_delayed`) is
//!   [`BrokerError::QueueNotFound`] (the `mandatory` flag); through a topic
//!   exchange an unroutable message is dropped.
//! - [`publish_delayed`](Broker::publish_delayed) needs no plugin: the message
//!   waits in a retry queue `<queue>.delay.<ms>` whose `x-message-ttl` dead-letters
//!   it into `<queue>`. Delays are rounded *up* to tiers (at most 12.5 % late,
//!   never early); unused tier queues expire (`x-expires`). The tier queues
//!   of a quorum queue declared through this broker are quorum queues too,
//!   replicated like it, that dead-letter into it at least once.
//! - [`pending`](Broker::pending) takes every ready message with `basic.get` on a
//!   temporary channel and closes it, which puts them back in order — but marks
//!   them *redelivered*, and hides them from consumers meanwhile.
//! - [`get`](Broker::get) opens a channel per delivery (closed once it is
//!   settled or dropped); a dropped unsettled delivery is requeued.
//! - Headers: `x-` names are refused with [`BrokerError::Invalid`] (RabbitMQ
//!   3.13+ drops client-set ones); broker-added `x-` headers are not surfaced.
//! - Two connections: publishes go over their own (`<name> (publish)`),
//!   because RabbitMQ blocks a connection that publishes during a resource
//!   alarm and a blocked connection sends nothing, acks included; everything
//!   else goes over the main one. Each connection is two tasks on the
//!   caller's runtime (one writes what was queued, one write per batch; one
//!   reads), with heartbeats both ways: a broker silent for two heartbeat
//!   intervals is left and reconnected. A publish queues its message's
//!   encoded record (kept for a resend anyway) and never waits for room:
//!   the publishing writer encodes from that queue, 256 KiB a write, so a
//!   blocked or slow connection holds nothing else for what waits.
//! - Channel errors (404, 406, ...) cost only the channel: declarations,
//!   bindings and deletions take turns on one operations channel, replaced
//!   after an error; each consumer, `get` and `pending` has a channel of its
//!   own; publishes share one confirm channel, reopened after an error (a
//!   publish that another publish's error cut off is resent). A channel's id
//!   is reused only after the broker confirmed its close.
//! - Every published message has a message id (a UUID when it has none); at
//!   most one copy of it is unconfirmed at a time, and a failed publish says
//!   whether it was refused ([`BrokerError::NotConfirmed`],
//!   [`BrokerError::QueueFull`]), never sent ([`BrokerError::Unreachable`]) or
//!   sent but unconfirmed ([`BrokerError::Unconfirmed`]: it may be delivered).
//! - A message whose routing key, property or header name is not UTF-8
//!   (RabbitMQ accepts them from any publisher; most clients refuse them, and
//!   lapin's parser drops the whole connection) is never handed to a
//!   consumer: it is set aside to its queue's dead-letter destination and
//!   reported as a [`PoisonEvent`]; the consumer goes on; see [`raw`].
//! - Dropping every handle closes both connections, even while consumers
//!   read: their streams end.
//!
//! # Connection recovery
//!
//! A supervisor task per connection watches it; when it dies, it reconnects
//! with capped exponential backoff (forever, until the broker is closed or
//! dropped), replays every exchange, queue and binding declared through this
//! broker (retrying an exclusive queue the dead connection still holds), and
//! only then publishes the new connection.
//!
//! Operations in flight wait for it, up to the configured operation timeout,
//! and retry; past it they fail with [`BrokerError::Connection`] (a publish
//! still waiting for its confirm: [`BrokerError::NotConfirmed`]). A publish
//! whose confirm was lost with the connection is sent again (at-least-once).
//! Consumers re-subscribe with the same prefetch and keep feeding the same
//! [`DeliveryStream`]; deliveries from the dead connection fail to settle
//! with [`BrokerError::AckFailed`] and the broker redelivers them. Messages in
//! exclusive (unnamed) queues die with the connection, as on any AMQP broker.
//!
//! # Clusters
//!
//! Given several node URLs ([`AmqpConfig::from_urls`], or one
//! comma-separated value), each connection goes to the first node that
//! answers, in the order given; after a loss the supervisor tries the nodes
//! after the lost one first, one round over all of them per attempt, and
//! recovers as above on whichever answers. The main and the publishing
//! connection may end up on different nodes. Queues on a node that went away
//! are not reachable through the others unless they are replicated (quorum
//! queues, [`QueueType::Quorum`]); see the README.

mod acks;
mod config;
mod conn;
mod consume;
mod convert;
mod copies;
mod io;
mod link;
mod methods;
mod pipe;
pub mod raw;
#[cfg(test)]
mod scripted;
mod wire;

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use config::{AmqpConfig, PASSWORD_ENV, USERNAME_ENV};
use conn::{AmqpError, Reply};
use convert::{CC_HEADER, MAX_TTL_MS, Target, short};
use copies::{Prepared, Wait, Waited};
use link::{Lane, Link, LinkState, Supervised, Topology};
use methods::QueueFlags;
use pipe::{Outcome, Pipe, PublishLane, Sending};
pub use raw::PoisonEvent;
pub use wire::{InvalidField, WireError};

use super::{
    Broker, BrokerError, DEFAULT_EXCHANGE, DELAYED_CC_HEADER, Delivery, DeliveryStream,
    ExchangeOptions, OutgoingMessage, PendingMessage, QueueOptions, QueueType,
};

/// A [`Broker`] on RabbitMQ. Cheap to clone; clones share its connections.
#[derive(Clone)]
pub struct AmqpBroker {
    shared: Arc<Shared>,
}

struct Shared {
    config: AmqpConfig,
    /// Declarations, consumers, gets and acks.
    main: Lane,
    /// Publishes only: a connection RabbitMQ blocks in an alarm must not hold
    /// up acks.
    publishing: PublishLane,
    poison: tokio::sync::broadcast::Sender<PoisonEvent>,
}

impl fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("config", &self.shared.config)
            .field("connected", &self.is_connected())
            .field("recoveries", &self.recoveries())
            .finish()
    }
}

/// How an operation's failure is handled.
enum Failure {
    /// A channel-level AMQP error caused by this operation: reply code and text.
    Soft(u16, String),
    /// The channel closed (someone else's error); the connection is fine: retry on a new channel.
    ChannelLost(String),
    /// The connection is gone: wait for recovery and retry.
    ConnectionLost(String),
}

fn classify(error: AmqpError, link: &Link) -> Failure {
    match error {
        AmqpError::Closed { code, text } if convert::is_soft(code) || code == 0 => {
            Failure::Soft(code, text)
        }
        error if link.is_up() => Failure::ChannelLost(error.to_string()),
        error => Failure::ConnectionLost(error.to_string()),
    }
}

/// How many fresh channels an operation tries when its channel is closed under it.
const CHANNEL_RETRIES: u32 = 5;

/// How many [`PoisonEvent`]s a slow receiver may fall behind.
const POISON_EVENTS_KEPT: usize = 64;

impl AmqpBroker {
    /// Connects to RabbitMQ (one attempt: fails at once if it is unreachable)
    /// and starts the supervisor that recovers the connection later.
    pub async fn connect(config: AmqpConfig) -> Result<Self, BrokerError> {
        let (poison, _) = tokio::sync::broadcast::channel(POISON_EVENTS_KEPT);
        let main = Lane::start(&config).await?;
        let publishing = PublishLane::start(&config).await?;
        Ok(AmqpBroker {
            shared: Arc::new(Shared {
                config,
                main,
                publishing,
                poison,
            }),
        })
    }

    /// Connects using [`AmqpConfig::from_url`].
    pub async fn connect_url(url: &str) -> Result<Self, BrokerError> {
        Self::connect(AmqpConfig::from_url(url)?).await
    }

    /// The configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }

    /// Whether both connections (the main one and the publishing one) are up right now.
    pub fn is_connected(&self) -> bool {
        is_up(&self.shared.main.state) && is_up(&self.shared.publishing.state)
    }

    /// The node (`amqp://host:port/vhost`, no credentials) the main
    /// connection (declarations, consumers, gets) is connected to now; `None`
    /// while it reconnects or after [`close`](Self::close).
    pub fn connected_node(&self) -> Option<String> {
        lane_node(&self.shared.main.state)
    }

    /// The node the publishing connection is connected to now; `None`
    /// while it reconnects or after [`close`](Self::close).
    pub fn publishing_node(&self) -> Option<String> {
        let state = self.shared.publishing.state.borrow();
        match &*state {
            LinkState::Up(pipe) if pipe.is_up() => Some(pipe.node_config.endpoint()),
            _ => None,
        }
    }

    /// How many times the main connection (declarations, consumers, gets)
    /// was lost and re-established.
    pub fn recoveries(&self) -> u64 {
        self.shared.main.recoveries.load(Ordering::SeqCst)
    }

    /// How many times the publishing connection was lost and re-established.
    pub fn publisher_recoveries(&self) -> u64 {
        self.shared.publishing.recoveries.load(Ordering::SeqCst)
    }

    /// Reports of messages that could not be handed out (a short string
    /// that is not UTF-8): each one set aside to its queue's dead-letter
    /// destination, or why it could not be (see [`raw`]). Also logged at error level. A receiver that falls more
    /// than 64 events behind misses the oldest.
    pub fn poison_events(&self) -> tokio::sync::broadcast::Receiver<PoisonEvent> {
        self.shared.poison.subscribe()
    }

    /// Closes the connections. Operations afterwards fail with
    /// [`BrokerError::Closed`]; consumers' streams end.
    pub async fn close(&self) {
        if let Some(link) = self.shared.main.close() {
            // Best effort: the server cleans up after a dropped connection as well.
            link.connection.close("closed by application").await;
        }
        if let Some(pipe) = self.shared.publishing.close() {
            pipe.close().await;
        }
    }

    /// Deletes an exchange and its bindings (not part of [`Broker`]: Pulse
    /// exchanges belong to their publishing service; this is for tests and tools).
    /// Deleting a missing exchange succeeds, as on RabbitMQ.
    pub async fn delete_exchange(&self, name: &str) -> Result<(), BrokerError> {
        let exchange = short("exchange", name)?;
        self.operate(
            "delete exchange",
            &Target::exchange(name),
            methods::exchange_delete(&exchange),
        )
        .await?;
        let mut topology = self.topology();
        topology.exchanges.remove(name);
        topology
            .bindings
            .retain(|(_, exchange, _)| exchange != name);
        Ok(())
    }

    fn topology(&self) -> std::sync::MutexGuard<'_, Topology> {
        self.shared
            .main
            .topology
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn deadline(&self) -> Instant {
        crate::deadline::after(self.shared.config.operation_timeout())
    }

    /// The current main link, waiting for recovery until `deadline`.
    async fn link(&self, deadline: Instant) -> Result<Arc<Link>, BrokerError> {
        self.lane_link(&self.shared.main.state, deadline).await
    }

    /// A lane's current connection, waiting for recovery until `deadline`.
    async fn lane_link<L: Supervised>(
        &self,
        state: &watch::Sender<LinkState<L>>,
        deadline: Instant,
    ) -> Result<Arc<L>, BrokerError> {
        let mut watcher = state.subscribe();
        loop {
            let last_failure = match &*watcher.borrow_and_update() {
                LinkState::Up(link) if link.is_up() => return Ok(link.clone()),
                LinkState::Up(_) => "connection lost".to_owned(),
                LinkState::Down(reason) => reason.clone(),
                LinkState::Closed => return Err(BrokerError::Closed),
            };
            // Short naps as well as change notifications: an `Up` link can die without a state change yet.
            let nap = Instant::now() + Duration::from_millis(100);
            match tokio::time::timeout_at(deadline.min(nap), watcher.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(BrokerError::Closed),
                Err(_) if Instant::now() >= deadline => {
                    return Err(BrokerError::Connection(format!(
                        "not connected to {} after {:?}: {last_failure}",
                        self.shared.config.endpoint(),
                        self.shared.config.operation_timeout()
                    )));
                }
                Err(_) => {}
            }
        }
    }

    /// Runs `operation` on the current link; retries it on a fresh channel when
    /// its channel was closed by someone else, and after recovery when the
    /// connection dropped, until the operation timeout.
    async fn run<T, F, Fut>(
        &self,
        what: &str,
        target: &Target,
        operation: F,
    ) -> Result<T, BrokerError>
    where
        F: Fn(Arc<Link>) -> Fut,
        Fut: Future<Output = Result<T, AmqpError>>,
    {
        let deadline = self.deadline();
        let mut channel_failures = 0;
        loop {
            let link = self.link(deadline).await?;
            let attempt = async {
                tokio::select! {
                    result = operation(link.clone()) => Some(result),
                    () = link.died() => None,
                }
            };
            let failure = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Some(Ok(value))) => return Ok(value),
                // No room for another channel: no retry helps soon.
                Ok(Some(Err(error @ AmqpError::NoChannelId(_)))) => {
                    return Err(BrokerError::Connection(format!("{what}: {error}")));
                }
                Ok(Some(Err(error))) => classify(error, &link),
                Ok(None) => Failure::ConnectionLost("connection lost".to_owned()),
                Err(_) => {
                    return Err(BrokerError::Connection(format!(
                        "{what} `{}`: no answer from {} within {:?}",
                        target
                            .queue
                            .as_deref()
                            .or(target.exchange.as_deref())
                            .unwrap_or_default(),
                        self.shared.config.endpoint(),
                        self.shared.config.operation_timeout()
                    )));
                }
            };
            match failure {
                Failure::Soft(code, text) => return Err(target.soft_error(what, code, &text)),
                Failure::ChannelLost(reason) => {
                    channel_failures += 1;
                    if channel_failures > CHANNEL_RETRIES {
                        return Err(BrokerError::Connection(format!(
                            "{what}: channel keeps closing: {reason}"
                        )));
                    }
                }
                Failure::ConnectionLost(reason) => {
                    tracing::debug!(%reason, "{what}: waiting for AMQP connection recovery");
                }
            }
        }
    }

    /// Sends one method on the operations channel (see [`run`](Self::run))
    /// and returns the broker's answer.
    async fn operate(
        &self,
        what: &str,
        target: &Target,
        method: wire::Writer,
    ) -> Result<Reply, BrokerError> {
        self.run(what, target, |link| {
            let method = method.clone();
            async move { link.operate(method).await }
        })
        .await
    }

    /// Publishes on the publishing connection's confirm channel; see
    /// [`Broker::publish`]. `mandatory`: an unroutable message is
    /// [`BrokerError::QueueNotFound`] (for messages sent straight to a queue
    /// that must exist).
    ///
    /// At most one copy of a message is unconfirmed at a time: a call for a
    /// message whose earlier copy still waits for its confirm on the live
    /// connection waits for that copy instead of sending another. A copy
    /// whose connection died is sent again on the next one (its fate is unknown).
    ///
    /// (A plain function returning the future: the message is checked and
    /// encoded before it, into the record the connection queues, so the
    /// future, alive as long as the publish is in flight, holds little more
    /// than that record.)
    fn publish_confirmed<'s, 'e, 'r>(
        &'s self,
        exchange: &'e str,
        routing_key: &'r str,
        message: OutgoingMessage,
        mandatory: bool,
        cc_header: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send + use<'s, 'e, 'r> {
        self.send_prepared(Prepared::new(
            exchange,
            routing_key,
            message,
            mandatory,
            cc_header,
        ))
    }

    /// Sends a prepared record and waits for its confirm; a message that
    /// could not be prepared fails at once.
    fn send_prepared(
        &self,
        prepared: Result<Arc<Prepared>, BrokerError>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send + use<'_> {
        match prepared {
            Ok(copy) => futures_util::future::Either::Left(self.send_confirmed(copy)),
            Err(error) => futures_util::future::Either::Right(std::future::ready(Err(error))),
        }
    }

    /// The publishing connection if it is up now (no waiting future: it
    /// would take room in every publish's).
    fn publishing_pipe(&self) -> Option<Arc<Pipe>> {
        match &*self.shared.publishing.state.borrow() {
            LinkState::Up(pipe) if pipe.is_up() => Some(pipe.clone()),
            _ => None,
        }
    }

    /// The error of a publish that gave up: what it was, how long it tried, why.
    fn attempt(copy: &Prepared, started: Instant, reason: String) -> Box<super::PublishAttempt> {
        Box::new(super::PublishAttempt {
            exchange: copy.exchange(),
            routing_key: copy.routing_key(),
            message_id: copy.message_id(),
            waited: started.elapsed(),
            reason,
        })
    }

    /// Sends `copy` once the publishing connection is back (waiting until
    /// `deadline`); `sent`: whether a copy went out during this call already.
    async fn send_when_up(
        &self,
        copy: &Arc<Prepared>,
        started: Instant,
        deadline: Instant,
        sent: bool,
    ) -> Result<Sending, BrokerError> {
        match self
            .lane_link(&self.shared.publishing.state, deadline)
            .await
        {
            Ok(pipe) => Ok(pipe.send(copy, deadline)),
            Err(BrokerError::Connection(reason)) if sent => {
                Err(BrokerError::Unconfirmed(Self::attempt(
                    copy,
                    started,
                    format!(
                        "the connection was lost after sending, and not back in time: {reason}"
                    ),
                )))
            }
            Err(BrokerError::Connection(reason)) => Err(BrokerError::Unreachable(Self::attempt(
                copy, started, reason,
            ))),
            Err(error) => Err(error),
        }
    }

    /// Why a copy's confirm did not come in time.
    fn unconfirmed_reason(&self) -> String {
        let timeout = self.shared.config.operation_timeout();
        match self.publishing_pipe().and_then(|pipe| pipe.blocked()) {
            Some((since, why)) => format!(
                "RabbitMQ has blocked the publishing connection for {:?} ({why}: a resource alarm); \
                 the copy waits in the client and goes out when it is unblocked",
                since.elapsed()
            ),
            None => format!("no confirm within {timeout:?}"),
        }
    }

    /// What a publish whose copy was refused, returned or cut off gets (the
    /// retry loop of [`send_confirmed`](Self::send_confirmed) handles the rest).
    async fn refused(&self, copy: &Prepared, confirm: Outcome) -> Result<Failure, BrokerError> {
        let exchange = copy.exchange();
        let routing_key = copy.routing_key();
        match confirm {
            Outcome::Acked => Err(BrokerError::Closed), // Not a refusal: never asked.
            Outcome::Returned(reply_text) => Err(if exchange == DEFAULT_EXCHANGE {
                BrokerError::QueueNotFound(routing_key)
            } else {
                BrokerError::NotConfirmed {
                    exchange,
                    routing_key,
                    reason: format!("returned as unroutable: {reply_text}"),
                }
            }),
            // Classic queues nack only for `x-overflow: reject-publish`: a target queue is full.
            Outcome::Nacked => {
                let full = self
                    .find_full_queue(&exchange, &routing_key, &copy.cc())
                    .await;
                Err(BrokerError::QueueFull(full))
            }
            Outcome::ChannelClosed { code, text } if convert::is_soft(code) => {
                // The shared channel also fails for other publishers' errors: only ours are final.
                if Target::exchange(&exchange).mentioned_in(&text) {
                    return Err(Target::exchange(&exchange).soft_error(
                        "publish to exchange",
                        code,
                        &text,
                    ));
                }
                Ok(Failure::Soft(code, text.to_string()))
            }
            Outcome::ChannelClosed { code, text } => Ok(Failure::ChannelLost(format!(
                "channel closed: {code} {text}"
            ))),
            Outcome::Lost(reason) => Ok(Failure::ConnectionLost(reason.to_string())),
        }
    }

    /// The retry loop of [`publish_confirmed`](Self::publish_confirmed). (An
    /// `async move` block, not an `async fn`: that would keep each argument
    /// twice. The common path — sent, confirmed — awaits only the record's
    /// outcome; everything else is boxed, out of every publish's future.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps each argument twice"
    )]
    fn send_confirmed(
        &self,
        copy: Arc<Prepared>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send + use<'_> {
        async move {
            let started = Instant::now();
            let deadline = crate::deadline::after(self.shared.config.operation_timeout());
            let mut channel_failures = 0u32;
            // Whether a copy went out during this call: then its fate may be unknown.
            let mut sent = false;
            loop {
                if self.shared.publishing.remembered.confirmed(&copy) {
                    // Confirmed after an earlier call for it stopped waiting.
                    return Ok(());
                }
                let sending = match self.publishing_pipe() {
                    Some(pipe) => pipe.send(&copy, deadline),
                    None => Box::pin(self.send_when_up(&copy, started, deadline, sent)).await?,
                };
                sent |= matches!(sending, Sending::Sent(_));
                let waited = Wait::new(&copy, sending, deadline).await;
                let confirm = match waited {
                    Waited::Settled(Outcome::Acked) => return Ok(()),
                    Waited::Settled(confirm) => confirm,
                    // The copy goes on; its outcome is recorded for a retry.
                    Waited::TimedOut => {
                        let reason = self.unconfirmed_reason();
                        return Err(BrokerError::Unconfirmed(Self::attempt(
                            &copy, started, reason,
                        )));
                    }
                };
                // Boxed: a rare path, kept out of every publish's future.
                let failure = Box::pin(self.refused(&copy, confirm)).await?;
                match failure {
                    // Another publish's error closed the channel before the broker took
                    // this one: resent on a fresh channel (each round one publish gets
                    // through), until the operation deadline.
                    Failure::Soft(_, text) => {
                        tracing::debug!(reason = %text, "publish: channel closed by another publish; resending");
                    }
                    Failure::ChannelLost(reason) => {
                        channel_failures += 1;
                        if channel_failures > CHANNEL_RETRIES {
                            return Err(BrokerError::NotConfirmed {
                                exchange: copy.exchange(),
                                routing_key: copy.routing_key(),
                                reason,
                            });
                        }
                    }
                    Failure::ConnectionLost(reason) => {
                        tracing::debug!(%reason, "publish: waiting for AMQP connection recovery, then resending");
                    }
                }
            }
        }
    }

    /// Names the full queue that made the broker nack a publish: a bounded
    /// queue the message routes to (per the bindings made through this broker)
    /// that holds its maximum, or the only queue a message sent straight to
    /// one went to. The nack itself does not say which.
    async fn find_full_queue(&self, exchange: &str, routing_key: &str, cc: &[String]) -> String {
        let keys: Vec<&str> = std::iter::once(routing_key)
            .chain(cc.iter().map(String::as_str))
            .collect();
        let (routed, candidates): (Vec<String>, Vec<(String, u32)>) = {
            let topology = self.topology();
            let routed: BTreeSet<&str> = if exchange == DEFAULT_EXCHANGE {
                keys.iter().copied().collect()
            } else {
                topology
                    .bindings
                    .iter()
                    .filter(|(_, bound, pattern)| {
                        bound == exchange
                            && keys
                                .iter()
                                .any(|key| crate::topic::pattern_matches(pattern, key))
                    })
                    .map(|(queue, _, _)| queue.as_str())
                    .collect()
            };
            let candidates = routed
                .iter()
                .filter_map(|queue| {
                    let max = topology.queues.get(*queue)?.max_length?;
                    Some(((*queue).to_owned(), max))
                })
                .collect();
            (routed.into_iter().map(str::to_owned).collect(), candidates)
        };
        for (queue, max_length) in &candidates {
            let Ok(name) = short("queue", queue) else {
                continue;
            };
            let check = methods::queue_declare(&name, &QueueFlags::passive(), &[]);
            let declared = self
                .operate("check queue", &Target::queue(queue), check)
                .await;
            if let Ok(reply) = declared
                && methods::declared_message_count(&mut reply.args())
                    .is_some_and(|count| count >= *max_length)
            {
                return queue.clone();
            }
        }
        match (candidates.as_slice(), routed.as_slice()) {
            ([(only, _)], _) => only.clone(),
            // Straight to one queue, though declared elsewhere (its bound unknown here).
            (_, [only]) if exchange == DEFAULT_EXCHANGE => only.clone(),
            _ => format!("(one that exchange `{exchange}` routes `{routing_key}` to)"),
        }
    }
}

/// A fresh unique queue-name suffix (128 random bits, hex).
fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let mut suffix = String::with_capacity(32);
    for _ in 0..2 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        suffix.push_str(&format!("{:016x}", hasher.finish()));
    }
    suffix
}

/// The endpoint of `lane`'s live connection, if it has one.
fn lane_node(state: &watch::Sender<LinkState>) -> Option<String> {
    match &*state.borrow() {
        LinkState::Up(link) if link.is_up() => Some(link.node_config.endpoint()),
        _ => None,
    }
}

fn is_up<L: Supervised>(state: &watch::Sender<LinkState<L>>) -> bool {
    matches!(&*state.borrow(), LinkState::Up(link) if link.is_up())
}

impl Broker for AmqpBroker {
    fn qualify_queue_name(&self, name: &str) -> String {
        format!("queue/{}/{name}", self.shared.config.username())
    }

    async fn declare_exchange(
        &self,
        name: &str,
        options: ExchangeOptions,
    ) -> Result<(), BrokerError> {
        let exchange = short("exchange", name)?;
        let target = Target::exchange(name);
        let what = if options.passive {
            "check exchange"
        } else {
            "declare exchange"
        };
        let declare = methods::exchange_declare(&exchange, options.passive, options.durable);
        self.operate(what, &target, declare).await?;
        if !options.passive {
            self.topology().exchanges.insert(name.to_owned(), options);
        }
        Ok(())
    }

    async fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
    ) -> Result<String, BrokerError> {
        let (name, options) = if name.is_empty() {
            let name = self.qualify_queue_name(&format!("ephemeral-{}", random_suffix()));
            let options = QueueOptions {
                durable: false,
                exclusive: true,
                auto_delete: true,
                ..options
            };
            (name, options)
        } else {
            (name.to_owned(), options)
        };
        let queue = short("queue", &name)?;
        let arguments = convert::queue_arguments(&name, &options)?;
        let declare = methods::queue_declare(&queue, &QueueFlags::of(&options), &arguments);
        // Recorded before declaring so a recovery racing with this call restores it too.
        let previous = self.topology().queues.insert(name.clone(), options);
        let result = self
            .operate("declare queue", &Target::queue(&name), declare)
            .await;
        match result {
            Ok(_) => Ok(name),
            Err(error) => {
                let mut topology = self.topology();
                match previous {
                    Some(previous) => topology.queues.insert(name, previous),
                    None => topology.queues.remove(&name),
                };
                Err(error)
            }
        }
    }

    async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        let queue = short("queue", name)?;
        let target = Target::queue(name);
        // RabbitMQ deletes a missing queue without complaint; the contract reports it.
        self.run("delete queue", &target, |link| {
            let queue = queue.clone();
            async move {
                let check = methods::queue_declare(&queue, &QueueFlags::passive(), &[]);
                link.operate(check).await?;
                link.operate(methods::queue_delete(&queue)).await
            }
        })
        .await?;
        let mut topology = self.topology();
        topology.queues.remove(name);
        topology.bindings.retain(|(queue, _, _)| queue != name);
        Ok(())
    }

    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        pattern: &str,
    ) -> Result<(), BrokerError> {
        let queue_name = short("queue", queue)?;
        let exchange_name = short("exchange", exchange)?;
        let key = short("routing-key pattern", pattern)?;
        let bind = methods::queue_bind(&queue_name, &exchange_name, &key);
        self.operate("bind queue", &Target::binding(queue, exchange), bind)
            .await?;
        self.topology().bindings.insert((
            queue.to_owned(),
            exchange.to_owned(),
            pattern.to_owned(),
        ));
        Ok(())
    }

    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        // Straight to a queue: a missing queue is reported, not a silent drop.
        let mandatory = exchange == DEFAULT_EXCHANGE;
        let message = message.with_message_id();
        // Not an `async fn`: the returned future holds no copy of the message.
        self.publish_confirmed(exchange, routing_key, message, mandatory, CC_HEADER)
    }

    fn publish_owned_key(
        &self,
        exchange: &str,
        routing_key: String,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        let mandatory = exchange == DEFAULT_EXCHANGE;
        let message = message.with_message_id();
        // The record holds the key as sent: the caller's copy is freed now.
        let prepared = Prepared::new(exchange, &routing_key, message, mandatory, CC_HEADER);
        drop(routing_key);
        self.send_prepared(prepared)
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        message: OutgoingMessage,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        let message = message.with_message_id();
        let delay_ms = convert::delay_ms(delay);
        if delay_ms == 0 {
            // Mandatory: a missing queue is an error here, not a silent drop.
            return self
                .publish_confirmed(DEFAULT_EXCHANGE, queue, message, true, DELAYED_CC_HEADER)
                .await;
        }
        // Capping the tier at RabbitMQ's TTL limit keeps it never early:
        // the delay was clamped to that limit.
        let tier_ms = convert::delay_tier_ms(delay_ms).min(MAX_TTL_MS.unsigned_abs());
        let tier_ms_signed = i64::try_from(tier_ms).unwrap_or(MAX_TTL_MS);
        let delay_queue = format!("{queue}.delay.{tier_ms}");
        let target_queue = short("queue", queue)?;
        let delay_queue_name = short("delay queue", &delay_queue)?;
        // Each use re-declares the tier queue, renewing its lease; it outlives its last message by a minute at least.
        let expires = tier_ms_signed
            .saturating_mul(2)
            .max(tier_ms_signed + 60_000)
            .min(MAX_TTL_MS);
        let mut arguments = vec![
            ("x-message-ttl", convert::int_argument(tier_ms_signed)),
            ("x-dead-letter-exchange", convert::text_argument("")),
            ("x-dead-letter-routing-key", convert::text_argument(queue)),
            ("x-expires", convert::int_argument(expires)),
        ];
        // A quorum queue's delayed messages wait in a quorum queue too
        // (replicated; message TTL on quorum queues needs RabbitMQ 3.10).
        let quorum_target = self
            .topology()
            .queues
            .get(queue)
            .is_some_and(|options| options.queue_type == QueueType::Quorum);
        if quorum_target {
            arguments.push(("x-queue-type", convert::text_argument("quorum")));
            // Dead-lettered into the target at least once: a message stays
            // in the tier until the target has it, through a node's loss
            // (RabbitMQ 3.10; the strategy needs `reject-publish`).
            arguments.push((
                "x-dead-letter-strategy",
                convert::text_argument("at-least-once"),
            ));
            arguments.push(("x-overflow", convert::text_argument("reject-publish")));
        }
        let arguments = convert::arguments_table(arguments)?;
        // The target must exist now: a message dead-lettered to a missing queue vanishes.
        let check = methods::queue_declare(&target_queue, &QueueFlags::passive(), &[]);
        let exists = self
            .operate("check queue", &Target::queue(queue), check)
            .await;
        match exists {
            // Another connection's exclusive queue: it exists, and publishing to it is allowed.
            Ok(_) | Err(BrokerError::Conflict { .. }) => {}
            Err(error) => return Err(error),
        }
        let durable = QueueFlags {
            durable: true,
            ..QueueFlags::default()
        };
        let declare = methods::queue_declare(&delay_queue_name, &durable, &arguments);
        self.operate("delay queue for", &Target::queue(queue), declare)
            .await?;
        self.publish_confirmed(
            DEFAULT_EXCHANGE,
            &delay_queue,
            message,
            true,
            DELAYED_CC_HEADER,
        )
        .await
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<DeliveryStream, BrokerError> {
        if prefetch == 0 {
            return Err(BrokerError::Invalid(format!(
                "consume queue `{queue}`: prefetch must be at least 1 (0 would mean unlimited)"
            )));
        }
        let queue_name = short("queue", queue)?;
        // Room for one prefetch window: the broker sends no more unacknowledged.
        let (sender, receiver) = mpsc::channel(usize::from(prefetch));
        let subscription = self.subscribe(&queue_name, prefetch, &sender).await?;
        tokio::spawn(consume::run_consumer(
            Arc::downgrade(&self.shared),
            self.shared.main.state.subscribe(),
            queue_name,
            prefetch,
            sender,
            subscription,
        ));
        Ok(DeliveryStream::new(receiver))
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>, BrokerError> {
        let queue_name = short("queue", queue)?;
        self.get_readable(&queue_name).await
    }

    async fn pending(&self, queue: &str) -> Result<Vec<PendingMessage>, BrokerError> {
        let queue_name = short("queue", queue)?;
        self.list_pending(&queue_name).await
    }
}
