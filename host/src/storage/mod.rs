//! Storage: the node's durable state behind the small [`Store`] trait.
//!
//! [`RedbStore`] keeps the state in one redb file (`grex.redb` in the data directory): items,
//! bucket versions, modules and their names, and node metadata with a schema version checked on
//! open; the cluster's replicated logs are append-only segments beside it (`grex-log/`,
//! `segment_log`). `docs/storage.md`
//! lists the tables. [`MemoryStore`] is the same contract in memory, for tests; [`FaultyStore`]
//! wraps any store and fails after N operations, for fault tests.
//!
//! Invariant: [`Store::write`] applies a [`Batch`] (change sets plus replicated-log operations)
//! atomically per part, the log's part and the state's part, and when it returns `Ok` on a durable
//! store, what the batch's [`SyncTo`] names is on disk (fsync'd) with everything of that part
//! written before it. Many jobs share one write: that is the node's group commit.
//!
//! The replicated logs of the cluster (`cluster::consensus`) live here too, as opaque bytes: log entries
//! read by (group, index) and a few named values per group: the log's own (vote, purge point) and
//! the state machine's (applied point, meta state). A cluster node's log part is synced on every
//! append and its state part only now and then (a checkpoint): applying an entry the log holds
//! needs no fsync, since a crash replays the log from the state's last applied point, and the log
//! is purged only up to a checkpoint.

mod faulty;
mod legacy;
mod memory;
mod packed;
mod redb_store;
mod segment_log;

pub use faulty::FaultyStore;
#[cfg(test)]
pub(crate) use legacy::testing as legacy_testing;
pub use legacy::{LegacyEntries, LegacyStore, LegacyValues, OLDEST_MIGRATED_SCHEMA, Refile, Rewrite, ValueKind};
pub use memory::MemoryStore;
pub use redb_store::{RedbStore, SCHEMA_VERSION};

use std::sync::{Arc, Mutex};

use crate::data::{BucketData, Change, ChangeSet};
use crate::error::StoreError;

/// A module's id: the SHA-256 of its bytes.
pub type ModuleId = [u8; 32];

/// Identity fixed when the data directory is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeMeta {
    /// Random node id, hex.
    pub node_id: String,
    /// Flocks in the cluster (a power of two).
    pub flock_count: u32,
}

/// A group of the cluster's replicated logs: a flock, or [`META_GROUP`].
pub type GroupId = u32;
/// The group that holds the cluster's membership, flock map and module names.
pub const META_GROUP: GroupId = u32::MAX;

/// How much one [`Store::log_entries`] call returns: at most `count` entries and, past the first, at
/// most `bytes` of encoded entries. A follower far behind is sent entries of up to 1 MiB each a
/// message at a time, so a read must stop at what the message holds, not at a count of entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRead {
    /// Entries at most.
    pub count: usize,
    /// Encoded bytes at most, past the first entry.
    pub bytes: u64,
}

impl LogRead {
    /// At most `count` entries, however large.
    pub const fn count(count: usize) -> Self {
        Self { count, bytes: u64::MAX }
    }

    /// At most `count` entries and, past the first, at most `bytes` of them.
    pub const fn within(count: usize, bytes: u64) -> Self {
        Self { count, bytes }
    }

    /// Takes entries of the given encoded lengths while they fit: how many to return.
    pub fn taken(self, lengths: impl Iterator<Item = usize>) -> usize {
        let mut total = 0u64;
        let mut taken = 0;
        for len in lengths.take(self.count) {
            total = total.saturating_add(len as u64);
            if taken > 0 && total > self.bytes {
                break;
            }
            taken += 1;
        }
        taken
    }
}

