//! The FUSE shell: kernel requests to [`State`] steps.
//!
//! Every data operation (read, write, fsync, fallocate, setattr) is handed to
//! [`Node::submit`] as a closure owning its `Reply`: it runs at once, or is
//! parked while the file hangs and answered when `release` runs it. So the
//! session loop never waits on a hung file, and other files go on.
//!
//! Files are opened with `FOPEN_DIRECT_IO` and attributes are given a zero
//! TTL: the kernel keeps no page cache or size of its own, so after a cut
//! every read reaches the daemon and sees what survived.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    consts::FOPEN_DIRECT_IO, FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

use crate::cache::ZeroKind;
use crate::state::{Node, State, ROOT_INO};

/// What the kernel may send in one write; big, so the SDS's large writes
/// arrive as one op rather than many 128 KiB pieces. The kernel also caps a
/// request at max_pages (256 at most, /proc/sys/fs/fuse/max_pages_limit), so
/// a direct-I/O write of 1 MiB arrives whole only from a page-aligned buffer.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;
/// Largest read answered in one reply; the kernel asks no more than
/// max_write/max_pages allow, this only guards the allocation.
const MAX_READ_BYTES: u32 = 16 << 20;
/// Nothing is cached by the kernel: sizes change under it at every cut.
const TTL: Duration = Duration::ZERO;

pub type SharedState = Arc<Mutex<State>>;

/// A poisoned lock means a panic in some step; the state is still the best
/// there is, and refusing every later request would hang the tests instead.
pub fn lock(state: &SharedState) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct CrashFs {
    state: SharedState,
}

impl CrashFs {
    pub fn new(state: SharedState) -> Self {
        CrashFs { state }
    }

    /// Runs `op` on file `ino` (now or after a hang), or answers `ENOENT`.
    fn submit<R: ErrorReply>(
        &self,
        ino: u64,
        reply: R,
        payload_bytes: u64,
        op: impl FnOnce(&mut Node, R) + Send + 'static,
    ) {
        let mut state = lock(&self.state);
        match state.node_mut(ino) {
            Some(node) => node.submit(payload_bytes, Box::new(move |node: &mut Node| op(node, reply))),
            None => reply.fail(libc::ENOENT),
        }
    }
}

/// The error half of fuser's reply types, so `submit` can answer any of them.
trait ErrorReply: Send + 'static {
    fn fail(self, errno: i32);
}

macro_rules! error_reply {
    ($($reply:ty),*) => {
        $(impl ErrorReply for $reply {
            fn fail(self, errno: i32) {
                self.error(errno)
            }
        })*
    };
}
error_reply!(ReplyAttr, ReplyData, ReplyWrite, ReplyEmpty);

