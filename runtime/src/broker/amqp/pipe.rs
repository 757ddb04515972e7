//! The publishing connection: AMQP 0-9-1 on the tokio runtime itself.
//!
//! (lapin, used before, ran each connection's I/O on a thread of its own, so
//! every publish and every confirm crossed threads; the wake-ups were more
//! than half of a publish's CPU.) This connection is two tasks on the
//! caller's runtime, the main connection's ([`io`](super::io)), over the
//! lenient codec in [`wire`](super::wire): a writer that sends what
//! publishers queued, as one write per batch, and a reader that settles
//! publishes from the broker's confirms. It only publishes: one channel in
//! confirm mode, reopened when the broker closes it.
//!
//! A publish queues its message's shared record ([`Prepared`]) and never
//! waits for room: the record (its body kept for a resend anyway) is all a
//! queued publish costs. The writer encodes from the queue, at most
//! [`WRITE_BATCH`] bytes per write, so a slow or blocked connection holds
//! no second copy of what waits. A publish is in the queue or in flight
//! from then until its confirm (or the failure that makes one impossible)
//! arrives: nothing queued is ever forgotten without telling its publisher.
//!
//! Deadlines: each record holds its caller's deadline, and the reader task
//! wakes the callers whose deadline passed (one timer for the connection,
//! not one per publish).

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::config::AmqpConfig;
use super::copies::{
    InFlight, InFlightSet, Prepared, Remembered, Settled, Waited, check_short as short, joined,
};
use super::io::{self, Wired};
use super::link::{LinkState, Supervised, Watched, close_lane, supervise};
use super::raw::{ClientInfo, RawConnection};
use super::wire::{
    CLASS_BASIC, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, Frame, FrameRef, Reader, ShortString,
    Writer,
};
use crate::broker::{BrokerError, OutgoingMessage};

const CONNECTION: u16 = 10;
const CHANNEL: u16 = 20;
const CONFIRM: u16 = 85;
const FRAME_END: u8 = 0xCE;

/// The writer encodes about this much from the queue per write: what waits
/// for the socket beyond the queued records themselves stays bounded,
/// however many publishes are in flight or however long RabbitMQ blocks the
/// connection.
const WRITE_BATCH: usize = 256 * 1024;

/// What became of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Acked,
    /// Returned as unroutable (a mandatory publish), with the broker's reply text.
    Returned(Arc<str>),
    /// Refused by the broker (`basic.nack`: a full queue with `reject-publish`).
    Nacked,
    /// The broker closed the channel before confirming it (this publish's
    /// error, or another one's sent with it).
    ChannelClosed {
        code: u16,
        text: Arc<str>,
    },
    /// The connection died first: the message may or may not have reached the broker.
    Lost(Arc<str>),
}

/// What became of one publish made with [`Pipe::publish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Confirm {
    Acked,
    /// Returned as unroutable (a mandatory publish), with the broker's reply text.
    Returned(String),
    /// Refused by the broker (`basic.nack`).
    Nacked,
    /// The broker closed the channel before confirming it.
    ChannelClosed {
        code: u16,
        text: String,
    },
    /// The connection died first: the message may or may not have reached the broker.
    Lost(String),
}

impl From<Outcome> for Confirm {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Acked => Confirm::Acked,
            Outcome::Returned(text) => Confirm::Returned(text.to_string()),
            Outcome::Nacked => Confirm::Nacked,
            Outcome::ChannelClosed { code, text } => Confirm::ChannelClosed {
                code,
                text: text.to_string(),
            },
            Outcome::Lost(reason) => Confirm::Lost(reason.to_string()),
        }
    }
}

/// How a publish went onto the connection ([`Pipe::send`]).
pub(crate) enum Sending {
    /// Queued: the copy of this epoch; its outcome comes in its record.
    Sent(u32),
    /// A copy of the same message is in flight (this record, this epoch): wait for it.
    Joined(Arc<Prepared>, u32),
    /// The connection is dead.
    Lost(Arc<str>),
}

