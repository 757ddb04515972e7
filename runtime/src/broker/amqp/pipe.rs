//! The publishing connection: AMQP 0-9-1 on the tokio runtime itself.
//!
//! lapin runs each connection's I/O on a thread of its own, so every publish
//! and every confirm crossed threads; the wake-ups were more than half of a
//! publish's CPU. This connection is two tasks on the caller's runtime over
//! the lenient codec in [`wire`](super::wire): a writer that sends what
//! publishers queued, as one write per batch, and a reader that settles
//! publishes from the broker's confirms. It only publishes: one channel in
//! confirm mode, reopened when the broker closes it.
//!
//! A publish holds a slot from the moment its frames are queued until its
//! confirm (or the failure that makes one impossible) arrives: nothing
//! queued is ever forgotten without telling its publisher.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use super::config::AmqpConfig;
use super::convert::short;
use super::link::{LinkState, Supervised, close_lane, set_down, until_closed};
use super::raw::{ClientInfo, RawConnection, RawIo};
use super::wire::{
    CLASS_BASIC, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, Frame, Reader, ShortString, Writer,
};
use crate::broker::{BrokerError, OutgoingMessage};

const CONNECTION: u16 = 10;
const CHANNEL: u16 = 20;
const CONFIRM: u16 = 85;
const FRAME_END: u8 = 0xCE;
const HEARTBEAT_FRAME: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, FRAME_END];

/// Publishers wait while this much is queued for the writer: memory stays
/// bounded however many publishes are in flight (each keeps its body for a
/// resend anyway), and a connection RabbitMQ blocks does not grow it.
const QUEUED_MAX: usize = 256 * 1024;

/// A write buffer larger than this is not kept for the next batch.
const WRITE_BUFFER_KEPT: usize = 1 << 20;

/// What became of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Confirm {
    Acked,
    /// Returned as unroutable (a mandatory publish), with the broker's reply text.
    Returned(String),
    /// Refused by the broker (`basic.nack`: a full queue with `reject-publish`).
    Nacked,
    /// The broker closed the channel before confirming it (this publish's
    /// error, or another one's sent with it).
    ChannelClosed {
        code: u16,
        text: String,
    },
    /// The connection died first: the message may or may not have reached the broker.
    Lost(String),
}

/// One publish waiting for its confirm.
struct Slot {
    /// `None` once settled (a confirm may settle a later slot first).
    waiter: Option<oneshot::Sender<Confirm>>,
    /// A mandatory publish's fingerprint of exchange and routing key, to
    /// match the broker's `basic.return` (which carries no delivery tag) to it.
    returnable: Option<u64>,
    /// The reply text of the `basic.return` matched to it; the confirm follows.
    returned: Option<String>,
}

struct State {
    /// Frames queued and not yet handed to the writer.
    out: Vec<u8>,
    channel: u16,
    /// Whether `channel` is open in confirm mode (not while it is reopened).
    ready: bool,
    /// Since when the channel is being reopened, if it is.
    reopening: Option<Instant>,
    /// The delivery tag of `pending[0]`.
    first_tag: u64,
    pending: VecDeque<Slot>,
    /// Why the connection died, once it did.
    dead: Option<String>,
}

/// One publishing connection.
pub(crate) struct Pipe {
    /// Counts publishing connections made by this broker: 1 for the first.
    pub(crate) generation: u64,
    /// The configuration's node reached (its number, and that node's configuration alone).
    pub(crate) node: usize,
    pub(crate) node_config: AmqpConfig,
    frame_max: usize,
    /// For matching returns to slots; fixed per connection.
    hasher: std::collections::hash_map::RandomState,
    state: Mutex<State>,
    /// Wakes the writer: frames queued, or the connection died.
    wake_writer: Notify,
    /// Wakes publishers waiting for the channel to be ready, for room in
    /// the queue, or for the death.
    room: Notify,
    /// Since when and why the broker blocks this connection (a resource alarm), if it does.
    blocked: Mutex<Option<(Instant, String)>>,
    dead: watch::Sender<bool>,
}

impl Supervised for Pipe {
    fn is_up(&self) -> bool {
        self.lock().dead.is_none()
    }
}

