//! Consuming typed messages: bind typed bindings to a queue and run a handler
//! for every delivery.
//!
//! ```no_run
//! # use exchange_runtime::{Binding, Decode, DecodeError, Exchange, Message, RoutingKeyWord};
//! # use exchange_runtime::consumer::{ConsumerBuilder, DeliveryInfo, HandlerError};
//! # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)] struct Msg { id: String }
//! # impl Message for Msg { const SCHEMA_ID: &'static str = "m"; const SCHEMA: &'static str = "{}"; }
//! # #[derive(Debug, Clone, Default)] struct Bound { worker_type: Option<String> }
//! # impl Exchange for Bound { type Message = Msg; const EXCHANGE: &'static str = "exchange/x";
//! #   const ENTRY: &'static str = "x"; const ROUTING_KEY: &'static [RoutingKeyWord] = &[]; }
//! # impl Binding for Bound { fn word_values(&self) -> Vec<Option<&str>> { vec![] }
//! #   fn from_word_values(_: Vec<Option<String>>) -> Self { Bound::default() } }
//! # async fn run<B: exchange_runtime::Broker>(broker: B) -> Result<(), Box<dyn std::error::Error>> {
//! let consumer = ConsumerBuilder::new(broker)
//!     .queue("task-watcher")
//!     .bind(Bound { worker_type: Some("gaia".into()) })?
//!     .prefetch(10)
//!     .build(|message: Result<Msg, DecodeError>, info: DeliveryInfo| async move {
//!         let message = message?; // undecodable: requeued once, then dead-lettered
//!         println!("{} via {}: {message:?}", info.exchange, info.routing_key);
//!         Ok::<(), HandlerError>(())
//!     })?;
//! consumer.start().await?;
//! // ... later
//! consumer.stop()?;
//! consumer.wait().await;
//! # Ok(()) }
//! ```
//!
//! # Delivery semantics
//!
//! - **Manual acknowledgement** (the default, [`AckMode::Manual`]): a delivery
//!   is acknowledged only after its handler returned `Ok`. A handler error, a
//!   panic, or a body that does not decode (the handler sees the
//!   [`DecodeError`] first) requeues the message once — when it was not
//!   redelivered already — and otherwise rejects it to the queue's dead-letter
//!   queue (`<queue>.dead`; see [`Consumer::dead_letter_queue`]). The
//!   consumer keeps going either way. Messages are delivered at least once:
//!   a handler may see the same message again after a failure or a
//!   reconnection.
//! - **Automatic acknowledgement** ([`AckMode::Auto`]): a delivery is
//!   acknowledged as it arrives, before its handler runs; failures are only
//!   logged (at most once).
//! - **Flow control**: at most `prefetch` unacknowledged deliveries are pushed
//!   by the broker, and at most `max_in_flight` handlers run at once (default:
//!   the prefetch). A handler that finishes without waiting runs in the
//!   consumer's own task (no task spawned for it); one that waits goes on in
//!   a task of its own. Handlers run on the tokio runtime: blocking work
//!   belongs in `tokio::task::spawn_blocking`, or it holds up the consumer's
//!   other deliveries meanwhile.
//! - **Reconnection**: when the broker's delivery stream fails, the consumer
//!   declares its queue and bindings again and resubscribes, with exponential
//!   backoff (100 ms doubling to 30 s), until it is stopped.
//! - **Stopping** ([`Consumer::stop`]): no new deliveries are taken; handlers
//!   in flight finish and settle their deliveries; deliveries the broker had
//!   pushed ahead go back to the queue. With a
//!   [drain timeout](ConsumerBuilder::drain_timeout), handlers still running
//!   after it are dropped and their deliveries requeued.
//!
//! # Queues
//!
//! A named queue ([`ConsumerBuilder::queue`]) is durable, named
//! [`Broker::qualify_queue_name`] of the name (`queue/<user>/<name>` on
//! Pulse), and survives the consumer: messages published while it is stopped
//! wait for it. Its dead-letter queue is `<full name>.dead`, also durable.
//! Without a name the queue is exclusive and auto-deleted (messages published
//! while no consumer runs are lost), with an exclusive dead-letter queue of a
//! broker-chosen name; each start declares fresh ones.

mod runner;

