//! The main AMQP connection: channels for declarations, consumers, gets and
//! acks, on the tokio runtime over the lenient codec in [`wire`](super::wire)
//! (short strings are bytes here: a message whose routing key or property is
//! not UTF-8 reaches its consumer as such, to be set aside, instead of
//! breaking the connection as lapin's parser did).
//!
//! Requests that expect a reply wait for it in the order they were sent on
//! their channel (AMQP answers a channel's synchronous methods in order).
//! Deliveries go to the consumer's [`ConsumerSink`], called by the reader
//! task: sinks never block it. A channel's id is free again only once the
//! broker confirmed its close, so a late frame never reaches a new channel;
//! a broker that does not confirm it within the operation timeout is left
//! (the connection dies and is reconnected), so no id stays taken forever.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use super::config::AmqpConfig;
use super::io::{self, Wired};
use super::raw::{ClientInfo, RawConnection};
use super::wire::{
    CLASS_BASIC, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, FrameRef, Reader, ShortString, WireError,
    Writer, encode_frame_into,
};
use crate::broker::BrokerError;

const CONNECTION: u16 = 10;
const CHANNEL: u16 = 20;

/// Why a channel operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AmqpError {
    /// The broker closed the channel over this request or one sent before it
    /// on the channel: its reply code and text.
    Closed { code: u16, text: String },
    /// The channel was closed already, by this client or an earlier error.
    ChannelGone,
    /// The connection died.
    Connection(String),
    /// Every channel id the connection allows (this many) is in use.
    NoChannelId(u16),
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmqpError::Closed { code, text } => {
                write!(f, "channel closed by the broker: {code} {text}")
            }
            AmqpError::ChannelGone => f.write_str("the channel is closed"),
            AmqpError::Connection(reason) => write!(f, "connection lost: {reason}"),
            AmqpError::NoChannelId(max) => write!(
                f,
                "all {max} channel ids of the connection are in use (each consumer and \
                 unsettled `get` holds one)"
            ),
        }
    }
}

/// A method from the broker answering a request, with the content that came
/// with it (`basic.get-ok`).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) class: u16,
    pub(crate) method: u16,
    /// The arguments (after class and method ids).
    pub(crate) args: Vec<u8>,
    pub(crate) content: Option<Content>,
}

impl Reply {
    /// Reads the arguments.
    pub(crate) fn args(&self) -> Reader<'_> {
        Reader::new(&self.args)
    }

    /// Whether it is `class`.`method`.
    pub(crate) fn is(&self, class: u16, method: u16) -> bool {
        self.class == class && self.method == method
    }
}

/// A message's content as received: the content header frame's payload and the body.
#[derive(Debug, Default)]
pub(crate) struct Content {
    pub(crate) header: Vec<u8>,
    pub(crate) body: Vec<u8>,
}

/// One message delivered to a consumer.
#[derive(Debug, Default)]
pub(crate) struct Incoming {
    pub(crate) delivery_tag: u64,
    pub(crate) redelivered: bool,
    pub(crate) exchange: Vec<u8>,
    pub(crate) routing_key: Vec<u8>,
    pub(crate) content: Content,
}

/// Where a consumer's deliveries go. Called by the connection's reader
/// task: must not block (nor wait for anything).
pub(crate) trait ConsumerSink: Send + Sync {
    /// One delivery.
    fn deliver(&self, incoming: Incoming);
    /// The consumer ended: cancelled by the broker, its channel closed, or
    /// the connection died. Called once.
    fn ended(&self, reason: String);
}

type Waiter = oneshot::Sender<Result<Reply, AmqpError>>;

/// Whose message content is arriving.
enum Owner {
    /// The `basic.get` waiting first on the channel.
    Get,
    /// A consumer's delivery: its sink (`None`: no such consumer here).
    Consumer(Option<Arc<dyn ConsumerSink>>),
    /// A `basic.return`: read and dropped.
    Nobody,
}

/// A `basic.deliver` or `basic.get-ok` whose content is still arriving.
struct Partial {
    /// Whose content it is.
    owner: Owner,
    reply: Reply,
    incoming: Incoming,
    /// The body size the content header announced, once it came.
    body_size: Option<u64>,
}

