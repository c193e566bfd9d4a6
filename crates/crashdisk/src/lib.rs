//! `tessera-crashdisk`: a FUSE file system whose files behave like disks
//! with a volatile write cache, so that tests can cut the power.
//!
//! A killed process never loses the page cache, so killing daemons shows
//! nothing of what a power cut does. Here every file of a backing directory
//! is served at a mount point; writes, punches and zeroings stay in the
//! daemon's memory until the file is flushed (`fsync`/`fdatasync`), and a
//! control command throws them away (`cut F drop`) or keeps a seeded random
//! subset of their sectors (`cut F torn SEED`). Files can also fail I/O with
//! `EIO` on command, or hang: their ops are parked, unanswered, until
//! released. See `docs/crashdisk.md` for how tests use it.
//!
//! Code map:
//! * [`cache`] — the write-cache model of one file over a [`cache::Backing`]
//!   trait; pure, tested against [`cache::MemBacking`].
//! * [`faults`] — fault rules of one file (pure).
//! * [`control`] — the control protocol: parse commands, format replies (pure).
//! * `backing` — [`cache::Backing`] over a real file (pread/pwrite/fallocate).
//! * `state` — the daemon's files, hung-op queues, and what each command does.
//! * `fs` — the FUSE shell (fuser `Filesystem`): kernel requests to state steps.
//! * `daemon` — arguments, mount, control socket, shutdown on SIGTERM/SIGINT.
//! * [`client`] — [`CrashDisk`], the handle tests start and drive it with.
//!
//! Invariants:
//! * The FUSE session loop never waits: a hung file's ops are closures that
//!   own their reply, queued and run in arrival order on `release`; every
//!   queue and cache is bounded (named constants), and a dropped reply is
//!   answered `EIO` by fuser, so the kernel never waits on a lost op.
//! * The kernel caches nothing: files are opened `FOPEN_DIRECT_IO` and
//!   attributes have a zero TTL, so after a cut a read sees what survived.
//! * What a read returns = backing file + pending ops in order; a flush
//!   makes exactly that durable; a failed flush loses the pending ops.
//! * Control input and kernel requests never panic the daemon: lines are
//!   bounded, every bad command gets `error REASON`.
//! * The control socket exists only once the mount is live: `ping`
//!   answering means ready.

pub mod cache;
pub mod client;
pub mod control;
pub mod faults;

mod backing;
mod daemon;
mod fs;
mod state;

pub use cache::{CutMode, MAX_PENDING_BYTES, MAX_PENDING_OPS, SECTOR_BYTES};
pub use client::CrashDisk;
pub use control::FileStats;
pub use daemon::main_entry;
pub use faults::FaultOp;
