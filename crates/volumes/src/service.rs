//! The volume service: REX-Ray's mount lifecycle on Tessera volumes.
//!
//! Mount: look the volume up; create it if missing (unless creation is explicit); map it to
//! this node's SDC — taking it from another node only with `preempt`, which moves the
//! volume's mapping epoch so that node can no longer write; attach; probe the filesystem and
//! format only a volume that was never written (below); mount at `<mount path>/<name>`; hand
//! back `<mount path>/<name>/<root path>` (mode 0700). The caller's reference is recorded on
//! disk.
//! Unmount drops the caller's reference and, at the last one (or at once with
//! `ignore_used_count`), unmounts, detaches and unmaps. The reference goes first, so a failed
//! unmount never pins a count; the next unmount retries the teardown.
//!
//! Create formats at once with `newfstype` (REX-Ray 0.3 did the same), so whichever node
//! mounts first finds the filesystem that was asked for; `overwritefs` therefore has nothing
//! to overwrite on a new volume and is ignored, with a warning, on an existing one: an
//! existing volume is never reformatted.
//!
//! The format rule, on every path that formats (mount and create): a volume is formatted
//! only if it was never written — no SDS of its pool holds an allocated extent of it
//! (`tessera_sdc::extents`, which fails closed when an SDS cannot answer) — whatever its
//! first bytes read. A volume that reads blank but holds extents (a database wrote the raw
//! device) is refused with one line, and the mount undoes its own map and attach so that
//! nothing is changed. The extents are listed after the volume is mapped here: for a volume
//! mapped to one SDC only, the mapping fence keeps every other node from writing between
//! the check and the mkfs. (A preempt, once done, is not undone: the fence moved.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tessera_core::units::{format_size, parse_size_bytes};
use tessera_core::{ClusterState, Command, Volume};
use tessera_proto::control::{ClientError, ControlClient};
use tessera_proto::ClusterSecret;

use crate::api::{ApiError, Opts, VolumeApi, VolumeInfo};
use crate::attach::Attacher;
use crate::config::VolumeServiceConfig;
use crate::fs::{format_decision, needs_extent_count, FormatDecision, FsType};
use crate::refs::{RefStore, StateLock};

pub struct VolumeService {
    control: ControlClient,
    /// To ask the SDSs directly which extents a volume has (the format rule).
    secret: ClusterSecret,
    sdc: String,
    cfg: VolumeServiceConfig,
    attacher: Attacher,
    refs: RefStore,
}

/// Options a volume may be created with (`docker volume create -o`, dvdcli `--volumeopts`,
/// `DVDI_VOLUME_OPTS`), keys case-insensitive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    pub size_bytes: Option<u64>,
    pub pool: Option<String>,
    pub fstype: Option<FsType>,
    pub overwrite_fs: bool,
    pub thick: bool,
    pub iops_limit: Option<u64>,
    pub bandwidth_limit_bytes_per_sec: Option<u64>,
}

const KNOWN_OPTIONS: &str = "size, iops, bandwidth, volumetype, newfstype, overwritefs, thick";

fn parse_bool(key: &str, value: &str) -> Result<bool, ApiError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(ApiError::Invalid(format!("option {key}={other:?}: expected true or false"))),
    }
}

impl CreateOptions {
    /// `size` is in GiB when it has no unit (REX-Ray's convention: `size=5` is 5 GiB).
    pub fn parse(opts: &Opts) -> Result<CreateOptions, ApiError> {
        let mut o = CreateOptions::default();
        for (key, value) in opts {
            let v = value.trim();
            match key.trim().to_ascii_lowercase().as_str() {
                "size" => {
                    let bytes = match v.parse::<u64>() {
                        Ok(gib) => gib.checked_mul(1 << 30),
                        Err(_) => parse_size_bytes(v).ok(),
                    };
                    o.size_bytes = Some(bytes.filter(|b| *b > 0).ok_or_else(|| {
                        ApiError::Invalid(format!("option size={v:?}: expected GiB (\"5\") or a size (\"512MiB\")"))
                    })?);
                }
                "iops" => {
                    o.iops_limit = Some(v.parse::<u64>().map_err(|_| {
                        ApiError::Invalid(format!("option iops={v:?}: expected a whole number of IOs per second"))
                    })?)
                    .filter(|n| *n > 0);
                }
                "bandwidth" | "bandwidthlimit" => {
                    let text = v.trim_end_matches("/s");
                    o.bandwidth_limit_bytes_per_sec = Some(parse_size_bytes(text).map_err(|e| {
                        ApiError::Invalid(format!("option bandwidth={v:?}: {e} (bytes per second, e.g. 50MiB)"))
                    })?)
                    .filter(|n| *n > 0);
                }
                "volumetype" | "type" | "pool" => o.pool = Some(v.to_string()).filter(|p| !p.is_empty()),
                "newfstype" | "fstype" => o.fstype = Some(FsType::parse(v).map_err(ApiError::Invalid)?),
                "overwritefs" => o.overwrite_fs = parse_bool(key, v)?,
                "thick" => o.thick = parse_bool(key, v)?,
                other => {
                    return Err(ApiError::Invalid(format!("unknown volume option {other:?}; known: {KNOWN_OPTIONS}")))
                }
            }
        }
        Ok(o)
    }
}

