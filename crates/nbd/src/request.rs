//! Deciding what to do with one transmission request: a pure function of
//! the header and the export's limits, so every rule is unit-testable and
//! the I/O loop in `transmission` stays a thin shell.

use crate::wire::{self, RequestHeader};

/// What the export allows, fixed at handshake time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExportLimits {
    pub size_bytes: u64,
    pub max_request_bytes: u32,
    pub read_only: bool,
}

/// Backend work for one accepted request. Invariant: `offset + len` fits in
/// the export and `len > 0` (zero-length requests never get here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u64, fua: bool },
    WriteZeroes { offset: u64, len: u64, fua: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Run against the backend, then reply.
    Execute(Action),
    /// Reply at once with `errno` (0 = success, no data), after reading and
    /// discarding `discard_payload_bytes` so the stream stays in sync.
    Reply { errno: u32, discard_payload_bytes: u32 },
    /// `NBD_CMD_DISC`: finish outstanding requests, then close.
    Disconnect,
    /// A WRITE whose payload is over the limit: closing is the only safe
    /// answer, since skipping up to 4 GiB of payload is itself a DoS.
    CloseTooLarge { length: u32, max: u32 },
}

/// Command flags valid on each command (the spec: unknown or inapplicable
/// flags get `EINVAL`). FUA is valid on every command once
/// `NBD_FLAG_SEND_FUA` is advertised, which it always is here.
fn allowed_flags(command: u16) -> u16 {
    match command {
        wire::CMD_WRITE_ZEROES => wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE,
        _ => wire::CMD_FLAG_FUA,
    }
}

