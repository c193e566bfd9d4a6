//! A seeded, deterministic simulation of Tessera's PG, lease and rebuild protocol.
//!
//! One `u64` seed drives everything: cluster size (4–8 SDSs), network quality (loss,
//! delay), the workload of two SDCs sharing two multi-mapped volumes, and the faults —
//! SDS crashes and restarts (data durable), pauses (SIGSTOP/SIGCONT), partitions between
//! any two nodes or around one SDS, device failures (data gone), and MDM leadership
//! changes (leases forgotten). There are no threads, sockets or clocks: one event queue
//! ordered by (simulated ms, sequence number), so a seed replays exactly.
//!
//! What runs for real: `ClusterState::apply` for every command, `LeaseTable`,
//! `recovery::liveness_commands` and `rebalance::next_moves` each failure-detector tick,
//! `tessera_sds::map::{MapView::from_state, check_io, MapView::holds_copy}` for every data
//! request. What is re-implemented as events (see each module's doc): the MDM's request
//! handlers, the SDS daemon's write/read/forward/back-fill/heartbeat/refresh logic, and the
//! SDC's retry loop. Extents hold a version number instead of bytes; a write covers a
//! whole extent; Raft, FLUSH/volatile caches and clock drift are not modelled.
//!
//! Invariants, checked after every step (`world.rs`):
//! 1. **One primary per PG epoch** — over every map the MDM ever produced and every map
//!    the SDSs hold.
//! 2. **No acknowledged write lost, no stale read** — every complete copy of a PG holds the
//!    last acknowledged value of each extent (or a newer unacknowledged one), and every
//!    read returns such a value. Only PGs whose every complete copy sat on failed devices
//!    (two copies gone) are excused.
//! 3. **A complete copy is always kept; a syncing copy is never primary.**
//! 4. **Liveness** — after every fault is healed the cluster settles (every PG with its full
//!    set of complete copies, nothing syncing or moving, every SDS on the newest map), the
//!    copies of each extent agree (a write that failed may leave them different until
//!    overwritten, each holding an allowed value), every extent reads back its last
//!    acknowledged value, takes a new write, and then all copies are identical.
//!
//! Running it:
//! - `cargo test -p tessera-sim` runs the fixed CI seeds and the replay test.
//! - A longer run is one command:
//!   `TESSERA_SIM_SEEDS=0..10000 cargo test -p tessera-sim --release -- --ignored --nocapture`
//!   (`TESSERA_SIM_STEPS` sets chaos-phase steps per seed), or
//!   `cargo run -p tessera-sim --release -- --seeds 0..10000 [--steps N]`.
//! - A failing seed prints its invariant, the replay command and the trace tail;
//!   `TESSERA_SIM_SEEDS=<seed>..<seed+1>` replays it exactly.

pub mod client;
pub mod mdm;
pub mod oracle;
pub mod rng;
pub mod sds;
pub mod world;

pub use world::{Failure, Stats};

use world::World;

#[derive(Debug, Clone)]
pub struct Config {
    pub min_sds: usize,
    pub max_sds: usize,
    pub clients: usize,
    /// Events in the chaos phase (also bounded by `chaos_time_ms`).
    pub chaos_steps: u64,
    pub chaos_time_ms: u64,
    /// SDSs crashed or paused at once.
    pub max_faulty_sds: usize,
    pub max_device_failures: u64,
    /// Let a message overtake an earlier one on the same link (TCP never does this within
    /// one connection; only across a reconnect).
    pub reorder_within_links: bool,
    /// How long the healed cluster gets to settle, and each final phase to finish.
    pub settle_timeout_ms: u64,
    /// Print every trace line to stderr as it happens (`TESSERA_SIM_TRACE=1`).
    pub print_trace: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            min_sds: 4,
            max_sds: 8,
            clients: 2,
            chaos_steps: 20_000,
            chaos_time_ms: 120_000,
            max_faulty_sds: 2,
            max_device_failures: 2,
            reorder_within_links: false,
            settle_timeout_ms: 240_000,
            print_trace: std::env::var_os("TESSERA_SIM_TRACE").is_some(),
        }
    }
}

