//! `tessera-nbd`: an NBD server (fixed newstyle, simple replies) that
//! serves exports from any [`BlockBackend`].
//!
//! Protocol reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.
//! Clients it is tested against: `nbdinfo`, `nbdcopy`, `qemu-img`, `fio
//! --ioengine=nbd`.
//!
//! Scope, on purpose:
//! * Handshake: fixed newstyle only; `EXPORT_NAME`, `ABORT`, `LIST`,
//!   `INFO`, `GO`. `STARTTLS` is refused by policy; structured replies,
//!   meta contexts and extended headers are answered `ERR_UNSUP`, so
//!   clients fall back to simple replies.
//! * Transmission: READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES, CACHE
//!   (a bounds-checked no-op). BLOCK_STATUS and unknown commands get
//!   `EINVAL`. `FAST_ZERO` is not advertised.
//!
//! Code map:
//! * [`wire`] — constants and pure encode/decode; no I/O.
//! * `request` — what to do with one request header (pure).
//! * `handshake` — option haggling (I/O shell over `wire`).
//! * `transmission` — reader / per-request tasks / writer.
//! * `pool` — recycled payload buffers.
//! * `server` — `serve_connection`, accept loops.
//!
//! Invariants: client input never panics the server; every accepted request
//! gets exactly one reply; the backend only sees in-bounds, non-empty
//! ranges; everything a client controls is bounded (option size and count,
//! handshake time, request size, requests and bytes in flight, connections).

mod backend;
mod config;
mod error;
mod handshake;
mod pool;
mod request;
mod server;
mod transmission;
pub mod wire;

pub use backend::{BlockBackend, ExportRegistry, IoError};
pub use config::{ServerConfig, MIN_MAX_REQUEST_BYTES};
pub use error::NbdError;
pub use server::{serve_connection, serve_tcp, serve_unix};