/// One replicated-log operation, written in the same transaction as the batch's change sets.
#[derive(Clone, Debug)]
pub enum LogOp {
    /// Appends entries, by index; an entry at an index the log holds replaces it and every later
    /// entry (a conflicting suffix).
    Append {
        /// The log.
        group: GroupId,
        /// `(index, encoded entry)`, in index order.
        entries: Vec<(u64, LogEntry)>,
    },
    /// Deletes entries with index `>= from` (a conflicting suffix).
    TruncateFrom {
        /// The log.
        group: GroupId,
        /// First index to delete.
        from: u64,
    },
    /// Deletes entries with index `<= upto` (covered by a snapshot).
    PurgeUpto {
        /// The log.
        group: GroupId,
        /// Last index to delete.
        upto: u64,
    },
    /// Sets one of the log's own named values of a group (vote, purge point), kept with the log.
    PutLogState {
        /// The log.
        group: GroupId,
        /// Name of the value.
        key: &'static str,
        /// Encoded value.
        value: Vec<u8>,
    },
    /// Sets one named value of a group's state machine (applied point, meta state), kept with
    /// the state.
    PutState {
        /// The log.
        group: GroupId,
        /// Name of the value.
        key: &'static str,
        /// Encoded value.
        value: Vec<u8>,
    },
    /// Deletes a group's whole log: every entry and every named value of the log's.
    DropGroupLog {
        /// The log.
        group: GroupId,
    },
    /// Deletes every named value of a group's state machine (its applied point).
    ForgetGroup {
        /// The group.
        group: GroupId,
    },
    /// Deletes every bucket of a flock (before a snapshot of it is installed).
    ClearFlock {
        /// The flock.
        flock: u32,
    },
    /// Replaces a flock's buckets with those a snapshot holds, read one at a time as they are
    /// written (the store never holds the snapshot whole).
    InstallFlock {
        /// The flock.
        flock: u32,
        /// Its buckets, each as a change set that writes every item.
        buckets: BucketStream,
    },
    /// Deletes a module name; the module's bytes go too once no name points to them.
    DeleteModule {
        /// The name.
        name: String,
    },
    /// Stores a module (replicated through the meta group); the bytes the name pointed to before
    /// go once no name points to them.
    PutModule {
        /// SHA-256 of the bytes.
        id: ModuleId,
        /// Name to point at it.
        name: String,
        /// The module.
        wasm: Vec<u8>,
    },
}

/// Change sets read one at a time from where they rest (a snapshot file) while a store writes
/// them ([`LogOp::InstallFlock`]). They can be read once.
#[derive(Clone)]
pub struct BucketStream(Arc<Mutex<Option<Buckets>>>);

type Buckets = Box<dyn Iterator<Item = Result<ChangeSet, String>> + Send>;

impl BucketStream {
    /// The change sets `buckets` yields.
    pub fn new(buckets: Buckets) -> BucketStream {
        BucketStream(Arc::new(Mutex::new(Some(buckets))))
    }

    /// Takes the change sets; an error if they were taken before.
    pub fn take(&self) -> Result<Buckets, StoreError> {
        let taken = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        taken.ok_or_else(|| StoreError::Engine("a snapshot's buckets were read once already".into()))
    }

    /// Reads each change set into `write`; the first error that either returns ends it.
    pub fn for_each(&self, mut write: impl FnMut(ChangeSet) -> Result<(), StoreError>) -> Result<(), StoreError> {
        for change in self.take()? {
            write(change.map_err(|e| StoreError::Engine(format!("a snapshot could not be read: {e}")))?)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for BucketStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BucketStream")
    }
}

/// An encoded log entry as it waits to be written: a short head and a payload that may be
/// shared with its holder (the consensus engine's entry), so that a large payload is copied once,
/// into the log's write. Read back, the two are one byte string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    head: [u8; LogEntry::HEAD_BYTES_MAX],
    head_len: u8,
    body: bytes::Bytes,
}

impl LogEntry {
    /// The longest head.
    pub const HEAD_BYTES_MAX: usize = 32;

    /// The entry whose encoding is `head` followed by `body`.
    ///
    /// # Panics
    /// If `head` is longer than [`LogEntry::HEAD_BYTES_MAX`].
    pub fn new(head: &[u8], body: bytes::Bytes) -> LogEntry {
        let mut entry = LogEntry { head: [0; LogEntry::HEAD_BYTES_MAX], head_len: head.len() as u8, body };
        entry.head[..head.len()].copy_from_slice(head);
        entry
    }

    /// Bytes of the encoding.
    pub fn len(&self) -> usize {
        usize::from(self.head_len) + self.body.len()
    }

    /// Whether the encoding is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The encoding, in its two parts.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.head[..usize::from(self.head_len)], &self.body]
    }

    /// The encoding, in one piece.
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts().concat()
    }
}

