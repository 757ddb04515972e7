//! Settling a consumer channel's deliveries in batches.
//!
//! Awaiting every ack is a round trip to lapin's I/O thread, the larger part
//! of a consumed message's CPU. Instead a delivery's ack or nack is recorded
//! here and one flusher task per consumer channel sends what was recorded,
//! at once and in the order the calls were made: a run of settled tags from
//! the oldest unsettled one is acknowledged with one `basic.ack`
//! (`multiple`), the rest one frame each. A handler still running never holds
//! back the acks of deliveries after it (nothing waits for a run to complete),
//! so a slow message never fills the prefetch window with finished ones.
//!
//! An ack is recorded only once its caller settled the delivery (the typed
//! consumer: after its handler returned `Ok`), and the broker reads it in the
//! channel's order; if the connection dies before it is sent, the broker
//! redelivers the message, as it would after any loss.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::{Notify, watch};

use crate::broker::{AckHandle, BoxFuture, BrokerError};

/// How a delivery was settled, waiting to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Nack { requeue: bool },
}

/// The deliveries of one consumer channel, by delivery tag.
pub(crate) struct AckBatcher {
    channel: Channel,
    /// Delivered and not yet sent: `None` while unsettled.
    outstanding: Mutex<BTreeMap<u64, Option<Settle>>>,
    recorded: Notify,
    /// Held while frames taken out of `outstanding` are being sent, so that a
    /// flush returns only after whatever an earlier flush took went out
    /// (closing the channel in between would put acked messages back).
    sending: tokio::sync::Mutex<()>,
    /// The consumer's [`Batching`] and the unsettled deliveries' ackers: the
    /// flusher ends once none is left (each lets go, then wakes it).
    holders: AtomicUsize,
}

impl AckBatcher {
    /// A batcher for `channel`, with its flusher task running, held by the returned handle.
    pub(crate) fn start(channel: Channel) -> Batching {
        let batcher = Arc::new(AckBatcher {
            channel,
            outstanding: Mutex::new(BTreeMap::new()),
            recorded: Notify::new(),
            sending: tokio::sync::Mutex::new(()),
            holders: AtomicUsize::new(1),
        });
        tokio::spawn(flush_until_unused(batcher.clone()));
        Batching(batcher)
    }

    /// Counts one holder less, then wakes the flusher (in that order, so that it sees the count).
    fn let_go(&self) {
        self.holders.fetch_sub(1, Ordering::SeqCst);
        self.recorded.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Option<Settle>>> {
        self.outstanding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `settle` for `tag`; false when it was settled already (or never delivered here).
    fn record(&self, tag: u64, settle: Settle) -> bool {
        let recorded = match self.lock().get_mut(&tag) {
            Some(slot @ None) => {
                *slot = Some(settle);
                true
            }
            _ => false,
        };
        if recorded {
            self.recorded.notify_one();
        }
        recorded
    }

    /// Sends what was recorded so far and waits for lapin to write it, and
    /// for what another flush (the flusher task's) took before.
    async fn flush(&self) {
        let _turn = self.sending.lock().await;
        let frames = self.take_ready();
        if !frames.is_empty() {
            self.send(frames).await;
        }
    }

    /// Takes what is ready to send; see [`take_ready_from`].
    fn take_ready(&self) -> Vec<Frame> {
        take_ready_from(&mut self.lock())
    }

    /// Sends `frames` on the channel, in order, and waits for lapin to write them.
    async fn send(&self, frames: Vec<Frame>) {
        let sends = frames.into_iter().map(|frame| {
            let channel = &self.channel;
            async move {
                let result = match frame {
                    Frame::Ack(tag, multiple) => {
                        channel.basic_ack(tag, BasicAckOptions { multiple }).await
                    }
                    Frame::Nack(tag, requeue) => {
                        channel
                            .basic_nack(
                                tag,
                                BasicNackOptions {
                                    multiple: false,
                                    requeue,
                                },
                            )
                            .await
                    }
                };
                if let Err(error) = result {
                    // The broker redelivers what it did not see settled.
                    tracing::debug!(%error, ?frame, "settling consumer deliveries failed");
                }
            }
        });
        // join_all polls them in order: the frames are queued in that order.
        futures_util::future::join_all(sends).await;
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

/// Sends recorded settlements until neither the consumer nor a delivery holds the batcher.
async fn flush_until_unused(batcher: Arc<AckBatcher>) {
    loop {
        batcher.recorded.notified().await;
        // Let the handlers that finished together record theirs too.
        tokio::task::yield_now().await;
        batcher.flush().await;
        if batcher.holders.load(Ordering::SeqCst) == 0 {
            batcher.flush().await;
            return;
        }
    }
}

/// A consumer's hold on its channel's [`AckBatcher`]: records deliveries and
/// makes their ackers; dropping it lets the flusher end once the deliveries are settled.
pub(crate) struct Batching(Arc<AckBatcher>);

impl Batching {
    /// Records a delivery handed out (tags grow on a channel) and returns its acker.
    pub(crate) fn delivered(&self, tag: u64, dead: watch::Receiver<bool>) -> BatchedAcker {
        self.0.lock().insert(tag, None);
        self.0.holders.fetch_add(1, Ordering::SeqCst);
        BatchedAcker {
            batcher: self.0.clone(),
            tag,
            dead,
        }
    }

    /// Sends what was recorded so far and waits for lapin to write it:
    /// before the channel is closed, which would requeue what was acked.
    pub(crate) async fn flush(&self) {
        self.0.flush().await;
    }
}

impl Drop for Batching {
    fn drop(&mut self) {
        self.0.let_go();
    }
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
        if *self.dead.borrow() || !self.batcher.channel.status().connected() {
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
        self.batcher
            .record(self.tag, Settle::Nack { requeue: true });
        self.batcher.let_go();
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
