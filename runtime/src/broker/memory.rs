//! The embedded in-memory broker: RabbitMQ's model and behaviour, in process.
//!
//! [`MemoryBroker`] is the default broker for development and tests: the same
//! code runs against it and against RabbitMQ, and the shared conformance suite
//! (`runtime/tests/suite`) holds both to the same behaviour.
//!
//! # Semantics (as RabbitMQ's, unless said otherwise)
//! - Topic exchanges match as [`crate::topic`] describes; the default exchange
//!   `""` routes to the queue named by the key. A message is routed by its key
//!   and each of its CC keys, and reaches each queue once.
//! - The default exchange cannot be declared, not even passively
//!   ([`BrokerError::Invalid`]), nor bound to. RabbitMQ's predeclared
//!   exchanges exist, durable: `amq.topic`; `amq.direct` (a binding key
//!   equal to the routing key); `amq.fanout`, `amq.headers` and `amq.match`
//!   (every bound queue: bindings here carry no header arguments); and the
//!   internal `amq.rabbitmq.trace` (publishing to it is refused). Other
//!   `amq.` names cannot be declared.
//! - Names, routing keys, patterns, content types, message ids, header names
//!   and dead-letter names over 255 bytes (AMQP's short strings) are refused
//!   with [`BrokerError::Invalid`], checked in the RabbitMQ broker's order.
//! - Publishing to a missing exchange fails with [`BrokerError::ExchangeNotFound`];
//!   a message no queue is bound for is dropped, as RabbitMQ does without
//!   `mandatory`, except through the default exchange, where a key naming no
//!   queue fails with [`BrokerError::QueueNotFound`] (as the RabbitMQ broker
//!   reports it, publishing those `mandatory`).
//! - A server-named queue (declared with the name `""`) is `amq.gen-<n>`,
//!   exclusive and auto-delete, whatever the options say (as the RabbitMQ
//!   broker's unnamed queues). Deleting a missing queue fails with
//!   [`BrokerError::QueueNotFound`].
//! - A queue with `max_length` holds that many *ready* messages (unacknowledged
//!   ones do not count). Publishing into a full queue fails with
//!   [`BrokerError::QueueFull`]; when a message routes to several queues, those
//!   with room still get it and the publish fails (RabbitMQ's `reject-publish`
//!   overflow does the same: the publisher gets a nack). Messages that are
//!   dead-lettered or published with a delay into a full queue are dropped.
//! - A consumer gets at most `prefetch` (at least 1) unacknowledged deliveries.
//!   Several consumers of a queue take turns as on RabbitMQ's classic queues:
//!   the consumer that gets a message moves to the back of the turn order; one
//!   found at its prefetch limit leaves the turn until it settles a delivery,
//!   then rejoins at the back. (So a requeued message goes to whoever is first
//!   in turn, often the consumer that requeued it.)
//! - A message TTL counts from enqueueing; a message that arrives while a
//!   consumer has room is delivered before its TTL is looked at (so with a TTL
//!   of zero it is delivered if a consumer can take it, else expires at once).
//! - A requeued message (nack with requeue, a cancelled consumer, a dropped
//!   unsettled delivery) returns to its original place with `redelivered` set.
//! - A message put into a queue ([`Broker::publish_delayed`]) keeps its CC
//!   keys but is routed by none of them, not even when dead-lettered (the
//!   RabbitMQ broker carries them in another header).
//! - A rejected or expired message goes to the queue's dead-letter exchange,
//!   with its dead-letter routing key (CC keys dropped) or else its own keys;
//!   it is dropped without a dead-letter exchange. A message is not
//!   dead-lettered into a queue it already expired from, unless it was
//!   rejected since (RabbitMQ's cycle detection).
//! - Dropping a [`DeliveryStream`] cancels its consumer; dropping a
//!   [`Delivery`] that was not settled requeues it. Settling twice fails with
//!   [`BrokerError::AckFailed`]; settling a delivery whose queue was deleted
//!   succeeds and does nothing (RabbitMQ's channel still knows the delivery).
//! - An auto-delete queue is deleted when its last consumer goes. An exclusive
//!   queue belongs to the connection (handle family, see
//!   [`MemoryBroker::connect`]) that declared it: others get
//!   [`BrokerError::Conflict`], and it is deleted when that connection's last
//!   handle is dropped. It is transient whatever `durable` says, so a
//!   redeclaration's `durable` is not compared.
//! - Nothing survives the process: `durable` and `persistent` are recorded
//!   (a redeclaration must match) but change nothing.
//!
//! The broker needs a Tokio runtime (timers for delays and TTLs, and a task per
//! consumer noticing when its stream is dropped); nothing polls.

