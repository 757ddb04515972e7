//! Conversions between the broker contract's types and AMQP's: received
//! properties read into a [`Delivery`], queue arguments, and the broker's
//! reply codes mapped onto [`BrokerError`].

use std::collections::BTreeMap;
use std::time::Duration;

use super::conn::Incoming;
use super::wire::{
    FieldValue, InvalidField, PROPERTY_NAMES, PropertyKind, Reader, ShortString, Table, WireError,
};
use crate::broker::{
    AckHandle, BrokerError, DELAYED_CC_HEADER, Delivery, PendingMessage, QueueOptions, QueueType,
};

/// RabbitMQ's sender-selected distribution header: extra routing keys.
pub(crate) const CC_HEADER: &str = "CC";

/// AMQP reply codes the broker closes a channel with (soft errors).
pub(crate) const ACCESS_REFUSED: u16 = 403;
pub(crate) const NOT_FOUND: u16 = 404;
pub(crate) const RESOURCE_LOCKED: u16 = 405;
pub(crate) const PRECONDITION_FAILED: u16 = 406;

/// Whether a channel's close `code` is a soft error: caused by the request,
/// the connection fine (AMQP 0-9-1's soft-error codes).
pub(crate) fn is_soft(code: u16) -> bool {
    matches!(code, 311 | 312 | 313 | 403 | 404 | 405 | 406)
}

/// An AMQP short string (names, routing keys), which RabbitMQ limits to 255 bytes.
pub(crate) fn short(what: &str, value: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value).map_err(|_| {
        BrokerError::Invalid(format!(
            "{what} `{value}` is {} bytes long; AMQP allows at most 255",
            value.len()
        ))
    })
}

/// The properties of a received message the contract exposes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) content_type: Option<String>,
    pub(crate) message_id: Option<String>,
    /// Application headers. Broker-added `x-` headers (`x-death`, ...) are
    /// left out; other scalar values are rendered as text.
    pub(crate) headers: BTreeMap<String, String>,
    /// The CC keys it was published with.
    pub(crate) cc: Vec<String>,
}

/// Why a received message cannot be handed out.
#[derive(Debug)]
pub(crate) enum Unreadable {
    /// Short strings that are not UTF-8 (RabbitMQ accepts them from any publisher).
    Invalid(Vec<InvalidField>),
    /// A content header that does not parse.
    Malformed(WireError),
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::Invalid(fields) => super::raw::write_fields(f, fields),
            Unreadable::Malformed(error) => write!(f, "unreadable content header: {error}"),
        }
    }
}

impl From<WireError> for Unreadable {
    fn from(error: WireError) -> Self {
        Unreadable::Malformed(error)
    }
}

/// Reads a content header frame's payload: the exposed properties, or why
/// the message cannot be handed out (every short string must be UTF-8, as
/// in every other client: a consumer never sees half a message).
pub(crate) fn read_properties(header: &[u8]) -> Result<Received, Unreadable> {
    let mut reader = Reader::new(header);
    reader.u16("content class")?;
    reader.u16("content weight")?;
    reader.u64("body size")?;
    let flags = reader.u16("property flags")?;
    if flags & 1 != 0 {
        return Err(WireError("property flags continue past 16 bits".into()).into());
    }
    let mut received = Received::default();
    let mut invalid = Vec::new();
    for (index, (name, kind)) in PROPERTY_NAMES.iter().enumerate() {
        if flags & (1 << (15 - index)) == 0 {
            continue;
        }
        match kind {
            PropertyKind::Short => {
                let bytes = reader.short(name)?;
                match std::str::from_utf8(bytes) {
                    Ok(text) if *name == "content-type" => {
                        received.content_type = Some(text.to_owned());
                    }
                    Ok(text) if *name == "message-id" => {
                        received.message_id = Some(text.to_owned());
                    }
                    Ok(_) => {}
                    Err(_) => invalid.push(InvalidField {
                        field: (*name).to_owned(),
                        bytes: bytes.to_vec(),
                    }),
                }
            }
            PropertyKind::Table => {
                let table = reader.long("headers table")?;
                read_headers(table, &mut received, &mut invalid)?;
            }
            PropertyKind::Octet => {
                reader.u8(name)?;
            }
            PropertyKind::Timestamp => {
                reader.u64(name)?;
            }
        }
    }
    if invalid.is_empty() {
        Ok(received)
    } else {
        Err(Unreadable::Invalid(invalid))
    }
}

