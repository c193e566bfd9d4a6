//! Bringing this SDS's devices into service, off the heartbeat path.
//!
//! Opening a device reads its whole slot table (64 bytes a slot: 1 GiB for a 16 TiB device)
//! and formatting one clears it; either can take far longer than the 6 s lease. So the map
//! refresh never waits for either: it asks the [`DeviceOpener`] to start an open, which runs
//! in its own task (at most one per device id at a time) and, when done, puts the device
//! into `SdsState::devices`, records where it was found and sends `DeviceReady`.
//!
//! What a device *is* comes from its superblock, never from its path
//! (`device::identity::decide`): only a device the MDM records as `New` is ever formatted,
//! and a device in service that is not where the MDM says is looked for (it may have moved
//! or been swapped with another) and, when nowhere to be found, failed — never formatted.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tessera_core::{Command, DeviceState};

use crate::device::identity::{self, Decision, Expected};
use crate::device::{Device, FormatParams};
use crate::server::SdsState;

/// How long a device whose open failed (refused, or an error) is left alone before the next
/// refresh tries again: bounds the log and the look-ups for a device the administrator has
/// yet to fix.
pub const RETRY_AFTER_FAILED_OPEN: Duration = Duration::from_secs(10);

/// What the opener needs to know about one device, taken from the MDM's state.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    pub device: tessera_core::Device,
    pub extent_size_bytes: u32,
    pub cluster_id: [u8; 16],
    /// Paths of this SDS's other devices: two devices may have swapped.
    pub other_paths: Vec<PathBuf>,
}

impl OpenRequest {
    fn in_service(&self) -> bool {
        // `Failed` devices are never opened (the refresh skips them).
        matches!(self.device.state, DeviceState::Normal | DeviceState::Draining)
    }
}

/// A device opened, and where.
struct Opened {
    device: Device,
    /// Where it was opened (the recorded path unless it moved).
    path: PathBuf,
    stable_path: Option<PathBuf>,
}

/// Starts device opens in the background and remembers which are under way.
#[derive(Debug, Default)]
pub struct DeviceOpener {
    /// Device ids whose open task runs now.
    in_flight: Mutex<HashSet<u64>>,
    /// Device ids whose last open failed, and when they may be tried again.
    retry_at: Mutex<HashMap<u64, Instant>>,
}

/// Removes a device id from the in-flight set however its task ends (even by a panic).
struct InFlight {
    opener: Arc<DeviceOpener>,
    device_id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.opener.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.device_id);
    }
}

impl DeviceOpener {
    /// Starts opening `req.device` in its own task unless one already runs for it or it
    /// failed recently. Never waits for the open.
    pub fn start(self: &Arc<Self>, sds: &Arc<SdsState>, req: OpenRequest) {
        let device_id = req.device.id;
        if self.retry_at.lock().unwrap_or_else(|p| p.into_inner()).get(&device_id).is_some_and(|t| Instant::now() < *t)
        {
            return;
        }
        if !self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(device_id) {
            return;
        }
        let guard = InFlight { opener: self.clone(), device_id };
        let sds = sds.clone();
        tokio::spawn(async move {
            let ok = bring_up(&sds, req).await;
            let mut retry_at = guard.opener.retry_at.lock().unwrap_or_else(|p| p.into_inner());
            if ok {
                retry_at.remove(&device_id);
            } else {
                retry_at.insert(device_id, Instant::now() + RETRY_AFTER_FAILED_OPEN);
                // Nothing else may change the map meanwhile: come back to it then.
                let sds = sds.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY_AFTER_FAILED_OPEN).await;
                    sds.refresh.notify_one();
                });
            }
            drop(retry_at);
            drop(guard);
        });
    }

    /// Number of opens under way.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits until no open is under way, or `limit` passed. Returns true when idle.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Opens (or formats, or finds) one device and puts it into service. Returns false when
