//! The "unused disk" rule on real disks: loop devices over sparse files, formatted with the
//! real tools (`mkfs.ext4`, `sfdisk`, `mkswap`), mounted, partitioned, made read-only.
//!
//! Needs root (loop devices, mount). A missing tool or privilege fails the test with a
//! message naming it: a skipped disk test would let a wrong "unused" through unseen.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tessera_agent::disks::{classify, discover, DiscoveryOptions};
use tessera_core::deploy::{Disk, DiskUsage, Media};

const MIB: u64 = 1 << 20;
const CLUSTER_ID: [u8; 16] = *b"tessera-test-cid";
const MIN_SIZE_BYTES: u64 = 64 * MIB;
/// How long a partition's device node may take to appear after the kernel adds it.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// tool → the Debian package that provides it (see scripts/install-deps.sh).
const TOOLS: [(&str, &str); 9] = [
    ("losetup", "util-linux"),
    ("blkid", "util-linux"),
    ("mkswap", "util-linux"),
    ("addpart", "util-linux"),
    ("delpart", "util-linux"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
    ("sfdisk", "fdisk"),
];

fn opts() -> DiscoveryOptions {
    DiscoveryOptions { candidates: Vec::new(), min_size_bytes: MIN_SIZE_BYTES, cluster_id: CLUSTER_ID }
}

fn in_use(reason: &str) -> DiskUsage {
    DiskUsage::InUse { reason: reason.to_string() }
}

fn tool_path(tool: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Fails (never skips) when the test cannot run here, naming what is missing.
fn require_root_and_tools() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "the disk tests need root (loop devices, mount); run them as root");
    for (tool, package) in TOOLS {
        assert!(tool_path(tool).is_some(), "required tool `{tool}` is not installed (Debian package {package})");
    }
}

