//! One group's raft log as raft-rs sees it ([`raft::Storage`]): the hard state, the
//! configuration, where the log starts (a snapshot or a purge point) and its entries.
//!
//! The recent entries are in memory; older ones, already durable, are read back through an
//! [`EntrySource`] (the node's log file, or the simulation's disk) only when a lagging peer
//! needs them. The term of every entry stays in memory as runs of equal terms, so raft's
//! `term` checks never read the disk.
//!
//! Invariant: `base < mem_first <= last + 1`; entries `base+1 ..= last` exist, the ones below
//! `mem_first` only at the source; `terms` covers `base+1 ..= last`.

use std::collections::VecDeque;
use std::sync::Arc;

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::storage::GroupId;

/// Where entries that left memory are read back from. Entries handed to [`GroupLog::append`]
/// are written to it by the engine's driver before the engine is told they are durable.
pub trait EntrySource: Send + Sync {
    /// Entries `low..high` of `group`, at most `max_bytes` of them (always at least one).
    fn entries(&self, group: GroupId, low: u64, high: u64, max_bytes: u64) -> anyhow::Result<Vec<Entry>>;
}

/// Index (and term) a founding member's log starts after.
pub const BOOTSTRAP_INDEX: u64 = 5;

/// What an entry counts for limits beyond its payload.
pub const ENTRY_OVERHEAD_BYTES: u64 = 24;

/// How big an entry counts for limits: its payload plus a fixed overhead.
pub fn entry_bytes(entry: &Entry) -> u64 {
    (entry.data.len() + entry.context.len()) as u64 + ENTRY_OVERHEAD_BYTES
}

/// One group's log.
pub struct GroupLog {
    group: GroupId,
    hard_state: HardState,
    conf_state: ConfState,
    /// The last index (and its term) before the log's first entry.
    base: (u64, u64),
    last: u64,
    /// Runs of terms: `(first index, term)`, ascending, covering `base+1 ..= last`.
    terms: Vec<(u64, u64)>,
    mem_first: u64,
    entries: VecDeque<Entry>,
    mem_bytes: u64,
    /// What a snapshot taken now holds: the state machine's applied index, its term and the
    /// configuration at that point.
    applied: SnapshotMetadata,
    source: Arc<dyn EntrySource>,
}

