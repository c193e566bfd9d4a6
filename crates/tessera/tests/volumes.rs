//! The volume service on real parts: the SDC's export behind nbdfuse and a loop device,
//! real mkfs (ext4, xfs), real mounts, durable reference counts, and preemption between two
//! "nodes" (two SDCs, each with its own volume service settings) — the seed's failover demo.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn findmnt_source(target: &Path) -> Option<String> {
    let out = run(Command::new("findmnt").args(["-n", "-o", "SOURCE"]).arg(target), CLI_TIMEOUT);
    out.status.success().then(|| text(&out.stdout).trim().to_string())
}

fn fstype(target: &Path) -> String {
    let out = run(Command::new("findmnt").args(["-n", "-o", "FSTYPE"]).arg(target), CLI_TIMEOUT);
    text(&out.stdout).trim().to_string()
}

fn refs(c: &Cluster) -> serde_json::Value {
    c.json(&["volume", "refs"])
}

#[test]
fn mount_lifecycle_with_reference_counts_and_sizes() {
    let c = Cluster::start(3);
    // Implicit creation with REX-Ray options: size in GiB, filesystem.
    let path = c.ok(&["volume", "mount", "vol5", "-o", "size=5", "-o", "newfstype=xfs", "--id", "task-a"]);
    let path = PathBuf::from(path.trim());
    let mountpoint = c.dir.join("volumes/vol5");
    assert_eq!(path, mountpoint.join("data"), "the task gets <mount path>/<name>/data");
    let device = findmnt_source(&mountpoint).expect("vol5 is mounted");
    assert_eq!(fstype(&mountpoint), "xfs");
    let size = run(Command::new("blockdev").args(["--getsize64", &device]), CLI_TIMEOUT);
    assert_eq!(text(&size.stdout).trim(), (5 * GIB).to_string(), "size=5 means 5 GiB");
    let mode = std::fs::metadata(&path).expect("data dir").permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o700);
    std::fs::write(path.join("readme.txt"), "Hello 1\n").expect("writing through the mount");

    // A second caller shares the mount; the first leaving does not unmount it.
    let again = c.ok(&["volume", "mount", "vol5", "--id", "task-b"]);
    assert_eq!(PathBuf::from(again.trim()), path);
    assert_eq!(refs(&c)["vol5"], serde_json::json!(["task-a", "task-b"]));
    c.ok(&["volume", "unmount", "vol5", "--id", "task-a"]);
    assert!(findmnt_source(&mountpoint).is_some(), "unmounted while task-b still uses it");
    assert_eq!(c.ok(&["volume", "path", "vol5"]).trim(), path.to_str().unwrap());
    c.ok(&["volume", "unmount", "vol5", "--id", "task-b"]);
    assert!(findmnt_source(&mountpoint).is_none(), "still mounted after the last unmount");
    assert_eq!(c.ok(&["volume", "path", "vol5"]).trim(), "", "path of an unmounted volume");
    let ls = c.ok(&["volume", "ls"]);
    let row = ls.lines().find(|l| l.starts_with("vol5 ")).expect("listed");
    assert!(row.trim_end().ends_with("thin"), "the last unmount also unmaps (detach): {ls}");

    // Mounting again keeps the data: an existing filesystem is never reformatted, even when
    // overwritefs is asked for (it applies only at creation).
    let path = c.ok(&["volume", "mount", "vol5", "-o", "overwritefs=true", "-o", "newfstype=ext4"]);
    let text_back = std::fs::read_to_string(Path::new(path.trim()).join("readme.txt")).expect("data kept");
    assert_eq!(text_back, "Hello 1\n");
    assert_eq!(fstype(&mountpoint), "xfs");
    c.ok(&["volume", "unmount", "vol5"]);

    // QoS options become the volume's limits, enforced by the SDC.
    c.ok(&["volume", "mount", "limited", "-o", "size=1", "-o", "iops=500", "-o", "bandwidth=20MiB"]);
    let show = c.json(&["volume", "show", "limited"]);
    assert_eq!(show["qos"]["iops_limit"], 500, "{show:#}");
    assert_eq!(show["qos"]["bandwidth_limit_bytes_per_sec"], 20 * MIB, "{show:#}");
    c.ok(&["volume", "unmount", "limited"]);
    let out = c.cli(&["volume", "mount", "toolow", "-o", "iops=3"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(!c.ok(&["volume", "ls"]).contains("toolow"), "a volume refused its limits but was kept");

    // ext4 by default; explicit creation refuses a missing volume.
    let path = c.ok(&["volume", "mount", "plain", "-o", "size=1"]);
    assert_eq!(fstype(&c.dir.join("volumes/plain")), "ext4");
    assert!(path.trim().ends_with("plain/data"));
    c.ok(&["volume", "unmount", "plain", "--force"]);
    let out = c.cli(&["volume", "mount", "missing", "--explicit-create"]);
    assert!(!out.status.success() && text(&out.stderr).contains("not found"), "{}", describe(&out));
    // Bad options are refused by name, and nothing is created.
    let out = c.cli(&["volume", "mount", "typo", "-o", "sise=5"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("unknown volume option \"sise\""),
        "{}",
        describe(&out)
    );
    let out = c.cli(&["volume", "mount", "bad", "-o", "newfstype=ntfs"]);
    assert!(!out.status.success() && text(&out.stderr).contains("ntfs"), "{}", describe(&out));
    let ls = c.ok(&["volume", "ls"]);
    assert!(!ls.contains("typo") && !ls.contains("bad "), "{ls}");
}

#[test]
fn counts_survive_a_restart_of_the_volume_service() {
    let c = Cluster::start(3);
    let path = c.ok(&["volume", "mount", "kept", "-o", "size=1", "--id", "one"]);
    c.ok(&["volume", "mount", "kept", "--id", "two"]);
    // Restart the plugin daemon: the counts are on disk, not in its memory.
    let pid = c.pid("volumes-1");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    poll("volumes-1 to die", POLL_TIMEOUT, || (!pid_alive(pid)).then_some(()));
    let socket = c.dir.join("tessera-plugin.sock");
    c.spawn_daemon("volumes-again", &["volumes"]);
    poll("the plugin socket", POLL_TIMEOUT, || std::os::unix::net::UnixStream::connect(&socket).ok().map(|_| ()));
    assert_eq!(refs(&c)["kept"], serde_json::json!(["one", "two"]));
    c.ok(&["volume", "unmount", "kept", "--id", "one"]);
    let mountpoint = c.dir.join("volumes/kept");
    assert!(findmnt_source(&mountpoint).is_some(), "the restart lost a reference");
    std::fs::write(Path::new(path.trim()).join("f"), "x").expect("still writable");
    c.ok(&["volume", "unmount", "kept", "--id", "two"]);
    assert!(findmnt_source(&mountpoint).is_none());
}

/// The whole volume, read through a fresh mapping to sdc-1 (then unmapped again).
fn read_volume(c: &Cluster, name: &str) -> Vec<u8> {
    let uri = c.map(name);
    let copy = c.dir.join(format!("{name}.raw"));
    tool_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, copy.to_str().unwrap()]);
    c.ok(&["volume", "unmap", name]);
    let bytes = std::fs::read(&copy).unwrap_or_else(|e| panic!("reading {}: {e}", copy.display()));
    std::fs::remove_file(&copy).ok();
    bytes
}

