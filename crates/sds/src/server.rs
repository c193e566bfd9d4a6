//! Data request handling. One task reads a connection's frames; each request runs in its
//! own task; replies go back through the connection's writer task, in completion order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tessera_core::flush::{FlushLedger, FlushPlan};

use tessera_proto::control::ControlClient;
use tessera_proto::data::{flags, kind, status, IoHeader, IO_HEADER_BYTES};
use tessera_proto::frame::FrameHeader;
use tessera_proto::rpc::{read_request, spawn_response_writer, OutFrame, RpcClient};
use tessera_proto::ClusterSecret;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::device::{Device, DeviceError, ExtentKey};
use crate::io_pool::{IoPool, PoolError};
use crate::map::{check_io, MapView, Role, MAX_COPIES};
use crate::range_lock::RangeLocks;
use tessera_core::Replica;

/// A forwarded write or flush that takes longer than this fails the client's request
/// (it is retried by the client; a write is never acked without both copies).
pub const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a forwarded write without a reply checks whether its PG moved on.
pub const STALL_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Longest one device operation (a read, a write, an fdatasync) may take. A device that
/// misses it is failed like one that returned an error, and its PGs re-peer onto their
/// other copies: a hung disk costs its PGs at most this plus one re-peer (about a second),
/// never the whole SDS its lease. Generous against a healthy disk: an fdatasync behind a
/// full write cache of a slow HDD takes well under a second.
pub const DEVICE_OP_DEADLINE: Duration = Duration::from_secs(5);

pub struct SdsState {
    pub secret: ClusterSecret,
    pub cluster_id: [u8; 16],
    pub control: ControlClient,
    pub map: RwLock<Arc<MapView>>,
    pub devices: RwLock<HashMap<u64, Arc<Device>>>,
    peers: Mutex<HashMap<u64, RpcClient>>,
    locks: Arc<RangeLocks>,
    /// Which SDSs took forwarded writes not yet known durable (`tessera_core::flush`): a
    /// client FLUSH must make those copies durable too. A new process owes every peer a
    /// flush, since its earlier incarnation may have forwarded writes it never flushed.
    forwarded: Mutex<FlushLedger>,
    /// Wakes the heartbeat loop to refetch the map at once.
    pub refresh: Notify,
    /// Until when this SDS may serve IO: the send time of its last acknowledged heartbeat
    /// plus the lease. The MDM counts the lease from when it received that heartbeat (later),
    /// plus a grace, so this SDS always stops serving before the MDM may replace it.
    lease_valid_until: Mutex<Option<Instant>>,
    /// This SDS's incarnation (its boot, see `new_incarnation`): every write and flush
    /// acknowledgement carries it, so a client can tell that the SDS's node lost power (and
    /// its volatile cache) between a write's acknowledgement and the flush meant to make it
    /// durable.
    pub incarnation: u64,
    /// The IO threads of each device (made on first use), see `io_pool`.
    io_pools: Mutex<HashMap<u64, Arc<IoPool>>>,
    /// Devices already reported failed (report once).
    failed_devices: Mutex<HashSet<u64>>,
    pub rebuilds: crate::rebuild::RebuildJobs,
    /// Held shared while freeing extents of PGs this SDS no longer holds, and exclusively
    /// while installing a new map: a decision to free is always taken on the newest map,
    /// so a write accepted under a newer map (which made us a member again) is never freed.
    pub map_fence: tokio::sync::RwLock<()>,
    /// One collection of foreign extents at a time.
    pub gc_running: std::sync::atomic::AtomicBool,
}

/// Where the kernel names the current boot.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// Test hook: the boot this SDS believes it runs in. Tests that simulate a power cut (the
/// crash disk drops the cache, the machine does not reboot) give the restarted SDS a new
/// value, as a real power cut gives the node a new boot.
pub const BOOT_ID_ENV: &str = "TESSERA_BOOT_ID";

