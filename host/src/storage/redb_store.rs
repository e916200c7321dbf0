//! The redb implementation of [`Store`]: the state in one redb file (`grex.redb`), and the
//! cluster's replicated logs beside it in append-only segments (`grex-log/`, [`SegmentLog`]), so
//! that syncing an append writes only the appended bytes, and the state's pages reach the disk at
//! checkpoints (see the module docs of `storage`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::packed::{self, PACKED_BYTES_MAX, PACKED_KEY};
use super::segment_log::{SEGMENT_BYTES, SegmentLog};
use super::{Batch, FlockView, GroupId, LogOp, LogRead, ModuleId, NodeMeta, Store, SyncTo};
use crate::data::{BucketData, ChangeView, flock_of};
use crate::error::StoreError;

/// The schema this binary reads and writes. Bump it with any change to the tables below.
pub const SCHEMA_VERSION: u32 = 7;

/// The schema this one extends without changing anything it wrote: schema 7 packs small buckets
/// into one row (`packed`), and a schema-6 directory is a schema-7 one whose buckets are all
/// spread, so opening it only bumps the number.
pub(super) const SCHEMA_READ_AS_IS: u32 = 6;

/// The state file's page cache unless set (redb's own default is 1 GiB).
const CACHE_BYTES_DEFAULT: usize = 64 << 20;

/// The log directory's name is the state file's stem and this.
const LOG_DIR_SUFFIX: &str = "-log";

pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// (bucket, item) → value, or (bucket, `""`) → every item of a packed bucket (`packed`).
pub(super) const ITEMS: TableDefinition<(&[u8], &str), &[u8]> = TableDefinition::new("items");
/// (flock, bucket) → version, with [`packed::PACKED_FLAG`] if its items are in a packed row: a
/// flock's buckets sit together, for snapshots.
pub(super) const BUCKETS: TableDefinition<(u32, &[u8]), u64> = TableDefinition::new("buckets");
const MODULES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("modules");
const MODULE_NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("module_names");
/// In the state file: each group's state machine values (applied point, meta state).
pub(super) const RAFT_STATE: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("raft_state");

pub(super) const SCHEMA_KEY: &str = "schema_version";
pub(super) const NODE_ID_KEY: &str = "node_id";
pub(super) const FLOCKS_KEY: &str = "flock_count";

pub(super) fn engine(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Engine(e.into().to_string())
}

/// A node's data: the state in a redb file, the replicated logs in segments beside it.
pub struct RedbStore {
    db: Database,
    log: SegmentLog,
    meta: NodeMeta,
    durability: Durability,
    /// State written by [`Store::stage`] and not yet committed.
    staged: Mutex<Option<redb::WriteTransaction>>,
}

/// Where the log of the state file at `path` is.
pub(super) fn log_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("grex");
    path.with_file_name(format!("{stem}{LOG_DIR_SUFFIX}"))
}

impl RedbStore {
    /// Opens the state file `path` and its log file beside it, creating them with `flock_count`
    /// flocks and a new node id if they do not exist. With `durable`, commits are fsync'd as
    /// their batch says.
    pub fn open(path: &Path, flock_count: u32, durable: bool) -> Result<Self, StoreError> {
        Self::open_with(path, flock_count, durable, CACHE_BYTES_DEFAULT, SEGMENT_BYTES)
    }

    /// [`RedbStore::open`] with a page cache of `cache_bytes` for the state file (redb's, for
    /// reads and unsynced writes together).
    pub fn open_with_cache(
        path: &Path,
        flock_count: u32,
        durable: bool,
        cache_bytes: usize,
    ) -> Result<Self, StoreError> {
        Self::open_with(path, flock_count, durable, cache_bytes, SEGMENT_BYTES)
    }

    /// [`RedbStore::open_with_cache`] with log segments of at most `segment_bytes` (small in tests).
    fn open_with(
        path: &Path,
        flock_count: u32,
        durable: bool,
        cache_bytes: usize,
        segment_bytes: u64,
    ) -> Result<Self, StoreError> {
        let log_path = log_path(path);
        let fresh = !path.exists();
        // A new node creates its log first: a crash before the state file exists leaves an empty
        // log, which the next start takes up; a log that holds anything is not taken up.
        let log = if fresh { Some(SegmentLog::open(&log_path, durable, segment_bytes)?) } else { None };
        if log.as_ref().is_some_and(|log| !log.is_empty()) {
            return Err(StoreError::Corrupt(format!(
                "{} is missing beside {}, which holds a log; restore it from the same backup, or start this node from \
                 an empty data directory",
                path.display(),
                log_path.display()
            )));
        }
        let db = Database::builder().set_cache_size(cache_bytes).create(path).map_err(engine)?;
        // The schema check first: an older directory has no log directory, and that is not the news.
        let meta = init_meta(&db, flock_count)?;
        if !fresh && !log_path.exists() {
            return Err(StoreError::Corrupt(format!(
                "{} is missing beside {}; restore it from the same backup, or start this node from an empty data directory",
                log_path.display(),
                path.display()
            )));
        }
        let log = match log {
            Some(log) => log,
            None => SegmentLog::open(&log_path, durable, segment_bytes)?,
        };
        super::legacy::remove_leftover(path)?;
        let durability = if durable { Durability::Immediate } else { Durability::None };
        Ok(RedbStore { db, log, meta, durability, staged: Mutex::new(None) })
    }

    /// A write transaction on `db` that syncs on commit if `sync` (and the store is durable).
    fn begin_write(&self, db: &Database, sync: bool) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = db.begin_write().map_err(engine)?;
        self.sync_on_commit(&mut txn, sync)?;
        Ok(txn)
    }

    /// Makes `txn` sync on commit if `sync` (and the store is durable), else not.
    fn sync_on_commit(&self, txn: &mut redb::WriteTransaction, sync: bool) -> Result<(), StoreError> {
        let durability = if sync { self.durability } else { Durability::None };
        txn.set_durability(durability).map_err(|e| StoreError::Engine(e.to_string()))
    }

    /// The staged transaction, or a new one.
    fn open_staged(&self) -> Result<std::sync::MutexGuard<'_, Option<redb::WriteTransaction>>, StoreError> {
        let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        if staged.is_none() {
            *staged = Some(self.begin_write(&self.db, false)?);
        }
        Ok(staged)
    }

    /// Commits the state's part of a batch, after anything staged (synced only for a checkpoint).
    fn write_state(&self, ops: &[&LogOp], batch: &Batch) -> Result<(), StoreError> {
        let mut txn = self.open_staged()?.take().expect("opened above");
        self.sync_on_commit(&mut txn, batch.sync == SyncTo::All)?;
        write_state(&txn, ops, batch)?;
        txn.commit().map_err(engine)
    }
}

