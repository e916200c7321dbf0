//! The redb implementation of [`Store`].

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Batch, GroupId, LogOp, ModuleId, NodeMeta, Store};
use crate::data::{BucketData, flock_of};
use crate::error::StoreError;

/// The schema this binary reads and writes. Bump it with any change to the tables below.
pub const SCHEMA_VERSION: u32 = 2;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const ITEMS: TableDefinition<(&[u8], &str), &[u8]> = TableDefinition::new("items");
/// (flock, bucket) → version: a flock's buckets sit together, for snapshots.
const BUCKETS: TableDefinition<(u32, &[u8]), u64> = TableDefinition::new("buckets");
const MODULES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("modules");
const MODULE_NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("module_names");
const RAFT_LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("raft_log");
const RAFT_STATE: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("raft_state");

const SCHEMA_KEY: &str = "schema_version";
const NODE_ID_KEY: &str = "node_id";
const FLOCKS_KEY: &str = "flock_count";

fn engine(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Engine(e.into().to_string())
}

/// A node's data in one redb file.
pub struct RedbStore {
    db: Database,
    meta: NodeMeta,
    durability: Durability,
}

impl RedbStore {
    /// Opens `path`, creating it with `flock_count` flocks and a new node id if it does not exist.
    /// With `durable`, every commit is fsync'd before it returns.
    pub fn open(path: &Path, flock_count: u32, durable: bool) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(engine)?;
        let meta = init_meta(&db, flock_count)?;
        let durability = if durable { Durability::Immediate } else { Durability::None };
        Ok(RedbStore { db, meta, durability })
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
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        found,
                        expected: SCHEMA_VERSION,
                        hint: if found > SCHEMA_VERSION {
                            "run the newer grex binary that wrote it"
                        } else {
                            "this data directory predates the current format; export and re-import it"
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
    txn.open_table(RAFT_LOG).map_err(engine)?;
    txn.open_table(RAFT_STATE).map_err(engine)?;
    txn.commit().map_err(engine)?;
    Ok(meta)
}

fn read_items(
    table: &impl ReadableTable<(&'static [u8], &'static str), &'static [u8]>,
    bucket: &[u8],
) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    let mut items = BTreeMap::new();
    for entry in table.range((bucket, "")..).map_err(engine)? {
        let (key, value) = entry.map_err(engine)?;
        let (b, item) = key.value();
        if b != bucket {
            break;
        }
        items.insert(item.to_owned(), value.value().to_vec());
    }
    Ok(items)
}

