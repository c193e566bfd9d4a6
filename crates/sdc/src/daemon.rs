//! The SDC process: registers with the MDM and serves NBD on a unix socket (and on TCP
//! only when asked).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tessera_core::Command;
use tessera_nbd::ServerConfig;
use tessera_proto::control::ControlClient;
use tessera_proto::ClusterSecret;

use crate::client::DataClient;
use crate::export::SdcExports;

#[derive(Debug, Clone)]
pub struct SdcConfig {
    pub name: String,
    pub mdm_addresses: Vec<String>,
    pub secret: ClusterSecret,
    pub nbd_socket: PathBuf,
    pub nbd_tcp: Option<SocketAddr>,
}

pub async fn run_sdc(cfg: SdcConfig) -> anyhow::Result<()> {
    let control = ControlClient::new(cfg.mdm_addresses.clone(), cfg.secret.clone());
    let applied = control
        .execute(Command::RegisterSdc {
            name: cfg.name.clone(),
            nbd_socket: cfg.nbd_socket.display().to_string(),
            nbd_tcp_address: cfg.nbd_tcp.map(|a| a.to_string()),
        })
        .await
        .context("registering with the MDM")?;
    let client = Arc::new(DataClient::new(control, cfg.secret.clone(), applied.id));
    client.refresh_now().await.context("fetching the cluster map")?;
    tokio::spawn(client.clone().follow_map(ControlClient::new(cfg.mdm_addresses.clone(), cfg.secret.clone())));
    let exports = Arc::new(SdcExports { client, sdc_id: applied.id });

    // A socket file left by a previous run would make bind fail.
    match std::fs::remove_file(&cfg.nbd_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale socket {}", cfg.nbd_socket.display())),
    }
    let listener = tokio::net::UnixListener::bind(&cfg.nbd_socket)
        .with_context(|| format!("binding NBD socket {}", cfg.nbd_socket.display()))?;
    // Only the owner and its group may open volumes through the socket.
    std::fs::set_permissions(&cfg.nbd_socket, std::fs::Permissions::from_mode(0o660))?;
    let nbd_cfg = ServerConfig { multi_conn: true, ..ServerConfig::default() };
    tracing::info!(name = %cfg.name, id = applied.id, socket = %cfg.nbd_socket.display(), "SDC serving NBD");
    if let Some(addr) = cfg.nbd_tcp {
        let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding NBD TCP {addr}"))?;
        tracing::warn!(%addr, "NBD also exported over TCP: NBD itself has no authentication");
        tokio::spawn(tessera_nbd::serve_tcp(tcp, exports.clone(), nbd_cfg.clone()));
    }
    tessera_nbd::serve_unix(listener, exports, nbd_cfg).await;
    Ok(())
}
