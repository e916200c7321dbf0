//! What the unit tests share.

use proptest::test_runner::{Config, RngSeed};

/// A property test's settings: `cases` cases from a seed that `GREX_SEED` sets (else the clock),
/// printed so that a failure can be replayed.
pub fn proptest_config(cases: u32) -> Config {
    let seed: u64 = std::env::var("GREX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("seed {seed} (GREX_SEED={seed} replays this run)");
    Config { cases, rng_seed: RngSeed::Fixed(seed), failure_persistence: None, ..Config::default() }
}
