//! The SDS's view of the cluster map and the role checks every data request passes.
//! Pure: the map and a request in, a verdict out — so it is unit-tested without sockets.

use std::collections::HashMap;

use tessera_core::layout::pg_of_extent;
use tessera_core::{ClusterState, Replica};
use tessera_proto::data::{flags, status, IoHeader};

/// What this SDS knows of one pool.
#[derive(Debug, Clone)]
pub struct PoolView {
    pub extent_size_bytes: u32,
    pub pg_count: u32,
    /// Indexed by PG id.
    pub pgs: Vec<PgView>,
}

#[derive(Debug, Clone)]
pub struct PgView {
    pub epoch: u64,
    pub replicas: Vec<Replica>,
    /// SDSs whose copy is still being back-filled.
    pub syncing: Vec<u64>,
}

/// An immutable snapshot of the map, swapped whole when the MDM's state changes.
#[derive(Debug, Clone, Default)]
pub struct MapView {
    pub version: u64,
    pub sds_id: u64,
    pub pools: HashMap<u64, PoolView>,
    pub sds_addresses: HashMap<u64, String>,
    /// Highest object id the MDM has handed out: volumes with an id at or below it that are
    /// absent from the map were removed (not merely unknown yet).
    pub max_issued_id: u64,
    /// volume id -> (pool id, extents in the volume).
    pub volumes: HashMap<u64, (u64, u64)>,
    /// volume id -> mapping epoch (bumped whenever the volume's SDCs change).
    pub mapping_epochs: HashMap<u64, u64>,
    /// This SDS's devices: device id -> pool id.
    pub device_pools: HashMap<u64, u64>,
    /// SDSs the MDM has declared dead.
    pub down_sdss: std::collections::HashSet<u64>,
}

impl MapView {
    pub fn from_state(version: u64, sds_id: u64, state: &ClusterState) -> MapView {
        let pools = state
            .pools
            .values()
            .map(|p| {
                let pgs = p
                    .pgs
                    .iter()
                    .map(|pg| PgView {
                        epoch: pg.epoch,
                        replicas: pg.replicas.clone(),
                        syncing: pg.syncing.iter().copied().collect(),
                    })
                    .collect();
                (p.id, PoolView { extent_size_bytes: p.extent_size_bytes, pg_count: p.pg_count, pgs })
            })
            .collect();
        MapView {
            version,
            sds_id,
            pools,
            sds_addresses: state.sdss.values().map(|s| (s.id, s.data_address.clone())).collect(),
            max_issued_id: state.next_id,
            volumes: state
                .volumes
                .values()
                .filter_map(|v| {
                    let extent = u64::from(state.pools.get(&v.pool_id)?.extent_size_bytes);
                    Some((v.id, (v.pool_id, v.size_bytes.div_ceil(extent))))
                })
                .collect(),
            mapping_epochs: state.volumes.values().map(|v| (v.id, v.mapping_epoch)).collect(),
            device_pools: state.devices_of_sds(sds_id).map(|d| (d.id, d.pool_id)).collect(),
            down_sdss: state.sdss.values().filter(|s| s.state == tessera_core::SdsState::Down).map(|s| s.id).collect(),
        }
    }

    /// Whether this SDS's `device_id` holds a copy (complete or syncing) of the PG.
    pub fn holds_copy(&self, pool_id: u64, pg_id: u32, device_id: u64) -> bool {
        self.pools
            .get(&pool_id)
            .and_then(|p| p.pgs.get(pg_id as usize))
            .is_some_and(|pg| pg.replicas.iter().any(|r| r.sds_id == self.sds_id && r.device_id == device_id))
    }
}

/// Most copies a PG has at once: two, plus one while a PG moves (rebalance).
pub const MAX_COPIES: usize = 4;

/// The other copies a primary forwards writes to. Fixed capacity: no allocation per IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Others {
    items: [Replica; MAX_COPIES],
    len: usize,
}

