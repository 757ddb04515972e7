//! Runs a test binary's cases in sequence against one costly shared thing
//! (a node, a cluster): each in its own task with a time limit, so one
//! failing case does not hide the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One case: an `async fn name(shared: Arc<T>)`, boxed.
pub type Case<T> = fn(Arc<T>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// The cases the environment variable `env` names (`name[,name]`), or all
/// when it is unset; panics when it names none of them.
pub fn select<'a, T>(env: &str, cases: &'a [(&'a str, Case<T>)]) -> Vec<(&'a str, Case<T>)> {
    let only = std::env::var(env).ok();
    let selected: Vec<(&str, Case<T>)> = cases
        .iter()
        .filter(|(name, _)| {
            only.as_deref()
                .is_none_or(|only| only.split(',').any(|wanted| wanted.trim() == *name))
        })
        .copied()
        .collect();
    assert!(!selected.is_empty(), "{env}={only:?} selects no case");
    selected
}

/// Runs `cases` in order on a two-worker runtime, each within `timeout`,
/// calling `after_each` (blocking) after each; the names of those that
/// failed or timed out.
pub fn run<T: Send + Sync + 'static>(
    shared: &Arc<T>,
    cases: Vec<(&'static str, Case<T>)>,
    timeout: Duration,
    after_each: impl Fn(&T),
) -> Vec<&'static str> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut failed = Vec::new();
    for (name, case) in cases {
        let began = Instant::now();
        let case = case(shared.clone());
        let task = runtime.spawn(async move { tokio::time::timeout(timeout, case).await });
        match runtime.block_on(task) {
            Ok(Ok(())) => eprintln!("case {name}: ok ({:.1?})", began.elapsed()),
            Ok(Err(_)) => {
                eprintln!("case {name}: TIMED OUT after {timeout:?}");
                failed.push(name);
            }
            Err(error) => {
                eprintln!("case {name}: FAILED ({error})");
                failed.push(name);
            }
        }
        after_each(shared);
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
    failed
}