impl Pipe {
    /// Connects to the one node `config` names (number `node`) and opens the confirm channel.
    async fn open(
        config: AmqpConfig,
        node: usize,
        generation: u64,
    ) -> Result<Arc<Pipe>, BrokerError> {
        let client = ClientInfo {
            connection_name: Some(format!("{} (publish)", config.connection_name())),
            heartbeat: u16::try_from(config.heartbeat().as_secs()).unwrap_or(u16::MAX),
        };
        let opening = async {
            RawConnection::connect_node(&config, &client)
                .await?
                .into_confirm_channel()
                .await
        };
        let opened = match tokio::time::timeout(config.connect_timeout(), opening).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(BrokerError::Connection(format!(
                    "cannot connect to {} as `{}`: no answer within {:?}",
                    config.endpoint(),
                    config.username(),
                    config.connect_timeout()
                )));
            }
        };
        let (reader, writer) = opened.io.split();
        let pipe = Arc::new(Pipe {
            generation,
            node,
            frame_max: opened.frame_max as usize,
            node_config: config,
            hasher: Default::default(),
            state: Mutex::new(State {
                out: Vec::new(),
                channel: opened.channel,
                ready: true,
                reopening: None,
                first_tag: 1,
                pending: VecDeque::new(),
                dead: None,
            }),
            wake_writer: Notify::new(),
            room: Notify::new(),
            blocked: Mutex::new(None),
            dead: watch::Sender::new(false),
        });
        let heartbeat = Duration::from_secs(opened.heartbeat.into());
        tokio::spawn(write_loop(pipe.clone(), writer, heartbeat));
        tokio::spawn(read_loop(pipe.clone(), reader, opened.buffer, heartbeat));
        Ok(pipe)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Since when and why the broker blocks this connection, if it does.
    pub(crate) fn blocked(&self) -> Option<(Instant, String)> {
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_blocked(&self, reason: Option<String>) {
        let endpoint = self.node_config.endpoint();
        match &reason {
            Some(reason) => {
                tracing::warn!(%endpoint, %reason, "RabbitMQ blocks the publishing connection")
            }
            None => tracing::info!(%endpoint, "RabbitMQ unblocked the publishing connection"),
        }
        *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) =
            reason.map(|reason| (Instant::now(), reason));
    }

    /// Resolves once the connection has died (or was closed).
    pub(crate) async fn died(&self) {
        let _ = self.dead.subscribe().wait_for(|dead| *dead).await;
    }

    fn death_reason(&self) -> String {
        self.lock().dead.clone().unwrap_or_default()
    }

    /// Publishes one message and waits for the broker's confirm.
    /// `properties`: the content header's property flags and values
    /// ([`encode_properties`]).
    pub(crate) async fn publish(
        &self,
        exchange: &ShortString,
        routing_key: &ShortString,
        mandatory: bool,
        properties: &[u8],
        body: &[u8],
    ) -> Confirm {
        let returnable = mandatory.then(|| {
            self.fingerprint(
                exchange.as_str().as_bytes(),
                routing_key.as_str().as_bytes(),
            )
        });
        let confirm = loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(reason) = &state.dead {
                    return Confirm::Lost(reason.clone());
                }
                if state.ready && state.out.len() < QUEUED_MAX {
                    let (waiter, confirm) = oneshot::channel();
                    state.pending.push_back(Slot {
                        waiter: Some(waiter),
                        returnable,
                        returned: None,
                    });
                    let channel = state.channel;
                    let publish = PublishFrames {
                        channel,
                        exchange: exchange.as_str().as_bytes(),
                        routing_key: routing_key.as_str().as_bytes(),
                        mandatory,
                        properties,
                        body,
                    };
                    publish.encode(&mut state.out, self.frame_max);
                    break confirm;
                }
            }
            room.await;
        };
        self.wake_writer.notify_one();
        confirm
            .await
            .unwrap_or_else(|_| Confirm::Lost("the publishing connection closed".to_owned()))
    }

    fn fingerprint(&self, exchange: &[u8], routing_key: &[u8]) -> u64 {
        self.hasher.hash_one((exchange, routing_key))
    }

    /// Queues control frames for the writer.
    fn send(&self, state: &mut State, channel: u16, method: Writer) {
        state
            .out
            .extend_from_slice(&Frame::encode(FRAME_METHOD, channel, &method.0));
        self.wake_writer.notify_one();
    }

    /// Marks the connection dead (once): every waiting publish is told, the writer stops.
    fn die(&self, reason: String) {
        {
            let mut state = self.lock();
            if state.dead.is_some() {
                return;
            }
            for slot in state.pending.drain(..) {
                if let Some(waiter) = slot.waiter {
                    let _ = waiter.send(Confirm::Lost(reason.clone()));
                }
            }
            state.out = Vec::new();
            state.dead = Some(reason);
        }
        self.room.notify_waiters();
        self.wake_writer.notify_one();
        self.dead.send_replace(true);
    }

    /// Closes the connection politely (waiting a moment for the broker's answer).
    pub(crate) async fn close(&self) {
        {
            let mut state = self.lock();
            if state.dead.is_some() {
                return;
            }
            let mut close = Writer::method(CONNECTION, 50);
            close.u16(200);
            // A short constant: cannot fail.
            let _ = close.short("reply text", b"closed by application");
            close.u16(0).u16(0);
            self.send(&mut state, 0, close);
        }
        if tokio::time::timeout(Duration::from_secs(1), self.died())
            .await
            .is_err()
        {
            self.die("closed by application".to_owned());
        }
    }

    /// Settles the slot of `tag` (and all before it, if `multiple`).
    fn settle(&self, tag: u64, multiple: bool, acked: bool) {
        let mut state = self.lock();
        let state = &mut *state;
        if tag < state.first_tag {
            return; // Settled already.
        }
        let index = (tag - state.first_tag) as usize;
        if index >= state.pending.len() {
            tracing::debug!(tag, "confirm for a delivery tag never sent; ignored");
            return;
        }
        let first = if multiple { 0 } else { index };
        for slot in state.pending.range_mut(first..=index) {
            if let Some(waiter) = slot.waiter.take() {
                let confirm = match (acked, slot.returned.take()) {
                    (true, Some(text)) => Confirm::Returned(text),
                    (true, None) => Confirm::Acked,
                    (false, _) => Confirm::Nacked,
                };
                let _ = waiter.send(confirm);
            }
        }
        while state
            .pending
            .front()
            .is_some_and(|slot| slot.waiter.is_none())
        {
            state.pending.pop_front();
            state.first_tag += 1;
        }
    }

    /// Matches a `basic.return` to the oldest unsettled mandatory publish to that exchange and key.
    fn returned(&self, exchange: &[u8], routing_key: &[u8], text: String) {
        let fingerprint = self.fingerprint(exchange, routing_key);
        let mut state = self.lock();
        let slot = state.pending.iter_mut().find(|slot| {
            slot.waiter.is_some() && slot.returned.is_none() && slot.returnable == Some(fingerprint)
        });
        match slot {
            Some(slot) => slot.returned = Some(text),
            None => tracing::debug!("basic.return matching no mandatory publish; ignored"),
        }
    }

    /// The broker closed the channel: fails what waits on it and opens it again.
    fn channel_closed(&self, code: u16, text: String) {
        let mut state = self.lock();
        for slot in state.pending.drain(..) {
            if let Some(waiter) = slot.waiter {
                let _ = waiter.send(Confirm::ChannelClosed {
                    code,
                    text: text.clone(),
                });
            }
        }
        state.first_tag = 1;
        // Frames queued for the closed channel belong to the publishes just failed.
        state.out.clear();
        state.ready = false;
        state.reopening = Some(Instant::now());
        let channel = state.channel;
        self.send(&mut state, channel, Writer::method(CHANNEL, 41));
        let mut open = Writer::method(CHANNEL, 10);
        let _ = open.short("reserved", b"");
        self.send(&mut state, channel, open);
    }

    /// Handles one frame from the broker; `Err` ends the connection.
    fn handle(&self, frame: &Frame) -> Result<(), String> {
        if frame.kind != FRAME_METHOD {
            // Heartbeats; the content of a returned message (its method says all we need).
            return Ok(());
        }
        let (class, method, mut args) = frame.method().map_err(|e| e.to_string())?;
        let closing = |args: &mut Reader<'_>| -> Result<(u16, String), String> {
            let code = args.u16("reply code").map_err(|e| e.to_string())?;
            let text = args.short("reply text").map_err(|e| e.to_string())?;
            Ok((code, String::from_utf8_lossy(text).into_owned()))
        };
        let channel = self.lock().channel;
        match (frame.channel, class, method) {
            (0, CONNECTION, 50) => {
                let (code, text) = closing(&mut args)?;
                let mut state = self.lock();
                self.send(&mut state, 0, Writer::method(CONNECTION, 51));
                drop(state);
                return Err(format!("the broker closed the connection: {code} {text}"));
            }
            (0, CONNECTION, 51) => return Err("closed by application".to_owned()),
            (0, CONNECTION, 60) => {
                let reason = args.short("reason").map_err(|e| e.to_string())?;
                self.set_blocked(Some(String::from_utf8_lossy(reason).into_owned()));
            }
            (0, CONNECTION, 61) => self.set_blocked(None),
            (ours, CLASS_BASIC, 80 | 120) if ours == channel => {
                let tag = args.u64("delivery tag").map_err(|e| e.to_string())?;
                let multiple = args.u8("multiple").map_err(|e| e.to_string())? & 1 == 1;
                self.settle(tag, multiple, method == 80);
            }
            (ours, CLASS_BASIC, 50) if ours == channel => {
                let (code, text) = closing(&mut args)?;
                let exchange = args.short("exchange").map_err(|e| e.to_string())?;
                let routing_key = args.short("routing key").map_err(|e| e.to_string())?;
                self.returned(exchange, routing_key, format!("{code} {text}"));
            }
            (ours, CHANNEL, 40) if ours == channel => {
                let (code, text) = closing(&mut args)?;
                if !self.lock().ready {
                    // Refused while being reopened: reopening again at once
                    // could go on forever; a new connection comes with backoff.
                    return Err(format!(
                        "the broker closed the publishing channel while it was being opened: {code} {text}"
                    ));
                }
                tracing::debug!(code, %text, "the broker closed the publishing channel; reopening it");
                self.channel_closed(code, text);
            }
            (ours, CHANNEL, 11) if ours == channel => {
                let mut state = self.lock();
                let mut select = Writer::method(CONFIRM, 10);
                select.u8(0);
                self.send(&mut state, channel, select);
            }
            (ours, CONFIRM, 11) if ours == channel => {
                let mut state = self.lock();
                state.ready = true;
                state.reopening = None;
                drop(state);
                self.room.notify_waiters();
            }
            (ours, CHANNEL, 20) if ours == channel => {
                let active = args.u8("active").map_err(|e| e.to_string())?;
                let mut state = self.lock();
                let mut flow_ok = Writer::method(CHANNEL, 21);
                flow_ok.u8(active);
                self.send(&mut state, channel, flow_ok);
            }
            (on, class, method) => {
                tracing::debug!(
                    channel = on,
                    class,
                    method,
                    "unexpected AMQP method on the publishing connection; ignored"
                );
            }
        }
        Ok(())
    }
}

