//! The copies of messages sent and not yet confirmed: at most one per
//! message, so that a retry waits for the copy under way instead of sending
//! another.
//!
//! The caller that sends a copy waits for its confirm itself (no task per
//! publish: that cost more CPU and memory than the rest of a publish); if
//! it stops waiting first, the rest of the wait moves to a task of its own,
//! which still records the outcome for the retries that join it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::broker::OutgoingMessage;

/// How long a confirmed copy is remembered, so a retry of it sends nothing.
pub(super) const CONFIRMED_KEPT: Duration = Duration::from_secs(60);

/// Identifies one message for "at most one unconfirmed copy": its id plus a
/// fingerprint of what is sent (a job re-sent with a new attempt count is another message).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct CopyKey {
    pub(super) message_id: String,
    fingerprint: u64,
}

impl CopyKey {
    pub(super) fn new(exchange: &str, routing_key: &str, message: &OutgoingMessage) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            exchange,
            routing_key,
            &message.body,
            &message.headers,
            &message.cc,
        )
            .hash(&mut hasher);
        (&message.content_type, message.persistent).hash(&mut hasher);
        CopyKey {
            message_id: message.message_id.clone().unwrap_or_default(),
            fingerprint: hasher.finish(),
        }
    }
}

/// What became of one sent copy: its publish's confirm.
pub(super) use super::pipe::Confirm as CopyOutcome;

/// Where one sent copy's outcome appears.
pub(super) type CopyWatch = watch::Receiver<Option<CopyOutcome>>;

/// The copies under way, and the confirmed ones still remembered.
#[derive(Default)]
pub(super) struct Copies {
    /// By message: the generation of the connection it was sent on, and its outcome.
    by_key: HashMap<CopyKey, (u64, CopyWatch)>,
    /// Confirmed copies in the order they were confirmed, to forget after [`CONFIRMED_KEPT`].
    confirmed: VecDeque<(Instant, CopyKey)>,
}

impl Copies {
    /// The outcome of a copy of `key` still unconfirmed on the connection of
    /// `generation`, or confirmed moments ago (a retry racing the confirm sends nothing new).
    pub(super) fn joinable(&self, key: &CopyKey, generation: u64) -> Option<CopyWatch> {
        self.by_key
            .get(key)
            .filter(|(sent_on, outcome)| {
                *sent_on == generation || matches!(*outcome.borrow(), Some(CopyOutcome::Acked))
            })
            .map(|(_, outcome)| outcome.clone())
    }

    fn insert(&mut self, key: CopyKey, generation: u64, outcome: CopyWatch) {
        self.by_key.insert(key, (generation, outcome));
    }

    /// Records the end, at `now`, of the copy whose outcome `mine` watches.
    fn finished(&mut self, key: CopyKey, mine: &CopyWatch, acked: bool, now: Instant) {
        if acked {
            self.confirmed.push_back((now, key));
        } else if self
            .by_key
            .get(&key)
            .is_some_and(|(_, outcome)| outcome.same_channel(mine))
        {
            self.by_key.remove(&key);
        }
        while let Some((at, _)) = self.confirmed.front()
            && now.duration_since(*at) >= CONFIRMED_KEPT
        {
            let Some((_, old)) = self.confirmed.pop_front() else {
                break;
            };
            // An acked entry is never replaced, so the entry is that copy's.
            if self
                .by_key
                .get(&old)
                .is_some_and(|(_, outcome)| matches!(*outcome.borrow(), Some(CopyOutcome::Acked)))
            {
                self.by_key.remove(&old);
            }
        }
    }
}

/// A copy's send-and-confirm, boxed so that it can move to a task when its caller stops waiting.
type Sending = Pin<Box<dyn Future<Output = CopyOutcome> + Send>>;

/// One copy this caller sent; see the [module docs](self).
pub(super) struct SentCopy {
    in_flight: Option<InFlight>,
}

struct InFlight {
    sending: Sending,
    record: watch::Sender<Option<CopyOutcome>>,
    watch: CopyWatch,
    key: CopyKey,
    copies: Weak<Mutex<Copies>>,
}

impl InFlight {
    fn finish(self, outcome: CopyOutcome) {
        let acked = matches!(outcome, CopyOutcome::Acked);
        self.record.send_replace(Some(outcome));
        if let Some(copies) = self.copies.upgrade() {
            copies
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .finished(self.key, &self.watch, acked, Instant::now());
        }
    }
}

