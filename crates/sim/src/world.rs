//! The simulated world: one event queue, a network, the MDM, the SDSs, two SDCs and the
//! oracle. Everything happens in `World::step`, one event at a time, in (time, sequence)
//! order; the only randomness is `World::rng`, so a run is a function of its seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::rc::Rc;

use tessera_core::layout::pg_of_extent;
use tessera_core::{ClusterState, Command, DeviceState, REPLICA_COUNT};
use tessera_proto::data::IoHeader;

use crate::client::Client;
use crate::mdm::Mdm;
use crate::oracle::Oracle;
use crate::rng::Rng;
use crate::sds::Sds;
use crate::Config;

/// Node address of the MDM. SDSs use their cluster id; SDCs `CLIENT_BASE + index`.
pub const MDM: u64 = 0;
pub const CLIENT_BASE: u64 = 1_000_000;

pub const POOL: &str = "p";
pub const VOLUMES: usize = 2;
pub const EXTENTS_PER_VOLUME: u64 = 32;
pub const PG_COUNT: u32 = 64;
pub const EXTENT_SIZE_BYTES: u32 = 1 << 20;
pub const DEVICE_CAPACITY_BYTES: u64 = 10 << 30;

/// Lines of trace kept for a failure report.
const TRACE_TAIL: usize = 400;

/// Request bodies. Control requests go to the MDM, data requests to SDSs.
#[derive(Debug, Clone)]
pub enum Req {
    Heartbeat { sent_at: u64 },
    GetState,
    Execute(Command),
    WaitForChange { after_version: u64 },
    ReportUnreachable { sds_id: u64 },
    Io { h: IoHeader, op: IoOp },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    /// The simulated payload: a version number unique to the write.
    Write(u64),
    Trim,
    ListPgExtents,
}

#[derive(Debug, Clone)]
pub enum Resp {
    Heartbeat { state_version: u64, lease_duration_ms: u64 },
    State { version: u64, state: Rc<ClusterState> },
    Executed(Result<(), String>),
    Version(u64),
    Reported,
    Refused(String),
    Io { status: u32, value: u64, keys: Vec<(u64, u64)> },
}

#[derive(Debug, Clone)]
pub enum Msg {
    Req {
        rpc: u64,
        body: Req,
    },
    Resp {
        rpc: u64,
        body: Resp,
    },
    /// The destination host answered but no process listens: connection refused.
    Refused {
        rpc: u64,
    },
}

/// Why an RPC produced no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetError {
    Timeout,
    ConnectionRefused,
}

/// What a node does when the answer to one of its RPCs arrives (or does not).
#[derive(Debug, Clone)]
pub enum Wait {
    SdsHeartbeat { sent_at: u64 },
    SdsRefresh { renew: Option<(u64, u64, u64)> },
    SdsLongPoll,
    SdsForward { op: u64, index: usize },
    SdsRemoveReplica { op: u64 },
    SdsFailDevice { device_id: u64 },
    SdsDeviceReady,
    Backfill { job: JobKey, step: BackfillStep },
    ClientIo { client: usize, op: u64 },
    ClientRefresh { client: usize },
    ClientReport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackfillStep {
    List,
    Copy((u64, u64)),
    Complete,
}

/// (pool, PG, epoch, target SDS), as in `tessera_sds::rebuild`.
pub type JobKey = (u64, u32, u64, u64);

#[derive(Debug, Clone)]
pub enum Timer {
    Heartbeat,
    Scheduler,
    /// Probe every open device (as the daemon's `probe_devices`).
    DeviceProbe,
    LongPoll,
    RpcTimeout(u64),
    /// A read's device access finished: re-check the lease and reply.
    ReadDone {
        client_node: u64,
        rpc: u64,
        value: u64,
    },
    ClientRetry(u64),
}

#[derive(Debug, Clone)]
pub enum Event {
    Deliver { from: u64, to: u64, msg: Msg },
    Timer { node: u64, incarnation: u64, timer: Timer },
    MdmTick,
    ClientTick(usize),
    Fault,
    Heal(Heal),
}

#[derive(Debug, Clone)]
pub enum Heal {
    Partition(u64, u64),
    Resume(u64),
    Restart(u64),
}

/// One simulated disk: extent -> version. Durable: survives its SDS's crash.
#[derive(Debug, Clone, Default)]
pub struct Disk {
    pub sds_id: u64,
    pub store: BTreeMap<(u64, u64), u64>,
    /// IO errors from now on (the data is gone).
    pub failed: bool,
}

struct Pending {
    node: u64,
    incarnation: u64,
    wait: Wait,
}

/// A broken invariant, with what is needed to replay and understand it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub time_ms: u64,
    pub invariant: &'static str,
    pub detail: String,
    pub trace_tail: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} broke `{}` at step {} (t={} ms): {}",
            self.seed, self.invariant, self.step, self.time_ms, self.detail
        )?;
        writeln!(
            f,
            "replay: TESSERA_SIM_SEEDS={}..{} cargo test -p tessera-sim -- --ignored --nocapture",
            self.seed,
            self.seed + 1
        )?;
        writeln!(f, "last {} trace lines:", self.trace_tail.len())?;
        for l in &self.trace_tail {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// Counters reported by a passing run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub steps: u64,
    pub sim_time_ms: u64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub crashes: u64,
    pub pauses: u64,
    pub partitions: u64,
    pub device_failures: u64,
    pub leader_changes: u64,
    pub messages_lost: u64,
    pub commands: u64,
    pub sds_declared_down: u64,
    pub replicas_removed: u64,
    pub syncs_completed: u64,
    pub moves: u64,
    pub excused_pgs: u64,
    /// Reads served by an SDS that was no longer the PG's primary in the MDM's state.
    pub reads_by_demoted_primary: u64,
    /// Extents whose copies differed at quiescence because of a write that failed.
    pub diverged_unacked_extents: u64,
    /// Hash of the whole trace: equal for two runs of one seed.
    pub trace_hash: u64,
}

