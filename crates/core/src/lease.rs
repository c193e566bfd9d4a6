//! SDS leases. An SDS may serve IO only while it holds an unexpired lease; the MDM may
//! declare it dead only after the lease it granted has expired. Time is an input (`now_ms`
//! on a monotonic clock), so this runs unchanged under simulation.

use std::collections::BTreeMap;

/// How long one heartbeat keeps an SDS alive.
pub const DEFAULT_LEASE_DURATION_MS: u64 = 6_000;
/// How often an SDS renews its lease: well inside the lease so one lost heartbeat is harmless.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;

/// Margin the MDM adds before it counts a lease as expired, for clock-rate differences
/// between the SDS (which stops serving at its own expiry) and the MDM.
pub const EXPIRY_GRACE_MS: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    Held,
    /// Expired (plus grace) — or proved dead: the SDS can no longer be serving.
    Expired,
    /// Not known yet: a new leader has not waited a full lease since it took over, so an
    /// SDS it has not heard from may still hold a lease granted by the previous leader.
    Unknown,
}

#[derive(Debug, Default, Clone)]
pub struct LeaseTable {
    /// sds id -> monotonic time (ms) at which its lease expires.
    expires_at_ms: BTreeMap<u64, u64>,
    /// When this MDM became leader (ms); `None` while it is not leader.
    leader_since_ms: Option<u64>,
    /// SDSs proved dead (their port refused connections) since their last renewal.
    proved_dead: std::collections::BTreeSet<u64>,
}

impl LeaseTable {
    /// Renews `sds_id`'s lease; returns the expiry time granted.
    pub fn renew(&mut self, sds_id: u64, now_ms: u64, lease_duration_ms: u64) -> u64 {
        let expiry = now_ms.saturating_add(lease_duration_ms);
        let entry = self.expires_at_ms.entry(sds_id).or_insert(expiry);
        // A lease never shrinks: an out-of-order old heartbeat must not shorten it.
        *entry = (*entry).max(expiry);
        self.proved_dead.remove(&sds_id);
        *entry
    }

    /// Records a change of leadership: a new leader must not trust the absence of
    /// heartbeats it never had a chance to receive.
    pub fn set_leader(&mut self, is_leader: bool, now_ms: u64) {
        match (is_leader, self.leader_since_ms) {
            (true, None) => self.leader_since_ms = Some(now_ms),
            (false, Some(_)) => {
                self.leader_since_ms = None;
                self.expires_at_ms.clear();
                self.proved_dead.clear();
            }
            _ => {}
        }
    }

    /// The SDS's process is gone (nothing listens on its port): its lease no longer matters.
    pub fn prove_dead(&mut self, sds_id: u64) {
        self.expires_at_ms.remove(&sds_id);
        self.proved_dead.insert(sds_id);
    }

    pub fn status(&self, sds_id: u64, now_ms: u64, lease_duration_ms: u64) -> LeaseStatus {
        if self.is_alive(sds_id, now_ms) {
            return LeaseStatus::Held;
        }
        if self.proved_dead.contains(&sds_id) {
            return LeaseStatus::Expired;
        }
        let Some(since) = self.leader_since_ms else { return LeaseStatus::Unknown };
        let expiry = self.expires_at_ms.get(&sds_id).copied().unwrap_or(0);
        let trusted_from = since.saturating_add(lease_duration_ms).saturating_add(EXPIRY_GRACE_MS);
        if now_ms >= expiry.saturating_add(EXPIRY_GRACE_MS) && now_ms >= trusted_from {
            LeaseStatus::Expired
        } else {
            LeaseStatus::Unknown
        }
    }

    /// True while the lease is held. An SDS never heard from holds no lease.
    pub fn is_alive(&self, sds_id: u64, now_ms: u64) -> bool {
        self.expires_at_ms.get(&sds_id).is_some_and(|&e| now_ms < e)
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

    #[test]
    fn new_leader_waits_a_full_lease_before_declaring_expiry() {
        let mut t = LeaseTable::default();
        assert_eq!(t.status(1, 10_000, 1000), LeaseStatus::Unknown, "not leader: never expired");
        t.set_leader(true, 10_000);
        assert_eq!(t.status(1, 10_500, 1000), LeaseStatus::Unknown);
        assert_eq!(t.status(1, 10_000 + 1000 + EXPIRY_GRACE_MS, 1000), LeaseStatus::Expired);
        t.renew(1, 12_000, 1000);
        assert_eq!(t.status(1, 12_500, 1000), LeaseStatus::Held);
        assert_eq!(t.status(1, 13_500, 1000), LeaseStatus::Unknown, "within grace");
        assert_eq!(t.status(1, 13_000 + EXPIRY_GRACE_MS, 1000), LeaseStatus::Expired);
        t.prove_dead(1);
        assert_eq!(t.status(1, 0, 1000), LeaseStatus::Expired);
        t.set_leader(false, 20_000);
        assert_eq!(t.status(1, 30_000, 1000), LeaseStatus::Unknown);
    }
}