/// `offset + len <= size`, without overflow.
fn in_bounds(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

fn reply(errno: u32) -> Plan {
    Plan::Reply { errno, discard_payload_bytes: 0 }
}

pub(crate) fn plan(req: &RequestHeader, limits: &ExportLimits) -> Plan {
    let len = u64::from(req.length);
    let fua = req.flags & wire::CMD_FLAG_FUA != 0;
    let bad_flags = req.flags & !allowed_flags(req.command) != 0;
    let in_bounds = in_bounds(req.offset, len, limits.size_bytes);
    match req.command {
        wire::CMD_WRITE => {
            if req.length > limits.max_request_bytes {
                return Plan::CloseTooLarge { length: req.length, max: limits.max_request_bytes };
            }
            let errno = if bad_flags {
                wire::EINVAL
            } else if limits.read_only {
                wire::EPERM
            } else if !in_bounds {
                // The spec: ENOSPC for writes past the end of the device.
                wire::ENOSPC
            } else if req.length == 0 {
                0
            } else {
                return Plan::Execute(Action::Write { offset: req.offset, len: req.length, fua });
            };
            Plan::Reply { errno, discard_payload_bytes: req.length }
        }
        wire::CMD_READ => {
            if bad_flags || req.length > limits.max_request_bytes || !in_bounds {
                reply(wire::EINVAL)
            } else if req.length == 0 {
                reply(0)
            } else {
                Plan::Execute(Action::Read { offset: req.offset, len: req.length })
            }
        }
        wire::CMD_DISC => Plan::Disconnect,
        wire::CMD_FLUSH if bad_flags => reply(wire::EINVAL),
        wire::CMD_FLUSH => Plan::Execute(Action::Flush),
        wire::CMD_TRIM | wire::CMD_WRITE_ZEROES => {
            if bad_flags {
                reply(wire::EINVAL)
            } else if limits.read_only {
                reply(wire::EPERM)
            } else if !in_bounds {
                let is_zeroes = req.command == wire::CMD_WRITE_ZEROES;
                reply(if is_zeroes { wire::ENOSPC } else { wire::EINVAL })
            } else if req.length == 0 {
                reply(0)
            } else if req.command == wire::CMD_TRIM {
                Plan::Execute(Action::Trim { offset: req.offset, len, fua })
            } else {
                Plan::Execute(Action::WriteZeroes { offset: req.offset, len, fua })
            }
        }
        // CACHE is advertised as a no-op prefetch: nothing to warm here.
        wire::CMD_CACHE if bad_flags || !in_bounds => reply(wire::EINVAL),
        wire::CMD_CACHE => reply(0),
        // BLOCK_STATUS (no meta context can be negotiated), RESIZE and
        // anything unknown. None of them carries a payload without
        // extended headers, which are never negotiated.
        _ => reply(wire::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ExportLimits = ExportLimits { size_bytes: 1 << 20, max_request_bytes: 1 << 16, read_only: false };

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, command, cookie: 1, offset, length }
    }

    #[test]
    fn read_inside_export_executes() {
        assert_eq!(
            plan(&req(wire::CMD_READ, 0, 4096, 4096), &LIMITS),
            Plan::Execute(Action::Read { offset: 4096, len: 4096 })
        );
    }

    #[test]
    fn read_past_end_or_overflowing_is_einval() {
        assert_eq!(plan(&req(wire::CMD_READ, 0, (1 << 20) - 1, 2), &LIMITS), reply(wire::EINVAL));
        assert_eq!(plan(&req(wire::CMD_READ, 0, u64::MAX, 1), &LIMITS), reply(wire::EINVAL));
    }

    #[test]
    fn oversized_read_is_einval_but_oversized_write_closes() {
        assert_eq!(plan(&req(wire::CMD_READ, 0, 0, 1 << 17), &LIMITS), reply(wire::EINVAL));
        assert_eq!(
            plan(&req(wire::CMD_WRITE, 0, 0, 1 << 17), &LIMITS),
            Plan::CloseTooLarge { length: 1 << 17, max: 1 << 16 }
        );
    }

    #[test]
    fn rejected_write_discards_its_payload() {
        assert_eq!(
            plan(&req(wire::CMD_WRITE, 0, 1 << 20, 512), &LIMITS),
            Plan::Reply { errno: wire::ENOSPC, discard_payload_bytes: 512 }
        );
        assert_eq!(
            plan(&req(wire::CMD_WRITE, wire::CMD_FLAG_NO_HOLE, 0, 512), &LIMITS),
            Plan::Reply { errno: wire::EINVAL, discard_payload_bytes: 512 }
        );
        let ro = ExportLimits { read_only: true, ..LIMITS };
        assert_eq!(
            plan(&req(wire::CMD_WRITE, 0, 0, 512), &ro),
            Plan::Reply { errno: wire::EPERM, discard_payload_bytes: 512 }
        );
    }

    #[test]
    fn zero_length_requests_succeed_without_backend() {
        for cmd in [wire::CMD_READ, wire::CMD_TRIM, wire::CMD_WRITE_ZEROES, wire::CMD_CACHE] {
            assert_eq!(plan(&req(cmd, 0, 0, 0), &LIMITS), reply(0), "command {cmd}");
        }
        assert_eq!(plan(&req(wire::CMD_WRITE, 0, 0, 0), &LIMITS), Plan::Reply { errno: 0, discard_payload_bytes: 0 });
    }

    #[test]
    fn fua_is_accepted_everywhere_and_no_hole_only_on_write_zeroes() {
        assert_eq!(plan(&req(wire::CMD_FLUSH, wire::CMD_FLAG_FUA, 0, 0), &LIMITS), Plan::Execute(Action::Flush));
        assert_eq!(
            plan(&req(wire::CMD_WRITE_ZEROES, wire::CMD_FLAG_NO_HOLE, 0, 10), &LIMITS),
            Plan::Execute(Action::WriteZeroes { offset: 0, len: 10, fua: false })
        );
        assert_eq!(plan(&req(wire::CMD_TRIM, wire::CMD_FLAG_NO_HOLE, 0, 10), &LIMITS), reply(22));
        // FAST_ZERO (bit 4) is not advertised.
        assert_eq!(plan(&req(wire::CMD_WRITE_ZEROES, 1 << 4, 0, 10), &LIMITS), reply(22));
    }

    #[test]
    fn unknown_and_block_status_commands_are_einval() {
        for cmd in [7u16, 8, 9, 0xffff] {
            assert_eq!(plan(&req(cmd, 0, 0, 0), &LIMITS), reply(wire::EINVAL));
        }
    }

    #[test]
    fn trim_and_zeroes_may_exceed_max_request_bytes() {
        assert_eq!(
            plan(&req(wire::CMD_TRIM, 0, 0, 1 << 20), &LIMITS),
            Plan::Execute(Action::Trim { offset: 0, len: 1 << 20, fua: false })
        );
    }
}
