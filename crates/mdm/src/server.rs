//! The MDM daemon: openraft node + control API on an authenticated TCP port.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, RaftMetrics};
use tessera_core::lease::{LeaseTable, DEFAULT_LEASE_DURATION_MS};
use tessera_core::recovery::liveness_commands;
use tessera_proto::auth::authenticate_server;
use tessera_proto::control::{
    ControlError, ControlRequest, ControlResponse, HeartbeatReply, MdmClusterStatus, MdmIdentity, MdmMember,
    RebuildProgress, StateView,
};
use tessera_proto::data::{kind, status};
use tessera_proto::rpc::{read_request, spawn_response_writer, OutFrame, RpcClient};
use tessera_proto::ClusterSecret;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::log_store::LogStore;
use crate::membership::{self, ClusterMode, MdmNode, MdmRole, Member};
use crate::network::{serve_raft_request, LeaderContact, MdmNetwork, PeerContacts};
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
    /// Fixed at install, as ScaleIO's `MDM_ROLE_IS_MANAGER`: a tiebreaker never campaigns
    /// (except as a last resort, see [`Mdm::keep_role`]).
    pub role: MdmRole,
    /// A brand-new standby waits to be added to a cluster instead of creating its own.
    pub standby: bool,
    /// A snapshot is taken every this many log entries, and the log before it purged
    /// (members too far behind then catch up from the snapshot).
    pub snapshot_every_logs: u64,
}

pub const DEFAULT_SNAPSHOT_EVERY_LOGS: u64 = 1000;

impl MdmConfig {
    pub fn new(id: u64, dir: PathBuf, listen: SocketAddr, secret: ClusterSecret) -> Self {
        MdmConfig {
            id,
            dir,
            listen,
            secret,
            lease_duration_ms: DEFAULT_LEASE_DURATION_MS,
            role: MdmRole::Manager,
            standby: false,
            snapshot_every_logs: DEFAULT_SNAPSHOT_EVERY_LOGS,
        }
    }
}

/// Raft timing. A follower campaigns after `leader lease (= election max) + a random
/// election timeout` without hearing from the leader: 2.1–2.8 s after a primary dies, well
/// inside an SDS lease (6 s), so SDSs renew with the new leader before they would fence.
pub const RAFT_HEARTBEAT_MS: u64 = 150;
pub const RAFT_ELECTION_MIN_MS: u64 = 700;
pub const RAFT_ELECTION_MAX_MS: u64 = 1400;
/// A metadata change not committed in this time is answered `Unavailable` (it may still
/// commit later if a quorum returns; every command is safe to retry or refused as a repeat).
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// A linearizable read (leadership confirmed by a quorum) not done in this time fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// A member that answered the leader within this window is reachable.
const REACHABLE_WINDOW: Duration = Duration::from_millis(2_000);
/// A leader whose last quorum acknowledgement is older than this refuses changes at once
/// instead of queueing entries that cannot commit.
pub const QUORUM_STALE_MS: u64 = 3 * RAFT_ELECTION_MAX_MS;
/// A tiebreaker campaigns only after this long without any leader (the surviving managers
/// lack the latest entries, which only it holds) and then hands leadership to a manager.
pub const TIEBREAKER_LAST_RESORT: Duration = Duration::from_secs(4);
/// A leader not heard from (no entries, no heartbeat) for this long counts as gone.
pub const LEADER_SILENCE: Duration = Duration::from_secs(2);
/// How long a leading tiebreaker waits for a manager to take over before trying again.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(4);
pub const ROLE_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How long a mode switch waits for its new members to answer before refusing.
pub const SWITCH_REACHABLE_WAIT: Duration = Duration::from_secs(10);

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
    contacts: PeerContacts,
    leader_contact: LeaderContact,
    /// Set while a leading tiebreaker hands leadership to a manager: it then takes no new
    /// work, so that nothing it does delays the manager's election.
    handing_over: AtomicBool,
}

impl Mdm {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn metrics(&self) -> RaftMetrics<u64, MdmNode> {
        self.raft.metrics().borrow().clone()
    }

    /// Every member with its role, vote and reachability as this MDM sees them. Only the
    /// leader hears from every member; a follower counts only itself and the leader.
    fn member_view(&self, m: &RaftMetrics<u64, MdmNode>) -> BTreeMap<u64, Member> {
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let leading = m.current_leader == Some(self.cfg.id);
        membership
            .nodes()
            .map(|(id, node)| {
                let reachable = *id == self.cfg.id
                    || if leading {
                        self.contacts.reached_within(*id, REACHABLE_WINDOW)
                    } else {
                        Some(*id) == m.current_leader
                    };
                (*id, Member { node: node.clone(), voter: voters.contains(id), reachable })
            })
            .collect()
    }

