//! Data protocol: SDC -> SDS and SDS -> SDS (replication) requests.
//!
//! Every IO request payload starts with an [`IoHeader`] (56 bytes, little-endian); a WRITE
//! carries `length` data bytes after it; a READ response carries `length` data bytes.

/// Kinds of data frames.
pub mod kind {
    pub const READ: u16 = 1;
    pub const WRITE: u16 = 2;
    /// Make every write acknowledged before it durable. Payload: nothing, or 4 bytes of flags.
    pub const FLUSH: u16 = 3;
    pub const WRITE_ZEROES: u16 = 4;
    pub const TRIM: u16 = 5;
    /// Payload: volume id (u64). Response: allocated extent indexes (u64 each) on this SDS.
    pub const LIST_EXTENTS: u16 = 6;
    /// Payload: IoHeader. Response: crc32c (u32) of the local copy and 1 byte "allocated".
    pub const EXTENT_CHECKSUM: u16 = 7;
    /// Payload: IoHeader naming pool, PG and epoch (a back-filling primary asks its target).
    /// Response: (volume id u64, extent index u64) of every extent of that PG held here.
    pub const LIST_PG_EXTENTS: u16 = 8;
    /// Control-plane request (JSON), served by the MDM.
    pub const CONTROL: u16 = 100;
    /// Raft RPC between MDMs (JSON, opaque to this crate), served on the MDM's control port.
    pub const RAFT: u16 = 101;
}

/// Request flags.
pub mod flags {
    /// Durable before acknowledged (NBD FUA).
    pub const FUA: u32 = 1;
    /// Forwarded by the PG primary: apply to the local copy as secondary, do not forward.
    pub const REPLICA: u32 = 2;
    /// Serve from this SDS's own copy whatever its role (copy verification), or flush only
    /// local devices.
    pub const LOCAL_ONLY: u32 = 4;
}

/// Response status codes.
pub mod status {
    pub const OK: u32 = 0;
    /// The requester's PG epoch is older than the server's: refetch the map and retry.
    pub const STALE_EPOCH: u32 = 1;
    /// This SDS does not hold the role the request assumes for the PG.
    pub const WRONG_ROLE: u32 = 2;
    /// The server's map is older than the request's; it is refreshing. Retry shortly.
    pub const MAP_BEHIND: u32 = 3;
    pub const IO_ERROR: u32 = 4;
    pub const NO_SPACE: u32 = 5;
    /// Malformed or out-of-range request.
    pub const INVALID: u32 = 6;
    /// The PG's other copy could not take the write.
    pub const REPLICA_UNAVAILABLE: u32 = 7;
    pub const UNKNOWN_KIND: u32 = 8;
    /// Not serving yet (starting, or devices not open).
    pub const NOT_READY: u32 = 9;
    /// The request's volume-mapping epoch is older than the volume's: the volume was mapped
    /// or taken over since. The client must refetch the map and check it still holds the
    /// mapping before retrying; an SDC that lost it fails the IO (this is the fence that
    /// keeps a preempted node from writing).
    pub const MAPPING_STALE: u32 = 10;

    pub fn name(code: u32) -> &'static str {
        match code {
            OK => "ok",
            STALE_EPOCH => "stale epoch",
            WRONG_ROLE => "wrong role for PG",
            MAP_BEHIND => "server map behind",
            IO_ERROR => "I/O error",
            NO_SPACE => "no space",
            INVALID => "invalid request",
            REPLICA_UNAVAILABLE => "replica unavailable",
            UNKNOWN_KIND => "unknown request kind",
            NOT_READY => "not ready",
            MAPPING_STALE => "volume mapping changed",
            _ => "unknown status",
        }
    }
}

pub const IO_HEADER_BYTES: usize = 56;

/// Addresses one range inside one extent, and says which PG map the sender acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoHeader {
    pub pool_id: u64,
    pub volume_id: u64,
    pub extent_index: u64,
    pub pg_id: u32,
    pub flags: u32,
    pub pg_epoch: u64,
    pub offset_in_extent: u32,
    pub length: u32,
    /// The volume's mapping epoch the SDC acts on (0 in SDS-to-SDS and verification
    /// requests, which are not checked against it).
    pub mapping_epoch: u64,
}

impl IoHeader {
    pub fn encode(&self) -> [u8; IO_HEADER_BYTES] {
        let mut b = [0u8; IO_HEADER_BYTES];
        b[0..8].copy_from_slice(&self.pool_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.volume_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.extent_index.to_le_bytes());
        b[24..28].copy_from_slice(&self.pg_id.to_le_bytes());
        b[28..32].copy_from_slice(&self.flags.to_le_bytes());
        b[32..40].copy_from_slice(&self.pg_epoch.to_le_bytes());
        b[40..44].copy_from_slice(&self.offset_in_extent.to_le_bytes());
        b[44..48].copy_from_slice(&self.length.to_le_bytes());
        b[48..56].copy_from_slice(&self.mapping_epoch.to_le_bytes());
        b
    }

    /// Decodes the header at the start of `payload`; `None` if it is too short.
    pub fn decode(payload: &[u8]) -> Option<IoHeader> {
        let b = payload.get(..IO_HEADER_BYTES)?;
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Some(IoHeader {
            pool_id: u64_at(0),
            volume_id: u64_at(8),
            extent_index: u64_at(16),
            pg_id: u32_at(24),
            flags: u32_at(28),
            pg_epoch: u64_at(32),
            offset_in_extent: u32_at(40),
            length: u32_at(44),
            mapping_epoch: u64_at(48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_header_round_trip() {
        let h = IoHeader {
            pool_id: 1,
            volume_id: u64::MAX,
            extent_index: 77,
            pg_id: 3,
            flags: flags::FUA,
            pg_epoch: 9,
            offset_in_extent: 4096,
            length: 512,
            mapping_epoch: 3,
        };
        assert_eq!(IoHeader::decode(&h.encode()), Some(h));
        assert_eq!(IoHeader::decode(&[0u8; 10]), None);
    }
}