/// This SDS's incarnation: a hash of the boot it runs in. What acknowledged writes can lose
/// is the volatile cache, and only a power loss (a new boot) loses it: a process that
/// crashes and restarts finds its writes in the page cache, and must not make every
/// client's next flush fail. Without a readable boot id, a random value per process —
/// a restart then counts as a possible loss, which is the safe side.
fn new_incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let boot = std::env::var(BOOT_ID_ENV).ok().or_else(|| std::fs::read_to_string(BOOT_ID_PATH).ok());
    match boot {
        // A fixed hash: every process (and build) in this boot must agree.
        Some(id) => u64::from(crc32c::crc32c(id.trim().as_bytes())),
        None => {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(std::process::id().into());
            h.finish()
        }
    }
}

fn device_status(e: &DeviceError) -> u32 {
    match e {
        DeviceError::OutOfRange { .. } | DeviceError::PgMismatch { .. } => status::INVALID,
        DeviceError::Full => status::NO_SPACE,
        _ => status::IO_ERROR,
    }
}

impl SdsState {
    pub fn new(secret: ClusterSecret, cluster_id: [u8; 16], control: ControlClient) -> SdsState {
        SdsState {
            secret,
            cluster_id,
            control,
            map: RwLock::new(Arc::new(MapView::default())),
            devices: RwLock::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            locks: Arc::new(RangeLocks::default()),
            forwarded: Mutex::new(FlushLedger::new_incarnation()),
            refresh: Notify::new(),
            lease_valid_until: Mutex::new(None),
            failed_devices: Mutex::new(HashSet::new()),
            io_pools: Mutex::new(HashMap::new()),
            incarnation: new_incarnation(),
            rebuilds: Default::default(),
            map_fence: tokio::sync::RwLock::new(()),
            gc_running: Default::default(),
        }
    }

    /// Extends the lease after an acknowledged heartbeat sent at `sent_at`.
    pub fn renew_lease(&self, sent_at: Instant, lease_duration: Duration) {
        let mut until = self.lease_valid_until.lock().unwrap_or_else(|p| p.into_inner());
        let new_until = sent_at + lease_duration;
        if until.is_none_or(|u| u < new_until) {
            *until = Some(new_until);
        }
    }

