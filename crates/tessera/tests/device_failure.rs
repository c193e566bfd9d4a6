//! A device that starts returning EIO is failed and its copies rebuilt elsewhere, without
//! taking its SDS's other work or any acknowledged data with it.
//!
//! The failing device is real: a file served by `nbdkit` through its `error` filter (every
//! request fails with EIO once a trigger file exists) and exposed as a file by `nbdfuse`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

/// `nbdkit file` + `error` filter behind `nbdfuse`: `path` is a file that fails every IO
/// once `trigger` exists. Unmounted and stopped on drop.
struct FaultyDisk {
    dir: PathBuf,
    mount: PathBuf,
    path: PathBuf,
    trigger: PathBuf,
    nbdkit: Child,
    nbdfuse: Child,
}

impl FaultyDisk {
    fn new(size: u64) -> FaultyDisk {
        let dir = fresh_dir("eio");
        let image = dir.join("disk.img");
        std::fs::File::create(&image).and_then(|f| f.set_len(size)).expect("creating the disk image");
        let socket = dir.join("nbdkit.sock");
        let trigger = dir.join("trigger");
        let nbdkit = tool("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["--filter=error", "file"])
            .arg(format!("file={}", image.display()))
            .arg("error-rate=100%")
            .arg(format!("error-file={}", trigger.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nbdkit (run scripts/test.sh to install it)");
        poll("nbdkit's socket", POLL_TIMEOUT, || socket.exists().then_some(()));
        let mount = dir.join("mnt");
        std::fs::create_dir_all(&mount).expect("mount point");
        let path = mount.join("disk");
        let nbdfuse = tool("nbdfuse")
            .arg(&path)
            .arg(format!("nbd+unix:///?socket={}", socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nbdfuse (run scripts/test.sh to install it)");
        poll("the nbdfuse file", POLL_TIMEOUT, || {
            std::fs::metadata(&path).ok().filter(|m| m.len() == size).map(|_| ())
        });
        FaultyDisk { dir, mount, path, trigger, nbdkit, nbdfuse }
    }

    /// From now on every read, write and flush of the device fails with EIO.
    fn fail(&self) {
        std::fs::write(&self.trigger, b"").expect("creating the trigger file");
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        unmount_fuse(&self.mount);
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
        let _ = self.nbdkit.kill();
        let _ = self.nbdkit.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn device_state(c: &Cluster, path: &str) -> String {
    let devices = c.json(&["device", "list"]);
    devices
        .as_array()
        .and_then(|d| d.iter().find(|x| x["path"] == path))
        .map(|d| d["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("device {path} missing from {devices:#}"))
}

#[test]
fn failing_device_is_failed_and_rebuilt() {
    // Declared first, dropped last: the SDS using the device stops before it is unmounted.
    let disk = FaultyDisk::new(GIB);
    let c = Cluster::start_with(2, "1GiB");
    let path = disk.path.display().to_string();

    // A third SDS whose only device is the faulty one, added before any volume exists so the
    // pool's placement spreads copies over all three SDSs.
    let addr = format!("127.0.0.1:{}", c.spare_port(0));
    c.ok(&["sds", "add", "sds-eio", "--pd", "default", "--address", &addr]);
    c.spawn_daemon("sds-eio", &["sds", "--name", "sds-eio", "--listen", &addr]);
    c.ok(&["device", "add", "--sds", "sds-eio", "--pool", "default", "--path", &path]);
    poll("three SDSs up and every PG healthy", POLL_TIMEOUT, || {
        assert!(c.extra_daemon_running("sds-eio"), "sds-eio exited: {}", c.log_tail("sds-eio", 20));
        let s = c.status();
        let up = s["sdss"].as_array().is_some_and(|v| v.len() == 3 && v.iter().all(|x| x["state"] == "up"));
        (up && s["pgs"]["healthy_pgs"].as_u64() == Some(256) && device_state(&c, &path) == "Normal").then_some(())
    });

    let uri = c.volume("v", "256MiB");
    let first = c.dir.join("first.raw");
    let first_data = random_file(&first, 0xE10_0001, (96 * MIB) as usize);
    tool_ok("nbdcopy", &["--flush", first.to_str().unwrap(), &uri]);
    c.verify("v");
    // Usage arrives with the next heartbeat.
    poll("copies on the faulty device", POLL_TIMEOUT, || {
        let sdss = c.json(&["sds", "list"]);
        let used = sdss
            .as_array()
            .and_then(|v| v.iter().find(|x| x["name"] == "sds-eio"))
            .and_then(|x| x["used_bytes"].as_u64())
            .unwrap_or(0);
        (used > 0).then_some(())
    });

    // The device fails. Writes keep succeeding: the SDS reports the device, the MDM re-peers
    // its PGs, and the SDC retries on the new map.
    disk.fail();
    let second = c.dir.join("second.raw");
    let second_data = random_file(&second, 0xE10_0002, (128 * MIB) as usize);
    tool_ok("nbdcopy", &["--flush", second.to_str().unwrap(), &uri]);

    poll("the device to be failed and every PG healthy again", Duration::from_secs(90), || {
        let s = c.status();
        let healthy =
            s["pgs"]["healthy_pgs"].as_u64() == Some(256) && s["rebuild"]["pgs_rebuilding"].as_u64() == Some(0);
        (healthy && device_state(&c, &path) == "Failed").then_some(())
    });
    // Its SDS stays up: a device failure is not an SDS failure.
    let s = c.status();
    let eio = s["sdss"].as_array().and_then(|v| v.iter().find(|x| x["name"] == "sds-eio")).cloned().unwrap_or_default();
    assert_eq!(eio["state"], "up", "the SDS of the failed device stays up: {eio}");
    assert!(c.extra_daemon_running("sds-eio"));

    let out = c.dir.join("out.raw");
    tool_ok("nbdcopy", &[&uri, out.to_str().unwrap()]);
    let back = std::fs::read(&out).expect("reading back");
    assert_same_bytes("data written after the failure", &second_data, &back[..second_data.len()]);
    assert_same_bytes(
        "data written before the failure, beyond the second write",
        &first_data[second_data.len().min(first_data.len())..],
        &back[second_data.len().min(first_data.len())..first_data.len()],
    );
    c.verify("v");
}
