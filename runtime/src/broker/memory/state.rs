//! The embedded broker's state and its rules, all synchronous: every change
//! happens under one lock, so routing, dispatch and settlement are atomic.

use std::any::Any;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::{MemoryAck, Shared};
use crate::broker::{
    BrokerError, DEFAULT_EXCHANGE, Delivery, ExchangeOptions, MAX_DELAY, OutgoingMessage,
    PendingMessage, QueueOptions, QueueType,
};
use crate::topic::TopicTrie;

/// What a consumer's stream carries.
pub(super) type DeliverySender = mpsc::Sender<Result<Delivery, BrokerError>>;

/// Everything the broker holds.
pub(super) struct State {
    /// The `Shared` this state lives in, for the ack handles it creates.
    pub(super) this: Weak<Shared>,
    exchanges: HashMap<String, ExchangeState>,
    queues: HashMap<String, QueueState>,
    next_id: u64,
    /// Values whose drop could take the broker lock again (a delivery's ack
    /// handle) or must not run under it (a consumer's sender): dropped by
    /// `Shared::with_state` once the lock is released.
    pub(super) graveyard: Vec<Box<dyn Any + Send>>,
}

struct ExchangeState {
    options: ExchangeOptions,
    /// Only the broker publishes to it (`amq.rabbitmq.trace`); clients may bind to it.
    internal: bool,
    bindings: Bindings,
}

/// An exchange's bindings, by how it routes. Exchanges declared through
/// [`Broker`](crate::broker::Broker) are topic exchanges; the others are the
/// `amq.*` exchanges RabbitMQ declares itself.
enum Bindings {
    Topic(TopicTrie<String>),
    /// `amq.direct`: a binding key equal to the routing key (no wildcards).
    Direct(BTreeSet<(String, String)>),
    /// `amq.fanout`, and `amq.headers` / `amq.match`: a binding without
    /// arguments (all this broker makes) matches every message. `(pattern, queue)`.
    Fanout(BTreeSet<(String, String)>),
}

impl Bindings {
    fn insert(&mut self, pattern: &str, queue: &str) {
        match self {
            Bindings::Topic(trie) => {
                trie.insert(pattern, queue.to_owned());
            }
            Bindings::Direct(set) | Bindings::Fanout(set) => {
                set.insert((pattern.to_owned(), queue.to_owned()));
            }
        }
    }

    fn remove(&mut self, pattern: &str, queue: &str) {
        match self {
            Bindings::Topic(trie) => {
                trie.remove(pattern, &queue.to_owned());
            }
            Bindings::Direct(set) | Bindings::Fanout(set) => {
                set.remove(&(pattern.to_owned(), queue.to_owned()));
            }
        }
    }

    /// The queues a message with these keys (routing key and CC keys) goes to, each once, sorted.
    fn route<'k>(&self, keys: impl IntoIterator<Item = &'k str>) -> Vec<String> {
        let mut queues: Vec<String> = match self {
            Bindings::Topic(trie) => return trie.matches_any(keys).into_iter().cloned().collect(),
            Bindings::Direct(set) => {
                let keys: Vec<&str> = keys.into_iter().collect();
                set.iter()
                    .filter(|(pattern, _)| keys.contains(&pattern.as_str()))
                    .map(|(_, queue)| queue.clone())
                    .collect()
            }
            Bindings::Fanout(set) => set.iter().map(|(_, queue)| queue.clone()).collect(),
        };
        queues.sort_unstable();
        queues.dedup();
        queues
    }

    fn kind(&self) -> &'static str {
        match self {
            Bindings::Topic(_) => "topic",
            Bindings::Direct(_) => "direct",
            Bindings::Fanout(_) => "fanout",
        }
    }
}

/// The exchanges RabbitMQ declares in every virtual host: all durable,
/// `amq.rabbitmq.trace` internal.
fn predeclared_exchanges() -> HashMap<String, ExchangeState> {
    let durable = ExchangeOptions {
        passive: false,
        durable: true,
    };
    let exchange = |name: &str, bindings: Bindings, internal: bool| {
        let state = ExchangeState {
            options: durable,
            internal,
            bindings,
        };
        (name.to_owned(), state)
    };
    let fanout = || Bindings::Fanout(BTreeSet::new());
    HashMap::from([
        exchange("amq.direct", Bindings::Direct(BTreeSet::new()), false),
        exchange("amq.fanout", fanout(), false),
        exchange("amq.headers", fanout(), false),
        exchange("amq.match", fanout(), false),
        exchange("amq.topic", Bindings::Topic(TopicTrie::new()), false),
        exchange(
            "amq.rabbitmq.trace",
            Bindings::Topic(TopicTrie::new()),
            true,
        ),
    ])
}

