//! Filesystems on attached volumes: probe by magic bytes (as REX-Ray did), decide between
//! mounting, formatting and refusing, mkfs, mount and unmount, each external step under a
//! timeout.
//!
//! The format rule: **only a volume that was never written is formatted** — one that reads
//! as zeros where filesystems keep their magic *and* of which no SDS holds an allocated
//! extent. Zeros in the first 64 KiB alone prove nothing: a database writing the raw device
//! may leave them there and keep its data further on. [`format_decision`] is the rule;
//! [`mkfs`] takes the [`NeverWritten`] that only it hands out, so no path can format
//! without going through it.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use crate::exec::{run, StepError};

pub const MKFS_TIMEOUT: Duration = Duration::from_secs(180);
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
pub const UMOUNT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    pub fn parse(s: &str) -> Result<FsType, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            "btrfs" => Ok(FsType::Btrfs),
            other => Err(format!("unsupported filesystem {other:?}: expected ext4, xfs or btrfs")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }
}

/// Where each filesystem keeps its magic number.
const EXT_MAGIC: (u64, &[u8]) = (0x438, &[0x53, 0xEF]);
const XFS_MAGIC: (u64, &[u8]) = (0, b"XFSB");
const BTRFS_MAGIC: (u64, &[u8]) = (0x10040, b"_BHRfS_M");
/// Enough of the device to see every magic above.
pub const PROBE_BYTES: usize = 0x10040 + 8;

