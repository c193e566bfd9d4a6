//! Disk discovery and the "unused disk" rule.
//!
//! The agent reports every candidate disk of its node, each classified on the node itself:
//! [`DiskUsage::Unused`] only when *every* rule below passed, [`DiskUsage::Tessera`] when it
//! carries this cluster's superblock, and otherwise `InUse`/`Missing` with a short reason
//! the user reads. The global pool and declarative pools take unused disks without asking,
//! so any doubt (an unreadable sysfs file, a probe that timed out, no `blkid`) means
//! "in use": the rule fails closed.
//!
//! A disk is identified by its device number, never by the path's name: `/dev/xvdf` may be
//! a bind mount or symlink of `/dev/loop5`, and must then be judged as loop5. Names are
//! compared exactly, never by substring (the old ScaleIO framework excluded `/dev/xvdf`
//! because `/dev/xvdf1` had a signature).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tessera_core::deploy::{Disk, DiskUsage, Media, MAX_NODE_DISKS};
use tessera_core::units::format_size;

/// Limit on each probe that reads the disk (`blkid`, our own superblock read). A disk that
/// does not answer in this time is reported as in use rather than stalling the agent.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// sysfs reports sizes in 512-byte sectors whatever the disk's block size.
const SYSFS_SECTOR_BYTES: u64 = 512;
/// Most of `blkid -p -o export` output we read; it prints a few short lines.
const BLKID_OUTPUT_LIMIT_BYTES: u64 = 64 * 1024;
/// Most of a sysfs attribute file we read; they hold one short value.
const SYSFS_VALUE_LIMIT_BYTES: u64 = 4096;
/// How often a running `blkid` is polled for exit.
const CHILD_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Where `blkid` is looked for besides `$PATH`: an agent started with a user's PATH may
/// lack the sbin directories.
const EXTRA_TOOL_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

/// The Tessera superblock as far as discovery needs it. Kept in step with
/// `crates/sds/src/device/layout.rs` (the agent does not depend on the SDS role); the
/// integration test formats a disk with the SDS's own code to hold the two together.
const TESSERA_MAGIC: [u8; 8] = *b"TESSDEV1";
const TESSERA_CLUSTER_ID: std::ops::Range<usize> = 12..28;
const TESSERA_DEVICE_ID: std::ops::Range<usize> = 28..36;
/// One sector: enough for the fields above, and readable on every block device.
const TESSERA_PROBE_BYTES: u64 = 512;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryOptions {
    /// Limit discovery to these: exact paths (`/dev/loop3`) or globs (`/dev/loop*`; `*` and
    /// `?` in the last path component only). Empty = every block device of the node (whole
    /// disks from /sys/block, excluding loop devices with no backing file, ram*, zram*,
    /// hidden devices and devices whose size is 0).
    pub candidates: Vec<String>,
    /// Disks smaller than this are "in use" with reason "smaller than the minimum size N".
    pub min_size_bytes: u64,
    /// This cluster's id (the 16 bytes in every Tessera superblock); a disk carrying it is
    /// `DiskUsage::Tessera { device_id }`, a disk carrying another cluster's superblock is
    /// in use ("holds another Tessera cluster's device").
    pub cluster_id: [u8; 16],
}

/// Every candidate disk of the node, classified, sorted by path; one entry per path (a
/// literal candidate that does not exist is reported `Missing`; a glob that matches
/// nothing adds nothing). At most [`MAX_NODE_DISKS`] entries, the first by path.
///
/// When two paths reach the same disk (a symlink and its target, say), only the first is
/// reported unused and the others are in use as "the same disk as ...": otherwise a pool
/// could take the one disk twice and format it under itself.
pub fn discover(opts: &DiscoveryOptions) -> Vec<Disk> {
    let mut paths = if opts.candidates.is_empty() { all_block_devices() } else { expand_candidates(&opts.candidates) };
    if paths.len() > MAX_NODE_DISKS {
        tracing::warn!(
            found = paths.len(),
            "more candidate disks than a node may report; keeping the first {MAX_NODE_DISKS}"
        );
        paths = paths.into_iter().take(MAX_NODE_DISKS).collect();
    }
    let mut first_path_of: BTreeMap<DevNum, String> = BTreeMap::new();
    let mut disks = Vec::with_capacity(paths.len());
    for (path, invalid) in paths {
        if let Some(reason) = invalid {
            disks.push(Disk { path, size_bytes: 0, media: Media::Unknown, usage: DiskUsage::Missing { reason } });
            continue;
        }
        let (mut disk, dev) = inspect(Path::new(&path), opts);
        if let Some(dev) = dev {
            match first_path_of.get(&dev) {
                Some(first) if disk.usage == DiskUsage::Unused => {
                    disk.usage = DiskUsage::InUse { reason: format!("the same disk as {first}") };
                }
                Some(_) => {}
                None => {
                    first_path_of.insert(dev, path.clone());
                }
            }
        }
        disks.push(disk);
    }
    disks
}

