//! Server limits and knobs.

use std::time::Duration;

/// Smallest `max_request_bytes` honoured. The advertised maximum block
/// size must be at least the preferred block size (4096), so smaller
/// configured values are raised to this.
pub const MIN_MAX_REQUEST_BYTES: u32 = 4096;

/// Per-server configuration. Every field is a limit on something a client
/// controls; the defaults suit libnbd and qemu clients.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload accepted, and the advertised maximum
    /// block size. A larger WRITE closes the connection (its payload
    /// cannot be skipped safely); a larger READ gets `EINVAL`.
    pub max_request_bytes: u32,
    /// Requests executing concurrently per connection. When reached, the
    /// server stops reading requests until one finishes (backpressure).
    pub max_inflight_per_connection: usize,
    /// Payload bytes (READ buffers plus WRITE payloads) held per
    /// connection at once; bounds memory independently of the count above.
    pub max_inflight_bytes_per_connection: usize,
    /// Whole-handshake deadline, from accept to entering transmission.
    pub handshake_timeout: Duration,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: only correct when every
    /// backend makes flush/FUA visible across all connections.
    pub multi_conn: bool,
    /// Options a client may send before entering transmission; a client
    /// past this is treated as a denial of service and disconnected.
    pub max_options_per_connection: usize,
    /// Concurrent connections per `serve_unix` / `serve_tcp` loop; past
    /// it the loop stops accepting until one closes.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_request_bytes: 32 * 1024 * 1024,
            max_inflight_per_connection: 128,
            max_inflight_bytes_per_connection: 256 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            multi_conn: false,
            max_options_per_connection: 4096,
            max_connections: 1024,
        }
    }
}

impl ServerConfig {
    /// `max_request_bytes` raised to the protocol minimum.
    pub(crate) fn effective_max_request_bytes(&self) -> u32 {
        self.max_request_bytes.max(MIN_MAX_REQUEST_BYTES)
    }

    /// `max_inflight_per_connection`, at least 1 so the reader can progress.
    pub(crate) fn effective_max_inflight(&self) -> usize {
        self.max_inflight_per_connection.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)
    }

    /// Byte budget as semaphore permits, at least one maximal request.
    pub(crate) fn effective_max_inflight_bytes(&self) -> usize {
        let floor = usize::try_from(self.effective_max_request_bytes()).unwrap_or(usize::MAX);
        self.max_inflight_bytes_per_connection.max(floor).min(tokio::sync::Semaphore::MAX_PERMITS)
    }
}
