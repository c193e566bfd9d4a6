//! Multiplexed request/response over one authenticated TCP connection.
//!
//! Client: callers write whole frames under a short lock; one reader task routes each
//! response to its caller by request id, so replies may come back in any order.
//! Server: one reader loop per connection hands requests to handlers; one writer task
//! batches their responses (it flushes only when no more are queued).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::auth::{authenticate_client, AuthError, ClusterSecret};
use crate::frame::{read_header, FrameError, FrameHeader, MAX_PAYLOAD_BYTES, RESPONSE_BIT};

/// Requests one client connection may have outstanding; more wait for a slot.
pub const MAX_INFLIGHT_PER_CONNECTION: usize = 256;
/// Responses queued for a server connection's writer before handlers wait.
pub const RESPONSE_QUEUE_DEPTH: usize = 512;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const SOCKET_BUFFER_BYTES: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum RpcError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("authentication with {addr} failed: {source}")]
    Auth { addr: String, source: AuthError },
    #[error("connection to {0} closed")]
    Disconnected(String),
    #[error("request to {0} timed out")]
    Timeout(String),
    #[error("bad frame from {addr}: {source}")]
    Frame { addr: String, source: FrameError },
}

#[derive(Debug)]
pub struct Reply {
    pub status: u32,
    pub payload: Vec<u8>,
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Reply>>>;

/// A request sent and not yet answered. Dropping it (a timeout, an abandoned wait) forgets
/// the request, so a peer that never answers leaves nothing behind, and frees its
/// in-flight slot.
pub struct PendingReply {
    shared: Arc<Shared>,
    request_id: u64,
    rx: oneshot::Receiver<Reply>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl PendingReply {
    /// The reply. Cancel-safe: may be polled again after another branch of a `select!` won.
    pub async fn wait(&mut self) -> Result<Reply, RpcError> {
        (&mut self.rx).await.map_err(|_| RpcError::Disconnected(self.shared.addr.clone()))
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.request_id);
    }
}

/// Bytes of whole frames waiting to be written. Callers append under a short lock (no
/// await); the writer task takes everything queued and writes it at once, so requests issued
/// together — a burst of NBD requests, say — leave in one syscall instead of one each.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
}

struct Shared {
    addr: String,
    outbox: Arc<Mutex<Outbox>>,
    outbox_ready: Arc<tokio::sync::Notify>,
    pending: Arc<Pending>,
    closed: Arc<AtomicBool>,
    next_request_id: AtomicU64,
    inflight: Arc<Semaphore>,
    reader_task: tokio::task::JoinHandle<()>,
    writer_task: tokio::task::JoinHandle<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.reader_task.abort();
        self.writer_task.abort();
    }
}

/// A cheap-to-clone handle on one authenticated connection.
#[derive(Clone)]
pub struct RpcClient {
    shared: Arc<Shared>,
}

impl RpcClient {
    pub async fn connect(addr: &str, secret: &ClusterSecret) -> Result<RpcClient, RpcError> {
        RpcClient::connect_from(addr, None, secret).await
    }

    /// Connects from the local address `bind` (port chosen by the kernel), so that peers and
    /// packet filters see the node's own address rather than whatever the route picks.
    pub async fn connect_from(
        addr: &str,
        bind: Option<std::net::IpAddr>,
        secret: &ClusterSecret,
    ) -> Result<RpcClient, RpcError> {
        let connect = async {
            let Some(bind) = bind else { return TcpStream::connect(addr).await };
            let target = tokio::net::lookup_host(addr)
                .await?
                .find(|a| a.is_ipv4() == bind.is_ipv4())
                .ok_or_else(|| std::io::Error::other("no address of the same family as the bind address"))?;
            let socket =
                if bind.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            socket.bind(std::net::SocketAddr::new(bind, 0))?;
            socket.connect(target).await
        };
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| RpcError::ConnectTimeout(addr.to_string()))?
            .map_err(|source| RpcError::Connect { addr: addr.to_string(), source })?;
        stream.set_nodelay(true).ok();
        authenticate_client(&mut stream, secret)
            .await
            .map_err(|source| RpcError::Auth { addr: addr.to_string(), source })?;
        let (read_half, write_half) = stream.into_split();
        let pending: Arc<Pending> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let reader_task = tokio::spawn(read_replies(read_half, pending.clone(), closed.clone()));
        let outbox: Arc<Mutex<Outbox>> = Arc::default();
        let outbox_ready = Arc::new(tokio::sync::Notify::new());
        let writer_task =
            tokio::spawn(write_requests(write_half, outbox.clone(), outbox_ready.clone(), closed.clone()));
        Ok(RpcClient {
            shared: Arc::new(Shared {
                addr: addr.to_string(),
                outbox,
                outbox_ready,
                pending,
                closed,
                next_request_id: AtomicU64::new(1),
                inflight: Arc::new(Semaphore::new(MAX_INFLIGHT_PER_CONNECTION)),
                reader_task,
                writer_task,
            }),
        })
    }

    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// True once the connection has failed; callers should reconnect.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Sends one request made of `parts` (concatenated on the wire) and waits for its reply.
    pub async fn call(&self, kind: u16, parts: &[&[u8]], timeout: Duration) -> Result<Reply, RpcError> {
        let mut pending = self.start(kind, parts).await?;
        match tokio::time::timeout(timeout, pending.wait()).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::Timeout(self.shared.addr.clone())),
        }
    }

    /// Sends one request and returns its reply-to-be, for callers that wait in their own way
    /// (watching for a map change meanwhile) without a timer per request here.
    pub async fn start(&self, kind: u16, parts: &[&[u8]]) -> Result<PendingReply, RpcError> {
        let s = &self.shared;
        let disconnected = || RpcError::Disconnected(s.addr.clone());
        let slot = s.inflight.clone().acquire_owned().await.map_err(|_| disconnected())?;
        if self.is_closed() {
            return Err(disconnected());
        }
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(payload_len <= MAX_PAYLOAD_BYTES as usize, "caller built an oversized frame");
        let request_id = s.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        s.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(request_id, tx);
        let header = FrameHeader { kind, request_id, payload_len: payload_len as u32, status: 0 };
        {
            let mut out = s.outbox.lock().unwrap_or_else(|p| p.into_inner());
            out.bytes.extend_from_slice(&header.encode());
            for p in parts {
                out.bytes.extend_from_slice(p);
            }
        }
        s.outbox_ready.notify_one();
        Ok(PendingReply { shared: s.clone(), request_id, rx, _slot: slot })
    }
}