pub struct World {
    pub cfg: Config,
    pub seed: u64,
    pub rng: Rng,
    pub now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    pub step: u64,
    pub mdm: Mdm,
    pub sdss: BTreeMap<u64, Sds>,
    pub disks: BTreeMap<u64, Disk>,
    pub clients: Vec<Client>,
    pub oracle: Oracle,
    pending: BTreeMap<u64, Pending>,
    next_rpc: u64,
    /// Unordered pairs of nodes that cannot talk.
    partitions: BTreeSet<(u64, u64)>,
    /// Per directed link, the time of the last delivery scheduled: links are FIFO (TCP).
    link_clock: BTreeMap<(u64, u64), u64>,
    pub loss_per_million: u64,
    pub reorder_per_million: u64,
    pub max_delay_ms: u64,
    /// Events for a paused SDS wait here until it resumes.
    stalled: BTreeMap<u64, Vec<Event>>,
    /// PGs that lost every complete copy to device failures: unavailable by design.
    pub excused_pgs: BTreeSet<u32>,
    /// (PG, epoch) -> primary, over every state the MDM ever had.
    primary_history: BTreeMap<(u32, u64), u64>,
    pub chaos: bool,
    pub stats: Stats,
    trace_tail: VecDeque<String>,
    trace_hash: u64,
    pub failure: Option<Failure>,
    pub pool_id: u64,
    pub volume_ids: Vec<u64>,
}

pub fn node_name(n: u64) -> String {
    match n {
        MDM => "mdm".into(),
        n if n >= CLIENT_BASE => format!("sdc{}", n - CLIENT_BASE),
        n => format!("sds{n}"),
    }
}

impl World {
    pub fn new(seed: u64, cfg: Config) -> World {
        let mut rng = Rng::new(seed);
        let sds_count = rng.range(cfg.min_sds as u64, cfg.max_sds as u64) as usize;
        let loss_per_million = *rng.pick(&[0, 2_000, 10_000, 30_000]).unwrap_or(&0);
        let reorder_per_million = if cfg.reorder_within_links { *rng.pick(&[0, 5_000]).unwrap_or(&0) } else { 0 };
        let max_delay_ms = *rng.pick(&[2, 10, 50, 300]).unwrap_or(&10);
        let mut w = World {
            cfg,
            seed,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            step: 0,
            mdm: Mdm::default(),
            sdss: BTreeMap::new(),
            disks: BTreeMap::new(),
            clients: Vec::new(),
            oracle: Oracle::default(),
            pending: BTreeMap::new(),
            next_rpc: 1,
            partitions: BTreeSet::new(),
            link_clock: BTreeMap::new(),
            loss_per_million,
            reorder_per_million,
            max_delay_ms,
            stalled: BTreeMap::new(),
            excused_pgs: BTreeSet::new(),
            primary_history: BTreeMap::new(),
            chaos: true,
            stats: Stats::default(),
            trace_tail: VecDeque::new(),
            trace_hash: 0xcbf2_9ce4_8422_2325,
            failure: None,
            pool_id: 0,
            volume_ids: Vec::new(),
        };
        w.trace(format!(
            "seed {seed}: {sds_count} SDSs, loss {loss_per_million}/1e6, reorder {reorder_per_million}/1e6, delay <= {max_delay_ms} ms"
        ));
        w.bootstrap(sds_count);
        w
    }

