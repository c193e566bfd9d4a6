//! Devices are known by their superblock, never by their path alone: a blank disk at a
//! registered path is never formatted and served as a copy, devices that moved or swapped
//! are found and opened where they are, and opening or formatting a huge device never costs
//! its SDS the lease.
//!
//! Real processes (`tessera up`, file-backed devices); an SDS is stopped with SIGKILL and
//! restarted by the test, with the same name and address, within its lease.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Devices as `tessera device ls --json` lists them.
fn devices(c: &Cluster) -> Vec<Value> {
    c.json(&["device", "list"]).as_array().cloned().expect("device list is an array")
}

fn device_by_id(c: &Cluster, id: u64) -> Value {
    devices(c).into_iter().find(|d| d["id"] == id).unwrap_or_else(|| panic!("device {id} is not listed"))
}

fn device_id_at(c: &Cluster, path: &Path) -> u64 {
    let path = path.display().to_string();
    devices(c)
        .iter()
        .find(|d| d["path"] == path.as_str())
        .and_then(|d| d["id"].as_u64())
        .unwrap_or_else(|| panic!("no device at {path}"))
}

/// The device file `up` made for SDS `n`.
fn disk_of(c: &Cluster, n: u32) -> PathBuf {
    c.dir.join(format!("sds-{n}")).join("disk0.img")
}

/// SIGKILLs SDS `n` (started by `up`) and waits until it is gone.
fn kill_sds(c: &Cluster, n: u32) {
    let pid = c.pid(&format!("sds-{n}"));
    // SAFETY: a plain signal to a pid this cluster's `up` started and recorded.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    poll("the SDS to exit", POLL_TIMEOUT, || (!pid_alive(pid)).then_some(()));
    // The thread-group leader shows as a zombie while other threads (one in a device
    // sync, say) still exit and hold the process's sockets: wait for its port too.
    let addr = c.sds_addr(n);
    poll("the SDS's port to be free", POLL_TIMEOUT, || std::net::TcpListener::bind(&addr).ok().map(drop));
}

/// Starts SDS `n` again, under the test (its log: `DIR/<role>.log`); returns the role id.
fn restart_sds(c: &Cluster, n: u32) -> String {
    let role = format!("sds-{n}-again");
    c.spawn_daemon(&role, &["sds", "--name", &format!("sds-{n}"), "--listen", &c.sds_addr(n)]);
    role
}

/// Every SDS up, as the MDM sees it.
fn all_sdss_up(c: &Cluster) -> bool {
    c.status()["sdss"].as_array().is_some_and(|v| !v.is_empty() && v.iter().all(|x| x["state"] == "up"))
}

fn healthy(c: &Cluster) -> bool {
    let s = c.status();
    s["pgs"]["healthy_pgs"].as_u64() == Some(256) && s["rebuild"]["pgs_rebuilding"].as_u64() == Some(0)
}

/// Writes `len` random bytes at the start of the volume behind `uri`; returns them.
fn write_data(c: &Cluster, uri: &str, label: &str, seed: u64, len: usize) -> Vec<u8> {
    let file = c.dir.join(format!("{label}.raw"));
    let data = random_file(&file, seed, len);
    tool_ok("nbdcopy", &["--flush", file.to_str().unwrap(), uri]);
    data
}

/// Reads the volume behind `uri` back and checks that it starts with `expected`.
fn assert_reads_back(c: &Cluster, uri: &str, label: &str, expected: &[u8]) {
    let out = c.dir.join(format!("{label}-back.raw"));
    tool_ok("nbdcopy", &[uri, out.to_str().unwrap()]);
    let back = std::fs::read(&out).expect("reading back");
    assert_same_bytes(label, expected, &back[..expected.len()]);
    let _ = std::fs::remove_file(out);
}

fn has_tessera_magic(path: &Path) -> bool {
    let bytes = std::fs::read(path).map(|b| b.get(..8).map(<[u8]>::to_vec)).ok().flatten();
    bytes.as_deref() == Some(b"TESSDEV1".as_slice())
}

/// True when the first 4 KiB of `path` are zero (no superblock was written).
fn first_block_is_zero(path: &Path) -> bool {
    use std::io::Read;
    let mut block = vec![0u8; 4096];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut block)).expect("reading the device file");
    block.iter().all(|b| *b == 0)
}

