//! What the unit tests share.

use proptest::test_runner::{Config, RngSeed};

use crate::data::{ChangeSet, ItemWrite};

/// A property test's settings: `cases` cases from a seed that `GREX_SEED` sets (else the clock),
/// printed so that a failure can be replayed.
pub fn proptest_config(cases: u32) -> Config {
    let seed: u64 = std::env::var("GREX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("seed {seed} (GREX_SEED={seed} replays this run)");
    Config { cases, rng_seed: RngSeed::Fixed(seed), failure_persistence: None, ..Config::default() }
}

/// A change set of `bucket` in a cluster of `flock_count` flocks.
pub fn change_set(bucket: &[u8], flock_count: u32, version: u64, writes: Vec<ItemWrite>) -> ChangeSet {
    ChangeSet { bucket: bucket.to_vec(), flock: crate::data::flock_of(bucket, flock_count), version, writes }
}
