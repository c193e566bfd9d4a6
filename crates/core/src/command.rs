//! Commands: the only way the cluster model changes. `apply` is deterministic — same
//! state and command in, same state and outcome out — because every MDM replays the same
//! log and must end in the same state.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

use crate::error::CoreError;
use crate::model::*;
use crate::names::validate_name;
use crate::placement::{place_pgs, Candidate};
use crate::units::MIB;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateProtectionDomain {
        name: String,
    },
    RemoveProtectionDomain {
        name: String,
    },
    CreateFaultSet {
        pd: String,
        name: String,
    },
    RemoveFaultSet {
        pd: String,
        name: String,
    },
    CreatePool {
        pd: String,
        name: String,
        extent_size_bytes: u32,
        pg_count: u32,
        spare_percent: u8,
    },
    RemovePool {
        name: String,
    },
    SetSparePercent {
        pool: String,
        spare_percent: u8,
    },
    AddSds {
        name: String,
        pd: String,
        fault_set: Option<String>,
        data_address: String,
    },
    /// An SDS restarted on another address. Only the address may change.
    SetSdsAddress {
        name: String,
        data_address: String,
    },
    RemoveSds {
        name: String,
    },
    AddDevice {
        sds: String,
        pool: String,
        path: String,
    },
    /// The SDS formatted/opened the device and reports its data capacity.
    DeviceReady {
        device_id: u64,
        capacity_bytes: u64,
    },
    RemoveDevice {
        sds: String,
        path: String,
    },
    /// The device's SDS found it — by its superblock — at `path`, with the stable name
    /// `stable_path` (`/dev/disk/by-id/...`, `None` when it has none). Sent when a device
    /// moved (names change at boot, files get renamed) and to record the stable name.
    /// If another device of the same SDS is recorded at `path` (two devices swapped), that
    /// one takes over this device's old path: it is only a hint for the SDS, which opens a
    /// device only after its superblock matched.
    SetDevicePath {
        device_id: u64,
        path: String,
        stable_path: Option<String>,
    },
    CreateVolume {
        name: String,
        pool: String,
        size_bytes: u64,
        thin: bool,
        allow_multi_map: bool,
    },
    ResizeVolume {
        name: String,
        size_bytes: u64,
    },
    RemoveVolume {
        name: String,
    },
    /// Sets (or, with `None`, clears) the per-SDC IO limits of a volume. Both limits are
    /// replaced: a limit not given becomes unlimited.
    SetVolumeQos {
        name: String,
        iops_limit: Option<u64>,
        bandwidth_limit_bytes_per_sec: Option<u64>,
    },
    /// Registers an SDC, or updates its export addresses if it exists.
    RegisterSdc {
        name: String,
        nbd_socket: String,
        nbd_tcp_address: Option<String>,
    },
    RemoveSdc {
        name: String,
    },
    MapVolume {
        volume: String,
        sdc: String,
        allow_multi_map: bool,
    },
    UnmapVolume {
        volume: String,
        sdc: String,
    },
    /// Preemption (REX-Ray's `preempt`): map the volume to `sdc` alone, unmapping it from
    /// every other SDC. The mapping epoch moves on, so SDSs refuse IO still carrying the old
    /// one: the node it was taken from can no longer write, even if it is only cut off.
    TakeOverVolume {
        volume: String,
        sdc: String,
    },
    /// Records that MDM `id` left the MDM cluster for good (its id is never reused).
    RetireMdmId {
        id: u64,
    },
    /// The failure detector found the SDS's lease expired: re-peer its PGs.
    DeclareSdsDown {
        sds_id: u64,
        /// Other SDSs without a lease at the time: no copy on them is promoted.
        unresponsive: Vec<u64>,
    },
    /// A declared-dead SDS holds a lease again: it may take new copies.
    DeclareSdsUp {
        sds_id: u64,
        unresponsive: Vec<u64>,
    },
    /// The device returned IO errors: re-peer its PGs.
    FailDevice {
        device_id: u64,
    },
    /// A PG primary could not reach `sds_id` and asks to drop it before acking a write
    /// (the degraded-write rule). Applies only at `epoch`.
    RemoveReplica {
        pool_id: u64,
        pg_id: u32,
        epoch: u64,
        sds_id: u64,
    },
    /// `sds_id` restarted with copies of these PGs that may differ from their partners (it
    /// held writes there that were not yet flushed when it stopped): each such copy stops
    /// counting as complete, and is back-filled from a complete copy, unless it is the
    /// PG's only complete copy on a live SDS — then it wins and the others are made equal
    /// to it. Sent by an SDS before it serves a device, so no read is ever served from a
    /// copy its partners disagree with.
    ReportSuspectCopies {
        sds_id: u64,
        /// (pool id, PG id) of every PG with a suspect copy on this SDS.
        pgs: Vec<(u64, u32)>,
    },
    /// The primary finished back-filling `sds_id`'s copy. Applies only at `epoch`.
    SyncComplete {
        pool_id: u64,
        pg_id: u32,
        epoch: u64,
        sds_id: u64,
    },
    /// Move one copy of a PG (rebalance or drain): `to` joins as a syncing copy and `from`
    /// leaves once it is complete. Applies only at `epoch`.
    MovePg {
        pool_id: u64,
        pg_id: u32,
        epoch: u64,
        from_sds_id: u64,
        to: Replica,
    },
    /// Empty an SDS before removal: its copies move to other SDSs.
    DrainSds {
        name: String,
    },
    /// Empty one device before removal.
    DrainDevice {
        sds: String,
        path: String,
    },
    /// An agent reports its node (attributes, disks): replaces the previous report.
    ReportNode {
        node: crate::deploy::Node,
    },
    /// `tessera node remove`: the node's SDSs drain and leave, then the node is forgotten.
    RemoveNode {
        name: String,
    },
    /// Forgets a removed node's report once it owns no SDS.
    ForgetNode {
        name: String,
    },
    /// Gives a node an MDM id (if it has none): above every id assigned or retired, and
    /// above the ids `tessera up` uses, so it never meets one in use.
    AssignMdmId {
        node: String,
    },
    /// Sets (or clears) the declarative deployment spec.
    SetDeploySpec {
        spec: Option<crate::deploy::spec::DeploySpec>,
    },
}

