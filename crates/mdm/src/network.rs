//! Raft transport between MDMs: openraft's three RPCs as JSON in `kind::RAFT` frames, over
//! the same authenticated connections as the control API (so MDM-to-MDM traffic proves the
//! cluster secret like every other connection), served on each MDM's control port.
//!
//! Outgoing connections are made from the MDM's own listen address, so a peer (and a packet
//! filter partitioning the cluster) sees which MDM is talking.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};
use tessera_proto::data::{kind, status};
use tessera_proto::rpc::{RpcClient, RpcError};
use tessera_proto::ClusterSecret;

use crate::membership::MdmNode;
use crate::{Raft, TypeConfig};

type NodeId = u64;

/// One Raft RPC from one MDM to another, addressed to the receiver's id: an MDM reinstalled
/// under a new id at an old address must never answer (and lend its empty vote) for the id
/// that used to live there.
#[derive(Serialize, Deserialize)]
pub struct RaftEnvelope {
    pub target: NodeId,
    pub request: RaftRequest,
}

#[derive(Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// The answer, including the receiving node's own Raft error.
#[derive(Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// The request could not be decoded.
    BadRequest(String),
}

/// Serves one Raft RPC received on the control port by MDM `own_id`. `leader_contact` is
/// stamped whenever a leader's AppendEntries arrives (a follower's only sign that its leader
/// lives: openraft keeps reporting a dead leader as current until a new one is elected).
pub async fn serve_raft_request(
    raft: &Raft,
    own_id: NodeId,
    leader_contact: &LeaderContact,
    payload: &[u8],
) -> RaftReply {
    let envelope = match serde_json::from_slice::<RaftEnvelope>(payload) {
        Ok(e) => e,
        Err(e) => return RaftReply::BadRequest(e.to_string()),
    };
    if envelope.target != own_id {
        return RaftReply::BadRequest(format!("this is MDM {own_id}, not MDM {}", envelope.target));
    }
    match envelope.request {
        RaftRequest::AppendEntries(r) => {
            leader_contact.stamp();
            RaftReply::AppendEntries(raft.append_entries(r).await)
        }
        RaftRequest::Vote(r) => RaftReply::Vote(raft.vote(r).await),
        RaftRequest::InstallSnapshot(r) => {
            leader_contact.stamp();
            RaftReply::InstallSnapshot(raft.install_snapshot(r).await)
        }
    }
}

/// When a leader last sent this MDM entries or a heartbeat.
#[derive(Default, Clone)]
pub struct LeaderContact {
    last: Arc<Mutex<Option<Instant>>>,
}

impl LeaderContact {
    fn stamp(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Heard from a leader within `window`.
    pub fn within(&self, window: Duration) -> bool {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| t.elapsed() <= window)
    }
}

/// When this MDM last reached each peer, and the last error: what `cluster status` shows
/// as a member's health. Only the leader talks to every member, so only its view is whole.
#[derive(Default, Clone)]
pub struct PeerContacts {
    inner: Arc<Mutex<HashMap<NodeId, Contact>>>,
}

#[derive(Default, Clone, Debug)]
pub struct Contact {
    pub last_ok: Option<Instant>,
    pub last_error: Option<String>,
}

impl PeerContacts {
    fn record(&self, target: NodeId, result: Result<(), String>) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let c = map.entry(target).or_default();
        match result {
            Ok(()) => {
                c.last_ok = Some(Instant::now());
                c.last_error = None;
            }
            Err(e) => c.last_error = Some(e),
        }
    }

    pub fn get(&self, target: NodeId) -> Contact {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).get(&target).cloned().unwrap_or_default()
    }

    /// Answered within `window`.
    pub fn reached_within(&self, target: NodeId, window: Duration) -> bool {
        self.get(target).last_ok.is_some_and(|t| t.elapsed() <= window)
    }
}

pub struct MdmNetwork {
    pub secret: ClusterSecret,
    /// Local address outgoing connections are made from (`None`: the kernel's choice).
    pub bind: Option<IpAddr>,
    pub contacts: PeerContacts,
}