    /// Builds the cluster with the same commands an administrator would run.
    fn bootstrap(&mut self, sds_count: usize) {
        let admin = |w: &mut World, c: Command| -> u64 {
            match w.mdm_apply(c.clone()) {
                Ok(id) => id,
                Err(e) => panic!("bootstrap command {c:?} refused: {e}"),
            }
        };
        admin(self, Command::CreateProtectionDomain { name: "pd".into() });
        self.pool_id = admin(
            self,
            Command::CreatePool {
                pd: "pd".into(),
                name: POOL.into(),
                extent_size_bytes: EXTENT_SIZE_BYTES,
                pg_count: PG_COUNT,
                spare_percent: 10,
            },
        );
        for i in 0..sds_count {
            let name = format!("s{i}");
            let sds_id = admin(
                self,
                Command::AddSds {
                    name: name.clone(),
                    pd: "pd".into(),
                    fault_set: None,
                    data_address: format!("127.0.0.1:{}", 7000 + i),
                },
            );
            let device_id = admin(self, Command::AddDevice { sds: name, pool: POOL.into(), path: "/dev/sim0".into() });
            admin(self, Command::DeviceReady { device_id, capacity_bytes: DEVICE_CAPACITY_BYTES });
            self.disks.insert(device_id, Disk { sds_id, ..Default::default() });
            self.sdss.insert(sds_id, Sds::new(sds_id, format!("s{i}")));
        }
        for v in 0..VOLUMES {
            let id = admin(
                self,
                Command::CreateVolume {
                    name: format!("v{v}"),
                    pool: POOL.into(),
                    size_bytes: EXTENTS_PER_VOLUME * u64::from(EXTENT_SIZE_BYTES),
                    thin: true,
                    allow_multi_map: true,
                },
            );
            self.volume_ids.push(id);
        }
        for c in 0..self.cfg.clients {
            admin(
                self,
                Command::RegisterSdc {
                    name: format!("c{c}"),
                    nbd_socket: format!("/run/c{c}.sock"),
                    nbd_tcp_address: None,
                },
            );
            for v in 0..VOLUMES {
                admin(
                    self,
                    Command::MapVolume { volume: format!("v{v}"), sdc: format!("c{c}"), allow_multi_map: true },
                );
            }
            self.clients.push(Client::new(c));
        }
        self.mdm.leases.set_leader(true, 0);
        let ids: Vec<u64> = self.sdss.keys().copied().collect();
        for id in ids {
            self.sds_start(id);
        }
        self.schedule(250, Event::MdmTick);
        for c in 0..self.clients.len() {
            self.schedule(1 + c as u64, Event::ClientTick(c));
        }
        self.schedule(500, Event::Fault);
    }

    // ---- event queue -------------------------------------------------------------------

    pub fn schedule(&mut self, after_ms: u64, ev: Event) {
        self.schedule_at(self.now + after_ms, ev);
    }

