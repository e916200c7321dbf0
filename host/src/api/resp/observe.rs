//! What the Redis endpoint keeps of its own work, for the views Redis tools expect of a server:
//! per-command calls, failures and times (`INFO commandstats`, `LATENCY HISTOGRAM`), the slow log
//! (`SLOWLOG`), latency spikes (`LATENCY`), the connected clients (`CLIENT LIST`) and `SCAN`
//! cursors. One per listener, shared by its connections; everything in it is bounded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::command::COMMANDS;

/// Latency buckets of a command: bucket `i` counts the calls of at most 2^i µs; the last, slower.
pub(super) const HISTOGRAM_BUCKETS: usize = 25;
/// Arguments of a command kept in a slow-log entry, and bytes of each (as Redis keeps them).
const SLOWLOG_ARGS_MAX: usize = 32;
const SLOWLOG_ARG_BYTES_MAX: usize = 128;
/// Spikes kept per latency event (as Redis keeps them).
const SPIKES_MAX: usize = 160;
/// `SCAN` cursors a listener remembers; the oldest is forgotten for a new one.
const CURSORS_MAX: usize = 1024;

/// The settings `CONFIG SET` may change, with Redis's names.
pub(super) struct Settings {
    /// `slowlog-log-slower-than`: microseconds (negative: log nothing; 0: every command).
    pub slower_than_us: AtomicI64,
    /// `slowlog-max-len`.
    pub slowlog_max: AtomicUsize,
    /// `latency-monitor-threshold`: milliseconds (0: off).
    pub spike_ms: AtomicU64,
}

/// One command's figures.
#[derive(Default)]
pub(super) struct CommandStats {
    pub calls: AtomicU64,
    /// Ran and answered an error.
    pub failed: AtomicU64,
    /// Refused before running (arguments, sign-in, permission).
    pub rejected: AtomicU64,
    pub usec: AtomicU64,
    pub histogram: [AtomicU64; HISTOGRAM_BUCKETS],
}

/// A command that took longer than `slowlog-log-slower-than`.
#[derive(Clone)]
pub(super) struct SlowEntry {
    pub id: u64,
    /// Unix seconds.
    pub at_s: u64,
    pub micros: u64,
    pub args: Vec<Vec<u8>>,
    pub client: String,
    pub name: String,
}

#[derive(Default)]
struct SlowLog {
    next_id: u64,
    entries: VecDeque<SlowEntry>,
}

/// One second in which a command took at least `latency-monitor-threshold`: the slowest then.
#[derive(Clone, Copy)]
pub(super) struct Spike {
    pub at_s: u64,
    pub ms: u64,
}

#[derive(Default)]
struct Spikes {
    history: VecDeque<Spike>,
    max_ms: u64,
}

/// A connected client, as `CLIENT LIST` shows it.
pub(super) struct Client {
    pub id: u64,
    pub addr: SocketAddr,
    pub started: Instant,
    /// Milliseconds from the listener's start to the client's last command.
    last_ms: AtomicU64,
    /// The row of its last command (`usize::MAX`: none yet).
    last_command: AtomicUsize,
    pub resp: AtomicU8,
    pub name: Mutex<String>,
    pub user: Mutex<String>,
    /// `CLIENT SETINFO LIB-NAME` and `LIB-VER`.
    pub lib: Mutex<(String, String)>,
}

impl Client {
    pub fn last_command(&self) -> Option<&'static str> {
        COMMANDS.get(self.last_command.load(Ordering::Relaxed)).map(|s| s.name)
    }
}

/// A `SCAN` cursor: where the next page starts.
struct Cursor {
    after: (u32, Vec<u8>),
}

pub(super) struct Observed {
    pub started: Instant,
    pub settings: Settings,
    commands: Vec<CommandStats>,
    /// Connections accepted since the start.
    pub connections: AtomicU64,
    slowlog: Mutex<SlowLog>,
    spikes: Mutex<Spikes>,
    clients: Mutex<BTreeMap<u64, Arc<Client>>>,
    next_client: AtomicU64,
    cursors: Mutex<(HashMap<u64, Cursor>, VecDeque<u64>)>,
}

/// A mutex's guard; a panic elsewhere while it was held leaves plain data, still usable.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How a command ended, for its figures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Ok,
    Failed,
    Rejected,
}

