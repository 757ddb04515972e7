//! Poison messages, and a small AMQP connection that treats short strings as bytes.
//!
//! RabbitMQ accepts a routing key, a property (`message-id`, `content-type`,
//! `app-id`, ...) or a header name that is not valid UTF-8 from any publisher;
//! many clients refuse such a message, and lapin's parser drops the whole
//! connection over it, so that RabbitMQ redelivers it and every message
//! behind it waits forever. [`AmqpBroker`](super::AmqpBroker)'s connections
//! read short strings as bytes: such a message never breaks them and is
//! never handed to a consumer, `get` or `pending`. It is moved to its
//! queue's dead-letter destination (its dead-letter exchange, else
//! `<queue>.dead`) — the strings made valid (invalid sequences replaced by
//! U+FFFD), `user-id` and `expiration` dropped, and the
//! [`POISON_REASON_HEADER`] and [`POISON_QUEUE_HEADER`] headers saying what
//! was wrong and where it came from — and reported as a [`PoisonEvent`].
//!
//! [`RawConnection`] is the handshake both connections start with, and
//! [`RawConnection::publish`] sends arbitrary bytes, as Go's and Node's
//! clients can: a diagnostic tool, and how the tests play a hostile publisher.

use std::collections::BTreeMap;
use std::fmt;

use amq_protocol_tcp::AMQPUriTcpExt;
use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::config::AmqpConfig;
use super::wire::{
    CLASS_BASIC, ContentHeader, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD,
    FieldValue, Frame, InvalidField, PropertyValue, Reader, Table, WireError, Writer,
};
use crate::broker::BrokerError;

/// The header naming what made a message unreadable.
pub const POISON_REASON_HEADER: &str = "tc-poison-reason";
/// The header naming the queue a poison message was taken from.
pub const POISON_QUEUE_HEADER: &str = "tc-poison-queue";

/// What happened to a message that the AMQP client could not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoisonEvent {
    /// Moved from `queue` to `destination` (made readable, with the
    /// [`POISON_REASON_HEADER`] and [`POISON_QUEUE_HEADER`] headers).
    SetAside {
        /// The queue it was taken from.
        queue: String,
        /// Each short string that was not valid UTF-8.
        fields: Vec<InvalidField>,
        /// Where it went: `exchange "<name>" with key "<key>"`.
        destination: String,
    },
    /// A connection failed parsing a frame, but no message could be set
    /// aside: the queues were read, nothing invalid was at their head (it may
    /// have been consumed by another client, or sit in an exclusive queue that
    /// died with the connection), or reading them failed (`error`).
    Unresolved {
        /// The queues being read when the connection failed.
        queues: Vec<String>,
        /// What went wrong.
        error: String,
    },
}

impl fmt::Display for PoisonEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoisonEvent::SetAside {
                queue,
                fields,
                destination,
            } => {
                write!(f, "message in queue `{queue}` set aside to {destination}: ")?;
                write_fields(f, fields)
            }
            PoisonEvent::Unresolved { queues, error } => {
                write!(
                    f,
                    "unparsable message not set aside (queues {queues:?}): {error}"
                )
            }
        }
    }
}

pub(crate) fn write_fields(f: &mut impl fmt::Write, fields: &[InvalidField]) -> fmt::Result {
    for (index, field) in fields.iter().enumerate() {
        if index > 0 {
            f.write_str("; ")?;
        }
        write!(f, "{field}")?;
    }
    Ok(())
}

/// A message as RabbitMQ holds it, every short string as bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawMessage {
    /// Exchange name.
    pub exchange: Vec<u8>,
    /// Routing key.
    pub routing_key: Vec<u8>,
    /// Short-string properties by their AMQP names: `content-type`,
    /// `content-encoding`, `correlation-id`, `reply-to`, `expiration`,
    /// `message-id`, `type`, `user-id`, `app-id`, `cluster-id`.
    pub properties: BTreeMap<String, Vec<u8>>,
    /// Application headers: names, and long-string values.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Delivery mode 2 (written to disk) rather than 1.
    pub persistent: bool,
    /// The body.
    pub body: Vec<u8>,
}

