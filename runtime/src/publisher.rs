//! Publishing typed messages, validated against their schema, with publisher
//! confirms and retries across reconnections.
//!
//! A message is serialized once, its bytes checked against [`Message::SCHEMA`]
//! (nothing is sent if it breaks the schema), and published persistent as
//! `application/json` with the binding's concrete routing key. Task-specific
//! routes are added as CC routing keys `route.<route>`.
//! [`Publisher::publish`] returns only once the broker confirmed the message;
//! connection failures and unconfirmed publishes are retried with
//! exponential backoff until a deadline, under one message id: a copy still
//! waiting for its confirm is waited for, not sent again, but a copy whose
//! connection died may have reached the broker, so a message can reach
//! consumers twice (at-least-once) — with the same
//! [`message_id`](crate::consumer::DeliveryInfo::message_id), to deduplicate by.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::binding::{Binding, ExchangeNames, Message};
use crate::broker::{Broker, BrokerError, ExchangeOptions, OutgoingMessage};
use crate::consumer::ROUTE_PREFIX;
use crate::deadline;
use crate::routing::{MAX_ROUTING_KEY_LEN, RoutingKeyError};
use crate::validate::{self, ValidationError};

/// Retry timing of a [`Publisher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublisherOptions {
    /// How long one `publish` call keeps retrying before it gives up.
    /// Default 30 s. An attempt under way when it passes is not cut short:
    /// the broker bounds it (`AmqpConfig::with_operation_timeout`) and says
    /// what became of the message (never sent, or sent but unconfirmed).
    pub deadline: Duration,
    /// First wait before a retry; doubled after each failure. Default 100 ms.
    pub initial_backoff: Duration,
    /// Longest wait between retries. Default 5 s.
    pub max_backoff: Duration,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            deadline: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A message could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The binding has no valid concrete routing key (e.g. a required word is unset).
    #[error("{0}")]
    RoutingKey(#[from] RoutingKeyError),
    /// The message breaks its schema; nothing was sent.
    #[error("publish to exchange `{exchange}` with key `{routing_key}` refused: {source}")]
    InvalidMessage {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// Every violation, with its JSON pointer.
        source: ValidationError,
    },
    /// A route cannot be a CC routing key; nothing was sent.
    #[error(
        "publish to exchange `{exchange}` with key `{routing_key}` refused: route `{route}` {reason}"
    )]
    InvalidRoute {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The offending route, as given.
        route: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The broker failed, after retries where retrying could help.
    #[error(
        "publish to exchange `{exchange}` with key `{routing_key}` failed after {attempts} attempt(s): {source}"
    )]
    Broker {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// How many times it was tried.
        attempts: u32,
        /// The last error.
        source: BrokerError,
    },
}

/// Publishes typed messages; see the [module docs](self). Cheap to share by reference.
#[derive(Debug)]
pub struct Publisher<B: Broker> {
    broker: B,
    options: PublisherOptions,
    /// Per exchange, its declaration: done once however many first
    /// publishes race (they wait for the one declaring; a failed one is tried again).
    declared: Mutex<HashMap<&'static str, Arc<Declaration>>>,
    /// The size of the last body serialized: the next one's buffer starts that
    /// large, instead of growing through several copies.
    body_size_hint: AtomicUsize,
    /// Where the bindings' exchanges are on the broker.
    names: ExchangeNames,
}

impl<B: Broker> Publisher<B> {
    /// A publisher with the default [`PublisherOptions`].
    pub fn new(broker: B) -> Self {
        Self::with_options(broker, PublisherOptions::default())
    }

    /// A publisher with the given retry timing.
    pub fn with_options(broker: B, options: PublisherOptions) -> Self {
        Publisher {
            broker,
            options,
            declared: Mutex::new(HashMap::new()),
            body_size_hint: AtomicUsize::new(0),
            names: ExchangeNames::new(),
        }
    }

    /// Publishes to the exchanges under the broker names `names` gives them
    /// (declaring them under those names) instead of their reference names.
    pub fn with_exchange_names(mut self, names: ExchangeNames) -> Self {
        self.names = names;
        self
    }

    /// The broker published to.
    pub fn broker(&self) -> &B {
        &self.broker
    }

    /// Publishes `message` on the binding's exchange with its concrete
    /// routing key; returns once the broker confirmed it.
    pub fn publish<Bd: Binding>(
        &self,
        binding: &Bd,
        message: &Bd::Message,
    ) -> impl Future<Output = Result<(), PublishError>> {
        self.publish_with_routes(binding, message, &[])
    }