pub struct PeerLink {
    target: NodeId,
    addr: String,
    secret: ClusterSecret,
    bind: Option<IpAddr>,
    conn: Option<RpcClient>,
    contacts: PeerContacts,
}

impl RaftNetworkFactory<TypeConfig> for MdmNetwork {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &MdmNode) -> PeerLink {
        PeerLink {
            target,
            addr: node.addr.clone(),
            secret: self.secret.clone(),
            bind: self.bind,
            conn: None,
            contacts: self.contacts.clone(),
        }
    }
}

/// Why a Raft RPC did not get an answer from the peer's Raft.
enum LinkError {
    /// Could not connect: openraft backs off before trying again.
    Unreachable(String),
    /// Connected, then lost the connection or timed out: retried at once.
    Network(String),
}

impl LinkError {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<NodeId, MdmNode, E> {
        match self {
            LinkError::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&std::io::Error::other(m))),
            LinkError::Network(m) => RPCError::Network(NetworkError::new(&std::io::Error::other(m))),
        }
    }
}

impl PeerLink {
    async fn call(&mut self, request: RaftRequest, ttl: Duration) -> Result<RaftReply, LinkError> {
        let result = self.call_once(request, ttl).await;
        let recorded = match &result {
            Ok(_) => Ok(()),
            Err(LinkError::Unreachable(m) | LinkError::Network(m)) => Err(m.clone()),
        };
        self.contacts.record(self.target, recorded);
        result
    }

    async fn call_once(&mut self, request: RaftRequest, ttl: Duration) -> Result<RaftReply, LinkError> {
        let envelope = RaftEnvelope { target: self.target, request };
        let body = serde_json::to_vec(&envelope).map_err(|e| LinkError::Network(e.to_string()))?;
        let conn = match &self.conn {
            Some(c) if !c.is_closed() => c.clone(),
            _ => {
                let connect = RpcClient::connect_from(&self.addr, self.bind, &self.secret);
                let c = tokio::time::timeout(ttl, connect)
                    .await
                    .map_err(|_| {
                        LinkError::Unreachable(format!("connecting to MDM {} at {} timed out", self.target, self.addr))
                    })?
                    .map_err(|e| LinkError::Unreachable(format!("MDM {}: {e}", self.target)))?;
                self.conn = Some(c.clone());
                c
            }
        };
        let reply = match conn.call(kind::RAFT, &[&body], ttl).await {
            Ok(r) => r,
            Err(e) => {
                self.conn = None;
                return Err(match e {
                    RpcError::Timeout(_) => {
                        LinkError::Network(format!("MDM {} did not answer in {ttl:?}", self.target))
                    }
                    other => LinkError::Network(format!("MDM {}: {other}", self.target)),
                });
            }
        };
        if reply.status != status::OK {
            return Err(LinkError::Network(format!(
                "MDM {} answered status {}",
                self.target,
                status::name(reply.status)
            )));
        }
        match serde_json::from_slice::<RaftReply>(&reply.payload) {
            Ok(RaftReply::BadRequest(m)) => {
                Err(LinkError::Network(format!("MDM {} refused the request: {m}", self.target)))
            }
            Ok(r) => Ok(r),
            Err(e) => Err(LinkError::Network(format!("MDM {} sent a bad reply: {e}", self.target))),
        }
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<NodeId, MdmNode, E> {
        LinkError::Network(format!("MDM {} answered a different RPC", self.target)).into_rpc()
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MdmNode, RaftError<NodeId>>> {
        match self.call(RaftRequest::AppendEntries(rpc), option.hard_ttl()).await {
            Ok(RaftReply::AppendEntries(r)) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(self.unexpected()),
            Err(e) => Err(e.into_rpc()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, MdmNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        match self.call(RaftRequest::InstallSnapshot(rpc), option.hard_ttl()).await {
            Ok(RaftReply::InstallSnapshot(r)) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(self.unexpected()),
            Err(e) => Err(e.into_rpc()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MdmNode, RaftError<NodeId>>> {
        match self.call(RaftRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(RaftReply::Vote(r)) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(self.unexpected()),
            Err(e) => Err(e.into_rpc()),
        }
    }
}