/// Runs a tool and returns its trimmed stdout; panics with its stderr when it fails.
fn run(tool: &str, args: &[&str]) -> String {
    let exe = tool_path(tool).unwrap_or_else(|| panic!("required tool `{tool}` is not installed"));
    let out = Command::new(exe).args(args).output().unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(out.status.success(), "{tool} {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A scratch directory with the loop devices and mounts made in it; Drop undoes them all
/// (mounts first, then partitions, loop devices and files), even when the test failed.
struct Scratch {
    dir: PathBuf,
    loops: Vec<String>,
    mounts: Vec<PathBuf>,
    /// (disk, partition number) added with `addpart`: the kernel may keep such a partition
    /// after the loop device is detached, so it is deleted first.
    partitions: Vec<(String, String)>,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        require_root_and_tools();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tessera-disks-{}-{test}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        Scratch { dir, loops: Vec::new(), mounts: Vec::new(), partitions: Vec::new() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn path_str(&self, name: &str) -> String {
        self.path(name).to_str().expect("temp dir path is UTF-8").to_string()
    }

    /// A sparse zero-filled file.
    fn file(&self, name: &str, size_bytes: u64) -> String {
        let path = self.path(name);
        std::fs::File::create(&path).and_then(|f| f.set_len(size_bytes)).expect("creating a backing file");
        self.path_str(name)
    }

    /// `losetup --find --show [flags] FILE`: the new loop device's path.
    fn attach(&mut self, file: &str, flags: &[&str]) -> String {
        let mut args = vec!["--find", "--show"];
        args.extend_from_slice(flags);
        args.push(file);
        let device = run("losetup", &args);
        assert!(device.starts_with("/dev/loop"), "losetup printed {device:?}");
        self.loops.push(device.clone());
        device
    }

    /// A loop device over a fresh blank file.
    fn blank(&mut self, name: &str, size_bytes: u64) -> String {
        let file = self.file(name, size_bytes);
        self.attach(&file, &[])
    }

    fn mount(&mut self, device: &str, name: &str) -> String {
        let target = self.path(name);
        std::fs::create_dir_all(&target).expect("creating a mount point");
        run("mount", &[device, target.to_str().expect("UTF-8")]);
        self.mounts.push(target);
        self.path_str(name)
    }

    fn symlink(&self, target: &str, name: &str) -> String {
        std::os::unix::fs::symlink(target, self.path(name)).expect("creating a symlink");
        self.path_str(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for mount in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(mount).status();
        }
        for (device, number) in self.partitions.iter().rev() {
            let _ = Command::new("delpart").args([device, number]).status();
        }
        for device in self.loops.iter().rev() {
            let _ = Command::new("losetup").args(["-d", device]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn name_of(device: &str) -> &str {
    device.trim_start_matches("/dev/")
}

/// Writes the fields of a Tessera superblock the agent reads: magic, layout version,
/// cluster id, device id (layout of crates/sds/src/device/layout.rs).
fn write_tessera_superblock(file: &str, cluster_id: [u8; 16], device_id: u64) {
    let mut block = [0u8; 4096];
    block[..8].copy_from_slice(b"TESSDEV1");
    block[8..12].copy_from_slice(&1u32.to_le_bytes());
    block[12..28].copy_from_slice(&cluster_id);
    block[28..36].copy_from_slice(&device_id.to_le_bytes());
    let f = std::fs::OpenOptions::new().write(true).open(file).expect("opening the backing file");
    f.write_all_at(&block, 0).and_then(|_| f.sync_all()).expect("writing the superblock");
}

fn wait_for_node(path: &str) {
    let deadline = Instant::now() + NODE_TIMEOUT;
    while !Path::new(path).exists() {
        assert!(Instant::now() < deadline, "{path} did not appear within {NODE_TIMEOUT:?} (is /dev a devtmpfs?)");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn blank_disk_is_unused_with_its_size_and_media() {
    let mut s = Scratch::new("blank");
    let device = s.blank("blank.img", 128 * MIB);
    let disk = classify(Path::new(&device), &opts());
    assert_eq!(disk.usage, DiskUsage::Unused, "{disk:?}");
    assert_eq!(disk.path, device);
    assert_eq!(disk.size_bytes, 128 * MIB);
    assert_ne!(disk.media, Media::Unknown, "a loop device reports queue/rotational: {disk:?}");
}

#[test]
fn a_disk_reached_through_another_path_is_the_same_disk() {
    let mut s = Scratch::new("alias");
    let device = s.blank("blank.img", 128 * MIB);
    let link = s.symlink(&device, "xvdf");
    let direct = classify(Path::new(&device), &opts());
    let aliased = classify(Path::new(&link), &opts());
    assert_eq!(aliased.path, link, "the path is reported as given");
    assert_eq!(Disk { path: device.clone(), ..aliased }, direct, "classified as the disk it reaches");
    assert_eq!(direct.usage, DiskUsage::Unused);

    // Listed twice, the one disk is offered once: a pool must not take it under two names.
    let both = discover(&DiscoveryOptions { candidates: vec![link.clone(), device.clone()], ..opts() });
    let usages: Vec<(&str, &DiskUsage)> = both.iter().map(|d| (d.path.as_str(), &d.usage)).collect();
    assert_eq!(
        usages,
        vec![(device.as_str(), &DiskUsage::Unused), (link.as_str(), &in_use(&format!("the same disk as {device}")))],
        "sorted by path, the first path of a disk is the one offered"
    );
}

#[test]
fn ext4_disk_is_in_use() {
    let mut s = Scratch::new("ext4");
    let file = s.file("ext4.img", 128 * MIB);
    run("mkfs.ext4", &["-q", "-F", &file]);
    let device = s.attach(&file, &[]);
    assert_eq!(classify(Path::new(&device), &opts()).usage, in_use("holds an ext4 filesystem"));
}

#[test]
fn disk_with_a_partition_table_is_in_use() {
    let mut s = Scratch::new("gpt");
    let file = s.file("gpt.img", 128 * MIB);
    let script = s.path("gpt.sfdisk");
    std::fs::write(&script, "label: gpt\n,\n").expect("writing the sfdisk script");
    let out = Command::new(tool_path("sfdisk").expect("sfdisk"))
        .args(["-q", &file])
        .stdin(std::fs::File::open(&script).expect("sfdisk script"))
        .output()
        .expect("running sfdisk");
    assert!(out.status.success(), "sfdisk: {}", String::from_utf8_lossy(&out.stderr));
    // -P: where the kernel parses tables, the partition appears too; the table decides first.
    let device = s.attach(&file, &["-P"]);
    assert_eq!(classify(Path::new(&device), &opts()).usage, in_use("has a partition table (gpt)"));
}

#[test]
fn disk_with_partitions_is_in_use_and_its_partition_too() {
    let mut s = Scratch::new("parts");
    let file = s.file("parts.img", 128 * MIB);
    let device = s.attach(&file, &["-P"]);
    // The kernel's own partition, with no table on disk (addpart uses BLKPG): only the
    // partitions rule can see it. This also works on kernels built without table parsers.
    run("addpart", &[&device, "1", "2048", "16384"]);
    s.partitions.push((device.clone(), "1".to_string()));
    let partition = format!("{device}p1");
    wait_for_node(&partition);
    let disk = name_of(&device);
    assert_eq!(classify(Path::new(&device), &opts()).usage, in_use(&format!("has partitions: {disk}p1")));
    let part = classify(Path::new(&partition), &opts());
    assert_eq!(part.usage, in_use(&format!("is a partition of {disk}")));
    assert_eq!(part.size_bytes, 16384 * 512);
}

#[test]
fn mounted_disk_is_in_use_whatever_path_it_was_mounted_by() {
    let mut s = Scratch::new("mounted");
    let file = s.file("mounted.img", 128 * MIB);
    run("mkfs.ext4", &["-q", "-F", &file]);
    let device = s.attach(&file, &[]);
    let link = s.symlink(&device, "alias");
    let target = s.mount(&link, "mnt");
    assert_eq!(classify(Path::new(&device), &opts()).usage, in_use(&format!("mounted at {target}")));
    assert_eq!(classify(Path::new(&link), &opts()).usage, in_use(&format!("mounted at {target}")));
}

#[test]
fn read_only_disk_is_in_use() {
    let mut s = Scratch::new("ro");
    let file = s.file("ro.img", 128 * MIB);
    let device = s.attach(&file, &["-r"]);
    assert_eq!(classify(Path::new(&device), &opts()).usage, in_use("read-only"));
}

#[test]
fn swap_area_is_in_use() {
    let mut s = Scratch::new("swap");
    let file = s.file("swap.img", 128 * MIB);
    run("mkswap", &["-q", &file]);
    let device = s.attach(&file, &[]);
    assert_eq!(classify(Path::new(&device), &opts()).usage, in_use("a swap area"));
}

#[test]
fn disk_below_the_minimum_size_is_in_use() {
    let mut s = Scratch::new("small");
    let device = s.blank("small.img", 16 * MIB);
    let disk = classify(Path::new(&device), &opts());
    assert_eq!(disk.usage, in_use("smaller than the minimum size 64.0 MiB"));
    assert_eq!(disk.size_bytes, 16 * MIB);
    let smaller_min = DiscoveryOptions { min_size_bytes: 16 * MIB, ..opts() };
    assert_eq!(classify(Path::new(&device), &smaller_min).usage, DiskUsage::Unused, "the minimum is inclusive");
}

#[test]
fn disk_with_this_clusters_superblock_is_tessera_even_when_small_or_read_only() {
    let mut s = Scratch::new("tessera");
    // Below the minimum size: the size rule does not make our own device "in use".
    let file = s.file("tessera.img", 16 * MIB);
    write_tessera_superblock(&file, CLUSTER_ID, 42);
    let device = s.attach(&file, &[]);
    assert_eq!(classify(Path::new(&device), &opts()).usage, DiskUsage::Tessera { device_id: 42 });
    let read_only = s.attach(&file, &["-r"]);
    assert_eq!(classify(Path::new(&read_only), &opts()).usage, DiskUsage::Tessera { device_id: 42 });

    let other = DiscoveryOptions { cluster_id: [0xee; 16], ..opts() };
    assert_eq!(classify(Path::new(&device), &other).usage, in_use("holds another Tessera cluster's device"));
}

#[test]
fn disk_formatted_by_the_sds_is_tessera_while_the_sds_holds_it() {
    use tessera_sds::device::{Device, FormatParams};
    let mut s = Scratch::new("sds");
    let device = s.blank("sds.img", 128 * MIB);
    let params = FormatParams { cluster_id: CLUSTER_ID, device_id: 7, extent_size_bytes: 1 << 20 };
    Device::format(Path::new(&device), &params, false).expect("formatting with the SDS's code");
    // Open as a serving SDS opens it (exclusively): still ours, not "in use".
    let open = Device::open(Path::new(&device), CLUSTER_ID).expect("opening the formatted device");
    assert_eq!(classify(Path::new(&device), &opts()).usage, DiskUsage::Tessera { device_id: 7 });
    drop(open);
}

#[test]
fn globs_expand_in_the_named_directory_and_missing_paths_are_reported() {
    let mut s = Scratch::new("glob");
    let blank = s.blank("blank.img", 128 * MIB);
    let ext4_file = s.file("ext4.img", 128 * MIB);
    run("mkfs.ext4", &["-q", "-F", &ext4_file]);
    let ext4 = s.attach(&ext4_file, &[]);
    let disk_a = s.symlink(&blank, "disk-a");
    let disk_b = s.symlink(&ext4, "disk-b");
    let disk_c = s.file("disk-c", MIB);
    s.symlink(&blank, "other-a");
    s.symlink(&blank, "disk-long");
    let nothing = s.path_str("nothing");
    let bad_glob = format!("{}/*/disk", s.dir.display());

    let candidates = vec![
        s.path_str("disk-?"),
        s.path_str("disk-*"), // overlaps the first: each path once
        nothing.clone(),
        s.path_str("none-*"), // matches nothing: adds nothing
        bad_glob.clone(),
    ];
    let disks = discover(&DiscoveryOptions { candidates, ..opts() });
    let got: Vec<(&str, &DiskUsage)> = disks.iter().map(|d| (d.path.as_str(), &d.usage)).collect();
    let missing = |reason: &str| DiskUsage::Missing { reason: reason.to_string() };
    let disk_long = s.path_str("disk-long");
    let mut want = [
        (bad_glob.as_str(), missing("wildcards are allowed in the last path component only")),
        (disk_a.as_str(), DiskUsage::Unused),
        (disk_b.as_str(), in_use("holds an ext4 filesystem")),
        (disk_c.as_str(), missing("is not a block device")),
        (disk_long.as_str(), in_use(&format!("the same disk as {disk_a}"))),
        (nothing.as_str(), missing("does not exist")),
    ];
    want.sort_by(|a, b| a.0.cmp(b.0));
    let want: Vec<(&str, &DiskUsage)> = want.iter().map(|(p, u)| (*p, u)).collect();
    assert_eq!(got, want);
}

#[test]
fn discovery_without_candidates_lists_the_nodes_whole_disks() {
    let mut s = Scratch::new("all");
    let device = s.blank("blank.img", 128 * MIB);
    let disks = discover(&opts());
    let paths: Vec<&str> = disks.iter().map(|d| d.path.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "sorted by path");
    let ours = disks.iter().find(|d| d.path == device).unwrap_or_else(|| panic!("{device} not in {paths:?}"));
    assert_eq!(ours.usage, DiskUsage::Unused, "{ours:?}");
    for disk in &disks {
        let name = name_of(&disk.path);
        assert!(!name.starts_with("ram") && !name.starts_with("zram"), "RAM disks are not candidates: {paths:?}");
        // A loop device detached by a test running alongside may have lost its file (and
        // its size) between listing and classification; any other disk must hold both.
        let detached =
            name.starts_with("loop") && !Path::new("/sys/block").join(name).join("loop/backing_file").exists();
        if !detached {
            assert!(disk.size_bytes > 0, "empty devices are not candidates: {disk:?}");
        }
    }
}
