//! What applying change sets to the state file costs, by how many share a transaction:
//! `cargo bench -p grex --bench store`.
//!
//! A store of 100,000 buckets (one 8-byte item each, as the `counter` job leaves them) takes
//! change sets to random buckets in unsynced transactions of 1, 4, 16, 64 and 256 change sets,
//! each with the applied point of every group it touched, as a cluster node's committer writes
//! its applies: unsynced only, and with a synced checkpoint every 5,000 change sets (a node's
//! committer checkpoints once a second; 5,000 applies a second is a busy three-node cluster).
//! Each figure is the median of several rounds, in µs per change set (wall time).

use std::time::Instant;

use grex::data::{ChangeSet, ItemWrite};
use grex::storage::{Batch, LogOp, RedbStore, Store, SyncTo};

const BUCKETS: u64 = 100_000;
const FLOCKS: u32 = 256;
const ROUNDS: usize = 5;
const CHANGE_SETS: usize = 20_000;

/// A small generator, so each run writes the same buckets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn change(bucket: u64, version: u64) -> ChangeSet {
    let bucket = format!("key:{bucket}").into_bytes();
    let flock = grex::data::flock_of(&bucket, FLOCKS);
    let writes = vec![ItemWrite { item: "count".into(), value: Some(version.to_le_bytes().to_vec()) }];
    ChangeSet { bucket, flock, version, writes }
}

fn batch(changes: Vec<ChangeSet>, sync: SyncTo) -> Batch {
    let mut log: Vec<LogOp> =
        changes.iter().map(|c| LogOp::PutState { group: c.flock, key: "applied", value: vec![0; 40] }).collect();
    log.dedup_by_key(|op| if let LogOp::PutState { group, .. } = op { *group } else { u32::MAX });
    Batch { log, changes: changes.into_iter().map(Into::into).collect(), sync }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RedbStore::open(&dir.path().join("grex.redb"), FLOCKS, true).expect("store");
    let mut version = 1;
    for first in (0..BUCKETS).step_by(1000) {
        let changes = (first..first + 1000).map(|b| change(b, version)).collect();
        store.write(&batch(changes, SyncTo::Nothing)).expect("fill");
    }
    store.write(&batch(Vec::new(), SyncTo::All)).expect("checkpoint");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    println!("µs per change set (median of {ROUNDS} rounds of {CHANGE_SETS} change sets)");
    println!("per transaction | unsynced only | and a checkpoint every 5,000 change sets");
    for per_txn in [1, 4, 16, 64, 256] {
        let mut cells = Vec::new();
        for checkpoint_every in [usize::MAX, 5000] {
            let mut rounds = Vec::new();
            for _ in 0..ROUNDS {
                let start = Instant::now();
                let mut since_checkpoint = 0;
                for _ in 0..CHANGE_SETS / per_txn {
                    version += 1;
                    let changes = (0..per_txn).map(|_| change(rng.next() % BUCKETS, version)).collect();
                    since_checkpoint += per_txn;
                    let sync = if since_checkpoint >= checkpoint_every { SyncTo::All } else { SyncTo::Nothing };
                    if sync == SyncTo::All {
                        since_checkpoint = 0;
                    }
                    store.write(&batch(changes, sync)).expect("write");
                }
                rounds.push(start.elapsed().as_secs_f64() * 1e6 / CHANGE_SETS as f64);
            }
            cells.push(median(rounds));
        }
        println!("{per_txn:15} | {:13.1} | {:.1}", cells[0], cells[1]);
    }
}