#[derive(Default)]
struct ChannelState {
    /// Replies awaited, in the order their requests were sent.
    waiting: VecDeque<Waiter>,
    consumers: HashMap<String, Arc<dyn ConsumerSink>>,
    partial: Option<Partial>,
    /// This client sent `channel.close` (or is about to): nothing more is
    /// sent on it, and its id is free once the broker's `close-ok` came.
    closing: bool,
    /// When this client sent `channel.close`: a broker that does not answer
    /// within the operation timeout is left (the id would stay taken, and a
    /// caller of [`Channel::close`] wait, forever).
    close_sent: Option<Instant>,
    /// Which opening of the id this is: a [`Channel`] handle of an earlier
    /// channel with the same id (closed by the broker, the id reused) is stale.
    serial: u64,
}

struct State {
    /// Frames queued and not yet handed to the writer.
    out: Vec<u8>,
    channels: HashMap<u16, ChannelState>,
    /// Where the search for a free channel id starts.
    next_id: u16,
    /// The last channel's [`serial`](ChannelState::serial).
    serial: u64,
    /// Why the connection died, once it did.
    dead: Option<String>,
    /// This client sent `connection.close`.
    closing: bool,
    /// The `connection.close-ok` answering the broker's close: written once
    /// the connection is dead (nothing queued is sent after the close).
    farewell: Option<Vec<u8>>,
}

/// What finishing a frame asks of the reader once the connection's lock is released.
enum After {
    Nothing,
    Deliver(Arc<dyn ConsumerSink>, Incoming),
    Ended(Vec<Arc<dyn ConsumerSink>>, String),
}

/// One AMQP connection with any number of channels.
pub(crate) struct Connection {
    endpoint: String,
    /// How long the broker may take to answer a `channel.close`.
    close_timeout: Duration,
    channel_max: u16,
    frame_max: u32,
    state: Mutex<State>,
    /// Frames whose makers wait for the next write to queue them (acks,
    /// coalesced into one `multiple` ack per run meanwhile).
    deferred: Mutex<Vec<Arc<dyn Deferred>>>,
    wake_writer: Notify,
    dead: watch::Sender<bool>,
}

/// Something that queues frames just before the writer's next write.
pub(crate) trait Deferred: Send + Sync {
    /// Queues what it has (on its channel).
    fn flush(&self);
}

