//! The SDS, mirroring `crates/sds/src/{server,rebuild,daemon}.rs` step for step.
//!
//! Called, not re-implemented: `tessera_sds::map::MapView::from_state` and
//! `tessera_sds::map::check_io` (every role/epoch verdict), `MapView::holds_copy` (foreign
//! extent collection), the constants `PEER_CALL_TIMEOUT` and `MAX_JOBS_PER_DEVICE`.
//!
//! Re-implemented (the daemon's async control flow, as events): the lease fence
//! (`check`, the re-check after a read), the primary write path with its range lock, the
//! forward-status mapping and the degraded-write rule (`RemoveReplica` at the write's
//! epoch), device-failure reporting, heartbeat/lease renewal only once the map is current,
//! map refresh with device open and `DeviceReady`, the long-poll map watcher, foreign
//! extent collection, and the back-fill scheduler and job (list, remove stale, copy each
//! extent under its lock, `SyncComplete` at the job's epoch). Not modelled: byte ranges
//! (a write covers its whole extent), FLUSH and volatile caches, pacing, removed volumes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use tessera_core::layout::pg_of_extent;
use tessera_core::{ClusterState, Command, DeviceState, Replica};
use tessera_proto::control::MAX_WAIT_FOR_CHANGE_MS;
use tessera_proto::data::{flags, status, IoHeader};
use tessera_sds::map::{check_io, MapView, Role};

use crate::world::{
    node_name, BackfillStep, IoOp, JobKey, NetError, Req, Resp, Timer, Wait, World, DEVICE_CAPACITY_BYTES, MDM,
    PG_COUNT,
};

pub const HEARTBEAT_INTERVAL_MS: u64 = tessera_core::lease::DEFAULT_HEARTBEAT_INTERVAL_MS;
pub const DEVICE_PROBE_INTERVAL_MS: u64 = tessera_sds::daemon::DEVICE_PROBE_INTERVAL.as_millis() as u64;
pub const PEER_CALL_TIMEOUT_MS: u64 = tessera_sds::server::PEER_CALL_TIMEOUT.as_millis() as u64;
/// A control call (heartbeat client: `retry_for` one heartbeat interval; others retry
/// longer in the daemon — here one attempt with this timeout).
pub const CONTROL_CALL_TIMEOUT_MS: u64 = 2_000;
/// As in `rebuild.rs`.
const SCHEDULER_INTERVAL_MS: u64 = 300;
const RESTART_BACKOFF_MS: u64 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockReq {
    Write(u64),
    Backfill(JobKey, (u64, u64)),
}

#[derive(Debug, Clone)]
struct PrimaryWrite {
    client: u64,
    client_rpc: u64,
    h: IoHeader,
    op: IoOp,
    /// The local copy the role check named when the request arrived.
    local_device: u64,
    others: Vec<Replica>,
    statuses: Vec<Option<u32>>,
    local_status: u32,
    /// Next forward status to evaluate (removals run one after another).
    eval_index: usize,
    result: u32,
}

#[derive(Debug, Clone)]
struct Job {
    queue: VecDeque<(u64, u64)>,
    device_id: u64,
}

pub struct Sds {
    pub id: u64,
    pub name: String,
    pub alive: bool,
    pub paused: bool,
    pub incarnation: u64,
    pub map: Rc<MapView>,
    lease_valid_until: Option<u64>,
    open_devices: BTreeSet<u64>,
    refresh_inflight: bool,
    reported_failed: BTreeSet<u64>,
    writes: BTreeMap<u64, PrimaryWrite>,
    next_op: u64,
    locks: BTreeMap<(u64, u64), VecDeque<LockReq>>,
    jobs: BTreeMap<JobKey, Job>,
    ended_at: BTreeMap<JobKey, u64>,
}

impl Sds {
    pub fn new(id: u64, name: String) -> Sds {
        Sds {
            id,
            name,
            alive: false,
            paused: false,
            incarnation: 0,
            map: Rc::new(MapView::default()),
            lease_valid_until: None,
            open_devices: BTreeSet::new(),
            refresh_inflight: false,
            reported_failed: BTreeSet::new(),
            writes: BTreeMap::new(),
            next_op: 1,
            locks: BTreeMap::new(),
            jobs: BTreeMap::new(),
            ended_at: BTreeMap::new(),
        }
    }

