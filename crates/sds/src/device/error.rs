//! Errors of the device layer. Every problem with what the disk says is a value, never a panic.

use std::path::PathBuf;

use super::layout::ExtentKey;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{context} on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        /// What the device layer was doing, e.g. "write slot record".
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("device holds no Tessera superblock")]
    NotFormatted,
    #[error("device already holds a Tessera superblock; format with force to overwrite it")]
    AlreadyFormatted,
    #[error("device is in use (mounted, or opened by another Tessera process)")]
    Busy,
    #[error("device belongs to another cluster (expected {expected:02x?}, found {found:02x?})")]
    WrongCluster { expected: [u8; 16], found: [u8; 16] },
    #[error("device layout version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("corrupt superblock: {reason}")]
    CorruptSuperblock { reason: String },
    #[error("corrupt slot record {slot}: {reason}")]
    CorruptSlot { slot: u64, reason: String },
    #[error("slots {first_slot} and {second_slot} both claim volume {} extent {}", key.volume_id, key.extent_index)]
    DuplicateExtent { key: ExtentKey, first_slot: u64, second_slot: u64 },
    #[error("device of {size_bytes} bytes is too small for one {extent_size_bytes}-byte extent and the metadata")]
    TooSmall { size_bytes: u64, extent_size_bytes: u32 },
    #[error("device is {actual_bytes} bytes but its layout needs {required_bytes}")]
    Truncated { required_bytes: u64, actual_bytes: u64 },
    #[error("extent size {extent_size_bytes} is not a power of two between 4 KiB and 64 MiB")]
    InvalidExtentSize { extent_size_bytes: u32 },
    #[error("device failed (an IO error or a missed deadline); it serves nothing more")]
    Failed,
    #[error("device did not complete {operation} within {deadline_ms} ms; it is failed")]
    TimedOut { operation: &'static str, deadline_ms: u64 },
    #[error("device is full: every slot holds an extent")]
    Full,
    #[error("IO of {len} bytes at offset {offset} does not fit in a {extent_size_bytes}-byte extent")]
    OutOfRange { offset: u64, len: u64, extent_size_bytes: u32 },
    #[error("volume {} extent {} is recorded in PG {recorded}, not PG {requested}", key.volume_id, key.extent_index)]
    PgMismatch { key: ExtentKey, recorded: u32, requested: u32 },
}
