//! Disk faults injected under real SDS processes: power cuts that lose a disk's volatile
//! cache, fdatasync errors, hung devices, torn write-back.
//!
//! Every SDS of these tests is the test's own and keeps its devices on a crash disk
//! (`tessera-crashdisk`, a FUSE file system whose files behave like disks with a volatile
//! write cache; see docs/crashdisk.md). A power cut is: SIGKILL every SDS that uses the disk,
//! then cut the disk's cache, then start the SDSs again with the same names and addresses.
//! The NBD client is `common::nbd_client`, synchronous, so a test knows exactly which writes
//! were acknowledged before which flush (nbdcopy and fio cannot say).

mod common;

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::nbd_client::NbdClient;
use common::*;
use tessera_crashdisk::{CrashDisk, FaultOp};

/// One block of the tests' writes.
const BLOCK_BYTES: usize = 4096;
/// Sector the crash disk tears at.
const SECTOR_BYTES: usize = 512;
/// Size of each device file on the crash disk.
const DEVICE_BYTES: u64 = GIB;
/// The volume every test writes.
const VOLUME_BYTES: u64 = 64 * MIB;
/// How long a cluster may take to become healthy again (back-fill after a cut or failure).
const HEAL_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a test holds a device hung when the device must survive it: well below the
/// SDS's 5 s device deadline (`tessera_sds::server::DEVICE_OP_DEADLINE`).
const SHORT_HANG: Duration = Duration::from_secs(1);
/// Longest wait for an NBD request the test expects to complete (the SDC retries for 60 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Number of PGs in the pool `tessera up` creates.
const PG_COUNT: u64 = 256;

// ---------------------------------------------------------------------------------------
// Fixtures

/// A crash disk in its own directory; stopped (and the directory removed) on drop. Declare
/// it before the [`Cluster`] so the SDSs using it stop first.
struct CrashDir {
    dir: PathBuf,
    disk: CrashDisk,
}

impl CrashDir {
    fn start() -> CrashDir {
        let dir = fresh_dir("crashdisk");
        let backing = dir.join("backing");
        let mount = dir.join("mnt");
        std::fs::create_dir_all(&backing).expect("backing dir");
        std::fs::create_dir_all(&mount).expect("mount dir");
        let disk = CrashDisk::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_tessera-crashdisk")),
            &backing,
            &mount,
            &dir.join("control.sock"),
        )
        .unwrap_or_else(|e| panic!("starting the crash disk: {e}"));
        CrashDir { dir, disk }
    }

    /// Creates a device file of [`DEVICE_BYTES`] in the mount; returns its path.
    fn device_file(&self, name: &str) -> String {
        let path = self.disk.path(name);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(DEVICE_BYTES))
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        path.to_str().expect("UTF-8 path").to_string()
    }
}

