//! Volume IO against the SDSs: splits requests at extent boundaries, routes each piece to
//! its PG's primary, and retries through map refreshes when the cluster map moved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tessera_core::flush::{FlushLedger, FlushPlan};
use tessera_core::layout::pg_of_extent;
use tessera_core::{ClusterState, SdsState, Volume};
use tessera_proto::control::{ClientError, ControlClient, ControlRequest, ControlResponse, MAX_WAIT_FOR_CHANGE_MS};
use tessera_proto::data::{flags, kind, status, IoHeader};
use tessera_proto::rpc::RpcClient;
use tessera_proto::ClusterSecret;

use crate::qos::VolumeLimiter;

/// One data request to an SDS that gets no reply in this time is retried.
pub const DATA_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a request without a reply checks whether its PG moved to another primary.
pub const STALL_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one IO keeps retrying (map refreshes, reconnects) before it fails the caller.
pub const IO_RETRY_BUDGET: Duration = Duration::from_secs(60);
/// Pause after a failed map long poll or refresh before asking again.
const MAP_FOLLOW_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoFailure {
    #[error("invalid request")]
    Invalid,
    #[error("no space")]
    NoSpace,
    #[error("I/O error")]
    Io,
}

/// The parts of the cluster map an SDC uses.
#[derive(Debug, Clone, Default)]
pub struct ClientMap {
    pub version: u64,
    pub state: ClusterState,
}

pub struct DataClient {
    pub control: Arc<ControlClient>,
    /// This SDC's id: IO is only sent for volumes mapped to it.
    sdc_id: u64,
    secret: ClusterSecret,
    map: RwLock<Arc<ClientMap>>,
    /// Incremented by every completed refresh; lets concurrent failures share one refresh.
    refresh_count: std::sync::atomic::AtomicU64,
    refresh_lock: tokio::sync::Mutex<()>,
    connections: Mutex<HashMap<u64, RpcClient>>,
    /// Per volume: which primaries took acknowledged writes not yet known durable
    /// (`tessera_core::flush`). A volume this process has not seen yet owes a flush to every
    /// SDS: an earlier incarnation of this SDC may have acknowledged writes it never flushed.
    flush_ledgers: Mutex<HashMap<u64, FlushLedger>>,
    /// The incarnation each SDS last answered with (write and flush acknowledgements). A
    /// flush that must rely on copies other than the SDSs that acknowledged its writes (a
    /// primary died) trusts only SDSs that did not restart since.
    known_incarnations: Mutex<HashMap<u64, u64>>,
    /// Per volume with a limit set: the IO and bandwidth buckets of this SDC.
    limiters: Mutex<HashMap<u64, VolumeLimiter>>,
    /// The origin of the times the limiters are given.
    limiter_epoch: tokio::time::Instant,
}

impl DataClient {
    pub fn new(control: ControlClient, secret: ClusterSecret, sdc_id: u64) -> DataClient {
        DataClient {
            control: Arc::new(control),
            sdc_id,
            secret,
            map: RwLock::new(Arc::new(ClientMap::default())),
            refresh_count: Default::default(),
            refresh_lock: tokio::sync::Mutex::new(()),
            connections: Mutex::new(HashMap::new()),
            flush_ledgers: Mutex::new(HashMap::new()),
            known_incarnations: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            limiter_epoch: tokio::time::Instant::now(),
        }
    }

