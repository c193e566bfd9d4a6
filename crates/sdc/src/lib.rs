//! The storage data client (SDC): sends volume IO straight to PG primaries and exports
//! mapped volumes over NBD, holding each volume's IO to its limits (`qos.rs`). The MDM is
//! asked only for maps — at first use, when an SDS refuses a request for a stale epoch, and
//! whenever a long poll says the map changed.

pub mod client;
pub mod daemon;
pub mod export;
pub mod extents;
pub mod qos;
pub mod verify;

pub use daemon::{run_sdc, SdcConfig};