pub(crate) use runner::{Dispatch, Interrupt, NotRunning, OwnedRunner, Runner, RunnerConfig};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;

use crate::binding::{Binding, Decode, DecodeError, ExchangeNames};
use crate::broker::{
    BoxFuture, Broker, BrokerError, DEFAULT_EXCHANGE, Delivery, ExchangeOptions, QueueOptions,
};
use crate::routing::{self, RoutingKeyError, RoutingKeyWord};

/// The prefix of the CC routing keys Taskcluster adds for a task's `routes`.
pub const ROUTE_PREFIX: &str = "route.";

/// The suffix of a named queue's dead-letter queue.
pub const DEAD_LETTER_SUFFIX: &str = ".dead";

/// The prefetch used when none is given.
pub const DEFAULT_PREFETCH: u16 = 5;

/// Values of a delivery's routing-key words, by word name (`taskId`), one per
/// non-constant word; `None` for a word without a value (`_`).
pub type RoutingFields = BTreeMap<&'static str, Option<String>>;

/// Facts about a delivery, handed to the handler with the decoded message.
#[derive(Debug, Clone)]
pub struct DeliveryInfo {
    /// The exchange the message was published to, by its reference name
    /// (the name on the broker may differ: [`ConsumerBuilder::exchange_names`]).
    pub exchange: String,
    /// The (primary) routing key it was published with.
    pub routing_key: String,
    /// The routing key parsed with the routing-key reference of the binding
    /// bound for this exchange. Empty for an exchange bound with a raw
    /// pattern ([`ConsumerBuilder::bind_pattern`]); an error when the key
    /// does not follow the reference.
    pub fields: Result<RoutingFields, RoutingKeyError>,
    /// Whether the broker delivered this message before (and it was not acknowledged).
    pub redelivered: bool,
    /// The task-specific routes the message was CC'd to, **without** the
    /// `route.` prefix, as they appear in a task's `routes` (`notify.by-email`
    /// for the CC key `route.notify.by-email`). CC keys without the prefix are
    /// only in [`cc`](Self::cc).
    pub routes: Vec<String>,
    /// Every CC routing key, as published (with `route.` prefixes).
    pub cc: Vec<String>,
    /// The message's id, stable across a publisher's retries: a message that
    /// a lost connection made the broker receive twice arrives twice with the
    /// same id, so handlers can deduplicate by it. Both brokers give every
    /// message they publish one; `None` only from other publishers.
    pub message_id: Option<String>,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
}

impl DeliveryInfo {
    /// The value of a routing-key word (`"workerType"`), if the key parsed and the word has one.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.as_ref().ok()?.get(name)?.as_deref()
    }

    /// The routing key parsed into a binding struct of `Bd`'s exchange;
    /// `None` when the message came from another exchange.
    pub fn binding<Bd: Binding>(&self) -> Option<Result<Bd, RoutingKeyError>> {
        (self.exchange == Bd::EXCHANGE).then(|| Bd::parse_routing_key(&self.routing_key))
    }
}

/// An error returned by a handler: any error type converts into it with `?`.
pub struct HandlerError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl HandlerError {
    /// An error from a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        HandlerError(message.to_string().into())
    }

    /// The underlying error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError(Box::new(error))
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Handles decoded deliveries. Implemented for every
/// `Fn(Result<M, DecodeError>, DeliveryInfo) -> impl Future<Output = Result<(), HandlerError>>`.
pub trait Handler<M>: Send + Sync + 'static {
    /// Handles one delivery: `Ok` acknowledges it (in manual-ack mode), an
    /// error requeues it once and then dead-letters it.
    fn handle(
        &self,
        message: Result<M, DecodeError>,
        info: DeliveryInfo,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<M, F, Fut> Handler<M> for F
where
    F: Fn(Result<M, DecodeError>, DeliveryInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        message: Result<M, DecodeError>,
        info: DeliveryInfo,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(message, info)
    }
}

/// A [`Handler`] behind a pointer (the trait has an `impl Future` method, so
/// is not object safe itself).
trait DynHandler<M>: Send + Sync + 'static {
    fn call(
        &self,
        message: Result<M, DecodeError>,
        info: DeliveryInfo,
    ) -> BoxFuture<'_, Result<(), HandlerError>>;
}

