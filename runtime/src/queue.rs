//! A work queue on any [`Broker`], after tsuru's `Q`: put with a delay, get
//! with a timeout, delete, release with a delay, and a handler with
//! start/stop/wait.
//!
//! # Semantics
//!
//! - The queue is durable, named [`Broker::qualify_queue_name`] of the given
//!   name, with a durable dead-letter queue `<full name>.dead`. Both are
//!   quorum queues by default ([`QueueSettings`]): replicated on every node
//!   of a RabbitMQ cluster, and a message that keeps coming back unsettled
//!   (a consumer that crashes on it) is moved to the dead-letter queue by the
//!   broker after [`DEFAULT_DELIVERY_LIMIT`] returns. [`QueueSettings::classic`]
//!   declares classic queues instead (a queue declared classic earlier must
//!   stay classic: RabbitMQ refuses to redeclare it with another type).
//! - [`WorkQueue::get`] waits for a message without polling: it subscribes to
//!   the queue with prefetch 1 and waits for the first delivery up to the
//!   timeout. The subscription lives inside the returned [`QueuedMessage`]
//!   until it is deleted or released, so a message that is dropped unsettled
//!   goes back to the queue (flagged redelivered). (Each `get` thus costs one
//!   subscribe/cancel on the broker.)
//! - [`WorkQueue::release`] first puts a copy back (after the delay) with its
//!   attempt count plus one, then acknowledges the original: a crash in
//!   between can duplicate the message but never lose it.
//! - Attempts are counted in our own header [`ATTEMPTS_HEADER`]
//!   (`tc-attempts`), never in an `x-` header, which RabbitMQ reserves.
//! - [`WorkQueue::handler`] runs a function for each message: `Ok` deletes
//!   it; an error (or a panic) releases it after an exponential backoff, and
//!   after [`HandlerOptions::max_attempts`] failures moves it to the
//!   dead-letter queue with the last error in [`LAST_ERROR_HEADER`].
//! - Delays are clamped to [`MAX_DELAY`] (about 49.7 days, RabbitMQ's limit).
//! - A handler's failed message is never redelivered at once and uncounted
//!   because its copy could not be published: the publish is retried a few
//!   times (a missing queue declared again); a release whose delayed copy
//!   still fails is held for its delay (at most 30 s) and then released for
//!   at once, still counted. Only when the broker takes no copy at all is
//!   the message rejected (logged): requeued as it was after all that
//!   waiting, or, when it was to be dead-lettered, dead-lettered by the
//!   broker without its last error.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::{
    AckHandle, BoxFuture, Broker, BrokerError, DEFAULT_EXCHANGE, Delivery, DeliveryStream,
    MAX_DELAY, OutgoingMessage, PendingMessage, QueueOptions, QueueType,
};
use crate::consumer::{
    DEAD_LETTER_SUFFIX, Dispatch, HandlerError, Interrupt, NotRunning, OwnedRunner, Runner,
    RunnerConfig, run_caught,
};

/// Header counting how many times a message was released (failed) before.
pub const ATTEMPTS_HEADER: &str = "tc-attempts";

/// Header holding the error of a message's last failed attempt.
pub const LAST_ERROR_HEADER: &str = "tc-last-error";

/// How many times a message may come back unsettled to a quorum work queue
/// before the broker dead-letters it (RabbitMQ 4's default as well).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// How a [`WorkQueue`] and its dead-letter queue are declared.
///
/// The default is a quorum queue with a delivery limit of
/// [`DEFAULT_DELIVERY_LIMIT`] (RabbitMQ 3.10 or later: delayed messages need
/// message TTLs on quorum queues). A message comes back unsettled when a
/// delivery is dropped, its consumer goes away (a crash, a lost
/// connection), a stop interrupts its handler, or the queue is listed
/// ([`WorkQueue::pending`] takes and returns every message on RabbitMQ);
/// past the limit the broker moves it to the dead-letter queue, without a
/// [`LAST_ERROR_HEADER`]. Failed handler attempts do not count: a failed
/// message is put back as a new message (see [`ATTEMPTS_HEADER`]). On
/// RabbitMQ a dropped [`QueuedMessage`] may count twice (its requeue races
/// the close of its subscription, which returns it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// Classic or quorum, for the queue and its dead-letter queue.
    pub queue_type: QueueType,
    /// For quorum queues: returns after which the broker dead-letters a
    /// message; `None`: no limit. Must be `None` for classic queues.
    pub delivery_limit: Option<u32>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            queue_type: QueueType::Quorum,
            delivery_limit: Some(DEFAULT_DELIVERY_LIMIT),
        }
    }
}

