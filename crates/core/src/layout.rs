//! Where a volume's extents live: extent `i` of volume `v` belongs to placement group
//! `hash(v, i) mod pg_count`. The hash is fixed forever (it is part of the on-disk and
//! on-wire contract), so it is written out here rather than taken from `std`, whose hasher
//! may change between Rust releases.

/// splitmix64 finaliser: cheap, and consecutive inputs land far apart, so consecutive
/// extents of one volume spread over all PGs.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The placement group of one extent. `pg_count` must be non-zero (pools enforce it).
pub fn pg_of_extent(volume_id: u64, extent_index: u64, pg_count: u32) -> u32 {
    assert!(pg_count > 0, "a pool always has at least one PG");
    let h = mix64(mix64(volume_id) ^ extent_index);
    (h % u64::from(pg_count)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_extents_spread_over_pgs() {
        let pg_count = 256;
        let mut hits = vec![0u32; pg_count as usize];
        for i in 0..(pg_count as u64 * 64) {
            hits[pg_of_extent(7, i, pg_count) as usize] += 1;
        }
        let (min, max) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
        assert!(*min > 32 && *max < 110, "uneven spread: min {min} max {max}");
    }

    #[test]
    fn hash_is_stable() {
        // Part of the on-disk contract: these values must never change.
        assert_eq!(pg_of_extent(1, 0, 256), pg_of_extent(1, 0, 256));
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
    }
}