/// The filesystem whose magic `head` (the first bytes of a device) carries. Any other
/// non-zero content is reported as unknown, so that it is never formatted over.
pub fn probe_bytes(head: &[u8]) -> Probe {
    let has = |(offset, magic): (u64, &[u8])| {
        head.get(offset as usize..offset as usize + magic.len()).is_some_and(|b| b == magic)
    };
    if has(XFS_MAGIC) {
        Probe::Fs(FsType::Xfs)
    } else if has(BTRFS_MAGIC) {
        Probe::Fs(FsType::Btrfs)
    } else if has(EXT_MAGIC) {
        Probe::Fs(FsType::Ext4)
    } else if head.iter().all(|b| *b == 0) {
        Probe::Blank
    } else {
        Probe::Unknown
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Zeros where every known filesystem keeps its magic. Not proof that the volume was
    /// never written: see [`format_decision`].
    Blank,
    Fs(FsType),
    /// Data that is no filesystem we know: left alone.
    Unknown,
}

/// Reads the start of `device` and probes it (blocking; small).
pub fn probe_device(device: &Path) -> std::io::Result<Probe> {
    let mut f = std::fs::File::open(device)?;
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    let mut head = vec![0u8; PROBE_BYTES.min(len as usize)];
    f.read_exact(&mut head)?;
    Ok(probe_bytes(&head))
}

/// Proof that [`format_decision`] found the volume never written. Only that function makes
/// one (the field is private), and [`mkfs`] takes it by value: formatting without the
/// check does not compile, and one check serves one format.
#[derive(Debug, PartialEq, Eq)]
pub struct NeverWritten(());

/// What to do with an attached volume.
#[derive(Debug, PartialEq, Eq)]
pub enum FormatDecision {
    /// It holds this filesystem: mount it as it is.
    Mount(FsType),
    /// It was never written: format it.
    Format(NeverWritten),
    /// Leave it exactly as it is, and say why (one line).
    Refuse(String),
}

/// Whether [`format_decision`] needs the cluster's count of allocated extents for `probe`.
/// Only a blank probe does: a filesystem or other data decides alone, so mounting a
/// formatted volume never depends on every SDS answering.
pub fn needs_extent_count(probe: Probe) -> bool {
    probe == Probe::Blank
}

/// The format rule. `allocated_extents` is how many extents of volume `name` the cluster
/// holds (any SDS of its pool), or `None` when it was not asked or could not tell — which,
/// for a blank probe, refuses: the answer must be known to be zero.
pub fn format_decision(name: &str, probe: Probe, allocated_extents: Option<u64>) -> FormatDecision {
    const KNOWN: &str = "ext4, xfs or btrfs";
    match (probe, allocated_extents) {
        (Probe::Fs(fs), _) => FormatDecision::Mount(fs),
        (Probe::Unknown, _) => FormatDecision::Refuse(format!(
            "volume {name} holds data that is no {KNOWN} filesystem; refusing to format or mount it"
        )),
        (Probe::Blank, Some(0)) => FormatDecision::Format(NeverWritten(())),
        (Probe::Blank, Some(n)) => FormatDecision::Refuse(format!(
            "volume {name} holds data ({n} extents written) but no {KNOWN} filesystem; refusing to format it"
        )),
        (Probe::Blank, None) => {
            FormatDecision::Refuse(format!("cannot tell whether volume {name} was ever written; refusing to format it"))
        }
    }
}

/// Formats `device` with `fs`; `_proof` is what [`format_decision`] handed out for it.
pub async fn mkfs(device: &Path, fs: FsType, _proof: NeverWritten) -> Result<(), StepError> {
    let dev = device.to_string_lossy();
    // No discard: a new volume is thin and reads as zeros already, and trimming all of it
    // through the export would only cost time.
    let (program, args): (&str, &[&str]) = match fs {
        FsType::Ext4 => ("mkfs.ext4", &["-F", "-q", "-E", "nodiscard"]),
        FsType::Xfs => ("mkfs.xfs", &["-f", "-q", "-K"]),
        FsType::Btrfs => ("mkfs.btrfs", &["-f", "-q", "-K"]),
    };
    let mut all = args.to_vec();
    all.push(&dev);
    run("format", program, &all, MKFS_TIMEOUT).await.map(|_| ())
}

pub async fn mount(device: &Path, target: &Path, fs: FsType) -> Result<(), StepError> {
    let (dev, tgt) = (device.to_string_lossy(), target.to_string_lossy());
    run("mount", "mount", &["-t", fs.as_str(), &dev, &tgt], MOUNT_TIMEOUT).await.map(|_| ())
}

pub async fn umount(target: &Path) -> Result<(), StepError> {
    run("unmount", "umount", &[&target.to_string_lossy()], UMOUNT_TIMEOUT).await.map(|_| ())
}

/// The source device of the mount at exactly `target`, if something is mounted there.
pub fn mounted_source(target: &Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let target = target.to_string_lossy();
    // Fields: id parent major:minor root mountpoint options ... - fstype source superopts
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mount_point = unescape(fields.get(4)?);
        let dash = fields.iter().position(|f| *f == "-")?;
        (mount_point == target).then(|| unescape(fields.get(dash + 2).copied().unwrap_or("")))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; PROBE_BYTES];
        head[offset..offset + magic.len()].copy_from_slice(magic);
        head
    }

    #[test]
    fn probes_each_filesystem_by_its_magic() {
        assert_eq!(probe_bytes(&vec![0u8; PROBE_BYTES]), Probe::Blank);
        assert_eq!(probe_bytes(&with(0x438, &[0x53, 0xEF])), Probe::Fs(FsType::Ext4));
        assert_eq!(probe_bytes(&with(0, b"XFSB")), Probe::Fs(FsType::Xfs));
        assert_eq!(probe_bytes(&with(0x10040, b"_BHRfS_M")), Probe::Fs(FsType::Btrfs));
        assert_eq!(probe_bytes(&with(100, b"data")), Probe::Unknown, "unknown data is never formatted over");
        assert_eq!(probe_bytes(&[]), Probe::Blank, "an empty read is blank (a zero-length device)");
    }

    #[test]
    fn only_a_never_written_volume_is_formatted() {
        let never = FormatDecision::Format(NeverWritten(()));
        assert_eq!(format_decision("v", Probe::Blank, Some(0)), never, "blank and no extent anywhere");
        for probe in [Probe::Fs(FsType::Xfs), Probe::Unknown] {
            for count in [None, Some(0), Some(7)] {
                assert!(
                    !matches!(format_decision("v", probe, count), FormatDecision::Format(_)),
                    "{probe:?} with {count:?} extents must never format"
                );
            }
        }
        assert_eq!(format_decision("v", Probe::Fs(FsType::Ext4), None), FormatDecision::Mount(FsType::Ext4));
    }

    #[test]
    fn zeros_over_written_extents_are_refused_not_formatted() {
        let FormatDecision::Refuse(why) = format_decision("db", Probe::Blank, Some(3)) else {
            panic!("a blank head over written extents must be refused")
        };
        assert!(
            why.contains("volume db holds data (3 extents written)") && why.contains("refusing to format"),
            "{why}"
        );
        assert!(!why.contains('\n'), "one line: {why}");
        let FormatDecision::Refuse(why) = format_decision("db", Probe::Blank, None) else {
            panic!("an unknown extent count must be refused")
        };
        assert!(why.contains("cannot tell whether volume db was ever written"), "{why}");
        let FormatDecision::Refuse(why) = format_decision("db", Probe::Unknown, Some(0)) else {
            panic!("unknown data must be refused")
        };
        assert!(why.contains("no ext4, xfs or btrfs filesystem"), "{why}");
    }

    #[test]
    fn only_a_blank_probe_asks_the_cluster() {
        assert!(needs_extent_count(Probe::Blank));
        assert!(!needs_extent_count(Probe::Fs(FsType::Btrfs)) && !needs_extent_count(Probe::Unknown));
    }

    #[test]
    fn fs_names_parse_strictly() {
        assert_eq!(FsType::parse(" XFS "), Ok(FsType::Xfs));
        assert!(FsType::parse("ntfs").is_err());
    }
}