impl RawMessage {
    fn content_header(&self) -> Result<ContentHeader, BrokerError> {
        let mut header = ContentHeader {
            body_size: self.body.len() as u64,
            properties: Vec::new(),
        };
        for (name, value) in &self.properties {
            let name = SHORT_PROPERTIES
                .iter()
                .find(|known| **known == name)
                .ok_or_else(|| {
                    BrokerError::Invalid(format!(
                        "`{name}` is not a short-string AMQP property (one of {SHORT_PROPERTIES:?})"
                    ))
                })?;
            header.set(name, Some(PropertyValue::Short(value.clone())));
        }
        if !self.headers.is_empty() {
            let table = self
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), FieldValue::long_string(value)))
                .collect();
            header.set("headers", Some(PropertyValue::Table(Table(table))));
        }
        header.set(
            "delivery-mode",
            Some(PropertyValue::Octet(if self.persistent { 2 } else { 1 })),
        );
        Ok(header)
    }
}

const SHORT_PROPERTIES: [&str; 10] = [
    "content-type",
    "content-encoding",
    "correlation-id",
    "reply-to",
    "expiration",
    "message-id",
    "type",
    "user-id",
    "app-id",
    "cluster-id",
];

/// The I/O a connection runs over: TCP or TLS (`amq-protocol-tcp`).
pub(crate) trait RawIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> RawIo for T {}

/// How a connection introduces itself in the handshake.
#[derive(Debug, Default)]
pub(crate) struct ClientInfo {
    /// Shown by RabbitMQ (management UI, `rabbitmqctl list_connections
    /// client_properties`); none: no client properties at all.
    pub(crate) connection_name: Option<String>,
    /// Heartbeat interval proposed, in seconds (0: none).
    pub(crate) heartbeat: u16,
}

impl ClientInfo {
    /// A long-lived connection of `config`'s named `name`, proposing its heartbeat.
    pub(crate) fn named(config: &AmqpConfig, name: String) -> Self {
        ClientInfo {
            connection_name: Some(name),
            heartbeat: u16::try_from(config.heartbeat().as_secs()).unwrap_or(u16::MAX),
        }
    }

    /// The client-properties table: the name, and the capabilities that make
    /// RabbitMQ send `connection.blocked` and `basic.nack`.
    fn properties(&self) -> Result<Vec<u8>, WireError> {
        let Some(name) = &self.connection_name else {
            return Ok(Vec::new());
        };
        let text = |value: &[u8]| {
            let mut bytes = (value.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(value);
            FieldValue::Scalar(b'S', bytes)
        };
        let yes = || FieldValue::Scalar(b't', vec![1]);
        let capabilities = Table(vec![
            (b"publisher_confirms".to_vec(), yes()),
            (b"basic.nack".to_vec(), yes()),
            (b"connection.blocked".to_vec(), yes()),
            (b"authentication_failure_close".to_vec(), yes()),
            (b"consumer_cancel_notify".to_vec(), yes()),
        ]);
        Table(vec![
            (b"product".to_vec(), text(b"tc-exchanges")),
            (b"connection_name".to_vec(), text(name.as_bytes())),
            (b"capabilities".to_vec(), FieldValue::Table(capabilities)),
        ])
        .encode()
    }
}

/// A connection after its handshake, taken apart for the publishing connection's tasks.
pub(crate) struct Opened {
    pub(crate) io: Box<dyn RawIo>,
    /// Bytes read past the handshake.
    pub(crate) buffer: Vec<u8>,
    pub(crate) frame_max: u32,
    /// Negotiated heartbeat interval in seconds (0: none).
    pub(crate) heartbeat: u16,
    /// Negotiated highest channel id (0: no limit).
    pub(crate) channel_max: u16,
    /// The channel opened in confirm mode (0: none).
    pub(crate) channel: u16,
}

/// A channel the server closed: its reply code and text.
struct ChannelClosed {
    code: u16,
    text: String,
}

enum RawError {
    Channel(ChannelClosed),
    Broker(BrokerError),
}

impl From<BrokerError> for RawError {
    fn from(error: BrokerError) -> Self {
        RawError::Broker(error)
    }
}

/// A connection of its own to RabbitMQ that reads and writes short strings as bytes.
pub struct RawConnection {
    io: Box<dyn RawIo>,
    buffer: Vec<u8>,
    frame_max: u32,
    /// Negotiated highest channel id.
    channel_max: u16,
    next_channel: u16,
    /// Negotiated heartbeat interval in seconds (0: none).
    heartbeat: u16,
    endpoint: String,
    /// The longest one call may take.
    timeout: std::time::Duration,
}

impl fmt::Debug for RawConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawConnection")
            .field("endpoint", &self.endpoint)
            .field("frame_max", &self.frame_max)
            .finish()
    }
}

