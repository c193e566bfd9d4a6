//! The storage data server (SDS): owns devices, stores extents, serves the data protocol,
//! and — as a PG primary — replicates every write to the PG's secondary before acking.

pub mod daemon;
pub mod device;
pub mod devices;
pub mod intent;
pub mod io_pool;
pub mod map;
pub mod range_lock;
pub mod rebuild;
pub mod server;

pub use daemon::{run_sds, SdsConfig};