    /// Forgets everything a process holds in memory; the disks keep their data.
    fn reset_volatile(&mut self) {
        let fresh = Sds::new(self.id, self.name.clone());
        *self = Sds { alive: self.alive, paused: false, incarnation: self.incarnation, ..fresh };
    }

    pub fn lease_held(&self, now: u64) -> bool {
        self.lease_valid_until.is_some_and(|u| now < u)
    }

    fn renew_lease(&mut self, sent_at: u64, duration_ms: u64) {
        let new_until = sent_at + duration_ms;
        if self.lease_valid_until.is_none_or(|u| u < new_until) {
            self.lease_valid_until = Some(new_until);
        }
    }
}

fn header(pool_id: u64, pg_id: u32, epoch: u64, key: (u64, u64)) -> IoHeader {
    IoHeader {
        pool_id,
        volume_id: key.0,
        extent_index: key.1,
        pg_id,
        flags: flags::REPLICA,
        pg_epoch: epoch,
        offset_in_extent: 0,
        length: 0,
        mapping_epoch: 0,
    }
}

impl World {
    fn sds(&mut self, id: u64) -> &mut Sds {
        self.sdss.get_mut(&id).expect("known SDS")
    }

    pub fn sds_start(&mut self, id: u64) {
        let s = self.sds(id);
        s.alive = true;
        s.incarnation += 1;
        s.reset_volatile();
        let inc = s.incarnation;
        self.trace(format!("start {} (incarnation {inc})", node_name(id)));
        self.sds_trigger_refresh(id);
        self.timer(id, inc, 1, Timer::Heartbeat);
        self.timer(id, inc, 1, Timer::LongPoll);
        self.timer(id, inc, SCHEDULER_INTERVAL_MS, Timer::Scheduler);
        self.timer(id, inc, DEVICE_PROBE_INTERVAL_MS, Timer::DeviceProbe);
    }

    pub fn sds_crash(&mut self, id: u64) {
        let s = self.sds(id);
        s.alive = false;
        s.incarnation += 1;
        s.reset_volatile();
        self.forget_pending_of(id);
        self.trace(format!("crash {}", node_name(id)));
    }

    pub fn sds_timer(&mut self, id: u64, timer: Timer) {
        let inc = self.sdss[&id].incarnation;
        match timer {
            Timer::Heartbeat => {
                let sent_at = self.now;
                self.call(id, MDM, Req::Heartbeat { sent_at }, Wait::SdsHeartbeat { sent_at }, HEARTBEAT_INTERVAL_MS);
                self.timer(id, inc, HEARTBEAT_INTERVAL_MS, Timer::Heartbeat);
            }
            Timer::LongPoll => {
                let after_version = self.sdss[&id].map.version;
                self.call(
                    id,
                    MDM,
                    Req::WaitForChange { after_version },
                    Wait::SdsLongPoll,
                    MAX_WAIT_FOR_CHANGE_MS + 1_000,
                );
            }
            Timer::Scheduler => {
                self.backfill_scheduler(id);
                self.timer(id, inc, SCHEDULER_INTERVAL_MS, Timer::Scheduler);
            }
            Timer::DeviceProbe => {
                // A device that failed while no IO reached it is found by the probe.
                let open: Vec<u64> = self.sdss[&id].open_devices.iter().copied().collect();
                for device_id in open {
                    if self.disks.get(&device_id).is_some_and(|d| d.failed) {
                        self.report_device_failure(id, device_id);
                    }
                }
                self.timer(id, inc, DEVICE_PROBE_INTERVAL_MS, Timer::DeviceProbe);
            }
            Timer::ReadDone { client_node, rpc, value } => {
                // The lease may have lapsed while the read ran (a paused process): data read
                // then may already be stale, so it is not returned.
                let status = if self.sdss[&id].lease_held(self.now) { status::OK } else { status::NOT_READY };
                self.reply(id, client_node, rpc, Resp::Io { status, value, keys: Vec::new() });
            }
            Timer::RpcTimeout(_) | Timer::ClientRetry(_) => unreachable!("handled by the world"),
        }
    }

