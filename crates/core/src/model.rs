//! The cluster model the MDM replicates. Every field is changed only by
//! [`crate::Command`]s applied in log order, so every MDM holds the same value.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use crate::units::MIB;

pub const DEFAULT_EXTENT_SIZE_BYTES: u32 = MIB as u32;
pub const DEFAULT_PG_COUNT: u32 = 256;
pub const DEFAULT_SPARE_PERCENT: u8 = 10;
pub const MAX_PG_COUNT: u32 = 65_536;
pub const MIN_EXTENT_SIZE_BYTES: u32 = 64 * 1024;
pub const MAX_EXTENT_SIZE_BYTES: u32 = 64 * 1024 * 1024;
/// Every PG keeps this many copies (two: the mirror).
pub const REPLICA_COUNT: usize = 2;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Ids are handed out from one counter and never reused, so a stale reference (an
    /// extent of a removed volume, say) can never be mistaken for a new object.
    pub next_id: u64,
    pub protection_domains: BTreeMap<u64, ProtectionDomain>,
    pub fault_sets: BTreeMap<u64, FaultSet>,
    pub pools: BTreeMap<u64, StoragePool>,
    pub sdss: BTreeMap<u64, Sds>,
    pub devices: BTreeMap<u64, Device>,
    pub volumes: BTreeMap<u64, Volume>,
    pub sdcs: BTreeMap<u64, Sdc>,
    /// Ids of MDMs removed from the MDM cluster. They are never accepted again: an MDM
    /// reinstalled empty under an old id could lend a vote it no longer remembers giving.
    #[serde(default)]
    pub retired_mdm_ids: std::collections::BTreeSet<u64>,
    /// Nodes reported by their agents, by name (absent in states written before agents).
    #[serde(default)]
    pub nodes: BTreeMap<String, crate::deploy::Node>,
    /// The declarative deployment spec, once `tessera deploy apply` set one.
    #[serde(default)]
    pub deploy_spec: Option<crate::deploy::spec::DeploySpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectionDomain {
    pub id: u64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSet {
    pub id: u64,
    pub name: String,
    pub pd_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoragePool {
    pub id: u64,
    pub name: String,
    pub pd_id: u64,
    pub extent_size_bytes: u32,
    pub pg_count: u32,
    /// Share of raw capacity kept free so one failure can be rebuilt.
    pub spare_percent: u8,
    /// Exactly `pg_count` entries once placed; empty until the pool has devices on at
    /// least two SDSs.
    pub pgs: Vec<PlacementGroup>,
}

/// A placement group: a fixed slice of the pool's address space with an ordered replica
/// set. `replicas[0]` is the primary. Invariant: replicas are on distinct SDSs (and on
/// distinct fault sets when the domain has fault sets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementGroup {
    pub id: u32,
    /// Bumped on every change of `replicas`. A request carrying another epoch is refused,
    /// which fences clients and servers that act on an old map.
    pub epoch: u64,
    pub replicas: Vec<Replica>,
    /// SDSs in `replicas` whose copy is still being back-filled from the primary: they take
    /// forwarded writes but are never read from nor promoted. Invariant: the primary
    /// (`replicas[0]`) is never syncing.
    #[serde(default)]
    pub syncing: BTreeSet<u64>,
    /// A copy being moved away (rebalance or drain): it leaves once the new copy is complete.
    #[serde(default)]
    pub leaving: Option<u64>,
}

impl PlacementGroup {
    /// Replicas holding a complete copy.
    pub fn in_sync(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| !self.syncing.contains(&r.sds_id))
    }

    pub fn primary(&self) -> Option<&Replica> {
        self.replicas.first()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Replica {
    pub sds_id: u64,
    pub device_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sds {
    pub id: u64,
    pub name: String,
    pub pd_id: u64,
    pub fault_set_id: Option<u64>,
    /// `host:port` of its data service.
    pub data_address: String,
    #[serde(default)]
    pub state: SdsState,
}

/// Committed liveness of an SDS. Only the MDM leader's failure detector changes it, and only
/// after the SDS's lease has expired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdsState {
    #[default]
    Normal,
    /// Declared dead: removed from every PG where another complete copy exists.
    Down,
    /// Being emptied before removal: its copies move elsewhere, it takes no new ones.
    Draining,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// Added by the administrator; the SDS has not yet formatted/opened it.
    New,
    /// Formatted and in service: its capacity counts and placement may use it.
    Normal,
    /// Returned IO errors: removed from every PG where another complete copy exists.
    Failed,
    /// Being emptied before removal: its copies move elsewhere, it takes no new ones.
    Draining,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: u64,
    pub sds_id: u64,
    pub pool_id: u64,
    /// Where the SDS last found the device. Only a hint: the SDS opens a device only after
    /// its superblock proved it is this one (cluster id, device id), because `/dev/sdX`
    /// names move between boots. The SDS updates it (`Command::SetDevicePath`) when it finds
    /// the device elsewhere.
    pub path: String,
    pub state: DeviceState,
    /// Data capacity as reported by the SDS when it formatted the device.
    pub capacity_bytes: u64,
    /// A name that follows the device across boots (`/dev/disk/by-id/...`), recorded by the
    /// SDS once it opened the device; `None` for files and for disks without one (and in
    /// states written before it existed).
    #[serde(default)]
    pub stable_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: u64,
    pub name: String,
    pub pool_id: u64,
    pub size_bytes: u64,
    /// Thin: space is taken on first write. Thick: the full size is reserved at creation.
    pub thin: bool,
    /// When false, at most one SDC may map the volume.
    pub allow_multi_map: bool,
    pub mapped_sdcs: BTreeSet<u64>,
    /// Bumped on every mapping change; later used to fence an SDC that lost its mapping.
    pub mapping_epoch: u64,
    /// Per-SDC limits (ScaleIO's per-volume-per-SDC limits): each SDC that maps the volume
    /// holds its own IO to them. Absent in states written before limits existed.
    #[serde(default)]
    pub qos: VolumeQos,
}

/// IO limits one SDC applies to its own IO on a volume. `None` means unlimited. Set only by
/// [`crate::Command::SetVolumeQos`], which refuses limits too low to be usable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeQos {
    /// NBD requests per second (reads, writes, zeroing and trims; flushes are free).
    pub iops_limit: Option<u64>,
    /// Payload bytes per second: data read and written. Zeroing and trims carry no payload
    /// and count against `iops_limit` only (`mkfs` discards a whole volume at once).
    pub bandwidth_limit_bytes_per_sec: Option<u64>,
}

impl VolumeQos {
    /// True when neither limit is set: the SDC skips its limiter altogether.
    pub fn is_unlimited(&self) -> bool {
        self.iops_limit.is_none() && self.bandwidth_limit_bytes_per_sec.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sdc {
    pub id: u64,
    pub name: String,
    /// Unix socket on which this SDC exports its mapped volumes over NBD.
    pub nbd_socket: String,
    /// `host:port` when the SDC also exports over TCP.
    pub nbd_tcp_address: Option<String>,
}

impl ClusterState {
    pub fn pd_by_name(&self, name: &str) -> Option<&ProtectionDomain> {
        self.protection_domains.values().find(|o| o.name == name)
    }
    pub fn pool_by_name(&self, name: &str) -> Option<&StoragePool> {
        self.pools.values().find(|o| o.name == name)
    }
    pub fn fault_set_by_name(&self, pd_id: u64, name: &str) -> Option<&FaultSet> {
        self.fault_sets.values().find(|o| o.pd_id == pd_id && o.name == name)
    }
    pub fn sds_by_name(&self, name: &str) -> Option<&Sds> {
        self.sdss.values().find(|o| o.name == name)
    }
    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|o| o.name == name)
    }
    pub fn sdc_by_name(&self, name: &str) -> Option<&Sdc> {
        self.sdcs.values().find(|o| o.name == name)
    }
    pub fn devices_of_sds(&self, sds_id: u64) -> impl Iterator<Item = &Device> {
        self.devices.values().filter(move |d| d.sds_id == sds_id)
    }
    pub fn devices_of_pool(&self, pool_id: u64) -> impl Iterator<Item = &Device> {
        self.devices.values().filter(move |d| d.pool_id == pool_id)
    }
    pub fn volumes_of_pool(&self, pool_id: u64) -> impl Iterator<Item = &Volume> {
        self.volumes.values().filter(move |v| v.pool_id == pool_id)
    }

    /// Raw capacity of a pool's devices in service.
    pub fn pool_raw_capacity_bytes(&self, pool_id: u64) -> u64 {
        self.devices_of_pool(pool_id).filter(|d| d.state == DeviceState::Normal).map(|d| d.capacity_bytes).sum()
    }

    /// Bytes a pool may promise to thick volumes: half the raw capacity (two copies) less
    /// the spare kept for rebuild. The spare is the pool's spare percentage, but never less
    /// than the largest failure unit — the biggest SDS, or the biggest fault set when the
    /// domain has them — so that losing it can always be re-mirrored.
    pub fn pool_usable_capacity_bytes(&self, pool: &StoragePool) -> u64 {
        let raw = self.pool_raw_capacity_bytes(pool.id);
        let spare = (raw / 100 * u64::from(pool.spare_percent.min(100))).max(self.largest_failure_unit_bytes(pool));
        raw.saturating_sub(spare) / REPLICA_COUNT as u64
    }

    /// Raw capacity in this pool of its biggest SDS, or biggest fault set if the domain uses them.
    pub fn largest_failure_unit_bytes(&self, pool: &StoragePool) -> u64 {
        let use_fault_sets = self.fault_sets.values().any(|f| f.pd_id == pool.pd_id);
        let mut per_unit: BTreeMap<u64, u64> = BTreeMap::new();
        for d in self.devices_of_pool(pool.id).filter(|d| d.state == DeviceState::Normal) {
            let Some(sds) = self.sdss.get(&d.sds_id) else { continue };
            let unit = if use_fault_sets { sds.fault_set_id.unwrap_or(sds.id) } else { sds.id };
            *per_unit.entry(unit).or_default() += d.capacity_bytes;
        }
        per_unit.values().copied().max().unwrap_or(0)
    }

    /// Bytes promised to thick volumes in a pool.
    pub fn pool_thick_reserved_bytes(&self, pool_id: u64) -> u64 {
        self.volumes_of_pool(pool_id).filter(|v| !v.thin).map(|v| v.size_bytes).sum()
    }
}
