//! Every Redis command Grex serves, as data: one row per command with its arity, where its keys
//! are, what permission it needs, whether it runs alone and whether it writes. A request is parsed
//! into a [`Command`] once, against this table (as mini-redis parses a frame into its `Command`),
//! and everything after reads the row: the checks, the ordering of pipelined commands, the
//! metrics label, `INFO commandstats`, `COMMAND`'s answers.

use crate::access::Action;

use super::Reply;

/// What runs a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Ping,
    Echo,
    HSet,
    HMSet,
    HGet,
    HExists,
    HMGet,
    HDel,
    HGetAll,
    HKeys,
    HLen,
    Del,
    Exists,
    Type,
    FCall,
    FCallRo,
    GrexCanary,
    GrexModule,
    Hello,
    Auth,
    Acl,
    Quit,
    Select,
    ReadOnly,
    ReadWrite,
    Client,
    Command,
    Config,
    Cluster,
    Info,
    DbSize,
    Scan,
    Slowlog,
    Latency,
}

/// Where a command's keys are among its arguments (after its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Keys {
    /// It has none.
    None,
    /// The first argument.
    First,
    /// Every argument.
    All,
    /// `FCALL name numkeys key ...`: the third.
    Third,
}

/// What a caller needs to run a command ([`crate::access`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Needs {
    /// Nothing: it may come before signing in (`AUTH`, `HELLO`, `QUIT`, as with Redis).
    Nothing,
    /// To see the cluster (any signed-in user).
    See,
    /// To read buckets.
    Read,
    /// To write buckets.
    Write,
    /// To run the module its first argument names.
    Run,
    /// To administer the cluster for these subcommands (its first argument), to see it for the
    /// others.
    AdminFor(&'static [&'static str]),
    /// To administer the cluster.
    Admin,
}

/// One command.
#[derive(Debug)]
pub(super) struct Spec {
    /// Its name, upper case.
    pub name: &'static str,
    /// Its argument count with the name, as Redis gives it: `n` exactly `n`, `-n` at least `n`.
    pub arity: i32,
    pub kind: Kind,
    pub keys: Keys,
    pub needs: Needs,
    /// It changes the connection or the node's modules: it runs after every command before it
    /// has been answered and before any after it starts.
    pub alone: bool,
    /// It may write buckets (`COMMAND` flags it `write`; the others `readonly`).
    pub writes: bool,
    /// Its group in Redis's documentation (`COMMAND DOCS`).
    pub group: &'static str,
    /// What it does, in a line (`COMMAND DOCS`).
    pub summary: &'static str,
}

const fn spec(name: &'static str, arity: i32, kind: Kind, keys: Keys, needs: Needs) -> Spec {
    Spec { name, arity, kind, keys, needs, alone: false, writes: false, group: "generic", summary: "" }
}

impl Spec {
    const fn alone(mut self) -> Spec {
        self.alone = true;
        self
    }

    const fn writes(mut self) -> Spec {
        self.writes = true;
        self
    }

    const fn doc(mut self, group: &'static str, summary: &'static str) -> Spec {
        self.group = group;
        self.summary = summary;
        self
    }
}

use Keys::{All, First, Third};
use Needs::{Admin, AdminFor, Nothing, Read, Run, See, Write};

