//! Reading queues: consumers (a channel each, deliveries handed from the
//! connection's reader straight into the consumer's stream), `get`,
//! `pending`, and setting aside the messages no consumer can be given.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use super::acks::AckBatcher;
use super::conn::{AmqpError, Channel, ConsumerSink, Content, Incoming, Reply};
use super::convert;
use super::link::{self, LinkState};
use super::pipe::Confirm;
use super::raw::{PoisonEvent, mark_poison, write_fields};
use super::wire::{CLASS_BASIC, ContentHeader, ShortString, sanitize};
use super::{AmqpBroker, QueueFlags, Shared, Target, methods};
use crate::broker::{
    AckHandle, BoxFuture, BrokerError, DEFAULT_EXCHANGE, Delivery, PendingMessage,
};

/// The tag of the one consumer on each consumer channel.
const CONSUMER_TAG: &str = "tc-exchanges";

/// How long a message that could not be set aside is held before it goes
/// back to its queue (and comes back to be tried again).
const SET_ASIDE_RETRY: Duration = Duration::from_secs(1);

/// How long a consumer whose stream was dropped waits for the messages it
/// is setting aside before it closes its channel.
const SET_ASIDE_WAIT: Duration = Duration::from_secs(10);

type Sender = mpsc::Sender<Result<Delivery, BrokerError>>;

/// What a consumer's sink tells its task.
enum SinkEvent {
    /// A delivery that cannot be handed out, to set aside; `acker` settles it.
    Unreadable(Incoming, Box<dyn AckHandle>),
    /// The consumer ended (cancelled, channel closed, connection lost).
    Ended(String),
}

/// Where the connection's reader puts a consumer's deliveries: straight into
/// the consumer's stream when it has room (one prefetch window), else in an
/// overflow its task moves on (after a reconnect the dead channel's
/// deliveries may still be unread).
struct Sink {
    /// Weak: the subscription holds the batcher, and with it the channel.
    batcher: Weak<AckBatcher>,
    dead: watch::Receiver<bool>,
    sender: Sender,
    overflow: Mutex<VecDeque<Delivery>>,
    overflowed: Notify,
    /// The most deliveries the overflow holds: a broker sending past the
    /// prefetch window has the rest requeued.
    overflow_max: usize,
    events: mpsc::UnboundedSender<SinkEvent>,
}

impl Sink {
    fn overflow(&self) -> std::sync::MutexGuard<'_, VecDeque<Delivery>> {
        self.overflow.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ConsumerSink for Sink {
    fn deliver(&self, incoming: Incoming) {
        let Some(batcher) = self.batcher.upgrade() else {
            return; // The consumer is ending: closing its channel requeues this.
        };
        let acker = Box::new(batcher.delivered(incoming.delivery_tag, self.dead.clone()));
        let delivery = match convert::readable(incoming) {
            Ok(readable) => readable.into_delivery(acker),
            Err(incoming) => {
                let _ = self.events.send(SinkEvent::Unreadable(incoming, acker));
                return;
            }
        };
        let mut overflow = self.overflow();
        if overflow.is_empty() {
            match self.sender.try_send(Ok(delivery)) {
                Ok(()) => return,
                // The stream was dropped: the delivery's drop requeues it.
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(Ok(delivery))) => overflow.push_back(delivery),
                Err(mpsc::error::TrySendError::Full(Err(_))) => return,
            }
        } else if overflow.len() < self.overflow_max {
            overflow.push_back(delivery);
        } else {
            tracing::warn!(
                "the broker sent more deliveries than the consumer's prefetch allows; requeueing one"
            );
            return;
        }
        drop(overflow);
        self.overflowed.notify_one();
    }

    fn ended(&self, reason: String) {
        let _ = self.events.send(SinkEvent::Ended(reason));
    }
}

/// One subscription of a consumer: its channel (through the batcher), its sink, its events.
pub(super) struct Subscription {
    batcher: Arc<AckBatcher>,
    sink: Arc<Sink>,
    events: mpsc::UnboundedReceiver<SinkEvent>,
    dead: watch::Receiver<bool>,
}

impl AmqpBroker {
    /// Opens a channel with `prefetch` and starts consuming `queue` on it into `sender`.
    pub(super) async fn subscribe(
        &self,
        queue: &ShortString,
        prefetch: u16,
        sender: &Sender,
    ) -> Result<Subscription, BrokerError> {
        let target = Target::queue(queue.as_str());
        self.run("consume queue", &target, |link| {
            let sender = sender.clone();
            async move {
                let channel = link.channel().await?;
                // Prefetch is the only bound on deliveries in flight.
                expect(channel.call(methods::basic_qos(prefetch)).await?, 11)?;
                let batcher = AckBatcher::new(channel);
                let (events_sender, events) = mpsc::unbounded_channel();
                let sink = Arc::new(Sink {
                    batcher: Arc::downgrade(&batcher),
                    dead: link.dead_signal(),
                    sender,
                    overflow: Mutex::new(VecDeque::new()),
                    overflowed: Notify::new(),
                    overflow_max: usize::from(prefetch),
                    events: events_sender,
                });
                batcher
                    .channel()
                    .consume(queue, CONSUMER_TAG, sink.clone())
                    .await?;
                Ok(Subscription {
                    batcher,
                    sink,
                    events,
                    dead: link.dead_signal(),
                })
            }
        })
        .await
    }

