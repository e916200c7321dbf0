//! An in-memory [`Store`] for tests: the same contract, no disk.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Batch, FlockView, GroupId, LogOp, LogRead, ModuleId, NodeMeta, Store};
use crate::data::{BucketData, ChangeView};
use crate::error::StoreError;

#[derive(Default)]
struct State {
    items: BTreeMap<(Vec<u8>, String), Vec<u8>>,
    versions: BTreeMap<Vec<u8>, u64>,
    modules: BTreeMap<ModuleId, Vec<u8>>,
    names: BTreeMap<String, ModuleId>,
    log: BTreeMap<(GroupId, u64), Vec<u8>>,
    log_state: BTreeMap<(GroupId, String), Vec<u8>>,
    /// Named values of the state machines (the log's are in `log_state`).
    state_values: BTreeMap<(GroupId, String), Vec<u8>>,
}

impl State {
    fn put_module(&mut self, id: &ModuleId, name: &str, wasm: &[u8]) {
        self.modules.insert(*id, wasm.to_vec());
        if let Some(old) = self.names.insert(name.to_owned(), *id).filter(|old| old != id) {
            self.collect_module(&old);
        }
    }

    /// Writes a change set's items and version.
    fn apply(&mut self, change: &ChangeView<'_>) {
        for write in &change.writes {
            let key = (change.bucket.to_vec(), write.item.to_owned());
            match write.value {
                Some(value) => self.items.insert(key, value.to_vec()),
                None => self.items.remove(&key),
            };
        }
        self.versions.insert(change.bucket.to_vec(), change.version);
    }

    /// Deletes every bucket of `flock`.
    fn clear_flock(&mut self, flock: u32, flocks: u32) {
        self.versions.retain(|b, _| crate::data::flock_of(b, flocks) != flock);
        self.items.retain(|(b, _), _| crate::data::flock_of(b, flocks) != flock);
    }

    /// Deletes a module's bytes unless a name still points to it.
    fn collect_module(&mut self, id: &ModuleId) {
        if !self.names.values().any(|named| named == id) {
            self.modules.remove(id);
        }
    }
}

/// Everything in maps behind a mutex.
pub struct MemoryStore {
    meta: NodeMeta,
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store with `flock_count` flocks.
    pub fn new(flock_count: u32) -> Self {
        MemoryStore { meta: NodeMeta { node_id: "memory".into(), flock_count }, state: Mutex::new(State::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Store for MemoryStore {
    fn meta(&self) -> &NodeMeta {
        &self.meta
    }

    fn load_bucket(&self, bucket: &[u8]) -> Result<BucketData, StoreError> {
        let state = self.state();
        let items = state
            .items
            .range((bucket.to_vec(), String::new())..)
            .take_while(|((b, _), _)| b == bucket)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect();
        Ok(BucketData::new(state.versions.get(bucket).copied().unwrap_or(0), items))
    }

    fn get_item(&self, bucket: &[u8], item: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state().items.get(&(bucket.to_vec(), item.to_owned())).cloned())
    }

    fn list_items(
        &self,
        bucket: &[u8],
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self.load_bucket(bucket)?.list(prefix, start_after, limit))
    }

    fn bucket_version(&self, bucket: &[u8]) -> Result<u64, StoreError> {
        Ok(self.state().versions.get(bucket).copied().unwrap_or(0))
    }

    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut state = self.state();
        for op in &batch.log {
            match op {
                LogOp::Append { group, entries } => {
                    // An entry at an index the log has replaces it and everything after (as in redb).
                    if let Some((first, _)) = entries.first() {
                        state.log.retain(|(g, i), _| g != group || i < first);
                    }
                    for (index, entry) in entries {
                        state.log.insert((*group, *index), entry.to_vec());
                    }
                }
                LogOp::TruncateFrom { group, from } => {
                    state.log.retain(|(g, i), _| g != group || i < from);
                }
                LogOp::PurgeUpto { group, upto } => {
                    state.log.retain(|(g, i), _| g != group || i > upto);
                }
                LogOp::PutLogState { group, key, value } => {
                    state.log_state.insert((*group, key.to_string()), value.clone());
                }
                LogOp::PutState { group, key, value } => {
                    state.state_values.insert((*group, key.to_string()), value.clone());
                }
                LogOp::DropGroupLog { group } => {
                    state.log.retain(|(g, _), _| g != group);
                    state.log_state.retain(|(g, _), _| g != group);
                }
                LogOp::ForgetGroup { group } => {
                    state.state_values.retain(|(g, _), _| g != group);
                }
                LogOp::ClearFlock { flock } => state.clear_flock(*flock, self.meta.flock_count),
                LogOp::InstallFlock { flock, buckets } => {
                    // Read whole before anything changes, so that a snapshot that cannot be read
                    // changes nothing (a redb write aborts whole).
                    let mut installed = Vec::new();
                    buckets.for_each(|change| {
                        installed.push(change);
                        Ok(())
                    })?;
                    state.clear_flock(*flock, self.meta.flock_count);
                    for change in &installed {
                        state.apply(&change.view());
                    }
                }
                LogOp::PutModule { id, name, wasm } => state.put_module(id, name, wasm),
                LogOp::DeleteModule { name } => {
                    if let Some(old) = state.names.remove(name) {
                        state.collect_module(&old);
                    }
                }
            }
        }
        for change in &batch.changes {
            state.apply(&change.view());
        }
        Ok(())
    }

    fn log_entries(
        &self,
        group: GroupId,
        from: u64,
        to: u64,
        limit: LogRead,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let state = self.state();
        let taken = limit.taken(state.log.range((group, from)..(group, to)).map(|(_, e)| e.len()));
        Ok(state.log.range((group, from)..(group, to)).take(taken).map(|((_, i), e)| (*i, e.clone())).collect())
    }

    fn log_last(&self, group: GroupId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self.state().log.range((group, 0)..=(group, u64::MAX)).next_back().map(|((_, i), e)| (*i, e.clone())))
    }

