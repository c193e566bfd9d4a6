//! Surviving failures, against real daemons on loopback and real NBD clients (fio, nbdcopy,
//! qemu-img): an SDS killed (SIGKILL) or stalled (SIGSTOP) under writes, a second SDS lost
//! while the first is being re-mirrored, both copies of some PGs lost at once, and planned
//! moves (adding SDSs, draining one before removal).
//!
//! The PG table is not in the CLI's output, so the tests read it from the MDM through the
//! same control protocol the CLI uses (`ControlClient::state`), to aim kills at primaries and
//! to know which extents a double loss made unreachable.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tessera_core::layout::pg_of_extent;
use tessera_core::{ClusterState, PlacementGroup};
use tessera_proto::control::ControlClient;

/// How long the cluster may take to re-mirror after a loss or a move (the specs' bound).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// SDS lease (6 s) + expiry grace (1 s) + a failure-detector tick, with slack for a loaded host.
const DECLARE_DOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// A read of an extent whose every complete copy is gone may hang (the SDC retries for 60 s);
/// this is how long the tests give one before calling it failed.
const UNAVAILABLE_READ_TIMEOUT: Duration = Duration::from_secs(3);
const PG_COUNT: u64 = 256;
/// By when writes must have got past a frozen (SIGSTOPped) SDS: it is declared down after
/// about 7 s; the rest is slack for re-peering, retries and a loaded host.
const WRITES_RESUME_BOUND: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The MDM's view, through the control protocol

/// A control-protocol client with its own single-threaded runtime, for fast polling.
struct Mdm {
    rt: tokio::runtime::Runtime,
    client: ControlClient,
}

impl Mdm {
    fn new(c: &Cluster) -> Mdm {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        Mdm { rt, client: ControlClient::new(vec![c.mdm_addr()], c.secret()) }
    }

    fn state(&self) -> ClusterState {
        self.rt.block_on(self.client.state()).expect("fetching the cluster state from the MDM").state
    }
}

fn sds_id(s: &ClusterState, name: &str) -> u64 {
    s.sds_by_name(name).unwrap_or_else(|| panic!("SDS {name} is not in the cluster state")).id
}

fn sds_name(s: &ClusterState, id: u64) -> String {
    s.sdss.get(&id).map_or_else(|| format!("sds#{id}"), |x| x.name.clone())
}

/// The PG holding extent `extent` of volume `volume`.
fn pg_of<'a>(s: &'a ClusterState, volume: &str, extent: u64) -> &'a PlacementGroup {
    let v = s.volume_by_name(volume).unwrap_or_else(|| panic!("volume {volume} not in the state"));
    let pool = &s.pools[&v.pool_id];
    &pool.pgs[pg_of_extent(v.id, extent, pool.pg_count) as usize]
}

/// Whether some complete copy of the PG lives on an SDS not in `dead`.
fn pg_readable(pg: &PlacementGroup, dead: &[u64]) -> bool {
    pg.in_sync().any(|r| !dead.contains(&r.sds_id))
}

// ---------------------------------------------------------------------------------------
// Status

struct Health {
    healthy: u64,
    degraded: u64,
    unavailable: u64,
    rebuilding: u64,
}

fn health(status: &serde_json::Value) -> Health {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("missing count in status: {status:#}"));
    Health {
        healthy: n(&status["pgs"]["healthy_pgs"]),
        degraded: n(&status["pgs"]["degraded_pgs"]),
        unavailable: n(&status["pgs"]["unavailable_pgs"]),
        rebuilding: n(&status["rebuild"]["pgs_rebuilding"]),
    }
}