/// Classifies one path (see the module doc for the rules). Never panics, whatever the path
/// or sysfs say.
pub fn classify(path: &Path, opts: &DiscoveryOptions) -> Disk {
    inspect(path, opts).0
}

/// A device number, `major:minor`: what identifies a disk whatever path reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct DevNum {
    major: u64,
    minor: u64,
}

impl DevNum {
    /// Decodes `st_rdev` as Linux (glibc's `gnu_dev_major`/`gnu_dev_minor`) encodes it.
    fn from_rdev(rdev: u64) -> DevNum {
        DevNum { major: ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff), minor: (rdev & 0xff) | ((rdev >> 12) & !0xff) }
    }

    /// Parses `MAJ:MIN` as mountinfo and sysfs write it.
    fn parse(text: &str) -> Option<DevNum> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(DevNum { major: major.parse().ok()?, minor: minor.parse().ok()? })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The classification and, when the path is a block device, its device number.
fn inspect(path: &Path, opts: &DiscoveryOptions) -> (Disk, Option<DevNum>) {
    let mut disk = Disk {
        path: path.to_string_lossy().into_owned(),
        size_bytes: 0,
        media: Media::Unknown,
        usage: DiskUsage::Unused,
    };
    // `metadata` follows symlinks: a by-id link is judged as the disk it points to.
    let metadata = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            disk.usage = DiskUsage::Missing { reason: "does not exist".into() };
            return (disk, None);
        }
        Err(e) => {
            disk.usage = DiskUsage::Missing { reason: format!("cannot be examined: {e}") };
            return (disk, None);
        }
    };
    if !metadata.file_type().is_block_device() {
        disk.usage = DiskUsage::Missing { reason: "is not a block device".into() };
        return (disk, None);
    }
    let dev = DevNum::from_rdev(metadata.rdev());
    // sysfs by device number, not by the path's name: see the module doc.
    let sys_dir = match std::fs::canonicalize(format!("/sys/dev/block/{dev}")) {
        Ok(dir) => dir,
        Err(e) => {
            disk.usage = DiskUsage::InUse { reason: format!("block device {dev} is unknown to sysfs: {e}") };
            return (disk, Some(dev));
        }
    };
    let is_partition = sys_dir.join("partition").exists();
    // A partition's queue attributes live in its disk's directory.
    let queue_dir = if is_partition { sys_dir.parent().unwrap_or(&sys_dir) } else { &sys_dir };
    disk.media = match read_sys_u64(&queue_dir.join("queue/rotational")) {
        Some(0) => Media::Ssd,
        Some(1) => Media::Hdd,
        _ => Media::Unknown,
    };
    let size_bytes = read_sys_u64(&sys_dir.join("size")).map(|sectors| sectors.saturating_mul(SYSFS_SECTOR_BYTES));
    disk.size_bytes = size_bytes.unwrap_or(0);
    disk.usage = usage(path, dev, &sys_dir, is_partition, size_bytes, opts);
    (disk, Some(dev))
}