    fn schedule_at(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, ev);
    }

    pub fn timer(&mut self, node: u64, incarnation: u64, after_ms: u64, timer: Timer) {
        self.schedule(after_ms, Event::Timer { node, incarnation, timer });
    }

    pub fn trace(&mut self, line: String) {
        for b in line.bytes() {
            self.trace_hash ^= u64::from(b);
            self.trace_hash = self.trace_hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.trace_hash = self.trace_hash.rotate_left(7) ^ self.now;
        if self.cfg.print_trace {
            eprintln!("[{:>7} ms #{}] {line}", self.now, self.step);
        }
        if self.trace_tail.len() == TRACE_TAIL {
            self.trace_tail.pop_front();
        }
        self.trace_tail.push_back(format!("[{:>7} ms #{}] {line}", self.now, self.step));
    }

    pub fn fail(&mut self, invariant: &'static str, detail: String) {
        if self.failure.is_some() {
            return;
        }
        self.trace(format!("INVARIANT BROKEN: {invariant}: {detail}"));
        self.failure = Some(Failure {
            seed: self.seed,
            step: self.step,
            time_ms: self.now,
            invariant,
            detail,
            trace_tail: self.trace_tail.iter().cloned().collect(),
        });
    }

    /// Runs one event. Returns false when the queue is empty.
    pub fn step(&mut self) -> bool {
        let Some(Reverse((at, seq))) = self.queue.pop() else { return false };
        let ev = self.events.remove(&seq).expect("every queued sequence has its event");
        assert!(at >= self.now, "time never runs backwards");
        self.now = at;
        self.step += 1;
        if let Some(id) = self.event_sds(&ev) {
            if self.sdss.get(&id).is_some_and(|s| s.alive && s.paused) {
                self.stalled.entry(id).or_default().push(ev);
                return true;
            }
        }
        self.dispatch(ev);
        self.check_step_invariants();
        true
    }

    fn event_sds(&self, ev: &Event) -> Option<u64> {
        let n = match ev {
            Event::Deliver { to, .. } => *to,
            Event::Timer { node, .. } => *node,
            _ => return None,
        };
        self.sdss.contains_key(&n).then_some(n)
    }

    fn dispatch(&mut self, ev: Event) {
        match ev {
            Event::Deliver { from, to, msg } => self.deliver(from, to, msg),
            Event::Timer { node, incarnation, timer } => self.on_timer(node, incarnation, timer),
            Event::MdmTick => {
                self.mdm_tick();
                self.schedule(crate::mdm::FAILURE_DETECTOR_INTERVAL_MS, Event::MdmTick);
            }
            Event::ClientTick(c) => self.client_tick(c),
            Event::Fault => self.inject_fault(),
            Event::Heal(h) => self.heal(h),
        }
    }

    fn on_timer(&mut self, node: u64, incarnation: u64, timer: Timer) {
        if let Timer::RpcTimeout(rpc) = timer {
            if let Some(p) = self.pending.get(&rpc) {
                if p.node == node && p.incarnation == incarnation {
                    let p = self.pending.remove(&rpc).expect("just seen");
                    self.trace(format!("{} rpc {rpc} timed out", node_name(node)));
                    self.complete(p.node, p.wait, Err(NetError::Timeout));
                }
            }
            return;
        }
        if node >= CLIENT_BASE {
            if let Timer::ClientRetry(op) = timer {
                self.client_attempt((node - CLIENT_BASE) as usize, op);
            }
            return;
        }
        let live = self.sdss.get(&node).is_some_and(|s| s.alive && s.incarnation == incarnation);
        if live {
            self.sds_timer(node, timer);
        }
    }

    // ---- network -----------------------------------------------------------------------

    pub fn partitioned(&self, a: u64, b: u64) -> bool {
        self.partitions.contains(&(a.min(b), a.max(b)))
    }

    /// Sends a request and registers what `from` does with the answer.
    pub fn call(&mut self, from: u64, to: u64, body: Req, wait: Wait, timeout_ms: u64) -> u64 {
        let rpc = self.next_rpc;
        self.next_rpc += 1;
        let incarnation = self.incarnation_of(from);
        self.pending.insert(rpc, Pending { node: from, incarnation, wait });
        self.timer(from, incarnation, timeout_ms, Timer::RpcTimeout(rpc));
        self.send(from, to, Msg::Req { rpc, body });
        rpc
    }

    pub fn reply(&mut self, from: u64, to: u64, rpc: u64, body: Resp) {
        self.send(from, to, Msg::Resp { rpc, body });
    }

    fn incarnation_of(&self, node: u64) -> u64 {
        self.sdss.get(&node).map_or(0, |s| s.incarnation)
    }

    pub fn send(&mut self, from: u64, to: u64, msg: Msg) {
        if self.chaos && self.rng.chance(self.loss_per_million) {
            self.stats.messages_lost += 1;
            self.trace(format!("lost {} -> {}: {}", node_name(from), node_name(to), short(&msg)));
            return;
        }
        let delay = self.rng.range(0, self.max_delay_ms.max(1));
        let mut at = self.now + 1 + delay;
        let link = (from, to);
        let reorder = self.chaos && self.rng.chance(self.reorder_per_million);
        if !reorder {
            // TCP: a connection delivers in order. Only a reconnect (modelled by `reorder`)
            // lets a later message overtake an earlier one.
            at = at.max(self.link_clock.get(&link).copied().unwrap_or(0));
            self.link_clock.insert(link, at);
        }
        self.schedule_at(at, Event::Deliver { from, to, msg });
    }

    fn deliver(&mut self, from: u64, to: u64, msg: Msg) {
        if self.partitioned(from, to) {
            self.trace(format!("partition drops {} -> {}: {}", node_name(from), node_name(to), short(&msg)));
            return;
        }
        if let Some(s) = self.sdss.get(&to) {
            if !s.alive {
                // No process listens: the sender's connection is refused at once.
                if let Msg::Req { rpc, .. } = msg {
                    self.send(to, from, Msg::Refused { rpc });
                }
                return;
            }
        }
        match msg {
            Msg::Req { rpc, body } => {
                if to == MDM {
                    self.mdm_handle(from, rpc, body);
                } else if to >= CLIENT_BASE {
                    // SDCs serve no requests.
                } else {
                    self.sds_handle(to, from, rpc, body);
                }
            }
            Msg::Resp { rpc, body } => {
                if let Some(p) = self.take_pending(to, rpc) {
                    self.complete(p.node, p.wait, Ok(body));
                }
            }
            Msg::Refused { rpc } => {
                if let Some(p) = self.take_pending(to, rpc) {
                    self.complete(p.node, p.wait, Err(NetError::ConnectionRefused));
                }
            }
        }
    }

    fn take_pending(&mut self, node: u64, rpc: u64) -> Option<Pending> {
        let p = self.pending.get(&rpc)?;
        if p.node != node || p.incarnation != self.incarnation_of(node) {
            return None;
        }
        self.pending.remove(&rpc)
    }

    pub fn forget_pending_of(&mut self, node: u64) {
        self.pending.retain(|_, p| p.node != node);
    }

    fn complete(&mut self, node: u64, wait: Wait, result: Result<Resp, NetError>) {
        match wait {
            Wait::ClientIo { client, op } => self.client_io_done(client, op, result),
            Wait::ClientRefresh { client } => self.client_refresh_done(client, result),
            Wait::ClientReport => {}
            other => self.sds_complete(node, other, result),
        }
    }

    // ---- faults ------------------------------------------------------------------------

    fn faulty_sds_count(&self) -> usize {
        self.sdss.values().filter(|s| !s.alive || s.paused).count()
    }

    fn inject_fault(&mut self) {
        if !self.chaos {
            return;
        }
        let after = self.rng.range(100, 1500);
        self.schedule(after, Event::Fault);
        let ids: Vec<u64> = self.sdss.keys().copied().collect();
        let Some(&victim) = self.rng.pick(&ids) else { return };
        let roll = self.rng.range(0, 99);
        let may_hurt = self.faulty_sds_count() < self.cfg.max_faulty_sds;
        match roll {
            0..=14 if may_hurt && self.sdss[&victim].alive && !self.sdss[&victim].paused => {
                self.stats.crashes += 1;
                self.sds_crash(victim);
                let after = self.rng.range(200, 20_000);
                self.schedule(after, Event::Heal(Heal::Restart(victim)));
            }
            15..=26 if may_hurt && self.sdss[&victim].alive && !self.sdss[&victim].paused => {
                self.stats.pauses += 1;
                self.sdss.get_mut(&victim).expect("picked").paused = true;
                self.trace(format!("pause {}", node_name(victim)));
                let after = self.rng.range(100, 12_000);
                self.schedule(after, Event::Heal(Heal::Resume(victim)));
            }
            27..=49 => {
                let mut peers: Vec<u64> = vec![MDM];
                peers.extend(ids.iter().copied().filter(|&i| i != victim));
                peers.extend((0..self.clients.len() as u64).map(|c| CLIENT_BASE + c));
                let isolate = self.rng.chance(200_000);
                let targets: Vec<u64> =
                    if isolate { peers } else { self.rng.pick(&peers).copied().into_iter().collect() };
                self.stats.partitions += 1;
                let after = self.rng.range(200, 15_000);
                for t in targets {
                    self.trace(format!("partition {} | {}", node_name(victim), node_name(t)));
                    self.partitions.insert((victim.min(t), victim.max(t)));
                    self.schedule(after, Event::Heal(Heal::Partition(victim, t)));
                }
            }
            50..=52 if self.stats.device_failures < self.cfg.max_device_failures => self.fail_disk_of(victim),
            53..=55 => {
                self.stats.leader_changes += 1;
                self.trace("MDM leadership changes hands: leases forgotten".into());
                self.mdm.leases.set_leader(false, self.now);
                self.mdm.leases.set_leader(true, self.now);
            }
            _ => {}
        }
    }

    fn fail_disk_of(&mut self, sds_id: u64) {
        let Some((&device_id, _)) = self.disks.iter().find(|(_, d)| d.sds_id == sds_id && !d.failed) else { return };
        self.stats.device_failures += 1;
        let disk = self.disks.get_mut(&device_id).expect("found above");
        disk.failed = true;
        disk.store.clear();
        self.trace(format!("device {device_id} of {} fails", node_name(sds_id)));
        self.check_state_invariants();
    }

    fn heal(&mut self, h: Heal) {
        match h {
            Heal::Partition(a, b) => {
                if self.partitions.remove(&(a.min(b), a.max(b))) {
                    self.trace(format!("heal partition {} | {}", node_name(a), node_name(b)));
                }
            }
            Heal::Resume(id) => self.resume(id),
            Heal::Restart(id) => {
                if self.sdss.get(&id).is_some_and(|s| !s.alive) {
                    self.sds_start(id);
                }
            }
        }
    }

    fn resume(&mut self, id: u64) {
        let Some(s) = self.sdss.get_mut(&id) else { return };
        if !s.paused {
            return;
        }
        s.paused = false;
        self.trace(format!("resume {}", node_name(id)));
        // SIGCONT: everything that queued up while stopped runs now, in arrival order.
        for ev in self.stalled.remove(&id).unwrap_or_default() {
            self.schedule(0, ev);
        }
    }

    /// Stops all faults: heal partitions, resume and restart every SDS, replace failed
    /// devices (as an administrator would: add a new device), deliver every message.
    pub fn heal_everything(&mut self) {
        self.chaos = false;
        self.loss_per_million = 0;
        self.trace("---- liveness phase: every fault healed ----".into());
        self.partitions.clear();
        let ids: Vec<u64> = self.sdss.keys().copied().collect();
        for id in ids {
            self.resume(id);
            if !self.sdss[&id].alive {
                self.sds_start(id);
            }
        }
        let failed: Vec<(u64, u64)> =
            self.disks.iter().filter(|(_, d)| d.failed).map(|(&i, d)| (i, d.sds_id)).collect();
        for (device_id, sds_id) in failed {
            let name = self.sdss[&sds_id].name.clone();
            let path = format!("/dev/sim-replaces-{device_id}");
            match self.mdm_apply(Command::AddDevice { sds: name, pool: POOL.into(), path }) {
                Ok(id) => {
                    self.disks.insert(id, Disk { sds_id, ..Default::default() });
                    self.trace(format!("admin adds device {id} to {}", node_name(sds_id)));
                }
                Err(e) => self.fail("liveness", format!("adding a replacement device refused: {e}")),
            }
        }
    }

    // ---- invariants --------------------------------------------------------------------

    /// Checked after every MDM command: (3) every PG keeps a complete copy and a syncing copy
    /// is never primary; (1) one primary per (PG, epoch) over the whole history.
    pub fn check_state_invariants(&mut self) {
        let state = self.mdm.state.clone();
        let Some(pool) = state.pools.get(&self.pool_id) else { return };
        for pg in &pool.pgs {
            // Every complete copy on a failed device: two copies are gone (a latent device
            // failure plus a dropped copy, or two device failures). Data loss and
            // unavailability are then allowed; wrong data is still not.
            let all_on_failed = pg.in_sync().all(|r| self.disks.get(&r.device_id).is_none_or(|d| d.failed));
            if all_on_failed && pg.in_sync().count() > 0 && self.excused_pgs.insert(pg.id) {
                self.trace(format!("PG {} has every complete copy on failed devices: excused", pg.id));
            }
            if pg.in_sync().count() == 0 {
                self.fail("complete copy kept", format!("PG {} has no complete copy: {pg:?}", pg.id));
            }
            if let Some(p) = pg.primary() {
                if pg.syncing.contains(&p.sds_id) {
                    self.fail("syncing never primary", format!("PG {}: {pg:?}", pg.id));
                }
                match self.primary_history.get(&(pg.id, pg.epoch)) {
                    Some(&seen) if seen != p.sds_id => self.fail(
                        "one primary per PG epoch",
                        format!("PG {} epoch {} had primary {seen}, now {}", pg.id, pg.epoch, p.sds_id),
                    ),
                    Some(_) => {}
                    None => {
                        self.primary_history.insert((pg.id, pg.epoch), p.sds_id);
                    }
                }
            }
            let mut sdss: Vec<u64> = pg.replicas.iter().map(|r| r.sds_id).collect();
            sdss.sort_unstable();
            sdss.dedup();
            if sdss.len() != pg.replicas.len() {
                self.fail("copies on distinct SDSs", format!("PG {}: {pg:?}", pg.id));
            }
        }
    }

    /// Checked after every step. (1) the maps SDSs hold agree on one primary per (PG,
    /// epoch); (2') no acknowledged write is missing from a complete copy of a PG that has
    /// not lost every complete copy.
    fn check_step_invariants(&mut self) {
        if self.failure.is_some() {
            return;
        }
        let mut claimed: BTreeMap<(u32, u64), u64> = BTreeMap::new();
        for s in self.sdss.values().filter(|s| s.alive) {
            let Some(pool) = s.map.pools.get(&self.pool_id) else { continue };
            for (i, pg) in pool.pgs.iter().enumerate() {
                if pg.replicas.first().is_some_and(|p| p.sds_id == s.id) {
                    if let Some(&other) = claimed.get(&(i as u32, pg.epoch)) {
                        let detail =
                            format!("SDS {other} and SDS {} both primary of PG {i} at epoch {}", s.id, pg.epoch);
                        self.fail("one primary per PG epoch", detail);
                        return;
                    }
                    claimed.insert((i as u32, pg.epoch), s.id);
                }
            }
        }
        self.check_acked_writes_on_complete_copies();
    }

    fn check_acked_writes_on_complete_copies(&mut self) {
        let state = self.mdm.state.clone();
        let Some(pool) = state.pools.get(&self.pool_id) else { return };
        for (vi, &volume_id) in self.volume_ids.iter().enumerate() {
            for extent in 0..EXTENTS_PER_VOLUME {
                let key = (volume_id, extent);
                let Some(acked) = self.oracle.last_acked(key) else { continue };
                let pg_id = pg_of_extent(volume_id, extent, PG_COUNT);
                if self.excused_pgs.contains(&pg_id) {
                    continue;
                }
                let pg = &pool.pgs[pg_id as usize];
                for r in pg.in_sync() {
                    let Some(disk) = self.disks.get(&r.device_id) else { continue };
                    if disk.failed {
                        continue;
                    }
                    let held = disk.store.get(&key).copied().unwrap_or(0);
                    if !self.oracle.allowed(key, held) {
                        let detail = format!(
                            "v{vi}/extent {extent} (PG {pg_id} epoch {}): acked {acked}, but complete copy on SDS {} device {} holds {held}; PG {pg:?}",
                            pg.epoch, r.sds_id, r.device_id
                        );
                        self.fail("no acked write lost", detail);
                        return;
                    }
                }
            }
        }
    }

    /// Whether the cluster has settled: every PG with its full set of complete copies on
    /// live SDSs and good devices, no move in progress, every SDS on the newest map.
    pub fn quiescent(&self) -> bool {
        let state = &self.mdm.state;
        let Some(pool) = state.pools.get(&self.pool_id) else { return false };
        let settled = pool.pgs.iter().filter(|pg| !self.excused_pgs.contains(&pg.id)).all(|pg| {
            pg.replicas.len() == REPLICA_COUNT
                && pg.syncing.is_empty()
                && pg.leaving.is_none()
                && pg.replicas.iter().all(|r| {
                    state.devices.get(&r.device_id).is_some_and(|d| d.state == DeviceState::Normal)
                        && self.disks.get(&r.device_id).is_some_and(|d| !d.failed)
                })
        });
        let all_up = state.sdss.values().all(|s| s.state == tessera_core::SdsState::Normal);
        let maps_current =
            self.sdss.values().all(|s| s.alive && s.map.version == self.mdm.version && s.lease_held(self.now));
        settled && all_up && maps_current && tessera_core::rebalance::next_moves(state).is_empty()
    }

    /// At quiescence: the copies of every extent hold the same value, except where a write
    /// that failed left them different (each then holds a value the oracle allows).
    pub fn check_copies_agree(&mut self, strict: bool) {
        let state = self.mdm.state.clone();
        let Some(pool) = state.pools.get(&self.pool_id) else { return };
        for &volume_id in &self.volume_ids.clone() {
            for extent in 0..EXTENTS_PER_VOLUME {
                let key = (volume_id, extent);
                let pg_id = pg_of_extent(volume_id, extent, PG_COUNT);
                if self.excused_pgs.contains(&pg_id) {
                    continue;
                }
                let pg = &pool.pgs[pg_id as usize];
                let values: Vec<(u64, u64)> = pg
                    .replicas
                    .iter()
                    .map(|r| {
                        (r.sds_id, self.disks.get(&r.device_id).and_then(|d| d.store.get(&key).copied()).unwrap_or(0))
                    })
                    .collect();
                let all_equal = values.windows(2).all(|w| w[0].1 == w[1].1);
                if all_equal {
                    continue;
                }
                let explained = !strict
                    && self.oracle.has_unknown_newer(key)
                    && values.iter().all(|&(_, v)| self.oracle.allowed(key, v));
                if explained {
                    self.stats.diverged_unacked_extents += 1;
                    self.trace(format!("extent {key:?} copies differ after a failed write: {values:?}"));
                } else {
                    let detail = format!(
                        "extent {key:?} (PG {pg_id} epoch {}): copies hold {values:?}; oracle {:?}",
                        pg.epoch,
                        self.oracle.describe(key)
                    );
                    self.fail("copies identical after rebuild", detail);
                    return;
                }
            }
        }
    }

    pub fn finish(&mut self) -> Stats {
        self.stats.steps = self.step;
        self.stats.sim_time_ms = self.now;
        self.stats.excused_pgs = self.excused_pgs.len() as u64;
        self.stats.trace_hash = self.trace_hash;
        self.stats.clone()
    }

    pub fn all_extents(&self) -> Vec<(u64, u64)> {
        self.volume_ids.iter().flat_map(|&v| (0..EXTENTS_PER_VOLUME).map(move |e| (v, e))).collect()
    }

    pub fn excused_extent(&self, key: (u64, u64)) -> bool {
        self.excused_pgs.contains(&pg_of_extent(key.0, key.1, PG_COUNT))
    }
}

