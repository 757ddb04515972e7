//! The broker abstraction: AMQP 0-9-1's model (topic exchanges, queues,
//! bindings, prefetch, manual ack) with two implementations that behave the
//! same — an embedded in-memory broker and RabbitMQ.
//!
//! Consumers, publishers, queues and jobs are written once against [`Broker`].

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod memory;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed, sendable future, as returned by [`AckHandle`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The default (nameless) exchange: publishing to it with a queue's name as
/// the routing key delivers straight to that queue.
pub const DEFAULT_EXCHANGE: &str = "";

/// The longest delay a broker keeps a message for: 2^32 − 1 ms (about 49.7
/// days), RabbitMQ's limit on a message TTL. Both brokers'
/// [`publish_delayed`](Broker::publish_delayed) clamp longer delays to it, so
/// retry backoffs and job delays never exceed it either.
pub const MAX_DELAY: Duration = Duration::from_millis(u32::MAX as u64);

/// The header that carries a delayed message's CC keys through RabbitMQ's
/// delay queue (a `CC` header there would route copies at once); reserved.
pub const DELAYED_CC_HEADER: &str = "tc-delayed-cc";

/// Options for declaring an exchange (always of type `topic`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeOptions {
    /// Only check that the exchange exists (a consumer's declaration); fail if it does not.
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
}

/// Options for declaring a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueOptions {
    /// Survive a broker restart.
    pub durable: bool,
    /// Used by one connection only and deleted when it closes.
    pub exclusive: bool,
    /// Deleted when its last consumer goes away.
    pub auto_delete: bool,
    /// Where rejected (nack without requeue) or expired messages go.
    pub dead_letter_exchange: Option<String>,
    /// Routing key for dead-lettered messages (default: their own key).
    pub dead_letter_routing_key: Option<String>,
    /// The most messages the queue holds; publishing to a full queue fails
    /// with [`BrokerError::QueueFull`] instead of blocking.
    pub max_length: Option<u32>,
    /// Time after which a message waiting in the queue expires (and is dead-lettered).
    pub message_ttl: Option<Duration>,
    /// How the queue keeps its messages (RabbitMQ's `x-queue-type`).
    pub queue_type: QueueType,
    /// Quorum queues only (RabbitMQ's `x-delivery-limit`): how many times a
    /// message may come back to the queue unsettled — a `nack` with requeue,
    /// a dropped delivery, a cancelled consumer, a closed channel or
    /// connection, and a [`Broker::pending`] listing each count once —
    /// before it is dead-lettered (reason `delivery_limit`) instead, or
    /// dropped without a dead-letter exchange. A message is thus delivered
    /// at most `limit + 1` times. `None`: no limit.
    pub delivery_limit: Option<u32>,
}

/// How a queue keeps its messages: RabbitMQ's `x-queue-type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueType {
    /// A classic queue (RabbitMQ's default): on one node; may be exclusive or auto-deleted.
    #[default]
    Classic,
    /// A quorum queue (RabbitMQ 3.8+; message TTL, which delays use, from
    /// 3.10): replicated on a cluster (Raft), counts redeliveries (see
    /// [`QueueOptions::delivery_limit`]); must be durable, neither exclusive
    /// nor auto-deleted. A message that comes back to it unsettled is
    /// delivered again before those never delivered (after others that came
    /// back earlier), not at its old place as in a classic queue.
    Quorum,
}

impl QueueOptions {
    /// Refuses combinations no broker accepts (both brokers call this first).
    pub(crate) fn check(&self, queue: &str) -> Result<(), BrokerError> {
        if self.queue_type == QueueType::Quorum
            && (!self.durable || self.exclusive || self.auto_delete)
        {
            return Err(BrokerError::Invalid(format!(
                "queue `{queue}`: a quorum queue must be durable, neither exclusive nor auto-deleted"
            )));
        }
        if self.delivery_limit.is_some() && self.queue_type != QueueType::Quorum {
            // RabbitMQ 3.x ignores `x-delivery-limit` on a classic queue: never silently.
            return Err(BrokerError::Invalid(format!(
                "queue `{queue}`: a delivery limit needs a quorum queue (QueueType::Quorum)"
            )));
        }
        if self.dead_letter_routing_key.is_some() && self.dead_letter_exchange.is_none() {
            return Err(BrokerError::Invalid(format!(
                "queue `{queue}`: a dead-letter routing key needs a dead-letter exchange"
            )));
        }
        Ok(())
    }
}

/// A message handed to a broker for publishing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The body, usually JSON.
    pub body: Vec<u8>,
    /// MIME type of the body (`application/json`).
    pub content_type: Option<String>,
    /// Stable identifier of the message (job id); brokers give a message
    /// without one a fresh id (a UUID) when it is published. Keep it across
    /// retries so consumers can deduplicate.
    pub message_id: Option<String>,
    /// Written to disk by the broker (delivery mode 2).
    pub persistent: bool,
    /// Application headers. Never `x-` names: RabbitMQ 3.13+ drops client-set ones.
    pub headers: BTreeMap<String, String>,
    /// Extra routing keys the message is also routed by (RabbitMQ's `CC` header),
    /// e.g. `route.notify.by-email`.
    pub cc: Vec<String>,
}

