//! The SDS process: registers with the MDM, opens its devices in the background (found by
//! their superblock; only new ones formatted: `devices.rs`), renews its lease, follows map
//! changes, and serves the data port.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tessera_core::lease::DEFAULT_HEARTBEAT_INTERVAL_MS;
use tessera_core::{Command, DeviceState};
use tessera_proto::control::{ControlClient, ControlRequest, ControlResponse, DeviceUsage};
use tessera_proto::ClusterSecret;
use tokio::net::TcpListener;

use crate::device::Device;
use crate::devices::{DeviceOpener, OpenRequest};
use crate::map::MapView;
use crate::server::{serve_connection, SdsState};

#[derive(Debug, Clone)]
pub struct SdsConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub mdm_addresses: Vec<String>,
    pub secret: ClusterSecret,
    pub cluster_id: [u8; 16],
    /// Back-fill bandwidth per source device.
    pub rebuild_bytes_per_sec: u64,
}

/// Fetches the map and brings devices in line with it: starts opening new ones (in the
/// background: see `devices.rs`), closes removed ones, and frees extents of removed volumes.
///
/// Never waits for a device open or format: the heartbeat loop awaits this, and an open of
/// a large device (its whole slot table read) takes longer than the lease.
async fn refresh(sds: &Arc<SdsState>, opener: &Arc<DeviceOpener>, sds_id: u64) -> anyhow::Result<()> {
    let view = sds.control.state().await?;
    let state = &view.state;
    // A failed device is closed and never reopened by this process: its PGs have moved.
    let mine: Vec<_> = state.devices_of_sds(sds_id).filter(|d| d.state != DeviceState::Failed).cloned().collect();
    let open_ids: HashSet<u64> = sds.devices.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
    for d in &mine {
        if open_ids.contains(&d.id) {
            continue;
        }
        let Some(pool) = state.pools.get(&d.pool_id) else { continue };
        let other_paths =
            state.devices_of_sds(sds_id).filter(|o| o.id != d.id).map(|o| PathBuf::from(&o.path)).collect();
        opener.start(
            sds,
            OpenRequest {
                device: d.clone(),
                extent_size_bytes: pool.extent_size_bytes,
                cluster_id: sds.cluster_id,
                other_paths,
            },
        );
    }
    let wanted: HashSet<u64> = mine.iter().map(|d| d.id).collect();
    sds.devices.write().unwrap_or_else(|p| p.into_inner()).retain(|id, _| wanted.contains(id));
    let map = MapView::from_state(view.version, sds_id, state);
    collect_removed_volumes(sds, &map);
    {
        let _fence = sds.map_fence.write().await;
        *sds.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }
    if !sds.gc_running.swap(true, std::sync::atomic::Ordering::AcqRel) {
        let sds = sds.clone();
        tokio::spawn(async move {
            collect_foreign_extents(&sds).await;
            sds.gc_running.store(false, std::sync::atomic::Ordering::Release);
        });
    }
    Ok(())
}

/// Extents freed per step of foreign-extent collection: bounds how long a map install (and
/// so a lease renewal) can wait behind it.
const FOREIGN_FREE_BATCH: usize = 64;

