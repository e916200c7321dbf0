//! The list-append workload and its checker (in the style of Jepsen's Elle list-append).
//!
//! Client threads run the `list-append` job (`jobs/list-append`) against a few buckets through
//! random nodes, over HTTP, QUIC, the Redis protocol or the canary-following [`grex_client::Router`]
//! ([`crate::clients`]): `append V` with a value no one else ever sends, `read`, or `read` as a
//! read-only job (which a follower may answer). Each operation is recorded with when it was invoked
//! and completed and what came of it:
//!
//! - **ok**, with the whole list the job returned;
//! - **failed** (definite): the job certainly did not commit. The codes that say so are
//!   [`DEFINITE_CODES`]: the node refused before running the job, or the job itself failed;
//! - **unknown** (indeterminate): no answer (a lost connection, a timeout), or an answer that says
//!   the outcome is unknown (`outcome_unknown`, `internal`, or any message that says the job
//!   "may have" committed).
//!
//! [`check`] then verifies, per bucket, against the final list read after the faults healed:
//! every node's committed copy is that list; it has no duplicates and no value never sent;
//! every acknowledged append is in it and no definitely failed one is; every list an operation
//! returned is a prefix of it (so a follower's read-only answer is a committed prefix); and
//! real-time order holds for appends and reads through the leader: an operation invoked after
//! another completed returns at least what that one returned.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The name the workload's module is uploaded under.
pub const MODULE: &str = "list-append";

/// Error codes that mean the job did not commit.
pub const DEFINITE_CODES: &[&str] = &[
    "unavailable",
    "no_quorum",
    "overloaded",
    "bad_request",
    "module_not_found",
    "invalid_bucket_key",
    "input_too_large",
    "job_failed",
    "job_trapped",
    "job_timeout",
    "job_fuel_exhausted",
    "job_memory_limit",
    "output_too_large",
    "item_too_large",
    "change_set_too_large",
];

/// What an operation asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Append this value.
    Append(u64),
    /// Read the list (through the mutating path, so it must see the latest state).
    Read,
    /// Read the list with a read-only job, which a follower may answer from its applied state:
    /// a committed prefix, possibly behind the latest.
    FollowerRead,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Append(v) => write!(f, "append {v}"),
            Kind::Read => f.write_str("read"),
            Kind::FollowerRead => f.write_str("read-only read"),
        }
    }
}

/// How an operation reached the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `POST /v1/jobs/...` to the chosen node.
    Http,
    /// The native protocol (QUIC with TLS) to the chosen node.
    Quic,
    /// `FCALL` / `FCALL_RO` on the chosen node's Redis protocol port.
    Resp,
    /// A [`grex_client::Router`] seeded with the chosen node: it follows the bucket's canary.
    Router,
    /// A simulated client ([`crate::sim`]).
    Simulated,
}

/// What came of an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged, with the list the job returned.
    Ok(Vec<u64>),
    /// Certainly not committed: the code, and the message.
    Failed(String),
    /// May or may not have committed.
    Unknown(String),
}

/// One operation of the history.
#[derive(Clone, Debug)]
pub struct Op {
    /// The client thread that ran it.
    pub worker: usize,
    /// Index of the bucket.
    pub bucket: usize,
    /// Index of the node it was sent to.
    pub node: usize,
    /// How it was sent.
    pub via: Via,
    /// What it asked.
    pub kind: Kind,
    /// When it was sent, since the run began.
    pub invoked: Duration,
    /// When its answer came (or the client gave up), since the run began.
    pub completed: Duration,
    /// What came of it.
    pub outcome: Outcome,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind;
        let outcome = match &self.outcome {
            Outcome::Ok(list) => {
                let tail: Vec<String> = list.iter().rev().take(3).rev().map(u64::to_string).collect();
                format!("ok: {} values, ending [.. {}]", list.len(), tail.join(" "))
            }
            Outcome::Failed(e) => format!("failed: {e}"),
            Outcome::Unknown(e) => format!("unknown: {e}"),
        };
        write!(
            f,
            "[{:>8.3}s .. {:>8.3}s] worker {} node {} ({:?}) bucket {} {kind} -> {outcome}",
            self.invoked.as_secs_f64(),
            self.completed.as_secs_f64(),
            self.worker,
            self.node,
            self.via,
            self.bucket
        )
    }
}

