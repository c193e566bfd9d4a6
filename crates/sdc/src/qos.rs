//! Per-volume IO limits (ScaleIO's per-SDC volume limits): token buckets that say how long a
//! request must wait before it is sent. Pure: the time is an argument, there is no clock
//! here, so the arithmetic is tested exactly; the async wait lives in `client.rs`.
//!
//! The buckets work by reservation: a request takes its tokens at once, even into debt, and
//! is told how long to wait until the debt would have been refilled. So requests are served
//! in arrival order, never retry, and a request costing more than a whole burst (a 32 MiB
//! write under a 1 MiB/s limit) waits its share instead of waiting forever.

use std::time::Duration;

use tessera_core::VolumeQos;

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// How much a bucket holds when full: one second's worth of its rate, so a volume idle for a
/// second may burst that much before being held to the rate.
pub const BURST: Duration = Duration::from_secs(1);

/// A token bucket refilled at `rate_per_sec`, holding at most one [`BURST`] of tokens.
/// Times are offsets from any fixed origin the caller chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    rate_per_sec: u64,
    /// Tokens × 10⁹ (token-nanoseconds at one token per second), so that refills of a few
    /// nanoseconds' worth are not lost to rounding. Negative while requests are waiting.
    scaled_tokens: i128,
    last_refill: Duration,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u64, now: Duration) -> TokenBucket {
        assert!(rate_per_sec > 0, "a zero rate would hold every request forever");
        let mut bucket = TokenBucket { rate_per_sec, scaled_tokens: 0, last_refill: now };
        bucket.scaled_tokens = bucket.scaled_capacity();
        bucket
    }

    pub fn rate_per_sec(&self) -> u64 {
        self.rate_per_sec
    }

    fn scaled_capacity(&self) -> i128 {
        i128::from(self.rate_per_sec) * BURST.as_nanos() as i128
    }

    fn refill(&mut self, now: Duration) {
        // A time before the last refill (it never happens with a monotonic clock) adds nothing.
        let elapsed_nanos = now.saturating_sub(self.last_refill).as_nanos().min(i128::MAX as u128) as i128;
        self.last_refill = self.last_refill.max(now);
        let added = elapsed_nanos.saturating_mul(i128::from(self.rate_per_sec));
        self.scaled_tokens = self.scaled_tokens.saturating_add(added).min(self.scaled_capacity());
    }

    /// Changes the rate from `now` on. Tokens above the new burst are dropped; a debt is
    /// kept (the requests that ran it up are already waiting on it).
    pub fn set_rate(&mut self, rate_per_sec: u64, now: Duration) {
        assert!(rate_per_sec > 0, "a zero rate would hold every request forever");
        self.refill(now);
        self.rate_per_sec = rate_per_sec;
        self.scaled_tokens = self.scaled_tokens.min(self.scaled_capacity());
    }

    /// Takes `cost` tokens at `now`; returns how long the request must wait before it may be
    /// sent (zero when the bucket held enough).
    pub fn reserve(&mut self, cost: u64, now: Duration) -> Duration {
        self.refill(now);
        self.scaled_tokens = self.scaled_tokens.saturating_sub(i128::from(cost) * NANOS_PER_SEC);
        if self.scaled_tokens >= 0 {
            return Duration::ZERO;
        }
        // Debt in token-nanoseconds over tokens per second: nanoseconds until refilled.
        let rate = i128::from(self.rate_per_sec);
        let wait_nanos = (-self.scaled_tokens + rate - 1) / rate;
        Duration::from_nanos(wait_nanos.min(i128::from(u64::MAX)) as u64)
    }
}

/// The limits of one volume on this SDC: an IO bucket (one token per request) and a
/// bandwidth bucket (one token per payload byte), each present only while its limit is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeLimiter {
    iops: Option<TokenBucket>,
    bandwidth: Option<TokenBucket>,
}

impl VolumeLimiter {
    /// Admits one request carrying `payload_bytes` under the volume's current limits `qos`;
    /// returns how long it must wait. A limit that changed since the last request applies
    /// from `now`; one set anew starts with a full burst.
    pub fn reserve(&mut self, qos: &VolumeQos, payload_bytes: u64, now: Duration) -> Duration {
        let iops_wait = reserve_in(&mut self.iops, qos.iops_limit, 1, now);
        let bandwidth_wait = reserve_in(&mut self.bandwidth, qos.bandwidth_limit_bytes_per_sec, payload_bytes, now);
        iops_wait.max(bandwidth_wait)
    }
}