    fn cluster_view(&self) -> MdmClusterStatus {
        let m = self.metrics();
        let view = self.member_view(&m);
        let leader = m.current_leader;
        let voters = view.values().filter(|x| x.voter).count();
        let voters_reachable = view.values().filter(|x| x.voter && x.reachable).count();
        let state = if leader.is_none() || voters_reachable * 2 <= voters {
            "no_quorum"
        } else if voters_reachable < voters || view.values().any(|x| !x.reachable) {
            "degraded"
        } else {
            "normal"
        };
        let members = view
            .iter()
            .map(|(id, x)| MdmMember {
                id: *id,
                address: x.node.addr.clone(),
                role: x.node.role.as_str().to_string(),
                is_leader: Some(*id) == leader,
                status: match (Some(*id) == leader, x.voter, x.node.role) {
                    (true, _, _) => "primary",
                    (false, false, _) => "standby",
                    (false, true, MdmRole::Manager) => "secondary",
                    (false, true, MdmRole::Tiebreaker) => "tiebreaker",
                }
                .to_string(),
                voter: x.voter,
                reachable: x.reachable,
                matched_index: if *id == self.cfg.id {
                    m.last_log_index
                } else {
                    m.replication.as_ref().and_then(|r| r.get(id).copied().flatten()).map(|l| l.index)
                },
            })
            .collect();
        MdmClusterStatus {
            mode: membership::mode_name(&view),
            state: state.to_string(),
            leader_id: leader,
            voters,
            voters_reachable,
            members,
        }
    }

