//! One workload thread's ways into the cluster: HTTP, QUIC, the Redis protocol, and the
//! canary-following [`Router`], each used as an application would use it (connections kept and
//! reused, made again when they break).
//!
//! Every way maps its answers onto the same three outcomes ([`Outcome`]): a request that
//! certainly never reached a node (no connection could be made) and an answer whose error code
//! says the job did not commit ([`list_append::DEFINITE_CODES`]) are definite failures; a
//! connection lost after sending, a timeout, or an answer that admits it may have committed is
//! unknown.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use grex_client::{Client, ClientError, Router};

use crate::GrexNode;
use crate::list_append::{self, Kind, Op, Outcome, Via};

/// How long a client waits for one answer before it counts the outcome as unknown.
pub const ANSWER_WAIT: Duration = Duration::from_secs(20);

/// Where one node listens, as the workload sees it (a restart may move it).
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// HTTP `host:port`.
    pub http: String,
    /// `quic://host:port`.
    pub quic: String,
    /// The CA file the node's QUIC certificate chains to.
    pub ca: PathBuf,
    /// `redis://host:port`, when the node serves the Redis protocol.
    pub resp: Option<String>,
}

impl Endpoint {
    /// Where `node` listens now.
    pub fn of(node: &GrexNode) -> Endpoint {
        Endpoint {
            http: node.http_addr().to_owned(),
            quic: node.quic.clone(),
            ca: node.ca.clone(),
            resp: node.resp.clone(),
        }
    }
}

/// One worker's connections, by URL.
pub struct Clients {
    runtime: tokio::runtime::Runtime,
    quic: HashMap<String, Client>,
    resp: HashMap<String, redis::Connection>,
    /// The router, and the QUIC URL of the node it was seeded with.
    router: Option<(String, Router)>,
}

impl Default for Clients {
    fn default() -> Self {
        Self::new()
    }
}

impl Clients {
    /// No connections yet.
    pub fn new() -> Clients {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime for the clients");
        Clients { runtime, quic: HashMap::new(), resp: HashMap::new(), router: None }
    }

    /// Runs `kind` on `bucket` through `node` the way `via` says, timed from `start`.
    pub fn perform(
        &mut self,
        start: Instant,
        worker: usize,
        node: (usize, &Endpoint),
        bucket: (usize, &str),
        kind: Kind,
        via: Via,
    ) -> Op {
        let invoked = start.elapsed();
        let outcome = match via {
            Via::Http | Via::Simulated => list_append::perform_http(&node.1.http, bucket.1, kind, ANSWER_WAIT),
            Via::Quic => self.quic(node.1, bucket.1, kind),
            Via::Resp => self.resp(node.1, bucket.1, kind),
            Via::Router => self.router(node.1, bucket.1, kind),
        };
        Op { worker, bucket: bucket.0, node: node.0, via, kind, invoked, completed: start.elapsed(), outcome }
    }

    fn quic(&mut self, node: &Endpoint, bucket: &str, kind: Kind) -> Outcome {
        let Clients { runtime, quic, .. } = self;
        let client = match quic.entry(node.quic.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                match runtime.block_on(timed(Client::connect(&node.quic, Some(&node.ca)))) {
                    Ok(client) => e.insert(client),
                    Err(why) => return Outcome::Failed(format!("not sent: {why}")),
                }
            }
        };
        let input = list_append::input(kind);
        let job = client.run_job(bucket.as_bytes(), list_append::MODULE, input.as_bytes(), kind == Kind::FollowerRead);
        let result = runtime.block_on(async { tokio::time::timeout(ANSWER_WAIT, job).await });
        let outcome = client_outcome(result);
        if matches!(outcome, Outcome::Unknown(_)) || not_sent(&outcome) {
            // The connection may be dead (the node restarted): make a new one next time.
            quic.remove(&node.quic);
        }
        outcome
    }

    /// Through the worker's router, seeded with the first node it was sent to and kept while it
    /// works: it follows canaries, and makes connections again after a node restarts. Only when
    /// even its seed cannot be reached (down, or moved to new ports) is it replaced, seeded with
    /// `node`.
    fn router(&mut self, node: &Endpoint, bucket: &str, kind: Kind) -> Outcome {
        let Clients { runtime, router, .. } = self;
        if router.is_none() {
            match runtime.block_on(timed(Router::connect(&node.quic, Some(&node.ca)))) {
                Ok(r) => *router = Some((node.quic.clone(), r)),
                Err(why) => return Outcome::Failed(format!("not sent: {why}")),
            }
        }
        let (_, r) = router.as_ref().expect("connected above");
        let input = list_append::input(kind);
        let job = r.run_job(bucket.as_bytes(), list_append::MODULE, input.as_bytes(), kind == Kind::FollowerRead);
        let result = runtime.block_on(async { tokio::time::timeout(ANSWER_WAIT, job).await });
        let outcome = client_outcome(result);
        if not_sent(&outcome) {
            *router = None;
        }
        outcome
    }

    fn resp(&mut self, node: &Endpoint, bucket: &str, kind: Kind) -> Outcome {
        let Some(url) = &node.resp else {
            return Outcome::Failed("not sent: the node serves no Redis protocol (start it with --resp)".into());
        };
        let connection = match self.resp.entry(url.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match resp_connect(url) {
                Ok(c) => e.insert(c),
                Err(why) => return Outcome::Failed(format!("not sent: {why}")),
            },
        };
        let command = if kind == Kind::FollowerRead { "FCALL_RO" } else { "FCALL" };
        let mut cmd = redis::cmd(command);
        cmd.arg(list_append::MODULE).arg(1).arg(bucket);
        for word in list_append::input(kind).split(' ') {
            cmd.arg(word);
        }
        let outcome = match cmd.query::<Vec<u8>>(connection) {
            Ok(out) => list_append::listed(&String::from_utf8_lossy(&out)),
            Err(e) => resp_outcome(&e),
        };
        if matches!(outcome, Outcome::Unknown(_)) {
            self.resp.remove(url);
        }
        outcome
    }
}

