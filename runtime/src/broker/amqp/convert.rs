//! Conversions between the broker contract's types and lapin's, and the
//! mapping of AMQP errors onto [`BrokerError`].

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

use crate::broker::{
    AckHandle, BoxFuture, BrokerError, DELAYED_CC_HEADER, Delivery, PendingMessage, QueueOptions,
    QueueType,
};

/// RabbitMQ's sender-selected distribution header: extra routing keys.
pub(crate) const CC_HEADER: &str = "CC";

/// An AMQP short string (names, routing keys), which RabbitMQ limits to 255 bytes.
pub(crate) fn short(what: &str, value: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value).map_err(|_| {
        BrokerError::Invalid(format!(
            "{what} `{value}` is {} bytes long; AMQP allows at most 255",
            value.len()
        ))
    })
}

/// Application headers and CC keys of a received message. Broker-added `x-`
/// headers (`x-death`, ...) are left out; other scalar values are rendered as text.
pub(crate) fn received_headers(
    properties: &BasicProperties,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut headers = BTreeMap::new();
    let mut cc = Vec::new();
    let Some(table) = properties.headers() else {
        return (headers, cc);
    };
    for (name, value) in table {
        let name = name.as_str();
        if name == CC_HEADER || name == DELAYED_CC_HEADER {
            if let AMQPValue::FieldArray(keys) = value {
                cc.extend(keys.as_slice().iter().filter_map(value_text));
            }
            continue;
        }
        if name.starts_with("x-") {
            continue;
        }
        match value_text(value) {
            Some(text) => {
                headers.insert(name.to_owned(), text);
            }
            None => tracing::debug!(header = name, "ignoring non-scalar AMQP header"),
        }
    }
    (headers, cc)
}

fn value_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(text) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        AMQPValue::ShortString(text) => text.as_str().to_owned(),
        AMQPValue::Boolean(flag) => flag.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// A lapin delivery as a contract [`Delivery`], settled through `acker`.
pub(crate) fn delivery(delivery: lapin::message::Delivery, acker: Box<dyn AckHandle>) -> Delivery {
    let (headers, cc) = received_headers(&delivery.properties);
    Delivery {
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        content_type: delivery
            .properties
            .content_type()
            .as_ref()
            .map(|t| t.to_string()),
        message_id: delivery
            .properties
            .message_id()
            .as_ref()
            .map(|t| t.to_string()),
        headers,
        cc,
        redelivered: delivery.redelivered,
        body: delivery.data,
        acker,
    }
}

/// A `basic.get` delivery as a contract [`Delivery`]: it owns `channel`,
/// kept open until the delivery is settled or dropped. `dead` turns true
/// when its connection is seen dead.
pub(crate) fn got_delivery(
    delivery: lapin::message::Delivery,
    channel: Channel,
    dead: tokio::sync::watch::Receiver<bool>,
) -> Delivery {
    let acker = Box::new(LapinAcker {
        acker: delivery.acker.clone(),
        channel: Some(channel),
        dead,
    });
    self::delivery(delivery, acker)
}

/// A lapin delivery as a [`PendingMessage`] (its acker is discarded; the channel's close requeues it).
pub(crate) fn pending(delivery: lapin::message::Delivery) -> PendingMessage {
    let (headers, _) = received_headers(&delivery.properties);
    PendingMessage {
        message_id: delivery
            .properties
            .message_id()
            .as_ref()
            .map(|t| t.to_string()),
        routing_key: delivery.routing_key.to_string(),
        headers,
        body: delivery.data,
    }
}

struct LapinAcker {
    acker: lapin::Acker,
    /// The delivery's channel (a `get`'s own), kept open
    /// until the delivery is settled or dropped.
    channel: Option<Channel>,
    /// Turns true when the delivery's connection is seen dead: lapin may
    /// then never answer an ack.
    dead: tokio::sync::watch::Receiver<bool>,
}