/// What a successful command did: the id of the object it created or touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub id: u64,
}

pub type CommandOutcome = Result<Applied, CoreError>;

fn lookup<'a, T>(found: Option<&'a T>, kind: &str, name: &str) -> Result<&'a T, CoreError> {
    found.ok_or_else(|| CoreError::not_found(kind, name))
}

impl ClusterState {
    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Applies one command. On error the state is unchanged.
    pub fn apply(&mut self, cmd: &Command) -> CommandOutcome {
        match cmd {
            Command::CreateProtectionDomain { name } => {
                validate_name(name)?;
                if self.pd_by_name(name).is_some() {
                    return Err(CoreError::exists("protection domain", name));
                }
                let id = self.take_id();
                self.protection_domains.insert(id, ProtectionDomain { id, name: name.clone() });
                Ok(Applied { id })
            }
            Command::RemoveProtectionDomain { name } => {
                let id = lookup(self.pd_by_name(name), "protection domain", name)?.id;
                if self.pools.values().any(|p| p.pd_id == id) || self.sdss.values().any(|s| s.pd_id == id) {
                    return Err(CoreError::in_use("protection domain", name, "it still has pools or SDSs"));
                }
                self.fault_sets.retain(|_, f| f.pd_id != id);
                self.protection_domains.remove(&id);
                Ok(Applied { id })
            }
            Command::CreateFaultSet { pd, name } => {
                validate_name(name)?;
                let pd_id = lookup(self.pd_by_name(pd), "protection domain", pd)?.id;
                if self.fault_set_by_name(pd_id, name).is_some() {
                    return Err(CoreError::exists("fault set", name));
                }
                let id = self.take_id();
                self.fault_sets.insert(id, FaultSet { id, name: name.clone(), pd_id });
                Ok(Applied { id })
            }
            Command::RemoveFaultSet { pd, name } => {
                let pd_id = lookup(self.pd_by_name(pd), "protection domain", pd)?.id;
                let id = lookup(self.fault_set_by_name(pd_id, name), "fault set", name)?.id;
                if self.sdss.values().any(|s| s.fault_set_id == Some(id)) {
                    return Err(CoreError::in_use("fault set", name, "it still has SDSs"));
                }
                self.fault_sets.remove(&id);
                Ok(Applied { id })
            }
            Command::CreatePool { pd, name, extent_size_bytes, pg_count, spare_percent } => {
                validate_name(name)?;
                let pd_id = lookup(self.pd_by_name(pd), "protection domain", pd)?.id;
                if self.pool_by_name(name).is_some() {
                    return Err(CoreError::exists("storage pool", name));
                }
                if !extent_size_bytes.is_power_of_two()
                    || !(MIN_EXTENT_SIZE_BYTES..=MAX_EXTENT_SIZE_BYTES).contains(extent_size_bytes)
                {
                    return Err(CoreError::Invalid(format!(
                        "extent size {extent_size_bytes} must be a power of two between {MIN_EXTENT_SIZE_BYTES} and {MAX_EXTENT_SIZE_BYTES} bytes"
                    )));
                }
                if !(1..=MAX_PG_COUNT).contains(pg_count) {
                    return Err(CoreError::Invalid(format!(
                        "PG count {pg_count} must be between 1 and {MAX_PG_COUNT}"
                    )));
                }
                check_spare(*spare_percent)?;
                let id = self.take_id();
                self.pools.insert(
                    id,
                    StoragePool {
                        id,
                        name: name.clone(),
                        pd_id,
                        extent_size_bytes: *extent_size_bytes,
                        pg_count: *pg_count,
                        spare_percent: *spare_percent,
                        pgs: Vec::new(),
                    },
                );
                Ok(Applied { id })
            }
            Command::RemovePool { name } => {
                let id = lookup(self.pool_by_name(name), "storage pool", name)?.id;
                if self.volumes_of_pool(id).next().is_some() {
                    return Err(CoreError::in_use("storage pool", name, "it still has volumes"));
                }
                if self.devices_of_pool(id).next().is_some() {
                    return Err(CoreError::in_use("storage pool", name, "it still has devices"));
                }
                self.pools.remove(&id);
                Ok(Applied { id })
            }
            Command::SetSparePercent { pool, spare_percent } => {
                check_spare(*spare_percent)?;
                let p = lookup(self.pool_by_name(pool), "storage pool", pool)?.clone();
                let mut changed = p.clone();
                changed.spare_percent = *spare_percent;
                if self.pool_thick_reserved_bytes(p.id) > self.pool_usable_capacity_bytes(&changed) {
                    return Err(CoreError::NoCapacity(format!(
                        "thick volumes in {pool} would no longer fit with {spare_percent}% spare"
                    )));
                }
                self.pools.insert(p.id, changed);
                Ok(Applied { id: p.id })
            }
            Command::AddSds { name, pd, fault_set, data_address } => {
                validate_name(name)?;
                validate_address(data_address)?;
                let pd_id = lookup(self.pd_by_name(pd), "protection domain", pd)?.id;
                if self.sds_by_name(name).is_some() {
                    return Err(CoreError::exists("SDS", name));
                }
                if self.sdss.values().any(|s| &s.data_address == data_address) {
                    return Err(CoreError::exists("SDS address", data_address));
                }
                let fault_set_id = match fault_set {
                    Some(fs) => Some(lookup(self.fault_set_by_name(pd_id, fs), "fault set", fs)?.id),
                    None => None,
                };
                let id = self.take_id();
                self.sdss.insert(
                    id,
                    Sds {
                        id,
                        name: name.clone(),
                        pd_id,
                        fault_set_id,
                        data_address: data_address.clone(),
                        state: SdsState::Normal,
                    },
                );
                Ok(Applied { id })
            }
            Command::SetSdsAddress { name, data_address } => {
                validate_address(data_address)?;
                let id = lookup(self.sds_by_name(name), "SDS", name)?.id;
                if self.sdss.values().any(|s| s.id != id && &s.data_address == data_address) {
                    return Err(CoreError::exists("SDS address", data_address));
                }
                if let Some(s) = self.sdss.get_mut(&id) {
                    s.data_address = data_address.clone();
                }
                Ok(Applied { id })
            }
            Command::RemoveSds { name } => {
                let id = lookup(self.sds_by_name(name), "SDS", name)?.id;
                let holds_data = self.pools.values().any(|p| {
                    self.volumes_of_pool(p.id).next().is_some()
                        && p.pgs.iter().any(|pg| pg.replicas.iter().any(|r| r.sds_id == id))
                });
                if holds_data {
                    return Err(CoreError::in_use("SDS", name, "it holds data; drain it first (sds drain)"));
                }
                // Its devices go with it: they hold no copies.
                let devices: Vec<u64> = self.devices_of_sds(id).map(|d| d.id).collect();
                let pools: BTreeSet<u64> = self.devices_of_sds(id).map(|d| d.pool_id).collect();
                for d in devices {
                    self.devices.remove(&d);
                }
                self.sdss.remove(&id);
                for p in pools {
                    self.place_pool_if_empty(p);
                }
                Ok(Applied { id })
            }
            Command::AddDevice { sds, pool, path } => {
                validate_device_path(path)?;
                let s = lookup(self.sds_by_name(sds), "SDS", sds)?.clone();
                let p = lookup(self.pool_by_name(pool), "storage pool", pool)?.clone();
                if s.pd_id != p.pd_id {
                    return Err(CoreError::Invalid(format!(
                        "SDS {sds} and pool {pool} are in different protection domains"
                    )));
                }
                if self.devices_of_sds(s.id).any(|d| &d.path == path) {
                    return Err(CoreError::exists("device", path));
                }
                let id = self.take_id();
                self.devices.insert(
                    id,
                    Device {
                        id,
                        sds_id: s.id,
                        pool_id: p.id,
                        path: path.clone(),
                        state: DeviceState::New,
                        capacity_bytes: 0,
                        stable_path: None,
                    },
                );
                Ok(Applied { id })
            }
            Command::DeviceReady { device_id, capacity_bytes } => {
                let d = self
                    .devices
                    .get(device_id)
                    .ok_or_else(|| CoreError::not_found("device", &device_id.to_string()))?;
                if d.state != DeviceState::New {
                    // Idempotent: an SDS re-reporting a device it already reported changes nothing.
                    return Ok(Applied { id: *device_id });
                }
                let pool_id = d.pool_id;
                let pool = self.pools.get(&pool_id).map(|p| p.extent_size_bytes).unwrap_or(u32::MAX);
                if *capacity_bytes < u64::from(pool) {
                    return Err(CoreError::NoCapacity(format!(
                        "device {device_id} holds {capacity_bytes} bytes, less than one extent"
                    )));
                }
                if let Some(d) = self.devices.get_mut(device_id) {
                    d.state = DeviceState::Normal;
                    d.capacity_bytes = *capacity_bytes;
                }
                self.place_pool_if_empty(pool_id);
                Ok(Applied { id: *device_id })
            }
            Command::RemoveDevice { sds, path } => {
                let s = lookup(self.sds_by_name(sds), "SDS", sds)?.clone();
                let d = lookup(self.devices_of_sds(s.id).find(|d| &d.path == path), "device", path)?.clone();
                let holds_pgs = self
                    .pools
                    .get(&d.pool_id)
                    .is_some_and(|p| p.pgs.iter().any(|pg| pg.replicas.iter().any(|r| r.device_id == d.id)));
                if holds_pgs && self.volumes_of_pool(d.pool_id).next().is_some() {
                    return Err(CoreError::in_use("device", path, "it holds data; drain it first (device drain)"));
                }
                self.devices.remove(&d.id);
                self.place_pool_if_empty(d.pool_id);
                Ok(Applied { id: d.id })
            }
            Command::SetDevicePath { device_id, path, stable_path } => {
                self.set_device_path(*device_id, path, stable_path.as_deref())
            }
            Command::CreateVolume { name, pool, size_bytes, thin, allow_multi_map } => {
                validate_name(name)?;
                let p = lookup(self.pool_by_name(pool), "storage pool", pool)?.clone();
                if self.volume_by_name(name).is_some() {
                    return Err(CoreError::exists("volume", name));
                }
                check_volume_size(*size_bytes, &p)?;
                if p.pgs.is_empty() {
                    return Err(CoreError::NoCapacity(format!(
                        "pool {pool} has no placement yet: it needs devices on at least two SDSs"
                    )));
                }
                if !thin {
                    self.check_thick_fits(&p, *size_bytes)?;
                }
                let id = self.take_id();
                self.volumes.insert(
                    id,
                    Volume {
                        id,
                        name: name.clone(),
                        pool_id: p.id,
                        size_bytes: *size_bytes,
                        thin: *thin,
                        allow_multi_map: *allow_multi_map,
                        mapped_sdcs: BTreeSet::new(),
                        mapping_epoch: 0,
                        qos: Default::default(),
                    },
                );
                Ok(Applied { id })
            }
            Command::ResizeVolume { name, size_bytes } => {
                let v = lookup(self.volume_by_name(name), "volume", name)?.clone();
                let p = self.pools.get(&v.pool_id).cloned().ok_or_else(|| CoreError::not_found("storage pool", "?"))?;
                check_volume_size(*size_bytes, &p)?;
                if *size_bytes < v.size_bytes {
                    // Shrinking would silently cut off data a filesystem may still use.
                    return Err(CoreError::Invalid(format!(
                        "volume {name} is {} bytes; it can only grow",
                        v.size_bytes
                    )));
                }
                if !v.thin {
                    self.check_thick_fits(&p, size_bytes - v.size_bytes)?;
                }
                if let Some(v) = self.volumes.get_mut(&v.id) {
                    v.size_bytes = *size_bytes;
                }
                Ok(Applied { id: v.id })
            }
            Command::RemoveVolume { name } => {
                let v = lookup(self.volume_by_name(name), "volume", name)?;
                if !v.mapped_sdcs.is_empty() {
                    return Err(CoreError::in_use("volume", name, "it is mapped; unmap it first"));
                }
                let id = v.id;
                self.volumes.remove(&id);
                Ok(Applied { id })
            }
            Command::SetVolumeQos { name, iops_limit, bandwidth_limit_bytes_per_sec } => {
                let qos = VolumeQos {
                    iops_limit: *iops_limit,
                    bandwidth_limit_bytes_per_sec: *bandwidth_limit_bytes_per_sec,
                };
                check_qos(&qos)?;
                let id = lookup(self.volume_by_name(name), "volume", name)?.id;
                if let Some(v) = self.volumes.get_mut(&id) {
                    v.qos = qos;
                }
                Ok(Applied { id })
            }
            Command::RegisterSdc { name, nbd_socket, nbd_tcp_address } => {
                validate_name(name)?;
                if let Some(a) = nbd_tcp_address {
                    validate_address(a)?;
                }
                if let Some(existing) = self.sdc_by_name(name).map(|s| s.id) {
                    if let Some(s) = self.sdcs.get_mut(&existing) {
                        s.nbd_socket = nbd_socket.clone();
                        s.nbd_tcp_address = nbd_tcp_address.clone();
                    }
                    return Ok(Applied { id: existing });
                }
                let id = self.take_id();
                self.sdcs.insert(
                    id,
                    Sdc {
                        id,
                        name: name.clone(),
                        nbd_socket: nbd_socket.clone(),
                        nbd_tcp_address: nbd_tcp_address.clone(),
                    },
                );
                Ok(Applied { id })
            }
            Command::RemoveSdc { name } => {
                let id = lookup(self.sdc_by_name(name), "SDC", name)?.id;
                if self.volumes.values().any(|v| v.mapped_sdcs.contains(&id)) {
                    return Err(CoreError::in_use("SDC", name, "volumes are mapped to it"));
                }
                self.sdcs.remove(&id);
                Ok(Applied { id })
            }
            Command::MapVolume { volume, sdc, allow_multi_map } => {
                let sdc_id = lookup(self.sdc_by_name(sdc), "SDC", sdc)?.id;
                let v = lookup(self.volume_by_name(volume), "volume", volume)?.clone();
                if v.mapped_sdcs.contains(&sdc_id) {
                    return Ok(Applied { id: v.id });
                }
                let multi = v.allow_multi_map || *allow_multi_map;
                if !v.mapped_sdcs.is_empty() && !multi {
                    return Err(CoreError::in_use(
                        "volume",
                        volume,
                        "it is mapped to another SDC; allow multi-map to share it",
                    ));
                }
                if let Some(v) = self.volumes.get_mut(&v.id) {
                    v.mapped_sdcs.insert(sdc_id);
                    v.allow_multi_map = multi;
                    v.mapping_epoch += 1;
                }
                Ok(Applied { id: v.id })
            }
            Command::UnmapVolume { volume, sdc } => {
                let sdc_id = lookup(self.sdc_by_name(sdc), "SDC", sdc)?.id;
                let v = lookup(self.volume_by_name(volume), "volume", volume)?.clone();
                if !v.mapped_sdcs.contains(&sdc_id) {
                    return Err(CoreError::Invalid(format!("volume {volume} is not mapped to SDC {sdc}")));
                }
                if let Some(v) = self.volumes.get_mut(&v.id) {
                    v.mapped_sdcs.remove(&sdc_id);
                    v.mapping_epoch += 1;
                }
                Ok(Applied { id: v.id })
            }
            Command::RetireMdmId { id } => {
                self.retired_mdm_ids.insert(*id);
                Ok(Applied { id: *id })
            }
            Command::TakeOverVolume { volume, sdc } => {
                let sdc_id = lookup(self.sdc_by_name(sdc), "SDC", sdc)?.id;
                let v = lookup(self.volume_by_name(volume), "volume", volume)?.clone();
                if v.mapped_sdcs.len() == 1 && v.mapped_sdcs.contains(&sdc_id) {
                    return Ok(Applied { id: v.id });
                }
                if let Some(v) = self.volumes.get_mut(&v.id) {
                    v.mapped_sdcs = BTreeSet::from([sdc_id]);
                    v.mapping_epoch += 1;
                }
                Ok(Applied { id: v.id })
            }
            Command::DeclareSdsDown { sds_id, unresponsive } => self.declare_sds_down(*sds_id, unresponsive),
            Command::DeclareSdsUp { sds_id, unresponsive } => self.declare_sds_up(*sds_id, unresponsive),
            Command::FailDevice { device_id } => self.fail_device(*device_id),
            Command::RemoveReplica { pool_id, pg_id, epoch, sds_id } => {
                self.remove_replica(*pool_id, *pg_id, *epoch, *sds_id)
            }
            Command::SyncComplete { pool_id, pg_id, epoch, sds_id } => {
                self.sync_complete(*pool_id, *pg_id, *epoch, *sds_id)
            }
            Command::ReportSuspectCopies { sds_id, pgs } => self.report_suspect_copies(*sds_id, pgs),
            Command::MovePg { pool_id, pg_id, epoch, from_sds_id, to } => {
                self.move_pg(*pool_id, *pg_id, *epoch, *from_sds_id, *to)
            }
            Command::DrainSds { name } => {
                let id = lookup(self.sds_by_name(name), "SDS", name)?.id;
                if let Some(s) = self.sdss.get_mut(&id) {
                    if s.state == SdsState::Down {
                        return Err(CoreError::Invalid(format!(
                            "SDS {name} is down; its copies are already being replaced"
                        )));
                    }
                    s.state = SdsState::Draining;
                }
                Ok(Applied { id })
            }
            Command::ReportNode { node } => {
                node.validate()?;
                let removing = self.nodes.get(&node.name).is_some_and(|n| n.removing);
                if let Some(other) = self.nodes.values().find(|n| n.name != node.name && n.address == node.address) {
                    return Err(CoreError::exists("node address", &format!("{} (node {})", node.address, other.name)));
                }
                // A report never undoes `node remove` nor changes the node's MDM id: those are
                // the cluster's, not the agent's.
                let mdm_id = self.nodes.get(&node.name).and_then(|n| n.mdm_id);
                let mut node = node.clone();
                node.removing = removing;
                node.mdm_id = mdm_id;
                self.nodes.insert(node.name.clone(), node);
                Ok(Applied { id: 0 })
            }
            Command::RemoveNode { name } => {
                let n = self.nodes.get_mut(name).ok_or_else(|| CoreError::not_found("node", name))?;
                n.removing = true;
                Ok(Applied { id: 0 })
            }
            Command::ForgetNode { name } => {
                if !self.nodes.contains_key(name) {
                    return Err(CoreError::not_found("node", name));
                }
                if let Some(s) =
                    self.sdss.values().find(|s| crate::deploy::split_sds_name(&s.name).is_some_and(|(n, _)| n == name))
                {
                    return Err(CoreError::in_use("node", name, format!("its SDS {} is still in the cluster", s.name)));
                }
                self.nodes.remove(name);
                Ok(Applied { id: 0 })
            }
            Command::AssignMdmId { node } => {
                let n = self.nodes.get(node).ok_or_else(|| CoreError::not_found("node", node))?;
                if let Some(id) = n.mdm_id {
                    return Ok(Applied { id });
                }
                let highest = self
                    .nodes
                    .values()
                    .filter_map(|n| n.mdm_id)
                    .chain(self.retired_mdm_ids.iter().copied())
                    .max()
                    .unwrap_or(0)
                    .max(crate::deploy::FIRST_NODE_MDM_ID - 1);
                // Ids are only ever taken by hand (`--id`) besides these: one at the top of
                // the range would leave none above it.
                let id = highest.checked_add(1).ok_or_else(|| {
                    CoreError::Invalid(
                        "no MDM id is left above the highest one used; remove the MDM with the highest id".into(),
                    )
                })?;
                if let Some(n) = self.nodes.get_mut(node) {
                    n.mdm_id = Some(id);
                }
                Ok(Applied { id })
            }
            Command::SetDeploySpec { spec } => {
                if let Some(spec) = spec {
                    spec.validate()?;
                }
                self.deploy_spec = spec.clone();
                Ok(Applied { id: 0 })
            }
            Command::DrainDevice { sds, path } => {
                let s = lookup(self.sds_by_name(sds), "SDS", sds)?.clone();
                let d = lookup(self.devices_of_sds(s.id).find(|d| &d.path == path), "device", path)?.clone();
                if d.state != DeviceState::Normal {
                    return Err(CoreError::Invalid(format!("device {path} is {:?}, not in service", d.state)));
                }
                if let Some(d) = self.devices.get_mut(&d.id) {
                    d.state = DeviceState::Draining;
                }
                Ok(Applied { id: d.id })
            }
        }
    }

