//! Storage: the node's durable state behind the small [`Store`] trait.
//!
//! [`RedbStore`] keeps everything in one redb file (`grex.redb` in the data directory): items,
//! bucket versions, modules and their names, and node metadata with a schema version checked on
//! open. `docs/storage.md` lists the tables. [`MemoryStore`] is the same contract in memory, for
//! tests; [`FaultyStore`] wraps any store and fails after N operations, for fault tests.
//!
//! Invariant: [`Store::commit`] applies a batch of change sets in one transaction, all or none, and
//! when it returns `Ok` on a durable store the batch is on disk (fsync'd). Many jobs share one
//! commit: that is the node's group commit.

mod faulty;
mod memory;
mod redb_store;

pub use faulty::FaultyStore;
pub use memory::MemoryStore;
pub use redb_store::RedbStore;

use crate::data::{BucketData, ChangeSet};
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
    /// Applies change sets, in order, in one atomic (and, if durable, fsync'd) transaction.
    fn commit(&self, changes: &[ChangeSet]) -> Result<(), StoreError>;
    /// Stores a module's bytes under its id and points `name` at it.
    fn put_module(&self, id: &ModuleId, name: &str, wasm: &[u8]) -> Result<(), StoreError>;
    /// The id a name points at.
    fn module_id(&self, name: &str) -> Result<Option<ModuleId>, StoreError>;
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
        ChangeSet {
            bucket: bucket.to_vec(),
            flock: 0,
            version,
            writes: writes
                .iter()
                .map(|(k, v)| ItemWrite { item: k.to_string(), value: v.map(|v| v.as_bytes().to_vec()) })
                .collect(),
        }
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
    }

    pub(crate) fn modules_are_found_by_name_and_id(store: &dyn Store) {
        let id = [7u8; 32];
        store.put_module(&id, "counter", b"\0asm").unwrap();
        assert_eq!(store.module_id("counter").unwrap(), Some(id));
        assert_eq!(store.module_bytes(&id).unwrap().as_deref(), Some(&b"\0asm"[..]));
        assert_eq!(store.module_size(&id).unwrap(), Some(4));
        assert_eq!(store.module_size(&[0; 32]).unwrap(), None);
        assert_eq!(store.module_id("nope").unwrap(), None);
        let other = [8u8; 32];
        store.put_module(&other, "counter", b"\0asm2").unwrap();
        assert_eq!(store.module_id("counter").unwrap(), Some(other));
        assert_eq!(store.module_names().unwrap(), vec![("counter".to_string(), other)]);
    }
}