/// Reads the headers table into `received`, noting names that are not UTF-8.
fn read_headers(
    table: &[u8],
    received: &mut Received,
    invalid: &mut Vec<InvalidField>,
) -> Result<(), WireError> {
    let mut reader = Reader::new(table);
    while !reader.rest().is_empty() {
        let name = reader.short("table field name")?;
        let name = match std::str::from_utf8(name) {
            Ok(name) => Some(name),
            Err(_) => {
                invalid.push(InvalidField {
                    field: "header name".to_owned(),
                    bytes: name.to_vec(),
                });
                None
            }
        };
        let value = FieldValue::parse(&mut reader, 0)?;
        // Names inside nested tables must be readable too.
        value.clone().sanitize(invalid);
        let Some(name) = name else {
            continue;
        };
        if name == CC_HEADER || name == DELAYED_CC_HEADER {
            if let FieldValue::Array(keys) = &value {
                received.cc.extend(keys.iter().filter_map(value_text));
            }
            continue;
        }
        if name.starts_with("x-") {
            continue;
        }
        match value_text(&value) {
            Some(text) => {
                received.headers.insert(name.to_owned(), text);
            }
            None => tracing::debug!(header = name, "ignoring non-scalar AMQP header"),
        }
    }
    Ok(())
}

/// A scalar table value as text (strings lossily); `None` for the rest.
fn value_text(value: &FieldValue) -> Option<String> {
    let FieldValue::Scalar(tag, raw) = value else {
        return None;
    };
    let int = |bytes: &[u8]| -> Option<i128> {
        let signed = matches!(tag, b'b' | b's' | b'I' | b'l');
        let mut word = [0u8; 16];
        let fill = if signed && bytes.first().is_some_and(|b| b & 0x80 != 0) {
            0xff
        } else {
            0
        };
        word.fill(fill);
        word[16 - bytes.len()..].copy_from_slice(bytes);
        Some(i128::from_be_bytes(word))
    };
    Some(match tag {
        b'S' => String::from_utf8_lossy(raw.get(4..)?).into_owned(),
        b't' => (raw.first()? != &0).to_string(),
        b'b' | b'B' | b's' | b'u' | b'I' | b'i' | b'l' | b'T' => int(raw)?.to_string(),
        _ => return None,
    })
}

/// A received message that can be handed out.
pub(crate) struct Readable {
    exchange: String,
    routing_key: String,
    redelivered: bool,
    received: Received,
    body: Vec<u8>,
}

/// Reads a received message; `Err` (the message back) when it cannot be
/// handed out (see [`read_properties`]).
pub(crate) fn readable(incoming: Incoming) -> Result<Readable, Incoming> {
    let Incoming {
        delivery_tag,
        redelivered,
        exchange,
        routing_key,
        content,
    } = incoming;
    let received = read_properties(&content.header);
    match (
        String::from_utf8(exchange),
        String::from_utf8(routing_key),
        received,
    ) {
        (Ok(exchange), Ok(routing_key), Ok(received)) => Ok(Readable {
            exchange,
            routing_key,
            redelivered,
            received,
            body: content.body,
        }),
        (exchange, routing_key, received) => {
            if let Err(problem) = received {
                tracing::debug!(%problem, "a delivery no consumer can be given");
            }
            Err(Incoming {
                delivery_tag,
                redelivered,
                exchange: exchange.map_or_else(|e| e.into_bytes(), String::into_bytes),
                routing_key: routing_key.map_or_else(|e| e.into_bytes(), String::into_bytes),
                content,
            })
        }
    }
}

impl Readable {
    /// As a contract [`Delivery`] settled through `acker`.
    pub(crate) fn into_delivery(self, acker: Box<dyn AckHandle>) -> Delivery {
        Delivery {
            exchange: self.exchange,
            routing_key: self.routing_key,
            content_type: self.received.content_type,
            message_id: self.received.message_id,
            headers: self.received.headers,
            cc: self.received.cc,
            redelivered: self.redelivered,
            body: self.body,
            acker,
        }
    }

    /// As a [`PendingMessage`].
    pub(crate) fn into_pending(self) -> PendingMessage {
        PendingMessage {
            message_id: self.received.message_id,
            routing_key: self.routing_key,
            headers: self.received.headers,
            body: self.body,
        }
    }
}