impl<M: Send + 'static, H: Handler<M>> DynHandler<M> for H {
    fn call(
        &self,
        message: Result<M, DecodeError>,
        info: DeliveryInfo,
    ) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(self.handle(message, info))
    }
}

/// When deliveries are acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AckMode {
    /// After the handler returned `Ok`; failures are requeued once, then dead-lettered.
    #[default]
    Manual,
    /// On arrival, before the handler runs; failures are logged and the message is gone.
    Auto,
}

/// A consumer could not be built, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// A binding's routing-key pattern could not be built.
    #[error("cannot bind: {0}")]
    RoutingKey(#[from] RoutingKeyError),
    /// A builder option is out of range.
    #[error("invalid consumer option: {0}")]
    InvalidOption(String),
    /// The broker refused a declaration or the subscription.
    #[error("consumer of queue `{queue}`: {source}")]
    Broker {
        /// The queue (as named to the builder, or `(unnamed)`).
        queue: String,
        /// The broker's error.
        source: BrokerError,
    },
    /// [`Consumer::stop`] was called while the consumer was not running.
    #[error("consumer of queue `{queue}` is not running")]
    NotRunning {
        /// The queue (as named to the builder, or `(unnamed)`).
        queue: String,
    },
}

#[derive(Debug, Clone)]
struct BoundPattern {
    exchange: String,
    pattern: String,
    /// The exchange's routing-key reference, for parsing delivered keys
    /// (`None` for raw patterns).
    words: Option<&'static [RoutingKeyWord]>,
}

/// Configures a [`Consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerBuilder<B: Broker> {
    broker: B,
    queue: Option<String>,
    bindings: Vec<BoundPattern>,
    prefetch: u16,
    max_in_flight: Option<usize>,
    ack_mode: AckMode,
    drain_timeout: Option<Duration>,
    names: ExchangeNames,
}

impl<B: Broker> ConsumerBuilder<B> {
    /// A builder for a consumer on `broker`, with an unnamed queue, no bindings,
    /// prefetch 5 and manual acknowledgement.
    pub fn new(broker: B) -> Self {
        ConsumerBuilder {
            broker,
            queue: None,
            bindings: Vec::new(),
            prefetch: DEFAULT_PREFETCH,
            max_in_flight: None,
            ack_mode: AckMode::Manual,
            drain_timeout: None,
            names: ExchangeNames::new(),
        }
    }

    /// Uses the named, durable queue `name` (qualified by
    /// [`Broker::qualify_queue_name`]) instead of an exclusive unnamed one.
    pub fn queue(mut self, name: impl Into<String>) -> Self {
        self.queue = Some(name.into());
        self
    }

    /// Binds the queue to the binding's exchange with its routing-key
    /// pattern; unset values match anything.
    pub fn bind<Bd: Binding>(mut self, binding: Bd) -> Result<Self, RoutingKeyError> {
        let pattern = binding.pattern()?;
        self.bindings.push(BoundPattern {
            exchange: Bd::EXCHANGE.to_owned(),
            pattern,
            words: Some(Bd::ROUTING_KEY),
        });
        Ok(self)
    }

    /// Binds the queue to an exchange with a raw routing-key pattern, for
    /// exchanges without a generated binding; their deliveries have no
    /// parsed [`fields`](DeliveryInfo::fields).
    pub fn bind_pattern(mut self, exchange: impl Into<String>, pattern: impl Into<String>) -> Self {
        self.bindings.push(BoundPattern {
            exchange: exchange.into(),
            pattern: pattern.into(),
            words: None,
        });
        self
    }

    /// Consumes from the exchanges under the broker names `names` gives
    /// them instead of their reference names (for every binding, those of
    /// [`bind_pattern`](Self::bind_pattern) too). Handlers still see the
    /// reference name in [`DeliveryInfo::exchange`].
    pub fn exchange_names(mut self, names: ExchangeNames) -> Self {
        self.names = names;
        self
    }

    /// How many unacknowledged deliveries the broker may push ahead (at least 1; default 5).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// How many handlers may run at once (at least 1; default: the prefetch).
    pub fn max_in_flight(mut self, handlers: usize) -> Self {
        self.max_in_flight = Some(handlers);
        self
    }