struct State {
    /// Control frames queued for the writer (channel and connection methods).
    out: Vec<u8>,
    channel: u16,
    /// Whether `channel` is open in confirm mode (not while it is reopened).
    ready: bool,
    /// Since when the channel is being reopened, if it is.
    reopening: Option<Instant>,
    /// Publishes queued and not yet taken by the writer, in order.
    unsent: VecDeque<Arc<Prepared>>,
    /// The delivery tag of `pending[0]`.
    first_tag: u64,
    /// Publishes taken by the writer, by delivery tag; `None` once settled
    /// (a confirm may settle a later one first).
    pending: VecDeque<Option<Arc<Prepared>>>,
    /// The copies in `unsent` and `pending`, by message.
    in_flight: InFlightSet,
    /// `basic.return` reply texts of pending publishes, by delivery tag; the confirm follows.
    returns: Vec<(u64, Arc<str>)>,
    /// The writer waits for a wake-up.
    writer_idle: bool,
    /// No deadline of a queued or pending publish is earlier than this.
    next_expiry: Option<Instant>,
    /// When the reader wakes up next by itself (`None`: only for the broker).
    reader_wakes_at: Option<Instant>,
    /// Why the connection died, once it did.
    dead: Option<Arc<str>>,
    /// The `connection.close-ok` answering the broker's close: written once
    /// the connection is dead (nothing queued is sent after the close).
    farewell: Option<Vec<u8>>,
}