    fn sds_trigger_refresh(&mut self, id: u64) {
        if self.sdss[&id].refresh_inflight {
            return;
        }
        self.sds(id).refresh_inflight = true;
        self.call(id, MDM, Req::GetState, Wait::SdsRefresh { renew: None }, CONTROL_CALL_TIMEOUT_MS);
    }

    /// Installs a newer map: opens new devices (reporting their capacity), closes removed
    /// ones, then frees extents of PGs this SDS no longer holds.
    fn sds_install(&mut self, id: u64, version: u64, state: &ClusterState) {
        if version <= self.sdss[&id].map.version {
            return;
        }
        let mine: Vec<(u64, DeviceState)> = state.devices_of_sds(id).map(|d| (d.id, d.state)).collect();
        for &(device_id, dstate) in &mine {
            if self.sdss[&id].open_devices.contains(&device_id) {
                continue;
            }
            // A device that already failed cannot be opened: it stays closed ("unusable").
            if self.disks.get(&device_id).is_none_or(|d| d.failed) {
                self.trace(format!("{} cannot open device {device_id}", node_name(id)));
                // As the daemon's `refresh`: a device in service that cannot be opened is
                // reported failed, so its PGs move to their other copies.
                if dstate == DeviceState::Normal {
                    self.report_device_failure(id, device_id);
                }
                continue;
            }
            self.sds(id).open_devices.insert(device_id);
            if dstate == DeviceState::New {
                let cmd = Command::DeviceReady { device_id, capacity_bytes: DEVICE_CAPACITY_BYTES };
                self.call(id, MDM, Req::Execute(cmd), Wait::SdsDeviceReady, CONTROL_CALL_TIMEOUT_MS);
            }
        }
        let wanted: BTreeSet<u64> = mine.iter().map(|d| d.0).collect();
        let map = Rc::new(MapView::from_state(version, id, state));
        let s = self.sds(id);
        s.open_devices.retain(|d| wanted.contains(d));
        s.map = map.clone();
        self.trace(format!("{} installs map v{version}", node_name(id)));
        let open: Vec<u64> = self.sdss[&id].open_devices.iter().copied().collect();
        for device_id in open {
            let Some(&pool_id) = map.device_pools.get(&device_id) else { continue };
            if map.pools.get(&pool_id).is_none_or(|p| p.pgs.is_empty()) {
                continue;
            }
            let Some(disk) = self.disks.get_mut(&device_id) else { continue };
            if disk.failed {
                continue;
            }
            let before = disk.store.len();
            disk.store.retain(|&(v, e), _| map.holds_copy(pool_id, pg_of_extent(v, e, PG_COUNT), device_id));
            let freed = before - disk.store.len();
            if freed > 0 {
                self.trace(format!("{} frees {freed} foreign extents on device {device_id}", node_name(id)));
            }
        }
    }

    fn sds_check(&mut self, id: u64, h: &IoHeader, is_write: bool) -> Result<Role, u32> {
        // Fencing: without a lease the MDM may already have replaced this SDS's copies.
        if !self.sdss[&id].lease_held(self.now) {
            return Err(status::NOT_READY);
        }
        let verdict = check_io(&self.sdss[&id].map, h, is_write);
        if verdict == Err(status::MAP_BEHIND) {
            self.sds_trigger_refresh(id);
        }
        verdict
    }

    fn report_device_failure(&mut self, id: u64, device_id: u64) {
        if !self.sds(id).reported_failed.insert(device_id) {
            return;
        }
        self.trace(format!("{} reports device {device_id} failed", node_name(id)));
        let cmd = Command::FailDevice { device_id };
        self.call(id, MDM, Req::Execute(cmd), Wait::SdsFailDevice { device_id }, CONTROL_CALL_TIMEOUT_MS);
    }

