//! Data directories of older schemas (3 to 5), read as raw values and rewritten into the
//! current form in one crash-safe step. What the values mean, and what they become, is the
//! cluster's business (`cluster::migrate`); this module only knows where older schemas kept them.
//!
//! Schemas 3 to 5 kept the same tables: items, bucket versions and modules as today, every
//! group's state-machine values in `raft_state` in the state file, and the replicated logs in a
//! second redb file beside it (`<stem>-log.redb`): every group's entries in one `raft_log` table
//! (each value starts with the group, u32 BE, and the index, u64 BE) and the log's own values in
//! `log_state`. Schema 6 moved the logs to append-only segments (`<stem>-log/`).
//!
//! A rewrite writes the new log first, synced, into a directory no current store has opened
//! (removed first if an earlier, interrupted rewrite left one), then, in one redb transaction of
//! the state file, the new state-machine values, re-keyed bucket versions if asked, and the new
//! schema number; only then is the old log file deleted. A crash before the transaction commits
//! leaves the old schema, and the next start rewrites again from the start; after it, the
//! directory is current, and a leftover old log file is deleted on open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::redb_store::{
    BUCKETS, FLOCKS_KEY, META, NODE_ID_KEY, RAFT_STATE, SCHEMA_KEY, SCHEMA_READ_AS_IS, engine, log_path, read_u32,
};
use super::segment_log::{SEGMENT_BYTES, SegmentLog};
use super::{GroupId, LogOp, NodeMeta, SCHEMA_VERSION};
use crate::error::StoreError;

/// The oldest schema a data directory can be migrated from.
pub const OLDEST_MIGRATED_SCHEMA: u32 = 3;

/// The old log file's name is the state file's stem and this.
const OLD_LOG_FILE_SUFFIX: &str = "-log.redb";
const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const LOG_STATE: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("log_state");
/// Bytes before the entry in a `raft_log` value.
const LOG_HEADER: usize = 12;

/// A data directory of an older schema, open for migration.
pub struct LegacyStore {
    path: PathBuf,
    db: Box<dyn ReadableDatabase>,
    log: Option<Box<dyn ReadableDatabase>>,
    schema: u32,
    meta: NodeMeta,
}

/// A group's named value in an older directory: the log's own, or the state machine's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ValueKind {
    /// Kept with the log (`log_state`): vote, purge point, hard state, base.
    Log,
    /// Kept with the state (`raft_state`): applied point, meta state.
    State,
}

/// Names, for each bucket key, the flock it is filed under.
pub type Refile = Box<dyn Fn(&[u8]) -> u32>;
/// Every named value of every group: (group, whose, name) → bytes.
pub type LegacyValues = BTreeMap<(GroupId, ValueKind, String), Vec<u8>>;
/// Log entries by group: (index, entry) in index order.
pub type LegacyEntries = BTreeMap<GroupId, Vec<(u64, Vec<u8>)>>;

/// What a migrated directory holds instead of its old logs and state-machine values.
pub struct Rewrite {
    /// The new log: appends and the log's named values.
    pub log: Vec<LogOp>,
    /// Every state-machine value of the new directory (the old ones all go).
    pub state: Vec<(GroupId, &'static str, Vec<u8>)>,
    /// Re-files every bucket under the flock this function names (flocks were cut another way).
    pub refile: Option<Refile>,
}

/// Where the old log file of the state file at `path` is.
fn old_log_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("grex");
    path.with_file_name(format!("{stem}{OLD_LOG_FILE_SUFFIX}"))
}

/// Deletes the old log file a finished migration left beside a current state file at `path`.
pub(super) fn remove_leftover(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(old_log_path(path)) {
        Ok(()) => {
            tracing::info!(path = %old_log_path(path).display(), "deleted the log file of the schema before");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Engine(format!("cannot delete {}: {e}", old_log_path(path).display()))),
    }
}

/// Opens a redb file to read, without changing it, unless it must be repaired first (a process
/// that wrote it was killed).
fn open_to_read(path: &Path) -> Result<Box<dyn ReadableDatabase>, StoreError> {
    match Database::builder().open_read_only(path) {
        Ok(db) => Ok(Box::new(db)),
        Err(_) => Ok(Box::new(Database::create(path).map_err(engine)?)),
    }
}

