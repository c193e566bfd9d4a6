//! Durability across restarts: an orderly `tessera down` / `up`, and `kill -9` of every
//! daemon at once.

mod common;

use std::time::Duration;

use common::*;

fn write_flushed(c: &Cluster, uri: &str, name: &str, seed: u64, len: u64) -> Vec<u8> {
    let path = c.dir.join(name);
    let data = random_file(&path, seed, len as usize);
    // --flush: nbdcopy ends with NBD_CMD_FLUSH, so everything it wrote is acknowledged
    // *and* durable on both copies before it exits.
    tool_ok("nbdcopy", &["--flush", path.to_str().unwrap(), uri]);
    data
}

fn read_back(c: &Cluster, uri: &str, name: &str) -> Vec<u8> {
    let path = c.dir.join(name);
    tool_ok("nbdcopy", &[uri, path.to_str().unwrap()]);
    std::fs::read(&path).expect("read back")
}

#[test]
fn data_survives_restart_of_every_daemon() {
    let c = Cluster::start(3);
    let uri = c.volume("durable", "128MiB");
    let first = write_flushed(&c, &uri, "first.raw", 0x5eed_0401, 64 * MIB);
    let pids: Vec<i32> = c.role_ids().iter().map(|id| c.pid(id)).collect();

    // Orderly stop of everything, then `up` with no layout arguments.
    c.down();
    poll("every daemon to exit after down", POLL_TIMEOUT, || pids.iter().all(|p| !pid_alive(*p)).then_some(()));
    assert!(
        !c.socket().exists() || std::os::unix::net::UnixStream::connect(c.socket()).is_err(),
        "the SDC socket still answers"
    );
    c.up_again();
    c.assert_all_alive();
    let back = read_back(&c, &uri, "first.out");
    assert_same_bytes("data after down/up", &first, &back[..first.len()]);
    assert_zeros("unwritten tail after down/up", &back[first.len()..]);
    c.verify("durable");
    let status = c.status();
    assert_eq!(status["pgs"]["healthy_pgs"].as_u64(), Some(256), "{status:#}");
    assert_eq!(status["volumes"].as_u64(), Some(1), "{status:#}");

    // Overwrite half and extend, flushed; then SIGKILL every daemon at once.
    let second = write_flushed(&c, &uri, "second.raw", 0x5eed_0402, 96 * MIB);
    let pids: Vec<i32> = c.role_ids().iter().map(|id| c.pid(id)).collect();
    for &pid in &pids {
        assert!(pid_alive(pid));
        // Safety: kill(2) on a pid we just read from our own cluster's pid file.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    poll("every daemon to die after SIGKILL", Duration::from_secs(10), || {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    c.up_again();
    c.assert_all_alive();
    let back = read_back(&c, &uri, "second.out");
    assert_same_bytes("flushed data after kill -9 of every daemon", &second, &back[..second.len()]);
    assert_zeros("unwritten tail after kill -9", &back[second.len()..]);
    c.verify("durable");
    // And the cluster still takes writes after the crash.
    let third = write_flushed(&c, &uri, "third.raw", 0x5eed_0403, 16 * MIB);
    let back = read_back(&c, &uri, "third.out");
    assert_same_bytes("write after recovery", &third, &back[..third.len()]);
    assert_same_bytes("older data behind it", &second[third.len()..], &back[third.len()..second.len()]);
}
