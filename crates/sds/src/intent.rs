//! Write intent at work in the daemon: suspect copies are reported before a device serves,
//! and idle dirty extents are cleaned in the background. The on-device half (dirty bits in
//! the slot records) is in `device.rs`, "Write intent".
//!
//! Invariant: a device whose open found dirty extents is put into service only after the
//! MDM committed `ReportSuspectCopies` for their PGs *and* this SDS installed a map at
//! least that new. Until then no read is served from a copy that may disagree with its
//! partner, and no flush answers for it (the flush path refuses while a device that holds
//! copies is not open).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tessera_core::Command;

use crate::device::Device;
use crate::server::SdsState;

/// How often idle dirty extents are cleaned. An extent is cleaned once no write touched it
/// for a whole interval, so it bounds what a crash leaves to resync to about the extents
/// written in the last two intervals, while hot extents stay dirty and pay nothing.
pub const CLEAN_INTERVAL: Duration = Duration::from_secs(5);
/// Most slots one cleaning round marks clean on a device (one fdatasync covers them).
pub const CLEAN_BATCH_SLOTS: usize = 4096;
/// How long to wait for this SDS to install the map that shows its reported suspects.
const MAP_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Reports the PGs of `dev` (of SDS `sds_id`, in pool `pool_id`) whose copies may disagree
/// after the crash that left its extents dirty, and returns once this SDS's map shows the
/// outcome. Returns at once when nothing is suspect.
pub async fn settle_suspect_copies(sds: &Arc<SdsState>, sds_id: u64, pool_id: u64, dev: &Device) -> anyhow::Result<()> {
    let pgs: Vec<(u64, u32)> = dev.suspect_pgs().into_iter().map(|pg| (pool_id, pg)).collect();
    if pgs.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        device_id = dev.device_id(),
        pgs = pgs.len(),
        "device held unflushed writes when it stopped: reporting its copies of those PGs as suspect"
    );
    sds.control
        .execute(Command::ReportSuspectCopies { sds_id, pgs })
        .await
        .context("reporting suspect copies to the MDM")?;
    // A read after the commit sees it; wait until this SDS serves on a map that new.
    let committed = sds.control.state().await.context("reading the map after the report")?.version;
    let deadline = tokio::time::Instant::now() + MAP_CATCH_UP_TIMEOUT;
    while sds.map().version < committed {
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow!("this SDS did not install map version {committed} within {MAP_CATCH_UP_TIMEOUT:?}"));
        }
        sds.refresh.notify_one();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Cleans idle dirty extents of every open device, forever.
pub async fn clean_loop(sds: Arc<SdsState>) {
    loop {
        tokio::time::sleep(CLEAN_INTERVAL).await;
        let devices: Vec<Arc<Device>> =
            sds.devices.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for dev in devices.into_iter().filter(|d| !d.is_failed()) {
            match sds.device_op(&dev, "clean idle extents", |d| d.clean_idle_slots(CLEAN_BATCH_SLOTS)).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(device_id = dev.device_id(), extents = n, "cleaned idle extents"),
                Err(e) => tracing::warn!(device_id = dev.device_id(), "cleaning idle extents: {e}"),
            }
        }
    }
}

/// An orderly stop (SIGTERM): flush and clean every device, so a restart finds nothing
/// suspect and resyncs nothing. Each device under the usual deadline; a device that fails
/// here simply stays dirty, which is always safe.
pub async fn clean_at_shutdown(sds: &Arc<SdsState>) {
    let devices: Vec<Arc<Device>> = sds.devices.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
    for dev in devices.into_iter().filter(|d| !d.is_failed()) {
        match sds.device_op(&dev, "clean at shutdown", |d| d.clean_for_shutdown()).await {
            Ok(n) => tracing::info!(device_id = dev.device_id(), extents = n, "flushed and cleaned before stopping"),
            Err(e) => tracing::warn!(device_id = dev.device_id(), "cleaning before stopping: {e}"),
        }
    }
}
