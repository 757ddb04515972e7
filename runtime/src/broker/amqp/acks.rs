//! Settling a consumer channel's deliveries.
//!
//! A delivery's ack or nack is recorded here, and the connection's writer
//! takes what was recorded just before its next write, in the order the
//! calls were made (nothing waits for the write): a run of settled tags from
//! the oldest unsettled one is acknowledged with one `basic.ack`
//! (`multiple`), the rest one frame each. Acks made while the writer was
//! busy go out together, so the broker reads one frame per run rather than
//! one per message. A
//! handler still running never holds back the acks of deliveries after it,
//! so a slow message never fills the prefetch window with finished ones.
//!
//! An ack is recorded only once its caller settled the delivery (the typed
//! consumer: after its handler returned `Ok`), and the broker reads it in the
//! channel's order; if the connection dies before it is sent, the broker
//! redelivers the message, as it would after any loss.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::conn::{Channel, Deferred};
use super::methods;
use crate::broker::{AckHandle, BoxFuture, BrokerError};

/// How a delivery was settled, waiting to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Nack { requeue: bool },
}

/// The deliveries of one consumer channel, by delivery tag. The channel
/// closes when the consumer and every delivery it handed out let go.
pub(crate) struct AckBatcher {
    channel: Channel,
    /// Delivered and not yet sent: `None` while unsettled.
    outstanding: Mutex<BTreeMap<u64, Option<Settle>>>,
    /// Whether the writer is to flush this batcher before its next write.
    scheduled: AtomicBool,
}

impl AckBatcher {
    /// A batcher for `channel`.
    pub(crate) fn new(channel: Channel) -> Arc<AckBatcher> {
        Arc::new(AckBatcher {
            channel,
            outstanding: Mutex::new(BTreeMap::new()),
            scheduled: AtomicBool::new(false),
        })
    }

    /// The channel.
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Option<Settle>>> {
        self.outstanding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a delivery handed out (tags grow on a channel) and returns its acker.
    pub(crate) fn delivered(
        self: &Arc<Self>,
        tag: u64,
        dead: watch::Receiver<bool>,
    ) -> BatchedAcker {
        self.lock().insert(tag, None);
        BatchedAcker {
            batcher: self.clone(),
            tag,
            dead,
        }
    }

    /// Records `settle` for `tag`, to be sent before the connection's next
    /// write; false when it was settled already (or never delivered here).
    fn record(self: &Arc<Self>, tag: u64, settle: Settle) -> bool {
        match self.lock().get_mut(&tag) {
            Some(slot @ None) => *slot = Some(settle),
            _ => return false,
        }
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.channel.defer(self.clone());
        }
        true
    }

    /// Queues what was recorded so far on the channel, now: before the
    /// channel is closed, which would requeue what was acked.
    pub(crate) fn flush(&self) {
        // Cleared first: a settlement recorded from here on schedules another flush.
        self.scheduled.store(false, Ordering::Release);
        let mut outstanding = self.lock();
        let frames: Vec<_> = take_ready_from(&mut outstanding)
            .into_iter()
            .map(|frame| match frame {
                Frame::Ack(tag, multiple) => methods::basic_ack(tag, multiple),
                Frame::Nack(tag, requeue) => methods::basic_nack(tag, requeue),
            })
            .collect();
        if frames.is_empty() {
            return;
        }
        // Queued under the lock: frames leave in the order they were taken.
        if let Err(error) = self.channel.send(&frames) {
            // The broker redelivers what it did not see settled.
            tracing::debug!(%error, "settling consumer deliveries failed");
        }
    }
}

impl Deferred for AckBatcher {
    fn flush(&self) {
        AckBatcher::flush(self);
    }
}

impl Drop for AckBatcher {
    /// What was recorded goes out before the channel closes.
    fn drop(&mut self) {
        self.flush();
    }
}

