//! What the server needs from storage: a block backend per export and a
//! registry that maps export names to backends.
//!
//! The server never interprets data; it only checks bounds and forwards
//! requests. Backends are called concurrently (many requests in flight per
//! connection, and possibly many connections per export), so they must do
//! their own synchronisation.
//!
//! Backend futures must not block the thread inside `poll` (do blocking
//! I/O via `spawn_blocking` or an async API): the server polls each new
//! request once on the connection's reader, so a blocking poll would stall
//! that connection's request parsing.

use std::future::Future;
use std::sync::Arc;

use crate::wire;

/// Errors a backend may report; each maps to one NBD error value.
///
/// The NBD spec fixes its own errno numbering (it matches Linux for these
/// values), so the mapping lives here rather than relying on the host's
/// `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// Generic I/O failure (`EIO`).
    #[error("input/output error")]
    Io,
    /// Out of space, quota or file-size limit (`ENOSPC`).
    #[error("no space left on device")]
    NoSpace,
    /// The request makes no sense to the backend (`EINVAL`).
    #[error("invalid argument")]
    Invalid,
    /// The backend is shutting down; clients disconnect on this (`ESHUTDOWN`).
    #[error("backend is shutting down")]
    Shutdown,
    /// Write to a read-only export (`EPERM`).
    #[error("operation not permitted")]
    Permission,
    /// The backend cannot do this operation (`ENOTSUP`).
    #[error("operation not supported")]
    NotSupported,
    /// A value is too large to represent (`EOVERFLOW`).
    #[error("value too large")]
    Overflow,
    /// Out of memory (`ENOMEM`); the spec asks servers to avoid it.
    #[error("cannot allocate memory")]
    NoMemory,
}

impl IoError {
    /// The NBD error value sent in the reply.
    pub fn errno(self) -> u32 {
        match self {
            IoError::Io => wire::EIO,
            IoError::NoSpace => wire::ENOSPC,
            IoError::Invalid => wire::EINVAL,
            IoError::Shutdown => wire::ESHUTDOWN,
            IoError::Permission => wire::EPERM,
            IoError::NotSupported => wire::ENOTSUP,
            IoError::Overflow => wire::EOVERFLOW,
            IoError::NoMemory => wire::ENOMEM,
        }
    }
}

/// Linux errno values the spec asks servers to fold into `ENOSPC`.
const LINUX_EFBIG: i32 = 27;
const LINUX_ENOSPC: i32 = 28;
const LINUX_EDQUOT: i32 = 122;

impl From<std::io::Error> for IoError {
    /// Convenience for file-backed backends. `EDQUOT` and `EFBIG` become
    /// `NoSpace`, as the spec recommends.
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        if let Some(LINUX_EFBIG | LINUX_ENOSPC | LINUX_EDQUOT) = e.raw_os_error() {
            return IoError::NoSpace;
        }
        match e.kind() {
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => IoError::NoSpace,
            K::InvalidInput => IoError::Invalid,
            K::PermissionDenied | K::ReadOnlyFilesystem => IoError::Permission,
            K::Unsupported => IoError::NotSupported,
            K::OutOfMemory => IoError::NoMemory,
            _ => IoError::Io,
        }
    }
}

/// One exported block device.
///
/// Invariant the server upholds before every call: `offset + len` does not
/// overflow and is `<= size_bytes()` as reported at handshake time, and
/// `len` (or `buf.len()`) is non-zero. Backends may still fail with
/// `Invalid` if they shrank since.
pub trait BlockBackend: Send + Sync + 'static {
    /// Export size in bytes, sent to the client during the handshake.
    fn size_bytes(&self) -> u64;

    /// Reads exactly `buf.len()` bytes at `offset`. Called concurrently.
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Writes `data` at `offset`; with `fua` the data must be durable before
    /// this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Makes every write that has already completed durable.
    fn flush(&self) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Hint that the range is no longer needed; contents become undefined.
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Makes the range read as zeroes; with `fua`, durably.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<(), IoError>> + Send;

    /// If true the export is advertised read-only and the server answers
    /// writes, trims and zeroing with `EPERM` without calling the backend.
    fn is_read_only(&self) -> bool {
        false
    }

    /// Human-readable description for `NBD_INFO_DESCRIPTION`, if any.
    fn description(&self) -> Option<String> {
        None
    }
}

/// Maps export names to backends.
pub trait ExportRegistry: Send + Sync + 'static {
    type Backend: BlockBackend;

    /// Look up an export by name (async: may ask a remote service).
    /// `None` = unknown export. Bounded by the handshake timeout.
    fn open(&self, name: &str) -> impl Future<Output = Option<Arc<Self::Backend>>> + Send;

    /// Names answered to `NBD_OPT_LIST`.
    fn list(&self) -> impl Future<Output = Vec<String>> + Send;

    /// Export used when the client asks for the empty name.
    fn default_export(&self) -> Option<String>;
}