impl Connection {
    /// Connects to the one node `config` names, as `client` says.
    pub(crate) async fn open(
        config: &AmqpConfig,
        client: &ClientInfo,
    ) -> Result<Arc<Connection>, BrokerError> {
        let opened = RawConnection::open(config, client, false).await?;
        let connection = Arc::new(Connection {
            endpoint: config.endpoint(),
            close_timeout: config.operation_timeout(),
            channel_max: if opened.channel_max == 0 {
                u16::MAX
            } else {
                opened.channel_max
            },
            frame_max: opened.frame_max,
            state: Mutex::new(State {
                out: Vec::new(),
                channels: HashMap::new(),
                next_id: 1,
                serial: 0,
                dead: None,
                closing: false,
                farewell: None,
            }),
            deferred: Mutex::new(Vec::new()),
            wake_writer: Notify::new(),
            dead: watch::Sender::new(false),
        });
        let heartbeat = Duration::from_secs(opened.heartbeat.into());
        io::spawn(
            &connection,
            opened.io,
            opened.buffer,
            opened.frame_max,
            heartbeat,
        );
        Ok(connection)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the connection is alive.
    pub(crate) fn is_up(&self) -> bool {
        self.lock().dead.is_none()
    }

    /// Has `item` flushed just before the writer's next write (dropped
    /// unflushed once the connection is dead: there is no next write).
    pub(crate) fn defer(&self, item: Arc<dyn Deferred>) {
        if !self.is_up() {
            return;
        }
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(item);
        self.wake_writer.notify_one();
        // Died meanwhile: the writer may be gone already.
        if !self.is_up() {
            self.drop_deferred();
        }
    }

    /// Drops what waits for the writer (outside every other lock: dropping
    /// a batcher flushes it, which takes the connection's lock).
    fn drop_deferred(&self) {
        let deferred =
            std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        drop(deferred);
    }

    /// Why the connection died (empty while it lives).
    pub(crate) fn death_reason(&self) -> String {
        self.lock().dead.clone().unwrap_or_default()
    }

    /// Turns true once the connection died.
    pub(crate) fn dead_signal(&self) -> watch::Receiver<bool> {
        self.dead.subscribe()
    }

    /// Resolves once the connection died (or was closed).
    pub(crate) async fn died(&self) {
        let _ = self.dead.subscribe().wait_for(|dead| *dead).await;
    }

    /// Queues one method frame for the writer (the caller wakes it).
    fn queue(out: &mut Vec<u8>, channel: u16, method: &Writer) {
        encode_frame_into(out, FRAME_METHOD, channel, &method.0);
    }

    /// Opens a channel.
    pub(crate) async fn open_channel(self: &Arc<Self>) -> Result<Channel, AmqpError> {
        let (id, serial, reply) = {
            let mut state = self.lock();
            if let Some(reason) = &state.dead {
                return Err(AmqpError::Connection(reason.clone()));
            }
            let id = self
                .free_id(&mut state)
                .ok_or(AmqpError::NoChannelId(self.channel_max))?;
            let (waiter, reply) = oneshot::channel();
            state.serial += 1;
            let mut channel = ChannelState {
                serial: state.serial,
                ..ChannelState::default()
            };
            channel.waiting.push_back(waiter);
            state.channels.insert(id, channel);
            let mut open = Writer::method(CHANNEL, 10);
            let _ = open.short("reserved", b"");
            Self::queue(&mut state.out, id, &open);
            (id, state.serial, reply)
        };
        self.wake_writer.notify_one();
        // From here the channel is ours to close, whatever the answer.
        let channel = Channel {
            connection: self.clone(),
            id,
            serial,
        };
        let reply = reply.await.unwrap_or(Err(AmqpError::ChannelGone))?;
        if !reply.is(CHANNEL, 11) {
            let reason = format!(
                "channel.open answered with method {}.{}",
                reply.class, reply.method
            );
            self.die(reason.clone());
            return Err(AmqpError::Connection(reason));
        }
        Ok(channel)
    }

    /// The next channel id not in use, from `next_id` on (wrapping).
    fn free_id(&self, state: &mut State) -> Option<u16> {
        let max = self.channel_max;
        let mut id = state.next_id.clamp(1, max);
        for _ in 0..max {
            if !state.channels.contains_key(&id) {
                state.next_id = if id == max { 1 } else { id + 1 };
                return Some(id);
            }
            id = if id == max { 1 } else { id + 1 };
        }
        None
    }

    /// Closes the connection politely (waiting a moment for the broker's answer).
    pub(crate) async fn close(&self, text: &str) {
        {
            let mut state = self.lock();
            if state.dead.is_some() {
                return;
            }
            let mut close = Writer::method(CONNECTION, 50);
            close.u16(200);
            if close.short("reply text", text.as_bytes()).is_err() {
                let _ = close.short("reply text", b"closed by application");
            }
            close.u16(0).u16(0);
            Self::queue(&mut state.out, 0, &close);
            state.closing = true;
        }
        self.wake_writer.notify_one();
        if tokio::time::timeout(Duration::from_secs(1), self.died())
            .await
            .is_err()
        {
            self.die("closed by application".to_owned());
        }
    }

    /// Fails the channel `id` as the broker closed it: its requests, its consumers.
    fn fail_channel(channel: ChannelState, error: &AmqpError) -> Vec<Arc<dyn ConsumerSink>> {
        for waiter in channel.waiting {
            let _ = waiter.send(Err(error.clone()));
        }
        channel.consumers.into_values().collect()
    }

    /// Handles a method frame on a channel other than 0.
    fn channel_method(
        &self,
        id: u16,
        class: u16,
        method: u16,
        mut args: Reader<'_>,
    ) -> Result<After, String> {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(channel) = state.channels.get_mut(&id) else {
            tracing::debug!(
                channel = id,
                class,
                method,
                "AMQP method for a channel not open; ignored"
            );
            return Ok(After::Nothing);
        };
        if channel.partial.is_some() {
            // Content frames follow their method, nothing between them on the channel.
            return Err(format!(
                "method {class}.{method} on channel {id} while a message's content was still arriving"
            ));
        }
        let text = |e: WireError| e.to_string();
        match (class, method) {
            (CLASS_BASIC, 60) => {
                let consumer = args.short("consumer tag").map_err(text)?;
                let delivery_tag = args.u64("delivery tag").map_err(text)?;
                let redelivered = args.u8("redelivered").map_err(text)? & 1 == 1;
                let exchange = args.short("exchange").map_err(text)?.to_vec();
                let routing_key = args.short("routing key").map_err(text)?.to_vec();
                let sink = std::str::from_utf8(consumer)
                    .ok()
                    .and_then(|tag| channel.consumers.get(tag))
                    .cloned();
                Self::begin_content(channel, Owner::Consumer(sink), class, method, &[], {
                    Incoming {
                        delivery_tag,
                        redelivered,
                        exchange,
                        routing_key,
                        content: Content::default(),
                    }
                });
            }
            (CLASS_BASIC, 71) => {
                let raw = args.rest().to_vec();
                Self::begin_content(
                    channel,
                    Owner::Get,
                    class,
                    method,
                    &raw,
                    Incoming::default(),
                );
            }
            (CLASS_BASIC, 50) => {
                // A returned message: not expected here (nothing is published
                // on this connection); its content is read and dropped.
                Self::begin_content(
                    channel,
                    Owner::Nobody,
                    class,
                    method,
                    &[],
                    Incoming::default(),
                );
            }
            (CLASS_BASIC, 30) => {
                // The broker cancelled a consumer (its queue was deleted, ...).
                let tag = args.short("consumer tag").map_err(text)?.to_vec();
                let no_wait = args.u8("no-wait").unwrap_or(1) & 1 == 1;
                let tag = String::from_utf8_lossy(&tag).into_owned();
                let sink = channel.consumers.remove(&tag);
                if !no_wait && !channel.closing {
                    let mut ok = Writer::method(CLASS_BASIC, 31);
                    let _ = ok.short("consumer tag", tag.as_bytes());
                    Self::queue(&mut state.out, id, &ok);
                    self.wake_writer.notify_one();
                }
                if let Some(sink) = sink {
                    return Ok(After::Ended(
                        vec![sink],
                        "the broker cancelled the consumer".to_owned(),
                    ));
                }
            }
            (CLASS_BASIC, 80 | 120) => {
                tracing::debug!(
                    channel = id,
                    "publisher confirm on the main connection; ignored"
                );
            }
            (CHANNEL, 40) => {
                let code = args.u16("reply code").map_err(text)?;
                let reply = args.short("reply text").map_err(text)?;
                let error = AmqpError::Closed {
                    code,
                    text: String::from_utf8_lossy(reply).into_owned(),
                };
                tracing::debug!(channel = id, %error, "the broker closed an AMQP channel");
                Self::queue(&mut state.out, id, &Writer::method(CHANNEL, 41));
                self.wake_writer.notify_one();
                let closing = channel.closing;
                let channel = if closing {
                    // Our close crossed the broker's: the id stays taken
                    // until the broker answers ours.
                    std::mem::take(channel)
                } else {
                    state.channels.remove(&id).unwrap_or_default()
                };
                if let Some(kept) = state.channels.get_mut(&id) {
                    kept.closing = true;
                    kept.close_sent = channel.close_sent;
                    kept.serial = channel.serial;
                }
                let sinks = Self::fail_channel(channel, &error);
                return Ok(After::Ended(sinks, error.to_string()));
            }
            (CHANNEL, 41) => {
                if !channel.closing {
                    // The broker would keep it open, the client reuse its id.
                    return Err(format!(
                        "channel.close-ok on channel {id}, which this client did not close"
                    ));
                }
                let channel = state.channels.remove(&id).unwrap_or_default();
                let mut waiting = channel.waiting;
                // The last request sent was the close: it takes this answer.
                let last = waiting.pop_back();
                for waiter in waiting {
                    let _ = waiter.send(Err(AmqpError::ChannelGone));
                }
                if let Some(waiter) = last {
                    let _ = waiter.send(Ok(Reply {
                        class,
                        method,
                        args: Vec::new(),
                        content: None,
                    }));
                }
                let sinks: Vec<_> = channel.consumers.into_values().collect();
                return Ok(After::Ended(sinks, "the channel was closed".to_owned()));
            }
            (CHANNEL, 20) => {
                let active = args.u8("active").map_err(text)?;
                let mut ok = Writer::method(CHANNEL, 21);
                ok.u8(active);
                Self::queue(&mut state.out, id, &ok);
                self.wake_writer.notify_one();
            }
            _ => match channel.waiting.pop_front() {
                Some(waiter) => {
                    let _ = waiter.send(Ok(Reply {
                        class,
                        method,
                        args: args.rest().to_vec(),
                        content: None,
                    }));
                }
                None => {
                    return Err(format!(
                        "unexpected method {class}.{method} on channel {id} (no request waits for it)"
                    ));
                }
            },
        }
        Ok(After::Nothing)
    }

    /// Starts reading a message's content on `channel`.
    fn begin_content(
        channel: &mut ChannelState,
        owner: Owner,
        class: u16,
        method: u16,
        args: &[u8],
        incoming: Incoming,
    ) {
        channel.partial = Some(Partial {
            owner,
            reply: Reply {
                class,
                method,
                args: args.to_vec(),
                content: None,
            },
            incoming,
            body_size: None,
        });
    }

    /// Handles a content header or body frame.
    fn content(&self, id: u16, kind: u8, payload: &[u8]) -> Result<After, String> {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(channel) = state.channels.get_mut(&id) else {
            return Ok(After::Nothing);
        };
        let Some(partial) = channel.partial.as_mut() else {
            return Err(format!("content frame on channel {id} without a message"));
        };
        match (kind, partial.body_size) {
            (FRAME_HEADER, None) => {
                let mut header = Reader::new(payload);
                header.u16("content class").map_err(|e| e.to_string())?;
                header.u16("content weight").map_err(|e| e.to_string())?;
                let size = header.u64("body size").map_err(|e| e.to_string())?;
                partial.body_size = Some(size);
                partial.incoming.content.header = payload.to_vec();
                // Bodies arrive in frames: no more than one frame's room up front.
                let room = usize::try_from(size).unwrap_or(usize::MAX);
                partial
                    .incoming
                    .content
                    .body
                    .reserve_exact(room.min(self.frame_max as usize));
            }
            (FRAME_BODY, Some(size)) => {
                let body = &mut partial.incoming.content.body;
                if (body.len() + payload.len()) as u64 > size {
                    return Err(format!(
                        "message body on channel {id} longer than the {size} bytes announced"
                    ));
                }
                body.extend_from_slice(payload);
            }
            _ => {
                return Err(format!(
                    "content frame of type {kind} out of order on channel {id}"
                ));
            }
        }
        if partial.body_size != Some(partial.incoming.content.body.len() as u64) {
            return Ok(After::Nothing);
        }
        let Some(partial) = channel.partial.take() else {
            return Ok(After::Nothing);
        };
        match partial.owner {
            Owner::Get => {
                let Partial {
                    mut reply,
                    incoming,
                    ..
                } = partial;
                reply.content = Some(incoming.content);
                match channel.waiting.pop_front() {
                    Some(waiter) => {
                        let _ = waiter.send(Ok(reply));
                    }
                    None => {
                        return Err(format!(
                            "basic.get-ok on channel {id} that no request waits for"
                        ));
                    }
                }
                Ok(After::Nothing)
            }
            Owner::Nobody => Ok(After::Nothing),
            // Sent before the broker saw our close, which requeues it.
            Owner::Consumer(_) if channel.closing => Ok(After::Nothing),
            Owner::Consumer(sink) => match sink {
                Some(sink) => Ok(After::Deliver(sink, partial.incoming)),
                None => {
                    // Its consumer is gone (cancelled here): back to the queue.
                    let mut reject = Writer::method(CLASS_BASIC, 90);
                    reject.u64(partial.incoming.delivery_tag).u8(1);
                    Self::queue(&mut state.out, id, &reject);
                    self.wake_writer.notify_one();
                    Ok(After::Nothing)
                }
            },
        }
    }

    /// Handles a method on channel 0.
    fn connection_method(
        &self,
        class: u16,
        method: u16,
        mut args: Reader<'_>,
    ) -> Result<(), String> {
        match (class, method) {
            (CONNECTION, 50) => {
                // Queued frames die with the connection: the writer sends the close-ok last.
                let (close_ok, reason) = io::closed_by_broker(args);
                self.lock().farewell = Some(close_ok);
                Err(reason)
            }
            (CONNECTION, 51) if self.lock().closing => Err("closed by application".to_owned()),
            (CONNECTION, 51) => {
                Err("connection.close-ok, but this client did not close the connection".to_owned())
            }
            (CONNECTION, 60) => {
                let reason = args
                    .short("reason")
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_default();
                tracing::warn!(endpoint = %self.endpoint, %reason, "RabbitMQ blocks the AMQP connection");
                Ok(())
            }
            (CONNECTION, 61) => {
                tracing::info!(endpoint = %self.endpoint, "RabbitMQ unblocked the AMQP connection");
                Ok(())
            }
            _ => {
                tracing::debug!(class, method, "unexpected AMQP connection method; ignored");
                Ok(())
            }
        }
    }

    fn finish(after: After) {
        match after {
            After::Nothing => {}
            After::Deliver(sink, incoming) => sink.deliver(incoming),
            After::Ended(sinks, reason) => {
                for sink in sinks {
                    sink.ended(reason.clone());
                }
            }
        }
    }
}

impl Wired for Connection {
    /// The writer swaps the queued bytes whole: nothing to keep.
    type WriterScratch = ();
    /// Frames are handled in place: nothing to keep.
    type ReaderScratch = ();

    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    fn writer_wake(&self) -> &Notify {
        &self.wake_writer
    }

