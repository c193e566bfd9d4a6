//! Back-fill: a PG primary copies its complete copy to a new (syncing) copy, extent by
//! extent, while forwarded writes keep the new copy current.
//!
//! One job per (PG, epoch, target). A job:
//! 1. asks the target which extents of the PG it holds, and removes those the primary does
//!    not have (stale leftovers of an earlier membership);
//! 2. copies every allocated extent of the PG, each under a lock on the whole extent, so a
//!    concurrent write is ordered either before the copy (and included) or after it (and
//!    forwarded on top of it) — never lost between the two;
//! 3. flushes the target and asks the MDM to mark the copy complete (at the same epoch).
//!
//! Any error or epoch change aborts the job; the scheduler starts it again from step 1
//! while the map still asks for it, which is always correct because every step only makes
//! the target more like the primary. Unallocated extents are skipped (thin).
//!
//! Throttles: at most `MAX_JOBS_PER_DEVICE` jobs read one device, one extent in flight per
//! job, and a per-device byte rate — so application IO keeps the device most of the time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_core::Command;
use tessera_proto::control::RebuildProgress;
use tessera_proto::data::{flags, kind, status, IoHeader};

use crate::device::ExtentKey;
use crate::server::{SdsState, PEER_CALL_TIMEOUT};

pub const MAX_JOBS_PER_DEVICE: usize = 2;
/// Default back-fill bandwidth per source device.
pub const DEFAULT_REBUILD_BYTES_PER_SEC: u64 = 256 * 1024 * 1024;
const SCHEDULER_INTERVAL: Duration = Duration::from_millis(300);

#[derive(Debug, Default)]
pub struct JobProgress {
    pub extents_done: AtomicU64,
    pub extents_total: AtomicU64,
    pub bytes_copied: AtomicU64,
}

/// Key of a job: (pool, PG, epoch, target SDS).
type JobKey = (u64, u32, u64, u64);

#[derive(Default)]
pub struct RebuildJobs {
    running: Mutex<HashMap<JobKey, (u64 /*source device*/, Arc<JobProgress>)>>,
    /// Per source device: the earliest time the next extent may be read (pacing).
    next_slot: Mutex<HashMap<u64, Instant>>,
    pub bytes_per_sec: AtomicU64,
    /// Wakes the scheduler when a job ends, so the next one starts at once.
    job_ended: tokio::sync::Notify,
    /// Jobs that ended recently, by when: not restarted before `RESTART_BACKOFF`, so a job
    /// that fails at once (target still catching up with the map) cannot spin, and a
    /// finished one is not run again while our map still shows it syncing.
    ended_at: Mutex<HashMap<JobKey, Instant>>,
}

/// How long an ended job waits before it may run again.
const RESTART_BACKOFF: Duration = Duration::from_millis(500);

impl RebuildJobs {
    pub fn progress(&self) -> Vec<RebuildProgress> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter()
            .map(|(&(pool_id, pg_id, _, target_sds_id), (_, p))| RebuildProgress {
                pool_id,
                pg_id,
                target_sds_id,
                extents_done: p.extents_done.load(Ordering::Relaxed),
                extents_total: p.extents_total.load(Ordering::Relaxed),
                bytes_copied: p.bytes_copied.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Waits for this device's next copy slot, spacing copies to the byte rate.
    async fn pace(&self, device_id: u64, bytes: u64) {
        let rate = self.bytes_per_sec.load(Ordering::Relaxed).max(1);
        let wait_until = {
            let mut slots = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = slots.entry(device_id).or_insert(now);
            let start = (*slot).max(now);
            *slot = start + Duration::from_nanos(bytes.saturating_mul(1_000_000_000) / rate);
            start
        };
        tokio::time::sleep_until(wait_until.into()).await;
    }
}

/// Starts back-fill jobs the map calls for. Runs for the life of the SDS.
pub async fn scheduler(sds: Arc<SdsState>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SCHEDULER_INTERVAL) => {}
            _ = sds.rebuilds.job_ended.notified() => {}
        }
        if !sds.lease_held() {
            continue;
        }
        let map = sds.map();
        for (&pool_id, pool) in &map.pools {
            for (pg_id, pg) in pool.pgs.iter().enumerate() {
                let Some(primary) = pg.replicas.first() else { continue };
                // A primary copy on a device that is not open (failed, kept only because it
                // was the PG's last complete copy) has nothing to copy from.
                if primary.sds_id != map.sds_id || sds.device(primary.device_id).is_none() {
                    continue;
                }
                for &target in &pg.syncing {
                    let key = (pool_id, pg_id as u32, pg.epoch, target);
                    {
                        let mut ended = sds.rebuilds.ended_at.lock().unwrap_or_else(|p| p.into_inner());
                        ended.retain(|_, t| t.elapsed() < RESTART_BACKOFF);
                        if ended.contains_key(&key) {
                            continue;
                        }
                    }
                    let progress = {
                        let mut running = sds.rebuilds.running.lock().unwrap_or_else(|p| p.into_inner());
                        let on_device = running.values().filter(|(d, _)| *d == primary.device_id).count();
                        if running.contains_key(&key) || on_device >= MAX_JOBS_PER_DEVICE {
                            continue;
                        }
                        let progress = Arc::new(JobProgress::default());
                        running.insert(key, (primary.device_id, progress.clone()));
                        progress
                    };
                    let sds = sds.clone();
                    let device_id = primary.device_id;
                    tokio::spawn(async move {
                        let started = Instant::now();
                        match run_job(&sds, key, device_id, &progress).await {
                            Ok(()) => tracing::info!(
                                pool = key.0,
                                pg = key.1,
                                target = key.3,
                                extents = progress.extents_total.load(Ordering::Relaxed),
                                secs = started.elapsed().as_secs_f64(),
                                "back-fill complete"
                            ),
                            Err(e) => {
                                tracing::warn!(pool = key.0, pg = key.1, target = key.3, "back-fill stopped: {e}")
                            }
                        }
                        sds.rebuilds.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                        sds.rebuilds.ended_at.lock().unwrap_or_else(|p| p.into_inner()).insert(key, Instant::now());
                        sds.rebuilds.job_ended.notify_one();
                    });
                }
            }
        }
    }
}