impl OutgoingMessage {
    /// The message with an id: its own, or a fresh UUID.
    pub fn with_message_id(mut self) -> Self {
        if self.message_id.is_none() {
            self.message_id = Some(uuid::Uuid::new_v4().to_string());
        }
        self
    }

    /// Checks the application headers: `x-` names belong to the broker
    /// (RabbitMQ 3.13+ drops client-set ones, so a counter kept there would
    /// silently reset) and `CC`/`BCC` are set from [`cc`](Self::cc). Both
    /// brokers refuse such a message with [`BrokerError::Invalid`].
    pub fn check_headers(&self) -> Result<(), BrokerError> {
        match self.headers.keys().find(|name| {
            name.starts_with("x-") || ["CC", "BCC", DELAYED_CC_HEADER].contains(&name.as_str())
        }) {
            Some(name) => Err(BrokerError::Invalid(format!(
                "header `{name}` is reserved: `x-` names belong to the broker (RabbitMQ 3.13+ drops \
                 client-set ones) and CC/BCC (and {DELAYED_CC_HEADER}) are set from `OutgoingMessage::cc`"
            ))),
            None => Ok(()),
        }
    }
}

/// A message received from a queue, to be acknowledged exactly once.
pub struct Delivery {
    /// The exchange the message was published to (empty for the default exchange).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
    /// MIME type of the body, if the publisher set one.
    pub content_type: Option<String>,
    /// Identifier the publisher gave the message, if any.
    pub message_id: Option<String>,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
    /// The CC routing keys it was published with.
    pub cc: Vec<String>,
    /// Whether the message was delivered before and not acknowledged.
    pub redelivered: bool,
    /// Settles the delivery with the broker.
    pub acker: Box<dyn AckHandle>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("body_len", &self.body.len())
            .field("message_id", &self.message_id)
            .field("headers", &self.headers)
            .field("cc", &self.cc)
            .field("redelivered", &self.redelivered)
            .finish()
    }
}

impl Delivery {
    /// Acknowledges the message: the broker forgets it.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.acker.ack().await
    }

    /// Rejects the message: back to its queue (`requeue`) or to the queue's
    /// dead-letter exchange (dropped if it has none).
    pub async fn nack(self, requeue: bool) -> Result<(), BrokerError> {
        self.acker.nack(requeue).await
    }
}

/// Settles one delivery with the broker that delivered it.
pub trait AckHandle: Send + Sync {
    /// Acknowledge.
    fn ack(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
    /// Reject, requeueing or dead-lettering.
    fn nack(&self, requeue: bool) -> BoxFuture<'_, Result<(), BrokerError>>;
}

/// A stream of deliveries from one queue; dropping it cancels the consumer
/// (unacknowledged deliveries go back to the queue).
pub struct DeliveryStream {
    receiver: tokio::sync::mpsc::Receiver<Result<Delivery, BrokerError>>,
}

impl DeliveryStream {
    /// A stream fed by `receiver`; brokers push deliveries (or a terminal error) into its sender.
    pub fn new(receiver: tokio::sync::mpsc::Receiver<Result<Delivery, BrokerError>>) -> Self {
        DeliveryStream { receiver }
    }

    /// The next delivery; `None` once the consumer has ended.
    pub async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        self.receiver.recv().await
    }
}