struct QueueState {
    /// Distinguishes this queue from a later one of the same name.
    id: u64,
    options: QueueOptions,
    /// The connection an exclusive queue belongs to.
    owner: Option<u64>,
    /// Messages waiting, in `seq` order.
    ready: VecDeque<Queued>,
    /// Delivered, not yet settled, by delivery tag.
    unacked: HashMap<u64, Unacked>,
    /// In turn order, as RabbitMQ's classic queues keep them: a consumer
    /// that gets a message moves to the back; one found at its prefetch
    /// limit is `blocked` (out of turn) until a settlement gives it room, and
    /// then rejoins at the back.
    consumers: Vec<Consumer>,
    next_seq: u64,
    /// `(exchange, pattern)` pairs, to unbind when the queue goes.
    bindings: BTreeSet<(String, String)>,
    /// Wakes the task expiring messages of a queue with a message TTL.
    expiry: Option<Arc<Notify>>,
}

impl Drop for QueueState {
    fn drop(&mut self) {
        // Lets the expiry task notice the queue is gone and end.
        if let Some(expiry) = &self.expiry {
            expiry.notify_one();
        }
    }
}

/// A message as published: shared by every queue it was routed to.
pub(super) struct Content {
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) message: OutgoingMessage,
    /// Whether the CC keys route it (published), or only travel with it (put
    /// into a queue: the RabbitMQ broker carries them in another header,
    /// which dead-lettering neither routes by nor drops).
    pub(super) cc_routes: bool,
    /// Queues the message expired from since it was published or last
    /// rejected: dead-lettering skips them, breaking expiry cycles as
    /// RabbitMQ does (a cycle with a rejection in it is left alone).
    pub(super) expired_from: Vec<String>,
}

struct Queued {
    /// Position in the queue; a requeued message goes back to it (classic queues).
    seq: u64,
    content: Arc<Content>,
    redelivered: bool,
    /// How many times it came back unsettled (counted by quorum queues).
    returns: u32,
    /// In a quorum queue's returns (a cancelled consumer's, a closed
    /// channel's): delivered before the other messages.
    in_returns: bool,
    expires_at: Option<Instant>,
}

struct Unacked {
    message: Queued,
    /// The consumer it went to; `None` for `get`.
    consumer: Option<u64>,
}

struct Consumer {
    id: u64,
    prefetch: usize,
    in_flight: usize,
    /// Found at its prefetch limit by a delivery attempt: skipped until it settles one.
    blocked: bool,
    sender: DeliverySender,
    /// Dropping it stops the task watching for the stream's end.
    _stop_watching: oneshot::Sender<()>,
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settlement {
    Ack,
    Requeue,
    DeadLetter,
}

/// Why a message is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    Rejected,
    Expired,
    /// Came back to a quorum queue more often than its delivery limit.
    DeliveryLimit,
}

/// A queue as `declare_queue` leaves it, for the caller to start its tasks.
pub(super) struct Declared {
    pub(super) name: String,
    /// Set when the queue is new and has a message TTL: its expiry task to start.
    pub(super) expiry: Option<(u64, Arc<Notify>)>,
}

/// A consumer as `consume` registers it, for the caller to start its watcher.
pub(super) struct Registered {
    pub(super) queue_id: u64,
    pub(super) consumer_id: u64,
}

/// The longest exchange or queue name or routing key AMQP carries.
const MAX_NAME_LEN: usize = 255;

fn check_len(what: &str, value: &str) -> Result<(), BrokerError> {
    if value.len() > MAX_NAME_LEN {
        return Err(BrokerError::Invalid(format!(
            "{what} `{value}` is {} bytes, AMQP allows {MAX_NAME_LEN}",
            value.len()
        )));
    }
    Ok(())
}

/// Checks a message's short-string fields as an AMQP client must before
/// sending it, in the order the RabbitMQ broker does: content type, message
/// id, reserved header names, header name lengths, CC keys.
fn check_message(message: &OutgoingMessage) -> Result<(), BrokerError> {
    if let Some(content_type) = &message.content_type {
        check_len("content type", content_type)?;
    }
    if let Some(message_id) = &message.message_id {
        check_len("message id", message_id)?;
    }
    message.check_headers()?;
    for name in message.headers.keys() {
        check_len("header name", name)?;
    }
    for cc in &message.cc {
        check_len("CC routing key", cc)?;
    }
    Ok(())
}