/// Takes the settled deliveries out of `outstanding`, as frames in sending
/// order: nacks first (they leave the unacknowledged set), then one
/// `multiple` ack over the settled run from the oldest outstanding tag
/// (which then covers exactly the run's acks), then single acks after the
/// first unsettled tag.
fn take_ready_from(outstanding: &mut BTreeMap<u64, Option<Settle>>) -> Vec<Frame> {
    let mut nacks = Vec::new();
    let mut singles = Vec::new();
    let mut run_end = None;
    let mut in_run = true;
    for (&tag, settle) in outstanding.iter() {
        match settle {
            None => in_run = false,
            Some(Settle::Nack { requeue }) => nacks.push(Frame::Nack(tag, *requeue)),
            Some(Settle::Ack) if in_run => run_end = Some(tag),
            Some(Settle::Ack) => singles.push(Frame::Ack(tag, false)),
        }
    }
    outstanding.retain(|_, settle| settle.is_none());
    nacks
        .into_iter()
        .chain(run_end.map(|end| Frame::Ack(end, true)))
        .chain(singles)
        .collect()
}

/// One settle frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// `basic.ack` of a tag, `multiple` or not.
    Ack(u64, bool),
    /// `basic.nack` of one tag, requeueing or not.
    Nack(u64, bool),
}

/// Settles one consumer delivery through its channel's [`AckBatcher`].
pub(crate) struct BatchedAcker {
    batcher: Arc<AckBatcher>,
    tag: u64,
    /// Turns true when the delivery's connection is seen dead.
    dead: watch::Receiver<bool>,
}

impl BatchedAcker {
    fn settle(&self, settle: Settle) -> Result<(), BrokerError> {
        if *self.dead.borrow() || !self.batcher.channel.is_open() {
            return Err(BrokerError::AckFailed(
                "its channel or connection is closed (the broker redelivers it)".to_owned(),
            ));
        }
        if self.batcher.record(self.tag, settle) {
            Ok(())
        } else {
            Err(BrokerError::AckFailed(
                "already settled (the broker keeps the first settlement)".to_owned(),
            ))
        }
    }
}

impl Drop for BatchedAcker {
    /// An unsettled delivery goes back to its queue (as with the embedded broker).
    fn drop(&mut self) {
        // False once settled, which is what should happen.
        self.batcher
            .record(self.tag, Settle::Nack { requeue: true });
    }
}

impl AckHandle for BatchedAcker {
    fn ack(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        let result = self.settle(Settle::Ack);
        Box::pin(std::future::ready(result))
    }

    fn nack(&self, requeue: bool) -> BoxFuture<'_, Result<(), BrokerError>> {
        let result = self.settle(Settle::Nack { requeue });
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batching rule alone, on a batcher's map (no channel needed).
    fn ready(entries: &[(u64, Option<Settle>)]) -> (Vec<Frame>, Vec<u64>) {
        let mut map: BTreeMap<u64, Option<Settle>> = entries.iter().copied().collect();
        let frames = take_ready_from(&mut map);
        (frames, map.keys().copied().collect())
    }

    use Settle::{Ack, Nack};

    #[test]
    fn a_settled_run_is_one_multiple_ack_and_later_acks_do_not_wait() {
        let (frames, left) = ready(&[
            (1, Some(Ack)),
            (2, Some(Ack)),
            (3, None),
            (4, Some(Ack)),
            (5, Some(Nack { requeue: true })),
        ]);
        assert_eq!(
            frames,
            vec![
                Frame::Nack(5, true),
                Frame::Ack(2, true),
                Frame::Ack(4, false)
            ]
        );
        assert_eq!(left, vec![3]);
    }

    #[test]
    fn nacks_inside_the_run_go_first_so_the_multiple_ack_skips_them() {
        let (frames, left) = ready(&[
            (7, Some(Ack)),
            (8, Some(Nack { requeue: false })),
            (9, Some(Ack)),
        ]);
        assert_eq!(frames, vec![Frame::Nack(8, false), Frame::Ack(9, true)]);
        assert!(left.is_empty());
    }

    #[test]
    fn nothing_settled_sends_nothing() {
        let (frames, left) = ready(&[(1, None), (2, None)]);
        assert!(frames.is_empty());
        assert_eq!(left, vec![1, 2]);
    }
}