    /// Reads the local copy: `Err(status)` when the device is not open or failed.
    fn read_local(&mut self, id: u64, device_id: u64, key: (u64, u64)) -> Result<u64, u32> {
        if !self.sdss[&id].open_devices.contains(&device_id) {
            return Err(status::IO_ERROR);
        }
        let disk = self.disks.get(&device_id).ok_or(status::IO_ERROR)?;
        if disk.failed {
            self.report_device_failure(id, device_id);
            return Err(status::IO_ERROR);
        }
        Ok(disk.store.get(&key).copied().unwrap_or(0))
    }

    fn apply_local(&mut self, id: u64, device_id: u64, key: (u64, u64), op: IoOp) -> u32 {
        if !self.sdss[&id].open_devices.contains(&device_id) {
            return status::IO_ERROR;
        }
        let Some(disk) = self.disks.get_mut(&device_id) else { return status::IO_ERROR };
        if disk.failed {
            self.report_device_failure(id, device_id);
            return status::IO_ERROR;
        }
        match op {
            IoOp::Write(v) => {
                disk.store.insert(key, v);
            }
            IoOp::Trim => {
                disk.store.remove(&key);
            }
            IoOp::Read | IoOp::ListPgExtents => unreachable!("not a write"),
        }
        status::OK
    }

    pub fn sds_handle(&mut self, id: u64, from: u64, rpc: u64, body: Req) {
        let Req::Io { h, op } = body else {
            self.reply(id, from, rpc, Resp::Io { status: status::UNKNOWN_KIND, value: 0, keys: Vec::new() });
            return;
        };
        let key = (h.volume_id, h.extent_index);
        let io_reply = |status: u32| Resp::Io { status, value: 0, keys: Vec::new() };
        match op {
            IoOp::ListPgExtents => {
                let r = self.list_pg_extents(id, &h);
                let resp = match r {
                    Ok(keys) => Resp::Io { status: status::OK, value: 0, keys },
                    Err(s) => io_reply(s),
                };
                self.reply(id, from, rpc, resp);
            }
            IoOp::Read => {
                let local = match self.sds_check(id, &h, false) {
                    Ok(Role::Primary { local, .. }) | Ok(Role::Local { local }) => local,
                    Err(s) => return self.reply(id, from, rpc, io_reply(s)),
                };
                match self.read_local(id, local.device_id, key) {
                    Ok(value) => {
                        self.note_read_by_demoted_primary(id, &h);
                        let inc = self.sdss[&id].incarnation;
                        let latency =
                            if self.rng.chance(20_000) { self.rng.range(100, 3_000) } else { self.rng.range(0, 2) };
                        self.timer(id, inc, latency, Timer::ReadDone { client_node: from, rpc, value });
                    }
                    Err(s) => self.reply(id, from, rpc, io_reply(s)),
                }
            }
            IoOp::Write(_) | IoOp::Trim => match self.sds_check(id, &h, true) {
                Err(s) => self.reply(id, from, rpc, io_reply(s)),
                Ok(Role::Local { local }) => {
                    let st = self.apply_local(id, local.device_id, key, op);
                    self.reply(id, from, rpc, io_reply(st));
                }
                Ok(Role::Primary { local, others }) => {
                    let others = others.as_slice().to_vec();
                    let s = self.sds(id);
                    let op_id = s.next_op;
                    s.next_op += 1;
                    let n = others.len();
                    s.writes.insert(
                        op_id,
                        PrimaryWrite {
                            client: from,
                            client_rpc: rpc,
                            h,
                            op,
                            local_device: local.device_id,
                            others,
                            statuses: vec![None; n],
                            local_status: status::OK,
                            eval_index: 0,
                            result: status::OK,
                        },
                    );
                    self.lock_acquire(id, key, LockReq::Write(op_id));
                }
            },
        }
    }