    fn check_thick_fits(&self, pool: &StoragePool, extra_bytes: u64) -> Result<(), CoreError> {
        let usable = self.pool_usable_capacity_bytes(pool);
        let reserved = self.pool_thick_reserved_bytes(pool.id);
        if reserved.saturating_add(extra_bytes) > usable {
            return Err(CoreError::NoCapacity(format!(
                "pool {} can promise {usable} bytes to thick volumes (two copies, {}% spare); {reserved} already reserved, {extra_bytes} more asked",
                pool.name, pool.spare_percent
            )));
        }
        Ok(())
    }

    fn set_device_path(&mut self, device_id: u64, path: &str, stable_path: Option<&str>) -> CommandOutcome {
        validate_device_path(path)?;
        if let Some(stable) = stable_path {
            validate_device_path(stable)?;
        }
        let d = self.devices.get(&device_id).ok_or_else(|| CoreError::not_found("device", &device_id.to_string()))?;
        let (sds_id, old_path) = (d.sds_id, d.path.clone());
        // Paths stay unique per SDS (`RemoveDevice` and `DrainDevice` name devices by path).
        let holder = self.devices_of_sds(sds_id).find(|o| o.id != device_id && o.path == path).cloned();
        if let Some(other) = &holder {
            // A new device's path is what the administrator named: the SDS formats what it
            // finds there. Never point it at a disk nobody named.
            if other.state == DeviceState::New {
                return Err(CoreError::in_use(
                    "device path",
                    path,
                    format!("new device {} is recorded there; remove it first", other.id),
                ));
            }
        }
        if let Some(other) = holder {
            if let Some(o) = self.devices.get_mut(&other.id) {
                o.path = old_path;
            }
        }
        if let Some(d) = self.devices.get_mut(&device_id) {
            d.path = path.to_string();
            d.stable_path = stable_path.map(str::to_string);
        }
        Ok(Applied { id: device_id })
    }

