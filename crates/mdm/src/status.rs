//! Cluster health as `tessera cluster status` shows it: computed from the replicated model
//! and the leader's soft state (leases, usage, rebuild progress). Pure: inputs in, report out.

use std::collections::HashMap;

use tessera_core::lease::{LeaseStatus, LeaseTable};
use tessera_core::{ClusterState, DeviceState, SdsState, REPLICA_COUNT};
use tessera_proto::control::{ClusterStatus, MdmClusterStatus, PgCounts, PoolStatus, RebuildStatus, SdsStatus};

pub struct StatusInputs<'a> {
    pub state: &'a ClusterState,
    pub state_version: u64,
    pub leases: &'a LeaseTable,
    pub lease_duration_ms: u64,
    pub now_ms: u64,
    pub used_extents_by_device: &'a HashMap<u64, u64>,
    pub mdm: MdmClusterStatus,
    /// Extents remaining and bytes copied over the reported back-fill jobs.
    pub rebuild_extents_remaining: u64,
    pub rebuild_bytes_copied: u64,
    pub rebuild_rate_bytes_per_sec: u64,
    /// From the rate at which PGs finished re-mirroring recently.
    pub rebuild_eta_seconds: Option<u64>,
    pub rebuild_pgs_in_episode: u64,
}

pub fn pg_counts(state: &ClusterState, alive: &dyn Fn(u64) -> bool) -> PgCounts {
    let mut pgs = PgCounts::default();
    for pool in state.pools.values() {
        add_pool_pgs(&mut pgs, state, pool, alive);
    }
    pgs
}

/// Counts a pool's PGs by how many complete copies sit on a live SDS and a device that has
/// not failed (a copy kept on a failed device because it was the last complete one serves
/// nothing).
fn add_pool_pgs(
    pgs: &mut PgCounts,
    state: &ClusterState,
    pool: &tessera_core::StoragePool,
    alive: &dyn Fn(u64) -> bool,
) {
    {
        pgs.total_pgs += u64::from(pool.pg_count);
        if pool.pgs.is_empty() {
            pgs.unplaced_pgs += u64::from(pool.pg_count);
            return;
        }
        for pg in &pool.pgs {
            let device_ok = |d: u64| state.devices.get(&d).is_some_and(|d| d.state != DeviceState::Failed);
            let live_complete = pg.in_sync().filter(|r| alive(r.sds_id) && device_ok(r.device_id)).count();
            if live_complete == 0 {
                pgs.unavailable_pgs += 1;
            } else if live_complete < REPLICA_COUNT {
                pgs.degraded_pgs += 1;
            } else {
                pgs.healthy_pgs += 1;
            }
        }
    }
}

pub fn cluster_status(i: StatusInputs<'_>) -> ClusterStatus {
    let s = i.state;
    let alive = |sds_id: u64| i.leases.status(sds_id, i.now_ms, i.lease_duration_ms) != LeaseStatus::Expired;
    let held = |sds_id: u64| i.leases.is_alive(sds_id, i.now_ms);
    let sdss = s
        .sdss
        .values()
        .map(|sds| {
            let devices: Vec<_> = s.devices_of_sds(sds.id).collect();
            let used_bytes = devices
                .iter()
                .map(|d| {
                    let extent = s.pools.get(&d.pool_id).map_or(0, |p| u64::from(p.extent_size_bytes));
                    i.used_extents_by_device.get(&d.id).copied().unwrap_or(0) * extent
                })
                .sum();
            SdsStatus {
                id: sds.id,
                name: sds.name.clone(),
                address: sds.data_address.clone(),
                state: if held(sds.id) { "up" } else { "down" }.to_string(),
                membership: match sds.state {
                    SdsState::Normal => "normal",
                    SdsState::Down => "removed",
                    SdsState::Draining => "draining",
                }
                .to_string(),
                devices: devices.len(),
                capacity_bytes: devices
                    .iter()
                    .filter(|d| d.state == DeviceState::Normal)
                    .map(|d| d.capacity_bytes)
                    .sum(),
                used_bytes,
            }
        })
        .collect();
    let pgs_rebuilding = s.pools.values().flat_map(|p| p.pgs.iter()).filter(|pg| !pg.syncing.is_empty()).count() as u64;
    let rate = i.rebuild_rate_bytes_per_sec;
    let eta_seconds = if pgs_rebuilding == 0 { None } else { i.rebuild_eta_seconds };
    ClusterStatus {
        mdm_members: i.mdm.members.clone(),
        leader_id: i.mdm.leader_id,
        mdm: i.mdm,
        state_version: i.state_version,
        sdss,
        pgs: pg_counts(s, &alive),
        rebuild: RebuildStatus {
            pgs_rebuilding,
            extents_remaining: i.rebuild_extents_remaining,
            bytes_copied: i.rebuild_bytes_copied,
            rate_bytes_per_sec: rate,
            eta_seconds,
            pgs_in_episode: i.rebuild_pgs_in_episode.max(pgs_rebuilding),
        },
        pools: s
            .pools
            .values()
            .map(|p| {
                let mut pgs = PgCounts::default();
                add_pool_pgs(&mut pgs, s, p, &alive);
                let used_bytes = s
                    .devices_of_pool(p.id)
                    .map(|d| i.used_extents_by_device.get(&d.id).copied().unwrap_or(0) * u64::from(p.extent_size_bytes))
                    .sum();
                PoolStatus {
                    name: p.name.clone(),
                    pgs,
                    pgs_rebuilding: p.pgs.iter().filter(|pg| !pg.syncing.is_empty()).count() as u64,
                    raw_capacity_bytes: s.pool_raw_capacity_bytes(p.id),
                    usable_capacity_bytes: s.pool_usable_capacity_bytes(p),
                    spare_percent: p.spare_percent,
                    used_bytes,
                    thick_reserved_bytes: s.pool_thick_reserved_bytes(p.id),
                    volumes: s.volumes_of_pool(p.id).count(),
                }
            })
            .collect(),
        volumes: s.volumes.len(),
        sdcs: s.sdcs.len(),
    }
}
