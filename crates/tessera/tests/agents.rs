//! Deployment from node attributes with real agents: each `tessera agent` runs as its own
//! process tree on its own loopback address with its own attribute directory and candidate
//! disks made of loop devices (blank, ext4, partitioned, mounted, read-only, swap), next to a
//! `tessera up --sds 0` cluster (an MDM and nothing else). The agents start their own SDS
//! and SDC processes; the tests check the exact layout that results.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// Agents of one test; `tessera down --dir` for each on drop (agent, then SDC, then SDS).
struct Agents {
    dirs: std::sync::Mutex<Vec<PathBuf>>,
}

impl Agents {
    fn new() -> Agents {
        Agents { dirs: std::sync::Mutex::new(Vec::new()) }
    }

    /// Writes `attrs` as attribute files in a fresh directory and starts an agent named
    /// `name` on 127.0.0.`ip` with `--detach`. Returns the agent's state directory.
    fn start(
        &self,
        c: &Cluster,
        name: &str,
        ip: u8,
        attrs: &[(&str, &str)],
        disks: &[&str],
        extra: &[&str],
    ) -> PathBuf {
        let (dir, mut cmd) = self.command(c, name, ip, attrs, disks, extra);
        let out = run(&mut cmd, UP_TIMEOUT);
        assert!(out.status.success(), "agent {name} did not start: {}\n{}", describe(&out), agent_log(&dir));
        dir
    }

    fn command(
        &self,
        c: &Cluster,
        name: &str,
        ip: u8,
        attrs: &[(&str, &str)],
        disks: &[&str],
        extra: &[&str],
    ) -> (PathBuf, Command) {
        let dir = fresh_dir(&format!("agent-{name}"));
        let attr_dir = dir.join("attributes");
        std::fs::create_dir_all(&attr_dir).unwrap();
        for (k, v) in attrs {
            std::fs::write(attr_dir.join(k), format!("{v}\n")).unwrap();
        }
        self.dirs.lock().unwrap().push(dir.clone());
        (dir.clone(), agent_command(c, &dir, name, ip, disks, extra))
    }
}

/// `tessera agent … --detach` for the agent whose files are under `dir`. With
/// `TESSERA_JOIN_TOKEN` in `extra_env` the agent gets no config file.
fn agent_command(c: &Cluster, dir: &Path, name: &str, ip: u8, disks: &[&str], extra: &[&str]) -> Command {
    let attr_dir = dir.join("attributes");
    let mut cmd = Command::new(BIN);
    cmd.env_remove("TESSERA_CONFIG").env_remove("TESSERA_JOIN_TOKEN");
    if !extra.contains(&"--join-with-token") {
        cmd.arg("--config").arg(c.config());
    } else {
        let token = c.ok(&["cluster", "join-token"]);
        cmd.env("TESSERA_JOIN_TOKEN", token.trim());
    }
    let extra: Vec<&str> = extra.iter().copied().filter(|a| *a != "--join-with-token").collect();
    cmd.args(["agent", "--name", name, "--address", &format!("127.0.0.{ip}")]);
    cmd.arg("--dir").arg(dir.join("state")).arg("--attributes-dir").arg(&attr_dir);
    cmd.args(["--disk-candidates", &disks.join(","), "--min-disk-size", "256MiB", "--interval-ms", "500"]);
    cmd.args(["--sds-base-port", &c.spare_port(0).to_string(), "--detach"]);
    // Agents sharing this machine would all want /run/docker/plugins/tessera.sock: only those
    // given their own socket run a volume service.
    if !extra.contains(&"--plugin-socket") {
        cmd.arg("--no-volumes");
    }
    cmd.args(extra);
    cmd
}

fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("state/agent.log")).unwrap_or_default()
}