/// Adds a second 2 GiB file-backed device to SDS `n` before any volume exists (so the pool's
/// placement uses it); returns its path once it is in service.
fn add_second_device(c: &Cluster, n: u32) -> PathBuf {
    let path = c.dir.join(format!("sds-{n}")).join("disk1.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(2 * GIB)).expect("creating the second device");
    let text = path.display().to_string();
    c.ok(&["device", "add", "--sds", &format!("sds-{n}"), "--pool", "default", "--path", &text]);
    poll("the second device in service", POLL_TIMEOUT, || {
        let id = device_id_at(c, &path);
        (device_by_id(c, id)["state"] == "Normal").then_some(())
    });
    path
}

#[test]
fn blank_disk_at_a_registered_path_is_not_formatted() {
    let c = Cluster::start(3);
    let uri = c.volume("v", "256MiB");
    let data = write_data(&c, &uri, "first", 0x1D_0001, (64 * MIB) as usize);
    let disk = disk_of(&c, 1);
    let id = device_id_at(&c, &disk);
    assert!(has_tessera_magic(&disk));

    // The disk is swapped for a blank one of the same size while its SDS is down: the
    // situation a moved `/dev/sdX` name creates at boot.
    kill_sds(&c, 1);
    let size = std::fs::metadata(&disk).expect("device file").len();
    std::fs::remove_file(&disk).expect("removing the device file");
    std::fs::File::create(&disk).and_then(|f| f.set_len(size)).expect("creating the blank file");
    let role = restart_sds(&c, 1);

    poll("the blank device to be failed", Duration::from_secs(60), || {
        assert!(c.extra_daemon_running(&role), "the SDS exited: {}", c.log_tail(&role, 20));
        (device_by_id(&c, id)["state"] == "Failed").then_some(())
    });
    assert!(first_block_is_zero(&disk), "the blank file at a registered path was written to (formatted?)");
    let log = std::fs::read_to_string(c.dir.join(format!("{role}.log"))).unwrap_or_default();
    assert!(log.contains("never formatting a device in service"), "the SDS says why: {}", c.log_tail(&role, 20));
    // The SDS itself stays up and serves its copies of nothing; the data comes from the others.
    assert!(c.extra_daemon_running(&role));
    assert_reads_back(&c, &uri, "after the blank disk", &data);
    poll("every PG healthy again", Duration::from_secs(90), || healthy(&c).then_some(()));
    assert!(first_block_is_zero(&disk), "still never formatted");
    c.verify("v");
}

#[test]
fn swapped_devices_are_recognised() {
    let c = Cluster::start(3);
    let first = disk_of(&c, 1);
    let second = add_second_device(&c, 1);
    let (id_first, id_second) = (device_id_at(&c, &first), device_id_at(&c, &second));
    let uri = c.volume("v", "256MiB");
    let data = write_data(&c, &uri, "first", 0x1D_0002, (96 * MIB) as usize);

    kill_sds(&c, 1);
    let aside = first.with_extension("aside");
    std::fs::rename(&first, &aside).expect("rename");
    std::fs::rename(&second, &first).expect("rename");
    std::fs::rename(&aside, &second).expect("rename");
    let role = restart_sds(&c, 1);

    poll("both devices found where they now are", Duration::from_secs(60), || {
        assert!(c.extra_daemon_running(&role), "the SDS exited: {}", c.log_tail(&role, 20));
        let (a, b) = (device_by_id(&c, id_first), device_by_id(&c, id_second));
        for d in [&a, &b] {
            assert_ne!(d["state"], "Failed", "a swapped device was failed: {d}");
        }
        let moved = a["path"] == second.display().to_string() && b["path"] == first.display().to_string();
        (moved && a["state"] == "Normal" && b["state"] == "Normal").then_some(())
    });
    let log = std::fs::read_to_string(c.dir.join(format!("{role}.log"))).unwrap_or_default();
    assert!(log.contains(&format!("device {id_first} moved: found at {}", second.display())), "{log}");
    assert!(!log.contains("formatting it"), "nothing may be formatted: {log}");
    assert!(has_tessera_magic(&first) && has_tessera_magic(&second));
    assert_reads_back(&c, &uri, "after the swap", &data);
    poll("every PG healthy", Duration::from_secs(60), || healthy(&c).then_some(()));
    assert!(devices(&c).iter().all(|d| d["state"] == "Normal"), "no device failed: {:#?}", devices(&c));
    c.verify("v");
}

#[test]
fn moved_device_is_found_at_its_new_path() {
    let c = Cluster::start(3);
    let uri = c.volume("v", "256MiB");
    let data = write_data(&c, &uri, "first", 0x1D_0003, (64 * MIB) as usize);
    let disk = disk_of(&c, 2);
    let id = device_id_at(&c, &disk);

    kill_sds(&c, 2);
    let renamed = disk.with_file_name("renamed-disk.img");
    std::fs::rename(&disk, &renamed).expect("rename");
    let role = restart_sds(&c, 2);

    poll("the device found at its new path", Duration::from_secs(60), || {
        assert!(c.extra_daemon_running(&role), "the SDS exited: {}", c.log_tail(&role, 20));
        let d = device_by_id(&c, id);
        assert_ne!(d["state"], "Failed", "the moved device was failed: {d}");
        (d["path"] == renamed.display().to_string() && d["state"] == "Normal").then_some(())
    });
    assert!(!disk.exists(), "nothing was created at the old path");
    let log = std::fs::read_to_string(c.dir.join(format!("{role}.log"))).unwrap_or_default();
    assert!(log.contains(&format!("device {id} moved: found at {} (was {})", renamed.display(), disk.display())));
    // Files have no stable name.
    assert_eq!(device_by_id(&c, id)["stable_path"], Value::Null);
    assert_reads_back(&c, &uri, "after the move", &data);
    poll("every PG healthy", Duration::from_secs(60), || healthy(&c).then_some(()));
    c.verify("v");
}

/// 16 TiB: 2^24 slots of 1 MiB, the device layer's limit; its slot table is 1 GiB.
const HUGE_DEVICE_BYTES: u64 = 16 << 40;
/// ext4 (4 KiB blocks) caps a file one block short of 16 TiB.
const EXT4_MAX_FILE_BYTES: u64 = HUGE_DEVICE_BYTES - 4096;

#[test]
fn huge_sparse_device_added_without_losing_the_lease() {
    let c = Cluster::start(3);
    let uri = c.volume("v", "256MiB");
    let mut data = write_data(&c, &uri, "first", 0x1D_0004, (16 * MIB) as usize);

    let huge = c.dir.join("sds-1").join("huge.img");
    let file = std::fs::File::create(&huge).expect("creating the huge file");
    let size = match file.set_len(HUGE_DEVICE_BYTES) {
        Ok(()) => HUGE_DEVICE_BYTES,
        Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
            file.set_len(EXT4_MAX_FILE_BYTES).expect("a sparse file of 16 TiB less one block");
            EXT4_MAX_FILE_BYTES
        }
        Err(e) => panic!("the temporary directory cannot hold a 16 TiB sparse file: {e}"),
    };
    drop(file);
    eprintln!("huge device: {size} bytes at {}", huge.display());
    let text = huge.display().to_string();
    let added = Instant::now();
    c.ok(&["device", "add", "--sds", "sds-1", "--pool", "default", "--path", &text]);
    let id = device_id_at(&c, &huge);

    // While it formats and opens, every SDS stays up and IO keeps working.
    let mut round = 0u64;
    poll("the huge device in service", Duration::from_secs(300), || {
        c.assert_alive("sds-1");
        assert!(all_sdss_up(&c), "an SDS lost its lease while a device opened: {:#}", c.status()["sdss"]);
        round += 1;
        if round.is_multiple_of(10) {
            data = write_data(&c, &uri, "again", 0x1D_0100 + round, (4 * MIB) as usize);
            assert_reads_back(&c, &uri, "during the open", &data);
        }
        let d = device_by_id(&c, id);
        assert_ne!(d["state"], "Failed", "{d}");
        (d["state"] == "Normal").then_some(())
    });
    eprintln!("huge device in service after {:?} ({round} polls)", added.elapsed());
    assert!(all_sdss_up(&c));
    let capacity = device_by_id(&c, id)["capacity_bytes"].as_u64().unwrap_or(0);
    assert!(capacity > 15 << 40, "capacity {capacity} of a 16 TiB device");
    assert_reads_back(&c, &uri, "after the open", &data);
}