impl Drop for CrashDir {
    fn drop(&mut self) {
        self.disk.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An SDS the test runs itself, with its devices on the crash disk.
struct Sds {
    name: String,
    addr: String,
    /// Device file names in the crash disk's mount.
    files: Vec<String>,
    /// Role id of the running process (a new one per restart, so each has its own log).
    role: String,
    restarts: u32,
}

impl Sds {
    /// Registers SDS `name` on spare port `port_index`, starts it and adds a device per file.
    fn add(c: &Cluster, disk: &CrashDir, name: &str, port_index: u16, files: &[&str]) -> Sds {
        let addr = format!("127.0.0.1:{}", c.spare_port(port_index));
        c.ok(&["sds", "add", name, "--pd", "default", "--address", &addr]);
        c.spawn_daemon(name, &["sds", "--name", name, "--listen", &addr]);
        for file in files {
            let path = disk.device_file(file);
            c.ok(&["device", "add", "--sds", name, "--pool", "default", "--path", &path]);
        }
        Sds {
            name: name.to_string(),
            addr,
            files: files.iter().map(|f| f.to_string()).collect(),
            role: name.to_string(),
            restarts: 0,
        }
    }

    fn kill(&self, c: &Cluster) {
        c.kill_daemon(&self.role);
    }

    /// Starts the SDS again after its power cut: same name, same address, a new process,
    /// log and boot.
    fn restart(&mut self, c: &Cluster) {
        self.restarts += 1;
        self.role = format!("{}-r{}", self.name, self.restarts);
        c.restart_sds_after_power_cut(&self.role, &self.name, &self.addr);
    }

    fn assert_running(&self, c: &Cluster) {
        assert!(c.extra_daemon_running(&self.role), "{} exited:\n{}", self.role, c.log_tail(&self.role, 30));
    }

    /// How many devices the current process has put into service (its log says so).
    fn devices_in_service(&self, c: &Cluster) -> usize {
        std::fs::read_to_string(c.dir.join(format!("{}.log", self.role)))
            .unwrap_or_default()
            .matches("device in service")
            .count()
    }
}

/// Every device as `(path, state)`.
fn device_states(c: &Cluster) -> Vec<(String, String)> {
    let devices = c.json(&["device", "list"]);
    devices
        .as_array()
        .unwrap_or_else(|| panic!("device list is not an array: {devices:#}"))
        .iter()
        .map(|d| {
            (d["path"].as_str().unwrap_or_default().to_string(), d["state"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

fn device_state(c: &Cluster, disk: &CrashDir, file: &str) -> String {
    let path = disk.disk.path(file).to_str().expect("UTF-8 path").to_string();
    device_states(c)
        .into_iter()
        .find(|(p, _)| *p == path)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("device {path} missing from device list"))
}

fn sds_state(status: &serde_json::Value, name: &str) -> String {
    status["sdss"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["name"] == name))
        .and_then(|x| x["state"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn healthy(status: &serde_json::Value) -> bool {
    status["pgs"]["healthy_pgs"].as_u64() == Some(PG_COUNT) && status["rebuild"]["pgs_rebuilding"].as_u64() == Some(0)
}

/// Waits until every SDS runs, is up, has every device that is not `Failed` in service
/// (after a restart that means its suspect copies were reported and settled), and every
/// PG is healthy with nothing rebuilding.
fn wait_ready(c: &Cluster, disk: &CrashDir, sdss: &[Sds]) {
    poll("every SDS up with its devices in service and every PG healthy", HEAL_TIMEOUT, || {
        let states = device_states(c);
        let status = c.status();
        for s in sdss {
            s.assert_running(c);
            if sds_state(&status, &s.name) != "up" {
                return None;
            }
            let live_devices = s
                .files
                .iter()
                .filter(|f| {
                    let path = disk.disk.path(f).to_str().expect("UTF-8 path").to_string();
                    states.iter().any(|(p, st)| *p == path && st != "Failed")
                })
                .count();
            if s.devices_in_service(c) < live_devices {
                return None;
            }
        }
        healthy(&status).then_some(())
    });
}

/// Initial bring-up: every device `Normal`, then [`wait_ready`].
fn wait_all_normal(c: &Cluster, disk: &CrashDir, sdss: &[Sds]) {
    let device_count: usize = sdss.iter().map(|s| s.files.len()).sum();
    poll("every device Normal", HEAL_TIMEOUT, || {
        for s in sdss {
            s.assert_running(c);
        }
        let states = device_states(c);
        (states.len() == device_count && states.iter().all(|(_, s)| s == "Normal")).then_some(())
    });
    wait_ready(c, disk, sdss);
}

/// A power cut of every SDS: SIGKILL them all, cut the crash disk's cache with `cut`, start
/// them again and wait until the cluster is healthy.
fn power_cut(c: &Cluster, disk: &CrashDir, sdss: &mut [Sds], cut: impl FnOnce(&CrashDisk)) {
    for s in sdss.iter() {
        s.kill(c);
    }
    cut(&disk.disk);
    for s in sdss.iter_mut() {
        s.restart(c);
    }
    wait_ready(c, disk, sdss);
}

/// A cluster of an MDM and an SDC and no SDS (`up --sds 0`), with the protection domain and
/// pool `default` that `up` would have created (spare as `up` sets it for three SDSs).
fn cluster_without_sds() -> Cluster {
    let c = Cluster::start_with(0, "1GiB");
    c.ok(&["pd", "create", "default"]);
    c.ok(&["pool", "create", "default", "--pd", "default", "--spare-percent", "34"]);
    c
}

/// Three SDSs with one device each (`d1`, `d2`, `d3`), healthy, and a mapped volume `v`.
fn three_sds_cluster(disk: &CrashDir) -> (Cluster, Vec<Sds>, String) {
    let c = cluster_without_sds();
    let sdss: Vec<Sds> =
        (1..=3).map(|n| Sds::add(&c, disk, &format!("sds-{n}"), n as u16 - 1, &[&format!("d{n}")])).collect();
    wait_all_normal(&c, disk, &sdss);
    let uri = c.volume("v", &format!("{}MiB", VOLUME_BYTES / MIB));
    (c, sdss, uri)
}

// ---------------------------------------------------------------------------------------
// Data

/// A seed for this run (`CRASH_FAULTS_SEED` replays one), printed so a failure can be
/// replayed: it chooses the blocks, their contents and which sectors a torn cut keeps.
fn run_seed(test: &str) -> u64 {
    let seed = std::env::var("CRASH_FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("{test}: seed {seed}");
    seed
}

/// Offset of a 4 KiB block inside extent `extent`, chosen by `seed`.
fn block_in_extent(extent: u64, seed: u64) -> u64 {
    let blocks_per_extent = EXTENT_BYTES / BLOCK_BYTES as u64;
    extent * EXTENT_BYTES + (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % blocks_per_extent * BLOCK_BYTES as u64
}

fn connect(uri: &str) -> NbdClient {
    NbdClient::connect_uri(uri).unwrap_or_else(|e| panic!("connecting to {uri}: {e}"))
}

fn read_block(client: &mut NbdClient, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_BYTES];
    client.read(offset, &mut buf).unwrap_or_else(|e| panic!("reading the block at {offset}: {e}"));
    buf
}

fn pending_ops(disk: &CrashDir, files: &[&str]) -> u64 {
    files.iter().map(|f| disk.disk.stats(f).unwrap_or_else(|e| panic!("stats {f}: {e}")).pending_ops).sum()
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn concurrent_flushes_each_wait_until_their_writes_are_durable() {
    let disk = CrashDir::start();
    let (c, mut sdss, uri) = three_sds_cluster(&disk);
    let seed = run_seed("concurrent_flushes");
    let files = ["d1", "d2", "d3"];

    let (mut a, mut b) = (connect(&uri), connect(&uri));
    let (x, y) = (block_in_extent(5, seed), block_in_extent(41, seed ^ 1));
    let (data_x, data_y) = (random_bytes(seed, BLOCK_BYTES), random_bytes(seed ^ 1, BLOCK_BYTES));
    a.write(x, &data_x, false).unwrap_or_else(|e| panic!("A writing X: {e}"));
    b.write(y, &data_y, false).unwrap_or_else(|e| panic!("B writing Y: {e}"));
    // Both writes are acknowledged but only in the disks' volatile caches.
    assert!(pending_ops(&disk, &files) > 0, "the acknowledged writes are not in any disk's cache");

    // Every disk hangs: no flush can complete until they are released.
    for f in files {
        disk.disk.hang(f).unwrap_or_else(|e| panic!("hang {f}: {e}"));
    }
    let hung_at = Instant::now();
    let (tx, rx) = mpsc::channel();
    let flushers: Vec<_> = [("A", a), ("B", b)]
        .into_iter()
        .map(|(label, mut client)| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let result = client.flush().map_err(|e| e.to_string());
                let _ = tx.send((label, result));
                client
            })
        })
        .collect();
    drop(tx);
    // A flush that returns now promises durability the disks have not given.
    match rx.recv_timeout(SHORT_HANG) {
        Err(RecvTimeoutError::Timeout) => {}
        Ok((label, result)) => panic!(
            "flush {label} returned {result:?} while every disk was hung: it cannot have made its writes durable"
        ),
        Err(RecvTimeoutError::Disconnected) => panic!("a flush thread died"),
    }
    let parked: u64 = files.iter().map(|f| disk.disk.stats(f).expect("stats").parked_ops).sum();
    assert!(parked > 0, "no flush reached a disk while they were hung");
    for f in files {
        disk.disk.release(f).unwrap_or_else(|e| panic!("release {f}: {e}"));
    }
    assert!(hung_at.elapsed() < Duration::from_secs(4), "the disks were hung for {:?}", hung_at.elapsed());
    for _ in 0..2 {
        let (label, result) = rx.recv_timeout(REQUEST_TIMEOUT).expect("both flushes answer once the disks run");
        assert!(result.is_ok(), "flush {label} failed after the disks were released: {result:?}");
    }
    for t in flushers {
        t.join().expect("flush thread");
    }
    // The disks were never failed: the hang was shorter than the device deadline.
    for f in files {
        assert_eq!(device_state(&c, &disk, f), "Normal", "{f} after a short hang");
    }

    power_cut(&c, &disk, &mut sdss, |d| d.cut_all().expect("cut_all"));
    let mut client = connect(&uri);
    assert_same_bytes("block X after the power cut", &data_x, &read_block(&mut client, x));
    assert_same_bytes("block Y after the power cut", &data_y, &read_block(&mut client, y));
    c.verify("v");
}

#[test]
fn fua_writes_survive_a_power_cut_without_flush() {
    let disk = CrashDir::start();
    let (c, mut sdss, uri) = three_sds_cluster(&disk);
    let seed = run_seed("fua_writes");

    let mut client = connect(&uri);
    let fua_blocks: Vec<(u64, Vec<u8>)> =
        (0..8u64).map(|i| (block_in_extent(i * 7 + 1, seed ^ i), random_bytes(seed ^ (i << 8), BLOCK_BYTES))).collect();
    for (offset, data) in &fua_blocks {
        client.write(*offset, data, true).unwrap_or_else(|e| panic!("FUA write at {offset}: {e}"));
    }
    // The control: a plain write, never flushed, which the cut may take.
    let plain = block_in_extent(60, seed ^ 0xFF);
    let plain_data = random_bytes(seed ^ 0xFFFF, BLOCK_BYTES);
    client.write(plain, &plain_data, false).unwrap_or_else(|e| panic!("plain write: {e}"));
    drop(client);

    power_cut(&c, &disk, &mut sdss, |d| d.cut_all().expect("cut_all"));
    let mut client = connect(&uri);
    for (offset, data) in &fua_blocks {
        assert_same_bytes(
            &format!("FUA block at {offset} after the power cut"),
            data,
            &read_block(&mut client, *offset),
        );
    }
    // Lost or kept, the unflushed block is one or the other, never a mixture or garbage.
    let back = read_block(&mut client, plain);
    let kept = back == plain_data;
    assert!(kept || back.iter().all(|b| *b == 0), "the unflushed plain block is neither its old nor its new content");
    eprintln!("the unflushed plain write was {}", if kept { "kept" } else { "lost" });
    c.verify("v");
}

#[test]
fn eio_on_fdatasync_fails_the_device_and_no_flush_lies() {
    let disk = CrashDir::start();
    let (c, mut sdss, uri) = three_sds_cluster(&disk);
    let seed = run_seed("eio_on_fdatasync");

    // One block in every extent: each SDS holds copies of about two thirds of them.
    let mut client = connect(&uri);
    let blocks: Vec<(u64, Vec<u8>)> = (0..VOLUME_BYTES / EXTENT_BYTES)
        .map(|e| (block_in_extent(e, seed ^ e), random_bytes(seed.wrapping_add(e), BLOCK_BYTES)))
        .collect();
    for (offset, data) in &blocks {
        client.write(*offset, data, false).unwrap_or_else(|e| panic!("write at {offset}: {e}"));
    }
    assert!(pending_ops(&disk, &["d2"]) > 0, "d2 holds no unflushed write: the fault would test nothing");

    // d2's next fdatasync fails, and the crash disk drops what it held (a write-back error).
    disk.disk.fail("d2", FaultOp::Flush, true).expect("fail d2 flush once");
    let first = client.flush();
    eprintln!("flush over the failing fdatasync: {first:?}");
    poll("d2 to be Failed", HEAL_TIMEOUT, || (device_state(&c, &disk, "d2") == "Failed").then_some(()));
    assert!(disk.disk.stats("d2").expect("stats d2").failed_ops > 0, "the injected fdatasync error never fired");
    if let Err(e) = first {
        // Honest: now that the device is out, a flush must succeed from the other copies.
        eprintln!("the first flush failed ({e}); flushing again");
        client.flush().unwrap_or_else(|e| panic!("a flush after d2 was failed: {e}"));
    }
    drop(client);

    // Every write acknowledged before the successful flush must outlive a power cut.
    power_cut(&c, &disk, &mut sdss, |d| d.cut_all().expect("cut_all"));
    assert_eq!(device_state(&c, &disk, "d2"), "Failed", "a failed device stays failed");
    let mut client = connect(&uri);
    for (offset, data) in &blocks {
        assert_same_bytes(&format!("block at {offset} after the power cut"), data, &read_block(&mut client, *offset));
    }
    c.verify("v");
}

#[test]
fn a_hung_device_is_failed_and_io_continues_on_the_other_copy() {
    let disk = CrashDir::start();
    let c = cluster_without_sds();
    let sdss = vec![
        Sds::add(&c, &disk, "sds-a", 0, &["da", "db"]),
        Sds::add(&c, &disk, "sds-b", 1, &["dc"]),
        Sds::add(&c, &disk, "sds-c", 2, &["dd"]),
    ];
    wait_all_normal(&c, &disk, &sdss);
    let uri = c.volume("v", &format!("{}MiB", VOLUME_BYTES / MIB));
    let seed = run_seed("hung_device");

    let chunk = 256 * KIB as usize;
    let first = random_bytes(seed, VOLUME_BYTES as usize);
    let mut client = connect(&uri);
    for (i, piece) in first.chunks(chunk).enumerate() {
        client.write((i * chunk) as u64, piece, false).unwrap_or_else(|e| panic!("first write {i}: {e}"));
    }
    client.flush().expect("flushing the first generation");

    // da hangs for good: every op on it parks.
    disk.disk.hang("da").expect("hang da");
    let second = random_bytes(seed ^ 0x5EC0, VOLUME_BYTES as usize);
    let started = Instant::now();
    // Four connections at once, a quarter of the volume each.
    let quarter = second.len() / 4;
    let writers: Vec<_> = (0..4)
        .map(|q| {
            let (uri, part) = (uri.clone(), second[q * quarter..(q + 1) * quarter].to_vec());
            std::thread::spawn(move || {
                let mut client = connect(&uri);
                for (i, piece) in part.chunks(chunk).enumerate() {
                    let offset = (q * quarter + i * chunk) as u64;
                    client.write(offset, piece, false).map_err(|e| format!("write at {offset}: {e}"))?;
                }
                client.flush().map_err(|e| format!("flush: {e}"))
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread").unwrap_or_else(|e| panic!("IO with da hung: {e}"));
    }
    eprintln!("rewrote the volume with da hung in {:?}", started.elapsed());
    let back = client.read_all().unwrap_or_else(|e| panic!("reading the volume with da hung: {e}"));
    assert_same_bytes("the volume read back with da hung", &second, &back);

    poll("da to be Failed", HEAL_TIMEOUT, || (device_state(&c, &disk, "da") == "Failed").then_some(()));
    assert!(disk.disk.stats("da").expect("stats da").hung, "da is still hung");
    // The SDS is not its device: it stays up and serves its other device.
    assert_eq!(device_state(&c, &disk, "db"), "Normal", "the hung device's sibling");
    assert_eq!(sds_state(&c.status(), "sds-a"), "up", "the SDS of the hung device stays up");
    sdss[0].assert_running(&c);

    wait_ready(&c, &disk, &sdss);
    assert_eq!(device_state(&c, &disk, "db"), "Normal", "the hung device's sibling once healthy");
    let back = client.read_all().unwrap_or_else(|e| panic!("reading the volume once healthy: {e}"));
    assert_same_bytes("the volume once healthy", &second, &back);
    // Verify reads every copy through its SDS: those on db through sds-a, whose other
    // device has been hung all along.
    let report = c.verify("v");
    assert_eq!(report["extents_with_one_copy"].as_u64(), Some(0), "every extent has two copies: {report:#}");
    sdss[0].assert_running(&c);
    drop(client);
    disk.disk.release("da").expect("release da");
}

#[test]
fn an_idle_hung_device_is_failed_without_client_io() {
    // No client IO reaches the device once it hangs: only the SDS's own background device
    // operations (write-intent cleaning, the probe) can find it, and they run under the
    // device deadline like every other.
    let disk = CrashDir::start();
    let (c, sdss, uri) = three_sds_cluster(&disk);
    let seed = run_seed("idle_hung_device");
    let mut client = connect(&uri);
    let data = random_bytes(seed, 4 * MIB as usize);
    client.write(0, &data, false).expect("write");
    client.flush().expect("flush");

    disk.disk.hang("d1").expect("hang d1");
    poll("the idle hung d1 to be Failed", HEAL_TIMEOUT, || (device_state(&c, &disk, "d1") == "Failed").then_some(()));
    assert_eq!(sds_state(&c.status(), "sds-1"), "up", "the SDS of the hung device stays up");
    sdss[0].assert_running(&c);
    wait_ready(&c, &disk, &sdss);
    let mut back = vec![0u8; data.len()];
    client.read(0, &mut back).expect("reading back once healthy");
    assert_same_bytes("data once healthy", &data, &back);
    c.verify("v");
    drop(client);
    disk.disk.release("d1").expect("release d1");
}

#[test]
fn torn_last_writes_leave_every_block_old_or_new() {
    let disk = CrashDir::start();
    let (c, mut sdss, uri) = three_sds_cluster(&disk);
    let seed = run_seed("torn_last_writes");

    // Old content, made durable; then new content over it and into never-written extents
    // (whose old content is zeros), never flushed.
    let mut client = connect(&uri);
    let written: Vec<u64> = (0..16u64).map(|e| block_in_extent(e * 2, seed ^ e)).collect();
    let fresh: Vec<u64> = (0..16u64).map(|e| block_in_extent(e * 2 + 33, seed ^ (e << 4))).collect();
    let mut blocks: Vec<(u64, Vec<u8>, Vec<u8>)> = Vec::new();
    for (i, &offset) in written.iter().enumerate() {
        let old = random_bytes(seed.wrapping_add(i as u64), BLOCK_BYTES);
        client.write(offset, &old, false).unwrap_or_else(|e| panic!("old write at {offset}: {e}"));
        blocks.push((offset, old, random_bytes(seed.wrapping_add(1000 + i as u64), BLOCK_BYTES)));
    }
    client.flush().expect("flushing the old content");
    // Fresh extents first: allocating one makes its slot record and write intent durable,
    // which syncs everything written before it; the overwrites after them stay in the cache.
    let fresh_blocks = fresh.iter().enumerate().map(|(i, &offset)| {
        (offset, vec![0u8; BLOCK_BYTES], random_bytes(seed.wrapping_add(2000 + i as u64), BLOCK_BYTES))
    });
    blocks.splice(0..0, fresh_blocks);
    for (offset, _, new) in &blocks {
        client.write(*offset, new, false).unwrap_or_else(|e| panic!("new write at {offset}: {e}"));
    }
    drop(client);

    power_cut(&c, &disk, &mut sdss, |d| d.cut_torn("*", seed).expect("cut_torn"));
    let mut client = connect(&uri);
    let (mut old_sectors, mut new_sectors, mut mixed_blocks) = (0, 0, 0);
    for (offset, old, new) in &blocks {
        let back = read_block(&mut client, *offset);
        mixed_blocks += usize::from(back != *old && back != *new);
        for s in 0..BLOCK_BYTES / SECTOR_BYTES {
            let range = s * SECTOR_BYTES..(s + 1) * SECTOR_BYTES;
            if back[range.clone()] == new[range.clone()] {
                new_sectors += 1;
            } else if back[range.clone()] == old[range.clone()] {
                old_sectors += 1;
            } else {
                panic!("sector {s} of the block at {offset} is neither its old nor its new content (seed {seed})");
            }
        }
    }
    eprintln!("after the torn cut: {old_sectors} sectors old, {new_sectors} new, {mixed_blocks} blocks mixed");
    c.verify("v");
}
