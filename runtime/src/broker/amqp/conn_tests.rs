//! The main connection against a broker played by the test
//! ([`scripted`](super::super::scripted)), frame by frame: what a broken or
//! hostile broker does, not only the happy path.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::super::methods::{self, QueueFlags};
use super::super::scripted::{self, Peer, Tune};
use super::super::wire::FRAME_HEARTBEAT;
use super::*;

const QUEUE: u16 = 50;

/// Generous: nothing here should take more than milliseconds, even under load.
const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not within {WAIT:?}"),
    }
}

/// Waits until `condition` holds (state the reader task changes).
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

/// A main connection to a scripted broker proposing `tune`; the broker side is the peer.
async fn connected(tune: Tune) -> (Arc<Connection>, Peer) {
    connected_with(tune, |config| config).await
}

/// As [`connected`], the client's config changed by `change` first.
async fn connected_with(
    tune: Tune,
    change: impl FnOnce(AmqpConfig) -> AmqpConfig,
) -> (Arc<Connection>, Peer) {
    let (listener, config) = scripted::broker(tune.heartbeat).await;
    let config = change(config);
    let client = ClientInfo {
        connection_name: None,
        heartbeat: tune.heartbeat,
    };
    let (connection, peer) = within("the handshake", async {
        tokio::join!(
            Connection::open(&config, &client),
            scripted::accept_opened(&listener, tune)
        )
    })
    .await;
    (connection.expect("connects to the scripted broker"), peer)
}

/// No heartbeats, at most `channel_max` channels.
fn channels(channel_max: u16) -> Tune {
    Tune {
        channel_max,
        ..Tune::heartbeat(0)
    }
}

/// Opens a channel, the broker answering.
async fn open(connection: &Arc<Connection>, peer: &mut Peer) -> Arc<Channel> {
    let (channel, id) = within("channel.open", async {
        tokio::join!(connection.open_channel(), peer.open_channel())
    })
    .await;
    let channel = channel.expect("the channel opens");
    assert_eq!(channel.id, id, "the broker answered the channel opened");
    Arc::new(channel)
}

fn name(text: &str) -> ShortString {
    ShortString::try_new(text).unwrap()
}

/// `queue.declare` of `queue` on `channel`, in a task.
fn declare(channel: &Arc<Channel>, queue: &str) -> JoinHandle<Result<Reply, AmqpError>> {
    let channel = channel.clone();
    let method = methods::queue_declare(&name(queue), &QueueFlags::passive(), &[]);
    tokio::spawn(async move { channel.call(method).await })
}

/// `queue.declare` of `queue` on `channel`, once the broker has it (so
/// requests are sent in a known order).
async fn declare_sent(
    channel: &Arc<Channel>,
    peer: &mut Peer,
    queue: &str,
) -> JoinHandle<Result<Reply, AmqpError>> {
    let call = declare(channel, queue);
    let method = peer.expect(QUEUE, 10).await;
    let mut args = method.args();
    args.u16("reserved").unwrap();
    assert_eq!(
        (method.channel, args.short("queue").unwrap()),
        (channel.id, queue.as_bytes())
    );
    call
}

/// The broker's `queue.declare-ok` naming `queue`.
fn declare_ok(queue: &str) -> Writer {
    let mut ok = Writer::method(QUEUE, 11);
    ok.short("queue", queue.as_bytes()).unwrap();
    ok.u32(0).u32(0);
    ok
}

/// The queue a `queue.declare-ok` names.
fn declared_queue(reply: Reply) -> String {
    assert!(reply.is(QUEUE, 11), "{reply:?}");
    String::from_utf8(reply.args().short("queue").unwrap().to_vec()).unwrap()
}

async fn outcome<T>(call: JoinHandle<T>) -> T {
    within("the call's outcome", call)
        .await
        .expect("the call does not panic")
}

#[derive(Debug)]
enum Event {
    Delivered(Incoming),
    Ended(String),
}

struct Sink(mpsc::UnboundedSender<Event>);

impl ConsumerSink for Sink {
    fn deliver(&self, incoming: Incoming) {
        let _ = self.0.send(Event::Delivered(incoming));
    }

    fn ended(&self, reason: String) {
        let _ = self.0.send(Event::Ended(reason));
    }
}

/// What a consumer's sink was told. The connection holds the only sender:
/// the events end once it let go of the sink.
struct Events(mpsc::UnboundedReceiver<Event>);

impl Events {
    async fn next(&mut self) -> Option<Event> {
        within("a consumer event", self.0.recv()).await
    }