/// The rules, in order; the first that fails gives the reason. A Tessera disk needs only to
/// be a whole disk and not mounted: the other rules would call our own device in use.
fn usage(
    path: &Path,
    dev: DevNum,
    sys_dir: &Path,
    is_partition: bool,
    size_bytes: Option<u64>,
    opts: &DiscoveryOptions,
) -> DiskUsage {
    let in_use = |reason: String| DiskUsage::InUse { reason };
    if is_partition {
        let parent = sys_dir.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
        return in_use(format!("is a partition of {}", parent.as_deref().unwrap_or("another disk")));
    }
    match mount_point(dev) {
        Ok(Some(mount_point)) => return in_use(format!("mounted at {mount_point}")),
        Ok(None) => {}
        Err(reason) => return in_use(reason),
    }
    match is_active_swap(dev) {
        Ok(true) => return in_use("in use as swap".into()),
        Ok(false) => {}
        Err(reason) => return in_use(reason),
    }
    // Before the rules below: our own device may be held open, read-only or small and is
    // still ours.
    match read_first_bytes(path, TESSERA_PROBE_BYTES) {
        Ok(first) => match parse_tessera_superblock(&first) {
            Some(sb) if sb.cluster_id == opts.cluster_id => return DiskUsage::Tessera { device_id: sb.device_id },
            Some(_) => return in_use("holds another Tessera cluster's device".into()),
            None => {}
        },
        Err(reason) => return in_use(reason),
    }
    match child_names(&sys_dir.join("holders"), |_| true) {
        Ok(holders) if holders.is_empty() => {}
        Ok(holders) => return in_use(format!("held by {}", holders.join(", "))),
        Err(e) => return in_use(format!("cannot list its holders: {e}")),
    }
    match read_sys_u64(&sys_dir.join("ro")) {
        Some(0) => {}
        Some(_) => return in_use("read-only".into()),
        None => return in_use("cannot tell whether it is read-only".into()),
    }
    if let Some(reason) = blkid_signature(path) {
        return in_use(reason);
    }
    // Partitions the kernel knows even when no table is on disk (added with BLKPG, or the
    // table wiped after the scan): their data is still in use.
    match child_names(sys_dir, |child| child.join("partition").exists()) {
        Ok(partitions) if partitions.is_empty() => {}
        Ok(partitions) => return in_use(format!("has partitions: {}", partitions.join(", "))),
        Err(e) => return in_use(format!("cannot list its partitions: {e}")),
    }
    match size_bytes {
        None => in_use("its size cannot be read".into()),
        Some(size) if size < opts.min_size_bytes => {
            in_use(format!("smaller than the minimum size {}", format_size(opts.min_size_bytes)))
        }
        Some(_) => DiskUsage::Unused,
    }
}

// ---------------------------------------------------------------------------------------
// Candidates

/// What a candidate string names.
#[derive(Debug, PartialEq, Eq)]
enum Candidate<'a> {
    /// A path, taken as given.
    Literal(&'a str),
    /// Entries of `dir` whose name matches `pattern`.
    Glob { dir: &'a str, pattern: &'a str },
    /// Refused, with the reason.
    Invalid(&'static str),
}

fn has_wildcard(text: &str) -> bool {
    text.contains(['*', '?'])
}

/// Wildcards are honoured in the last path component only, so a glob never walks into
/// directories other than the one it names.
fn parse_candidate(candidate: &str) -> Candidate<'_> {
    if !has_wildcard(candidate) {
        return Candidate::Literal(candidate);
    }
    let (dir, pattern) = match candidate.rsplit_once('/') {
        Some(("", pattern)) => ("/", pattern),
        Some((dir, pattern)) => (dir, pattern),
        None => (".", candidate),
    };
    if has_wildcard(dir) {
        return Candidate::Invalid("wildcards are allowed in the last path component only");
    }
    if pattern.is_empty() {
        return Candidate::Invalid("a glob must end in a file name pattern");
    }
    Candidate::Glob { dir, pattern }
}

/// The path of entry `name` of a glob's directory, spelled as the glob spelled it.
fn glob_entry_path(dir: &str, name: &str) -> String {
    match dir {
        "." => name.to_string(),
        "/" => format!("/{name}"),
        _ => format!("{dir}/{name}"),
    }
}

/// Whether a directory entry matches a glob's file name pattern. Hidden entries match only
/// a pattern that starts with a dot, as in the shell.
fn glob_name_matches(pattern: &str, name: &str) -> bool {
    (!name.starts_with('.') || pattern.starts_with('.')) && tessera_core::deploy::spec::glob_match(pattern, name)
}

/// Path → `Some(reason)` when the candidate itself is refused.
fn expand_candidates(candidates: &[String]) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for candidate in candidates {
        match parse_candidate(candidate) {
            Candidate::Literal(path) => {
                out.insert(path.to_string(), None);
            }
            Candidate::Invalid(reason) => {
                out.insert(candidate.clone(), Some(reason.to_string()));
            }
            Candidate::Glob { dir, pattern } => {
                // An unreadable or absent directory matches nothing, like a shell glob.
                let Ok(entries) = std::fs::read_dir(dir) else { continue };
                for entry in entries.flatten() {
                    let Ok(name) = entry.file_name().into_string() else { continue };
                    if glob_name_matches(pattern, &name) {
                        out.entry(glob_entry_path(dir, &name)).or_insert(None);
                    }
                }
            }
        }
    }
    out
}