/// Checks what a queue declaration carries besides the name, in the RabbitMQ
/// broker's order: combinations, dead-letter names, the TTL's range.
fn check_queue_options(name: &str, options: &QueueOptions) -> Result<(), BrokerError> {
    options.check(name)?;
    if let Some(exchange) = &options.dead_letter_exchange {
        check_len("dead-letter exchange", exchange)?;
    }
    if let Some(key) = &options.dead_letter_routing_key {
        check_len("dead-letter routing key", key)?;
    }
    if let Some(ttl) = options.message_ttl
        && ttl > MAX_DELAY
    {
        return Err(BrokerError::Invalid(format!(
            "queue `{name}`: message TTL {ttl:?} exceeds RabbitMQ's limit of {} ms",
            MAX_DELAY.as_millis()
        )));
    }
    Ok(())
}

fn differences(old: &QueueOptions, new: &QueueOptions) -> Vec<String> {
    let mut differ = Vec::new();
    let mut check = |field: &str, old: String, new: String| {
        if old != new {
            differ.push(format!("{field} was {old}, now {new}"));
        }
    };
    check("durable", old.durable.to_string(), new.durable.to_string());
    check(
        "queue_type",
        format!("{:?}", old.queue_type),
        format!("{:?}", new.queue_type),
    );
    check(
        "exclusive",
        old.exclusive.to_string(),
        new.exclusive.to_string(),
    );
    check(
        "auto_delete",
        old.auto_delete.to_string(),
        new.auto_delete.to_string(),
    );
    check(
        "dead_letter_exchange",
        format!("{:?}", old.dead_letter_exchange),
        format!("{:?}", new.dead_letter_exchange),
    );
    check(
        "dead_letter_routing_key",
        format!("{:?}", old.dead_letter_routing_key),
        format!("{:?}", new.dead_letter_routing_key),
    );
    check(
        "max_length",
        format!("{:?}", old.max_length),
        format!("{:?}", new.max_length),
    );
    check(
        "message_ttl",
        format!("{:?}", old.message_ttl),
        format!("{:?}", new.message_ttl),
    );
    check(
        "delivery_limit",
        format!("{:?}", old.delivery_limit),
        format!("{:?}", new.delivery_limit),
    );
    differ
}

impl State {
    pub(super) fn new(this: Weak<Shared>) -> Self {
        State {
            this,
            exchanges: predeclared_exchanges(),
            queues: HashMap::new(),
            next_id: 1,
            graveyard: Vec::new(),
        }
    }

    pub(super) fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Declares a topic exchange, or checks one exists (`passive`). As on
    /// RabbitMQ: the default exchange cannot be declared, even passively;
    /// the predeclared `amq.*` exchanges exist (durable), and a new name with
    /// that prefix is refused; a redeclaration must match type, durability
    /// and internality.
    pub(super) fn declare_exchange(
        &mut self,
        name: &str,
        options: ExchangeOptions,
    ) -> Result<(), BrokerError> {
        check_len("exchange name", name)?;
        if name == DEFAULT_EXCHANGE {
            return Err(BrokerError::Invalid(
                "the default exchange `` cannot be declared, even passively".to_owned(),
            ));
        }
        match self.exchanges.get(name) {
            Some(_) if options.passive => Ok(()),
            None if options.passive => Err(BrokerError::ExchangeNotFound(name.to_owned())),
            Some(existing) => {
                let detail = if !matches!(existing.bindings, Bindings::Topic(_)) {
                    format!("type is {}, not topic", existing.bindings.kind())
                } else if existing.options.durable != options.durable {
                    format!(
                        "durable was {}, now {}",
                        existing.options.durable, options.durable
                    )
                } else if existing.internal {
                    "the exchange is internal".to_owned()
                } else {
                    return Ok(());
                };
                Err(BrokerError::Conflict {
                    name: name.to_owned(),
                    detail,
                })
            }
            None if name.starts_with("amq.") => Err(BrokerError::Invalid(format!(
                "exchange name `{name}`: the `amq.` prefix is reserved"
            ))),
            None => {
                self.exchanges.insert(
                    name.to_owned(),
                    ExchangeState {
                        options: ExchangeOptions {
                            passive: false,
                            ..options
                        },
                        internal: false,
                        bindings: Bindings::Topic(TopicTrie::new()),
                    },
                );
                Ok(())
            }
        }
    }

