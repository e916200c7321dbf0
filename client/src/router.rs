//! A client of a whole cluster that sends each job straight to the node that serves its bucket.
//!
//! Any node accepts any job and passes it on (one hop) to the leader of the bucket's flock. A
//! [`Router`] saves that hop: it asks a node for the bucket's canary once per flock, keeps one
//! connection per node, and sends the flock's jobs there. Every job's answer names the node that
//! ran it; when that is not the node the router chose (leadership moved), or the chosen node
//! cannot be reached, the router forgets the flock's route and asks for a fresh canary next
//! time. A job never fails because of a stale route: the node it reached forwards it, and a job
//! that could not be sent to the chosen node is sent through the seed node instead. A job that
//! was sent but got no answer is never sent again ([`ClientError::NoAnswer`]): it may have
//! committed, and only the caller can tell whether running it twice is harmless.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::proto::{self, Canary, JobOutput};
use crate::{Client, ClientError, ConnectOptions};

/// Nodes a router keeps a connection to (a cluster has few).
const CONNECTIONS_MAX: usize = 64;

/// Where a flock's jobs go.
#[derive(Clone)]
struct Route {
    url: String,
    node: String,
}

/// A cluster client that goes to the right node directly. Cheap to share between tasks.
pub struct Router {
    seed_url: String,
    options: ConnectOptions,
    quic: bool,
    flock_count: u32,
    /// Flock → the node its canary named.
    routes: Mutex<HashMap<u32, Route>>,
    /// URL → connection. A connection that failed is dropped, and made again on next use (a QUIC
    /// connection does not survive its node's restart).
    clients: Mutex<HashMap<String, Arc<Client>>>,
}

impl Router {
    /// Connects to any node of the cluster (`quic://` URLs need the cluster's `ca.pem`; the
    /// router then talks QUIC to every node).
    pub async fn connect(url: &str, ca_file: Option<&Path>) -> Result<Router, ClientError> {
        Router::connect_with(url, ConnectOptions { ca_file: ca_file.map(Path::to_path_buf), token: None }).await
    }

    /// Connects to any node of the cluster, signing in on every node it talks to with
    /// `options.token` if it is given.
    pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Router, ClientError> {
        let seed = Arc::new(Client::connect_with(url, &options).await?);
        let flock_count = seed.status().await?.flock_count;
        Ok(Router {
            seed_url: url.to_owned(),
            options,
            quic: url.starts_with("quic://"),
            flock_count,
            routes: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::from([(url.to_owned(), seed)])),
        })
    }

    /// Runs a job on the node that leads the bucket's flock.
    pub async fn run_job(
        &self,
        bucket: &[u8],
        module: &str,
        input: &[u8],
        read_only: bool,
    ) -> Result<JobOutput, ClientError> {
        let flock = proto::flock_of(bucket, self.flock_count);
        let (url, expected) = self.route(flock, bucket).await;
        match self.call(&url, |c| async move { c.run_job(bucket, module, input, read_only).await }).await {
            Ok(out) => {
                if expected.as_deref().is_some_and(|node| node != out.node) {
                    self.forget(flock);
                }
                Ok(out)
            }
            Err(ClientError::Unreachable(_)) if url != self.seed_url => {
                // The chosen node is gone and never saw the job: route afresh next time, and let
                // the seed node route this job.
                self.forget(flock);
                self.call(&self.seed_url, |c| async move { c.run_job(bucket, module, input, read_only).await }).await
            }
            Err(e @ ClientError::NoAnswer(_)) => {
                // The job may have run: never re-sent; route afresh next time.
                self.forget(flock);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The canary the router would follow for `bucket` (asked of the seed node).
    pub async fn canary(&self, bucket: &[u8]) -> Result<Canary, ClientError> {
        self.call(&self.seed_url, |c| async move { c.canary(bucket).await }).await
    }

    /// The URL to send `flock`'s jobs to, and the node id expected there (`None`: the seed,
    /// while no canary is known).
    async fn route(&self, flock: u32, bucket: &[u8]) -> (String, Option<String>) {
        if let Some(route) = self.routes.lock().unwrap_or_else(|p| p.into_inner()).get(&flock).cloned() {
            return (route.url, Some(route.node));
        }
        let Ok(canary) = self.canary(bucket).await else { return (self.seed_url.clone(), None) };
        let url = match canary.quic {
            Some(quic) if self.quic => quic,
            _ => canary.url,
        };
        let route = Route { url: url.clone(), node: canary.node.clone() };
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).insert(flock, route);
        (url, Some(canary.node))
    }

    fn forget(&self, flock: u32) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&flock);
    }

    /// Makes one call on the connection to `url` (made if there is none); a connection the call
    /// found broken is dropped. A connection that cannot be made is [`ClientError::Unreachable`].
    async fn call<T, F, Fut>(&self, url: &str, call: F) -> Result<T, ClientError>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let client = self.client(url).await.map_err(|e| match e {
            // Refused sign-in, say: the node's answer stands.
            e @ (ClientError::Unreachable(_) | ClientError::Remote(_)) => e,
            other => ClientError::Unreachable(other.to_string()),
        })?;
        let result = call(client.clone()).await;
        if matches!(result, Err(ClientError::Unreachable(_) | ClientError::NoAnswer(_))) {
            let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            // Not one another task made since.
            if clients.get(url).is_some_and(|c| Arc::ptr_eq(c, &client)) {
                clients.remove(url);
            }
        }
        result
    }

    async fn client(&self, url: &str) -> Result<Arc<Client>, ClientError> {
        if let Some(client) = self.clients.lock().unwrap_or_else(|p| p.into_inner()).get(url) {
            return Ok(client.clone());
        }
        let client = Arc::new(Client::connect_with(url, &self.options).await?);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if clients.len() >= CONNECTIONS_MAX {
            clients.clear();
        }
        Ok(clients.entry(url.to_owned()).or_insert(client).clone())
    }
}
