//! An SDS device on a real block device: a loop device over a file, added to an SDS the
//! test starts itself next to a one-SDS `tessera up` cluster.

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;

use common::*;

#[test]
fn device_on_a_loop_device() {
    // Declared first, dropped last: the cluster (and its SDS holding the device) stops first.
    let disk = LoopDevice::new();
    let c = Cluster::start_with(1, "1GiB");
    let pool = c.json(&["pool", "show", "default"]);
    assert_eq!(pool["placed"], false, "one SDS cannot hold two copies: {pool:#}");

    let addr = format!("127.0.0.1:{}", c.spare_port(0));
    c.ok(&["sds", "add", "sds-loop", "--pd", "default", "--address", &addr]);
    c.spawn_daemon("sds-loop", &["sds", "--name", "sds-loop", "--listen", &addr]);
    c.ok(&["device", "add", "--sds", "sds-loop", "--pool", "default", "--path", &disk.device]);
    poll("the loop device to be in service and the pool placed", POLL_TIMEOUT, || {
        assert!(c.extra_daemon_running("sds-loop"), "sds-loop exited: {}", c.log_tail("sds-loop", 20));
        let pool = c.json(&["pool", "show", "default"]);
        let status = c.status();
        let all_up = status["sdss"].as_array().is_some_and(|s| s.len() == 2 && s.iter().all(|x| x["state"] == "up"));
        (pool["placed"] == true && all_up && status["pgs"]["healthy_pgs"].as_u64() == Some(256)).then_some(())
    });
    let devices = c.json(&["device", "list"]);
    let loop_dev = devices
        .as_array()
        .and_then(|d| d.iter().find(|x| x["path"] == disk.device.as_str()))
        .unwrap_or_else(|| panic!("loop device missing from {devices:#}"))
        .clone();
    assert_eq!(loop_dev["state"], "Normal", "{loop_dev}");
    let capacity = loop_dev["capacity_bytes"].as_u64().expect("capacity");
    assert!(capacity > 400 * MIB && capacity <= 512 * MIB, "capacity of a 512 MiB loop device: {capacity}");
    // The SDS formatted the block device itself.
    let mut magic = [0u8; 8];
    std::fs::File::open(&disk.device).and_then(|mut f| f.read_exact(&mut magic)).expect("reading the loop device");
    assert_eq!(&magic, b"TESSDEV1", "superblock on the loop device");

    let blocks_before = std::fs::metadata(&disk.backing).expect("backing file").blocks() * 512;
    let uri = c.volume("onloop", "256MiB");
    let input = c.dir.join("in.raw");
    let data = random_file(&input, 0x5eed_0501, (128 * MIB) as usize);
    tool_ok("nbdcopy", &["--flush", input.to_str().unwrap(), &uri]);
    let output = c.dir.join("out.raw");
    tool_ok("nbdcopy", &[&uri, output.to_str().unwrap()]);
    let back = std::fs::read(&output).expect("read back");
    assert_same_bytes("data through a loop-device copy", &data, &back[..data.len()]);
    assert_zeros("unwritten tail", &back[data.len()..]);
    let report = c.verify("onloop");
    assert_eq!(report["extents_checked"].as_u64(), Some(128), "{report}");

    // With two SDSs every extent has a copy on the loop device: its backing file filled up.
    let grown = std::fs::metadata(&disk.backing).expect("backing file").blocks() * 512 - blocks_before;
    assert!(grown >= 128 * MIB, "the loop device's backing file grew by only {grown} bytes for 128 MiB of extents");
}