    pub(super) fn declare_queue(
        &mut self,
        name: &str,
        options: QueueOptions,
        connection: u64,
    ) -> Result<Declared, BrokerError> {
        check_len("queue name", name)?;
        if name.is_empty() {
            // Checked as it will be: unnamed queues are exclusive, auto-deleted and transient.
            let unnamed = QueueOptions {
                durable: false,
                exclusive: true,
                auto_delete: true,
                ..options.clone()
            };
            check_queue_options(name, &unnamed)?;
        } else {
            check_queue_options(name, &options)?;
        }
        // RabbitMQ keeps exclusive queues transient, whatever `durable` says,
        // so a redeclaration's `durable` is not compared either.
        let options = QueueOptions {
            durable: options.durable && !options.exclusive,
            ..options
        };
        if let Some(existing) = self.queues.get(name) {
            check_owner(name, existing, connection)?;
            let differ = differences(&existing.options, &options);
            if !differ.is_empty() {
                return Err(BrokerError::Conflict {
                    name: name.to_owned(),
                    detail: differ.join(", "),
                });
            }
            return Ok(Declared {
                name: name.to_owned(),
                expiry: None,
            });
        }
        if name.starts_with("amq.") {
            return Err(BrokerError::Invalid(format!(
                "queue name `{name}`: the `amq.` prefix is reserved"
            )));
        }
        let id = self.next_id();
        let (name, options) = if name.is_empty() {
            // A server-named queue serves its declarer only and goes with its
            // last consumer, as the RabbitMQ broker's unnamed queues do.
            let options = QueueOptions {
                exclusive: true,
                auto_delete: true,
                ..options
            };
            (format!("amq.gen-{id}"), options)
        } else {
            (name.to_owned(), options)
        };
        let expiry = options.message_ttl.map(|_| Arc::new(Notify::new()));
        let queue = QueueState {
            id,
            owner: options.exclusive.then_some(connection),
            options,
            ready: VecDeque::new(),
            unacked: HashMap::new(),
            consumers: Vec::new(),
            next_seq: 0,
            bindings: BTreeSet::new(),
            expiry: expiry.clone(),
        };
        self.queues.insert(name.clone(), queue);
        Ok(Declared {
            name,
            expiry: expiry.map(|notify| (id, notify)),
        })
    }

    /// Deletes a queue, its messages and bindings; its consumers' streams end.
    pub(super) fn delete_queue(&mut self, name: &str, connection: u64) -> Result<(), BrokerError> {
        self.check_queue(name, connection)?;
        self.remove_queue(name);
        Ok(())
    }

    fn remove_queue(&mut self, name: &str) {
        let Some(queue) = self.queues.remove(name) else {
            return;
        };
        for (exchange, pattern) in &queue.bindings {
            if let Some(exchange) = self.exchanges.get_mut(exchange) {
                exchange.bindings.remove(pattern, name);
            }
        }
        // Holds the consumers' senders: dropped once the lock is released.
        self.graveyard.push(Box::new(queue));
    }

