//! The transmission phase: one reader, a task per request, one writer.
//!
//! ```text
//!   socket ─► reader ──spawn──► request task ─► backend
//!                │                   │
//!                └── early replies ──┴──► mpsc ──► writer ─► socket
//! ```
//!
//! * The reader parses headers and WRITE payloads in order (the stream is
//!   only self-delimiting if every payload is consumed), checks each
//!   request with [`request::plan`], and starts the backend work: polled
//!   once inline, and spawned as its own task only if it has to wait
//!   (see [`run_inline_or_spawn`]).
//! * Requests run concurrently and reply out of order, as NBD allows. Two
//!   semaphores bound them: a request count and a payload byte budget. The
//!   reader waits for a permit before reading more, which is the
//!   backpressure the client sees.
//! * Only the writer touches the write half, so a reply's header and data
//!   can never interleave with another reply. It batches every reply that
//!   is already queued into as few writes as possible and flushes only when
//!   the queue is empty.
//! * Shutdown: on `NBD_CMD_DISC`, EOF or a protocol error the reader stops;
//!   the writer ends once every in-flight task has sent its reply (each
//!   task holds a sender clone), so outstanding requests complete first, as
//!   the spec requires for DISC.

use std::future::Future;
use std::io::IoSlice;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::backend::BlockBackend;
use crate::config::ServerConfig;
use crate::error::NbdError;
use crate::pool::{BufferPool, PooledBuf};
use crate::request::{self, Action, ExportLimits, Plan};
use crate::wire;

/// Replies whose data is at most this big are copied into the staging
/// buffer, so many small READ replies leave in one `write`. Larger data is
/// written straight from its buffer with a vectored write.
const INLINE_REPLY_DATA_BYTES: usize = 16 * 1024;
/// The staging buffer is written out once it holds this much, even if more
/// replies are queued, to bound latency and memory.
const STAGING_FLUSH_BYTES: usize = 256 * 1024;
/// Extra reply-queue slots beyond the in-flight limit, for replies the
/// reader sends itself (errors, zero-length requests).
const REPLY_QUEUE_SLACK: usize = 16;

/// One simple reply on its way to the writer.
struct Reply {
    cookie: u64,
    errno: u32,
    /// READ data; present only when `errno == 0`.
    data: Option<PooledBuf>,
    /// Released once the data has been written, not when the backend is
    /// done: queued READ data is still memory the connection holds.
    _budget: Option<OwnedSemaphorePermit>,
}

impl Reply {
    fn status(cookie: u64, errno: u32) -> Self {
        Reply { cookie, errno, data: None, _budget: None }
    }
}

/// State shared by the reader and the request tasks of one connection.
struct Shared<B> {
    backend: Arc<B>,
    pool: BufferPool,
}

/// Serves requests until the client disconnects; returns once every
/// accepted request has been answered (or the socket failed).
pub(crate) async fn run<Rd, Wr, B>(
    reader: Rd,
    writer: Wr,
    backend: Arc<B>,
    size_bytes: u64,
    cfg: &ServerConfig,
) -> Result<(), NbdError>
where
    Rd: AsyncRead + Unpin,
    Wr: AsyncWrite + Unpin + Send + 'static,
    B: BlockBackend,
{
    let limits = ExportLimits {
        size_bytes,
        max_request_bytes: cfg.effective_max_request_bytes(),
        read_only: backend.is_read_only(),
    };
    let shared = Arc::new(Shared { backend, pool: BufferPool::default() });
    let max_inflight = cfg.effective_max_inflight();
    let (tx, rx) = mpsc::channel::<Reply>(max_inflight + REPLY_QUEUE_SLACK);
    let writer_task = tokio::spawn(write_replies(writer, rx, shared.clone()));

    let budget = Budget {
        requests: Arc::new(Semaphore::new(max_inflight)),
        bytes: Arc::new(Semaphore::new(cfg.effective_max_inflight_bytes())),
        max_bytes: cfg.effective_max_inflight_bytes(),
    };
    // Watches for the writer dying (client gone) while the reader is
    // blocked on a socket that may never deliver EOF. Dropped right after
    // the reader stops so the channel can close once tasks finish.
    let writer_watch = tx.clone();
    let read_result = tokio::select! {
        r = read_requests(reader, tx, &shared, &budget, &limits) => r,
        () = writer_watch.closed() => Ok(()),
    };
    drop(writer_watch);

    let write_result = match writer_task.await {
        Ok(r) => r,
        Err(e) => Err(NbdError::WriterStopped(e.to_string())),
    };
    // A reader error is the root cause (it stopped everything); otherwise
    // report what the writer saw.
    read_result.and(write_result)
}