impl SentCopy {
    /// Registers the copy of `key` that `sending` sends on the connection of `generation`.
    pub(super) fn start(
        copies: &std::sync::Arc<Mutex<Copies>>,
        key: CopyKey,
        generation: u64,
        sending: impl Future<Output = CopyOutcome> + Send + 'static,
    ) -> SentCopy {
        let (record, watch) = watch::channel(None);
        copies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key.clone(), generation, watch.clone());
        SentCopy {
            in_flight: Some(InFlight {
                sending: Box::pin(sending),
                record,
                watch,
                key,
                copies: std::sync::Arc::downgrade(copies),
            }),
        }
    }

    /// Waits for the copy's outcome (cancel-safe: dropped before it, the wait goes on in a task).
    pub(super) async fn settled(&mut self) -> CopyOutcome {
        let Some(in_flight) = self.in_flight.as_mut() else {
            return CopyOutcome::Lost("already settled".to_owned());
        };
        let outcome = in_flight.sending.as_mut().await;
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.finish(outcome.clone());
        }
        outcome
    }
}

impl Drop for SentCopy {
    fn drop(&mut self) {
        let Some(in_flight) = self.in_flight.take() else {
            return;
        };
        // Without a runtime the watch closes: joiners see the copy as lost (and resend).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut in_flight = in_flight;
                let outcome = in_flight.sending.as_mut().await;
                in_flight.finish(outcome);
            });
        }
    }
}

fn lost(why: &str) -> CopyOutcome {
    CopyOutcome::Lost(why.to_owned())
}

/// Waits for the outcome of a copy someone else sent.
pub(super) async fn joined(mut outcome: CopyWatch) -> CopyOutcome {
    match outcome.wait_for(Option::is_some).await {
        Ok(result) => result
            .clone()
            .unwrap_or_else(|| lost("no outcome recorded")),
        Err(_) => lost("the copy's sender went away"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(id: &str) -> CopyKey {
        CopyKey::new(
            "ex",
            "k",
            &OutgoingMessage {
                message_id: Some(id.to_owned()),
                ..OutgoingMessage::default()
            },
        )
    }

    #[tokio::test]
    async fn a_copy_is_joinable_until_it_fails_and_remembered_once_acked() {
        let copies = Arc::new(Mutex::new(Copies::default()));
        let (release, released) = tokio::sync::oneshot::channel::<CopyOutcome>();
        let mut copy = SentCopy::start(&copies, key("a"), 1, async move {
            released.await.unwrap_or_else(|_| lost("test"))
        });
        let joiner = copies
            .lock()
            .unwrap()
            .joinable(&key("a"), 1)
            .expect("in flight");
        assert!(
            copies.lock().unwrap().joinable(&key("a"), 2).is_none(),
            "another connection"
        );
        release.send(CopyOutcome::Acked).unwrap();
        assert!(matches!(copy.settled().await, CopyOutcome::Acked));
        assert!(matches!(joined(joiner).await, CopyOutcome::Acked));
        // Confirmed: joinable from any connection for a while.
        assert!(copies.lock().unwrap().joinable(&key("a"), 2).is_some());

        let mut failed = SentCopy::start(&copies, key("b"), 1, async { CopyOutcome::Nacked });
        assert!(matches!(failed.settled().await, CopyOutcome::Nacked));
        assert!(
            copies.lock().unwrap().joinable(&key("b"), 1).is_none(),
            "a failed copy is forgotten"
        );
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_leaves_the_outcome_to_a_task() {
        let copies = Arc::new(Mutex::new(Copies::default()));
        let (release, released) = tokio::sync::oneshot::channel::<CopyOutcome>();
        let copy = SentCopy::start(&copies, key("c"), 1, async move {
            released.await.unwrap_or_else(|_| lost("test"))
        });
        let joiner = copies
            .lock()
            .unwrap()
            .joinable(&key("c"), 1)
            .expect("in flight");
        drop(copy);
        release.send(CopyOutcome::Acked).unwrap();
        assert!(matches!(joined(joiner).await, CopyOutcome::Acked));
    }

    #[test]
    fn confirmed_copies_are_forgotten_after_the_keeping_time() {
        let mut copies = Copies::default();
        let start = Instant::now();
        for (name, at) in [("d", start), ("e", start + CONFIRMED_KEPT)] {
            let (record, watch) = watch::channel(Some(CopyOutcome::Acked));
            copies.insert(key(name), 1, watch.clone());
            copies.finished(key(name), &watch, true, at);
            drop(record);
        }
        assert!(copies.joinable(&key("d"), 2).is_none(), "kept its time");
        assert!(copies.joinable(&key("e"), 2).is_some());
    }
}