/// A database wrote the raw device: zeros where filesystems keep their magic, its data at
/// 8 MiB. The first 64 KiB read blank, but the cluster holds written extents: the volume
/// service refuses to format it, says so in one line, and changes nothing.
#[test]
fn mount_refuses_to_format_a_raw_written_volume() {
    let c = Cluster::start(3);
    // The admin CLI creates a volume without formatting it (the volume service's create
    // formats at creation).
    c.create_volume("rawdb", "16MiB");
    let uri = c.map("rawdb");
    let pattern = random_bytes(0x7e55e7a, MIB as usize);
    let pattern_file = c.dir.join("pattern");
    std::fs::write(&pattern_file, &pattern).expect("pattern file");
    // Plain NBD writes: zeros over the first 64 KiB, the pattern at 8 MiB.
    let at = format!("write -s {} 8M 1M", pattern_file.display());
    tool_ok("qemu-io", &["-f", "raw", "-c", "write -P 0 0 64K", "-c", &at, "-c", "flush", &uri]);
    c.ok(&["volume", "unmap", "rawdb"]);
    let before = read_volume(&c, "rawdb");
    assert_zeros("the first 64 KiB as written", &before[..64 * KIB as usize]);

    let out = c.cli(&["volume", "mount", "rawdb", "--id", "db"]);
    assert!(!out.status.success(), "a written volume was mounted: {}", describe(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("volume rawdb holds data (")
            && err.contains("extents written) but no ext4, xfs or btrfs filesystem; refusing to format it"),
        "{}",
        describe(&out)
    );
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "one error line: {err}");

    // Nothing changed: not mounted, no reference, not mapped or attached any more.
    assert!(findmnt_source(&c.dir.join("volumes/rawdb")).is_none(), "mounted after the refusal");
    assert!(refs(&c).get("rawdb").is_none_or(|r| r.as_array().is_some_and(|a| a.is_empty())), "{}", refs(&c));
    let show = c.json(&["volume", "show", "rawdb"]);
    assert!(show["mapped_sdcs"].as_array().is_some_and(|m| m.is_empty()), "left mapped: {show:#}");
    assert!(!c.dir.join("volume-service/attachments/rawdb.json").exists(), "left attached");
    // The data is intact, byte for byte, and no filesystem signature was written.
    let after = read_volume(&c, "rawdb");
    assert_same_bytes("the volume after the refused mount", &before, &after);
    assert_same_bytes("the pattern at 8 MiB", &pattern, &after[8 * MIB as usize..9 * MIB as usize]);
    assert_zeros("the first 64 KiB", &after[..64 * KIB as usize]);
    let copy = c.dir.join("after.raw");
    std::fs::write(&copy, &after).expect("copy");
    let blkid = run(tool("blkid").args(["-p", copy.to_str().unwrap()]), TOOL_TIMEOUT);
    assert_eq!(blkid.status.code(), Some(2), "blkid found a signature: {}", describe(&blkid));
}

