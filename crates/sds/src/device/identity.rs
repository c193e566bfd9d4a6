//! Which device is this? A device is known by its superblock (cluster id, device id), never
//! by its path alone: `/dev/sdX` names move between boots and files get renamed, so a blank
//! disk can turn up at the path where a device in service used to be. Formatting it would
//! serve an empty disk as a complete copy — a silent loss of a copy the cluster believes it
//! has.
//!
//! Two halves:
//! - [`decide`] (pure): given what the first 4 KiB at the recorded path say, and where else
//!   the device's superblock was found, what to do: open it, format it (only a new device
//!   that holds no Tessera superblock), open it where it moved to, or refuse with a reason.
//! - the look-up I/O ([`probe`], [`locate`], [`stable_path`]): read the superblock block of
//!   each candidate — read-only, without the exclusive open that `Device::open` takes, so
//!   looking never disturbs a device another opener (or another SDS) holds.

use std::collections::HashSet;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::layout::{Superblock, SUPERBLOCK_SIZE_BYTES};

/// Where the stable names of disks live (udev): they follow a disk across boots.
pub const STABLE_NAME_DIR: &str = "/dev/disk/by-id";
/// Where the kernel lists whole disks (partitions are below them, not here).
const SYS_BLOCK_DIR: &str = "/sys/block";
/// Bounds one look-up: entries read from any one directory.
pub const MAX_CANDIDATES_PER_DIR: usize = 4096;
/// Kernel disk name prefixes never read during a look-up: network block devices (one may be
/// an export of this very cluster, whose read could wait on this SDS) and removable media
/// (a read can hang on an empty drive or spin up a floppy).
const SKIPPED_DISK_PREFIXES: [&str; 3] = ["nbd", "sr", "fd"];

/// What a device's superblock says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: [u8; 16],
    pub device_id: u64,
    pub extent_size_bytes: u32,
}

/// What the first 4 KiB of a path hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Nothing at that path.
    Missing,
    /// It could not be opened or read (the error, as text).
    Unreadable(String),
    /// No Tessera magic: never formatted (or too small to hold a superblock).
    Blank,
    /// The Tessera magic with a bad checksum or an unknown version: may still hold data
    /// someone wants, so it is never formatted over.
    Damaged(String),
    /// A valid Tessera superblock.
    Tessera(Identity),
}

impl Probe {
    /// Decodes the first block of a device (pure).
    pub fn from_block(block: &[u8; SUPERBLOCK_SIZE_BYTES as usize]) -> Probe {
        match Superblock::decode(block) {
            Ok(sb) => Probe::Tessera(Identity {
                cluster_id: sb.cluster_id,
                device_id: sb.device_id,
                extent_size_bytes: sb.extent_size_bytes,
            }),
            Err(super::DeviceError::NotFormatted) => Probe::Blank,
            Err(e) => Probe::Damaged(e.to_string()),
        }
    }

    /// What was found, in words, for reports.
    pub fn describe(&self, cluster_id: [u8; 16]) -> String {
        match self {
            Probe::Missing => "nothing (no such file or device)".into(),
            Probe::Unreadable(e) => format!("an unreadable device ({e})"),
            Probe::Blank => "a blank device (no Tessera superblock)".into(),
            Probe::Damaged(e) => format!("a damaged Tessera superblock ({e})"),
            Probe::Tessera(id) if id.cluster_id != cluster_id => {
                format!("device {} of another cluster ({:02x?})", id.device_id, id.cluster_id)
            }
            Probe::Tessera(id) => format!("device {} of this cluster", id.device_id),
        }
    }
}

/// What the MDM records about the device being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub cluster_id: [u8; 16],
    pub device_id: u64,
    /// The pool's extent size: the device must have been formatted with it.
    pub extent_size_bytes: u32,
    /// False only for a device the MDM records as `New` (added, never in service). Only
    /// such a device may ever be formatted.
    pub in_service: bool,
}

