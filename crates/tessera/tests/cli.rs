//! The admin CLI as a user meets it: clear one-line errors, JSON listings, cluster status,
//! exclusive mapping and volume growth.

mod common;

use common::*;

/// Asserts a CLI call failed with exactly one stderr line, starting `error:` and containing
/// every one of `mentions` (case-insensitive).
fn assert_clear_error(c: &Cluster, args: &[&str], mentions: &[&str]) {
    let out = c.cli(args);
    assert!(!out.status.success(), "tessera {args:?} succeeded: {}", describe(&out));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "tessera {args:?}: expected one stderr line: {}", describe(&out));
    assert!(lines[0].starts_with("error: "), "tessera {args:?}: {:?} does not start with \"error: \"", lines[0]);
    for m in mentions {
        assert!(
            lines[0].to_lowercase().contains(&m.to_lowercase()),
            "tessera {args:?}: {:?} does not mention {m:?}",
            lines[0]
        );
    }
}

#[test]
fn invalid_names_sizes_and_duplicates_get_clear_errors() {
    let c = Cluster::start(2);
    c.create_volume("taken", "16MiB");
    c.create_volume("idle", "16MiB");
    let long = "x".repeat(32);
    let sds1_addr = c.sds_addr(1);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["volume", "create", "bad name", "--size", "1GiB"], vec!["bad name", "invalid name"]),
        (vec!["volume", "create", "--size", "1GiB", "--", "-dash"], vec!["-dash", "must start"]),
        (vec!["volume", "create", "a/b", "--size", "1GiB"], vec!["a/b", "not allowed"]),
        (vec!["volume", "create", ".hidden", "--size", "1GiB"], vec![".hidden", "must start"]),
        (vec!["volume", "create", long.as_str(), "--size", "1GiB"], vec![long.as_str(), "31"]),
        (vec!["volume", "create", "v", "--size", "1X"], vec!["1X", "size"]),
        (vec!["volume", "create", "v", "--size", "abc"], vec!["abc", "size"]),
        (vec!["volume", "create", "v", "--size=-1"], vec!["-1", "size"]),
        (vec!["volume", "create", "v", "--size", "0"], vec!["size"]),
        (vec!["volume", "create", "v", "--size", "1000"], vec!["1000", "extent size"]),
        (vec!["volume", "create", "v", "--size", "99999999999T"], vec!["size"]),
        (vec!["volume", "create", "v", "--size", "2PiB"], vec!["size"]),
        (vec!["volume", "create", "v", "--size", "1GiB", "--pool", "nopool"], vec!["nopool", "not found"]),
        (vec!["volume", "create", "taken", "--size", "16MiB"], vec!["taken", "already exists"]),
        (vec!["volume", "grow", "taken", "--size", "8MiB"], vec!["taken", "only grow"]),
        (vec!["volume", "grow", "ghost", "--size", "32MiB"], vec!["ghost", "not found"]),
        (vec!["volume", "remove", "ghost"], vec!["ghost", "not found"]),
        (vec!["volume", "map", "ghost"], vec!["ghost", "not found"]),
        (vec!["volume", "unmap", "idle"], vec!["idle", "not mapped"]),
        (vec!["volume", "map", "taken", "--sdc", "nosdc"], vec!["nosdc", "not found"]),
        (vec!["volume", "show", "ghost"], vec!["ghost", "not found"]),
        (vec!["volume", "verify", "ghost"], vec!["ghost", "not found"]),
        (vec!["pd", "create", "default"], vec!["default", "already exists"]),
        (vec!["pd", "create", "bad name"], vec!["bad name", "invalid name"]),
        (vec!["pd", "remove", "default"], vec!["default", "in use"]),
        (vec!["pool", "create", "p2", "--pd", "nopd"], vec!["nopd", "not found"]),
        (vec!["pool", "create", "default", "--pd", "default"], vec!["default", "already exists"]),
        (vec!["pool", "create", "p3", "--pd", "default", "--extent-size", "3KiB"], vec!["extent size"]),
        (vec!["pool", "create", "p4", "--pd", "default", "--pg-count", "0"], vec!["pg count"]),
        (vec!["pool", "set-spare", "default", "--spare-percent", "100"], vec!["100"]),
        (vec!["sds", "add", "sds-1", "--pd", "default", "--address", "127.0.0.1:1"], vec!["sds-1", "already exists"]),
        (vec!["sds", "add", "sdsx", "--pd", "default", "--address", "not-an-address"], vec!["not-an-address"]),
        (vec!["sds", "add", "sdsy", "--pd", "default", "--address", &sds1_addr], vec![&sds1_addr, "already exists"]),
        (vec!["sds", "remove", "sds-1"], vec!["sds-1", "in use"]),
        (
            vec!["device", "add", "--sds", "sds-1", "--pool", "default", "--path", "relative/path"],
            vec!["relative/path", "absolute"],
        ),
        (vec!["device", "add", "--sds", "sds-1", "--pool", "default", "--path", "/a/../b"], vec!["/a/../b"]),
        (
            vec!["device", "add", "--sds", "ghost", "--pool", "default", "--path", "/dev/null"],
            vec!["ghost", "not found"],
        ),
        (vec!["sdc", "remove", "sdc-1"], vec![]), // fine only if nothing is mapped: see below
    ];
    // sdc-1 has nothing mapped yet, so removing it would succeed; map first to make it in use.
    c.map("taken");
    for (args, mentions) in &cases {
        if args.as_slice() == ["sdc", "remove", "sdc-1"] {
            assert_clear_error(&c, args, &["sdc-1", "in use"]);
        } else {
            assert_clear_error(&c, args, mentions);
        }
    }
    // A config that does not exist, and one that is not valid.
    let out = run(
        std::process::Command::new(BIN).args(["--config", "/nonexistent/tessera.toml", "volume", "list"]),
        CLI_TIMEOUT,
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", describe(&out));
    assert!(stderr.starts_with("error: ") && stderr.contains("/nonexistent/tessera.toml"), "{}", describe(&out));
    let broken = c.dir.join("broken.toml");
    std::fs::write(&broken, "secret = \"zz\"\nmdm = []\ncluster_id = \"x\"\n").unwrap();
    let out = run(std::process::Command::new(BIN).arg("--config").arg(&broken).args(["volume", "list"]), CLI_TIMEOUT);
    assert!(!out.status.success());
    assert_eq!(text(&out.stderr).lines().count(), 1, "{}", describe(&out));
    assert!(text(&out.stderr).starts_with("error: "), "{}", describe(&out));

    // Nothing above changed the cluster.
    let volumes = c.json(&["volume", "list"]);
    assert_eq!(volumes.as_array().map(|v| v.len()), Some(2), "{volumes:#}");
    assert_eq!(c.json(&["pool", "list"]).as_array().map(|v| v.len()), Some(1));
    assert_eq!(c.json(&["sds", "list"]).as_array().map(|v| v.len()), Some(2));
}