    fn dead_signal(&self) -> watch::Receiver<bool> {
        self.dead.subscribe()
    }

    fn farewell(&self) -> Option<Vec<u8>> {
        self.lock().farewell.take()
    }

    fn timers(&self, now: Instant, wake_at: Option<Instant>) -> Result<Option<Instant>, String> {
        let state = self.lock();
        let oldest_close = state
            .channels
            .iter()
            .filter_map(|(id, channel)| Some((*id, channel.close_sent?)))
            .min_by_key(|(_, sent)| *sent);
        let Some((id, sent)) = oldest_close else {
            return Ok(wake_at);
        };
        let due = sent + self.close_timeout;
        if now >= due {
            return Err(format!(
                "{} did not answer channel.close on channel {id} within {:?}",
                self.endpoint, self.close_timeout
            ));
        }
        Ok(Some(wake_at.map_or(due, |at| at.min(due))))
    }

    fn take_queued(&self, batch: &mut Vec<u8>, _: &mut ()) -> bool {
        // Outside the connection's lock: a flush takes its own, then this one.
        let deferred =
            std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        for item in deferred {
            item.flush();
        }
        let mut state = self.lock();
        if state.dead.is_some() {
            return false;
        }
        std::mem::swap(&mut state.out, batch);
        true
    }

