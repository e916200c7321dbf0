//! The Redis protocol endpoint (RESP2 and RESP3, `grex serve --resp ADDR`), so redis-cli and Redis
//! client libraries can talk to any node.
//!
//! A Redis key is a bucket and a hash field is an item. The hash commands run as built-in
//! operations (`data::builtin`) and `FCALL`/`FCALL_RO` run modules, all through [`Node::run_job`],
//! so any node serves any key: it forwards to the flock's leader like a proxy. `docs/resp.md` lists
//! the commands.
//!
//! Limits: a request's size is bounded (bulk strings by [`RespLimits::bulk_bytes_max`], argument
//! count, inline lines), a request must arrive whole within [`REQUEST_IDLE_TIMEOUT`] of its first
//! byte or the connection is closed, and connections are capped: when all are taken, the one idle
//! longest (no command running) is closed for a new client (`api::conns`). Pipelined commands on different
//! keys run at once (up to 256 per connection), commands on one key in order, and
//! replies come back in order.

mod cluster;
mod command;
mod observe;
mod views;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use grex_client::proto::{self, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::access::Caller;
use crate::api::Gate;
use crate::api::budget::{Claim, ReadBudget};
use crate::api::conns::{ClientStream, Conn, ConnTable, accept_loop, secure};
use crate::data::builtin::{self, Builtin, BuiltinReply};
use crate::error::RemoteError;
use crate::metrics::Protocol;
use crate::node::{Node, Service};
use command::{Command, Kind, Refused, arity};
use observe::{Client, ClientGuard, Observed, Outcome};

/// Open connections at most; when all are taken, the longest-idle one is closed for a new client,
/// and while all are busy, new ones wait to be accepted.
const CONNECTIONS_MAX: usize = 1024;
/// Arguments in one command at most.
const ARGS_MAX: usize = 1024 * 1024;
/// An inline command (or a length line) longer than this is refused.
const INLINE_BYTES_MAX: usize = 64 * 1024;
/// A request not whole this long after its first byte arrived closes its connection.
pub const REQUEST_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies buffered before they are written out, while more pipelined requests wait.
const REPLY_FLUSH_BYTES: usize = 64 * 1024;
/// Pipelined commands running at once on one connection at most; it reads no further until one
/// is answered.
const PIPELINE_MAX: usize = 256;
/// Request bytes of the commands running at once on one connection at most (a larger request
/// runs alone).
const PIPELINE_BYTES_MAX: usize = 4 << 20;

/// Size limits for parsing.
#[derive(Clone, Copy, Debug)]
pub struct RespLimits {
    /// The largest bulk string (a module upload is the largest request).
    pub bulk_bytes_max: usize,
    /// The largest whole request.
    pub request_bytes_max: usize,
    /// How long a request may take to arrive, from its first byte, before the connection is
    /// closed.
    pub half_sent_max: Duration,
    /// Request bytes of pipelined commands waiting or running, over every connection (each
    /// connection's first runs whatever this holds).
    pub pipelined_bytes_max: usize,
}

impl RespLimits {
    fn for_node(node: &Node) -> RespLimits {
        let limits = &node.config().limits;
        let bulk = limits.module_bytes_max.max(limits.input_bytes_max).max(limits.item_bytes_max);
        RespLimits {
            bulk_bytes_max: bulk,
            request_bytes_max: bulk + 1024 * 1024,
            half_sent_max: REQUEST_IDLE_TIMEOUT,
            pipelined_bytes_max: node.config().pipelined_bytes_max,
        }
    }
}

/// Why a request could not be parsed. The connection gets an error reply and is closed, since
/// the rest of its byte stream cannot be trusted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    /// Not RESP.
    #[error("Protocol error: {0}")]
    Protocol(String),
    /// Over a size limit.
    #[error("Protocol error: {0}")]
    TooLarge(String),
}

/// A parsed command's arguments and the bytes it took; `None` while more bytes are needed.
pub type Parsed = Option<(Vec<Vec<u8>>, usize)>;

/// Parses one command from the front of `buf`: its arguments and how many bytes it took, or
/// `None` if more bytes are needed. Accepts RESP arrays of bulk strings and inline commands.
pub fn parse_command(buf: &[u8], limits: &RespLimits) -> Result<Parsed, RespError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    if first != b'*' {
        return parse_inline(buf);
    }
    let Some((count, mut at)) = parse_length_line(buf, 0, b'*')? else { return Ok(None) };
    if count <= 0 {
        return Ok(Some((Vec::new(), at)));
    }
    let count = count as usize;
    if count > ARGS_MAX {
        return Err(RespError::TooLarge(format!("{count} arguments, over the limit of {ARGS_MAX}")));
    }
    let mut args = Vec::with_capacity(count.min(1024));
    let mut total = 0usize;
    for _ in 0..count {
        if at >= buf.len() {
            return Ok(None);
        }
        if buf[at] != b'$' {
            return Err(RespError::Protocol(format!("expected '$', got '{}'", char::from(buf[at]).escape_default())));
        }
        let Some((len, start)) = parse_length_line(buf, at, b'$')? else { return Ok(None) };
        if len < 0 {
            return Err(RespError::Protocol("invalid bulk length".into()));
        }
        let len = len as usize;
        if len > limits.bulk_bytes_max {
            return Err(RespError::TooLarge(format!(
                "a bulk string of {len} bytes, over the limit of {} bytes",
                limits.bulk_bytes_max
            )));
        }
        total += len;
        if total > limits.request_bytes_max {
            return Err(RespError::TooLarge(format!("a request over the limit of {} bytes", limits.request_bytes_max)));
        }
        let end = start + len;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(RespError::Protocol("bulk string not followed by CRLF".into()));
        }
        args.push(buf[start..end].to_vec());
        at = end + 2;
    }
    Ok(Some((args, at)))
}