    async fn delivered(&mut self) -> Incoming {
        match self.next().await {
            Some(Event::Delivered(incoming)) => incoming,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    /// The consumer ended, once, and nothing came after: the reason.
    async fn ended(&mut self) -> String {
        let reason = match self.next().await {
            Some(Event::Ended(reason)) => reason,
            other => panic!("expected the consumer's end, got {other:?}"),
        };
        let after = self.next().await;
        assert!(after.is_none(), "after its end, the consumer got {after:?}");
        reason
    }

    /// Nothing happened to the consumer so far.
    fn quiet(&mut self) {
        let event = self.0.try_recv();
        assert!(
            matches!(event, Err(mpsc::error::TryRecvError::Empty)),
            "{event:?}"
        );
    }
}

/// Starts consumer `tag` on `channel`, the broker answering.
async fn consume(channel: &Channel, peer: &mut Peer, tag: &str) -> Events {
    let (sender, receiver) = mpsc::unbounded_channel();
    let queue = name("q");
    let (consumed, ()) = within("basic.consume", async {
        tokio::join!(
            channel.consume(&queue, tag, Arc::new(Sink(sender))),
            async {
                let consume = peer.expect(CLASS_BASIC, 20).await;
                assert_eq!(consume.channel, channel.id);
                peer.consume_ok(consume.channel, tag).await;
            }
        )
    })
    .await;
    consumed.expect("the consumer starts");
    Events(receiver)
}

/// The connection died of something naming `needle`: the waiting call and
/// the consumer heard why, later requests fail with it, the client hung up.
async fn assert_died(
    connection: &Arc<Connection>,
    peer: &mut Peer,
    waiting: JoinHandle<Result<Reply, AmqpError>>,
    events: &mut Events,
    needle: &str,
) -> String {
    let reason = match outcome(waiting).await {
        Err(AmqpError::Connection(reason)) => reason,
        other => panic!("the waiting call got {other:?}"),
    };
    assert!(reason.contains(needle), "{reason:?} names {needle:?}");
    assert_eq!(events.ended().await, reason);
    assert!(!connection.is_up());
    assert_eq!(connection.death_reason(), reason);
    assert_eq!(
        connection.open_channel().await.unwrap_err(),
        AmqpError::Connection(reason.clone())
    );
    peer.hung_up().await;
    reason
}

#[tokio::test]
async fn replies_reach_their_callers_in_order_on_each_channel() {
    let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
    let a = open(&connection, &mut peer).await;
    let b = open(&connection, &mut peer).await;
    let a1 = declare_sent(&a, &mut peer, "a1").await;
    let b1 = declare_sent(&b, &mut peer, "b1").await;
    let a2 = declare_sent(&a, &mut peer, "a2").await;
    let gave_up = declare_sent(&a, &mut peer, "gave-up").await;
    let a3 = declare_sent(&a, &mut peer, "a3").await;
    let b2 = declare_sent(&b, &mut peer, "b2").await;
    // A caller that stops waiting still takes its own reply.
    gave_up.abort();
    assert!(gave_up.await.unwrap_err().is_cancelled());
    // The channels' replies interleave; each channel's come in order.
    for (channel, queue) in [
        (b.id, "b1"),
        (a.id, "a1"),
        (a.id, "a2"),
        (b.id, "b2"),
        (a.id, "gave-up"),
        (a.id, "a3"),
    ] {
        peer.send(channel, declare_ok(queue)).await;
    }
    for (call, queue) in [(a1, "a1"), (b1, "b1"), (a2, "a2"), (a3, "a3"), (b2, "b2")] {
        assert_eq!(declared_queue(outcome(call).await.unwrap()), queue);
    }
    assert!(connection.is_up());
}

#[tokio::test]
async fn content_split_over_body_frames_arrives_whole() {
    let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
    let channel = open(&connection, &mut peer).await;
    let mut events = consume(&channel, &mut peer, "c").await;
    peer.deliver(channel.id, "c", 5, &[b"hel", b"lo ", b"world"])
        .await;
    let incoming = events.delivered().await;
    assert_eq!(incoming.content.body, b"hello world");
    assert_eq!(
        (
            incoming.delivery_tag,
            incoming.redelivered,
            &incoming.exchange[..],
            &incoming.routing_key[..]
        ),
        (5, false, &b"ex"[..], &b"key"[..])
    );
    let mut header = Reader::new(&incoming.content.header);
    header.u16("class").unwrap();
    header.u16("weight").unwrap();
    assert_eq!(header.u64("body size").unwrap(), 11, "the header is kept");

    // An empty body: the header alone completes the delivery.
    peer.deliver(channel.id, "c", 6, &[]).await;
    let empty = events.delivered().await;
    assert_eq!((empty.delivery_tag, empty.content.body.len()), (6, 0));

    // Two channels' contents interleave frame by frame.
    let other = open(&connection, &mut peer).await;
    let mut other_events = consume(&other, &mut peer, "d").await;
    peer.deliver_method(channel.id, "c", 7).await;
    peer.deliver_method(other.id, "d", 1).await;
    peer.content_header(other.id, 4).await;
    peer.content_header(channel.id, 4).await;
    peer.body(channel.id, b"ab").await;
    peer.body(other.id, b"wx").await;
    peer.body(other.id, b"yz").await;
    peer.body(channel.id, b"cd").await;
    assert_eq!(other_events.delivered().await.content.body, b"wxyz");
    assert_eq!(events.delivered().await.content.body, b"abcd");

    // basic.get-ok's content comes with its reply; get-empty has none.
    let get = |channel: &Arc<Channel>| {
        let channel = channel.clone();
        tokio::spawn(async move { channel.call(methods::basic_get(&name("q"))).await })
    };
    let got = get(&channel);
    peer.expect(CLASS_BASIC, 70).await;
    peer.get_ok(channel.id, 8, &[b"a", b"bc"]).await;
    let reply = outcome(got).await.unwrap();
    assert!(reply.is(CLASS_BASIC, 71));
    assert_eq!(reply.args().u64("delivery tag").unwrap(), 8);
    assert_eq!(reply.content.expect("content").body, b"abc");
    let got = get(&channel);
    peer.expect(CLASS_BASIC, 70).await;
    peer.get_empty(channel.id).await;
    let reply = outcome(got).await.unwrap();
    assert!(reply.is(CLASS_BASIC, 72) && reply.content.is_none());
    events.quiet();
    assert!(connection.is_up());
}

/// Frames a broken broker sends.
#[derive(Debug, Clone, Copy)]
enum Broken {
    /// A body frame longer than the header announced.
    LongBody,
    /// A content header with no method before it.
    HeaderAlone,
    /// A body frame with no method before it.
    BodyAlone,
    /// A body frame before the content header.
    BodyBeforeHeader,
    /// A new delivery while a message's body was still arriving.
    DeliveryMidBody,
    /// A frame larger than the negotiated frame_max.
    Oversized,
    /// A frame whose end byte is wrong.
    BadFrameEnd,
}

#[tokio::test]
async fn broken_frames_end_the_connection_and_everyone_hears_why() {
    for (case, needle) in [
        (
            Broken::LongBody,
            "message body on channel 1 longer than the 3 bytes announced",
        ),
        (
            Broken::HeaderAlone,
            "content frame on channel 1 without a message",
        ),
        (
            Broken::BodyAlone,
            "content frame on channel 1 without a message",
        ),
        (
            Broken::BodyBeforeHeader,
            "content frame of type 3 out of order on channel 1",
        ),
        (
            Broken::DeliveryMidBody,
            "method 60.60 on channel 1 while a message's content was still arriving",
        ),
        (
            Broken::Oversized,
            "frame of 131073 bytes exceeds the negotiated maximum 131072",
        ),
        (Broken::BadFrameEnd, "frame end byte is 0x00, not 0xCE"),
    ] {
        let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
        let consuming = open(&connection, &mut peer).await;
        let mut events = consume(&consuming, &mut peer, "c").await;
        let other = open(&connection, &mut peer).await;
        let waiting = declare_sent(&other, &mut peer, "q").await;
        let id = consuming.id;
        match case {
            Broken::LongBody => {
                peer.deliver_method(id, "c", 1).await;
                peer.content_header(id, 3).await;
                peer.body(id, b"12345").await;
            }
            Broken::HeaderAlone => peer.content_header(id, 3).await,
            Broken::BodyAlone => peer.body(id, b"123").await,
            Broken::BodyBeforeHeader => {
                peer.deliver_method(id, "c", 1).await;
                peer.body(id, b"123").await;
            }
            Broken::DeliveryMidBody => {
                peer.deliver_method(id, "c", 1).await;
                peer.content_header(id, 3).await;
                peer.body(id, b"1").await;
                peer.deliver(id, "c", 2, &[b"x"]).await;
            }
            Broken::Oversized => {
                peer.deliver_method(id, "c", 1).await;
                peer.content_header(id, 1 << 20).await;
                peer.body(id, &vec![0; 131_073]).await;
            }
            Broken::BadFrameEnd => peer.raw(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 80, 0x00]).await,
        }
        let reason = assert_died(&connection, &mut peer, waiting, &mut events, needle).await;
        assert!(
            matches!(consuming.call(declare_ok("q")).await, Err(AmqpError::Connection(r)) if r == reason),
            "{case:?}"
        );
    }
}

/// Content frames follow their method with nothing else on the channel
/// between them: a reply inside a message is a broken stream, not a reply.
#[tokio::test]
async fn a_method_inside_a_message_ends_the_connection() {
    let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
    let channel = open(&connection, &mut peer).await;
    let mut events = consume(&channel, &mut peer, "c").await;
    let waiting = declare_sent(&channel, &mut peer, "q").await;
    peer.deliver_method(channel.id, "c", 1).await;
    peer.content_header(channel.id, 3).await;
    peer.body(channel.id, b"1").await;
    peer.send(channel.id, declare_ok("q")).await;
    peer.body(channel.id, b"23").await;
    assert_died(
        &connection,
        &mut peer,
        waiting,
        &mut events,
        "method 50.11 on channel 1 while a message's content was still arriving",
    )
    .await;
}

#[tokio::test]
async fn a_channel_the_broker_closes_fails_its_own_calls_and_consumers_only() {
    let (connection, mut peer) = connected(channels(3)).await;
    let doomed = open(&connection, &mut peer).await;
    let mut doomed_events = consume(&doomed, &mut peer, "c1").await;
    let kept = open(&connection, &mut peer).await;
    let mut kept_events = consume(&kept, &mut peer, "c2").await;
    let _third = open(&connection, &mut peer).await;
    let first = declare_sent(&doomed, &mut peer, "missing").await;
    let second = declare_sent(&doomed, &mut peer, "sent-after").await;
    let text = "NOT_FOUND - no queue 'missing' in vhost '/'";
    peer.close_channel(doomed.id, 404, text).await;
    let closed = AmqpError::Closed {
        code: 404,
        text: text.to_owned(),
    };
    assert_eq!(outcome(first).await.unwrap_err(), closed);
    assert_eq!(outcome(second).await.unwrap_err(), closed);
    assert_eq!(doomed_events.ended().await, closed.to_string());
    let close_ok = peer.expect(CHANNEL, 41).await;
    assert_eq!(close_ok.channel, doomed.id, "the client answers close-ok");
    assert!(!doomed.is_open());
    assert_eq!(
        doomed
            .call(declare_ok("after"))
            .await
            .expect_err("no call on a closed channel"),
        AmqpError::ChannelGone
    );

    // The other channels go on.
    assert!(connection.is_up() && kept.is_open());
    let call = declare_sent(&kept, &mut peer, "q2").await;
    peer.send(kept.id, declare_ok("q2")).await;
    assert_eq!(declared_queue(outcome(call).await.unwrap()), "q2");
    peer.deliver(kept.id, "c2", 1, &[b"x"]).await;
    assert_eq!(kept_events.delivered().await.delivery_tag, 1);

    // Its id is the only one free (channel_max 3): reused, the close-ok sent first.
    let reopened = open(&connection, &mut peer).await;
    assert_eq!(reopened.id, doomed.id);
    kept_events.quiet();
}

#[tokio::test]
async fn a_channel_the_broker_refuses_to_open_frees_its_id() {
    let (connection, mut peer) = connected(channels(1)).await;
    let (refused, ()) = within("channel.open", async {
        tokio::join!(connection.open_channel(), async {
            let open = peer.expect(CHANNEL, 10).await;
            peer.close_channel(open.channel, 530, "NOT_ALLOWED - too many channels")
                .await;
        })
    })
    .await;
    assert_eq!(
        refused.unwrap_err(),
        AmqpError::Closed {
            code: 530,
            text: "NOT_ALLOWED - too many channels".to_owned()
        }
    );
    assert_eq!(peer.expect(CHANNEL, 41).await.channel, 1);
    assert!(connection.is_up());
    let channel = open(&connection, &mut peer).await;
    assert_eq!(channel.id, 1);
}

/// A `Channel` the broker closed is stale once its id is reused: it must
/// neither send on the new channel nor close it when dropped.
#[tokio::test]
async fn a_stale_handle_never_reaches_the_channel_that_reuses_its_id() {
    let (connection, mut peer) = connected(channels(1)).await;
    let stale = open(&connection, &mut peer).await;
    peer.close_channel(stale.id, 406, "PRECONDITION_FAILED")
        .await;
    assert_eq!(peer.expect(CHANNEL, 41).await.channel, 1);
    until("the close handled", || {
        connection.lock().channels.is_empty()
    })
    .await;
    let fresh = open(&connection, &mut peer).await;
    assert_eq!(fresh.id, stale.id, "channel_max 1: the id is reused");
    assert!(!stale.is_open(), "the stale handle is not the new channel");
    assert_eq!(
        stale.call(declare_ok("stale")).await.unwrap_err(),
        AmqpError::ChannelGone
    );
    assert_eq!(
        stale.send(&[methods::basic_ack(1, false)]).unwrap_err(),
        AmqpError::ChannelGone
    );
    assert_eq!(
        stale.close().await.unwrap_err(),
        AmqpError::ChannelGone,
        "closing it closes nothing"
    );
    drop(stale);
    assert!(fresh.is_open(), "dropping the stale handle left it open");
    // What the broker hears next is the new channel's own request, not a close.
    let call = declare_sent(&fresh, &mut peer, "fresh").await;
    peer.send(fresh.id, declare_ok("fresh")).await;
    assert_eq!(declared_queue(outcome(call).await.unwrap()), "fresh");
}

#[tokio::test]
async fn crossing_closes_keep_the_id_until_the_brokers_close_ok() {
    let (connection, mut peer) = connected(channels(2)).await;
    let channel = open(&connection, &mut peer).await;
    let mut events = consume(&channel, &mut peer, "c").await;
    let other = open(&connection, &mut peer).await;
    let closing = {
        let channel = channel.clone();
        tokio::spawn(async move { channel.close().await })
    };
    assert_eq!(peer.expect(CHANNEL, 40).await.channel, channel.id);
    // The broker closed it too, before it read the client's close.
    peer.close_channel(
        channel.id,
        406,
        "PRECONDITION_FAILED - unknown delivery tag 9",
    )
    .await;
    assert_eq!(peer.expect(CHANNEL, 41).await.channel, channel.id);
    let closed = outcome(closing).await;
    assert!(
        matches!(&closed, Err(AmqpError::Closed { code: 406, .. })),
        "{closed:?}"
    );
    assert!(events.ended().await.contains("406"));
    assert!(!channel.is_open());

    // The broker has not answered the client's close: the id is still taken.
    assert!(connection.lock().channels.contains_key(&channel.id));
    assert_eq!(
        within("open_channel", connection.open_channel())
            .await
            .unwrap_err(),
        AmqpError::NoChannelId(2)
    );
    peer.close_ok(channel.id).await;

    // Stray frames for the closed channel are ignored: a reply, a delivery
    // with its content, another close (no close-ok for it).
    peer.send(channel.id, declare_ok("stray")).await;
    peer.deliver(channel.id, "c", 3, &[b"late"]).await;
    peer.close_channel(channel.id, 406, "again").await;
    // Frames are handled in order: once this reply arrived, so did those.
    let sync = declare_sent(&other, &mut peer, "sync").await;
    peer.send(other.id, declare_ok("sync")).await;
    assert_eq!(declared_queue(outcome(sync).await.unwrap()), "sync");
    assert!(connection.is_up(), "{}", connection.death_reason());
    assert!(!connection.lock().channels.contains_key(&channel.id));
    let again = open(&connection, &mut peer).await;
    assert_eq!(again.id, channel.id);
}

#[tokio::test]
async fn a_broker_that_never_answers_a_channel_close_is_left() {
    let timeout = Duration::from_millis(300);
    let (connection, mut peer) =
        connected_with(channels(2), |config| config.with_operation_timeout(timeout)).await;
    let channel = open(&connection, &mut peer).await;
    let other = open(&connection, &mut peer).await;
    let closing = {
        let channel = channel.clone();
        tokio::spawn(async move { channel.close().await })
    };
    assert_eq!(peer.expect(CHANNEL, 40).await.channel, channel.id);
    // No close-ok, ever. The other channel still works meanwhile.
    let sync = declare_sent(&other, &mut peer, "sync").await;
    peer.send(other.id, declare_ok("sync")).await;
    assert_eq!(declared_queue(outcome(sync).await.unwrap()), "sync");
    let started = Instant::now();
    let reason = match outcome(closing).await {
        Err(AmqpError::Connection(reason)) => reason,
        other => panic!("the close got {other:?}"),
    };
    assert!(
        reason.contains(&format!("channel.close on channel {}", channel.id)),
        "{reason}"
    );
    assert!(started.elapsed() <= timeout + Duration::from_secs(2));
    assert!(!connection.is_up());
    assert_eq!(connection.death_reason(), reason);
    peer.hung_up().await;
}

#[tokio::test]
async fn a_consumer_the_broker_cancels_ends_alone() {
    let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
    let channel = open(&connection, &mut peer).await;
    let mut a = consume(&channel, &mut peer, "a").await;
    let mut b = consume(&channel, &mut peer, "b").await;
    let other = open(&connection, &mut peer).await;
    let mut c = consume(&other, &mut peer, "c").await;

    peer.cancel(channel.id, "a", false).await;
    assert_eq!(a.ended().await, "the broker cancelled the consumer");
    let ok = peer.expect(CLASS_BASIC, 31).await;
    assert_eq!(ok.channel, channel.id);
    assert_eq!(ok.args().short("consumer tag").unwrap(), b"a");

    peer.deliver(channel.id, "b", 1, &[b"to b"]).await;
    assert_eq!(b.delivered().await.content.body, b"to b");
    peer.deliver(other.id, "c", 1, &[b"to c"]).await;
    assert_eq!(c.delivered().await.content.body, b"to c");

    // no-wait: no cancel-ok.
    peer.cancel(channel.id, "b", true).await;
    assert_eq!(b.ended().await, "the broker cancelled the consumer");
    let call = declare_sent(&channel, &mut peer, "after").await;
    peer.send(channel.id, declare_ok("after")).await;
    assert_eq!(declared_queue(outcome(call).await.unwrap()), "after");
    assert!(channel.is_open() && other.is_open() && connection.is_up());
    c.quiet();
}

#[tokio::test]
async fn a_delivery_nobody_consumes_is_rejected_back_to_its_queue() {
    let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
    let channel = open(&connection, &mut peer).await;
    let mut a = consume(&channel, &mut peer, "a").await;
    let rejected = |method: scripted::Method| {
        assert_eq!(method.channel, channel.id);
        let mut args = method.args();
        let tag = args.u64("delivery tag").unwrap();
        let requeue = args.u8("requeue").unwrap() & 1 == 1;
        (tag, requeue)
    };
    peer.deliver(channel.id, "unknown", 7, &[b"lost?"]).await;
    assert_eq!(rejected(peer.expect(CLASS_BASIC, 90).await), (7, true));
    a.quiet();
    // A consumer the broker cancelled: a delivery still on its way goes back too.
    peer.cancel(channel.id, "a", true).await;
    a.ended().await;
    peer.deliver(channel.id, "a", 8, &[b"late"]).await;
    assert_eq!(rejected(peer.expect(CLASS_BASIC, 90).await), (8, true));
    assert!(connection.is_up() && channel.is_open());
    // On a channel being closed nothing is sent: its close requeues the delivery.
    let id = channel.id;
    drop(channel);
    assert_eq!(peer.expect(CHANNEL, 40).await.channel, id);
    peer.deliver(id, "unknown", 9, &[b"closing"]).await;
    let next = open(&connection, &mut peer).await;
    assert_ne!(next.id, id, "still closing");
    // Frames are handled in order: the delivery was before this reply.
    let sync = declare_sent(&next, &mut peer, "sync").await;
    peer.send(next.id, declare_ok("sync")).await;
    assert_eq!(declared_queue(outcome(sync).await.unwrap()), "sync");
    peer.close_ok(id).await;
}

#[tokio::test]
async fn channel_flow_is_acknowledged() {
    let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
    let channel = open(&connection, &mut peer).await;
    for active in [0, 1] {
        let mut flow = Writer::method(CHANNEL, 20);
        flow.u8(active);
        peer.send(channel.id, flow).await;
        let ok = peer.expect(CHANNEL, 21).await;
        assert_eq!((ok.channel, ok.args), (channel.id, vec![active]));
    }
    assert!(connection.is_up() && channel.is_open());
}

#[tokio::test]
async fn the_broker_closing_the_connection_is_answered_and_told_to_everyone() {
    let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
    let consuming = open(&connection, &mut peer).await;
    let mut events = consume(&consuming, &mut peer, "c").await;
    let other = open(&connection, &mut peer).await;
    let waiting = declare_sent(&other, &mut peer, "q").await;
    peer.close_connection_answered(
        320,
        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
    )
    .await;
    let reason = assert_died(
        &connection,
        &mut peer,
        waiting,
        &mut events,
        "320 CONNECTION_FORCED - broker forced connection closure",
    )
    .await;
    assert!(!consuming.is_open() && !other.is_open());
    assert_eq!(
        other.call(declare_ok("q")).await.unwrap_err(),
        AmqpError::Connection(reason)
    );
}

#[tokio::test]
async fn closing_the_connection_waits_for_the_brokers_close_ok() {
    let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
    let channel = open(&connection, &mut peer).await;
    let mut events = consume(&channel, &mut peer, "c").await;
    let closing = {
        let connection = connection.clone();
        tokio::spawn(async move { connection.close("bye").await })
    };
    let close = peer.expect(CONNECTION, 50).await;
    let mut args = close.args();
    assert_eq!((close.channel, args.u16("code").unwrap()), (0, 200));
    assert_eq!(args.short("text").unwrap(), b"bye");
    assert!(connection.is_up(), "up until the broker answers");
    peer.send(0, Writer::method(CONNECTION, 51)).await;
    outcome(closing).await;
    assert!(!connection.is_up());
    assert_eq!(connection.death_reason(), "closed by application");
    assert_eq!(events.ended().await, "closed by application");
    peer.hung_up().await;
}

#[tokio::test]
async fn a_broker_silent_for_two_heartbeats_is_left() {
    let (connection, mut peer) = connected(Tune::heartbeat(1)).await;
    let channel = open(&connection, &mut peer).await;
    // The broker's last frame was the channel.open-ok: silence from here.
    let started = Instant::now();
    let waiting = declare_sent(&channel, &mut peer, "unanswered").await;
    let reason = match outcome(waiting).await {
        Err(AmqpError::Connection(reason)) => reason,
        other => panic!("{other:?}"),
    };
    let waited = started.elapsed();
    assert!(reason.contains("no heartbeat"), "{reason}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "left after {waited:?}"
    );
    assert!(!connection.is_up());
    peer.hung_up().await;
}

#[tokio::test]
async fn an_idle_client_sends_heartbeats() {
    let (connection, mut peer) = connected(Tune::heartbeat(1)).await;
    let mut heartbeats = 0;
    let end = Instant::now() + Duration::from_secs(3);
    let mut beat = tokio::time::interval(Duration::from_millis(300));
    loop {
        tokio::select! {
            frame = peer.any_frame() => {
                let frame = frame.expect("the client stays connected");
                assert_eq!(
                    (frame.kind, frame.channel),
                    (FRAME_HEARTBEAT, 0),
                    "an idle connection sends only heartbeats"
                );
                heartbeats += 1;
            }
            _ = beat.tick() => peer.heartbeat().await,
            () = tokio::time::sleep_until(end) => break,
        }
    }
    // One every half interval: about six.
    assert!(heartbeats >= 2, "{heartbeats} heartbeats in 3 s");
    assert!(
        connection.is_up(),
        "the broker's heartbeats kept it: {}",
        connection.death_reason()
    );
}

#[tokio::test]
async fn a_reply_nobody_waits_for_ends_the_connection() {
    for get in [false, true] {
        let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
        let waiting_channel = open(&connection, &mut peer).await;
        let mut events = consume(&waiting_channel, &mut peer, "c").await;
        let idle = open(&connection, &mut peer).await;
        let waiting = declare_sent(&waiting_channel, &mut peer, "mine").await;
        let needle = if get {
            peer.get_ok(idle.id, 1, &[b"x"]).await;
            "basic.get-ok on channel 2 that no request waits for"
        } else {
            peer.send(idle.id, declare_ok("nobody's")).await;
            "unexpected method 50.11 on channel 2 (no request waits for it)"
        };
        // Not handed to the call waiting on the other channel, nor kept for a later one.
        assert_died(&connection, &mut peer, waiting, &mut events, needle).await;
    }
}

/// A close-ok for a close this client never sent: the broker and the
/// client disagree on what is open (the channel's id must not be reused
/// while the broker may hold it open), so the connection ends, saying so.
#[tokio::test]
async fn a_close_ok_nobody_asked_for_ends_the_connection() {
    for whole_connection in [false, true] {
        let (connection, mut peer) = connected(Tune::heartbeat(0)).await;
        let channel = open(&connection, &mut peer).await;
        let mut events = consume(&channel, &mut peer, "c").await;
        let waiting = declare_sent(&channel, &mut peer, "q").await;
        let needle = if whole_connection {
            peer.send(0, Writer::method(CONNECTION, 51)).await;
            "connection.close-ok, but this client did not close the connection"
        } else {
            peer.close_ok(channel.id).await;
            "channel.close-ok on channel 1, which this client did not close"
        };
        assert_died(&connection, &mut peer, waiting, &mut events, needle).await;
    }
}

/// `open_channel` with every id taken fails at once, sending nothing.
async fn assert_full(connection: &Arc<Connection>, channel_max: u16) {
    let error = within(
        "open_channel with every id taken",
        connection.open_channel(),
    )
    .await
    .unwrap_err();
    assert_eq!(error, AmqpError::NoChannelId(channel_max));
    assert!(
        error
            .to_string()
            .starts_with(&format!("all {channel_max} channel ids")),
        "{error}"
    );
    assert!(connection.is_up());
}

#[tokio::test]
async fn channel_ids_are_reused_only_once_closed_and_running_out_is_an_error() {
    let (connection, mut peer) = connected(channels(3)).await;
    let mut opened = VecDeque::new();
    for _ in 0..3 {
        opened.push_back(open(&connection, &mut peer).await);
    }
    let ids: Vec<_> = opened.iter().map(|channel| channel.id).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_full(&connection, 3).await;
    for round in 0..10 {
        // Two channels dropped: their closes go out, their ids stay taken.
        let first = opened.pop_front().unwrap().id;
        let second = opened.pop_front().unwrap().id;
        assert_eq!(peer.expect(CHANNEL, 40).await.channel, first);
        assert_eq!(peer.expect(CHANNEL, 40).await.channel, second);
        assert_eq!(connection.lock().channels.len(), 3);
        assert_full(&connection, 3).await;
        // The broker confirms the second close first: only that id is free.
        peer.close_ok(second).await;
        until("the second close-ok handled", || {
            connection.lock().channels.len() == 2
        })
        .await;
        let reopened = open(&connection, &mut peer).await;
        assert_eq!(
            reopened.id, second,
            "round {round}: {first} is still closing"
        );
        opened.push_back(reopened);
        assert_full(&connection, 3).await;
        peer.close_ok(first).await;
        until("the first close-ok handled", || {
            connection.lock().channels.len() == 2
        })
        .await;
        let reopened = open(&connection, &mut peer).await;
        assert_eq!(reopened.id, first, "round {round}");
        opened.push_back(reopened);
        assert_full(&connection, 3).await;
    }
    assert!(connection.is_up());
}

/// Settlements made while the writer has not run go out together: a run of
/// acks from the oldest unsettled delivery as one `multiple` ack, a nack
/// first, an ack after an unsettled delivery alone; and dropping the
/// batcher (its consumer gone) sends what was still recorded.
#[tokio::test]
async fn settlements_made_before_the_next_write_go_out_together() {
    use super::super::acks::AckBatcher;
    use crate::broker::AckHandle;

    let (connection, mut peer) = connected(channels(8)).await;
    let channel = open(&connection, &mut peer).await;
    let channel = Arc::into_inner(channel).expect("the only handle");
    let id = channel.id;
    let batcher = AckBatcher::new(channel);
    let dead = connection.dead_signal();
    let ackers: Vec<_> = (1..=6)
        .map(|tag| batcher.delivered(tag, dead.clone()))
        .collect();
    // No await in between: the writer (a task on this same thread) cannot run.
    for tag in [1, 2, 3] {
        ackers[tag - 1].ack().await.expect("acked");
    }
    ackers[4].nack(false).await.expect("nacked");
    ackers[5].ack().await.expect("acked");
    let mut settled = Vec::new();
    while settled.len() < 3 {
        let method = peer.next_method().await.expect("the client is connected");
        assert_eq!(method.channel, id);
        let mut args = method.args();
        let tag = args.u64("tag").unwrap();
        let bits = args.u8("bits").unwrap();
        settled.push((method.class, method.method, tag, bits));
    }
    assert_eq!(
        settled,
        [
            (CLASS_BASIC, 120, 5, 0), // the nack, not requeued
            (CLASS_BASIC, 80, 3, 1),  // 1..=3 in one multiple ack
            (CLASS_BASIC, 80, 6, 0),  // 6 alone: 4 is still unsettled
        ]
    );
    // Settling twice is refused, and sends nothing.
    assert!(ackers[0].ack().await.is_err());
    // Delivery 4 acked, then the consumer lets go: it goes out before the channel closes.
    let mut ackers = ackers;
    let fourth = ackers.remove(3);
    fourth.ack().await.expect("acked");
    drop(ackers);
    drop(fourth);
    drop(batcher);
    let ack = peer.next_method().await.expect("the ack");
    assert_eq!((ack.class, ack.method, ack.channel), (CLASS_BASIC, 80, id));
    assert_eq!(ack.args().u64("tag").unwrap(), 4);
    let close = peer.next_method().await.expect("the channel's close");
    assert_eq!((close.class, close.method, close.channel), (20, 40, id));
}
