//! Cluster health as `tessera cluster status` shows it: computed from the replicated model
//! and the leader's soft state (leases, usage). Pure: inputs in, report out.

use std::collections::HashMap;

use tessera_core::lease::LeaseTable;
use tessera_core::{ClusterState, DeviceState};
use tessera_proto::control::{ClusterStatus, MdmMember, PgCounts, SdsStatus};

pub struct StatusInputs<'a> {
    pub state: &'a ClusterState,
    pub state_version: u64,
    pub leases: &'a LeaseTable,
    pub now_ms: u64,
    pub used_extents_by_device: &'a HashMap<u64, u64>,
    pub members: Vec<MdmMember>,
    pub leader_id: Option<u64>,
}

pub fn cluster_status(i: StatusInputs<'_>) -> ClusterStatus {
    let s = i.state;
    let alive = |sds_id: u64| i.leases.is_alive(sds_id, i.now_ms);
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
                state: if alive(sds.id) { "up" } else { "down" }.to_string(),
                devices: devices.len(),
                capacity_bytes: devices.iter().filter(|d| d.state == DeviceState::Normal).map(|d| d.capacity_bytes).sum(),
                used_bytes,
            }
        })
        .collect();
    let mut pgs = PgCounts::default();
    for pool in s.pools.values() {
        pgs.total_pgs += u64::from(pool.pg_count);
        if pool.pgs.is_empty() {
            pgs.unplaced_pgs += u64::from(pool.pg_count);
            continue;
        }
        for pg in &pool.pgs {
            let healthy = pg.replicas.len() == tessera_core::REPLICA_COUNT && pg.replicas.iter().all(|r| alive(r.sds_id));
            if healthy {
                pgs.healthy_pgs += 1;
            } else {
                pgs.degraded_pgs += 1;
            }
        }
    }
    ClusterStatus {
        mdm_members: i.members,
        leader_id: i.leader_id,
        state_version: i.state_version,
        sdss,
        pgs,
        volumes: s.volumes.len(),
        sdcs: s.sdcs.len(),
    }
}