/// A volume created without a filesystem (the admin CLI) and never written is formatted by
/// its first mount; once it holds a filesystem it is mounted as it is, never formatted again.
#[test]
fn mount_formats_a_volume_that_was_never_written() {
    let c = Cluster::start(3);
    c.create_volume("fresh", "64MiB");
    let path = PathBuf::from(c.ok(&["volume", "mount", "fresh", "--id", "t"]).trim());
    let mountpoint = c.dir.join("volumes/fresh");
    assert_eq!(fstype(&mountpoint), "ext4", "the default filesystem");
    std::fs::write(path.join("kept"), "yes\n").expect("writing through the mount");
    c.ok(&["volume", "unmount", "fresh", "--id", "t"]);
    // Now it holds a filesystem (and extents): mounted as it is, never formatted again.
    let path = PathBuf::from(c.ok(&["volume", "mount", "fresh", "-o", "newfstype=xfs", "--id", "t"]).trim());
    assert_eq!(std::fs::read_to_string(path.join("kept")).expect("data kept"), "yes\n");
    assert_eq!(fstype(&mountpoint), "ext4");
    c.ok(&["volume", "unmount", "fresh", "--id", "t"]);
}

/// A second node on the same machine: its own SDC and its own volume-service directories.
struct Node {
    config: PathBuf,
    mount_path: PathBuf,
}

impl Node {
    fn add(c: &Cluster, name: &str, preempt: bool) -> Node {
        let socket = c.dir.join(format!("{name}.sock"));
        c.spawn_daemon(name, &["sdc", "--name", name, "--socket", socket.to_str().unwrap()]);
        poll(&format!("{name} to register"), POLL_TIMEOUT, || {
            let sdcs = c.json(&["sdc", "ls"]);
            sdcs.as_array().is_some_and(|l| l.iter().any(|s| s["name"] == name)).then_some(())
        });
        let base = std::fs::read_to_string(c.config()).expect("config");
        let mut cfg: toml::Table = toml::from_str(&base).expect("config is TOML");
        let mount_path = c.dir.join(format!("{name}-volumes"));
        let mut volumes = toml::Table::new();
        volumes.insert("sdc".into(), name.into());
        volumes.insert("preempt".into(), preempt.into());
        volumes.insert("mount_path".into(), mount_path.to_str().unwrap().into());
        volumes.insert("state_dir".into(), c.dir.join(format!("{name}-state")).to_str().unwrap().into());
        volumes.insert("plugin_socket".into(), c.dir.join(format!("{name}-plugin.sock")).to_str().unwrap().into());
        cfg.insert("volumes".into(), volumes.into());
        let config = c.dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml::to_string(&cfg).expect("TOML")).expect("writing the node config");
        Node { config, mount_path }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        run(Command::new(BIN).arg("--config").arg(&self.config).args(args).env_remove("TESSERA_CONFIG"), CLI_TIMEOUT)
    }
}

