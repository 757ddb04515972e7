//! The machinery shared by [`Consumer`](super::Consumer), the queue handler
//! and the job workers: a start/stop/wait lifecycle around a loop that takes
//! deliveries from one queue and hands each to a task, with a bounded number
//! in flight, resubscribing with backoff when the broker's stream ends.

use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{Semaphore, watch};

use crate::broker::{BoxFuture, Broker, BrokerError, Delivery, DeliveryStream};

/// Where a runner is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not consuming.
    Idle,
    /// Consuming.
    Running,
    /// Asked to stop: no new deliveries are taken; in-flight work finishes.
    Stopping,
}

/// The runner is not running, so it cannot be stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotRunning;

/// Tells in-flight work that it must give up now (the drain deadline passed):
/// it settles its delivery by returning it to the queue.
#[derive(Clone)]
pub(crate) struct Interrupt(watch::Receiver<bool>);

impl Interrupt {
    /// Resolves once work must be given up; never, if that does not happen.
    pub(crate) async fn interrupted(&mut self) {
        if self.0.wait_for(|abort| *abort).await.is_err() {
            // The runner is gone without interrupting: never resolve.
            std::future::pending::<()>().await;
        }
    }
}

/// What a runner does with its queue: (re)declares it, and processes deliveries.
pub(crate) trait Dispatch: Send + Sync + 'static {
    /// Declares the queue and whatever it needs (exchanges, bindings,
    /// dead-letter queue) and returns the queue's name. Called on every
    /// start and every resubscription, so it must be idempotent.
    fn prepare(&self) -> BoxFuture<'_, Result<String, BrokerError>>;

    /// Processes one delivery and settles it (ack or nack) exactly once.
    /// When `interrupt` fires it must stop and return the delivery to the queue.
    fn process(self: Arc<Self>, delivery: Delivery, interrupt: Interrupt)
    -> BoxFuture<'static, ()>;
}

/// How a runner consumes.
#[derive(Debug, Clone)]
pub(crate) struct RunnerConfig {
    /// Unacknowledged deliveries the broker may push ahead (AMQP prefetch).
    pub(crate) prefetch: u16,
    /// Deliveries processed at once.
    pub(crate) max_in_flight: usize,
    /// How long [`Runner::stop`] lets in-flight work finish before interrupting
    /// it; `None` waits for as long as it takes.
    pub(crate) drain_timeout: Option<Duration>,
    /// First wait before resubscribing after the stream ended.
    pub(crate) reconnect_initial: Duration,
    /// Longest wait between resubscription attempts.
    pub(crate) reconnect_max: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            prefetch: 5,
            max_in_flight: 5,
            drain_timeout: None,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

/// A lifecycle (start, stop, wait) around a consuming loop.
pub(crate) struct Runner<B: Broker, D: Dispatch> {
    broker: B,
    dispatch: Arc<D>,
    config: RunnerConfig,
    phase: watch::Sender<Phase>,
    /// Serializes `start` calls, which declare things on the broker.
    start_lock: tokio::sync::Mutex<()>,
    /// The queue consumed by the current (or last) run.
    queue: Mutex<Option<String>>,
}

/// A runner as its owner (a consumer, a queue handler, job workers) holds
/// it: dropping the owner stops the runner. In-flight work still finishes in
/// the background, since the consuming loop holds a reference of its own.
pub(crate) struct OwnedRunner<B: Broker, D: Dispatch>(Arc<Runner<B, D>>);

impl<B: Broker, D: Dispatch> Deref for OwnedRunner<B, D> {
    type Target = Arc<Runner<B, D>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<B: Broker, D: Dispatch> Drop for OwnedRunner<B, D> {
    fn drop(&mut self) {
        // Not running is fine: there is nothing to stop.
        let _ = self.0.stop();
    }
}

impl<B: Broker, D: Dispatch> Runner<B, D> {
    /// An idle runner, owned by the caller (see [`OwnedRunner`]).
    pub(crate) fn owned(broker: B, dispatch: Arc<D>, config: RunnerConfig) -> OwnedRunner<B, D> {
        OwnedRunner(Arc::new(Runner {
            broker,
            dispatch,
            config,
            phase: watch::Sender::new(Phase::Idle),
            start_lock: tokio::sync::Mutex::new(()),
            queue: Mutex::new(None),
        }))
    }