/// Classifies an HTTP answer to a job: `status`, and `body` (the list, or a JSON error).
pub fn classify(status: u16, body: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(body);
    if status == 200 {
        return listed(&text);
    }
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let code = json["code"].as_str().unwrap_or("");
    let message = json["error"].as_str().map(str::to_owned).unwrap_or_else(|| text.to_string());
    by_code(code, &format!("{status} {code}: {message}"))
}

/// A job's output as an outcome: the list it returned.
pub fn listed(text: &str) -> Outcome {
    match parse_list(text) {
        Some(list) => Outcome::Ok(list),
        None => Outcome::Unknown(format!("an answer that is no list: {text}")),
    }
}

/// An error answer with `code`, described by `what`: definite when the code says the job did
/// not commit ([`DEFINITE_CODES`]) and the message does not admit that it may have.
pub fn by_code(code: &str, what: &str) -> Outcome {
    let maybe = ["may have", "may still", "may or may not", "read before retrying"];
    if DEFINITE_CODES.contains(&code) && !maybe.iter().any(|m| what.contains(m)) {
        Outcome::Failed(what.to_owned())
    } else {
        Outcome::Unknown(what.to_owned())
    }
}

/// The values of a list as the job prints it (empty text is the empty list).
pub fn parse_list(text: &str) -> Option<Vec<u64>> {
    text.split_whitespace().map(|v| v.parse().ok()).collect()
}

/// Runs `kind` as the job on `node` (an HTTP `host:port`): see [`request`].
pub fn run_job(node: &str, bucket: &str, kind: Kind, timeout: Duration) -> Result<(u16, Vec<u8>), (bool, String)> {
    let read_only = if kind == Kind::FollowerRead { "&read_only=true" } else { "" };
    let path = format!("/v1/jobs/{bucket}?module={MODULE}{read_only}");
    request(node, "POST", &path, input(kind).as_bytes(), timeout)
}

/// One HTTP/1.1 request; the answer's status and body, or why none came. `Err((sent, why))`:
/// `sent` is false when the request never left (the connection was refused).
pub fn request(
    node: &str,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), (bool, String)> {
    request_typed(node, method, path, "text/plain", body, timeout)
}

/// [`request`] with a body of `content_type`.
pub fn request_typed(
    node: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), (bool, String)> {
    let addr: SocketAddr = node.parse().map_err(|e| (false, format!("bad address {node}: {e}")))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| (false, format!("connect: {e}")))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {node}\r\nConnection: close\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .map_err(|e| (true, format!("send: {e}")))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| (true, format!("no answer: {e}")))?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or((true, "no HTTP head".to_string()))?;
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or((true, format!("bad head {head}")))?;
    Ok((status, answer[split + 4..].to_vec()))
}

/// The job's input for `kind`.
pub fn input(kind: Kind) -> String {
    match kind {
        Kind::Append(v) => format!("append {v}"),
        Kind::Read | Kind::FollowerRead => "read".to_string(),
    }
}

/// Runs `kind` over HTTP on `node` (`host:port`); the outcome.
pub fn perform_http(node: &str, bucket: &str, kind: Kind, timeout: Duration) -> Outcome {
    match run_job(node, bucket, kind, timeout) {
        Ok((status, body)) => classify(status, &body),
        Err((false, why)) => Outcome::Failed(format!("not sent: {why}")),
        Err((true, why)) => Outcome::Unknown(why),
    }
}

/// What a bucket holds after the run: the list a read job returned once the faults healed, and
/// each node's committed copy.
#[derive(Clone, Debug, Default)]
pub struct Final {
    /// The list a `read` job returned.
    pub list: Vec<u64>,
    /// Each node's committed copy (`GET .../items/list`), by node index.
    pub copies: Vec<Vec<u64>>,
}