    /// Diagnostic only: a read served by an SDS the MDM no longer has as the PG's primary at
    /// that epoch (a lease on the SDS does not cover its role in one PG).
    fn note_read_by_demoted_primary(&mut self, id: u64, h: &IoHeader) {
        let current = self
            .mdm
            .state
            .pools
            .get(&h.pool_id)
            .and_then(|p| p.pgs.get(h.pg_id as usize))
            .map(|pg| (pg.epoch, pg.primary().map(|r| r.sds_id)));
        if let Some((epoch, primary)) = current {
            if primary != Some(id) {
                self.stats.reads_by_demoted_primary += 1;
                self.trace(format!(
                    "{} serves a read of PG {} at epoch {} but the MDM has epoch {epoch} primary {primary:?}",
                    node_name(id),
                    h.pg_id,
                    h.pg_epoch
                ));
            }
        }
    }

    fn list_pg_extents(&mut self, id: u64, h: &IoHeader) -> Result<Vec<(u64, u64)>, u32> {
        if !self.sdss[&id].lease_held(self.now) {
            return Err(status::NOT_READY);
        }
        let map = self.sdss[&id].map.clone();
        let Some(pg) = map.pools.get(&h.pool_id).and_then(|p| p.pgs.get(h.pg_id as usize)) else {
            self.sds_trigger_refresh(id);
            return Err(status::MAP_BEHIND);
        };
        if h.pg_epoch < pg.epoch {
            return Err(status::STALE_EPOCH);
        }
        if h.pg_epoch > pg.epoch {
            self.sds_trigger_refresh(id);
            return Err(status::MAP_BEHIND);
        }
        let local = pg.replicas.iter().skip(1).find(|r| r.sds_id == id).ok_or(status::WRONG_ROLE)?;
        if !self.sdss[&id].open_devices.contains(&local.device_id) {
            return Err(status::IO_ERROR);
        }
        let device_id = local.device_id;
        let disk = self.disks.get(&device_id).ok_or(status::IO_ERROR)?;
        if disk.failed {
            // The daemon lists from its in-memory slot table and would find the failure on
            // the first copied extent; reporting here reaches the same state sooner.
            self.report_device_failure(id, device_id);
            return Err(status::IO_ERROR);
        }
        let disk = self.disks.get(&device_id).ok_or(status::IO_ERROR)?;
        Ok(disk.store.keys().copied().filter(|&(v, e)| pg_of_extent(v, e, PG_COUNT) == h.pg_id).collect())
    }

    // ---- range locks: one holder per extent, FIFO ----------------------------------------

    fn lock_acquire(&mut self, id: u64, key: (u64, u64), req: LockReq) {
        let q = self.sds(id).locks.entry(key).or_default();
        q.push_back(req);
        if q.len() == 1 {
            self.lock_granted(id, key, req);
        }
    }

    fn lock_release(&mut self, id: u64, key: (u64, u64)) {
        let s = self.sds(id);
        let Some(q) = s.locks.get_mut(&key) else { return };
        q.pop_front();
        match q.front().copied() {
            Some(next) => self.lock_granted(id, key, next),
            None => {
                s.locks.remove(&key);
            }
        }
    }

    fn lock_granted(&mut self, id: u64, key: (u64, u64), req: LockReq) {
        match req {
            LockReq::Write(op) => self.primary_write_start(id, op),
            LockReq::Backfill(job, k) => self.backfill_copy(id, job, k),
        }
        let _ = key;
    }

    // ---- the primary write path -----------------------------------------------------------

    fn primary_write_start(&mut self, id: u64, op_id: u64) {
        let Some(w) = self.sdss[&id].writes.get(&op_id).cloned() else { return };
        let key = (w.h.volume_id, w.h.extent_index);
        let local_status = self.apply_local(id, w.local_device, key, w.op);
        self.sds(id).writes.get_mut(&op_id).expect("exists").local_status = local_status;
        for (index, r) in w.others.iter().enumerate() {
            let forwarded = IoHeader { flags: w.h.flags | flags::REPLICA, ..w.h };
            self.call(
                id,
                r.sds_id,
                Req::Io { h: forwarded, op: w.op },
                Wait::SdsForward { op: op_id, index },
                PEER_CALL_TIMEOUT_MS,
            );
        }
        self.primary_write_evaluate(id, op_id);
    }