#[test]
fn listings_have_json() {
    let c = Cluster::start(2);
    c.ok(&["fault-set", "create", "--pd", "default", "fs1"]);
    c.volume("listed", "16MiB");
    let expect_names = |what: &[&str], names: &[&str]| {
        let v = c.json(what);
        let arr = v.as_array().unwrap_or_else(|| panic!("{what:?} --json is not an array: {v:#}"));
        let mut got: Vec<&str> = arr.iter().filter_map(|x| x["name"].as_str()).collect();
        got.sort_unstable();
        assert_eq!(got, names, "{what:?}: {v:#}");
    };
    expect_names(&["pd", "list"], &["default"]);
    expect_names(&["fault-set", "list"], &["fs1"]);
    expect_names(&["pool", "list"], &["default"]);
    expect_names(&["sds", "list"], &["sds-1", "sds-2"]);
    expect_names(&["volume", "list"], &["listed"]);
    expect_names(&["sdc", "list"], &["sdc-1"]);
    let devices = c.json(&["device", "list"]);
    let devices = devices.as_array().expect("device list is an array");
    assert_eq!(devices.len(), 2);
    for d in devices {
        assert!(d["path"].as_str().is_some_and(|p| p.ends_with("disk0.img")), "{d}");
        assert!(d["capacity_bytes"].as_u64().is_some_and(|b| b > 0), "{d}");
    }
    // The `ls` aliases answer the same.
    let via_alias = c.json(&["volume", "ls"]);
    assert_eq!(via_alias, c.json(&["volume", "list"]));
    // Shows are JSON too.
    let v = c.json(&["volume", "show", "listed"]);
    assert_eq!(v["size_bytes"].as_u64(), Some(16 * MIB), "{v:#}");
    let p = c.json(&["pool", "show", "default"]);
    assert_eq!(p["extent_size_bytes"].as_u64(), Some(EXTENT_BYTES), "{p:#}");
    let s = c.json(&["sds", "show", "sds-1"]);
    assert_eq!(s["devices"].as_array().map(|d| d.len()), Some(1), "{s:#}");
    let pd = c.json(&["pd", "show", "default"]);
    assert_eq!(pd["fault_sets"], serde_json::json!(["fs1"]), "{pd:#}");
}

