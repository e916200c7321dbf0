//! A [`Store`] wrapper that fails every commit after the first N (or from the moment a switch is
//! set), to test how the node reacts to a failing disk, and can run a hook before each commit (to
//! hold the committer in a write).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{Batch, GroupId, LogRead, ModuleId, NodeMeta, Store};
use crate::data::BucketData;
use crate::error::StoreError;

/// Called with the commit's number (from 0) before each commit.
type WriteHook = Box<dyn Fn(u64) + Send + Sync>;

/// Passes calls to `inner` until `commits_ok` commits have succeeded; later commits fail.
pub struct FaultyStore<S> {
    inner: S,
    commits_ok: u64,
    commits: AtomicU64,
    before_write: Option<WriteHook>,
    /// When set, every commit from then on fails.
    failing: Option<Arc<AtomicBool>>,
}

impl<S: Store> FaultyStore<S> {
    /// Wraps `inner`, letting `commits_ok` commits through.
    pub fn new(inner: S, commits_ok: u64) -> Self {
        FaultyStore { inner, commits_ok, commits: AtomicU64::new(0), before_write: None, failing: None }
    }

    /// Fails every commit made while `switch` is set (`grex serve --fault-injection`'s disk).
    pub fn failing_when(mut self, switch: Arc<AtomicBool>) -> Self {
        self.failing = Some(switch);
        self
    }

    /// Runs `hook` with the commit's number before each commit (it may block the committer).
    /// Staging a write counts as one.
    pub fn before_each_write(mut self, hook: impl Fn(u64) + Send + Sync + 'static) -> Self {
        self.before_write = Some(Box::new(hook));
        self
    }

    fn failing(&self) -> bool {
        self.failing.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
    }

    /// Numbers a write (or staging), runs the hook, and fails it if it is past `commits_ok` or
    /// the disk is failing.
    fn next_write(&self) -> Result<(), StoreError> {
        let n = self.commits.fetch_add(1, Ordering::SeqCst);
        if let Some(hook) = &self.before_write {
            hook(n);
        }
        if n >= self.commits_ok || self.failing() {
            return Err(StoreError::Injected(n));
        }
        Ok(())
    }
}

impl<S: Store> Store for FaultyStore<S> {
    fn meta(&self) -> &NodeMeta {
        self.inner.meta()
    }
    fn load_bucket(&self, bucket: &[u8]) -> Result<BucketData, StoreError> {
        self.inner.load_bucket(bucket)
    }
    fn get_item(&self, bucket: &[u8], item: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_item(bucket, item)
    }
    fn list_items(
        &self,
        bucket: &[u8],
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.list_items(bucket, prefix, start_after, limit)
    }
    fn bucket_version(&self, bucket: &[u8]) -> Result<u64, StoreError> {
        self.inner.bucket_version(bucket)
    }
    fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        self.next_write()?;
        self.inner.write(batch)
    }
    fn stage(&self, batch: &Batch) -> Result<(), StoreError> {
        self.next_write()?;
        self.inner.stage(batch)
    }
    fn commit_staged(&self) -> Result<(), StoreError> {
        if self.failing() {
            return Err(StoreError::Injected(self.commits.load(Ordering::SeqCst)));
        }
        self.inner.commit_staged()
    }
    fn log_entries(
        &self,
        group: GroupId,
        from: u64,
        to: u64,
        limit: LogRead,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.log_entries(group, from, to, limit)
    }
    fn log_last(&self, group: GroupId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.inner.log_last(group)
    }
    fn log_state(&self, group: GroupId, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.log_state(group, key)
    }
    fn flock_buckets(&self, flock: u32) -> Result<Vec<(Vec<u8>, BucketData)>, StoreError> {
        self.inner.flock_buckets(flock)
    }
    fn flock_view(&self, flock: u32) -> Result<Box<dyn super::FlockView>, StoreError> {
        self.inner.flock_view(flock)
    }
    fn bucket_count(&self) -> Result<u64, StoreError> {
        self.inner.bucket_count()
    }
    fn bucket_keys(&self, after: Option<(u32, &[u8])>, limit: usize) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        self.inner.bucket_keys(after, limit)
    }
    fn put_module(&self, id: &ModuleId, name: &str, wasm: &[u8]) -> Result<(), StoreError> {
        self.inner.put_module(id, name, wasm)
    }
    fn module_bytes(&self, id: &ModuleId) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.module_bytes(id)
    }
    fn module_size(&self, id: &ModuleId) -> Result<Option<u64>, StoreError> {
        self.inner.module_size(id)
    }
    fn module_names(&self) -> Result<Vec<(String, ModuleId)>, StoreError> {
        self.inner.module_names()
    }
}