/// Frees extents of PGs this SDS no longer holds a copy of (moved away, or dropped while it
/// was dead): an SDS that returns after being replaced rejoins empty, and a moved copy
/// gives its space back. Safe because a PG keeps every copy that may be the last complete
/// one, so a copy outside the PG is never needed again.
async fn collect_foreign_extents(sds: &Arc<SdsState>) {
    let devices: Vec<(u64, Arc<Device>)> =
        sds.devices.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(id, d)| (*id, d.clone())).collect();
    for (device_id, dev) in devices {
        loop {
            let _fence = sds.map_fence.read().await;
            let map = sds.map();
            let Some(&pool_id) = map.device_pools.get(&device_id) else { break };
            if map.pools.get(&pool_id).is_none_or(|p| p.pgs.is_empty()) {
                break;
            }
            let foreign: Vec<_> = dev
                .allocated_extents()
                .into_iter()
                .filter(|(_, pg, _)| !map.holds_copy(pool_id, *pg, device_id))
                .map(|(k, _, _)| k)
                .take(FOREIGN_FREE_BATCH)
                .collect();
            if foreign.is_empty() {
                break;
            }
            let n = foreign.len();
            let extent = dev.extent_size_bytes();
            let freed = sds
                .device_op(&dev, "free foreign extents", move |d| {
                    foreign.iter().try_for_each(|k| d.write_zeroes(*k, 0, extent))
                })
                .await;
            match freed {
                Ok(()) => tracing::info!(device_id, extents = n, "freed extents of PGs this SDS no longer holds"),
                Err(e) => {
                    tracing::warn!(device_id, "freeing foreign extents: {e}");
                    break;
                }
            }
        }
    }
}

/// Frees, in the background, extents of volumes the MDM has removed. Only ids the MDM has
/// issued count: an unknown higher id is a volume newer than our map, not a removed one.
fn collect_removed_volumes(sds: &Arc<SdsState>, map: &MapView) {
    let devices: Vec<Arc<Device>> = sds.devices.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
    let max_id = map.max_issued_id;
    let live: HashSet<u64> = map.volumes.keys().copied().collect();
    tokio::task::spawn_blocking(move || {
        for dev in devices {
            let removed: HashSet<u64> = dev
                .allocated_extents()
                .into_iter()
                .map(|(k, _, _)| k.volume_id)
                .filter(|v| *v <= max_id && !live.contains(v))
                .collect();
            for volume_id in removed {
                match dev.remove_volume(volume_id) {
                    Ok(n) => tracing::info!(volume_id, extents = n, "freed extents of removed volume"),
                    Err(e) => tracing::warn!(volume_id, "freeing removed volume failed: {e}"),
                }
            }
        }
    });
}