/// A `basic.get-ok`'s arguments: delivery tag, redelivered, exchange, routing key.
pub(crate) fn got(args: &[u8]) -> Result<(u64, bool, Vec<u8>, Vec<u8>), WireError> {
    let mut reader = Reader::new(args);
    let tag = reader.u64("delivery tag")?;
    let redelivered = reader.u8("redelivered")? & 1 == 1;
    let exchange = reader.short("exchange")?.to_vec();
    let routing_key = reader.short("routing key")?.to_vec();
    Ok((tag, redelivered, exchange, routing_key))
}

/// A long-string table value.
pub(crate) fn text_argument(value: &str) -> FieldValue {
    FieldValue::long_string(value.as_bytes())
}

/// A signed 64-bit table value.
pub(crate) fn int_argument(value: i64) -> FieldValue {
    FieldValue::Scalar(b'l', value.to_be_bytes().to_vec())
}

/// A table of arguments, encoded (names are this crate's constants: short).
pub(crate) fn arguments_table(arguments: Vec<(&str, FieldValue)>) -> Result<Vec<u8>, BrokerError> {
    Table(
        arguments
            .into_iter()
            .map(|(name, value)| (name.as_bytes().to_vec(), value))
            .collect(),
    )
    .encode()
    .map_err(|error| BrokerError::Invalid(format!("queue arguments: {error}")))
}

/// RabbitMQ queue arguments for [`QueueOptions`], encoded as a field table.
pub(crate) fn queue_arguments(queue: &str, options: &QueueOptions) -> Result<Vec<u8>, BrokerError> {
    options.check(queue)?;
    let mut arguments = Vec::new();
    if options.queue_type == QueueType::Quorum {
        arguments.push(("x-queue-type", text_argument("quorum")));
    }
    if let Some(limit) = options.delivery_limit {
        arguments.push(("x-delivery-limit", int_argument(i64::from(limit))));
    }
    if let Some(exchange) = &options.dead_letter_exchange {
        short("dead-letter exchange", exchange)?;
        arguments.push(("x-dead-letter-exchange", text_argument(exchange)));
    }
    if let Some(key) = &options.dead_letter_routing_key {
        short("dead-letter routing key", key)?;
        arguments.push(("x-dead-letter-routing-key", text_argument(key)));
    }
    if let Some(max_length) = options.max_length {
        arguments.push(("x-max-length", int_argument(i64::from(max_length))));
        // Refuse (nack) publishes to a full queue instead of dropping its oldest message.
        arguments.push(("x-overflow", text_argument("reject-publish")));
    }
    if let Some(ttl) = options.message_ttl {
        arguments.push(("x-message-ttl", int_argument(millis(queue, ttl)?)));
    }
    arguments_table(arguments)
}

/// A duration in whole milliseconds, rounded up, as RabbitMQ's TTL arguments take it.
pub(crate) fn millis(queue: &str, duration: Duration) -> Result<i64, BrokerError> {
    i64::try_from(ceil_millis(duration))
        .ok()
        .filter(|ms| *ms <= MAX_TTL_MS)
        .ok_or_else(|| {
            BrokerError::Invalid(format!(
                "queue `{queue}`: duration {duration:?} exceeds RabbitMQ's TTL limit of {MAX_TTL_MS} ms"
            ))
        })
}

/// RabbitMQ's largest TTL / expiry: 2^32 - 1 ms (about 49 days), [`MAX_DELAY`](crate::broker::MAX_DELAY).
pub(crate) const MAX_TTL_MS: i64 = crate::broker::MAX_DELAY.as_millis() as i64;

/// A delay in whole milliseconds, rounded up, longer ones clamped to
/// [`MAX_DELAY`](crate::broker::MAX_DELAY), as
/// [`Broker::publish_delayed`](crate::broker::Broker::publish_delayed) documents.
pub(crate) fn delay_ms(delay: Duration) -> u64 {
    let clamped = ceil_millis(delay.min(crate::broker::MAX_DELAY));
    u64::try_from(clamped).unwrap_or(u64::MAX)
}

/// A duration in whole milliseconds, rounded up.
fn ceil_millis(duration: Duration) -> u128 {
    duration.as_nanos().div_ceil(1_000_000)
}

/// The delay tier a delay is rounded up to, in milliseconds: below 16 ms
/// exact, above that `m * 2^e` with `8 <= m < 16` — at most 12.5 % late, never early,
/// and about eight tiers (retry queues) per doubling of the delay.
pub(crate) fn delay_tier_ms(delay_ms: u64) -> u64 {
    if delay_ms < 16 {
        return delay_ms;
    }
    let exponent = (63 - delay_ms.leading_zeros()) - 3;
    let mantissa = delay_ms.div_ceil(1 << exponent);
    mantissa << exponent
}

