//! The slowest and the failed recent jobs of a node, kept in memory for `grex jobs recent`
//! (`GET /v1/jobs/recent`) and the dashboard.
//!
//! Bounded: the last [`FAILED_KEPT`] failures, and the [`SLOWEST_KEPT`] slowest jobs of the
//! current and the previous [`SLOW_WINDOW`] (so "recent" means the last one to two windows). A job
//! is recorded without its bucket key, by a hash of it. The common path costs one atomic load: a
//! job faster than the slowest kept ones is not looked at further.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use grex_client::proto::{JobRecord, RecentJobs};

use crate::error::ErrorCode;
use crate::metrics::Phase;

/// Failed jobs kept.
pub const FAILED_KEPT: usize = 64;
/// Slowest jobs kept per window.
pub const SLOWEST_KEPT: usize = 32;
/// Characters of a module name kept.
const MODULE_CHARS_KEPT: usize = 128;
/// How long a window of slowest jobs lasts.
pub const SLOW_WINDOW: Duration = Duration::from_secs(60);

/// The node's recent jobs.
pub(crate) struct Recent {
    state: Mutex<State>,
    /// The shortest total (µs) among a full window's slowest jobs: a job at or under it cannot
    /// enter (0 while the window has room).
    floor_us: AtomicU64,
}

struct State {
    failed: VecDeque<JobRecord>,
    slowest: Vec<JobRecord>,
    previous: Vec<JobRecord>,
    window_began: Instant,
}

impl Recent {
    pub(crate) fn new() -> Recent {
        Recent {
            state: Mutex::new(State {
                failed: VecDeque::with_capacity(FAILED_KEPT),
                slowest: Vec::with_capacity(SLOWEST_KEPT),
                previous: Vec::new(),
                window_began: Instant::now(),
            }),
            floor_us: AtomicU64::new(0),
        }
    }

    /// Notes a job that ended.
    pub(crate) fn record(
        &self,
        module: &str,
        bucket: &[u8],
        flock: u32,
        outcome: Result<(), ErrorCode>,
        phases: &[(Phase, Duration)],
    ) {
        let total = phases.iter().find(|(p, _)| *p == Phase::Total).map_or(0, |(_, d)| d.as_micros() as u64);
        if outcome.is_ok() && total <= self.floor_us.load(Ordering::Relaxed) {
            return;
        }
        let micros = |phase| phases.iter().find(|(p, _)| *p == phase).map_or(0, |(_, d)| d.as_micros() as u64);
        let record = JobRecord {
            at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            // A name no module has is the client's text: kept short.
            module: module.chars().take(MODULE_CHARS_KEPT).collect(),
            bucket_hash: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bucket)),
            flock,
            queue_us: micros(Phase::Queue),
            run_us: micros(Phase::Run),
            commit_us: micros(Phase::Commit),
            total_us: total,
            error: outcome.err(),
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.window_began.elapsed() >= SLOW_WINDOW {
            state.previous = std::mem::take(&mut state.slowest);
            state.window_began = Instant::now();
            self.floor_us.store(0, Ordering::Relaxed);
        }
        if record.error.is_some() {
            if state.failed.len() == FAILED_KEPT {
                state.failed.pop_front();
            }
            state.failed.push_back(record.clone());
        }
        if total > self.floor_us.load(Ordering::Relaxed) {
            let slowest = &mut state.slowest;
            let at = slowest.partition_point(|r| r.total_us >= total);
            slowest.insert(at, record);
            slowest.truncate(SLOWEST_KEPT);
            if slowest.len() == SLOWEST_KEPT {
                self.floor_us.store(slowest[SLOWEST_KEPT - 1].total_us, Ordering::Relaxed);
            }
        }
    }

    /// The jobs kept: the slowest (slowest first, this window's and the last one's merged) and the
    /// failed (newest first).
    pub(crate) fn snapshot(&self, node: &str) -> RecentJobs {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut slowest: Vec<JobRecord> = state.slowest.iter().chain(&state.previous).cloned().collect();
        slowest.sort_by_key(|r| std::cmp::Reverse(r.total_us));
        slowest.truncate(SLOWEST_KEPT);
        RecentJobs { node: node.to_owned(), slowest, failed: state.failed.iter().rev().cloned().collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn took(ms: u64) -> [(Phase, Duration); 2] {
        [(Phase::Run, Duration::from_millis(ms / 2)), (Phase::Total, Duration::from_millis(ms))]
    }

    #[test]
    fn the_slowest_and_the_failed_are_kept_within_their_bounds() {
        let recent = Recent::new();
        for ms in 1..=100 {
            recent.record("counter", format!("b{ms}").as_bytes(), 3, Ok(()), &took(ms));
        }
        for i in 0..(FAILED_KEPT + 5) {
            recent.record("ledger", b"x", 1, Err(ErrorCode::JobTimeout), &took(i as u64 % 3));
        }
        let seen = recent.snapshot("n");
        assert_eq!(seen.slowest.len(), SLOWEST_KEPT);
        let totals: Vec<u64> = seen.slowest.iter().map(|r| r.total_us / 1000).collect();
        assert_eq!(totals, (69..=100).rev().collect::<Vec<_>>(), "the 32 slowest, slowest first");
        assert_eq!(seen.slowest[0].run_us, 50_000);
        assert_eq!(seen.slowest[0].bucket_hash, format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b"b100")));
        assert_eq!(seen.failed.len(), FAILED_KEPT);
        assert!(seen.failed.iter().all(|r| r.error == Some(ErrorCode::JobTimeout) && r.module == "ledger"));
    }
}