/// A violation of the guarantees, with the operations that show it.
#[derive(Clone, Debug)]
pub struct Anomaly {
    /// What kind (`lost`, `stale`, ...).
    pub kind: &'static str,
    /// Which bucket.
    pub bucket: usize,
    /// What is wrong.
    pub what: String,
    /// The smallest slice of the history that shows it.
    pub ops: Vec<Op>,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} (bucket {}): {}", self.kind, self.bucket, self.what)?;
        for op in &self.ops {
            writeln!(f, "    {op}")?;
        }
        Ok(())
    }
}

/// Checks `history` against the final state of each bucket; every anomaly found, at most a few
/// of each kind per bucket.
pub fn check(history: &[Op], finals: &[Final]) -> Vec<Anomaly> {
    let mut anomalies = Vec::new();
    for (bucket, fin) in finals.iter().enumerate() {
        let ops: Vec<&Op> = history.iter().filter(|o| o.bucket == bucket).collect();
        check_bucket(bucket, &ops, fin, &mut anomalies);
    }
    anomalies
}

const PER_KIND_MAX: usize = 3;

fn check_bucket(bucket: usize, ops: &[&Op], fin: &Final, out: &mut Vec<Anomaly>) {
    let mut push = |kind: &'static str, what: String, ops: Vec<Op>| {
        if out.iter().filter(|a| a.kind == kind && a.bucket == bucket).count() < PER_KIND_MAX {
            out.push(Anomaly { kind, bucket, what, ops });
        }
    };
    let list = &fin.list;
    for (node, copy) in fin.copies.iter().enumerate() {
        if copy != list {
            push(
                "divergent",
                format!("node {node} holds {} values, the read after healing returned {}", copy.len(), list.len()),
                Vec::new(),
            );
        }
    }
    let position: HashMap<u64, usize> = list.iter().enumerate().map(|(i, v)| (*v, i)).collect();
    if position.len() != list.len() {
        let mut seen = HashSet::new();
        let dup = list.iter().find(|v| !seen.insert(**v)).copied().unwrap_or_default();
        let sent_by = ops.iter().filter(|o| o.kind == Kind::Append(dup)).map(|o| (*o).clone()).collect();
        push("duplicate", format!("value {dup} is in the final list twice"), sent_by);
    }
    let sent: HashMap<u64, &Op> = ops
        .iter()
        .filter_map(|o| match o.kind {
            Kind::Append(v) => Some((v, *o)),
            Kind::Read | Kind::FollowerRead => None,
        })
        .collect();
    for v in list {
        if !sent.contains_key(v) {
            push("phantom", format!("value {v} is in the final list but was never sent"), Vec::new());
        }
    }
    for op in ops {
        match (&op.kind, &op.outcome) {
            (Kind::Append(v), Outcome::Ok(got)) if !position.contains_key(v) => push(
                "lost",
                format!("append {v} was acknowledged but is not in the final list of {} values", list.len()),
                vec![(*op).clone()],
            ),
            (Kind::Append(v), Outcome::Ok(got)) if got.last() != Some(v) => push(
                "bad-answer",
                format!("append {v} was acknowledged with a list that does not end with it"),
                vec![(*op).clone()],
            ),
            (Kind::Append(v), Outcome::Failed(_)) if position.contains_key(v) => push(
                "failed-but-committed",
                format!("append {v} failed definitely, yet it is in the final list at {}", position[v]),
                vec![(*op).clone()],
            ),
            _ => {}
        }
        if let Outcome::Ok(got) = &op.outcome
            && !list.starts_with(got)
        {
            let at = got.iter().zip(list).position(|(a, b)| a != b).unwrap_or(list.len());
            push(
                "not-a-prefix",
                format!(
                    "an answer of {} values is not a prefix of the final list of {} (they differ at position {at})",
                    got.len(),
                    list.len()
                ),
                vec![(*op).clone()],
            );
        }
    }
    check_real_time(ops, &mut push);
}