impl LegacyStore {
    /// Opens the state file at `path` if it holds a schema older than this binary's that needs a
    /// rewrite; `None` if there is no such file or its schema needs none (this binary's, a newer
    /// one, or the one `RedbStore` opens as it is and only renumbers). A schema too old to migrate is an error
    /// that says so.
    pub fn open(path: &Path) -> Result<Option<LegacyStore>, StoreError> {
        if !path.exists() {
            return Ok(None);
        }
        let db = open_to_read(path)?;
        let (schema, meta) = {
            let txn = db.begin_read().map_err(engine)?;
            let Ok(table) = txn.open_table(META) else { return Ok(None) };
            let Some(schema) = table.get(SCHEMA_KEY).map_err(engine)?.map(|v| read_u32(v.value())).transpose()? else {
                return Ok(None);
            };
            if schema >= SCHEMA_READ_AS_IS {
                return Ok(None);
            }
            if schema < OLDEST_MIGRATED_SCHEMA {
                return Err(StoreError::Schema {
                    found: schema,
                    expected: SCHEMA_VERSION,
                    hint: "this data directory is older than any this version migrates (3): serve it with the grex \
                           version that wrote it, or start this one on a new --data directory",
                });
            }
            let node_id = table.get(NODE_ID_KEY).map_err(engine)?.map(|v| hex::encode(v.value()));
            let flocks = table.get(FLOCKS_KEY).map_err(engine)?.map(|v| read_u32(v.value())).transpose()?;
            match (node_id, flocks) {
                (Some(node_id), Some(flock_count)) => (schema, NodeMeta { node_id, flock_count }),
                _ => return Err(StoreError::Corrupt("node metadata is missing".into())),
            }
        };
        let log_file = old_log_path(path);
        let log = if log_file.exists() { Some(open_to_read(&log_file)?) } else { None };
        Ok(Some(LegacyStore { path: path.to_path_buf(), db, log, schema, meta }))
    }

    /// The directory's schema.
    pub fn schema(&self) -> u32 {
        self.schema
    }

    /// The node's identity.
    pub fn node_meta(&self) -> &NodeMeta {
        &self.meta
    }

    /// Every named value of every group, the log's and the state machine's.
    pub fn values(&self) -> Result<LegacyValues, StoreError> {
        let mut values = BTreeMap::new();
        let mut read =
            |db: &dyn ReadableDatabase, table: TableDefinition<(u32, &str), &[u8]>, kind| -> Result<(), StoreError> {
                let txn = db.begin_read().map_err(engine)?;
                let table = match txn.open_table(table) {
                    Ok(table) => table,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                    Err(e) => return Err(engine(e)),
                };
                for row in table.iter().map_err(engine)? {
                    let (key, value) = row.map_err(engine)?;
                    let (group, name) = key.value();
                    values.insert((group, kind, name.to_string()), value.value().to_vec());
                }
                Ok(())
            };
        read(self.db.as_ref(), RAFT_STATE, ValueKind::State)?;
        if let Some(log) = &self.log {
            read(log.as_ref(), LOG_STATE, ValueKind::Log)?;
        }
        Ok(values)
    }