const CONNECTION: u16 = 10;
const CHANNEL: u16 = 20;
const CONFIRM: u16 = 85;

impl RawConnection {
    /// Connects and logs in as `config` says (TCP or TLS, user, virtual
    /// host): to the first of its nodes that answers, in order. Fails naming
    /// every node tried and why.
    pub async fn connect(config: &AmqpConfig) -> Result<Self, BrokerError> {
        config
            .on_first_answering(0, |node, _| async move {
                Self::connect_node(&node, &ClientInfo::default()).await
            })
            .await
    }

    /// Connects to the one node `config` names, introducing itself as `client` says.
    pub(crate) async fn connect_node(
        config: &AmqpConfig,
        client: &ClientInfo,
    ) -> Result<Self, BrokerError> {
        let endpoint = config.endpoint();
        let fail = |what: String| {
            BrokerError::Connection(format!("AMQP connection to {endpoint}: {what}"))
        };
        let uri = config.uri();
        let runtime = async_rs::Runtime::tokio_current();
        let tls = config.tls_config();
        let connect = uri.connect_with_config_async(tls.as_ref(), &runtime);
        let io = match tokio::time::timeout(config.connect_timeout(), connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(error)) => return Err(fail(error.to_string())),
            Err(_) => {
                return Err(fail(format!(
                    "no answer within {:?}",
                    config.connect_timeout()
                )));
            }
        };
        let mut connection = RawConnection {
            io: Box::new(io),
            buffer: Vec::new(),
            frame_max: 0,
            channel_max: 0,
            next_channel: 1,
            heartbeat: 0,
            endpoint: endpoint.clone(),
            timeout: config.operation_timeout(),
        };
        let handshake = connection.handshake(&uri, client);
        match tokio::time::timeout(config.connect_timeout(), handshake).await {
            Ok(result) => result.map(|()| connection),
            Err(_) => Err(fail(format!(
                "no answer within {:?} (connected, but no AMQP handshake)",
                config.connect_timeout()
            ))),
        }
    }

    async fn handshake(
        &mut self,
        uri: &amq_protocol_uri::AMQPUri,
        client: &ClientInfo,
    ) -> Result<(), BrokerError> {
        self.write(b"AMQP\x00\x00\x09\x01").await?;
        self.expect(0, CONNECTION, 10).await.map_err(Self::hard)?;
        let user = &uri.authority.userinfo;
        let mut response = vec![0];
        response.extend_from_slice(user.username.as_bytes());
        response.push(0);
        response.extend_from_slice(user.password.as_bytes());
        let mut start_ok = Writer::method(CONNECTION, 11);
        start_ok.long(&client.properties().map_err(|e| self.protocol(e))?);
        self.wire(start_ok.short("mechanism", b"PLAIN"))?
            .long(&response);
        self.wire(start_ok.short("locale", b"en_US"))?;
        self.send_method(0, start_ok).await?;
        let tune = self.expect(0, CONNECTION, 30).await.map_err(Self::hard)?;
        let (_, _, mut args) = tune.method().map_err(|e| self.protocol(e))?;
        let parsed = (|| {
            Ok::<_, WireError>((
                args.u16("channel max")?,
                args.u32("frame max")?,
                args.u16("heartbeat")?,
            ))
        })();
        let (channel_max, frame_max, server_heartbeat) = parsed.map_err(|e| self.protocol(e))?;
        self.frame_max = if frame_max == 0 { 131_072 } else { frame_max };
        self.channel_max = channel_max;
        // The lower of the two proposals; ours 0: none (a short-lived connection).
        self.heartbeat = match (client.heartbeat, server_heartbeat) {
            (0, _) => 0,
            (ours, 0) => ours,
            (ours, theirs) => ours.min(theirs),
        };
        let mut tune_ok = Writer::method(CONNECTION, 31);
        tune_ok
            .u16(channel_max)
            .u32(self.frame_max)
            .u16(self.heartbeat);
        self.send_method(0, tune_ok).await?;
        let mut open = Writer::method(CONNECTION, 40);
        self.wire(open.short("virtual host", uri.vhost.as_bytes()))?;
        self.wire(open.short("reserved", b""))?.u8(0);
        self.send_method(0, open).await?;
        self.expect(0, CONNECTION, 41).await.map_err(Self::hard)?;
        Ok(())
    }

    /// Connects to the one node `config` names, as `client` says, and hands
    /// the connection over — with a channel in confirm mode open when
    /// `confirm_channel` — all within the connect timeout.
    pub(crate) async fn open(
        config: &AmqpConfig,
        client: &ClientInfo,
        confirm_channel: bool,
    ) -> Result<Opened, BrokerError> {
        let opening = async {
            let connection = Self::connect_node(config, client).await?;
            if confirm_channel {
                connection.into_confirm_channel().await
            } else {
                Ok(connection.into_opened())
            }
        };
        match tokio::time::timeout(config.connect_timeout(), opening).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::Connection(format!(
                "cannot connect to {} as `{}`: no answer within {:?}",
                config.endpoint(),
                config.username(),
                config.connect_timeout()
            ))),
        }
    }

    /// Opens a channel in confirm mode and hands the connection over.
    pub(crate) async fn into_confirm_channel(mut self) -> Result<Opened, BrokerError> {
        let channel = self.open_channel().await.map_err(Self::hard)?;
        let mut select = Writer::method(CONFIRM, 10);
        select.u8(0);
        self.send_method(channel, select).await?;
        self.expect(channel, CONFIRM, 11)
            .await
            .map_err(Self::hard)?;
        let mut opened = self.into_opened();
        opened.channel = channel;
        Ok(opened)
    }

    /// Hands the connection over, no channel open.
    pub(crate) fn into_opened(self) -> Opened {
        Opened {
            io: self.io,
            buffer: self.buffer,
            frame_max: self.frame_max,
            heartbeat: self.heartbeat,
            channel_max: self.channel_max,
            channel: 0,
        }
    }

    /// Publishes `message` as it is, bytes and all, and waits for the
    /// broker's confirm, up to the configured operation timeout.
    pub async fn publish(&mut self, message: &RawMessage) -> Result<(), BrokerError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.publish_now(message))
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::NotConfirmed {
                    exchange: String::from_utf8_lossy(&message.exchange).into_owned(),
                    routing_key: String::from_utf8_lossy(&message.routing_key).into_owned(),
                    reason: format!("no confirm within {timeout:?}"),
                })
            })
    }

    async fn publish_now(&mut self, message: &RawMessage) -> Result<(), BrokerError> {
        let header = message.content_header()?;
        let channel = self.open_channel().await.map_err(Self::hard)?;
        let mut sequence = 0;
        let result = self
            .publish_confirmed(
                channel,
                &mut sequence,
                &message.exchange,
                &message.routing_key,
                &header,
                &message.body,
            )
            .await;
        match result {
            Ok(()) => self.close_channel(channel).await.map_err(Self::hard),
            Err(RawError::Channel(closed)) => Err(BrokerError::NotConfirmed {
                exchange: String::from_utf8_lossy(&message.exchange).into_owned(),
                routing_key: String::from_utf8_lossy(&message.routing_key).into_owned(),
                reason: format!(
                    "channel closed by the broker: {} {}",
                    closed.code, closed.text
                ),
            }),
            Err(RawError::Broker(error)) => Err(error),
        }
    }

    /// Closes the connection (waiting for the broker's answer up to the operation timeout).
    pub async fn close(mut self) {
        let timeout = self.timeout;
        let _ = tokio::time::timeout(timeout, self.close_now()).await;
    }

    async fn close_now(&mut self) {
        let mut close = Writer::method(CONNECTION, 50);
        close.u16(200);
        if self.wire(close.short("reply text", b"done")).is_ok() {
            close.u16(0).u16(0);
            if self.send_method(0, close).await.is_ok() {
                let _ = self.expect(0, CONNECTION, 51).await;
            }
        }
        let _ = self.io.close().await;
    }

    async fn publish_confirmed(
        &mut self,
        channel: u16,
        sequence: &mut u64,
        exchange: &[u8],
        routing_key: &[u8],
        header: &ContentHeader,
        body: &[u8],
    ) -> Result<(), RawError> {
        if *sequence == 0 {
            let mut select = Writer::method(CONFIRM, 10);
            select.u8(0);
            self.send_method(channel, select).await?;
            self.expect(channel, CONFIRM, 11).await?;
        }
        *sequence += 1;
        let mut publish = Writer::method(CLASS_BASIC, 40);
        publish.u16(0);
        self.wire(publish.short("exchange", exchange))?;
        self.wire(publish.short("routing key", routing_key))?.u8(0);
        let mut bytes = Frame::encode(FRAME_METHOD, channel, &publish.0);
        let header = header.encode().map_err(|e| self.protocol(e))?;
        bytes.extend(Frame::encode(FRAME_HEADER, channel, &header));
        // Frame overhead is 8 bytes; frame_max is at least 4096 on RabbitMQ.
        let chunk = (self.frame_max as usize).saturating_sub(8).max(1);
        for piece in body.chunks(chunk) {
            bytes.extend(Frame::encode(FRAME_BODY, channel, piece));
        }
        self.write(&bytes).await?;
        let reply = self.expect_any(channel, CLASS_BASIC, &[80, 120]).await?;
        let (_, method, mut args) = reply.method().map_err(|e| self.protocol(e))?;
        let tag = args.u64("delivery tag").map_err(|e| self.protocol(e))?;
        match method {
            80 if tag == *sequence => Ok(()),
            80 => Err(self
                .protocol(WireError(format!("confirm for {tag}, expected {sequence}")))
                .into()),
            _ => Err(RawError::Channel(ChannelClosed {
                code: 0,
                text: "the broker refused the message (basic.nack)".into(),
            })),
        }
    }

    async fn open_channel(&mut self) -> Result<u16, RawError> {
        let channel = self.next_channel;
        self.next_channel = self.next_channel.checked_add(1).unwrap_or(1);
        let mut open = Writer::method(CHANNEL, 10);
        self.wire(open.short("reserved", b""))?;
        self.send_method(channel, open).await?;
        self.expect(channel, CHANNEL, 11).await?;
        Ok(channel)
    }

    async fn close_channel(&mut self, channel: u16) -> Result<(), RawError> {
        let mut close = Writer::method(CHANNEL, 40);
        close.u16(200);
        self.wire(close.short("reply text", b"done"))?.u16(0).u16(0);
        self.send_method(channel, close).await?;
        self.expect(channel, CHANNEL, 41).await?;
        Ok(())
    }

    /// The next method frame on `channel` of `class` and `method`.
    async fn expect(&mut self, channel: u16, class: u16, method: u16) -> Result<Frame, RawError> {
        self.expect_any(channel, class, &[method]).await
    }

    /// The next method frame on `channel` of `class` and one of `methods`;
    /// a close of the channel or connection by the server is an error.
    async fn expect_any(
        &mut self,
        channel: u16,
        class: u16,
        methods: &[u16],
    ) -> Result<Frame, RawError> {
        loop {
            let frame = self.next_frame().await?;
            if frame.kind != FRAME_METHOD {
                return Err(self
                    .protocol(WireError(format!("unexpected frame type {}", frame.kind)))
                    .into());
            }
            let (got_class, got_method, mut args) = frame.method().map_err(|e| self.protocol(e))?;
            if got_class == class && methods.contains(&got_method) && frame.channel == channel {
                return Ok(frame);
            }
            let closed = |args: &mut Reader<'_>| -> ChannelClosed {
                let code = args.u16("reply code").unwrap_or(0);
                let text = args
                    .short("reply text")
                    .map(|t| String::from_utf8_lossy(t).into_owned());
                ChannelClosed {
                    code,
                    text: text.unwrap_or_default(),
                }
            };
            match (got_class, got_method) {
                (CONNECTION, 50) => {
                    let closed = closed(&mut args);
                    let _ = self.send_method(0, Writer::method(CONNECTION, 51)).await;
                    return Err(RawError::Broker(BrokerError::Connection(format!(
                        "{} closed the connection: {} {}",
                        self.endpoint, closed.code, closed.text
                    ))));
                }
                (CHANNEL, 40) if frame.channel == channel => {
                    let closed = closed(&mut args);
                    let _ = self.send_method(channel, Writer::method(CHANNEL, 41)).await;
                    return Err(RawError::Channel(closed));
                }
                // Flow control, blocking notices and returns are not ours to act on.
                (CONNECTION, 60 | 61) | (CHANNEL, 20) | (CLASS_BASIC, 50) => {}
                _ => {
                    return Err(self
                        .protocol(WireError(format!(
                            "unexpected method {got_class}.{got_method} on channel {}",
                            frame.channel
                        )))
                        .into());
                }
            }
        }
    }

    /// The next frame that is not a heartbeat.
    async fn next_frame(&mut self) -> Result<Frame, BrokerError> {
        loop {
            if let Some((frame, used)) =
                Frame::parse(&self.buffer, self.frame_max).map_err(|e| self.protocol(e))?
            {
                self.buffer.drain(..used);
                if frame.kind == FRAME_HEARTBEAT {
                    continue;
                }
                return Ok(frame);
            }
            let mut chunk = [0; 16 * 1024];
            let read = self
                .io
                .read(&mut chunk)
                .await
                .map_err(|e| self.protocol(e))?;
            if read == 0 {
                return Err(BrokerError::Connection(format!(
                    "{} closed the AMQP connection",
                    self.endpoint
                )));
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    async fn send_method(&mut self, channel: u16, method: Writer) -> Result<(), BrokerError> {
        self.write(&Frame::encode(FRAME_METHOD, channel, &method.0))
            .await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), BrokerError> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|e| self.protocol(e))?;
        self.io.flush().await.map_err(|e| self.protocol(e))
    }

    fn wire<'w>(
        &self,
        result: Result<&'w mut Writer, WireError>,
    ) -> Result<&'w mut Writer, BrokerError> {
        result.map_err(|e| BrokerError::Invalid(e.to_string()))
    }

    /// A failure of this connection (malformed input, I/O), naming the endpoint.
    fn protocol(&self, error: impl fmt::Display) -> BrokerError {
        BrokerError::Connection(format!("AMQP connection to {}: {error}", self.endpoint))
    }

    fn hard(error: RawError) -> BrokerError {
        match error {
            RawError::Broker(error) => error,
            RawError::Channel(closed) => BrokerError::Connection(format!(
                "channel closed by the broker: {} {}",
                closed.code, closed.text
            )),
        }
    }
}

/// Adds the poison headers; drops `user-id` (RabbitMQ refuses another user's)
/// and `expiration` (a set-aside message must not vanish).
pub(crate) fn mark_poison(header: &mut ContentHeader, reason: &str, queue: &str) {
    header.set("user-id", None);
    header.set("expiration", None);
    let mut table = match header.get("headers") {
        Some(PropertyValue::Table(table)) => table.clone(),
        _ => Table::default(),
    };
    table.0.retain(|(name, _)| {
        name != POISON_REASON_HEADER.as_bytes() && name != POISON_QUEUE_HEADER.as_bytes()
    });
    table.0.push((
        POISON_REASON_HEADER.as_bytes().to_vec(),
        FieldValue::long_string(reason.as_bytes()),
    ));
    table.0.push((
        POISON_QUEUE_HEADER.as_bytes().to_vec(),
        FieldValue::long_string(queue.as_bytes()),
    ));
    header.set("headers", Some(PropertyValue::Table(table)));
}