    /// When deliveries are acknowledged (default [`AckMode::Manual`]).
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.ack_mode = mode;
        self
    }

    /// How long [`Consumer::stop`] lets handlers in flight finish before
    /// dropping them and requeueing their deliveries (default: no limit).
    pub fn drain_timeout(mut self, limit: Duration) -> Self {
        self.drain_timeout = Some(limit);
        self
    }

    /// Builds the consumer with a closure handler. The closure's message type
    /// is either one [`Message`](crate::Message) type or a service's enum of messages.
    pub fn build<M, F, Fut>(self, handler: F) -> Result<Consumer<B, M>, ConsumerError>
    where
        M: Decode,
        F: Fn(Result<M, DecodeError>, DeliveryInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send,
    {
        self.build_handler(handler)
    }

    /// Builds the consumer with a [`Handler`] implementation.
    pub fn build_handler<M, H>(self, handler: H) -> Result<Consumer<B, M>, ConsumerError>
    where
        M: Decode,
        H: Handler<M>,
    {
        if self.prefetch == 0 {
            return Err(ConsumerError::InvalidOption(
                "prefetch must be at least 1 (0 would mean unlimited)".to_owned(),
            ));
        }
        if self.max_in_flight == Some(0) {
            return Err(ConsumerError::InvalidOption(
                "max_in_flight must be at least 1".to_owned(),
            ));
        }
        if self.queue.is_none() && self.bindings.is_empty() {
            return Err(ConsumerError::InvalidOption(
                "an unnamed queue without bindings would never receive a message".to_owned(),
            ));
        }
        if self.queue.as_deref() == Some("") {
            return Err(ConsumerError::InvalidOption(
                "the queue name is empty (leave it unset for an unnamed queue)".to_owned(),
            ));
        }
        let mut references = HashMap::new();
        for bound in &self.bindings {
            let broker_name = self.names.broker_name(&bound.exchange);
            let reference = references.entry(broker_name).or_insert(&bound.exchange);
            if *reference != &bound.exchange {
                return Err(ConsumerError::InvalidOption(format!(
                    "exchanges `{reference}` and `{}` are both bound under the broker name `{broker_name}`: their deliveries could not be told apart",
                    bound.exchange
                )));
            }
        }
        let mut words = HashMap::new();
        for bound in &self.bindings {
            let entry = words.entry(bound.exchange.clone()).or_insert(None);
            if entry.is_none() {
                *entry = bound.words;
            }
        }
        let config = RunnerConfig {
            prefetch: self.prefetch,
            max_in_flight: self
                .max_in_flight
                .unwrap_or(usize::from(self.prefetch))
                .min(u32::MAX as usize),
            drain_timeout: self.drain_timeout,
            ..RunnerConfig::default()
        };
        let label = self.queue.clone().unwrap_or_else(|| "(unnamed)".to_owned());
        let dispatch = Arc::new(ConsumerDispatch {
            broker: self.broker.clone(),
            queue: self.queue,
            bindings: self.bindings,
            words,
            names: self.names,
            ack_mode: self.ack_mode,
            handler: Box::new(handler),
            dead_letter_queue: Mutex::new(None),
            _message: PhantomData,
        });
        Ok(Consumer {
            runner: Runner::owned(self.broker, dispatch, config),
            label,
        })
    }
}

/// A running (or startable) consumer of one queue; see the [module docs](self).
///
/// Dropping a running consumer stops it; its in-flight handlers still finish
/// in the background.
pub struct Consumer<B: Broker, M: Decode> {
    runner: OwnedRunner<B, ConsumerDispatch<B, M>>,
    label: String,
}

impl<B: Broker, M: Decode> Consumer<B, M> {
    /// Declares the queue (and its dead-letter queue), checks that the bound
    /// exchanges exist, binds, and starts consuming; returns once deliveries
    /// flow. Calling it while running does nothing; while a stop is in
    /// progress, it waits for the stop to finish and starts again.
    pub async fn start(&self) -> Result<(), ConsumerError> {
        self.runner
            .start()
            .await
            .map_err(|source| ConsumerError::Broker {
                queue: self.label.clone(),
                source,
            })
    }

