//! The client config file (`tessera.toml`): where the MDMs are and the cluster secret.
//! It holds the secret, so it is written with mode 0600.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use tessera_proto::ClusterSecret;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientConfig {
    /// 32 hex digits; written into every device superblock.
    pub cluster_id: String,
    /// 64 hex digits.
    pub secret: String,
    /// Every MDM's control address.
    pub mdm: Vec<String>,
    /// The SDC `volume map` uses when none is named.
    #[serde(default)]
    pub sdc: Option<String>,
    /// Present in configs written by `tessera up`: how to restart the local cluster.
    #[serde(default)]
    pub local: Option<LocalLayout>,
    /// The volume service on this node (REX-Ray's settings); defaults when absent.
    #[serde(default)]
    pub volumes: Option<tessera_volumes::config::VolumeServiceConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalLayout {
    pub ip: String,
    pub base_port: u16,
    pub sds_count: u32,
    pub device_size_bytes: u64,
    /// MDMs: 1, 3 or 5 (configs written before multi-MDM modes had one).
    #[serde(default = "one")]
    pub mdm_count: u32,
}

fn one() -> u32 {
    1
}

impl ClientConfig {
    pub fn load(path: &Path) -> anyhow::Result<ClientConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let cfg: ClientConfig = toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        cfg.secret()?;
        cfg.cluster_id()?;
        if cfg.mdm.is_empty() {
            return Err(anyhow!("config {} names no MDM address", path.display()));
        }
        if let Some(v) = &cfg.volumes {
            v.validate().map_err(|e| anyhow!("config {}: {e}", path.display()))?;
        }
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self)?;
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    pub fn secret(&self) -> anyhow::Result<ClusterSecret> {
        ClusterSecret::from_hex(&self.secret).map_err(|e| anyhow!("config: {e}"))
    }

    pub fn cluster_id(&self) -> anyhow::Result<[u8; 16]> {
        let t = self.cluster_id.trim();
        let bad = || anyhow!("config: cluster_id must be 32 hex digits");
        if t.len() != 32 || !t.is_ascii() {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(id)
    }
}

/// `--config`, else `TESSERA_CONFIG`, else `./tessera.toml`.
pub fn resolve_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("TESSERA_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("tessera.toml"))
}

pub fn new_cluster_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A join token: what an agent needs to join (cluster id, secret, MDM addresses) in one
/// string, `tessera-join1:<cluster id>:<secret>@<mdm>,<mdm>`. It holds the secret: treat it
/// like the config file.
pub const JOIN_TOKEN_PREFIX: &str = "tessera-join1:";

impl ClientConfig {
    pub fn join_token(&self) -> String {
        format!("{JOIN_TOKEN_PREFIX}{}:{}@{}", self.cluster_id, self.secret, self.mdm.join(","))
    }

    /// A client config from a join token, checked like a loaded config.
    pub fn from_join_token(token: &str) -> anyhow::Result<ClientConfig> {
        let bad = || {
            anyhow!("not a join token (expected {JOIN_TOKEN_PREFIX}<cluster id>:<secret>@<mdm,...>; see `tessera cluster join-token`)")
        };
        let rest = token.trim().strip_prefix(JOIN_TOKEN_PREFIX).ok_or_else(bad)?;
        let (ids, mdms) = rest.split_once('@').ok_or_else(bad)?;
        let (cluster_id, secret) = ids.split_once(':').ok_or_else(bad)?;
        let mdm: Vec<String> = mdms.split(',').map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
        if mdm.is_empty() || mdm.iter().any(|m| m.parse::<std::net::SocketAddr>().is_err()) {
            return Err(anyhow!("join token: the MDM addresses must be host:port, comma separated"));
        }
        let cfg = ClientConfig {
            cluster_id: cluster_id.to_string(),
            secret: secret.to_string(),
            mdm,
            sdc: None,
            local: None,
            volumes: None,
        };
        cfg.secret().context("join token")?;
        cfg.cluster_id().context("join token")?;
        Ok(cfg)
    }
}
