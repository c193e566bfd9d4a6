//! The client-side oracle: what every extent may hold. A write's value is unique and larger
//! than every earlier one. A write that timed out or failed is *unknown* — it may or may not
//! have landed — never absent. A read may return the last acknowledged value or a newer
//! unknown one; anything older, or never written, is a lost or stale write.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Default)]
pub struct ExtentHistory {
    pub last_acked: Option<u64>,
    /// Writes sent but not acknowledged (in flight, failed or timed out).
    pub unknown: BTreeSet<u64>,
}

#[derive(Debug, Default)]
pub struct Oracle {
    extents: BTreeMap<(u64, u64), ExtentHistory>,
    /// Extents with an operation in flight: the workload keeps one per extent, so "the last
    /// acknowledged write" is well defined without knowing the primary's lock order.
    busy: BTreeSet<(u64, u64)>,
    next_value: u64,
}

impl Oracle {
    pub fn is_busy(&self, key: (u64, u64)) -> bool {
        self.busy.contains(&key)
    }

    pub fn begin(&mut self, key: (u64, u64)) {
        assert!(self.busy.insert(key), "one operation per extent at a time");
    }

    pub fn end(&mut self, key: (u64, u64)) {
        self.busy.remove(&key);
    }

    /// A new write's value; recorded as unknown until acknowledged.
    pub fn new_write(&mut self, key: (u64, u64)) -> u64 {
        self.next_value += 1;
        self.extents.entry(key).or_default().unknown.insert(self.next_value);
        self.next_value
    }

    pub fn acked(&mut self, key: (u64, u64), value: u64) {
        let e = self.extents.entry(key).or_default();
        e.unknown.remove(&value);
        assert!(e.last_acked.is_none_or(|a| a < value), "writes to one extent are sequential");
        e.last_acked = Some(value);
    }

    pub fn last_acked(&self, key: (u64, u64)) -> Option<u64> {
        self.extents.get(&key).and_then(|e| e.last_acked)
    }

    /// Whether an extent may hold (or a read may return) `value`; 0 means never written.
    pub fn allowed(&self, key: (u64, u64), value: u64) -> bool {
        let Some(e) = self.extents.get(&key) else { return value == 0 };
        let floor = e.last_acked.unwrap_or(0);
        value == floor || (value > floor && e.unknown.contains(&value))
    }

    pub fn has_unknown_newer(&self, key: (u64, u64)) -> bool {
        self.extents.get(&key).is_some_and(|e| e.unknown.iter().any(|&u| u > e.last_acked.unwrap_or(0)))
    }

    pub fn describe(&self, key: (u64, u64)) -> ExtentHistory {
        self.extents.get(&key).cloned().unwrap_or_default()
    }
}
