//! Frame layout (little-endian), 24 bytes then `payload_len` bytes:
//!
//! | offset | size | field        | notes                                        |
//! |-------:|-----:|--------------|----------------------------------------------|
//! | 0      | 4    | magic        | `FRAME_MAGIC`                                 |
//! | 4      | 2    | version      | `PROTOCOL_VERSION`; others are refused        |
//! | 6      | 2    | kind         | request kind; responses set `RESPONSE_BIT`    |
//! | 8      | 8    | request_id   | echoed in the response                        |
//! | 16     | 4    | payload_len  | at most `MAX_PAYLOAD_BYTES`                   |
//! | 20     | 4    | status       | 0 in requests; a status code in responses     |

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

pub const FRAME_MAGIC: u32 = 0x5453_4631; // "TSF1"
pub const PROTOCOL_VERSION: u16 = 2;
pub const HEADER_BYTES: usize = 24;
pub const RESPONSE_BIT: u16 = 0x8000;
/// Largest payload: one extent of the largest extent size plus headers. Bigger frames are
/// refused before any allocation, so a peer cannot make us allocate at will.
pub const MAX_PAYLOAD_BYTES: u32 = 64 * 1024 * 1024 + 4096;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("bad frame magic {0:#x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0}")]
    BadVersion(u16),
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(u32),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u16,
    pub request_id: u64,
    pub payload_len: u32,
    pub status: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Self, FrameError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16_at(4);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::BadVersion(version));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[8..16]);
        let payload_len = u32_at(16);
        if payload_len > MAX_PAYLOAD_BYTES {
            return Err(FrameError::TooLarge(payload_len));
        }
        Ok(FrameHeader { kind: u16_at(6), request_id: u64::from_le_bytes(id), payload_len, status: u32_at(20) })
    }
}

/// Reads one header; `Ok(None)` on a clean end of stream between frames.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<FrameHeader>, FrameError> {
    let mut b = [0u8; HEADER_BYTES];
    match r.read_exact(&mut b).await {
        Ok(_) => FrameHeader::decode(&b).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejections() {
        let h = FrameHeader { kind: 7, request_id: 42, payload_len: 4096, status: 3 };
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(matches!(FrameHeader::decode(&bad), Err(FrameError::BadMagic(_))));
        let mut bad = h.encode();
        bad[4] = 9;
        assert!(matches!(FrameHeader::decode(&bad), Err(FrameError::BadVersion(9))));
        let big = FrameHeader { payload_len: MAX_PAYLOAD_BYTES + 1, ..h };
        assert!(matches!(FrameHeader::decode(&big.encode()), Err(FrameError::TooLarge(_))));
    }
}
