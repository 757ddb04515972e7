//! The two tasks every connection of this module runs on the tokio runtime:
//! a writer that sends whatever was queued since its last write in one write
//! (and heartbeats when idle), and a reader that hands each frame to the
//! connection, runs the connection's timers, and leaves a broker silent for
//! two heartbeat intervals. Both connections run on them: the main one
//! ([`conn`](super::conn)) and the publishing one ([`pipe`](super::pipe)).

use std::sync::Arc;
use std::time::Duration;

use futures_util::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::raw::RawIo;
use super::wire::{FRAME_METHOD, FrameRef, Reader, Writer, encode_frame_into};

const CONNECTION: u16 = 10;

const HEARTBEAT_FRAME: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, 0xCE];

/// A write buffer larger than this is not kept for the next batch.
const WRITE_BUFFER_KEPT: usize = 1 << 20;

/// How long the last words of a dead connection may take to write (and the
/// batch it died writing, to finish first).
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the I/O tasks need of a connection.
pub(crate) trait Wired: Send + Sync + 'static {
    /// The writer's own scratch space, kept from one batch to the next
    /// ([`take_queued`](Self::take_queued)), so batches allocate nothing.
    type WriterScratch: Default + Send + 'static;
    /// The reader's own scratch space, kept from one frame to the next
    /// ([`handle`](Self::handle)).
    type ReaderScratch: Default + Send + 'static;
    /// Where the connection goes (for messages).
    fn endpoint(&self) -> String;
    /// Wakes the writer: frames were queued, or the connection died.
    fn writer_wake(&self) -> &Notify;
    /// Turns true once the connection died.
    fn dead_signal(&self) -> watch::Receiver<bool>;
    /// Puts what is queued into `batch` (empty; swapped or encoded into);
    /// false once the connection is dead. Whoever queues wakes the writer
    /// (the writer takes again after each write before it waits).
    fn take_queued(&self, batch: &mut Vec<u8>, scratch: &mut Self::WriterScratch) -> bool;
    /// Marks the connection dead (once), telling everyone waiting on it.
    fn die(&self, reason: String);
    /// What to write once the connection died, after everything written
    /// before (the `connection.close-ok` answering the broker's close).
    fn farewell(&self) -> Option<Vec<u8>> {
        None
    }
    /// Handles one frame from the broker; `Err` ends the connection.
    fn handle(&self, frame: FrameRef<'_>, scratch: &mut Self::ReaderScratch) -> Result<(), String>;
    /// Runs the connection's timers at `now` (after every wake-up of the
    /// reader: a reader busy with frames may never time out its read).
    /// `wake_at` is when the reader wakes by itself otherwise (to check for
    /// silence); returns when it must wake instead (no later), or `Err` to
    /// end the connection (something it waited for did not come in time).
    fn timers(&self, now: Instant, wake_at: Option<Instant>) -> Result<Option<Instant>, String> {
        let _ = now;
        Ok(wake_at)
    }
    /// Wakes the reader to run [`timers`](Self::timers) again (one is due
    /// earlier than it planned for), if the connection has such timers.
    fn reader_wake(&self) -> Option<&Notify> {
        None
    }
}

