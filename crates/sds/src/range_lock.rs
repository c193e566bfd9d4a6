//! Byte-range locks on a PG primary. Overlapping writes to one extent are applied one at a
//! time, so both copies see them in the same order and end identical; writes that do not
//! overlap commute and run in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// (volume id, extent index).
type ExtentId = (u64, u64);
/// Byte range `[start, end)` within an extent.
type ByteRange = (u32, u32);

#[derive(Default)]
pub struct RangeLocks {
    /// Ranges currently held, per extent.
    held: Mutex<HashMap<ExtentId, Vec<ByteRange>>>,
    released: Notify,
}

pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    key: ExtentId,
    range: ByteRange,
}

impl RangeLocks {
    pub async fn lock(self: &Arc<Self>, volume_id: u64, extent_index: u64, start: u32, end: u32) -> RangeGuard {
        let key = (volume_id, extent_index);
        loop {
            // Register for wake-up before checking, so a release between the check and the
            // wait is not missed.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                let ranges = held.entry(key).or_default();
                if !ranges.iter().any(|&(s, e)| s < end && start < e) {
                    ranges.push((start, end));
                    return RangeGuard { locks: self.clone(), key, range: (start, end) };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ranges) = held.get_mut(&self.key) {
            if let Some(i) = ranges.iter().position(|&r| r == self.range) {
                ranges.swap_remove(i);
            }
            if ranges.is_empty() {
                held.remove(&self.key);
            }
        }
        drop(held);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let g1 = locks.lock(1, 0, 0, 4096).await;
        // Disjoint: immediate.
        let g2 = tokio::time::timeout(Duration::from_millis(100), locks.lock(1, 0, 4096, 8192)).await.unwrap();
        // Overlapping: waits until g1 is released.
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(1, 0, 1000, 2000).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(g1);
        let g3 = tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
        drop((g2, g3));
        assert!(locks.held.lock().unwrap().is_empty());
    }
}
