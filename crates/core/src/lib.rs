//! Tessera's core: the cluster model, the commands that change it, placement, extent
//! layout and leases. Everything here is pure — no I/O, no clocks, no randomness — so the
//! same code runs in the daemons and under a seeded simulation.

pub mod command;
pub mod deploy;
pub mod error;
pub mod flush;
pub mod layout;
pub mod lease;
pub mod model;
pub mod names;
pub mod placement;
pub mod rebalance;
pub mod recovery;
#[cfg(test)]
mod testkit;
pub mod units;

pub use command::{Command, CommandOutcome};
pub use error::CoreError;
pub use model::*;
