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
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::broker::OutgoingMessage;

/// How long a confirmed copy is remembered, so a retry of it sends nothing.
pub(super) const CONFIRMED_KEPT: Duration = Duration::from_secs(60);

/// Identifies one message for "at most one unconfirmed copy": its id plus a
/// fingerprint of what is sent (a job re-sent with a new attempt count is another message).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct CopyKey {
    /// Shared by the clones kept while the copy is under way and remembered.
    pub(super) message_id: Arc<str>,
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
            message_id: message.message_id.as_deref().unwrap_or_default().into(),
            fingerprint: hasher.finish(),
        }
    }
}

/// What became of one sent copy: its publish's confirm.
pub(super) use super::pipe::Confirm as CopyOutcome;

/// Where one sent copy's outcome appears (a few dozen bytes a copy: a
/// watch channel cost ten times that).
#[derive(Default)]
pub(super) struct CopyWatch {
    outcome: OnceLock<CopyOutcome>,
    known: Notify,
}

impl CopyWatch {
    fn set(&self, outcome: CopyOutcome) {
        let _ = self.outcome.set(outcome);
        self.known.notify_waiters();
    }
}

/// A copy a retry can wait for instead of sending another.
pub(super) enum Joinable {
    /// Confirmed moments ago.
    Acked,
    /// Under way.
    InFlight(Arc<CopyWatch>),
}

/// What is remembered of one message's copy.
enum Entry {
    /// Sent on the connection of this generation, outcome pending or a failure.
    Sent(u64, Arc<CopyWatch>),
    /// Confirmed (within [`CONFIRMED_KEPT`]).
    Acked,
}

/// The copies under way, and the confirmed ones still remembered.
#[derive(Default)]
pub(super) struct Copies {
    by_key: HashMap<CopyKey, Entry>,
    /// Confirmed copies in the order they were confirmed, to forget after [`CONFIRMED_KEPT`].
    confirmed: VecDeque<(Instant, CopyKey)>,
}

impl Copies {
    /// The outcome of a copy of `key` still unconfirmed on the connection of
    /// `generation`, or confirmed moments ago (a retry racing the confirm sends nothing new).
    pub(super) fn joinable(&self, key: &CopyKey, generation: u64) -> Option<Joinable> {
        match self.by_key.get(key)? {
            Entry::Acked => Some(Joinable::Acked),
            Entry::Sent(_, outcome)
                if matches!(outcome.outcome.get(), Some(CopyOutcome::Acked)) =>
            {
                Some(Joinable::Acked)
            }
            Entry::Sent(sent_on, outcome) if *sent_on == generation => {
                Some(Joinable::InFlight(outcome.clone()))
            }
            Entry::Sent(..) => None,
        }
    }

    fn insert(&mut self, key: CopyKey, generation: u64, outcome: Arc<CopyWatch>) {
        self.by_key.insert(key, Entry::Sent(generation, outcome));
    }

    /// Records the end, at `now`, of the copy whose outcome `mine` watches.
    fn finished(&mut self, key: CopyKey, mine: &Arc<CopyWatch>, acked: bool, now: Instant) {
        let entry = self.by_key.get_mut(&key);
        let ours = matches!(&entry, Some(Entry::Sent(_, outcome)) if Arc::ptr_eq(outcome, mine));
        if acked {
            if let Some(entry) = entry.filter(|_| ours) {
                *entry = Entry::Acked;
            }
            self.confirmed.push_back((now, key));
        } else if ours {
            self.by_key.remove(&key);
        }
        while let Some((at, _)) = self.confirmed.front()
            && now.duration_since(*at) >= CONFIRMED_KEPT
        {
            let Some((_, old)) = self.confirmed.pop_front() else {
                break;
            };
            // An acked entry is never replaced, so the entry is that copy's.
            if matches!(self.by_key.get(&old), Some(Entry::Acked)) {
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
    watch: Arc<CopyWatch>,
    key: CopyKey,
    copies: Weak<Mutex<Copies>>,
}

impl InFlight {
    fn finish(self, outcome: CopyOutcome) {
        let acked = matches!(outcome, CopyOutcome::Acked);
        self.watch.set(outcome);
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
        copies: &Arc<Mutex<Copies>>,
        key: CopyKey,
        generation: u64,
        sending: impl Future<Output = CopyOutcome> + Send + 'static,
    ) -> SentCopy {
        let watch = Arc::new(CopyWatch::default());
        copies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key.clone(), generation, watch.clone());
        SentCopy {
            in_flight: Some(InFlight {
                sending: Box::pin(sending),
                watch,
                key,
                copies: Arc::downgrade(copies),
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
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let mut in_flight = in_flight;
                    let outcome = in_flight.sending.as_mut().await;
                    in_flight.finish(outcome);
                });
            }
            // Joiners see the copy as lost (and resend).
            Err(_) => in_flight.finish(lost("no runtime left to wait for its confirm")),
        }
    }
}

fn lost(why: &str) -> CopyOutcome {
    CopyOutcome::Lost(why.to_owned())
}

/// Waits for the outcome of a copy someone else sent.
pub(super) async fn joined(copy: Joinable) -> CopyOutcome {
    let watch = match copy {
        Joinable::Acked => return CopyOutcome::Acked,
        Joinable::InFlight(watch) => watch,
    };
    loop {
        let known = watch.known.notified();
        tokio::pin!(known);
        known.as_mut().enable();
        if let Some(outcome) = watch.outcome.get() {
            return outcome.clone();
        }
        known.await;
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
            let watch = Arc::new(CopyWatch::default());
            copies.insert(key(name), 1, watch.clone());
            copies.finished(key(name), &watch, true, at);
        }
        assert!(copies.joinable(&key("d"), 2).is_none(), "kept its time");
        assert!(copies.joinable(&key("e"), 2).is_some());
    }
}