impl QueueSettings {
    /// Classic queues without a delivery limit (how work queues were
    /// declared before quorum queues became the default).
    pub fn classic() -> Self {
        QueueSettings {
            queue_type: QueueType::Classic,
            delivery_limit: None,
        }
    }
}

/// A message to put into a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueMessage {
    /// The body.
    pub body: Vec<u8>,
    /// An identifier, kept across releases.
    pub message_id: Option<String>,
    /// Application headers (never `x-` names; `tc-` names are the runtime's).
    pub headers: BTreeMap<String, String>,
}

impl QueueMessage {
    /// A message with this body and no id or headers.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        QueueMessage {
            body: body.into(),
            ..QueueMessage::default()
        }
    }

    /// Sets the message id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// A message taken from a queue, as a handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The message as it was put (headers include the runtime's `tc-` ones).
    pub message: QueueMessage,
    /// How many times it was released before (from [`ATTEMPTS_HEADER`]).
    pub attempts: u32,
    /// Whether the broker delivered it before without it being settled
    /// (a consumer went away, or a stop interrupted its handler).
    pub redelivered: bool,
}

impl Received {
    pub(crate) fn from_delivery(queue: &str, delivery: Delivery) -> (Self, Box<dyn AckHandle>) {
        let attempts = parse_attempts(queue, &delivery.headers);
        let received = Received {
            message: QueueMessage {
                body: delivery.body,
                message_id: delivery.message_id,
                headers: delivery.headers,
            },
            attempts,
            redelivered: delivery.redelivered,
        };
        (received, delivery.acker)
    }

    /// The error of the last failed attempt, if it was recorded.
    pub fn last_error(&self) -> Option<&str> {
        self.message
            .headers
            .get(LAST_ERROR_HEADER)
            .map(String::as_str)
    }
}

fn parse_attempts(queue: &str, headers: &BTreeMap<String, String>) -> u32 {
    match headers.get(ATTEMPTS_HEADER) {
        None => 0,
        Some(text) => text.parse().unwrap_or_else(|_| {
            tracing::warn!(%queue, value = %text, "unreadable `{ATTEMPTS_HEADER}` header; counting 0 attempts");
            0
        }),
    }
}

/// A message taken with [`WorkQueue::get`]: settle it with
/// [`WorkQueue::delete`] or [`WorkQueue::release`]. Dropping it unsettled
/// returns it to the queue.
pub struct QueuedMessage {
    received: Received,
    /// The subscription the message came through: kept open until the
    /// message is settled, because closing it returns the message to the queue.
    /// Dropped before `acker` (fields drop in order): a dropped message goes
    /// back once, with its subscription, instead of being requeued to the
    /// still-open subscription first (two returns on a quorum queue).
    _subscription: DeliveryStream,
    acker: Box<dyn AckHandle>,
}

impl fmt::Debug for QueuedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuedMessage")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for QueuedMessage {
    type Target = Received;

    fn deref(&self) -> &Received {
        &self.received
    }
}