/// One publishing connection.
pub(crate) struct Pipe {
    /// Counts publishing connections made by this broker: 1 for the first.
    pub(crate) generation: u64,
    /// The configuration's node reached (its number, and that node's configuration alone).
    pub(crate) node: usize,
    pub(crate) node_config: AmqpConfig,
    frame_max: usize,
    state: Mutex<State>,
    /// Wakes the writer: frames or publishes queued, the channel ready, or the connection died.
    wake_writer: Notify,
    /// Wakes the reader to look at its timers again (an earlier deadline).
    wake_reader: Notify,
    /// Copies confirmed after their callers stopped waiting (the broker's, shared).
    remembered: Arc<Remembered>,
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
        remembered: Arc<Remembered>,
    ) -> Result<Arc<Pipe>, BrokerError> {
        let name = format!("{} (publish)", config.connection_name());
        let client = ClientInfo::named(&config, name);
        let opened = RawConnection::open(&config, &client, true).await?;
        let pipe = Arc::new(Pipe {
            generation,
            node,
            frame_max: opened.frame_max as usize,
            node_config: config,
            state: Mutex::new(State {
                out: Vec::new(),
                channel: opened.channel,
                ready: true,
                reopening: None,
                unsent: VecDeque::new(),
                first_tag: 1,
                pending: VecDeque::new(),
                in_flight: InFlightSet::default(),
                returns: Vec::new(),
                writer_idle: false,
                next_expiry: None,
                reader_wakes_at: None,
                dead: None,
                farewell: None,
            }),
            wake_writer: Notify::new(),
            wake_reader: Notify::new(),
            remembered,
            blocked: Mutex::new(None),
            dead: watch::Sender::new(false),
        });
        let heartbeat = Duration::from_secs(opened.heartbeat.into());
        io::spawn(&pipe, opened.io, opened.buffer, opened.frame_max, heartbeat);
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
        self.lock()
            .dead
            .as_deref()
            .map(str::to_owned)
            .unwrap_or_default()
    }

    /// Queues a copy of `copy` whose caller waits until `deadline` — or,
    /// when a copy of the same message is in flight here, says which to wait
    /// for instead. Never waits: the writer takes the queue in batches.
    pub(crate) fn send(&self, copy: &Arc<Prepared>, deadline: Instant) -> Sending {
        let mut state = self.lock();
        if let Some(reason) = &state.dead {
            return Sending::Lost(reason.clone());
        }
        if let Some(InFlight(other)) = state.in_flight.get(&**copy) {
            let other = other.clone();
            drop(state);
            let epoch = other.epoch();
            return Sending::Joined(other, epoch);
        }
        let epoch = copy.begin(deadline);
        state.in_flight.insert(InFlight(copy.clone()));
        state.unsent.push_back(copy.clone());
        if state.next_expiry.is_none_or(|at| deadline < at) {
            state.next_expiry = Some(deadline);
        }
        let wake_reader = state.reader_wakes_at.is_none_or(|at| deadline < at);
        if wake_reader {
            state.reader_wakes_at = Some(deadline);
        }
        let wake_writer = std::mem::take(&mut state.writer_idle);
        drop(state);
        if wake_writer {
            self.wake_writer.notify_one();
        }
        if wake_reader {
            self.wake_reader.notify_one();
        }
        Sending::Sent(epoch)
    }

    /// Publishes one message as given (exchange, routing key, the content
    /// header's property flags and values, body) and waits for its confirm
    /// (bound it with a timeout). For messages not made by a publish
    /// (messages set aside, sent as they came); publishes go through [`send`](Self::send).
    pub(crate) async fn publish(
        &self,
        exchange: &ShortString,
        routing_key: &ShortString,
        mandatory: bool,
        properties: &[u8],
        body: &[u8],
    ) -> Confirm {
        let copy = Prepared::from_parts(
            exchange.as_str(),
            routing_key.as_str(),
            mandatory,
            properties,
            body.to_vec(),
        );
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let waited = match self.send(&copy, far) {
            Sending::Sent(epoch) => Settled::new(&copy, epoch).await,
            Sending::Joined(other, epoch) => Waited::Settled(joined(other, epoch).await),
            Sending::Lost(reason) => Waited::Settled(Outcome::Lost(reason)),
        };
        match waited {
            Waited::Settled(outcome) => outcome.into(),
            Waited::TimedOut => Confirm::Lost("no confirm in time".to_owned()),
        }
    }

    /// Queues control frames for the writer.
    fn send_control(&self, state: &mut State, channel: u16, method: Writer) {
        state
            .out
            .extend_from_slice(&Frame::encode(FRAME_METHOD, channel, &method.0));
        state.writer_idle = false;
        self.wake_writer.notify_one();
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
            self.send_control(&mut state, 0, close);
        }
        if tokio::time::timeout(Duration::from_secs(1), self.died())
            .await
            .is_err()
        {
            self.die("closed by application".to_owned());
        }
    }

    /// Takes `copy` off the in-flight set (it is settled).
    fn forget(state: &mut State, copy: &Arc<Prepared>) {
        if state
            .in_flight
            .get(&**copy)
            .is_some_and(|entry| Arc::ptr_eq(&entry.0, copy))
        {
            state.in_flight.remove(&**copy);
        }
    }

    /// Settles the publish of `tag` (and all before it, if `multiple`);
    /// `settled` is scratch space.
    fn settle(
        &self,
        tag: u64,
        multiple: bool,
        acked: bool,
        settled: &mut Vec<(Arc<Prepared>, Outcome)>,
    ) {
        {
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
            for at in first..=index {
                let Some(copy) = state.pending[at].take() else {
                    continue;
                };
                let returned = if state.returns.is_empty() {
                    None
                } else {
                    let tag = state.first_tag + at as u64;
                    let found = state.returns.iter().position(|(of, _)| *of == tag);
                    found.map(|found| state.returns.swap_remove(found).1)
                };
                let confirm = match (acked, returned) {
                    (true, Some(text)) => Outcome::Returned(text),
                    (true, None) => Outcome::Acked,
                    (false, _) => Outcome::Nacked,
                };
                Self::forget(state, &copy);
                settled.push((copy, confirm));
            }
            while state.pending.front().is_some_and(Option::is_none) {
                state.pending.pop_front();
                state.first_tag += 1;
            }
        }
        for (copy, confirm) in settled.drain(..) {
            copy.settle(confirm, &self.remembered);
        }
    }

    /// Matches a `basic.return` to the oldest unsettled mandatory publish to that exchange and key.
    fn returned(&self, exchange: &[u8], routing_key: &[u8], text: String) {
        let mut state = self.lock();
        let state = &mut *state;
        let first_tag = state.first_tag;
        let returns = &state.returns;
        let found = state.pending.iter().enumerate().position(|(at, slot)| {
            let tag = first_tag + at as u64;
            slot.as_ref()
                .and_then(|copy| copy.returnable())
                .is_some_and(|address| address == (exchange, routing_key))
                && !returns.iter().any(|(of, _)| *of == tag)
        });
        match found {
            Some(at) => state.returns.push((first_tag + at as u64, text.into())),
            None => tracing::debug!("basic.return matching no mandatory publish; ignored"),
        }
    }

    /// The broker closed the channel: fails what was sent on it and opens it again.
    fn channel_closed(&self, code: u16, text: String) {
        let text: Arc<str> = text.into();
        let pending = {
            let mut state = self.lock();
            let pending = std::mem::take(&mut state.pending);
            for copy in pending.iter().flatten() {
                Self::forget(&mut state, copy);
            }
            state.returns.clear();
            state.first_tag = 1;
            state.ready = false;
            state.reopening = Some(Instant::now());
            let channel = state.channel;
            self.send_control(&mut state, channel, Writer::method(CHANNEL, 41));
            let mut open = Writer::method(CHANNEL, 10);
            let _ = open.short("reserved", b"");
            self.send_control(&mut state, channel, open);
            pending
        };
        // Publishes queued but not taken by the writer go out once it is open again.
        for copy in pending.into_iter().flatten() {
            copy.settle(
                Outcome::ChannelClosed {
                    code,
                    text: text.clone(),
                },
                &self.remembered,
            );
        }
    }

    /// Wakes the callers whose deadlines passed by `now`; notes the next deadline.
    fn expire(&self, now: Instant) {
        let mut wake: Vec<Waker> = Vec::new();
        {
            let mut state = self.lock();
            let mut next: Option<Instant> = None;
            for copy in state.unsent.iter().chain(state.pending.iter().flatten()) {
                if let Some(deadline) = copy.expire(now, &mut wake) {
                    next = Some(next.map_or(deadline, |next| next.min(deadline)));
                }
            }
            state.next_expiry = next;
        }
        wake.into_iter().for_each(Waker::wake);
    }

    /// Takes queued publishes for the writer's next batch (they get their
    /// delivery tags now): into `sending`, with the channel to send them on.
    fn take_batch(&self, state: &mut State, sending: &mut Vec<Arc<Prepared>>) -> u16 {
        let mut bytes = 0;
        while state.ready && bytes < WRITE_BATCH {
            let Some(copy) = state.unsent.pop_front() else {
                break;
            };
            bytes += copy.wire_len(self.frame_max);
            state.pending.push_back(Some(copy.clone()));
            sending.push(copy);
        }
        state.channel
    }
}