    /// Stops taking deliveries; handlers in flight finish and settle. Returns
    /// at once — [`wait`](Self::wait) tells when the consumer has stopped.
    /// An error if the consumer is not running.
    pub fn stop(&self) -> Result<(), ConsumerError> {
        self.runner
            .stop()
            .map_err(|NotRunning| ConsumerError::NotRunning {
                queue: self.label.clone(),
            })
    }

    /// Resolves once the consumer is stopped (at once if it is not running).
    pub async fn wait(&self) {
        self.runner.wait().await;
    }

    /// Whether the consumer is running (started and not asked to stop).
    pub fn is_running(&self) -> bool {
        self.runner.is_running()
    }

    /// The full name of the consumed queue, once started.
    pub fn queue_name(&self) -> Option<String> {
        self.runner.queue_name()
    }

    /// The full name of the dead-letter queue, once started.
    pub fn dead_letter_queue(&self) -> Option<String> {
        self.runner
            .dispatch()
            .dead_letter_queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

struct ConsumerDispatch<B: Broker, M> {
    broker: B,
    queue: Option<String>,
    bindings: Vec<BoundPattern>,
    words: HashMap<String, Option<&'static [RoutingKeyWord]>>,
    names: ExchangeNames,
    ack_mode: AckMode,
    handler: Box<dyn DynHandler<M>>,
    dead_letter_queue: Mutex<Option<String>>,
    _message: PhantomData<fn() -> M>,
}

impl<B: Broker, M: Decode> ConsumerDispatch<B, M> {
    async fn declare(&self) -> Result<String, BrokerError> {
        let mut checked = Vec::new();
        for bound in &self.bindings {
            let exchange = self.names.broker_name(&bound.exchange);
            if !checked.contains(&exchange) {
                // Passive: consumers (on Pulse) may not create exchanges, only use them.
                let options = ExchangeOptions {
                    passive: true,
                    durable: true,
                };
                self.broker.declare_exchange(exchange, options).await?;
                checked.push(exchange);
            }
        }
        let (queue, dead_letter) = match &self.queue {
            Some(name) => {
                let queue = self.broker.qualify_queue_name(name);
                let dead_letter = format!("{queue}{DEAD_LETTER_SUFFIX}");
                let queue = declare_durable(&self.broker, &queue, &dead_letter).await?;
                (queue, dead_letter)
            }
            None => {
                let exclusive = QueueOptions {
                    exclusive: true,
                    ..QueueOptions::default()
                };
                let dead_letter = self.broker.declare_queue("", exclusive).await?;
                let options = QueueOptions {
                    exclusive: true,
                    auto_delete: true,
                    dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
                    dead_letter_routing_key: Some(dead_letter.clone()),
                    ..QueueOptions::default()
                };
                let queue = self.broker.declare_queue("", options).await?;
                (queue, dead_letter)
            }
        };
        for bound in &self.bindings {
            let exchange = self.names.broker_name(&bound.exchange);
            self.broker
                .bind_queue(&queue, exchange, &bound.pattern)
                .await?;
        }
        *self
            .dead_letter_queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(dead_letter);
        Ok(queue)
    }

    /// The handler's facts about a delivery, its strings moved out of it
    /// (the delivery keeps what settling it needs).
    fn info(&self, delivery: &mut Delivery) -> DeliveryInfo {
        let fields = match self.words.get(&delivery.exchange).copied().flatten() {
            Some(words) => parse_fields(&delivery.exchange, words, &delivery.routing_key),
            None => Ok(RoutingFields::new()),
        };
        let cc = std::mem::take(&mut delivery.cc);
        DeliveryInfo {
            exchange: delivery.exchange.clone(),
            routing_key: delivery.routing_key.clone(),
            fields,
            redelivered: delivery.redelivered,
            routes: cc
                .iter()
                .filter_map(|key| key.strip_prefix(ROUTE_PREFIX))
                .map(str::to_owned)
                .collect(),
            cc,
            message_id: delivery.message_id.take(),
            headers: std::mem::take(&mut delivery.headers),
        }
    }
}

/// Parses a routing key into its non-constant words' values.
fn parse_fields(
    exchange: &str,
    words: &'static [RoutingKeyWord],
    key: &str,
) -> Result<RoutingFields, RoutingKeyError> {
    let values = routing::parse_key(exchange, words, key)?;
    // Inserted one by one: collecting would sort a vector of them first.
    let mut fields = RoutingFields::new();
    for (word, value) in words.iter().zip(values) {
        if word.constant.is_none() {
            fields.insert(word.name, value);
        }
    }
    Ok(fields)
}

/// Declares the durable queue `queue` (a full name) and its durable
/// dead-letter queue `dead_letter`, which the broker's default exchange
/// feeds with the messages `queue` rejects; returns the queue's name.
pub(crate) async fn declare_durable<B: Broker>(
    broker: &B,
    queue: &str,
    dead_letter: &str,
) -> Result<String, BrokerError> {
    let durable = QueueOptions {
        durable: true,
        ..QueueOptions::default()
    };
    broker.declare_queue(dead_letter, durable.clone()).await?;
    let options = QueueOptions {
        dead_letter_exchange: Some(DEFAULT_EXCHANGE.to_owned()),
        dead_letter_routing_key: Some(dead_letter.to_owned()),
        ..durable
    };
    broker.declare_queue(queue, options).await
}

/// Calls a handler (`call` makes its future) and runs that future to its
/// end: `Ok`, or the text of its error or panic (`handler panicked: ...`),
/// as a failed attempt is logged and recorded. The call is caught too: a
/// handler may panic before it returns its future.
pub(crate) async fn run_caught<Fut>(call: impl FnOnce() -> Fut) -> Result<(), String>
where
    Fut: Future<Output = Result<(), HandlerError>>,
{
    match AssertUnwindSafe(async move { call().await })
        .catch_unwind()
        .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panic) => Err(format!("handler panicked: {}", panic_message(&*panic))),
    }
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(non-text panic payload)".to_owned()
    }
}

