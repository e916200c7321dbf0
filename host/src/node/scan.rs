//! Scans on this node: a flock's buckets read from one view of the store (so every bucket as of
//! one applied version), a page at a time, each bucket's job run read-only by the flock's
//! executor between its other jobs, so a scan holds up a write for one job at most.
//!
//! A scan keeps a session per flock between pages: the view and where it got to. Sessions are
//! bounded in number and dropped when their last page is taken or they sit idle (the coordinator
//! went away), which also ends the read transaction behind the view.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use grex_client::proto::{ScanItem, encode_fold};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::shard::{ScanJob, ShardMsg};
use super::{Node, shutting_down};
use crate::data::{BucketData, Builtin};
use crate::error::{ErrorCode, Result, error};
use crate::scan::Paged;
use crate::storage::FlockView;
use crate::wasm::LoadedModule;

/// Most buckets one page reads.
pub const SCAN_PAGE_BUCKETS: usize = 64;
/// A page stops once its buckets (as read) or its outputs reach this many bytes.
pub const SCAN_PAGE_BYTES: usize = 1 << 20;
/// Most scan sessions a node keeps open at once; more are refused with `overloaded`.
pub const SCAN_SESSIONS_MAX: usize = 64;
/// A session with no page asked for this long is dropped.
pub const SCAN_SESSION_IDLE: Duration = Duration::from_secs(30);

/// What a flock's scan runs: sent with its first page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanSpec {
    /// The module's name (or `sha256:` id).
    pub module: String,
    /// Every job's input.
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
    /// Only buckets whose keys start with it.
    #[serde(with = "serde_bytes")]
    pub prefix: Vec<u8>,
}

/// One page of a flock's scan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanPage {
    /// The flock's applied log index the view holds (0 on a node without a log).
    pub version: u64,
    /// The page's buckets, in key order.
    pub items: Vec<ScanItem>,
    /// No bucket of the flock is left: the session is closed.
    pub done: bool,
}

/// A flock's scan between pages.
struct Session {
    view: Arc<dyn FlockView>,
    module: Arc<LoadedModule>,
    module_name: Arc<str>,
    input: Arc<[u8]>,
    prefix: Arc<[u8]>,
    /// The last bucket scanned.
    after: Option<Vec<u8>>,
    version: u64,
    used: Instant,
}

/// The open sessions, by (scan, flock).
#[derive(Default)]
pub(super) struct Sessions {
    open: Mutex<HashMap<(u64, u32), Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u32), Session>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for one more session (idle ones are dropped first).
    fn make_room(&self) -> Result<()> {
        let mut open = self.lock();
        open.retain(|_, s| s.used.elapsed() < SCAN_SESSION_IDLE);
        if open.len() >= SCAN_SESSIONS_MAX {
            return Err(error(
                ErrorCode::Overloaded,
                format!("this node is serving {SCAN_SESSIONS_MAX} flock scans already; retry shortly"),
            ));
        }
        Ok(())
    }

    fn take(&self, scan: u64, flock: u32) -> Result<Session> {
        self.lock().remove(&(scan, flock)).ok_or_else(|| {
            error(
                ErrorCode::BadRequest,
                format!(
                    "this node has no open scan of flock {flock} (it ended, sat idle over {} s, or the node restarted); \
                     start the scan again",
                    SCAN_SESSION_IDLE.as_secs()
                ),
            )
        })
    }

    fn put(&self, scan: u64, flock: u32, mut session: Session) {
        session.used = Instant::now();
        self.lock().insert((scan, flock), session);
    }

    /// Sessions open now.
    pub(super) fn count(&self) -> usize {
        self.lock().len()
    }
}

impl Node {
    /// The next page of scan `scan` of `flock` here; `open` starts it, taking a view of the flock
    /// (on a cluster node, only as the flock's ready leader, which then confirms it still leads,
    /// so the view holds every write acknowledged before). Later pages read the same view.
    pub async fn scan_page(&self, scan: u64, flock: u32, open: Option<ScanSpec>) -> Result<ScanPage> {
        let mut session = match open {
            Some(spec) => self.open_scan(flock, spec).await?,
            None => self.inner.scans.take(scan, flock)?,
        };
        let page = {
            let _permit = self.inner.scan_permits.acquire().await.map_err(|_| shutting_down())?;
            self.scan_some(flock, &mut session).await?
        };
        if !page.done {
            self.inner.scans.put(scan, flock, session);
        }
        Ok(page)
    }

    async fn open_scan(&self, flock: u32, spec: ScanSpec) -> Result<Session> {
        if flock >= self.flock_count() {
            return Err(error(ErrorCode::BadRequest, format!("flock {flock} does not exist")));
        }
        self.check_input(&spec.input, "the scan's input")?;
        let module = self.uploaded_module(&spec.module, "a scan runs an uploaded module").await?;
        self.inner.scans.make_room()?;
        let replicator = self.inner.replicator.clone();
        let term = match &replicator {
            None => None,
            Some(r) => Some(r.leader_term(flock).ok_or_else(|| {
                error(ErrorCode::Unavailable, format!("this node does not lead flock {flock} (or is not ready to)"))
            })?),
        };
        // What this node applied so far may still be on its way to the store.
        self.inner.commits.settle().await;
        let store = self.inner.store.clone();
        let view: Arc<dyn FlockView> = tokio::task::spawn_blocking(move || store.flock_view(flock))
            .await
            .map_err(|e| error(ErrorCode::Internal, format!("scan view task failed: {e}")))??
            .into();
        let version = match &replicator {
            Some(r) => r.applied_in(view.as_ref())?,
            None => 0,
        };
        if let (Some(r), Some(term)) = (&replicator, term) {
            r.confirm_lead(flock, term).await?;
        }
        Ok(Session {
            view,
            module,
            module_name: spec.module.into(),
            input: spec.input.into(),
            prefix: spec.prefix.into(),
            after: None,
            version,
            used: Instant::now(),
        })
    }

