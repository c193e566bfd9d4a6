//! Entry points: one connection, and accept loops for unix and TCP sockets.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::task::JoinSet;

use crate::backend::ExportRegistry;
use crate::config::ServerConfig;
use crate::error::NbdError;
use crate::handshake::{self, Outcome};
use crate::transmission;

/// Socket read buffer. Big enough that a burst of pipelined 4 KiB writes
/// arrives in one `read`; larger WRITE payloads bypass it when it is empty.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Accept-error backoff (e.g. out of file descriptors): doubles from min to
/// max so a persistent error neither spins nor stalls recovery for long.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves one client connection: handshake, then transmission.
///
/// Returns `Ok(())` when the client disconnects cleanly (`NBD_OPT_ABORT`,
/// `NBD_CMD_DISC`, or EOF between requests) after every accepted request
/// has been answered; `Err` for protocol violations, timeouts and socket
/// errors. Never panics on client input.
pub async fn serve_connection<S, R>(stream: S, registry: Arc<R>, cfg: &ServerConfig) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: ExportRegistry,
{
    // The BufReader wraps the stream for the whole connection: bytes a
    // client pipelines right after NBD_OPT_GO are already in its buffer
    // and must not be lost when we switch to the transmission reader.
    let mut stream = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    let negotiated = tokio::time::timeout(cfg.handshake_timeout, handshake::negotiate(&mut stream, &*registry, cfg))
        .await
        .map_err(|_| NbdError::HandshakeTimeout(cfg.handshake_timeout))??;
    let negotiated = match negotiated {
        Outcome::Aborted => return Ok(()),
        Outcome::Transmission(n) => n,
    };
    tracing::debug!(export = %negotiated.name, size = negotiated.size_bytes,
        flags = negotiated.transmission_flags, "entering transmission");
    let (reader, writer) = tokio::io::split(stream);
    transmission::run(reader, writer, negotiated.backend, negotiated.size_bytes, cfg).await
}

/// Something that yields connections; lets the unix and TCP loops share code.
trait Acceptor {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Acceptor for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "unix".to_owned()))
    }
}

impl Acceptor for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.accept().await?;
        // Replies are batched by the writer; Nagle would only add delay.
        stream.set_nodelay(true)?;
        Ok((stream, peer.to_string()))
    }
}

/// Accepts unix-socket clients forever, each served by its own task.
///
/// One failing connection never stops the loop. Dropping the returned
/// future stops accepting and aborts the connection tasks (requests
/// already handed to a backend still run to completion).
pub async fn serve_unix<R: ExportRegistry>(
    listener: tokio::net::UnixListener,
    registry: Arc<R>,
    cfg: ServerConfig,
) -> Infallible {
    accept_loop(listener, registry, cfg).await
}

/// Accepts TCP clients forever; see [`serve_unix`]. Sets `TCP_NODELAY`.
pub async fn serve_tcp<R: ExportRegistry>(
    listener: tokio::net::TcpListener,
    registry: Arc<R>,
    cfg: ServerConfig,
) -> Infallible {
    accept_loop(listener, registry, cfg).await
}

async fn accept_loop<A: Acceptor, R: ExportRegistry>(listener: A, registry: Arc<R>, cfg: ServerConfig) -> Infallible {
    let cfg = Arc::new(cfg);
    let max_connections = cfg.max_connections.max(1);
    let mut connections: JoinSet<()> = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        if connections.len() >= max_connections {
            // At the limit: accept nothing until a connection ends.
            if let Some(done) = connections.join_next().await {
                report_task_end(done);
            }
            continue;
        }
        tokio::select! {
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                report_task_end(done);
            }
            accepted = listener.accept_one() => match accepted {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    let registry = registry.clone();
                    let cfg = cfg.clone();
                    connections.spawn(async move {
                        match serve_connection(stream, registry, &cfg).await {
                            Ok(()) => tracing::debug!(%peer, "nbd connection closed"),
                            Err(e) => tracing::warn!(%peer, error = %e, "nbd connection failed"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "nbd accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
        }
    }
}

fn report_task_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::warn!(error = %e, "nbd connection task panicked");
        }
    }
}