impl Expected {
    /// True when `probe` is this device's superblock (same cluster, same device id).
    pub fn is_found_in(&self, probe: &Probe) -> bool {
        matches!(probe, Probe::Tessera(id) if id.cluster_id == self.cluster_id && id.device_id == self.device_id)
    }
}

/// What to do with a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Its superblock is at the recorded path: open it there.
    Open,
    /// A new device whose recorded path holds no Tessera superblock: format it there.
    Format,
    /// Its superblock is at `path`, not at the recorded path: open it there and record the
    /// new path with the MDM.
    Moved { path: PathBuf },
    /// Leave it alone. An in-service device is then failed (its PGs re-peer onto the other
    /// copies); a new one stays new for the administrator.
    Refuse { reason: String },
}

/// Decides what a device is (pure). `at_recorded` is what the recorded path holds;
/// `found_elsewhere` are the other places (distinct devices or files) whose superblock
/// names this cluster and device — looked for only when the recorded path does not hold it.
///
/// Invariant: `Format` is returned only for a device not in service whose recorded path
/// holds no Tessera superblock at all and which was found nowhere else.
pub fn decide(
    expected: &Expected,
    recorded: &Path,
    at_recorded: &Probe,
    found_elsewhere: &[(PathBuf, Identity)],
) -> Decision {
    let id = expected.device_id;
    let wrong_extent = |found: &Identity, path: &Path| Decision::Refuse {
        reason: format!(
            "device {id} at {} has extent size {} but its pool uses {}",
            path.display(),
            found.extent_size_bytes,
            expected.extent_size_bytes
        ),
    };
    if let Probe::Tessera(found) = at_recorded {
        if expected.is_found_in(at_recorded) {
            if found.extent_size_bytes != expected.extent_size_bytes {
                return wrong_extent(found, recorded);
            }
            return Decision::Open;
        }
    }
    let what = at_recorded.describe(expected.cluster_id);
    match found_elsewhere {
        [(path, found)] => {
            if found.extent_size_bytes != expected.extent_size_bytes {
                return wrong_extent(found, path);
            }
            Decision::Moved { path: path.clone() }
        }
        [] if !expected.in_service && *at_recorded == Probe::Blank => Decision::Format,
        [] if !expected.in_service => Decision::Refuse {
            reason: format!(
                "new device {id}: {} holds {what}; only a device without a Tessera superblock is formatted",
                recorded.display()
            ),
        },
        [] => Decision::Refuse {
            reason: format!(
                "device {id} is in service but {} holds {what}, and its superblock is nowhere else; \
                 never formatting a device in service",
                recorded.display()
            ),
        },
        many => Decision::Refuse {
            reason: format!(
                "device {id} is not at {} ({what}) but its superblock is at {} places ({}); refusing to guess",
                recorded.display(),
                many.len(),
                many.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

// ---------------------------------------------------------------------------------------
// The look-up I/O

/// Reads the superblock block of `path`: a plain read-only open (no `O_EXCL`, no lock).
pub fn probe(path: &Path) -> Probe {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Probe::Missing,
        Err(e) => return Probe::Unreadable(e.to_string()),
    };
    let mut block = [0u8; SUPERBLOCK_SIZE_BYTES as usize];
    match file.read_exact_at(&mut block, 0) {
        Ok(()) => Probe::from_block(&block),
        // Shorter than one block: cannot hold a superblock.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Probe::Blank,
        Err(e) => Probe::Unreadable(e.to_string()),
    }
}

/// What makes two paths the same device or file: the device number of a block device, the
/// (file system, inode) pair of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FileKey {
    Block(u64),
    File(u64, u64),
}

/// The key of a block device or regular file (symlinks followed); `None` for anything else.
fn file_key(path: &Path) -> Option<FileKey> {
    let m = std::fs::metadata(path).ok()?;
    if m.file_type().is_block_device() {
        Some(FileKey::Block(m.rdev()))
    } else if m.file_type().is_file() {
        Some(FileKey::File(m.dev(), m.ino()))
    } else {
        None
    }
}

/// A stable name of the block device at `path`: the first (by name) entry of
/// [`STABLE_NAME_DIR`] resolving to the same device number. Files have none.
pub fn stable_path(path: &Path) -> Option<PathBuf> {
    let Some(FileKey::Block(rdev)) = file_key(path) else { return None };
    let mut names: Vec<PathBuf> = std::fs::read_dir(STABLE_NAME_DIR)
        .ok()?
        .take(MAX_CANDIDATES_PER_DIR)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    names.into_iter().find(|p| file_key(p) == Some(FileKey::Block(rdev)))
}

/// Whole disks the kernel lists (loop devices included), as `/dev/<name>`: skips empty ones
/// (an unattached loop device has size 0) and [`SKIPPED_DISK_PREFIXES`].
fn whole_disks() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(SYS_BLOCK_DIR) else { return Vec::new() };
    let mut disks: Vec<PathBuf> = entries
        .take(MAX_CANDIDATES_PER_DIR)
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if SKIPPED_DISK_PREFIXES.iter().any(|p| name.starts_with(p)) {
                return None;
            }
            let sectors: u64 = std::fs::read_to_string(e.path().join("size")).ok()?.trim().parse().ok()?;
            (sectors > 0).then(|| Path::new("/dev").join(name))
        })
        .collect();
    disks.sort();
    disks
}