    fn die(&self, reason: String) {
        let channels = {
            let mut state = self.lock();
            if state.dead.is_some() {
                return;
            }
            state.dead = Some(reason.clone());
            state.out = Vec::new();
            std::mem::take(&mut state.channels)
        };
        self.wake_writer.notify_one();
        self.dead.send_replace(true);
        let error = AmqpError::Connection(reason.clone());
        for channel in channels.into_values() {
            for sink in Self::fail_channel(channel, &error) {
                sink.ended(reason.clone());
            }
        }
        // Nothing will be written: what waited for the writer lets go (it
        // holds channels, and they this connection). Later deferrals are
        // dropped by the writer's last look, or here when it is gone.
        self.drop_deferred();
    }

    fn handle(&self, frame: FrameRef<'_>, _: &mut ()) -> Result<(), String> {
        let after = match frame.kind {
            FRAME_METHOD => {
                let (class, method, args) = frame.method().map_err(|e| e.to_string())?;
                if frame.channel == 0 {
                    self.connection_method(class, method, args)?;
                    After::Nothing
                } else {
                    self.channel_method(frame.channel, class, method, args)?
                }
            }
            FRAME_HEADER | FRAME_BODY => self.content(frame.channel, frame.kind, frame.payload)?,
            // Heartbeats: hearing anything is what counts.
            _ => After::Nothing,
        };
        Self::finish(after);
        Ok(())
    }
}

/// One channel; dropping it closes it (without waiting for the broker).
pub(crate) struct Channel {
    connection: Arc<Connection>,
    id: u16,
    /// Its [`ChannelState::serial`]: once the broker closed it, its id may
    /// be another channel's.
    serial: u64,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel").field("id", &self.id).finish()
    }
}

