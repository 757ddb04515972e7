//! A broker played by a test, over loopback: it speaks just enough AMQP to
//! take a connection through its handshake, then does what each test
//! scripts, frame by frame — including what a broken or hostile broker does.
//!
//! [`accept_opened`] stops after `connection.open-ok` (for the main
//! connection, which opens its channels itself); [`accept`] also opens the
//! publishing connection's confirm channel 1.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::config::AmqpConfig;
use super::wire::{
    CLASS_BASIC, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, Frame, Writer,
};

const CONNECTION: u16 = 10;
const CHANNEL: u16 = 20;
const CONFIRM: u16 = 85;

/// What the scripted broker proposes in `connection.tune`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tune {
    /// Highest channel id (0: no limit).
    pub(crate) channel_max: u16,
    pub(crate) frame_max: u32,
    /// Heartbeat interval in seconds (0: none).
    pub(crate) heartbeat: u16,
}

impl Tune {
    /// RabbitMQ's defaults, with `heartbeat` seconds.
    pub(crate) fn heartbeat(heartbeat: u16) -> Self {
        Tune {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat,
        }
    }
}

/// One method frame the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Method {
    pub(crate) channel: u16,
    pub(crate) class: u16,
    pub(crate) method: u16,
    /// The arguments (after class and method ids).
    pub(crate) args: Vec<u8>,
}

impl Method {
    /// Reads the arguments.
    pub(crate) fn args(&self) -> super::wire::Reader<'_> {
        super::wire::Reader::new(&self.args)
    }
}