fn failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::Failed(e.to_string())
}

fn from_client(e: ClientError) -> ApiError {
    match e {
        ClientError::Control(tessera_proto::control::ControlError::Refused(r)) => ApiError::Invalid(r.to_string()),
        other => ApiError::Failed(other.to_string()),
    }
}

impl VolumeService {
    pub fn new(
        control: ControlClient,
        secret: ClusterSecret,
        sdc: String,
        cfg: VolumeServiceConfig,
    ) -> Result<VolumeService, String> {
        cfg.validate()?;
        Ok(VolumeService {
            attacher: Attacher::new(&cfg.state_dir),
            refs: RefStore::new(&cfg.state_dir),
            control,
            secret,
            sdc,
            cfg,
        })
    }

    pub fn config(&self) -> &VolumeServiceConfig {
        &self.cfg
    }

    /// The filesystem of volumes created without `newfstype` (validated with the config).
    fn default_fs(&self) -> Result<FsType, ApiError> {
        FsType::parse(&self.cfg.create.fstype).map_err(ApiError::Invalid)
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        self.cfg.mount_path.join(name)
    }

    /// What the caller is handed: the mount point plus the root path.
    fn data_path(&self, name: &str) -> PathBuf {
        let sub = self.cfg.root_path.trim_matches('/');
        if sub.is_empty() {
            self.mountpoint(name)
        } else {
            self.mountpoint(name).join(sub)
        }
    }

    fn mounted_here(&self, name: &str) -> bool {
        crate::fs::mounted_source(&self.mountpoint(name)).is_some()
    }

    async fn state(&self) -> Result<ClusterState, ApiError> {
        Ok(self.control.state().await.map_err(from_client)?.state)
    }

    async fn exec(&self, cmd: Command) -> Result<u64, ApiError> {
        Ok(self.control.execute(cmd).await.map_err(from_client)?.id)
    }

    fn check_name(name: &str) -> Result<(), ApiError> {
        tessera_core::names::validate_name(name).map_err(|e| ApiError::Invalid(e.to_string()))
    }