    /// (Re)computes a pool's placement while it holds no volumes. Once volumes exist PGs
    /// hold data, and moving them is the rebalancer's job, never a side effect here.
    fn place_pool_if_empty(&mut self, pool_id: u64) {
        if self.volumes_of_pool(pool_id).next().is_some() {
            return;
        }
        let Some(pool) = self.pools.get(&pool_id) else { return };
        let use_fault_sets = self.fault_sets.values().any(|f| f.pd_id == pool.pd_id);
        let candidates: Vec<Candidate> = self
            .devices_of_pool(pool_id)
            .filter(|d| d.state == DeviceState::Normal)
            .filter_map(|d| {
                let sds = self.sdss.get(&d.sds_id).filter(|s| s.state == SdsState::Normal)?;
                Some(Candidate {
                    device_id: d.id,
                    sds_id: d.sds_id,
                    fault_set_id: sds.fault_set_id,
                    weight: d.capacity_bytes,
                })
            })
            .collect();
        let placed = place_pgs(pool.pg_count, &candidates, use_fault_sets).ok();
        let Some(pool) = self.pools.get_mut(&pool_id) else { return };
        let old = std::mem::take(&mut pool.pgs);
        pool.pgs = match placed {
            None => Vec::new(),
            Some(placed) => placed
                .into_iter()
                .enumerate()
                .map(|(i, pair)| {
                    let previous_epoch = old.get(i).map_or(0, |pg| pg.epoch);
                    PlacementGroup {
                        id: i as u32,
                        epoch: previous_epoch + 1,
                        replicas: pair.to_vec(),
                        syncing: Default::default(),
                        leaving: None,
                    }
                })
                .collect(),
        };
    }
}