    fn not_leader(&self) -> ControlResponse {
        let m = self.metrics();
        let leader = m.current_leader.filter(|l| *l != self.cfg.id);
        let addr = leader.and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()));
        ControlResponse::Error(ControlError::NotLeader { leader: addr })
    }

    /// Refuses a change at once when this leader has not heard from a quorum lately: the
    /// entry could not commit, and queueing it would only make the client wait.
    fn check_quorum(&self) -> Result<(), ControlError> {
        let m = self.metrics();
        if m.current_leader != Some(self.cfg.id) {
            return Ok(()); // client_write answers ForwardToLeader
        }
        let voters = m.membership_config.membership().voter_ids().count();
        let view = self.member_view(&m);
        let reachable = view.values().filter(|x| x.voter && x.reachable).count();
        let quorum_stale = m.millis_since_quorum_ack.is_none_or(|ms| ms > QUORUM_STALE_MS);
        if voters > 1 && (quorum_stale || reachable * 2 <= voters) {
            return Err(ControlError::Unavailable(format!(
                "no quorum of MDMs: {reachable} of {voters} voting members reachable; \
                 metadata changes are refused until a member returns"
            )));
        }
        Ok(())
    }

    async fn write(&self, cmd: tessera_core::Command) -> ControlResponse {
        if self.handing_over.load(Ordering::Acquire) {
            return ControlResponse::Error(handing_over());
        }
        if let Err(refused) = self.check_quorum() {
            return ControlResponse::Error(refused);
        }
        match tokio::time::timeout(COMMIT_TIMEOUT, self.raft.client_write(cmd)).await {
            Err(_) => ControlResponse::Error(ControlError::Unavailable(format!(
                "the change was not committed within {COMMIT_TIMEOUT:?}: no quorum of MDMs answered \
                 (it may still apply if they return)"
            ))),
            Ok(Ok(resp)) => match resp.data {
                Ok(applied) => ControlResponse::Applied(applied),
                Err(refused) => ControlResponse::Error(ControlError::Refused(refused)),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                ControlResponse::Error(ControlError::NotLeader { leader: f.leader_node.map(|n| n.addr) })
            }
            Ok(Err(e)) => ControlResponse::Error(ControlError::Unavailable(e.to_string())),
        }
    }

    /// Confirms leadership with a quorum, so that what is read next is current.
    async fn confirm_leadership(&self) -> Result<(), ControlError> {
        if self.handing_over.load(Ordering::Acquire) {
            return Err(handing_over());
        }
        match tokio::time::timeout(READ_TIMEOUT, self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(match not_leader_or_unavailable(e) {
                // openraft's own message lists the whole membership; say it plainly.
                ControlError::Unavailable(detail) => self.check_quorum().err().unwrap_or(ControlError::Unavailable(
                    format!("leadership not confirmed by a quorum of MDMs: {detail}"),
                )),
                other => other,
            }),
            Err(_) => Err(ControlError::Unavailable(format!(
                "leadership not confirmed by a quorum of MDMs within {READ_TIMEOUT:?}"
            ))),
        }
    }

    async fn handle(&self, req: ControlRequest) -> ControlResponse {
        match req {
            ControlRequest::Execute(cmd) => self.write(cmd).await,
            ControlRequest::Identity => ControlResponse::Identity(MdmIdentity {
                id: self.cfg.id,
                address: self.cfg.listen.to_string(),
                role: self.cfg.role.as_str().to_string(),
                members: self.metrics().membership_config.membership().nodes().count(),
            }),
            ControlRequest::LocalState => {
                let d = self.sm.data.read().await;
                ControlResponse::State(StateView {
                    version: d.last_applied.map_or(0, |l| l.index),
                    state: d.state.clone(),
                })
            }
            ControlRequest::AddMdm { address, expect_id } => self.add_mdm(address, expect_id).await,
            ControlRequest::RemoveMdm { id } => self.remove_mdm(id).await,
            ControlRequest::SwitchClusterMode { mode, managers, tiebreakers } => {
                self.switch_mode(&mode, managers, tiebreakers).await
            }
            ControlRequest::Campaign => {
                let m = self.metrics();
                let voter = m.membership_config.membership().voter_ids().any(|v| v == self.cfg.id);
                if voter && self.cfg.role == MdmRole::Manager && m.current_leader != Some(self.cfg.id) {
                    tracing::info!("asked by the leading tiebreaker to take over: campaigning");
                    let _ = self.raft.trigger().elect().await;
                }
                ControlResponse::Done
            }
            ControlRequest::GetState => {
                if let Err(refused) = self.confirm_leadership().await {
                    return ControlResponse::Error(refused);
                }
                let d = self.sm.data.read().await;
                ControlResponse::State(StateView {
                    version: d.last_applied.map_or(0, |l| l.index),
                    state: d.state.clone(),
                })
            }
            ControlRequest::Status => {
                // A leader that a quorum no longer confirms says so (with how many voters it
                // still reaches) rather than answering from a view that may be stale; the
                // client then asks the other MDMs.
                if let Err(refused) = self.confirm_leadership().await {
                    return ControlResponse::Error(self.check_quorum().err().unwrap_or(refused));
                }
                let mdm = self.cluster_view();
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
                    mdm,
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
                    return self.not_leader();
                }
                // A lease may only be granted by a leader that a quorum still follows, and
                // confirmed after the heartbeat was sent: then any newer leader is elected
                // later, and waits a whole lease before declaring this SDS dead, by which
                // time the SDS has stopped serving unless it renewed with that leader.
                if let Err(refused) = self.confirm_leadership().await {
                    return ControlResponse::Error(refused);
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

    /// Asks the MDM at `address` who it is, then adds it as a standby (learner) and waits
    /// until it has caught up with the log.
    async fn add_mdm(&self, address: String, expect_id: Option<u64>) -> ControlResponse {
        if !self.is_leader() {
            return self.not_leader();
        }
        if let Err(refused) = self.confirm_leadership().await {
            return ControlResponse::Error(refused);
        }
        let identity = match ask_identity(&address, &self.cfg.secret).await {
            Ok(i) => i,
            Err(e) => return bad_request(format!("cannot reach an MDM at {address}: {e}")),
        };
        if let Some(want) = expect_id.filter(|w| *w != identity.id) {
            return bad_request(format!("the MDM at {address} has id {}, not {want}", identity.id));
        }
        let role = match MdmRole::parse(&identity.role) {
            Ok(r) => r,
            Err(e) => return bad_request(format!("the MDM at {address}: {e}")),
        };
        let node = MdmNode { addr: address.clone(), role };
        let m = self.metrics();
        if let Err(e) = membership::check_add(&self.member_view(&m), identity.id, &node) {
            return bad_request(e.to_string());
        }
        if self.sm.data.read().await.state.retired_mdm_ids.contains(&identity.id) {
            return bad_request(format!(
                "MDM id {} was removed from this cluster before and is never reused; \
                 start the MDM at {address} with a new --id",
                identity.id
            ));
        }
        if identity.members > 0 {
            return bad_request(format!(
                "the MDM at {address} (id {}) already belongs to a cluster of {} member(s); \
                 start it with an empty directory and --standby",
                identity.id, identity.members
            ));
        }
        tracing::info!(id = identity.id, %address, %role, "adding a standby MDM");
        match tokio::time::timeout(COMMIT_TIMEOUT * 6, self.raft.add_learner(identity.id, node, true)).await {
            Ok(Ok(_)) => ControlResponse::Members(self.cluster_view()),
            Ok(Err(e)) => unavailable(format!("adding MDM {}: {e}", identity.id)),
            Err(_) => unavailable(format!("MDM {} did not catch up within {:?}", identity.id, COMMIT_TIMEOUT * 6)),
        }
    }

    async fn remove_mdm(&self, id: u64) -> ControlResponse {
        if !self.is_leader() {
            return self.not_leader();
        }
        let m = self.metrics();
        if let Err(e) = membership::check_remove(&self.member_view(&m), id) {
            return bad_request(e.to_string());
        }
        // Retired first: should the removal itself not commit, the id is merely unusable.
        match self.write(tessera_core::Command::RetireMdmId { id }).await {
            ControlResponse::Applied(_) => {}
            other => return other,
        }
        let change = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
        self.change_membership(change, format!("removing MDM {id}")).await
    }

    async fn switch_mode(
        &self,
        mode: &str,
        managers: Option<Vec<u64>>,
        tiebreakers: Option<Vec<u64>>,
    ) -> ControlResponse {
        if !self.is_leader() {
            return self.not_leader();
        }
        if let Err(refused) = self.confirm_leadership().await {
            return ControlResponse::Error(refused);
        }
        let mode = match ClusterMode::parse(mode) {
            Ok(m) => m,
            Err(e) => return bad_request(e.to_string()),
        };
        // A member just added or restarted may not have answered a heartbeat yet (the
        // replication streams restart after every membership change): retry that refusal
        // for a while before reporting it.
        let deadline = Instant::now() + SWITCH_REACHABLE_WAIT;
        let (view, voters) = loop {
            let view = self.member_view(&self.metrics());
            match membership::plan_mode_switch(&view, self.cfg.id, mode, managers.as_deref(), tiebreakers.as_deref()) {
                Ok(v) => break (view, v),
                Err(membership::MembershipError::Unreachable { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(RAFT_HEARTBEAT_MS)).await;
                }
                Err(e) => return bad_request(e.to_string()),
            }
        };
        let current: BTreeSet<u64> = view.iter().filter(|(_, x)| x.voter).map(|(id, _)| *id).collect();
        if current == voters {
            return ControlResponse::Members(self.cluster_view());
        }
        tracing::info!(%mode, ?voters, "switching the MDM cluster mode");
        // Members that leave the mode stay as standbys (`retain`), as in ScaleIO.
        self.change_membership(ChangeMembers::ReplaceAllVoters(voters), format!("switching to {mode}")).await
    }

    async fn change_membership(&self, change: ChangeMembers<u64, MdmNode>, what: String) -> ControlResponse {
        if let Err(refused) = self.check_quorum() {
            return ControlResponse::Error(refused);
        }
        match tokio::time::timeout(COMMIT_TIMEOUT * 2, self.raft.change_membership(change, true)).await {
            Ok(Ok(_)) => ControlResponse::Members(self.cluster_view()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                ControlResponse::Error(ControlError::NotLeader { leader: f.leader_node.map(|n| n.addr) })
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                bad_request(format!("{what}: {e}"))
            }
            Ok(Err(e)) => unavailable(format!("{what}: {e}")),
            Err(_) => unavailable(format!("{what}: not committed within {:?}", COMMIT_TIMEOUT * 2)),
        }
    }

    /// Keeps this MDM's Raft behaviour in line with its role. A manager that votes may
    /// campaign. A tiebreaker never campaigns, with one exception: when no leader has been
    /// seen for [`TIEBREAKER_LAST_RESORT`], the surviving managers may lack entries only the
    /// tiebreaker holds (Raft lets no one lead without them), so it campaigns, brings them up
    /// to date as leader, and hands leadership to a caught-up manager.
    async fn keep_role(&self, no_leader_since: &mut Option<Instant>) {
        let m = self.metrics();
        let voter = m.membership_config.membership().voter_ids().any(|v| v == self.cfg.id);
        if self.cfg.role == MdmRole::Manager || !voter {
            return;
        }
        // A dead leader stays `current_leader` until someone else wins an election, so what
        // counts is whether a leader has actually been heard from lately.
        let leader_alive = m.current_leader == Some(self.cfg.id)
            || m.current_leader.is_some() && self.leader_contact.within(LEADER_SILENCE);
        if leader_alive {
            *no_leader_since = None;
        } else {
            let since = *no_leader_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= TIEBREAKER_LAST_RESORT {
                tracing::warn!("no MDM leader for {:?}: the tiebreaker campaigns as a last resort", since.elapsed());
                *no_leader_since = None;
                let _ = self.raft.trigger().elect().await;
                // A lagging manager campaigns far more often, with ever higher terms, which
                // the tiebreaker only learns from the refusal of its own request: campaign
                // once more right away, with that term, or it would never win.
                tokio::time::sleep(Duration::from_millis(2 * RAFT_HEARTBEAT_MS)).await;
                if self.metrics().current_leader.is_none_or(|l| l != self.cfg.id)
                    && !self.leader_contact.within(LEADER_SILENCE / 4)
                {
                    let _ = self.raft.trigger().elect().await;
                }
            }
            return;
        }
        if m.current_leader != Some(self.cfg.id) {
            return;
        }
        // Leading: hand over to a reachable manager that holds every entry.
        let view = self.member_view(&m);
        let caught_up = |id: &u64| {
            m.replication.as_ref().and_then(|r| r.get(id).copied().flatten()).map(|l| l.index) == m.last_log_index
        };
        let Some((&target, member)) =
            view.iter().find(|(id, x)| x.voter && x.reachable && x.node.role == MdmRole::Manager && caught_up(id))
        else {
            return;
        };
        tracing::info!(target, "tiebreaker leads: handing leadership to manager {target}");
        self.handing_over.store(true, Ordering::Release);
        // Silence: followers' leader leases run out, so they will vote for the manager.
        self.raft.runtime_config().heartbeat(false);
        let deadline = Instant::now() + HANDOVER_WAIT;
        while Instant::now() < deadline && self.is_leader() {
            let _ = ask(&member.node.addr, &self.cfg.secret, &ControlRequest::Campaign).await;
            tokio::time::sleep(Duration::from_millis(RAFT_ELECTION_MAX_MS / 2)).await;
        }
        self.raft.runtime_config().heartbeat(true);
        self.handing_over.store(false, Ordering::Release);
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
            match self.write(cmd.clone()).await {
                ControlResponse::Applied(_) => tracing::info!("rebalance: {cmd:?}"),
                ControlResponse::Error(ControlError::Refused(e)) => tracing::debug!("rebalance move refused: {e}"),
                other => {
                    tracing::warn!("rebalance move not committed: {other:?}");
                    return;
                }
            }
        }
    }

    /// One pass of the failure detector: commit liveness changes the leases call for.
    async fn detect_failures(&self) {
        let now = self.now_ms();
        // A leader that lost its quorum could not renew leases meanwhile (heartbeats need a
        // confirmed leadership), so when the quorum returns it must wait a whole lease again
        // before trusting the absence of heartbeats, exactly like a new leader.
        let leader = self.is_leader() && self.check_quorum().is_ok();
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
            match self.write(cmd.clone()).await {
                ControlResponse::Applied(_) => tracing::info!("committed {cmd:?}"),
                ControlResponse::Error(ControlError::Refused(e)) => tracing::warn!("{cmd:?} refused: {e}"),
                other => {
                    tracing::warn!("{cmd:?} not committed: {other:?}");
                    return;
                }
            }
        }
    }
}