    pub fn lease_held(&self) -> bool {
        self.lease_valid_until.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|u| Instant::now() < u)
    }

    /// Reports a device that failed an IO to the MDM, once; the MDM re-peers its PGs.
    pub fn report_device_failure(self: &Arc<Self>, device_id: u64) {
        if !self.failed_devices.lock().unwrap_or_else(|p| p.into_inner()).insert(device_id) {
            return;
        }
        tracing::error!(device_id, "device failed an IO: reporting it to the MDM");
        let sds = self.clone();
        tokio::spawn(async move {
            if let Err(e) = sds.control.execute(tessera_core::Command::FailDevice { device_id }).await {
                tracing::error!(device_id, "reporting the failed device: {e}");
                sds.failed_devices.lock().unwrap_or_else(|p| p.into_inner()).remove(&device_id);
            }
        });
    }

    pub fn range_locks(&self) -> &Arc<RangeLocks> {
        &self.locks
    }

    pub fn map(&self) -> Arc<MapView> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn device(&self, device_id: u64) -> Option<Arc<Device>> {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).get(&device_id).cloned()
    }

    fn all_devices(&self) -> Vec<Arc<Device>> {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// A connection to a peer SDS. The table lock is never held across a connect: a peer
    /// that accepts but never answers (paused) must not hold up forwards to the others.
    pub async fn peer(&self, sds_id: u64) -> Result<RpcClient, u32> {
        if let Some(c) = self.peers.lock().unwrap_or_else(|p| p.into_inner()).get(&sds_id) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let addr = self.map().sds_addresses.get(&sds_id).cloned().ok_or(status::REPLICA_UNAVAILABLE)?;
        match RpcClient::connect(&addr, &self.secret).await {
            Ok(c) => {
                // Two callers may race to connect; either connection works, keep one.
                let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
                let kept = match peers.get(&sds_id) {
                    Some(existing) if !existing.is_closed() => existing.clone(),
                    _ => {
                        peers.insert(sds_id, c.clone());
                        c
                    }
                };
                Ok(kept)
            }
            Err(e) => {
                tracing::warn!(sds_id, %addr, "cannot reach peer SDS: {e}");
                Err(status::REPLICA_UNAVAILABLE)
            }
        }
    }

    /// Handles one request; returns (status, response payload).
    pub async fn handle(self: &Arc<Self>, header: &FrameHeader, payload: Vec<u8>) -> (u32, Vec<u8>) {
        match header.kind {
            kind::READ => self.read(&payload).await,
            kind::WRITE | kind::WRITE_ZEROES | kind::TRIM => self.acknowledged(self.write(header.kind, payload).await),
            kind::FLUSH => self.acknowledged(self.flush(&payload).await),
            kind::LIST_EXTENTS => self.list_extents(&payload),
            kind::EXTENT_CHECKSUM => self.extent_checksum(&payload).await,
            kind::LIST_PG_EXTENTS => self.list_pg_extents(&payload),
            _ => (status::UNKNOWN_KIND, Vec::new()),
        }
    }

    /// A successful write or flush reply carries this process's incarnation.
    fn acknowledged(&self, (status, body): (u32, Vec<u8>)) -> (u32, Vec<u8>) {
        if status == status::OK && body.is_empty() {
            return (status, self.incarnation.to_le_bytes().to_vec());
        }
        (status, body)
    }

    fn check(&self, h: &IoHeader, is_write: bool) -> Result<Role, u32> {
        // Fencing: without a lease the MDM may already have replaced this SDS's copies.
        if !self.lease_held() {
            return Err(status::NOT_READY);
        }
        let verdict = check_io(&self.map(), h, is_write);
        if verdict == Err(status::MAP_BEHIND) {
            self.refresh.notify_one();
        }
        verdict
    }

    /// Runs one operation of `dev` on the device's IO threads under
    /// [`DEVICE_OP_DEADLINE`]. The async workers never wait on a device themselves: a disk
    /// that hangs would stop every request of this SDS, heartbeats included. A device that
    /// errs (the device latches it) or misses the deadline is reported to the MDM, once.
    pub async fn device_op<T: Send + 'static>(
        self: &Arc<Self>,
        dev: &Arc<Device>,
        operation: &'static str,
        op: impl FnOnce(&Device) -> Result<T, DeviceError> + Send + 'static,
    ) -> Result<T, DeviceError> {
        let d = dev.clone();
        let pool = self.io_pool(dev.device_id());
        let Ok(task) = pool.submit(move || op(&d)) else {
            // Thousands of operations queued: the device stopped answering long ago.
            dev.fail_hung(operation);
            self.report_device_failure(dev.device_id());
            return Err(DeviceError::Failed);
        };
        let result = match tokio::time::timeout(DEVICE_OP_DEADLINE, task).await {
            Ok(Ok(Ok(r))) => r,
            // The operation panicked on a device invariant: trust nothing it touched.
            Ok(Ok(Err(PoolError::Panicked | PoolError::Busy))) | Ok(Err(_)) => {
                dev.fail_hung(operation);
                Err(DeviceError::Failed)
            }
            Err(_) => {
                dev.fail_hung(operation);
                Err(DeviceError::TimedOut { operation, deadline_ms: DEVICE_OP_DEADLINE.as_millis() as u64 })
            }
        };
        if result.is_err() && dev.is_failed() {
            self.report_device_failure(dev.device_id());
        }
        result
    }

    fn io_pool(&self, device_id: u64) -> Arc<IoPool> {
        let mut pools = self.io_pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.entry(device_id).or_insert_with(|| Arc::new(IoPool::new(&format!("dev{device_id}")))).clone()
    }

    /// Serves a read on the caller's thread when that cannot wait on the device (the data is
    /// in the page cache); `None` when it would, and [`SdsState::read`] must serve it.
    pub fn read_inline(self: &Arc<Self>, payload: &[u8]) -> Option<(u32, Vec<u8>)> {
        let Some(h) = IoHeader::decode(payload) else { return Some((status::INVALID, Vec::new())) };
        let local = match self.check(&h, false) {
            Ok(Role::Primary { local, .. }) | Ok(Role::Local { local }) => local,
            Err(s) => return Some((s, Vec::new())),
        };
        let dev = self.device(local.device_id)?;
        let key = ExtentKey { volume_id: h.volume_id, extent_index: h.extent_index };
        let mut buf = vec![0u8; h.length as usize];
        match dev.try_read_nowait(key, h.offset_in_extent, &mut buf)? {
            Ok(()) if !self.lease_held() => Some((status::NOT_READY, Vec::new())),
            Ok(()) => Some((status::OK, buf)),
            Err(e) => {
                tracing::warn!("read failed: {e}");
                if dev.is_failed() {
                    self.report_device_failure(dev.device_id());
                }
                Some((device_status(&e), Vec::new()))
            }
        }
    }

    /// Serves a read from this SDS's copy, on the device's IO threads under the deadline.
    pub async fn read(self: &Arc<Self>, payload: &[u8]) -> (u32, Vec<u8>) {
        let Some(h) = IoHeader::decode(payload) else { return (status::INVALID, Vec::new()) };
        let local = match self.check(&h, false) {
            Ok(Role::Primary { local, .. }) | Ok(Role::Local { local }) => local,
            Err(s) => return (s, Vec::new()),
        };
        let Some(dev) = self.device(local.device_id) else { return (status::IO_ERROR, Vec::new()) };
        let key = ExtentKey { volume_id: h.volume_id, extent_index: h.extent_index };
        let read = self
            .device_op(&dev, "read", move |d| {
                let mut buf = vec![0u8; h.length as usize];
                d.read(key, h.offset_in_extent, &mut buf).map(|()| buf)
            })
            .await;
        match read {
            // The lease may have lapsed while the read ran (a paused process, say): data read
            // then may already be stale, so it is not returned.
            Ok(_) if !self.lease_held() => (status::NOT_READY, Vec::new()),
            Ok(buf) => (status::OK, buf),
            Err(e) => {
                tracing::warn!("read failed: {e}");
                (device_status(&e), Vec::new())
            }
        }
    }

    async fn write(self: &Arc<Self>, op: u16, payload: Vec<u8>) -> (u32, Vec<u8>) {
        let Some(h) = IoHeader::decode(&payload) else { return (status::INVALID, Vec::new()) };
        let data_len = payload.len() - IO_HEADER_BYTES;
        if (op == kind::WRITE && data_len != h.length as usize) || (op != kind::WRITE && data_len != 0) {
            return (status::INVALID, Vec::new());
        }
        let role = match self.check(&h, true) {
            Ok(r) => r,
            Err(s) => return (s, Vec::new()),
        };
        let payload = Arc::new(payload);
        match role {
            Role::Local { local } => (self.apply_local(op, h, local.device_id, payload).await, Vec::new()),
            Role::Primary { local, others } => {
                let end = h.offset_in_extent + h.length;
                let _guard = self.locks.lock(h.volume_id, h.extent_index, h.offset_in_extent, end).await;
                let local_write = self.apply_local(op, h, local.device_id, payload.clone());
                let forwards = self.forward_all(op, h, others.as_slice(), &payload);
                let (local_status, forward_status) = tokio::join!(local_write, forwards);
                // Ack only when every copy has the write (or a lost copy's removal is committed).
                if local_status != status::OK {
                    return (local_status, Vec::new());
                }
                (forward_status, Vec::new())
            }
        }
    }

    /// Forwards a write to every other copy of the PG, concurrently.
    async fn forward_all(self: &Arc<Self>, op: u16, h: IoHeader, others: &[Replica], payload: &Arc<Vec<u8>>) -> u32 {
        let mut statuses = [status::OK; MAX_COPIES];
        match others {
            [] => {}
            [only] => statuses[0] = self.forward(op, h, only.sds_id, payload).await,
            many => {
                let mut set = tokio::task::JoinSet::new();
                for (i, r) in many.iter().enumerate() {
                    let (sds, payload, sds_id) = (self.clone(), payload.clone(), r.sds_id);
                    set.spawn(async move { (i, sds.forward(op, h, sds_id, &payload).await) });
                }
                while let Some(joined) = set.join_next().await {
                    if let Ok((i, st)) = joined {
                        statuses[i] = st;
                    } else {
                        return status::IO_ERROR;
                    }
                }
            }
        }
        let mut result = status::OK;
        for (r, st) in others.iter().zip(statuses) {
            match st {
                status::OK => {}
                // The maps disagree: the client refetches and retries; nothing is removed.
                status::STALE_EPOCH | status::MAP_BEHIND => return st,
                _ => {
                    let dropped = self.drop_unreachable_copy(h, r.sds_id).await;
                    if dropped != status::OK {
                        result = dropped;
                    }
                }
            }
        }
        result
    }

    /// The degraded-write rule. A copy that missed a write must leave the PG *before* the
    /// write is acknowledged: if we acked first and this primary then died, the MDM could
    /// promote the copy that lacks the write, losing acknowledged data. The removal is
    /// conditional on the epoch the write was checked against, so a primary that was itself
    /// replaced meanwhile cannot remove a good copy: its request is refused, and the write
    /// fails back to the client, which retries against the new map.
    async fn drop_unreachable_copy(&self, h: IoHeader, sds_id: u64) -> u32 {
        let cmd =
            tessera_core::Command::RemoveReplica { pool_id: h.pool_id, pg_id: h.pg_id, epoch: h.pg_epoch, sds_id };
        match self.control.execute(cmd).await {
            Ok(_) => {
                tracing::warn!(
                    pool = h.pool_id,
                    pg = h.pg_id,
                    epoch = h.pg_epoch,
                    sds_id,
                    "dropped an unreachable copy"
                );
                self.refresh.notify_one();
                status::OK
            }
            Err(tessera_proto::control::ClientError::Control(e)) => {
                tracing::info!(pool = h.pool_id, pg = h.pg_id, sds_id, "copy removal refused: {e}");
                self.refresh.notify_one();
                status::STALE_EPOCH
            }
            Err(e) => {
                tracing::warn!(sds_id, "cannot reach the MDM to drop an unreachable copy: {e}");
                status::REPLICA_UNAVAILABLE
            }
        }
    }

    async fn apply_local(self: &Arc<Self>, op: u16, h: IoHeader, device_id: u64, payload: Arc<Vec<u8>>) -> u32 {
        let Some(dev) = self.device(device_id) else { return status::IO_ERROR };
        let key = ExtentKey { volume_id: h.volume_id, extent_index: h.extent_index };
        let fua = h.flags & flags::FUA != 0;
        // FUA holds for every kind: a zeroed or trimmed range is durable before the ack too.
        let apply = move |dev: &Device| match op {
            kind::WRITE => dev.write(key, h.pg_id, h.offset_in_extent, &payload[IO_HEADER_BYTES..], fua).map(|_| ()),
            kind::WRITE_ZEROES => {
                dev.write_zeroes(key, h.offset_in_extent, h.length).and_then(|_| if fua { dev.flush() } else { Ok(()) })
            }
            _ => dev.trim(key, h.offset_in_extent, h.length).and_then(|_| if fua { dev.flush() } else { Ok(()) }),
        };
        match self.device_op(&dev, "write", apply).await {
            Ok(()) => status::OK,
            Err(e) => {
                tracing::warn!("local write failed: {e}");
                device_status(&e)
            }
        }
    }

    async fn forward(&self, op: u16, h: IoHeader, sds_id: u64, payload: &[u8]) -> u32 {
        let Ok(peer) = self.peer(sds_id).await else { return status::REPLICA_UNAVAILABLE };
        let forwarded = IoHeader { flags: h.flags | flags::REPLICA, ..h };
        let header_bytes = forwarded.encode();
        let parts: [&[u8]; 2] = [&header_bytes, &payload[IO_HEADER_BYTES..]];
        let sent_at = Instant::now();
        let result = match peer.start(op, &parts).await {
            Err(e) => Err(e),
            Ok(mut pending) => loop {
                tokio::select! {
                    r = pending.wait() => break r,
                    // A copy that stops answering is replaced once its lease runs out; when our
                    // map shows the PG moved on, stop waiting: the client retries on the new map.
                    _ = tokio::time::sleep(STALL_CHECK_INTERVAL) => {
                        if sent_at.elapsed() > PEER_CALL_TIMEOUT {
                            break Err(tessera_proto::rpc::RpcError::Timeout(peer.addr().to_string()));
                        }
                        let map = self.map();
                        let epoch = map.pools.get(&h.pool_id).and_then(|p| p.pgs.get(h.pg_id as usize)).map(|g| g.epoch);
                        if epoch != Some(h.pg_epoch) {
                            tracing::warn!(sds_id, pg = h.pg_id, "PG moved while a forwarded write was pending");
                            return status::STALE_EPOCH;
                        }
                    }
                }
            },
        };
        match result {
            Ok(reply) => {
                if reply.status == status::OK {
                    // Noted on completion, before the primary acknowledges the write.
                    // Peer incarnations are not tracked: a peer that restarts with unflushed
                    // writes reports those copies suspect before it answers a flush, and they
                    // are back-filled from this (complete) copy.
                    self.forwarded.lock().unwrap_or_else(|p| p.into_inner()).note_completed_write(sds_id, 0);
                } else {
                    tracing::warn!(sds_id, "secondary refused write: {}", status::name(reply.status));
                }
                // Epoch disagreements are the client's to resolve by refetching its map; a
                // copy without a lease yet (restarting) is waited for; anything else means
                // the copy does not have the write.
                match reply.status {
                    status::OK | status::STALE_EPOCH | status::MAP_BEHIND => reply.status,
                    status::NOT_READY => status::MAP_BEHIND,
                    _ => status::REPLICA_UNAVAILABLE,
                }
            }
            Err(e) => {
                tracing::warn!(sds_id, "forwarding to secondary failed: {e}");
                status::REPLICA_UNAVAILABLE
            }
        }
    }

    /// Makes every write acknowledged before this request durable: on every local device,
    /// and (unless `LOCAL_ONLY`) on every copy this SDS forwarded such writes to. Devices
    /// and peers are flushed in parallel. Concurrent flushes each plan from the ledger and
    /// flush whatever is still owed, so none returns before the writes it covers are
    /// durable (see `tessera_core::flush`).
    async fn flush(self: &Arc<Self>, payload: &[u8]) -> (u32, Vec<u8>) {
        // Without a lease this SDS may not have its map yet (just started), and so not know
        // which devices hold copies: it cannot promise anything.
        if !self.lease_held() {
            return (status::NOT_READY, Vec::new());
        }
        let local_only = payload.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).unwrap_or(0)
            & flags::LOCAL_ONLY
            != 0;
        let plan = if local_only {
            FlushPlan { targets: Vec::new(), everyone: false, lost_writes: false }
        } else {
            self.forwarded.lock().unwrap_or_else(|p| p.into_inner()).plan()
        };
        let (local, peers) = tokio::join!(self.flush_devices(), self.flush_peers(&plan));
        if local != status::OK {
            return (local, Vec::new());
        }
        (peers, Vec::new())
    }

    /// fdatasync of every local device, in parallel, each under the device deadline.
    ///
    /// A failed device never makes a flush succeed over data that only it held: while the
    /// map still places a copy on it, the flush fails (the client retries once the MDM has
    /// moved those PGs to their other copies, which its retry then flushes). Once no copy is
    /// there, it is skipped.
    async fn flush_devices(self: &Arc<Self>) -> u32 {
        let map = self.map();
        let holds_copies = |device_id: u64| {
            map.pools
                .values()
                .flat_map(|p| &p.pgs)
                .flat_map(|g| &g.replicas)
                .any(|r| r.sds_id == map.sds_id && r.device_id == device_id)
        };
        let mut flushes = Vec::new();
        let mut result = status::OK;
        let open = self.all_devices();
        // A device the map places copies on that is not open (still opening after a
        // restart, its suspect copies not yet settled, or unusable and not yet re-peered)
        // may hold writes this flush must cover: nothing can be promised for it.
        let my_copies =
            map.pools.values().flat_map(|p| &p.pgs).flat_map(|g| &g.replicas).filter(|r| r.sds_id == map.sds_id);
        for r in my_copies {
            if !open.iter().any(|d| d.device_id() == r.device_id) {
                return status::NOT_READY;
            }
        }
        for dev in open {
            if dev.is_failed() {
                if holds_copies(dev.device_id()) {
                    self.report_device_failure(dev.device_id());
                    result = status::IO_ERROR;
                }
                continue;
            }
            flushes.push(async move { (dev.device_id(), self.device_op(&dev, "flush", |d| d.flush()).await) });
        }
        for (device_id, r) in tessera_proto::join::join_all(flushes).await {
            if let Err(e) = r {
                tracing::warn!(device_id, "flush failed: {e}");
                result = status::IO_ERROR;
            }
        }
        result
    }

    /// Flushes the copies the plan owes, in parallel; what fails stays owed.
    async fn flush_peers(self: &Arc<Self>, plan: &FlushPlan) -> u32 {
        if plan.is_empty() {
            return status::OK;
        }
        let map = self.map();
        // A peer declared dead is removed from every PG this SDS also holds: the copies it
        // had are gone, and the writes live on here and on the other copies.
        let live = |id: &u64| *id != map.sds_id && !map.down_sdss.contains(id);
        let targets: Vec<(u64, Option<u64>)> = if plan.everyone {
            map.sds_addresses.keys().copied().filter(live).map(|id| (id, None)).collect()
        } else {
            plan.targets.iter().filter(|(id, _)| live(id)).map(|&(id, seq)| (id, Some(seq))).collect()
        };
        let calls = targets.iter().map(|&(sds_id, _)| async move {
            match self.peer(sds_id).await {
                Ok(peer) => peer
                    .call(kind::FLUSH, &[&flags::LOCAL_ONLY.to_le_bytes()], PEER_CALL_TIMEOUT)
                    .await
                    .is_ok_and(|r| r.status == status::OK),
                Err(_) => false,
            }
        });
        let results = tessera_proto::join::join_all(calls).await;
        let all_ok = results.iter().all(|ok| *ok);
        let mut ledger = self.forwarded.lock().unwrap_or_else(|p| p.into_inner());
        if plan.everyone {
            if all_ok {
                ledger.flushed_everyone(plan);
            }
        } else {
            for ((sds_id, seq), ok) in targets.iter().zip(&results) {
                if *ok {
                    ledger.flushed(*sds_id, seq.unwrap_or(0));
                }
            }
            // Down peers owe nothing more: their copies left every PG.
            for (sds_id, seq) in &plan.targets {
                if !live(sds_id) {
                    ledger.flushed(*sds_id, *seq);
                }
            }
        }
        drop(ledger);
        for ((sds_id, _), ok) in targets.iter().zip(&results) {
            if !ok {
                tracing::warn!(sds_id, "peer flush failed; it stays owed");
            }
        }
        if all_ok {
            status::OK
        } else {
            status::REPLICA_UNAVAILABLE
        }
    }

    fn list_extents(&self, payload: &[u8]) -> (u32, Vec<u8>) {
        let Some(volume_id) = payload.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) else {
            return (status::INVALID, Vec::new());
        };
        let mut extents: Vec<u64> = self.all_devices().iter().flat_map(|d| d.extents_of_volume(volume_id)).collect();
        extents.sort_unstable();
        extents.dedup();
        (status::OK, extents.iter().flat_map(|e| e.to_le_bytes()).collect())
    }

    /// Extents of one PG held here, for a back-filling primary.
    fn list_pg_extents(&self, payload: &[u8]) -> (u32, Vec<u8>) {
        let Some(h) = IoHeader::decode(payload) else { return (status::INVALID, Vec::new()) };
        if !self.lease_held() {
            return (status::NOT_READY, Vec::new());
        }
        let map = self.map();
        let Some(pg) = map.pools.get(&h.pool_id).and_then(|p| p.pgs.get(h.pg_id as usize)) else {
            self.refresh.notify_one();
            return (status::MAP_BEHIND, Vec::new());
        };
        if h.pg_epoch < pg.epoch {
            return (status::STALE_EPOCH, Vec::new());
        }
        if h.pg_epoch > pg.epoch {
            self.refresh.notify_one();
            return (status::MAP_BEHIND, Vec::new());
        }
        let Some(local) = pg.replicas.iter().skip(1).find(|r| r.sds_id == map.sds_id) else {
            return (status::WRONG_ROLE, Vec::new());
        };
        let Some(dev) = self.device(local.device_id) else { return (status::IO_ERROR, Vec::new()) };
        let keys = dev.extents_of_pg(h.pg_id);
        let mut out = Vec::with_capacity(keys.len() * 16);
        for k in keys {
            out.extend_from_slice(&k.volume_id.to_le_bytes());
            out.extend_from_slice(&k.extent_index.to_le_bytes());
        }
        (status::OK, out)
    }

    async fn extent_checksum(self: &Arc<Self>, payload: &[u8]) -> (u32, Vec<u8>) {
        let Some(mut h) = IoHeader::decode(payload) else { return (status::INVALID, Vec::new()) };
        h.flags |= flags::LOCAL_ONLY;
        h.offset_in_extent = 0;
        h.length = 0;
        let local = match self.check(&h, false) {
            Ok(Role::Local { local }) | Ok(Role::Primary { local, .. }) => local,
            Err(s) => return (s, Vec::new()),
        };
        let Some(dev) = self.device(local.device_id) else { return (status::IO_ERROR, Vec::new()) };
        let key = ExtentKey { volume_id: h.volume_id, extent_index: h.extent_index };
        match self.device_op(&dev, "checksum", move |d| d.extent_checksum(key)).await {
            Ok(crc) => (status::OK, crc.to_le_bytes().to_vec()),
            Err(e) => (device_status(&e), Vec::new()),
        }
    }
}