impl GroupLog {
    /// A log that starts after `base` (a snapshot's or a purge point's index and term) and holds
    /// entries `base+1 ..= last`, all at `source` (`terms` gives their terms as runs), with the
    /// state machine applied to `applied`.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        group: GroupId,
        state: RaftState,
        base: (u64, u64),
        last: u64,
        terms: Vec<(u64, u64)>,
        applied: SnapshotMetadata,
        source: Arc<dyn EntrySource>,
    ) -> GroupLog {
        assert!(last >= base.0, "log of group {group} ends at {last} before its base {}", base.0);
        let mut hard_state = state.hard_state;
        // Applied entries were committed, even if the write of that commit index was lost.
        hard_state.commit = hard_state.commit.max(applied.index);
        GroupLog {
            group,
            hard_state,
            conf_state: state.conf_state,
            base,
            last,
            terms,
            mem_first: last + 1,
            entries: VecDeque::new(),
            mem_bytes: 0,
            applied,
            source,
        }
    }

    /// The log of a group's founding member: it starts after [`BOOTSTRAP_INDEX`], as if from a
    /// snapshot of an empty state with configuration `conf_state`. Every founding member starts
    /// the same way; a member added later starts [`GroupLog::empty`] and gets a snapshot first
    /// (its log can never match a founder's at index 0), so it learns the configuration from it.
    pub fn bootstrap(group: GroupId, conf_state: ConfState, source: Arc<dyn EntrySource>) -> GroupLog {
        let (index, term) = (BOOTSTRAP_INDEX, BOOTSTRAP_INDEX);
        let applied =
            SnapshotMetadata { index, term, conf_state: Some(conf_state.clone()).into(), ..Default::default() };
        let hard_state = HardState { term, commit: index, vote: 0, ..Default::default() };
        let state = RaftState { hard_state, conf_state };
        GroupLog::restore(group, state, (index, term), index, Vec::new(), applied, source)
    }

    /// The log of a member added to a running group: empty, waiting for its leader's snapshot.
    pub fn empty(group: GroupId, source: Arc<dyn EntrySource>) -> GroupLog {
        let state = RaftState::default();
        GroupLog::restore(group, state, (0, 0), 0, Vec::new(), SnapshotMetadata::default(), source)
    }

    /// The hard state as last handed to [`GroupLog::set_hard_state`].
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The configuration at the applied point.
    pub fn conf_state(&self) -> ConfState {
        self.conf_state.clone()
    }

    /// Index of the last entry.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The index and term the log starts after.
    pub fn base(&self) -> (u64, u64) {
        self.base
    }

    /// Bytes of entries held in memory.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// Records a new hard state.
    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    /// Records the configuration and the applied point a snapshot taken now would hold.
    pub fn set_applied(&mut self, index: u64, term: u64, conf_state: ConfState) {
        self.applied.index = index;
        self.applied.term = term;
        self.conf_state = conf_state.clone();
        self.applied.conf_state = Some(conf_state).into();
    }

    /// The applied point (index, term) a snapshot would hold.
    pub fn applied(&self) -> (u64, u64) {
        (self.applied.index, self.applied.term)
    }

    /// Appends entries; an entry at an index the log holds replaces it and every later one.
    pub fn append(&mut self, new: &[Entry]) {
        let Some(first) = new.first() else { return };
        let at = first.index;
        assert!(at > self.base.0, "group {}: append at {at} overwrites the snapshot at {}", self.group, self.base.0);
        assert!(at <= self.last + 1, "group {}: append at {at} leaves a gap after {}", self.group, self.last);
        self.truncate_from(at);
        for entry in new {
            match self.terms.last() {
                Some(&(_, term)) if term == entry.term => {}
                _ => self.terms.push((entry.index, entry.term)),
            }
            self.mem_bytes += entry_bytes(entry);
            self.entries.push_back(entry.clone());
        }
        self.last = new.last().map_or(self.last, |e| e.index);
    }

    fn truncate_from(&mut self, at: u64) {
        if at > self.last {
            return;
        }
        while self.terms.last().is_some_and(|&(first, _)| first >= at) {
            self.terms.pop();
        }
        if at < self.mem_first {
            // The replaced entries are only at the source; the driver's write replaces them there.
            self.entries.clear();
            self.mem_bytes = 0;
            self.mem_first = at;
        } else {
            let keep = (at - self.mem_first) as usize;
            for entry in self.entries.drain(keep..) {
                self.mem_bytes -= entry_bytes(&entry);
            }
        }
        self.last = at - 1;
    }

    /// Replaces the whole log with the point a snapshot starts from.
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot) {
        let meta = snapshot.get_metadata();
        self.base = (meta.index, meta.term);
        self.last = meta.index;
        self.terms.clear();
        self.entries.clear();
        self.mem_bytes = 0;
        self.mem_first = meta.index + 1;
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = meta.index;
        self.set_applied(meta.index, meta.term, meta.get_conf_state().clone());
    }

    /// Forgets entries up to `upto` (the state machine holds their effects durably): the log
    /// then starts after `upto`.
    pub fn purge(&mut self, upto: u64) {
        if upto <= self.base.0 {
            return;
        }
        let upto = upto.min(self.last);
        let term = self.term_at(upto).expect("a purged index is in the log");
        self.evict(upto);
        self.base = (upto, term);
        while self.terms.len() > 1 && self.terms[1].0 <= upto + 1 {
            self.terms.remove(0);
        }
        if let Some(run) = self.terms.first_mut() {
            run.0 = run.0.max(upto + 1);
        }
        if upto == self.last {
            self.terms.clear();
        }
    }

    /// Drops entries up to `upto` from memory (they stay at the source).
    pub fn evict(&mut self, upto: u64) {
        while self.mem_first <= upto {
            let Some(entry) = self.entries.pop_front() else { break };
            self.mem_bytes -= entry_bytes(&entry);
            self.mem_first += 1;
        }
        self.mem_first = self.mem_first.max(upto.min(self.last) + 1);
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.base.0 {
            return Some(self.base.1);
        }
        if index < self.base.0 || index > self.last {
            return None;
        }
        let run = self.terms.partition_point(|&(first, _)| first <= index);
        Some(self.terms[run.checked_sub(1)?].1)
    }
}