/// The leader's periodic duties: liveness first, then rebalance moves.
async fn failure_detector(mdm: Arc<Mdm>) {
    loop {
        tokio::time::sleep(FAILURE_DETECTOR_INTERVAL).await;
        if mdm.handing_over.load(Ordering::Acquire) {
            continue;
        }
        mdm.detect_failures().await;
        mdm.rebalance().await;
    }
}

/// Keeps each MDM's Raft behaviour in line with its role.
async fn role_keeper(mdm: Arc<Mdm>) {
    let mut no_leader_since = None;
    loop {
        tokio::time::sleep(ROLE_CHECK_INTERVAL).await;
        mdm.keep_role(&mut no_leader_since).await;
    }
}

fn handing_over() -> ControlError {
    ControlError::Unavailable("the tiebreaker is handing leadership to a manager".into())
}

fn unavailable(message: String) -> ControlResponse {
    ControlResponse::Error(ControlError::Unavailable(message))
}

fn bad_request(message: String) -> ControlResponse {
    ControlResponse::Error(ControlError::BadRequest(message))
}

/// One control request to one MDM (no leader following).
async fn ask(address: &str, secret: &ClusterSecret, req: &ControlRequest) -> anyhow::Result<ControlResponse> {
    let conn = RpcClient::connect(address, secret).await?;
    let body = serde_json::to_vec(req)?;
    let reply = conn.call(kind::CONTROL, &[&body], READ_TIMEOUT).await?;
    if reply.status != status::OK {
        anyhow::bail!("status {}", status::name(reply.status));
    }
    Ok(serde_json::from_slice(&reply.payload)?)
}