    fn primary_write_evaluate(&mut self, id: u64, op_id: u64) {
        let Some(w) = self.sdss[&id].writes.get(&op_id).cloned() else { return };
        if w.statuses.iter().any(Option::is_none) {
            return;
        }
        let mut result = w.result;
        for i in w.eval_index..w.others.len() {
            match w.statuses[i].expect("all in") {
                status::OK => {}
                // The maps disagree: the client refetches and retries; nothing is removed.
                st @ (status::STALE_EPOCH | status::MAP_BEHIND) => {
                    result = st;
                    return self.primary_write_finish(id, op_id, result);
                }
                _ => {
                    // The degraded-write rule: the copy that missed the write leaves the PG
                    // (at the write's epoch) before the write is acknowledged.
                    let sds_id = w.others[i].sds_id;
                    let cmd =
                        Command::RemoveReplica { pool_id: w.h.pool_id, pg_id: w.h.pg_id, epoch: w.h.pg_epoch, sds_id };
                    let wr = self.sds(id).writes.get_mut(&op_id).expect("exists");
                    wr.eval_index = i + 1;
                    wr.result = result;
                    self.call(
                        id,
                        MDM,
                        Req::Execute(cmd),
                        Wait::SdsRemoveReplica { op: op_id },
                        CONTROL_CALL_TIMEOUT_MS,
                    );
                    return;
                }
            }
        }
        self.primary_write_finish(id, op_id, result);
    }

    fn primary_write_finish(&mut self, id: u64, op_id: u64, forward_result: u32) {
        let Some(w) = self.sds(id).writes.remove(&op_id) else { return };
        let st = if w.local_status != status::OK { w.local_status } else { forward_result };
        self.reply(id, w.client, w.client_rpc, Resp::Io { status: st, value: 0, keys: Vec::new() });
        self.lock_release(id, (w.h.volume_id, w.h.extent_index));
    }

    // ---- answers to this SDS's calls ---------------------------------------------------------

    pub fn sds_complete(&mut self, id: u64, wait: Wait, result: Result<Resp, NetError>) {
        if !self.sdss.get(&id).is_some_and(|s| s.alive) {
            return;
        }
        match wait {
            Wait::SdsHeartbeat { sent_at } => {
                if let Ok(Resp::Heartbeat { state_version, lease_duration_ms }) = result {
                    if state_version > self.sdss[&id].map.version {
                        let renew = Some((sent_at, state_version, lease_duration_ms));
                        self.call(id, MDM, Req::GetState, Wait::SdsRefresh { renew }, CONTROL_CALL_TIMEOUT_MS);
                    } else {
                        self.sds(id).renew_lease(sent_at, lease_duration_ms);
                    }
                }
            }
            Wait::SdsRefresh { renew } => {
                if renew.is_none() {
                    self.sds(id).refresh_inflight = false;
                }
                if let Ok(Resp::State { version, state }) = result {
                    self.sds_install(id, version, &state);
                }
                // The lease is extended only once the map is at least the acknowledged one.
                if let Some((sent_at, state_version, duration)) = renew {
                    if self.sdss[&id].map.version >= state_version {
                        self.sds(id).renew_lease(sent_at, duration);
                    }
                }
            }
            Wait::SdsLongPoll => {
                let inc = self.sdss[&id].incarnation;
                match result {
                    Ok(Resp::Version(v)) => {
                        if v > self.sdss[&id].map.version {
                            self.sds_trigger_refresh(id);
                        }
                        self.timer(id, inc, 20, Timer::LongPoll);
                    }
                    _ => self.timer(id, inc, 500, Timer::LongPoll),
                }
            }
            Wait::SdsForward { op, index } => {
                // Epoch disagreements are the client's to resolve; a copy without a lease yet
                // is waited for; anything else means the copy does not have the write.
                let st = match result {
                    Ok(Resp::Io { status: s @ (status::OK | status::STALE_EPOCH | status::MAP_BEHIND), .. }) => s,
                    Ok(Resp::Io { status: status::NOT_READY, .. }) => status::MAP_BEHIND,
                    _ => status::REPLICA_UNAVAILABLE,
                };
                if let Some(w) = self.sds(id).writes.get_mut(&op) {
                    w.statuses[index] = Some(st);
                }
                self.primary_write_evaluate(id, op);
            }
            Wait::SdsRemoveReplica { op } => {
                let dropped = match result {
                    Ok(Resp::Executed(Ok(()))) => {
                        self.sds_trigger_refresh(id);
                        status::OK
                    }
                    Ok(Resp::Executed(Err(_))) => {
                        self.sds_trigger_refresh(id);
                        status::STALE_EPOCH
                    }
                    _ => status::REPLICA_UNAVAILABLE,
                };
                if let Some(w) = self.sds(id).writes.get_mut(&op) {
                    if dropped != status::OK {
                        w.result = dropped;
                    }
                }
                self.primary_write_evaluate(id, op);
            }
            Wait::SdsFailDevice { device_id } => {
                if !matches!(result, Ok(Resp::Executed(Ok(())))) {
                    self.sds(id).reported_failed.remove(&device_id);
                }
            }
            Wait::SdsDeviceReady => {}
            Wait::Backfill { job, step } => self.backfill_answer(id, job, step, result),
            Wait::ClientIo { .. } | Wait::ClientRefresh { .. } | Wait::ClientReport => unreachable!("client waits"),
        }
    }

