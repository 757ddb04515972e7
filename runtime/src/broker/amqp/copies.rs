//! Messages made ready to send, and the copies of them in flight.
//!
//! A publish encodes its message once ([`Prepared`]: the method and
//! content-header payloads, and the body) into one shared record that every
//! copy sent of it reuses: a copy whose connection died is sent again
//! (at-least-once), so the body is kept until the confirm. The record also
//! holds the outcome of the copy last sent, which the publishing connection
//! sets from the broker's confirm and the caller waits for ([`Settled`]):
//! no task, channel or timer per publish. The caller's deadline is kept
//! there too, and the publishing connection wakes a caller whose deadline
//! passed (one timer for all of them, `pipe`).
//!
//! At most one copy of a message is unconfirmed at a time: the publishing
//! connection keeps the copies in flight by message id and content
//! ([`InFlight`]), and a publish of a message whose copy is in flight there
//! waits for that copy ([`joined`]) instead of sending another. A copy
//! confirmed after its caller stopped waiting (its deadline passed, or it
//! was dropped) is remembered for [`CONFIRMED_KEPT`] ([`Remembered`]), so
//! that a retry of it sends nothing new; a confirm its caller saw needs no
//! such memory (the caller does not retry it).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use super::pipe::{Outcome, Sending, encode_properties};
use super::wire::{CLASS_BASIC, Reader};
use crate::broker::{BrokerError, DELAYED_CC_HEADER, OutgoingMessage};

/// How long a copy confirmed after its caller stopped waiting is
/// remembered, so that a retry of it sends nothing.
pub(super) const CONFIRMED_KEPT: Duration = Duration::from_secs(60);

/// Checks that `value` fits an AMQP short string (255 bytes; RabbitMQ's
/// limit for names and routing keys), with the error `convert::short` gives.
pub(super) fn check_short(what: &str, value: &str) -> Result<(), BrokerError> {
    if value.len() > 255 {
        return Err(BrokerError::Invalid(format!(
            "{what} `{value}` is {} bytes long; AMQP allows at most 255",
            value.len()
        )));
    }
    Ok(())
}

/// The hasher of message ids (one per process, randomly keyed).
fn id_hasher() -> &'static std::collections::hash_map::RandomState {
    static HASHER: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    HASHER.get_or_init(Default::default)
}

/// A message ready to send: what every copy of it sends, and the state of
/// the copy last sent.
pub(crate) struct Prepared {
    /// The `basic.publish` method payload, then the content header payload.
    head: Box<[u8]>,
    /// Where the content header payload starts in `head` (at most 519).
    header_at: u16,
    body: Box<[u8]>,
    /// The message id's hash, for [`InFlight`].
    id_hash: u64,
    cell: Mutex<Cell>,
}

/// The state of the copy last sent.
#[derive(Default)]
struct Cell {
    /// Counts the copies sent; a joiner waits for the copy of one epoch.
    epoch: u32,
    outcome: Option<Outcome>,
    /// The deadline of the caller waiting for the copy, while it waits.
    deadline: Option<Instant>,
    /// That caller's waker.
    waker: Option<Waker>,
    /// The caller's deadline passed (set by the publishing connection).
    timed_out: bool,
    /// The caller stopped waiting before the outcome was known.
    abandoned: bool,
    /// Other publishes of the same message waiting for this copy (rare:
    /// boxed, not room in every record).
    #[expect(
        clippy::box_collection,
        reason = "8 bytes in every record instead of a Vec's 24"
    )]
    joiners: Option<Box<Vec<Waker>>>,
}

impl Prepared {
    /// Checks and encodes a message for `exchange` with `routing_key`; its
    /// CC keys go under `cc_header`. `mandatory`: returned if unroutable.
    pub(super) fn new(
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
        mandatory: bool,
        cc_header: &str,
    ) -> Result<Arc<Prepared>, BrokerError> {
        check_short("exchange", exchange)?;
        check_short("routing key", routing_key)?;
        let properties = encode_properties(&message, cc_header)?;
        let id_hash = id_hasher().hash_one(message.message_id.as_deref().unwrap_or_default());
        let mut copy = Self::encode(exchange, routing_key, mandatory, &properties, message.body);
        copy.id_hash = id_hash;
        Ok(Arc::new(copy))
    }