/// The frames of one `basic.publish`.
struct PublishFrames<'a> {
    channel: u16,
    exchange: &'a [u8],
    routing_key: &'a [u8],
    mandatory: bool,
    properties: &'a [u8],
    body: &'a [u8],
}

impl PublishFrames<'_> {
    /// Appends the method, header and body frames to `out` (short strings
    /// are at most 255 bytes: they come as [`ShortString`]s).
    fn encode(&self, out: &mut Vec<u8>, frame_max: usize) {
        let start_frame = |out: &mut Vec<u8>, kind: u8, size: usize| {
            out.push(kind);
            out.extend_from_slice(&self.channel.to_be_bytes());
            // Sizes here are bounded by frame_max (a u32).
            out.extend_from_slice(&(size as u32).to_be_bytes());
        };
        let method_size = 2 + 2 + 2 + 1 + self.exchange.len() + 1 + self.routing_key.len() + 1;
        start_frame(out, FRAME_METHOD, method_size);
        out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        out.extend_from_slice(&40u16.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.push(self.exchange.len() as u8);
        out.extend_from_slice(self.exchange);
        out.push(self.routing_key.len() as u8);
        out.extend_from_slice(self.routing_key);
        out.push(u8::from(self.mandatory));
        out.push(FRAME_END);

        start_frame(out, FRAME_HEADER, 12 + self.properties.len());
        out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(self.body.len() as u64).to_be_bytes());
        out.extend_from_slice(self.properties);
        out.push(FRAME_END);

        // Frame overhead is 8 bytes; frame_max is at least 4,096 on RabbitMQ.
        for piece in self.body.chunks(frame_max.saturating_sub(8).max(1)) {
            start_frame(out, FRAME_BODY, piece.len());
            out.extend_from_slice(piece);
            out.push(FRAME_END);
        }
    }
}