/// Follows map changes as they are committed (long poll), so a re-peered or moved PG is
/// served and back-filled at once rather than at the next heartbeat.
async fn map_watcher(sds: Arc<SdsState>, watch_client: ControlClient) {
    loop {
        let after_version = sds.map().version;
        let request =
            ControlRequest::WaitForChange { after_version, timeout_ms: tessera_proto::control::MAX_WAIT_FOR_CHANGE_MS };
        match watch_client.request(&request).await {
            Ok(ControlResponse::Version(v)) if v > after_version => sds.refresh.notify_one(),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("waiting for map changes: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        // Let the refresh land before asking again (it raises our version).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How often every open device is probed for latent failure.
pub const DEVICE_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Probes each open device now and then: a device that fails while no IO reaches it (an
/// idle SDS, a copy only ever written) is reported before the PG needs it.
async fn probe_devices(sds: Arc<SdsState>) {
    loop {
        tokio::time::sleep(DEVICE_PROBE_INTERVAL).await;
        let devices: Vec<Arc<Device>> =
            sds.devices.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for dev in devices.into_iter().filter(|d| !d.is_failed()) {
            // Under the device deadline: a disk that hangs while idle is failed too.
            if let Err(e) = sds.device_op(&dev, "probe", |d| d.probe()).await {
                tracing::error!(device_id = dev.device_id(), "device probe failed: {e}");
                sds.report_device_failure(dev.device_id());
            }
        }
    }
}

/// Renews the lease every interval and follows map changes. The lease is extended only
/// once this SDS's map is at least as new as the state the MDM acknowledged, so it never
/// serves on a map older than the one current when its lease was granted.
async fn heartbeat_loop(sds: Arc<SdsState>, opener: Arc<DeviceOpener>, heartbeat_client: ControlClient, sds_id: u64) {
    let interval = Duration::from_millis(DEFAULT_HEARTBEAT_INTERVAL_MS);
    loop {
        let usage: Vec<DeviceUsage> = sds
            .devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|d| DeviceUsage { device_id: d.device_id(), used_extents: d.used_extents() })
            .collect();
        let request = ControlRequest::SdsHeartbeat { sds_id, devices: usage, rebuilds: sds.rebuilds.progress() };
        let sent_at = Instant::now();
        match heartbeat_client.request(&request).await {
            Ok(ControlResponse::Heartbeat(reply)) => {
                if reply.state_version > sds.map().version {
                    if let Err(e) = refresh(&sds, &opener, sds_id).await {
                        tracing::warn!("map refresh failed: {e:#}");
                    }
                }
                if sds.map().version >= reply.state_version {
                    sds.renew_lease(sent_at, Duration::from_millis(reply.lease_duration_ms));
                }
            }
            Ok(other) => tracing::warn!("unexpected heartbeat reply: {other:?}"),
            Err(e) => tracing::warn!("heartbeat failed: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = sds.refresh.notified() => {
                if let Err(e) = refresh(&sds, &opener, sds_id).await {
                    tracing::warn!("map refresh failed: {e:#}");
                }
            }
        }
    }
}

/// How long start-up waits for device opens before the first heartbeat: well inside the
/// lease, so a quick restart keeps it.
pub const STARTUP_OPEN_WAIT: Duration = Duration::from_secs(2);

pub async fn run_sds(cfg: SdsConfig) -> anyhow::Result<()> {
    let control = ControlClient::new(cfg.mdm_addresses.clone(), cfg.secret.clone());
    let view = control.state().await.context("fetching the cluster map from the MDM")?;
    let me = view
        .state
        .sds_by_name(&cfg.name)
        .ok_or_else(|| anyhow!("SDS {:?} is not registered with the MDM; add it first (tessera sds add)", cfg.name))?
        .clone();
    let listener = TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    if me.data_address != cfg.listen.to_string() {
        control
            .execute(Command::SetSdsAddress { name: cfg.name.clone(), data_address: cfg.listen.to_string() })
            .await?;
    }
    let sds = Arc::new(SdsState::new(cfg.secret.clone(), cfg.cluster_id, control));
    let opener = Arc::new(DeviceOpener::default());
    refresh(&sds, &opener, me.id).await.context("fetching this SDS's devices")?;
    // Give small devices the chance to open before the first heartbeat, so a restarted SDS
    // comes back with them; a large one keeps opening in the background rather than cost
    // the lease (the MDM may still count one from before a quick restart).
    if !opener.wait_idle(STARTUP_OPEN_WAIT).await {
        tracing::info!(opening = opener.in_flight(), "devices still opening; serving the others meanwhile");
    }
    tracing::info!(name = %cfg.name, id = me.id, addr = %cfg.listen, "SDS serving");
    // Heartbeats use their own connection and give up quickly: an SDS cut off from the MDM
    // must let its lease lapse, not wait behind retries.
    let mut heartbeat_client = ControlClient::new(cfg.mdm_addresses.clone(), cfg.secret.clone());
    heartbeat_client.retry_for = Duration::from_millis(DEFAULT_HEARTBEAT_INTERVAL_MS);
    sds.rebuilds.bytes_per_sec.store(cfg.rebuild_bytes_per_sec, std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(heartbeat_loop(sds.clone(), opener, heartbeat_client, me.id));
    tokio::spawn(map_watcher(sds.clone(), ControlClient::new(cfg.mdm_addresses.clone(), cfg.secret.clone())));
    tokio::spawn(crate::rebuild::scheduler(sds.clone()));
    tokio::spawn(probe_devices(sds.clone()));
    tokio::spawn(crate::intent::clean_loop(sds.clone()));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(sds.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    crate::intent::clean_at_shutdown(&sds).await;
    tracing::info!("SDS stopped");
    Ok(())
}