impl<B: Broker, M: Decode> Dispatch for ConsumerDispatch<B, M> {
    fn prepare(&self) -> BoxFuture<'_, Result<String, BrokerError>> {
        Box::pin(self.declare())
    }

    fn process(
        self: Arc<Self>,
        delivery: Delivery,
        mut interrupt: Interrupt,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut delivery = delivery;
            if !self.names.is_empty() {
                // Handlers, decoding and parsing know exchanges by reference name.
                delivery.exchange = self.names.reference_name(&delivery.exchange).to_owned();
            }
            let message = M::decode(&delivery.exchange, &delivery.body);
            // The body is decoded: free it before the handler runs.
            delivery.body = Vec::new();
            let info = self.info(&mut delivery);
            let exchange = std::mem::take(&mut delivery.exchange);
            let routing_key = std::mem::take(&mut delivery.routing_key);
            let mut delivery = Some(delivery);
            if self.ack_mode == AckMode::Auto
                && let Some(delivery) = delivery.take()
                && let Err(error) = delivery.ack().await
            {
                tracing::warn!(%exchange, %routing_key, %error, "auto-acknowledging failed");
            }
            let outcome = tokio::select! {
                outcome = run_caught(|| self.handler.call(message, info)) => outcome,
                () = interrupt.interrupted() => {
                    if let Some(delivery) = delivery {
                        tracing::warn!(%exchange, %routing_key, "handler interrupted by stop; requeueing");
                        if let Err(error) = delivery.nack(true).await {
                            tracing::warn!(%exchange, %routing_key, %error, "requeueing failed");
                        }
                    }
                    return;
                }
            };
            let Some(delivery) = delivery else {
                if let Err(error) = outcome {
                    tracing::error!(%exchange, %routing_key, %error, "handler failed (auto-ack: message dropped)");
                }
                return;
            };
            let settled = match outcome {
                Ok(()) => delivery.ack().await,
                Err(error) if delivery.redelivered => {
                    tracing::error!(%exchange, %routing_key, %error, "handler failed again; dead-lettering");
                    delivery.nack(false).await
                }
                Err(error) => {
                    tracing::warn!(%exchange, %routing_key, %error, "handler failed; requeueing once");
                    delivery.nack(true).await
                }
            };
            if let Err(error) = settled {
                // The broker redelivers what it did not see settled.
                tracing::warn!(%exchange, %routing_key, %error, "settling the delivery failed");
            }
        })
    }
}