    /// Takes one readable message from `queue`, setting aside the unreadable
    /// ones before it.
    pub(super) async fn get_readable(
        &self,
        queue: &ShortString,
    ) -> Result<Option<Delivery>, BrokerError> {
        loop {
            let target = Target::queue(queue.as_str());
            let (reply, channel, dead) = self
                .run("get from queue", &target, |link| async move {
                    // A channel of its own: its close requeues the message if the delivery is dropped unsettled.
                    let channel = link.channel().await?;
                    let reply = channel.call(methods::basic_get(queue)).await?;
                    Ok((reply, channel, link.dead_signal()))
                })
                .await?;
            let Some(incoming) = got(reply)? else {
                return Ok(None);
            };
            let tag = incoming.delivery_tag;
            let acker = Box::new(GetAcker {
                channel: Mutex::new(Some(channel)),
                tag,
                dead,
            });
            match convert::readable(incoming) {
                Ok(readable) => return Ok(Some(readable.into_delivery(acker))),
                Err(incoming) => {
                    let event = self.set_aside(queue.as_str(), &incoming).await?;
                    acker.ack().await?;
                    self.report(event);
                }
            }
        }
    }

    /// Lists `queue`'s ready messages (taking them on a channel, then
    /// closing it puts them back in order); unreadable ones are set aside.
    pub(super) async fn list_pending(
        &self,
        queue: &ShortString,
    ) -> Result<Vec<PendingMessage>, BrokerError> {
        let target = Target::queue(queue.as_str());
        self.run("list pending in queue", &target, |link| async move {
            let channel = link.channel().await?;
            let mut messages = Vec::new();
            loop {
                let reply = channel.call(methods::basic_get(queue)).await?;
                let incoming = match got(reply) {
                    Ok(Some(incoming)) => incoming,
                    Ok(None) => break,
                    Err(error) => return Err(AmqpError::Connection(error.to_string())),
                };
                let tag = incoming.delivery_tag;
                match convert::readable(incoming) {
                    Ok(readable) => messages.push(readable.into_pending()),
                    Err(incoming) => {
                        // Left for the next consumer to set aside if this fails.
                        if let Ok(event) = self.set_aside(queue.as_str(), &incoming).await {
                            channel.send(&[methods::basic_ack(tag, false)])?;
                            self.report(event);
                        }
                    }
                }
            }
            channel.close().await?;
            Ok(messages)
        })
        .await
    }

    fn report(&self, event: PoisonEvent) {
        tracing::error!(%event, "set aside a message no consumer can be given");
        let _ = self.shared.poison.send(event);
    }