/// The property flags and values of a message's content header; its CC
/// keys go under `cc_header`. Fails on reserved headers and over-long strings.
pub(crate) fn encode_properties(
    message: &OutgoingMessage,
    cc_header: &str,
) -> Result<Vec<u8>, BrokerError> {
    // Checked in the order both brokers check (content type, message id,
    // reserved header names, header names, CC keys).
    if let Some(content_type) = &message.content_type {
        short("content type", content_type)?;
    }
    if let Some(message_id) = &message.message_id {
        short("message id", message_id)?;
    }
    message.check_headers()?;
    let invalid = |error: super::wire::WireError| BrokerError::Invalid(error.to_string());
    let long = |out: &mut Vec<u8>, value: &[u8]| -> Result<(), BrokerError> {
        let len = u32::try_from(value.len())
            .map_err(|_| BrokerError::Invalid("header value over 4 GiB".to_owned()))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(value);
        Ok(())
    };
    let mut flags = 0u16;
    let mut values = Writer::default();
    // Flag bits in property order: content-type 15, headers 13, delivery-mode 12, message-id 7.
    if let Some(content_type) = &message.content_type {
        flags |= 1 << 15;
        values
            .short("content type", content_type.as_bytes())
            .map_err(invalid)?;
    }
    let mut table = Vec::new();
    for (name, value) in &message.headers {
        short("header name", name)?;
        table.push(name.len() as u8);
        table.extend_from_slice(name.as_bytes());
        table.push(b'S');
        long(&mut table, value.as_bytes())?;
    }
    if !message.cc.is_empty() {
        short("CC header", cc_header)?;
        let mut keys = Vec::new();
        for key in &message.cc {
            // Routing keys are short strings; check now rather than have RabbitMQ ignore the key.
            short("CC routing key", key)?;
            keys.push(b'S');
            long(&mut keys, key.as_bytes())?;
        }
        table.push(cc_header.len() as u8);
        table.extend_from_slice(cc_header.as_bytes());
        table.push(b'A');
        long(&mut table, &keys)?;
    }
    if !table.is_empty() {
        flags |= 1 << 13;
        long(&mut values.0, &table)?;
    }
    flags |= 1 << 12;
    values.u8(if message.persistent { 2 } else { 1 });
    if let Some(message_id) = &message.message_id {
        flags |= 1 << 7;
        values
            .short("message id", message_id.as_bytes())
            .map_err(invalid)?;
    }
    let mut properties = flags.to_be_bytes().to_vec();
    properties.extend_from_slice(&values.0);
    Ok(properties)
}

/// Sends what publishers queued: everything queued since the last write, in one write.
async fn write_loop(pipe: Arc<Pipe>, mut writer: WriteHalf<Box<dyn RawIo>>, heartbeat: Duration) {
    let mut batch = Vec::new();
    let mut dead = pipe.dead.subscribe();
    // Heartbeats at half the negotiated interval, when nothing else was sent.
    let idle = (!heartbeat.is_zero()).then(|| heartbeat / 2);
    loop {
        let woken = match idle {
            Some(idle) => tokio::time::timeout(idle, pipe.wake_writer.notified())
                .await
                .is_ok(),
            None => {
                pipe.wake_writer.notified().await;
                true
            }
        };
        {
            let mut state = pipe.lock();
            if state.dead.is_some() {
                break;
            }
            std::mem::swap(&mut state.out, &mut batch);
        }
        if batch.len() >= QUEUED_MAX {
            pipe.room.notify_waiters();
        }
        if batch.is_empty() {
            if woken {
                continue;
            }
            batch.extend_from_slice(&HEARTBEAT_FRAME);
        }
        let written = async {
            writer.write_all(&batch).await?;
            writer.flush().await
        };
        // A write stuck on a peer that stopped reading ends when the reader
        // declares the connection dead (silence), not when TCP gives up.
        let written = tokio::select! {
            written = written => written,
            _ = dead.wait_for(|dead| *dead) => break,
        };
        if let Err(error) = written {
            pipe.die(format!(
                "writing to {}: {error}",
                pipe.node_config.endpoint()
            ));
            break;
        }
        batch.clear();
        if batch.capacity() > WRITE_BUFFER_KEPT {
            batch = Vec::new();
        }
    }
    let _ = writer.close().await;
}