/// Serves one authenticated data connection until it closes or sends garbage.
pub async fn serve_connection(sds: Arc<SdsState>, mut stream: TcpStream) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    if let Err(e) = tessera_proto::auth::authenticate_server(&mut stream, &sds.secret).await {
        tracing::warn!(%peer, "data connection refused: {e}");
        return;
    }
    stream.set_nodelay(true).ok();
    let (read_half, write_half) = stream.into_split();
    let replies = spawn_response_writer(write_half);
    let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, read_half);
    // Bounds the requests one connection has in progress (and so the memory it can pin).
    let slots = Arc::new(tokio::sync::Semaphore::new(tessera_proto::rpc::MAX_INFLIGHT_PER_CONNECTION));
    loop {
        let (header, payload) = match read_request(&mut reader).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%peer, "closing data connection: {e}");
                return;
            }
        };
        // A read the page cache serves costs microseconds: answer it here, with no task
        // and no hand-off (which would each cost more than the read).
        if header.kind == kind::READ {
            if let Some((status, body)) = sds.read_inline(&payload) {
                if replies.send(OutFrame::reply(&header, status, body)).await.is_err() {
                    return;
                }
                continue;
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let sds = sds.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let (status, body) = sds.handle(&header, payload).await;
            let _ = replies.send(OutFrame::reply(&header, status, body)).await;
            drop(slot);
        });
    }
}