impl From<Vec<u8>> for LogEntry {
    fn from(encoded: Vec<u8>) -> LogEntry {
        LogEntry::new(&[], encoded.into())
    }
}

/// Entries as a log operation holds them.
#[cfg(test)]
pub(crate) fn logged(entries: Vec<(u64, Vec<u8>)>) -> Vec<(u64, LogEntry)> {
    entries.into_iter().map(|(index, entry)| (index, entry.into())).collect()
}

impl LogOp {
    /// Whether the operation belongs to the log's part of a batch (else to the state's).
    pub fn on_log(&self) -> bool {
        matches!(
            self,
            LogOp::Append { .. }
                | LogOp::TruncateFrom { .. }
                | LogOp::PurgeUpto { .. }
                | LogOp::PutLogState { .. }
                | LogOp::DropGroupLog { .. }
        )
    }

    /// Bytes of data the operation carries (what it holds in memory while it waits to be written).
    pub fn bytes(&self) -> usize {
        match self {
            LogOp::Append { entries, .. } => entries.iter().map(|(_, entry)| entry.len()).sum(),
            LogOp::PutLogState { value, .. } | LogOp::PutState { value, .. } => value.len(),
            LogOp::PutModule { name, wasm, .. } => name.len() + wasm.len(),
            LogOp::DeleteModule { name } => name.len(),
            LogOp::TruncateFrom { .. }
            | LogOp::PurgeUpto { .. }
            | LogOp::ClearFlock { .. }
            | LogOp::InstallFlock { .. }
            | LogOp::DropGroupLog { .. }
            | LogOp::ForgetGroup { .. } => 0,
        }
    }
}

/// What of a batch must be on disk before [`Store::write`] returns (ignored by a store opened
/// without fsync). Ordered: a batch made of several writes syncs what the most demanding needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum SyncTo {
    /// Nothing: applying entries the log already holds (a crash replays them).
    #[default]
    Nothing,
    /// The log's part: appends, truncation, purge point, vote.
    Log,
    /// Both parts, with every state write before: a checkpoint (change sets of a node without a
    /// log, installed snapshots, and before the log is purged).
    All,
}

/// What one write to the store holds. Log operations are applied before change sets, and the
/// state's part is written before the log's (a checkpoint is on disk before the purge it allows).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Replicated-log operations.
    pub log: Vec<LogOp>,
    /// Change sets, in order.
    pub changes: Vec<Change>,
    /// What must be on disk when the write returns.
    pub sync: SyncTo,
}

