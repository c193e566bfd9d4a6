//! The crash disk through a real FUSE mount: real files, real syscalls, the
//! daemon binary of this crate. Needs /dev/fuse and fusermount3; without
//! them every test fails with the install hint (scripts/install-deps.sh).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use tessera_crashdisk::{CrashDisk, FaultOp};

const DISK_BYTES: usize = 1 << 20;
const OLD: u8 = 0xaa;
const NEW: u8 = 0x55;

/// A backing directory with `d1` and `d2` (1 MiB of `OLD` each), a mount
/// point and a daemon; all removed on drop, the daemon first.
struct Fixture {
    disk: Option<CrashDisk>,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "crashdisk-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&root);
        for dir in ["backing", "mnt"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for name in ["d1", "d2"] {
            std::fs::write(root.join("backing").join(name), vec![OLD; DISK_BYTES]).unwrap();
        }
        let disk = CrashDisk::start(
            Path::new(env!("CARGO_BIN_EXE_crashdisk")),
            &root.join("backing"),
            &root.join("mnt"),
            &root.join("control.sock"),
        )
        .unwrap_or_else(|e| panic!("crash disk did not start: {e}"));
        Fixture { disk: Some(disk), root }
    }

    fn disk(&self) -> &CrashDisk {
        self.disk.as_ref().unwrap()
    }

    fn open(&self, name: &str) -> File {
        OpenOptions::new().read(true).write(true).open(self.disk().path(name)).unwrap()
    }