/// `<marker><integer>\r\n` at `at`: the integer and where the line ends.
fn parse_length_line(buf: &[u8], at: usize, marker: u8) -> Result<Option<(i64, usize)>, RespError> {
    debug_assert_eq!(buf[at], marker);
    let rest = &buf[at + 1..];
    let window = &rest[..rest.len().min(24)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if rest.len() >= 24 { Err(RespError::Protocol("invalid length".into())) } else { Ok(None) };
    };
    if rest.len() < cr + 2 {
        return Ok(None);
    }
    if rest[cr + 1] != b'\n' {
        return Err(RespError::Protocol("length not followed by CRLF".into()));
    }
    let text = std::str::from_utf8(&rest[..cr]).map_err(|_| RespError::Protocol("invalid length".into()))?;
    let n: i64 =
        text.parse().map_err(|_| RespError::Protocol(format!("invalid length '{}'", text.escape_default())))?;
    Ok(Some((n, at + 1 + cr + 2)))
}

fn parse_inline(buf: &[u8]) -> Result<Parsed, RespError> {
    let Some(nl) = buf.iter().take(INLINE_BYTES_MAX + 1).position(|&b| b == b'\n') else {
        return if buf.len() > INLINE_BYTES_MAX {
            Err(RespError::TooLarge(format!("an inline command over {INLINE_BYTES_MAX} bytes")))
        } else {
            Ok(None)
        };
    };
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let args = line.split(|b| b.is_ascii_whitespace()).filter(|a| !a.is_empty()).map(<[u8]>::to_vec).collect();
    Ok(Some((args, nl + 1)))
}