/// One flock of a store as of one moment ([`Store::flock_view`]).
pub trait FlockView: Send + Sync {
    /// A named value of the flock's state machine (its applied point), as of the view.
    fn state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The flock's buckets whose keys start with `prefix`, strictly after `after`, in key order,
    /// with their items: at most `limit`, and no more once they hold `bytes_max` bytes of keys and
    /// values (at least one bucket, however large).
    fn buckets(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(Vec<u8>, BucketData)>, StoreError>;
}

/// The node's durable state.
pub trait Store: Send + Sync + 'static {
    /// Identity of the node and cluster layout.
    fn meta(&self) -> &NodeMeta;
    /// A bucket's items and version (empty at version 0 if never written).
    fn load_bucket(&self, bucket: &[u8]) -> Result<BucketData, StoreError>;
    /// One committed item.
    fn get_item(&self, bucket: &[u8], item: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Committed item keys with `prefix`, strictly after `start_after`, at most `limit`.
    fn list_items(
        &self,
        bucket: &[u8],
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    /// A bucket's committed version.
    fn bucket_version(&self, bucket: &[u8]) -> Result<u64, StoreError>;
    /// Writes a batch, each part in one atomic transaction, fsync'd as `batch.sync` says if the
    /// store is durable.
    fn write(&self, batch: &Batch) -> Result<(), StoreError>;
    /// Writes the state part of a batch (state operations and change sets; it has no log
    /// operations and asks for no sync) into a transaction left open, which
    /// [`commit_staged`](Store::commit_staged) commits unsynced, or the next `write` that writes
    /// state commits along with its own part. Until then readers do not see it and a crash
    /// loses it: it is for applies, which the log holds. Many rounds' applies then share one
    /// transaction without waiting in memory to be written all at once. A store without open
    /// transactions writes it at once.
    fn stage(&self, batch: &Batch) -> Result<(), StoreError> {
        self.write(batch)
    }
    /// Commits what [`stage`](Store::stage) wrote, unsynced.
    fn commit_staged(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Applies change sets, in order, in one atomic, durable transaction.
    fn commit(&self, changes: &[ChangeSet]) -> Result<(), StoreError> {
        self.write(&Batch {
            log: Vec::new(),
            changes: changes.iter().cloned().map(Change::from).collect(),
            sync: SyncTo::All,
        })
    }
    /// Log entries of `group` with index in `from..to`, in order, as many as `limit` allows (at
    /// least one if there is one).
    fn log_entries(
        &self,
        group: GroupId,
        from: u64,
        to: u64,
        limit: LogRead,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The last log entry of `group`.
    fn log_last(&self, group: GroupId) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// A named value of `group`, the log's own or its state machine's.
    fn log_state(&self, group: GroupId, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every bucket of a flock with its items (for a snapshot), in bucket-key order.
    fn flock_buckets(&self, flock: u32) -> Result<Vec<(Vec<u8>, BucketData)>, StoreError>;
    /// The flock's committed buckets and state as they are now, unchanged by later writes (which
    /// it does not hold up), read a page at a time: what a scan reads.
    fn flock_view(&self, flock: u32) -> Result<Box<dyn FlockView>, StoreError>;
    /// How many buckets the store holds (with items).
    fn bucket_count(&self) -> Result<u64, StoreError>;
    /// Up to `limit` buckets, each with its flock, in (flock, key) order, after `after` (from the
    /// first when `None`): the store's keys a page at a time (`SCAN`).
    fn bucket_keys(&self, after: Option<(u32, &[u8])>, limit: usize) -> Result<Vec<(u32, Vec<u8>)>, StoreError>;
    /// Stores a module's bytes under its id and points `name` at it (the bytes it pointed to
    /// before go if no other name points to them).
    fn put_module(&self, id: &ModuleId, name: &str, wasm: &[u8]) -> Result<(), StoreError>;
    /// A module's bytes.
    fn module_bytes(&self, id: &ModuleId) -> Result<Option<Vec<u8>>, StoreError>;
    /// A module's size in bytes, without copying it out.
    fn module_size(&self, id: &ModuleId) -> Result<Option<u64>, StoreError>;
    /// Every name and the id it points at.
    fn module_names(&self) -> Result<Vec<(String, ModuleId)>, StoreError>;
}

#[cfg(test)]
pub(crate) mod contract {
    //! One test suite every store must pass, checked against a `BTreeMap` model.

    use std::collections::BTreeMap;

    use super::*;
    use crate::data::ItemWrite;

    fn change(bucket: &[u8], version: u64, writes: &[(&str, Option<&str>)]) -> ChangeSet {
        let writes = writes
            .iter()
            .map(|(k, v)| ItemWrite { item: k.to_string(), value: v.map(|v| v.as_bytes().to_vec()) })
            .collect();
        crate::testing::change_set(bucket, 16, version, writes)
    }

    /// A view keeps what it saw while writes go on, and pages by prefix, key and size.
    pub(crate) fn flock_views_hold_one_moment(store: &dyn Store) {
        let flocks = store.meta().flock_count;
        let keys: Vec<Vec<u8>> = (0..200).map(|i| format!("user-{i:03}").into_bytes()).collect();
        let flock = crate::data::flock_of(&keys[0], flocks);
        let mine: Vec<&Vec<u8>> = keys.iter().filter(|k| crate::data::flock_of(k, flocks) == flock).collect();
        assert!(mine.len() >= 4, "enough keys share a flock");
        let changes: Vec<ChangeSet> = keys.iter().map(|k| change(k, 1, &[("n", Some("1"))])).collect();
        store.commit(&changes).unwrap();
        store
            .write(&Batch {
                log: vec![LogOp::PutState { group: flock, key: "applied", value: b"first".to_vec() }],
                ..Batch::default()
            })
            .unwrap();
        let view = store.flock_view(flock).unwrap();
        // Later writes: a new bucket, a changed one, and a new applied point.
        let key = (0..)
            .map(|i| format!("user-new-{i}").into_bytes())
            .find(|k| crate::data::flock_of(k, flocks) == flock)
            .unwrap();
        store.commit(&[change(&key, 1, &[("n", Some("1"))]), change(mine[0], 2, &[("n", Some("2"))])]).unwrap();
        store
            .write(&Batch {
                log: vec![LogOp::PutState { group: flock, key: "applied", value: b"second".to_vec() }],
                ..Batch::default()
            })
            .unwrap();

        assert_eq!(view.state("applied").unwrap().as_deref(), Some(&b"first"[..]));
        let all = view.buckets(b"", None, usize::MAX, usize::MAX).unwrap();
        let seen: Vec<&Vec<u8>> = all.iter().map(|(k, _)| k).collect();
        assert_eq!(seen, mine, "every bucket of the flock, in key order, none added since");
        assert_eq!(all[0].1.version, 1, "as it was when the view was taken");
        // Pages: by count, after a key, by bytes (at least one), by prefix.
        let first = view.buckets(b"", None, 2, usize::MAX).unwrap();
        assert_eq!(first.len(), 2);
        let next = view.buckets(b"", Some(&first[1].0), 2, usize::MAX).unwrap();
        assert_eq!(next[0].0, *mine[2]);
        assert_eq!(view.buckets(b"", None, 10, 1).unwrap().len(), 1);
        let prefix = &mine[1][..mine[1].len() - 1];
        let with_prefix = view.buckets(prefix, None, usize::MAX, usize::MAX).unwrap();
        assert!(!with_prefix.is_empty() && with_prefix.iter().all(|(k, _)| k.starts_with(prefix)));
        assert_eq!(store.flock_view(flock).unwrap().state("applied").unwrap().as_deref(), Some(&b"second"[..]));
    }

    pub(crate) fn items_versions_and_listing_follow_commits(store: &dyn Store) {
        assert_eq!(store.load_bucket(b"a").unwrap(), BucketData::default());
        store
            .commit(&[
                change(b"a", 1, &[("x", Some("1")), ("y/1", Some("2")), ("y/2", Some("3"))]),
                change(b"ab", 1, &[("x", Some("other bucket"))]),
            ])
            .unwrap();
        store.commit(&[change(b"a", 2, &[("x", None), ("y/3", Some("4"))])]).unwrap();

        let mut model = BTreeMap::new();
        model.insert("y/1".to_string(), b"2".to_vec());
        model.insert("y/2".to_string(), b"3".to_vec());
        model.insert("y/3".to_string(), b"4".to_vec());
        assert_eq!(store.load_bucket(b"a").unwrap(), BucketData::new(2, model));
        assert_eq!(store.bucket_version(b"a").unwrap(), 2);
        assert_eq!(store.bucket_version(b"ab").unwrap(), 1);
        assert_eq!(store.get_item(b"a", "x").unwrap(), None);
        assert_eq!(store.get_item(b"ab", "x").unwrap().as_deref(), Some(&b"other bucket"[..]));
        assert_eq!(store.list_items(b"a", "y/", None, 10).unwrap(), ["y/1", "y/2", "y/3"]);
        assert_eq!(store.list_items(b"a", "y/", Some("y/1"), 1).unwrap(), ["y/2"]);
        assert_eq!(store.list_items(b"a", "z", None, 10).unwrap(), Vec::<String>::new());
        assert_eq!(store.list_items(b"a", "", None, 10).unwrap(), ["y/1", "y/2", "y/3"]);
        assert_eq!(store.list_items(b"a", "", None, 2).unwrap(), ["y/1", "y/2"]);
        assert_eq!(store.get_item(b"a", "").unwrap(), None, "no item has the empty key");

        // Both buckets, a page at a time, in (flock, key) order.
        assert_eq!(store.bucket_count().unwrap(), 2);
        let flock = |b: &[u8]| crate::data::flock_of(b, store.meta().flock_count);
        let mut all = vec![(flock(b"a"), b"a".to_vec()), (flock(b"ab"), b"ab".to_vec())];
        all.sort();
        assert_eq!(store.bucket_keys(None, 10).unwrap(), all);
        assert_eq!(store.bucket_keys(None, 1).unwrap(), all[..1]);
        let (f, key) = &all[0];
        assert_eq!(store.bucket_keys(Some((*f, key)), 10).unwrap(), all[1..]);
        let (f, key) = &all[1];
        assert_eq!(store.bucket_keys(Some((*f, key)), 10).unwrap(), Vec::new());
    }

    pub(crate) fn logs_append_truncate_purge_and_flocks_clear(store: &dyn Store) {
        let entries = |r: std::ops::Range<u64>| r.map(|i| (i, vec![i as u8])).collect::<Vec<_>>();
        let log = vec![
            LogOp::Append { group: 3, entries: logged(entries(1..6)) },
            LogOp::Append { group: META_GROUP, entries: logged(entries(1..3)) },
            LogOp::PutLogState { group: 3, key: "vote", value: b"v1".to_vec() },
            LogOp::PutState { group: 3, key: "applied", value: b"a1".to_vec() },
        ];
        store
            .write(&Batch { log, changes: vec![change(b"a", 1, &[("x", Some("1"))]).into()], sync: SyncTo::Log })
            .unwrap();
        assert_eq!(store.log_entries(3, 2, 4, LogRead::count(10)).unwrap(), entries(2..4));
        assert_eq!(store.log_entries(3, 0, u64::MAX, LogRead::count(2)).unwrap(), entries(1..3));
        // A byte limit stops before the entry that would pass it, but always returns one.
        assert_eq!(store.log_entries(3, 2, u64::MAX, LogRead::within(10, 3)).unwrap(), entries(2..5));
        assert_eq!(store.log_entries(3, 2, u64::MAX, LogRead::within(10, 0)).unwrap(), entries(2..3));
        assert_eq!(store.log_last(META_GROUP).unwrap(), Some((2, vec![2])));
        assert_eq!(store.log_state(3, "vote").unwrap().as_deref(), Some(&b"v1"[..]));
        assert_eq!(store.log_state(3, "applied").unwrap().as_deref(), Some(&b"a1"[..]));
        assert_eq!(store.log_state(4, "vote").unwrap(), None);
        let log = vec![LogOp::TruncateFrom { group: 3, from: 4 }, LogOp::PurgeUpto { group: 3, upto: 1 }];
        store.write(&Batch { log, changes: vec![], sync: SyncTo::Log }).unwrap();
        assert_eq!(store.log_entries(3, 0, u64::MAX, LogRead::count(10)).unwrap(), entries(2..4));
        assert_eq!(store.log_last(3).unwrap(), Some((3, vec![3])));
        assert_eq!(store.log_last(7).unwrap(), None);

        let flock = crate::data::flock_of(b"a", store.meta().flock_count);
        // Two more buckets of that flock: one emptied (it keeps its version), one with items.
        let same_flock: Vec<Vec<u8>> = (0..)
            .map(|i| format!("b{i}").into_bytes())
            .filter(|b| crate::data::flock_of(b, store.meta().flock_count) == flock)
            .take(2)
            .collect();
        store.commit(&[change(&same_flock[0], 1, &[("k", Some("v"))])]).unwrap();
        store
            .commit(&[change(&same_flock[0], 2, &[("k", None)]), change(&same_flock[1], 5, &[("k", Some("w"))])])
            .unwrap();
        let buckets = store.flock_buckets(flock).unwrap();
        let found: Vec<(&[u8], u64, usize)> =
            buckets.iter().map(|(b, data)| (b.as_slice(), data.version, data.len())).collect();
        let mut expected = vec![(&b"a"[..], 1, 1), (&same_flock[0][..], 2, 0), (&same_flock[1][..], 5, 1)];
        expected.sort();
        assert_eq!(found, expected, "every bucket of the flock, in key order");
        store.write(&Batch { log: vec![LogOp::ClearFlock { flock }], changes: vec![], sync: SyncTo::All }).unwrap();
        assert_eq!(store.flock_buckets(flock).unwrap(), vec![]);
        assert_eq!(store.bucket_version(b"a").unwrap(), 0);
        assert_eq!(store.get_item(b"a", "x").unwrap(), None);
    }

    pub(crate) fn flocks_install_whole_from_a_stream_or_not_at_all(store: &dyn Store) {
        let flocks = store.meta().flock_count;
        let flock = crate::data::flock_of(b"a", flocks);
        let of_flock =
            |f: u32| (0..).map(|i| format!("b{i}").into_bytes()).filter(move |b| crate::data::flock_of(b, flocks) == f);
        let mine: Vec<Vec<u8>> = of_flock(flock).take(2).collect();
        let other_flock = (flock + 1) % flocks;
        let other = of_flock(other_flock).next().unwrap();
        store
            .commit(&[
                change(b"a", 1, &[("x", Some("1"))]),
                change(&mine[0], 3, &[("k", Some("v")), ("l", Some("w"))]),
                change(&other, 2, &[("k", Some("o"))]),
            ])
            .unwrap();
        let stream = |changes: Vec<Result<ChangeSet, String>>| BucketStream::new(Box::new(changes.into_iter()));
        let install =
            |buckets| Batch { log: vec![LogOp::InstallFlock { flock, buckets }], changes: vec![], sync: SyncTo::All };

        // A stream that fails part way changes nothing.
        let damaged = stream(vec![Ok(change(&mine[1], 9, &[("n", Some("new"))])), Err("cut short".into())]);
        let refused = store.write(&install(damaged.clone())).unwrap_err();
        assert!(refused.to_string().contains("cut short"), "{refused}");
        assert!(damaged.take().is_err(), "a stream is read once");
        assert_eq!(store.bucket_version(&mine[1]).unwrap(), 0);
        assert_eq!(store.get_item(&mine[0], "l").unwrap().as_deref(), Some(&b"w"[..]));
        assert_eq!(store.get_item(b"a", "x").unwrap().as_deref(), Some(&b"1"[..]));

        // A whole one replaces the flock's buckets with its own, and no other flock's.
        let whole =
            stream(vec![Ok(change(&mine[0], 7, &[("k", Some("v7"))])), Ok(change(&mine[1], 9, &[("n", Some("new"))]))]);
        store.write(&install(whole)).unwrap();
        let found: Vec<(Vec<u8>, u64, Vec<String>)> = store
            .flock_buckets(flock)
            .unwrap()
            .into_iter()
            .map(|(b, data)| (b, data.version, data.into_items().into_keys().collect()))
            .collect();
        let mut expected =
            vec![(mine[0].clone(), 7, vec!["k".to_string()]), (mine[1].clone(), 9, vec!["n".to_string()])];
        expected.sort();
        assert_eq!(found, expected);
        assert_eq!(store.get_item(&mine[0], "k").unwrap().as_deref(), Some(&b"v7"[..]));
        assert_eq!(store.bucket_version(b"a").unwrap(), 0, "a bucket the snapshot lacks is gone");
        assert_eq!(store.get_item(&other, "k").unwrap().as_deref(), Some(&b"o"[..]), "another flock is untouched");
    }

    pub(crate) fn modules_are_found_by_name_and_id(store: &dyn Store) {
        let id = [7u8; 32];
        store.put_module(&id, "counter", b"\0asm").unwrap();
        assert_eq!(store.module_names().unwrap(), vec![("counter".to_string(), id)]);
        assert_eq!(store.module_bytes(&id).unwrap().as_deref(), Some(&b"\0asm"[..]));
        assert_eq!(store.module_size(&id).unwrap(), Some(4));
        assert_eq!(store.module_size(&[0; 32]).unwrap(), None);
        let other = [8u8; 32];
        store.put_module(&other, "counter", b"\0asm2").unwrap();
        assert_eq!(store.module_names().unwrap(), vec![("counter".to_string(), other)]);
        assert_eq!(store.module_bytes(&id).unwrap(), None, "no name points to the old module: it went");
        // A module two names point to stays until both are gone.
        store.put_module(&other, "tally", b"\0asm2").unwrap();
        let delete = |name: &str| Batch { log: vec![LogOp::DeleteModule { name: name.into() }], ..Batch::default() };
        store.write(&delete("counter")).unwrap();
        assert_eq!(store.module_names().unwrap(), vec![("tally".to_string(), other)]);
        assert!(store.module_bytes(&other).unwrap().is_some());
        store.write(&delete("tally")).unwrap();
        store.write(&delete("never-there")).unwrap();
        assert_eq!((store.module_names().unwrap(), store.module_bytes(&other).unwrap()), (vec![], None));
    }
}