/// How often (simulated ms) the driver checks whether the healed cluster settled.
const SETTLE_CHECK_EVERY_MS: u64 = 50;

/// Runs one seed to the end: chaos, healing, settling, final reads and writes.
pub fn run(seed: u64, cfg: &Config) -> Result<Stats, Box<Failure>> {
    let mut w = World::new(seed, cfg.clone());
    while w.failure.is_none() && w.step < cfg.chaos_steps && w.now < cfg.chaos_time_ms {
        if !w.step() {
            break;
        }
    }
    bail(&mut w)?;
    w.heal_everything();
    settle(&mut w, "settle after healing")?;
    w.check_copies_agree(false);
    bail(&mut w)?;
    let keys: Vec<(u64, u64)> = w.all_extents().into_iter().filter(|&k| !w.excused_extent(k)).collect();
    for &k in &keys {
        w.client_submit(0, k, client::OpKind::Read, true);
    }
    settle(&mut w, "final reads")?;
    for &k in &keys {
        let v = w.oracle.new_write(k);
        w.client_submit(0, k, client::OpKind::Write(v), true);
    }
    settle(&mut w, "final writes")?;
    w.check_copies_agree(true);
    bail(&mut w)?;
    Ok(w.finish())
}

fn bail(w: &mut World) -> Result<(), Box<Failure>> {
    match w.failure.take() {
        Some(f) => Err(Box::new(f)),
        None => Ok(()),
    }
}

/// Runs until every SDC operation finished and the cluster is quiescent.
fn settle(w: &mut World, phase: &str) -> Result<(), Box<Failure>> {
    let deadline = w.now + w.cfg.settle_timeout_ms;
    let mut next_check = w.now;
    loop {
        bail(w)?;
        if w.now >= next_check {
            if w.clients_idle() && w.quiescent() {
                return Ok(());
            }
            next_check = w.now + SETTLE_CHECK_EVERY_MS;
        }
        if w.now > deadline || !w.step() {
            let detail = format!("{phase}: not settled after {} ms: {}", w.cfg.settle_timeout_ms, unsettled(w));
            w.fail("liveness: the healed cluster settles", detail);
            bail(w)?;
        }
    }
}

/// Why the cluster is not quiescent, briefly.
fn unsettled(w: &World) -> String {
    let state = &w.mdm.state;
    let mut out = Vec::new();
    if let Some(pool) = state.pools.get(&w.pool_id) {
        for pg in pool.pgs.iter().filter(|pg| !w.excused_pgs.contains(&pg.id)) {
            let bad_device = pg
                .replicas
                .iter()
                .any(|r| state.devices.get(&r.device_id).is_none_or(|d| d.state != tessera_core::DeviceState::Normal));
            if pg.replicas.len() != tessera_core::REPLICA_COUNT
                || !pg.syncing.is_empty()
                || pg.leaving.is_some()
                || bad_device
            {
                out.push(format!("PG {} {:?}", pg.id, pg));
            }
        }
    }
    let sds_states: Vec<String> = state.sdss.values().map(|s| format!("{}:{:?}", s.id, s.state)).collect();
    let maps: Vec<String> = w
        .sdss
        .values()
        .map(|s| format!("{}:alive={} map=v{} lease={}", s.id, s.alive, s.map.version, s.lease_held(w.now)))
        .collect();
    let ops: usize = w.clients.iter().map(|c| c.ops.len()).sum();
    let n = out.len();
    out.truncate(4);
    format!(
        "{n} PGs unsettled (first: {out:?}); SDS states {sds_states:?}; SDSs {maps:?}; MDM v{}; {ops} SDC ops in flight",
        w.mdm.version
    )
}

/// Parses `a..b` (exclusive) or a single seed.
pub fn parse_seeds(text: &str) -> Option<std::ops::Range<u64>> {
    match text.split_once("..") {
        Some((a, b)) => Some(a.trim().parse().ok()?..b.trim().parse().ok()?),
        None => {
            let s: u64 = text.trim().parse().ok()?;
            Some(s..s + 1)
        }
    }
}