/// What an operation was acting on, to name it in errors.
#[derive(Debug, Default, Clone)]
pub(crate) struct Target {
    pub(crate) exchange: Option<String>,
    pub(crate) queue: Option<String>,
}

impl Target {
    pub(crate) fn exchange(name: &str) -> Self {
        Target {
            exchange: Some(name.to_owned()),
            queue: None,
        }
    }

    pub(crate) fn queue(name: &str) -> Self {
        Target {
            exchange: None,
            queue: Some(name.to_owned()),
        }
    }

    pub(crate) fn binding(queue: &str, exchange: &str) -> Self {
        Target {
            exchange: Some(exchange.to_owned()),
            queue: Some(queue.to_owned()),
        }
    }

    fn name(&self) -> String {
        self.queue
            .clone()
            .or_else(|| self.exchange.clone())
            .unwrap_or_default()
    }

    /// Whether RabbitMQ's error text is about this target (it quotes names: `no exchange 'x' in vhost '/'`).
    pub(crate) fn mentioned_in(&self, text: &str) -> bool {
        [&self.exchange, &self.queue]
            .into_iter()
            .flatten()
            .any(|name| text.contains(&format!("'{name}'")))
    }

    /// A channel-level (soft) AMQP error, its reply code and text, as a [`BrokerError`].
    pub(crate) fn soft_error(&self, what: &str, code: u16, text: &str) -> BrokerError {
        match code {
            NOT_FOUND => {
                if text.contains("no exchange") {
                    let exchange = self.exchange.clone().unwrap_or_else(|| quoted(text));
                    BrokerError::ExchangeNotFound(exchange)
                } else {
                    let queue = self.queue.clone().unwrap_or_else(|| quoted(text));
                    BrokerError::QueueNotFound(queue)
                }
            }
            PRECONDITION_FAILED | RESOURCE_LOCKED => BrokerError::Conflict {
                name: self.name(),
                detail: text.to_owned(),
            },
            ACCESS_REFUSED => BrokerError::Invalid(format!(
                "{what} `{}` refused by the broker: {text}",
                self.name()
            )),
            _ => BrokerError::Invalid(format!("{what} `{}`: {text}", self.name())),
        }
    }
}

