//! The Redis world's own views of a server, so redis-cli, redis-benchmark and Redis monitoring
//! tools work against a node: `INFO`, `CONFIG`, `CLIENT`, `SLOWLOG`, `LATENCY`, `DBSIZE` and
//! `SCAN`. Their figures come from the node (its status and store), the cluster (its flock map)
//! and what the endpoint keeps of its own commands ([`Observed`]).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use grex_client::Status;

use super::command::COMMANDS;
use super::observe::{HISTOGRAM_BUCKETS, Observed, lock};
use super::{CONNECTIONS_MAX, Commands, Reply, remote_error};

/// `INFO` sections shown when none is asked for, in order (Redis's `default`).
const DEFAULT_SECTIONS: &[&str] =
    &["server", "clients", "memory", "persistence", "stats", "replication", "cpu", "cluster", "keyspace"];

/// `INFO [section ...]`: `default`, `all` or `everything` (the defaults and `commandstats`), or
/// sections by name.
pub(super) async fn info(commands: &Commands, args: &[Vec<u8>]) -> Reply {
    let asked: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).to_ascii_lowercase()).collect();
    let mut sections: Vec<&str> = Vec::new();
    if asked.is_empty() {
        sections.extend(DEFAULT_SECTIONS);
    }
    for name in &asked {
        match name.as_str() {
            "default" => sections.extend(DEFAULT_SECTIONS),
            "all" | "everything" => sections.extend(DEFAULT_SECTIONS.iter().chain(&["commandstats"])),
            other => sections.extend(DEFAULT_SECTIONS.iter().chain(&["commandstats"]).filter(|s| **s == other)),
        }
    }
    // Read once for every section asked.
    let (status, cluster) = (commands.node.status(), commands.service.nodes().is_ok());
    let keys = if sections.contains(&"keyspace") { Some(commands.node.bucket_count().await) } else { None };
    let mut text = String::new();
    for section in sections {
        if !text.is_empty() {
            text.push_str("\r\n");
        }
        section_text(commands, (&status, cluster, keys.as_ref()), section, &mut text);
    }
    Reply::bulk(text)
}

/// One `INFO` section being written: its title, then `key:value` lines.
struct Section<'a>(&'a mut String);

impl Section<'_> {
    fn new<'a>(out: &'a mut String, title: &str) -> Section<'a> {
        let _ = write!(out, "# {title}\r\n");
        Section(out)
    }

    fn line(&mut self, key: &str, value: &dyn std::fmt::Display) {
        let _ = write!(self.0, "{key}:{value}\r\n");
    }
}