    // ---- back-fill -------------------------------------------------------------------------

    fn backfill_scheduler(&mut self, id: u64) {
        if !self.sdss[&id].lease_held(self.now) {
            return;
        }
        let now = self.now;
        self.sds(id).ended_at.retain(|_, t| now.saturating_sub(*t) < RESTART_BACKOFF_MS);
        let map = self.sdss[&id].map.clone();
        let mut pool_ids: Vec<u64> = map.pools.keys().copied().collect();
        pool_ids.sort_unstable();
        for pool_id in pool_ids {
            for (pg_id, pg) in map.pools[&pool_id].pgs.iter().enumerate() {
                let Some(primary) = pg.replicas.first() else { continue };
                if primary.sds_id != id {
                    continue;
                }
                let mut targets = pg.syncing.clone();
                targets.sort_unstable();
                for target in targets {
                    let key = (pool_id, pg_id as u32, pg.epoch, target);
                    let s = &self.sdss[&id];
                    let on_device = s.jobs.values().filter(|j| j.device_id == primary.device_id).count();
                    if s.ended_at.contains_key(&key)
                        || s.jobs.contains_key(&key)
                        || on_device >= tessera_sds::rebuild::MAX_JOBS_PER_DEVICE
                    {
                        continue;
                    }
                    self.sds(id).jobs.insert(key, Job { queue: VecDeque::new(), device_id: primary.device_id });
                    self.trace(format!(
                        "{} starts back-fill of PG {pg_id} e{} to {}",
                        node_name(id),
                        pg.epoch,
                        node_name(target)
                    ));
                    let h = header(pool_id, pg_id as u32, pg.epoch, (0, 0));
                    self.call(
                        id,
                        target,
                        Req::Io { h, op: IoOp::ListPgExtents },
                        Wait::Backfill { job: key, step: BackfillStep::List },
                        PEER_CALL_TIMEOUT_MS,
                    );
                }
            }
        }
    }

    fn backfill_still_current(&self, id: u64, (pool_id, pg_id, epoch, target): JobKey) -> bool {
        let map = &self.sdss[&id].map;
        map.pools.get(&pool_id).and_then(|p| p.pgs.get(pg_id as usize)).is_some_and(|pg| {
            pg.epoch == epoch && pg.replicas.first().is_some_and(|p| p.sds_id == id) && pg.syncing.contains(&target)
        })
    }

    fn backfill_end(&mut self, id: u64, job: JobKey, why: &str) {
        let now = self.now;
        let s = self.sds(id);
        if s.jobs.remove(&job).is_some() {
            s.ended_at.insert(job, now);
            self.trace(format!(
                "{} back-fill of PG {} e{} to {} ends: {why}",
                node_name(id),
                job.1,
                job.2,
                node_name(job.3)
            ));
        }
    }