    /// Follows map changes as they are committed (a long poll, as the SDSs do), so that a
    /// change nothing else would make this SDC fetch — a volume's new limits — applies within
    /// moments. `watch` is a control client of its own: the poll holds its call for up to
    /// `MAX_WAIT_FOR_CHANGE_MS`, and also serves as a refresh at least that often. Runs for
    /// the life of the SDC.
    pub async fn follow_map(self: Arc<Self>, watch: ControlClient) {
        loop {
            let after_version = self.map().version;
            let request = ControlRequest::WaitForChange { after_version, timeout_ms: MAX_WAIT_FOR_CHANGE_MS };
            match watch.request(&request).await {
                Ok(ControlResponse::Version(v)) if v > after_version => match self.refresh_now().await {
                    Ok(()) => self.forget_unused_limiters(),
                    Err(e) => {
                        tracing::warn!("map refresh failed: {e}");
                        tokio::time::sleep(MAP_FOLLOW_RETRY).await;
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("waiting for map changes: {e}");
                    tokio::time::sleep(MAP_FOLLOW_RETRY).await;
                }
            }
        }
    }

    /// Drops the buckets of volumes that lost their limits (or were removed), so that a
    /// limit set again later starts afresh with a full burst.
    fn forget_unused_limiters(&self) {
        let map = self.map();
        self.limiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| map.state.volumes.get(id).is_some_and(|v| !v.qos.is_unlimited()));
    }

