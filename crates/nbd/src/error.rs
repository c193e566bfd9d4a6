//! Why a connection ended other than by a clean client disconnect.

use std::time::Duration;

/// A connection-level failure. Request-level failures (bad offsets,
/// backend errors) never surface here: they become NBD error replies and
/// the connection carries on.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("socket i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client sent unknown client flags {0:#x}")]
    BadClientFlags(u32),
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE; only fixed newstyle is served")]
    NotFixedNewstyle,
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("option {option} carries {length} bytes, over the limit")]
    OptionTooLarge { option: u32, length: u32 },
    #[error("client sent more than {0} options")]
    TooManyOptions(usize),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME with a name that is not a valid string")]
    InvalidExportName,
    #[error("bad request magic {0:#x}")]
    BadRequestMagic(u32),
    #[error("write of {length} bytes exceeds the {max} byte request limit")]
    RequestTooLarge { length: u32, max: u32 },
    #[error("connection closed in the middle of a request")]
    TruncatedRequest,
    #[error("reply writer stopped: {0}")]
    WriterStopped(String),
}