/// Whole disks from /sys/block, minus those that cannot hold data: loop devices with no
/// backing file, RAM disks, zram, hidden devices (multipath member paths) and empty ones.
fn all_block_devices() -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return out };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else { continue };
        let dir = entry.path();
        // Only disks: never RAM disks, nor virtual devices stacked on other disks (device
        // mapper and LVM volumes, md arrays, ZFS volumes, NBD clients) or optical/floppy
        // drives. An operator who means one names it in --disk-candidates.
        if ["ram", "zram", "dm-", "md", "zd", "nbd", "sr", "fd"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        if name.starts_with("loop") && !dir.join("loop/backing_file").exists() {
            continue;
        }
        if read_sys_u64(&dir.join("hidden")) == Some(1) {
            continue;
        }
        if read_sys_u64(&dir.join("size")).unwrap_or(0) == 0 {
            continue;
        }
        let devname = read_small(&dir.join("uevent")).and_then(|u| uevent_devname(&u));
        out.insert(dev_path(&name, devname.as_deref()), None);
    }
    out
}

/// `DEVNAME=` of a sysfs `uevent` file: the node's path under /dev.
fn uevent_devname(uevent: &str) -> Option<String> {
    uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")).map(str::to_string).filter(|n| !n.is_empty())
}

/// The /dev path of a /sys/block entry. sysfs spells `/` in names as `!`
/// (`cciss!c0d0` is `/dev/cciss/c0d0`) when uevent does not say.
fn dev_path(sys_name: &str, devname: Option<&str>) -> String {
    match devname {
        Some(d) => format!("/dev/{}", d.trim_start_matches('/')),
        None => format!("/dev/{}", sys_name.replace('!', "/")),
    }
}

// ---------------------------------------------------------------------------------------
// sysfs

/// Reads a small file whole; `None` when it cannot be read.
fn read_small(path: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(path).ok()?.take(SYSFS_VALUE_LIMIT_BYTES).read_to_string(&mut text).ok()?;
    Some(text)
}

fn read_sys_u64(path: &Path) -> Option<u64> {
    read_small(path)?.trim().parse().ok()
}

/// Sorted names of the entries of `dir` that satisfy `keep`.
fn child_names(dir: &Path, keep: impl Fn(&Path) -> bool) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| keep(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

// ---------------------------------------------------------------------------------------
// Mounts and swap

#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    dev: DevNum,
    mount_point: String,
    source: String,
}

/// Parses /proc/self/mountinfo: `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] -
/// FSTYPE SOURCE SUPER_OPTIONS`. Lines that do not parse are skipped.
fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dev = DevNum::parse(fields.get(2)?)?;
            let mount_point = unescape_octal(fields.get(4)?);
            let separator = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            let source = unescape_octal(fields.get(separator + 2)?);
            Some(MountEntry { dev, mount_point, source })
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mountinfo and /proc/swaps paths
/// as `\ooo` octal escapes.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match escape.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the disk is mounted, if anywhere in this mount namespace. Matched by device number
/// (mountinfo's third field), which catches a mount through any path; and by the mount
/// source's device number, for filesystems such as btrfs whose mounts carry an anonymous
/// device number.
fn mount_point(dev: DevNum) -> Result<Option<String>, String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo to check mounts: {e}"))?;
    let entries = parse_mountinfo(&text);
    if let Some(e) = entries.iter().find(|e| e.dev == dev) {
        return Ok(Some(e.mount_point.clone()));
    }
    // Only /dev sources are looked up: other sources are not paths (`server:/export`), or
    // are paths on filesystems that may hang.
    let found =
        entries.iter().find(|e| e.source.starts_with("/dev/") && block_dev_of(Path::new(&e.source)) == Some(dev));
    Ok(found.map(|e| e.mount_point.clone()))
}

fn block_dev_of(path: &Path) -> Option<DevNum> {
    let m = std::fs::metadata(path).ok()?;
    m.file_type().is_block_device().then(|| DevNum::from_rdev(m.rdev()))
}

/// Paths of the active swap areas in /proc/swaps (header line first, path first on a line).
fn parse_swaps(text: &str) -> Vec<String> {
    text.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(unescape_octal).collect()
}

