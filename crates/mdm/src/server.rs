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
use tessera_core::recovery::liveness_commands;
use tessera_proto::auth::authenticate_server;
use tessera_proto::control::{
    ControlError, ControlRequest, ControlResponse, HeartbeatReply, MdmMember, RebuildProgress, StateView,
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
    /// Latest progress of each back-fill job, by (pool, pg, target SDS).
    rebuilds: HashMap<(u64, u32, u64), RebuildProgress>,
    /// Bytes copied by back-fill since this MDM became leader, and recent samples of it
    /// (time ms, total) for the rate.
    rebuild_bytes_total: u64,
    rebuild_samples: std::collections::VecDeque<(u64, u64)>,
    /// Last probe time per SDS, to rate-limit reports of unreachable SDSs.
    last_probe_ms: HashMap<u64, u64>,
    /// Recent samples (time ms, PGs re-mirroring), for the PG completion rate behind the ETA.
    syncing_samples: std::collections::VecDeque<(u64, u64)>,
    /// Most PGs re-mirroring at once since none were (the size of the current episode).
    syncing_peak: u64,
}

/// Window over which the rebuild rate is averaged.
const REBUILD_RATE_WINDOW_MS: u64 = 5_000;
/// How often the leader checks leases and plans rebalance moves.
const FAILURE_DETECTOR_INTERVAL: Duration = Duration::from_millis(250);
/// An SDS is probed at most this often on reports that it is unreachable.
const PROBE_INTERVAL_MS: u64 = 500;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl SoftState {
    fn record_rebuilds(&mut self, now_ms: u64, sds_jobs: Vec<RebuildProgress>) {
        for job in sds_jobs {
            let key = (job.pool_id, job.pg_id, job.target_sds_id);
            let before = self.rebuilds.get(&key).map_or(0, |j| j.bytes_copied);
            self.rebuild_bytes_total += job.bytes_copied.saturating_sub(before);
            self.rebuilds.insert(key, job);
        }
        self.rebuild_samples.push_back((now_ms, self.rebuild_bytes_total));
        while self.rebuild_samples.front().is_some_and(|(t, _)| now_ms.saturating_sub(*t) > REBUILD_RATE_WINDOW_MS) {
            self.rebuild_samples.pop_front();
        }
    }

    fn record_syncing(&mut self, now_ms: u64, pgs_syncing: u64) {
        self.syncing_peak = if pgs_syncing == 0 { 0 } else { self.syncing_peak.max(pgs_syncing) };
        self.syncing_samples.push_back((now_ms, pgs_syncing));
        while self.syncing_samples.front().is_some_and(|(t, _)| now_ms.saturating_sub(*t) > REBUILD_RATE_WINDOW_MS) {
            self.syncing_samples.pop_front();
        }
    }

    /// Seconds until no PG is re-mirroring, at the rate PGs completed over the window.
    fn rebuild_eta_seconds(&self) -> Option<u64> {
        let ((t0, p0), (t1, p1)) = (self.syncing_samples.front()?, self.syncing_samples.back()?);
        if *p1 == 0 || p0 <= p1 || t1 <= t0 {
            return None;
        }
        let per_sec = (p0 - p1) as f64 * 1000.0 / (t1 - t0) as f64;
        Some((*p1 as f64 / per_sec).ceil() as u64)
    }

    fn rebuild_rate_bytes_per_sec(&self) -> u64 {
        match (self.rebuild_samples.front(), self.rebuild_samples.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => (b1 - b0) * 1000 / (t1 - t0),
            _ => 0,
        }
    }
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
                // Only jobs for PGs still syncing count; finished ones linger until forgotten.
                let live_jobs = soft.rebuilds.iter().filter(|((pool, pg, target), _)| {
                    d.state
                        .pools
                        .get(pool)
                        .and_then(|p| p.pgs.get(*pg as usize))
                        .is_some_and(|g| g.syncing.contains(target))
                });
                let remaining = live_jobs.map(|(_, j)| j.extents_total.saturating_sub(j.extents_done)).sum();
                ControlResponse::Status(cluster_status(StatusInputs {
                    state: &d.state,
                    state_version: d.last_applied.map_or(0, |l| l.index),
                    leases: &soft.leases,
                    lease_duration_ms: self.cfg.lease_duration_ms,
                    now_ms: self.now_ms(),
                    used_extents_by_device: &soft.used_extents_by_device,
                    members,
                    leader_id,
                    rebuild_extents_remaining: remaining,
                    rebuild_bytes_copied: soft.rebuild_bytes_total,
                    rebuild_rate_bytes_per_sec: soft.rebuild_rate_bytes_per_sec(),
                    rebuild_eta_seconds: soft.rebuild_eta_seconds(),
                    rebuild_pgs_in_episode: soft.syncing_peak,
                }))
            }
            ControlRequest::WaitForChange { after_version, timeout_ms } => {
                let mut rx = self.sm.version.subscribe();
                let wait = Duration::from_millis(timeout_ms.min(tessera_proto::control::MAX_WAIT_FOR_CHANGE_MS));
                let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v > after_version)).await;
                let current = *rx.borrow();
                ControlResponse::Version(current)
            }
            ControlRequest::ReportUnreachable { sds_id } => {
                self.probe(sds_id).await;
                ControlResponse::Reported
            }
            ControlRequest::SdsHeartbeat { sds_id, devices, rebuilds } => {
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
                soft.record_rebuilds(now, rebuilds);
                ControlResponse::Heartbeat(HeartbeatReply {
                    lease_duration_ms: self.cfg.lease_duration_ms,
                    state_version,
                })
            }
        }
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.cfg.id)
    }

    /// Checks an SDS reported unreachable. A refused connection proves its process is gone
    /// (an SDS never closes its listener while it runs), so it can be replaced at once
    /// without waiting for its lease; anything else (timeout) proves nothing.
    async fn probe(&self, sds_id: u64) {
        if !self.is_leader() {
            return;
        }
        let now = self.now_ms();
        {
            let mut soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
            let last = soft.last_probe_ms.get(&sds_id).copied();
            if last.is_some_and(|t| now.saturating_sub(t) < PROBE_INTERVAL_MS) {
                return;
            }
            soft.last_probe_ms.insert(sds_id, now);
        }
        let Some(addr) = self.sm.data.read().await.state.sdss.get(&sds_id).map(|s| s.data_address.clone()) else {
            return;
        };
        let refused = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(&addr)).await,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
        );
        if refused {
            tracing::warn!(sds_id, %addr, "SDS reported unreachable and its port refuses connections: declaring it dead");
            self.soft.lock().unwrap_or_else(|p| p.into_inner()).leases.prove_dead(sds_id);
        }
    }

    /// One pass of the rebalancer: start the moves drains and balance call for.
    async fn rebalance(&self) {
        if !self.is_leader() {
            return;
        }
        let moves = {
            let Ok(d) = self.sm.data.try_read() else { return };
            tessera_core::rebalance::next_moves(&d.state)
        };
        for cmd in moves {
            match self.raft.client_write(cmd.clone()).await {
                Ok(r) if r.data.is_ok() => tracing::info!("rebalance: {cmd:?}"),
                Ok(r) => tracing::debug!("rebalance move refused: {:?}", r.data),
                Err(e) => tracing::warn!("rebalance move not committed: {e}"),
            }
        }
    }

    /// One pass of the failure detector: commit liveness changes the leases call for.
    async fn detect_failures(&self) {
        let now = self.now_ms();
        let leader = self.is_leader();
        let commands = {
            let mut soft = self.soft.lock().unwrap_or_else(|p| p.into_inner());
            soft.leases.set_leader(leader, now);
            if !leader {
                return;
            }
            let state = self.sm.data.try_read().map(|d| d.state.clone());
            let Ok(state) = state else { return };
            let syncing = state.pools.values().flat_map(|p| p.pgs.iter()).filter(|pg| !pg.syncing.is_empty()).count();
            soft.record_syncing(now, syncing as u64);
            let duration = self.cfg.lease_duration_ms;
            liveness_commands(&state, |id| soft.leases.status(id, now, duration))
        };
        for cmd in commands {
            tracing::warn!("failure detector: {cmd:?}");
            match self.raft.client_write(cmd.clone()).await {
                Ok(r) if r.data.is_ok() => tracing::info!("committed {cmd:?}"),
                Ok(r) => tracing::warn!("{cmd:?} refused: {:?}", r.data),
                Err(e) => tracing::warn!("{cmd:?} not committed: {e}"),
            }
        }
    }
}

/// The leader's periodic duties: liveness first, then rebalance moves.
async fn failure_detector(mdm: Arc<Mdm>) {
    loop {
        tokio::time::sleep(FAILURE_DETECTOR_INTERVAL).await;
        mdm.detect_failures().await;
        mdm.rebalance().await;
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
    // Bounds the requests one connection has in progress (and the memory it can pin).
    let slots = Arc::new(Semaphore::new(tessera_proto::rpc::MAX_INFLIGHT_PER_CONNECTION));
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
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mdm = mdm.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let _slot = slot;
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
    let log_store =
        LogStore::open(&raft_dir).with_context(|| format!("opening the Raft log in {}", raft_dir.display()))?;
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
    tokio::spawn(failure_detector(mdm.clone()));
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
