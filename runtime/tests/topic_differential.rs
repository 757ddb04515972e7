//! Differential test of topic routing: random binding patterns (with `*`, `#`
//! and empty words) and random routing and CC keys, on the embedded broker and
//! on RabbitMQ; every queue must receive the same messages in the same order.
//! Needs RabbitMQ (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`)
//! and fails, never skips, when it is unreachable.
#![cfg(feature = "amqp")]

mod differential_support;
mod local_services;

use differential_support::Rng;
use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::broker::{Broker, ExchangeOptions, OutgoingMessage, QueueOptions};

/// Rounds, each with its own seed, exchange and queues.
const SEEDS: [u64; 4] = [0x9E37_79B9_7F4A_7C15, 1, 0xDEAD_BEEF, 20_240_601];
const QUEUES_PER_ROUND: usize = 30;
const MESSAGES_PER_ROUND: usize = 60;

/// Pattern words: literals (one a prefix of another), the empty word and the wildcards.
const PATTERN_WORDS: [&str; 6] = ["a", "b", "ab", "", "*", "#"];
/// Key words: the literals, the empty word, and a literal `*` (only a wildcard in patterns).
const KEY_WORDS: [&str; 5] = ["a", "b", "ab", "", "*"];

/// 0 to 4 words joined by dots (0 words: the empty key / pattern).
fn dotted(rng: &mut Rng, words: &[&str]) -> String {
    let count = rng.below(5);
    (0..count)
        .map(|_| *rng.pick(words))
        .collect::<Vec<_>>()
        .join(".")
}

struct Round {
    /// Patterns each queue is bound by (1 to 3; overlapping ones must not duplicate deliveries).
    bindings: Vec<Vec<String>>,
    /// Routing key and CC keys of each message.
    messages: Vec<(String, Vec<String>)>,
}

fn round(seed: u64) -> Round {
    let mut rng = Rng::new(seed);
    let bindings = (0..QUEUES_PER_ROUND)
        .map(|_| {
            let count = 1 + rng.below(3);
            (0..count)
                .map(|_| dotted(&mut rng, &PATTERN_WORDS))
                .collect()
        })
        .collect();
    let messages = (0..MESSAGES_PER_ROUND)
        .map(|_| {
            let key = dotted(&mut rng, &KEY_WORDS);
            let cc_count = if rng.below(4) == 0 {
                1 + rng.below(2)
            } else {
                0
            };
            let cc = (0..cc_count)
                .map(|_| dotted(&mut rng, &KEY_WORDS))
                .collect();
            (key, cc)
        })
        .collect();
    Round { bindings, messages }
}

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("differential-{what}-{}-{nanos:x}", std::process::id())
}

/// Runs a round on `broker`: returns, per queue, the indexes of the messages it
/// holds, in order, and the exchange it declared.
async fn deliveries<B: Broker>(broker: &B, round: &Round, seed: u64) -> (Vec<Vec<usize>>, String) {
    let exchange = unique(&format!("exchange-{seed:x}"));
    broker
        .declare_exchange(&exchange, ExchangeOptions::default())
        .await
        .unwrap_or_else(|error| panic!("declaring `{exchange}`: {error}"));
    let mut queues = Vec::new();
    for (n, patterns) in round.bindings.iter().enumerate() {
        let name = broker.qualify_queue_name(&unique(&format!("{seed:x}-{n}")));
        let queue = broker
            .declare_queue(&name, QueueOptions::default())
            .await
            .unwrap_or_else(|error| panic!("declaring `{name}`: {error}"));
        for pattern in patterns {
            broker
                .bind_queue(&queue, &exchange, pattern)
                .await
                .unwrap_or_else(|error| panic!("binding `{queue}` by `{pattern}`: {error}"));
        }
        queues.push(queue);
    }
    for (index, (key, cc)) in round.messages.iter().enumerate() {
        let message = OutgoingMessage {
            body: index.to_string().into_bytes(),
            cc: cc.clone(),
            ..OutgoingMessage::default()
        };
        broker
            .publish(&exchange, key, message)
            .await
            .unwrap_or_else(|error| panic!("publishing key `{key}` cc {cc:?}: {error}"));
    }
    let mut held = Vec::new();
    for queue in &queues {
        // Publishes are confirmed, so everything routed is in its queue by now.
        let pending = broker
            .pending(queue)
            .await
            .unwrap_or_else(|error| panic!("listing `{queue}`: {error}"));
        let indexes = pending
            .iter()
            .map(|message| {
                String::from_utf8_lossy(&message.body)
                    .parse::<usize>()
                    .expect("bodies are message indexes")
            })
            .collect();
        held.push(indexes);
    }
    for queue in &queues {
        broker
            .delete_queue(queue)
            .await
            .unwrap_or_else(|error| panic!("deleting `{queue}`: {error}"));
    }
    (held, exchange)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_rabbitmq_route_alike() {
    let rabbitmq = differential_support::rabbitmq("exchange-runtime-topic-differential").await;
    let memory = MemoryBroker::new();
    let mut routed = 0;
    for seed in SEEDS {
        let round = round(seed);
        let (expected, _) = deliveries(&memory, &round, seed).await;
        let (actual, exchange) = deliveries(&rabbitmq, &round, seed).await;
        rabbitmq
            .delete_exchange(&exchange)
            .await
            .unwrap_or_else(|error| panic!("deleting `{exchange}`: {error}"));
        for (queue, (memory_held, rabbitmq_held)) in expected.iter().zip(&actual).enumerate() {
            let messages: Vec<_> = memory_held
                .iter()
                .chain(rabbitmq_held)
                .map(|&index| &round.messages[index])
                .collect();
            assert_eq!(
                memory_held, rabbitmq_held,
                "seed {seed:#x}, queue {queue} bound by {:?}: memory holds {memory_held:?}, \
                 RabbitMQ {rabbitmq_held:?} (messages involved: {messages:?})",
                round.bindings[queue]
            );
            routed += memory_held.len();
        }
    }
    eprintln!("{routed} deliveries compared");
    // The random rounds exercise routing, not just empty queues.
    assert!(
        routed > SEEDS.len() * MESSAGES_PER_ROUND,
        "only {routed} deliveries"
    );
}

#[test]
fn rounds_are_deterministic_and_cover_the_alphabet() {
    let first = round(SEEDS[0]);
    let again = round(SEEDS[0]);
    assert_eq!(first.bindings, again.bindings);
    assert_eq!(first.messages, again.messages);
    let patterns: Vec<String> = SEEDS
        .iter()
        .flat_map(|&seed| round(seed).bindings.into_iter().flatten())
        .collect();
    for feature in ["#", "*", "..", ""] {
        assert!(
            patterns.iter().any(|pattern| if feature.is_empty() {
                pattern.is_empty()
            } else {
                pattern.contains(feature)
            }),
            "no pattern with {feature:?}"
        );
    }
}
