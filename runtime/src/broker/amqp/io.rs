//! The two tasks every connection of this module runs on the tokio runtime:
//! a writer that sends whatever was queued since its last write in one write
//! (and heartbeats when idle), and a reader that hands each frame to the
//! connection and leaves a broker silent for two heartbeat intervals.

use std::sync::Arc;
use std::time::Duration;

use futures_util::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::raw::RawIo;
use super::wire::FrameRef;

const HEARTBEAT_FRAME: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, 0xCE];

/// A write buffer larger than this is not kept for the next batch.
const WRITE_BUFFER_KEPT: usize = 1 << 20;

/// How long the last words of a dead connection may take to write.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the I/O tasks need of a connection.
pub(crate) trait Wired: Send + Sync + 'static {
    /// Where the connection goes (for messages).
    fn endpoint(&self) -> String;
    /// Wakes the writer: frames were queued, or the connection died.
    fn writer_wake(&self) -> &Notify;
    /// Turns true once the connection died.
    fn dead_signal(&self) -> watch::Receiver<bool>;
    /// Swaps the queued bytes into `batch` (empty); false once the connection is dead.
    fn take_queued(&self, batch: &mut Vec<u8>) -> bool;
    /// Marks the connection dead (once), telling everyone waiting on it.
    fn die(&self, reason: String);
    /// What to write once the connection died, after everything written
    /// before (the `connection.close-ok` answering the broker's close).
    fn farewell(&self) -> Option<Vec<u8>> {
        None
    }
    /// Handles one frame from the broker; `Err` ends the connection.
    fn handle(&self, frame: FrameRef<'_>) -> Result<(), String>;
    /// A moment by which the connection must have heard something it waits
    /// for, and what to say if it has not (besides heartbeats).
    fn deadline(&self) -> Option<(Instant, String)> {
        None
    }
}

/// Starts the writer and the reader of `connection` over `io`; `buffer`
/// holds bytes read past the handshake.
pub(crate) fn spawn<C: Wired>(
    connection: &Arc<C>,
    io: Box<dyn RawIo>,
    buffer: Vec<u8>,
    frame_max: u32,
    heartbeat: Duration,
) {
    let (reader, writer) = io.split();
    tokio::spawn(write_loop(connection.clone(), writer, heartbeat));
    tokio::spawn(read_loop(
        connection.clone(),
        reader,
        buffer,
        frame_max,
        heartbeat,
    ));
}

/// Sends what was queued: everything since the last write, in one write.
async fn write_loop<C: Wired>(
    connection: Arc<C>,
    mut writer: WriteHalf<Box<dyn RawIo>>,
    heartbeat: Duration,
) {
    let mut batch = Vec::new();
    let mut dead = connection.dead_signal();
    // Heartbeats at half the negotiated interval, when nothing else was sent.
    let idle = (!heartbeat.is_zero()).then(|| heartbeat / 2);
    // Whether the stream ends on a whole frame, for a farewell to follow.
    let mut whole = true;
    loop {
        let woken = match idle {
            Some(idle) => tokio::time::timeout(idle, connection.writer_wake().notified())
                .await
                .is_ok(),
            None => {
                connection.writer_wake().notified().await;
                true
            }
        };
        if !connection.take_queued(&mut batch) {
            break;
        }
        if batch.is_empty() {
            if woken {
                continue;
            }
            batch.extend_from_slice(&HEARTBEAT_FRAME);
        }
        let written = async {
            writer.write_all(&batch).await?;
            writer.flush().await
        };
        // A write stuck on a peer that stopped reading ends when the reader
        // declares the connection dead (silence), not when TCP gives up.
        let written = tokio::select! {
            written = written => written,
            _ = dead.wait_for(|dead| *dead) => {
                whole = false;
                break;
            }
        };
        if let Err(error) = written {
            connection.die(format!("writing to {}: {error}", connection.endpoint()));
            whole = false;
            break;
        }
        batch.clear();
        if batch.capacity() > WRITE_BUFFER_KEPT {
            batch = Vec::new();
        }
    }
    if whole && let Some(farewell) = connection.farewell() {
        let written = async {
            writer.write_all(&farewell).await?;
            writer.flush().await
        };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, written).await;
    }
    let _ = writer.close().await;
}

/// Reads the broker's frames until the connection ends, goes silent longer
/// than two heartbeat intervals, or misses its [`deadline`](Wired::deadline).
async fn read_loop<C: Wired>(
    connection: Arc<C>,
    mut reader: ReadHalf<Box<dyn RawIo>>,
    mut buffer: Vec<u8>,
    frame_max: u32,
    heartbeat: Duration,
) {
    let endpoint = connection.endpoint();
    let silence = (!heartbeat.is_zero()).then(|| heartbeat * 2);
    let mut chunk = vec![0; 64 * 1024];
    let mut dead = connection.dead_signal();
    let reason = 'connection: loop {
        let mut start = 0;
        loop {
            match FrameRef::parse(&buffer[start..], frame_max) {
                Ok(Some((frame, used))) => {
                    start += used;
                    if let Err(reason) = connection.handle(frame) {
                        break 'connection reason;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    break 'connection format!("malformed frame from {endpoint}: {error}");
                }
            }
        }
        buffer.drain(..start);
        let now = Instant::now();
        let silent_at = silence.map(|silence| (now + silence, silence));
        let deadline = connection.deadline();
        let wake_at = silent_at
            .map(|(at, _)| at)
            .into_iter()
            .chain(deadline.as_ref().map(|(at, _)| *at))
            .min();
        let read = async {
            match wake_at {
                Some(at) => tokio::time::timeout_at(at, reader.read(&mut chunk))
                    .await
                    .ok(),
                None => Some(reader.read(&mut chunk).await),
            }
        };
        // A connection that died elsewhere (the writer failed) stops reading too.
        let read = tokio::select! {
            read = read => read,
            _ = dead.wait_for(|dead| *dead) => return,
        };
        match read {
            Some(Ok(0)) => break format!("{endpoint} closed the connection"),
            Some(Ok(read)) => buffer.extend_from_slice(&chunk[..read]),
            Some(Err(error)) => break format!("reading from {endpoint}: {error}"),
            None => {
                let now = Instant::now();
                if let Some((at, what)) = connection.deadline()
                    && now >= at
                {
                    break what;
                }
                if let Some((at, silence)) = silent_at
                    && now >= at
                {
                    break format!("no heartbeat from {endpoint} for {silence:?}");
                }
            }
        }
    };
    connection.die(reason);
}