fn section_text(
    commands: &Commands,
    (status, cluster, keys): (&Status, bool, Option<&crate::error::Result<u64>>),
    name: &str,
    out: &mut String,
) {
    let node = &commands.node;
    let observed = &commands.observed;
    match name {
        "server" => {
            let mut section = Section::new(out, "Server");
            // The Redis version whose commands and protocol Grex speaks (RESP3, HELLO).
            section.line("redis_version", &"7.2.0");
            section.line("redis_mode", &if cluster { "cluster" } else { "standalone" });
            section.line("os", &format_args!("{} {}", std::env::consts::OS, std::env::consts::ARCH));
            section.line("arch_bits", &(usize::BITS));
            section.line("process_id", &std::process::id());
            section.line("run_id", &status.node);
            section.line("tcp_port", &resp_port(commands));
            section.line("uptime_in_seconds", &status.uptime_s);
            section.line("uptime_in_days", &(status.uptime_s / 86_400));
            section.line("grex_version", &status.version);
            section.line("grex_node", &status.node);
        }
        "clients" => {
            let mut section = Section::new(out, "Clients");
            section.line("connected_clients", &observed.clients().len());
            section.line("maxclients", &CONNECTIONS_MAX);
            section.line("blocked_clients", &0);
        }
        "memory" => {
            let mut section = Section::new(out, "Memory");
            let rss = resident_bytes();
            section.line("used_memory", &rss);
            section.line("used_memory_human", &human(rss));
            section.line("used_memory_rss", &rss);
            // Grex never evicts data: only its cache of decoded buckets has a limit.
            section.line("maxmemory", &0);
            section.line("maxmemory_policy", &"noeviction");
            section.line("grex_cache_bytes", &status.cache_bytes);
            section.line("grex_cache_bytes_max", &status.cache_bytes_max);
            section.line("grex_cache_buckets", &status.cache_buckets);
        }
        "persistence" => {
            let mut section = Section::new(out, "Persistence");
            // Every write is in its flock's log on a majority of herders' disks before the reply.
            section.line("loading", &0);
            section.line("aof_enabled", &1);
            section.line("grex_fsync", &if node.config().durable { "always" } else { "no" });
            section.line("grex_store_commits", &status.commits);
            section.line("grex_store_change_sets", &status.change_sets);
        }
        "stats" => {
            let mut section = Section::new(out, "Stats");
            let (mut calls, mut errors) = (0, 0);
            for index in 0..COMMANDS.len() {
                let stats = observed.command(index);
                calls += stats.calls.load(Ordering::Relaxed);
                errors += stats.failed.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed);
            }
            section.line("total_connections_received", &observed.connections.load(Ordering::Relaxed));
            section.line("total_commands_processed", &calls);
            section.line("total_error_replies", &errors);
            section.line("rejected_connections", &0);
            section.line("grex_jobs_ok", &status.jobs_ok);
            section.line("grex_jobs_failed", &status.jobs_failed);
            section.line("grex_jobs_forwarded", &status.jobs_forwarded);
            section.line("grex_jobs_running", &status.jobs_running);
            section.line("grex_cache_hits", &status.cache_hits);
            section.line("grex_cache_misses", &status.cache_misses);
        }
        "replication" => {
            // Roles are per flock: every node leads some flocks and follows in others, and
            // answers for every key (docs/resp.md).
            let map = commands.service.flocks();
            let led = map.flocks.iter().filter(|f| f.leader.as_deref() == Some(node.id())).count();
            let herded = map.flocks.iter().filter(|f| f.herders.is_empty() || f.herders.iter().any(|h| h == node.id()));
            let mut section = Section::new(out, "Replication");
            section.line("role", &"master");
            section.line("connected_slaves", &0);
            section.line("grex_flocks", &map.flocks.len());
            section.line("grex_flocks_herded", &herded.count());
            section.line("grex_flocks_led", &led);
        }
        "cpu" => {
            let mut section = Section::new(out, "CPU");
            let (user, system) = cpu_seconds();
            section.line("used_cpu_sys", &format_args!("{system:.6}"));
            section.line("used_cpu_user", &format_args!("{user:.6}"));
        }
        "cluster" => {
            let mut section = Section::new(out, "Cluster");
            section.line("cluster_enabled", &u8::from(cluster));
        }
        "keyspace" => {
            let mut section = Section::new(out, "Keyspace");
            match keys {
                Some(Ok(0)) | None => {}
                Some(Ok(keys)) => section.line("db0", &format_args!("keys={keys},expires=0,avg_ttl=0")),
                Some(Err(e)) => section.line("grex_keyspace_error", &e.message),
            }
        }
        "commandstats" => {
            let mut section = Section::new(out, "Commandstats");
            for (index, spec) in COMMANDS.iter().enumerate() {
                let stats = observed.command(index);
                let calls = stats.calls.load(Ordering::Relaxed);
                let rejected = stats.rejected.load(Ordering::Relaxed);
                if calls == 0 && rejected == 0 {
                    continue;
                }
                let usec = stats.usec.load(Ordering::Relaxed);
                let per_call = if calls == 0 { 0.0 } else { usec as f64 / calls as f64 };
                section.line(
                    &format!("cmdstat_{}", spec.name.to_ascii_lowercase()),
                    &format_args!(
                        "calls={calls},usec={usec},usec_per_call={per_call:.2},rejected_calls={rejected},failed_calls={}",
                        stats.failed.load(Ordering::Relaxed)
                    ),
                );
            }
        }
        _ => {}
    }
}

/// The port this endpoint listens on.
fn resp_port(commands: &Commands) -> String {
    commands.node.node_urls().resp.and_then(|a| a.rsplit(':').next().map(str::to_owned)).unwrap_or_default()
}

/// The process's resident memory (Linux; 0 elsewhere).
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

fn human(bytes: u64) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "K", "M", "G"] {
        if value < 1024.0 {
            return format!("{value:.2}{unit}");
        }
        value /= 1024.0;
    }
    format!("{value:.2}T")
}

/// The process's CPU time: (user, system) seconds.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (seconds(usage.ru_utime), seconds(usage.ru_stime))
}