/// The status entry of one SDS.
fn sds_status(status: &serde_json::Value, name: &str) -> serde_json::Value {
    status["sdss"]
        .as_array()
        .expect("sdss")
        .iter()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from status: {status:#}"))
        .clone()
}

/// Waits until every PG has two live complete copies and nothing is re-mirroring; returns
/// the status that showed it.
fn wait_healthy(c: &Cluster, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let last = c.status();
        let h = health(&last);
        if h.degraded == 0 && h.unavailable == 0 && h.rebuilding == 0 && h.healthy == PG_COUNT {
            return last;
        }
        assert!(Instant::now() < deadline, "cluster not healthy within {timeout:?}; last status:\n{last:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until the MDM has declared `name` dead (its membership reads `removed`).
fn wait_declared_down(c: &Cluster, name: &str) -> Duration {
    let start = Instant::now();
    poll(&format!("{name} to be declared down"), DECLARE_DOWN_TIMEOUT, || {
        let st = sds_status(&c.status(), name);
        (st["membership"] == "removed" && st["state"] == "down").then_some(())
    });
    start.elapsed()
}

// ---------------------------------------------------------------------------------------
// Daemons

fn send_signal(c: &Cluster, role_id: &str, signal: i32) -> i32 {
    let pid = c.pid(role_id);
    assert!(pid_alive(pid), "{role_id} (pid {pid}) is not running");
    // Safety: kill(2) on a live pid read from this cluster's own pid file.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    pid
}

/// SIGKILLs `role_id` and waits until the process is gone.
fn kill9(c: &Cluster, role_id: &str) {
    let pid = send_signal(c, role_id, libc::SIGKILL);
    eprintln!("SIGKILL {role_id} (pid {pid})");
    poll(&format!("{role_id} to die"), Duration::from_secs(10), || (!pid_alive(pid)).then_some(()));
}

/// Starts the SDS daemon `name` on `port` as a child of the test, logging to DIR/NAME.log
/// (an earlier log is kept as NAME.N.log) and recording DIR/NAME.pid so `tessera down`
/// stops it too.
fn start_sds(c: &Cluster, name: &str, port: u16) {
    let log = c.dir.join(format!("{name}.log"));
    if log.exists() {
        let mut n = 1;
        while c.dir.join(format!("{name}.{n}.log")).exists() {
            n += 1;
        }
        std::fs::rename(&log, c.dir.join(format!("{name}.{n}.log"))).expect("keeping the old log");
    }
    let listen = format!("127.0.0.1:{port}");
    let pid = c.spawn_daemon(name, &["sds", "--name", name, "--listen", &listen]);
    std::fs::write(c.dir.join(format!("{name}.pid")), format!("{pid}\n")).expect("writing the pid file");
    eprintln!("started {name} (pid {pid}) on {listen}");
}

/// Restarts SDS `n` of the layout `up` created, on its usual port.
fn restart_sds(c: &Cluster, n: u32) {
    start_sds(c, &format!("sds-{n}"), c.base_port + 10 + n as u16);
}

/// SIGCONTs a stopped daemon when dropped, so a failing test never leaves one frozen
/// (`tessera down` would otherwise wait for it before resorting to SIGKILL).
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        // Safety: the pid of a daemon this test stopped.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

// ---------------------------------------------------------------------------------------
// Data through NBD

fn write_file(c: &Cluster, uri: &str, name: &str, seed: u64, len: u64) -> Vec<u8> {
    let path = c.dir.join(name);
    let data = random_file(&path, seed, len as usize);
    tool_ok("nbdcopy", &["--flush", path.to_str().unwrap(), uri]);
    data
}

fn read_all(c: &Cluster, uri: &str, name: &str) -> Vec<u8> {
    let path = c.dir.join(name);
    tool_ok("nbdcopy", &[uri, path.to_str().unwrap()]);
    let data = std::fs::read(&path).expect("reading what nbdcopy read back");
    let _ = std::fs::remove_file(&path);
    data
}

/// Reads `len` bytes at `offset` of `volume` through the SDC with `qemu-img convert` (a raw
/// view with offset and size over the NBD export). `None` if it fails or does not finish
/// within `timeout` (then it is killed).
fn read_range(c: &Cluster, volume: &str, offset: u64, len: u64, timeout: Duration) -> Option<Vec<u8>> {
    let out = c.dir.join(format!("range-{offset}-{len}.raw"));
    let _ = std::fs::remove_file(&out);
    let opts = format!(
        "driver=raw,offset={offset},size={len},file.driver=nbd,file.server.type=unix,file.server.path={},file.export={volume}",
        c.socket().display()
    );
    let mut cmd = tool("qemu-img");
    cmd.args(["convert", "--image-opts", &opts, "-O", "raw"]).arg(&out);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().expect("starting qemu-img");
    let ok = wait_with_timeout(&mut child, timeout).is_some_and(|s| s.success());
    let data = if ok { std::fs::read(&out).ok() } else { None };
    let _ = std::fs::remove_file(&out);
    data
}

/// With some PGs left without any live complete copy: every extent that still has one reads
/// back exactly as `expected`; an extent that has none must not return wrong data (a read
/// may fail or hang, but what it returns must be right). Returns how many extents were
/// unreadable by the map.
fn check_reads_with_losses(c: &Cluster, mdm: &Mdm, volume: &str, dead: &[u64], expected: &[u8]) -> usize {
    let state = mdm.state();
    let extents = expected.len() as u64 / EXTENT_BYTES;
    let readable: Vec<bool> = (0..extents).map(|e| pg_readable(pg_of(&state, volume, e), dead)).collect();
    // Runs of readable extents, each read by one qemu-img.
    let mut e = 0;
    while e < extents {
        if !readable[e as usize] {
            e += 1;
            continue;
        }
        let start = e;
        while e < extents && readable[e as usize] {
            e += 1;
        }
        let (off, len) = (start * EXTENT_BYTES, (e - start) * EXTENT_BYTES);
        let got = read_range(c, volume, off, len, TOOL_TIMEOUT)
            .unwrap_or_else(|| panic!("reading extents {start}..{e}, which have a live complete copy, failed"));
        assert_same_bytes(
            &format!("extents {start}..{e} with a live copy"),
            &expected[off as usize..(off + len) as usize],
            &got,
        );
    }
    let lost: Vec<u64> = (0..extents).filter(|e| !readable[*e as usize]).collect();
    // A few of the unreachable ones: no wrong byte may come back.
    let tries: Vec<_> = lost
        .iter()
        .take(3)
        .map(|&e| (e, read_range(c, volume, e * EXTENT_BYTES, EXTENT_BYTES, UNAVAILABLE_READ_TIMEOUT)))
        .collect();
    for (e, got) in tries {
        match got {
            None => eprintln!("extent {e} (no live complete copy): read failed or hung, as allowed"),
            Some(bytes) => {
                let at = (e * EXTENT_BYTES) as usize;
                assert_same_bytes(
                    &format!("extent {e} read while its copies were down"),
                    &expected[at..at + EXTENT_BYTES as usize],
                    &bytes,
                );
                eprintln!("extent {e} (no live complete copy by the map) still read back correctly");
            }
        }
    }
    lost.len()
}

// ---------------------------------------------------------------------------------------
// 1, 2: an SDS crash under writes

/// The fio job of the crash tests: random 16 KiB writes with crc32c headers, then a read
/// pass that checks every block. Rate-limited so the write phase lasts about 6 s however
/// fast the data path is: the kill must land while writes are in flight.
const CRASH_JOB: &[&str] = &[
    "--rw=randwrite",
    "--bs=16k",
    "--iodepth=16",
    "--size=384M",
    "--rate_iops=4000",
    "--verify=crc32c",
    "--do_verify=1",
];
const CRASH_JOB_BYTES: u64 = 384 * MIB;

/// Runs [`CRASH_JOB`] on a fresh volume of `c`, SIGKILLs `victim` ~3 s into it, and checks
/// the job, the recovery and both copies.
fn crash_under_fio(c: &Cluster, victim: &str) {
    let uri = c.map("v");
    let (mut fio, started) = Fio::start(c, "crash", &uri, CRASH_JOB);
    std::thread::sleep(Duration::from_secs(3));
    assert!(fio.running(), "fio finished before the kill; the test proves nothing: {}", fio.finish(started).describe());
    kill9(c, victim);
    let killed_at = Instant::now();
    let r = fio.finish(started);
    r.assert_clean(Some(CRASH_JOB_BYTES), CRASH_JOB_BYTES);
    eprintln!("fio wrote and verified {} MiB in {:?} across the kill", CRASH_JOB_BYTES / MIB, r.elapsed);

    let status = wait_healthy(c, RECOVERY_TIMEOUT.saturating_sub(killed_at.elapsed()).max(Duration::from_secs(5)));
    eprintln!("healthy again {:?} after the kill", killed_at.elapsed());
    let st = sds_status(&status, victim);
    assert_eq!(st["state"], "down", "{victim} is dead: {status:#}");
    assert_eq!(st["membership"], "removed", "{victim} was declared dead: {status:#}");

    let report = c.verify("v");
    assert_eq!(report["extents_checked"].as_u64(), Some(CRASH_JOB_BYTES / EXTENT_BYTES), "{report}");
    fio_verify_only(c, "crash-reread", &uri, CRASH_JOB, CRASH_JOB_BYTES);
}

#[test]
fn write_survives_sds_sigkill_under_fio() {
    let c = Cluster::start(4);
    c.create_volume("v", "512MiB");
    crash_under_fio(&c, "sds-3");
    let s = Mdm::new(&c).state();
    let dead = sds_id(&s, "sds-3");
    assert!(
        s.pools.values().flat_map(|p| &p.pgs).all(|pg| !pg.replicas.iter().any(|r| r.sds_id == dead)),
        "a PG still lists the dead SDS after re-mirroring"
    );
}

#[test]
fn write_survives_primary_kill() {
    let c = Cluster::start(4);
    c.create_volume("v", "512MiB");
    let mdm = Mdm::new(&c);
    let before = mdm.state();
    // The primary of extent 0's PG. With 256 PGs over 4 SDSs it is primary of ~64 PGs, and
    // the random writes reach all of them.
    let pg0 = pg_of(&before, "v", 0).clone();
    let victim_id = pg0.primary().expect("placed").sds_id;
    let victim = sds_name(&before, victim_id);
    let primaries = before.pools.values().flat_map(|p| &p.pgs).filter(|pg| pg.replicas[0].sds_id == victim_id).count();
    eprintln!(
        "extent 0 is in PG {} (epoch {}), primary {victim}, which is primary of {primaries} PGs",
        pg0.id, pg0.epoch
    );
    assert!(primaries >= 32, "placement spreads primaries: {victim} leads only {primaries} PGs");

    crash_under_fio(&c, &victim);

    let after = mdm.state();
    let pg0_now = pg_of(&after, "v", 0);
    assert_ne!(pg0_now.primary().unwrap().sds_id, victim_id, "extent 0's PG has a new primary");
    assert!(pg0_now.epoch > pg0.epoch, "re-peering bumped the epoch of extent 0's PG: {pg0_now:?}");
    assert!(
        after.pools.values().flat_map(|p| &p.pgs).all(|pg| pg.replicas.iter().all(|r| r.sds_id != victim_id)),
        "a PG still lists the killed primary"
    );
}

// ---------------------------------------------------------------------------------------
// 3: a second loss during the rebuild of the first

#[test]
fn kill_during_rebuild() {
    let c = Cluster::start(5);
    let uri = c.volume("v", "256MiB");
    let job: &[&str] = &["--rw=write", "--bs=1M", "--iodepth=8", "--size=256M", "--verify=crc32c", "--do_verify=1"];
    let (fio, started) = Fio::start(&c, "fill", &uri, job);
    fio.finish(started).assert_clean(Some(256 * MIB), 256 * MIB);
    let reference = read_all(&c, &uri, "reference.raw");
    let mdm = Mdm::new(&c);

    kill9(&c, "sds-2");
    // Poll the MDM directly, fast: the back-fill of ~100 MiB may take only a second or two.
    let start = Instant::now();
    let syncing_state = loop {
        let s = mdm.state();
        if s.pools.values().flat_map(|p| &p.pgs).any(|pg| !pg.syncing.is_empty()) {
            break s;
        }
        assert!(
            start.elapsed() < DECLARE_DOWN_TIMEOUT + Duration::from_secs(10),
            "no PG ever started re-mirroring after sds-2 died"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let dead_a = sds_id(&syncing_state, "sds-2");
    // The second victim: the SDS that is the only complete live copy of the most PGs still
    // re-mirroring — the worst choice.
    let mut sources: std::collections::BTreeMap<u64, usize> = Default::default();
    for pg in syncing_state.pools.values().flat_map(|p| &p.pgs).filter(|pg| !pg.syncing.is_empty()) {
        for r in pg.in_sync().filter(|r| r.sds_id != dead_a) {
            *sources.entry(r.sds_id).or_default() += 1;
        }
    }
    let (&dead_b, &count) = sources.iter().max_by_key(|(_, n)| **n).expect("a syncing PG has a live complete copy");
    let victim_b = sds_name(&syncing_state, dead_b);
    eprintln!(
        "re-mirroring seen {:?} after the kill; killing {victim_b}, sole complete copy of {count} syncing PGs",
        start.elapsed()
    );
    kill9(&c, &victim_b);
    let second_kill_at = Instant::now();

    wait_declared_down(&c, &victim_b);
    let status = c.status();
    let h = health(&status);
    let lost = check_reads_with_losses(&c, &mdm, "v", &[dead_a, dead_b], &reference);
    eprintln!(
        "after the second kill: {} unavailable PGs, {lost} written extents without a live complete copy",
        h.unavailable
    );
    if lost > 0 {
        assert!(h.unavailable > 0, "extents are unreadable but status reports no unavailable PG: {status:#}");
    }

    restart_sds(&c, 2);
    restart_sds(&c, victim_b.trim_start_matches("sds-").parse().expect("an sds-N name"));
    wait_healthy(&c, RECOVERY_TIMEOUT);
    eprintln!("healthy {:?} after the second kill", second_kill_at.elapsed());
    assert_same_bytes("volume after both SDSs returned", &reference, &read_all(&c, &uri, "after.raw"));
    fio_verify_only(&c, "after", &uri, job, 256 * MIB);
    c.verify("v");

    // Control: a zeroed block must fail the verify-only pass, or the passes above proved nothing.
    tool_ok("qemu-io", &["-f", "raw", "-c", "write -P 0 100M 64k", "-c", "flush", &uri]);
    let mut args = job.to_vec();
    args.push("--verify_only");
    let (fio, started) = Fio::start(&c, "control", &uri, &args);
    let r = fio.finish(started);
    assert!(!r.status.success() && r.stderr.contains("verify"), "fio missed a zeroed block: {}", r.describe());
}

// ---------------------------------------------------------------------------------------
// 4: a stalled SDS

#[test]
fn paused_sds_is_replaced_and_serves_no_stale_read() {
    const LEN: u64 = 64 * MIB;
    const PATTERN: u32 = 0x5e_7a_1e_01;
    let c = Cluster::start(4);
    let uri = c.volume("v", "64MiB");
    let old = write_file(&c, &uri, "old.raw", 0x5eed_f401, LEN);

    let pid = send_signal(&c, "sds-2", libc::SIGSTOP);
    let stopped = Stopped(pid);
    let stopped_at = Instant::now();
    eprintln!("SIGSTOP sds-2 (pid {pid})");
    // New data over the whole volume while sds-2 is frozen: one full pass of a fixed pattern,
    // so what was written last is known exactly, whatever the timing.
    let pattern_arg = format!("--buffer_pattern={PATTERN:#010x}");
    let job = ["--rw=write", "--bs=256k", "--iodepth=8", "--size=64M", &pattern_arg, "--scramble_buffers=0"];
    let (fio, started) = Fio::start(&c, "new", &uri, &job);
    let declared_after = wait_declared_down(&c, "sds-2");
    eprintln!("sds-2 declared down {declared_after:?} after SIGSTOP");
    let r = fio.finish(started);
    r.assert_clean(Some(LEN), 0);
    let rewritten_after = stopped_at.elapsed();
    eprintln!("fio rewrote the volume in {:?} with sds-2 frozen", r.elapsed);
    // Keep it frozen at least 12 s, well past its lease.
    if let Some(rest) = Duration::from_secs(12).checked_sub(stopped_at.elapsed()) {
        std::thread::sleep(rest);
    }
    drop(stopped);
    eprintln!("SIGCONT sds-2 after {:?}", stopped_at.elapsed());
    let back = read_all(&c, &uri, "back.raw");

    let expected: Vec<u8> = PATTERN.to_be_bytes().iter().copied().cycle().take(LEN as usize).collect();
    assert_eq!(back.len(), expected.len());
    let block = 4096;
    let bad: Vec<(usize, bool)> = (0..back.len() / block)
        .filter(|b| back[b * block..(b + 1) * block] != expected[b * block..(b + 1) * block])
        .map(|b| (b * block, back[b * block..(b + 1) * block] == old[b * block..(b + 1) * block]))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} 4 KiB blocks read back wrong right after SIGCONT ({} of them stale: the data before the pause); \
         first (offset, stale): {:?}",
        bad.len(),
        back.len() / block,
        bad.iter().filter(|(_, stale)| *stale).count(),
        &bad[..bad.len().min(10)]
    );

    wait_healthy(&c, RECOVERY_TIMEOUT);
    c.verify("v");
    assert_same_bytes("volume after recovery", &expected, &read_all(&c, &uri, "again.raw"));

    // Writes continue once the frozen SDS is declared down (lease 6 s + 1 s grace): 64 MiB
    // takes about a second on a healthy cluster, so the pass must be done well before this.
    assert!(
        rewritten_after < WRITES_RESUME_BOUND,
        "writes stalled: the 64 MiB pass ended {rewritten_after:?} after SIGSTOP although sds-2 was declared \
         down after {declared_after:?} (bound {WRITES_RESUME_BOUND:?})"
    );
}

// ---------------------------------------------------------------------------------------
// 5: both copies of some PGs lost at once

#[test]
fn two_of_four_lost_is_unavailable_not_wrong() {
    const LEN: u64 = 64 * MIB;
    let c = Cluster::start(4);
    let uri = c.volume("v", "64MiB");
    let data = write_file(&c, &uri, "data.raw", 0x5eed_f501, LEN);
    let mdm = Mdm::new(&c);
    let s = mdm.state();
    // The pair of SDSs that together hold both copies of the most written extents.
    let mut best = (0u32, 0u32, 0usize);
    for a in 1..=4u32 {
        for b in a + 1..=4 {
            let ids = [sds_id(&s, &format!("sds-{a}")), sds_id(&s, &format!("sds-{b}"))];
            let n = (0..LEN / EXTENT_BYTES).filter(|&e| !pg_readable(pg_of(&s, "v", e), &ids)).count();
            if n > best.2 {
                best = (a, b, n);
            }
        }
    }
    let (a, b, lost_extents) = best;
    assert!(lost_extents > 0, "some written extent has both copies on one pair of SDSs");
    let (name_a, name_b) = (format!("sds-{a}"), format!("sds-{b}"));
    let dead = [sds_id(&s, &name_a), sds_id(&s, &name_b)];
    eprintln!("{name_a} and {name_b} together hold both copies of {lost_extents} written extents");

    let (pid_a, pid_b) = (c.pid(&name_a), c.pid(&name_b));
    // Safety: kill(2) on live pids from this cluster's own pid files, back to back.
    unsafe {
        assert!(pid_alive(pid_a) && pid_alive(pid_b));
        libc::kill(pid_a, libc::SIGKILL);
        libc::kill(pid_b, libc::SIGKILL);
    }
    let killed_at = Instant::now();
    poll("both SDSs to die", Duration::from_secs(10), || (!pid_alive(pid_a) && !pid_alive(pid_b)).then_some(()));
    let status = poll("unavailable PGs in status", DECLARE_DOWN_TIMEOUT, || {
        let st = c.status();
        (health(&st).unavailable > 0).then_some(st)
    });
    eprintln!("status shows {} unavailable PGs {:?} after the kills", health(&status).unavailable, killed_at.elapsed());
    // Let the failure detector settle (both declared down), then read.
    wait_declared_down(&c, &name_a);
    wait_declared_down(&c, &name_b);
    let lost = check_reads_with_losses(&c, &mdm, "v", &dead, &data);
    assert!(lost > 0, "the map still has a live copy of every extent");
    // Both copies are kept, not dropped: the PGs wait for either SDS to return.
    assert!(health(&c.status()).unavailable > 0, "unavailable PGs vanished while both SDSs are dead");

    restart_sds(&c, a);
    let back_at = Instant::now();
    poll("unavailable PGs to drop to 0 after one SDS returned", Duration::from_secs(30), || {
        (health(&c.status()).unavailable == 0).then_some(())
    });
    eprintln!("no unavailable PG {:?} after {name_a} returned", back_at.elapsed());
    assert_same_bytes("volume with one of the two SDSs back", &data, &read_all(&c, &uri, "one-back.raw"));

    restart_sds(&c, b);
    wait_healthy(&c, RECOVERY_TIMEOUT);
    c.verify("v");
    assert_same_bytes("volume with both back", &data, &read_all(&c, &uri, "both-back.raw"));
}

// ---------------------------------------------------------------------------------------
// 6, 7: planned moves

/// Registers SDS `name` with a fresh 2 GiB sparse device and starts its daemon on `port`.
fn add_sds(c: &Cluster, name: &str, port: u16) {
    let address = format!("127.0.0.1:{port}");
    c.ok(&["sds", "add", name, "--pd", "default", "--address", &address]);
    let dir = c.dir.join(name);
    std::fs::create_dir_all(&dir).expect("SDS directory");
    let device = dir.join("disk0.img");
    std::fs::File::create(&device).and_then(|f| f.set_len(2 * GIB)).expect("creating a sparse device file");
    c.ok(&["device", "add", "--sds", name, "--pool", "default", "--path", device.to_str().unwrap()]);
    start_sds(c, name, port);
}

fn used_by_name(c: &Cluster) -> std::collections::BTreeMap<String, u64> {
    let list = c.json(&["sds", "list"]);
    list.as_array()
        .expect("sds list is an array")
        .iter()
        .map(|x| (x["name"].as_str().expect("name").to_string(), x["used_bytes"].as_u64().expect("used_bytes")))
        .collect()
}

#[test]
fn adding_sdss_rebalances() {
    const LEN: u64 = 256 * MIB;
    let c = Cluster::start(3);
    let uri = c.volume("v", "256MiB");
    let data = write_file(&c, &uri, "data.raw", 0x5eed_f601, LEN);
    add_sds(&c, "sds-4", c.base_port + 14);
    add_sds(&c, "sds-5", c.base_port + 15);
    let added_at = Instant::now();

    // Settled: every PG healthy, nothing re-mirroring, the new SDSs holding data — twice in a
    // row a second apart, since moves run a few PGs at a time.
    let mut calm = 0;
    let used = poll("the new SDSs to take data and re-mirroring to finish", RECOVERY_TIMEOUT, || {
        let status = c.status();
        let h = health(&status);
        let used = used_by_name(&c);
        let settled = h.rebuilding == 0 && h.healthy == PG_COUNT && used["sds-4"] > 0 && used["sds-5"] > 0;
        calm = if settled { calm + 1 } else { 0 };
        if calm < 2 {
            std::thread::sleep(Duration::from_millis(900));
            return None;
        }
        Some(used)
    });
    eprintln!("rebalanced {:?} after adding: used bytes {used:?}", added_at.elapsed());
    let status = c.status();
    for n in ["sds-4", "sds-5"] {
        assert_eq!(sds_status(&status, n)["state"], "up", "{status:#}");
        assert_eq!(sds_status(&status, n)["membership"], "normal", "{status:#}");
    }
    // Two copies of every written extent, wherever they now are.
    poll("usage reports to settle at two copies", Duration::from_secs(10), || {
        (used_by_name(&c).values().sum::<u64>() == 2 * LEN).then_some(())
    });
    assert_same_bytes("volume after rebalancing", &data, &read_all(&c, &uri, "back.raw"));
    let report = c.verify("v");
    assert_eq!(report["extents_checked"].as_u64(), Some(LEN / EXTENT_BYTES), "{report}");
}

#[test]
fn drain_moves_all_data_before_removal() {
    const LEN: u64 = 128 * MIB;
    let c = Cluster::start(4);
    let uri = c.volume("v", "128MiB");
    let data = write_file(&c, &uri, "data.raw", 0x5eed_f701, LEN);
    poll("sds-2 to report holding data", POLL_TIMEOUT, || (used_by_name(&c)["sds-2"] > 0).then_some(()));

    let out = c.cli(&["sds", "remove", "sds-2"]);
    assert!(!out.status.success(), "removing an SDS that holds data was accepted: {}", describe(&out));
    assert!(text(&out.stderr).contains("drain"), "the refusal says to drain first: {}", describe(&out));

    c.ok(&["sds", "drain", "sds-2"]);
    let drained_at = Instant::now();
    assert_eq!(sds_status(&c.status(), "sds-2")["membership"], "draining");
    let mdm = Mdm::new(&c);
    let drained_id = sds_id(&mdm.state(), "sds-2");
    poll("sds-2 to be removable after draining", RECOVERY_TIMEOUT, || {
        let out = c.cli(&["sds", "remove", "sds-2"]);
        if out.status.success() {
            return Some(());
        }
        assert!(text(&out.stderr).contains("drain"), "unexpected refusal: {}", describe(&out));
        std::thread::sleep(Duration::from_millis(400));
        None
    });
    eprintln!("sds-2 drained and removed {:?} after drain", drained_at.elapsed());

    let s = mdm.state();
    assert!(s.sds_by_name("sds-2").is_none(), "sds-2 is still in the cluster");
    let holding: Vec<&PlacementGroup> =
        s.pools.values().flat_map(|p| &p.pgs).filter(|pg| pg.replicas.iter().any(|r| r.sds_id == drained_id)).collect();
    assert!(holding.is_empty(), "removed sds-2 still holds copies: {holding:?}");
    // The remaining SDSs may still be evening out among themselves; then all is settled.
    let status = wait_healthy(&c, RECOVERY_TIMEOUT);
    let s = mdm.state();
    let odd: Vec<&PlacementGroup> =
        s.pools.values().flat_map(|p| &p.pgs).filter(|pg| pg.replicas.len() != 2 || pg.leaving.is_some()).collect();
    assert!(odd.is_empty(), "PGs not settled at two complete copies: {odd:?}");
    assert!(status["sdss"].as_array().unwrap().iter().all(|x| x["name"] != "sds-2"), "{status:#}");
    assert_same_bytes("volume after draining sds-2", &data, &read_all(&c, &uri, "back.raw"));
    let report = c.verify("v");
    assert_eq!(report["extents_checked"].as_u64(), Some(LEN / EXTENT_BYTES), "{report}");

    // Its process is still up (removal does not kill it); stop it and the data stays.
    let pid = send_signal(&c, "sds-2", libc::SIGTERM);
    poll("sds-2 to exit", Duration::from_secs(15), || (!pid_alive(pid)).then_some(()));
    assert_same_bytes("volume after sds-2 stopped", &data, &read_all(&c, &uri, "after-stop.raw"));
}