    /// Publishes like [`publish`](Self::publish), CC'd to each route as
    /// `route.<route>`. Routes are given without the `route.` prefix, as in
    /// a task's `routes` (`notify.by-email`).
    ///
    /// (A plain function returning an `async move` block: an `async fn`
    /// would keep each argument twice in the future, which lives as long as
    /// the publish is in flight.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps each argument twice"
    )]
    pub fn publish_with_routes<Bd: Binding>(
        &self,
        binding: &Bd,
        message: &Bd::Message,
        routes: &[&str],
    ) -> impl Future<Output = Result<(), PublishError>> {
        async move {
            // The deadline of the retries starts now.
            let started = Instant::now();
            let routing_key = binding.routing_key()?;
            let exchange = self.names.broker_name(Bd::EXCHANGE);
            // One id for every retry of this call: consumers can deduplicate by it.
            let message_id = uuid::Uuid::new_v4();
            let serialized = self.serialized(exchange, &routing_key, message, routes)?;
            // A retry (rare) serializes the body again: the same bytes, and no
            // second copy of them kept by every publish in flight. (Made where
            // it is needed: nothing for retries takes room in the future of a
            // publish in flight.)
            macro_rules! again {
                ($routing_key:expr) => {
                    || self.outgoing(exchange, $routing_key, message, routes, message_id)
                };
            }
            // Every path but the common one is boxed, and whole values are
            // moved (never taken apart) before an await: the future of a
            // publish in flight only has room for what that needs.
            let mut held = (serialized, message_id);
            let mut failed = None;
            if !self.declared(Bd::EXCHANGE) {
                (held, failed) = Box::pin(self.declared_for(Bd::EXCHANGE, held)).await;
            }
            let first = Self::message(held);
            if let Some(error) = failed {
                let first = Some(first);
                let retry = self.send(
                    Bd::EXCHANGE,
                    &routing_key,
                    started,
                    first,
                    Some(*error),
                    again!(&routing_key),
                );
                return Box::pin(retry).await;
            }
            // The broker keeps the key in what it sends: no second copy held
            // while in flight. A failure (rare) makes it again.
            let sent = self.broker.publish_owned_key(exchange, routing_key, first);
            let error = match sent.await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let routing_key = binding.routing_key()?;
            let retry = self.send(
                Bd::EXCHANGE,
                &routing_key,
                started,
                None,
                Some(error),
                again!(&routing_key),
            );
            Box::pin(retry).await
        }
    }

    /// Waits until `exchange` is declared (declaring it if no other publish
    /// is), holding `held` (the serialized message) meanwhile: a future of
    /// its own, so that the publish's does not keep room for it while in
    /// flight. Returns it, and the declaration's error if it failed (boxed:
    /// the publish's future keeps room for it). (A plain function returning
    /// an `async move` block: an `async fn` would keep each argument twice.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps each argument twice"
    )]
    fn declared_for<T>(
        &self,
        exchange: &'static str,
        held: T,
    ) -> impl Future<Output = (T, Option<Box<BrokerError>>)> {
        async move {
            let declared = self.declare_once(exchange).await;
            (held, declared.err().map(Box::new))
        }
    }

    /// The message to send: serialized once (the bytes checked against the
    /// schema are the bytes sent), with its CC keys and id.
    fn outgoing<M: Message>(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &M,
        routes: &[&str],
        message_id: uuid::Uuid,
    ) -> Result<OutgoingMessage, PublishError> {
        let serialized = self.serialized(exchange, routing_key, message, routes)?;
        Ok(Self::message((serialized, message_id)))
    }

    /// The body (serialized and checked against the schema) and the CC keys.
    fn serialized<M: Message>(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &M,
        routes: &[&str],
    ) -> Result<(Vec<u8>, Vec<String>), PublishError> {
        let cc = cc_keys(exchange, routing_key, routes)?;
        let body = validate::validated_body(message, self.body_size_hint.load(Ordering::Relaxed))
            .map_err(|source| PublishError::InvalidMessage {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            source,
        })?;
        self.body_size_hint.store(body.len(), Ordering::Relaxed);
        Ok((body, cc))
    }

    /// The message sent: the body, persistent JSON, with its CC keys and id.
    fn message(((body, cc), message_id): ((Vec<u8>, Vec<String>), uuid::Uuid)) -> OutgoingMessage {
        OutgoingMessage {
            body,
            content_type: Some("application/json".to_owned()),
            message_id: Some(message_id.to_string()),
            persistent: true,
            headers: Default::default(),
            cc,
        }
    }

    /// Whether `exchange` (by reference name) was declared by this publisher already.
    fn declared(&self, exchange: &'static str) -> bool {
        self.declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(exchange)
            .is_some_and(|declaration| declaration.done.load(Ordering::Acquire))
    }

    /// Declares `exchange` (a reference name) under its broker name,
    /// durable, once for this publisher. A publish that finds another one
    /// declaring it waits for that one (a small wait: the first publishes
    /// all wait at once) and declares it itself if that one failed.
    async fn declare_once(&self, exchange: &'static str) -> Result<(), BrokerError> {
        let declaration = self
            .declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(exchange)
            .or_default()
            .clone();
        loop {
            let finished = declaration.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if declaration.done.load(Ordering::Acquire) {
                return Ok(());
            }
            if !declaration.running.swap(true, Ordering::AcqRel) {
                // Reset however this ends, even if the caller stops waiting.
                let _running = Running(&declaration);
                let declared = Box::pin(self.broker.declare_exchange(
                    self.names.broker_name(exchange),
                    ExchangeOptions {
                        passive: false,
                        durable: true,
                    },
                ))
                .await;
                if declared.is_ok() {
                    declaration.done.store(true, Ordering::Release);
                }
                return declared;
            }
            finished.await;
        }
    }

    /// Publishes `first` (if given; after `failed`, the first attempt's
    /// error, if not), and after a retryable failure the message `again`
    /// makes, with backoff, until the publisher's deadline from `started`.
    /// `reference` is the exchange's reference name.
    async fn send(
        &self,
        reference: &'static str,
        routing_key: &str,
        started: Instant,
        mut first: Option<OutgoingMessage>,
        mut failed: Option<BrokerError>,
        again: impl Fn() -> Result<OutgoingMessage, PublishError>,
    ) -> Result<(), PublishError> {
        let deadline = started
            .checked_add(self.options.deadline)
            .unwrap_or_else(|| deadline::after(self.options.deadline));
        let mut backoff = self.options.initial_backoff;
        let mut attempts = u32::from(failed.is_some());
        let exchange = self.names.broker_name(reference);
        loop {
            if let Some(error) = failed.take() {
                let retryable = matches!(
                    error,
                    BrokerError::Connection(_)
                        | BrokerError::NotConfirmed { .. }
                        | BrokerError::Unreachable(_)
                        | BrokerError::Unconfirmed(_)
                );
                // A retry too far away to represent is past any deadline.
                let retry_at = Instant::now().checked_add(backoff);
                if !retryable || retry_at.is_none_or(|at| at >= deadline) {
                    return Err(PublishError::Broker {
                        exchange: exchange.to_owned(),
                        routing_key: routing_key.to_owned(),
                        attempts,
                        source: error,
                    });
                }
                tracing::warn!(%exchange, %routing_key, %error, retry_in = ?backoff, "publish failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(self.options.max_backoff);
            }
            attempts += 1;
            let message = match first.take() {
                Some(message) => message,
                None => again()?,
            };
            let attempt = async {
                if !self.declared(reference) {
                    self.declare_once(reference).await?;
                }
                self.broker.publish(exchange, routing_key, message).await
            };
            // The broker bounds one attempt (its operation timeout) and says
            // what became of the message; the deadline bounds the retries.
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(error) => failed = Some(error),
            }
        }
    }
}

