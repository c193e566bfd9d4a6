//! Placement: which two devices hold each placement group.
//!
//! Rules (invariants checked by the tests and asserted here):
//! - the two copies of a PG are on different SDSs;
//! - when the protection domain uses fault sets, they are on different fault sets;
//! - replicas are spread in proportion to device capacity (weight), and primaries — which
//!   serve every read — are spread the same way;
//! - ties are broken by a hash of (PG, device), not by id order, so that the partners of a
//!   device are many different devices: when it dies, all of them rebuild it together.

use crate::error::CoreError;
use crate::layout::mix64;
use crate::model::Replica;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub device_id: u64,
    pub sds_id: u64,
    pub fault_set_id: Option<u64>,
    /// Capacity in bytes; must be non-zero.
    pub weight: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Load {
    replicas: u64,
    primaries: u64,
}

/// `(count + 1) / weight` compared exactly, without floating point, so every MDM decides the
/// same.
fn less_loaded(count_a: u64, weight_a: u64, count_b: u64, weight_b: u64) -> std::cmp::Ordering {
    let a = u128::from(count_a + 1) * u128::from(weight_b);
    let b = u128::from(count_b + 1) * u128::from(weight_a);
    a.cmp(&b)
}

/// Computes a replica set for each of `pg_count` PGs. Fails when the candidates cannot
/// satisfy the separation rules (fewer than two SDSs, or fewer than two fault sets when
/// `use_fault_sets`).
pub fn place_pgs(
    pg_count: u32,
    candidates: &[Candidate],
    use_fault_sets: bool,
) -> Result<Vec<[Replica; 2]>, CoreError> {
    let mut devices: Vec<Candidate> = candidates.iter().copied().filter(|c| c.weight > 0).collect();
    devices.sort_by_key(|c| c.device_id);
    let distinct = |f: fn(&Candidate) -> Option<u64>| {
        let mut v: Vec<Option<u64>> = devices.iter().map(f).collect();
        v.sort();
        v.dedup();
        v.len()
    };
    if distinct(|c| Some(c.sds_id)) < 2 {
        return Err(CoreError::NoCapacity("placement needs devices on at least two SDSs".into()));
    }
    if use_fault_sets && (distinct(|c| c.fault_set_id) < 2 || devices.iter().any(|c| c.fault_set_id.is_none())) {
        return Err(CoreError::NoCapacity(
            "placement in a domain with fault sets needs every SDS in a fault set and at least two fault sets".into(),
        ));
    }
    let mut load = vec![Load::default(); devices.len()];
    let mut out = Vec::with_capacity(pg_count as usize);
    for pg in 0..pg_count {
        let jitter = |i: usize| mix64((u64::from(pg) << 32) ^ devices[i].device_id);
        let primary = (0..devices.len())
            .min_by(|&a, &b| {
                less_loaded(load[a].primaries, devices[a].weight, load[b].primaries, devices[b].weight)
                    .then(less_loaded(load[a].replicas, devices[a].weight, load[b].replicas, devices[b].weight))
                    .then(jitter(a).cmp(&jitter(b)))
            })
            .expect("at least two devices");
        let p = devices[primary];
        let secondary = (0..devices.len())
            .filter(|&i| devices[i].sds_id != p.sds_id)
            .filter(|&i| !use_fault_sets || devices[i].fault_set_id != p.fault_set_id)
            .min_by(|&a, &b| {
                less_loaded(load[a].replicas, devices[a].weight, load[b].replicas, devices[b].weight)
                    .then(jitter(a).cmp(&jitter(b)))
            })
            .ok_or_else(|| CoreError::NoCapacity("no device satisfies the separation rules".into()))?;
        let s = devices[secondary];
        assert_ne!(p.sds_id, s.sds_id, "copies of a PG must be on different SDSs");
        load[primary].primaries += 1;
        load[primary].replicas += 1;
        load[secondary].replicas += 1;
        out.push([
            Replica { sds_id: p.sds_id, device_id: p.device_id },
            Replica { sds_id: s.sds_id, device_id: s.device_id },
        ]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn cand(device_id: u64, sds_id: u64, fs: Option<u64>, weight: u64) -> Candidate {
        Candidate { device_id, sds_id, fault_set_id: fs, weight }
    }

    fn replica_counts(placed: &[[Replica; 2]]) -> BTreeMap<u64, u64> {
        let mut m = BTreeMap::new();
        for r in placed.iter().flatten() {
            *m.entry(r.device_id).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn copies_on_distinct_sdss() {
        let c: Vec<_> = (0..6).map(|i| cand(i, i / 2, None, 100)).collect();
        for pair in place_pgs(256, &c, false).unwrap() {
            assert_ne!(pair[0].sds_id, pair[1].sds_id);
        }
    }

    #[test]
    fn copies_on_distinct_fault_sets() {
        let c: Vec<_> = (0..9).map(|i| cand(i, i, Some(i % 3), 100)).collect();
        let fs_of = |d: u64| d % 3;
        for pair in place_pgs(256, &c, true).unwrap() {
            assert_ne!(fs_of(pair[0].device_id), fs_of(pair[1].device_id));
        }
    }

    #[test]
    fn equal_devices_balanced_within_a_few_percent() {
        for n in [3u64, 4, 5, 8, 10] {
            let c: Vec<_> = (0..n).map(|i| cand(i, i, None, 1 << 30)).collect();
            let placed = place_pgs(256, &c, false).unwrap();
            let counts = replica_counts(&placed);
            let ideal = 512.0 / n as f64;
            for (&d, &k) in &counts {
                let off = (k as f64 - ideal).abs() / ideal;
                assert!(off <= 0.03, "n={n} device {d} has {k} replicas, ideal {ideal:.1}");
            }
            let mut primaries = BTreeMap::new();
            for p in &placed {
                *primaries.entry(p[0].device_id).or_insert(0u64) += 1;
            }
            let (min, max) = (primaries.values().min().unwrap(), primaries.values().max().unwrap());
            assert!(max - min <= 1, "primaries uneven: {primaries:?}");
        }
    }

    #[test]
    fn weighted_by_capacity() {
        // One device twice as large gets about twice the replicas.
        let c = vec![cand(1, 1, None, 200), cand(2, 2, None, 100), cand(3, 3, None, 100), cand(4, 4, None, 200)];
        let counts = replica_counts(&place_pgs(600, &c, false).unwrap());
        let ratio = counts[&1] as f64 / counts[&2] as f64;
        assert!((ratio - 2.0).abs() < 0.1, "ratio {ratio}, counts {counts:?}");
    }

    #[test]
    fn partners_are_many() {
        // Each device's PGs have their other copy spread over every other device, so a
        // failure is rebuilt by all of them.
        let c: Vec<_> = (0..8).map(|i| cand(i, i, None, 100)).collect();
        let placed = place_pgs(256, &c, false).unwrap();
        for d in 0..8 {
            let partners: BTreeSet<u64> = placed
                .iter()
                .filter(|p| p[0].device_id == d || p[1].device_id == d)
                .map(|p| if p[0].device_id == d { p[1].device_id } else { p[0].device_id })
                .collect();
            assert_eq!(partners.len(), 7, "device {d} partners {partners:?}");
        }
    }

    #[test]
    fn refuses_single_sds_and_single_fault_set() {
        let one_sds = vec![cand(1, 1, None, 100), cand(2, 1, None, 100)];
        assert!(place_pgs(16, &one_sds, false).is_err());
        let one_fs = vec![cand(1, 1, Some(9), 100), cand(2, 2, Some(9), 100)];
        assert!(place_pgs(16, &one_fs, true).is_err());
        assert!(place_pgs(16, &[], false).is_err());
    }

    #[test]
    fn deterministic() {
        let c: Vec<_> = (0..5).map(|i| cand(i, i, None, 100 + i)).collect();
        assert_eq!(place_pgs(128, &c, false).unwrap(), place_pgs(128, &c, false).unwrap());
    }
}