    /// Deletes the exclusive queues of a connection that closed.
    pub(super) fn close_connection(&mut self, connection: u64) {
        let owned: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, queue)| queue.owner == Some(connection))
            .map(|(name, _)| name.clone())
            .collect();
        for name in owned {
            self.remove_queue(&name);
        }
    }

    pub(super) fn bind_queue(
        &mut self,
        queue: &str,
        exchange: &str,
        pattern: &str,
        connection: u64,
    ) -> Result<(), BrokerError> {
        check_len("queue name", queue)?;
        check_len("exchange name", exchange)?;
        check_len("routing-key pattern", pattern)?;
        if exchange == DEFAULT_EXCHANGE {
            return Err(BrokerError::Invalid(format!(
                "queue `{queue}` cannot be bound to the default exchange ``"
            )));
        }
        let Some(exchange_state) = self.exchanges.get_mut(exchange) else {
            return Err(BrokerError::ExchangeNotFound(exchange.to_owned()));
        };
        let Some(queue_state) = self.queues.get_mut(queue) else {
            return Err(BrokerError::QueueNotFound(queue.to_owned()));
        };
        check_owner(queue, queue_state, connection)?;
        exchange_state.bindings.insert(pattern, queue);
        queue_state
            .bindings
            .insert((exchange.to_owned(), pattern.to_owned()));
        Ok(())
    }

    /// Routes a published message into every queue its routing key or a CC
    /// key selects, once per queue. A full queue does not get it and makes the
    /// publish fail with [`BrokerError::QueueFull`]; queues with room still
    /// get it (what RabbitMQ's `reject-publish` overflow does). Only the
    /// broker publishes to an internal exchange.
    pub(super) fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        check_len("exchange name", exchange)?;
        check_len("routing key", routing_key)?;
        check_message(&message)?;
        if self.exchanges.get(exchange).is_some_and(|x| x.internal) {
            return Err(BrokerError::Invalid(format!(
                "exchange `{exchange}` is internal: only the broker publishes to it"
            )));
        }
        let content = Arc::new(Content {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            message,
            expired_from: Vec::new(),
            cc_routes: true,
        });
        self.route(content)
    }

    fn route(&mut self, content: Arc<Content>) -> Result<(), BrokerError> {
        let cc: &[String] = if content.cc_routes {
            &content.message.cc
        } else {
            &[]
        };
        let keys =
            std::iter::once(content.routing_key.as_str()).chain(cc.iter().map(String::as_str));
        let targets: Vec<String> = if content.exchange == DEFAULT_EXCHANGE {
            let mut names: Vec<String> = keys
                .filter(|key| self.queues.contains_key(*key))
                .map(str::to_owned)
                .collect();
            if names.is_empty() {
                // Publishing straight to a queue that is not there is a
                // mistake worth reporting (the RabbitMQ broker publishes
                // these `mandatory` and reports the return).
                return Err(BrokerError::QueueNotFound(content.routing_key.clone()));
            }
            names.sort_unstable();
            names.dedup();
            names
        } else {
            let Some(exchange) = self.exchanges.get(&content.exchange) else {
                return Err(BrokerError::ExchangeNotFound(content.exchange.clone()));
            };
            exchange.bindings.route(keys)
        };
        let mut full = None;
        let mut entered = Vec::new();
        for target in targets {
            if content.expired_from.contains(&target) {
                continue;
            }
            match self.push(&target, Arc::clone(&content)) {
                Ok(()) => entered.push(target),
                Err(error) => {
                    full.get_or_insert(error);
                }
            }
        }
        // Only once the message is in every queue it goes to: what arriving
        // sets off (a dead-letter of it comes after it, as on RabbitMQ).
        for target in entered {
            self.arrived(&target);
        }
        full.map_or(Ok(()), Err)
    }

    /// Puts a message at the back of a queue, unless the queue is full, and
    /// hands it on ([`arrived`](Self::arrived)).
    pub(super) fn enqueue(&mut self, name: &str, content: Arc<Content>) -> Result<(), BrokerError> {
        self.push(name, content)?;
        self.arrived(name);
        Ok(())
    }

    /// Puts a message at the back of a queue, unless the queue is full (as
    /// RabbitMQ counts: ready messages, even expired ones not dropped yet).
    fn push(&mut self, name: &str, content: Arc<Content>) -> Result<(), BrokerError> {
        let Some(queue) = self.queues.get_mut(name) else {
            return Err(BrokerError::QueueNotFound(name.to_owned()));
        };
        if let Some(max) = queue.options.max_length
            && queue.ready.len() >= max as usize
        {
            return Err(BrokerError::QueueFull(name.to_owned()));
        }
        // Expired messages ahead of the new one go first, so it is at the
        // front if the queue is otherwise empty.
        self.expire(name);
        let Some(queue) = self.queues.get_mut(name) else {
            return Err(BrokerError::QueueNotFound(name.to_owned()));
        };
        let seq = queue.next_seq;
        queue.next_seq += 1;
        queue.ready.push_back(Queued {
            seq,
            content,
            redelivered: false,
            returns: 0,
            in_returns: false,
            // A TTL too long to represent never expires.
            expires_at: queue
                .options
                .message_ttl
                .and_then(|ttl| Instant::now().checked_add(ttl)),
        });
        if let Some(expiry) = &queue.expiry {
            expiry.notify_one();
        }
        Ok(())
    }

    /// After a message was pushed: a consumer with room gets it before its
    /// TTL can expire it, so with a TTL of zero it is delivered if a consumer
    /// can take it at once, and dead-lettered otherwise (as RabbitMQ does).
    fn arrived(&mut self, name: &str) {
        self.dispatch_from(name, false);
        // Not taken: a message already due (TTL zero) expires now, as on RabbitMQ.
        self.expire(name);
    }

    /// Checks a message put straight into a queue, as the RabbitMQ broker
    /// does: the queue name (its routing key), then the message's fields.
    pub(super) fn check_put(queue: &str, message: &OutgoingMessage) -> Result<(), BrokerError> {
        check_len("routing key", queue)?;
        check_message(message)
    }

    /// Checks a message put into a queue after a delay, in the RabbitMQ
    /// broker's order: the queue name, that the queue exists (any
    /// connection's: publishing to an exclusive queue is open to all; its
    /// delay queue is declared before the message is sent), then the
    /// message's fields.
    pub(super) fn check_put_later(
        &self,
        queue: &str,
        message: &OutgoingMessage,
    ) -> Result<(), BrokerError> {
        check_len("queue name", queue)?;
        if !self.queues.contains_key(queue) {
            return Err(BrokerError::QueueNotFound(queue.to_owned()));
        }
        check_message(message)
    }

    /// Checks the name's length, that the queue exists and that this
    /// connection may use it.
    pub(super) fn check_queue(&self, name: &str, connection: u64) -> Result<(), BrokerError> {
        check_len("queue name", name)?;
        match self.queues.get(name) {
            None => Err(BrokerError::QueueNotFound(name.to_owned())),
            Some(queue) => check_owner(name, queue, connection),
        }
    }

    /// Dead-letters (or drops) the messages at the head of a queue whose TTL
    /// has passed. Messages are in `seq` order and every one of them got the
    /// queue's TTL when it entered, so the expired ones are at the front.
    fn expire(&mut self, name: &str) {
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        let now = Instant::now();
        let mut expired = Vec::new();
        while let Some(front) = queue.ready.front()
            && front.expires_at.is_some_and(|at| at <= now)
        {
            expired.extend(queue.ready.pop_front());
        }
        if expired.is_empty() {
            return;
        }
        for message in expired {
            self.dead_letter(name, &message, Death::Expired);
        }
    }

    /// Republishes a rejected or expired message to a dead-letter exchange,
    /// as RabbitMQ does: with the queue's dead-letter routing key (and no CC
    /// keys) if it has one, else with its own keys. Dropped without a
    /// dead-letter exchange, or where the dead-letter exchange is missing or
    /// a target queue full (RabbitMQ drops those too).
    fn dead_letter(&mut self, from: &str, message: &Queued, death: Death) {
        let Some(options) = self.queues.get(from).map(|queue| &queue.options) else {
            return;
        };
        let Some(exchange) = options.dead_letter_exchange.clone() else {
            return;
        };
        let routing_key = options.dead_letter_routing_key.clone();
        // RabbitMQ breaks dead-letter cycles for every reason but a rejection.
        let expired_from = match death {
            Death::Rejected => Vec::new(),
            Death::Expired | Death::DeliveryLimit => {
                let mut expired_from = message.content.expired_from.clone();
                expired_from.push(from.to_owned());
                expired_from
            }
        };
        let mut republished = message.content.message.clone();
        let routing_key = match routing_key {
            Some(key) => {
                if message.content.cc_routes {
                    republished.cc.clear();
                }
                key.to_owned()
            }
            None => message.content.routing_key.clone(),
        };
        let content = Arc::new(Content {
            exchange,
            routing_key,
            message: republished,
            expired_from,
            cc_routes: message.content.cc_routes,
        });
        if let Err(error) = self.route(content) {
            tracing::warn!(%error, queue = from, "dead-lettered message dropped");
        }
    }

    /// Hands ready messages to consumers in turn, expiring due messages first.
    fn dispatch(&mut self, name: &str) {
        self.dispatch_from(name, true);
    }

    /// Hands ready messages to consumers in turn, as RabbitMQ's classic
    /// queues do: the first consumer in turn order that is not blocked gets
    /// the next message and moves to the back; one found at its prefetch
    /// limit is blocked instead (until it settles a delivery) and the next
    /// one tried. Due messages are expired before each hand-out, except the
    /// first when `expire_first` is false (a message just enqueued goes to
    /// any consumer with room before its TTL is looked at).
    fn dispatch_from(&mut self, name: &str, expire_first: bool) {
        let mut expire_now = expire_first;
        loop {
            if expire_now {
                self.expire(name);
                expire_now = false;
            }
            let Some(queue) = self.queues.get_mut(name) else {
                return;
            };
            if queue.ready.is_empty() {
                return;
            }
            let Some(index) = queue.consumers.iter().position(|c| !c.blocked) else {
                return;
            };
            if queue.consumers[index].sender.is_closed() {
                // Its stream was dropped (its watcher has not run yet): as on
                // RabbitMQ, whose channel is closed by then, it gets nothing more.
                let consumer_id = queue.consumers[index].id;
                self.cancel_consumer(name, consumer_id);
                continue;
            }
            let consumer = &mut queue.consumers[index];
            if consumer.in_flight >= consumer.prefetch {
                consumer.blocked = true;
                continue;
            }
            expire_now = true;
            let Some(message) = queue.ready.pop_front() else {
                return;
            };
            let mut consumer = queue.consumers.remove(index);
            let tag = self.next_id;
            self.next_id += 1;
            let delivery = make_delivery(&self.this, name, queue.id, tag, &message);
            consumer.in_flight += 1;
            let consumer_id = consumer.id;
            let sent = consumer.sender.try_send(Ok(delivery));
            queue.consumers.push(consumer);
            queue.unacked.insert(
                tag,
                Unacked {
                    message,
                    consumer: Some(consumer_id),
                },
            );
            if let Err(unsent) = sent {
                // The stream was dropped (its watcher has not run yet); the
                // channel holds at most `prefetch` deliveries, so it is not full.
                self.graveyard.push(Box::new(unsent.into_inner()));
                self.cancel_consumer(name, consumer_id);
            }
        }
    }

    pub(super) fn register_consumer(
        &mut self,
        name: &str,
        prefetch: u16,
        sender: DeliverySender,
        stop_watching: oneshot::Sender<()>,
        connection: u64,
    ) -> Result<Registered, BrokerError> {
        self.check_queue(name, connection)?;
        let consumer_id = self.next_id();
        let Some(queue) = self.queues.get_mut(name) else {
            return Err(BrokerError::QueueNotFound(name.to_owned()));
        };
        queue.consumers.push(Consumer {
            id: consumer_id,
            prefetch: usize::from(prefetch),
            in_flight: 0,
            blocked: false,
            sender,
            _stop_watching: stop_watching,
        });
        let queue_id = queue.id;
        self.dispatch(name);
        Ok(Registered {
            queue_id,
            consumer_id,
        })
    }

    /// Ends a consumer: its unacknowledged deliveries go back to their places
    /// in the queue, flagged redelivered; an auto-delete queue left without
    /// consumers is deleted.
    pub(super) fn cancel_consumer(&mut self, name: &str, consumer_id: u64) {
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        let Some(index) = queue.consumers.iter().position(|c| c.id == consumer_id) else {
            return;
        };
        let consumer = queue.consumers.remove(index);
        self.graveyard.push(Box::new(consumer));
        let tags: Vec<u64> = queue
            .unacked
            .iter()
            .filter(|(_, unacked)| unacked.consumer == Some(consumer_id))
            .map(|(tag, _)| *tag)
            .collect();
        // In delivery order, as RabbitMQ returns them.
        let mut tags = tags;
        tags.sort_unstable();
        let mut over_limit = Vec::new();
        for tag in tags {
            if let Some(unacked) = queue.unacked.remove(&tag) {
                over_limit.extend(requeue(queue, unacked.message, Return::Cancelled));
            }
        }
        for message in over_limit {
            self.dead_letter(name, &message, Death::DeliveryLimit);
        }
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        if queue.consumers.is_empty() && queue.options.auto_delete {
            self.remove_queue(name);
        } else {
            self.dispatch(name);
        }
    }

    /// Whether `consumer_id` still consumes queue `name` (number `queue_id`).
    pub(super) fn consumer_exists(&self, name: &str, queue_id: u64, consumer_id: u64) -> bool {
        self.queues
            .get(name)
            .is_some_and(|q| q.id == queue_id && q.consumers.iter().any(|c| c.id == consumer_id))
    }

    pub(super) fn settle(
        &mut self,
        name: &str,
        queue_id: u64,
        tag: u64,
        settlement: Settlement,
    ) -> Result<(), BrokerError> {
        let queue = match self.queues.get_mut(name) {
            Some(queue) if queue.id == queue_id => queue,
            // As on RabbitMQ: the delivery's channel still knows it, so
            // settling it succeeds, and does nothing.
            _ => return Ok(()),
        };
        let Some(unacked) = queue.unacked.remove(&tag) else {
            return Err(BrokerError::AckFailed(format!(
                "delivery {tag} from queue `{name}` is no longer outstanding (its consumer was cancelled and it was requeued)"
            )));
        };
        if settlement == Settlement::Requeue
            && let Some(consumer) = unacked.consumer
            && queue
                .consumers
                .iter()
                .any(|c| c.id == consumer && c.sender.is_closed())
        {
            // Its consumer's stream is gone: on RabbitMQ its channel is
            // closing, and everything it held comes back as from a
            // cancelled consumer (a quorum queue puts it at the front).
            queue.unacked.insert(tag, unacked);
            self.cancel_consumer(name, consumer);
            return Ok(());
        }
        if let Some(index) = queue
            .consumers
            .iter()
            .position(|c| Some(c.id) == unacked.consumer)
        {
            let consumer = &mut queue.consumers[index];
            consumer.in_flight -= 1;
            if consumer.blocked {
                // Room again: back in turn, at the back.
                consumer.blocked = false;
                let consumer = queue.consumers.remove(index);
                queue.consumers.push(consumer);
            }
        }
        match settlement {
            Settlement::Ack => {}
            Settlement::Requeue => {
                if let Some(over_limit) = requeue(queue, unacked.message, Return::Nacked) {
                    self.dead_letter(name, &over_limit, Death::DeliveryLimit);
                }
            }
            Settlement::DeadLetter => self.dead_letter(name, &unacked.message, Death::Rejected),
        }
        self.dispatch(name);
        Ok(())
    }

    /// `basic.get`: takes the first ready message, to be settled like a delivery.
    pub(super) fn get(
        &mut self,
        name: &str,
        connection: u64,
    ) -> Result<Option<Delivery>, BrokerError> {
        self.check_queue(name, connection)?;
        self.expire(name);
        let tag = self.next_id();
        let Some(queue) = self.queues.get_mut(name) else {
            return Err(BrokerError::QueueNotFound(name.to_owned()));
        };
        let Some(message) = queue.ready.pop_front() else {
            return Ok(None);
        };
        let delivery = make_delivery(&self.this, name, queue.id, tag, &message);
        queue.unacked.insert(
            tag,
            Unacked {
                message,
                consumer: None,
            },
        );
        Ok(Some(delivery))
    }

    pub(super) fn pending(
        &mut self,
        name: &str,
        connection: u64,
    ) -> Result<Vec<PendingMessage>, BrokerError> {
        self.check_queue(name, connection)?;
        self.expire(name);
        let Some(queue) = self.queues.get_mut(name) else {
            return Err(BrokerError::QueueNotFound(name.to_owned()));
        };
        let listed = queue
            .ready
            .iter()
            .map(|queued| {
                let content = &queued.content;
                PendingMessage {
                    message_id: content.message.message_id.clone(),
                    routing_key: content.routing_key.clone(),
                    headers: content.message.headers.clone(),
                    body: content.message.body.clone(),
                }
            })
            .collect();
        if queue.options.queue_type == QueueType::Quorum {
            // RabbitMQ lists by taking every message and returning them all,
            // in order: a quorum queue counts each return.
            let taken = std::mem::take(&mut queue.ready);
            let over_limit: Vec<Queued> = taken
                .into_iter()
                .filter_map(|message| requeue(queue, message, Return::Cancelled))
                .collect();
            for message in over_limit {
                self.dead_letter(name, &message, Death::DeliveryLimit);
            }
            self.dispatch(name);
        }
        Ok(listed)
    }

    /// For the expiry task: expires what is due in queue `name` (number
    /// `queue_id`), then tells when the next message is due (`Some(None)`:
    /// none waiting), or `None` once the queue is gone.
    pub(super) fn expire_due(&mut self, name: &str, queue_id: u64) -> Option<Option<Instant>> {
        if self.queues.get(name).is_none_or(|q| q.id != queue_id) {
            return None;
        }
        self.dispatch(name);
        let queue = self.queues.get(name)?;
        Some(queue.ready.front().and_then(|m| m.expires_at))
    }
}