/// the device could not be brought up.
async fn bring_up(sds: &Arc<SdsState>, req: OpenRequest) -> bool {
    let device_id = req.device.id;
    let in_service = req.in_service();
    let blocking_req = req.clone();
    let opened = match tokio::task::spawn_blocking(move || open_blocking(&blocking_req)).await {
        Ok(r) => r,
        Err(e) => Err(anyhow!("the open task died: {e}")),
    };
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(device_id, path = %req.device.path, "device unusable: {e:#}");
            // A device in service that is not where it should be, nor anywhere else, is a
            // failed device: report it so its PGs re-peer onto their other copies (found by
            // the simulator, seed 19). A new device that never came up stays new, for the
            // administrator to fix.
            if in_service {
                sds.report_device_failure(device_id);
            }
            return false;
        }
    };
    let Opened { device, path, stable_path } = opened;
    let capacity_bytes = device.capacity_extents() * u64::from(device.extent_size_bytes());
    // Copies that may disagree with their partners (extents left dirty by a crash) are
    // reported, and the outcome installed, before the device serves anything.
    if let Err(e) = crate::intent::settle_suspect_copies(sds, req.device.sds_id, req.device.pool_id, &device).await {
        tracing::error!(device_id, "device not put into service: {e:#}");
        return false;
    }
    sds.devices.write().unwrap_or_else(|p| p.into_inner()).insert(device_id, Arc::new(device));

    let path_text = path.to_str().map(str::to_string);
    let stable_text = stable_path.as_ref().and_then(|p| p.to_str()).map(str::to_string);
    match path_text {
        Some(p) if p != req.device.path || stable_text != req.device.stable_path => {
            let cmd = Command::SetDevicePath { device_id, path: p.clone(), stable_path: stable_text.clone() };
            match sds.control.execute(cmd).await {
                Ok(_) => tracing::info!(device_id, path = %p, stable_path = ?stable_text, "recorded the device's path"),
                // The device is served where its superblock is either way; the next open
                // looks for it again.
                Err(e) => tracing::warn!(device_id, path = %p, "recording the device's path: {e}"),
            }
        }
        Some(_) => {}
        None => tracing::warn!(device_id, path = %path.display(), "device path is not UTF-8; not recorded"),
    }
    if req.device.state == DeviceState::New {
        if let Err(e) = sds.control.execute(Command::DeviceReady { device_id, capacity_bytes }).await {
            // Close it again so that the next refresh reopens it and reports it then.
            tracing::warn!(device_id, "reporting the device ready: {e}");
            sds.devices.write().unwrap_or_else(|p| p.into_inner()).remove(&device_id);
            return false;
        }
    }
    tracing::info!(device_id, path = %path.display(), capacity_bytes, "device in service");
    // Install the map that now includes it (and collect what it holds for PGs long gone).
    sds.refresh.notify_one();
    true
}

/// The blocking half: look, decide, format if allowed, open, and check what was opened.
fn open_blocking(req: &OpenRequest) -> anyhow::Result<Opened> {
    let d = &req.device;
    let recorded = Path::new(&d.path);
    let expected = Expected {
        cluster_id: req.cluster_id,
        device_id: d.id,
        extent_size_bytes: req.extent_size_bytes,
        in_service: req.in_service(),
    };
    let at_recorded = identity::probe(recorded);
    let elsewhere = if expected.is_found_in(&at_recorded) {
        Vec::new()
    } else {
        let mut hints: Vec<PathBuf> = d.stable_path.iter().map(PathBuf::from).collect();
        hints.extend(req.other_paths.iter().cloned());
        tracing::info!(
            device_id = d.id,
            "device {} is not at {} (found {}); looking for it by its superblock",
            d.id,
            d.path,
            at_recorded.describe(req.cluster_id)
        );
        identity::locate(&expected, recorded, &hints)
    };
    let path = match identity::decide(&expected, recorded, &at_recorded, &elsewhere) {
        Decision::Open => recorded.to_path_buf(),
        Decision::Moved { path } => {
            tracing::warn!(device_id = d.id, "device {} moved: found at {} (was {})", d.id, path.display(), d.path);
            path
        }
        Decision::Format => {
            tracing::info!(device_id = d.id, "new device {} at {} is blank: formatting it", d.id, d.path);
            let params =
                FormatParams { cluster_id: req.cluster_id, device_id: d.id, extent_size_bytes: req.extent_size_bytes };
            // `format` itself refuses a target that grew a superblock since we looked.
            Device::format(recorded, &params, false).with_context(|| format!("formatting {}", d.path))?;
            recorded.to_path_buf()
        }
        Decision::Refuse { reason } => return Err(anyhow!("{reason}")),
    };
    let device = Device::open(&path, req.cluster_id).with_context(|| format!("opening {}", path.display()))?;
    // The look was not under the exclusive open: check that what we opened is what we saw.
    if device.device_id() != d.id || device.extent_size_bytes() != req.extent_size_bytes {
        return Err(anyhow!(
            "{} changed while being opened: it holds device {} with extent size {} (expected device {} with {})",
            path.display(),
            device.device_id(),
            device.extent_size_bytes(),
            d.id,
            req.extent_size_bytes
        ));
    }
    let stable_path = identity::stable_path(&path);
    Ok(Opened { device, path, stable_path })
}