/// The seed's failover demo: a task on node A appends "Hello A" to readme.txt on `webdata`;
/// A dies; the task is launched on node B with preempt, sees A's line and appends its own;
/// A, still holding the volume open, can no longer write to it.
#[test]
fn failover_to_another_node_with_preempt_fences_the_first() {
    let c = Cluster::start(3);
    // Node A is the local node (sdc-1, the cluster's own volume settings).
    let path_a = PathBuf::from(c.ok(&["volume", "mount", "webdata", "-o", "size=1", "--id", "web-a"]).trim());
    let readme_a = path_a.join("readme.txt");
    std::fs::write(&readme_a, "Hello A\n").expect("A writes");
    run(Command::new("sync").arg("-f").arg(&readme_a), CLI_TIMEOUT);

    let b = Node::add(&c, "sdc-2", false);
    let out = b.cli(&["volume", "mount", "webdata", "--id", "web-b"]);
    assert!(!out.status.success(), "B took the volume without preempt: {}", describe(&out));
    assert!(text(&out.stderr).contains("attached to another node"), "{}", describe(&out));

    // A is "killed": its task and node are gone, but its mount is left behind (as on a
    // crashed or cut-off machine). B takes over with preempt.
    let b = Node::add(&c, "sdc-3", true);
    let out = b.cli(&["volume", "mount", "webdata", "--id", "web-b"]);
    assert!(out.status.success(), "B could not take over: {}", describe(&out));
    let path_b = PathBuf::from(text(&out.stdout).trim());
    assert!(path_b.starts_with(&b.mount_path));
    let readme_b = path_b.join("readme.txt");
    assert_eq!(std::fs::read_to_string(&readme_b).expect("B reads"), "Hello A\n", "B sees A's line");
    let mut content = std::fs::read_to_string(&readme_b).unwrap();
    content.push_str("Hello B\n");
    std::fs::write(&readme_b, &content).expect("B appends");
    run(Command::new("sync").arg("-f").arg(&readme_b), CLI_TIMEOUT);

    // A comes back to life and tries to write: refused (fsync reports the error).
    let a_write = std::fs::OpenOptions::new().append(true).open(&readme_a).and_then(|mut f| {
        use std::io::Write;
        f.write_all(b"Hello again from A\n")?;
        f.sync_all()
    });
    assert!(a_write.is_err(), "the preempted node could still write");
    assert_eq!(std::fs::read_to_string(&readme_b).expect("B reads"), "Hello A\nHello B\n");
    let out = b.cli(&["volume", "unmount", "webdata", "--id", "web-b"]);
    assert!(out.status.success(), "{}", describe(&out));
}

