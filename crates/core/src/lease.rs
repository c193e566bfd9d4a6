//! SDS leases. An SDS may serve IO only while it holds an unexpired lease; the MDM may
//! declare it dead only after the lease it granted has expired. Time is an input (`now_ms`
//! on a monotonic clock), so this runs unchanged under simulation.

use std::collections::BTreeMap;

/// How long one heartbeat keeps an SDS alive.
pub const DEFAULT_LEASE_DURATION_MS: u64 = 6_000;
/// How often an SDS renews its lease: well inside the lease so one lost heartbeat is harmless.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;

#[derive(Debug, Default, Clone)]
pub struct LeaseTable {
    /// sds id -> monotonic time (ms) at which its lease expires.
    expires_at_ms: BTreeMap<u64, u64>,
}

impl LeaseTable {
    /// Renews `sds_id`'s lease; returns the expiry time granted.
    pub fn renew(&mut self, sds_id: u64, now_ms: u64, lease_duration_ms: u64) -> u64 {
        let expiry = now_ms.saturating_add(lease_duration_ms);
        let entry = self.expires_at_ms.entry(sds_id).or_insert(expiry);
        // A lease never shrinks: an out-of-order old heartbeat must not shorten it.
        *entry = (*entry).max(expiry);
        *entry
    }

    /// True while the lease is held. An SDS never heard from holds no lease.
    pub fn is_alive(&self, sds_id: u64, now_ms: u64) -> bool {
        self.expires_at_ms.get(&sds_id).is_some_and(|&e| now_ms < e)
    }

    pub fn forget(&mut self, sds_id: u64) {
        self.expires_at_ms.remove(&sds_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expires_and_never_shrinks() {
        let mut t = LeaseTable::default();
        assert!(!t.is_alive(1, 0));
        t.renew(1, 100, 1000);
        assert!(t.is_alive(1, 1099));
        assert!(!t.is_alive(1, 1100));
        t.renew(1, 50, 1000); // late, old heartbeat
        assert!(t.is_alive(1, 1099));
    }
}