/// Every command, in `COMMAND`'s order.
pub(super) static COMMANDS: &[Spec] = &[
    spec("PING", -1, Kind::Ping, Keys::None, See).doc("connection", "Answers PONG, or the message given"),
    spec("ECHO", 2, Kind::Echo, Keys::None, See).doc("connection", "Answers the message given"),
    spec("HELLO", -1, Kind::Hello, Keys::None, Nothing)
        .alone()
        .doc("connection", "Picks RESP2 or RESP3, signs in, answers server information"),
    spec("AUTH", -2, Kind::Auth, Keys::None, Nothing).alone().doc("connection", "Signs in with a user's token"),
    spec("QUIT", -1, Kind::Quit, Keys::None, Nothing).alone().doc("connection", "Closes the connection"),
    spec("SELECT", 2, Kind::Select, Keys::None, See).alone().doc("connection", "Accepts database 0, the only one"),
    spec("CLIENT", -2, Kind::Client, Keys::None, AdminFor(&["KILL"]))
        .alone()
        .doc("connection", "The connection's id and name; every client (LIST, INFO, ID, SETNAME, GETNAME, SETINFO)"),
    spec("READONLY", 1, Kind::ReadOnly, Keys::None, See)
        .alone()
        .doc("cluster", "Lets hash reads run on a follower that herds the key's flock"),
    spec("READWRITE", 1, Kind::ReadWrite, Keys::None, See)
        .alone()
        .doc("cluster", "Sends hash reads to the flock's leader again (the default)"),
    spec("CLUSTER", -2, Kind::Cluster, Keys::None, See)
        .alone()
        .doc("cluster", "The cluster as Redis Cluster clients see it"),
    spec("HSET", -4, Kind::HSet, First, Write)
        .writes()
        .doc("hash", "Writes items of a bucket; answers how many were new"),
    spec("HMSET", -4, Kind::HMSet, First, Write).writes().doc("hash", "Writes items of a bucket; answers OK"),
    spec("HGET", 3, Kind::HGet, First, Read).doc("hash", "An item's value"),
    spec("HEXISTS", 3, Kind::HExists, First, Read).doc("hash", "Whether an item exists"),
    spec("HMGET", -3, Kind::HMGet, First, Read).doc("hash", "Items' values"),
    spec("HDEL", -3, Kind::HDel, First, Write).writes().doc("hash", "Deletes items; answers how many existed"),
    spec("HGETALL", 2, Kind::HGetAll, First, Read).doc("hash", "Every item of a bucket and its value"),
    spec("HKEYS", 2, Kind::HKeys, First, Read).doc("hash", "Every item name of a bucket"),
    spec("HLEN", 2, Kind::HLen, First, Read).doc("hash", "How many items a bucket has"),
    spec("DEL", -2, Kind::Del, All, Write).writes().doc("generic", "Deletes every item of each bucket"),
    spec("UNLINK", -2, Kind::Del, All, Write).writes().doc("generic", "Deletes every item of each bucket"),
    spec("EXISTS", -2, Kind::Exists, All, Read).doc("generic", "How many of the buckets have items"),
    spec("TYPE", 2, Kind::Type, First, Read).doc("generic", "hash for a bucket with items, else none"),
    spec("SCAN", -2, Kind::Scan, Keys::None, Read).doc("generic", "The buckets this node stores, a page at a time"),
    spec("DBSIZE", 1, Kind::DbSize, Keys::None, See).doc("server", "How many buckets this node stores"),
    spec("FCALL", -3, Kind::FCall, Third, Run).writes().doc("scripting", "Runs a module's job on a bucket"),
    spec("FCALL_RO", -3, Kind::FCallRo, Third, Run).doc("scripting", "Runs a module's job on a bucket, read-only"),
    spec("GREX.MODULE", -2, Kind::GrexModule, Keys::None, AdminFor(&["LOAD", "DELETE"]))
        .alone()
        .doc("scripting", "Uploads, deletes and lists modules (LOAD, DELETE, LIST)"),
    spec("GREX.CANARY", 2, Kind::GrexCanary, First, See).doc("cluster", "The best node for a bucket"),
    spec("INFO", -1, Kind::Info, Keys::None, See).doc("server", "The node's figures, by section"),
    spec("CONFIG", -2, Kind::Config, Keys::None, AdminFor(&["SET", "RESETSTAT"]))
        .alone()
        .doc("server", "The node's settings (GET; SET for the slow log and latency monitor; RESETSTAT)"),
    spec("COMMAND", -1, Kind::Command, Keys::None, See)
        .alone()
        .doc("server", "These commands (COUNT, INFO, DOCS, LIST)"),
    spec("SLOWLOG", -2, Kind::Slowlog, Keys::None, Admin)
        .doc("server", "Commands slower than slowlog-log-slower-than (GET, LEN, RESET)"),
    spec("LATENCY", -2, Kind::Latency, Keys::None, AdminFor(&["RESET"]))
        .doc("server", "Latency spikes and per-command histograms (LATEST, HISTORY, HISTOGRAM, DOCTOR, RESET)"),
    spec("ACL", -2, Kind::Acl, Keys::None, See).alone().doc("server", "ACL WHOAMI: the user signed in"),
];