    fn our_sdc<'a>(&self, state: &'a ClusterState) -> Result<&'a tessera_core::Sdc, ApiError> {
        state.sdc_by_name(&self.sdc).ok_or_else(|| {
            ApiError::Failed(format!(
                "this node's SDC {:?} is not registered with the cluster (is it running?)",
                self.sdc
            ))
        })
    }

    fn uri(name: &str, sdc: &tessera_core::Sdc) -> String {
        format!("nbd+unix:///{name}?socket={}", sdc.nbd_socket)
    }

    /// Maps `volume` to this node's SDC, taking it from another only with preempt.
    async fn map_here(&self, state: &ClusterState, volume: &Volume, preempt: bool) -> Result<(), ApiError> {
        let sdc = self.our_sdc(state)?;
        if volume.mapped_sdcs.contains(&sdc.id) {
            return Ok(());
        }
        if volume.mapped_sdcs.is_empty() {
            let cmd = Command::MapVolume { volume: volume.name.clone(), sdc: self.sdc.clone(), allow_multi_map: false };
            return self.exec(cmd).await.map(|_| ());
        }
        let holders: Vec<String> = volume
            .mapped_sdcs
            .iter()
            .map(|id| state.sdcs.get(id).map_or(format!("#{id}"), |s| s.name.clone()))
            .collect();
        if !preempt {
            return Err(ApiError::Failed(format!(
                "volume {} is attached to another node (SDC {}); enable preempt to take it over",
                volume.name,
                holders.join(", ")
            )));
        }
        tracing::warn!(volume = %volume.name, from = ?holders, "preempting: taking the volume over");
        self.exec(Command::TakeOverVolume { volume: volume.name.clone(), sdc: self.sdc.clone() }).await.map(|_| ())
    }

    /// Unmaps from this node's SDC if it is mapped there.
    async fn unmap_here(&self, name: &str) -> Result<(), ApiError> {
        let state = self.state().await?;
        let (Some(v), Some(sdc)) = (state.volume_by_name(name), state.sdc_by_name(&self.sdc)) else { return Ok(()) };
        if v.mapped_sdcs.contains(&sdc.id) {
            self.exec(Command::UnmapVolume { volume: name.into(), sdc: self.sdc.clone() }).await?;
        }
        Ok(())
    }

    /// Creates `name` if missing; formats it with `fstype` (or the default). Caller holds
    /// the state lock. Returns whether it was created.
    async fn create_locked(&self, name: &str, opts: &CreateOptions) -> Result<bool, ApiError> {
        Self::check_name(name)?;
        let state = self.state().await?;
        if state.volume_by_name(name).is_some() {
            if opts.overwrite_fs {
                tracing::warn!(volume = name, "overwritefs ignored: the volume exists and is never reformatted");
            }
            return Ok(false);
        }
        let pool = match opts.pool.clone().or(self.cfg.create.pool.clone()) {
            Some(p) => p,
            None if state.pools.len() == 1 => state.pools.values().next().map(|p| p.name.clone()).unwrap_or_default(),
            None => {
                return Err(ApiError::Invalid(format!(
                    "the cluster has {} pools: name one with the volumetype option",
                    state.pools.len()
                )))
            }
        };
        let default_size = parse_size_bytes(&self.cfg.create.size).map_err(ApiError::Invalid)?;
        let size_bytes = opts.size_bytes.unwrap_or(default_size);
        self.exec(Command::CreateVolume {
            name: name.into(),
            pool,
            size_bytes,
            thin: !opts.thick,
            allow_multi_map: false,
        })
        .await?;
        tracing::info!(volume = name, size = %format_size(size_bytes), "created");
        if opts.iops_limit.is_some() || opts.bandwidth_limit_bytes_per_sec.is_some() {
            let qos = Command::SetVolumeQos {
                name: name.into(),
                iops_limit: opts.iops_limit,
                bandwidth_limit_bytes_per_sec: opts.bandwidth_limit_bytes_per_sec,
            };
            if let Err(e) = self.exec(qos).await {
                let _ = self.exec(Command::RemoveVolume { name: name.into() }).await;
                return Err(e);
            }
        }
        let fs = opts.fstype.unwrap_or(self.default_fs()?);
        match self.format_new(name, fs).await {
            Ok(()) => Ok(true),
            Err(FormatNewError::Kept(e)) => {
                // Someone wrote the volume between its creation and our format (another
                // node's mount raced this create): it is theirs now, so it is neither
                // formatted nor removed.
                let _ = self.attacher.detach(name).await;
                let _ = self.unmap_here(name).await;
                Err(e)
            }
            Err(FormatNewError::Failed(e)) => {
                // A volume that could not be formatted (and was not written) is removed
                // again rather than left for a mount to format with another filesystem
                // than was asked.
                let _ = self.attacher.detach(name).await;
                let _ = self.unmap_here(name).await;
                let _ = self.exec(Command::RemoveVolume { name: name.into() }).await;
                Err(e)
            }
        }
    }

    /// Formats the volume `create_locked` just created, under the same rule as a mount: it
    /// is new, so it should be never written — but it is checked, not assumed.
    async fn format_new(&self, name: &str, fs: FsType) -> Result<(), FormatNewError> {
        let state = self.state().await?;
        let volume = state.volume_by_name(name).ok_or_else(|| ApiError::NotFound(name.into()))?.clone();
        self.map_here(&state, &volume, false).await?;
        let sdc = self.our_sdc(&state)?;
        let a = self.attacher.attach(name, &Self::uri(name, sdc), volume.size_bytes).await.map_err(failed)?;
        match self.format_decision_for(name, &a.device).await {
            Ok(FormatDecision::Format(never_written)) => {
                crate::fs::mkfs(&a.device, fs, never_written).await.map_err(failed)?;
                tracing::info!(volume = name, fs = fs.as_str(), "formatted");
            }
            Ok(FormatDecision::Mount(found)) => {
                // Formatted by another node meanwhile: nothing is lost by leaving it.
                tracing::warn!(volume = name, found = found.as_str(), "already formatted; not formatted again");
            }
            Ok(FormatDecision::Refuse(why)) => return Err(FormatNewError::Kept(ApiError::Failed(why))),
            // The cluster could not tell whether it was written: keep it rather than risk
            // removing someone's data; a mount checks again.
            Err(e) => return Err(FormatNewError::Kept(e)),
        }
        self.attacher.detach(name).await.map_err(failed)?;
        Ok(self.unmap_here(name).await?)
    }

    /// Probes the volume attached at `device` and applies the format rule. The cluster is
    /// asked for the volume's extents only when the probe finds it blank; an SDS that cannot
    /// answer makes this an error, never a format.
    async fn format_decision_for(&self, name: &str, device: &Path) -> Result<FormatDecision, ApiError> {
        let dev = device.to_path_buf();
        let probe = tokio::task::spawn_blocking(move || crate::fs::probe_device(&dev))
            .await
            .map_err(failed)?
            .map_err(|e| failed(format!("probing {}: {e}", device.display())))?;
        let allocated = if needs_extent_count(probe) {
            let found =
                tessera_sdc::extents::allocated_extents(&self.control, &self.secret, name).await.map_err(failed)?;
            Some(found.extents.len() as u64)
        } else {
            None
        };
        Ok(format_decision(name, probe, allocated))
    }

    /// Undoes what a refused mount did, leaving the volume as it found it: detaches unless
    /// it was attached before, unmaps unless it was mapped here before.
    async fn undo_mount_steps(&self, name: &str, was_attached: bool, was_mapped: bool) {
        if !was_attached {
            if let Err(e) = self.attacher.detach(name).await {
                tracing::warn!(volume = name, "after a refused mount: {e}");
            }
        }
        if !was_mapped {
            if let Err(e) = self.unmap_here(name).await {
                tracing::warn!(volume = name, "after a refused mount: {e}");
            }
        }
    }

    /// Mount for `caller` with creation `opts` used if the volume must be created.
    pub async fn mount_with(
        &self,
        name: &str,
        caller: &str,
        opts: &CreateOptions,
        explicit_create: bool,
    ) -> Result<String, ApiError> {
        Self::check_name(name)?;
        let _lock = StateLock::acquire(&self.cfg.state_dir).await.map_err(failed)?;
        let mut state = self.state().await?;
        if state.volume_by_name(name).is_none() {
            if explicit_create || !self.cfg.create.implicit {
                return Err(ApiError::NotFound(name.into()));
            }
            self.create_locked(name, opts).await?;
            state = self.state().await?;
        }
        let volume = state.volume_by_name(name).ok_or_else(|| ApiError::NotFound(name.into()))?.clone();
        let path = self.data_path(name);
        if !self.mounted_here(name) {
            let sdc = self.our_sdc(&state)?;
            let was_mapped = volume.mapped_sdcs.contains(&sdc.id);
            let was_attached = self.attacher.current(name).is_some();
            self.map_here(&state, &volume, self.cfg.preempt).await?;
            let a = self.attacher.attach(name, &Self::uri(name, sdc), volume.size_bytes).await.map_err(failed)?;
            let fs = match self.format_decision_for(name, &a.device).await {
                Ok(FormatDecision::Mount(fs)) => fs,
                Ok(FormatDecision::Format(never_written)) => {
                    let fs = opts.fstype.unwrap_or(self.default_fs()?);
                    crate::fs::mkfs(&a.device, fs, never_written).await.map_err(failed)?;
                    tracing::info!(volume = name, fs = fs.as_str(), "formatted a volume that was never written");
                    fs
                }
                Ok(FormatDecision::Refuse(why)) => {
                    tracing::warn!(volume = name, "{why}");
                    self.undo_mount_steps(name, was_attached, was_mapped).await;
                    return Err(ApiError::Failed(why));
                }
                Err(e) => {
                    self.undo_mount_steps(name, was_attached, was_mapped).await;
                    return Err(e);
                }
            };
            let mountpoint = self.mountpoint(name);
            std::fs::create_dir_all(&mountpoint)
                .map_err(|e| failed(format!("creating {}: {e}", mountpoint.display())))?;
            crate::fs::mount(&a.device, &mountpoint, fs).await.map_err(failed)?;
            tracing::info!(volume = name, at = %mountpoint.display(), "mounted");
        }
        // REX-Ray creates the sub-path and sets its mode on every mount.
        std::fs::create_dir_all(&path).map_err(|e| failed(format!("creating {}: {e}", path.display())))?;
        if path != self.mountpoint(name) {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
        }
        let mut refs = self.refs.load().map_err(failed)?;
        refs.entry(name.to_string()).or_default().insert(caller.to_string());
        self.refs.save(&refs).map_err(failed)?;
        Ok(path.to_string_lossy().to_string())
    }

    /// Drops `caller`'s reference; at the last (or with `ignore_used_count`, or `force`),
    /// unmounts, detaches and unmaps.
    pub async fn unmount_with(&self, name: &str, caller: &str, force: bool) -> Result<(), ApiError> {
        Self::check_name(name)?;
        let _lock = StateLock::acquire(&self.cfg.state_dir).await.map_err(failed)?;
        let mut refs = self.refs.load().map_err(failed)?;
        let callers = refs.entry(name.to_string()).or_default();
        callers.remove(caller);
        if self.cfg.ignore_used_count || force {
            callers.clear();
        }
        let remaining = callers.len();
        // The count is saved before the teardown: a teardown that fails never pins it.
        self.refs.save(&refs).map_err(failed)?;
        if remaining > 0 {
            tracing::info!(volume = name, caller, remaining, "unmount: still in use");
            return Ok(());
        }
        let mountpoint = self.mountpoint(name);
        if self.mounted_here(name) {
            crate::fs::umount(&mountpoint).await.map_err(failed)?;
            tracing::info!(volume = name, "unmounted");
        }
        self.attacher.detach(name).await.map_err(failed)?;
        self.unmap_here(name).await?;
        let _ = std::fs::remove_dir(&mountpoint);
        Ok(())
    }

    /// Maps the volume here and attaches it, without mounting; returns the block device.
    pub async fn attach_only(&self, name: &str, preempt: bool) -> Result<PathBuf, ApiError> {
        Self::check_name(name)?;
        let _lock = StateLock::acquire(&self.cfg.state_dir).await.map_err(failed)?;
        let state = self.state().await?;
        let volume = state.volume_by_name(name).ok_or_else(|| ApiError::NotFound(name.into()))?.clone();
        self.map_here(&state, &volume, preempt || self.cfg.preempt).await?;
        let sdc = self.our_sdc(&state)?;
        let a = self.attacher.attach(name, &Self::uri(name, sdc), volume.size_bytes).await.map_err(failed)?;
        Ok(a.device)
    }

    /// Undoes [`VolumeService::attach_only`]; refused while the volume is mounted here.
    pub async fn detach_only(&self, name: &str) -> Result<(), ApiError> {
        Self::check_name(name)?;
        let _lock = StateLock::acquire(&self.cfg.state_dir).await.map_err(failed)?;
        if self.mounted_here(name) {
            return Err(ApiError::Invalid(format!("volume {name} is mounted here: unmount it first")));
        }
        self.attacher.detach(name).await.map_err(failed)?;
        self.unmap_here(name).await
    }

    /// Unmounts and detaches everything this node has mounted or attached, without asking
    /// the MDM (used when the local cluster is stopped). Reference counts are kept: the
    /// next mount brings the volume back.
    pub async fn release_all_local(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let records = std::fs::read_dir(self.cfg.state_dir.join("attachments")).into_iter().flatten().flatten();
        for entry in records {
            let file = entry.file_name().to_string_lossy().to_string();
            let Some(name) = file.strip_suffix(".json") else { continue };
            if self.mounted_here(name) {
                if let Err(e) = crate::fs::umount(&self.mountpoint(name)).await {
                    problems.push(format!("{name}: {e}"));
                    continue;
                }
            }
            if let Err(e) = self.attacher.detach(name).await {
                problems.push(format!("{name}: {e}"));
            }
        }
        problems
    }

    /// Callers holding each volume mounted on this node.
    pub fn references(&self) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
        Ok(self.refs.load().map_err(failed)?.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect())
    }

    fn info(&self, state: &ClusterState, v: &Volume) -> VolumeInfo {
        let mut status = BTreeMap::new();
        status.insert("size".into(), serde_json::json!(format_size(v.size_bytes)));
        status.insert("size_bytes".into(), serde_json::json!(v.size_bytes));
        status.insert("pool".into(), serde_json::json!(state.pools.get(&v.pool_id).map(|p| p.name.clone())));
        status.insert("thin".into(), serde_json::json!(v.thin));
        let attached: Vec<String> =
            v.mapped_sdcs.iter().filter_map(|id| state.sdcs.get(id).map(|s| s.name.clone())).collect();
        status.insert("attached_to".into(), serde_json::json!(attached));
        let mountpoint = self.mounted_here(&v.name).then(|| self.data_path(&v.name).to_string_lossy().to_string());
        VolumeInfo { name: v.name.clone(), mountpoint, status }
    }
}

