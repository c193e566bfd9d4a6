//! The SDC, mirroring `crates/sdc/src/client.rs` (`extent_call` / `try_extent_call`): send
//! each extent IO to the PG primary of the cached map, refresh the map and retry on the
//! statuses that call for it, give up after the retry budget. Re-implemented (the SDC crate
//! is async and socket-bound); the status handling is copied rule for rule.

use std::collections::BTreeMap;
use std::rc::Rc;

use tessera_core::layout::pg_of_extent;
use tessera_core::ClusterState;
use tessera_proto::data::{status, IoHeader};

use crate::world::{node_name, IoOp, NetError, Req, Resp, Timer, Wait, World, CLIENT_BASE, MDM, PG_COUNT};

/// As in `crates/sdc/src/client.rs`.
pub const DATA_CALL_TIMEOUT_MS: u64 = 30_000;
pub const IO_RETRY_BUDGET_MS: u64 = 60_000;
const FIRST_BACKOFF_MS: u64 = 5;
const MAX_BACKOFF_MS: u64 = 500;
/// Operations one SDC keeps in flight during the chaos phase.
const MAX_OPS_IN_FLIGHT: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write(u64),
}

#[derive(Debug, Clone)]
pub struct ClientOp {
    pub key: (u64, u64),
    pub kind: OpKind,
    deadline: u64,
    backoff: u64,
    target: u64,
    /// Part of the final check: failing it breaks liveness.
    pub must_succeed: bool,
}

pub struct Client {
    pub node: u64,
    map: Option<(u64, Rc<ClusterState>)>,
    refresh_inflight: bool,
    waiting_refresh: Vec<u64>,
    pub ops: BTreeMap<u64, ClientOp>,
    next_op: u64,
}

impl Client {
    pub fn new(index: usize) -> Client {
        Client {
            node: CLIENT_BASE + index as u64,
            map: None,
            refresh_inflight: false,
            waiting_refresh: Vec::new(),
            ops: BTreeMap::new(),
            next_op: 1,
        }
    }
}

impl World {
    pub fn client_tick(&mut self, c: usize) {
        if !self.chaos {
            return;
        }
        let after = self.rng.range(2, 40);
        self.schedule(after, crate::world::Event::ClientTick(c));
        if self.clients[c].ops.len() >= MAX_OPS_IN_FLIGHT {
            return;
        }
        let extents = self.all_extents();
        let Some(&key) = self.rng.pick(&extents) else { return };
        if self.oracle.is_busy(key) {
            return;
        }
        let kind = if self.rng.chance(550_000) { OpKind::Write(self.oracle.new_write(key)) } else { OpKind::Read };
        self.client_submit(c, key, kind, false);
    }

    /// Starts one extent IO. The oracle must not have another in flight on `key`.
    pub fn client_submit(&mut self, c: usize, key: (u64, u64), kind: OpKind, must_succeed: bool) {
        self.oracle.begin(key);
        let deadline = self.now + IO_RETRY_BUDGET_MS;
        let client = &mut self.clients[c];
        let op = client.next_op;
        client.next_op += 1;
        client.ops.insert(op, ClientOp { key, kind, deadline, backoff: FIRST_BACKOFF_MS, target: 0, must_succeed });
        self.trace(format!("sdc{c} op {op}: {kind:?} v{}/{}", key.0, key.1));
        self.client_attempt(c, op);
    }

    pub fn client_attempt(&mut self, c: usize, op: u64) {
        let Some(o) = self.clients[c].ops.get(&op).cloned() else { return };
        let Some((_, map)) = self.clients[c].map.clone() else {
            return self.client_request_refresh(c, op);
        };
        let pool_id = self.pool_id;
        let Some(pool) = map.pools.get(&pool_id) else { return self.client_request_refresh(c, op) };
        let pg_id = pg_of_extent(o.key.0, o.key.1, PG_COUNT);
        let Some(pg) = pool.pgs.get(pg_id as usize) else { return self.client_request_refresh(c, op) };
        let Some(primary) = pg.primary().map(|r| r.sds_id) else { return self.client_request_refresh(c, op) };
        let h = IoHeader {
            pool_id,
            volume_id: o.key.0,
            extent_index: o.key.1,
            pg_id,
            flags: 0,
            pg_epoch: pg.epoch,
            offset_in_extent: 0,
            length: 4096,
            mapping_epoch: map.volumes.get(&o.key.0).map_or(0, |v| v.mapping_epoch),
        };
        let io = match o.kind {
            OpKind::Read => IoOp::Read,
            OpKind::Write(v) => IoOp::Write(v),
        };
        self.clients[c].ops.get_mut(&op).expect("exists").target = primary;
        let node = self.clients[c].node;
        self.call(node, primary, Req::Io { h, op: io }, Wait::ClientIo { client: c, op }, DATA_CALL_TIMEOUT_MS);
    }

