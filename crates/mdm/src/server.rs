//! The MDM daemon: openraft node + control API on an authenticated TCP port.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::BasicNode;
use tessera_core::lease::{LeaseTable, DEFAULT_LEASE_DURATION_MS};
use tessera_proto::auth::authenticate_server;
use tessera_proto::control::{
    ControlError, ControlRequest, ControlResponse, HeartbeatReply, MdmMember, StateView,
};
use tessera_proto::data::{kind, status};
use tessera_proto::rpc::{read_request, spawn_response_writer, OutFrame};
use tessera_proto::ClusterSecret;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::log_store::LogStore;
use crate::network::MdmNetwork;
use crate::state_machine::StateMachineStore;
use crate::status::{cluster_status, StatusInputs};
use crate::Raft;

/// Control connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONTROL_CONNECTIONS: usize = 1024;
/// Largest control request accepted (a command is tiny; this is generous).
pub const MAX_CONTROL_REQUEST_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct MdmConfig {
    pub id: u64,
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub secret: ClusterSecret,
    pub lease_duration_ms: u64,
}

impl MdmConfig {
    pub fn new(id: u64, dir: PathBuf, listen: SocketAddr, secret: ClusterSecret) -> Self {
        MdmConfig { id, dir, listen, secret, lease_duration_ms: DEFAULT_LEASE_DURATION_MS }
    }
}

/// State only the leader needs and that is rebuilt from heartbeats after a failover, so it
/// is not replicated: leases and device usage.
#[derive(Default)]
struct SoftState {
    leases: LeaseTable,
    used_extents_by_device: HashMap<u64, u64>,
}

struct Mdm {
    cfg: MdmConfig,
    raft: Raft,
    sm: StateMachineStore,
    soft: Mutex<SoftState>,
    started: Instant,
}

impl Mdm {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn members(&self) -> (Vec<MdmMember>, Option<u64>) {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader;
        let members = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, node)| MdmMember {
                id: *id,
                address: node.addr.clone(),
                role: "manager".to_string(),
                is_leader: Some(*id) == leader,
            })
            .collect();
        (members, leader)
    }

    async fn handle(&self, req: ControlRequest) -> ControlResponse {
        match req {
            ControlRequest::Execute(cmd) => match self.raft.client_write(cmd).await {
                Ok(resp) => match resp.data {
                    Ok(applied) => ControlResponse::Applied(applied),
                    Err(refused) => ControlResponse::Error(ControlError::Refused(refused)),
                },
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    ControlResponse::Error(ControlError::NotLeader { leader: f.leader_node.map(|n| n.addr) })
                }
                Err(e) => ControlResponse::Error(ControlError::Unavailable(e.to_string())),
            },
            ControlRequest::GetState => {
                if let Err(e) = self.raft.ensure_linearizable().await {
                    return not_leader_or_unavailable(e);
                }
                let d = self.sm.data.read().await;
                ControlResponse::State(StateView {
                    version: d.last_applied.map_or(0, |l| l.index),
                    state: d.state.clone(),
                })
            }
            ControlRequest::Status => {
                if let Err(e) = self.raft.ensure_linearizable().await {
                    return not_leader_or_unavailable(e);
                }
                let (members, leader_id) = self.members();
                let d = self.sm.data.read().await;
                let soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
                ControlResponse::Status(cluster_status(StatusInputs {
                    state: &d.state,
                    state_version: d.last_applied.map_or(0, |l| l.index),
                    leases: &soft.leases,
                    now_ms: self.now_ms(),
                    used_extents_by_device: &soft.used_extents_by_device,
                    members,
                    leader_id,
                }))
            }
            ControlRequest::SdsHeartbeat { sds_id, devices } => {
                if !self.is_leader() {
                    let (members, leader) = self.members();
                    let leader_addr = members.into_iter().find(|m| Some(m.id) == leader).map(|m| m.address);
                    return ControlResponse::Error(ControlError::NotLeader { leader: leader_addr });
                }
                let d = self.sm.data.read().await;
                if !d.state.sdss.contains_key(&sds_id) {
                    return ControlResponse::Error(ControlError::Refused(tessera_core::CoreError::not_found(
                        "SDS",
                        &sds_id.to_string(),
                    )));
                }
                let state_version = d.last_applied.map_or(0, |l| l.index);
                drop(d);
                let now = self.now_ms();
                let mut soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
                soft.leases.renew(sds_id, now, self.cfg.lease_duration_ms);
                for u in devices {
                    soft.used_extents_by_device.insert(u.device_id, u.used_extents);
                }
                ControlResponse::Heartbeat(HeartbeatReply { lease_duration_ms: self.cfg.lease_duration_ms, state_version })
            }
        }
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.cfg.id)
    }
}