impl Drop for Agents {
    fn drop(&mut self) {
        for dir in self.dirs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if std::thread::panicking() {
                let log = agent_log(dir);
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!(
                    "--- {} agent.log ---\n{}",
                    dir.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let mut down = Command::new(BIN);
            down.arg("down")
                .arg("--dir")
                .arg(dir.join("state"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Ok(mut child) = down.spawn() {
                let _ = wait_with_timeout(&mut child, CLI_TIMEOUT);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// (node, domain, pool, path, state) of every device.
fn devices(c: &Cluster) -> BTreeSet<(String, String, String, String, String)> {
    let v = c.json(&["device", "ls"]);
    v.as_array()
        .expect("device ls --json is a list")
        .iter()
        .map(|d| {
            let s = |k: &str| d[k].as_str().unwrap_or("-").to_string();
            (s("node"), s("protection_domain"), s("pool"), s("path"), s("state").to_lowercase())
        })
        .collect()
}

fn want(rows: &[(&str, &str, &str, &str)]) -> BTreeSet<(String, String, String, String, String)> {
    rows.iter()
        .map(|(n, d, p, path)| (n.to_string(), d.to_string(), p.to_string(), path.to_string(), "normal".to_string()))
        .collect()
}

fn wait_for_devices(c: &Cluster, expected: &BTreeSet<(String, String, String, String, String)>) {
    poll("the agents to reach the expected layout", POLL_TIMEOUT * 3, || {
        let now = devices(c);
        (now == *expected).then_some(())
    });
}

fn node_problems(c: &Cluster, name: &str) -> Vec<String> {
    let nodes = c.json(&["node", "ls"]);
    let node = nodes.as_array().unwrap().iter().find(|n| n["name"] == name).cloned().unwrap_or_default();
    node["problems"]
        .as_array()
        .map(|a| a.iter().map(|p| p.as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default()
}

fn mkfs_ext4(dev: &str) {
    tool_ok("mkfs.ext4", &["-q", "-F", dev]);
}

#[test]
fn global_pool_takes_only_blank_disks_adopts_a_later_node_and_removes_one() {
    let blank: Vec<LoopDevice> = (0..4).map(|_| LoopDevice::with(GIB, &[])).collect();
    let ext4 = LoopDevice::with(GIB, &[]);
    mkfs_ext4(&ext4.device);
    let parted = LoopDevice::with(GIB, &["-P"]);
    tool("sfdisk"); // asserts it is installed
    let script = format!("printf 'label: gpt\\n,128MiB\\n' | sfdisk --quiet {}", parted.device);
    let sfdisk = run(Command::new("sh").args(["-c", &script]), CLI_TIMEOUT);
    assert!(sfdisk.status.success(), "sfdisk: {}", describe(&sfdisk));
    let mounted = LoopDevice::with(GIB, &[]);
    mkfs_ext4(&mounted.device);
    let mount_point = fresh_dir("mnt");
    tool_ok("mount", &[&mounted.device, mount_point.to_str().unwrap()]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unmount = Unmount(mount_point.clone());
    let read_only = LoopDevice::with(GIB, &["-r"]);
    let small = LoopDevice::with(128 * MIB, &[]);

    let c = Cluster::start(0);
    let agents = Agents::new();
    let (b0, b1, b2, b3) = (&blank[0].device, &blank[1].device, &blank[2].device, &blank[3].device);
    agents.start(&c, "n1", 31, &[], &[b0, &ext4.device, &parted.device], &[]);
    agents.start(&c, "n2", 32, &[], &[b1, &mounted.device, &read_only.device], &[]);
    agents.start(&c, "n3", 33, &[("rack", "r3")], &[b2, &small.device, "/dev/tessera-does-not-exist"], &[]);
    wait_for_devices(
        &c,
        &want(&[("n1", "default", "default", b0), ("n2", "default", "default", b1), ("n3", "default", "default", b2)]),
    );
    // Why each other disk was left alone, as the node reports it.
    let show = c.ok(&["node", "show", "n1"]);
    assert!(show.contains("ext4") && show.contains("partition"), "{show}");
    let show = c.ok(&["node", "show", "n2"]);
    assert!(show.contains("mounted") && show.contains("read-only"), "{show}");
    let show = c.ok(&["node", "show", "n3"]);
    assert!(show.contains("smaller than") && show.contains("does not exist"), "{show}");
    // Data written now must survive the rebalance onto a node added later.
    let status = c.status();
    assert_eq!(status["pgs"]["unplaced_pgs"], 0, "{status:#}");
    c.ok(&["sdc", "ls"]);
    c.create_volume("v1", "64MiB");
    let sdc_socket = PathBuf::from(format!("{}/state/sdc.sock", agents.dirs.lock().unwrap()[0].display()));
    c.ok(&["volume", "map", "v1", "--sdc", "n1"]);
    let data = random_file(&c.dir.join("v1.bin"), 51, 64 * MIB as usize);
    let uri = format!("nbd+unix:///v1?socket={}", sdc_socket.display());
    tool_ok("nbdcopy", &[c.dir.join("v1.bin").to_str().unwrap(), &uri]);

    agents.start(&c, "n4", 34, &[], &[b3], &[]);
    wait_for_devices(
        &c,
        &want(&[
            ("n1", "default", "default", b0),
            ("n2", "default", "default", b1),
            ("n3", "default", "default", b2),
            ("n4", "default", "default", b3),
        ]),
    );
    poll("copies (with data) to move onto n4", POLL_TIMEOUT * 2, || {
        let sdss = c.json(&["sds", "ls"]);
        let n4 = sdss.as_array().unwrap().iter().find(|s| s["name"] == "n4.default").cloned().unwrap_or_default();
        let status = c.status();
        (n4["used_bytes"].as_u64().unwrap_or(0) > 0 && status["pgs"]["degraded_pgs"] == 0).then_some(())
    });

    // An agent that dies and restarts changes nothing: its SDS kept serving meanwhile and
    // keeps its port.
    let n1_dir = agents.dirs.lock().unwrap()[0].clone();
    let agent_pid: i32 = std::fs::read_to_string(n1_dir.join("state/agent.pid")).unwrap().trim().parse().unwrap();
    let sds_pid = std::fs::read_to_string(n1_dir.join("state/sds-default.pid")).unwrap();
    let before = c.json(&["sds", "ls"]);
    unsafe { libc::kill(agent_pid, libc::SIGKILL) };
    poll("the agent to die", POLL_TIMEOUT, || (!pid_alive(agent_pid)).then_some(()));
    let out = run(&mut agent_command(&c, &n1_dir, "n1", 31, &[b0, &ext4.device, &parted.device], &[]), UP_TIMEOUT);
    assert!(out.status.success(), "restarting n1's agent: {}", describe(&out));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        std::fs::read_to_string(n1_dir.join("state/sds-default.pid")).unwrap(),
        sds_pid,
        "the SDS was not restarted"
    );
    let after = c.json(&["sds", "ls"]);
    let addresses = |v: &serde_json::Value| {
        v.as_array().unwrap().iter().map(|s| (s["name"].to_string(), s["address"].to_string())).collect::<BTreeSet<_>>()
    };
    assert_eq!(addresses(&before), addresses(&after));

    // Removing a node drains it first; the data stays whole.
    c.ok(&["node", "remove", "n2", "--timeout-secs", "120"]);
    wait_for_devices(
        &c,
        &want(&[("n1", "default", "default", b0), ("n3", "default", "default", b2), ("n4", "default", "default", b3)]),
    );
    let nodes = c.json(&["node", "ls"]);
    assert!(nodes.as_array().unwrap().iter().all(|n| n["name"] != "n2"), "{nodes:#}");
    let back = c.dir.join("v1.back");
    tool_ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert_same_bytes("v1 after the rebalance and the removal", &data, &std::fs::read(&back).unwrap());
    c.verify("v1");
}

#[test]
fn bad_attributes_are_named_and_change_nothing_until_fixed() {
    let blank: Vec<LoopDevice> = (0..3).map(|_| LoopDevice::with(GIB, &[])).collect();
    let ext4 = LoopDevice::with(GIB, &[]);
    mkfs_ext4(&ext4.device);
    let c = Cluster::start(0);
    let agents = Agents::new();
    let (b0, b1, b2) = (blank[0].device.as_str(), blank[1].device.as_str(), blank[2].device.as_str());
    let twice = format!("{b0}, {b0}");
    let dir = agents.start(
        &c,
        "bad",
        41,
        &[("scaleio-sds-domains", "pd1"), ("scaleio-sds-pd1", "p1"), ("scaleio-sds-p1", &twice)],
        &[b0, &ext4.device],
        &[],
    );
    let problems = node_problems(&c, "bad");
    assert!(
        problems.iter().any(|p| p.starts_with("node bad: attribute scaleio-sds-p1 = ")
            && p.contains(b0)
            && p.contains("listed twice")),
        "{problems:?}"
    );
    // An in-use disk, named with node, attribute and value.
    std::fs::write(dir.join("attributes/scaleio-sds-p1"), format!("{b0},{}\n", ext4.device)).unwrap();
    poll("the in-use disk to be reported", POLL_TIMEOUT, || {
        node_problems(&c, "bad")
            .into_iter()
            .find(|p| p.contains("in use: holds an ext4 filesystem") && p.contains("scaleio-sds-p1"))
    });
    // A typo'd key (the framework's documented `scaleio-sdc-mydomain1`) is named too.
    std::fs::write(dir.join("attributes/scaleio-sds-p1"), format!("{b0}\n")).unwrap();
    std::fs::write(dir.join("attributes/scaleio-sdc-pd11"), "p1\n").unwrap();
    poll("the typo to be reported", POLL_TIMEOUT, || {
        node_problems(&c, "bad")
            .into_iter()
            .find(|p| p.contains("scaleio-sdc-pd11") && p.contains("no domain or pool list"))
    });
    assert!(devices(&c).is_empty(), "a node with bad attributes contributes nothing");
    // Fixed: the node joins with exactly what it lists, and two more nodes make a pool.
    std::fs::remove_file(dir.join("attributes/scaleio-sdc-pd11")).unwrap();
    // good3 joins with a token instead of a config file.
    for (name, ip, disk, how) in [("good2", 42, b1, ""), ("good3", 43, b2, "--join-with-token")] {
        agents.start(
            &c,
            name,
            ip,
            &[("tessera-sds-domains", "pd1"), ("tessera-sds-pd1", "p1"), ("tessera-sds-p1", disk)],
            &[disk],
            &[how].into_iter().filter(|h| !h.is_empty()).collect::<Vec<_>>(),
        );
    }
    wait_for_devices(&c, &want(&[("bad", "pd1", "p1", b0), ("good2", "pd1", "p1", b1), ("good3", "pd1", "p1", b2)]));
    let good3 = agents.dirs.lock().unwrap().last().unwrap().join("state");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(good3.join("tessera.toml")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the config made from the token holds the secret");
    let pid = std::fs::read_to_string(good3.join("agent.pid")).unwrap();
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap()).to_string();
    let secret = c.ok(&["cluster", "join-token"]).split(':').nth(2).unwrap().split('@').next().unwrap().to_string();
    assert!(!cmdline.contains(&secret), "the secret shows in the agent's command line: {cmdline}");
    assert!(node_problems(&c, "bad").is_empty());
    // Taking a device out of the attribute drains and removes it.
    std::fs::write(dir.join("attributes/scaleio-sds-p1"), "\n").unwrap();
    poll("an empty device list to be refused", POLL_TIMEOUT, || {
        node_problems(&c, "bad").into_iter().find(|p| p.contains("empty item"))
    });
    std::fs::write(dir.join("attributes/scaleio-sds-domains"), "\n").unwrap();
    std::fs::remove_file(dir.join("attributes/scaleio-sds-pd1")).unwrap();
    std::fs::remove_file(dir.join("attributes/scaleio-sds-p1")).unwrap();
    std::fs::write(dir.join("attributes/scaleio-sdc-domains"), "pd1\n").unwrap();
    std::fs::remove_file(dir.join("attributes/scaleio-sds-domains")).unwrap();
    wait_for_devices(&c, &want(&[("good2", "pd1", "p1", b1), ("good3", "pd1", "p1", b2)]));
    let nodes = c.json(&["node", "ls"]);
    let bad = nodes.as_array().unwrap().iter().find(|n| n["name"] == "bad").unwrap();
    assert_eq!(bad["method"], "imperative", "an SDC-only node is still imperative: it never auto-contributes");
    assert_eq!(bad["sds"].as_array().unwrap().len(), 0, "{bad:#}");
}

/// Makes `/dev/xvdf` exist as a bind-mount target for the seed's attribute files; each agent
/// runs in its own mount namespace where its loop device is bound over it.
struct XvdfPlaceholder {
    created: bool,
}

impl XvdfPlaceholder {
    fn new() -> XvdfPlaceholder {
        let path = Path::new("/dev/xvdf");
        if path.exists() {
            return XvdfPlaceholder { created: false };
        }
        std::fs::File::create(path).expect("creating /dev/xvdf as a bind-mount target (needs root)");
        XvdfPlaceholder { created: true }
    }
}

impl Drop for XvdfPlaceholder {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file("/dev/xvdf");
        }
    }
}

/// Starts an agent inside a private mount namespace where `disk` is bound over /dev/xvdf.
fn start_in_namespace(
    agents: &Agents,
    c: &Cluster,
    name: &str,
    ip: u8,
    attrs: &[(&str, &str)],
    disk: &str,
    extra: &[&str],
) {
    let (dir, inner) = agents.command(c, name, ip, attrs, &["/dev/xvdf"], extra);
    let mut argv: Vec<String> = vec![inner.get_program().to_string_lossy().to_string()];
    argv.extend(inner.get_args().map(|a| a.to_string_lossy().to_string()));
    let script = format!("mount --bind {disk} /dev/xvdf && exec \"$@\"");
    let mut cmd = tool("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script, "sh"])
        .args(&argv)
        .env_remove("TESSERA_CONFIG");
    let out = run(&mut cmd, UP_TIMEOUT);
    assert!(
        out.status.success(),
        "agent {name} in its namespace did not start: {}\n{}",
        describe(&out),
        agent_log(&dir)
    );
}

#[test]
fn seed_examples_verbatim_sixteen_agents_with_dev_xvdf() {
    let _xvdf = XvdfPlaceholder::new();
    let disks: Vec<LoopDevice> = (0..16).map(|_| LoopDevice::with(GIB, &[])).collect();

    // 1. Every agent: /dev/xvdf in mydomain/mypool, consuming mydomain/mypool.
    {
        let c = Cluster::start(0);
        let agents = Agents::new();
        let seed = [
            ("scaleio-sds-domains", "mydomain"),
            ("scaleio-sds-mydomain", "mypool"),
            ("scaleio-sds-mypool", "/dev/xvdf"),
            ("scaleio-sdc-domains", "mydomain"),
            ("scaleio-sdc-mydomain", "mypool"),
        ];
        for (i, d) in disks.iter().enumerate() {
            start_in_namespace(&agents, &c, &format!("agent{}", i + 1), 101 + i as u8, &seed, &d.device, &[]);
        }
        let rows: Vec<(String, &str, &str, &str)> =
            (1..=16).map(|n| (format!("agent{n}"), "mydomain", "mypool", "/dev/xvdf")).collect();
        let rows: Vec<(&str, &str, &str, &str)> = rows.iter().map(|(n, d, p, x)| (n.as_str(), *d, *p, *x)).collect();
        wait_for_devices(&c, &want(&rows));
        poll("every agent's SDC to register", POLL_TIMEOUT, || {
            let sdcs = c.json(&["sdc", "ls"]);
            let names: BTreeSet<String> =
                sdcs.as_array()?.iter().filter_map(|x| x["name"].as_str().map(String::from)).collect();
            (1..=16).all(|n| names.contains(&format!("agent{n}"))).then_some(())
        });
        let status = c.status();
        assert_eq!(status["pgs"]["unplaced_pgs"], 0, "{status:#}");
        c.create_volume("seed1", "32MiB");
        // Stop the agents and their SDSs before the next cluster takes the same disks.
        drop(agents);
    }
    // The disks now hold the first cluster's superblocks: another cluster must refuse them
    // rather than format them... unless they are wiped, as an operator would.
    for d in &disks {
        tool_ok("wipefs", &["-a", "-q", &d.device]);
        let out = run(
            Command::new("dd").args(["if=/dev/zero", &format!("of={}", d.device), "bs=1M", "count=1", "conv=fsync"]),
            CLI_TIMEOUT,
        );
        assert!(out.status.success(), "{}", describe(&out));
    }

    // 2. Nodes 1-8 give /dev/xvdf to engineering/qe, nodes 9-16 to engineering/development.
    let c = Cluster::start(0);
    let agents = Agents::new();
    for (i, d) in disks.iter().enumerate() {
        let pool = if i < 8 { "qe" } else { "development" };
        let pool_key = format!("scaleio-sds-{pool}");
        let attrs = [
            ("scaleio-sds-domains", "engineering"),
            ("scaleio-sds-engineering", pool),
            (pool_key.as_str(), "/dev/xvdf"),
        ];
        start_in_namespace(&agents, &c, &format!("agent{}", i + 1), 121 + i as u8, &attrs, &d.device, &["--no-sdc"]);
    }
    let rows: Vec<(String, &str, &str, &str)> = (1..=16)
        .map(|n| (format!("agent{n}"), "engineering", if n <= 8 { "qe" } else { "development" }, "/dev/xvdf"))
        .collect();
    let rows: Vec<(&str, &str, &str, &str)> = rows.iter().map(|(n, d, p, x)| (n.as_str(), *d, *p, *x)).collect();
    wait_for_devices(&c, &want(&rows));
    let pds = c.json(&["pd", "ls"]);
    assert_eq!(pds.as_array().unwrap().len(), 1, "{pds:#}");
    let sdss = c.json(&["sds", "ls"]);
    assert_eq!(sdss.as_array().unwrap().len(), 16, "one SDS per node");
}

#[test]
fn declarative_plan_then_apply_reaches_the_plan_with_fault_sets() {
    // Six nodes on three racks, each with a 1 GiB and a 2 GiB disk.
    let small: Vec<LoopDevice> = (0..6).map(|_| LoopDevice::with(GIB, &[])).collect();
    let big: Vec<LoopDevice> = (0..6).map(|_| LoopDevice::with(2 * GIB, &[])).collect();
    let c = Cluster::start(0);
    let agents = Agents::new();
    for i in 0..6 {
        let rack = format!("r{}", i % 3 + 1);
        let row = if i < 3 { "a" } else { "b" };
        agents.start(
            &c,
            &format!("d{}", i + 1),
            51 + i as u8,
            &[("rack", &rack), ("row", row)],
            &[&small[i].device, &big[i].device],
            &["--no-global-pool", "--no-sdc", "--mdm-port", &c.spare_port(1).to_string()],
        );
    }
    assert!(devices(&c).is_empty(), "--no-global-pool and no spec: nothing is taken");
    let spec = c.dir.join("spec.toml");
    std::fs::write(
        &spec,
        r#"
fault_set_key = "rack"
mdm_mode = "3_node"

[[pool]]
domain = "prod"
name = "fast"
devices = { max_size = "1GiB" }

[[pool]]
domain = "prod"
name = "bulk"
nodes = { row = "b" }
devices = { min_size = "2GiB" }
"#,
    )
    .unwrap();
    let plan = c.ok(&["deploy", "plan", spec.to_str().unwrap()]);
    assert!(plan.contains("+ protection domain prod"), "{plan}");
    assert!(plan.contains("+ fault set prod/r1") && plan.contains("+ fault set prod/r3"), "{plan}");
    assert!(plan.contains(&format!("+ device d4:{} -> pool bulk", big[3].device)), "{plan}");
    assert!(!plan.contains(&format!("d1:{} -> pool bulk", big[0].device)), "row a has no bulk: {plan}");
    assert!(plan.contains("MDM placement for 3_node"), "{plan}");
    let applied = c.ok(&["deploy", "apply", spec.to_str().unwrap(), "--timeout-secs", "120"]);
    assert!(applied.contains("the cluster matches the plan"), "{applied}");
    // The MDMs moved onto three nodes, one per rack (apply waited for that too).
    let mdm = c.json(&["mdm", "ls"]);
    let voter_addresses: BTreeSet<String> = mdm["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["voter"] == true)
        .map(|m| m["address"].as_str().unwrap().rsplit_once(':').unwrap().0.to_string())
        .collect();
    assert_eq!(mdm["mode"], "3_node", "{mdm:#}");
    let racks: BTreeSet<u8> =
        voter_addresses.iter().map(|a| (a.rsplit('.').next().unwrap().parse::<u8>().unwrap() - 51) % 3).collect();
    assert_eq!((voter_addresses.len(), racks.len()), (3, 3), "MDM voters on distinct racks: {mdm:#}");
    let again = c.ok(&["deploy", "plan", spec.to_str().unwrap()]);
    assert!(again.contains("no changes"), "a second plan shows no difference: {again}");
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    for i in 0..6 {
        rows.push((format!("d{}", i + 1), "prod".into(), "fast".into(), small[i].device.clone()));
        if i >= 3 {
            rows.push((format!("d{}", i + 1), "prod".into(), "bulk".into(), big[i].device.clone()));
        }
    }
    let rows: Vec<(&str, &str, &str, &str)> =
        rows.iter().map(|(a, b, c2, d)| (a.as_str(), b.as_str(), c2.as_str(), d.as_str())).collect();
    assert_eq!(devices(&c), want(&rows));
    let fault_sets = c.json(&["fault-set", "ls"]);
    assert_eq!(fault_sets.as_array().unwrap().len(), 3, "{fault_sets:#}");

    // A spec that moves d1's disk out of fast into its own pool: drained first (the data
    // written meanwhile stays whole), removed, cleared, re-added.
    c.ok(&["volume", "create", "f1", "--size", "32MiB", "--pool", "fast"]);
    let uri = c.map("f1");
    let data = random_file(&c.dir.join("f1.bin"), 52, 32 * MIB as usize);
    tool_ok("nbdcopy", &[c.dir.join("f1.bin").to_str().unwrap(), &uri]);
    let spec2 = c.dir.join("spec2.toml");
    let spec2_text = std::fs::read_to_string(&spec).unwrap().replace(
        "name = \"fast\"\n",
        "name = \"fast\"\nnodes = { node = [\"d2\", \"d3\", \"d4\", \"d5\", \"d6\"] }\n",
    ) + "\n[[pool]]\ndomain = \"prod\"\nname = \"edge\"\nnodes = { node = \"d1\" }\ndevices = { max_size = \"1GiB\" }\n";
    std::fs::write(&spec2, spec2_text).unwrap();
    let plan = c.ok(&["deploy", "plan", spec2.to_str().unwrap()]);
    let moved = format!("~ device d1:{} pool fast -> edge (drain, remove, re-add)", small[0].device);
    assert!(plan.contains(&moved), "{plan}");
    c.ok(&["deploy", "apply", spec2.to_str().unwrap(), "--timeout-secs", "120"]);
    let now = devices(&c);
    assert!(
        now.contains(&("d1".into(), "prod".into(), "edge".into(), small[0].device.clone(), "normal".into())),
        "{now:?}"
    );
    assert_eq!(now.iter().filter(|d| d.2 == "fast").count(), 5, "{now:?}");
    c.verify("f1");
    let back = c.dir.join("f1.back");
    tool_ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert_same_bytes("f1 after d1's disk moved out of fast", &data, &std::fs::read(&back).unwrap());
    // Clearing the spec would leave pools holding volumes without devices: refused.
    let out = c.cli(&["deploy", "clear"]);
    assert!(!out.status.success() && text(&out.stderr).contains("pool fast holds 1 volume(s)"), "{}", describe(&out));

    // Fewer than three fault sets is refused with a clear message, and nothing changes.
    let spec3 = c.dir.join("spec3.toml");
    std::fs::write(&spec3, "fault_set_key = \"row\"\n[[pool]]\ndomain = \"other\"\nname = \"x\"\n").unwrap();
    let out = c.cli(&["deploy", "apply", spec3.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("has only 2 (a, b); at least 3"), "{err}");
}

#[test]
fn personas_move_the_mdm_cluster_onto_their_nodes() {
    // Declared before the cluster and the agents: dropped after them.
    let blank: Vec<LoopDevice> = (0..4).map(|_| LoopDevice::with(GIB, &[])).collect();
    let c = Cluster::start(0);
    let agents = Agents::new();
    let mdm_port = c.spare_port(1).to_string();
    let mut dirs = Vec::new();
    for (i, persona) in ["primary", "secondary", "tiebreaker"].iter().enumerate() {
        let name = format!("m{}", i + 1);
        let attrs = [("scaleio-persona", *persona)];
        dirs.push(agents.start(&c, &name, 61 + i as u8, &attrs, &[&blank[i].device], &["--mdm-port", &mdm_port]));
    }
    let plan = c.ok(&["deploy", "plan"]);
    assert!(plan.contains("MDM placement for 3_node: managers m1, m2"), "{plan}");
    let ids: Vec<u64> = poll("MDM ids for the three nodes", POLL_TIMEOUT, || {
        let all: Vec<u64> =
            ["m1", "m2", "m3"].iter().filter_map(|n| c.json(&["node", "show", n])["node"]["mdm_id"].as_u64()).collect();
        (all.len() == 3).then_some(all)
    });
    let mdm = poll("the MDM cluster to move onto m1, m2, m3 with m1 leading", POLL_TIMEOUT * 3, || {
        let m = c.json(&["mdm", "ls"]);
        let voters: BTreeSet<u64> =
            m["members"].as_array()?.iter().filter(|x| x["voter"] == true).filter_map(|x| x["id"].as_u64()).collect();
        (m["mode"] == "3_node" && voters == ids.iter().copied().collect() && m["leader_id"].as_u64() == Some(ids[0]))
            .then_some(m)
    });
    let old = mdm["members"].as_array().unwrap().iter().find(|x| x["id"] == 1).cloned().unwrap_or_default();
    assert_eq!(old["voter"], false, "the local MDM stays, as a standby: {mdm:#}");
    let roles: Vec<String> = ids
        .iter()
        .map(|id| mdm["members"].as_array().unwrap().iter().find(|x| x["id"] == *id).unwrap()["role"].to_string())
        .collect();
    assert_eq!(roles, ["\"manager\"", "\"manager\"", "\"tiebreaker\""], "{mdm:#}");
    // The storage was laid out meanwhile, and the MDMs on the nodes carry the cluster: with
    // m1's MDM killed, m2 takes over and metadata changes go on.
    wait_for_devices(
        &c,
        &want(&[
            ("m1", "default", "default", &blank[0].device),
            ("m2", "default", "default", &blank[1].device),
            ("m3", "default", "default", &blank[2].device),
        ]),
    );
    // Removing the tiebreaker's node moves its vote to a node added for it, removes its MDM
    // (id retired), then forgets the node.
    agents.start(&c, "m4", 64, &[], &[&blank[3].device], &["--mdm-port", &mdm_port]);
    c.ok(&["node", "remove", "m3", "--timeout-secs", "120"]);
    let m4_id = c.json(&["node", "show", "m4"])["node"]["mdm_id"].as_u64().expect("m4 runs an MDM");
    let mdm = c.json(&["mdm", "ls"]);
    let voters: BTreeSet<u64> = mdm["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["voter"] == true)
        .filter_map(|x| x["id"].as_u64())
        .collect();
    assert_eq!(voters, [ids[0], ids[1], m4_id].into_iter().collect(), "{mdm:#}");
    assert!(mdm["members"].as_array().unwrap().iter().all(|x| x["id"] != ids[2]), "m3's MDM left: {mdm:#}");

    let m1_mdm: i32 = std::fs::read_to_string(dirs[0].join("state/mdm.pid")).unwrap().trim().parse().unwrap();
    // The agent would restart it: stop the agent first.
    let agent: i32 = std::fs::read_to_string(dirs[0].join("state/agent.pid")).unwrap().trim().parse().unwrap();
    unsafe {
        libc::kill(agent, libc::SIGKILL);
        libc::kill(m1_mdm, libc::SIGKILL);
    }
    poll("m2 to lead", POLL_TIMEOUT, || (c.json(&["mdm", "ls"])["leader_id"].as_u64() == Some(ids[1])).then_some(()));
    c.create_volume("after-failover", "16MiB");
}

#[test]
fn sdc_keys_choose_the_pool_of_the_nodes_volume_service() {
    let disks: Vec<LoopDevice> = (0..4).map(|_| LoopDevice::with(GIB, &[])).collect();
    /// Removes the volume service's directory last (after the agents released its mounts).
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let vdir = fresh_dir("v2-volumes");
    let _remove_vdir = RemoveDir(vdir.clone());
    let c = Cluster::start(0);
    let agents = Agents::new();
    let socket_dir = vdir.join("plugins");
    let socket = socket_dir.join("tessera.sock");
    let mut v2_dir = PathBuf::new();
    for (i, name) in ["v1", "v2"].iter().enumerate() {
        let (a, b) = (disks[2 * i].device.as_str(), disks[2 * i + 1].device.as_str());
        let mut attrs = vec![
            ("tessera-sds-domains", "pd1"),
            ("tessera-sds-pd1", "p1,p2"),
            ("tessera-sds-p1", a),
            ("tessera-sds-p2", b),
        ];
        let mut extra: Vec<&str> = Vec::new();
        let (socket_arg, vdir_arg) = (socket.display().to_string(), vdir.display().to_string());
        if *name == "v2" {
            attrs.extend([("scaleio-sdc-domains", "pd1"), ("scaleio-sdc-pd1", "p2")]);
            extra.extend(["--plugin-socket", &socket_arg, "--volumes-dir", &vdir_arg]);
        }
        let dir = agents.start(&c, name, 71 + i as u8, &attrs, &[a, b], &extra);
        if *name == "v2" {
            v2_dir = dir;
        }
    }
    wait_for_devices(
        &c,
        &want(&[
            ("v1", "pd1", "p1", &disks[0].device),
            ("v1", "pd1", "p2", &disks[1].device),
            ("v2", "pd1", "p1", &disks[2].device),
            ("v2", "pd1", "p2", &disks[3].device),
        ]),
    );
    let dvdcli = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("dvdcli")
            .args(args)
            .env("TESSERA_PLUGIN_SOCKET_DIRS", &socket_dir)
            .env("TESSERA_PLUGIN_SPEC_DIRS", &socket_dir);
        run(&mut cmd, UP_TIMEOUT)
    };
    let pool_of = |volume: &str| {
        let vols = c.json(&["volume", "ls"]);
        let v = vols.as_array().unwrap().iter().find(|v| v["name"] == volume).cloned().unwrap_or_default();
        let pools = c.json(&["pool", "ls"]);
        let pool = pools.as_array().unwrap().iter().find(|p| p["id"] == v["pool_id"]).cloned().unwrap_or_default();
        pool["name"].as_str().map(String::from).unwrap_or_else(|| format!("{v} in {pools}"))
    };
    poll("v2's volume service", POLL_TIMEOUT, || std::os::unix::net::UnixStream::connect(&socket).ok());
    // The node consumes pd1/p2: a volume created without a type lands there.
    let out = dvdcli(&["mount", "--volumedriver=tessera", "--volumename=dv", "--volumeopts=size=1"]);
    assert!(out.status.success(), "{}", describe(&out));
    let mount = text(&out.stdout).trim().to_string();
    std::fs::write(Path::new(&mount).join("hello"), "from v2").unwrap();
    assert_eq!(pool_of("dv"), "p2");
    let out = dvdcli(&["unmount", "--volumedriver=tessera", "--volumename=dv"]);
    assert!(out.status.success(), "{}", describe(&out));
    // The node now consumes p1: the service restarts with that pool.
    std::fs::write(v2_dir.join("attributes/scaleio-sdc-pd1"), "p1\n").unwrap();
    poll("the volume service to switch to p1", POLL_TIMEOUT, || {
        let pid = std::fs::read_to_string(v2_dir.join("state/volumes.pid")).ok()?;
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).ok()?;
        String::from_utf8_lossy(&cmdline).contains("--default-pool\0p1").then_some(())
    });
    poll("the restarted volume service", POLL_TIMEOUT, || std::os::unix::net::UnixStream::connect(&socket).ok());
    let out = dvdcli(&["mount", "--volumedriver=tessera", "--volumename=dv2", "--volumeopts=size=1"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(pool_of("dv2"), "p1");
    let out = dvdcli(&["unmount", "--volumedriver=tessera", "--volumename=dv2"]);
    assert!(out.status.success(), "{}", describe(&out));
    // dv kept its data across the restart.
    let out = dvdcli(&["mount", "--volumedriver=tessera", "--volumename=dv"]);
    assert!(out.status.success(), "{}", describe(&out));
    let mount = text(&out.stdout).trim().to_string();
    assert_eq!(std::fs::read_to_string(Path::new(&mount).join("hello")).unwrap(), "from v2");
    // `tessera down` on the agent's directory releases what the node's service mounted.
    let out = run(Command::new(BIN).arg("down").arg("--dir").arg(v2_dir.join("state")), CLI_TIMEOUT);
    assert!(out.status.success(), "{}", describe(&out));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(vdir.to_str().unwrap()), "still mounted after down: {mounts}");
}
