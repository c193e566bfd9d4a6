//! MDM clusters of 3 and 5 members (`tessera up --mdm N`), as real processes: the primary
//! killed under a metadata workload and an fio verify workload, members lost until no quorum
//! is left and then returning, the primary cut off by a packet filter (nftables drops the
//! traffic between MDM addresses on loopback), two losses in 5_node mode, a whole-cluster
//! restart, and a member replaced by a fresh one that catches up.
//!
//! Each MDM of a multi-MDM `up` listens on its own loopback address (127.0.0.11, .12, ...)
//! and talks to the others from it, which is what lets nftables cut MDMs apart while clients
//! (on 127.0.0.1) still reach every one of them.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tessera_core::{ClusterState, Command as Cmd};
use tessera_proto::control::{ClientError, ControlClient, ControlError, ControlRequest, ControlResponse};

/// Election (2.1–2.8 s after the primary stops) plus a client's retry back-off, with slack
/// for a loaded 2-core host.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

/// Control-protocol access with a runtime of its own.
struct Mdms {
    rt: tokio::runtime::Runtime,
    /// Follows the leader among every MDM.
    all: ControlClient,
    addrs: Vec<String>,
    secret: tessera_proto::ClusterSecret,
}

impl Mdms {
    fn new(c: &Cluster) -> Mdms {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let mut all = ControlClient::new(c.mdm_addrs(), c.secret());
        all.retry_for = Duration::from_secs(30);
        Mdms { rt, all, addrs: c.mdm_addrs(), secret: c.secret() }
    }

    /// A client of MDM `n` only, giving up after `retry_for`.
    fn only(&self, n: u32, retry_for: Duration) -> ControlClient {
        let mut client = ControlClient::new(vec![self.addrs[n as usize - 1].clone()], self.secret.clone());
        client.retry_for = retry_for;
        client
    }

    fn execute(&self, cmd: Cmd) -> Result<(), ClientError> {
        self.rt.block_on(self.all.execute(cmd)).map(|_| ())
    }

    fn leader(&self) -> u32 {
        let status = self.rt.block_on(self.all.status()).expect("cluster status");
        status.leader_id.expect("a leader") as u32
    }

    /// MDM `n`'s own applied state (not asking the leader).
    fn local_state(&self, n: u32) -> (u64, ClusterState) {
        match self.rt.block_on(self.only(n, Duration::from_secs(5)).request(&ControlRequest::LocalState)) {
            Ok(ControlResponse::State(v)) => (v.version, v.state),
            other => panic!("LocalState of MDM {n}: {other:?}"),
        }
    }