fn short(msg: &Msg) -> String {
    match msg {
        Msg::Req { rpc, body: Req::Io { h, op } } => {
            format!(
                "rpc {rpc} {op:?} v{}/{} pg {} e{} flags {}",
                h.volume_id, h.extent_index, h.pg_id, h.pg_epoch, h.flags
            )
        }
        Msg::Req { rpc, body: Req::Execute(c) } => format!("rpc {rpc} {c:?}"),
        Msg::Req { rpc, body } => format!("rpc {rpc} {}", req_name(body)),
        Msg::Resp { rpc, body: Resp::Io { status, value, .. } } => {
            format!("rpc {rpc} reply {} value {value}", tessera_proto::data::status::name(*status))
        }
        Msg::Resp { rpc, body: Resp::State { version, .. } } => format!("rpc {rpc} state v{version}"),
        Msg::Resp { rpc, body } => format!("rpc {rpc} {body:?}"),
        Msg::Refused { rpc } => format!("rpc {rpc} refused"),
    }
}

fn req_name(r: &Req) -> &'static str {
    match r {
        Req::Heartbeat { .. } => "heartbeat",
        Req::GetState => "get-state",
        Req::Execute(_) => "execute",
        Req::WaitForChange { .. } => "wait-for-change",
        Req::ReportUnreachable { .. } => "report-unreachable",
        Req::Io { .. } => "io",
    }
}