    fn backfill_next(&mut self, id: u64, job: JobKey) {
        let Some(j) = self.sds(id).jobs.get_mut(&job) else { return };
        match j.queue.pop_front() {
            None => {
                let (pool_id, pg_id, epoch, sds_id) = job;
                let cmd = Command::SyncComplete { pool_id, pg_id, epoch, sds_id };
                let wait = Wait::Backfill { job, step: BackfillStep::Complete };
                self.call(id, MDM, Req::Execute(cmd), wait, CONTROL_CALL_TIMEOUT_MS);
            }
            Some(k) => {
                if !self.backfill_still_current(id, job) {
                    return self.backfill_end(id, job, "the PG's map changed");
                }
                // Copy under the extent's lock: a concurrent write is ordered before the copy
                // (and included) or after it (and forwarded on top of it).
                self.lock_acquire(id, k, LockReq::Backfill(job, k));
            }
        }
    }

    fn backfill_copy(&mut self, id: u64, job: JobKey, k: (u64, u64)) {
        let Some(device_id) = self.sdss[&id].jobs.get(&job).map(|j| j.device_id) else {
            return self.lock_release(id, k);
        };
        let value = if self.sdss[&id].open_devices.contains(&device_id) {
            self.disks.get(&device_id).filter(|d| !d.failed).map(|d| d.store.get(&k).copied())
        } else {
            None
        };
        let Some(value) = value else {
            self.lock_release(id, k);
            return self.backfill_end(id, job, "reading the source copy failed");
        };
        let op = match value {
            Some(v) => IoOp::Write(v),
            None => IoOp::Trim,
        };
        let h = header(job.0, job.1, job.2, k);
        self.call(
            id,
            job.3,
            Req::Io { h, op },
            Wait::Backfill { job, step: BackfillStep::Copy(k) },
            PEER_CALL_TIMEOUT_MS,
        );
    }

    fn backfill_answer(&mut self, id: u64, job: JobKey, step: BackfillStep, result: Result<Resp, NetError>) {
        match step {
            BackfillStep::List => {
                let keys = match result {
                    Ok(Resp::Io { status: status::OK, keys, .. }) => keys,
                    Ok(Resp::Io { status: s, .. }) => {
                        let why = format!("listing the target failed: {}", status::name(s));
                        return self.backfill_end(id, job, &why);
                    }
                    other => return self.backfill_end(id, job, &format!("listing the target failed: {other:?}")),
                };
                let Some(device_id) = self.sdss[&id].jobs.get(&job).map(|j| j.device_id) else { return };
                let local: Vec<(u64, u64)> = match self.disks.get(&device_id) {
                    Some(d) if !d.failed && self.sdss[&id].open_devices.contains(&device_id) => {
                        d.store.keys().copied().filter(|&(v, e)| pg_of_extent(v, e, PG_COUNT) == job.1).collect()
                    }
                    Some(d) if d.failed && self.sdss[&id].open_devices.contains(&device_id) => {
                        // As the daemon's back-fill: a source copy that cannot be read is a
                        // failed device, reported so the PG moves on (seed 151).
                        self.report_device_failure(id, device_id);
                        return self.backfill_end(id, job, "source device failed");
                    }
                    _ => return self.backfill_end(id, job, "source device unusable"),
                };
                let stale = keys.into_iter().filter(|k| local.binary_search(k).is_err());
                let queue: VecDeque<(u64, u64)> = stale.chain(local.iter().copied()).collect();
                if let Some(j) = self.sds(id).jobs.get_mut(&job) {
                    j.queue = queue;
                }
                self.backfill_next(id, job);
            }
            BackfillStep::Copy(k) => {
                self.lock_release(id, k);
                match result {
                    Ok(Resp::Io { status: status::OK, .. }) => self.backfill_next(id, job),
                    _ => self.backfill_end(id, job, "copying an extent failed"),
                }
            }
            BackfillStep::Complete => {
                if matches!(result, Ok(Resp::Executed(Ok(())))) {
                    self.sds_trigger_refresh(id);
                    self.backfill_end(id, job, "complete");
                } else {
                    self.backfill_end(id, job, "marking the copy complete failed");
                }
            }
        }
    }
}