/// One exchange's declaration by a [`Publisher`].
#[derive(Debug, Default)]
struct Declaration {
    /// Declared.
    done: std::sync::atomic::AtomicBool,
    /// A publish is declaring it now.
    running: std::sync::atomic::AtomicBool,
    /// Wakes the publishes waiting for the one declaring.
    finished: tokio::sync::Notify,
}

/// The declaring publish's mark: cleared (and the waiters woken) when it ends.
struct Running<'a>(&'a Declaration);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        self.0.finished.notify_waiters();
    }
}

/// The CC routing keys for `routes`.
fn cc_keys(
    exchange: &str,
    routing_key: &str,
    routes: &[&str],
) -> Result<Vec<String>, PublishError> {
    routes
        .iter()
        .map(|route| {
            let refuse = |reason| PublishError::InvalidRoute {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                route: (*route).to_owned(),
                reason,
            };
            if route.is_empty() {
                return Err(refuse("is empty"));
            }
            if route.split('.').any(|word| word == "*" || word == "#") {
                return Err(refuse("contains a wildcard word (`*` or `#`)"));
            }
            let key = format!("{ROUTE_PREFIX}{route}");
            if key.len() > MAX_ROUTING_KEY_LEN {
                return Err(refuse("makes a CC routing key longer than 255 bytes"));
            }
            Ok(key)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_get_the_prefix_and_bad_ones_are_refused() {
        assert_eq!(
            cc_keys("ex", "k", &["notify.by-email", "index.a.b"]).unwrap(),
            vec!["route.notify.by-email", "route.index.a.b"]
        );
        for bad in ["", "a.*.b", "#", "x".repeat(250).as_str()] {
            let err = cc_keys("ex", "k", &[bad]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("`ex`") && text.contains("`k`"), "{text}");
        }
    }
}