fn root_attr() -> FileAttr {
    FileAttr {
        ino: ROOT_INO,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        // SAFETY: getuid/getgid cannot fail.
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time(seconds: i64, nanos: i64) -> SystemTime {
    let since_epoch = Duration::new(seconds.max(0) as u64, nanos.clamp(0, 999_999_999) as u32);
    UNIX_EPOCH + since_epoch
}

/// The file as its users see it: the backing file's metadata, the cache's size.
fn node_attr(node: &Node) -> Result<FileAttr, i32> {
    let errno = |error: std::io::Error| error.raw_os_error().unwrap_or(libc::EIO);
    let metadata = node.cache.backing().file().metadata().map_err(errno)?;
    let size = node.cache.len().map_err(errno)?;
    Ok(FileAttr {
        ino: node.ino,
        size,
        blocks: metadata.blocks(),
        atime: time(metadata.atime(), metadata.atime_nsec()),
        mtime: time(metadata.mtime(), metadata.mtime_nsec()),
        ctime: time(metadata.ctime(), metadata.ctime_nsec()),
        crtime: time(metadata.ctime(), metadata.ctime_nsec()),
        kind: FileType::RegularFile,
        perm: (metadata.mode() & 0o7777) as u16,
        nlink: 1,
        uid: metadata.uid(),
        gid: metadata.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

fn name_of(name: &OsStr) -> Option<&str> {
    std::str::from_utf8(name.as_bytes()).ok()
}

impl Filesystem for CrashFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        if let Err(limit) = config.set_max_write(MAX_WRITE_BYTES) {
            eprintln!("tessera-crashdisk: max_write {MAX_WRITE_BYTES} refused, kernel allows {limit}");
        }
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT_INO {
            return reply.error(libc::ENOENT);
        }
        let Some(name) = name_of(name) else { return reply.error(libc::ENOENT) };
        let mut state = lock(&self.state);
        let ino = match state.lookup(name) {
            Ok(Some(ino)) => ino,
            Ok(None) => return reply.error(libc::ENOENT),
            Err(error) => return reply.error(error.raw_os_error().unwrap_or(libc::EIO)),
        };
        match state.node_mut(ino).map(|node| node_attr(node)) {
            Some(Ok(attr)) => reply.entry(&TTL, &attr, 0),
            Some(Err(errno)) => reply.error(errno),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        if ino == ROOT_INO {
            return reply.attr(&TTL, &root_attr());
        }
        // Not parked while the file hangs: attributes are no disk I/O.
        let mut state = lock(&self.state);
        match state.node_mut(ino).map(|node| node_attr(node)) {
            Some(Ok(attr)) => reply.attr(&TTL, &attr),
            Some(Err(errno)) => reply.error(errno),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if ino == ROOT_INO {
            return reply.attr(&TTL, &root_attr());
        }
        // Only the size means anything to a disk; mode, owner and times are
        // accepted and left as they are, so tools that set them do not fail.
        self.submit(ino, reply, 0, move |node, reply| {
            if let Some(size) = size {
                if let Err(error) = node.cache.set_len(size) {
                    return reply.error(error.errno());
                }
            }
            match node_attr(node) {
                Ok(attr) => reply.attr(&TTL, &attr),
                Err(errno) => reply.error(errno),
            }
        });
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        if parent != ROOT_INO {
            return reply.error(libc::ENOENT);
        }
        let Some(name) = name_of(name) else { return reply.error(libc::ENOENT) };
        match lock(&self.state).unlink(name) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if lock(&self.state).node_mut(ino).is_none() {
            return reply.error(libc::ENOENT);
        }
        reply.opened(0, FOPEN_DIRECT_IO);
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if parent != ROOT_INO {
            return reply.error(libc::ENOENT);
        }
        let Some(name) = name_of(name) else { return reply.error(libc::EINVAL) };
        let mut state = lock(&self.state);
        let ino = match state.create(name, mode & !umask, flags & libc::O_EXCL != 0) {
            Ok(ino) => ino,
            Err(error) => return reply.error(error.raw_os_error().unwrap_or(libc::EIO)),
        };
        match state.node_mut(ino).map(|node| node_attr(node)) {
            Some(Ok(attr)) => reply.created(&TTL, &attr, 0, 0, FOPEN_DIRECT_IO),
            Some(Err(errno)) => reply.error(errno),
            None => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Ok(offset) = u64::try_from(offset) else { return reply.error(libc::EINVAL) };
        let size = size.min(MAX_READ_BYTES);
        self.submit(ino, reply, 0, move |node, reply| match node.cache.read(offset, u64::from(size)) {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(error.errno()),
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Ok(offset) = u64::try_from(offset) else { return reply.error(libc::EINVAL) };
        let Ok(written) = u32::try_from(data.len()) else { return reply.error(libc::EINVAL) };
        // Copied once: the kernel's buffer is reused for the next request.
        let data = data.to_vec();
        self.submit(ino, reply, data.len() as u64, move |node, reply| match node.cache.write(offset, &data) {
            Ok(()) => reply.written(written),
            Err(error) => reply.error(error.errno()),
        });
    }

    /// close(2): nothing to persist (a disk has no close); never faulted.
    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        // fsync and fdatasync alike: the disk's cache flush. Sizes are durable at once anyway.
        self.submit(ino, reply, 0, |node, reply| match node.cache.flush() {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error.errno()),
        });
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (Ok(offset), Ok(length)) = (u64::try_from(offset), u64::try_from(length)) else {
            return reply.error(libc::EINVAL);
        };
        if length == 0 {
            return reply.error(libc::EINVAL);
        }
        const PUNCH_KEEP: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO_KEEP: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        enum Action {
            Zero(ZeroKind),
            Allocate { keep_size: bool },
        }
        let action = match mode {
            0 => Action::Allocate { keep_size: false },
            libc::FALLOC_FL_KEEP_SIZE => Action::Allocate { keep_size: true },
            PUNCH_KEEP => Action::Zero(ZeroKind::Punch),
            ZERO_KEEP => Action::Zero(ZeroKind::ZeroKeepSize),
            libc::FALLOC_FL_ZERO_RANGE => Action::Zero(ZeroKind::ZeroGrow),
            _ => return reply.error(libc::EOPNOTSUPP),
        };
        self.submit(ino, reply, 0, move |node, reply| {
            let result = match action {
                Action::Zero(kind) => node.cache.zero(offset, length, kind),
                Action::Allocate { keep_size } => node.cache.allocate(offset, length, keep_size),
            };
            match result {
                Ok(()) => reply.ok(),
                Err(error) => reply.error(error.errno()),
            }
        });
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if ino != ROOT_INO {
            return reply.error(libc::ENOTDIR);
        }
        let mut state = lock(&self.state);
        if let Err(error) = state.scan() {
            return reply.error(error.raw_os_error().unwrap_or(libc::EIO));
        }
        let mut entries =
            vec![(ROOT_INO, FileType::Directory, ".".to_string()), (ROOT_INO, FileType::Directory, "..".to_string())];
        entries.extend(state.files().into_iter().map(|(ino, name)| (ino, FileType::RegularFile, name)));
        let skip = usize::try_from(offset).unwrap_or(0);
        for (index, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            // The offset given is where the next readdir call resumes.
            if reply.add(ino, (index + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let dir = lock(&self.state).dir().to_path_buf();
        let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return reply.error(libc::EINVAL) };
        // SAFETY: statvfs fills the zeroed struct it is given; path is NUL-terminated.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return reply.error(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
        }
        reply.statfs(
            stat.f_blocks,
            stat.f_bfree,
            stat.f_bavail,
            stat.f_files,
            stat.f_ffree,
            stat.f_bsize as u32,
            stat.f_namemax as u32,
            stat.f_frsize as u32,
        );
    }
}