fn check_owner(name: &str, queue: &QueueState, connection: u64) -> Result<(), BrokerError> {
    match queue.owner {
        Some(owner) if owner != connection => Err(BrokerError::Conflict {
            name: name.to_owned(),
            detail: "the queue is exclusive to another connection".to_owned(),
        }),
        _ => Ok(()),
    }
}

/// How a message came back unsettled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Return {
    /// `nack` with requeue (a dropped delivery's too).
    Nacked,
    /// Its consumer was cancelled or its channel closed (a listing's too).
    Cancelled,
}

/// Puts a message that came back unsettled into the queue again, flagged
/// redelivered, as RabbitMQ (3.10) does: a classic queue at its original
/// place; a quorum queue counts it and puts a nacked one at the back, a
/// cancelled consumer's ahead of the messages not returned (after those
/// returned before) — or, past its delivery limit, hands it back to be
/// dead-lettered (reason `delivery_limit`).
#[must_use]
fn requeue(queue: &mut QueueState, mut message: Queued, how: Return) -> Option<Queued> {
    message.redelivered = true;
    if queue.options.queue_type == QueueType::Quorum {
        message.returns = message.returns.saturating_add(1);
        if queue
            .options
            .delivery_limit
            .is_some_and(|limit| message.returns > limit)
        {
            return Some(message);
        }
        match how {
            Return::Nacked => {
                message.seq = queue.next_seq;
                queue.next_seq += 1;
                message.in_returns = false;
                queue.ready.push_back(message);
            }
            Return::Cancelled => {
                message.in_returns = true;
                let position = queue.ready.partition_point(|m| m.in_returns);
                queue.ready.insert(position, message);
            }
        }
    } else {
        let position = queue.ready.partition_point(|m| m.seq < message.seq);
        queue.ready.insert(position, message);
    }
    if let Some(expiry) = &queue.expiry {
        expiry.notify_one();
    }
    None
}

fn make_delivery(
    shared: &Weak<Shared>,
    queue: &str,
    queue_id: u64,
    tag: u64,
    queued: &Queued,
) -> Delivery {
    let content = &queued.content;
    let message = &content.message;
    Delivery {
        exchange: content.exchange.clone(),
        routing_key: content.routing_key.clone(),
        body: message.body.clone(),
        content_type: message.content_type.clone(),
        message_id: message.message_id.clone(),
        headers: message.headers.clone(),
        cc: message.cc.clone(),
        redelivered: queued.redelivered,
        acker: Box::new(MemoryAck {
            shared: Weak::clone(shared),
            queue: queue.to_owned(),
            queue_id,
            tag,
            settled: AtomicBool::new(false),
        }),
    }
}
