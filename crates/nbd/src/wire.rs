//! NBD wire format: constants and pure encode/decode helpers.
//!
//! Nothing here does I/O, so every parser can be unit-tested with byte
//! slices. Every decoder takes untrusted bytes and returns a `Result`; none
//! of them index without a bounds check. All integers are big-endian on the
//! wire (the spec's "network byte order").

// ---- Handshake magics -------------------------------------------------------

/// ASCII `NBDMAGIC`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// ASCII `IHAVEOPT`: sent by the server after `NBDMAGIC`, and by the client
/// in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic in front of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// ---- Handshake flags (server → client, 16 bits) -----------------------------

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// ---- Client flags (client → server, 32 bits) --------------------------------

pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit closes the
/// connection (the spec says the server MUST drop it).
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---- Options -----------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// ---- Option reply types --------------------------------------------------------

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

// ---- NBD_REP_INFO types ---------------------------------------------------------

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Transmission flags (16 bits, sent with the export size) ---------------

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

// ---- Transmission phase --------------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// ---- Error values (the spec's fixed errno numbering, not the host's) -------

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The spec caps every string (export names, messages) at 4096 bytes.
pub const MAX_STRING_BYTES: usize = 4096;

/// One transmission-phase request header, as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    /// Opaque client value echoed in the reply (the spec's "handle").
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Decodes a request header; `Err` carries the bad magic, which means the
/// stream is out of sync and the connection must close.
pub fn decode_request_header(b: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, u32> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        command: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
        length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
    })
}

/// Encodes a request header (used by tests and tools that speak to us).
pub fn encode_request_header(h: &RequestHeader) -> [u8; REQUEST_HEADER_BYTES] {
    let mut out = [0u8; REQUEST_HEADER_BYTES];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&h.flags.to_be_bytes());
    out[6..8].copy_from_slice(&h.command.to_be_bytes());
    out[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&h.offset.to_be_bytes());
    out[24..28].copy_from_slice(&h.length.to_be_bytes());
    out
}

/// Encodes a simple reply header; for a successful READ the data follows.
pub fn encode_simple_reply(errno: u32, cookie: u64) -> [u8; SIMPLE_REPLY_HEADER_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_BYTES];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&errno.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// The server's opening: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Option request header: magic, option, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub length: u32,
}

pub const OPTION_HEADER_BYTES: usize = 16;

pub fn decode_option_header(b: &[u8; OPTION_HEADER_BYTES]) -> OptionHeader {
    OptionHeader {
        magic: u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        option: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        length: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
    }
}

/// Appends one option reply (fixed newstyle framing) to `out`.
///
/// `data` is at most a few KiB in every caller (names, messages, info
/// records), so the `u32` length cannot truncate; the conversion saturates
/// rather than panics all the same.
pub fn push_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an `NBD_REP_SERVER` reply naming one export.
pub fn push_server_reply(out: &mut Vec<u8>, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    push_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT` (size and transmission flags).
pub fn push_info_export(out: &mut Vec<u8>, option: u32, size_bytes: u64, tflags: u16) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    data[10..12].copy_from_slice(&tflags.to_be_bytes());
    push_option_reply(out, option, REP_INFO, &data);
}

/// Appends `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME` or
/// `NBD_INFO_DESCRIPTION`).
pub fn push_info_string(out: &mut Vec<u8>, option: u32, info_type: u16, text: &str) {
    let mut data = Vec::with_capacity(2 + text.len());
    data.extend_from_slice(&info_type.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    push_option_reply(out, option, REP_INFO, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn push_info_block_size(out: &mut Vec<u8>, option: u32, minimum: u32, preferred: u32, maximum: u32) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&minimum.to_be_bytes());
    data[6..10].copy_from_slice(&preferred.to_be_bytes());
    data[10..14].copy_from_slice(&maximum.to_be_bytes());
    push_option_reply(out, option, REP_INFO, &data);
}

/// Decoded payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    pub info_types: Vec<u16>,
}

/// Parses `u32 name length, name, u16 count, count × u16`.
///
/// The payload must be consumed exactly: trailing or missing bytes mean
/// the client and server disagree on the layout, so it is rejected with
/// `NBD_REP_ERR_INVALID` rather than guessed at. The `&'static str` is the
/// human-readable message sent with that error.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, &'static str> {
    let (len_bytes, rest) = split_at_checked(data, 4).ok_or("option payload too short")?;
    let name_len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let name_len = usize::try_from(name_len).map_err(|_| "export name length overflows")?;
    if name_len > MAX_STRING_BYTES {
        return Err("export name longer than 4096 bytes");
    }
    let (name, rest) = split_at_checked(rest, name_len).ok_or("export name runs past payload")?;
    let name = std::str::from_utf8(name).map_err(|_| "export name is not UTF-8")?;
    let (count_bytes, rest) = split_at_checked(rest, 2).ok_or("missing info request count")?;
    let count = usize::from(u16::from_be_bytes([count_bytes[0], count_bytes[1]]));
    if rest.len() != count * 2 {
        return Err("info request count does not match payload length");
    }
    let info_types = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name, info_types })
}

fn split_at_checked(data: &[u8], mid: usize) -> Option<(&[u8], &[u8])> {
    (mid <= data.len()).then(|| data.split_at(mid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    #[test]
    fn info_request_round_trips() {
        let data = info_payload(b"disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
        let req = parse_info_request(&data).expect("valid payload");
        assert_eq!(req.name, "disk");
        assert_eq!(req.info_types, vec![INFO_NAME, INFO_BLOCK_SIZE]);
    }

    #[test]
    fn info_request_rejects_every_truncation_and_trailing_byte() {
        let data = info_payload(b"disk", &[INFO_NAME]);
        for cut in 0..data.len() {
            assert!(parse_info_request(&data[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = data.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
    }

    #[test]
    fn info_request_rejects_huge_name_length_without_panicking() {
        let mut data = vec![0xff, 0xff, 0xff, 0xff];
        data.extend_from_slice(&[0, 0]);
        assert!(parse_info_request(&data).is_err());
    }

    #[test]
    fn info_request_rejects_non_utf8_name() {
        let data = info_payload(&[0xff, 0xfe], &[]);
        assert!(parse_info_request(&data).is_err());
    }

    #[test]
    fn request_header_round_trips_and_checks_magic() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            length: 4096,
        };
        let bytes = encode_request_header(&h);
        assert_eq!(decode_request_header(&bytes), Ok(h));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert!(decode_request_header(&bad).is_err());
    }
}