/// Concurrency limits for one connection.
struct Budget {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

impl Budget {
    /// Byte permits for a payload of `len`, clamped so one request never
    /// waits for more than the whole budget (which would never come).
    async fn reserve_bytes(&self, len: u32) -> Option<OwnedSemaphorePermit> {
        let cap = u32::try_from(self.max_bytes).unwrap_or(u32::MAX);
        self.bytes.clone().acquire_many_owned(len.min(cap)).await.ok()
    }
}

enum HeaderRead {
    Header([u8; wire::REQUEST_HEADER_BYTES]),
    /// EOF exactly between requests: a client hanging up without DISC.
    Eof,
}

async fn read_header<Rd: AsyncRead + Unpin>(reader: &mut Rd) -> Result<HeaderRead, NbdError> {
    let mut buf = [0u8; wire::REQUEST_HEADER_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            return if filled == 0 { Ok(HeaderRead::Eof) } else { Err(NbdError::TruncatedRequest) };
        }
        filled += n;
    }
    Ok(HeaderRead::Header(buf))
}

async fn read_requests<Rd, B>(
    mut reader: Rd,
    tx: mpsc::Sender<Reply>,
    shared: &Arc<Shared<B>>,
    budget: &Budget,
    limits: &ExportLimits,
) -> Result<(), NbdError>
where
    Rd: AsyncRead + Unpin,
    B: BlockBackend,
{
    loop {
        let header = match read_header(&mut reader).await? {
            HeaderRead::Header(h) => h,
            HeaderRead::Eof => return Ok(()),
        };
        let req = wire::decode_request_header(&header).map_err(NbdError::BadRequestMagic)?;
        match request::plan(&req, limits) {
            Plan::Disconnect => return Ok(()),
            Plan::CloseTooLarge { length, max } => return Err(NbdError::RequestTooLarge { length, max }),
            Plan::Reply { errno, discard_payload_bytes } => {
                discard(&mut reader, discard_payload_bytes).await?;
                if errno != 0 {
                    tracing::debug!(?req, errno, "request rejected");
                }
                if tx.send(Reply::status(req.cookie, errno)).await.is_err() {
                    return Ok(()); // writer gone: the socket is dead
                }
            }
            Plan::Execute(action) => {
                let Ok(slot) = budget.requests.clone().acquire_owned().await else {
                    return Ok(()); // never closed; treat as shutdown
                };
                let (bytes, payload) = match action {
                    Action::Read { len, .. } => (budget.reserve_bytes(len).await, None),
                    Action::Write { len, .. } => {
                        let bytes = budget.reserve_bytes(len).await;
                        let mut buf = shared.pool.get(len as usize);
                        if let Err(e) = reader.read_exact(buf.as_mut_slice()).await {
                            shared.pool.put(buf);
                            return Err(match e.kind() {
                                std::io::ErrorKind::UnexpectedEof => NbdError::TruncatedRequest,
                                _ => NbdError::Io(e),
                            });
                        }
                        (bytes, Some(buf))
                    }
                    _ => (None, None),
                };
                let guard = ReplyGuard { tx: Some(tx.clone()), cookie: req.cookie };
                let shared = shared.clone();
                let task = async move {
                    let _slot = slot;
                    let reply = execute(&shared, req.cookie, action, payload, bytes).await;
                    guard.send(reply).await;
                };
                run_inline_or_spawn(task).await;
            }
        }
    }
}

/// Polls `task` once on the reader; only if it is not done at once is it
/// spawned to finish concurrently.
///
/// Why: a backend that answers from memory completes on the first poll,
/// and spawning it would cost a cross-thread wakeup per request (measured
/// with `bench.sh`: 4 KiB reads at queue depth 1 went from 0.66× to 1.5×
/// nbdkit's rate). A backend that has to wait returns
/// `Pending` and runs concurrently as before. This relies on backends not
/// blocking inside `poll`, which async code must not do anyway.
async fn run_inline_or_spawn<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut task = Box::pin(task);
    let first_poll = std::future::poll_fn(|cx| {
        // A panicking backend must cost one request (its `ReplyGuard`
        // answers EIO while unwinding), not the whole connection, just as
        // it would in a spawned task.
        Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(cx))))
    })
    .await;
    match first_poll {
        Ok(Poll::Ready(())) => {}
        // The waker registered above belongs to the reader; the spawned
        // task re-registers its own on its first poll.
        Ok(Poll::Pending) => drop(tokio::spawn(task)),
        Err(_) => tracing::warn!("backend panicked while starting a request; replied EIO"),
    }
}