/// The settings `CONFIG GET` knows, with their values now.
fn settings(commands: &Commands) -> Vec<(&'static str, String)> {
    let node = &commands.node;
    let observed = &commands.observed;
    let resp = node.node_urls().resp.unwrap_or_default();
    let (bind, port) = resp.rsplit_once(':').unwrap_or(("", ""));
    vec![
        ("bind", bind.trim_start_matches('[').trim_end_matches(']').to_owned()),
        ("port", port.to_owned()),
        ("databases", "1".to_owned()),
        ("maxclients", CONNECTIONS_MAX.to_string()),
        ("timeout", "0".to_owned()),
        ("save", String::new()),
        ("appendonly", "yes".to_owned()),
        ("appendfsync", if node.config().durable { "always" } else { "no" }.to_owned()),
        ("maxmemory", "0".to_owned()),
        ("maxmemory-policy", "noeviction".to_owned()),
        ("proto-max-bulk-len", commands.bulk_bytes_max.to_string()),
        ("busy-reply-threshold", node.config().limits.timeout_ms.to_string()),
        ("lua-time-limit", node.config().limits.timeout_ms.to_string()),
        ("cluster-enabled", if commands.service.nodes().is_ok() { "yes" } else { "no" }.to_owned()),
        ("slowlog-log-slower-than", observed.settings.slower_than_us.load(Ordering::Relaxed).to_string()),
        ("slowlog-max-len", observed.settings.slowlog_max.load(Ordering::Relaxed).to_string()),
        ("latency-monitor-threshold", observed.settings.spike_ms.load(Ordering::Relaxed).to_string()),
    ]
}

/// `CONFIG GET pattern ...`, `CONFIG SET name value ...` (the slow log's and the latency
/// monitor's settings), `CONFIG RESETSTAT`.
pub(super) fn config(commands: &Commands, args: &[Vec<u8>]) -> Reply {
    let sub = args.first().map(|s| s.to_ascii_uppercase());
    match (sub.as_deref(), &args[1..]) {
        (Some(b"GET"), patterns) if !patterns.is_empty() => Reply::Map(
            settings(commands)
                .into_iter()
                .filter(|(name, _)| patterns.iter().any(|p| glob_match(&p.to_ascii_lowercase(), name.as_bytes())))
                .map(|(name, value)| (Reply::bulk(name), Reply::bulk(value)))
                .collect(),
        ),
        (Some(b"SET"), pairs) if !pairs.is_empty() && pairs.len().is_multiple_of(2) => {
            let settings = &commands.observed.settings;
            // Every value is checked before any is set.
            let mut changes = Vec::new();
            for pair in pairs.chunks(2) {
                let name = String::from_utf8_lossy(&pair[0]).to_ascii_lowercase();
                let value = String::from_utf8_lossy(&pair[1]);
                let change = match name.as_str() {
                    "slowlog-log-slower-than" => value.parse::<i64>().ok().map(|v| (0, v)),
                    "slowlog-max-len" => value.parse::<u32>().ok().map(|v| (1, i64::from(v))),
                    "latency-monitor-threshold" => value.parse::<u32>().ok().map(|v| (2, i64::from(v))),
                    _ => {
                        return Reply::err(format!(
                            "CONFIG SET '{name}': Grex sets this with `grex serve` flags; only \
                             slowlog-log-slower-than, slowlog-max-len and latency-monitor-threshold change while it runs"
                        ));
                    }
                };
                match change {
                    Some(change) => changes.push(change),
                    None => return Reply::err(format!("CONFIG SET '{name}': '{value}' is not a number it takes")),
                }
            }
            for (setting, value) in changes {
                match setting {
                    0 => settings.slower_than_us.store(value, Ordering::Relaxed),
                    1 => settings.slowlog_max.store(value as usize, Ordering::Relaxed),
                    _ => settings.spike_ms.store(value as u64, Ordering::Relaxed),
                }
            }
            Reply::ok()
        }
        (Some(b"RESETSTAT"), []) => {
            commands.observed.reset_commands();
            Reply::ok()
        }
        (Some(b"REWRITE"), []) => Reply::err("Grex keeps no configuration file: its settings are `grex serve` flags"),
        _ => Reply::err(
            "usage: CONFIG GET pattern [pattern ...] | CONFIG SET name value [name value ...] | CONFIG RESETSTAT",
        ),
    }
}