/// A reply, written as RESP2 or RESP3.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// `+OK`.
    Simple(String),
    /// `-ERR ...` (the text includes the error's prefix).
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n` bytes, or null.
    Bulk(Option<Vec<u8>>),
    /// `*n` replies.
    Array(Vec<Reply>),
    /// A map (RESP3 `%n`; a flat array in RESP2).
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    fn err(text: impl Into<String>) -> Reply {
        Reply::Error(format!("ERR {}", text.into()))
    }

    fn bulk(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply::Bulk(Some(bytes.into()))
    }

    /// Appends the reply's bytes.
    pub fn write(&self, out: &mut Vec<u8>, resp3: bool) {
        match self {
            Reply::Simple(s) => line(out, b'+', s.as_bytes()),
            Reply::Error(s) => line(out, b'-', s.replace(['\r', '\n'], " ").as_bytes()),
            Reply::Int(n) => line(out, b':', n.to_string().as_bytes()),
            Reply::Bulk(None) if resp3 => out.extend_from_slice(b"_\r\n"),
            Reply::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Reply::Bulk(Some(bytes)) => {
                line(out, b'$', bytes.len().to_string().as_bytes());
                out.extend_from_slice(bytes);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Array(items) => {
                line(out, b'*', items.len().to_string().as_bytes());
                for item in items {
                    item.write(out, resp3);
                }
            }
            Reply::Map(pairs) => {
                if resp3 {
                    line(out, b'%', pairs.len().to_string().as_bytes());
                } else {
                    line(out, b'*', (pairs.len() * 2).to_string().as_bytes());
                }
                for (k, v) in pairs {
                    k.write(out, resp3);
                    v.write(out, resp3);
                }
            }
        }
    }
}

fn line(out: &mut Vec<u8>, marker: u8, text: &[u8]) {
    out.push(marker);
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

/// Binds the RESP listener and serves from when `gate` opens until it stops.
pub(crate) async fn start(
    node: Node,
    addr: SocketAddr,
    mut gate: Gate,
    budget: Arc<ReadBudget>,
    tls: Option<TlsAcceptor>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let limits = RespLimits::for_node(&node);
    let task = tokio::spawn(async move {
        let Some(service) = gate.opened().await else { return };
        let (table, stopped) = (ConnTable::counted(CONNECTIONS_MAX, node.metrics(), Protocol::Resp), gate.stopped);
        let observed = Arc::new(Observed::new());
        serve(listener, Serving { node, service, limits, budget, tls, observed }, table, stopped).await;
    });
    Ok((bound, task))
}

/// What the connections of one listener share.
struct Serving {
    node: Node,
    service: Arc<dyn Service>,
    limits: RespLimits,
    /// The node's budget for requests arriving.
    budget: Arc<ReadBudget>,
    /// TLS, when the listener speaks it.
    tls: Option<TlsAcceptor>,
    /// What the listener keeps of its commands and clients.
    observed: Arc<Observed>,
}

/// Accepts and serves connections until `stopped`.
async fn serve(listener: TcpListener, serving: Serving, table: Arc<ConnTable>, stopped: watch::Receiver<bool>) {
    let Serving { node, service, limits, budget, tls, observed } = serving;
    let pipelined = ReadBudget::new(limits.pipelined_bytes_max);
    accept_loop(&listener, &table, stopped.clone(), "RESP", |stream, remote, conn| {
        let listed = observed.connect(remote);
        let commands = Commands {
            node: node.clone(),
            service: service.clone(),
            follower_reads: false,
            caller: Caller::from(remote),
            observed: observed.clone(),
            client: listed.client.clone(),
            bulk_bytes_max: limits.bulk_bytes_max,
        };
        let connection = Connection {
            commands,
            limits,
            claim: budget.claim(),
            pipelined: pipelined.clone(),
            resp3: false,
            _listed: listed,
        };
        let (stopped, tls) = (stopped.clone(), tls.clone());
        tokio::spawn(async move {
            let stream = match secure(stream, tls.as_ref()).await {
                Ok(stream) => stream,
                Err(e) => return tracing::debug!(%remote, error = %e, "RESP TLS handshake failed"),
            };
            if let Err(e) = connection.serve(stream, conn, stopped).await {
                tracing::debug!(%remote, error = %e, "RESP connection ended");
            }
        });
    })
    .await;
}

struct Connection {
    commands: Commands,
    limits: RespLimits,
    /// The bytes buffered and not yet taken as commands, held on the node's budget.
    claim: Claim,
    /// Room for pipelined commands, shared by every connection.
    pipelined: Arc<ReadBudget>,
    resp3: bool,
    /// Listed in `CLIENT LIST` while it lives.
    _listed: ClientGuard,
}

/// What a command needs of its connection: cloned into each running command.
#[derive(Clone)]
struct Commands {
    node: Node,
    /// Jobs, uploads, canaries and the cluster's topology go through it.
    service: Arc<dyn Service>,
    /// After `READONLY` (as with a Redis Cluster replica), hash reads may run on a follower that
    /// herds the key's flock and see its applied state; by default they run on the flock's leader,
    /// so a client reads its own writes through any node.
    follower_reads: bool,
    /// Who the connection signed in as (`AUTH`, `HELLO ... AUTH`).
    caller: Caller,
    /// What the listener keeps of its commands and clients.
    observed: Arc<Observed>,
    /// The connection as `CLIENT LIST` shows it.
    client: Arc<Client>,
    /// The largest bulk string a request may carry (`CONFIG GET proto-max-bulk-len`).
    bulk_bytes_max: usize,
}

/// What to do after a command.
enum Then {
    Continue,
    Close,
}

/// The commands of one connection that are running. Commands on different keys run at once,
/// commands on one key run one after another, and replies go out in the order the commands came:
/// since every command touches only its own keys, the client sees what running them one by one
/// would give.
#[derive(Default)]
struct Pipeline {
    running: FuturesOrdered<BoxFuture<'static, (Reply, usize)>>,
    /// Request bytes of the running commands.
    bytes: usize,
    /// The last command started on each key: the channel closes when it finishes.
    last_on_key: HashMap<Vec<u8>, watch::Receiver<()>>,
}

impl Pipeline {
    /// Whether another command may start: the count and request bytes in flight are bounded
    /// (one large request may always run alone).
    fn has_room(&self) -> bool {
        self.running.len() < PIPELINE_MAX && (self.bytes < PIPELINE_BYTES_MAX || self.running.is_empty())
    }

    fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Starts `args` (`size` request bytes, held by `room` until answered) once the commands
    /// before it on its keys are done.
    fn start(&mut self, commands: Commands, parsed: Result<Command, Refused>, size: usize, room: Option<Claim>) {
        let mut keys = parsed.as_ref().map_or_else(|_| Vec::new(), Command::keys);
        keys.sort_unstable();
        keys.dedup();
        // The sender lives as long as the command runs; its receivers see the channel close.
        let (running, finished) = watch::channel(());
        let before: Vec<watch::Receiver<()>> =
            keys.into_iter().filter_map(|key| self.last_on_key.insert(key.to_vec(), finished.clone())).collect();
        if self.last_on_key.len() > 4 * PIPELINE_MAX {
            // Keys whose last command has finished need no entry.
            self.last_on_key.retain(|_, finished| finished.has_changed().is_ok());
        }
        self.bytes += size;
        self.running.push_back(
            async move {
                for mut earlier in before {
                    // Nothing is ever sent: this returns when the earlier command drops its sender.
                    while earlier.changed().await.is_ok() {}
                }
                let reply = commands.run(parsed).await;
                drop(running);
                drop(room);
                (reply, size)
            }
            .boxed(),
        );
    }

    /// The next reply, in order, once it is ready (`None` if nothing runs).
    async fn next(&mut self) -> Option<Reply> {
        let (reply, size) = self.running.next().await?;
        self.bytes -= size;
        Some(reply)
    }

    /// Writes every reply that is ready now, in order.
    fn take_ready(&mut self, out: &mut Vec<u8>, resp3: bool) {
        while let Some(Some(reply)) = self.next().now_or_never() {
            reply.write(out, resp3);
        }
    }

    /// Waits for every running command and writes its reply.
    async fn finish(&mut self, stream: &mut dyn ClientStream, out: &mut Vec<u8>, resp3: bool) -> std::io::Result<()> {
        while let Some(reply) = self.next().await {
            reply.write(out, resp3);
            if out.len() >= REPLY_FLUSH_BYTES {
                stream.write_all(out).await?;
                out.clear();
            }
        }
        Ok(())
    }

    /// Answers every running command, then adds `last`, and writes it all out: the connection
    /// ends after this.
    async fn close(
        &mut self,
        stream: &mut dyn ClientStream,
        out: &mut Vec<u8>,
        resp3: bool,
        last: Option<Reply>,
    ) -> std::io::Result<()> {
        self.finish(stream, out, resp3).await?;
        if let Some(reply) = last {
            reply.write(out, resp3);
        }
        stream.write_all(out).await
    }
}

impl Connection {
    /// Serves one connection until the client closes it, the table asks it to make room while no
    /// command runs, a request takes too long to arrive, or the server stops.
    async fn serve(
        mut self,
        mut stream: Box<dyn ClientStream>,
        conn: Conn,
        mut stopped: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut pipeline = Pipeline::default();
        // When the request buffered in part must be whole: its first byte's arrival plus
        // `half_sent_max`.
        let mut deadline: Option<Instant> = None;
        let mut busy = None;
        loop {
            // Start every complete command buffered, as far as the pipeline has room.
            let mut consumed = 0;
            // The node-wide room for pipelined commands is full: this connection reads no more
            // until its own commands are answered.
            let mut no_room = false;
            while pipeline.has_room() {
                match parse_command(&buf[consumed..], &self.limits) {
                    Ok(Some((args, used))) => {
                        if args.is_empty() {
                            consumed += used;
                            continue;
                        }
                        match Command::parse(args) {
                            Ok(command) if command.spec().alone => {
                                consumed += used;
                                busy.get_or_insert_with(|| conn.busy());
                                pipeline.finish(&mut stream, &mut out, self.resp3).await?;
                                let (reply, then) = self.execute(command).await;
                                reply.write(&mut out, self.resp3);
                                if matches!(then, Then::Close) {
                                    return pipeline.close(&mut stream, &mut out, self.resp3, None).await;
                                }
                            }
                            parsed if pipeline.is_empty() && consumed + used == buf.len() => {
                                // One command and nothing pipelined behind it: the cheapest way is
                                // to run it right here.
                                consumed += used;
                                busy.get_or_insert_with(|| conn.busy());
                                self.commands.run(parsed).await.write(&mut out, self.resp3);
                            }
                            parsed => {
                                // A connection's first command runs whatever the others hold.
                                let room = if pipeline.is_empty() {
                                    None
                                } else if let Some(room) = self.pipelined.hold(used) {
                                    Some(room)
                                } else {
                                    no_room = true;
                                    break;
                                };
                                consumed += used;
                                busy.get_or_insert_with(|| conn.busy());
                                pipeline.start(self.commands.clone(), parsed, used, room);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let error = Some(Reply::err(e.to_string()));
                        return pipeline.close(&mut stream, &mut out, self.resp3, error).await;
                    }
                }
            }
            buf.drain(..consumed);
            // Shrinking: never refused.
            let _ = self.claim.set(buf.len());
            // The clock of the request in part runs from its first byte, and only while it is
            // being read: a new one begins where a whole one was taken, or with the next read.
            if buf.is_empty() {
                deadline = None;
            } else if consumed > 0 || !pipeline.has_room() {
                deadline = Some(Instant::now() + self.limits.half_sent_max);
            }
            pipeline.take_ready(&mut out, self.resp3);
            if !out.is_empty() {
                stream.write_all(&out).await?;
                out.clear();
            }
            if pipeline.is_empty() {
                busy = None;
                if no_room {
                    // Its own commands are done: the one that waited runs now.
                    continue;
                }
            }
            // Wait for a reply, for more bytes (while there is room to start more), for the
            // deadline of a request in part, or, with no command running, for the table to ask
            // this connection to make room.
            let reading = pipeline.has_room() && !no_room;
            tokio::select! {
                Some(reply) = pipeline.next() => reply.write(&mut out, self.resp3),
                read = stream.read(&mut chunk), if reading => match read? {
                    // The client is done sending: answer what it sent.
                    0 => return pipeline.close(&mut stream, &mut out, self.resp3, None).await,
                    read => {
                        if buf.is_empty() {
                            deadline = Some(Instant::now() + self.limits.half_sent_max);
                        }
                        if let Err(e) = self.claim.set(buf.len() + read) {
                            return pipeline.close(&mut stream, &mut out, self.resp3, Some(remote_error(&e))).await;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                    }
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if reading && deadline.is_some() => {
                    let error = Some(Reply::err("request not completed in time; connection closed"));
                    return pipeline.close(&mut stream, &mut out, self.resp3, error).await;
                }
                _ = conn.evicted(), if pipeline.is_empty() => return Ok(()),
                _ = stopped.changed() => return Ok(()),
            }
        }
    }

    /// Runs a command that runs alone ([`command::Spec::alone`]).
    async fn execute(&mut self, command: Command) -> (Reply, Then) {
        let started = std::time::Instant::now();
        self.commands.observed.begin(command.index, &self.commands.client);
        if let Some(refused) = self.commands.refuse(&command) {
            self.commands.observe(Some(command.index), &command.args, &refused, Outcome::Rejected, started);
            return (refused, Then::Continue);
        }
        let rest = command.rest();
        let mut then = Then::Continue;
        let reply = match command.spec().kind {
            Kind::Hello => self.hello(rest),
            Kind::Auth => match rest {
                [token] => self.auth(None, token),
                [user, token] => self.auth(Some(user), token),
                _ => arity(command.spec().name),
            },
            Kind::Acl => match command.subcommand().as_deref() {
                Some("WHOAMI") if rest.len() == 1 => match &self.commands.caller.user {
                    Some(identity) => Reply::bulk(identity.name.clone()),
                    None => Reply::bulk("default"),
                },
                _ => Reply::err("Grex supports only ACL WHOAMI; manage users with `grex user`"),
            },
            Kind::Quit => {
                then = Then::Close;
                Reply::ok()
            }
            Kind::Select => match rest {
                [db] if db.as_slice() == b"0" => Reply::ok(),
                _ => Reply::err("DB index is out of range (Grex has only database 0)"),
            },
            Kind::ReadOnly | Kind::ReadWrite => {
                self.commands.follower_reads = command.spec().kind == Kind::ReadOnly;
                Reply::ok()
            }
            Kind::Client => views::client(&self.commands, rest),
            Kind::Command => command::command(rest),
            Kind::Config => views::config(&self.commands, rest),
            Kind::Cluster => cluster::command(&self.commands.node, self.commands.service.as_ref(), rest),
            Kind::GrexModule => self.commands.module(rest).await,
            // The others may run beside other commands.
            _ => self.commands.dispatch(&command).await,
        };
        let outcome = if matches!(reply, Reply::Error(_)) { Outcome::Failed } else { Outcome::Ok };
        self.commands.observe(Some(command.index), &command.args, &reply, outcome, started);
        (reply, then)
    }

    /// `AUTH [username] token`: signs the connection in as the token's user (who must be
    /// `username` when it is given; `default`, as Redis clients send it, stands for any).
    fn auth(&mut self, user: Option<&[u8]>, token: &[u8]) -> Reply {
        let wrong = || Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into());
        let Ok(token) = std::str::from_utf8(token) else { return wrong() };
        let signed_in = super::sign_in(self.commands.service.as_ref(), self.commands.caller.clone(), token);
        match signed_in {
            Ok((caller, info)) if user.is_none_or(|u| u == info.name.as_bytes() || u == b"default") => {
                self.commands.caller = caller;
                *observe::lock(&self.commands.client.user) = info.name;
                Reply::ok()
            }
            _ => wrong(),
        }
    }

    /// `HELLO [protover [AUTH username password] [SETNAME name]]`.
    fn hello(&mut self, args: &[Vec<u8>]) -> Reply {
        let mut resp3 = self.resp3;
        if let Some(version) = args.first() {
            match version.as_slice() {
                b"2" => resp3 = false,
                b"3" => resp3 = true,
                _ => return Reply::Error("NOPROTO unsupported protocol version".into()),
            }
        }
        let mut options = args.iter().skip(1);
        while let Some(option) = options.next() {
            match option.to_ascii_uppercase().as_slice() {
                b"AUTH" => {
                    let (Some(user), Some(token)) = (options.next(), options.next()) else {
                        return Reply::err("HELLO AUTH takes a username and a password (the user's token)");
                    };
                    if let error @ Reply::Error(_) = self.auth(Some(user), token) {
                        return error;
                    }
                }
                b"SETNAME" => match options.next() {
                    Some(name) => {
                        *observe::lock(&self.commands.client.name) = String::from_utf8_lossy(name).into_owned();
                    }
                    None => return Reply::err("HELLO SETNAME takes a name"),
                },
                _ => {
                    return Reply::err(
                        "syntax error in HELLO: HELLO [protover [AUTH username password] [SETNAME name]]",
                    );
                }
            }
        }
        // HELLO answers who the server is: only to a caller who may see the cluster.
        let ping = Command::parse(vec![b"PING".to_vec()]).ok().expect("PING is in the table");
        if let Some(refused) = self.commands.refuse(&ping) {
            return refused;
        }
        self.resp3 = resp3;
        self.commands.client.resp.store(if resp3 { 3 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
        let status = self.commands.node.status();
        Reply::Map(vec![
            (Reply::bulk("server"), Reply::bulk("grex")),
            (Reply::bulk("version"), Reply::bulk(env!("CARGO_PKG_VERSION"))),
            (Reply::bulk("proto"), Reply::Int(if self.resp3 { 3 } else { 2 })),
            (Reply::bulk("id"), Reply::bulk(status.node)),
            (Reply::bulk("mode"), Reply::bulk("standalone")),
            (Reply::bulk("role"), Reply::bulk("master")),
            (Reply::bulk("modules"), Reply::Array(Vec::new())),
        ])
    }
}

impl Commands {
    /// Counts an answered command: in the node's metrics (a name no command has counts as
    /// `UNKNOWN`, so clients cannot add labels) and in the listener's own figures.
    fn observe(
        &self,
        index: Option<usize>,
        args: &[Vec<u8>],
        reply: &Reply,
        outcome: Outcome,
        started: std::time::Instant,
    ) {
        let name = index.map_or("UNKNOWN", |i| command::COMMANDS[i].name);
        self.node.metrics().resp_command(name, !matches!(reply, Reply::Error(_)));
        if let Some(index) = index {
            self.observed.record(index, args, outcome, started.elapsed(), &self.client);
        }
    }

    /// The reply refusing a command the connection's caller may not run (`NOAUTH` before a
    /// sign-in, `NOPERM` without the permission), or `None` to run it.
    fn refuse(&self, command: &Command) -> Option<Reply> {
        let action = command.action()?;
        let e = self.service.authorize(&self.caller, action).err()?;
        Some(match e.code {
            ErrorCode::Unauthenticated if self.caller.user.is_none() => {
                Reply::Error(format!("NOAUTH Authentication required: {}", e.message))
            }
            ErrorCode::Forbidden => Reply::Error(format!("NOPERM {}", e.message)),
            _ => remote_error(&e),
        })
    }

    /// Runs a command that may run beside others (one the table does not mark `alone`), if the
    /// connection's caller may; a request the table refused is answered with why.
    async fn run(&self, parsed: Result<Command, Refused>) -> Reply {
        let started = std::time::Instant::now();
        let command = match parsed {
            Ok(command) => command,
            Err(Refused { index, reply }) => {
                // Only a known command's figures count its refusals; the arguments are not kept.
                self.observe(index, &[], &reply, Outcome::Rejected, started);
                return reply;
            }
        };
        self.observed.begin(command.index, &self.client);
        let (reply, outcome) = match self.refuse(&command) {
            Some(refused) => (refused, Outcome::Rejected),
            None => {
                let reply = self.dispatch(&command).await;
                let outcome = if matches!(reply, Reply::Error(_)) { Outcome::Failed } else { Outcome::Ok };
                (reply, outcome)
            }
        };
        self.observe(Some(command.index), &command.args, &reply, outcome, started);
        reply
    }

    /// Runs a command the caller may run.
    async fn dispatch(&self, command: &Command) -> Reply {
        let rest = command.rest();
        let name = command.spec().name;
        match command.spec().kind {
            Kind::Ping => match rest {
                [] => Reply::Simple("PONG".into()),
                [message] => Reply::bulk(message.clone()),
                _ => arity(name),
            },
            Kind::Echo => Reply::bulk(rest[0].clone()),
            Kind::HSet | Kind::HMSet if rest.len().is_multiple_of(2) => arity(name),
            Kind::HSet => self.builtin(Builtin::HSet, rest).await,
            Kind::HMSet => match self.builtin(Builtin::HSet, rest).await {
                error @ Reply::Error(_) => error,
                _ => Reply::ok(),
            },
            Kind::HGet => self.builtin(Builtin::HGet, rest).await,
            Kind::HExists => self.builtin(Builtin::HExists, rest).await,
            Kind::HMGet => self.builtin(Builtin::HMGet, rest).await,
            Kind::HDel => self.builtin(Builtin::HDel, rest).await,
            Kind::HGetAll => self.builtin(Builtin::HGetAll, rest).await,
            Kind::HKeys => self.builtin(Builtin::HKeys, rest).await,
            Kind::HLen => self.builtin(Builtin::HLen, rest).await,
            Kind::Del | Kind::Exists => {
                let op = if command.spec().kind == Kind::Exists { Builtin::Exists } else { Builtin::Del };
                let mut total = 0;
                for key in rest {
                    match self.builtin(op, std::slice::from_ref(key)).await {
                        Reply::Int(n) => total += n,
                        other => return other,
                    }
                }
                Reply::Int(total)
            }
            Kind::Type => match self.builtin(Builtin::Exists, rest).await {
                Reply::Int(0) => Reply::Simple("none".into()),
                Reply::Int(_) => Reply::Simple("hash".into()),
                other => other,
            },
            Kind::FCall | Kind::FCallRo => self.fcall(rest, command.spec().kind == Kind::FCallRo).await,
            Kind::GrexCanary => self.canary(&rest[0]).await,
            Kind::Info => views::info(self, rest).await,
            Kind::DbSize => views::dbsize(self).await,
            Kind::Scan => views::scan(self, rest).await,
            Kind::Slowlog => views::slowlog(&self.observed, rest),
            Kind::Latency => views::latency(&self.observed, rest),
            // The commands that run alone are run by `Connection::execute`.
            Kind::Hello
            | Kind::Auth
            | Kind::Acl
            | Kind::Quit
            | Kind::Select
            | Kind::ReadOnly
            | Kind::ReadWrite
            | Kind::Client
            | Kind::Command
            | Kind::Config
            | Kind::Cluster
            | Kind::GrexModule => Reply::err(format!("{name} runs alone")),
        }
    }

    /// Runs a built-in on `args[0]` (the key) with the remaining arguments.
    async fn builtin(&self, op: Builtin, args: &[Vec<u8>]) -> Reply {
        let input = builtin::encode_args(&args[1..]);
        // A read that goes to the leader is still a read: a built-in writes only what its op says.
        let read_only = op.read_only() && self.follower_reads;
        let out = match self.service.run_job(args[0].clone(), op.module_name(), input, read_only).await {
            Ok(out) => out,
            Err(e) => return remote_error(&e),
        };
        let reply: BuiltinReply = match proto::decode_frame(&out.output) {
            Ok(reply) => reply,
            Err(e) => return Reply::err(format!("malformed built-in reply: {e}")),
        };
        match reply {
            BuiltinReply::Int(n) => Reply::Int(n),
            BuiltinReply::Value(v) => Reply::Bulk(v),
            BuiltinReply::Values(vs) => Reply::Array(vs.into_iter().map(Reply::Bulk).collect()),
            BuiltinReply::Fields(fs) => Reply::Array(fs.into_iter().map(Reply::bulk).collect()),
            BuiltinReply::Pairs(ps) => {
                Reply::Map(ps.into_iter().map(|(f, v)| (Reply::bulk(f), Reply::bulk(v))).collect())
            }
        }
    }

    /// `FCALL name numkeys key [arg ...]`: the job's input is the arguments joined by spaces.
    async fn fcall(&self, args: &[Vec<u8>], read_only: bool) -> Reply {
        let name = String::from_utf8_lossy(&args[0]).into_owned();
        if args[1].as_slice() != b"1" {
            return Reply::err(format!(
                "numkeys must be 1: a Grex job runs on one bucket (got '{}')",
                String::from_utf8_lossy(&args[1])
            ));
        }
        let Some(key) = args.get(2) else { return Reply::err("FCALL with numkeys 1 needs a key") };
        if name.starts_with(builtin::BUILTIN_PREFIX) {
            return Reply::err("built-ins are called as Redis commands, not with FCALL");
        }
        let input = args[3..].join(&b' ');
        match self.service.run_job(key.clone(), name, input, read_only).await {
            Ok(out) => Reply::bulk(out.output),
            Err(e) => remote_error(&e),
        }
    }

    /// `GREX.MODULE LOAD name wasm` stores a module; `GREX.MODULE DELETE name` deletes a name
    /// (answering the id it pointed to); `GREX.MODULE LIST` names them.
    async fn module(&self, args: &[Vec<u8>]) -> Reply {
        let sub = args.first().map(|s| String::from_utf8_lossy(s).to_ascii_uppercase());
        match (sub.as_deref(), args) {
            (Some("LOAD"), [_, name, wasm]) => {
                let name = String::from_utf8_lossy(name);
                match self.service.put_module(name.into_owned(), wasm.clone()).await {
                    Ok(info) => Reply::bulk(info.id),
                    Err(e) => remote_error(&e),
                }
            }
            (Some("DELETE"), [_, name]) => {
                let name = String::from_utf8_lossy(name);
                match self.service.delete_module(name.into_owned()).await {
                    Ok(info) => Reply::bulk(info.id),
                    Err(e) => remote_error(&e),
                }
            }
            (Some("LIST"), [_]) => Reply::Array(
                self.node
                    .modules()
                    .into_iter()
                    .map(|m| {
                        Reply::Map(vec![
                            (Reply::bulk("name"), Reply::bulk(m.name)),
                            (Reply::bulk("id"), Reply::bulk(m.id)),
                        ])
                    })
                    .collect(),
            ),
            _ => Reply::err("usage: GREX.MODULE LOAD name wasm-bytes | GREX.MODULE DELETE name | GREX.MODULE LIST"),
        }
    }

    async fn canary(&self, key: &[u8]) -> Reply {
        match self.service.canary(key.to_vec(), false).await {
            Ok(c) => Reply::Map(vec![
                (Reply::bulk("url"), Reply::bulk(c.url)),
                (Reply::bulk("node"), Reply::bulk(c.node)),
                (Reply::bulk("flock"), Reply::Int(i64::from(c.flock))),
                (Reply::bulk("role"), Reply::bulk(c.role)),
                (Reply::bulk("bucket_version"), Reply::Int(c.bucket_version as i64)),
            ]),
            Err(e) => remote_error(&e),
        }
    }
}

/// A Grex error as a Redis error reply: `ERR message (code)`; `BUSY` when overloaded, `TRYAGAIN`
/// when the cluster is between leaders.
fn remote_error(e: &RemoteError) -> Reply {
    let prefix = match e.code {
        ErrorCode::Overloaded => "BUSY",
        ErrorCode::Unavailable | ErrorCode::NoQuorum => "TRYAGAIN",
        _ => "ERR",
    };
    Reply::Error(format!("{prefix} {} ({})", e.message, e.code))
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;

    const LIMITS: RespLimits = RespLimits {
        bulk_bytes_max: 64,
        request_bytes_max: 100,
        half_sent_max: Duration::from_millis(300),
        pipelined_bytes_max: 1 << 20,
    };

    /// Every command in `bytes`, read whole.
    fn parse_all(bytes: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, RespError> {
        parse_streamed(bytes, &[])
    }

    /// Feeds `wire` to the parser the way a connection reads it: in pieces cut at `cuts`, parsing
    /// every complete command after each piece and keeping the rest buffered.
    fn parse_streamed(wire: &[u8], cuts: &[usize]) -> Result<Vec<Vec<Vec<u8>>>, RespError> {
        let mut ends: Vec<usize> = cuts.iter().map(|cut| cut % (wire.len() + 1)).collect();
        ends.push(wire.len());
        ends.sort_unstable();
        let (mut buf, mut out, mut from) = (Vec::new(), Vec::new(), 0);
        for end in ends {
            buf.extend_from_slice(&wire[from..end]);
            from = end;
            while let Some((args, used)) = parse_command(&buf, &LIMITS)? {
                assert!(used > 0 && used <= buf.len(), "used {used} of {} bytes", buf.len());
                out.push(args);
                buf.drain(..used);
            }
        }
        Ok(out)
    }

    #[test]
    fn arrays_inline_commands_and_pipelines_parse() {
        let wire = b"*2\r\n$4\r\nPING\r\n$2\r\nhi\r\nPING\r\n*1\r\n$0\r\n\r\n";
        let parsed = parse_all(wire).unwrap();
        assert_eq!(parsed, vec![vec![b"PING".to_vec(), b"hi".to_vec()], vec![b"PING".to_vec()], vec![Vec::new()]]);
    }

    #[test]
    fn every_split_of_a_request_waits_for_the_rest() {
        let wire = b"*3\r\n$4\r\nHSET\r\n$3\r\nkey\r\n$5\r\nfield\r\n";
        for cut in 0..wire.len() {
            assert_eq!(parse_command(&wire[..cut], &LIMITS).unwrap(), None, "cut at {cut}");
        }
        assert!(parse_command(wire, &LIMITS).unwrap().is_some());
    }

    #[test]
    fn oversized_and_malformed_requests_are_refused() {
        let big = b"*1\r\n$65\r\n";
        assert!(matches!(parse_command(big, &LIMITS), Err(RespError::TooLarge(_))));
        let many = b"*99999999\r\n";
        assert!(matches!(parse_command(many, &LIMITS), Err(RespError::TooLarge(_))));
        let total = b"*2\r\n$60\r\n";
        let mut wire = total.to_vec();
        wire.extend_from_slice(&[b'a'; 60]);
        wire.extend_from_slice(b"\r\n$60\r\n");
        assert!(matches!(parse_command(&wire, &LIMITS), Err(RespError::TooLarge(_))));
        for bad in
            [&b"*1\r\n:5\r\n"[..], b"*x\r\n", b"*1\r\n$-3\r\n", b"*1\r\n$2\r\nabXY", b"*111111111111111111111111111"]
        {
            assert!(matches!(parse_command(bad, &LIMITS), Err(RespError::Protocol(_))), "{bad:?}");
        }
        let long_inline = vec![b'a'; INLINE_BYTES_MAX + 1];
        assert!(matches!(parse_command(&long_inline, &LIMITS), Err(RespError::TooLarge(_))));
    }

    #[test]
    fn replies_in_both_protocol_versions() {
        let map = Reply::Map(vec![(Reply::bulk("a"), Reply::Int(1))]);
        let mut two = Vec::new();
        map.write(&mut two, false);
        Reply::Bulk(None).write(&mut two, false);
        assert_eq!(two, b"*2\r\n$1\r\na\r\n:1\r\n$-1\r\n");
        let mut three = Vec::new();
        map.write(&mut three, true);
        Reply::Bulk(None).write(&mut three, true);
        assert_eq!(three, b"%1\r\n$1\r\na\r\n:1\r\n_\r\n");
        let mut err = Vec::new();
        Reply::err("bad\r\nthing").write(&mut err, false);
        assert_eq!(err, b"-ERR bad  thing\r\n");
    }

    /// A node's RESP server on a real socket, with the test limits and room for `connections`;
    /// it stops when the sender is dropped.
    async fn serve_test_node(dir: &std::path::Path, connections: usize) -> (SocketAddr, watch::Sender<bool>) {
        serve_test_node_with(dir, connections, LIMITS).await
    }

    async fn serve_test_node_with(
        dir: &std::path::Path,
        connections: usize,
        limits: RespLimits,
    ) -> (SocketAddr, watch::Sender<bool>) {
        let node = Node::open(crate::NodeConfig::new(dir)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let serving = Serving {
            node: node.clone(),
            service: Arc::new(node),
            limits,
            budget: ReadBudget::new(256 << 20),
            tls: None,
            observed: Arc::new(Observed::new()),
        };
        tokio::spawn(serve(listener, serving, ConnTable::new(connections), stopped));
        (addr, stop)
    }

    async fn connect_to_test_node(dir: &std::path::Path) -> (TcpStream, watch::Sender<bool>) {
        let (addr, stop) = serve_test_node(dir, 16).await;
        (TcpStream::connect(addr).await.unwrap(), stop)
    }

    async fn ping(client: &mut TcpStream) {
        client.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
        let mut pong = [0; 7];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut pong)).await.expect("no PONG").unwrap();
        assert_eq!(&pong, b"+PONG\r\n");
    }

    #[tokio::test]
    async fn pipelined_commands_over_the_node_wide_room_wait_for_their_own_and_are_all_answered() {
        let dir = tempfile::tempdir().unwrap();
        // Room for less than one command: each connection runs one at a time.
        let limits = RespLimits { pipelined_bytes_max: 16, ..LIMITS };
        let (addr, _stop) = serve_test_node_with(dir.path(), 16, limits).await;
        let mut clients = Vec::new();
        for c in 0..3 {
            clients.push(tokio::spawn(async move {
                let mut client = TcpStream::connect(addr).await.unwrap();
                let mut pipeline = Vec::new();
                for i in 0..50 {
                    pipeline.extend_from_slice(format!("HSET k{c}-{} f v{i}\r\n", i % 7).as_bytes());
                }
                client.write_all(&pipeline).await.unwrap();
                let mut replies = Vec::new();
                let mut chunk = [0; 1024];
                while replies.iter().filter(|&&b| b == b'\n').count() < 50 {
                    let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut chunk))
                        .await
                        .expect("replies keep coming")
                        .unwrap();
                    assert!(read > 0, "closed after {}", String::from_utf8_lossy(&replies));
                    replies.extend_from_slice(&chunk[..read]);
                }
                let replies = String::from_utf8(replies).unwrap();
                // The first write to each of the 7 keys adds a field; the rest replace it.
                let want: Vec<&str> = (0..50).map(|i| if i < 7 { ":1" } else { ":0" }).collect();
                assert_eq!(replies.lines().collect::<Vec<_>>(), want);
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_request_dripped_a_byte_at_a_time_is_dropped_its_limit_after_its_first_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, _stop) = connect_to_test_node(dir.path()).await;
        let request = b"*2\r\n$4\r\nECHO\r\n$40\r\n0123456789012345678901234567890123456789\r\n";
        let started = std::time::Instant::now();
        let mut closed_after = None;
        for byte in request {
            if client.write_all(&[*byte]).await.is_err() {
                closed_after = Some(started.elapsed());
                break;
            }
            // Each byte comes well within the limit; the request as a whole does not.
            let mut answer = [0; 64];
            if let Ok(read) = tokio::time::timeout(LIMITS.half_sent_max / 3, client.read(&mut answer)).await {
                let read = read.unwrap_or(0);
                assert!(answer[..read].starts_with(b"-ERR request not completed in time"), "{:?}", &answer[..read]);
                closed_after = Some(started.elapsed());
                break;
            }
        }
        let closed_after = closed_after.expect("a dripped request kept its connection open to the end");
        assert!(closed_after < LIMITS.half_sent_max * 4, "closed only after {closed_after:?}");
    }

    #[tokio::test]
    async fn with_every_connection_taken_by_idle_clients_a_new_client_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _stop) = serve_test_node(dir.path(), 3).await;
        let mut idle = Vec::new();
        for _ in 0..3 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            ping(&mut client).await;
            idle.push(client);
        }
        let mut newcomer = TcpStream::connect(addr).await.unwrap();
        ping(&mut newcomer).await;
        // The first (longest idle) made room; the others still answer.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), idle[0].read_to_end(&mut rest)).await;
        assert!(closed.is_ok() && rest.is_empty(), "the longest-idle connection was not closed: {rest:?}");
        ping(&mut idle[2]).await;
    }

    #[tokio::test]
    async fn a_half_sent_request_is_dropped_after_its_limit_but_an_idle_connection_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, _stop) = connect_to_test_node(dir.path()).await;
        // Idle with nothing buffered for 3x the limit: the connection stays and answers.
        let idle = tokio::time::timeout(LIMITS.half_sent_max * 3, client.read(&mut [0; 16])).await;
        assert!(idle.is_err(), "an idle connection was answered or closed: {idle:?}");
        client.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
        let mut pong = [0; 7];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"+PONG\r\n");
        // Half a request, then silence: an error, then the connection is closed.
        client.write_all(b"*2\r\n$4\r\nECHO\r\n$5\r\nhel").await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the half-sent request kept its connection open");
        assert_eq!(rest, b"-ERR request not completed in time; connection closed\r\n");
    }

    /// Property tests of the parser over arbitrary bytes and arbitrary splits of the stream.
    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        fn config() -> proptest::test_runner::Config {
            crate::testing::proptest_config(3000)
        }

        fn encode(args: &[Vec<u8>]) -> Vec<u8> {
            let mut wire = format!("*{}\r\n", args.len()).into_bytes();
            for arg in args {
                wire.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                wire.extend_from_slice(arg);
                wire.extend_from_slice(b"\r\n");
            }
            wire
        }

        /// Bytes that are mostly pieces of the protocol, so that the parser gets deep often.
        fn protocol_noise() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                any::<u8>().prop_map(|b| vec![b]),
                Just(b"*".to_vec()),
                Just(b"$".to_vec()),
                Just(b"\r\n".to_vec()),
                Just(b"\n".to_vec()),
                Just(b" ".to_vec()),
                Just(b"\"".to_vec()),
                (0i64..100).prop_map(|n| n.to_string().into_bytes()),
                Just(b"-1".to_vec()),
                Just(b"99999999999999999999".to_vec()),
                Just(b"PING".to_vec()),
            ];
            vec(piece, 0..40).prop_map(|pieces| pieces.concat())
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn any_bytes_in_any_pieces_parse_as_they_do_whole(
                wire in prop_oneof![vec(any::<u8>(), 0..200), protocol_noise()],
                cuts in vec(any::<usize>(), 0..8),
            ) {
                match parse_all(&wire) {
                    Ok(commands) => prop_assert_eq!(parse_streamed(&wire, &cuts), Ok(commands)),
                    // The error may show earlier or later in pieces, but it shows.
                    Err(_) => prop_assert!(parse_streamed(&wire, &cuts).is_err()),
                }
            }

            #[test]
            fn commands_cut_anywhere_arrive_whole_and_in_order(
                commands in vec(vec(vec(any::<u8>(), 0..20), 1..4), 1..6),
                cuts in vec(any::<usize>(), 0..12),
            ) {
                let wire: Vec<u8> = commands.iter().flat_map(|args| encode(args)).collect();
                prop_assert_eq!(parse_streamed(&wire, &cuts), Ok(commands));
            }

            #[test]
            fn an_oversized_bulk_string_is_refused_before_its_bytes_arrive(
                len in (LIMITS.bulk_bytes_max + 1)..1_000_000,
                sent in 0usize..64,
            ) {
                let mut wire = format!("*2\r\n$4\r\nHSET\r\n${len}\r\n").into_bytes();
                wire.resize(wire.len() + sent, b'a');
                prop_assert!(matches!(parse_command(&wire, &LIMITS), Err(RespError::TooLarge(_))));
            }
        }
    }
}