async fn ask_identity(address: &str, secret: &ClusterSecret) -> anyhow::Result<MdmIdentity> {
    match ask(address, secret, &ControlRequest::Identity).await? {
        ControlResponse::Identity(i) => Ok(i),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

fn not_leader_or_unavailable(e: RaftError<u64, CheckIsLeaderError<u64, MdmNode>>) -> ControlError {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
            ControlError::NotLeader { leader: f.leader_node.map(|n| n.addr) }
        }
        other => ControlError::Unavailable(other.to_string()),
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
        if header.kind != kind::CONTROL && header.kind != kind::RAFT {
            let _ = replies.send(OutFrame::reply(&header, status::UNKNOWN_KIND, Vec::new())).await;
            continue;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mdm = mdm.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if header.kind == kind::RAFT {
                let reply = serve_raft_request(&mdm.raft, mdm.cfg.id, &mdm.leader_contact, &payload).await;
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                let _ = replies.send(OutFrame::reply(&header, status::OK, body)).await;
                return;
            }
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

/// The Raft settings of an MDM of `role` (also what the Raft simulation runs).
pub fn raft_config(role: MdmRole, snapshot_every_logs: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: "tessera-mdm".into(),
        heartbeat_interval: RAFT_HEARTBEAT_MS,
        election_timeout_min: RAFT_ELECTION_MIN_MS,
        election_timeout_max: RAFT_ELECTION_MAX_MS,
        // A tiebreaker's own timer never starts an election (see `Mdm::keep_role`).
        enable_elect: role == MdmRole::Manager,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every_logs.max(1)),
        max_in_snapshot_log_to_keep: snapshot_every_logs,
        ..Default::default()
    }
}

/// Runs an MDM until the process is stopped. A brand-new MDM initialises a single-voter
/// cluster with itself as the only member, unless it is a standby waiting to be added.
pub async fn run_mdm(cfg: MdmConfig) -> anyhow::Result<()> {
    if !cfg.standby && cfg.role == MdmRole::Tiebreaker {
        anyhow::bail!("a tiebreaker cannot start a cluster of its own: start it with --standby and add it");
    }
    let raft_dir = cfg.dir.join("raft");
    let log_store =
        LogStore::open(&raft_dir).with_context(|| format!("opening the Raft log in {}", raft_dir.display()))?;
    let sm = StateMachineStore::open(&raft_dir).context("opening the state machine")?;
    let pristine = log_store.is_pristine().await;
    let raft_config = raft_config(cfg.role, cfg.snapshot_every_logs);
    let contacts = PeerContacts::default();
    let bind = Some(cfg.listen.ip()).filter(|ip| !ip.is_unspecified());
    let network = MdmNetwork { secret: cfg.secret.clone(), bind, contacts: contacts.clone() };
    let raft = Raft::new(cfg.id, Arc::new(raft_config.validate()?), network, log_store, sm.clone())
        .await
        .context("starting Raft")?;
    if pristine && !cfg.standby {
        let members = BTreeMap::from([(cfg.id, MdmNode { addr: cfg.listen.to_string(), role: cfg.role })]);
        raft.initialize(members).await.context("initialising the MDM cluster")?;
        tracing::info!(id = cfg.id, "initialised a new single-node MDM cluster");
    } else if pristine {
        tracing::info!(id = cfg.id, role = %cfg.role, "standby MDM waiting to be added to a cluster");
    }
    let listener = TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    tracing::info!(addr = %cfg.listen, "MDM listening");
    let mdm = Arc::new(Mdm {
        cfg,
        raft,
        sm,
        soft: Mutex::new(SoftState::default()),
        started: Instant::now(),
        contacts,
        leader_contact: LeaderContact::default(),
        handing_over: AtomicBool::new(false),
    });
    tokio::spawn(failure_detector(mdm.clone()));
    tokio::spawn(role_keeper(mdm.clone()));
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
