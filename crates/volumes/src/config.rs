//! The volume service's settings: the `[volumes]` table of `tessera.toml`. Keys mirror
//! REX-Ray's (`preempt`, `ignoreUsedCount`, `mount.path`, `mount.rootPath`, create
//! defaults); both snake_case and REX-Ray's camelCase spellings are accepted, and anything
//! else is refused so that a typo never silently falls back to a default.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const DEFAULT_MOUNT_PATH: &str = "/var/lib/tessera/volumes";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tessera/volume-service";
pub const DEFAULT_PLUGIN_SOCKET: &str = "/run/docker/plugins/tessera.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeServiceConfig {
    /// Take a volume from the node that holds it (the mapping epoch fences that node).
    pub preempt: bool,
    /// Unmount at the first unmount request, whatever the count (Mesos's isolator is then
    /// the one authority on who uses a volume).
    #[serde(alias = "ignoreUsedCount", alias = "ignoreusedcount")]
    pub ignore_used_count: bool,
    /// Volume `v` is mounted at `<mount_path>/v`.
    #[serde(alias = "mountPath")]
    pub mount_path: PathBuf,
    /// Sub-directory handed to the task (created with mode 0700); empty for the mount itself.
    #[serde(alias = "rootPath")]
    pub root_path: String,
    /// Reference counts and attachment records.
    #[serde(alias = "stateDir")]
    pub state_dir: PathBuf,
    /// Docker volume plugin socket; its file name is the driver name.
    #[serde(alias = "pluginSocket")]
    pub plugin_socket: PathBuf,
    /// This node's SDC (default: the config's `sdc`).
    pub sdc: Option<String>,
    pub create: CreateDefaults,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreateDefaults {
    /// A mount of a volume that does not exist creates it (REX-Ray `create.implicit`),
    /// unless the caller asked for explicit creation.
    pub implicit: bool,
    /// Size of a volume created without a `size` option.
    pub size: String,
    #[serde(alias = "fsType")]
    pub fstype: String,
    /// Pool for volumes created without `volumetype` (default: the only pool).
    pub pool: Option<String>,
}

impl Default for VolumeServiceConfig {
    fn default() -> Self {
        VolumeServiceConfig {
            preempt: false,
            ignore_used_count: false,
            mount_path: PathBuf::from(DEFAULT_MOUNT_PATH),
            root_path: "/data".into(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            plugin_socket: PathBuf::from(DEFAULT_PLUGIN_SOCKET),
            sdc: None,
            create: CreateDefaults::default(),
        }
    }
}

impl Default for CreateDefaults {
    fn default() -> Self {
        CreateDefaults { implicit: true, size: "16GiB".into(), fstype: "ext4".into(), pool: None }
    }
}

impl VolumeServiceConfig {
    /// Checks what parsing cannot: sizes, filesystem, paths.
    pub fn validate(&self) -> Result<(), String> {
        tessera_core::units::parse_size_bytes(&self.create.size).map_err(|e| format!("volumes.create.size: {e}"))?;
        crate::fs::FsType::parse(&self.create.fstype).map_err(|e| format!("volumes.create.fstype: {e}"))?;
        if !self.mount_path.is_absolute() || !self.state_dir.is_absolute() {
            return Err("volumes.mount_path and volumes.state_dir must be absolute paths".into());
        }
        if self.root_path.contains("..") {
            return Err("volumes.root_path may not contain '..'".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rexray_spellings_are_accepted_and_typos_refused() {
        let c: VolumeServiceConfig =
            toml::from_str("preempt = true\nignoreUsedCount = true\nrootPath = \"\"\n[create]\nfsType = \"xfs\"\n")
                .unwrap();
        assert!(c.preempt && c.ignore_used_count);
        assert_eq!((c.root_path.as_str(), c.create.fstype.as_str()), ("", "xfs"));
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<VolumeServiceConfig>("premept = true").is_err());
        let bad = VolumeServiceConfig { root_path: "/../etc".into(), ..Default::default() };
        assert!(bad.validate().is_err());
    }
}
