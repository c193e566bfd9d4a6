//! The simulation's specs: a fixed set of seeds must pass every invariant, and a seed must
//! replay exactly. `TESSERA_SIM_SEEDS=a..b` (and `TESSERA_SIM_STEPS`) drive the long run.

use tessera_sim::{run, Config};

/// Seeds CI runs on every `cargo test -p tessera-sim`.
const CI_SEEDS: std::ops::Range<u64> = 0..32;

fn run_seeds(seeds: std::ops::Range<u64>, cfg: &Config) -> Vec<String> {
    let mut failures = Vec::new();
    for seed in seeds {
        match run(seed, cfg) {
            Ok(stats) => eprintln!("seed {seed}: ok {stats:?}"),
            Err(f) => {
                eprintln!("{f}");
                failures.push(format!("seed {seed}: {} — {}", f.invariant, f.detail));
            }
        }
    }
    failures
}

#[test]
fn fixed_seeds_keep_every_invariant() {
    let failures = run_seeds(CI_SEEDS, &Config::default());
    assert!(failures.is_empty(), "{} seeds failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn a_seed_replays_exactly() {
    let cfg = Config { chaos_steps: 8_000, ..Config::default() };
    for seed in [3, 17] {
        let a = run(seed, &cfg).map_err(|f| f.to_string());
        let b = run(seed, &cfg).map_err(|f| f.to_string());
        assert_eq!(a, b, "seed {seed} ran differently twice");
    }
}

/// The long run: `TESSERA_SIM_SEEDS=0..10000 cargo test -p tessera-sim --release -- --ignored --nocapture`.
#[test]
#[ignore = "long run; set TESSERA_SIM_SEEDS=a..b"]
fn many_seeds_from_env() {
    let seeds = std::env::var("TESSERA_SIM_SEEDS").ok().and_then(|s| tessera_sim::parse_seeds(&s)).unwrap_or(0..1000);
    let mut cfg = Config::default();
    if let Some(steps) = std::env::var("TESSERA_SIM_STEPS").ok().and_then(|s| s.parse().ok()) {
        cfg.chaos_steps = steps;
    }
    let failures = run_seeds(seeds, &cfg);
    assert!(failures.is_empty(), "{} seeds failed:\n{}", failures.len(), failures.join("\n"));
}

// ---- Seeds that found bugs, kept as regression tests. -------------------------------------

fn assert_seed_passes(seed: u64) {
    let r = run(seed, &Config::default());
    assert!(r.is_ok(), "{}", r.err().map(|f| f.to_string()).unwrap_or_default());
}

/// A device that failed while its SDS was down could not be opened on restart and was only
/// logged, never reported: the MDM kept it in service and its PGs stuck (fixed in
/// `crates/sds/src/daemon.rs`, `refresh`).
#[test]
fn seed_19_unopenable_device_is_reported_failed() {
    assert_seed_passes(19);
}

/// When a move's new copy was dropped (its SDS declared down), `leaving` stayed set with
/// nothing syncing and the PG was busy forever (fixed in `crates/core/src/recovery.rs`,
/// `drop_replicas`).
#[test]
fn seed_20_move_whose_target_dies_is_cancelled() {
    assert_seed_passes(20);
}

/// With two devices on one SDS, balance moved a copy between them, putting two copies on one
/// SDS and marking the primary syncing (fixed in `crates/core/src/rebalance.rs`).
#[test]
fn seed_36_no_move_onto_an_sds_of_the_pg() {
    assert_seed_passes(36);
}

/// A primary whose device failed silently kept trying to back-fill from it and never reported
/// it, so its PGs never settled (fixed in `crates/sds/src/rebuild.rs`).
#[test]
fn seed_151_unreadable_backfill_source_is_reported_failed() {
    assert_seed_passes(151);
}

/// A device that failed while no IO reached it stayed in service forever, so the PGs whose
/// primary it held never healed (fixed by the daemon's periodic device probe).
#[test]
fn seed_695_idle_failed_device_is_found_by_the_probe() {
    assert_seed_passes(695);
}