/// Reads and drops `len` payload bytes of a rejected WRITE.
async fn discard<Rd: AsyncRead + Unpin>(reader: &mut Rd, len: u32) -> Result<(), NbdError> {
    if len == 0 {
        return Ok(());
    }
    let n = tokio::io::copy(&mut (&mut *reader).take(u64::from(len)), &mut tokio::io::sink()).await?;
    if n != u64::from(len) {
        return Err(NbdError::TruncatedRequest);
    }
    Ok(())
}

/// Makes sure every accepted request gets exactly one reply: if the task
/// dies before sending (a panicking backend), `Drop` answers `EIO` so the
/// client does not wait forever on that cookie.
struct ReplyGuard {
    tx: Option<mpsc::Sender<Reply>>,
    cookie: u64,
}

impl ReplyGuard {
    async fn send(mut self, reply: Reply) {
        if let Some(tx) = self.tx.take() {
            // Fails only when the writer is gone, i.e. the socket is dead.
            let _ = tx.send(reply).await;
        }
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            tracing::warn!(cookie = self.cookie, "request task ended without a reply; sending EIO");
            let _ = tx.try_send(Reply::status(self.cookie, wire::EIO));
        }
    }
}

async fn execute<B: BlockBackend>(
    shared: &Shared<B>,
    cookie: u64,
    action: Action,
    payload: Option<PooledBuf>,
    budget: Option<OwnedSemaphorePermit>,
) -> Reply {
    let backend = &*shared.backend;
    let result = match action {
        Action::Read { offset, len } => {
            let mut buf = shared.pool.get(len as usize);
            return match backend.read(offset, buf.as_mut_slice()).await {
                Ok(()) => Reply { cookie, errno: 0, data: Some(buf), _budget: budget },
                Err(e) => {
                    shared.pool.put(buf);
                    tracing::debug!(offset, len, error = %e, "backend read failed");
                    Reply::status(cookie, e.errno())
                }
            };
        }
        Action::Write { offset, len, fua } => match payload {
            Some(buf) if buf.len() == len as usize => {
                let r = backend.write(offset, buf.as_slice(), fua).await;
                shared.pool.put(buf);
                r
            }
            // The reader always attaches the payload; this arm only keeps
            // the match total without a panic.
            _ => Err(crate::IoError::Io),
        },
        Action::Flush => backend.flush().await,
        Action::Trim { offset, len, fua } => match backend.trim(offset, len).await {
            // Trim has no FUA parameter; FUA on a trim means "durably", so
            // follow with a flush.
            Ok(()) if fua => backend.flush().await,
            r => r,
        },
        Action::WriteZeroes { offset, len, fua } => backend.write_zeroes(offset, len, fua).await,
    };
    drop(budget);
    match result {
        Ok(()) => Reply::status(cookie, 0),
        Err(e) => {
            tracing::debug!(?action, error = %e, "backend request failed");
            Reply::status(cookie, e.errno())
        }
    }
}

/// The only code that writes to the socket during transmission.
async fn write_replies<Wr, B>(
    mut writer: Wr,
    mut rx: mpsc::Receiver<Reply>,
    shared: Arc<Shared<B>>,
) -> Result<(), NbdError>
where
    Wr: AsyncWrite + Unpin,
{
    let mut staging: Vec<u8> = Vec::with_capacity(STAGING_FLUSH_BYTES + INLINE_REPLY_DATA_BYTES);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next {
            staging.extend_from_slice(&wire::encode_simple_reply(reply.errno, reply.cookie));
            if let Some(data) = reply.data {
                if data.len() <= INLINE_REPLY_DATA_BYTES {
                    staging.extend_from_slice(data.as_slice());
                } else {
                    write_all_pair(&mut writer, &staging, data.as_slice()).await?;
                    staging.clear();
                }
                shared.pool.put(data);
            }
            if staging.len() >= STAGING_FLUSH_BYTES {
                writer.write_all(&staging).await?;
                staging.clear();
            }
            next = rx.try_recv().ok();
        }
        // Queue drained: push everything out now.
        if !staging.is_empty() {
            writer.write_all(&staging).await?;
            staging.clear();
        }
        writer.flush().await?;
    }
    Ok(())
}

/// Writes `a` then `b` with vectored writes: one syscall for header + data
/// in the common case, and no copy of the (large) data.
async fn write_all_pair<Wr: AsyncWrite + Unpin>(writer: &mut Wr, mut a: &[u8], mut b: &[u8]) -> std::io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            writer.write(b).await?
        } else {
            writer.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = a.get(from_a..).unwrap_or_default();
        b = b.get(n - from_a..).unwrap_or_default();
    }
    Ok(())
}