mod state;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use self::state::{Content, Settlement, State};
use super::{
    AckHandle, BoxFuture, Broker, BrokerError, DEFAULT_EXCHANGE, Delivery, DeliveryStream,
    ExchangeOptions, OutgoingMessage, PendingMessage, QueueOptions,
};

/// The embedded broker. Cheap to clone: clones are handles on the same broker
/// and the same connection.
#[derive(Clone)]
pub struct MemoryBroker {
    connection: Arc<Connection>,
}

/// The broker proper, shared by every connection, task and ack handle.
struct Shared {
    state: Mutex<State>,
}

/// A connection: owns the exclusive queues it declares.
struct Connection {
    id: u64,
    shared: Arc<Shared>,
}

/// Connection ids, unique in the process.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared
            .with_state(|state| state.close_connection(self.id));
    }
}

impl Shared {
    /// Runs `change` under the lock. What the change retired (consumers'
    /// senders, deliveries that could not be sent) is dropped after the lock
    /// is released, because dropping a delivery settles it, which locks again.
    fn with_state<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let (result, retired) = {
            // A panic under the lock cannot leave the state half-changed in a
            // way later calls trip over more than they would on any error.
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let result = change(&mut state);
            (result, std::mem::take(&mut state.graveyard))
        };
        drop(retired);
        result
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("connection", &self.connection.id)
            .finish_non_exhaustive()
    }
}

impl MemoryBroker {
    /// A new, empty broker, and a first connection to it.
    pub fn new() -> Self {
        let shared = Arc::new_cyclic(|this| Shared {
            state: Mutex::new(State::new(Weak::clone(this))),
        });
        MemoryBroker {
            connection: Arc::new(Connection {
                id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
                shared,
            }),
        }
    }

    /// Another connection to the same broker (as a second AMQP connection
    /// would be): it sees the same exchanges and queues, but not the
    /// exclusive queues of other connections.
    pub fn connect(&self) -> Self {
        MemoryBroker {
            connection: Arc::new(Connection {
                id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
                shared: Arc::clone(&self.connection.shared),
            }),
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.connection.shared
    }

    fn with_state<R>(&self, change: impl FnOnce(&mut State, u64) -> R) -> R {
        let connection = self.connection.id;
        self.shared().with_state(|state| change(state, connection))
    }
}

/// Fails unless running inside a Tokio runtime (the broker's timers and
/// watchers need one).
fn runtime() -> Result<tokio::runtime::Handle, BrokerError> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        BrokerError::Invalid("the in-memory broker must be used inside a Tokio runtime".to_owned())
    })
}

impl Broker for MemoryBroker {
    async fn declare_exchange(
        &self,
        name: &str,
        options: ExchangeOptions,
    ) -> Result<(), BrokerError> {
        self.with_state(|state, _| state.declare_exchange(name, options))
    }