    pub fn client_io_done(&mut self, c: usize, op: u64, result: Result<Resp, NetError>) {
        let Some(o) = self.clients[c].ops.get(&op).cloned() else { return };
        match result {
            Ok(Resp::Io { status: status::OK, value, .. }) => self.client_op_succeeded(c, op, value),
            // The map moved, a copy is being replaced, the SDS has no lease, or its device
            // failed (the MDM re-peers the PG): all resolve with a newer map.
            Ok(Resp::Io {
                status:
                    status::STALE_EPOCH
                    | status::WRONG_ROLE
                    | status::REPLICA_UNAVAILABLE
                    | status::NOT_READY
                    | status::IO_ERROR
                    // Sim clients never lose their mappings: a newer map lets them retry.
                    | status::MAPPING_STALE,
                ..
            }) => self.client_retry(c, op, true),
            Ok(Resp::Io { status: status::MAP_BEHIND, .. }) => self.client_retry(c, op, false),
            Ok(other) => {
                let detail = format!("sdc{c} op {op} on {:?}: unexpected answer {other:?}", o.key);
                self.fail("SDS answers only expected statuses", detail);
            }
            Err(_) => {
                let node = self.clients[c].node;
                self.call(node, MDM, Req::ReportUnreachable { sds_id: o.target }, Wait::ClientReport, 2_000);
                self.client_retry(c, op, true);
            }
        }
    }

    fn client_retry(&mut self, c: usize, op: u64, refresh: bool) {
        let Some(o) = self.clients[c].ops.get(&op).cloned() else { return };
        if self.now > o.deadline {
            return self.client_op_failed(c, op);
        }
        if refresh {
            self.client_request_refresh(c, op);
        } else {
            self.client_schedule_retry(c, op);
        }
    }

    fn client_schedule_retry(&mut self, c: usize, op: u64) {
        let node = self.clients[c].node;
        let Some(o) = self.clients[c].ops.get_mut(&op) else { return };
        let backoff = o.backoff;
        o.backoff = (o.backoff * 2).min(MAX_BACKOFF_MS);
        self.timer(node, 0, backoff, Timer::ClientRetry(op));
    }

    fn client_request_refresh(&mut self, c: usize, op: u64) {
        let client = &mut self.clients[c];
        client.waiting_refresh.push(op);
        if client.refresh_inflight {
            return;
        }
        client.refresh_inflight = true;
        let node = client.node;
        self.call(node, MDM, Req::GetState, Wait::ClientRefresh { client: c }, 5_000);
    }

    pub fn client_refresh_done(&mut self, c: usize, result: Result<Resp, NetError>) {
        let client = &mut self.clients[c];
        client.refresh_inflight = false;
        if let Ok(Resp::State { version, state }) = result {
            if client.map.as_ref().is_none_or(|(v, _)| *v < version) {
                client.map = Some((version, state));
            }
        }
        let waiting = std::mem::take(&mut client.waiting_refresh);
        for op in waiting {
            self.client_schedule_retry(c, op);
        }
    }

    fn client_op_succeeded(&mut self, c: usize, op: u64, value: u64) {
        let o = self.clients[c].ops.remove(&op).expect("checked by caller");
        self.oracle.end(o.key);
        match o.kind {
            OpKind::Write(v) => {
                self.stats.writes_acked += 1;
                self.oracle.acked(o.key, v);
                self.trace(format!("sdc{c} op {op}: write {v} of {:?} acked by {}", o.key, node_name(o.target)));
            }
            OpKind::Read => {
                self.stats.reads_ok += 1;
                self.trace(format!("sdc{c} op {op}: read {:?} = {value} from {}", o.key, node_name(o.target)));
                if !self.oracle.allowed(o.key, value) {
                    let detail = format!(
                        "sdc{c} read {value} from v{}/extent {} at {}; oracle {:?}",
                        o.key.0,
                        o.key.1,
                        node_name(o.target),
                        self.oracle.describe(o.key)
                    );
                    self.fail("no stale read", detail);
                }
            }
        }
    }

    fn client_op_failed(&mut self, c: usize, op: u64) {
        let o = self.clients[c].ops.remove(&op).expect("checked by caller");
        self.oracle.end(o.key);
        match o.kind {
            OpKind::Write(v) => {
                self.stats.writes_failed += 1;
                self.trace(format!("sdc{c} op {op}: write {v} of {:?} failed: unknown", o.key));
            }
            OpKind::Read => {
                self.stats.reads_failed += 1;
                self.trace(format!("sdc{c} op {op}: read of {:?} failed", o.key));
            }
        }
        if o.must_succeed {
            let detail = format!("final {:?} of {:?} failed after {IO_RETRY_BUDGET_MS} ms of retries", o.kind, o.key);
            self.fail("liveness: every extent readable and writable after healing", detail);
        }
    }

    pub fn clients_idle(&self) -> bool {
        self.clients.iter().all(|c| c.ops.is_empty())
    }
}