/// Reads the broker's frames until the connection ends, or goes silent
/// longer than two heartbeat intervals.
async fn read_loop(
    pipe: Arc<Pipe>,
    mut reader: ReadHalf<Box<dyn RawIo>>,
    mut buffer: Vec<u8>,
    heartbeat: Duration,
) {
    let endpoint = pipe.node_config.endpoint();
    let frame_max = u32::try_from(pipe.frame_max).unwrap_or(u32::MAX);
    let silence = (!heartbeat.is_zero()).then(|| heartbeat * 2);
    let mut start = 0;
    let mut chunk = vec![0; 64 * 1024];
    let mut dead = pipe.dead.subscribe();
    let reason = 'connection: loop {
        loop {
            match Frame::parse(&buffer[start..], frame_max) {
                Ok(Some((frame, used))) => {
                    start += used;
                    if let Err(reason) = pipe.handle(&frame) {
                        break 'connection reason;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    break 'connection format!("malformed frame from {endpoint}: {error}");
                }
            }
        }
        buffer.drain(..start);
        start = 0;
        // Silence past two heartbeats ends the connection, and so does a
        // channel the broker does not reopen within the connect timeout.
        let now = Instant::now();
        let silent_at = silence.map(|silence| now + silence);
        let reopened_by = pipe
            .lock()
            .reopening
            .map(|since| since + pipe.node_config.connect_timeout());
        let wake_at = silent_at.into_iter().chain(reopened_by).min();
        let read = async {
            match wake_at {
                Some(at) => tokio::time::timeout_at(at, reader.read(&mut chunk))
                    .await
                    .ok(),
                None => Some(reader.read(&mut chunk).await),
            }
        };
        // A connection that died elsewhere (the writer failed) stops reading too.
        let read = tokio::select! {
            read = read => read,
            _ = dead.wait_for(|dead| *dead) => return,
        };
        match read {
            Some(Ok(0)) => break format!("{endpoint} closed the connection"),
            Some(Ok(read)) => buffer.extend_from_slice(&chunk[..read]),
            Some(Err(error)) => break format!("reading from {endpoint}: {error}"),
            None => {
                let now = Instant::now();
                if reopened_by.is_some_and(|by| now >= by) && pipe.lock().reopening.is_some() {
                    break format!(
                        "{endpoint} did not reopen the publishing channel within {:?}",
                        pipe.node_config.connect_timeout()
                    );
                }
                if let (Some(at), Some(silence)) = (silent_at, silence)
                    && now >= at
                {
                    break format!("no heartbeat from {endpoint} for {silence:?}");
                }
            }
        }
    };
    pipe.die(reason);
}

/// The publishing connection's state and its supervisor's counters.
pub(crate) struct PublishLane {
    pub(crate) state: Arc<watch::Sender<LinkState<Pipe>>>,
    pub(crate) recoveries: Arc<AtomicU64>,
}

impl PublishLane {
    /// Connects (one attempt) and starts the supervisor that reconnects after a loss.
    pub(crate) async fn start(config: &AmqpConfig) -> Result<PublishLane, BrokerError> {
        let pipe = open(config, 1, 0).await?;
        let lane = PublishLane {
            state: Arc::new(watch::Sender::new(LinkState::Up(pipe.clone()))),
            recoveries: Arc::default(),
        };
        tokio::spawn(supervise(
            config.clone(),
            Arc::downgrade(&lane.state),
            lane.recoveries.clone(),
            pipe,
        ));
        Ok(lane)
    }

    /// Marks the lane closed (ending its supervisor) and returns the connection that was up.
    pub(crate) fn close(&self) -> Option<Arc<Pipe>> {
        close_lane(&self.state)
    }
}

impl Drop for PublishLane {
    fn drop(&mut self) {
        // Ends the supervisor, which closes the connection.
        self.state.send_replace(LinkState::Closed);
    }
}

/// Opens a publishing connection to the first node that answers, from number `first` on.
async fn open(
    config: &AmqpConfig,
    generation: u64,
    first: usize,
) -> Result<Arc<Pipe>, BrokerError> {
    config
        .on_first_answering(first, |node_config, node| {
            Pipe::open(node_config, node, generation)
        })
        .await
}