/// Writes the state's part of a batch into `txn`.
fn write_state(txn: &redb::WriteTransaction, ops: &[&LogOp], batch: &Batch) -> Result<(), StoreError> {
    {
        let mut items = txn.open_table(ITEMS).map_err(engine)?;
        let mut buckets = txn.open_table(BUCKETS).map_err(engine)?;
        let mut state = txn.open_table(RAFT_STATE).map_err(engine)?;
        for op in ops {
            match op {
                LogOp::PutState { group, key, value } => {
                    state.insert((*group, *key), value.as_slice()).map_err(engine)?;
                }
                LogOp::ForgetGroup { group } => {
                    let mut keys = Vec::new();
                    for entry in state.range((*group, "")..).map_err(engine)? {
                        let (key, _) = entry.map_err(engine)?;
                        let (g, name) = key.value();
                        if g != *group {
                            break;
                        }
                        keys.push(name.to_owned());
                    }
                    for name in &keys {
                        state.remove((*group, name.as_str())).map_err(engine)?;
                    }
                }
                LogOp::ClearFlock { flock } => clear_flock(&mut items, &mut buckets, *flock)?,
                LogOp::InstallFlock { flock, buckets: installed } => {
                    clear_flock(&mut items, &mut buckets, *flock)?;
                    installed.for_each(|change| apply_change(&mut items, &mut buckets, &change.view()))?;
                }
                LogOp::PutModule { id, name, wasm } => put_module(txn, id, name, wasm)?,
                LogOp::DeleteModule { name } => {
                    let old = {
                        let mut names = txn.open_table(MODULE_NAMES).map_err(engine)?;
                        let old = names.remove(name.as_str()).map_err(engine)?;
                        old.map(|id| module_id(id.value())).transpose()?
                    };
                    if let Some(old) = old {
                        collect_module(txn, &old)?;
                    }
                }
                _ => unreachable!("log operations are written to the log"),
            }
        }
        for change in &batch.changes {
            apply_change(&mut items, &mut buckets, &change.view())?;
        }
    }
    Ok(())
}

/// Deletes every bucket of `flock`, a page of keys at a time.
fn clear_flock(items: &mut ItemsTable<'_>, buckets: &mut BucketsTable<'_>, flock: u32) -> Result<(), StoreError> {
    const PAGE: usize = 1024;
    loop {
        let mut gone = Vec::with_capacity(PAGE);
        for entry in buckets.range((flock, &[][..])..).map_err(engine)?.take(PAGE) {
            let (key, _) = entry.map_err(engine)?;
            let (f, bucket) = key.value();
            if f != flock {
                break;
            }
            gone.push(bucket.to_vec());
        }
        if gone.is_empty() {
            return Ok(());
        }
        for bucket in &gone {
            buckets.remove((flock, bucket.as_slice())).map_err(engine)?;
            remove_rows(items, bucket)?;
        }
    }
}

fn init_meta(db: &Database, flock_count: u32) -> Result<NodeMeta, StoreError> {
    let txn = db.begin_write().map_err(engine)?;
    let meta = {
        let mut table = txn.open_table(META).map_err(engine)?;
        let schema = table.get(SCHEMA_KEY).map_err(engine)?.map(|v| read_u32(v.value()));
        match schema {
            None => {
                let node_id: [u8; 8] = rand::random();
                table.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes()[..]).map_err(engine)?;
                table.insert(NODE_ID_KEY, &node_id[..]).map_err(engine)?;
                table.insert(FLOCKS_KEY, &flock_count.to_be_bytes()[..]).map_err(engine)?;
                NodeMeta { node_id: hex::encode(node_id), flock_count }
            }
            Some(found) => {
                let found = found?;
                if found == SCHEMA_READ_AS_IS {
                    table.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes()[..]).map_err(engine)?;
                } else if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        found,
                        expected: SCHEMA_VERSION,
                        hint: if found > SCHEMA_VERSION {
                            "run the newer grex binary that wrote it"
                        } else {
                            "this data directory predates the current format: `grex serve` migrates it on start (from schema 3 on)"
                        },
                    });
                }
                let node_id = table.get(NODE_ID_KEY).map_err(engine)?.map(|v| hex::encode(v.value()));
                let flocks = table.get(FLOCKS_KEY).map_err(engine)?.map(|v| read_u32(v.value()));
                match (node_id, flocks) {
                    (Some(node_id), Some(flocks)) => NodeMeta { node_id, flock_count: flocks? },
                    _ => return Err(StoreError::Corrupt("node metadata is missing".into())),
                }
            }
        }
    };
    // Create every table so read transactions never meet a missing one.
    txn.open_table(ITEMS).map_err(engine)?;
    txn.open_table(BUCKETS).map_err(engine)?;
    txn.open_table(MODULES).map_err(engine)?;
    txn.open_table(MODULE_NAMES).map_err(engine)?;
    txn.open_table(RAFT_STATE).map_err(engine)?;
    txn.commit().map_err(engine)?;
    Ok(meta)
}

type ItemsTable<'txn> = redb::Table<'txn, (&'static [u8], &'static str), &'static [u8]>;

/// Every item of `bucket`, from its packed row or its own rows.
fn read_items(
    table: &impl ReadableTable<(&'static [u8], &'static str), &'static [u8]>,
    bucket: &[u8],
) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    let mut items = BTreeMap::new();
    for entry in table.range((bucket, PACKED_KEY)..).map_err(engine)? {
        let (key, value) = entry.map_err(engine)?;
        let (b, item) = key.value();
        if b != bucket {
            break;
        }
        if item == PACKED_KEY {
            extend_from_row(&mut items, value.value())?;
        } else {
            items.insert(item.to_owned(), value.value().to_vec());
        }
    }
    Ok(items)
}