    async fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
    ) -> Result<String, BrokerError> {
        let runtime = runtime()?;
        let declared =
            self.with_state(|state, connection| state.declare_queue(name, options, connection))?;
        if let Some((queue_id, wake)) = declared.expiry {
            runtime.spawn(expire_messages(
                Arc::downgrade(self.shared()),
                declared.name.clone(),
                queue_id,
                wake,
            ));
        }
        Ok(declared.name)
    }

    async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        self.with_state(|state, connection| state.delete_queue(name, connection))
    }

    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        pattern: &str,
    ) -> Result<(), BrokerError> {
        self.with_state(|state, connection| state.bind_queue(queue, exchange, pattern, connection))
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        let message = message.with_message_id();
        self.with_state(|state, _| state.publish(exchange, routing_key, message))
    }

    /// The message enters the queue when the delay (clamped to
    /// [`MAX_DELAY`](super::MAX_DELAY), as on RabbitMQ) has passed; if the
    /// queue is gone or full by then, it is dropped (logged). Its CC keys
    /// route nothing (it keeps them). The delay is exact (RabbitMQ's broker
    /// rounds it up to a tier, which can reorder messages: see
    /// [`Broker::publish_delayed`]).
    async fn publish_delayed(
        &self,
        queue: &str,
        message: OutgoingMessage,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        let message = message.with_message_id();
        if delay.is_zero() {
            State::check_put(queue, &message)?;
        } else {
            self.with_state(|state, _| state.check_put_later(queue, &message))?;
        }
        let content = Arc::new(Content {
            exchange: DEFAULT_EXCHANGE.to_owned(),
            routing_key: queue.to_owned(),
            message,
            expired_from: Vec::new(),
            cc_routes: false,
        });
        if delay.is_zero() {
            return self.with_state(|state, _| state.enqueue(queue, content));
        }
        let delay = delay.min(super::MAX_DELAY);
        let runtime = runtime()?;
        let shared = Arc::downgrade(self.shared());
        let queue = queue.to_owned();
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if let Err(error) = shared.with_state(|state| state.enqueue(&queue, content)) {
                tracing::warn!(%error, queue, "delayed message dropped");
            }
        });
        Ok(())
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<DeliveryStream, BrokerError> {
        if prefetch == 0 {
            return Err(BrokerError::Invalid(format!(
                "consumer of queue `{queue}`: prefetch must be at least 1"
            )));
        }
        let runtime = runtime()?;
        // At most `prefetch` deliveries are unacknowledged, so the channel
        // never fills up.
        let (sender, receiver) = mpsc::channel(usize::from(prefetch));
        let (stop_watching, stopped) = oneshot::channel();
        let watcher_sender = sender.clone();
        let registered = self.with_state(|state, connection| {
            state.register_consumer(queue, prefetch, sender, stop_watching, connection)
        })?;
        runtime.spawn(watch_consumer(
            Arc::downgrade(self.shared()),
            queue.to_owned(),
            registered.queue_id,
            registered.consumer_id,
            watcher_sender,
            stopped,
        ));
        Ok(DeliveryStream::new(receiver))
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>, BrokerError> {
        self.with_state(|state, connection| state.get(queue, connection))
    }

    async fn pending(&self, queue: &str) -> Result<Vec<PendingMessage>, BrokerError> {
        self.with_state(|state, connection| state.pending(queue, connection))
    }
}

/// Cancels a consumer when its stream is dropped; ends without doing so when
/// the broker drops the consumer first (queue deleted, consumer cancelled).
async fn watch_consumer(
    shared: Weak<Shared>,
    queue: String,
    queue_id: u64,
    consumer_id: u64,
    sender: state::DeliverySender,
    stopped: oneshot::Receiver<()>,
) {
    tokio::select! {
        () = sender.closed() => {
            if let Some(shared) = shared.upgrade() {
                shared.with_state(|state| {
                    if state.consumer_exists(&queue, queue_id, consumer_id) {
                        state.cancel_consumer(&queue, consumer_id);
                    }
                });
            }
        }
        _ = stopped => {}
    }
}

/// Expires the messages of a queue with a message TTL when they are due, so
/// they are dead-lettered on time even when nobody touches the queue.
async fn expire_messages(shared: Weak<Shared>, queue: String, queue_id: u64, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            match shared.with_state(|state| state.expire_due(&queue, queue_id)) {
                Some(next) => next,
                None => return,
            }
        };
        match next {
            Some(due) => {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Settles one delivery of the in-memory broker; dropped unsettled, it requeues.
struct MemoryAck {
    shared: Weak<Shared>,
    queue: String,
    queue_id: u64,
    tag: u64,
    settled: AtomicBool,
}

impl MemoryAck {
    fn settle(&self, settlement: Settlement) -> Result<(), BrokerError> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(BrokerError::AckFailed(format!(
                "delivery {} from queue `{}` was already settled",
                self.tag, self.queue
            )));
        }
        let shared = self.shared.upgrade().ok_or(BrokerError::Closed)?;
        shared.with_state(|state| state.settle(&self.queue, self.queue_id, self.tag, settlement))
    }
}

impl AckHandle for MemoryAck {
    fn ack(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move { self.settle(Settlement::Ack) })
    }

    fn nack(&self, requeue: bool) -> BoxFuture<'_, Result<(), BrokerError>> {
        let settlement = if requeue {
            Settlement::Requeue
        } else {
            Settlement::DeadLetter
        };
        Box::pin(async move { self.settle(settlement) })
    }
}

impl Drop for MemoryAck {
    fn drop(&mut self) {
        // Settled before, or requeued already with its consumer: nothing to do.
        let _ = self.settle(Settlement::Requeue);
    }
}