/// Writes whatever callers queued, as one write per wake-up. On a write error the
/// connection is marked closed and the reader's waiters are failed by its shutdown.
async fn write_requests(
    write_half: OwnedWriteHalf,
    outbox: Arc<Mutex<Outbox>>,
    ready: Arc<tokio::sync::Notify>,
    closed: Arc<AtomicBool>,
) {
    let mut w = write_half;
    let mut batch: Vec<u8> = Vec::new();
    loop {
        ready.notified().await;
        loop {
            {
                let mut out = outbox.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::swap(&mut out.bytes, &mut batch);
            }
            if batch.is_empty() {
                break;
            }
            if w.write_all(&batch).await.is_err() {
                closed.store(true, Ordering::Release);
                let _ = w.shutdown().await;
                return;
            }
            batch.clear();
            // Keep the buffer for reuse, but do not hold on to a huge one after a big write.
            if batch.capacity() > 4 * SOCKET_BUFFER_BYTES {
                batch = Vec::new();
            }
        }
    }
}

async fn read_replies(read_half: OwnedReadHalf, pending: Arc<Pending>, closed: Arc<AtomicBool>) {
    let mut r = BufReader::with_capacity(SOCKET_BUFFER_BYTES, read_half);
    loop {
        let header = match read_header(&mut r).await {
            Ok(Some(h)) if h.kind & RESPONSE_BIT != 0 => h,
            _ => break,
        };
        let Ok(payload) = read_payload(&mut r, header.payload_len).await else { break };
        let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&header.request_id);
        // A reply nobody waits for (its caller timed out) is dropped.
        if let Some(tx) = waiter {
            let _ = tx.send(Reply { status: header.status, payload });
        }
    }
    closed.store(true, Ordering::Release);
    // Dropping the senders wakes every waiting caller with `Disconnected`.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// One response queued for a server connection's writer task.
pub struct OutFrame {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

impl OutFrame {
    pub fn reply(request: &FrameHeader, status: u32, payload: Vec<u8>) -> OutFrame {
        OutFrame {
            header: FrameHeader {
                kind: request.kind | RESPONSE_BIT,
                request_id: request.request_id,
                payload_len: payload.len() as u32,
                status,
            },
            payload,
        }
    }
}

/// Starts the writer task of a server connection; returns the queue handlers reply into.
pub fn spawn_response_writer(write_half: OwnedWriteHalf) -> mpsc::Sender<OutFrame> {
    let (tx, mut rx) = mpsc::channel::<OutFrame>(RESPONSE_QUEUE_DEPTH);
    tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(SOCKET_BUFFER_BYTES, write_half);
        while let Some(frame) = rx.recv().await {
            let mut next = Some(frame);
            while let Some(f) = next.take() {
                if w.write_all(&f.header.encode()).await.is_err() || w.write_all(&f.payload).await.is_err() {
                    return;
                }
                next = rx.try_recv().ok();
            }
            if w.flush().await.is_err() {
                return;
            }
        }
    });
    tx
}

/// Reads one request frame (header and payload). `Ok(None)` at a clean end of stream.
pub async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(FrameHeader, Vec<u8>)>, FrameError> {
    let Some(header) = read_header(r).await? else { return Ok(None) };
    let payload = read_payload(r, header.payload_len).await?;
    Ok(Some((header, payload)))
}

/// Reads exactly `len` bytes into a new buffer without zero-filling it first (the length
/// was checked against `MAX_PAYLOAD_BYTES` when the header was decoded).
async fn read_payload<R: tokio::io::AsyncRead + Unpin>(r: &mut R, len: u32) -> std::io::Result<Vec<u8>> {
    let len = len as usize;
    let mut payload = Vec::with_capacity(len);
    while payload.len() < len {
        let remaining = (len - payload.len()) as u64;
        if (&mut *r).take(remaining).read_buf(&mut payload).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(payload)
}
