//! Admission of jobs by the bytes they hold. Every job and module upload that a front end (HTTP,
//! QUIC, Redis) hands to the service holds its bytes (bucket key, module name, input, or the
//! module's code) on one node-wide [`ReadBudget`] from then until it is answered: while it waits
//! in an executor's queue, is forwarded to its flock's leader, or runs. One that would take the
//! node over `NodeConfig::jobs_bytes_max` is refused with `overloaded`, safe to retry, unless
//! nothing else is held (so a job larger than the budget still runs, alone).
//!
//! Without it, what a node holds for jobs is bounded only by counts: 1,024 jobs per executor of
//! up to `--input-bytes-max` each, and as many more as connections have requests in flight.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::budget::ReadBudget;
use crate::access::{Action, Caller, Identity, UserChange};
use crate::error::{ErrorCode, RemoteError, Result, error};
use grex_client::proto::{Canary, FlockMapInfo, JobOutput, ModuleInfo, NodesInfo, ScanEvent, ScanRequest, UserInfo};
use tokio::sync::mpsc;

use crate::node::{NodeChange, RespNode, Service};

/// A service whose jobs and uploads are admitted by bytes.
pub struct Admitted {
    inner: Arc<dyn Service>,
    held: Arc<ReadBudget>,
}

impl Admitted {
    /// `inner`, admitting at most `bytes_max` bytes of jobs and uploads at once.
    pub fn new(inner: Arc<dyn Service>, bytes_max: usize) -> Admitted {
        Admitted { inner, held: ReadBudget::new(bytes_max) }
    }

    /// Bytes held by jobs and uploads in flight now.
    pub fn held(&self) -> usize {
        self.held.used()
    }

    fn refused(&self, bytes: usize) -> RemoteError {
        error(
            ErrorCode::Overloaded,
            format!(
                "the node already holds {} KiB of jobs in flight and this one needs {} KiB, over its \
                 share of --node-memory-mib ({} KiB); retry with back-off, or use another node",
                self.held.used() >> 10,
                bytes.div_ceil(1024),
                self.held.max() >> 10
            ),
        )
    }
}