impl Observed {
    pub fn new() -> Observed {
        Observed {
            started: Instant::now(),
            settings: Settings {
                slower_than_us: AtomicI64::new(10_000),
                slowlog_max: AtomicUsize::new(128),
                spike_ms: AtomicU64::new(100),
            },
            commands: COMMANDS.iter().map(|_| CommandStats::default()).collect(),
            connections: AtomicU64::new(0),
            slowlog: Mutex::default(),
            spikes: Mutex::default(),
            clients: Mutex::default(),
            next_client: AtomicU64::new(1),
            cursors: Mutex::default(),
        }
    }

    /// The figures of the command in row `index`.
    pub fn command(&self, index: usize) -> &CommandStats {
        &self.commands[index]
    }

    /// `client` starts a command of row `index` (`CLIENT LIST` shows it as its last).
    pub fn begin(&self, index: usize, client: &Client) {
        client.last_command.store(index, Ordering::Relaxed);
        client.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A command of row `index` ended after `took`, on `client`.
    pub fn record(&self, index: usize, args: &[Vec<u8>], outcome: Outcome, took: Duration, client: &Client) {
        let stats = &self.commands[index];
        let micros = took.as_micros() as u64;
        self.begin(index, client);
        if outcome == Outcome::Rejected {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        stats.calls.fetch_add(1, Ordering::Relaxed);
        stats.usec.fetch_add(micros, Ordering::Relaxed);
        if outcome == Outcome::Failed {
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        let bucket = (u64::BITS - micros.saturating_sub(1).leading_zeros()) as usize;
        stats.histogram[bucket.min(HISTOGRAM_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        let slower_than = self.settings.slower_than_us.load(Ordering::Relaxed);
        if slower_than >= 0 && micros >= slower_than as u64 {
            self.log_slow(args, micros, client);
        }
        let spike_ms = self.settings.spike_ms.load(Ordering::Relaxed);
        if spike_ms > 0 && micros / 1000 >= spike_ms {
            self.spike(micros / 1000);
        }
    }

    fn log_slow(&self, args: &[Vec<u8>], micros: u64, client: &Client) {
        let mut kept: Vec<Vec<u8>> = args.iter().take(SLOWLOG_ARGS_MAX).map(|a| cut(a)).collect();
        if args.len() > SLOWLOG_ARGS_MAX {
            kept.pop();
            kept.push(format!("... ({} more arguments)", args.len() - SLOWLOG_ARGS_MAX + 1).into_bytes());
        }
        let max = self.settings.slowlog_max.load(Ordering::Relaxed);
        let mut log = lock(&self.slowlog);
        let id = log.next_id;
        log.next_id += 1;
        let name = lock(&client.name).clone();
        log.entries.push_front(SlowEntry {
            id,
            at_s: unix_s(),
            micros,
            args: kept,
            client: client.addr.to_string(),
            name,
        });
        log.entries.truncate(max);
    }

    fn spike(&self, ms: u64) {
        let now = unix_s();
        let mut spikes = lock(&self.spikes);
        spikes.max_ms = spikes.max_ms.max(ms);
        match spikes.history.back_mut() {
            Some(last) if last.at_s == now => last.ms = last.ms.max(ms),
            _ => {
                spikes.history.push_back(Spike { at_s: now, ms });
                if spikes.history.len() > SPIKES_MAX {
                    spikes.history.pop_front();
                }
            }
        }
    }

    /// The slow log, newest first, and how many entries it holds.
    pub fn slowlog(&self, count: usize) -> (Vec<SlowEntry>, usize) {
        let log = lock(&self.slowlog);
        (log.entries.iter().take(count).cloned().collect(), log.entries.len())
    }

    pub fn reset_slowlog(&self) {
        lock(&self.slowlog).entries.clear();
    }

    /// The spikes of the `command` event, oldest first, and the slowest since the last reset.
    pub fn spikes(&self) -> (Vec<Spike>, u64) {
        let spikes = lock(&self.spikes);
        (spikes.history.iter().copied().collect(), spikes.max_ms)
    }

    pub fn reset_spikes(&self) -> usize {
        let mut spikes = lock(&self.spikes);
        let had = usize::from(!spikes.history.is_empty());
        *spikes = Spikes::default();
        had
    }

    /// Zeroes every command's figures (`CONFIG RESETSTAT`).
    pub fn reset_commands(&self) {
        for stats in &self.commands {
            for counter in
                [&stats.calls, &stats.failed, &stats.rejected, &stats.usec].into_iter().chain(&stats.histogram)
            {
                counter.store(0, Ordering::Relaxed);
            }
        }
    }

    /// A new client: listed until the returned guard drops.
    pub fn connect(self: &Arc<Self>, addr: SocketAddr) -> ClientGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client {
            id,
            addr,
            started: Instant::now(),
            last_ms: AtomicU64::new(self.started.elapsed().as_millis() as u64),
            last_command: AtomicUsize::new(usize::MAX),
            resp: AtomicU8::new(2),
            name: Mutex::default(),
            user: Mutex::new("default".into()),
            lib: Mutex::default(),
        });
        lock(&self.clients).insert(id, client.clone());
        ClientGuard { observed: self.clone(), client }
    }

    /// Every connected client, oldest first.
    pub fn clients(&self) -> Vec<Arc<Client>> {
        lock(&self.clients).values().cloned().collect()
    }

    /// Seconds since `client`'s last command.
    pub fn idle_s(&self, client: &Client) -> u64 {
        (self.started.elapsed().as_millis() as u64).saturating_sub(client.last_ms.load(Ordering::Relaxed)) / 1000
    }

    /// Where the cursor `id` says the next page starts (`None` for an unknown or forgotten one).
    pub fn cursor(&self, id: u64) -> Option<(u32, Vec<u8>)> {
        lock(&self.cursors).0.get(&id).map(|c| c.after.clone())
    }

    /// A new cursor for a page that starts after `after`.
    pub fn new_cursor(&self, after: (u32, Vec<u8>)) -> u64 {
        let mut cursors = lock(&self.cursors);
        let id = loop {
            // Random, so that a cursor from before a restart or from another node is not taken
            // for one of this listener's.
            let id = rand::random::<u64>() >> 1;
            if id != 0 && !cursors.0.contains_key(&id) {
                break id;
            }
        };
        cursors.0.insert(id, Cursor { after });
        cursors.1.push_back(id);
        if cursors.1.len() > CURSORS_MAX
            && let Some(oldest) = cursors.1.pop_front()
        {
            cursors.0.remove(&oldest);
        }
        id
    }
}

/// Keeps a client listed while its connection lives.
pub(super) struct ClientGuard {
    observed: Arc<Observed>,
    pub client: Arc<Client>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        lock(&self.observed.clients).remove(&self.client.id);
    }
}

/// An argument as the slow log keeps it: at most [`SLOWLOG_ARG_BYTES_MAX`] bytes, then how many
/// more there were.
fn cut(arg: &[u8]) -> Vec<u8> {
    if arg.len() <= SLOWLOG_ARG_BYTES_MAX {
        return arg.to_vec();
    }
    let mut kept = arg[..SLOWLOG_ARG_BYTES_MAX].to_vec();
    kept.extend_from_slice(format!("... ({} more bytes)", arg.len() - SLOWLOG_ARG_BYTES_MAX).as_bytes());
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_commands_are_logged_newest_first_within_the_limit_and_cut() {
        let observed = Arc::new(Observed::new());
        let guard = observed.connect("127.0.0.1:5000".parse().unwrap());
        observed.settings.slowlog_max.store(2, Ordering::Relaxed);
        let (hget, _) = super::super::command::lookup(b"HGET").unwrap();
        let long = vec![b'x'; 200];
        for (i, micros) in [5_000u64, 20_000, 30_000, 40_000].into_iter().enumerate() {
            let args = vec![b"HGET".to_vec(), format!("k{i}").into_bytes(), long.clone()];
            observed.record(hget, &args, Outcome::Ok, Duration::from_micros(micros), &guard.client);
        }
        let (entries, len) = observed.slowlog(10);
        assert_eq!(len, 2, "the limit holds");
        assert_eq!(entries.iter().map(|e| e.micros).collect::<Vec<_>>(), [40_000, 30_000]);
        assert_eq!(entries[0].args[1], b"k3");
        assert!(entries[0].args[2].ends_with(b"... (72 more bytes)"));
        let stats = observed.command(hget);
        assert_eq!(stats.calls.load(Ordering::Relaxed), 4);
        assert_eq!(stats.usec.load(Ordering::Relaxed), 95_000);
        // 5 ms is in (4096, 8192] µs; 40 ms in (32768, 65536].
        assert_eq!(stats.histogram[13].load(Ordering::Relaxed), 1);
        assert_eq!(stats.histogram[16].load(Ordering::Relaxed), 1);
        assert_eq!(guard.client.last_command(), Some("HGET"));
        assert_eq!(observed.clients().len(), 1);
        drop(guard);
        assert!(observed.clients().is_empty(), "a closed connection is no longer listed");
    }
}