/// Regular files in `dir`, sorted.
fn regular_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .take(MAX_CANDIDATES_PER_DIR)
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// Looks for the device `expected` everywhere it may have gone: `hints` first (its stable
/// path, this SDS's other devices' paths — two devices swapped), then every whole disk and
/// every regular file in the directory of `recorded`. Returns each distinct device or file
/// whose superblock names this cluster and device, with the path it was seen under (the
/// first one, so a hint wins over a kernel name of the same disk).
pub fn locate(expected: &Expected, recorded: &Path, hints: &[PathBuf]) -> Vec<(PathBuf, Identity)> {
    let mut seen: HashSet<FileKey> = HashSet::new();
    // The recorded path was probed already: whatever it is, it is not the device.
    if let Some(key) = file_key(recorded) {
        seen.insert(key);
    }
    let dir_files = recorded.parent().map(regular_files).unwrap_or_default();
    let mut found = Vec::new();
    for path in hints.iter().cloned().chain(whole_disks()).chain(dir_files) {
        let Some(key) = file_key(&path) else { continue };
        if !seen.insert(key) {
            continue;
        }
        if let Probe::Tessera(id) = probe(&path) {
            if expected.is_found_in(&Probe::Tessera(id)) {
                found.push((path, id));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: [u8; 16] = [7; 16];
    const OTHER_CLUSTER: [u8; 16] = [9; 16];
    const EXTENT: u32 = 1 << 20;

    fn expected(in_service: bool) -> Expected {
        Expected { cluster_id: CLUSTER, device_id: 5, extent_size_bytes: EXTENT, in_service }
    }

    fn tessera(cluster_id: [u8; 16], device_id: u64) -> Identity {
        Identity { cluster_id, device_id, extent_size_bytes: EXTENT }
    }

    fn refused(d: Decision, says: &str) {
        match d {
            Decision::Refuse { reason } => assert!(reason.contains(says), "{reason:?} should say {says:?}"),
            other => panic!("expected a refusal saying {says:?}, got {other:?}"),
        }
    }

    const RECORDED: &str = "/dev/sdb";

    #[test]
    fn its_own_superblock_is_opened_in_any_state() {
        for in_service in [false, true] {
            let here = Probe::Tessera(tessera(CLUSTER, 5));
            assert_eq!(decide(&expected(in_service), Path::new(RECORDED), &here, &[]), Decision::Open);
        }
    }

    #[test]
    fn only_a_new_blank_device_is_formatted() {
        let at = Path::new(RECORDED);
        assert_eq!(decide(&expected(false), at, &Probe::Blank, &[]), Decision::Format);
        for probe in [
            Probe::Tessera(tessera(OTHER_CLUSTER, 5)),
            Probe::Tessera(tessera(CLUSTER, 6)),
            Probe::Damaged("checksum mismatch".into()),
            Probe::Missing,
            Probe::Unreadable("EIO".into()),
        ] {
            refused(decide(&expected(false), at, &probe, &[]), "new device 5");
        }
        refused(decide(&expected(false), at, &Probe::Tessera(tessera(OTHER_CLUSTER, 5)), &[]), "another cluster");
        refused(decide(&expected(false), at, &Probe::Tessera(tessera(CLUSTER, 6)), &[]), "device 6 of this cluster");
    }

    #[test]
    fn a_device_in_service_is_never_formatted() {
        let at = Path::new(RECORDED);
        for probe in [
            Probe::Blank,
            Probe::Missing,
            Probe::Unreadable("EIO".into()),
            Probe::Damaged("checksum mismatch".into()),
            Probe::Tessera(tessera(OTHER_CLUSTER, 5)),
            Probe::Tessera(tessera(CLUSTER, 6)),
        ] {
            let d = decide(&expected(true), at, &probe, &[]);
            assert_ne!(d, Decision::Format);
            refused(d, "never formatting a device in service");
        }
    }

    #[test]
    fn a_device_found_elsewhere_moved() {
        let new_home = PathBuf::from("/dev/sdc");
        let elsewhere = [(new_home.clone(), tessera(CLUSTER, 5))];
        for in_service in [false, true] {
            for here in [Probe::Blank, Probe::Missing, Probe::Tessera(tessera(CLUSTER, 6))] {
                let d = decide(&expected(in_service), Path::new(RECORDED), &here, &elsewhere);
                assert_eq!(d, Decision::Moved { path: new_home.clone() }, "{here:?}");
            }
        }
    }

    #[test]
    fn found_at_several_places_is_refused() {
        let elsewhere =
            [(PathBuf::from("/dev/sdc"), tessera(CLUSTER, 5)), (PathBuf::from("/dev/sdd"), tessera(CLUSTER, 5))];
        for in_service in [false, true] {
            refused(decide(&expected(in_service), Path::new(RECORDED), &Probe::Blank, &elsewhere), "refusing to guess");
        }
    }

    #[test]
    fn another_extent_size_is_refused_here_or_elsewhere() {
        let odd = Identity { extent_size_bytes: EXTENT * 2, ..tessera(CLUSTER, 5) };
        let at = Path::new(RECORDED);
        refused(decide(&expected(true), at, &Probe::Tessera(odd), &[]), "extent size");
        refused(decide(&expected(true), at, &Probe::Blank, &[(PathBuf::from("/x"), odd)]), "extent size");
    }

    #[test]
    fn probe_reads_blank_short_damaged_and_valid_blocks() {
        let dir = std::env::temp_dir().join(format!("tessera-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        assert_eq!(probe(&dir.join("absent")), Probe::Missing);
        assert_eq!(probe(&write("short", b"TESSDEV1")), Probe::Blank);
        assert_eq!(probe(&write("zeros", &[0u8; 8192])), Probe::Blank);
        let sb = Superblock::plan(CLUSTER, 5, EXTENT, 64 << 20).unwrap();
        let good = write("good", &sb.encode());
        assert_eq!(probe(&good), Probe::Tessera(tessera(CLUSTER, 5)));
        let mut bad = sb.encode();
        bad[30] ^= 1;
        assert!(matches!(probe(&write("bad", &bad)), Probe::Damaged(_)));

        // locate: finds the renamed file in the recorded path's directory, once, and ignores
        // the other device's superblock.
        let other = Superblock::plan(CLUSTER, 6, EXTENT, 64 << 20).unwrap();
        let recorded = write("recorded", &other.encode());
        let found = locate(&expected(true), &recorded, std::slice::from_ref(&good));
        assert_eq!(found, vec![(good.clone(), tessera(CLUSTER, 5))]);
        // A hard link is the same file, not a second copy.
        std::fs::hard_link(&good, dir.join("good-link")).unwrap();
        assert_eq!(locate(&expected(true), &recorded, &[]).len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
