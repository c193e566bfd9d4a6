//! Fixed newstyle handshake and option haggling.
//!
//! Only fixed newstyle is served: every current client (libnbd, qemu, the
//! kernel's nbd-client) speaks it, and it is what lets us answer unknown
//! options with an error instead of hanging up. Options the server does not
//! implement (STRUCTURED_REPLY, META_CONTEXT, EXTENDED_HEADERS, ...) get
//! `NBD_REP_ERR_UNSUP`, which makes clients fall back to simple replies.
//!
//! Limits: option payloads over `MAX_OPTION_DATA_BYTES` are refused, the
//! number of options is capped by the config, and the caller wraps the whole
//! exchange in the handshake timeout.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::backend::{BlockBackend, ExportRegistry};
use crate::config::ServerConfig;
use crate::error::NbdError;
use crate::wire;

/// Largest option payload read. Real payloads are an export name plus a
/// few info codes: well under 5 KiB.
pub(crate) const MAX_OPTION_DATA_BYTES: u32 = 64 * 1024;
/// Over-long options up to this size are read, discarded and answered with
/// `NBD_REP_ERR_TOO_BIG`; past it the connection is closed instead, since
/// draining gigabytes is a denial of service in itself.
pub(crate) const MAX_OPTION_DISCARD_BYTES: u32 = 1024 * 1024;