/// A queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The broker failed.
    #[error("queue `{queue}`: {operation} failed: {source}")]
    Broker {
        /// The queue's full name.
        queue: String,
        /// What was being done (`put`, `get`, `release`, ...).
        operation: &'static str,
        /// The broker's error.
        source: BrokerError,
    },
    /// A message carries a header the broker would drop or misread.
    #[error("queue `{queue}`: header `{header}` is not allowed ({reason})")]
    InvalidHeader {
        /// The queue's full name.
        queue: String,
        /// The header name.
        header: String,
        /// Why.
        reason: &'static str,
    },
    /// The queue name given to [`WorkQueue::open`] cannot name a queue.
    #[error("invalid queue name `{name}`: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A handler option is out of range.
    #[error("queue `{queue}`: invalid handler option: {reason}")]
    InvalidOption {
        /// The queue's full name.
        queue: String,
        /// Why.
        reason: String,
    },
    /// [`QueueHandler::stop`] was called while the handler was not running.
    #[error("handler of queue `{queue}` is not running")]
    NotRunning {
        /// The queue's full name.
        queue: String,
    },
}

/// Exponential backoff: `base * 2^attempt`, at most `cap`, and never more
/// than [`MAX_DELAY`] (about 49.7 days, the longest delay a broker keeps):
/// longer delays, including a `cap` of `Duration::MAX`, are clamped to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure.
    pub base: Duration,
    /// The longest delay (clamped to [`MAX_DELAY`]).
    pub cap: Duration,
}

impl Backoff {
    /// The delay before retrying after `attempt` earlier failures (0 for the
    /// first failure), at most `cap` and [`MAX_DELAY`].
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(self.cap)
            .min(self.cap)
            .min(MAX_DELAY)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
        }
    }
}

/// How a [`QueueHandler`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerOptions {
    /// Messages handled at once (also the prefetch). Default 1.
    pub concurrency: u16,
    /// Failures after which a message is dead-lettered; `None` retries forever. Default 5.
    pub max_attempts: Option<u32>,
    /// Delay before a failed message is retried (clamped to [`MAX_DELAY`]).
    pub backoff: Backoff,
    /// How long `stop` lets running handlers finish before dropping them
    /// (their messages go back to the queue, not counted as attempts). Default: no limit.
    pub drain_timeout: Option<Duration>,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        HandlerOptions {
            concurrency: 1,
            max_attempts: Some(5),
            backoff: Backoff::default(),
            drain_timeout: None,
        }
    }
}

/// How many times a failed message's copy is published before giving up.
const MOVE_TRIES: u32 = 3;
/// The wait before publishing a failed message's copy again (doubling after).
const MOVE_RETRY_WAIT: Duration = Duration::from_millis(100);
/// The longest a handler holds a failed message whose delayed copy could
/// not be published, before releasing it for at once instead.
const MAX_HOLD: Duration = Duration::from_secs(30);

/// Where a failed (or released) message's copy goes.
#[derive(Debug, Clone, Copy)]
enum Move {
    /// Back into the queue, after the delay.
    Release(Duration),
    /// Into the dead-letter queue.
    DeadLetter,
}

impl Move {
    /// What publishing the copy and acknowledging the original are called in errors.
    fn operations(self) -> [&'static str; 2] {
        match self {
            Move::Release(_) => ["release", "release (acknowledging the original)"],
            Move::DeadLetter => ["dead-letter", "dead-letter (acknowledging the original)"],
        }
    }
}

struct QueueInner<B> {
    broker: B,
    name: String,
    dead_letter: String,
    settings: QueueSettings,
}

/// A durable work queue; see the [module docs](self). Cheap to clone.
pub struct WorkQueue<B: Broker> {
    inner: Arc<QueueInner<B>>,
}