    fn backing(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.root.join("backing").join(name)).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.disk.take());
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn read(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn fdatasync(file: &File) -> io::Result<()> {
    // SAFETY: fdatasync on an open fd.
    if unsafe { libc::fdatasync(file.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fallocate(file: &File, mode: i32, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: fallocate on an open fd.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[test]
fn unsynced_write_is_lost_at_a_cut() {
    let fx = Fixture::new();
    let file = fx.open("d1");
    file.write_all_at(&[NEW; 4096], 8192).unwrap();
    assert_eq!(read(&file, 8192, 4096), vec![NEW; 4096], "a read sees the write cache");
    assert_eq!(fx.backing("d1")[8192..12288], [OLD; 4096], "the platter does not yet");
    fx.disk().cut("d1").unwrap();
    assert_eq!(read(&file, 8192, 4096), vec![OLD; 4096], "after the cut the old data is back");
    assert_eq!(std::fs::metadata(fx.disk().path("d1")).unwrap().len(), DISK_BYTES as u64);
}

#[test]
fn fdatasynced_write_survives_a_cut() {
    let fx = Fixture::new();
    let file = fx.open("d1");
    file.write_all_at(&[NEW; 4096], 0).unwrap();
    fdatasync(&file).unwrap();
    file.write_all_at(&[NEW; 512], 65536).unwrap();
    fx.disk().cut_all().unwrap();
    assert_eq!(read(&file, 0, 4096), vec![NEW; 4096]);
    assert_eq!(read(&file, 65536, 512), vec![OLD; 512], "the write after the sync is lost");
    let stats = fx.disk().stats("d1").unwrap();
    assert_eq!((stats.syncs, stats.pending_ops, stats.cuts), (1, 0, 1));
    // fsync (not only fdatasync) is a flush too.
    file.write_all_at(&[NEW; 512], 65536).unwrap();
    file.sync_all().unwrap();
    fx.disk().cut_all().unwrap();
    assert_eq!(read(&file, 65536, 512), vec![NEW; 512]);
}

#[test]
fn punch_hole_and_zero_range_read_as_zero_and_are_cached_until_sync() {
    let fx = Fixture::new();
    let file = fx.open("d1");
    fallocate(&file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 4096, 8192).unwrap();
    fallocate(&file, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, 65536, 4096).unwrap();
    assert_eq!(read(&file, 4096, 8192), vec![0; 8192]);
    assert_eq!(read(&file, 65536, 4096), vec![0; 4096]);
    assert_eq!(read(&file, 0, 4096), vec![OLD; 4096]);
    fx.disk().cut("d1").unwrap();
    assert_eq!(read(&file, 4096, 8192), vec![OLD; 8192], "an unsynced punch is lost at a cut");
    fallocate(&file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 4096, 8192).unwrap();
    fdatasync(&file).unwrap();
    fx.disk().cut("d1").unwrap();
    assert_eq!(read(&file, 4096, 8192), vec![0; 8192]);
    assert_eq!(fx.backing("d1")[4096..12288], [0; 8192]);
    assert_eq!(std::fs::metadata(fx.disk().path("d1")).unwrap().len(), DISK_BYTES as u64, "KEEP_SIZE kept it");
}

#[test]
fn torn_cut_keeps_whole_sectors_and_replays_by_seed() {
    let fx = Fixture::new();
    let file = fx.open("d1");
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        file.write_all_at(&[NEW; 64 * 512], 0).unwrap();
        fx.disk().cut_torn("d1", 1234).unwrap();
        let data = read(&file, 0, 64 * 512);
        for sector in data.chunks(512) {
            assert!(sector.iter().all(|&b| b == NEW) || sector.iter().all(|&b| b == OLD), "torn inside a sector");
        }
        let kept = data.chunks(512).filter(|sector| sector[0] == NEW).count();
        assert!(kept > 8 && kept < 56, "about half the sectors survive, {kept} of 64 did");
        outcomes.push(data);
        // Put the old data back, durably, for the next round.
        file.write_all_at(&[OLD; 64 * 512], 0).unwrap();
        fdatasync(&file).unwrap();
    }
    assert_eq!(outcomes[0], outcomes[1], "one seed, one outcome");
}

#[test]
fn fdatasync_eio_once_loses_the_pending_data_and_the_next_fdatasync_succeeds() {
    let fx = Fixture::new();
    let file = fx.open("d1");
    file.write_all_at(&[NEW; 4096], 0).unwrap();
    fx.disk().fail("d1", FaultOp::Flush, true).unwrap();
    let error = fdatasync(&file).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO));
    let stats = fx.disk().stats("d1").unwrap();
    assert_eq!((stats.failed_ops, stats.pending_ops), (1, 0), "the failed flush dropped the write: {stats:?}");
    // What Linux does too: the error is reported once, the next fdatasync
    // succeeds, and the data is gone. The SDS must latch the first EIO.
    fdatasync(&file).unwrap();
    assert_eq!(read(&file, 0, 4096), vec![OLD; 4096]);
}

#[test]
fn read_and_write_faults_answer_eio_until_healed() {
    let fx = Fixture::new();
    let file = fx.open("d1");
    fx.disk().fail("d1", FaultOp::Any, false).unwrap();
    let mut buf = [0u8; 512];
    assert_eq!(file.read_at(&mut buf, 0).unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(file.write_at(&buf, 0).unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(read(&fx.open("d2"), 0, 512), vec![OLD; 512], "other files are not affected");
    fx.disk().heal("d1").unwrap();
    assert_eq!(read(&file, 0, 512), vec![OLD; 512]);
    assert_eq!(fx.disk().stats("d1").unwrap().failed_ops, 2);
}

#[test]
fn hung_write_completes_after_release_while_the_rest_goes_on() {
    let fx = Fixture::new();
    fx.disk().hang("d1").unwrap();
    let file = fx.open("d1");
    let (done_tx, done_rx) = mpsc::channel();
    let writer = std::thread::spawn(move || {
        let result = file.write_all_at(&[NEW; 4096], 0);
        done_tx.send(result.map_err(|e| e.to_string())).unwrap();
        file
    });
    assert!(done_rx.recv_timeout(Duration::from_millis(500)).is_err(), "the write must hang");
    fx.disk().ping().unwrap();
    let stats = fx.disk().stats("d1").unwrap();
    assert!(stats.hung && stats.parked_ops == 1, "{stats:?}");
    assert_eq!(read(&fx.open("d2"), 0, 4096), vec![OLD; 4096], "another file is served meanwhile");
    assert_eq!(fx.disk().release("d1").unwrap(), 1);
    done_rx.recv_timeout(Duration::from_secs(10)).expect("the write completes after release").unwrap();
    let file = writer.join().unwrap();
    assert_eq!(read(&file, 0, 4096), vec![NEW; 4096]);
}

#[test]
fn flock_exclusive_is_enforced_on_the_mount() {
    let fx = Fixture::new();
    let first = fx.open("d1");
    let second = fx.open("d1");
    let flock = |file: &File, op| {
        // SAFETY: flock on an open fd.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    flock(&first, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    let error = flock(&second, libc::LOCK_EX | libc::LOCK_NB).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EWOULDBLOCK));
    drop(first);
    flock(&second, libc::LOCK_EX | libc::LOCK_NB).unwrap();
}

#[test]
fn files_are_created_sized_listed_and_removed_through_the_mount() {
    let fx = Fixture::new();
    let path = fx.disk().path("d3");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(4 << 30).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 30);
    fx.disk().cut_all().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 30, "a size change is durable at once");
    let mut names: Vec<String> = std::fs::read_dir(fx.disk().mount_path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d1", "d2", "d3"]);
    std::fs::remove_file(&path).unwrap();
    assert!(!fx.root.join("backing").join("d3").exists());
    let statfs = nix_statfs(fx.disk().mount_path());
    assert!(statfs > 0, "statfs reports the backing file system's blocks");
}

fn nix_statfs(path: &Path) -> u64 {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stat) }, 0);
    stat.f_blocks
}

#[test]
fn a_one_mib_write_arrives_as_one_op() {
    let fx = Fixture::new();
    let file = fx.open("d1");
    // Page-aligned, as an O_DIRECT user's buffer is: the kernel caps a request
    // at 256 pages, and an unaligned 1 MiB buffer spans 257.
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
    // SAFETY: a non-zero-sized layout; the memory is zeroed, freed below with the same layout.
    let buffer = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buffer.is_null());
    // SAFETY: `buffer` holds `layout.size()` initialised bytes until dealloc.
    let aligned = unsafe { std::slice::from_raw_parts_mut(buffer, layout.size()) };
    aligned.fill(NEW);
    let result = file.write_all_at(aligned, 0);
    // SAFETY: allocated above with this layout, no reference to it remains.
    unsafe { std::alloc::dealloc(buffer, layout) };
    result.unwrap();
    let stats = fx.disk().stats("d1").unwrap();
    assert_eq!((stats.pending_ops, stats.pending_bytes), (1, 1 << 20), "max_write is 1 MiB");
}