/// `CLIENT ID | GETNAME | SETNAME name | SETINFO LIB-NAME|LIB-VER value | INFO | LIST [ID id ...]
/// | NO-EVICT | NO-TOUCH | REPLY ON`.
pub(super) fn client(commands: &Commands, args: &[Vec<u8>]) -> Reply {
    let me = &commands.client;
    let sub = args.first().map(|s| s.to_ascii_uppercase());
    match (sub.as_deref(), &args[1..]) {
        (Some(b"ID"), []) => Reply::Int(me.id as i64),
        (Some(b"GETNAME"), []) => {
            let name = lock(&me.name).clone();
            if name.is_empty() { Reply::Bulk(None) } else { Reply::bulk(name) }
        }
        (Some(b"SETNAME"), [name]) => {
            if name.iter().any(|b| !(b'!'..=b'~').contains(b)) {
                return Reply::err("Client names cannot contain spaces, newlines or special characters.");
            }
            *lock(&me.name) = String::from_utf8_lossy(name).into_owned();
            Reply::ok()
        }
        (Some(b"SETINFO"), [attribute, value]) => {
            let value = String::from_utf8_lossy(value).into_owned();
            let mut lib = lock(&me.lib);
            match attribute.to_ascii_uppercase().as_slice() {
                b"LIB-NAME" => lib.0 = value,
                b"LIB-VER" => lib.1 = value,
                _ => return Reply::err("Unrecognized option; CLIENT SETINFO takes LIB-NAME or LIB-VER"),
            }
            Reply::ok()
        }
        (Some(b"INFO"), []) => Reply::bulk(client_line(commands, me)),
        (Some(b"LIST"), filter) => {
            let ids: Option<Vec<u64>> = match filter {
                [] => None,
                [kind, ids @ ..] if kind.eq_ignore_ascii_case(b"ID") && !ids.is_empty() => {
                    match ids.iter().map(|id| String::from_utf8_lossy(id).parse::<u64>()).collect() {
                        Ok(ids) => Some(ids),
                        Err(_) => return Reply::err("Invalid client ID"),
                    }
                }
                [kind, t] if kind.eq_ignore_ascii_case(b"TYPE") => {
                    // Every client of this endpoint is a normal one.
                    if !t.eq_ignore_ascii_case(b"normal") {
                        return Reply::bulk("");
                    }
                    None
                }
                _ => return Reply::err("syntax error: CLIENT LIST [TYPE normal] [ID id ...]"),
            };
            let mut text = String::new();
            for client in commands.observed.clients() {
                if ids.as_ref().is_none_or(|ids| ids.contains(&client.id)) {
                    text.push_str(&client_line(commands, &client));
                }
            }
            Reply::bulk(text)
        }
        (Some(b"NO-EVICT") | Some(b"NO-TOUCH"), [_]) => Reply::ok(),
        (Some(b"REPLY"), [on]) if on.eq_ignore_ascii_case(b"ON") => Reply::ok(),
        (Some(b"KILL"), _) => {
            Reply::err("CLIENT KILL is not supported: a node closes idle connections itself when it needs room")
        }
        _ => Reply::err(
            "unknown CLIENT subcommand or wrong arguments; Grex serves CLIENT ID, GETNAME, SETNAME, SETINFO, INFO, LIST",
        ),
    }
}

/// One client as `CLIENT LIST` and `CLIENT INFO` show it.
fn client_line(commands: &Commands, client: &super::observe::Client) -> String {
    let name = lock(&client.name).clone();
    let user = lock(&client.user).clone();
    let (lib_name, lib_ver) = lock(&client.lib).clone();
    format!(
        "id={} addr={} laddr={} name={name} age={} idle={} flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 cmd={} \
         user={user} resp={} lib-name={lib_name} lib-ver={lib_ver}\n",
        client.id,
        client.addr,
        commands.node.node_urls().resp.unwrap_or_default(),
        client.started.elapsed().as_secs(),
        commands.observed.idle_s(client),
        client.last_command().map_or_else(|| "NULL".to_owned(), str::to_ascii_lowercase),
        client.resp.load(Ordering::Relaxed),
    )
}