fn not_leader_or_unavailable(e: RaftError<u64, CheckIsLeaderError<u64, BasicNode>>) -> ControlResponse {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
            ControlResponse::Error(ControlError::NotLeader { leader: f.leader_node.map(|n| n.addr) })
        }
        other => ControlResponse::Error(ControlError::Unavailable(other.to_string())),
    }
}

async fn serve_connection(mdm: Arc<Mdm>, mut stream: TcpStream, peer: SocketAddr) {
    if let Err(e) = authenticate_server(&mut stream, &mdm.cfg.secret).await {
        tracing::warn!(%peer, "control connection refused: {e}");
        return;
    }
    stream.set_nodelay(true).ok();
    let (read_half, write_half) = stream.into_split();
    let replies = spawn_response_writer(write_half);
    let mut reader = tokio::io::BufReader::new(read_half);
    loop {
        let (header, payload) = match read_request(&mut reader).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%peer, "closing control connection: {e}");
                return;
            }
        };
        if header.kind != kind::CONTROL {
            let _ = replies.send(OutFrame::reply(&header, status::UNKNOWN_KIND, Vec::new())).await;
            continue;
        }
        let mdm = mdm.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let response = if payload.len() > MAX_CONTROL_REQUEST_BYTES {
                ControlResponse::Error(ControlError::BadRequest("request too large".into()))
            } else {
                match serde_json::from_slice::<ControlRequest>(&payload) {
                    Ok(req) => mdm.handle(req).await,
                    Err(e) => ControlResponse::Error(ControlError::BadRequest(e.to_string())),
                }
            };
            let body = serde_json::to_vec(&response).unwrap_or_default();
            let _ = replies.send(OutFrame::reply(&header, status::OK, body)).await;
        });
    }
}

/// Runs an MDM until the process is stopped. A brand-new MDM initialises a single-voter
/// cluster with itself as the only member.
pub async fn run_mdm(cfg: MdmConfig) -> anyhow::Result<()> {
    let raft_dir = cfg.dir.join("raft");
    let log_store = LogStore::open(&raft_dir).with_context(|| format!("opening the Raft log in {}", raft_dir.display()))?;
    let sm = StateMachineStore::open(&raft_dir).context("opening the state machine")?;
    let pristine = log_store.is_pristine().await;
    let raft_config = openraft::Config {
        cluster_name: "tessera-mdm".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    let raft = Raft::new(cfg.id, Arc::new(raft_config.validate()?), MdmNetwork, log_store, sm.clone())
        .await
        .context("starting Raft")?;
    if pristine {
        let members = BTreeMap::from([(cfg.id, BasicNode { addr: cfg.listen.to_string() })]);
        raft.initialize(members).await.context("initialising the MDM cluster")?;
        tracing::info!(id = cfg.id, "initialised a new single-node MDM cluster");
    }
    let listener = TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    tracing::info!(addr = %cfg.listen, "MDM listening");
    let mdm = Arc::new(Mdm { cfg, raft, sm, soft: Mutex::new(SoftState::default()), started: Instant::now() });
    let slots = Arc::new(Semaphore::new(MAX_CONTROL_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { continue };
        let mdm = mdm.clone();
        tokio::spawn(async move {
            serve_connection(mdm, stream, peer).await;
            drop(slot);
        });
    }
}