/// Whether the disk is an active swap area, under whatever path it was enabled.
fn is_active_swap(dev: DevNum) -> Result<bool, String> {
    let text = match std::fs::read_to_string("/proc/swaps") {
        Ok(text) => text,
        // A kernel without swap support has no /proc/swaps.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("cannot read /proc/swaps to check swap: {e}")),
    };
    Ok(parse_swaps(&text).iter().any(|p| block_dev_of(Path::new(p)) == Some(dev)))
}

// ---------------------------------------------------------------------------------------
// Signatures

#[derive(Debug, PartialEq, Eq)]
struct TesseraSuperblock {
    cluster_id: [u8; 16],
    device_id: u64,
}

/// The identity in a Tessera superblock, if `first` starts with one. Only the magic is
/// required: a damaged superblock still marks a disk that may hold someone's data.
fn parse_tessera_superblock(first: &[u8]) -> Option<TesseraSuperblock> {
    if first.len() < TESSERA_DEVICE_ID.end || first[..TESSERA_MAGIC.len()] != TESSERA_MAGIC {
        return None;
    }
    let cluster_id: [u8; 16] = first[TESSERA_CLUSTER_ID].try_into().ok()?;
    let device_id = u64::from_le_bytes(first[TESSERA_DEVICE_ID].try_into().ok()?);
    Some(TesseraSuperblock { cluster_id, device_id })
}

/// The first `len` bytes of the disk (fewer if it is smaller), read under [`PROBE_TIMEOUT`].
/// The read runs on its own thread: a dead disk can block it in the kernel forever, and
/// then that thread is left behind rather than the agent.
fn read_first_bytes(path: &Path, len: u64) -> Result<Vec<u8>, String> {
    let (tx, rx) = mpsc::sync_channel(1);
    let owned = path.to_path_buf();
    std::thread::Builder::new()
        .name("disk-probe".into())
        .spawn(move || {
            let read = || -> std::io::Result<Vec<u8>> {
                let mut buf = Vec::new();
                File::open(&owned)?.take(len).read_to_end(&mut buf)?;
                Ok(buf)
            };
            let _ = tx.send(read());
        })
        .map_err(|e| format!("cannot start a probe: {e}"))?;
    match rx.recv_timeout(PROBE_TIMEOUT) {
        Ok(Ok(first)) => Ok(first),
        Ok(Err(e)) => Err(format!("its first sector cannot be read: {e}")),
        Err(_) => Err(format!("probe timed out (reading its first sector took over {} s)", PROBE_TIMEOUT.as_secs())),
    }
}

/// Parses `blkid -o export` output: `KEY=value` lines, with shell-special characters in
/// values escaped by a backslash.
fn parse_blkid_export(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            let mut unescaped = String::with_capacity(value.len());
            let mut chars = value.chars();
            while let Some(c) = chars.next() {
                unescaped.push(if c == '\\' { chars.next().unwrap_or('\\') } else { c });
            }
            Some((key.trim().to_string(), unescaped))
        })
        .collect()
}

fn article(word: &str) -> &'static str {
    // By the first letter as read aloud: "an ext4", "an xfs", "a btrfs".
    match word.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'x') => "an",
        _ => "a",
    }
}

/// Why a disk with this low-level probe result is in use; `None` when the probe found
/// nothing at all.
fn signature_reason(probe: &BTreeMap<String, String>) -> Option<String> {
    let get = |key: &str| probe.get(key).map(String::as_str).filter(|v| !v.is_empty());
    let (kind, usage) = (get("TYPE"), get("USAGE"));
    if let Some(table) = get("PTTYPE") {
        return Some(format!("has a partition table ({table})"));
    }
    match (kind, usage) {
        (Some("LVM2_member"), _) => Some("an LVM physical volume".into()),
        (Some("swap"), _) => Some("a swap area".into()),
        (Some(kind), Some("raid")) | (Some(kind @ "linux_raid_member"), _) => Some(format!("a RAID member ({kind})")),
        (None, Some("raid")) => Some("a RAID member".into()),
        (Some(kind), Some("filesystem")) => Some(format!("holds {} {kind} filesystem", article(kind))),
        (Some(kind), _) => Some(format!("carries {} {kind} signature", article(kind))),
        // blkid said it found something, yet named nothing we know: not provably blank.
        (None, _) if probe.keys().any(|k| k != "DEVNAME") => {
            let keys: Vec<&str> = probe.keys().map(String::as_str).filter(|k| *k != "DEVNAME").collect();
            Some(format!("carries a signature ({})", keys.join(", ")))
        }
        (None, _) => None,
    }
}