impl<B: Broker> Clone for WorkQueue<B> {
    fn clone(&self) -> Self {
        WorkQueue {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Broker> fmt::Debug for WorkQueue<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue")
            .field("name", &self.inner.name)
            .field("dead_letter", &self.inner.dead_letter)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl<B: Broker> WorkQueue<B> {
    /// Declares the queue `name` (qualified by [`Broker::qualify_queue_name`])
    /// and its dead-letter queue, as [`QueueSettings::default`] says (quorum
    /// queues). An empty name is [`QueueError::InvalidName`].
    pub async fn open(broker: B, name: &str) -> Result<Self, QueueError> {
        Self::open_with(broker, name, QueueSettings::default()).await
    }

    /// Like [`open`](Self::open), declaring the queues as `settings` says.
    /// A delivery limit on classic queues is [`QueueError::Broker`] with
    /// [`BrokerError::Invalid`].
    pub async fn open_with(
        broker: B,
        name: &str,
        settings: QueueSettings,
    ) -> Result<Self, QueueError> {
        if name.is_empty() {
            // The in-memory broker would declare a server-named queue the
            // work queue could never address again.
            return Err(QueueError::InvalidName {
                name: String::new(),
                reason: "a work queue needs a name",
            });
        }
        let full = broker.qualify_queue_name(name);
        let dead_letter = format!("{full}{DEAD_LETTER_SUFFIX}");
        let queue = WorkQueue {
            inner: Arc::new(QueueInner {
                broker,
                name: full,
                dead_letter,
                settings,
            }),
        };
        queue
            .declare()
            .await
            .map_err(|source| queue.error("declare", source))?;
        Ok(queue)
    }

    /// Declares the dead-letter queue, then the queue, which dead-letters
    /// into it through the default exchange.
    pub(crate) async fn declare(&self) -> Result<String, BrokerError> {
        let inner = &self.inner;
        let durable = QueueOptions {
            durable: true,
            queue_type: inner.settings.queue_type,
            ..QueueOptions::default()
        };
        inner
            .broker
            .declare_queue(&inner.dead_letter, durable.clone())
            .await?;
        let options = QueueOptions {
            dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
            dead_letter_routing_key: Some(inner.dead_letter.clone()),
            delivery_limit: inner.settings.delivery_limit,
            ..durable
        };
        inner.broker.declare_queue(&inner.name, options).await
    }

    /// How the queue and its dead-letter queue are declared.
    pub fn settings(&self) -> QueueSettings {
        self.inner.settings
    }

    pub(crate) fn error(&self, operation: &'static str, source: BrokerError) -> QueueError {
        QueueError::Broker {
            queue: self.inner.name.clone(),
            operation,
            source,
        }
    }

    /// The queue's full name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The full name of the dead-letter queue.
    pub fn dead_letter_queue(&self) -> &str {
        &self.inner.dead_letter
    }

    /// The broker the queue lives on.
    pub fn broker(&self) -> &B {
        &self.inner.broker
    }

    /// Puts a message into the queue, visible after `delay` (zero: at once;
    /// clamped to [`MAX_DELAY`]). Returns once the broker holds it.
    pub async fn put(&self, message: QueueMessage, delay: Duration) -> Result<(), QueueError> {
        if let Some(header) = message
            .headers
            .keys()
            .find(|name| name.to_ascii_lowercase().starts_with("x-"))
        {
            return Err(QueueError::InvalidHeader {
                queue: self.inner.name.clone(),
                header: header.clone(),
                reason: "`x-` headers are reserved by RabbitMQ",
            });
        }
        let outgoing = outgoing(message);
        self.inner
            .broker
            .publish_delayed(&self.inner.name, outgoing, delay)
            .await
            .map_err(|source| self.error("put", source))
    }

    /// Takes the next message, waiting up to `timeout` for one; `None` if
    /// none came. The message must then be deleted or released.
    pub async fn get(&self, timeout: Duration) -> Result<Option<QueuedMessage>, QueueError> {
        let broker = &self.inner.broker;
        let mut subscription = broker
            .consume(&self.inner.name, 1)
            .await
            .map_err(|source| self.error("get", source))?;
        match tokio::time::timeout(timeout, subscription.next()).await {
            Err(_elapsed) => Ok(None),
            Ok(Some(Ok(delivery))) => {
                let (received, acker) = Received::from_delivery(&self.inner.name, delivery);
                Ok(Some(QueuedMessage {
                    received,
                    acker,
                    _subscription: subscription,
                }))
            }
            Ok(Some(Err(source))) => Err(self.error("get", source)),
            Ok(None) => Err(self.error(
                "get",
                BrokerError::Connection("the subscription ended".to_owned()),
            )),
        }
    }

    /// Deletes (acknowledges) a message taken with [`get`](Self::get).
    pub async fn delete(&self, message: QueuedMessage) -> Result<(), QueueError> {
        message
            .acker
            .ack()
            .await
            .map_err(|source| self.error("delete", source))
    }

    /// Puts a message taken with [`get`](Self::get) back into the queue,
    /// visible after `delay` (clamped to [`MAX_DELAY`]), with its attempt
    /// count plus one.
    pub async fn release(&self, message: QueuedMessage, delay: Duration) -> Result<(), QueueError> {
        let to = Move::Release(delay);
        self.move_copy(&message.received, &*message.acker, to, None, false)
            .await
    }

    /// Moves a message taken with [`get`](Self::get) to the dead-letter
    /// queue, recording `error` in its [`LAST_ERROR_HEADER`].
    pub async fn dead_letter(&self, message: QueuedMessage, error: &str) -> Result<(), QueueError> {
        let to = Move::DeadLetter;
        self.move_copy(&message.received, &*message.acker, to, Some(error), false)
            .await
    }

    /// The messages waiting in the queue, oldest first (messages still
    /// waiting out a delay are not listed).
    pub async fn pending(&self) -> Result<Vec<PendingMessage>, QueueError> {
        self.inner
            .broker
            .pending(&self.inner.name)
            .await
            .map_err(|source| self.error("pending", source))
    }

    /// The messages in the dead-letter queue, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<PendingMessage>, QueueError> {
        self.inner
            .broker
            .pending(&self.inner.dead_letter)
            .await
            .map_err(|source| self.error("dead_letters", source))
    }

    /// Settles a message whose handler failed: with `retry_in`, releases it
    /// for another try after that delay; without, moves it to the
    /// dead-letter queue. Either way with its attempt count plus one and
    /// `error` in its [`LAST_ERROR_HEADER`].
    ///
    /// A failed move never turns into an uncounted, immediate redelivery:
    /// publishing the copy is tried [`MOVE_TRIES`] times (declaring a
    /// missing queue again in between); a release whose delayed copy still
    /// fails is held (unacknowledged) for its delay, at most [`MAX_HOLD`],
    /// and then published for at once instead, still counted. Only when that
    /// fails too is the message rejected, logged: a release back to the
    /// queue as it was (uncounted, after all that waiting), a dead-letter to
    /// the queue's dead-letter exchange (the dead-letter queue, without the
    /// last error).
    pub(crate) async fn settle_failure(
        &self,
        received: &Received,
        acker: &dyn AckHandle,
        retry_in: Option<Duration>,
        error: &str,
    ) -> Result<(), QueueError> {
        let to = retry_in.map_or(Move::DeadLetter, Move::Release);
        self.move_copy(received, acker, to, Some(error), true).await
    }

    /// Publishes a copy of a message where `to` says, with one more attempt
    /// (and `last_error`, if any) in its headers, then acknowledges the
    /// original. Publishing first means a crash in between duplicates the
    /// message rather than loses it. With `fall_back`, a failed publish is
    /// handled as [`settle_failure`](Self::settle_failure) says; without,
    /// it is only reported.
    async fn move_copy(
        &self,
        received: &Received,
        acker: &dyn AckHandle,
        to: Move,
        last_error: Option<&str>,
        fall_back: bool,
    ) -> Result<(), QueueError> {
        let mut copy = received.message.clone();
        copy.headers.insert(
            ATTEMPTS_HEADER.to_owned(),
            received.attempts.saturating_add(1).to_string(),
        );
        if let Some(error) = last_error {
            copy.headers
                .insert(LAST_ERROR_HEADER.to_owned(), error.to_owned());
        }
        let copy = outgoing(copy);
        let (target, delay) = match to {
            Move::Release(delay) => (&self.inner.name, delay),
            Move::DeadLetter => (&self.inner.dead_letter, Duration::ZERO),
        };
        let [publishing, acknowledging] = to.operations();
        let mut published = self.publish_copy(target, &copy, delay).await;
        if fall_back
            && !delay.is_zero()
            && let Err(error) = &published
        {
            let hold = delay.min(MAX_HOLD);
            tracing::warn!(queue = %self.inner.name, %error, ?hold, "publishing a delayed copy failed; holding the message, then releasing it at once");
            tokio::time::sleep(hold).await;
            published = self.publish_copy(target, &copy, Duration::ZERO).await;
        }
        match published {
            Ok(()) => acker
                .ack()
                .await
                .map_err(|source| self.error(acknowledging, source)),
            Err(source) => {
                if fall_back {
                    let requeue = matches!(to, Move::Release(_));
                    tracing::error!(queue = %self.inner.name, error = %source, requeue, "cannot {publishing} a failed message; rejecting it (requeued: uncounted; otherwise dead-lettered by the broker without its last error)");
                    if let Err(error) = acker.nack(requeue).await {
                        tracing::warn!(queue = %self.inner.name, %error, "rejecting the message failed; the broker redelivers it");
                    }
                }
                Err(self.error(publishing, source))
            }
        }
    }

    /// Publishes `copy` into `target` after `delay`, up to [`MOVE_TRIES`]
    /// times, waiting [`MOVE_RETRY_WAIT`] (doubling) in between; a missing
    /// queue is declared again (with its partner) before the next try.
    async fn publish_copy(
        &self,
        target: &str,
        copy: &OutgoingMessage,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        let mut wait = MOVE_RETRY_WAIT;
        let mut tries = 1;
        loop {
            let published = self
                .inner
                .broker
                .publish_delayed(target, copy.clone(), delay)
                .await;
            let Err(error) = &published else {
                return published;
            };
            if tries >= MOVE_TRIES {
                return published;
            }
            tracing::warn!(queue = %self.inner.name, target, %error, retry_in = ?wait, "publishing a message's copy failed; trying again");
            if matches!(error, BrokerError::QueueNotFound(_))
                && let Err(error) = self.declare().await
            {
                tracing::warn!(queue = %self.inner.name, %error, "declaring the queues again failed");
            }
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2);
            tries += 1;
        }
    }

    /// A handler running `handle` for each message of the queue, with the
    /// default [`HandlerOptions`]; start it with [`QueueHandler::start`].
    pub fn handler<F, Fut>(&self, handle: F) -> QueueHandler<B>
    where
        F: Fn(Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.build_handler(HandlerOptions::default(), handle)
    }

    /// A handler with the given options.
    pub fn handler_with<F, Fut>(
        &self,
        options: HandlerOptions,
        handle: F,
    ) -> Result<QueueHandler<B>, QueueError>
    where
        F: Fn(Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        if options.concurrency == 0 {
            return Err(QueueError::InvalidOption {
                queue: self.inner.name.clone(),
                reason: "concurrency must be at least 1".to_owned(),
            });
        }
        if options.max_attempts == Some(0) {
            return Err(QueueError::InvalidOption {
                queue: self.inner.name.clone(),
                reason: "max_attempts must be at least 1".to_owned(),
            });
        }
        Ok(self.build_handler(options, handle))
    }

    fn build_handler<F, Fut>(&self, options: HandlerOptions, handle: F) -> QueueHandler<B>
    where
        F: Fn(Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let config = RunnerConfig {
            prefetch: options.concurrency.max(1),
            max_in_flight: usize::from(options.concurrency.max(1)),
            drain_timeout: options.drain_timeout,
            ..RunnerConfig::default()
        };
        let dispatch = Arc::new(QueueDispatch {
            queue: self.clone(),
            options,
            handle: Box::new(move |received| Box::pin(handle(received))),
        });
        QueueHandler {
            runner: Runner::owned(self.inner.broker.clone(), dispatch, config),
            queue: self.inner.name.clone(),
        }
    }
}

fn outgoing(message: QueueMessage) -> OutgoingMessage {
    OutgoingMessage {
        body: message.body,
        content_type: None,
        message_id: message.message_id,
        persistent: true,
        headers: message.headers,
        cc: Vec::new(),
    }
}

type HandleFn = Box<dyn Fn(Received) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;

struct QueueDispatch<B: Broker> {
    queue: WorkQueue<B>,
    options: HandlerOptions,
    handle: HandleFn,
}

impl<B: Broker> Dispatch for QueueDispatch<B> {
    fn prepare(&self) -> BoxFuture<'_, Result<String, BrokerError>> {
        Box::pin(self.queue.declare())
    }