    /// Holds one NBD request of `payload_bytes` until the volume's limits admit it. The
    /// limits are read from the current map, so a `SetVolumeQos` applies from the next map
    /// refresh. The request waits rather than fails: an NBD client sees a slower volume,
    /// never an error.
    async fn throttle(&self, volume_id: u64, payload_bytes: u64) {
        let map = self.map();
        let Some(qos) = map.state.volumes.get(&volume_id).map(|v| &v.qos) else { return };
        // The common case costs no lock: a volume without limits skips the limiter.
        if qos.is_unlimited() {
            return;
        }
        let now = self.limiter_epoch.elapsed();
        let wait = {
            let mut limiters = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
            limiters.entry(volume_id).or_default().reserve(qos, payload_bytes, now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Tells the MDM an SDS did not answer, so it can check at once rather than wait for the
    /// SDS's lease to run out. Fire and forget.
    fn report_unreachable(&self, sds_id: u64) {
        let control = self.control.clone();
        tokio::spawn(async move {
            let _ = control.request(&tessera_proto::control::ControlRequest::ReportUnreachable { sds_id }).await;
        });
    }

    pub fn map(&self) -> Arc<ClientMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn refreshes(&self) -> u64 {
        self.refresh_count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Refetches the map unless another caller refreshed since `seen` (single flight).
    pub async fn refresh(&self, seen: u64) -> Result<(), ClientError> {
        let _g = self.refresh_lock.lock().await;
        if self.refreshes() != seen {
            return Ok(());
        }
        let view = self.control.state().await?;
        *self.map.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(ClientMap { version: view.version, state: view.state });
        self.refresh_count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    pub async fn refresh_now(&self) -> Result<(), ClientError> {
        self.refresh(self.refreshes()).await
    }

    async fn connection(&self, sds_id: u64, map: &ClientMap) -> Option<RpcClient> {
        if let Some(c) = self.connections.lock().unwrap_or_else(|p| p.into_inner()).get(&sds_id) {
            if !c.is_closed() {
                return Some(c.clone());
            }
        }
        let addr = map.state.sdss.get(&sds_id)?.data_address.clone();
        match RpcClient::connect(&addr, &self.secret).await {
            Ok(c) => {
                self.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(sds_id, c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(sds_id, %addr, "cannot reach SDS: {e}");
                self.report_unreachable(sds_id);
                None
            }
        }
    }

    /// Sends one request for one piece of one extent to the PG primary, retrying through
    /// map changes. `data` is the WRITE payload (empty otherwise).
    async fn extent_call(&self, volume: &Volume, io: ExtentIo, data: &[u8]) -> Result<Vec<u8>, IoFailure> {
        let deadline = tokio::time::Instant::now() + IO_RETRY_BUDGET;
        let mut backoff = Duration::from_millis(5);
        loop {
            let seen = self.refreshes();
            let map = self.map();
            let outcome = self.try_extent_call(volume, io, data, &map).await;
            let retry_after_refresh = match outcome {
                Ok(payload) => return Ok(payload),
                Err(Attempt::Fatal(f)) => return Err(f),
                Err(Attempt::RefreshAndRetry) => true,
                Err(Attempt::Retry) => false,
            };
            if tokio::time::Instant::now() > deadline {
                tracing::error!(volume = %volume.name, extent_index = io.extent_index, "IO failed after retrying for {IO_RETRY_BUDGET:?}");
                return Err(IoFailure::Io);
            }
            if retry_after_refresh {
                if let Err(e) = self.refresh(seen).await {
                    tracing::warn!("map refresh failed: {e}");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    async fn try_extent_call(
        &self,
        volume: &Volume,
        io: ExtentIo,
        data: &[u8],
        map: &ClientMap,
    ) -> Result<Vec<u8>, Attempt> {
        let pool = map.state.pools.get(&volume.pool_id).ok_or(Attempt::RefreshAndRetry)?;
        // The mapping as the map has it now, not as it was when the export opened: a volume
        // unmapped from (or taken over from) this SDC gets no more IO from it.
        let mapping_epoch = match map.state.volumes.get(&volume.id) {
            Some(v) if v.mapped_sdcs.contains(&self.sdc_id) => v.mapping_epoch,
            _ => {
                tracing::error!(volume = %volume.name, "IO refused: the volume is no longer mapped to this SDC");
                return Err(Attempt::Fatal(IoFailure::Io));
            }
        };
        let ExtentIo { op, extent_index, offset_in_extent, length, flags: io_flags } = io;
        let pg_id = pg_of_extent(volume.id, extent_index, pool.pg_count);
        let pg = pool.pgs.get(pg_id as usize).ok_or(Attempt::RefreshAndRetry)?;
        let primary = pg.replicas.first().ok_or(Attempt::RefreshAndRetry)?;
        let conn = self.connection(primary.sds_id, map).await.ok_or(Attempt::RefreshAndRetry)?;
        let header = IoHeader {
            pool_id: volume.pool_id,
            volume_id: volume.id,
            extent_index,
            pg_id,
            flags: io_flags,
            pg_epoch: pg.epoch,
            offset_in_extent,
            length,
            mapping_epoch,
        };
        let header_bytes = header.encode();
        let parts: [&[u8]; 2] = [&header_bytes, data];
        let mut pending = match conn.start(op, &parts).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(sds_id = primary.sds_id, "data call failed: {e}");
                self.report_unreachable(primary.sds_id);
                return Err(Attempt::RefreshAndRetry);
            }
        };
        let sent_at = tokio::time::Instant::now();
        let reply = loop {
            tokio::select! {
                result = pending.wait() => match result {
                    Ok(r) => break r,
                    Err(e) => {
                        tracing::warn!(sds_id = primary.sds_id, "data call failed: {e}");
                        self.report_unreachable(primary.sds_id);
                        return Err(Attempt::RefreshAndRetry);
                    }
                },
                // A primary that stops answering (paused, partitioned) is replaced once its
                // lease runs out. Watch for that instead of waiting out the whole timeout:
                // once the PG's epoch moved on, this call is abandoned and re-sent on the new
                // map. (The client has not been acked, and issues no overlapping write while
                // this one is pending, so re-sending it is safe.)
                _ = tokio::time::sleep(STALL_CHECK_INTERVAL) => {
                    if sent_at.elapsed() > DATA_CALL_TIMEOUT {
                        tracing::warn!(sds_id = primary.sds_id, "data call timed out");
                        self.report_unreachable(primary.sds_id);
                        return Err(Attempt::RefreshAndRetry);
                    }
                    let seen = self.refreshes();
                    if let Err(e) = self.refresh(seen).await {
                        tracing::warn!("map refresh failed: {e}");
                    }
                    let now_epoch = self.map().state.pools.get(&volume.pool_id).and_then(|p| p.pgs.get(pg_id as usize)).map(|g| g.epoch);
                    if now_epoch != Some(pg.epoch) {
                        tracing::warn!(sds_id = primary.sds_id, pg_id, "PG moved while a request was pending: re-sending");
                        return Err(Attempt::RefreshAndRetry);
                    }
                }
            }
        };
        match reply.status {
            status::OK => {
                if op == kind::READ && reply.payload.len() != length as usize {
                    tracing::error!("SDS returned {} bytes for a {length}-byte read", reply.payload.len());
                    return Err(Attempt::Fatal(IoFailure::Io));
                }
                if op != kind::READ {
                    // Noted on completion, before the caller acknowledges it: see the
                    // ledger's invariants.
                    let incarnation = incarnation_in(&reply.payload);
                    self.known_incarnations
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(primary.sds_id, incarnation);
                    self.with_ledger(volume.id, |l| l.note_completed_write(primary.sds_id, incarnation));
                }
                Ok(reply.payload)
            }
            // The map moved, a copy is being replaced, the SDS has no lease, or its device
            // failed (the MDM re-peers the PG): all resolve with a newer map.
            status::STALE_EPOCH
            | status::WRONG_ROLE
            | status::REPLICA_UNAVAILABLE
            | status::NOT_READY
            | status::IO_ERROR
            // The mapping changed: the next attempt, on a newer map, finds whether this SDC
            // still holds it.
            | status::MAPPING_STALE => Err(Attempt::RefreshAndRetry),
            status::MAP_BEHIND => Err(Attempt::Retry),
            status::NO_SPACE => Err(Attempt::Fatal(IoFailure::NoSpace)),
            status::INVALID => Err(Attempt::Fatal(IoFailure::Invalid)),
            other => {
                tracing::error!("SDS replied {}", status::name(other));
                Err(Attempt::Fatal(IoFailure::Io))
            }
        }
    }

    /// Reads `buf.len()` bytes at byte `offset` of the volume.
    pub async fn read(&self, volume: &Volume, extent_size: u32, offset: u64, buf: &mut [u8]) -> Result<(), IoFailure> {
        self.throttle(volume.id, buf.len() as u64).await;
        let mut done = 0usize;
        for piece in pieces(offset, buf.len() as u64, extent_size) {
            let bytes = self.extent_call(volume, ExtentIo::new(kind::READ, piece, 0), &[]).await?;
            buf[done..done + piece.len as usize].copy_from_slice(&bytes);
            done += piece.len as usize;
        }
        Ok(())
    }

    pub async fn write(
        &self,
        volume: &Volume,
        extent_size: u32,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), IoFailure> {
        self.throttle(volume.id, data.len() as u64).await;
        let io_flags = if fua { flags::FUA } else { 0 };
        let mut done = 0usize;
        for piece in pieces(offset, data.len() as u64, extent_size) {
            let chunk = &data[done..done + piece.len as usize];
            self.extent_call(volume, ExtentIo::new(kind::WRITE, piece, io_flags), chunk).await?;
            done += piece.len as usize;
        }
        Ok(())
    }

    /// WRITE_ZEROES or TRIM over a range.
    pub async fn zero(
        &self,
        op: u16,
        volume: &Volume,
        extent_size: u32,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), IoFailure> {
        // No payload crosses the network: one IO, no bandwidth. (Counting the range would
        // hold `mkfs`'s discard of a whole volume for minutes under a bandwidth limit.)
        self.throttle(volume.id, 0).await;
        let io_flags = if fua { flags::FUA } else { 0 };
        for piece in pieces(offset, len, extent_size) {
            self.extent_call(volume, ExtentIo::new(op, piece, io_flags), &[]).await?;
        }
        Ok(())
    }

    fn with_ledger<T>(&self, volume_id: u64, f: impl FnOnce(&mut FlushLedger) -> T) -> T {
        let mut ledgers = self.flush_ledgers.lock().unwrap_or_else(|p| p.into_inner());
        f(ledgers.entry(volume_id).or_insert_with(FlushLedger::new_incarnation))
    }

    /// Makes every write to the volume acknowledged before this call durable on every copy:
    /// each primary that took such writes flushes its devices and the copies it forwarded
    /// to. Concurrent flushes (one NBD connection or several) each wait for a flush that
    /// covers them: the ledger forgets a write only when a flush that saw it succeeded.
    /// The targets are flushed in parallel. Not limited by QoS: a flush moves no data from
    /// this SDC, and holding it would only stall the writes it orders.
    pub async fn flush(&self, volume_id: u64) -> Result<(), IoFailure> {
        let deadline = tokio::time::Instant::now() + IO_RETRY_BUDGET;
        let mut backoff = Duration::from_millis(5);
        loop {
            let plan = self.with_ledger(volume_id, |l| l.plan());
            if plan.is_empty() {
                return Ok(());
            }
            if plan.lost_writes {
                // An SDS restarted while it owed this volume a flush: its volatile cache
                // may have taken acknowledged writes with it. No flush can bring them back,
                // so this one fails — once, as a disk's write-back error does.
                tracing::error!(volume_id, "an SDS restarted before flushing acknowledged writes: failing the flush");
                self.with_ledger(volume_id, |l| l.report_lost_writes());
                return Err(IoFailure::Io);
            }
            let map = self.map();
            if self.flush_plan(volume_id, &plan, &map).await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                tracing::error!(volume_id, "flush failed after retrying for {IO_RETRY_BUDGET:?}");
                return Err(IoFailure::Io);
            }
            // A failed device is re-peered, a dead SDS's PGs move to survivors: both show
            // in a newer map.
            let seen = self.refreshes();
            if let Err(e) = self.refresh(seen).await {
                tracing::warn!("map refresh failed: {e}");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Carries out one flush plan; true when everything it covers is durable. What failed
    /// stays owed in the ledger for the retry or a later flush.
    async fn flush_plan(&self, volume_id: u64, plan: &FlushPlan, map: &ClientMap) -> bool {
        let is_down = |id: &u64| map.state.sdss.get(id).is_none_or(|s| s.state == SdsState::Down);
        // An SDS declared dead can never be flushed, and its PGs now have primaries
        // elsewhere that hold the writes it took (as forwarded copies or back-filled): flush
        // every live SDS instead, each of which flushes its own devices and the copies it
        // forwarded to. The same when an earlier incarnation's writes may be owed anywhere.
        let down_targets: Vec<u64> = plan.targets.iter().map(|(id, _)| *id).filter(|id| is_down(id)).collect();
        let everyone = plan.everyone || !down_targets.is_empty();
        let targets: Vec<u64> = if everyone {
            map.state.sdss.values().filter(|s| s.state != SdsState::Down).map(|s| s.id).collect()
        } else {
            plan.targets.iter().map(|(id, _)| *id).collect()
        };
        let calls = targets.iter().map(|&sds_id| async move {
            let answered_by = match self.connection(sds_id, map).await {
                Some(c) => match c.call(kind::FLUSH, &[&0u32.to_le_bytes()], DATA_CALL_TIMEOUT).await {
                    Ok(r) if r.status == status::OK => Some(incarnation_in(&r.payload)),
                    _ => None,
                },
                None => None,
            };
            (sds_id, answered_by)
        });
        let answers = tessera_proto::join::join_all(calls).await;
        let results: Vec<(u64, bool)> = answers.iter().map(|(id, a)| (*id, a.is_some())).collect();
        let all_ok = results.iter().all(|(_, ok)| *ok);
        // A dead primary's writes are durable now only if the copies it forwarded them to
        // kept them: an SDS that restarted since this SDC last heard from it (or that it
        // never heard from) may have lost them with its cache, and then so may the flush.
        let unproven = {
            let mut known = self.known_incarnations.lock().unwrap_or_else(|p| p.into_inner());
            let unproven = answers.iter().any(|(id, a)| a.is_some_and(|inc| known.get(id) != Some(&inc)));
            for (id, a) in &answers {
                if let Some(inc) = a {
                    known.insert(*id, *inc);
                }
            }
            unproven
        };
        let lost = self.with_ledger(volume_id, |ledger| {
            if unproven {
                for target in &down_targets {
                    ledger.mark_lost(*target);
                }
            }
            // Before anything is marked durable: a flush answered by another incarnation
            // than the one that acknowledged the writes proves nothing about them.
            for (sds_id, answered_by) in &answers {
                if let Some(incarnation) = answered_by {
                    ledger.flush_answered_by(*sds_id, *incarnation);
                }
            }
            if everyone {
                if all_ok {
                    if plan.everyone {
                        ledger.flushed_everyone(plan);
                    } else {
                        for (target, seq) in &plan.targets {
                            ledger.flushed(*target, *seq);
                        }
                    }
                }
            } else {
                for ((target, seq), (_, ok)) in plan.targets.iter().zip(&results) {
                    if *ok {
                        ledger.flushed(*target, *seq);
                    }
                }
            }
            // Writes found lost are not durable, whatever the answers said: the caller
            // plans again and fails the flush.
            ledger.plan().lost_writes
        });
        if lost {
            return false;
        }
        if !all_ok {
            for (sds_id, _) in results.iter().filter(|(_, ok)| !ok) {
                tracing::warn!(volume_id, sds_id, "flush not acknowledged; retrying");
            }
        }
        all_ok
    }
}

/// The SDS incarnation an acknowledgement carries (its first 8 bytes; 0 when absent).
fn incarnation_in(payload: &[u8]) -> u64 {
    payload.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// One data request: an operation on one piece of one extent.
#[derive(Debug, Clone, Copy)]
struct ExtentIo {
    op: u16,
    extent_index: u64,
    offset_in_extent: u32,
    length: u32,
    flags: u32,
}

impl ExtentIo {
    fn new(op: u16, piece: Piece, flags: u32) -> ExtentIo {
        ExtentIo {
            op,
            extent_index: piece.extent_index,
            offset_in_extent: piece.offset_in_extent,
            length: piece.len,
            flags,
        }
    }
}

enum Attempt {
    Fatal(IoFailure),
    /// The map may be out of date: refresh it, then retry.
    RefreshAndRetry,
    /// The server is catching up; retry as is.
    Retry,
}

/// One piece of a volume range that lies inside a single extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub extent_index: u64,
    pub offset_in_extent: u32,
    pub len: u32,
}

/// Splits `[offset, offset + len)` at extent boundaries.
pub fn pieces(offset: u64, len: u64, extent_size: u32) -> impl Iterator<Item = Piece> {
    let extent = u64::from(extent_size);
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let in_extent = at % extent;
        let take = (extent - in_extent).min(end - at);
        let p = Piece { extent_index: at / extent, offset_in_extent: in_extent as u32, len: take as u32 };
        at += take;
        Some(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_extent_boundaries() {
        let v: Vec<_> = pieces(1000, 3000, 1024).collect();
        assert_eq!(
            v,
            vec![
                Piece { extent_index: 0, offset_in_extent: 1000, len: 24 },
                Piece { extent_index: 1, offset_in_extent: 0, len: 1024 },
                Piece { extent_index: 2, offset_in_extent: 0, len: 1024 },
                Piece { extent_index: 3, offset_in_extent: 0, len: 928 },
            ]
        );
        assert_eq!(pieces(0, 0, 1024).count(), 0);
        assert_eq!(
            pieces(2048, 1024, 1024).collect::<Vec<_>>(),
            vec![Piece { extent_index: 2, offset_in_extent: 0, len: 1024 }]
        );
    }
}