type BucketsTable<'txn> = redb::Table<'txn, (u32, &'static [u8]), u64>;

/// Every item of the bucket whose `buckets` entry is `entry`: one read if it is packed.
fn read_bucket(
    table: &impl ReadableTable<(&'static [u8], &'static str), &'static [u8]>,
    bucket: &[u8],
    entry: u64,
) -> Result<BucketData, StoreError> {
    if !packed::is_packed(entry) {
        return Ok(BucketData::new(packed::version(entry), read_items(table, bucket)?));
    }
    let mut items = BTreeMap::new();
    if let Some(row) = table.get((bucket, PACKED_KEY)).map_err(engine)? {
        extend_from_row(&mut items, row.value())?;
    }
    Ok(BucketData::new(packed::version(entry), items))
}

/// Adds the items of a packed row to `items`.
fn extend_from_row(items: &mut BTreeMap<String, Vec<u8>>, row: &[u8]) -> Result<(), StoreError> {
    for item in packed::Items::new(row)? {
        let (item, value) = item?;
        items.insert(item.to_owned(), value.to_vec());
    }
    Ok(())
}

/// Writes a change set: its bucket's version, and its items into the bucket's packed row while
/// they fit in one ([`PACKED_BYTES_MAX`]); a bucket that outgrows it is spread, a row per item,
/// for good. Which of the two a bucket is, its entry in `buckets` says (`packed`), so a write
/// to a new or spread bucket reads nothing and one to a packed bucket reads its row.
fn apply_change(
    items: &mut ItemsTable<'_>,
    buckets: &mut BucketsTable<'_>,
    change: &ChangeView<'_>,
) -> Result<(), StoreError> {
    let bucket = change.bucket;
    if packed::is_packed(change.version) {
        return Err(StoreError::Corrupt(format!(
            "a change set to version {}, past any a bucket reaches",
            change.version
        )));
    }
    let key = (change.flock, bucket);
    let (version, flagged) = (change.version, change.version | packed::PACKED_FLAG);
    // Packed unless it was spread; corrected below if it outgrows its row.
    let old = buckets.insert(key, flagged).map_err(engine)?.map(|old| old.value());
    let row = match old {
        Some(old) if !packed::is_packed(old) => {
            buckets.insert(key, version).map_err(engine)?;
            for write in &change.writes {
                let key = (bucket, write.item);
                match write.value {
                    Some(value) => items.insert(key, value).map_err(engine)?,
                    None => items.remove(key).map_err(engine)?,
                };
            }
            return Ok(());
        }
        Some(_) => items.get((bucket, PACKED_KEY)).map_err(engine)?.map(|row| row.value().to_vec()),
        None => None,
    };
    if row.is_none() && change.writes.windows(2).all(|w| w[0].item < w[1].item) {
        // A new bucket's change set, in item-key order as change sets are, is its row as it is.
        let pairs = change.writes.iter().filter_map(|w| w.value.map(|v| (w.item, v)));
        return store_items(items, buckets, key, version, false, pairs);
    }
    let mut merged = match &row {
        Some(row) => packed::decode(row)?,
        None => BTreeMap::new(),
    };
    for write in &change.writes {
        match write.value {
            Some(value) => merged.insert(write.item, value),
            None => merged.remove(write.item),
        };
    }
    store_items(items, buckets, key, version, row.is_some(), merged.iter().map(|(item, value)| (*item, *value)))
}

/// Stores every item of a packed bucket (`pairs`, in key order; it had a row if `had_row`): as
/// its row if they fit in one, as no row if there are none, else spread, a row each, with the
/// bucket's `buckets` entry at `key` set to `version` without the packed flag.
fn store_items<'a>(
    items: &mut ItemsTable<'_>,
    buckets: &mut BucketsTable<'_>,
    key: (u32, &[u8]),
    version: u64,
    had_row: bool,
    pairs: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
) -> Result<(), StoreError> {
    let bucket = key.1;
    if packed::encoded_len(pairs.clone()) <= PACKED_BYTES_MAX {
        if pairs.clone().next().is_some() {
            items.insert((bucket, PACKED_KEY), packed::encode(pairs).as_slice()).map_err(engine)?;
        } else if had_row {
            items.remove((bucket, PACKED_KEY)).map_err(engine)?;
        }
        return Ok(());
    }
    if had_row {
        items.remove((bucket, PACKED_KEY)).map_err(engine)?;
    }
    for (item, value) in pairs {
        items.insert((bucket, item), value).map_err(engine)?;
    }
    buckets.insert(key, version).map_err(engine)?;
    Ok(())
}

/// Removes every row of `bucket`, packed or not.
fn remove_rows(table: &mut ItemsTable<'_>, bucket: &[u8]) -> Result<(), StoreError> {
    let mut keys = Vec::new();
    for entry in table.range((bucket, PACKED_KEY)..).map_err(engine)? {
        let (key, _) = entry.map_err(engine)?;
        let (b, item) = key.value();
        if b != bucket {
            break;
        }
        keys.push(item.to_owned());
    }
    for item in &keys {
        table.remove((bucket, item.as_str())).map_err(engine)?;
    }
    Ok(())
}

/// Up to `limit` of `keys` (in order) that start with `prefix`, from `start_after` (not
/// included) or the prefix on.
fn listed<'k>(
    keys: impl Iterator<Item = Result<std::borrow::Cow<'k, str>, StoreError>>,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let start = match start_after {
        Some(after) if after >= prefix => after,
        _ => prefix,
    };
    let mut found = Vec::new();
    for key in keys {
        let key = key?;
        if *key < *start {
            continue;
        }
        if !key.starts_with(prefix) || found.len() == limit {
            break;
        }
        if Some(&*key) != start_after {
            found.push(key.into_owned());
        }
    }
    Ok(found)
}

/// A flock as a read transaction sees it: redb keeps the pages it reads until it ends, and writers
/// go on beside it.
struct RedbFlockView {
    txn: redb::ReadTransaction,
    flock: u32,
}