/// What the broker's `connection.close` (its arguments in `args`) leaves:
/// the `connection.close-ok` to write as the [farewell](Wired::farewell)
/// (the broker ignores anything else now, and waits for it), and why the
/// connection died. Lenient: a close is answered however it is garbled.
pub(crate) fn closed_by_broker(mut args: Reader<'_>) -> (Vec<u8>, String) {
    let code = args.u16("reply code").unwrap_or(0);
    let text = args
        .short("reply text")
        .map(|text| String::from_utf8_lossy(text).into_owned())
        .unwrap_or_default();
    let mut close_ok = Vec::new();
    encode_frame_into(
        &mut close_ok,
        FRAME_METHOD,
        0,
        &Writer::method(CONNECTION, 51).0,
    );
    (
        close_ok,
        format!("the broker closed the connection: {code} {text}"),
    )
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

/// Sends what was queued: everything since the last write, in one write
/// (or as much as the connection puts in a batch).
async fn write_loop<C: Wired>(
    connection: Arc<C>,
    mut writer: WriteHalf<Box<dyn RawIo>>,
    heartbeat: Duration,
) {
    let mut batch = Vec::new();
    let mut scratch = C::WriterScratch::default();
    let mut dead = connection.dead_signal();
    // Heartbeats at half the negotiated interval, when nothing else was sent.
    let idle = (!heartbeat.is_zero()).then(|| heartbeat / 2);
    // Whether the writer waited a whole idle interval for nothing.
    let mut quiet = false;
    // What to write last, once the connection died with the stream on a
    // whole frame (never after a failed or abandoned write).
    let mut farewell = None;
    loop {
        // Taken before waiting: what was queued during the last write may
        // not have woken the writer (a connection may wake it only when idle).
        if !connection.take_queued(&mut batch, &mut scratch) {
            farewell = connection.farewell();
            break;
        }
        if batch.is_empty() {
            if !quiet {
                quiet = match idle {
                    Some(idle) => tokio::time::timeout(idle, connection.writer_wake().notified())
                        .await
                        .is_err(),
                    None => {
                        connection.writer_wake().notified().await;
                        false
                    }
                };
                continue;
            }
            batch.extend_from_slice(&HEARTBEAT_FRAME);
        }
        quiet = false;
        let mut writing = std::pin::pin!(async {
            writer.write_all(&batch).await?;
            writer.flush().await
        });
        // A write stuck on a peer that stopped reading ends when the reader
        // declares the connection dead (silence), not when TCP gives up.
        let written = tokio::select! {
            written = &mut writing => Some(written),
            _ = dead.wait_for(|dead| *dead) => None,
        };
        let Some(written) = written else {
            // Died mid-write. A broker that closed the connection reads on
            // until its close-ok: the batch is finished (briefly) for the
            // close-ok to follow on a whole frame.
            if let Some(last) = connection.farewell()
                && let Ok(Ok(())) = tokio::time::timeout(FAREWELL_TIMEOUT, writing).await
            {
                farewell = Some(last);
            }
            break;
        };
        if let Err(error) = written {
            connection.die(format!("writing to {}: {error}", connection.endpoint()));
            break;
        }
        batch.clear();
        if batch.capacity() > WRITE_BUFFER_KEPT {
            batch = Vec::new();
        }
    }
    if let Some(farewell) = farewell {
        let written = async {
            writer.write_all(&farewell).await?;
            writer.flush().await
        };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, written).await;
    }
    let _ = writer.close().await;
}

/// Reads the broker's frames until the connection ends, goes silent longer
/// than two heartbeat intervals since it was last heard, or a
/// [timer](Wired::timers) ends it; runs the timers after every wake-up.
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
    let mut scratch = C::ReaderScratch::default();
    let mut dead = connection.dead_signal();
    // When the broker was last heard: silence counts from there, not from
    // whatever else woke the reader (timers, frames handled slowly).
    let mut heard = Instant::now();
    let reason = 'connection: loop {
        let mut start = 0;
        loop {
            match FrameRef::parse(&buffer[start..], frame_max) {
                Ok(Some((frame, used))) => {
                    start += used;
                    if let Err(reason) = connection.handle(frame, &mut scratch) {
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
        let silent_at = silence.map(|silence| heard + silence);
        if let (Some(at), Some(silence)) = (silent_at, silence)
            && now >= at
        {
            break format!("no heartbeat from {endpoint} for {silence:?}");
        }
        let wake_at = match connection.timers(now, silent_at) {
            Ok(wake_at) => wake_at,
            Err(reason) => break reason,
        };
        let read = async {
            match wake_at {
                Some(at) => tokio::time::timeout_at(at, reader.read(&mut chunk))
                    .await
                    .ok(),
                None => Some(reader.read(&mut chunk).await),
            }
        };
        let rewake = async {
            match connection.reader_wake() {
                Some(wake) => wake.notified().await,
                None => std::future::pending().await,
            }
        };
        // A connection that died elsewhere (the writer failed) stops reading
        // too. A timer's wake-up (`None`) or an earlier one asked for just
        // goes round again.
        let read = tokio::select! {
            read = read => read,
            () = rewake => None,
            _ = dead.wait_for(|dead| *dead) => return,
        };
        match read {
            Some(Ok(0)) => break format!("{endpoint} closed the connection"),
            Some(Ok(read)) => {
                heard = Instant::now();
                buffer.extend_from_slice(&chunk[..read]);
            }
            Some(Err(error)) => break format!("reading from {endpoint}: {error}"),
            None => {}
        }
    };
    connection.die(reason);
}