/// An operation invoked after another completed must return at least as long a list (all lists
/// being prefixes of one final list, longer means later). Read-only reads are exempt: a follower
/// may answer them from a committed state that trails the leader.
fn check_real_time(ops: &[&Op], push: &mut impl FnMut(&'static str, String, Vec<Op>)) {
    let mut by_completion: Vec<(&Op, usize)> = ops
        .iter()
        .filter_map(|o| match &o.outcome {
            Outcome::Ok(list) if o.kind != Kind::FollowerRead => Some((*o, list.len())),
            _ => None,
        })
        .collect();
    let mut by_invocation = by_completion.clone();
    by_completion.sort_by_key(|(o, _)| o.completed);
    by_invocation.sort_by_key(|(o, _)| o.invoked);
    let mut done = by_completion.iter().peekable();
    let mut longest: Option<(&Op, usize)> = None;
    for (op, len) in by_invocation {
        while let Some((earlier, earlier_len)) = done.peek().copied() {
            if earlier.completed >= op.invoked {
                break;
            }
            if longest.is_none_or(|(_, l)| *earlier_len > l) {
                longest = Some((earlier, *earlier_len));
            }
            done.next();
        }
        if let Some((earlier, earlier_len)) = longest
            && len < earlier_len
        {
            push(
                "stale",
                format!(
                    "returned {len} values, {} fewer than an operation that completed {:.3} s before it was invoked",
                    earlier_len - len,
                    (op.invoked - earlier.completed).as_secs_f64()
                ),
                vec![earlier.clone(), op.clone()],
            );
        }
    }
}

/// Counts of a history, for the report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Operations.
    pub ops: usize,
    /// Acknowledged appends.
    pub appends_ok: usize,
    /// Acknowledged reads through the leader.
    pub reads_ok: usize,
    /// Acknowledged read-only reads.
    pub follower_reads_ok: usize,
    /// Definite failures.
    pub failed: usize,
    /// Unknown outcomes.
    pub unknown: usize,
    /// Acknowledged operations by the way they were sent: HTTP, QUIC, Redis protocol, router.
    pub ok_via: [usize; 4],
}