    /// Publishes a copy of a message no consumer can be given to `queue`'s
    /// dead-letter destination (its own dead-letter exchange, else
    /// `<queue>.dead`, declared here): short strings made valid (invalid
    /// sequences replaced by U+FFFD), `user-id` and `expiration` dropped,
    /// and headers saying what was wrong and where it came from. Returns
    /// once the broker confirmed the copy (the caller then acks the original).
    pub(super) async fn set_aside(
        &self,
        queue: &str,
        incoming: &Incoming,
    ) -> Result<PoisonEvent, BrokerError> {
        let mut invalid = Vec::new();
        sanitize("exchange", &incoming.exchange, &mut invalid);
        let routing_key = sanitize("routing key", &incoming.routing_key, &mut invalid);
        let Content { header, body } = &incoming.content;
        let (mut header, malformed) = match ContentHeader::parse(header) {
            Ok(mut header) => {
                invalid.extend(header.sanitize());
                (header, None)
            }
            Err(error) => (ContentHeader::default(), Some(error)),
        };
        let mut reason = String::new();
        let _ = write_fields(&mut reason, &invalid);
        if let Some(error) = &malformed {
            if !reason.is_empty() {
                reason.push_str("; ");
            }
            reason.push_str(&format!("unreadable content header: {error}"));
        }
        let dead_letter = self.topology().queues.get(queue).and_then(|options| {
            let exchange = options.dead_letter_exchange.clone()?;
            Some((exchange, options.dead_letter_routing_key.clone()))
        });
        let (exchange, key) = match dead_letter {
            Some((exchange, key)) => {
                let key = key.unwrap_or_else(|| String::from_utf8_lossy(&routing_key).into_owned());
                (exchange, key)
            }
            None => {
                let dead = format!("{queue}{}", crate::consumer::DEAD_LETTER_SUFFIX);
                let name = convert::short("dead-letter queue", &dead)?;
                let durable = QueueFlags {
                    durable: true,
                    ..QueueFlags::default()
                };
                let declare = methods::queue_declare(&name, &durable, &[]);
                self.operate("declare dead-letter queue", &Target::queue(&dead), declare)
                    .await?;
                (DEFAULT_EXCHANGE.to_owned(), dead)
            }
        };
        mark_poison(&mut header, &reason, queue);
        header.body_size = body.len() as u64;
        let encoded = header
            .encode()
            .map_err(|error| BrokerError::Invalid(format!("setting aside: {error}")))?;
        // The content header's class, weight and body size come first.
        let properties = encoded.get(12..).unwrap_or_default();
        let exchange_name = convert::short("exchange", &exchange)?;
        let key_name = convert::short("routing key", &key)?;
        let destination = format!("exchange \"{exchange}\" with key \"{key}\"");
        let deadline = self.deadline();
        let pipe = self
            .lane_link(&self.shared.publishing.state, deadline)
            .await?;
        let mandatory = exchange == DEFAULT_EXCHANGE;
        let publish = pipe.publish(&exchange_name, &key_name, mandatory, properties, body);
        let confirm = tokio::time::timeout_at(deadline, publish)
            .await
            .unwrap_or_else(|_| Confirm::Lost("no confirm in time".to_owned()));
        match confirm {
            Confirm::Acked => Ok(PoisonEvent::SetAside {
                queue: queue.to_owned(),
                fields: invalid,
                destination,
            }),
            other => Err(BrokerError::NotConfirmed {
                exchange,
                routing_key: key,
                reason: format!("setting aside a message of queue `{queue}`: {other:?}"),
            }),
        }
    }
}

/// The message a `basic.get` answer carries, if any.
fn got(reply: Reply) -> Result<Option<Incoming>, BrokerError> {
    if reply.is(CLASS_BASIC, 72) {
        return Ok(None);
    }
    let protocol = |what: String| BrokerError::Connection(format!("basic.get: {what}"));
    if !reply.is(CLASS_BASIC, 71) {
        return Err(protocol(format!(
            "answered with method {}.{}",
            reply.class, reply.method
        )));
    }
    let (delivery_tag, redelivered, exchange, routing_key) =
        convert::got(&reply.args).map_err(|e| protocol(e.to_string()))?;
    Ok(Some(Incoming {
        delivery_tag,
        redelivered,
        exchange,
        routing_key,
        content: reply.content.unwrap_or_default(),
    }))
}

/// Checks that `reply` is the basic-class method `method`.
fn expect(reply: Reply, method: u16) -> Result<Reply, AmqpError> {
    if reply.is(CLASS_BASIC, method) {
        Ok(reply)
    } else {
        Err(AmqpError::Connection(format!(
            "expected basic method {method}, got {}.{}",
            reply.class, reply.method
        )))
    }
}

/// Settles a `get`'s delivery on the channel it came on, then closes it.
struct GetAcker {
    /// Taken by the first settlement.
    channel: Mutex<Option<Channel>>,
    tag: u64,
    /// Turns true when the delivery's connection is seen dead.
    dead: watch::Receiver<bool>,
}

impl GetAcker {
    fn settle(&self, method: super::wire::Writer) -> Result<(), BrokerError> {
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(channel) = channel else {
            return Err(BrokerError::AckFailed(
                "already settled (the broker keeps the first settlement)".to_owned(),
            ));
        };
        if *self.dead.borrow() {
            return Err(BrokerError::AckFailed(
                "the connection was lost (the broker redelivers it)".to_owned(),
            ));
        }
        // Dropping the channel then closes it, after the settlement.
        channel
            .send(&[method])
            .map_err(|error| BrokerError::AckFailed(format!("{error} (the broker redelivers it)")))
    }
}

impl AckHandle for GetAcker {
    fn ack(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(std::future::ready(
            self.settle(methods::basic_ack(self.tag, false)),
        ))
    }

    fn nack(&self, requeue: bool) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(std::future::ready(
            self.settle(methods::basic_nack(self.tag, requeue)),
        ))
    }
}

impl Drop for GetAcker {
    /// An unsettled delivery goes back to its queue (as with the embedded broker).
    fn drop(&mut self) {
        let channel = self
            .channel
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(channel) = channel {
            // Failing only when the channel is gone, which requeued it already.
            let _ = channel.send(&[methods::basic_nack(self.tag, true)]);
        }
    }
}