/// `SLOWLOG GET [count] | LEN | RESET`.
pub(super) fn slowlog(observed: &Observed, args: &[Vec<u8>]) -> Reply {
    let sub = args.first().map(|s| s.to_ascii_uppercase());
    match (sub.as_deref(), &args[1..]) {
        (Some(b"GET"), count) if count.len() <= 1 => {
            let count = match count.first().map(|c| String::from_utf8_lossy(c).parse::<i64>()) {
                None => 10,
                Some(Ok(n)) if n < 0 => usize::MAX,
                Some(Ok(n)) => n as usize,
                Some(Err(_)) => return Reply::err("value is not an integer or out of range"),
            };
            let (entries, _) = observed.slowlog(count);
            Reply::Array(
                entries
                    .into_iter()
                    .map(|e| {
                        Reply::Array(vec![
                            Reply::Int(e.id as i64),
                            Reply::Int(e.at_s as i64),
                            Reply::Int(e.micros as i64),
                            Reply::Array(e.args.into_iter().map(Reply::bulk).collect()),
                            Reply::bulk(e.client),
                            Reply::bulk(e.name),
                        ])
                    })
                    .collect(),
            )
        }
        (Some(b"LEN"), []) => Reply::Int(observed.slowlog(0).1 as i64),
        (Some(b"RESET"), []) => {
            observed.reset_slowlog();
            Reply::ok()
        }
        _ => Reply::err("usage: SLOWLOG GET [count] | SLOWLOG LEN | SLOWLOG RESET"),
    }
}

/// `LATENCY LATEST | HISTORY event | RESET [event ...] | HISTOGRAM [command ...] | DOCTOR`. The
/// one event is `command`: a command that took `latency-monitor-threshold` milliseconds or more.
pub(super) fn latency(observed: &Observed, args: &[Vec<u8>]) -> Reply {
    let sub = args.first().map(|s| s.to_ascii_uppercase());
    let (spikes, max_ms) = observed.spikes();
    match (sub.as_deref(), &args[1..]) {
        (Some(b"LATEST"), []) => Reply::Array(
            spikes
                .last()
                .map(|last| {
                    Reply::Array(vec![
                        Reply::bulk("command"),
                        Reply::Int(last.at_s as i64),
                        Reply::Int(last.ms as i64),
                        Reply::Int(max_ms as i64),
                    ])
                })
                .into_iter()
                .collect(),
        ),
        (Some(b"HISTORY"), [event]) => {
            let spikes = if event.as_slice() == b"command" { spikes } else { Vec::new() };
            Reply::Array(
                spikes.iter().map(|s| Reply::Array(vec![Reply::Int(s.at_s as i64), Reply::Int(s.ms as i64)])).collect(),
            )
        }
        (Some(b"RESET"), events) => {
            let ours = events.is_empty() || events.iter().any(|e| e.as_slice() == b"command");
            Reply::Int(if ours { observed.reset_spikes() as i64 } else { 0 })
        }
        (Some(b"HISTOGRAM"), names) => {
            let mut histograms = Vec::new();
            for (index, spec) in COMMANDS.iter().enumerate() {
                if !names.is_empty() && !names.iter().any(|n| n.eq_ignore_ascii_case(spec.name.as_bytes())) {
                    continue;
                }
                let stats = observed.command(index);
                let calls = stats.calls.load(Ordering::Relaxed);
                if calls == 0 {
                    continue;
                }
                // Cumulative counts by power-of-two bucket, as Redis gives them.
                let mut total = 0;
                let mut buckets = Vec::new();
                for (i, count) in stats.histogram.iter().enumerate().take(HISTOGRAM_BUCKETS - 1) {
                    total += count.load(Ordering::Relaxed);
                    if total > 0 {
                        buckets.push((Reply::Int(1 << i), Reply::Int(total as i64)));
                    }
                    if total >= calls {
                        break;
                    }
                }
                histograms.push((
                    Reply::bulk(spec.name.to_ascii_lowercase()),
                    Reply::Map(vec![
                        (Reply::bulk("calls"), Reply::Int(calls as i64)),
                        (Reply::bulk("histogram_usec"), Reply::Map(buckets)),
                    ]),
                ));
            }
            Reply::Map(histograms)
        }
        (Some(b"DOCTOR"), []) => {
            let threshold = observed.settings.spike_ms.load(Ordering::Relaxed);
            Reply::bulk(match spikes.last() {
                _ if threshold == 0 => {
                    "The latency monitor is off: CONFIG SET latency-monitor-threshold MS turns it on.\n".to_owned()
                }
                None => format!("No command took {threshold} ms or more since the last reset.\n"),
                Some(last) => format!(
                    "Commands took {threshold} ms or more in {} of the seconds kept; the latest took {} ms, the slowest \
                     {max_ms} ms. SLOWLOG GET names them; on a node, a slow command is most often a job waiting for \
                     its flock's commit (a slow disk, or a herder far away) or a long-running module.\n",
                    spikes.len(),
                    last.ms,
                ),
            })
        }
        _ => Reply::err("usage: LATENCY LATEST | HISTORY command | RESET [command] | HISTOGRAM [name ...] | DOCTOR"),
    }
}