/// First place `tool` is found in `$PATH` or [`EXTRA_TOOL_DIRS`].
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(EXTRA_TOOL_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| std::fs::metadata(candidate).is_ok_and(|m| m.is_file()))
}

/// Runs `blkid -p` (a low-level probe of the disk itself, not udev's cache) and returns why
/// the disk is in use, or `None` when blkid found no signature. Without blkid the disk
/// cannot be proven blank, so it is in use.
fn blkid_signature(path: &Path) -> Option<String> {
    let Some(blkid) = find_tool("blkid") else {
        return Some("blkid not found: cannot prove the disk is blank".into());
    };
    let mut command = Command::new(blkid);
    command.args(["-p", "-o", "export"]).arg(path);
    match run_with_timeout(command, PROBE_TIMEOUT) {
        Err(reason) => Some(reason),
        Ok((Some(0), stdout, _)) => signature_reason(&parse_blkid_export(&stdout))
            .or_else(|| Some("blkid reported a signature it did not name".into())),
        // blkid's documented exit code for "nothing found".
        Ok((Some(2), _, _)) => None,
        // blkid's exit code for an ambivalent probe: several signatures on one disk.
        Ok((Some(8), _, _)) => Some("carries conflicting signatures (blkid: ambivalent probe)".into()),
        Ok((code, _, stderr)) => {
            let code = code.map_or("a signal".to_string(), |c| format!("code {c}"));
            Some(format!("blkid failed ({code}): {}", stderr.lines().next().unwrap_or("").trim()))
        }
    }
}

/// Runs a command to completion within `timeout`: exit code (`None` when killed by a
/// signal), stdout and stderr, each read up to [`BLKID_OUTPUT_LIMIT_BYTES`]. On timeout the
/// child is killed and reaped on a side thread (a child stuck in the kernel is reaped when
/// it finally dies).
fn run_with_timeout(mut command: Command, timeout: Duration) -> Result<(Option<i32>, String, String), String> {
    let program = Path::new(command.get_program()).display().to_string();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    // Read both pipes while the child runs, so a chatty child never blocks on a full pipe.
    let stdout = child.stdout.take().map(spawn_reader);
    let stderr = child.stderr.take().map(spawn_reader);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(CHILD_POLL_INTERVAL),
            Ok(None) => {
                let _ = child.kill();
                std::thread::spawn(move || child.wait());
                return Err(format!("probe timed out ({program} took over {timeout:?})"));
            }
            Err(e) => return Err(format!("cannot wait for {program}: {e}")),
        }
    };
    let collect =
        |reader: Option<std::thread::JoinHandle<String>>| reader.and_then(|r| r.join().ok()).unwrap_or_default();
    Ok((status.code(), collect(stdout), collect(stderr)))
}