#[test]
fn cluster_status_json_reports_members_sdss_and_pgs() {
    let c = Cluster::start(3);
    let s = c.status();
    let members = s["mdm_members"].as_array().expect("mdm_members");
    assert_eq!(members.len(), 1, "{s:#}");
    let m = &members[0];
    assert!(m["id"].as_u64().is_some(), "{m}");
    assert_eq!(m["address"].as_str(), Some(c.mdm_addr().as_str()), "{m}");
    assert!(m["role"].as_str().is_some_and(|r| !r.is_empty()), "{m}");
    assert_eq!(m["is_leader"].as_bool(), Some(true), "{m}");
    assert_eq!(s["leader_id"], m["id"], "{s:#}");
    let sdss = s["sdss"].as_array().expect("sdss");
    assert_eq!(sdss.len(), 3, "{s:#}");
    for (n, sds) in (1..=3).zip(sdss) {
        assert_eq!(sds["state"], "up", "{sds}");
        assert_eq!(sds["devices"].as_u64(), Some(1), "{sds}");
        assert!(sds["capacity_bytes"].as_u64().is_some_and(|b| b > GIB), "{sds}");
        assert!(sds["used_bytes"].as_u64().is_some(), "{sds}");
        assert!(
            sdss.iter().any(|x| x["name"] == format!("sds-{n}") && x["address"] == c.sds_addr(n)),
            "sds-{n} missing: {s:#}"
        );
    }
    assert_eq!(s["pgs"]["total_pgs"].as_u64(), Some(256), "{s:#}");
    assert_eq!(s["pgs"]["healthy_pgs"].as_u64(), Some(256), "{s:#}");
    assert_eq!(s["pgs"]["degraded_pgs"].as_u64(), Some(0), "{s:#}");
    assert_eq!(s["pgs"]["unplaced_pgs"].as_u64(), Some(0), "{s:#}");
    assert_eq!(s["sdcs"].as_u64(), Some(1), "{s:#}");
    // The table form says the same.
    let table = c.ok(&["cluster", "status"]);
    assert!(table.contains("256 healthy") && table.contains("0 degraded"), "{table}");
}