    /// Every log entry of every group with an index above `after[group]` (or every entry of a
    /// group `after` does not name), in index order.
    pub fn entries_after(&self, after: &BTreeMap<GroupId, u64>) -> Result<LegacyEntries, StoreError> {
        let mut entries: BTreeMap<GroupId, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
        let Some(log) = &self.log else { return Ok(BTreeMap::new()) };
        let txn = log.begin_read().map_err(engine)?;
        let table = match txn.open_table(RAFT_LOG) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(engine(e)),
        };
        for row in table.iter().map_err(engine)? {
            let (_, value) = row.map_err(engine)?;
            let value = value.value();
            let (Some(group), Some(index), Some(entry)) =
                (value.get(..4), value.get(4..LOG_HEADER), value.get(LOG_HEADER..))
            else {
                return Err(StoreError::Corrupt(format!("a log row of {} bytes has no header", value.len())));
            };
            let group = u32::from_be_bytes(group.try_into().expect("4 bytes"));
            let index = u64::from_be_bytes(index.try_into().expect("8 bytes"));
            if after.get(&group).is_none_or(|&after| index > after) {
                entries.entry(group).or_default().insert(index, entry.to_vec());
            }
        }
        Ok(entries.into_iter().map(|(group, entries)| (group, entries.into_iter().collect())).collect())
    }

    /// Rewrites the directory into the current schema, as the module docs describe.
    pub fn rewrite(self, rewrite: Rewrite) -> Result<(), StoreError> {
        let LegacyStore { path, db, log, .. } = self;
        drop((db, log));
        let log_dir = log_path(&path);
        if log_dir.exists() {
            std::fs::remove_dir_all(&log_dir).map_err(|e| {
                StoreError::Engine(format!("cannot remove {} left by an interrupted migration: {e}", log_dir.display()))
            })?;
        }
        let segments = SegmentLog::open(&log_dir, true, SEGMENT_BYTES)?;
        let ops: Vec<&LogOp> = rewrite.log.iter().collect();
        segments.write(&ops, true)?;
        drop(segments);

        let db = Database::create(&path).map_err(engine)?;
        let mut txn = db.begin_write().map_err(engine)?;
        txn.set_durability(Durability::Immediate).map_err(|e| StoreError::Engine(e.to_string()))?;
        {
            txn.delete_table(RAFT_STATE).map_err(engine)?;
            let mut state = txn.open_table(RAFT_STATE).map_err(engine)?;
            for (group, key, value) in &rewrite.state {
                state.insert((*group, *key), value.as_slice()).map_err(engine)?;
            }
            if let Some(flock_of) = &rewrite.refile {
                let mut buckets = txn.open_table(BUCKETS).map_err(engine)?;
                let mut all = Vec::new();
                for row in buckets.iter().map_err(engine)? {
                    let (key, version) = row.map_err(engine)?;
                    all.push((key.value().1.to_vec(), version.value()));
                }
                buckets.retain(|_, _| false).map_err(engine)?;
                for (bucket, version) in all {
                    buckets.insert((flock_of(&bucket), bucket.as_slice()), version).map_err(engine)?;
                }
            }
            txn.open_table(META)
                .map_err(engine)?
                .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes()[..])
                .map_err(engine)?;
        }
        txn.commit().map_err(engine)?;
        drop(db);
        remove_leftover(&path)
    }
}

/// Writes a data directory as schemas 3 to 5 kept it, for tests of the migration.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::storage::redb_store::ITEMS;

    /// A bucket: the flock it is filed under, its key, version and items.
    pub type OldBucket = (u32, Vec<u8>, u64, Vec<(String, Vec<u8>)>);

    /// What an older directory holds.
    #[derive(Default)]
    pub struct OldDirectory {
        /// Its schema.
        pub schema: u32,
        /// Node id (8 bytes).
        pub node_id: [u8; 8],
        /// Flocks.
        pub flocks: u32,
        /// `raft_state` rows.
        pub state: Vec<(GroupId, &'static str, Vec<u8>)>,
        /// `log_state` rows.
        pub log_state: Vec<(GroupId, &'static str, Vec<u8>)>,
        /// Log entries: (group, index, entry).
        pub entries: Vec<(GroupId, u64, Vec<u8>)>,
        /// Buckets: (flock filed under, key, version, items).
        pub buckets: Vec<OldBucket>,
    }

    impl OldDirectory {
        /// Writes it with the state file at `path`.
        pub fn write(&self, path: &Path) {
            let db = Database::create(path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert(SCHEMA_KEY, &self.schema.to_be_bytes()[..]).unwrap();
                meta.insert(NODE_ID_KEY, &self.node_id[..]).unwrap();
                meta.insert(FLOCKS_KEY, &self.flocks.to_be_bytes()[..]).unwrap();
                let mut state = txn.open_table(RAFT_STATE).unwrap();
                for (group, key, value) in &self.state {
                    state.insert((*group, *key), value.as_slice()).unwrap();
                }
                let mut buckets = txn.open_table(BUCKETS).unwrap();
                let mut items = txn.open_table(ITEMS).unwrap();
                for (flock, key, version, values) in &self.buckets {
                    buckets.insert((*flock, key.as_slice()), *version).unwrap();
                    for (item, value) in values {
                        items.insert((key.as_slice(), item.as_str()), value.as_slice()).unwrap();
                    }
                }
            }
            txn.commit().unwrap();
            let log = Database::create(old_log_path(path)).unwrap();
            let txn = log.begin_write().unwrap();
            {
                let mut state = txn.open_table(LOG_STATE).unwrap();
                for (group, key, value) in &self.log_state {
                    state.insert((*group, *key), value.as_slice()).unwrap();
                }
                let mut entries = txn.open_table(RAFT_LOG).unwrap();
                for (seq, (group, index, entry)) in self.entries.iter().enumerate() {
                    let mut row = group.to_be_bytes().to_vec();
                    row.extend_from_slice(&index.to_be_bytes());
                    row.extend_from_slice(entry);
                    entries.insert(seq as u64, row.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
    }
}