/// A command as a request names it, checked against its row.
pub(super) struct Command {
    /// Its row: its index in [`COMMANDS`].
    pub index: usize,
    /// The request: the name as sent, then the arguments.
    pub args: Vec<Vec<u8>>,
}

/// The row of the command called `name` (any case), with its index.
pub(super) fn lookup(name: &[u8]) -> Option<(usize, &'static Spec)> {
    COMMANDS.iter().enumerate().find(|(_, spec)| spec.name.as_bytes().eq_ignore_ascii_case(name))
}

/// A request the table refuses: the row of the command it names, if any, and the reply.
pub(super) struct Refused {
    pub index: Option<usize>,
    pub reply: Reply,
}

impl Command {
    /// Checks a request (its name, then its arguments; never empty) against the table: Redis's
    /// texts for an unknown command and a wrong argument count.
    pub fn parse(args: Vec<Vec<u8>>) -> Result<Command, Refused> {
        let Some((index, spec)) = lookup(&args[0]) else {
            let reply = Reply::err(format!(
                "unknown command '{}', with args beginning with: {}",
                String::from_utf8_lossy(&args[0]),
                args[1..].iter().take(3).map(|a| format!("'{}' ", String::from_utf8_lossy(a))).collect::<String>()
            ));
            return Err(Refused { index: None, reply });
        };
        let count = args.len() as i32;
        if (spec.arity >= 0 && count != spec.arity) || count < spec.arity.abs() {
            return Err(Refused { index: Some(index), reply: arity(spec.name) });
        }
        Ok(Command { index, args })
    }

    pub fn spec(&self) -> &'static Spec {
        &COMMANDS[self.index]
    }

    /// The arguments after the name.
    pub fn rest(&self) -> &[Vec<u8>] {
        &self.args[1..]
    }

    /// Its keys, for ordering the commands of one connection.
    pub fn keys(&self) -> Vec<&[u8]> {
        let rest = self.rest();
        match self.spec().keys {
            Keys::None => Vec::new(),
            First => rest.first().map(Vec::as_slice).into_iter().collect(),
            All => rest.iter().map(Vec::as_slice).collect(),
            Third => rest.get(2).map(Vec::as_slice).into_iter().collect(),
        }
    }

    /// Its subcommand (the first argument, upper case), for those that have them.
    pub fn subcommand(&self) -> Option<String> {
        self.rest().first().map(|s| String::from_utf8_lossy(s).to_ascii_uppercase())
    }

    /// What it would do, as permissions name it; `None` when it needs nothing.
    pub fn action(&self) -> Option<Action<'_>> {
        Some(match self.spec().needs {
            Nothing => return None,
            See => Action::See,
            Read => Action::Read,
            Write => Action::Write,
            Run => Action::Run(self.rest().first().and_then(|m| std::str::from_utf8(m).ok()).unwrap_or("")),
            Admin => Action::Admin,
            AdminFor(subcommands) => match self.subcommand() {
                Some(sub) if subcommands.contains(&sub.as_str()) => Action::Admin,
                _ => Action::See,
            },
        })
    }
}

/// Redis's text for a wrong argument count.
pub(super) fn arity(name: &str) -> Reply {
    Reply::err(format!("wrong number of arguments for '{}' command", name.to_ascii_lowercase()))
}

