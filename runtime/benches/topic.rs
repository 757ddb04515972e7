//! Routing throughput of the topic trie: one binding, and 10,000 bindings
//! shaped like Taskcluster consumers' (task ids, worker pools, task groups,
//! CC routes, with `*` and `#`).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use exchange_runtime::topic::TopicTrie;

/// A deterministic stand-in for a Taskcluster slug id (22 url-safe characters).
fn slug(seed: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..22)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            char::from(ALPHABET[(state >> 58) as usize])
        })
        .collect()
}

/// `primary.<taskId>.<runId>.<workerGroup>.<workerId>.<provisionerId>.<workerType>.<schedulerId>.<taskGroupId>.#`
fn task_key(task: u64, pool: u64, group: u64) -> String {
    format!(
        "primary.{}.0.us-east-1.i-{:08x}.proj-{}.worker-{}.taskcluster-ui.{}._",
        slug(task),
        task,
        pool % 50,
        pool,
        slug(group + 1_000_000)
    )
}

fn bindings(count: u64) -> TopicTrie<u64> {
    let mut trie = TopicTrie::new();
    for n in 0..count {
        let pattern = match n % 5 {
            // Watch one task.
            0 => format!("primary.{}.#", slug(n)),
            // Watch a worker pool.
            1 => format!("primary.*.*.*.*.proj-{}.worker-{}.#", n % 50, n),
            // Watch a task group.
            2 => format!("primary.*.*.*.*.*.*.*.{}.#", slug(n + 1_000_000)),
            // CC routes (`route.index.<namespace>.#`).
            3 => format!("route.index.project-{}.*.#", n),
            // Everything from one scheduler with a specific run id.
            _ => format!("primary.*.{}.#.taskcluster-{}.*.*", n % 7, n),
        };
        trie.insert(&pattern, n);
    }
    trie
}

fn keys() -> Vec<String> {
    (0..1000u64)
        .map(|n| match n % 4 {
            // A watched task.
            0 => task_key(n / 4 * 5, 7, 3),
            // A watched worker pool.
            1 => task_key(u64::MAX - n, n / 4 * 5 + 1, 9),
            // A watched task group.
            2 => task_key(u64::MAX / 2 - n, 3, n / 4 * 5 + 2),
            // A CC route nobody binds exactly.
            _ => format!("route.index.project-{}.v1.latest", n * 3 + 1),
        })
        .collect()
}

fn routing(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("topic_routing");
    group.throughput(Throughput::Elements(keys.len() as u64));
    for count in [1u64, 10_000] {
        let trie = bindings(count);
        let matched: usize = keys.iter().map(|key| trie.matches(key).len()).sum();
        assert!(matched > 0, "the benchmark keys must match some bindings");
        group.bench_function(format!("{count}_bindings"), |b| {
            b.iter(|| {
                let mut total = 0;
                for key in &keys {
                    total += trie.matches(black_box(key)).len();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