/// The first `'quoted'` name in a RabbitMQ error text.
fn quoted(text: &str) -> String {
    text.split('\'').nth(1).unwrap_or(text).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_tiers_round_up_by_at_most_an_eighth() {
        for delay in (0..5000).chain([60_000, 3_600_000, 86_400_000, 123_456_789]) {
            let tier = delay_tier_ms(delay);
            assert!(tier >= delay, "{delay} -> {tier}");
            assert!(tier * 8 <= delay * 9 || delay < 16, "{delay} -> {tier}");
        }
        assert_eq!(delay_tier_ms(100), 104);
        assert_eq!(delay_tier_ms(128), 128);
        assert_eq!(delay_tier_ms(1000), 1024);
        assert_eq!(delay_tier_ms(1025), 1152);
        // A handful of queues covers a wide range of delays.
        let tiers: std::collections::BTreeSet<u64> = (100..=100_000).map(delay_tier_ms).collect();
        assert!(tiers.len() < 90, "{}", tiers.len());
    }

    #[test]
    fn delays_round_up_and_are_clamped_to_the_ttl_limit() {
        assert_eq!(delay_ms(Duration::ZERO), 0);
        assert_eq!(delay_ms(Duration::from_micros(1500)), 2);
        assert_eq!(MAX_TTL_MS, (1 << 32) - 1);
        let limit = crate::broker::MAX_DELAY;
        for delay in [limit, Duration::from_secs(60 * 86_400), Duration::MAX] {
            assert_eq!(delay_ms(delay), MAX_TTL_MS.unsigned_abs(), "{delay:?}");
        }
    }

    #[test]
    fn milliseconds_round_up_and_are_bounded() {
        assert_eq!(millis("q", Duration::from_micros(1500)).unwrap(), 2);
        assert_eq!(millis("q", Duration::from_millis(7)).unwrap(), 7);
        assert!(matches!(
            millis("q", Duration::from_secs(60 * 86_400)),
            Err(BrokerError::Invalid(_))
        ));
    }

    #[test]
    fn long_names_are_rejected() {
        let error = short("queue", &"q".repeat(256)).unwrap_err();
        assert!(error.to_string().contains("256 bytes"), "{error}");
    }

    #[test]
    fn soft_errors_map_to_the_contract() {
        let not_found = "NOT_FOUND - no exchange 'ex' in vhost '/'";
        let target = Target::binding("q", "ex");
        assert!(
            matches!(target.soft_error("bind", NOT_FOUND, not_found), BrokerError::ExchangeNotFound(e) if e == "ex")
        );
        assert!(target.mentioned_in(not_found));
        assert!(!Target::exchange("other").mentioned_in(not_found));
        let no_queue = "NOT_FOUND - no queue 'q' in vhost '/'";
        assert!(
            matches!(target.soft_error("bind", NOT_FOUND, no_queue), BrokerError::QueueNotFound(q) if q == "q")
        );
        let conflict = "PRECONDITION_FAILED - inequivalent arg 'durable'";
        assert!(matches!(
            Target::queue("q").soft_error("declare", PRECONDITION_FAILED, conflict),
            BrokerError::Conflict { name, detail } if name == "q" && detail.contains("durable")
        ));
        assert!(is_soft(NOT_FOUND) && !is_soft(320) && !is_soft(504));
    }

    fn header(properties: &[u8], flags: u16) -> Vec<u8> {
        let mut header = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(properties);
        header
    }

    fn table(fields: &[(&[u8], FieldValue)]) -> Vec<u8> {
        Table(
            fields
                .iter()
                .map(|(name, value)| (name.to_vec(), value.clone()))
                .collect(),
        )
        .encode()
        .unwrap()
    }

    #[test]
    fn received_properties_are_read_and_broker_headers_left_out() {
        let headers = table(&[
            (b"attempt", FieldValue::long_string(b"3")),
            (b"flag", FieldValue::Scalar(b't', vec![1])),
            (
                b"count",
                FieldValue::Scalar(b'l', (-5i64).to_be_bytes().to_vec()),
            ),
            (
                b"small",
                FieldValue::Scalar(b's', (-2i16).to_be_bytes().to_vec()),
            ),
            (b"x-death", FieldValue::Array(vec![])),
            (b"nested", FieldValue::Table(Table::default())),
            (
                b"CC",
                FieldValue::Array(vec![
                    FieldValue::long_string(b"a.b"),
                    FieldValue::long_string(b"c"),
                ]),
            ),
        ]);
        let mut properties = vec![16];
        properties.extend_from_slice(b"application/json");
        properties.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        properties.extend_from_slice(&headers);
        properties.push(2); // delivery mode
        properties.push(5);
        properties.extend_from_slice(b"id-42");
        // content-type, headers, delivery-mode, message-id
        let flags = (1 << 15) | (1 << 13) | (1 << 12) | (1 << 7);
        let received = read_properties(&header(&properties, flags)).unwrap();
        assert_eq!(received.content_type.as_deref(), Some("application/json"));
        assert_eq!(received.message_id.as_deref(), Some("id-42"));
        assert_eq!(
            received.headers,
            BTreeMap::from([
                ("attempt".to_owned(), "3".to_owned()),
                ("count".to_owned(), "-5".to_owned()),
                ("flag".to_owned(), "true".to_owned()),
                ("small".to_owned(), "-2".to_owned()),
            ])
        );
        assert_eq!(received.cc, ["a.b", "c"]);
    }

    #[test]
    fn short_strings_that_are_not_utf8_make_a_message_unreadable() {
        let bad = [0xff, 0xfe];
        let nested = Table(vec![(bad.to_vec(), FieldValue::long_string(b"v"))]);
        let headers = table(&[
            (&bad, FieldValue::long_string(b"v")),
            (b"deep", FieldValue::Table(nested)),
        ]);
        let mut properties = (headers.len() as u32).to_be_bytes().to_vec();
        properties.extend_from_slice(&headers);
        properties.push(2);
        properties.extend_from_slice(&bad);
        // headers, app-id
        let flags = (1 << 13) | (1 << 3);
        match read_properties(&header(&properties, flags)) {
            Err(Unreadable::Invalid(fields)) => {
                let names: Vec<_> = fields.iter().map(|f| f.field.as_str()).collect();
                assert_eq!(names, ["header name", "header name", "app-id"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_properties(&header(&[1], 1 << 15)),
            Err(Unreadable::Malformed(_))
        ));
    }
}