impl Wired for Pipe {
    /// Publishes taken for the next write, encoded outside the state's lock.
    type WriterScratch = Vec<Arc<Prepared>>;
    /// Publishes settled by a confirm, told outside the state's lock.
    type ReaderScratch = Vec<(Arc<Prepared>, Outcome)>;

    fn endpoint(&self) -> String {
        self.node_config.endpoint()
    }

    fn writer_wake(&self) -> &Notify {
        &self.wake_writer
    }

    fn dead_signal(&self) -> watch::Receiver<bool> {
        self.dead.subscribe()
    }

    /// Control frames, then publishes from the queue, about [`WRITE_BATCH`]
    /// bytes of them; marks the writer idle when there is nothing (a
    /// publish wakes it only then).
    fn take_queued(&self, batch: &mut Vec<u8>, sending: &mut Vec<Arc<Prepared>>) -> bool {
        let channel = {
            let mut state = self.lock();
            if state.dead.is_some() {
                return false;
            }
            std::mem::swap(&mut state.out, batch);
            let channel = self.take_batch(&mut state, sending);
            if batch.is_empty() && sending.is_empty() {
                state.writer_idle = true;
            }
            channel
        };
        for copy in sending.drain(..) {
            encode_publish(batch, channel, &copy, self.frame_max);
        }
        true
    }

    /// Marks the connection dead (once): every queued and pending publish is told, the writer stops.
    fn die(&self, reason: String) {
        let reason: Arc<str> = reason.into();
        let (unsent, pending) = {
            let mut state = self.lock();
            if state.dead.is_some() {
                return;
            }
            state.out = Vec::new();
            state.dead = Some(reason.clone());
            state.in_flight = InFlightSet::default();
            state.returns.clear();
            (
                std::mem::take(&mut state.unsent),
                std::mem::take(&mut state.pending),
            )
        };
        for copy in unsent.into_iter().chain(pending.into_iter().flatten()) {
            copy.settle(Outcome::Lost(reason.clone()), &self.remembered);
        }
        self.wake_writer.notify_one();
        self.dead.send_replace(true);
    }

    fn farewell(&self) -> Option<Vec<u8>> {
        self.lock().farewell.take()
    }