#[test]
fn map_is_exclusive_unless_multi_map() {
    let c = Cluster::start(2);
    let socket2 = c.dir.join("sdc-2.sock");
    c.spawn_daemon("sdc-2", &["sdc", "--name", "sdc-2", "--socket", socket2.to_str().unwrap()]);
    poll("sdc-2 to register and listen", POLL_TIMEOUT, || {
        assert!(c.extra_daemon_running("sdc-2"), "sdc-2 exited: {}", c.log_tail("sdc-2", 20));
        let sdcs = c.json(&["sdc", "list"]);
        (socket2.exists() && sdcs.as_array().is_some_and(|a| a.len() == 2)).then_some(())
    });
    let list_on = |socket: &std::path::Path| -> Vec<String> {
        let out = tool_ok("nbdinfo", &["--list", "--json", &format!("nbd+unix://?socket={}", socket.display())]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
        let mut names: Vec<String> = v["exports"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["export-name"].as_str().map(String::from)).collect())
            .unwrap_or_default();
        names.sort();
        names
    };

    c.create_volume("solo", "16MiB");
    c.map("solo");
    assert_clear_error(&c, &["volume", "map", "solo", "--sdc", "sdc-2"], &["solo", "another SDC"]);
    assert_eq!(list_on(&socket2), Vec::<String>::new(), "sdc-2 must not export solo");
    // Re-mapping to the same SDC is harmless.
    c.map("solo");
    // Explicitly allowed: now shared.
    let out = c.ok(&["volume", "map", "solo", "--sdc", "sdc-2", "--allow-multi-map"]);
    assert!(out.contains("sdc-2.sock"), "{out}");
    assert_eq!(list_on(&socket2), ["solo"]);

    // Created shareable: maps to both without the flag.
    c.ok(&["volume", "create", "shared", "--size", "16MiB", "--allow-multi-map"]);
    c.map("shared");
    c.ok(&["volume", "map", "shared", "--sdc", "sdc-2"]);
    assert_eq!(list_on(&socket2), ["shared", "solo"]);
    assert_eq!(list_on(&c.socket()), ["shared", "solo"]);

    // Data written through one SDC is read through the other.
    let data_path = c.dir.join("shared.raw");
    let data = random_file(&data_path, 0x5eed_0201, (16 * MIB) as usize);
    tool_ok(
        "nbdcopy",
        &["--flush", data_path.to_str().unwrap(), &format!("nbd+unix:///shared?socket={}", c.socket().display())],
    );
    let back = c.dir.join("shared.out");
    tool_ok("nbdcopy", &[&format!("nbd+unix:///shared?socket={}", socket2.display()), back.to_str().unwrap()]);
    assert_same_bytes("read through sdc-2", &data, &std::fs::read(&back).unwrap());

    // Unmapped from sdc-1, an exclusive volume may move to sdc-2.
    c.create_volume("mover", "16MiB");
    c.map("mover");
    c.ok(&["volume", "unmap", "mover"]);
    c.ok(&["volume", "map", "mover", "--sdc", "sdc-2"]);
    assert_eq!(list_on(&socket2), ["mover", "shared", "solo"]);
    assert_eq!(list_on(&c.socket()), ["shared", "solo"]);
    assert_clear_error(&c, &["volume", "map", "mover"], &["mover", "another SDC"]);
    // A mapped volume cannot be removed.
    assert_clear_error(&c, &["volume", "remove", "mover"], &["mover", "mapped"]);
}

#[test]
fn volume_grow() {
    let c = Cluster::start(2);
    let uri = c.volume("grower", "64MiB");
    let size_of = || {
        text(&tool_ok("nbdinfo", &["--size", &uri]).stdout)
            .trim()
            .parse::<u64>()
            .expect("nbdinfo --size prints a number")
    };
    assert_eq!(size_of(), 64 * MIB);
    let data_path = c.dir.join("g.raw");
    let data = random_file(&data_path, 0x5eed_0301, (64 * MIB) as usize);
    tool_ok("nbdcopy", &["--flush", data_path.to_str().unwrap(), &uri]);

    c.ok(&["volume", "grow", "grower", "--size", "192MiB"]);
    assert_eq!(size_of(), 192 * MIB, "a fresh connection sees the new size");
    let shown = c.json(&["volume", "show", "grower"]);
    assert_eq!(shown["size_bytes"].as_u64(), Some(192 * MIB), "{shown:#}");
    // Old data stays, the new space reads as zeros and takes writes.
    tool_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 180M 4M", "-c", "flush", &uri]);
    let back_path = c.dir.join("g.out");
    tool_ok("nbdcopy", &[&uri, back_path.to_str().unwrap()]);
    let back = std::fs::read(&back_path).unwrap();
    assert_eq!(back.len() as u64, 192 * MIB);
    assert_same_bytes("data written before the grow", &data, &back[..data.len()]);
    assert_zeros("new space", &back[64 * MIB as usize..180 * MIB as usize]);
    assert!(back[180 * MIB as usize..184 * MIB as usize].iter().all(|b| *b == 0x77), "write into the grown space");
    assert_zeros("new space after the write", &back[184 * MIB as usize..]);
    // Same size is allowed (no-op); shrinking is refused.
    c.ok(&["volume", "grow", "grower", "--size", "192MiB"]);
    assert_clear_error(&c, &["volume", "grow", "grower", "--size", "128MiB"], &["grower", "only grow"]);
    assert_eq!(size_of(), 192 * MIB);
    c.verify("grower");
}