    /// A message to send as given: `properties` are the content header's
    /// property flags and values (checked by whoever made them).
    pub(super) fn from_parts(
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: &[u8],
        body: Vec<u8>,
    ) -> Arc<Prepared> {
        let mut copy = Self::encode(exchange, routing_key, mandatory, properties, body);
        let id_hash = id_hasher().hash_one(String::from_utf8_lossy(copy.headers_and_id().1));
        copy.id_hash = id_hash;
        Arc::new(copy)
    }

    /// Both payloads; `exchange` and `routing_key` fit short strings.
    fn encode(
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: &[u8],
        body: Vec<u8>,
    ) -> Prepared {
        let method_len = 2 + 2 + 2 + 1 + exchange.len() + 1 + routing_key.len() + 1;
        let mut head = Vec::with_capacity(method_len + 12 + properties.len());
        head.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        head.extend_from_slice(&40u16.to_be_bytes());
        head.extend_from_slice(&[0, 0]);
        head.push(exchange.len() as u8);
        head.extend_from_slice(exchange.as_bytes());
        head.push(routing_key.len() as u8);
        head.extend_from_slice(routing_key.as_bytes());
        head.push(u8::from(mandatory));
        // At most 519 bytes: two short strings and 9 bytes.
        let header_at = head.len() as u16;
        head.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        head.extend_from_slice(&[0, 0]);
        head.extend_from_slice(&(body.len() as u64).to_be_bytes());
        head.extend_from_slice(properties);
        Prepared {
            head: head.into_boxed_slice(),
            header_at,
            body: body.into_boxed_slice(),
            id_hash: 0,
            cell: Mutex::default(),
        }
    }

    fn cell(&self) -> MutexGuard<'_, Cell> {
        self.cell.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `basic.publish` method payload.
    pub(super) fn method(&self) -> &[u8] {
        &self.head[..usize::from(self.header_at)]
    }

    /// The content header payload.
    pub(super) fn header(&self) -> &[u8] {
        &self.head[usize::from(self.header_at)..]
    }

    pub(super) fn body(&self) -> &[u8] {
        &self.body
    }

    /// The exchange and routing key, as bytes.
    fn address(&self) -> (&[u8], &[u8]) {
        let mut reader = Reader::new(&self.method()[6..]);
        let exchange = reader.short("exchange").unwrap_or_default();
        let routing_key = reader.short("routing key").unwrap_or_default();
        (exchange, routing_key)
    }

    /// Whether the copy is to be returned if unroutable, and its exchange and routing key.
    pub(super) fn returnable(&self) -> Option<(&[u8], &[u8])> {
        (self.method().last() == Some(&1)).then(|| self.address())
    }

    pub(super) fn exchange(&self) -> String {
        String::from_utf8_lossy(self.address().0).into_owned()
    }

    pub(super) fn routing_key(&self) -> String {
        String::from_utf8_lossy(self.address().1).into_owned()
    }

    /// The property values after the flags, and the flags.
    fn properties(&self) -> (u16, Reader<'_>) {
        let mut reader = Reader::new(&self.header()[12..]);
        let flags = reader.u16("property flags").unwrap_or_default();
        (flags, reader)
    }

    /// The headers table and the message id, as encoded (each empty when absent).
    fn headers_and_id(&self) -> (&[u8], &[u8]) {
        let (flags, mut values) = self.properties();
        if flags & 1 << 15 != 0 {
            let _ = values.short("content type");
        }
        let mut table: &[u8] = &[];
        if flags & 1 << 13 != 0 {
            table = values.long("headers").unwrap_or_default();
        }
        if flags & 1 << 12 != 0 {
            let _ = values.u8("delivery mode");
        }
        let mut id: &[u8] = &[];
        if flags & 1 << 7 != 0 {
            id = values.short("message id").unwrap_or_default();
        }
        (table, id)
    }