/// Feeds a consumer's stream from its subscriptions until the stream is
/// dropped, re-subscribing after connection loss or a server-side cancel,
/// moving deliveries that overflowed, and setting aside the unreadable ones.
pub(super) async fn run_consumer(
    // Weak: dropping every broker handle closes the connection and ends the
    // stream, as with the embedded broker, even while it is consumed.
    broker: Weak<Shared>,
    mut closing: watch::Receiver<LinkState>,
    queue: ShortString,
    prefetch: u16,
    sender: Sender,
    mut subscription: Subscription,
) {
    // Unreadable deliveries being set aside (each acks its own when done).
    let mut aside = tokio::task::JoinSet::new();
    let set_aside = |aside: &mut tokio::task::JoinSet<()>, incoming, acker| {
        aside.spawn(set_aside_delivery(
            broker.clone(),
            queue.as_str().to_owned(),
            incoming,
            acker,
        ));
    };
    loop {
        let mut dead = subscription.dead.clone();
        loop {
            tokio::select! {
                _ = sender.closed() => {
                    // What the connection handed over is still set aside, and
                    // acked, before the channel closes (else it would be
                    // requeued, and wait for the next consumer).
                    while let Ok(event) = subscription.events.try_recv() {
                        if let SinkEvent::Unreadable(incoming, acker) = event {
                            set_aside(&mut aside, incoming, acker);
                        }
                    }
                    let settled = async { while aside.join_next().await.is_some() {} };
                    let _ = tokio::time::timeout(SET_ASIDE_WAIT, settled).await;
                    // Closed even while deliveries hold it: what they hold goes
                    // back to the queue now; what was settled goes out first.
                    subscription.batcher.flush();
                    let close = subscription.batcher.channel().close();
                    let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
                    return;
                }
                () = link::until_closed(&mut closing) => return,
                () = link::until_dead(&mut dead) => break,
                event = subscription.events.recv() => match event {
                    Some(SinkEvent::Unreadable(incoming, acker)) => {
                        set_aside(&mut aside, incoming, acker);
                    }
                    Some(SinkEvent::Ended(reason)) => {
                        tracing::debug!(%reason, queue = queue.as_str(), "AMQP consumer ended; subscribing again");
                        break;
                    }
                    None => break,
                },
                Some(_) = aside.join_next(), if !aside.is_empty() => {}
                () = subscription.sink.overflowed.notified() => {
                    if !move_overflow(&subscription.sink, &sender).await {
                        return;
                    }
                }
            }
        }
        let Subscription { sink, .. } = subscription;
        subscription = loop {
            let Some(shared) = broker.upgrade() else {
                return;
            };
            let broker = AmqpBroker { shared };
            let attempt = tokio::select! {
                _ = sender.closed() => return,
                attempt = broker.subscribe(&queue, prefetch, &sender) => attempt,
            };
            match attempt {
                Ok(subscription) => break subscription,
                // Still reconnecting: keep waiting; the supervisor logs the failures.
                Err(BrokerError::Connection(reason)) => {
                    tracing::debug!(%reason, queue = queue.as_str(), "AMQP consumer waiting for the broker");
                }
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
            }
        };
        // What the old subscription's sink still holds goes first.
        if !move_overflow(&sink, &sender).await {
            return;
        }
    }
}

/// Moves what overflowed into the stream, waiting for room; false once the stream is dropped.
async fn move_overflow(sink: &Sink, sender: &Sender) -> bool {
    loop {
        let Ok(permit) = sender.reserve().await else {
            return false;
        };
        let Some(delivery) = sink.overflow().pop_front() else {
            return true;
        };
        permit.send(Ok(delivery));
    }
}

/// Sets one unreadable delivery aside and acks it; if that fails, holds it
/// a moment and lets it go back to its queue (to be tried again).
async fn set_aside_delivery(
    broker: Weak<Shared>,
    queue: String,
    incoming: Incoming,
    acker: Box<dyn AckHandle>,
) {
    let Some(shared) = broker.upgrade() else {
        return; // Dropping the acker requeues it.
    };
    let broker = AmqpBroker { shared };
    match broker.set_aside(&queue, &incoming).await {
        Ok(event) => {
            if let Err(error) = acker.ack().await {
                // Redelivered, and set aside again: a duplicate, never a loss.
                tracing::debug!(%error, "acking a message set aside failed");
            }
            broker.report(event);
        }
        Err(error) => {
            let event = PoisonEvent::Unresolved {
                queues: vec![queue],
                error: error.to_string(),
            };
            tracing::error!(%event, "could not set aside a message no consumer can be given");
            let _ = broker.shared.poison.send(event);
            drop(broker);
            tokio::time::sleep(SET_ASIDE_RETRY).await;
            drop(acker);
        }
    }
}