/// Waits for the connection to die, then reconnects with capped
/// exponential backoff (the nodes after the lost one first) and publishes
/// the new connection. Ends when the lane is closed or dropped.
async fn supervise(
    config: AmqpConfig,
    state: Weak<watch::Sender<LinkState<Pipe>>>,
    recoveries: Arc<AtomicU64>,
    mut pipe: Arc<Pipe>,
) {
    let closed = |state: &Weak<watch::Sender<LinkState<Pipe>>>| {
        state
            .upgrade()
            .map(|sender| sender.subscribe())
            .filter(|watcher| !matches!(*watcher.borrow(), LinkState::Closed))
    };
    loop {
        let Some(mut watcher) = closed(&state) else {
            pipe.close().await;
            return;
        };
        tokio::select! {
            () = pipe.died() => {}
            () = until_closed(&mut watcher) => {
                pipe.close().await;
                return;
            }
        }
        let reason = pipe.death_reason();
        tracing::warn!(endpoint = %pipe.node_config.endpoint(), generation = pipe.generation, %reason, "AMQP publishing connection lost; reconnecting");
        set_down(&state, reason);
        let next_node = pipe.node + 1;
        let generation = recoveries.load(Ordering::SeqCst) + 2;
        let mut attempt = 0;
        pipe = loop {
            let Some(mut watcher) = closed(&state) else {
                return;
            };
            tokio::select! {
                () = tokio::time::sleep(config.backoff(attempt)) => {}
                () = until_closed(&mut watcher) => return,
            }
            attempt = attempt.saturating_add(1);
            match open(&config, generation, next_node).await {
                Ok(pipe) => break pipe,
                Err(error) => {
                    tracing::warn!(%error, attempt, "AMQP publishing reconnect failed");
                    set_down(&state, error.to_string());
                }
            }
        };
        let Some(sender) = state.upgrade() else {
            pipe.close().await;
            return;
        };
        let replaced = sender.send_if_modified(|current| {
            if matches!(current, LinkState::Closed) {
                false
            } else {
                *current = LinkState::Up(pipe.clone());
                true
            }
        });
        drop(sender);
        if !replaced {
            pipe.close().await;
            return;
        }
        recoveries.fetch_add(1, Ordering::SeqCst);
        tracing::info!(endpoint = %pipe.node_config.endpoint(), generation = pipe.generation, "AMQP publishing connection recovered");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::broker::amqp::convert::{CC_HEADER, read_properties};

    fn message() -> OutgoingMessage {
        OutgoingMessage {
            body: b"{}".to_vec(),
            content_type: Some("application/json".into()),
            message_id: Some("job-1".into()),
            persistent: true,
            headers: BTreeMap::from([("attempt".to_owned(), "3".to_owned())]),
            cc: vec!["route.a".into(), "route.b".into()],
        }
    }

    /// Another client's parser (lapin's) and this crate's consumers read our properties back.
    #[test]
    fn properties_read_back_by_lapin_and_by_consumers() {
        let message = message();
        let bytes = encode_properties(&message, CC_HEADER).expect("valid message");
        let (rest, properties) =
            lapin::protocol::basic::parse_properties(bytes.as_slice()).expect("lapin parses them");
        assert!(rest.is_empty(), "{} bytes left over", rest.len());
        assert_eq!(*properties.delivery_mode(), Some(2));
        assert_eq!(
            properties.content_type().as_ref().map(|t| t.as_str()),
            Some("application/json")
        );
        assert_eq!(
            properties.message_id().as_ref().map(|t| t.as_str()),
            Some("job-1")
        );
        let mut header = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        header.extend_from_slice(&bytes);
        let received = read_properties(&header).expect("consumers read them");
        assert_eq!(received.headers, message.headers);
        assert_eq!(received.cc, message.cc);
        assert_eq!(received.message_id.as_deref(), Some("job-1"));
        assert_eq!(received.content_type.as_deref(), Some("application/json"));

        let bare = OutgoingMessage::default();
        let bytes = encode_properties(&bare, CC_HEADER).expect("valid message");
        let (_, properties) = lapin::protocol::basic::parse_properties(bytes.as_slice()).unwrap();
        assert_eq!(*properties.delivery_mode(), Some(1));
        assert!(properties.headers().is_none() && properties.message_id().is_none());
    }

    #[test]
    fn reserved_headers_and_long_strings_are_refused() {
        let mut reserved = message();
        reserved.headers.insert("x-attempt".into(), "1".into());
        assert!(
            matches!(encode_properties(&reserved, CC_HEADER), Err(BrokerError::Invalid(m)) if m.contains("x-attempt"))
        );
        let mut long_key = message();
        long_key.cc.push("k".repeat(256));
        assert!(
            matches!(encode_properties(&long_key, CC_HEADER), Err(BrokerError::Invalid(m)) if m.contains("256 bytes"))
        );
        let mut long_id = message();
        long_id.message_id = Some("i".repeat(300));
        assert!(matches!(
            encode_properties(&long_id, CC_HEADER),
            Err(BrokerError::Invalid(_))
        ));
    }

    /// The frames parse back with the right sizes, the body split at frame_max.
    #[test]
    fn publish_frames_split_the_body_at_frame_max() {
        let body = vec![7u8; 10_000];
        let properties = encode_properties(&message(), CC_HEADER).unwrap();
        let frames = PublishFrames {
            channel: 3,
            exchange: b"exchange/x",
            routing_key: b"a.b",
            mandatory: true,
            properties: &properties,
            body: &body,
        };
        let mut out = Vec::new();
        frames.encode(&mut out, 4096);
        let mut parsed = Vec::new();
        let mut start = 0;
        while let Some((frame, used)) = Frame::parse(&out[start..], 4096).unwrap() {
            start += used;
            parsed.push(frame);
        }
        assert_eq!(start, out.len());
        assert_eq!(parsed.len(), 2 + 3, "method, header, three body frames");
        assert!(parsed.iter().all(|frame| frame.channel == 3));
        let (class, method, mut args) = parsed[0].method().unwrap();
        assert_eq!((class, method), (CLASS_BASIC, 40));
        args.u16("reserved").unwrap();
        assert_eq!(args.short("exchange").unwrap(), b"exchange/x");
        assert_eq!(args.short("routing key").unwrap(), b"a.b");
        assert_eq!(args.u8("bits").unwrap(), 1);
        let header = super::super::wire::ContentHeader::parse(&parsed[1].payload).unwrap();
        assert_eq!(header.body_size, 10_000);
        let sent: Vec<u8> = parsed[2..].iter().flat_map(|f| f.payload.clone()).collect();
        assert_eq!(sent, body);
        assert!(parsed[2..].iter().all(|f| f.payload.len() <= 4088));
    }

    /// The scripted broker (shared with the main connection's tests), and
    /// a publishing connection connected to it.
    mod scripted {
        pub(crate) use super::super::super::scripted::*;

        /// Connects a publishing connection to a scripted broker proposing
        /// `heartbeat` seconds; the broker side is the returned peer.
        pub(crate) async fn connected(
            heartbeat: u16,
            connect_timeout: std::time::Duration,
        ) -> (std::sync::Arc<super::Pipe>, Peer) {
            let (listener, config) = broker(heartbeat).await;
            let config = config.with_connect_timeout(connect_timeout);
            let (pipe, peer) = tokio::join!(
                super::Pipe::open(config, 0, 1),
                accept(&listener, heartbeat)
            );
            (pipe.expect("connects to the scripted broker"), peer)
        }
    }

    fn key(text: &str) -> ShortString {
        ShortString::try_new(text.to_owned()).unwrap()
    }

    /// Publishes `name` on `pipe` in a task; mandatory when `name` says so.
    fn publish(pipe: &Arc<Pipe>, name: &'static str) -> tokio::task::JoinHandle<Confirm> {
        let pipe = pipe.clone();
        tokio::spawn(async move {
            let properties = encode_properties(&OutgoingMessage::default(), "CC").unwrap();
            let mandatory = name.starts_with("mandatory");
            pipe.publish(
                &key("ex"),
                &key(name),
                mandatory,
                &properties,
                name.as_bytes(),
            )
            .await
        })
    }

    /// Waits until `count` publishes reached the peer (method, header, body each).
    async fn publishes_arrive(peer: &mut scripted::Peer, count: usize) {
        for _ in 0..count {
            assert_eq!(peer.method().await, Some((CLASS_BASIC, 40)));
        }
    }

    #[tokio::test]
    async fn confirms_settle_only_their_own_publishes_whatever_order_the_broker_sends() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let first = publish(&pipe, "first");
        publishes_arrive(&mut peer, 1).await;
        let second = publish(&pipe, "second");
        publishes_arrive(&mut peer, 1).await;
        let third = publish(&pipe, "mandatory.third");
        publishes_arrive(&mut peer, 1).await;
        // Out of order, a tag never sent, a return before its ack, a nack last.
        peer.confirm(80, 2, false).await;
        peer.confirm(80, 99, true).await;
        let mut returned = Writer::method(CLASS_BASIC, 50);
        returned.u16(312);
        returned.short("text", b"NO_ROUTE").unwrap();
        returned.short("exchange", b"ex").unwrap();
        returned.short("key", b"mandatory.third").unwrap();
        peer.send(1, returned).await;
        peer.confirm(80, 3, false).await;
        peer.confirm(80, 2, false).await; // again: settled already
        peer.confirm(120, 1, false).await;
        assert_eq!(second.await.unwrap(), Confirm::Acked);
        assert_eq!(
            third.await.unwrap(),
            Confirm::Returned("312 NO_ROUTE".to_owned())
        );
        assert_eq!(first.await.unwrap(), Confirm::Nacked);
        assert!(pipe.is_up(), "odd confirms do not end the connection");
        let fourth = publish(&pipe, "fourth");
        publishes_arrive(&mut peer, 1).await;
        peer.confirm(80, 4, true).await;
        assert_eq!(fourth.await.unwrap(), Confirm::Acked);
    }

    #[tokio::test]
    async fn a_channel_the_broker_closes_fails_its_publishes_and_opens_again() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let doomed = [publish(&pipe, "a"), publish(&pipe, "b")];
        publishes_arrive(&mut peer, 2).await;
        let close = scripted::channel_close(
            404,
            b"NOT_FOUND - no exchange 'ex' in vhost '/'",
            CLASS_BASIC,
            40,
        );
        peer.send(1, close).await;
        for publish in doomed {
            assert!(
                matches!(publish.await.unwrap(), Confirm::ChannelClosed { code: 404, ref text } if text.contains("'ex'"))
            );
        }
        assert_eq!(peer.method().await, Some((CHANNEL, 41)), "close-ok");
        // Publishes wait while the channel reopens.
        let later = publish(&pipe, "later");
        // Opened again.
        peer.open_confirm_channel().await;
        publishes_arrive(&mut peer, 1).await;
        peer.confirm(80, 1, false).await;
        assert_eq!(
            later.await.unwrap(),
            Confirm::Acked,
            "tags start again at 1"
        );
    }

    /// A channel refused again while being reopened ends the connection
    /// (the supervisor reconnects with backoff) instead of reopening forever.
    #[tokio::test]
    async fn a_channel_refused_while_reopening_ends_the_connection() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let close = || scripted::channel_close(406, b"PRECONDITION_FAILED", 0, 0);
        peer.send(1, close()).await;
        assert_eq!(peer.method().await, Some((CHANNEL, 41)));
        assert_eq!(peer.method().await, Some((CHANNEL, 10)));
        let waiting = publish(&pipe, "waiting");
        peer.send(1, close()).await;
        assert!(
            matches!(waiting.await.unwrap(), Confirm::Lost(reason) if reason.contains("while it was being opened"))
        );
        tokio::time::timeout(Duration::from_secs(5), pipe.died())
            .await
            .expect("the connection ends");
    }

    /// A broker that closes the channel and never answers the reopening:
    /// the connection ends within the connect timeout.
    #[tokio::test]
    async fn a_channel_never_reopened_ends_the_connection() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(1)).await;
        peer.send(
            1,
            scripted::channel_close(406, b"PRECONDITION_FAILED", 0, 0),
        )
        .await;
        assert_eq!(peer.method().await, Some((CHANNEL, 41)));
        assert_eq!(
            peer.method().await,
            Some((CHANNEL, 10)),
            "asked to reopen; no answer"
        );
        let waiting = publish(&pipe, "waiting");
        let confirm = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the publish does not wait forever")
            .unwrap();
        assert!(
            matches!(&confirm, Confirm::Lost(reason) if reason.contains("did not reopen")),
            "{confirm:?}"
        );
    }

    #[tokio::test]
    async fn blocked_and_unblocked_notices_are_recorded() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let mut blocked = Writer::method(CONNECTION, 60);
        blocked.short("reason", b"low on memory").unwrap();
        peer.send(0, blocked).await;
        let until = |blocked: bool| {
            let pipe = pipe.clone();
            async move {
                while pipe.blocked().is_some() != blocked {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), until(true))
            .await
            .expect("blocked");
        assert_eq!(pipe.blocked().unwrap().1, "low on memory");
        peer.send(0, Writer::method(CONNECTION, 61)).await;
        tokio::time::timeout(Duration::from_secs(5), until(false))
            .await
            .expect("unblocked");
    }

    #[tokio::test]
    async fn garbage_from_the_broker_ends_the_connection_and_every_publish_hears_of_it() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let waiting = publish(&pipe, "waiting");
        publishes_arrive(&mut peer, 1).await;
        // A method frame whose frame-end byte is wrong.
        peer.raw(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 80, 0x00]).await;
        assert!(
            matches!(waiting.await.unwrap(), Confirm::Lost(reason) if reason.contains("malformed frame")),
        );
        tokio::time::timeout(Duration::from_secs(5), pipe.died())
            .await
            .expect("the connection is dead");
        assert!(matches!(
            publish(&pipe, "after").await.unwrap(),
            Confirm::Lost(_)
        ));
        let hung_up = async { while peer.frame().await.is_some() {} };
        tokio::time::timeout(Duration::from_secs(5), hung_up)
            .await
            .expect("the client hangs up");
    }

    /// A peer that neither reads nor speaks: the writer stuck on a full
    /// socket ends with the connection, and publishers waiting for room hear of it.
    #[tokio::test]
    async fn a_broker_that_stops_reading_does_not_hold_the_writer() {
        let (pipe, peer) = scripted::connected(1, Duration::from_secs(5)).await;
        let body = vec![b'x'; 1 << 20];
        let properties = encode_properties(&OutgoingMessage::default(), "CC").unwrap();
        let publishes: Vec<_> = (0..48)
            .map(|_| {
                let (pipe, body, properties) = (pipe.clone(), body.clone(), properties.clone());
                tokio::spawn(async move {
                    pipe.publish(&key("ex"), &key("k"), false, &properties, &body)
                        .await
                })
            })
            .collect();
        for publish in publishes {
            let confirm = tokio::time::timeout(Duration::from_secs(10), publish)
                .await
                .expect("no publish waits forever")
                .unwrap();
            assert!(matches!(confirm, Confirm::Lost(_)), "{confirm:?}");
        }
        let ended = async {
            while Arc::strong_count(&pipe) > 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the writer and reader tasks end");
        drop(peer);
    }

    #[tokio::test]
    async fn a_broker_that_goes_silent_is_left_after_two_heartbeats() {
        let (pipe, mut peer) = scripted::connected(1, Duration::from_secs(5)).await;
        let waiting = publish(&pipe, "unanswered");
        publishes_arrive(&mut peer, 1).await;
        let started = Instant::now();
        let confirm = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the publish does not wait forever")
            .unwrap();
        assert!(matches!(confirm, Confirm::Lost(reason) if reason.contains("no heartbeat")));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
            "left after {waited:?}"
        );
        // Meanwhile the client kept its side alive.
        drop(peer);
    }
}