    pub(super) fn message_id(&self) -> String {
        String::from_utf8_lossy(self.headers_and_id().1).into_owned()
    }

    /// The CC routing keys (under either CC header name).
    pub(super) fn cc(&self) -> Vec<String> {
        let mut table = Reader::new(self.headers_and_id().0);
        let mut keys = Vec::new();
        while let Ok(name) = table.short("header name") {
            let (Ok(kind), Ok(value)) = (table.u8("field type"), table.long("field value")) else {
                break;
            };
            let cc = name == super::convert::CC_HEADER.as_bytes()
                || name == DELAYED_CC_HEADER.as_bytes();
            if kind == b'A' && cc {
                let mut array = Reader::new(value);
                while let (Ok(b'S'), Ok(key)) = (array.u8("field type"), array.long("key")) {
                    keys.push(String::from_utf8_lossy(key).into_owned());
                }
            }
        }
        keys
    }

    /// A hash of everything sent ([`Remembered`]).
    fn fingerprint(&self) -> u64 {
        id_hasher().hash_one((&self.head, &self.body))
    }

    /// The bytes of one copy's frames with frames of at most `frame_max` bytes.
    pub(super) fn wire_len(&self, frame_max: usize) -> usize {
        let piece = frame_max.saturating_sub(8).max(1);
        let pieces = self.body.len().div_ceil(piece);
        self.head.len() + 16 + self.body.len() + 8 * pieces
    }

    /// Starts a copy: its caller waits until `deadline`. Returns the copy's epoch.
    pub(super) fn begin(&self, deadline: Instant) -> u32 {
        let mut cell = self.cell();
        cell.epoch = cell.epoch.wrapping_add(1);
        cell.outcome = None;
        cell.deadline = Some(deadline);
        cell.timed_out = false;
        cell.abandoned = false;
        cell.epoch
    }

    /// The epoch of the copy last sent.
    pub(super) fn epoch(&self) -> u32 {
        self.cell().epoch
    }

    /// Records the outcome of the copy under way and wakes whoever waits for it.
    pub(super) fn settle(&self, confirm: Outcome, remembered: &Remembered) {
        let acked = confirm == Outcome::Acked;
        let (waker, joiners, abandoned) = {
            let mut cell = self.cell();
            if cell.outcome.is_some() {
                return;
            }
            cell.outcome = Some(confirm);
            cell.deadline = None;
            (cell.waker.take(), cell.joiners.take(), cell.abandoned)
        };
        if acked && abandoned {
            remembered.insert(self);
        }
        if let Some(waker) = waker {
            waker.wake();
        }
        joiners
            .into_iter()
            .flat_map(|joiners| *joiners)
            .for_each(Waker::wake);
    }

    /// For the publishing connection's timer: wakes the caller if its
    /// deadline passed by `now`; the deadline if it is still ahead.
    pub(super) fn expire(&self, now: Instant, wake: &mut Vec<Waker>) -> Option<Instant> {
        let mut cell = self.cell();
        let deadline = cell.deadline?;
        if deadline > now {
            return Some(deadline);
        }
        cell.deadline = None;
        cell.timed_out = true;
        wake.extend(cell.waker.take());
        None
    }
}

impl PartialEq for Prepared {
    /// The same message: same id, and the same bytes sent.
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
            || (self.id_hash == other.id_hash && self.head == other.head && self.body == other.body)
    }
}

impl Eq for Prepared {}

impl Hash for Prepared {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.id_hash);
    }
}

/// A copy in flight on a publishing connection, keyed by its message.
pub(crate) struct InFlight(pub(crate) Arc<Prepared>);

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        *self.0 == *other.0
    }
}

impl Eq for InFlight {}

impl Hash for InFlight {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (*self.0).hash(state);
    }
}

impl std::borrow::Borrow<Prepared> for InFlight {
    fn borrow(&self) -> &Prepared {
        &self.0
    }
}