/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`: a page, which
/// avoids read-modify-write in page-cache-backed backends.
pub(crate) const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Minimum block size: any byte alignment is served.
pub(crate) const MINIMUM_BLOCK_BYTES: u32 = 1;

/// An export the client chose to enter transmission with.
pub(crate) struct Negotiated<B> {
    pub backend: Arc<B>,
    pub name: String,
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

pub(crate) enum Outcome<B> {
    Transmission(Negotiated<B>),
    /// The client sent `NBD_OPT_ABORT`: a clean end.
    Aborted,
}

/// Runs the handshake up to the transmission phase (or a clean abort).
pub(crate) async fn negotiate<S, R>(
    stream: &mut S,
    registry: &R,
    cfg: &ServerConfig,
) -> Result<Outcome<R::Backend>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: ExportRegistry,
{
    stream.write_all(&wire::encode_greeting()).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    if client_flags & !wire::KNOWN_CLIENT_FLAGS != 0 {
        return Err(NbdError::BadClientFlags(client_flags));
    }
    if client_flags & wire::FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotFixedNewstyle);
    }
    let no_zeroes = client_flags & wire::FLAG_C_NO_ZEROES != 0;

    let mut out = Vec::with_capacity(256);
    for _ in 0..cfg.max_options_per_connection {
        let mut header = [0u8; wire::OPTION_HEADER_BYTES];
        stream.read_exact(&mut header).await?;
        let header = wire::decode_option_header(&header);
        if header.magic != wire::IHAVEOPT {
            return Err(NbdError::BadOptionMagic(header.magic));
        }
        out.clear();
        let step = if header.length > MAX_OPTION_DATA_BYTES {
            reject_oversized_option(stream, header.option, header.length, &mut out).await?
        } else {
            let mut data = vec![0u8; header.length as usize];
            stream.read_exact(&mut data).await?;
            handle_option(header.option, &data, no_zeroes, registry, cfg, &mut out).await?
        };
        if !out.is_empty() {
            stream.write_all(&out).await?;
            stream.flush().await?;
        }
        if let Some(outcome) = step {
            return Ok(outcome);
        }
    }
    Err(NbdError::TooManyOptions(cfg.max_options_per_connection))
}

/// Drains an over-long option and answers `NBD_REP_ERR_TOO_BIG`, or closes
/// when draining would be unreasonable or no error reply is possible.
async fn reject_oversized_option<S, B>(
    stream: &mut S,
    option: u32,
    length: u32,
    out: &mut Vec<u8>,
) -> Result<Option<Outcome<B>>, NbdError>
where
    S: AsyncRead + Unpin,
{
    // EXPORT_NAME has no error reply: the spec leaves only a hard close.
    if length > MAX_OPTION_DISCARD_BYTES || option == wire::OPT_EXPORT_NAME {
        return Err(NbdError::OptionTooLarge { option, length });
    }
    let drained = tokio::io::copy(&mut (&mut *stream).take(u64::from(length)), &mut tokio::io::sink()).await?;
    if drained != u64::from(length) {
        return Err(NbdError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    tracing::debug!(option, length, "option payload too large");
    wire::push_option_reply(out, option, wire::REP_ERR_TOO_BIG, b"option payload too large");
    Ok(None)
}

/// Answers one option into `out`. `Some` ends negotiation.
async fn handle_option<R: ExportRegistry>(
    option: u32,
    data: &[u8],
    no_zeroes: bool,
    registry: &R,
    cfg: &ServerConfig,
    out: &mut Vec<u8>,
) -> Result<Option<Outcome<R::Backend>>, NbdError> {
    match option {
        wire::OPT_EXPORT_NAME => export_name(data, no_zeroes, registry, cfg, out).await.map(Some),
        wire::OPT_ABORT => {
            wire::push_option_reply(out, option, wire::REP_ACK, &[]);
            Ok(Some(Outcome::Aborted))
        }
        wire::OPT_LIST if !data.is_empty() => {
            wire::push_option_reply(out, option, wire::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
            Ok(None)
        }
        wire::OPT_LIST => {
            for name in registry.list().await {
                if name.len() > wire::MAX_STRING_BYTES {
                    tracing::warn!(len = name.len(), "export name too long to list; skipped");
                    continue;
                }
                wire::push_server_reply(out, &name);
            }
            wire::push_option_reply(out, option, wire::REP_ACK, &[]);
            Ok(None)
        }
        wire::OPT_STARTTLS => {
            wire::push_option_reply(out, option, wire::REP_ERR_POLICY, b"TLS is not offered");
            Ok(None)
        }
        wire::OPT_INFO | wire::OPT_GO => info_or_go(option, data, registry, cfg, out).await,
        _ => {
            tracing::debug!(option, "unsupported option");
            wire::push_option_reply(out, option, wire::REP_ERR_UNSUP, &[]);
            Ok(None)
        }
    }
}

/// Resolves the empty name to the default export.
fn resolve_name<R: ExportRegistry>(registry: &R, name: &str) -> Option<String> {
    if name.is_empty() {
        registry.default_export()
    } else {
        Some(name.to_owned())
    }
}

fn transmission_flags<B: BlockBackend>(backend: &B, cfg: &ServerConfig) -> u16 {
    let mut flags = wire::TFLAG_HAS_FLAGS | wire::TFLAG_SEND_FLUSH | wire::TFLAG_SEND_FUA;
    flags |= wire::TFLAG_SEND_CACHE;
    if backend.is_read_only() {
        flags |= wire::TFLAG_READ_ONLY;
    } else {
        flags |= wire::TFLAG_SEND_TRIM | wire::TFLAG_SEND_WRITE_ZEROES;
    }
    if cfg.multi_conn {
        flags |= wire::TFLAG_CAN_MULTI_CONN;
    }
    flags
}

/// `NBD_OPT_EXPORT_NAME`: no error reply exists, so any failure closes.
async fn export_name<R: ExportRegistry>(
    data: &[u8],
    no_zeroes: bool,
    registry: &R,
    cfg: &ServerConfig,
    out: &mut Vec<u8>,
) -> Result<Outcome<R::Backend>, NbdError> {
    let requested = match std::str::from_utf8(data) {
        Ok(name) if name.len() <= wire::MAX_STRING_BYTES => name,
        _ => return Err(NbdError::InvalidExportName),
    };
    let Some(name) = resolve_name(registry, requested) else {
        return Err(NbdError::UnknownExport(requested.to_owned()));
    };
    let Some(backend) = registry.open(&name).await else {
        return Err(NbdError::UnknownExport(name));
    };
    let size_bytes = backend.size_bytes();
    let transmission_flags = transmission_flags(&*backend, cfg);
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    Ok(Outcome::Transmission(Negotiated { backend, name, size_bytes, transmission_flags }))
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`: same replies; GO then enters transmission.
async fn info_or_go<R: ExportRegistry>(
    option: u32,
    data: &[u8],
    registry: &R,
    cfg: &ServerConfig,
    out: &mut Vec<u8>,
) -> Result<Option<Outcome<R::Backend>>, NbdError> {
    let request = match wire::parse_info_request(data) {
        Ok(r) => r,
        Err(msg) => {
            wire::push_option_reply(out, option, wire::REP_ERR_INVALID, msg.as_bytes());
            return Ok(None);
        }
    };
    let Some(name) = resolve_name(registry, request.name) else {
        wire::push_option_reply(out, option, wire::REP_ERR_UNKNOWN, b"no default export");
        return Ok(None);
    };
    let Some(backend) = registry.open(&name).await else {
        let msg = format!("unknown export: {name}");
        wire::push_option_reply(out, option, wire::REP_ERR_UNKNOWN, msg.as_bytes());
        return Ok(None);
    };
    let size_bytes = backend.size_bytes();
    let transmission_flags = transmission_flags(&*backend, cfg);
    wire::push_info_export(out, option, size_bytes, transmission_flags);
    if request.info_types.contains(&wire::INFO_NAME) {
        wire::push_info_string(out, option, wire::INFO_NAME, &name);
    }
    if request.info_types.contains(&wire::INFO_DESCRIPTION) {
        if let Some(desc) = backend.description() {
            let desc = truncate_utf8(&desc, wire::MAX_STRING_BYTES);
            wire::push_info_string(out, option, wire::INFO_DESCRIPTION, desc);
        }
    }
    // Sent even when not requested (the spec allows it): it tells clients
    // the request size limit, which they otherwise learn by being cut off.
    wire::push_info_block_size(
        out,
        option,
        MINIMUM_BLOCK_BYTES,
        PREFERRED_BLOCK_BYTES,
        cfg.effective_max_request_bytes(),
    );
    wire::push_option_reply(out, option, wire::REP_ACK, &[]);
    if option == wire::OPT_GO {
        Ok(Some(Outcome::Transmission(Negotiated { backend, name, size_bytes, transmission_flags })))
    } else {
        Ok(None)
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char
/// boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::truncate_utf8;

    #[test]
    fn truncate_utf8_never_splits_a_char() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