impl Others {
    fn of(replicas: &[Replica]) -> Others {
        let mut o = Others { items: [Replica { sds_id: 0, device_id: 0 }; MAX_COPIES], len: 0 };
        for r in replicas.iter().take(MAX_COPIES) {
            o.items[o.len] = *r;
            o.len += 1;
        }
        o
    }

    pub fn as_slice(&self) -> &[Replica] {
        &self.items[..self.len]
    }
}

/// The role this SDS plays for a request that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Apply locally and forward to every other copy.
    Primary { local: Replica, others: Others },
    /// Apply locally only (forwarded write, or a copy read for verification).
    Local { local: Replica },
}

/// Checks a data request against the map: bounds, PG, epoch, role. Returns the role or the
/// status to reply with.
pub fn check_io(map: &MapView, h: &IoHeader, is_write: bool) -> Result<Role, u32> {
    let Some(pool) = map.pools.get(&h.pool_id) else { return Err(status::MAP_BEHIND) };
    let end = u64::from(h.offset_in_extent) + u64::from(h.length);
    if end > u64::from(pool.extent_size_bytes) {
        return Err(status::INVALID);
    }
    if pool.pgs.is_empty() {
        return Err(status::MAP_BEHIND);
    }
    // Only extents inside a volume of this pool exist. A volume (or growth) newer than our
    // map is MAP_BEHIND — we refresh and the client retries; anything else is invalid.
    match map.volumes.get(&h.volume_id) {
        Some(&(pool_id, _)) if pool_id != h.pool_id => return Err(status::INVALID),
        Some(&(_, extents)) if h.extent_index >= extents => return Err(status::MAP_BEHIND),
        Some(_) => {}
        None if h.volume_id > map.max_issued_id => return Err(status::MAP_BEHIND),
        None => return Err(status::INVALID),
    }
    // Fence: an SDC request must act on the volume's current mapping. One from before the
    // volume was taken over by another node is refused (the SDC then finds it lost the
    // mapping and fails the IO); a newer one means our map is behind.
    if h.flags & (flags::REPLICA | flags::LOCAL_ONLY) == 0 {
        let current = map.mapping_epochs.get(&h.volume_id).copied().unwrap_or(0);
        if h.mapping_epoch < current {
            return Err(status::MAPPING_STALE);
        }
        if h.mapping_epoch > current {
            return Err(status::MAP_BEHIND);
        }
    }
    // The PG is derived from (volume, extent); a request naming another PG is a client bug.
    if pg_of_extent(h.volume_id, h.extent_index, pool.pg_count) != h.pg_id {
        return Err(status::INVALID);
    }
    let Some(pg) = pool.pgs.get(h.pg_id as usize) else { return Err(status::INVALID) };
    if h.pg_epoch < pg.epoch {
        return Err(status::STALE_EPOCH);
    }
    if h.pg_epoch > pg.epoch {
        return Err(status::MAP_BEHIND);
    }
    let Some(position) = pg.replicas.iter().position(|r| r.sds_id == map.sds_id) else {
        return Err(status::WRONG_ROLE);
    };
    let local = pg.replicas[position];
    let as_replica = h.flags & (flags::REPLICA | flags::LOCAL_ONLY) != 0;
    if as_replica {
        // A forwarded write must come to a non-primary copy; a verification read may go to any.
        if is_write && position == 0 {
            return Err(status::WRONG_ROLE);
        }
        return Ok(Role::Local { local });
    }
    if position != 0 {
        return Err(status::WRONG_ROLE);
    }
    Ok(Role::Primary { local, others: Others::of(&pg.replicas[1..]) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_with(sds_id: u64) -> MapView {
        let pg_count = 8;
        let pgs = (0..pg_count)
            .map(|_| PgView {
                epoch: 3,
                replicas: vec![Replica { sds_id: 1, device_id: 11 }, Replica { sds_id: 2, device_id: 22 }],
                syncing: vec![],
            })
            .collect();
        let mut m = MapView { sds_id, max_issued_id: 20, ..Default::default() };
        m.pools.insert(5, PoolView { extent_size_bytes: 1 << 20, pg_count, pgs });
        m.volumes.insert(9, (5, 64));
        m
    }

    fn req(extent: u64, epoch: u64, flags: u32) -> IoHeader {
        IoHeader {
            pool_id: 5,
            volume_id: 9,
            extent_index: extent,
            pg_id: pg_of_extent(9, extent, 8),
            flags,
            pg_epoch: epoch,
            offset_in_extent: 0,
            length: 4096,
            mapping_epoch: 0,
        }
    }

    #[test]
    fn requests_from_an_older_mapping_are_fenced() {
        let mut m = map_with(1);
        m.mapping_epochs.insert(9, 4);
        let h = req(0, 3, 0);
        assert_eq!(check_io(&m, &IoHeader { mapping_epoch: 3, ..h }, true), Err(status::MAPPING_STALE));
        assert_eq!(check_io(&m, &IoHeader { mapping_epoch: 5, ..h }, true), Err(status::MAP_BEHIND));
        assert!(check_io(&m, &IoHeader { mapping_epoch: 4, ..h }, true).is_ok());
        // Copies forwarded by the primary and verification reads carry no mapping.
        let mut m = map_with(2);
        m.mapping_epochs.insert(9, 4);
        assert!(check_io(&m, &IoHeader { flags: flags::REPLICA, ..h }, true).is_ok());
    }

    #[test]
    fn primary_serves_and_forwards() {
        let Role::Primary { others, .. } = check_io(&map_with(1), &req(0, 3, 0), true).unwrap() else {
            panic!("not primary")
        };
        assert_eq!(others.as_slice(), &[Replica { sds_id: 2, device_id: 22 }]);
    }

    #[test]
    fn epochs_fence_both_ways() {
        assert_eq!(check_io(&map_with(1), &req(0, 2, 0), false), Err(status::STALE_EPOCH));
        assert_eq!(check_io(&map_with(1), &req(0, 4, 0), false), Err(status::MAP_BEHIND));
    }

    #[test]
    fn roles_are_enforced() {
        assert_eq!(check_io(&map_with(2), &req(0, 3, 0), false), Err(status::WRONG_ROLE));
        assert!(matches!(check_io(&map_with(2), &req(0, 3, flags::REPLICA), true), Ok(Role::Local { .. })));
        assert_eq!(check_io(&map_with(1), &req(0, 3, flags::REPLICA), true), Err(status::WRONG_ROLE));
        assert_eq!(check_io(&map_with(3), &req(0, 3, flags::LOCAL_ONLY), false), Err(status::WRONG_ROLE));
    }

    #[test]
    fn malformed_requests_are_invalid() {
        let mut h = req(0, 3, 0);
        h.pg_id = (h.pg_id + 1) % 8;
        assert_eq!(check_io(&map_with(1), &h, false), Err(status::INVALID));
        let mut h = req(0, 3, 0);
        h.offset_in_extent = (1 << 20) - 100;
        assert_eq!(check_io(&map_with(1), &h, false), Err(status::INVALID));
        let mut h = req(0, 3, 0);
        h.offset_in_extent = u32::MAX;
        h.length = u32::MAX;
        assert_eq!(check_io(&map_with(1), &h, false), Err(status::INVALID));
        let mut h = req(0, 3, 0);
        h.pool_id = 77;
        assert_eq!(check_io(&map_with(1), &h, false), Err(status::MAP_BEHIND));
    }

    #[test]
    fn only_extents_inside_volumes_are_served() {
        let map = map_with(1);
        let mut h = req(64, 3, 0);
        h.pg_id = pg_of_extent(9, 64, 8);
        assert_eq!(check_io(&map, &h, false), Err(status::MAP_BEHIND), "past the end: maybe grown since");
        let mut removed = req(0, 3, 0);
        removed.volume_id = 7;
        removed.pg_id = pg_of_extent(7, 0, 8);
        assert_eq!(check_io(&map, &removed, false), Err(status::INVALID), "an issued id not in the map was removed");
        let mut newer = req(0, 3, 0);
        newer.volume_id = 21;
        newer.pg_id = pg_of_extent(21, 0, 8);
        assert_eq!(check_io(&map, &newer, false), Err(status::MAP_BEHIND));
    }
}