/// Passes on the message id's hash, computed once per message.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// The copies in flight on a publishing connection.
pub(crate) type InFlightSet = HashSet<InFlight, BuildHasherDefault<IdHasher>>;

/// What a caller's wait for a copy ended with.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Waited {
    Settled(Outcome),
    /// The caller's deadline passed first.
    TimedOut,
}

/// The caller's wait for the copy it sent (epoch `epoch`). Dropped before
/// the outcome, the copy goes on and its outcome is recorded for retries.
pub(super) struct Settled<'a> {
    copy: &'a Prepared,
    epoch: u32,
    finished: bool,
}

impl<'a> Settled<'a> {
    pub(super) fn new(copy: &'a Prepared, epoch: u32) -> Self {
        Settled {
            copy,
            epoch,
            finished: false,
        }
    }
}

impl Future for Settled<'_> {
    type Output = Waited;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Waited> {
        let mut cell = self.copy.cell();
        let waited = if cell.epoch != self.epoch {
            // Cannot happen: only this caller sends this record again.
            Waited::Settled(Outcome::Lost("the copy was sent again".into()))
        } else if let Some(outcome) = &cell.outcome {
            Waited::Settled(outcome.clone())
        } else if cell.timed_out {
            cell.abandoned = true;
            cell.waker = None;
            Waited::TimedOut
        } else {
            match &mut cell.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waker => *waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        };
        drop(cell);
        self.finished = true;
        Poll::Ready(waited)
    }
}

impl Drop for Settled<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut cell = self.copy.cell();
        if cell.epoch == self.epoch && cell.outcome.is_none() {
            cell.abandoned = true;
            cell.deadline = None;
            cell.waker = None;
        }
    }
}

/// A caller's wait for the copy it queued, or for a copy of the same
/// message someone else sent ([`Sending`]), until its deadline.
pub(super) enum Wait<'a> {
    Own(Settled<'a>),
    /// Someone else's copy (rare): boxed, with a timer of its own.
    Joined(Pin<Box<dyn Future<Output = Waited> + Send>>),
    Done(Option<Waited>),
}

impl<'a> Wait<'a> {
    pub(super) fn new(copy: &'a Prepared, sending: Sending, deadline: Instant) -> Self {
        match sending {
            Sending::Sent(epoch) => Wait::Own(Settled::new(copy, epoch)),
            Sending::Joined(other, epoch) => Wait::Joined(Box::pin(async move {
                match tokio::time::timeout_at(deadline, joined(other, epoch)).await {
                    Ok(confirm) => Waited::Settled(confirm),
                    Err(_) => Waited::TimedOut,
                }
            })),
            Sending::Lost(reason) => Wait::Done(Some(Waited::Settled(Outcome::Lost(reason)))),
        }
    }
}

impl Future for Wait<'_> {
    type Output = Waited;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Waited> {
        match self.get_mut() {
            Wait::Own(settled) => Pin::new(settled).poll(cx),
            Wait::Joined(joined) => joined.as_mut().poll(cx),
            Wait::Done(done) => Poll::Ready(
                done.take()
                    .unwrap_or(Waited::Settled(Outcome::Lost("polled again".into()))),
            ),
        }
    }
}

/// Waits for the outcome of the copy of epoch `epoch` someone else sent
/// (bound it with a timeout: this one has no deadline of its own).
pub(super) async fn joined(copy: Arc<Prepared>, epoch: u32) -> Outcome {
    std::future::poll_fn(|cx| {
        let mut cell = copy.cell();
        if cell.epoch != epoch {
            // It failed and was sent again: look for the new copy.
            return Poll::Ready(Outcome::Lost("the copy joined was sent again".into()));
        }
        if let Some(outcome) = &cell.outcome {
            return Poll::Ready(outcome.clone());
        }
        let joiners = cell.joiners.get_or_insert_default();
        if !joiners.iter().any(|waker| waker.will_wake(cx.waker())) {
            joiners.push(cx.waker().clone());
        }
        Poll::Pending
    })
    .await
}

