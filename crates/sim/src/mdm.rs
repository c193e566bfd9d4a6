//! The MDM as the SDSs and SDCs see it: one leader applying real `tessera_core::Command`s to
//! a real `ClusterState`, a real `LeaseTable`, and each tick the real failure detector
//! (`recovery::liveness_commands`) and rebalancer (`rebalance::next_moves`).
//!
//! Re-implemented here (from `crates/mdm/src/server.rs`): the request handlers (heartbeat,
//! state fetch, execute, long poll, unreachable report + probe) and the tick loop. Raft is
//! not simulated: a command commits when the MDM receives it; a leader change is modelled
//! only by its effect on leases (`set_leader(false)` then `set_leader(true)`).

use std::collections::BTreeMap;
use std::rc::Rc;

use tessera_core::lease::{LeaseTable, DEFAULT_LEASE_DURATION_MS};
use tessera_core::recovery::liveness_commands;
use tessera_core::{ClusterState, Command};

use crate::world::{node_name, Req, Resp, World, CLIENT_BASE};

/// As in `crates/mdm/src/server.rs`.
pub const FAILURE_DETECTOR_INTERVAL_MS: u64 = 250;
const PROBE_INTERVAL_MS: u64 = 500;

#[derive(Default)]
pub struct Mdm {
    pub state: Rc<ClusterState>,
    /// The state's version: the number of commands applied (the Raft log index).
    pub version: u64,
    pub leases: LeaseTable,
    /// Long polls waiting for a version above theirs: (node, rpc, after_version).
    waiters: Vec<(u64, u64, u64)>,
    last_probe_ms: BTreeMap<u64, u64>,
}

impl World {
    /// Applies one command as the replicated state machine does; refusals are committed too.
    pub fn mdm_apply(&mut self, cmd: Command) -> Result<u64, String> {
        let outcome = Rc::make_mut(&mut self.mdm.state).apply(&cmd);
        self.mdm.version += 1;
        self.stats.commands += 1;
        match &outcome {
            Ok(_) => {
                match &cmd {
                    Command::DeclareSdsDown { .. } => self.stats.sds_declared_down += 1,
                    Command::RemoveReplica { .. } => self.stats.replicas_removed += 1,
                    Command::SyncComplete { .. } => self.stats.syncs_completed += 1,
                    Command::MovePg { .. } => self.stats.moves += 1,
                    _ => {}
                }
                self.trace(format!("mdm v{} commits {cmd:?}", self.mdm.version));
            }
            Err(e) => self.trace(format!("mdm v{} refuses {cmd:?}: {e}", self.mdm.version)),
        }
        self.check_state_invariants();
        let version = self.mdm.version;
        let (ready, waiting): (Vec<_>, Vec<_>) = self.mdm.waiters.drain(..).partition(|w| w.2 < version);
        self.mdm.waiters = waiting;
        for (node, rpc, _) in ready {
            self.reply(crate::world::MDM, node, rpc, Resp::Version(version));
        }
        outcome.map(|a| a.id).map_err(|e| e.to_string())
    }

    pub fn mdm_handle(&mut self, from: u64, rpc: u64, body: Req) {
        let me = crate::world::MDM;
        match body {
            Req::Heartbeat { .. } => {
                if !self.mdm.state.sdss.contains_key(&from) {
                    self.reply(me, from, rpc, Resp::Refused(format!("SDS {from} not found")));
                    return;
                }
                self.mdm.leases.renew(from, self.now, DEFAULT_LEASE_DURATION_MS);
                let state_version = self.mdm.version;
                self.reply(
                    me,
                    from,
                    rpc,
                    Resp::Heartbeat { state_version, lease_duration_ms: DEFAULT_LEASE_DURATION_MS },
                );
            }
            Req::GetState => {
                let (version, state) = (self.mdm.version, self.mdm.state.clone());
                self.reply(me, from, rpc, Resp::State { version, state });
            }
            Req::Execute(cmd) => {
                let r = self.mdm_apply(cmd).map(|_| ());
                self.reply(me, from, rpc, Resp::Executed(r));
            }
            Req::WaitForChange { after_version } => {
                if self.mdm.version > after_version {
                    let v = self.mdm.version;
                    self.reply(me, from, rpc, Resp::Version(v));
                } else {
                    self.mdm.waiters.push((from, rpc, after_version));
                }
            }
            Req::ReportUnreachable { sds_id } => {
                self.probe(sds_id);
                self.reply(me, from, rpc, Resp::Reported);
            }
            Req::Io { .. } => self.reply(me, from, rpc, Resp::Refused("the MDM serves no data".into())),
        }
    }

    /// A refused connection proves the SDS process is gone; a partition proves nothing.
    fn probe(&mut self, sds_id: u64) {
        let last = self.mdm.last_probe_ms.get(&sds_id).copied();
        if last.is_some_and(|t| self.now.saturating_sub(t) < PROBE_INTERVAL_MS) {
            return;
        }
        self.mdm.last_probe_ms.insert(sds_id, self.now);
        let Some(s) = self.sdss.get(&sds_id) else { return };
        if !s.alive && !self.partitioned(crate::world::MDM, sds_id) {
            self.trace(format!("mdm probe: {} refuses connections: proved dead", node_name(sds_id)));
            self.mdm.leases.prove_dead(sds_id);
        }
    }

    /// One failure-detector pass, then one rebalancer pass (`REBALANCE_EVERY_TICKS` = 1).
    pub fn mdm_tick(&mut self) {
        self.mdm.leases.set_leader(true, self.now);
        let now = self.now;
        let commands = {
            let leases = &self.mdm.leases;
            liveness_commands(&self.mdm.state, |id| leases.status(id, now, DEFAULT_LEASE_DURATION_MS))
        };
        for cmd in commands {
            let _ = self.mdm_apply(cmd);
        }
        for cmd in tessera_core::rebalance::next_moves(&self.mdm.state) {
            let _ = self.mdm_apply(cmd);
        }
    }

    pub fn is_client(node: u64) -> bool {
        node >= CLIENT_BASE
    }
}