    /// Handles one frame from the broker; `Err` ends the connection.
    fn handle(
        &self,
        frame: FrameRef<'_>,
        settled: &mut Vec<(Arc<Prepared>, Outcome)>,
    ) -> Result<(), String> {
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
                // Queued frames die with the connection: the writer sends the close-ok last.
                let (close_ok, reason) = io::closed_by_broker(args);
                self.lock().farewell = Some(close_ok);
                return Err(reason);
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
                self.settle(tag, multiple, method == 80, settled);
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
                self.send_control(&mut state, channel, select);
            }
            (ours, CONFIRM, 11) if ours == channel => {
                let mut state = self.lock();
                state.ready = true;
                state.reopening = None;
                state.writer_idle = false;
                drop(state);
                self.wake_writer.notify_one();
            }
            (ours, CHANNEL, 20) if ours == channel => {
                let active = args.u8("active").map_err(|e| e.to_string())?;
                let mut state = self.lock();
                let mut flow_ok = Writer::method(CHANNEL, 21);
                flow_ok.u8(active);
                self.send_control(&mut state, channel, flow_ok);
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

    /// Wakes the callers whose deadlines passed (not an error: their
    /// copies go on), and ends the connection when the channel was not
    /// reopened within the connect timeout.
    fn timers(&self, now: Instant, wake_at: Option<Instant>) -> Result<Option<Instant>, String> {
        loop {
            let mut state = self.lock();
            if state.next_expiry.is_some_and(|at| now >= at) {
                drop(state);
                self.expire(now);
                continue;
            }
            let timeout = self.node_config.connect_timeout();
            let reopened_by = state.reopening.map(|since| since + timeout);
            if reopened_by.is_some_and(|by| now >= by) {
                return Err(format!(
                    "{} did not reopen the publishing channel within {timeout:?}",
                    self.node_config.endpoint()
                ));
            }
            let wake_at = [wake_at, reopened_by, state.next_expiry]
                .into_iter()
                .flatten()
                .min();
            // A publish due earlier wakes the reader (`send`).
            state.reader_wakes_at = wake_at;
            return Ok(wake_at);
        }
    }

    fn reader_wake(&self) -> Option<&Notify> {
        Some(&self.wake_reader)
    }
}

/// Appends one copy's frames (method, content header, body in pieces of at
/// most `frame_max` bytes a frame) on `channel` to `out`.
fn encode_publish(out: &mut Vec<u8>, channel: u16, copy: &Prepared, frame_max: usize) {
    let frame = |out: &mut Vec<u8>, kind: u8, payload: &[u8]| {
        out.push(kind);
        out.extend_from_slice(&channel.to_be_bytes());
        // Payloads here are bounded by frame_max (a u32).
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out.push(FRAME_END);
    };
    frame(out, FRAME_METHOD, copy.method());
    frame(out, FRAME_HEADER, copy.header());
    // Frame overhead is 8 bytes; frame_max is at least 4,096 on RabbitMQ.
    for piece in copy.body().chunks(frame_max.saturating_sub(8).max(1)) {
        frame(out, FRAME_BODY, piece);
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

/// The publishing connection's state and its supervisor's counters.
pub(crate) struct PublishLane {
    pub(crate) state: Arc<watch::Sender<LinkState<Pipe>>>,
    pub(crate) recoveries: Arc<AtomicU64>,
    /// Copies confirmed after their callers stopped waiting, on any of its connections.
    pub(crate) remembered: Arc<Remembered>,
}

impl PublishLane {
    /// Connects (one attempt) and starts the supervisor that reconnects after a loss.
    pub(crate) async fn start(config: &AmqpConfig) -> Result<PublishLane, BrokerError> {
        let remembered = Arc::<Remembered>::default();
        let pipe = open(config, 1, 0, &remembered).await?;
        let lane = PublishLane {
            state: Arc::new(watch::Sender::new(LinkState::Up(pipe.clone()))),
            recoveries: Arc::default(),
            remembered: remembered.clone(),
        };
        let reconnect_config = config.clone();
        tokio::spawn(supervise(
            "AMQP publishing connection",
            config.clone(),
            Arc::downgrade(&lane.state),
            lane.recoveries.clone(),
            pipe,
            move |generation, first| {
                let (config, remembered) = (reconnect_config.clone(), remembered.clone());
                async move { open(&config, generation, first, &remembered).await }
            },
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
    remembered: &Arc<Remembered>,
) -> Result<Arc<Pipe>, BrokerError> {
    config
        .on_first_answering(first, |node_config, node| {
            Pipe::open(node_config, node, generation, remembered.clone())
        })
        .await
}

impl Watched for Pipe {
    fn node(&self) -> usize {
        self.node
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn endpoint(&self) -> String {
        self.node_config.endpoint()
    }

    fn death_reason(&self) -> String {
        Pipe::death_reason(self)
    }

    async fn died(&self) {
        Pipe::died(self).await;
    }

    async fn close(&self) {
        Pipe::close(self).await;
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
        let sent = OutgoingMessage {
            body: body.clone(),
            ..message()
        };
        let copy = Prepared::new("exchange/x", "a.b", sent, true, CC_HEADER).unwrap();
        let mut out = Vec::new();
        encode_publish(&mut out, 3, &copy, 4096);
        assert_eq!(out.len(), copy.wire_len(4096));
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
        let (_, properties) =
            lapin::protocol::basic::parse_properties(&parsed[1].payload[12..]).unwrap();
        assert_eq!(
            properties.message_id().as_ref().map(|id| id.as_str()),
            Some("job-1")
        );
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
                super::Pipe::open(config, 0, 1, Default::default()),
                accept(&listener, heartbeat)
            );
            (pipe.expect("connects to the scripted broker"), peer)
        }
    }

    /// A message to `ex` with routing key `name` (its body too), under its own id.
    fn prepared(name: &str, mandatory: bool) -> Arc<Prepared> {
        let message = OutgoingMessage {
            body: name.as_bytes().to_vec(),
            message_id: Some(name.to_owned()),
            ..OutgoingMessage::default()
        };
        Prepared::new("ex", name, message, mandatory, CC_HEADER).unwrap()
    }

    /// Sends `copy` on `pipe` and waits for its outcome, for at most `within`.
    async fn send_and_wait(pipe: &Pipe, copy: &Arc<Prepared>, within: Duration) -> Waited {
        match pipe.send(copy, Instant::now() + within) {
            Sending::Sent(epoch) => Settled::new(copy, epoch).await,
            Sending::Joined(other, epoch) => Waited::Settled(joined(other, epoch).await),
            Sending::Lost(reason) => Waited::Settled(Outcome::Lost(reason)),
        }
    }

    /// Publishes `name` on `pipe` in a task; mandatory when `name` says so.
    fn publish(pipe: &Arc<Pipe>, name: &'static str) -> tokio::task::JoinHandle<Outcome> {
        let pipe = pipe.clone();
        tokio::spawn(async move {
            let copy = prepared(name, name.starts_with("mandatory"));
            match send_and_wait(&pipe, &copy, Duration::from_secs(60)).await {
                Waited::Settled(confirm) => confirm,
                Waited::TimedOut => panic!("{name}: timed out"),
            }
        })
    }

    /// Waits (10 s at most) for `publish`, made in a task, to be lost for a
    /// reason naming `naming`.
    async fn assert_lost(publish: tokio::task::JoinHandle<Outcome>, naming: &str) {
        let confirm = tokio::time::timeout(Duration::from_secs(10), publish)
            .await
            .expect("the publish does not wait forever")
            .unwrap();
        assert!(
            matches!(&confirm, Outcome::Lost(reason) if reason.contains(naming)),
            "{confirm:?}"
        );
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
        assert_eq!(second.await.unwrap(), Outcome::Acked);
        assert_eq!(
            third.await.unwrap(),
            Outcome::Returned("312 NO_ROUTE".into())
        );
        assert_eq!(first.await.unwrap(), Outcome::Nacked);
        assert!(pipe.is_up(), "odd confirms do not end the connection");
        let fourth = publish(&pipe, "fourth");
        publishes_arrive(&mut peer, 1).await;
        peer.confirm(80, 4, true).await;
        assert_eq!(fourth.await.unwrap(), Outcome::Acked);
    }

    /// A publish whose deadline passes while its copy is in flight hears so
    /// then (the connection's one timer), not at its confirm; the copy goes
    /// on: a retry waits for it instead of sending another, and its confirm
    /// is remembered for later retries.
    #[tokio::test]
    async fn a_publish_whose_deadline_passes_in_flight_times_out_and_its_copy_goes_on() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let copy = prepared("slow", false);
        let started = Instant::now();
        let waited = tokio::time::timeout(
            Duration::from_secs(5),
            send_and_wait(&pipe, &copy, Duration::from_millis(300)),
        )
        .await
        .expect("woken at its deadline");
        assert_eq!(waited, Waited::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "timed out after {took:?}"
        );
        publishes_arrive(&mut peer, 1).await;
        // A retry of the same message joins the copy in flight.
        let retry = prepared("slow", false);
        let Sending::Joined(joined_copy, epoch) =
            pipe.send(&retry, Instant::now() + Duration::from_secs(60))
        else {
            panic!("a second copy was queued");
        };
        let joiner = tokio::spawn(joined(joined_copy, epoch));
        peer.confirm(80, 1, false).await;
        assert_eq!(joiner.await.unwrap(), Outcome::Acked);
        assert!(
            pipe.remembered.confirmed(&prepared("slow", false)),
            "confirmed after its caller gave up: remembered"
        );
        // Nothing else was sent: the next publish is tag 2.
        let next = publish(&pipe, "next");
        publishes_arrive(&mut peer, 1).await;
        peer.confirm(80, 2, false).await;
        assert_eq!(next.await.unwrap(), Outcome::Acked);
    }

    /// Two publishes of one message at once: one copy goes out, both hear its confirm.
    #[tokio::test]
    async fn a_message_in_flight_is_not_sent_twice() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let first = publish(&pipe, "twice");
        publishes_arrive(&mut peer, 1).await;
        let second = publish(&pipe, "twice");
        let other = publish(&pipe, "other");
        publishes_arrive(&mut peer, 1).await;
        peer.confirm(80, 2, true).await;
        assert_eq!(first.await.unwrap(), Outcome::Acked);
        assert_eq!(second.await.unwrap(), Outcome::Acked);
        assert_eq!(other.await.unwrap(), Outcome::Acked);
        assert!(
            !pipe.remembered.confirmed(&prepared("twice", false)),
            "its callers saw the confirm: nothing to remember"
        );
    }

    /// Many publishes at once, more than one write's batch: none waits to
    /// be queued, all go out in order, one multiple ack settles them all.
    #[tokio::test]
    async fn publishes_beyond_a_batch_go_out_in_order() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let count = 2 * WRITE_BATCH / 1024 + 10;
        let copies: Vec<_> = (0..count)
            .map(|n| {
                let message = OutgoingMessage {
                    body: vec![b'x'; 1024],
                    message_id: Some(format!("m-{n}")),
                    ..OutgoingMessage::default()
                };
                Prepared::new("ex", &format!("k.{n}"), message, false, CC_HEADER).unwrap()
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let epochs: Vec<u32> = copies
            .iter()
            .map(|copy| match pipe.send(copy, deadline) {
                Sending::Sent(epoch) => epoch,
                _ => panic!("not queued"),
            })
            .collect();
        for n in 0..count {
            let frame = loop {
                let frame = peer.frame().await.expect("a frame");
                if frame.kind == FRAME_METHOD {
                    break frame;
                }
            };
            let (_, _, mut args) = frame.method().unwrap();
            args.u16("reserved").unwrap();
            args.short("exchange").unwrap();
            assert_eq!(args.short("key").unwrap(), format!("k.{n}").as_bytes());
        }
        peer.confirm(80, count as u64, true).await;
        for (copy, epoch) in copies.iter().zip(epochs) {
            assert_eq!(
                Settled::new(copy, epoch).await,
                Waited::Settled(Outcome::Acked)
            );
        }
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
                matches!(publish.await.unwrap(), Outcome::ChannelClosed { code: 404, ref text } if text.contains("'ex'"))
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
            Outcome::Acked,
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
        assert_lost(waiting, "while it was being opened").await;
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
        assert_lost(publish(&pipe, "waiting"), "did not reopen").await;
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

    /// The broker closing the publishing connection hears its `close-ok`
    /// (else it waits for it until its own timeout), and every publish in
    /// flight fails with the broker's reason.
    #[tokio::test]
    async fn the_broker_closing_the_connection_is_answered_and_fails_every_publish() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let waiting = [publish(&pipe, "a"), publish(&pipe, "b")];
        publishes_arrive(&mut peer, 2).await;
        peer.close_connection_answered(
            320,
            "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
        )
        .await;
        for publish in waiting {
            assert_lost(publish, "320 CONNECTION_FORCED").await;
        }
        assert!(!pipe.is_up());
        assert_lost(publish(&pipe, "after"), "320 CONNECTION_FORCED").await;
        peer.hung_up().await;
    }

    #[tokio::test]
    async fn garbage_from_the_broker_ends_the_connection_and_every_publish_hears_of_it() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let waiting = publish(&pipe, "waiting");
        publishes_arrive(&mut peer, 1).await;
        // A method frame whose frame-end byte is wrong.
        peer.raw(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 80, 0x00]).await;
        assert_lost(waiting, "malformed frame").await;
        tokio::time::timeout(Duration::from_secs(5), pipe.died())
            .await
            .expect("the connection is dead");
        assert!(matches!(
            publish(&pipe, "after").await.unwrap(),
            Outcome::Lost(_)
        ));
        let hung_up = async { while peer.frame().await.is_some() {} };
        tokio::time::timeout(Duration::from_secs(5), hung_up)
            .await
            .expect("the client hangs up");
    }

    /// 48 publishes of 1 MiB each in tasks: more than loopback sockets
    /// buffer, so a peer that does not read leaves the writer stuck mid-write.
    fn more_than_a_socket_holds(pipe: &Arc<Pipe>) -> Vec<tokio::task::JoinHandle<Outcome>> {
        let body = vec![b'x'; 1 << 20];
        (0..48)
            .map(|n| {
                let (pipe, body) = (pipe.clone(), body.clone());
                tokio::spawn(async move {
                    let message = OutgoingMessage {
                        body,
                        message_id: Some(format!("m-{n}")),
                        ..OutgoingMessage::default()
                    };
                    let copy = Prepared::new("ex", "k", message, false, CC_HEADER).unwrap();
                    match send_and_wait(&pipe, &copy, Duration::from_secs(60)).await {
                        Waited::Settled(confirm) => confirm,
                        Waited::TimedOut => panic!("timed out"),
                    }
                })
            })
            .collect()
    }

    /// A broker that closes the connection while the writer is stuck
    /// mid-write (it was not reading) still hears the close-ok once it
    /// reads again: the batch being written is finished, then the close-ok
    /// follows (a stream cut mid-frame could not carry it).
    #[tokio::test]
    async fn the_broker_closing_the_connection_mid_write_is_answered_after_the_batch() {
        let (pipe, mut peer) = scripted::connected(0, Duration::from_secs(5)).await;
        let publishes = more_than_a_socket_holds(&pipe);
        // The writer fills the socket and waits for room.
        tokio::time::sleep(Duration::from_millis(300)).await;
        peer.close_connection(320, "CONNECTION_FORCED - shutdown")
            .await;
        let close_ok = async {
            loop {
                match peer.next_method().await {
                    Some(method) if (method.class, method.method) == (CLASS_BASIC, 40) => {}
                    other => break other,
                }
            }
        };
        let close_ok = tokio::time::timeout(Duration::from_secs(10), close_ok)
            .await
            .expect("the client answers or hangs up");
        let close_ok = close_ok.expect("close-ok, not a hang-up");
        assert_eq!(
            (close_ok.channel, close_ok.class, close_ok.method),
            (0, CONNECTION, 51)
        );
        for publish in publishes {
            assert_lost(publish, "320 CONNECTION_FORCED").await;
        }
    }

    /// A peer that neither reads nor speaks: the writer stuck on a full
    /// socket ends with the connection, and every queued publish hears of it.
    #[tokio::test]
    async fn a_broker_that_stops_reading_does_not_hold_the_writer() {
        let (pipe, peer) = scripted::connected(1, Duration::from_secs(5)).await;
        for publish in more_than_a_socket_holds(&pipe) {
            assert_lost(publish, "").await;
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
        assert_lost(waiting, "no heartbeat").await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
            "left after {waited:?}"
        );
        // Meanwhile the client kept its side alive.
        drop(peer);
    }
}
