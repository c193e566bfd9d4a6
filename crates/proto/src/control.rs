//! Control protocol: CLI, SDS and SDC requests to the MDM, as JSON in `kind::CONTROL`
//! frames. [`ControlClient`] knows every MDM address and follows the leader.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_core::command::Applied;
use tessera_core::{ClusterState, Command, CoreError};
use thiserror::Error;

use crate::auth::{AuthError, ClusterSecret};
use crate::data::{kind, status};
use crate::rpc::{RpcClient, RpcError};

/// A control call that gets no answer in this time fails (and the client tries another MDM).
pub const CONTROL_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest pause between rounds of trying every MDM: short, so that a client finds a newly
/// elected leader within a fraction of a second (control requests are cheap).
const MAX_CONTROL_BACKOFF: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    /// A replicated change of the cluster model.
    Execute(Command),
    /// The whole cluster model and its version (the Raft index it reflects).
    GetState,
    /// Health: MDM members, SDS liveness, PG counts.
    Status,
    /// An SDS renews its lease and reports device usage and back-fill progress.
    SdsHeartbeat {
        sds_id: u64,
        devices: Vec<DeviceUsage>,
        #[serde(default)]
        rebuilds: Vec<RebuildProgress>,
    },
    /// An SDC (or SDS) could not connect to an SDS: the MDM checks at once instead of
    /// waiting for its lease to run out.
    ReportUnreachable { sds_id: u64 },
    /// Long poll: answers as soon as the state version exceeds `after_version`, or after
    /// `timeout_ms` (at most `MAX_WAIT_FOR_CHANGE_MS`). Lets SDSs follow map changes at once.
    WaitForChange { after_version: u64, timeout_ms: u64 },
    /// Who this MDM is: asked before it is added to a cluster, answered by any MDM.
    Identity,
    /// This MDM's own applied copy of the state, without asking the leader (it may be
    /// behind): lets operators and tests check that members agree.
    LocalState,
    /// Adds the MDM at `address` as a standby member (a Raft learner); its id and role are
    /// its own (`Identity`). `expect_id`, when given, must match.
    AddMdm { address: String, expect_id: Option<u64> },
    /// Removes a standby member.
    RemoveMdm { id: u64 },
    /// Switches to `1_node`, `3_node` or `5_node` (`scli --switch_cluster_mode`), with the
    /// named members or, when not named, the current voters and standbys of each role.
    SwitchClusterMode { mode: String, managers: Option<Vec<u64>>, tiebreakers: Option<Vec<u64>> },
    /// Sent by a tiebreaker that leads (only ever as a last resort) to a caught-up manager:
    /// start an election now and take over.
    Campaign,
}

/// Longest a `WaitForChange` is held, well inside `CONTROL_CALL_TIMEOUT`.
pub const MAX_WAIT_FOR_CHANGE_MS: u64 = 5_000;