/// Whether `outcome` is a failure before anything was sent.
fn not_sent(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Failed(why) if why.starts_with("not sent"))
}

/// `future`, or a timeout after [`ANSWER_WAIT`], with any error as text.
async fn timed<T, E: std::fmt::Display>(future: impl Future<Output = Result<T, E>>) -> Result<T, String> {
    match tokio::time::timeout(ANSWER_WAIT, future).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {ANSWER_WAIT:?}")),
    }
}

/// A [`grex_client`] job's outcome, or a timeout's.
fn client_outcome(result: Result<Result<grex_client::JobOutput, ClientError>, tokio::time::error::Elapsed>) -> Outcome {
    match result {
        Err(_) => Outcome::Unknown(format!("no answer within {ANSWER_WAIT:?}")),
        Ok(Ok(out)) => list_append::listed(&String::from_utf8_lossy(&out.output)),
        Ok(Err(ClientError::Remote(e))) => list_append::by_code(e.code.as_str(), &format!("{}: {}", e.code, e.message)),
        Ok(Err(ClientError::Unreachable(why))) => Outcome::Failed(format!("not sent: {why}")),
        Ok(Err(e)) => Outcome::Unknown(e.to_string()),
    }
}

fn resp_connect(url: &str) -> Result<redis::Connection, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let connection = client.get_connection_with_timeout(Duration::from_secs(1)).map_err(|e| e.to_string())?;
    connection.set_read_timeout(Some(ANSWER_WAIT)).map_err(|e| e.to_string())?;
    connection.set_write_timeout(Some(ANSWER_WAIT)).map_err(|e| e.to_string())?;
    Ok(connection)
}

/// A Redis error reply's outcome: grex words its errors `ERR message (code)`, `TRYAGAIN ...
/// (code)` or `BUSY ... (code)`; anything without a code, or a broken connection, is unknown.
fn resp_outcome(e: &redis::RedisError) -> Outcome {
    let text = e.to_string();
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return Outcome::Unknown(text);
    }
    let code = text
        .trim_end()
        .strip_suffix(')')
        .and_then(|t| t.rsplit_once('('))
        .map(|(_, code)| code)
        .filter(|code| code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    match code {
        Some(code) => list_append::by_code(code, &text),
        None => Outcome::Unknown(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_error_replies_are_classified_by_their_code() {
        let reply = |kind, detail: &str| redis::RedisError::from((kind, "server", detail.to_owned()));
        let tryagain = reply(redis::ErrorKind::TryAgain, "no leader for flock 2 yet (unavailable)");
        assert!(matches!(resp_outcome(&tryagain), Outcome::Failed(_)), "{:?}", resp_outcome(&tryagain));
        let unknown = reply(redis::ErrorKind::ResponseError, "lost the lead (outcome_unknown)");
        assert!(matches!(resp_outcome(&unknown), Outcome::Unknown(_)));
        let no_code = reply(redis::ErrorKind::ResponseError, "Protocol error: what");
        assert!(matches!(resp_outcome(&no_code), Outcome::Unknown(_)));
    }
}
