//! A small per-connection pool of payload buffers.
//!
//! Why: at 4 KiB random I/O the allocator (and the zero-fill of fresh
//! buffers) shows up next to the syscalls. Buffers are recycled between
//! requests of one connection; per-connection keeps the lock uncontended
//! across connections.
//!
//! Bounds: at most `POOL_MAX_BUFFERS` idle buffers, none larger than
//! `POOL_MAX_BUFFER_BYTES`, so an idle connection pins at most
//! 32 × 2 MiB. Bigger buffers are used once and freed.

use std::sync::Mutex;

const POOL_MAX_BUFFERS: usize = 32;
const POOL_MAX_BUFFER_BYTES: usize = 2 * 1024 * 1024;

/// A buffer of `len` usable bytes. The backing `Vec` may be longer (it keeps
/// its initialised length across reuse so regrowing never re-zeroes).
#[derive(Debug)]
pub(crate) struct PooledBuf {
    vec: Vec<u8>,
    len: usize,
}

impl PooledBuf {
    pub(crate) fn as_slice(&self) -> &[u8] {
        // Invariant: len <= vec.len(), established in `BufferPool::get`.
        &self.vec[..self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[..self.len]
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A buffer with `len` usable bytes. Contents are unspecified (old
    /// data from this connection or zeroes); callers overwrite all of it.
    pub(crate) fn get(&self, len: usize) -> PooledBuf {
        let recycled = match self.free.lock() {
            Ok(mut free) => free.pop(),
            // A poisoned lock only means another task panicked while
            // pushing/popping; the Vec itself is intact but we need not
            // trust it. Allocate fresh.
            Err(_) => None,
        };
        let mut vec = recycled.unwrap_or_default();
        if vec.len() < len {
            vec.resize(len, 0);
        }
        assert!(len <= vec.len());
        PooledBuf { vec, len }
    }

    /// Returns a buffer for reuse, or frees it if the pool is full or the
    /// buffer is too large to keep around.
    pub(crate) fn put(&self, buf: PooledBuf) {
        if buf.vec.capacity() > POOL_MAX_BUFFER_BYTES {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            if free.len() < POOL_MAX_BUFFERS {
                free.push(buf.vec);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_buffers_and_respects_requested_length() {
        let pool = BufferPool::default();
        let mut a = pool.get(4096);
        assert_eq!(a.len(), 4096);
        a.as_mut_slice().fill(7);
        pool.put(a);
        let b = pool.get(512);
        assert_eq!(b.as_slice().len(), 512);
        pool.put(b);
        let c = pool.get(8192);
        assert_eq!(c.as_slice().len(), 8192);
    }

    #[test]
    fn does_not_keep_huge_buffers_or_too_many() {
        let pool = BufferPool::default();
        pool.put(pool.get(POOL_MAX_BUFFER_BYTES + 1));
        assert!(pool.free.lock().map(|f| f.is_empty()).unwrap_or(false));
        let bufs: Vec<_> = (0..POOL_MAX_BUFFERS + 5).map(|_| pool.get(16)).collect();
        for b in bufs {
            pool.put(b);
        }
        assert_eq!(pool.free.lock().map(|f| f.len()).unwrap_or(0), POOL_MAX_BUFFERS);
    }
}
