//! The metadata manager (MDM): holds the cluster model as an openraft state machine and
//! serves the control API. It is never in the data path: SDCs and SDSs fetch maps from it
//! and then talk to each other directly.

pub mod durable_file;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod server;
pub mod state_machine;
pub mod status;

use std::io::Cursor;

openraft::declare_raft_types!(
    /// Raft types of the MDM: log entries carry [`tessera_core::Command`]s.
    pub TypeConfig:
        D = tessera_core::Command,
        R = tessera_core::CommandOutcome,
        NodeId = u64,
        Node = membership::MdmNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

pub use server::{run_mdm, MdmConfig};