impl LapinAcker {
    /// Runs a settle call, failing when the connection dies first.
    async fn settle(
        &self,
        call: impl Future<Output = Result<bool, lapin::Error>>,
    ) -> Result<(), BrokerError> {
        let mut dead = self.dead.clone();
        tokio::select! {
            biased; // An answer that came is the truth, even if the connection died since.
            result = call => match result {
                Ok(true) => Ok(()),
                Ok(false) => Err(BrokerError::AckFailed(ACK_FAILED.to_owned())),
                Err(error) => Err(BrokerError::AckFailed(error.to_string())),
            },
            () = super::link::until_dead(&mut dead) => Err(BrokerError::AckFailed(
                "the connection was lost (the broker redelivers it)".to_owned(),
            )),
        }
    }
}

impl Drop for LapinAcker {
    /// An unsettled delivery goes back to its queue (as with the embedded broker),
    /// not only when its channel closes.
    fn drop(&mut self) {
        let channel = self.channel.take();
        if !self.acker.usable() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // Requeued when the channel closes.
        };
        let acker = self.acker.clone();
        runtime.spawn(async move {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            if let Err(error) = acker.nack(requeue).await {
                tracing::debug!(%error, "requeueing a dropped delivery failed; its channel's close requeues it");
            }
            drop(channel);
        });
    }
}

const ACK_FAILED: &str = "already settled, or its channel closed (the broker redelivers it)";

impl AckHandle for LapinAcker {
    fn ack(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(self.settle(self.acker.ack(BasicAckOptions::default())))
    }

    fn nack(&self, requeue: bool) -> BoxFuture<'_, Result<(), BrokerError>> {
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        Box::pin(self.settle(self.acker.nack(options)))
    }
}

/// RabbitMQ queue arguments for [`QueueOptions`].
pub(crate) fn queue_arguments(
    queue: &str,
    options: &QueueOptions,
) -> Result<FieldTable, BrokerError> {
    options.check(queue)?;
    let mut arguments = FieldTable::default();
    if options.queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    if let Some(limit) = options.delivery_limit {
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(limit)),
        );
    }
    if let Some(exchange) = &options.dead_letter_exchange {
        short("dead-letter exchange", exchange)?;
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(exchange.as_bytes().into()),
        );
    }
    if let Some(key) = &options.dead_letter_routing_key {
        short("dead-letter routing key", key)?;
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(key.as_bytes().into()),
        );
    }
    if let Some(max_length) = options.max_length {
        arguments.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(max_length)),
        );
        // Refuse (nack) publishes to a full queue instead of dropping its oldest message.
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    if let Some(ttl) = options.message_ttl {
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(millis(queue, ttl)?),
        );
    }
    Ok(arguments)
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
    pub(crate) fn mentioned_in(&self, error: &AMQPError) -> bool {
        let text = error.get_message().as_str();
        [&self.exchange, &self.queue]
            .into_iter()
            .flatten()
            .any(|name| text.contains(&format!("'{name}'")))
    }

    /// A channel-level (soft) AMQP error as a [`BrokerError`].
    pub(crate) fn soft_error(&self, what: &str, error: &AMQPError) -> BrokerError {
        let text = error.get_message().to_string();
        match error.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                if text.contains("no exchange") {
                    let exchange = self.exchange.clone().unwrap_or_else(|| quoted(&text));
                    BrokerError::ExchangeNotFound(exchange)
                } else {
                    let queue = self.queue.clone().unwrap_or_else(|| quoted(&text));
                    BrokerError::QueueNotFound(queue)
                }
            }
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            | AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => BrokerError::Conflict {
                name: self.name(),
                detail: text,
            },
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => BrokerError::Invalid(format!(
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
        let not_found = AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no exchange 'ex' in vhost '/'".into(),
        );
        let target = Target::binding("q", "ex");
        assert!(
            matches!(target.soft_error("bind", &not_found), BrokerError::ExchangeNotFound(e) if e == "ex")
        );
        assert!(target.mentioned_in(&not_found));
        assert!(!Target::exchange("other").mentioned_in(&not_found));
        let no_queue = AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no queue 'q' in vhost '/'".into(),
        );
        assert!(
            matches!(target.soft_error("bind", &no_queue), BrokerError::QueueNotFound(q) if q == "q")
        );
        let conflict = AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - inequivalent arg 'durable'".into(),
        );
        assert!(matches!(
            Target::queue("q").soft_error("declare", &conflict),
            BrokerError::Conflict { name, detail } if name == "q" && detail.contains("durable")
        ));
    }
}