impl FlockView for RedbFlockView {
    fn state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let table = self.txn.open_table(RAFT_STATE).map_err(engine)?;
        Ok(table.get((self.flock, key)).map_err(engine)?.map(|v| v.value().to_vec()))
    }

    fn buckets(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(Vec<u8>, BucketData)>, StoreError> {
        use std::ops::Bound;
        let buckets = self.txn.open_table(BUCKETS).map_err(engine)?;
        let items = self.txn.open_table(ITEMS).map_err(engine)?;
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded((self.flock, after)),
            _ => Bound::Included((self.flock, prefix)),
        };
        let (mut found, mut bytes) = (Vec::new(), 0);
        for entry in buckets.range::<(u32, &[u8])>((start, Bound::Unbounded)).map_err(engine)? {
            let (key, version) = entry.map_err(engine)?;
            let (flock, bucket) = key.value();
            if flock != self.flock || !bucket.starts_with(prefix) || found.len() == limit || bytes >= bytes_max {
                break;
            }
            let data = read_bucket(&items, bucket, version.value())?;
            bytes += bucket.len() + data.bytes();
            found.push((bucket.to_vec(), data));
        }
        Ok(found)
    }
}

pub(super) fn read_u32(bytes: &[u8]) -> Result<u32, StoreError> {
    bytes
        .try_into()
        .map(u32::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("expected a 4-byte number, found {} bytes", bytes.len())))
}

fn module_id(bytes: &[u8]) -> Result<ModuleId, StoreError> {
    bytes.try_into().map_err(|_| StoreError::Corrupt(format!("module id of {} bytes", bytes.len())))
}

impl Store for RedbStore {
    fn meta(&self) -> &NodeMeta {
        &self.meta
    }

    fn load_bucket(&self, bucket: &[u8]) -> Result<BucketData, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let key = (flock_of(bucket, self.meta.flock_count), bucket);
        let entry = txn.open_table(BUCKETS).map_err(engine)?.get(key).map_err(engine)?.map(|v| v.value());
        // Every write files its bucket in `buckets` (`apply_change`), as every schema since 3
        // did, so a bucket without an entry has no items: a new bucket's load reads nothing of
        // `items`, not even the leaf it would land in.
        let Some(entry) = entry else {
            return Ok(BucketData::new(0, BTreeMap::new()));
        };
        read_bucket(&txn.open_table(ITEMS).map_err(engine)?, bucket, entry)
    }

    fn get_item(&self, bucket: &[u8], item: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(ITEMS).map_err(engine)?;
        if let Some(row) = table.get((bucket, PACKED_KEY)).map_err(engine)? {
            return Ok(packed::find(row.value(), item)?.map(<[u8]>::to_vec));
        }
        Ok(table.get((bucket, item)).map_err(engine)?.map(|v| v.value().to_vec()))
    }

    fn list_items(
        &self,
        bucket: &[u8],
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(ITEMS).map_err(engine)?;
        if let Some(row) = table.get((bucket, PACKED_KEY)).map_err(engine)? {
            let keys = packed::Items::new(row.value())?.map(|item| item.map(|(key, _)| key.into()));
            return listed(keys, prefix, start_after, limit);
        }
        let start = match start_after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let keys = table.range((bucket, start)..).map_err(engine)?.map_while(|entry| match entry {
            Ok((key, _)) => {
                let (b, item) = key.value();
                (b == bucket).then(|| Ok(item.to_owned().into()))
            }
            Err(e) => Some(Err(engine(e))),
        });
        listed(keys, prefix, start_after, limit)
    }

    fn bucket_version(&self, bucket: &[u8]) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(BUCKETS).map_err(engine)?;
        let entry = table.get((flock_of(bucket, self.meta.flock_count), bucket)).map_err(engine)?;
        Ok(entry.map_or(0, |v| packed::version(v.value())))
    }

    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        let (log_ops, state_ops): (Vec<&LogOp>, Vec<&LogOp>) = batch.log.iter().partition(|op| op.on_log());
        // The state first: a checkpoint is on disk before the log purge that relies on it.
        if !state_ops.is_empty() || !batch.changes.is_empty() || batch.sync == SyncTo::All {
            self.write_state(&state_ops, batch)?;
        }
        if !log_ops.is_empty() {
            self.log.write(&log_ops, batch.sync >= SyncTo::Log)?;
        }
        Ok(())
    }

    fn stage(&self, batch: &Batch) -> Result<(), StoreError> {
        debug_assert!(batch.sync == SyncTo::Nothing && batch.log.iter().all(|op| !op.on_log()), "{batch:?}");
        let state_ops: Vec<&LogOp> = batch.log.iter().collect();
        let mut staged = self.open_staged()?;
        let result = write_state(staged.as_ref().expect("opened above"), &state_ops, batch);
        if result.is_err() {
            // Half written: dropped, as a crash would.
            *staged = None;
        }
        result
    }

    fn commit_staged(&self) -> Result<(), StoreError> {
        let staged = self.staged.lock().unwrap_or_else(|p| p.into_inner()).take();
        staged.map_or(Ok(()), |txn| txn.commit().map_err(engine))
    }

    fn log_entries(
        &self,
        group: GroupId,
        from: u64,
        to: u64,
        limit: LogRead,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.log.entries(group, from, to, limit)
    }

    fn log_last(&self, group: GroupId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.log.last(group)
    }

    fn log_state(&self, group: GroupId, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        // The names of the log's values and the state machine's do not overlap.
        if let Some(value) = self.log.value(group, key) {
            return Ok(Some(value));
        }
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RAFT_STATE).map_err(engine)?;
        Ok(table.get((group, key)).map_err(engine)?.map(|v| v.value().to_vec()))
    }

    fn flock_buckets(&self, flock: u32) -> Result<Vec<(Vec<u8>, BucketData)>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let buckets = txn.open_table(BUCKETS).map_err(engine)?;
        let items = txn.open_table(ITEMS).map_err(engine)?;
        let mut found = Vec::new();
        for entry in buckets.range((flock, &[][..])..).map_err(engine)? {
            let (key, version) = entry.map_err(engine)?;
            let (f, bucket) = key.value();
            if f != flock {
                break;
            }
            found.push((bucket.to_vec(), read_bucket(&items, bucket, version.value())?));
        }
        Ok(found)
    }

    fn flock_view(&self, flock: u32) -> Result<Box<dyn FlockView>, StoreError> {
        Ok(Box::new(RedbFlockView { txn: self.db.begin_read().map_err(engine)?, flock }))
    }

    fn bucket_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let buckets = txn.open_table(BUCKETS).map_err(engine)?;
        buckets.len().map_err(engine)
    }

    fn bucket_keys(&self, after: Option<(u32, &[u8])>, limit: usize) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        use std::ops::Bound;
        let txn = self.db.begin_read().map_err(engine)?;
        let buckets = txn.open_table(BUCKETS).map_err(engine)?;
        let start = match after {
            Some(position) => Bound::Excluded(position),
            None => Bound::Unbounded,
        };
        let mut found = Vec::new();
        for entry in buckets.range::<(u32, &[u8])>((start, Bound::Unbounded)).map_err(engine)?.take(limit) {
            let (key, _) = entry.map_err(engine)?;
            let (flock, bucket) = key.value();
            found.push((flock, bucket.to_vec()));
        }
        Ok(found)
    }

    fn put_module(&self, id: &ModuleId, name: &str, wasm: &[u8]) -> Result<(), StoreError> {
        let txn = self.begin_write(&self.db, true)?;
        put_module(&txn, id, name, wasm)?;
        txn.commit().map_err(engine)
    }

    fn module_bytes(&self, id: &ModuleId) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(MODULES).map_err(engine)?;
        Ok(table.get(&id[..]).map_err(engine)?.map(|v| v.value().to_vec()))
    }

    fn module_size(&self, id: &ModuleId) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(MODULES).map_err(engine)?;
        Ok(table.get(&id[..]).map_err(engine)?.map(|v| v.value().len() as u64))
    }

    fn module_names(&self) -> Result<Vec<(String, ModuleId)>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(MODULE_NAMES).map_err(engine)?;
        let mut names = Vec::new();
        for entry in table.iter().map_err(engine)? {
            let (name, id) = entry.map_err(engine)?;
            names.push((name.value().to_owned(), module_id(id.value())?));
        }
        Ok(names)
    }
}