    /// The dispatcher.
    pub(crate) fn dispatch(&self) -> &Arc<D> {
        &self.dispatch
    }

    /// The queue consumed by the current or last run, if it ever started.
    pub(crate) fn queue_name(&self) -> Option<String> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Whether the runner is running (started and not asked to stop).
    pub(crate) fn is_running(&self) -> bool {
        *self.phase.borrow() == Phase::Running
    }

    /// Declares and starts consuming; returns once deliveries flow.
    /// Does nothing if already running; waits for a stop in progress to finish first.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), BrokerError> {
        let _starting = self.start_lock.lock().await;
        let mut phases = self.phase.subscribe();
        match *phases.borrow_and_update() {
            Phase::Running => return Ok(()),
            Phase::Stopping | Phase::Idle => {}
        }
        // Only the run loop moves Stopping to Idle; it needs no lock to do so.
        let _ = phases.wait_for(|phase| *phase == Phase::Idle).await;
        let (queue, stream) = self.subscribe().await?;
        *self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(queue.clone());
        self.phase.send_replace(Phase::Running);
        tracing::info!(queue = %queue, "consuming");
        tokio::spawn(Arc::clone(self).run(queue, stream));
        Ok(())
    }

    /// Asks a running runner to stop; [`wait`](Self::wait) tells when it has.
    pub(crate) fn stop(&self) -> Result<(), NotRunning> {
        let mut stopped = false;
        self.phase.send_if_modified(|phase| {
            if *phase == Phase::Running {
                *phase = Phase::Stopping;
                stopped = true;
            }
            stopped
        });
        if stopped { Ok(()) } else { Err(NotRunning) }
    }

    /// Resolves once the runner is not running (at once if it never started).
    pub(crate) async fn wait(&self) {
        let mut phases = self.phase.subscribe();
        // The sender lives in `self`, so this cannot fail while we borrow it.
        let _ = phases.wait_for(|phase| *phase == Phase::Idle).await;
    }

    async fn subscribe(&self) -> Result<(String, DeliveryStream), BrokerError> {
        let queue = self.dispatch.prepare().await?;
        let stream = self.broker.consume(&queue, self.config.prefetch).await?;
        Ok((queue, stream))
    }

    async fn run(self: Arc<Self>, queue: String, stream: DeliveryStream) {
        let permits = self.config.max_in_flight.max(1);
        let slots = Arc::new(Semaphore::new(permits));
        let (interrupt_tx, interrupt_rx) = watch::channel(false);
        let mut phases = self.phase.subscribe();
        let mut stream = Some(stream);
        // Shared with each delivery's work, for its logs.
        let mut queue: Arc<str> = Arc::from(queue);
        'taking: loop {
            let Some(current) = stream.as_mut() else {
                // Resubscribe with backoff until it works or we are told to stop.
                let mut delay = self.config.reconnect_initial;
                loop {
                    tokio::select! {
                        biased;
                        _ = stop_requested(&mut phases) => break 'taking,
                        () = tokio::time::sleep(delay) => {}
                    }
                    match self.subscribe().await {
                        Ok((name, fresh)) => {
                            tracing::info!(queue = %name, "resubscribed");
                            queue = Arc::from(name.as_str());
                            *self
                                .queue
                                .lock()
                                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(name);
                            stream = Some(fresh);
                            continue 'taking;
                        }
                        Err(error) => {
                            tracing::warn!(queue = %queue, %error, retry_in = ?delay, "resubscribing failed");
                            delay = delay.saturating_mul(2).min(self.config.reconnect_max);
                        }
                    }
                }
            };
            // Take a slot before a delivery, so that a delivery is only taken
            // off the stream when it can be processed at once.
            let slot = tokio::select! {
                biased;
                _ = stop_requested(&mut phases) => break,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    // The semaphore is never closed.
                    Err(_) => break,
                },
            };
            let next = tokio::select! {
                biased;
                _ = stop_requested(&mut phases) => break,
                next = current.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let dispatch = Arc::clone(&self.dispatch);
                    let interrupt = Interrupt(interrupt_rx.clone());
                    let queue = Arc::clone(&queue);
                    let mut work = Box::pin(async move {
                        // Handlers' panics are caught where they are called;
                        // this is a net for the rest: whatever panics here
                        // must not take the consuming loop (or a slot) with it.
                        let work = async move { dispatch.process(delivery, interrupt).await };
                        let processed = AssertUnwindSafe(work).catch_unwind().await;
                        drop(slot);
                        if processed.is_err() {
                            tracing::error!(%queue, "processing a delivery panicked; it goes back to its queue");
                        }
                    });
                    // A handler that does not wait finishes in this first
                    // poll, here: no task to spawn, and no other thread to
                    // wake (which costs more than such a handler). One that
                    // waits goes on in a task of its own.
                    if futures_util::poll!(&mut work).is_pending() {
                        tokio::spawn(work);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(queue = %queue, %error, "delivery stream failed; resubscribing");
                    stream = None;
                }
                None => {
                    tracing::warn!(queue = %queue, "delivery stream ended; resubscribing");
                    stream = None;
                }
            }
        }
        // Drain: every slot back means no work is in flight. The stream stays
        // open meanwhile, so in-flight deliveries can still be acknowledged.
        let all = u32::try_from(permits).unwrap_or(u32::MAX);
        let drained = match self.config.drain_timeout {
            None => slots.acquire_many(all).await.is_ok(),
            Some(limit) => tokio::time::timeout(limit, slots.acquire_many(all))
                .await
                .is_ok(),
        };
        if !drained {
            tracing::warn!(queue = %queue, "in-flight work did not finish in time; interrupting it");
            interrupt_tx.send_replace(true);
            let _ = slots.acquire_many(all).await;
        }
        // Deliveries the broker pushed ahead but nobody took go back to the queue.
        drop(stream);
        tracing::info!(queue = %queue, "stopped consuming");
        self.phase.send_replace(Phase::Idle);
    }
}

