//! The AMQP 0-9-1 methods the main connection sends, encoded. Names come as
//! [`ShortString`]s (checked when the operation began), so encoding cannot fail.

use super::wire::{CLASS_BASIC, ShortString, Writer};
use crate::broker::QueueOptions;

const EXCHANGE: u16 = 40;
const QUEUE: u16 = 50;

/// Writes a short string known to fit.
fn short(writer: &mut Writer, value: &ShortString) {
    let bytes = value.as_str().as_bytes();
    // At most 255 bytes by construction.
    writer.u8(bytes.len() as u8);
    writer.0.extend_from_slice(bytes);
}

/// `exchange.declare` of a topic exchange.
pub(crate) fn exchange_declare(name: &ShortString, passive: bool, durable: bool) -> Writer {
    let mut method = Writer::method(EXCHANGE, 10);
    method.u16(0);
    short(&mut method, name);
    method.u8(5).0.extend_from_slice(b"topic");
    // passive, durable, auto-delete, internal, no-wait
    method.u8(u8::from(passive) | (u8::from(durable) << 1));
    method.long(&[]);
    method
}

/// `exchange.delete` (whether or not it is in use).
pub(crate) fn exchange_delete(name: &ShortString) -> Writer {
    let mut method = Writer::method(EXCHANGE, 20);
    method.u16(0);
    short(&mut method, name);
    method.u8(0);
    method
}

/// The flags of a `queue.declare`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QueueFlags {
    pub(crate) passive: bool,
    pub(crate) durable: bool,
    pub(crate) exclusive: bool,
    pub(crate) auto_delete: bool,
}

impl QueueFlags {
    /// The flags `options` declare a queue with.
    pub(crate) fn of(options: &QueueOptions) -> Self {
        QueueFlags {
            passive: false,
            durable: options.durable,
            exclusive: options.exclusive,
            auto_delete: options.auto_delete,
        }
    }

    /// Only checks that the queue exists.
    pub(crate) fn passive() -> Self {
        QueueFlags {
            passive: true,
            ..QueueFlags::default()
        }
    }
}

/// `queue.declare` with `arguments`, an encoded field table; its answer
/// carries the message count.
pub(crate) fn queue_declare(name: &ShortString, flags: &QueueFlags, arguments: &[u8]) -> Writer {
    let mut method = Writer::method(QUEUE, 10);
    method.u16(0);
    short(&mut method, name);
    method.u8(u8::from(flags.passive)
        | (u8::from(flags.durable) << 1)
        | (u8::from(flags.exclusive) << 2)
        | (u8::from(flags.auto_delete) << 3));
    method.long(arguments);
    method
}

/// The message count in a `queue.declare-ok`'s arguments.
pub(crate) fn declared_message_count(args: &mut super::wire::Reader<'_>) -> Option<u32> {
    args.short("queue").ok()?;
    args.u32("message count").ok()
}

/// `queue.bind`.
pub(crate) fn queue_bind(queue: &ShortString, exchange: &ShortString, key: &ShortString) -> Writer {
    let mut method = Writer::method(QUEUE, 20);
    method.u16(0);
    short(&mut method, queue);
    short(&mut method, exchange);
    short(&mut method, key);
    method.u8(0).long(&[]);
    method
}

/// `queue.delete` (whether or not it is in use or empty).
pub(crate) fn queue_delete(name: &ShortString) -> Writer {
    let mut method = Writer::method(QUEUE, 40);
    method.u16(0);
    short(&mut method, name);
    method.u8(0);
    method
}

/// `basic.qos`: at most `prefetch` unacknowledged deliveries per consumer.
pub(crate) fn basic_qos(prefetch: u16) -> Writer {
    let mut method = Writer::method(CLASS_BASIC, 10);
    method.u32(0).u16(prefetch).u8(0);
    method
}

/// `basic.get` with acknowledgement.
pub(crate) fn basic_get(queue: &ShortString) -> Writer {
    let mut method = Writer::method(CLASS_BASIC, 70);
    method.u16(0);
    short(&mut method, queue);
    method.u8(0);
    method
}

/// `basic.ack`.
pub(crate) fn basic_ack(tag: u64, multiple: bool) -> Writer {
    let mut method = Writer::method(CLASS_BASIC, 80);
    method.u64(tag).u8(u8::from(multiple));
    method
}

/// `basic.nack` of one delivery.
pub(crate) fn basic_nack(tag: u64, requeue: bool) -> Writer {
    let mut method = Writer::method(CLASS_BASIC, 120);
    method.u64(tag).u8(u8::from(requeue) << 1);
    method
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::amqp::wire::Reader;

    fn name(text: &str) -> ShortString {
        ShortString::try_new(text).unwrap()
    }

    #[test]
    fn declarations_carry_their_flags_and_names() {
        let declare = exchange_declare(&name("ex"), false, true);
        let mut args = Reader::new(&declare.0);
        assert_eq!((args.u16("c").unwrap(), args.u16("m").unwrap()), (40, 10));
        args.u16("reserved").unwrap();
        assert_eq!(args.short("name").unwrap(), b"ex");
        assert_eq!(args.short("type").unwrap(), b"topic");
        assert_eq!(args.u8("flags").unwrap(), 0b10);
        assert_eq!(args.long("arguments").unwrap(), b"");
        assert!(args.rest().is_empty());

        let flags = QueueFlags {
            passive: false,
            durable: true,
            exclusive: true,
            auto_delete: true,
        };
        let declare = queue_declare(&name("q"), &flags, &[]);
        let mut args = Reader::new(&declare.0);
        assert_eq!((args.u16("c").unwrap(), args.u16("m").unwrap()), (50, 10));
        args.u16("reserved").unwrap();
        assert_eq!(args.short("name").unwrap(), b"q");
        assert_eq!(args.u8("flags").unwrap(), 0b1110);
        assert_eq!(args.long("arguments").unwrap(), b"");
        assert!(args.rest().is_empty());
    }

    #[test]
    fn settlements_are_encoded_as_the_spec_says() {
        let ack = basic_ack(7, true);
        assert_eq!(ack.0, [0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 7, 1]);
        let nack = basic_nack(9, true);
        assert_eq!(nack.0, [0, 60, 0, 120, 0, 0, 0, 0, 0, 0, 0, 9, 2]);
        let nack = basic_nack(9, false);
        assert_eq!(nack.0.last(), Some(&0));
    }
}