    fn log_state(&self, group: GroupId, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let state = self.state();
        let key = (group, key.to_owned());
        Ok(state.log_state.get(&key).or_else(|| state.state_values.get(&key)).cloned())
    }

    fn flock_buckets(&self, flock: u32) -> Result<Vec<(Vec<u8>, BucketData)>, StoreError> {
        let buckets: Vec<Vec<u8>> = self
            .state()
            .versions
            .keys()
            .filter(|b| crate::data::flock_of(b, self.meta.flock_count) == flock)
            .cloned()
            .collect();
        buckets.into_iter().map(|b| Ok((b.clone(), self.load_bucket(&b)?))).collect()
    }

    fn flock_view(&self, flock: u32) -> Result<Box<dyn FlockView>, StoreError> {
        let state = self.state();
        let values = state
            .state_values
            .iter()
            .filter(|((g, _), _)| *g == flock)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect();
        drop(state);
        let buckets = self.flock_buckets(flock)?.into_iter().collect();
        Ok(Box::new(MemoryFlockView { buckets, values }))
    }

    fn bucket_count(&self) -> Result<u64, StoreError> {
        Ok(self.state().versions.len() as u64)
    }

    fn bucket_keys(&self, after: Option<(u32, &[u8])>, limit: usize) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        let flock_count = self.meta.flock_count;
        let mut keys: Vec<(u32, Vec<u8>)> =
            self.state().versions.keys().map(|b| (crate::data::flock_of(b, flock_count), b.clone())).collect();
        keys.sort();
        Ok(keys
            .into_iter()
            .filter(|(flock, key)| after.is_none_or(|(f, k)| (*flock, key.as_slice()) > (f, k)))
            .take(limit)
            .collect())
    }

    fn put_module(&self, id: &ModuleId, name: &str, wasm: &[u8]) -> Result<(), StoreError> {
        self.state().put_module(id, name, wasm);
        Ok(())
    }

    fn module_bytes(&self, id: &ModuleId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state().modules.get(id).cloned())
    }

    fn module_size(&self, id: &ModuleId) -> Result<Option<u64>, StoreError> {
        Ok(self.state().modules.get(id).map(|m| m.len() as u64))
    }

    fn module_names(&self) -> Result<Vec<(String, ModuleId)>, StoreError> {
        Ok(self.state().names.iter().map(|(n, id)| (n.clone(), *id)).collect())
    }
}

/// A copy of a flock's buckets.
struct MemoryFlockView {
    buckets: BTreeMap<Vec<u8>, BucketData>,
    /// The flock's state machine's named values.
    values: BTreeMap<String, Vec<u8>>,
}

impl FlockView for MemoryFlockView {
    fn state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.values.get(key).cloned())
    }

    fn buckets(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(Vec<u8>, BucketData)>, StoreError> {
        let (mut found, mut bytes) = (Vec::new(), 0);
        let candidates =
            self.buckets.iter().filter(|(key, _)| key.starts_with(prefix) && after.is_none_or(|a| key.as_slice() > a));
        for (key, data) in candidates {
            if found.len() == limit || bytes >= bytes_max {
                break;
            }
            bytes += key.len() + data.bytes();
            found.push((key.clone(), data.clone()));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::contract;

    #[test]
    fn memory_store_meets_the_store_contract() {
        contract::items_versions_and_listing_follow_commits(&MemoryStore::new(16));
        contract::modules_are_found_by_name_and_id(&MemoryStore::new(16));
        contract::flock_views_hold_one_moment(&MemoryStore::new(16));
        contract::logs_append_truncate_purge_and_flocks_clear(&MemoryStore::new(16));
        contract::flocks_install_whole_from_a_stream_or_not_at_all(&MemoryStore::new(16));
    }
}