/// `COMMAND [COUNT | INFO name ... | DOCS [name ...] | LIST]`, from the table.
pub(super) fn command(args: &[Vec<u8>]) -> Reply {
    let sub = args.first().map(|s| s.to_ascii_uppercase());
    let named = |names: &[Vec<u8>]| -> Vec<Option<&'static Spec>> {
        if names.is_empty() {
            COMMANDS.iter().map(Some).collect()
        } else {
            names.iter().map(|n| lookup(n).map(|(_, spec)| spec)).collect()
        }
    };
    match sub.as_deref() {
        None => Reply::Array(COMMANDS.iter().map(info).collect()),
        Some(b"COUNT") => Reply::Int(COMMANDS.len() as i64),
        Some(b"LIST") => Reply::Array(COMMANDS.iter().map(|s| Reply::bulk(s.name.to_ascii_lowercase())).collect()),
        Some(b"INFO") => {
            Reply::Array(named(&args[1..]).into_iter().map(|s| s.map_or(Reply::Bulk(None), info)).collect())
        }
        Some(b"DOCS") => Reply::Map(
            named(&args[1..])
                .into_iter()
                .flatten()
                .map(|s| {
                    let doc = Reply::Map(vec![
                        (Reply::bulk("summary"), Reply::bulk(s.summary)),
                        (Reply::bulk("since"), Reply::bulk("0.1.0")),
                        (Reply::bulk("group"), Reply::bulk(s.group)),
                    ]);
                    (Reply::bulk(s.name.to_ascii_lowercase()), doc)
                })
                .collect(),
        ),
        Some(_) => Reply::err("usage: COMMAND [COUNT | LIST | INFO name ... | DOCS [name ...]]"),
    }
}

/// One command as `COMMAND INFO` describes it: name, arity, flags, first key, last key, step,
/// ACL categories, tips, key specs, subcommands.
fn info(spec: &Spec) -> Reply {
    let mut flags = vec![if spec.writes { "write" } else { "readonly" }];
    if spec.needs == Nothing {
        flags.extend(["noauth", "fast"]);
    }
    if spec.keys == Keys::None && !spec.writes {
        flags.push("loading");
    }
    let (first, last, step) = match spec.keys {
        Keys::None => (0, 0, 0),
        First => (1, 1, 1),
        All => (1, -1, 1),
        Third => (3, 3, 1),
    };
    let category = if spec.writes { "@write" } else { "@read" };
    Reply::Array(vec![
        Reply::bulk(spec.name.to_ascii_lowercase()),
        Reply::Int(i64::from(spec.arity)),
        Reply::Array(flags.into_iter().map(|f| Reply::Simple(f.into())).collect()),
        Reply::Int(first),
        Reply::Int(last),
        Reply::Int(step),
        Reply::Array(vec![Reply::Simple(category.into()), Reply::Simple(format!("@{}", spec.group))]),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Command, Reply> {
        Command::parse(words.iter().map(|w| w.as_bytes().to_vec()).collect()).map_err(|refused| refused.reply)
    }

    #[test]
    fn requests_are_checked_against_the_table_once() {
        let hset = parse(&["hset", "k", "f", "v"]).ok().unwrap();
        assert_eq!(hset.spec().name, "HSET");
        assert_eq!(hset.keys(), vec![b"k".as_slice()]);
        assert!(matches!(hset.action(), Some(Action::Write)));
        assert!(
            matches!(parse(&["HGET", "k"]), Err(Reply::Error(e)) if e == "ERR wrong number of arguments for 'hget' command")
        );
        assert!(
            matches!(parse(&["SET", "k", "v"]), Err(Reply::Error(e)) if e.starts_with("ERR unknown command 'SET', with args beginning with: 'k' 'v'"))
        );
        let fcall = parse(&["FCALL", "counter", "1", "bucket", "5"]).ok().unwrap();
        assert_eq!(fcall.keys(), vec![b"bucket".as_slice()]);
        assert!(matches!(fcall.action(), Some(Action::Run("counter"))));
        assert!(matches!(parse(&["DEL", "a", "b"]).ok().unwrap().keys()[..], [b"a", b"b"]));
        assert!(parse(&["AUTH", "t"]).ok().unwrap().action().is_none());
        assert!(matches!(parse(&["CONFIG", "set", "x", "y"]).ok().unwrap().action(), Some(Action::Admin)));
        assert!(matches!(parse(&["CONFIG", "GET", "x"]).ok().unwrap().action(), Some(Action::See)));
    }

    #[test]
    fn every_name_is_upper_case_and_listed_once() {
        for (i, spec) in COMMANDS.iter().enumerate() {
            assert_eq!(spec.name, spec.name.to_ascii_uppercase());
            assert_eq!(lookup(spec.name.as_bytes()).map(|(at, _)| at), Some(i), "{} twice", spec.name);
            assert!(!spec.summary.is_empty(), "{} has no summary", spec.name);
        }
    }
}