/// `DBSIZE`: the buckets this node stores.
pub(super) async fn dbsize(commands: &Commands) -> Reply {
    match commands.node.bucket_count().await {
        Ok(count) => Reply::Int(count as i64),
        Err(e) => remote_error(&e),
    }
}

/// `SCAN cursor [MATCH pattern] [COUNT count] [TYPE type]` over the buckets this node stores.
/// A cursor names where the next page starts, and this endpoint keeps the last 1024.
pub(super) async fn scan(commands: &Commands, args: &[Vec<u8>]) -> Reply {
    let Ok(cursor) = String::from_utf8_lossy(&args[0]).parse::<u64>() else {
        return Reply::err("invalid cursor");
    };
    let (mut pattern, mut count, mut hashes) = (None, 10usize, true);
    let mut options = args[1..].iter();
    while let Some(option) = options.next() {
        let Some(value) = options.next() else { return Reply::err("syntax error") };
        match option.to_ascii_uppercase().as_slice() {
            b"MATCH" => pattern = Some(value.clone()),
            b"COUNT" => match String::from_utf8_lossy(value).parse::<usize>() {
                Ok(n) if n >= 1 => count = n,
                _ => return Reply::err("value is not an integer or out of range"),
            },
            // Every key is a hash (a bucket of items).
            b"TYPE" => hashes = value.eq_ignore_ascii_case(b"hash"),
            _ => return Reply::err("syntax error"),
        }
    }
    let after = match cursor {
        0 => None,
        id => match commands.observed.cursor(id) {
            Some(after) => Some(after),
            None => {
                return Reply::err(
                    "invalid cursor: this node keeps its last 1024 SCAN cursors, and a cursor is good only on the \
                     node that gave it; start again with 0",
                );
            }
        },
    };
    if !hashes {
        return Reply::Array(vec![Reply::bulk("0"), Reply::Array(Vec::new())]);
    }
    let page = match commands.node.bucket_keys(after.as_ref().map(|(f, k)| (*f, k.as_slice())), count).await {
        Ok(page) => page,
        Err(e) => return remote_error(&e),
    };
    let next = match page.last() {
        Some(last) if page.len() >= count.min(crate::node::LIST_PAGE_MAX as usize) => {
            commands.observed.new_cursor(last.clone()).to_string()
        }
        _ => "0".to_owned(),
    };
    let keys = page
        .into_iter()
        .filter(|(_, key)| pattern.as_ref().is_none_or(|p| glob_match(p, key)))
        .map(|(_, key)| Reply::bulk(key))
        .collect();
    Reply::Array(vec![Reply::bulk(next), Reply::Array(keys)])
}

/// Redis's glob: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, and `\` before a character to take it as is.
pub(super) fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_match(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && glob_match(rest, &text[1..]),
        Some((b'[', rest)) => {
            let Some((&c, text_rest)) = text.split_first() else { return false };
            let (negate, mut class) = match rest.split_first() {
                Some((b'^', class)) => (true, class),
                _ => (false, rest),
            };
            let mut matched = false;
            loop {
                match class {
                    [] => return false, // no closing bracket: Redis takes the pattern as not matching
                    [b']', after @ ..] => {
                        class = after;
                        break;
                    }
                    [b'\\', escaped, after @ ..] => {
                        matched |= *escaped == c;
                        class = after;
                    }
                    [low, b'-', high, after @ ..] if *high != b']' => {
                        let (low, high) = if low <= high { (*low, *high) } else { (*high, *low) };
                        matched |= (low..=high).contains(&c);
                        class = after;
                    }
                    [one, after @ ..] => {
                        matched |= *one == c;
                        class = after;
                    }
                }
            }
            matched != negate && glob_match(class, text_rest)
        }
        Some((b'\\', [escaped, rest @ ..])) => text.first() == Some(escaped) && glob_match(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob_match(rest, &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_match_as_in_redis() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m("*", "") && m("*", "anything"));
        assert!(m("user:*", "user:7") && !m("user:*", "order:7"));
        assert!(m("h?llo", "hello") && !m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo") && !m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo") && !m("h[^e]llo", "hello"));
        assert!(m("h[a-c]llo", "hbllo") && !m("h[a-c]llo", "hdllo"));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "axb"));
        assert!(m("*:*:end", "a:b:c:end") && !m("*:*:end", "a:end"));
        assert!(!m("h[ab", "ha"), "an unclosed class matches nothing");
    }
}