/// Resolves once a stop was asked for.
async fn stop_requested(phases: &mut watch::Receiver<Phase>) {
    if phases
        .wait_for(|phase| *phase != Phase::Running)
        .await
        .is_err()
    {
        // The runner (holding the sender) is gone: nothing will ever ask.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::{OutgoingMessage, QueueOptions};

    /// Panics on the first delivery of a body `panic` (dropping it, which
    /// requeues it), handles the rest.
    struct Fragile {
        broker: MemoryBroker,
        handled: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    }

    impl Dispatch for Fragile {
        fn prepare(&self) -> BoxFuture<'_, Result<String, BrokerError>> {
            Box::pin(async {
                self.broker
                    .declare_queue("fragile", QueueOptions::default())
                    .await
            })
        }

        fn process(
            self: Arc<Self>,
            delivery: Delivery,
            _interrupt: Interrupt,
        ) -> BoxFuture<'static, ()> {
            assert!(
                delivery.body != b"panic" || delivery.redelivered,
                "a bug in processing"
            );
            Box::pin(async move {
                let _ = self.handled.send(delivery.body.clone());
                let _ = delivery.ack().await;
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_while_processing_does_not_stop_the_runner() {
        let broker = MemoryBroker::new();
        let (handled, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let dispatch = Arc::new(Fragile {
            broker: broker.clone(),
            handled,
        });
        let config = RunnerConfig {
            max_in_flight: 1,
            ..RunnerConfig::default()
        };
        let runner = Runner::owned(broker.clone(), dispatch, config);
        runner.start().await.unwrap();
        for body in ["panic", "after"] {
            let message = OutgoingMessage {
                body: body.as_bytes().to_vec(),
                ..OutgoingMessage::default()
            };
            broker.publish("", "fragile", message).await.unwrap();
        }
        let mut handled = Vec::new();
        while handled.len() < 2 {
            let body = tokio::time::timeout(Duration::from_secs(10), seen.recv())
                .await
                .expect("both deliveries handled after the panic")
                .expect("the dispatcher lives");
            handled.push(String::from_utf8(body).unwrap());
        }
        handled.sort();
        assert_eq!(handled, ["after", "panic"], "the panicking one came back");
        assert!(runner.is_running());
        runner.stop().unwrap();
        tokio::time::timeout(Duration::from_secs(10), runner.wait())
            .await
            .expect("the runner stops: every slot came back");
    }
}