/// How formatting a just-created volume failed: whether it may be removed again.
enum FormatNewError {
    /// It may hold someone's data (or the cluster could not tell): keep it.
    Kept(ApiError),
    /// Nothing was written to it but our own attempt: remove it.
    Failed(ApiError),
}

impl From<ApiError> for FormatNewError {
    fn from(e: ApiError) -> Self {
        FormatNewError::Failed(e)
    }
}

impl VolumeApi for VolumeService {
    async fn create(&self, name: &str, opts: &Opts) -> Result<(), ApiError> {
        let opts = CreateOptions::parse(opts)?;
        let _lock = StateLock::acquire(&self.cfg.state_dir).await.map_err(failed)?;
        self.create_locked(name, &opts).await.map(|_| ())
    }

    async fn remove(&self, name: &str) -> Result<(), ApiError> {
        Self::check_name(name)?;
        let _lock = StateLock::acquire(&self.cfg.state_dir).await.map_err(failed)?;
        let refs = self.refs.load().map_err(failed)?;
        if let Some(callers) = refs.get(name).filter(|c| !c.is_empty()) {
            return Err(ApiError::Invalid(format!("volume {name} is mounted here by {} caller(s)", callers.len())));
        }
        let state = self.state().await?;
        if state.volume_by_name(name).is_none() {
            return Err(ApiError::NotFound(name.into()));
        }
        if self.mounted_here(name) {
            crate::fs::umount(&self.mountpoint(name)).await.map_err(failed)?;
        }
        self.attacher.detach(name).await.map_err(failed)?;
        self.unmap_here(name).await?;
        self.exec(Command::RemoveVolume { name: name.into() }).await.map(|_| ())
    }