    /// Reads a page of buckets from the session's view and runs the job on each.
    async fn scan_some(&self, flock: u32, session: &mut Session) -> Result<ScanPage> {
        let (view, prefix, after) = (session.view.clone(), session.prefix.clone(), session.after.clone());
        let buckets = tokio::task::spawn_blocking(move || {
            view.buckets(&prefix, after.as_deref(), SCAN_PAGE_BUCKETS, SCAN_PAGE_BYTES)
        })
        .await
        .map_err(|e| error(ErrorCode::Internal, format!("scan read task failed: {e}")))??;
        let read_bytes: usize = buckets.iter().map(|(key, data)| key.len() + data.bytes()).sum();
        let mut done = buckets.len() < SCAN_PAGE_BUCKETS && read_bytes < SCAN_PAGE_BYTES;
        let (mut items, mut output_bytes) = (Vec::with_capacity(buckets.len()), 0);
        let total = buckets.len();
        for (i, (bucket, data)) in buckets.into_iter().enumerate() {
            let result = self.run_scan_job(flock, bucket.clone(), data, session).await?;
            session.after = Some(bucket.clone());
            let item = match result {
                Ok(output) => {
                    output_bytes += output.len();
                    ScanItem { bucket, output: Some(output), error: None }
                }
                Err(e) => ScanItem { bucket, output: None, error: Some(e) },
            };
            items.push(item);
            if output_bytes >= SCAN_PAGE_BYTES && i + 1 < total {
                done = false;
                break;
            }
        }
        Ok(ScanPage { version: session.version, items, done })
    }

    /// Runs the scan's job on one bucket, on the flock's executor.
    async fn run_scan_job(
        &self,
        flock: u32,
        bucket: Vec<u8>,
        data: BucketData,
        session: &Session,
    ) -> Result<Result<Vec<u8>>> {
        let job = |reply| ScanJob {
            bucket,
            data,
            flock,
            module: session.module.clone(),
            module_name: session.module_name.clone(),
            input: session.input.clone(),
            reply,
        };
        let result = self.run_read_only(flock as usize, job).await?;
        self.inner.metrics.scan_job(result.is_ok());
        Ok(result)
    }

    /// Runs the job `job` makes (given where to reply) on executor `shard` (modulo their number),
    /// between the jobs queued there; the outer error is the node's (shutting down), the inner
    /// one the job's.
    async fn run_read_only(
        &self,
        shard: usize,
        job: impl FnOnce(oneshot::Sender<Result<Vec<u8>>>) -> ScanJob,
    ) -> Result<Result<Vec<u8>>> {
        let (reply, answer) = oneshot::channel();
        let shards = &self.inner.shards;
        shards[shard % shards.len()].send(ShardMsg::Scan(job(reply))).await.map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())
    }

    /// An uploaded module by name, or why a built-in operation cannot stand for one (`role`).
    async fn uploaded_module(&self, name: &str, role: &str) -> Result<Arc<LoadedModule>> {
        if Builtin::from_module(name).is_some() {
            return Err(error(ErrorCode::BadRequest, format!("`{name}` is a built-in operation; {role}")));
        }
        self.module(name).await
    }

    /// Folds `outputs` into `acc` with the reduce module `module`: one read-only job, on an
    /// empty bucket, whose input is [`encode_fold`]'s and whose output is the new accumulator.
    pub async fn fold(&self, module: &str, acc: Option<&[u8]>, outputs: &[Vec<u8>]) -> Result<Vec<u8>> {
        let loaded = self.uploaded_module(module, "a reduce module is an uploaded one").await?;
        let shard = self.inner.folds.fetch_add(1, Ordering::Relaxed) as usize;
        let job = |reply| ScanJob {
            bucket: Vec::new(),
            data: BucketData::default(),
            flock: 0,
            module: loaded,
            module_name: module.into(),
            input: encode_fold(acc, outputs).into(),
            reply,
        };
        self.run_read_only(shard, job)
            .await?
            .map_err(|e| error(e.code, format!("the reduce module `{module}` failed: {}", e.message)))
    }
}

/// A node on its own scans its own flocks.
impl crate::scan::Pages for Node {
    fn flock_count(&self) -> u32 {
        Node::flock_count(self)
    }

    fn page(&self, scan: u64, flock: u32, _at: Option<String>, open: Option<ScanSpec>) -> BoxFuture<'static, Paged> {
        let node = self.clone();
        async move {
            match node.scan_page(scan, flock, open).await {
                Ok(page) => Paged::Page { page, node: node.id().to_owned() },
                Err(e) if matches!(e.code, ErrorCode::Overloaded) => Paged::Retry(e),
                Err(e) => Paged::Fail(e),
            }
        }
        .boxed()
    }

    fn fold(&self, module: String, acc: Option<Vec<u8>>, outputs: Vec<Vec<u8>>) -> BoxFuture<'static, Result<Vec<u8>>> {
        let node = self.clone();
        async move { node.fold(&module, acc.as_deref(), &outputs).await }.boxed()
    }
}