/// Counts `history`.
pub fn tally(history: &[Op]) -> Tally {
    let mut t = Tally { ops: history.len(), ..Tally::default() };
    for op in history {
        let via = match op.via {
            Via::Http | Via::Simulated => 0,
            Via::Quic => 1,
            Via::Resp => 2,
            Via::Router => 3,
        };
        if let Outcome::Ok(_) = op.outcome {
            t.ok_via[via] += 1;
        }
        match (&op.kind, &op.outcome) {
            (Kind::Append(_), Outcome::Ok(_)) => t.appends_ok += 1,
            (Kind::Read, Outcome::Ok(_)) => t.reads_ok += 1,
            (Kind::FollowerRead, Outcome::Ok(_)) => t.follower_reads_ok += 1,
            (_, Outcome::Failed(_)) => t.failed += 1,
            (_, Outcome::Unknown(_)) => t.unknown += 1,
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(invoked_ms: u64, completed_ms: u64, kind: Kind, outcome: Outcome) -> Op {
        Op {
            worker: 0,
            bucket: 0,
            node: 0,
            via: Via::Http,
            kind,
            invoked: Duration::from_millis(invoked_ms),
            completed: Duration::from_millis(completed_ms),
            outcome,
        }
    }

    fn fin(list: &[u64]) -> Final {
        Final { list: list.to_vec(), copies: vec![list.to_vec(); 3] }
    }

    fn kinds(anomalies: &[Anomaly]) -> Vec<&'static str> {
        anomalies.iter().map(|a| a.kind).collect()
    }

    #[test]
    fn a_clean_history_has_no_anomaly() {
        let h = vec![
            op(0, 5, Kind::Append(1), Outcome::Ok(vec![1])),
            op(6, 9, Kind::Append(2), Outcome::Ok(vec![1, 2])),
            op(7, 8, Kind::Read, Outcome::Ok(vec![1])),
            op(10, 12, Kind::Append(3), Outcome::Unknown("timeout".into())),
            op(10, 12, Kind::Append(4), Outcome::Failed("no_quorum".into())),
        ];
        assert!(check(&h, &[fin(&[1, 2, 3])]).is_empty());
    }

    #[test]
    fn an_acknowledged_append_missing_from_the_end_is_lost() {
        let h = vec![
            op(0, 5, Kind::Append(1), Outcome::Ok(vec![1])),
            op(6, 9, Kind::Append(2), Outcome::Ok(vec![1, 2])),
            op(10, 11, Kind::Append(3), Outcome::Ok(vec![1, 3])),
        ];
        let found = kinds(&check(&h, &[fin(&[1, 3])]));
        assert!(found.contains(&"lost") && found.contains(&"not-a-prefix"), "{found:?}");
    }

    #[test]
    fn a_read_that_misses_a_completed_append_is_stale() {
        let h = vec![
            op(0, 5, Kind::Append(1), Outcome::Ok(vec![1])),
            op(6, 9, Kind::Append(2), Outcome::Ok(vec![1, 2])),
            op(10, 11, Kind::Read, Outcome::Ok(vec![1])),
        ];
        assert_eq!(kinds(&check(&h, &[fin(&[1, 2])])), vec!["stale"]);
    }

    #[test]
    fn a_read_only_read_may_trail_but_must_be_a_committed_prefix() {
        let trailing = vec![
            op(0, 5, Kind::Append(1), Outcome::Ok(vec![1])),
            op(6, 9, Kind::Append(2), Outcome::Ok(vec![1, 2])),
            op(10, 11, Kind::FollowerRead, Outcome::Ok(vec![1])),
        ];
        assert!(check(&trailing, &[fin(&[1, 2])]).is_empty());
        let uncommitted = vec![
            op(0, 5, Kind::Append(1), Outcome::Ok(vec![1])),
            op(6, 9, Kind::Append(2), Outcome::Unknown("timeout".into())),
            op(10, 11, Kind::FollowerRead, Outcome::Ok(vec![1, 2])),
        ];
        assert_eq!(kinds(&check(&uncommitted, &[fin(&[1])])), vec!["not-a-prefix"]);
    }

    #[test]
    fn concurrent_operations_may_see_each_other_in_either_order() {
        let h = vec![op(0, 10, Kind::Append(1), Outcome::Ok(vec![1])), op(1, 9, Kind::Read, Outcome::Ok(vec![]))];
        assert!(check(&h, &[fin(&[1])]).is_empty());
    }

    #[test]
    fn duplicates_phantoms_divergence_and_committed_failures_are_found() {
        let h = vec![
            op(0, 5, Kind::Append(1), Outcome::Ok(vec![1])),
            op(6, 9, Kind::Append(2), Outcome::Failed("unavailable".into())),
        ];
        let mut f = fin(&[1, 1, 2, 9]);
        f.copies[2] = vec![1];
        let found = kinds(&check(&h, &[f]));
        for kind in ["duplicate", "phantom", "divergent", "failed-but-committed"] {
            assert!(found.contains(&kind), "{kind} not in {found:?}");
        }
    }

    #[test]
    fn answers_are_classified_by_code_and_by_what_the_message_admits() {
        assert_eq!(classify(200, b"1 2 3"), Outcome::Ok(vec![1, 2, 3]));
        assert_eq!(classify(200, b""), Outcome::Ok(vec![]));
        assert!(matches!(classify(503, br#"{"code":"no_quorum","error":"x"}"#), Outcome::Failed(_)));
        assert!(matches!(classify(503, br#"{"code":"outcome_unknown","error":"x"}"#), Outcome::Unknown(_)));
        let old_style = br#"{"code":"unavailable","error":"went down; the job may have committed"}"#;
        assert!(matches!(classify(503, old_style), Outcome::Unknown(_)));
    }
}