fn store_error(error: StorageError) -> raft::Error {
    raft::Error::Store(error)
}

impl raft::Storage for GroupLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState { hard_state: self.hard_state.clone(), conf_state: self.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.base.0 {
            return Err(store_error(StorageError::Compacted));
        }
        assert!(
            high <= self.last + 1,
            "group {}: entries up to {high} asked of a log ending at {}",
            self.group,
            self.last
        );
        let max_bytes = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut bytes = 0u64;
        if low < self.mem_first {
            let upto = high.min(self.mem_first);
            out = self
                .source
                .entries(self.group, low, upto, max_bytes)
                .map_err(|e| store_error(StorageError::Other(e.into())))?;
            bytes = out.iter().map(entry_bytes).sum();
            if upto < high && (out.len() as u64) < upto - low {
                return Ok(out);
            }
        }
        let from = low.max(self.mem_first);
        for index in from..high {
            let entry = &self.entries[(index - self.mem_first) as usize];
            bytes += entry_bytes(entry);
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index < self.base.0 {
            return Err(store_error(StorageError::Compacted));
        }
        self.term_at(index).ok_or_else(|| store_error(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.base.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last)
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // The data is the driver's to attach (it reads the state machine when it sends).
        Ok(Snapshot { metadata: Some(self.applied.clone()).into(), ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    struct NoSource;
    impl EntrySource for NoSource {
        fn entries(&self, _: GroupId, low: u64, high: u64, _: u64) -> anyhow::Result<Vec<Entry>> {
            Ok((low..high).map(|i| entry(i, 1)).collect())
        }
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 10].into(), ..Default::default() }
    }

    fn log() -> GroupLog {
        GroupLog::empty(7, Arc::new(NoSource))
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    #[test]
    fn a_conflicting_append_replaces_the_suffix_and_its_terms() {
        let mut log = log();
        log.append(&[entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)]);
        log.append(&[entry(3, 3)]);
        assert_eq!(log.last_index().unwrap(), 3);
        assert_eq!(log.term(2).unwrap(), 1);
        assert_eq!(log.term(3).unwrap(), 3);
        assert!(log.term(4).is_err());
        let got = log.entries(1, 4, None, ctx()).unwrap();
        assert_eq!(got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), [(1, 1), (2, 1), (3, 3)]);
    }

    #[test]
    fn evicted_entries_are_read_from_the_source_and_purged_ones_are_gone() {
        let mut log = log();
        log.append(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>());
        log.evict(6);
        assert_eq!(log.mem_bytes(), 4 * 34);
        let got = log.entries(3, 9, None, ctx()).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), [3, 4, 5, 6, 7, 8]);
        log.purge(4);
        assert_eq!(log.first_index().unwrap(), 5);
        assert_eq!(log.term(4).unwrap(), 1);
        assert!(matches!(log.entries(4, 6, None, ctx()), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(log.term(3), Err(raft::Error::Store(StorageError::Compacted))));
    }

    #[test]
    fn a_size_limit_returns_at_least_one_entry() {
        let mut log = log();
        log.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>());
        assert_eq!(log.entries(1, 6, 1, ctx()).unwrap().len(), 1);
        assert_eq!(log.entries(1, 6, 68, ctx()).unwrap().len(), 2);
    }

    #[test]
    fn a_snapshot_moves_the_start_and_keeps_the_term_at_its_index() {
        let mut log = log();
        log.append(&[entry(1, 1), entry(2, 1)]);
        let meta = SnapshotMetadata { index: 9, term: 4, ..Default::default() };
        log.apply_snapshot(&Snapshot { metadata: Some(meta).into(), ..Default::default() });
        assert_eq!((log.first_index().unwrap(), log.last_index().unwrap()), (10, 9));
        assert_eq!(log.term(9).unwrap(), 4);
        log.append(&[entry(10, 4)]);
        assert_eq!(log.term(10).unwrap(), 4);
        assert_eq!(log.hard_state().commit, 9);
    }
}