/// The broker's side of one connection.
pub(crate) struct Peer {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Peer {
    /// The next frame, heartbeats included; `None` once the client hung up.
    /// Cancel safe: a frame is never lost to a `select!` that drops it.
    pub(crate) async fn any_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) =
                Frame::parse(&self.buffer, 0).expect("client frames are well formed")
            {
                self.buffer.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0; 4096];
            let read = self.stream.read(&mut chunk).await.ok()?;
            if read == 0 {
                return None;
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// The next frame that is not a heartbeat; `None` once the client hung up.
    pub(crate) async fn frame(&mut self) -> Option<Frame> {
        loop {
            let frame = self.any_frame().await?;
            if frame.kind != FRAME_HEARTBEAT {
                return Some(frame);
            }
        }
    }

    /// The next method's class and id (skipping content frames).
    pub(crate) async fn method(&mut self) -> Option<(u16, u16)> {
        self.next_method()
            .await
            .map(|method| (method.class, method.method))
    }

    /// The next method, whole (skipping content frames).
    pub(crate) async fn next_method(&mut self) -> Option<Method> {
        loop {
            let frame = self.frame().await?;
            if frame.kind == FRAME_METHOD {
                let (class, method, args) = frame.method().expect("a method frame");
                return Some(Method {
                    channel: frame.channel,
                    class,
                    method,
                    args: args.rest().to_vec(),
                });
            }
        }
    }

    /// The next method, which must be `class.method`; panics naming what came instead.
    pub(crate) async fn expect(&mut self, class: u16, method: u16) -> Method {
        match tokio::time::timeout(Duration::from_secs(10), self.next_method()).await {
            Ok(Some(got)) if got.class == class && got.method == method => got,
            Ok(Some(got)) => panic!("expected method {class}.{method}, the client sent {got:?}"),
            Ok(None) => panic!("expected method {class}.{method}, the client hung up"),
            Err(_) => panic!("expected method {class}.{method}, nothing came within 10 s"),
        }
    }

    /// Waits until the client hangs up (whatever it sends meanwhile).
    pub(crate) async fn hung_up(&mut self) {
        let hung_up = async { while self.any_frame().await.is_some() {} };
        tokio::time::timeout(Duration::from_secs(10), hung_up)
            .await
            .expect("the client hangs up");
    }

    pub(crate) async fn send(&mut self, channel: u16, method: Writer) {
        self.raw(&Frame::encode(FRAME_METHOD, channel, &method.0))
            .await;
    }

    pub(crate) async fn raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// A heartbeat frame.
    pub(crate) async fn heartbeat(&mut self) {
        self.raw(&Frame::encode(FRAME_HEARTBEAT, 0, &[])).await;
    }

    /// A content header frame announcing `body_size` bytes (no properties).
    pub(crate) async fn content_header(&mut self, channel: u16, body_size: u64) {
        let mut header = Writer::default();
        header.u16(CLASS_BASIC).u16(0).u64(body_size).u16(0);
        self.raw(&Frame::encode(FRAME_HEADER, channel, &header.0))
            .await;
    }

    /// One content body frame.
    pub(crate) async fn body(&mut self, channel: u16, bytes: &[u8]) {
        self.raw(&Frame::encode(FRAME_BODY, channel, bytes)).await;
    }

    /// A content header announcing the pieces' total size, then one body frame per piece.
    pub(crate) async fn content(&mut self, channel: u16, pieces: &[&[u8]]) {
        let size = pieces.iter().map(|piece| piece.len() as u64).sum();
        self.content_header(channel, size).await;
        for piece in pieces {
            self.body(channel, piece).await;
        }
    }

    /// Answers the client's next method, which must be a `channel.open`; returns its channel.
    pub(crate) async fn open_channel(&mut self) -> u16 {
        let open = self.expect(CHANNEL, 10).await;
        self.open_ok(open.channel).await;
        open.channel
    }

    /// `channel.open-ok` on `channel`.
    pub(crate) async fn open_ok(&mut self, channel: u16) {
        let mut channel_ok = Writer::method(CHANNEL, 11);
        channel_ok.long(&[]);
        self.send(channel, channel_ok).await;
    }

    /// Answers the client's `channel.open` (channel 1) and `confirm.select`.
    pub(crate) async fn open_confirm_channel(&mut self) {
        assert_eq!(self.method().await, Some((CHANNEL, 10)), "channel.open");
        self.open_ok(1).await;
        assert_eq!(self.method().await, Some((CONFIRM, 10)), "confirm.select");
        self.send(1, Writer::method(CONFIRM, 11)).await;
    }

    /// Settles delivery `tag` on channel 1: `basic.ack` (80) or `basic.nack` (120).
    pub(crate) async fn confirm(&mut self, method: u16, tag: u64, multiple: bool) {
        let mut confirm = Writer::method(CLASS_BASIC, method);
        confirm.u64(tag).u8(u8::from(multiple));
        self.send(1, confirm).await;
    }

    /// `basic.deliver` to consumer `consumer` on `channel`, its content in
    /// one body frame per piece.
    pub(crate) async fn deliver(
        &mut self,
        channel: u16,
        consumer: &str,
        delivery_tag: u64,
        pieces: &[&[u8]],
    ) {
        self.deliver_method(channel, consumer, delivery_tag).await;
        self.content(channel, pieces).await;
    }

    /// `basic.deliver` alone (routing key `key`, exchange `ex`), no content.
    pub(crate) async fn deliver_method(&mut self, channel: u16, consumer: &str, delivery_tag: u64) {
        let mut deliver = Writer::method(CLASS_BASIC, 60);
        deliver
            .short("consumer tag", consumer.as_bytes())
            .unwrap()
            .u64(delivery_tag)
            .u8(0);
        deliver.short("exchange", b"ex").unwrap();
        deliver.short("routing key", b"key").unwrap();
        self.send(channel, deliver).await;
    }

    /// `basic.consume-ok` for `consumer`.
    pub(crate) async fn consume_ok(&mut self, channel: u16, consumer: &str) {
        let mut ok = Writer::method(CLASS_BASIC, 21);
        ok.short("consumer tag", consumer.as_bytes()).unwrap();
        self.send(channel, ok).await;
    }

    /// `basic.get-ok` with delivery tag `delivery_tag` and its content, one body frame per piece.
    pub(crate) async fn get_ok(&mut self, channel: u16, delivery_tag: u64, pieces: &[&[u8]]) {
        let mut ok = Writer::method(CLASS_BASIC, 71);
        ok.u64(delivery_tag).u8(0);
        ok.short("exchange", b"ex").unwrap();
        ok.short("routing key", b"key").unwrap();
        ok.u32(0);
        self.send(channel, ok).await;
        self.content(channel, pieces).await;
    }

    /// `basic.get-empty`.
    pub(crate) async fn get_empty(&mut self, channel: u16) {
        let mut empty = Writer::method(CLASS_BASIC, 72);
        empty.short("reserved", b"").unwrap();
        self.send(channel, empty).await;
    }

    /// The broker cancels consumer `consumer` (`basic.cancel`).
    pub(crate) async fn cancel(&mut self, channel: u16, consumer: &str, no_wait: bool) {
        let mut cancel = Writer::method(CLASS_BASIC, 30);
        cancel
            .short("consumer tag", consumer.as_bytes())
            .unwrap()
            .u8(u8::from(no_wait));
        self.send(channel, cancel).await;
    }

    /// The broker closes `channel` with `code` and `text`.
    pub(crate) async fn close_channel(&mut self, channel: u16, code: u16, text: &str) {
        self.send(channel, channel_close(code, text.as_bytes(), 0, 0))
            .await;
    }

    /// `channel.close-ok` on `channel`.
    pub(crate) async fn close_ok(&mut self, channel: u16) {
        self.send(channel, Writer::method(CHANNEL, 41)).await;
    }

    /// The broker closes the connection with `code` and `text`.
    pub(crate) async fn close_connection(&mut self, code: u16, text: &str) {
        let mut close = Writer::method(CONNECTION, 50);
        close.u16(code);
        close.short("text", text.as_bytes()).unwrap();
        close.u16(0).u16(0);
        self.send(0, close).await;
    }

    /// The broker closes the connection with `code` and `text`; the client
    /// must answer `connection.close-ok` (on channel 0).
    pub(crate) async fn close_connection_answered(&mut self, code: u16, text: &str) {
        self.close_connection(code, text).await;
        let close_ok = self.expect(CONNECTION, 51).await;
        assert_eq!(close_ok.channel, 0, "close-ok on channel 0");
    }
}

/// Listens on a loopback port; the config connects there with `heartbeat` seconds.
pub(crate) async fn broker(heartbeat: u16) -> (TcpListener, AmqpConfig) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = AmqpConfig::from_url(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
        .unwrap()
        .with_heartbeat(Duration::from_secs(heartbeat.into()))
        .with_connect_timeout(Duration::from_secs(5));
    (listener, config)
}

/// Accepts one connection and takes it through the handshake (up to
/// `connection.open-ok`), proposing `tune`; no channel is open.
pub(crate) async fn accept_opened(listener: &TcpListener, tune: Tune) -> Peer {
    let (stream, _) = listener.accept().await.unwrap();
    let mut peer = Peer {
        stream,
        buffer: Vec::new(),
    };
    let mut header = [0; 8];
    peer.stream.read_exact(&mut header).await.unwrap();
    assert_eq!(&header, b"AMQP\x00\x00\x09\x01");
    let mut start = Writer::method(CONNECTION, 10);
    start.u8(0).u8(9).long(&[]).long(b"PLAIN").long(b"en_US");
    peer.send(0, start).await;
    assert_eq!(peer.method().await, Some((CONNECTION, 11)));
    let mut tune_method = Writer::method(CONNECTION, 30);
    tune_method
        .u16(tune.channel_max)
        .u32(tune.frame_max)
        .u16(tune.heartbeat);
    peer.send(0, tune_method).await;
    assert_eq!(peer.method().await, Some((CONNECTION, 31)));
    assert_eq!(peer.method().await, Some((CONNECTION, 40)));
    let mut open_ok = Writer::method(CONNECTION, 41);
    open_ok.short("reserved", b"").unwrap();
    peer.send(0, open_ok).await;
    peer
}

/// Accepts one connection and opens it up to a confirm channel 1.
pub(crate) async fn accept(listener: &TcpListener, heartbeat: u16) -> Peer {
    let mut peer = accept_opened(listener, Tune::heartbeat(heartbeat)).await;
    peer.open_confirm_channel().await;
    peer
}

/// A `channel.close` the broker sends, blaming method `class.method`.
pub(crate) fn channel_close(code: u16, text: &[u8], class: u16, method: u16) -> Writer {
    let mut close = Writer::method(CHANNEL, 40);
    close.u16(code);
    close.short("text", text).expect("a short reply text");
    close.u16(class).u16(method);
    close
}