fn spawn_reader(pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut limited = pipe.take(BLKID_OUTPUT_LIMIT_BYTES);
        let _ = limited.read_to_end(&mut bytes);
        // Drain the rest so the child can exit, without keeping it.
        let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_decode_like_glibc() {
        // makedev(7, 5) and makedev(259, 1048577) as glibc encodes them.
        assert_eq!(DevNum::from_rdev(0x0705), DevNum { major: 7, minor: 5 });
        let (major, minor) = (259u64, 1_048_577u64);
        let rdev = ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12);
        assert_eq!(DevNum::from_rdev(rdev), DevNum { major, minor });
        assert_eq!(DevNum::parse("7:5\n"), Some(DevNum { major: 7, minor: 5 }));
        assert_eq!(DevNum::parse("7"), None);
        assert_eq!(DevNum::parse("x:5"), None);
        assert_eq!(DevNum { major: 254, minor: 16 }.to_string(), "254:16");
    }

    #[test]
    fn candidates_are_literals_or_last_component_globs() {
        assert_eq!(parse_candidate("/dev/loop3"), Candidate::Literal("/dev/loop3"));
        assert_eq!(parse_candidate("/dev/loop*"), Candidate::Glob { dir: "/dev", pattern: "loop*" });
        assert_eq!(
            parse_candidate("/dev/disk/by-id/nvme-?"),
            Candidate::Glob { dir: "/dev/disk/by-id", pattern: "nvme-?" }
        );
        assert_eq!(parse_candidate("/sd*"), Candidate::Glob { dir: "/", pattern: "sd*" });
        assert_eq!(parse_candidate("loop*"), Candidate::Glob { dir: ".", pattern: "loop*" });
        assert!(matches!(parse_candidate("/dev/*/disk"), Candidate::Invalid(_)));
        assert!(matches!(parse_candidate("/dev*/loop1"), Candidate::Invalid(_)));
        assert!(matches!(parse_candidate("/dev/*/"), Candidate::Invalid(_)));
        assert_eq!(glob_entry_path("/dev", "loop1"), "/dev/loop1");
        assert_eq!(glob_entry_path("/", "sda"), "/sda");
        assert_eq!(glob_entry_path(".", "sda"), "sda");
    }

    #[test]
    fn glob_names_match_exactly() {
        assert!(glob_name_matches("loop*", "loop12"));
        assert!(glob_name_matches("sd?", "sdb"));
        assert!(!glob_name_matches("sd?", "sdb1"));
        assert!(!glob_name_matches("xvdf", "xvdf1"), "never a prefix match");
        assert!(!glob_name_matches("*", ".hidden"));
        assert!(glob_name_matches(".h*", ".hidden"));
    }

    #[test]
    fn mountinfo_lines_parse_with_optional_fields_and_escapes() {
        let text = "\
36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw
90 27 0:45 / /data rw - btrfs /dev/vdb rw
garbage line
1 2 3:x / / rw - ext4 /dev/sda rw
";
        let entries = parse_mountinfo(text);
        assert_eq!(
            entries,
            vec![
                MountEntry {
                    dev: DevNum { major: 98, minor: 0 },
                    mount_point: "/mnt/with space".into(),
                    source: "/dev/root".into()
                },
                MountEntry {
                    dev: DevNum { major: 0, minor: 6 },
                    mount_point: "/dev".into(),
                    source: "devtmpfs".into()
                },
                MountEntry {
                    dev: DevNum { major: 0, minor: 45 },
                    mount_point: "/data".into(),
                    source: "/dev/vdb".into()
                },
            ]
        );
        assert!(parse_mountinfo("").is_empty());
        assert!(parse_mountinfo("1 2 7:0 / /x rw").is_empty(), "no separator");
    }

    #[test]
    fn octal_escapes_decode_and_odd_input_passes_through() {
        assert_eq!(unescape_octal("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape_octal("\\"), "\\");
        assert_eq!(unescape_octal("x\\04"), "x\\04");
        assert_eq!(unescape_octal("\\999"), "\\999");
        assert_eq!(unescape_octal("\\377"), "\u{fffd}", "invalid UTF-8 becomes a replacement character");
    }

    #[test]
    fn swaps_list_paths_after_the_header() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/vdb                                partition\t1048572\t\t0\t\t-2\n/swap\\040file file 10 0 -3\n";
        assert_eq!(parse_swaps(text), vec!["/dev/vdb".to_string(), "/swap file".to_string()]);
        assert!(parse_swaps("Filename\tType\n").is_empty());
        assert!(parse_swaps("").is_empty());
    }

    #[test]
    fn tessera_superblock_is_recognised_by_magic_and_decoded() {
        let mut block = vec![0u8; 512];
        block[..8].copy_from_slice(b"TESSDEV1");
        block[12..28].copy_from_slice(&[7u8; 16]);
        block[28..36].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(
            parse_tessera_superblock(&block),
            Some(TesseraSuperblock { cluster_id: [7u8; 16], device_id: 0x0102_0304_0506_0708 })
        );
        assert_eq!(parse_tessera_superblock(&block[..35]), None, "too short");
        assert_eq!(parse_tessera_superblock(&[]), None);
        block[0] = b'X';
        assert_eq!(parse_tessera_superblock(&block), None);
    }

    fn probe(text: &str) -> Option<String> {
        signature_reason(&parse_blkid_export(text))
    }

    #[test]
    fn blkid_export_output_names_the_signature() {
        assert_eq!(
            probe("DEVNAME=/dev/loop0\nUUID=1\nVERSION=1.0\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n").as_deref(),
            Some("holds an ext4 filesystem")
        );
        assert_eq!(probe("TYPE=btrfs\nUSAGE=filesystem").as_deref(), Some("holds a btrfs filesystem"));
        assert_eq!(probe("TYPE=xfs\nUSAGE=filesystem").as_deref(), Some("holds an xfs filesystem"));
        assert_eq!(
            probe("DEVNAME=/dev/loop0\nPTUUID=abc\nPTTYPE=gpt\n").as_deref(),
            Some("has a partition table (gpt)")
        );
        assert_eq!(probe("PTTYPE=dos\nTYPE=vfat\nUSAGE=filesystem").as_deref(), Some("has a partition table (dos)"));
        assert_eq!(probe("TYPE=LVM2_member\nUSAGE=raid").as_deref(), Some("an LVM physical volume"));
        assert_eq!(probe("TYPE=swap\nUSAGE=other").as_deref(), Some("a swap area"));
        assert_eq!(probe("TYPE=linux_raid_member\nUSAGE=raid").as_deref(), Some("a RAID member (linux_raid_member)"));
        assert_eq!(probe("TYPE=linux_raid_member").as_deref(), Some("a RAID member (linux_raid_member)"));
        assert_eq!(probe("TYPE=isw_raid_member\nUSAGE=raid").as_deref(), Some("a RAID member (isw_raid_member)"));
        assert_eq!(probe("USAGE=raid").as_deref(), Some("a RAID member"));
        assert_eq!(probe("TYPE=crypto_LUKS\nUSAGE=crypto").as_deref(), Some("carries a crypto_LUKS signature"));
        assert_eq!(
            probe("SBMAGIC=x\nSBMAGIC_OFFSET=0").as_deref(),
            Some("carries a signature (SBMAGIC, SBMAGIC_OFFSET)")
        );
        assert_eq!(probe("DEVNAME=/dev/loop0\n"), None);
        assert_eq!(probe(""), None);
        assert_eq!(
            probe("TYPE=\nUSAGE=").as_deref(),
            Some("carries a signature (TYPE, USAGE)"),
            "found but unnamed: not provably blank"
        );
    }

    #[test]
    fn blkid_export_values_are_unescaped() {
        let parsed = parse_blkid_export("LABEL=my\\ disk\\\\x\nTYPE=ext4\nnot a pair\nEND=\\");
        assert_eq!(parsed.get("LABEL").map(String::as_str), Some("my disk\\x"));
        assert_eq!(parsed.get("TYPE").map(String::as_str), Some("ext4"));
        assert_eq!(parsed.get("END").map(String::as_str), Some("\\"));
        assert_eq!(parsed.len(), 3);
    }

    #[test]
    fn dev_paths_come_from_uevent_or_the_sysfs_name() {
        assert_eq!(uevent_devname("MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n").as_deref(), Some("vda"));
        assert_eq!(uevent_devname("MAJOR=254\n"), None);
        assert_eq!(uevent_devname("DEVNAME=\n"), None);
        assert_eq!(dev_path("vda", Some("vda")), "/dev/vda");
        assert_eq!(dev_path("cciss!c0d0", Some("cciss/c0d0")), "/dev/cciss/c0d0");
        assert_eq!(dev_path("cciss!c0d0", None), "/dev/cciss/c0d0");
    }

    #[test]
    fn a_command_past_its_timeout_is_killed() {
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let started = Instant::now();
        let result = run_with_timeout(sleep, Duration::from_millis(200));
        assert!(result.as_ref().is_err_and(|e| e.starts_with("probe timed out")), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut echo = Command::new("sh");
        echo.args(["-c", "echo out; echo err >&2; exit 3"]);
        assert_eq!(run_with_timeout(echo, Duration::from_secs(10)), Ok((Some(3), "out\n".into(), "err\n".into())));
    }

    #[test]
    fn paths_that_are_not_block_devices_are_missing() {
        let opts = DiscoveryOptions::default();
        let missing = classify(Path::new("/nonexistent/tessera-disk"), &opts);
        assert_eq!(missing.usage, DiskUsage::Missing { reason: "does not exist".into() });
        assert_eq!(missing.path, "/nonexistent/tessera-disk");
        let not_block = classify(Path::new("/proc/self/mountinfo"), &opts);
        assert_eq!(not_block.usage, DiskUsage::Missing { reason: "is not a block device".into() });
        assert_eq!(classify(Path::new(""), &opts).usage, DiskUsage::Missing { reason: "does not exist".into() });
    }
}