/// Points `name` at module `id` (storing its bytes); the module it pointed to before goes if no
/// other name points to it.
fn put_module(txn: &redb::WriteTransaction, id: &ModuleId, name: &str, wasm: &[u8]) -> Result<(), StoreError> {
    txn.open_table(MODULES).map_err(engine)?.insert(&id[..], wasm).map_err(engine)?;
    let old = {
        let mut names = txn.open_table(MODULE_NAMES).map_err(engine)?;
        let old = names.insert(name, &id[..]).map_err(engine)?;
        old.map(|old| module_id(old.value())).transpose()?
    };
    match old {
        Some(old) if old != *id => collect_module(txn, &old),
        _ => Ok(()),
    }
}

/// Deletes module `id`'s bytes unless a name still points to it.
fn collect_module(txn: &redb::WriteTransaction, id: &ModuleId) -> Result<(), StoreError> {
    let names = txn.open_table(MODULE_NAMES).map_err(engine)?;
    for entry in names.iter().map_err(engine)? {
        let (_, named) = entry.map_err(engine)?;
        if named.value() == &id[..] {
            return Ok(());
        }
    }
    txn.open_table(MODULES).map_err(engine)?.remove(&id[..]).map_err(engine)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ItemWrite;
    use crate::storage::{META_GROUP, contract};

    fn temp_store() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("grex.redb"), 16, false).unwrap();
        (dir, store)
    }

    #[test]
    fn redb_store_meets_the_store_contract() {
        let (_dir, store) = temp_store();
        contract::items_versions_and_listing_follow_commits(&store);
        let (_dir, store) = temp_store();
        contract::modules_are_found_by_name_and_id(&store);
        contract::flock_views_hold_one_moment(&store);
        let (_dir, store) = temp_store();
        contract::logs_append_truncate_purge_and_flocks_clear(&store);
        let (_dir, store) = temp_store();
        contract::flocks_install_whole_from_a_stream_or_not_at_all(&store);
    }

    #[test]
    fn reopening_keeps_identity_and_flock_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grex.redb");
        let first = RedbStore::open(&path, 64, true).unwrap().meta().clone();
        let again = RedbStore::open(&path, 256, true).unwrap().meta().clone();
        assert_eq!(first, again);
        assert_eq!(again.flock_count, 64);
    }

    #[test]
    fn state_and_log_are_apart_and_a_missing_log_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grex.redb");
        let store = RedbStore::open(&path, 16, true).unwrap();
        let entry = |group: u32, i: u64| (i, format!("{group}/{i}").into_bytes());
        // Two groups' entries interleaved in the one log table, then cut at both ends.
        for i in 1..=6 {
            let log = vec![
                LogOp::Append { group: 3, entries: crate::storage::logged(vec![entry(3, i)]) },
                LogOp::Append { group: META_GROUP, entries: crate::storage::logged(vec![entry(META_GROUP, i)]) },
            ];
            store.write(&Batch { log, changes: Vec::new(), sync: SyncTo::Log }).unwrap();
        }
        let log = vec![
            LogOp::TruncateFrom { group: 3, from: 5 },
            LogOp::PurgeUpto { group: META_GROUP, upto: 2 },
            LogOp::Append { group: 3, entries: vec![(4, b"new 4".to_vec().into())] },
        ];
        store.write(&Batch { log, changes: Vec::new(), sync: SyncTo::Log }).unwrap();
        drop(store);
        assert!(dir.path().join("grex-log").is_dir());
        let store = RedbStore::open(&path, 16, true).unwrap();
        let mut three: Vec<_> = (1..=3).map(|i| entry(3, i)).collect();
        three.push((4, b"new 4".to_vec()));
        assert_eq!(store.log_entries(3, 0, 10, LogRead::count(10)).unwrap(), three);
        assert_eq!(store.log_entries(3, 2, 4, LogRead::count(10)).unwrap(), three[1..3]);
        assert_eq!(store.log_last(3).unwrap(), Some((4, b"new 4".to_vec())));
        let meta: Vec<_> = (3..=6).map(|i| entry(META_GROUP, i)).collect();
        assert_eq!(store.log_entries(META_GROUP, 0, u64::MAX, LogRead::count(2)).unwrap(), meta[..2]);
        assert_eq!(store.log_last(META_GROUP).unwrap(), meta.last().cloned());
        drop(store);
        std::fs::rename(dir.path().join("grex-log"), dir.path().join("kept-log")).unwrap();
        let err = RedbStore::open(&path, 16, true).err().expect("a state file without its log must be refused");
        assert!(err.to_string().contains("grex-log is missing"), "{err}");
        assert!(err.to_string().contains("empty data directory"), "{err}");
        // And a log that holds entries, without its state file.
        std::fs::remove_file(&path).unwrap();
        std::fs::rename(dir.path().join("kept-log"), dir.path().join("grex-log")).unwrap();
        let err = RedbStore::open(&path, 16, true).err().expect("a log without its state file must be refused");
        assert!(err.to_string().contains("grex.redb is missing beside"), "{err}");
        assert!(err.to_string().contains("holds a log"), "{err}");
    }

    #[test]
    fn a_first_start_that_stopped_after_creating_the_log_file_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grex.redb");
        // What a crash right after the log file was created leaves: an empty log, no state file.
        drop(SegmentLog::open(&dir.path().join("grex-log"), true, SEGMENT_BYTES).unwrap());
        let store = RedbStore::open(&path, 16, true).unwrap();
        store.commit(&[]).unwrap();
        assert_eq!(store.meta().flock_count, 16);
    }

    #[test]
    fn a_file_from_another_schema_version_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grex.redb");
        drop(RedbStore::open(&path, 16, false).unwrap());
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(SCHEMA_KEY, &99u32.to_be_bytes()[..]).unwrap();
            txn.commit().unwrap();
        }
        let err = RedbStore::open(&path, 16, false).err().expect("schema 99 must be refused");
        assert!(err.to_string().contains("schema version 99"), "{err}");
        assert!(err.to_string().contains("newer grex"), "{err}");
    }

    #[test]
    fn staged_state_is_read_once_committed_and_lost_in_a_crash_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grex.redb");
        let store = RedbStore::open(&path, 16, true).unwrap();
        let apply = |bucket: &[u8], version: u64| Batch {
            log: vec![LogOp::PutState { group: 3, key: "applied", value: version.to_le_bytes().to_vec() }],
            changes: vec![
                crate::testing::change_set(
                    bucket,
                    16,
                    version,
                    vec![ItemWrite { item: "n".into(), value: Some(vec![1]) }],
                )
                .into(),
            ],
            sync: SyncTo::Nothing,
        };
        let applied = |store: &RedbStore| store.log_state(3, "applied").unwrap();
        // Staged: not read until committed.
        store.stage(&apply(b"a", 1)).unwrap();
        store.stage(&apply(b"b", 1)).unwrap();
        assert_eq!((store.bucket_version(b"a").unwrap(), applied(&store)), (0, None));
        store.commit_staged().unwrap();
        assert_eq!((store.bucket_version(b"a").unwrap(), store.bucket_version(b"b").unwrap()), (1, 1));
        assert_eq!(applied(&store), Some(1u64.to_le_bytes().to_vec()));
        // A log-only write leaves the staged state staged; one that writes state commits it first.
        store.stage(&apply(b"a", 2)).unwrap();
        let append = LogOp::Append { group: 3, entries: vec![(1, b"entry".to_vec().into())] };
        store.write(&Batch { log: vec![append], changes: Vec::new(), sync: SyncTo::Log }).unwrap();
        assert_eq!(store.bucket_version(b"a").unwrap(), 1);
        store.write(&apply(b"c", 1)).unwrap();
        assert_eq!((store.bucket_version(b"a").unwrap(), store.bucket_version(b"c").unwrap()), (2, 1));
        // A checkpoint syncs what was staged before it; what is staged after it is lost in a crash.
        store.stage(&apply(b"b", 2)).unwrap();
        store.write(&Batch { sync: SyncTo::All, ..Batch::default() }).unwrap();
        store.stage(&apply(b"d", 1)).unwrap();
        drop(store);
        let store = RedbStore::open(&path, 16, true).unwrap();
        let versions: Vec<u64> =
            [&b"a"[..], b"b", b"c", b"d"].iter().map(|b| store.bucket_version(b).unwrap()).collect();
        assert_eq!(versions, [2, 2, 1, 0]);
        assert_eq!(store.log_entries(3, 1, 2, LogRead::count(1)).unwrap(), [(1, b"entry".to_vec())]);
    }

    /// The rows of `bucket` in the items table: item keys, `""` for a packed row.
    fn rows(store: &RedbStore, bucket: &[u8]) -> Vec<String> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(ITEMS).unwrap();
        let mut rows = Vec::new();
        for entry in table.range((bucket, PACKED_KEY)..).unwrap() {
            let (key, _) = entry.unwrap();
            let (b, item) = key.value();
            if b != bucket {
                break;
            }
            rows.push(item.to_owned());
        }
        rows
    }

    #[test]
    fn small_buckets_are_one_row_and_large_ones_a_row_per_item() {
        let (_dir, store) = temp_store();
        let write = |version: u64, writes: &[(&str, Option<usize>)]| {
            let writes =
                writes.iter().map(|(item, len)| ItemWrite { item: item.to_string(), value: len.map(|n| vec![7; n]) });
            store.commit(&[crate::testing::change_set(b"b", 16, version, writes.collect())]).unwrap();
        };
        let items = |store: &RedbStore| store.load_bucket(b"b").unwrap().into_items().into_keys().collect::<Vec<_>>();
        // A hundred small items: one packed row.
        let hundred: Vec<String> = (0..100).map(|i| format!("f{i:03}")).collect();
        write(1, &hundred.iter().map(|f| (f.as_str(), Some(70))).collect::<Vec<_>>());
        assert_eq!(rows(&store, b"b"), [""]);
        assert_eq!(items(&store), hundred);
        assert_eq!(store.get_item(b"b", "f042").unwrap(), Some(vec![7; 70]));
        assert_eq!(store.list_items(b"b", "f09", Some("f095"), 2).unwrap(), ["f096", "f097"]);
        // Past the packed row's limit: spread, the packed row gone.
        write(2, &[("big", Some(PACKED_BYTES_MAX))]);
        let spread = rows(&store, b"b");
        assert_eq!(spread.len(), 101, "{spread:?}");
        assert!(!spread.contains(&String::new()));
        assert_eq!(store.get_item(b"b", "big").unwrap().map(|v| v.len()), Some(PACKED_BYTES_MAX));
        // Spread for good: shrinking or emptying it does not pack it again.
        write(3, &[("big", None)]);
        assert_eq!(rows(&store, b"b").len(), 100);
        write(4, &hundred.iter().map(|f| (f.as_str(), None)).collect::<Vec<_>>());
        assert_eq!(rows(&store, b"b"), Vec::<String>::new());
        assert_eq!(store.bucket_version(b"b").unwrap(), 4);
        write(5, &[("count", Some(2))]);
        assert_eq!(rows(&store, b"b"), ["count"]);
        assert_eq!(store.load_bucket(b"b").unwrap().version, 5);
        // A packed bucket that empties keeps no row, and its version.
        let packed_one =
            crate::testing::change_set(b"p", 16, 9, vec![ItemWrite { item: "x".into(), value: Some(vec![1]) }]);
        store.commit(&[packed_one]).unwrap();
        assert_eq!(rows(&store, b"p"), [""]);
        store
            .commit(&[crate::testing::change_set(b"p", 16, 10, vec![ItemWrite { item: "x".into(), value: None }])])
            .unwrap();
        assert_eq!(rows(&store, b"p"), Vec::<String>::new());
        assert_eq!(store.load_bucket(b"p").unwrap(), BucketData::new(10, BTreeMap::new()));
        // A lone item too large to pack is spread from the start.
        let (_dir, store) = temp_store();
        store
            .commit(&[crate::testing::change_set(
                b"b",
                16,
                1,
                vec![ItemWrite { item: "big".into(), value: Some(vec![1; 20_000]) }],
            )])
            .unwrap();
        assert_eq!(rows(&store, b"b"), ["big"]);
    }

    #[test]
    fn a_schema_6_file_opens_as_it_is_and_its_buckets_stay_readable_and_writable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grex.redb");
        drop(RedbStore::open(&path, 16, false).unwrap());
        // Schema 6 kept every item in its own row.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(SCHEMA_KEY, &6u32.to_be_bytes()[..]).unwrap();
            let mut items = txn.open_table(ITEMS).unwrap();
            items.insert((&b"b"[..], "count"), &b"5"[..]).unwrap();
            items.insert((&b"b"[..], "name"), &b"ann"[..]).unwrap();
            drop(items);
            txn.open_table(BUCKETS).unwrap().insert((flock_of(b"b", 16), &b"b"[..]), 3).unwrap();
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path, 16, false).unwrap();
        let read_schema = |store: &RedbStore| {
            let txn = store.db.begin_read().unwrap();
            read_u32(txn.open_table(META).unwrap().get(SCHEMA_KEY).unwrap().unwrap().value()).unwrap()
        };
        assert_eq!(read_schema(&store), SCHEMA_VERSION);
        assert_eq!(store.get_item(b"b", "count").unwrap().as_deref(), Some(&b"5"[..]));
        assert_eq!(store.load_bucket(b"b").unwrap().version, 3);
        let write = ItemWrite { item: "count".into(), value: Some(b"6".to_vec()) };
        store.commit(&[crate::testing::change_set(b"b", 16, 4, vec![write])]).unwrap();
        assert_eq!(rows(&store, b"b"), ["count", "name"], "a spread bucket stays spread");
        assert_eq!(store.list_items(b"b", "", None, 10).unwrap(), ["count", "name"]);
        assert_eq!(store.get_item(b"b", "count").unwrap().as_deref(), Some(&b"6"[..]));
    }

    /// A model-based test: random sequences of writes (change sets, log appends, truncations,
    /// purges, log and state values, flock clears, modules) and reopenings, after each of which
    /// the redb store must answer every query as the in-memory store does.
    mod model {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;
        use crate::data::{Change, ItemWrite};
        use crate::storage::MemoryStore;
        use crate::testing::change_set;

        const FLOCKS: u32 = 4;
        const BUCKETS: [&[u8]; 4] = [b"a", b"b", b"cc", b"dd"];
        const ITEMS: [&str; 4] = ["x", "y/1", "y/2", "z"];
        const GROUPS: [GroupId; 2] = [1, META_GROUP];

        #[derive(Clone, Debug)]
        enum Step {
            Write(Batch),
            Reopen,
        }

        fn log_op() -> impl Strategy<Value = LogOp> {
            let group = prop::sample::select(&GROUPS[..]);
            prop_oneof![
                (group.clone(), 1u64..12, 0usize..5, any::<u8>()).prop_map(|(group, from, n, tag)| LogOp::Append {
                    group,
                    entries: (from..from + n as u64).map(|i| (i, vec![tag, i as u8].into())).collect(),
                }),
                (group.clone(), 1u64..12).prop_map(|(group, from)| LogOp::TruncateFrom { group, from }),
                (group.clone(), 0u64..8).prop_map(|(group, upto)| LogOp::PurgeUpto { group, upto }),
                (group.clone(), prop::sample::select(&["vote", "purged"][..]), vec(any::<u8>(), 0..4))
                    .prop_map(|(group, key, value)| LogOp::PutLogState { group, key, value }),
                (group.clone(), vec(any::<u8>(), 0..4)).prop_map(|(group, value)| LogOp::PutState {
                    group,
                    key: "applied",
                    value
                }),
                (0..FLOCKS).prop_map(|flock| LogOp::ClearFlock { flock }),
                group.clone().prop_map(|group| LogOp::DropGroupLog { group }),
                group.prop_map(|group| LogOp::ForgetGroup { group }),
                (any::<u8>(), prop::sample::select(&["m", "n"][..]), vec(any::<u8>(), 0..8))
                    .prop_map(|(id, name, wasm)| LogOp::PutModule { id: [id % 3; 32], name: name.into(), wasm }),
                prop::sample::select(&["m", "n"][..]).prop_map(|name| LogOp::DeleteModule { name: name.into() }),
            ]
        }

        /// A change set, decoded or as the bytes a log entry carries.
        fn change() -> impl Strategy<Value = Change> {
            // Now and then a value large enough that two or three of them spread a bucket.
            let value = prop_oneof![6 => vec(any::<u8>(), 0..6), 1 => vec(any::<u8>(), 5000..9000)];
            let write = (prop::sample::select(&ITEMS[..]), prop::option::of(value));
            (prop::sample::select(&BUCKETS[..]), 1u64..50, vec(write, 1..4), any::<bool>()).prop_map(
                |(bucket, version, writes, encoded)| {
                    let writes =
                        writes.into_iter().map(|(item, value)| ItemWrite { item: item.into(), value }).collect();
                    let change = change_set(bucket, FLOCKS, version, writes);
                    if encoded {
                        Change::encoded(crate::cluster::wire::encode(&change).into()).unwrap()
                    } else {
                        change.into()
                    }
                },
            )
        }

        fn step() -> impl Strategy<Value = Step> {
            let sync = prop::sample::select(&[SyncTo::Nothing, SyncTo::Log, SyncTo::All][..]);
            prop_oneof![
                9 => (vec(log_op(), 0..4), vec(change(), 0..3), sync)
                    .prop_map(|(log, changes, sync)| Step::Write(Batch { log, changes, sync })),
                1 => Just(Step::Reopen),
            ]
        }

        fn same_answers(redb: &RedbStore, memory: &MemoryStore) -> Result<(), TestCaseError> {
            for bucket in BUCKETS {
                prop_assert_eq!(redb.load_bucket(bucket).unwrap(), memory.load_bucket(bucket).unwrap());
                prop_assert_eq!(redb.bucket_version(bucket).unwrap(), memory.bucket_version(bucket).unwrap());
                for item in ITEMS {
                    prop_assert_eq!(redb.get_item(bucket, item).unwrap(), memory.get_item(bucket, item).unwrap());
                }
                for (prefix, after, limit) in
                    [("", None, 10), ("y/", None, 1), ("y/", Some("y/1"), 5), ("", Some("x"), 2)]
                {
                    prop_assert_eq!(
                        redb.list_items(bucket, prefix, after, limit).unwrap(),
                        memory.list_items(bucket, prefix, after, limit).unwrap()
                    );
                }
            }
            for flock in 0..FLOCKS {
                prop_assert_eq!(redb.flock_buckets(flock).unwrap(), memory.flock_buckets(flock).unwrap());
            }
            for group in GROUPS {
                prop_assert_eq!(redb.log_last(group).unwrap(), memory.log_last(group).unwrap());
                prop_assert_eq!(
                    redb.log_entries(group, 0, u64::MAX, LogRead::count(100)).unwrap(),
                    memory.log_entries(group, 0, u64::MAX, LogRead::count(100)).unwrap()
                );
                prop_assert_eq!(
                    redb.log_entries(group, 3, 7, LogRead::count(2)).unwrap(),
                    memory.log_entries(group, 3, 7, LogRead::count(2)).unwrap()
                );
                for key in ["vote", "purged", "applied"] {
                    prop_assert_eq!(redb.log_state(group, key).unwrap(), memory.log_state(group, key).unwrap());
                }
            }
            prop_assert_eq!(redb.module_names().unwrap(), memory.module_names().unwrap());
            for id in 0..3u8 {
                prop_assert_eq!(redb.module_bytes(&[id; 32]).unwrap(), memory.module_bytes(&[id; 32]).unwrap());
                prop_assert_eq!(redb.module_size(&[id; 32]).unwrap(), memory.module_size(&[id; 32]).unwrap());
            }
            Ok(())
        }

        /// A log grows without gaps (as raft writes it): moves each append of `batch` to start
        /// at most one past the last entry its group holds by then.
        fn close_gaps(batch: &mut Batch, memory: &MemoryStore) {
            // Per group, its first and last index as the batch goes.
            let mut span: BTreeMap<GroupId, Option<(u64, u64)>> = GROUPS
                .iter()
                .map(|g| {
                    let first =
                        memory.log_entries(*g, 0, u64::MAX, LogRead::count(1)).unwrap().first().map(|(i, _)| *i);
                    (*g, first.zip(memory.log_last(*g).unwrap().map(|(i, _)| i)))
                })
                .collect();
            for op in &mut batch.log {
                match op {
                    LogOp::Append { group, entries } if !entries.is_empty() => {
                        let held = span[group];
                        if let Some((_, last)) = held
                            && entries[0].0 > last + 1
                        {
                            let shift = entries[0].0 - (last + 1);
                            entries.iter_mut().for_each(|(i, _)| *i -= shift);
                        }
                        let (from, to) = (entries[0].0, entries[entries.len() - 1].0);
                        let first = held.map_or(from, |(first, _)| first.min(from));
                        span.insert(*group, Some((first, to)));
                    }
                    LogOp::TruncateFrom { group, from } => {
                        let held = span[group];
                        span.insert(
                            *group,
                            held.and_then(|(first, last)| (*from > first).then(|| (first, last.min(*from - 1)))),
                        );
                    }
                    LogOp::PurgeUpto { group, upto } => {
                        let held = span[group];
                        span.insert(
                            *group,
                            held.and_then(|(first, last)| (*upto < last).then(|| (first.max(*upto + 1), last))),
                        );
                    }
                    LogOp::DropGroupLog { group } => {
                        span.insert(*group, None);
                    }
                    _ => {}
                }
            }
        }

        proptest! {
            #![proptest_config(crate::testing::proptest_config(64))]

            #[test]
            fn redb_answers_as_the_in_memory_store_does(steps in vec(step(), 1..40)) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("grex.redb");
                // Tiny segments: the log starts, copies forward and deletes segments all the time.
                let open = || RedbStore::open_with(&path, FLOCKS, false, CACHE_BYTES_DEFAULT, 256).unwrap();
                let mut redb = open();
                let memory = MemoryStore::new(FLOCKS);
                for step in steps {
                    match step {
                        Step::Write(mut batch) => {
                            close_gaps(&mut batch, &memory);
                            redb.write(&batch).unwrap();
                            memory.write(&batch).unwrap();
                        }
                        Step::Reopen => {
                            drop(redb);
                            redb = open();
                        }
                    }
                    same_answers(&redb, &memory)?;
                }
            }
        }
    }
}