fn reserve_in(bucket: &mut Option<TokenBucket>, limit: Option<u64>, cost: u64, now: Duration) -> Duration {
    // The MDM refuses a zero limit; should one arrive anyway, treat it as no limit rather
    // than stall the volume forever.
    let Some(rate) = limit.filter(|r| *r > 0) else {
        *bucket = None;
        return Duration::ZERO;
    };
    let b = bucket.get_or_insert_with(|| TokenBucket::new(rate, now));
    if b.rate_per_sec() != rate {
        b.set_rate(rate, now);
    }
    b.reserve(cost, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at_ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn full_bucket_admits_one_burst_then_paces_at_the_rate() {
        let mut b = TokenBucket::new(100, at_ms(0));
        for _ in 0..100 {
            assert_eq!(b.reserve(1, at_ms(0)), Duration::ZERO, "one second's worth passes at once");
        }
        // The 101st waits one token's worth (10 ms), the next two tokens' worth.
        assert_eq!(b.reserve(1, at_ms(0)), 10 * MS);
        assert_eq!(b.reserve(1, at_ms(0)), 20 * MS);
    }

    #[test]
    fn sustained_rate_is_held_to_the_limit() {
        // 1000 requests, each arriving as soon as the previous was admitted: after the burst
        // they are spaced exactly at the rate.
        let mut b = TokenBucket::new(300, at_ms(0));
        let mut now = at_ms(0);
        for _ in 0..1000 {
            now += b.reserve(1, now);
        }
        // 300 in the burst, then 700 at 300/s.
        let expected = Duration::from_secs_f64(700.0 / 300.0);
        assert!(now.abs_diff(expected) < MS, "took {now:?}, expected {expected:?}");
    }

    #[test]
    fn refill_is_capped_at_one_burst() {
        let mut b = TokenBucket::new(10, at_ms(0));
        for _ in 0..10 {
            b.reserve(1, at_ms(0));
        }
        // An hour idle refills one second's worth, no more.
        let later = Duration::from_secs(3600);
        for _ in 0..10 {
            assert_eq!(b.reserve(1, later), Duration::ZERO);
        }
        assert_eq!(b.reserve(1, later), 100 * MS);
    }

    #[test]
    fn request_larger_than_a_burst_waits_its_share() {
        let mut b = TokenBucket::new(1_000_000, at_ms(0));
        // 32 MB at 1 MB/s with a 1 MB burst: 31 s of debt.
        assert_eq!(b.reserve(32_000_000, at_ms(0)), Duration::from_secs(31));
        // The next request queues behind it.
        assert_eq!(b.reserve(1_000_000, at_ms(0)), Duration::from_secs(32));
        // Once the debt is paid and a second passes, a burst is available again.
        assert_eq!(b.reserve(1_000_000, Duration::from_secs(33)), Duration::ZERO);
    }

    #[test]
    fn partial_refill_counts_fractions_of_a_token() {
        let mut b = TokenBucket::new(3, at_ms(0));
        for _ in 0..3 {
            b.reserve(1, at_ms(0));
        }
        // A token takes 333.33 ms; after 200 ms, 133.33 ms (rounded up) remain.
        assert_eq!(b.reserve(1, at_ms(200)), Duration::from_nanos(133_333_334));
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let mut b = TokenBucket::new(10, at_ms(1000));
        for _ in 0..10 {
            b.reserve(1, at_ms(1000));
        }
        assert_eq!(b.reserve(1, at_ms(500)), 100 * MS);
        // The refill resumes from the latest time seen.
        assert_eq!(b.reserve(1, at_ms(1200)), Duration::ZERO);
    }

    #[test]
    fn lowering_the_rate_drops_excess_tokens_and_keeps_debt() {
        let mut b = TokenBucket::new(1000, at_ms(0));
        b.set_rate(10, at_ms(0));
        for _ in 0..10 {
            assert_eq!(b.reserve(1, at_ms(0)), Duration::ZERO);
        }
        assert_eq!(b.reserve(1, at_ms(0)), 100 * MS, "only the new, smaller burst remains");
        // Debt of one token at 10/s; raised to 100/s it is repaid ten times as fast.
        b.set_rate(100, at_ms(0));
        assert_eq!(b.reserve(1, at_ms(0)), 20 * MS);
    }

    #[test]
    fn limiter_applies_both_limits_and_waits_for_the_slower() {
        let qos = VolumeQos { iops_limit: Some(100), bandwidth_limit_bytes_per_sec: Some(1_000_000) };
        let mut l = VolumeLimiter::default();
        // Ten 100 kB requests use up the bandwidth burst but only a tenth of the IO burst.
        for _ in 0..10 {
            assert_eq!(l.reserve(&qos, 100_000, at_ms(0)), Duration::ZERO);
        }
        assert_eq!(l.reserve(&qos, 100_000, at_ms(0)), 100 * MS, "bandwidth binds");
        // Small requests: the IO bucket binds once its burst is spent.
        let qos = VolumeQos { iops_limit: Some(10), bandwidth_limit_bytes_per_sec: Some(1_000_000) };
        let mut l = VolumeLimiter::default();
        for _ in 0..10 {
            assert_eq!(l.reserve(&qos, 512, at_ms(0)), Duration::ZERO);
        }
        assert_eq!(l.reserve(&qos, 512, at_ms(0)), 100 * MS, "IOPS binds");
    }

    #[test]
    fn limiter_follows_limit_changes() {
        let mut l = VolumeLimiter::default();
        let unlimited = VolumeQos::default();
        for _ in 0..1000 {
            assert_eq!(l.reserve(&unlimited, 1 << 20, at_ms(0)), Duration::ZERO);
        }
        assert_eq!(l, VolumeLimiter::default(), "no bucket is kept without a limit");
        let limited = VolumeQos { iops_limit: Some(10), bandwidth_limit_bytes_per_sec: None };
        for _ in 0..10 {
            assert_eq!(l.reserve(&limited, 0, at_ms(0)), Duration::ZERO, "a new limit starts with a full burst");
        }
        assert!(l.reserve(&limited, 0, at_ms(0)) > Duration::ZERO);
        // Cleared: requests pass at once again, and the debt is forgotten.
        assert_eq!(l.reserve(&unlimited, 0, at_ms(0)), Duration::ZERO);
        assert_eq!(l.reserve(&limited, 0, at_ms(0)), Duration::ZERO);
        // A zero limit (refused by the MDM) never stalls the volume.
        let zero = VolumeQos { iops_limit: Some(0), bandwidth_limit_bytes_per_sec: Some(0) };
        assert_eq!(l.reserve(&zero, 1 << 20, at_ms(0)), Duration::ZERO);
    }
}