fn still_current(sds: &SdsState, (pool_id, pg_id, epoch, target): JobKey) -> bool {
    let map = sds.map();
    map.pools.get(&pool_id).and_then(|p| p.pgs.get(pg_id as usize)).is_some_and(|pg| {
        pg.epoch == epoch && pg.replicas.first().is_some_and(|p| p.sds_id == map.sds_id) && pg.syncing.contains(&target)
    })
}

async fn run_job(sds: &Arc<SdsState>, key: JobKey, device_id: u64, progress: &JobProgress) -> Result<(), String> {
    let (pool_id, pg_id, epoch, target) = key;
    let extent_size = sds.map().pools.get(&pool_id).map(|p| p.extent_size_bytes).ok_or("pool vanished")?;
    let dev = sds.device(device_id).ok_or("source device not open")?;
    let peer = sds.peer(target).await.map_err(|s| format!("target unreachable ({})", status::name(s)))?;
    let header = |volume_id: u64, extent_index: u64, length: u32| IoHeader {
        pool_id,
        volume_id,
        extent_index,
        pg_id,
        flags: flags::REPLICA,
        pg_epoch: epoch,
        offset_in_extent: 0,
        length,
        mapping_epoch: 0,
    };
    let call = |kind_: u16, h: IoHeader, data: Vec<u8>| {
        let peer = peer.clone();
        async move {
            let reply = peer.call(kind_, &[&h.encode(), &data], PEER_CALL_TIMEOUT).await.map_err(|e| e.to_string())?;
            if reply.status != status::OK {
                return Err(format!("target replied {}", status::name(reply.status)));
            }
            Ok(reply.payload)
        }
    };

    // 1. What the target holds already.
    let listing = call(kind::LIST_PG_EXTENTS, header(0, 0, 0), Vec::new()).await?;
    let target_keys: Vec<ExtentKey> = listing
        .chunks_exact(16)
        .map(|c| ExtentKey {
            volume_id: u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8])),
            extent_index: u64::from_le_bytes(c[8..].try_into().unwrap_or([0; 8])),
        })
        .collect();
    let local_keys = dev.extents_of_pg(pg_id);
    let stale: Vec<ExtentKey> = target_keys.into_iter().filter(|k| local_keys.binary_search(k).is_err()).collect();
    progress.extents_total.store((local_keys.len() + stale.len()) as u64, Ordering::Relaxed);

    let locks = sds.range_locks().clone();
    for k in stale.iter().chain(local_keys.iter()) {
        if !still_current(sds, key) {
            return Err("the PG's map changed".into());
        }
        sds.rebuilds.pace(device_id, u64::from(extent_size)).await;
        // 2. Copy (or remove) under a lock on the whole extent: concurrent writes are ordered
        //    before or after this copy, both on the primary and on the target.
        let _guard = locks.lock(k.volume_id, k.extent_index, 0, extent_size).await;
        if dev.is_allocated(*k) {
            let key_ = *k;
            let data = sds
                .device_op(&dev, "back-fill read", move |d| {
                    let mut buf = vec![0u8; extent_size as usize];
                    d.read(key_, 0, &mut buf).map(|_| buf)
                })
                .await
                // The copy being read is the PG's complete one: a device that cannot serve
                // it is reported (device_op does), or the PG would wait on it forever (found
                // by the simulator, seed 151).
                .map_err(|e| format!("reading the source copy: {e}"))?;
            call(kind::WRITE, header(k.volume_id, k.extent_index, extent_size), data).await?;
            progress.bytes_copied.fetch_add(u64::from(extent_size), Ordering::Relaxed);
        } else {
            call(kind::TRIM, header(k.volume_id, k.extent_index, extent_size), Vec::new()).await?;
        }
        progress.extents_done.fetch_add(1, Ordering::Relaxed);
    }

    // 3. Durable on the target, then complete at the same epoch.
    let flushed = peer
        .call(kind::FLUSH, &[&flags::LOCAL_ONLY.to_le_bytes()], PEER_CALL_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    if flushed.status != status::OK {
        return Err(format!("flushing the target: {}", status::name(flushed.status)));
    }
    sds.control
        .execute(Command::SyncComplete { pool_id, pg_id, epoch, sds_id: target })
        .await
        .map_err(|e| format!("marking the copy complete: {e}"))?;
    sds.refresh.notify_one();
    Ok(())
}