#[test]
fn bad_control_commands_get_errors_and_the_daemon_goes_on() {
    let fx = Fixture::new();
    for line in ["dance", "cut d1 melt", "fail d1 flush twice", "stats nosuchfile", "hang *"] {
        let error = fx.disk().command(line).unwrap_err().to_string();
        assert!(error.contains(line.split(' ').next().unwrap()) || !error.is_empty(), "{line}: {error}");
    }
    let long = format!("stats {}", "x".repeat(5000));
    assert!(fx.disk().command(&long).is_err());
    fx.disk().ping().unwrap();
}

#[test]
fn stopping_the_daemon_unmounts() {
    let mut fx = Fixture::new();
    let mount = fx.disk().mount_path().to_path_buf();
    assert!(tessera_crashdisk::client::is_mounted(&mount));
    fx.disk.as_mut().unwrap().stop();
    assert!(!tessera_crashdisk::client::is_mounted(&mount));
}

#[test]
fn stopping_the_daemon_answers_a_hung_write_instead_of_leaving_it_blocked() {
    let mut fx = Fixture::new();
    fx.disk().hang("d1").unwrap();
    let file = fx.open("d1");
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let write = file.write_all_at(&[NEW; 512], 0);
        done_tx.send(write.is_ok()).unwrap();
    });
    assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err(), "the write must hang");
    fx.disk.as_mut().unwrap().stop();
    let succeeded = done_rx.recv_timeout(Duration::from_secs(10)).expect("the hung write is answered at shutdown");
    assert!(!succeeded, "a write parked at shutdown fails (EIO or ENOTCONN)");
}

#[test]
fn the_size_users_see_follows_the_cache_and_the_cut() {
    use std::io::{Seek, SeekFrom};
    let fx = Fixture::new();
    let mut file = fx.open("d2");
    file.write_all_at(&[NEW; 4096], DISK_BYTES as u64).unwrap();
    assert_eq!(file.seek(SeekFrom::End(0)).unwrap(), DISK_BYTES as u64 + 4096, "the SDS sizes a device by SEEK_END");
    fx.disk().cut("d2").unwrap();
    assert_eq!(file.seek(SeekFrom::End(0)).unwrap(), DISK_BYTES as u64, "the unsynced growth is gone");
    assert_eq!(std::fs::metadata(fx.disk().path("d2")).unwrap().len(), DISK_BYTES as u64);
}

#[test]
fn the_truncate_tool_sizes_a_disk() {
    let fx = Fixture::new();
    let path = fx.disk().path("big");
    let status = std::process::Command::new("truncate").arg("-s").arg("4G").arg(&path).status().unwrap();
    assert!(status.success());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 30);
}

#[test]
fn hung_fdatasync_is_parked_and_makes_the_data_durable_on_release() {
    let fx = Fixture::new();
    let file = fx.open("d1");
    file.write_all_at(&[NEW; 4096], 0).unwrap();
    fx.disk().hang("d1").unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        done_tx.send(fdatasync(&file).map_err(|e| e.to_string())).unwrap();
    });
    assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err(), "the fdatasync must hang");
    let stats = fx.disk().stats("d1").unwrap();
    assert_eq!((stats.parked_ops, stats.pending_ops, stats.syncs), (1, 1, 0), "{stats:?}");
    assert_eq!(fx.disk().release("d1").unwrap(), 1);
    done_rx.recv_timeout(Duration::from_secs(10)).expect("the fdatasync completes after release").unwrap();
    fx.disk().cut_all().unwrap();
    assert_eq!(read(&fx.open("d1"), 0, 4096), vec![NEW; 4096]);
}