/// Copies confirmed after their callers stopped waiting, for
/// [`CONFIRMED_KEPT`]: a retry of one sends nothing. Shared by the
/// publishing connections of a broker.
#[derive(Default)]
pub(crate) struct Remembered {
    /// How many are remembered: checked without the lock (usually none).
    count: AtomicUsize,
    entries: Mutex<RememberedEntries>,
}

#[derive(Default)]
struct RememberedEntries {
    by_key: HashSet<(Box<str>, u64)>,
    /// In the order confirmed, to forget after [`CONFIRMED_KEPT`].
    order: VecDeque<(Instant, (Box<str>, u64))>,
}

impl RememberedEntries {
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front()
            && now.duration_since(*at) >= CONFIRMED_KEPT
        {
            if let Some((_, key)) = self.order.pop_front() {
                self.by_key.remove(&key);
            }
        }
    }
}

impl Remembered {
    fn lock(&self) -> MutexGuard<'_, RememberedEntries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, copy: &Prepared) {
        self.insert_at(copy, Instant::now());
    }

    fn insert_at(&self, copy: &Prepared, now: Instant) {
        let key = (copy.message_id().into_boxed_str(), copy.fingerprint());
        let mut entries = self.lock();
        entries.forget_old(now);
        if entries.by_key.insert(key.clone()) {
            entries.order.push_back((now, key));
        }
        self.count.store(entries.by_key.len(), Ordering::Relaxed);
    }

    /// Whether a copy of `copy`'s message was confirmed after its caller
    /// stopped waiting, within [`CONFIRMED_KEPT`].
    pub(super) fn confirmed(&self, copy: &Prepared) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.confirmed_at(copy, Instant::now())
    }

    fn confirmed_at(&self, copy: &Prepared, now: Instant) -> bool {
        let mut entries = self.lock();
        entries.forget_old(now);
        self.count.store(entries.by_key.len(), Ordering::Relaxed);
        if entries.by_key.is_empty() {
            return false;
        }
        let key = (copy.message_id().into_boxed_str(), copy.fingerprint());
        entries.by_key.contains(&key)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::broker::amqp::convert::CC_HEADER;

    fn message(id: &str) -> OutgoingMessage {
        OutgoingMessage {
            body: b"{}".to_vec(),
            message_id: Some(id.to_owned()),
            ..OutgoingMessage::default()
        }
    }

    fn prepared(id: &str) -> Arc<Prepared> {
        Prepared::new("ex", "k", message(id), false, CC_HEADER).unwrap()
    }

    #[test]
    fn what_is_sent_reads_back() {
        let sent = OutgoingMessage {
            body: b"{\"a\":1}".to_vec(),
            content_type: Some("application/json".into()),
            message_id: Some("job-7".into()),
            persistent: true,
            headers: BTreeMap::from([("attempt".to_owned(), "2".to_owned())]),
            cc: vec!["route.a".into(), "route.b".into()],
        };
        for header in [CC_HEADER, DELAYED_CC_HEADER] {
            let copy = Prepared::new("ex.change", "a.key", sent.clone(), true, header).unwrap();
            assert_eq!(copy.exchange(), "ex.change");
            assert_eq!(copy.routing_key(), "a.key");
            assert_eq!(copy.message_id(), "job-7");
            assert_eq!(copy.cc(), ["route.a", "route.b"]);
            assert_eq!(copy.returnable(), Some((&b"ex.change"[..], &b"a.key"[..])));
            assert_eq!(copy.body(), sent.body);
        }
        let bare = Prepared::new("", "q", OutgoingMessage::default(), false, CC_HEADER).unwrap();
        assert_eq!(bare.message_id(), "");
        assert!(bare.cc().is_empty() && bare.returnable().is_none());
        let long = "k".repeat(256);
        assert!(matches!(
            Prepared::new("ex", &long, OutgoingMessage::default(), false, CC_HEADER),
            Err(BrokerError::Invalid(reason)) if reason.contains("256 bytes")
        ));
    }

    #[test]
    #[expect(
        clippy::mutable_key_type,
        reason = "a record's hash and equality are of what it sends, which never changes"
    )]
    fn a_message_is_the_same_by_its_id_and_bytes() {
        let mut set = InFlightSet::default();
        let a = prepared("a");
        set.insert(InFlight(a.clone()));
        assert!(
            set.contains(&*prepared("a")),
            "another record of the same message"
        );
        assert!(!set.contains(&*prepared("b")));
        let mut other_body = message("a");
        other_body.body = b"[]".to_vec();
        let other = Prepared::new("ex", "k", other_body, false, CC_HEADER).unwrap();
        assert!(!set.contains(&*other), "the same id, another message");
        assert!(set.remove(&*a));
    }

    #[tokio::test]
    async fn the_caller_and_joiners_hear_the_outcome() {
        let remembered = Remembered::default();
        let copy = prepared("a");
        let epoch = copy.begin(Instant::now() + Duration::from_secs(5));
        let joiner = tokio::spawn(joined(copy.clone(), copy.epoch()));
        let settled = {
            let copy = copy.clone();
            tokio::spawn(async move { Settled::new(&copy, epoch).await })
        };
        tokio::task::yield_now().await;
        copy.settle(Outcome::Acked, &remembered);
        assert_eq!(settled.await.unwrap(), Waited::Settled(Outcome::Acked));
        assert_eq!(joiner.await.unwrap(), Outcome::Acked);
        assert!(!remembered.confirmed(&copy), "its caller saw the confirm");
    }

    #[tokio::test]
    async fn a_copy_confirmed_after_its_caller_gave_up_is_remembered_for_a_while() {
        let remembered = Remembered::default();
        let copy = prepared("a");
        let deadline = Instant::now();
        let epoch = copy.begin(deadline);
        let mut wake = Vec::new();
        assert_eq!(copy.expire(deadline, &mut wake), None);
        assert_eq!(Settled::new(&copy, epoch).await, Waited::TimedOut);
        // A retry joins the copy still in flight, then hears its confirm.
        let joiner = tokio::spawn(joined(copy.clone(), copy.epoch()));
        tokio::task::yield_now().await;
        copy.settle(Outcome::Acked, &remembered);
        assert_eq!(joiner.await.unwrap(), Outcome::Acked);
        assert!(
            remembered.confirmed(&prepared("a")),
            "a later retry sends nothing"
        );
        assert!(!remembered.confirmed(&prepared("b")));

        // A caller that was dropped: the same.
        let dropped = prepared("c");
        let epoch = dropped.begin(Instant::now() + Duration::from_secs(5));
        drop(Settled::new(&dropped, epoch));
        dropped.settle(Outcome::Acked, &remembered);
        assert!(remembered.confirmed(&prepared("c")));
        // A failure is not remembered: a retry sends again.
        let failed = prepared("d");
        let epoch = failed.begin(Instant::now());
        drop(Settled::new(&failed, epoch));
        failed.settle(Outcome::Nacked, &remembered);
        assert!(!remembered.confirmed(&prepared("d")));
    }

    #[test]
    fn remembered_copies_are_forgotten_after_the_keeping_time() {
        let remembered = Remembered::default();
        let start = Instant::now();
        remembered.insert_at(&prepared("d"), start);
        remembered.insert_at(&prepared("e"), start + CONFIRMED_KEPT / 2);
        let later = start + CONFIRMED_KEPT;
        assert!(
            !remembered.confirmed_at(&prepared("d"), later),
            "kept its time"
        );
        assert!(remembered.confirmed_at(&prepared("e"), later));
    }

    #[tokio::test]
    async fn a_joiner_of_a_copy_sent_again_looks_again() {
        let remembered = Remembered::default();
        let copy = prepared("a");
        copy.begin(Instant::now());
        let joined_epoch = copy.epoch();
        copy.settle(Outcome::Lost("gone".into()), &remembered);
        copy.begin(Instant::now());
        assert!(matches!(
            joined(copy.clone(), joined_epoch).await,
            Outcome::Lost(reason) if reason.contains("sent again")
        ));
    }
}