/// dvdcli against the local volume service's plugin socket, found the way Docker finds
/// plugins (here in the cluster directory, named by `TESSERA_PLUGIN_SOCKET_DIRS`).
#[test]
fn dvdcli_mounts_through_the_plugin() {
    let c = Cluster::start(3);
    let dvdcli = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("dvdcli").args(args).env("TESSERA_PLUGIN_SOCKET_DIRS", &c.dir).env("TESSERA_PLUGIN_SPEC_DIRS", &c.dir);
        run(&mut cmd, CLI_TIMEOUT)
    };
    let driver = "--volumedriver=tessera-plugin";
    // Installed as `dvdcli` (a link to the binary), it behaves the same.
    let link = c.dir.join("dvdcli");
    std::os::unix::fs::symlink(BIN, &link).expect("dvdcli link");
    let out = run(Command::new(&link).arg("version"), CLI_TIMEOUT);
    assert!(out.status.success(), "{}", describe(&out));

    let out = dvdcli(&["mount", driver, "--volumename=dv", "--volumeopts=size=1,newfstype=xfs"]);
    assert!(out.status.success(), "{}", describe(&out));
    let path = text(&out.stdout).trim().to_string();
    assert_eq!(PathBuf::from(&path), c.dir.join("volumes/dv/data"), "mount prints the path alone on stdout");
    assert_eq!(fstype(&c.dir.join("volumes/dv")), "xfs");
    let out = dvdcli(&["path", driver, "--volumename=dv"]);
    assert_eq!(text(&out.stdout).trim(), path);
    let out = dvdcli(&["list", driver]);
    assert!(text(&out.stdout).lines().any(|l| l == "dv"), "{}", describe(&out));
    // Explicit creation refuses a volume that does not exist, in either spelling.
    for flag in ["--explicitcreate", "--explicitCreate=true"] {
        let out = dvdcli(&["mount", driver, "--volumename=nope", flag]);
        assert!(!out.status.success(), "{}", describe(&out));
    }
    let out = dvdcli(&["unmount", driver, "--volumename=dv"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(findmnt_source(&c.dir.join("volumes/dv")).is_none());
    let out = dvdcli(&["mount", driver, "--volumename=dv", "--volumeopts=noequals"]);
    assert!(!out.status.success() && text(&out.stderr).contains("noequals"), "{}", describe(&out));
}

/// `tessera run` with DVDI_VOLUME_* variables against the local plugin: all volumes or
/// none, the task's exit code, bind mounts at container paths in the task's own mount
/// namespace, and everything unmounted afterwards.
#[test]
fn dvdi_launcher_mounts_all_or_nothing() {
    let c = Cluster::start(3);
    let launch = |vars: &[(&str, &str)], command: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--").args(command);
        cmd.env("TESSERA_PLUGIN_SOCKET_DIRS", &c.dir).env("TESSERA_PLUGIN_SPEC_DIRS", &c.dir);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        run(&mut cmd, CLI_TIMEOUT)
    };
    let marker = c.dir.join("task-ran");
    let touch = format!("touch {}", marker.display());
    // The third volume cannot be created: the other two must end unmounted, the task unrun.
    let out = launch(
        &[
            ("DVDI_VOLUME_NAME", "run-a"),
            ("DVDI_VOLUME_DRIVER", "tessera-plugin"),
            ("DVDI_VOLUME_OPTS", "size=1"),
            ("DVDI_VOLUME_NAME1", "run-b"),
            ("DVDI_VOLUME_DRIVER1", "tessera-plugin"),
            ("DVDI_VOLUME_OPTS1", "size=1"),
            ("DVDI_VOLUME_NAME2", "run-c"),
            ("DVDI_VOLUME_DRIVER2", "tessera-plugin"),
            ("DVDI_VOLUME_OPTS2", "newfstype=ntfs"),
        ],
        &["sh", "-c", &touch],
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(!marker.exists(), "the task ran although a volume failed");
    for v in ["run-a", "run-b", "run-c"] {
        assert!(findmnt_source(&c.dir.join("volumes").join(v)).is_none(), "{v} left mounted: {}", describe(&out));
    }
    assert!(refs(&c).as_object().is_none_or(|m| m.is_empty()), "references left: {}", refs(&c));

    // Success: a container path bound in the task's namespace; the exit code comes back.
    let inside = "/tmp/tessera-run-test-data";
    let out = launch(
        &[
            ("DVDI_VOLUME_NAME", "run-a"),
            ("DVDI_VOLUME_DRIVER", "tessera-plugin"),
            ("DVDI_VOLUME_CONTAINERPATH", inside),
        ],
        &["sh", "-c", &format!("echo from-task > {inside}/out && grep -q {inside} /proc/self/mountinfo && exit 7")],
    );
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert!(findmnt_source(&c.dir.join("volumes/run-a")).is_none(), "run-a left mounted after the task");
    assert!(!std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(inside), "the bind leaked out");
    let path = c.ok(&["volume", "mount", "run-a"]);
    assert_eq!(std::fs::read_to_string(Path::new(path.trim()).join("out")).expect("task output"), "from-task\n");
    c.ok(&["volume", "unmount", "run-a"]);
    // Shell metacharacters are refused before anything is mounted.
    let out = launch(&[("DVDI_VOLUME_NAME", "x;rm -rf /")], &["true"]);
    assert!(!out.status.success() && text(&out.stderr).contains("DVDI_VOLUME_NAME"), "{}", describe(&out));
}