    /// Waits until every listed MDM has applied the same index and holds the same state.
    fn assert_converge(&self, members: &[u32]) -> ClusterState {
        let mut last = String::new();
        let deadline = Instant::now() + POLL_TIMEOUT;
        while Instant::now() < deadline {
            let states: Vec<(u64, String)> = members
                .iter()
                .map(|n| {
                    let (v, s) = self.local_state(*n);
                    (v, serde_json::to_string(&s).expect("state as JSON"))
                })
                .collect();
            if states.windows(2).all(|w| w[0] == w[1]) {
                return serde_json::from_str(&states[0].1).expect("state JSON");
            }
            last = format!("{:?}", states.iter().map(|(v, s)| (v, s.len())).collect::<Vec<_>>());
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("MDMs {members:?} did not converge on one state: (version, state size) {last}");
    }
}

fn volume(name: &str) -> Cmd {
    Cmd::CreateVolume {
        name: name.to_string(),
        pool: "default".into(),
        size_bytes: 64 * MIB,
        thin: true,
        allow_multi_map: false,
    }
}

fn kill9_mdm(c: &Cluster, n: u32) {
    let pid = c.pid(&format!("mdm-{n}"));
    unsafe { libc::kill(pid, libc::SIGKILL) };
    poll(&format!("mdm-{n} to die"), POLL_TIMEOUT, || (!pid_alive(pid)).then_some(()));
}

/// Starts MDM `n` again from its directory (as `up` laid it out), as a child of the test.
fn restart_mdm(c: &Cluster, n: u32, role: &str, label: &str) {
    let dir = c.dir.join(format!("mdm-{n}"));
    let addr = c.mdm_addr_of(n);
    c.spawn_daemon(
        label,
        &[
            "mdm",
            "--dir",
            dir.to_str().unwrap(),
            "--id",
            &n.to_string(),
            "--listen",
            &addr,
            "--role",
            role,
            "--standby",
        ],
    );
}

fn mdm_status(c: &Cluster) -> serde_json::Value {
    c.json(&["mdm", "ls"])
}

/// A metadata workload in the background: creates volumes `meta-N` and maps each to the
/// SDC, one call after another, and records when each call returned and whether it
/// succeeded.
/// When each call returned, and its error if it failed.
type CallLog = Vec<(Instant, Result<(), String>)>;

struct MetadataLoad {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<CallLog>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetadataLoad {
    fn start(c: &Cluster) -> MetadataLoad {
        let (stop, log) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (addrs, secret) = (c.mdm_addrs(), c.secret());
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let client = ControlClient::new(addrs, secret);
            let mut n = 0;
            while !stop2.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("meta-{n}");
                let map = Cmd::MapVolume { volume: name.clone(), sdc: "sdc-1".into(), allow_multi_map: false };
                for cmd in [volume(&name), map] {
                    let result = match rt.block_on(client.execute(cmd)) {
                        Ok(_) => Ok(()),
                        // A call whose commit was not confirmed before the primary died and
                        // that the retry then finds done is a success, not a lost update.
                        Err(ClientError::Control(ControlError::Refused(e)))
                            if e.to_string().contains("exists") || e.to_string().contains("already mapped") =>
                        {
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    log2.lock().unwrap().push((Instant::now(), result));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        MetadataLoad { stop, log, thread: Some(thread) }
    }

    /// Stops the workload; returns its log.
    fn stop(mut self) -> CallLog {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().expect("metadata workload thread");
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for MetadataLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------

/// The primary dies under volume creation and an fio verify workload: metadata calls resume
/// within a few seconds (a new primary is elected), data IO sees no error and no stall (it
/// never waits on the MDM), and every member ends with the same state.
#[test]
fn primary_killed_under_metadata_and_data_workloads() {
    let c = Cluster::start_full(3, 3, "1GiB");
    let mdms = Mdms::new(&c);
    let status = mdm_status(&c);
    assert_eq!(status["mode"], "3_node", "{status:#}");
    assert_eq!(status["voters"], 3, "{status:#}");
    let uri = c.volume("data", "256MiB");
    let job: &[&str] = &[
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=96M",
        "--rate_iops=1500",
        "--verify=crc32c",
        "--do_verify=1",
    ];
    let (mut fio, fio_started) = Fio::start(&c, "failover", &uri, job);
    let load = MetadataLoad::start(&c);
    std::thread::sleep(Duration::from_secs(3));
    let primary = mdms.leader();
    assert!(fio.running(), "fio ended before the primary was killed");
    let killed_at = Instant::now();
    kill9_mdm(&c, primary);
    eprintln!("killed the primary, mdm-{primary}");
    // Wait for a success after the kill, then let the workload run a little longer.
    poll("a metadata write after the kill", FAILOVER_BOUND * 2, || {
        load.log.lock().unwrap().iter().any(|(t, r)| *t > killed_at && r.is_ok()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let log = load.stop();
    let first_ok = log.iter().find(|(t, r)| *t > killed_at && r.is_ok()).map(|(t, _)| *t - killed_at);
    let failures: Vec<&String> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    eprintln!("first metadata write after the kill: {first_ok:?}; failed calls: {failures:?}");
    assert!(failures.is_empty(), "metadata calls failed instead of following the new primary: {failures:?}");
    let first_ok = first_ok.expect("a metadata write succeeded after the kill");
    assert!(first_ok < FAILOVER_BOUND, "metadata writes resumed only {first_ok:?} after the kill");
    let new_primary = mdms.leader();
    assert_ne!(new_primary, primary);
    assert_eq!(mdm_status(&c)["state"], "degraded");

    let r = fio.finish(fio_started);
    r.assert_clean(Some(96 * MIB), 96 * MIB);
    c.verify("data");
    // No write was needed on the data path: the SDSs renewed their leases with the new
    // primary before they ran out, so none was declared down and no PG moved.
    let s = c.status();
    for sds in s["sdss"].as_array().expect("sdss") {
        assert_eq!(sds["membership"], "normal", "an SDS was declared down during the MDM failover: {s:#}");
    }

    // The old primary returns as a follower, catches up, and every member agrees.
    let role = if primary <= 2 { "manager" } else { "tiebreaker" };
    restart_mdm(&c, primary, role, &format!("mdm-{primary}-again"));
    poll("the old primary to rejoin", POLL_TIMEOUT, || (mdm_status(&c)["state"] == "normal").then_some(()));
    let state = mdms.assert_converge(&[1, 2, 3]);
    let acknowledged = log.iter().filter(|(_, r)| r.is_ok()).count();
    let meta_volumes = state.volumes.values().filter(|v| v.name.starts_with("meta-")).count();
    assert!(meta_volumes * 2 >= acknowledged, "{acknowledged} calls acknowledged, {meta_volumes} volumes exist");
}

/// Losing the tiebreaker leaves 2 of 3 voters: the cluster carries on. Losing the secondary
/// too leaves 1 of 3: metadata changes are refused with a clear error (and status still
/// answers, saying so). When a member returns, the cluster serves again.
#[test]
fn losing_members_until_no_quorum_then_recovering() {
    let c = Cluster::start_full(3, 2, "512MiB");
    let mdms = Mdms::new(&c);
    let primary = mdms.leader();
    assert_eq!(primary, 1, "the first MDM creates the cluster and leads");
    kill9_mdm(&c, 3); // the tiebreaker
    c.create_volume("with-two-of-three", "64MiB");
    // The primary counts a member unreachable after 2 s without an answer.
    let s = poll("status to show the tiebreaker gone", POLL_TIMEOUT, || {
        let s = mdm_status(&c);
        (s["state"] == "degraded").then_some(s)
    });
    assert_eq!(s["voters_reachable"].as_u64(), Some(2), "{s:#}");
    let tiebreaker = &s["members"][2];
    assert_eq!((tiebreaker["status"].as_str(), tiebreaker["reachable"].as_bool()), (Some("tiebreaker"), Some(false)));

    kill9_mdm(&c, 2); // the secondary
                      // Once the primary has noticed (a couple of seconds without an answer), it refuses
                      // changes at once, and status says why.
    let primary_only = mdms.only(1, Duration::from_secs(2));
    poll("the primary to report no quorum", POLL_TIMEOUT * 2, || {
        let answer = mdms.rt.block_on(primary_only.status());
        answer.is_err_and(|e| e.to_string().contains("no quorum of MDMs: 1 of 3")).then_some(())
    });
    let out = c.cli(&["mdm", "ls"]);
    assert!(!out.status.success() && text(&out.stderr).contains("no quorum"), "{}", describe(&out));
    let started = Instant::now();
    let out = c.cli(&["volume", "create", "with-one-of-three", "--size", "64MiB"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a change was accepted with 1 of 3 MDMs: {}", describe(&out));
    assert!(stderr.contains("no quorum"), "the refusal does not say why: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(40), "the refusal took {:?}", started.elapsed());

    // The secondary returns: a quorum again.
    restart_mdm(&c, 2, "manager", "mdm-2-again");
    poll("metadata writes with 2 of 3 again", POLL_TIMEOUT, || {
        mdms.execute(volume("after-return")).is_ok().then_some(())
    });
    let state = mdms.assert_converge(&[1, 2]);
    // SDSs could not renew their leases without a quorum; when it returned, the primary
    // waited a whole lease again instead of declaring them all dead.
    let s = poll("every SDS to hold a lease again", POLL_TIMEOUT, || {
        let s = c.status();
        s["sdss"].as_array().expect("sdss").iter().all(|x| x["state"] == "up").then_some(s)
    });
    for sds in s["sdss"].as_array().expect("sdss") {
        assert_eq!(sds["membership"], "normal", "an SDS was declared dead after the MDM quorum returned: {s:#}");
    }
    assert!(state.volume_by_name("with-two-of-three").is_some());
    assert!(state.volume_by_name("after-return").is_some());
    // The refused change never took effect anywhere.
    assert!(state.volume_by_name("with-one-of-three").is_none(), "a refused change was applied");
}

/// nftables rules that drop every packet between `isolated` and `others` on loopback;
/// removed on drop.
struct Partition {
    table: String,
}

impl Partition {
    fn new(label: &str, isolated: &str, others: &[&str]) -> Partition {
        let table = format!("tessera_test_{label}");
        let set = others.join(", ");
        let script = format!(
            "table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
             ip saddr {isolated} ip daddr {{ {set} }} drop\n    ip saddr {{ {set} }} ip daddr {isolated} drop\n  }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("{table}.nft"));
        std::fs::write(&path, script).expect("writing the nft script");
        let out = run(Command::new("nft").arg("-f").arg(&path), CLI_TIMEOUT);
        assert!(
            out.status.success(),
            "nft could not partition the MDMs (install nftables; needs root): {}",
            describe(&out)
        );
        Partition { table }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(ip, _)| ip)
}

/// The primary is cut off from the other MDMs (not from clients). It stops accepting
/// metadata changes; the other side elects a new primary that serves; when the partition
/// heals the old primary follows, and no change made on either side is lost or diverges.
#[test]
fn partitioned_primary_steps_aside_without_split_brain() {
    let c = Cluster::start_full(3, 2, "512MiB");
    let mdms = Mdms::new(&c);
    let primary = mdms.leader();
    let others: Vec<u32> = (1..=3).filter(|n| *n != primary).collect();
    let other_ips: Vec<&str> = others.iter().map(|n| ip_of(&mdms.addrs[*n as usize - 1])).collect();
    let partition = Partition::new(&c.base_port.to_string(), ip_of(&mdms.addrs[primary as usize - 1]), &other_ips);

    // Asked directly, the cut-off primary refuses the change (it cannot commit it).
    let isolated = mdms.only(primary, Duration::from_secs(12));
    let refused = mdms.rt.block_on(isolated.execute(volume("on-the-isolated-primary")));
    match refused {
        Err(e) => assert!(
            e.to_string().contains("quorum") || e.to_string().contains("not the leader"),
            "unexpected refusal from the isolated primary: {e}"
        ),
        Ok(_) => panic!("the isolated primary accepted a change"),
    }
    // The majority side serves: a client that knows every MDM gets its change in.
    let started = Instant::now();
    mdms.execute(volume("on-the-majority")).expect("the majority side accepts changes");
    eprintln!("majority side accepted a change {:?} after the isolated primary refused", started.elapsed());
    let new_primary = mdms.leader();
    assert_ne!(new_primary, primary, "the isolated MDM is still reported primary");

    drop(partition);
    poll("the cluster to be whole again", POLL_TIMEOUT, || (mdm_status(&c)["state"] == "normal").then_some(()));
    let state = mdms.assert_converge(&[1, 2, 3]);
    assert!(state.volume_by_name("on-the-majority").is_some());
    assert!(state.volume_by_name("on-the-isolated-primary").is_none(), "a change the isolated primary refused applied");
}

/// 5_node mode (three managers, two tiebreakers) survives losing two members, the primary
/// among them.
#[test]
fn five_node_mode_survives_two_losses() {
    let c = Cluster::start_full(5, 2, "512MiB");
    let mdms = Mdms::new(&c);
    let s = mdm_status(&c);
    assert_eq!(s["mode"], "5_node", "{s:#}");
    let roles: Vec<&str> = s["members"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["manager", "manager", "manager", "tiebreaker", "tiebreaker"]);
    let primary = mdms.leader();
    let second = if primary == 2 { 3 } else { 2 };
    kill9_mdm(&c, primary);
    kill9_mdm(&c, second);
    let started = Instant::now();
    mdms.execute(volume("after-two-losses")).expect("5_node mode serves with 3 of 5");
    eprintln!("5_node: a change committed {:?} after losing two members", started.elapsed());
    let s = poll("status to show two members gone", POLL_TIMEOUT, || {
        let s = mdm_status(&c);
        (s["voters_reachable"] == 3).then_some(s)
    });
    assert_eq!(s["state"], "degraded", "{s:#}");
    let survivors: Vec<u32> = (1..=5).filter(|n| *n != primary && *n != second).collect();
    let state = mdms.assert_converge(&survivors);
    assert!(state.volume_by_name("after-two-losses").is_some());
}

/// Every MDM restarts (`down`, `up`): every object is still there. Then a member is replaced
/// by a fresh MDM with an empty directory: it catches up from the others and can lead.
#[test]
fn restart_all_then_replace_a_member() {
    let c = Cluster::start_full(3, 2, "512MiB");
    let mdms = Mdms::new(&c);
    for n in 0..20 {
        mdms.execute(volume(&format!("v{n}"))).expect("creating volumes");
    }
    let before = mdms.assert_converge(&[1, 2, 3]);
    c.down();
    // From now on the MDMs snapshot every 5 entries and purge the log behind: a member
    // added later must catch up from a snapshot, not only from log entries.
    c.up_again_with_env(&[("TESSERA_MDM_SNAPSHOT_LOGS", "5")]);
    let after = mdms.assert_converge(&[1, 2, 3]);
    assert_eq!(
        serde_json::to_value(&before.volumes).unwrap(),
        serde_json::to_value(&after.volumes).unwrap(),
        "volumes changed across a whole-cluster restart"
    );
    assert_eq!(before.sdss.len(), after.sdss.len());

    for n in 20..40 {
        mdms.execute(volume(&format!("v{n}"))).expect("creating volumes");
    }
    // Replace manager 2 (lost for good) by a fresh MDM 4 on its own address.
    let primary = mdms.leader();
    let lost = if primary == 2 { 1 } else { 2 };
    kill9_mdm(&c, lost);
    let fresh_dir = c.dir.join("mdm-4");
    let fresh_addr = format!("127.0.0.14:{}", c.spare_port(0));
    c.spawn_daemon(
        "mdm-4",
        &[
            "mdm",
            "--dir",
            fresh_dir.to_str().unwrap(),
            "--id",
            "4",
            "--listen",
            &fresh_addr,
            "--role",
            "manager",
            "--standby",
        ],
    );
    poll("the fresh MDM to be added", POLL_TIMEOUT, || {
        c.cli(&["mdm", "add", "--address", &fresh_addr, "--id", "4"]).status.success().then_some(())
    });
    let managers = format!("{primary},4");
    let out = c.ok(&["cluster", "switch-mode", "3_node", "--managers", &managers, "--tiebreakers", "3"]);
    eprintln!("{out}");
    let s = mdm_status(&c);
    let status_of = |id: u64| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status_of(4).as_deref(), Some("secondary"), "{s:#}");
    assert_eq!(status_of(lost as u64).as_deref(), Some("standby"), "{s:#}");
    // Remove the lost member for good, and refuse removing a voter.
    let out = c.cli(&["mdm", "remove", "--id", "3"]);
    assert!(!out.status.success() && text(&out.stderr).contains("switch to a mode without it"), "{}", describe(&out));
    c.ok(&["mdm", "remove", "--id", &lost.to_string()]);
    // The removed member's id is never taken again, even by an MDM reinstalled empty.
    let reinstalled_addr = format!("127.0.0.15:{}", c.spare_port(1));
    let reinstalled_dir = c.dir.join("mdm-reinstalled");
    c.spawn_daemon(
        "mdm-reinstalled",
        &[
            "mdm",
            "--dir",
            reinstalled_dir.to_str().unwrap(),
            "--id",
            &lost.to_string(),
            "--listen",
            &reinstalled_addr,
            "--role",
            "manager",
            "--standby",
        ],
    );
    let refused = poll("the reinstalled MDM to answer", POLL_TIMEOUT, || {
        let out = c.cli(&["mdm", "add", "--address", &reinstalled_addr]);
        let stderr = text(&out.stderr);
        (!stderr.contains("cannot reach")).then_some(out)
    });
    assert!(
        !refused.status.success() && text(&refused.stderr).contains("never reused"),
        "an old MDM id was accepted again: {}",
        describe(&refused)
    );

    // The fresh member holds everything and can lead: kill the primary.
    mdms.execute(volume("before-handover")).expect("a change with the new member");
    let fresh =
        Mdms { addrs: vec![c.mdm_addr_of(1), c.mdm_addr_of(2), c.mdm_addr_of(3), fresh_addr.clone()], ..Mdms::new(&c) };
    kill9_mdm(&c, primary);
    let started = Instant::now();
    let all = ControlClient::new(fresh.addrs.clone(), c.secret());
    fresh.rt.block_on(all.execute(volume("after-handover"))).expect("the fresh member leads with the tiebreaker");
    eprintln!("fresh member took over {:?} after the primary died", started.elapsed());
    let (_, state) = fresh.local_state(4);
    assert!(fresh_dir.join("raft/snapshot.json").exists(), "the fresh member did not catch up from a snapshot");
    for n in 0..40 {
        assert!(state.volume_by_name(&format!("v{n}")).is_some(), "the fresh member lacks volume v{n}");
    }
    assert!(state.volume_by_name("after-handover").is_some());
}

/// Mode changes that cannot work are refused with a clear error and change nothing.
#[test]
fn impossible_mode_changes_are_refused() {
    let c = Cluster::start_full(1, 1, "256MiB");
    let out = c.cli(&["cluster", "switch-mode", "3_node"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("needs 2 manager(s) and 1 tiebreaker(s)"), "{stderr}");
    let out = c.cli(&["cluster", "switch-mode", "4_node"]);
    assert!(text(&out.stderr).contains("expected 1_node, 3_node or 5_node"), "{}", describe(&out));
    let out = c.cli(&["mdm", "add", "--address", &format!("127.0.0.1:{}", c.spare_port(0))]);
    assert!(!out.status.success() && text(&out.stderr).contains("cannot reach an MDM"), "{}", describe(&out));
    let out = c.cli(&["mdm", "remove", "--id", "1"]);
    assert!(!out.status.success(), "{}", describe(&out));
    // A tiebreaker may not found a cluster of its own.
    let dir = c.dir.join("tb");
    let out = run(
        Command::new(BIN).arg("--config").arg(c.config()).args(["daemon", "mdm", "--dir"]).arg(&dir).args([
            "--id",
            "9",
            "--listen",
            &format!("127.0.0.1:{}", c.spare_port(1)),
            "--role",
            "tiebreaker",
        ]),
        CLI_TIMEOUT,
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("tiebreaker cannot start a cluster"),
        "{}",
        describe(&out)
    );
    let s = mdm_status(&c);
    assert_eq!((s["mode"].as_str(), s["members"].as_array().map(|m| m.len())), (Some("1_node"), Some(1)), "{s:#}");
}
