//! [`Backing`] over a real file of the backing directory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use crate::cache::Backing;

pub struct FileBacking {
    file: File,
}

impl FileBacking {
    pub fn new(file: File) -> Self {
        FileBacking { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: fallocate on an fd this struct owns; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Backing for FileBacking {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    fn zero_range(&mut self, offset: u64, len: u64, keep_size: bool) -> io::Result<()> {
        let keep = if keep_size { libc::FALLOC_FL_KEEP_SIZE } else { 0 };
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE | keep, offset, len) {
            // Not every backing file system zeroes ranges (tmpfs does not): write zeros instead.
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let size = self.len()?;
                let end = if keep_size { (offset + len).min(size) } else { offset + len };
                const CHUNK_BYTES: u64 = 1 << 20;
                let zeros = vec![0u8; CHUNK_BYTES as usize];
                let mut position = offset;
                while position < end {
                    let n = (end - position).min(CHUNK_BYTES);
                    self.file.write_all_at(&zeros[..n as usize], position)?;
                    position += n;
                }
                Ok(())
            }
            other => other,
        }
    }

    fn allocate(&mut self, offset: u64, len: u64, keep_size: bool) -> io::Result<()> {
        let keep = if keep_size { libc::FALLOC_FL_KEEP_SIZE } else { 0 };
        self.fallocate(keep, offset, len)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}
