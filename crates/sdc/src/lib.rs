//! The storage data client (SDC): sends volume IO straight to PG primaries and exports
//! mapped volumes over NBD. The MDM is asked only for maps — at first use, and again
//! when an SDS refuses a request for a stale epoch.

pub mod client;
pub mod daemon;
pub mod export;
pub mod verify;

pub use daemon::{run_sdc, SdcConfig};