fn check_spare(spare_percent: u8) -> Result<(), CoreError> {
    if spare_percent >= 100 {
        return Err(CoreError::Invalid(format!("spare percentage {spare_percent} must be below 100")));
    }
    Ok(())
}

fn check_volume_size(size_bytes: u64, pool: &StoragePool) -> Result<(), CoreError> {
    let extent = u64::from(pool.extent_size_bytes);
    if size_bytes == 0 || !size_bytes.is_multiple_of(extent) {
        return Err(CoreError::Invalid(format!(
            "volume size {size_bytes} must be a positive multiple of the pool's extent size ({extent} bytes)"
        )));
    }
    // NBD sizes and extent indexes are u64; keep far from overflow.
    if size_bytes > (1u64 << 50) {
        return Err(CoreError::Invalid(format!("volume size {size_bytes} exceeds 1 PiB")));
    }
    Ok(())
}

/// Lowest IOPS limit accepted. A filesystem issues its own metadata and journal IO
/// (superblock updates, journal commits) on top of the application's; limits below these
/// would starve that IO, and mounts and journal commits would time out.
pub const MIN_IOPS_LIMIT: u64 = 10;
/// Lowest bandwidth limit accepted, for the same reason as [`MIN_IOPS_LIMIT`].
pub const MIN_BANDWIDTH_LIMIT_BYTES_PER_SEC: u64 = MIB;