/// A publish whose outcome is unknown or that never left: see
/// [`BrokerError::Unreachable`] and [`BrokerError::Unconfirmed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAttempt {
    /// Exchange published to.
    pub exchange: String,
    /// Routing key published with.
    pub routing_key: String,
    /// The message's id.
    pub message_id: String,
    /// How long the call tried.
    pub waited: Duration,
    /// The last failure, or why no confirm came.
    pub reason: String,
}

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The exchange does not exist (passive declaration, or publishing to it).
    #[error("exchange `{0}` does not exist")]
    ExchangeNotFound(String),
    /// The queue does not exist.
    #[error("queue `{0}` does not exist")]
    QueueNotFound(String),
    /// The queue is at its `max_length`: backpressure, the message was not accepted.
    #[error("queue `{0}` is full")]
    QueueFull(String),
    /// A declaration conflicts with an existing one of the same name.
    #[error("`{name}` was declared before with other options: {detail}")]
    Conflict {
        /// Name of the exchange or queue.
        name: String,
        /// What differs.
        detail: String,
    },
    /// The broker did not take the message: refused it (nack), returned it as
    /// unroutable, or the channel could not confirm. It was not delivered;
    /// retrying may help when the cause is passing.
    #[error("publish to exchange `{exchange}` with key `{routing_key}` not confirmed: {reason}")]
    NotConfirmed {
        /// Exchange published to.
        exchange: String,
        /// Routing key published with.
        routing_key: String,
        /// Why.
        reason: String,
    },
    /// The message was never sent: no connection to the broker for
    /// [`waited`](PublishAttempt::waited). Retrying later is safe.
    #[error(
        "publish to exchange `{}` with key `{}`: not sent, the broker was unreachable for {:?}: {}",
        .0.exchange, .0.routing_key, .0.waited, .0.reason
    )]
    Unreachable(Box<PublishAttempt>),
    /// The message was sent but its confirm did not come (connection lost,
    /// or blocked by a resource alarm): it **may be delivered**. Retry with
    /// the same message (same message id): a copy still waiting for its
    /// confirm is waited for, not sent again; consumers deduplicate by
    /// message id what a lost connection made the broker receive twice.
    #[error(
        "publish to exchange `{}` with key `{}` (message id `{}`): sent but not confirmed after {:?}, it may be delivered: {}",
        .0.exchange, .0.routing_key, .0.message_id, .0.waited, .0.reason
    )]
    Unconfirmed(Box<PublishAttempt>),
    /// The delivery was already settled, or its channel is gone.
    #[error("delivery can no longer be acknowledged: {0}")]
    AckFailed(String),
    /// Connection-level failure (after recovery attempts, where the broker recovers).
    #[error("broker connection: {0}")]
    Connection(String),
    /// The broker was closed.
    #[error("broker closed")]
    Closed,
    /// Invalid argument (e.g. a bad URL or name).
    #[error("invalid broker argument: {0}")]
    Invalid(String),
}

/// A message waiting in a queue, as listed by [`Broker::pending`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMessage {
    /// Identifier the publisher gave the message, if any.
    pub message_id: Option<String>,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

/// A topic-exchange broker.
///
/// Every method that changes broker state returns only when the broker has
/// done it: [`publish`](Broker::publish) returns after the broker confirmed.
pub trait Broker: Clone + Send + Sync + 'static {
    /// The full name of an application's named queue. Pulse requires
    /// `queue/<user>/<name>` on RabbitMQ; the embedded broker keeps `name`.
    fn qualify_queue_name(&self, name: &str) -> String {
        name.to_owned()
    }

    /// Declares a topic exchange.
    fn declare_exchange(
        &self,
        name: &str,
        options: ExchangeOptions,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Declares a queue; an empty `name` asks the broker for a fresh unique
    /// name. Returns the queue's name.
    fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
    ) -> impl Future<Output = Result<String, BrokerError>> + Send;

    /// Deletes a queue and the messages in it.
    fn delete_queue(&self, name: &str) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Binds a queue to an exchange with a routing-key pattern (`*`, `#`).
    fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        pattern: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Publishes a message and waits for the broker's confirmation.
    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Publishes like [`publish`](Self::publish), taking the routing key: a
    /// broker that copies the key into what it sends frees it at once, so a
    /// publish in flight does not hold it twice (the typed publisher keeps
    /// thousands in flight).
    fn publish_owned_key(
        &self,
        exchange: &str,
        routing_key: String,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        async move { self.publish(exchange, &routing_key, message).await }
    }

    /// Puts a message into a queue directly, visible only after `delay`
    /// (zero: at once). Returns once the broker holds the message.
    ///
    /// The message goes to `queue` only: it keeps its CC keys, which route
    /// nothing here.
    ///
    /// A delay longer than [`MAX_DELAY`] (RabbitMQ's TTL limit, about 49.7
    /// days) is clamped to it: accepted, and the message waits [`MAX_DELAY`].
    ///
    /// A message is never visible early, but delayed messages may arrive in
    /// another order than their delays say: the RabbitMQ broker rounds each
    /// delay up to a tier (at most 12.5 % longer) and a tier releases its
    /// messages in publish order, so a message delayed 100 ms published after
    /// one delayed 104 ms (the same tier) arrives after it; the embedded
    /// broker, exact, delivers it first.
    fn publish_delayed(
        &self,
        queue: &str,
        message: OutgoingMessage,
        delay: Duration,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Starts consuming a queue with manual acknowledgement and at most
    /// `prefetch` unacknowledged deliveries.
    fn consume(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> impl Future<Output = Result<DeliveryStream, BrokerError>> + Send;

    /// Takes one message from a queue if there is one (manual ack).
    fn get(
        &self,
        queue: &str,
    ) -> impl Future<Output = Result<Option<Delivery>, BrokerError>> + Send;

    /// Lists the messages waiting (ready, not delivered) in a queue, oldest first, without taking them.
    fn pending(
        &self,
        queue: &str,
    ) -> impl Future<Output = Result<Vec<PendingMessage>, BrokerError>> + Send;
}