    async fn mount(&self, name: &str, caller_id: &str) -> Result<String, ApiError> {
        self.mount_with(name, caller_id, &CreateOptions::default(), false).await
    }

    async fn unmount(&self, name: &str, caller_id: &str) -> Result<(), ApiError> {
        self.unmount_with(name, caller_id, false).await
    }

    async fn path(&self, name: &str) -> Result<Option<String>, ApiError> {
        Self::check_name(name)?;
        Ok(self.mounted_here(name).then(|| self.data_path(name).to_string_lossy().to_string()))
    }

    async fn get(&self, name: &str) -> Result<VolumeInfo, ApiError> {
        let state = self.state().await?;
        let v = state.volume_by_name(name).ok_or_else(|| ApiError::NotFound(name.into()))?;
        Ok(self.info(&state, v))
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, ApiError> {
        let state = self.state().await?;
        Ok(state.volumes.values().map(|v| self.info(&state, v)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Opts {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn create_options_parse_like_rexray() {
        let o = CreateOptions::parse(&opts(&[
            ("size", "5"),
            ("IOPS", "150"),
            ("volumeType", "fast"),
            ("newFsType", "xfs"),
            ("overwriteFs", "true"),
        ]))
        .unwrap();
        assert_eq!(o.size_bytes, Some(5 << 30), "a bare size is GiB");
        assert_eq!((o.iops_limit, o.pool.as_deref(), o.fstype), (Some(150), Some("fast"), Some(FsType::Xfs)));
        assert!(o.overwrite_fs && !o.thick);
        let o = CreateOptions::parse(&opts(&[("size", "512MiB"), ("bandwidth", "20MiB/s"), ("thick", "")])).unwrap();
        assert_eq!((o.size_bytes, o.bandwidth_limit_bytes_per_sec, o.thick), (Some(512 << 20), Some(20 << 20), true));
    }

    #[test]
    fn bad_options_are_refused_by_name() {
        for (k, v) in [("size", "0"), ("size", "lots"), ("iops", "-3"), ("newfstype", "ntfs"), ("thick", "maybe")] {
            let e = CreateOptions::parse(&opts(&[(k, v)])).unwrap_err();
            assert!(e.to_string().contains(k) || e.to_string().contains("ntfs"), "{k}={v}: {e}");
        }
        let e = CreateOptions::parse(&opts(&[("colour", "blue")])).unwrap_err();
        assert!(e.to_string().contains("unknown volume option \"colour\""), "{e}");
    }
}
