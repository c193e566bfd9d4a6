//! `cargo run -p tessera-sim --release -- --seeds 0..10000 [--steps N] [--reorder]`: runs many seeds and
//! prints every failure with its replay command. Exits 1 if any seed failed.

fn main() {
    let mut cfg = tessera_sim::Config::default();
    let mut seeds = 0..100;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--reorder" {
            cfg.reorder_within_links = true;
            continue;
        }
        let value = args.next().unwrap_or_default();
        match a.as_str() {
            "--seeds" => seeds = tessera_sim::parse_seeds(&value).unwrap_or_else(|| usage(&value)),
            "--steps" => cfg.chaos_steps = value.parse().unwrap_or_else(|_| usage(&value)),
            _ => usage(&a),
        }
    }
    let mut failed = 0u64;
    let total = seeds.end.saturating_sub(seeds.start);
    for seed in seeds {
        match tessera_sim::run(seed, &cfg) {
            Ok(s) => println!(
                "seed {seed}: ok ({} steps, {} ms, {} writes acked, {} reads, {} crashes, {} partitions)",
                s.steps, s.sim_time_ms, s.writes_acked, s.reads_ok, s.crashes, s.partitions
            ),
            Err(f) => {
                failed += 1;
                println!("{f}");
            }
        }
    }
    println!("{failed} of {total} seeds failed");
    std::process::exit(i32::from(failed > 0));
}

fn usage(bad: &str) -> ! {
    eprintln!("bad argument {bad:?}; usage: tessera-sim [--seeds A..B] [--steps N] [--reorder]");
    std::process::exit(2);
}