impl Service for Admitted {
    fn run_job(
        &self,
        bucket: Vec<u8>,
        module: String,
        input: Vec<u8>,
        read_only: bool,
    ) -> BoxFuture<'static, Result<JobOutput>> {
        let bytes = bucket.len() + module.len() + input.len();
        let Some(claim) = self.held.admit(bytes) else {
            let refused = self.refused(bytes);
            return async move { Err(refused) }.boxed();
        };
        let job = self.inner.run_job(bucket, module, input, read_only);
        async move {
            let answer = job.await;
            drop(claim);
            answer
        }
        .boxed()
    }

    fn put_module(&self, name: String, wasm: Vec<u8>) -> BoxFuture<'static, Result<ModuleInfo>> {
        let bytes = name.len() + wasm.len();
        let Some(claim) = self.held.admit(bytes) else {
            let refused = self.refused(bytes);
            return async move { Err(refused) }.boxed();
        };
        let upload = self.inner.put_module(name, wasm);
        async move {
            let answer = upload.await;
            drop(claim);
            answer
        }
        .boxed()
    }

    fn delete_module(&self, name: String) -> BoxFuture<'static, Result<ModuleInfo>> {
        self.inner.delete_module(name)
    }

    /// A scan holds its input and, at most, [`HOLD_BYTES`](crate::scan::HOLD_BYTES) of results
    /// for each flock in flight until it ends.
    fn scan(&self, request: ScanRequest) -> mpsc::Receiver<ScanEvent> {
        let bytes = request.input.len() + crate::scan::FLOCKS_IN_FLIGHT * crate::scan::HOLD_BYTES;
        let (events, receiver) = mpsc::channel(1);
        let Some(claim) = self.held.admit(bytes) else {
            let refused = ScanEvent::Failed(self.refused(bytes));
            let _ = events.try_send(refused);
            return receiver;
        };
        let mut scanning = self.inner.scan(request);
        tokio::spawn(async move {
            while let Some(event) = scanning.recv().await {
                if events.send(event).await.is_err() {
                    break;
                }
            }
            drop(claim);
        });
        receiver
    }

    fn canary(&self, bucket: Vec<u8>, read_only: bool) -> BoxFuture<'static, Result<Canary>> {
        self.inner.canary(bucket, read_only)
    }

    fn flocks(&self) -> FlockMapInfo {
        self.inner.flocks()
    }

    fn resp_nodes(&self) -> Vec<RespNode> {
        self.inner.resp_nodes()
    }

    fn nodes(&self) -> Result<NodesInfo> {
        self.inner.nodes()
    }

    fn cluster_stats(&self) -> BoxFuture<'static, grex_client::ClusterStats> {
        self.inner.cluster_stats()
    }

    fn change_node(&self, node: String, change: NodeChange) -> BoxFuture<'static, Result<NodesInfo>> {
        self.inner.change_node(node, change)
    }

    fn authorize(&self, caller: &Caller, action: Action<'_>) -> Result<()> {
        self.inner.authorize(caller, action)
    }

    fn authenticate(&self, token: &str) -> Result<Identity> {
        self.inner.authenticate(token)
    }

    fn users(&self) -> Vec<UserInfo> {
        self.inner.users()
    }

    fn change_user(&self, change: UserChange) -> BoxFuture<'static, Result<()>> {
        self.inner.change_user(change)
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::watch;

    use super::*;

    /// A service whose jobs finish once `release` turns true.
    struct Parked {
        release: watch::Receiver<bool>,
    }

    impl Service for Parked {
        fn run_job(&self, bucket: Vec<u8>, _: String, _: Vec<u8>, _: bool) -> BoxFuture<'static, Result<JobOutput>> {
            let mut release = self.release.clone();
            async move {
                let _ = release.wait_for(|r| *r).await;
                Ok(JobOutput { output: bucket, bucket_version: 1, flock: 0, node: "parked".into() })
            }
            .boxed()
        }

        fn put_module(&self, _: String, _: Vec<u8>) -> BoxFuture<'static, Result<ModuleInfo>> {
            unreachable!("not used")
        }

        fn delete_module(&self, _: String) -> BoxFuture<'static, Result<ModuleInfo>> {
            unreachable!("not used")
        }

        fn canary(&self, _: Vec<u8>, _: bool) -> BoxFuture<'static, Result<Canary>> {
            unreachable!("not used")
        }

        fn flocks(&self) -> FlockMapInfo {
            unreachable!("not used")
        }

        fn resp_nodes(&self) -> Vec<RespNode> {
            Vec::new()
        }

        fn nodes(&self) -> Result<NodesInfo> {
            unreachable!("not used")
        }

        fn cluster_stats(&self) -> BoxFuture<'static, grex_client::ClusterStats> {
            unreachable!("not used")
        }

        fn change_node(&self, _: String, _: NodeChange) -> BoxFuture<'static, Result<NodesInfo>> {
            unreachable!("not used")
        }

        /// A scan that ends (`done`) once released.
        fn scan(&self, _: ScanRequest) -> mpsc::Receiver<ScanEvent> {
            let (events, receiver) = mpsc::channel(1);
            let mut release = self.release.clone();
            tokio::spawn(async move {
                let _ = release.wait_for(|r| *r).await;
                let _ = events.send(ScanEvent::Done(Default::default())).await;
            });
            receiver
        }
    }

    fn job(service: &Admitted, input_bytes: usize) -> BoxFuture<'static, Result<JobOutput>> {
        // 1-byte key and 1-byte module name.
        service.run_job(b"k".to_vec(), "m".into(), vec![0; input_bytes], false)
    }

    #[tokio::test]
    async fn jobs_over_the_bytes_in_flight_are_refused_until_earlier_ones_are_answered() {
        let (release, parked) = watch::channel(false);
        let service = Admitted::new(Arc::new(Parked { release: parked }), 100);
        let first = tokio::spawn(job(&service, 58));
        // Held from the call on, not only once the job runs.
        assert_eq!(service.held(), 60);
        let err = job(&service, 58).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Overloaded);
        assert!(err.message.contains("--node-memory-mib"), "{}", err.message);
        assert_eq!(service.held(), 60, "a refused job holds nothing");
        // What fits beside it goes in.
        let second = tokio::spawn(job(&service, 38));
        assert_eq!(service.held(), 100);
        release.send_replace(true);
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(service.held(), 0, "answered jobs give their bytes back");
        job(&service, 58).await.unwrap();
    }

    #[tokio::test]
    async fn a_job_larger_than_the_budget_runs_alone_and_a_dropped_job_gives_its_bytes_back() {
        let (release, parked) = watch::channel(false);
        let service = Admitted::new(Arc::new(Parked { release: parked }), 100);
        let big = job(&service, 500);
        assert_eq!(service.held(), 502, "alone, it is admitted");
        let err = job(&service, 1).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Overloaded, "nothing fits beside it");
        // The caller goes away (a closed connection) before the answer.
        drop(big);
        assert_eq!(service.held(), 0);
        release.send_replace(true);
        job(&service, 1).await.unwrap();
    }

    #[tokio::test]
    async fn a_scan_holds_its_share_until_it_ends() {
        let (release, parked) = watch::channel(false);
        let share = crate::scan::FLOCKS_IN_FLIGHT * crate::scan::HOLD_BYTES;
        let service = Admitted::new(Arc::new(Parked { release: parked }), share + 10);
        let mut first = service.scan(ScanRequest { input: vec![0; 10], ..Default::default() });
        assert_eq!(service.held(), share + 10);
        let mut second = service.scan(ScanRequest::default());
        match second.recv().await {
            Some(ScanEvent::Failed(e)) => assert_eq!(e.code, ErrorCode::Overloaded),
            other => panic!("a scan over the budget is refused, not {other:?}"),
        }
        release.send_replace(true);
        assert!(matches!(first.recv().await, Some(ScanEvent::Done(_))));
        assert_eq!(first.recv().await, None);
        assert_eq!(service.held(), 0, "the claim goes before the stream ends");
    }
}