fn check_qos(qos: &VolumeQos) -> Result<(), CoreError> {
    match qos.iops_limit {
        Some(0) => {
            return Err(CoreError::Invalid("an IOPS limit of 0 would stop all IO; leave it unset for no limit".into()))
        }
        Some(n) if n < MIN_IOPS_LIMIT => {
            return Err(CoreError::Invalid(format!(
                "IOPS limit {n} is below the minimum of {MIN_IOPS_LIMIT}: a filesystem's own metadata IO would starve"
            )))
        }
        _ => {}
    }
    match qos.bandwidth_limit_bytes_per_sec {
        Some(0) => Err(CoreError::Invalid(
            "a bandwidth limit of 0 would stop all IO; leave it unset for no limit".into(),
        )),
        Some(n) if n < MIN_BANDWIDTH_LIMIT_BYTES_PER_SEC => Err(CoreError::Invalid(format!(
            "bandwidth limit {n} bytes/s is below the minimum of {MIN_BANDWIDTH_LIMIT_BYTES_PER_SEC} (1 MiB/s): a filesystem's own metadata IO would starve"
        ))),
        _ => Ok(()),
    }
}

fn validate_address(addr: &str) -> Result<(), CoreError> {
    addr.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| CoreError::Invalid(format!("address {addr:?} is not host:port with a numeric IP")))
}