/// Progress of one back-fill job, reported by the PG primary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebuildProgress {
    pub pool_id: u64,
    pub pg_id: u32,
    pub target_sds_id: u64,
    pub extents_done: u64,
    pub extents_total: u64,
    pub bytes_copied: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceUsage {
    pub device_id: u64,
    pub used_extents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlResponse {
    Applied(Applied),
    State(StateView),
    Status(ClusterStatus),
    Heartbeat(HeartbeatReply),
    Reported,
    /// The current state version (after a `WaitForChange`).
    Version(u64),
    Identity(MdmIdentity),
    /// The MDM cluster after a membership change.
    Members(MdmClusterStatus),
    Done,
    Error(ControlError),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateView {
    /// Raft log index the state reflects; it only grows.
    pub version: u64,
    pub state: ClusterState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub lease_duration_ms: u64,
    /// Current state version, so the SDS knows when to refetch its map.
    pub state_version: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MdmIdentity {
    pub id: u64,
    pub address: String,
    /// `manager` or `tiebreaker`, fixed when the MDM was installed (`--role`).
    pub role: String,
    /// Members of the cluster this MDM belongs to (0 for a standby never added).
    pub members: usize,
}

/// The MDM cluster as `scli --query_cluster` showed it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MdmClusterStatus {
    /// `1_node`, `3_node`, `5_node`, or `custom (N voters)`.
    pub mode: String,
    /// `normal` (every voter reachable), `degraded` (a quorum is), or `no_quorum`.
    pub state: String,
    pub leader_id: Option<u64>,
    pub voters: usize,
    pub voters_reachable: usize,
    pub members: Vec<MdmMember>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub mdm_members: Vec<MdmMember>,
    pub leader_id: Option<u64>,
    #[serde(default)]
    pub mdm: MdmClusterStatus,
    pub state_version: u64,
    pub sdss: Vec<SdsStatus>,
    pub pgs: PgCounts,
    pub rebuild: RebuildStatus,
    pub pools: Vec<PoolStatus>,
    pub volumes: usize,
    pub sdcs: usize,
}

/// One storage pool's health and capacity.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub pgs: PgCounts,
    /// PGs with a copy being back-filled (rebuild, rebalance or drain).
    pub pgs_rebuilding: u64,
    pub raw_capacity_bytes: u64,
    /// Capacity thick volumes may reserve: two copies, spare held back.
    pub usable_capacity_bytes: u64,
    pub spare_percent: u8,
    /// Raw bytes in use on the pool's devices (both copies), as last reported.
    pub used_bytes: u64,
    pub thick_reserved_bytes: u64,
    pub volumes: usize,
}

/// Re-mirroring under way across the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RebuildStatus {
    /// PGs with a copy still being back-filled.
    pub pgs_rebuilding: u64,
    /// Extents still to copy in the jobs the primaries have reported.
    pub extents_remaining: u64,
    pub bytes_copied: u64,
    /// Copy rate over the last few seconds.
    pub rate_bytes_per_sec: u64,
    /// Seconds until done at the current rate, when known.
    pub eta_seconds: Option<u64>,
    /// Most PGs re-mirroring at once since the cluster was last fully in sync: with
    /// `pgs_rebuilding`, the fraction done.
    #[serde(default)]
    pub pgs_in_episode: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MdmMember {
    pub id: u64,
    pub address: String,
    /// `manager` or `tiebreaker`.
    pub role: String,
    pub is_leader: bool,
    /// `primary` (the leader), `secondary` (a manager voter), `tiebreaker`, or `standby`.
    #[serde(default)]
    pub status: String,
    /// Votes in the current mode (standbys do not).
    #[serde(default)]
    pub voter: bool,
    /// Answered the leader within the last seconds (as seen by the MDM that answered).
    #[serde(default)]
    pub reachable: bool,
    /// Last Raft index this member is known to hold.
    #[serde(default)]
    pub matched_index: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SdsStatus {
    pub id: u64,
    pub name: String,
    pub address: String,
    /// `up` while its lease is held, `down` otherwise.
    pub state: String,
    /// Committed membership: `normal`, or `removed` once declared dead.
    pub membership: String,
    pub devices: usize,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PgCounts {
    pub total_pgs: u64,
    /// Both copies complete, on SDSs that hold a lease.
    pub healthy_pgs: u64,
    /// Readable, but with fewer than two complete copies on live SDSs (rebuilding, or
    /// waiting for a replacement).
    pub degraded_pgs: u64,
    /// No complete copy on a live SDS: IO to these PGs waits until one returns.
    pub unavailable_pgs: u64,
    /// Pools without placement yet.
    pub unplaced_pgs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Error)]
pub enum ControlError {
    #[error("{0}")]
    Refused(CoreError),
    #[error("this MDM is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<String> },
    #[error("MDM unavailable: {0}")]
    Unavailable(String),
    #[error("bad request: {0}")]
    BadRequest(String),
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{0}")]
    Control(ControlError),
    #[error("MDM cluster unavailable: {0}")]
    Unreachable(String),
    #[error("MDM sent an unexpected reply: {0}")]
    Protocol(String),
}

/// Talks to the MDM cluster: tries each known address, follows `NotLeader` hints, retries
/// with backoff while no leader answers, and reuses its connection.
pub struct ControlClient {
    /// The configured MDM addresses, plus every leader address learned from `NotLeader`
    /// hints (so a member added after the config was written is found again).
    addresses: std::sync::Mutex<Vec<String>>,
    secret: ClusterSecret,
    conn: tokio::sync::Mutex<Option<RpcClient>>,
    /// Give up on a call after this long without a leader.
    pub retry_for: Duration,
}

impl ControlClient {
    pub fn new(addresses: Vec<String>, secret: ClusterSecret) -> ControlClient {
        ControlClient {
            addresses: std::sync::Mutex::new(addresses),
            secret,
            conn: tokio::sync::Mutex::new(None),
            retry_for: Duration::from_secs(20),
        }
    }

    pub async fn request(&self, req: &ControlRequest) -> Result<ControlResponse, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(50);
        let mut last_error = String::from("no MDM address configured");
        // What an MDM itself last said (no quorum, ...): more useful to report than a
        // connection refused by a member that is down.
        let mut last_answer: Option<String> = None;
        let mut candidates: Vec<String> = self.addresses.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut next = 0usize;
        // Failed attempts since the last pause: every address is tried (and every hint
        // followed) at once; the client only sleeps once a whole round found no leader.
        let mut failed_in_round = 0usize;
        loop {
            let conn = {
                let mut guard = self.conn.lock().await;
                match guard.as_ref() {
                    Some(c) if !c.is_closed() => Some(c.clone()),
                    _ if candidates.is_empty() => None,
                    _ => {
                        let addr = candidates[next % candidates.len()].clone();
                        next += 1;
                        match RpcClient::connect(&addr, &self.secret).await {
                            Ok(c) => {
                                *guard = Some(c.clone());
                                Some(c)
                            }
                            // A wrong secret or a peer that is no MDM will not get better;
                            // a connection dropped mid-handshake (an MDM dying) may.
                            Err(
                                e @ RpcError::Auth {
                                    source: AuthError::Rejected | AuthError::BadMagic | AuthError::BadSecret,
                                    ..
                                },
                            ) => return Err(ClientError::Unreachable(e.to_string())),
                            Err(e) => {
                                last_error = e.to_string();
                                None
                            }
                        }
                    }
                }
            };
            if let Some(conn) = conn {
                match conn.call(kind::CONTROL, &[&body], CONTROL_CALL_TIMEOUT).await {
                    Ok(reply) if reply.status == status::OK => {
                        let resp: ControlResponse =
                            serde_json::from_slice(&reply.payload).map_err(|e| ClientError::Protocol(e.to_string()))?;
                        match resp {
                            ControlResponse::Error(ControlError::NotLeader { leader }) => {
                                last_error = format!("MDM {} is not the leader", conn.addr());
                                *self.conn.lock().await = None;
                                if let Some(l) = leader {
                                    if !candidates.contains(&l) {
                                        candidates.push(l.clone());
                                        let mut known = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
                                        if !known.contains(&l) {
                                            known.push(l.clone());
                                        }
                                    }
                                    next = candidates.iter().position(|c| *c == l).unwrap_or(next);
                                }
                            }
                            ControlResponse::Error(ControlError::Unavailable(m)) => {
                                // This MDM cannot serve (no quorum behind it): try the others.
                                last_answer = Some(m);
                                *self.conn.lock().await = None;
                            }
                            ControlResponse::Error(e) => return Err(ClientError::Control(e)),
                            other => return Ok(other),
                        }
                    }
                    Ok(reply) => {
                        return Err(ClientError::Protocol(format!("status {}", status::name(reply.status))));
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        *self.conn.lock().await = None;
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ClientError::Unreachable(last_answer.unwrap_or(last_error)));
            }
            failed_in_round += 1;
            if failed_in_round <= candidates.len() {
                continue;
            }
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(ClientError::Unreachable(last_answer.unwrap_or(last_error)));
            }
            failed_in_round = 0;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_CONTROL_BACKOFF);
        }
    }

    pub async fn execute(&self, cmd: Command) -> Result<Applied, ClientError> {
        match self.request(&ControlRequest::Execute(cmd)).await? {
            ControlResponse::Applied(a) => Ok(a),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn state(&self) -> Result<StateView, ClientError> {
        match self.request(&ControlRequest::GetState).await? {
            ControlResponse::State(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        match self.request(&ControlRequest::Status).await? {
            ControlResponse::Status(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}
