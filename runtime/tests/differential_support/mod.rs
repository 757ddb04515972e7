//! What the differential tests (embedded broker against RabbitMQ) share: a
//! seeded random generator and the RabbitMQ connection.
#![allow(dead_code)] // Each test binary uses part of it.

use std::time::Duration;

use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig};

/// xorshift64*: small, seeded, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `bound` (not zero).
    pub fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(bound).expect("small")).expect("small")
    }

    /// True `percent` % of the time.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Connects to the tests' RabbitMQ ([`crate::local_services::rabbitmq_url`];
/// a test binary using this module declares `mod local_services;` too) as
/// `connection_name`; panics, saying how to start it, when it is unreachable.
pub async fn rabbitmq(connection_name: &str) -> AmqpBroker {
    let url = crate::local_services::rabbitmq_url();
    let config = AmqpConfig::from_url(&url)
        .expect("AMQP_URL must be a valid amqp:// URL")
        .with_connection_name(connection_name)
        .with_operation_timeout(Duration::from_secs(20));
    let endpoint = config.endpoint();
    AmqpBroker::connect(config).await.unwrap_or_else(|error| {
        panic!(
            "RabbitMQ is required for this test and is unreachable at {endpoint} ({error}); \
             start it with `rabbitmq-server -detached` or set AMQP_URL"
        )
    })
}