    fn process(
        self: Arc<Self>,
        delivery: Delivery,
        mut interrupt: Interrupt,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let queue = self.queue.name().to_owned();
            let (received, acker) = Received::from_delivery(&queue, delivery);
            let outcome = tokio::select! {
                outcome = run_caught(|| (self.handle)(received.clone())) => outcome,
                () = interrupt.interrupted() => {
                    tracing::warn!(%queue, "handler interrupted by stop; returning the message");
                    if let Err(error) = acker.nack(true).await {
                        tracing::warn!(%queue, %error, "returning the message failed");
                    }
                    return;
                }
            };
            let settled = match outcome.err() {
                None => acker
                    .ack()
                    .await
                    .map_err(|source| self.queue.error("delete", source)),
                Some(error) => {
                    let attempts = received.attempts.saturating_add(1);
                    let retry_in = if self.options.max_attempts.is_some_and(|max| attempts >= max) {
                        tracing::error!(%queue, %error, attempts, "handler failed for the last time; dead-lettering");
                        None
                    } else {
                        let delay = self.options.backoff.delay(received.attempts);
                        tracing::warn!(%queue, %error, retry_in = ?delay, "handler failed; releasing");
                        Some(delay)
                    };
                    self.queue
                        .settle_failure(&received, &*acker, retry_in, &error)
                        .await
                }
            };
            if let Err(error) = settled {
                // Rejected by `settle_failure`, or (an acknowledgement
                // failed) redelivered by the broker: handled at least once.
                tracing::warn!(%error, "settling a message failed");
            }
        })
    }
}

