//! Raft transport between MDMs.
//!
//! With a single voter (the only mode built so far) openraft never sends a Raft RPC, so
//! every peer is reported unreachable. The multi-MDM modes replace this with RPCs over the
//! same authenticated frames as the control API.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;

use crate::TypeConfig;

type NodeId = u64;

pub struct MdmNetwork;

pub struct PeerLink {
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for MdmNetwork {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> PeerLink {
        PeerLink { target }
    }
}

impl PeerLink {
    fn unreachable(&self) -> Unreachable {
        Unreachable::new(&std::io::Error::other(format!(
            "MDM {}: no transport between MDMs in single-node mode",
            self.target
        )))
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }
}
