//! The few Linux calls the device layer needs beyond `std`: exclusive opening, sizing,
//! and zeroing ranges cheaply (punching holes) with portable fallbacks.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::error::DeviceError;

/// Source of zeros for the pwrite fallback; static so that zeroing allocates nothing.
const ZERO_CHUNK_BYTES: usize = 64 * 1024;
static ZEROES: [u8; ZERO_CHUNK_BYTES] = [0; ZERO_CHUNK_BYTES];

pub fn zero_chunk() -> &'static [u8] {
    &ZEROES
}

pub fn io_error<'a>(path: &'a Path, context: &'static str) -> impl FnOnce(io::Error) -> DeviceError + 'a {
    move |source| DeviceError::Io { path: path.to_path_buf(), context, source }
}

/// Opens a device for reading and writing, exclusively:
/// - a block device with `O_EXCL`, which the kernel refuses (EBUSY) while the device is
///   mounted or claimed by another exclusive opener — so we never format a mounted disk;
/// - any target with a non-blocking `flock`, so two Tessera processes (or two `Device`s in
///   one process) never drive the same device at once. The lock dies with the file.
pub fn open_exclusive(path: &Path) -> Result<File, DeviceError> {
    let metadata = std::fs::metadata(path).map_err(io_error(path, "stat device"))?;
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if metadata.file_type().is_block_device() {
        options.custom_flags(libc::O_EXCL);
    }
    let file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(DeviceError::Busy),
        Err(e) => return Err(io_error(path, "open device")(e)),
    };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DeviceError::Busy);
        }
        return Err(io_error(path, "lock device")(e));
    }
    Ok(file)
}

/// Size of a regular file or block device. Seeking to the end works for both (the kernel
/// reports a block device's size as its end), which avoids an architecture-specific ioctl
/// number for BLKGETSIZE64. The file position is unused: all IO is positional.
pub fn size_bytes(file: &File) -> io::Result<u64> {
    let mut handle = file;
    handle.seek(SeekFrom::End(0))
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The errors by which a file system or block device says "I cannot do this fallocate mode
/// (here)" — as opposed to a real IO failure, which must propagate.
fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::ENODEV | libc::ENOTTY))
}

/// Deallocates a range; it reads back as zeros. On a regular file this returns the space
/// (thin provisioning); on a block device the kernel turns it into WRITE ZEROES with unmap
/// and refuses (EOPNOTSUPP) if the device cannot do that without writing.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
}

/// Makes a range read as zeros, as cheaply as the target allows: punch a hole (metadata
/// only), else FALLOC_FL_ZERO_RANGE (block devices with WRITE ZEROES, or file systems
/// without hole punching), else write zeros. The result is not durable until fdatasync.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match punch_hole(file, offset, len) {
        Err(e) if is_unsupported(&e) => {}
        other => return other,
    }
    match fallocate(file, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
        Err(e) if is_unsupported(&e) => {}
        other => return other,
    }
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(ZERO_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&ZEROES[..chunk], offset + done)?;
        done += chunk as u64;
    }
    Ok(())
}

/// `pread` that never waits for the device: `Ok(true)` when all of `buf` came from the page
/// cache, `Ok(false)` when it would have had to wait (or the kernel or file system cannot
/// say: `EAGAIN`, `EOPNOTSUPP`, a short read) — the caller then reads the ordinary way, off
/// the async worker.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    let Ok(offset) = libc::off_t::try_from(offset) else { return Ok(false) };
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: one iovec over `buf`, which outlives the call; a descriptor we own.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(n as usize == buf.len())
}