impl Channel {
    /// Has `item` flush just before the connection's next write.
    pub(crate) fn defer(&self, item: Arc<dyn Deferred>) {
        self.connection.defer(item);
    }

    /// Whether it is open: not closed by either side, its connection alive.
    pub(crate) fn is_open(&self) -> bool {
        let state = self.connection.lock();
        state.dead.is_none()
            && state
                .channels
                .get(&self.id)
                .is_some_and(|channel| channel.serial == self.serial && !channel.closing)
    }

    /// Sends `method` and waits for the broker's answer.
    pub(crate) async fn call(&self, method: Writer) -> Result<Reply, AmqpError> {
        let reply = {
            let mut state = self.connection.lock();
            let (waiter, reply) = oneshot::channel();
            open_state(&mut state, self.id, self.serial)?
                .waiting
                .push_back(waiter);
            Connection::queue(&mut state.out, self.id, &method);
            reply
        };
        self.connection.wake_writer.notify_one();
        reply.await.unwrap_or(Err(AmqpError::ChannelGone))
    }

    /// Sends methods that have no answer (acks, nacks), in order.
    pub(crate) fn send(&self, methods: &[Writer]) -> Result<(), AmqpError> {
        {
            let mut state = self.connection.lock();
            open_state(&mut state, self.id, self.serial)?;
            for method in methods {
                Connection::queue(&mut state.out, self.id, method);
            }
        }
        self.connection.wake_writer.notify_one();
        Ok(())
    }