fn read_u32(bytes: &[u8]) -> Result<u32, StoreError> {
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
        let version = txn.open_table(BUCKETS).map_err(engine)?.get(key).map_err(engine)?.map_or(0, |v| v.value());
        let items = read_items(&txn.open_table(ITEMS).map_err(engine)?, bucket)?;
        Ok(BucketData::new(version, items))
    }

    fn get_item(&self, bucket: &[u8], item: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(ITEMS).map_err(engine)?;
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
        let start = match start_after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let mut keys = Vec::new();
        for entry in table.range((bucket, start)..).map_err(engine)? {
            let (key, _) = entry.map_err(engine)?;
            let (b, item) = key.value();
            if b != bucket || !item.starts_with(prefix) || keys.len() == limit {
                break;
            }
            if Some(item) != start_after {
                keys.push(item.to_owned());
            }
        }
        Ok(keys)
    }

    fn bucket_version(&self, bucket: &[u8]) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(BUCKETS).map_err(engine)?;
        Ok(table.get((flock_of(bucket, self.meta.flock_count), bucket)).map_err(engine)?.map_or(0, |v| v.value()))
    }

    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(engine)?;
        let durability = if batch.durable { self.durability } else { Durability::None };
        txn.set_durability(durability).map_err(|e| StoreError::Engine(e.to_string()))?;
        {
            let mut items = txn.open_table(ITEMS).map_err(engine)?;
            let mut buckets = txn.open_table(BUCKETS).map_err(engine)?;
            if !batch.log.is_empty() {
                let mut log = txn.open_table(RAFT_LOG).map_err(engine)?;
                let mut state = txn.open_table(RAFT_STATE).map_err(engine)?;
                for op in &batch.log {
                    match op {
                        LogOp::Append { group, entries } => {
                            for (index, entry) in entries {
                                log.insert((*group, *index), entry.as_slice()).map_err(engine)?;
                            }
                        }
                        LogOp::TruncateFrom { group, from } => {
                            log.retain_in((*group, *from)..=(*group, u64::MAX), |_, _| false).map_err(engine)?;
                        }
                        LogOp::PurgeUpto { group, upto } => {
                            log.retain_in((*group, 0)..=(*group, *upto), |_, _| false).map_err(engine)?;
                        }
                        LogOp::PutState { group, key, value } => {
                            state.insert((*group, *key), value.as_slice()).map_err(engine)?;
                        }
                        LogOp::ClearFlock { flock } => {
                            let mut gone = Vec::new();
                            for entry in buckets.range((*flock, &[][..])..).map_err(engine)? {
                                let (key, _) = entry.map_err(engine)?;
                                let (f, bucket) = key.value();
                                if f != *flock {
                                    break;
                                }
                                gone.push(bucket.to_vec());
                            }
                            for bucket in &gone {
                                buckets.remove((*flock, bucket.as_slice())).map_err(engine)?;
                                let keys: Vec<String> = read_items(&items, bucket)?.into_keys().collect();
                                for item in keys {
                                    items.remove((bucket.as_slice(), item.as_str())).map_err(engine)?;
                                }
                            }
                        }
                        LogOp::PutModule { id, name, wasm } => {
                            txn.open_table(MODULES)
                                .map_err(engine)?
                                .insert(&id[..], wasm.as_slice())
                                .map_err(engine)?;
                            txn.open_table(MODULE_NAMES)
                                .map_err(engine)?
                                .insert(name.as_str(), &id[..])
                                .map_err(engine)?;
                        }
                    }
                }
            }
            for change in &batch.changes {
                for write in &change.writes {
                    let key = (change.bucket.as_slice(), write.item.as_str());
                    match &write.value {
                        Some(value) => items.insert(key, value.as_slice()).map_err(engine)?,
                        None => items.remove(key).map_err(engine)?,
                    };
                }
                buckets.insert((change.flock, change.bucket.as_slice()), change.version).map_err(engine)?;
            }
        }
        txn.commit().map_err(engine)
    }

    fn log_entries(&self, group: GroupId, from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RAFT_LOG).map_err(engine)?;
        let mut entries = Vec::new();
        for entry in table.range((group, from)..(group, to)).map_err(engine)? {
            let (key, value) = entry.map_err(engine)?;
            entries.push((key.value().1, value.value().to_vec()));
            if entries.len() == limit {
                break;
            }
        }
        Ok(entries)
    }

    fn log_last(&self, group: GroupId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(RAFT_LOG).map_err(engine)?;
        let last =
            table.range((group, 0)..=(group, u64::MAX)).map_err(engine)?.next_back().transpose().map_err(engine)?;
        Ok(last.map(|(k, v)| (k.value().1, v.value().to_vec())))
    }

    fn log_state(&self, group: GroupId, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
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
            found.push((bucket.to_vec(), BucketData::new(version.value(), read_items(&items, bucket)?)));
        }
        Ok(found)
    }

    fn put_module(&self, id: &ModuleId, name: &str, wasm: &[u8]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(engine)?;
        txn.set_durability(self.durability).map_err(|e| StoreError::Engine(e.to_string()))?;
        {
            txn.open_table(MODULES).map_err(engine)?.insert(&id[..], wasm).map_err(engine)?;
            txn.open_table(MODULE_NAMES).map_err(engine)?.insert(name, &id[..]).map_err(engine)?;
        }
        txn.commit().map_err(engine)
    }

    fn module_id(&self, name: &str) -> Result<Option<ModuleId>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(MODULE_NAMES).map_err(engine)?;
        table.get(name).map_err(engine)?.map(|v| module_id(v.value())).transpose()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::contract;

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
        let (_dir, store) = temp_store();
        contract::logs_append_truncate_purge_and_flocks_clear(&store);
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
}