/// Runs a function for each message of a queue; see [`WorkQueue::handler`].
/// Dropping a running handler stops it.
pub struct QueueHandler<B: Broker> {
    runner: OwnedRunner<B, QueueDispatch<B>>,
    queue: String,
}

impl<B: Broker> QueueHandler<B> {
    /// Starts handling; returns once subscribed. Safe to call while running.
    pub async fn start(&self) -> Result<(), QueueError> {
        self.runner
            .start()
            .await
            .map_err(|source| QueueError::Broker {
                queue: self.queue.clone(),
                operation: "start",
                source,
            })
    }

    /// Stops taking messages; running handlers finish. An error if not running.
    pub fn stop(&self) -> Result<(), QueueError> {
        self.runner
            .stop()
            .map_err(|NotRunning| QueueError::NotRunning {
                queue: self.queue.clone(),
            })
    }

    /// Resolves once the handler has stopped (at once if not running).
    pub async fn wait(&self) {
        self.runner.wait().await;
    }

    /// Whether the handler is running (started and not asked to stop).
    pub fn is_running(&self) -> bool {
        self.runner.is_running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (0..6).map(|a| backoff.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn backoff_never_exceeds_the_longest_broker_delay() {
        let unbounded = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::MAX,
        };
        assert_eq!(unbounded.delay(10), Duration::from_secs(1024));
        assert_eq!(unbounded.delay(31), MAX_DELAY);
        let sixty_days = Duration::from_secs(60 * 86_400);
        let long = Backoff {
            base: sixty_days,
            cap: sixty_days,
        };
        assert_eq!(long.delay(0), MAX_DELAY);
    }

    #[test]
    fn attempts_header_is_read_and_garbage_counts_zero() {
        let mut headers = BTreeMap::new();
        assert_eq!(parse_attempts("q", &headers), 0);
        headers.insert(ATTEMPTS_HEADER.to_owned(), "3".to_owned());
        assert_eq!(parse_attempts("q", &headers), 3);
        headers.insert(ATTEMPTS_HEADER.to_owned(), "three".to_owned());
        assert_eq!(parse_attempts("q", &headers), 0);
    }
}