    /// Starts a consumer of `queue` tagged `tag` whose deliveries go to `sink`.
    pub(crate) async fn consume(
        &self,
        queue: &ShortString,
        tag: &str,
        sink: Arc<dyn ConsumerSink>,
    ) -> Result<(), AmqpError> {
        let mut consume = Writer::method(CLASS_BASIC, 20);
        consume.u16(0);
        let bytes = queue.as_str().as_bytes();
        // A short string by construction.
        consume.u8(bytes.len() as u8).0.extend_from_slice(bytes);
        consume
            .short("consumer tag", tag.as_bytes())
            .map_err(|error| AmqpError::Connection(error.to_string()))?;
        // no-local, no-ack, exclusive, no-wait: all off.
        consume.u8(0).long(&[]);
        {
            // Registered first: deliveries may follow consume-ok at once.
            let mut state = self.connection.lock();
            open_state(&mut state, self.id, self.serial)?
                .consumers
                .insert(tag.to_owned(), sink);
        }
        let result = self.call(consume).await;
        if !matches!(&result, Ok(reply) if reply.is(CLASS_BASIC, 21)) {
            let mut state = self.connection.lock();
            if let Some(channel) = state.channels.get_mut(&self.id)
                && channel.serial == self.serial
            {
                channel.consumers.remove(tag);
            }
        }
        match result {
            Ok(reply) if reply.is(CLASS_BASIC, 21) => Ok(()),
            Ok(reply) => Err(AmqpError::Connection(format!(
                "basic.consume answered with method {}.{}",
                reply.class, reply.method
            ))),
            Err(error) => Err(error),
        }
    }

    /// Closes the channel and waits for the broker's answer (what it holds
    /// unacknowledged goes back to its queues).
    pub(crate) async fn close(&self) -> Result<(), AmqpError> {
        let reply = {
            let mut state = self.connection.lock();
            let channel = open_state(&mut state, self.id, self.serial)?;
            channel.closing = true;
            channel.close_sent = Some(Instant::now());
            let (waiter, reply) = oneshot::channel();
            channel.waiting.push_back(waiter);
            Connection::queue(&mut state.out, self.id, &close_method());
            reply
        };
        self.connection.wake_writer.notify_one();
        reply.await.unwrap_or(Err(AmqpError::ChannelGone)).map(drop)
    }
}

/// The state of open channel `id` opened as `serial`, or why there is none.
fn open_state(state: &mut State, id: u16, serial: u64) -> Result<&mut ChannelState, AmqpError> {
    if let Some(reason) = &state.dead {
        return Err(AmqpError::Connection(reason.clone()));
    }
    match state.channels.get_mut(&id) {
        Some(channel) if channel.serial == serial && !channel.closing => Ok(channel),
        _ => Err(AmqpError::ChannelGone),
    }
}

fn close_method() -> Writer {
    let mut close = Writer::method(CHANNEL, 40);
    close.u16(200);
    let _ = close.short("reply text", b"done");
    close.u16(0).u16(0);
    close
}

impl Drop for Channel {
    fn drop(&mut self) {
        let mut state = self.connection.lock();
        if state.dead.is_some() {
            return;
        }
        let Some(channel) = state.channels.get_mut(&self.id) else {
            return;
        };
        if channel.serial != self.serial || channel.closing {
            return;
        }
        channel.closing = true;
        channel.close_sent = Some(Instant::now());
        Connection::queue(&mut state.out, self.id, &close_method());
        drop(state);
        self.connection.wake_writer.notify_one();
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