fn validate_device_path(path: &str) -> Result<(), CoreError> {
    if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') || path.split('/').any(|c| c == "..") {
        return Err(CoreError::Invalid(format!("device path {path:?} must be an absolute path without '..'")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::GIB;

    fn ok(s: &mut ClusterState, c: Command) -> u64 {
        s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}")).id
    }

    /// A pool with three SDSs, one ready 10 GiB device each.
    fn three_sds_cluster() -> ClusterState {
        let mut s = ClusterState::default();
        ok(&mut s, Command::CreateProtectionDomain { name: "pd1".into() });
        ok(
            &mut s,
            Command::CreatePool {
                pd: "pd1".into(),
                name: "p1".into(),
                extent_size_bytes: DEFAULT_EXTENT_SIZE_BYTES,
                pg_count: 64,
                spare_percent: 34,
            },
        );
        for i in 1..=3 {
            ok(
                &mut s,
                Command::AddSds {
                    name: format!("sds{i}"),
                    pd: "pd1".into(),
                    fault_set: None,
                    data_address: format!("127.0.0.1:{}", 7000 + i),
                },
            );
            let d = ok(&mut s, Command::AddDevice { sds: format!("sds{i}"), pool: "p1".into(), path: "/dev/x".into() });
            ok(&mut s, Command::DeviceReady { device_id: d, capacity_bytes: 10 * GIB });
        }
        s
    }

    #[test]
    fn pool_is_placed_once_two_sdss_have_devices() {
        let s = three_sds_cluster();
        let pool = s.pool_by_name("p1").unwrap();
        assert_eq!(pool.pgs.len(), 64);
        assert!(pool.pgs.iter().all(|pg| pg.replicas.len() == 2 && pg.epoch >= 1));
    }

    #[test]
    fn duplicate_and_bad_names_refused() {
        let mut s = three_sds_cluster();
        assert!(matches!(
            s.apply(&Command::CreateProtectionDomain { name: "pd1".into() }),
            Err(CoreError::AlreadyExists { .. })
        ));
        assert!(matches!(
            s.apply(&Command::CreateProtectionDomain { name: "bad name".into() }),
            Err(CoreError::InvalidName { .. })
        ));
        let before = s.clone();
        assert!(s
            .apply(&Command::CreateVolume {
                name: "v".into(),
                pool: "p1".into(),
                size_bytes: 12345,
                thin: true,
                allow_multi_map: false
            })
            .is_err());
        assert_eq!(s, before, "a refused command changes nothing");
    }

    #[test]
    fn thick_volumes_respect_spare_capacity() {
        let mut s = three_sds_cluster();
        // 30 GiB raw, 34% spare, two copies: 9.9 GiB usable.
        let mk = |name: &str, gib: u64| Command::CreateVolume {
            name: name.into(),
            pool: "p1".into(),
            size_bytes: gib * GIB,
            thin: false,
            allow_multi_map: false,
        };
        ok(&mut s, mk("a", 9));
        assert!(matches!(s.apply(&mk("b", 1)), Err(CoreError::NoCapacity(_))));
        // Thin volumes may overcommit.
        ok(
            &mut s,
            Command::CreateVolume {
                name: "t".into(),
                pool: "p1".into(),
                size_bytes: 100 * GIB,
                thin: true,
                allow_multi_map: false,
            },
        );
    }

    #[test]
    fn mapping_is_exclusive_unless_multi_map() {
        let mut s = three_sds_cluster();
        ok(
            &mut s,
            Command::CreateVolume {
                name: "v".into(),
                pool: "p1".into(),
                size_bytes: GIB,
                thin: true,
                allow_multi_map: false,
            },
        );
        for n in ["c1", "c2"] {
            ok(
                &mut s,
                Command::RegisterSdc { name: n.into(), nbd_socket: format!("/run/{n}.sock"), nbd_tcp_address: None },
            );
        }
        ok(&mut s, Command::MapVolume { volume: "v".into(), sdc: "c1".into(), allow_multi_map: false });
        assert!(matches!(
            s.apply(&Command::MapVolume { volume: "v".into(), sdc: "c2".into(), allow_multi_map: false }),
            Err(CoreError::InUse { .. })
        ));
        ok(&mut s, Command::MapVolume { volume: "v".into(), sdc: "c2".into(), allow_multi_map: true });
        assert!(s.apply(&Command::RemoveVolume { name: "v".into() }).is_err(), "mapped volume removal refused");
        ok(&mut s, Command::UnmapVolume { volume: "v".into(), sdc: "c1".into() });
        ok(&mut s, Command::UnmapVolume { volume: "v".into(), sdc: "c2".into() });
        ok(&mut s, Command::RemoveVolume { name: "v".into() });
    }

    #[test]
    fn take_over_maps_exclusively_and_moves_the_mapping_epoch() {
        let mut s = three_sds_cluster();
        let v = ok(
            &mut s,
            Command::CreateVolume {
                name: "v".into(),
                pool: "p1".into(),
                size_bytes: GIB,
                thin: true,
                allow_multi_map: false,
            },
        );
        for n in ["c1", "c2"] {
            ok(
                &mut s,
                Command::RegisterSdc { name: n.into(), nbd_socket: format!("/run/{n}.sock"), nbd_tcp_address: None },
            );
        }
        ok(&mut s, Command::MapVolume { volume: "v".into(), sdc: "c1".into(), allow_multi_map: false });
        let before = s.volumes[&v].mapping_epoch;
        ok(&mut s, Command::TakeOverVolume { volume: "v".into(), sdc: "c2".into() });
        let c2 = s.sdc_by_name("c2").unwrap().id;
        assert_eq!(s.volumes[&v].mapped_sdcs, BTreeSet::from([c2]));
        assert_eq!(s.volumes[&v].mapping_epoch, before + 1, "the old holder is fenced by the epoch");
        ok(&mut s, Command::TakeOverVolume { volume: "v".into(), sdc: "c2".into() });
        assert_eq!(s.volumes[&v].mapping_epoch, before + 1, "taking over what it holds alone changes nothing");
        assert!(s.apply(&Command::TakeOverVolume { volume: "v".into(), sdc: "nope".into() }).is_err());
    }

    #[test]
    fn placement_frozen_once_volumes_exist() {
        let mut s = three_sds_cluster();
        ok(
            &mut s,
            Command::CreateVolume {
                name: "v".into(),
                pool: "p1".into(),
                size_bytes: GIB,
                thin: true,
                allow_multi_map: false,
            },
        );
        let before = s.pool_by_name("p1").unwrap().pgs.clone();
        ok(
            &mut s,
            Command::AddSds {
                name: "sds4".into(),
                pd: "pd1".into(),
                fault_set: None,
                data_address: "127.0.0.1:7004".into(),
            },
        );
        let d = ok(&mut s, Command::AddDevice { sds: "sds4".into(), pool: "p1".into(), path: "/dev/y".into() });
        ok(&mut s, Command::DeviceReady { device_id: d, capacity_bytes: 10 * GIB });
        assert_eq!(s.pool_by_name("p1").unwrap().pgs, before);
    }

    #[test]
    fn volumes_only_grow() {
        let mut s = three_sds_cluster();
        ok(
            &mut s,
            Command::CreateVolume {
                name: "v".into(),
                pool: "p1".into(),
                size_bytes: 2 * GIB,
                thin: true,
                allow_multi_map: false,
            },
        );
        assert!(s.apply(&Command::ResizeVolume { name: "v".into(), size_bytes: GIB }).is_err());
        ok(&mut s, Command::ResizeVolume { name: "v".into(), size_bytes: 4 * GIB });
        assert_eq!(s.volume_by_name("v").unwrap().size_bytes, 4 * GIB);
    }

    fn set_qos(name: &str, iops: Option<u64>, bandwidth: Option<u64>) -> Command {
        Command::SetVolumeQos { name: name.into(), iops_limit: iops, bandwidth_limit_bytes_per_sec: bandwidth }
    }

    fn cluster_with_volume() -> ClusterState {
        let mut s = three_sds_cluster();
        ok(
            &mut s,
            Command::CreateVolume {
                name: "v".into(),
                pool: "p1".into(),
                size_bytes: GIB,
                thin: true,
                allow_multi_map: false,
            },
        );
        s
    }

    #[test]
    fn new_volumes_are_unlimited() {
        let s = cluster_with_volume();
        let v = s.volume_by_name("v").unwrap();
        assert_eq!(v.qos, VolumeQos::default());
        assert!(v.qos.is_unlimited());
    }

    #[test]
    fn set_volume_qos_sets_and_clears_both_limits() {
        let mut s = cluster_with_volume();
        let id = ok(&mut s, set_qos("v", Some(300), Some(8 * MIB)));
        assert_eq!(
            s.volumes[&id].qos,
            VolumeQos { iops_limit: Some(300), bandwidth_limit_bytes_per_sec: Some(8 * MIB) }
        );
        // A limit not given is cleared, not kept.
        ok(&mut s, set_qos("v", None, Some(2 * MIB)));
        assert_eq!(s.volumes[&id].qos, VolumeQos { iops_limit: None, bandwidth_limit_bytes_per_sec: Some(2 * MIB) });
        ok(&mut s, set_qos("v", None, None));
        assert!(s.volumes[&id].qos.is_unlimited());
        // The minimums themselves are accepted.
        ok(&mut s, set_qos("v", Some(MIN_IOPS_LIMIT), Some(MIN_BANDWIDTH_LIMIT_BYTES_PER_SEC)));
    }

    #[test]
    fn set_volume_qos_refuses_zero_and_too_low_limits() {
        let mut s = cluster_with_volume();
        ok(&mut s, set_qos("v", Some(500), None));
        let before = s.clone();
        for (iops, bandwidth, says) in [
            (Some(0), None, "IOPS limit of 0"),
            (Some(MIN_IOPS_LIMIT - 1), None, "below the minimum"),
            (None, Some(0), "bandwidth limit of 0"),
            (None, Some(MIB - 1), "below the minimum"),
            (Some(100), Some(0), "bandwidth limit of 0"),
        ] {
            match s.apply(&set_qos("v", iops, bandwidth)) {
                Err(CoreError::Invalid(msg)) => assert!(msg.contains(says), "{iops:?}/{bandwidth:?}: {msg}"),
                other => panic!("{iops:?}/{bandwidth:?} gave {other:?}"),
            }
        }
        assert_eq!(s, before, "a refused limit changes nothing");
        assert!(matches!(s.apply(&set_qos("nope", Some(100), None)), Err(CoreError::NotFound { .. })));
    }

    /// sds1 with two devices in service (/d/a, /d/b) and a new one (/d/c); sds2 with one at /d/a.
    fn two_device_sds() -> (ClusterState, [u64; 4]) {
        let mut s = three_sds_cluster();
        let add = |s: &mut ClusterState, sds: &str, path: &str| {
            ok(s, Command::AddDevice { sds: sds.into(), pool: "p1".into(), path: path.into() })
        };
        let a = add(&mut s, "sds1", "/d/a");
        let b = add(&mut s, "sds1", "/d/b");
        let c = add(&mut s, "sds1", "/d/c");
        let other = add(&mut s, "sds2", "/d/a");
        for d in [a, b, other] {
            ok(&mut s, Command::DeviceReady { device_id: d, capacity_bytes: 10 * GIB });
        }
        (s, [a, b, c, other])
    }

    fn set_path(device_id: u64, path: &str, stable_path: Option<&str>) -> Command {
        Command::SetDevicePath { device_id, path: path.into(), stable_path: stable_path.map(str::to_string) }
    }

    #[test]
    fn set_device_path_moves_a_device_and_records_its_stable_path() {
        let (mut s, [a, ..]) = two_device_sds();
        ok(&mut s, set_path(a, "/d/moved", Some("/dev/disk/by-id/wwn-0x5000")));
        assert_eq!(s.devices[&a].path, "/d/moved");
        assert_eq!(s.devices[&a].stable_path.as_deref(), Some("/dev/disk/by-id/wwn-0x5000"));
        assert_eq!(s.devices[&a].state, DeviceState::Normal, "a move changes nothing else");
        // Same path, no stable name: clears it (a file has none).
        ok(&mut s, set_path(a, "/d/moved", None));
        assert_eq!(s.devices[&a].stable_path, None);
    }

    #[test]
    fn set_device_path_swaps_two_devices_of_one_sds() {
        let (mut s, [a, b, _, other]) = two_device_sds();
        ok(&mut s, set_path(a, "/d/b", None));
        assert_eq!((s.devices[&a].path.as_str(), s.devices[&b].path.as_str()), ("/d/b", "/d/a"));
        // The other half of the swap, as the SDS reports it next: already true, no change.
        let before = s.clone();
        ok(&mut s, set_path(b, "/d/a", None));
        assert_eq!(s, before);
        // Another SDS's device at the same path is no conflict.
        assert_eq!(s.devices[&other].path, "/d/a");
    }

    #[test]
    fn set_device_path_refuses_bad_paths_unknown_devices_and_new_devices_paths() {
        let (mut s, [a, _, c, _]) = two_device_sds();
        let before = s.clone();
        assert!(matches!(s.apply(&set_path(a, "relative", None)), Err(CoreError::Invalid(_))));
        assert!(matches!(s.apply(&set_path(a, "/d/x", Some("/dev/../sda"))), Err(CoreError::Invalid(_))));
        assert!(matches!(s.apply(&set_path(999, "/d/x", None)), Err(CoreError::NotFound { .. })));
        // A new device's path is the administrator's choice: a moved device never takes it
        // (the new device would then be formatted wherever the moved one was).
        match s.apply(&set_path(a, "/d/c", None)) {
            Err(CoreError::InUse { reason, .. }) => assert!(reason.contains(&format!("new device {c}")), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(s, before, "a refused path change changes nothing");
    }

    #[test]
    fn device_state_without_stable_path_is_read() {
        // State written before stable paths existed.
        let json = r#"{"id":7,"sds_id":2,"pool_id":1,"path":"/dev/sdb","state":"Normal","capacity_bytes":4096}"#;
        let d: Device = serde_json::from_str(json).expect("old device JSON");
        assert_eq!(d.stable_path, None);
        assert_eq!(d.path, "/dev/sdb");
    }
}
