//! A few dedicated threads per device that run its blocking IO.
//!
//! Why not `tokio::task::spawn_blocking`: it gives every concurrent call a thread of its own,
//! so 32 requests in flight become 32 threads contending for two cores, and each call pays a
//! hand-off to a cold thread (measured: two to three times the CPU per 4 KiB IO). A fixed set
//! of threads per device takes queued work back to back without sleeping, and a device that
//! hangs can only ever tie up its own threads — never those of the SDS's other devices, nor
//! the async worker that renews the lease. The caller bounds every wait with the device
//! deadline (`SdsState::device_op`); work queued behind a hung operation simply misses it.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};

/// Threads per device: enough to overlap an fdatasync with reads and writes, few enough
/// that work is taken back to back.
pub const DEVICE_IO_THREADS: usize = 4;
/// Most operations queued on one device; past it, callers get `Busy` at once (their
/// connection's in-flight bound normally keeps the queue far below this).
pub const MAX_QUEUED_OPS: usize = 4096;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// The threads of one device. Dropping the pool lets idle threads exit; a thread stuck in a
/// hung operation exits when (if ever) the operation returns.
pub struct IoPool {
    shared: Arc<Shared>,
}

/// Why an operation did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    /// The queue is full (the device is far behind, or hung).
    Busy,
    /// The operation panicked (a device invariant failed): trust nothing it touched.
    Panicked,
}

impl IoPool {
    pub fn new(name: &str) -> IoPool {
        let shared = Arc::new(Shared { queue: Mutex::new(Queue::default()), ready: Condvar::new() });
        for i in 0..DEVICE_IO_THREADS {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new().name(format!("{name}-io{i}")).spawn(move || worker(&shared));
            if let Err(e) = spawned {
                // Fewer threads only means less overlap; zero would hang callers until their
                // deadline, which fails the device — the honest outcome when none can start.
                tracing::error!("starting a device IO thread: {e}");
            }
        }
        IoPool { shared }
    }

    /// Runs `op` on one of the device's threads; the result arrives on the receiver.
    pub fn submit<T: Send + 'static>(
        &self,
        op: impl FnOnce() -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<T, PoolError>>, PoolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(op)).map_err(|_| PoolError::Panicked);
            let _ = tx.send(result); // the caller may have given up at its deadline
        });
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.jobs.len() >= MAX_QUEUED_OPS {
            return Err(PoolError::Busy);
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.ready.notify_one();
        Ok(rx)
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.shared.ready.notify_all();
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn results_and_panics_come_back() {
        let pool = IoPool::new("test");
        assert_eq!(pool.submit(|| 6 * 7).unwrap().await.unwrap(), Ok(42));
        let panicked = pool.submit(|| -> u32 { panic!("device invariant") }).unwrap().await.unwrap();
        assert_eq!(panicked, Err(PoolError::Panicked));
        // The thread survived the panic.
        assert_eq!(pool.submit(|| 1).unwrap().await.unwrap(), Ok(1));
    }

    #[tokio::test]
    async fn a_hung_operation_ties_up_only_its_own_thread() {
        let pool = IoPool::new("test");
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let _stuck = pool.submit(move || hung.recv().ok()).unwrap();
        for i in 0..100 {
            assert_eq!(pool.submit(move || i).unwrap().await.unwrap(), Ok(i));
        }
        release.send(()).unwrap();
    }
}
