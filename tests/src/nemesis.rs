//! The nemesis: faults injected into real `grex serve` processes on a random schedule while the
//! list-append workload runs, then healing and the check ([`crate::list_append`]).
//!
//! A run is fixed by its seed: the schedule (which fault, on which node, when, for how long) and
//! each client thread's choices come from it, so a failing run prints the seed and
//! `GREX_SEED=... cargo test ...` replays the same schedule (the threads' interleaving still
//! varies).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::clients::{Clients, Endpoint};
use crate::list_append::{self, Anomaly, Final, Kind, Op, Outcome, Tally, Via};
use crate::{TestCluster, job_wasm};

/// One fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 a node, restart it on the same addresses and data after `down`.
    Kill {
        /// The victim.
        node: usize,
        /// How long it stays down.
        down: Duration,
    },
    /// kill -9 a node, restart it after `down` with every address (HTTP, QUIC, peer, Redis) on a
    /// new port, as a node moved to another host would be.
    Move {
        /// The victim.
        node: usize,
        /// How long it stays down.
        down: Duration,
    },
    /// kill -9 the node leading the first bucket's flock (as the canary names it), restart it
    /// after `down`.
    KillLeader {
        /// How long it stays down.
        down: Duration,
    },
    /// SIGSTOP a node, SIGCONT it after `paused`.
    Pause {
        /// The victim.
        node: usize,
        /// How long it stays stopped.
        paused: Duration,
    },
    /// Cut a node off from every other node (both sides drop the traffic); heal after `lasting`.
    Isolate {
        /// The node on its own.
        node: usize,
        /// How long the partition lasts.
        lasting: Duration,
    },
    /// Cut the traffic between `node` and the next node only: each still reaches the others, so
    /// no side is a clean minority.
    CutPair {
        /// One end; the other is the next node.
        node: usize,
        /// How long the cut lasts.
        lasting: Duration,
    },
    /// The node's disk fails: every commit from then on fails, and the node must stop by itself;
    /// it is restarted with a working disk `down` after it stopped.
    DiskFail {
        /// The victim.
        node: usize,
        /// How long it stays down.
        down: Duration,
    },
    /// A new node joins through `node` (flocks move to it while the other faults go on).
    Join {
        /// The node the join is sent to.
        node: usize,
    },
}

impl Fault {
    /// How long the fault lasts (0 for a join: it only starts one).
    fn lasting(&self) -> Duration {
        match *self {
            Fault::Kill { down, .. }
            | Fault::Move { down, .. }
            | Fault::KillLeader { down }
            | Fault::DiskFail { down, .. } => down,
            Fault::Pause { paused, .. } => paused,
            Fault::Isolate { lasting, .. } | Fault::CutPair { lasting, .. } => lasting,
            Fault::Join { .. } => Duration::ZERO,
        }
    }
}

/// Which faults a run draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// Kills (some restarting on new addresses), leader kills (fast and slow restarts) and
    /// pauses.
    Mixed,
    /// Only the flock leader's death, restarted within the failure detector's timeout or after it.
    LeaderKills,
    /// Only kills that keep a node down for 4 s (to time elections).
    LongKills,
    /// Partitions (a node cut off from the rest, or only two nodes from each other), kills and
    /// moves.
    Partitions,
    /// Every fault: kills, pauses, partitions, failing disks, a node joining, module uploads
    /// (nodes need `--fault-injection`).
    Everything,
}

/// A run's settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The seed of everything random.
    pub seed: u64,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Buckets the workload spreads over.
    pub buckets: usize,
    /// Client threads.
    pub workers: usize,
    /// How long faults and load go on.
    pub duration: Duration,
    /// Faults to draw.
    pub mix: Mix,
    /// Extra `grex serve` arguments.
    pub args: Vec<String>,
}

/// A fault as it happened.
#[derive(Clone, Debug)]
pub struct Event {
    /// When it began, since the run began.
    pub at: Duration,
    /// The node it hit.
    pub node: usize,
    /// The fault.
    pub fault: Fault,
    /// For kills: how long until every flock had a leader other than the victim (`None` if
    /// that had not happened by the restart).
    pub leaderless: Option<Duration>,
    /// What else happened (a failed disk: how soon the node stopped).
    pub note: String,
    /// The longest stretch, from the fault until [`RECOVERY`] after it ended, in which no
    /// operation was acknowledged.
    pub unavailable: Duration,
}

/// How long after a fault ends its effects are still counted against it.
pub const RECOVERY: Duration = Duration::from_secs(3);

/// The longest time in `[from, to]` between acknowledgements in `acked` (completion times,
/// sorted), counting from `from` and up to `to`.
fn longest_gap(acked: &[Duration], from: Duration, to: Duration) -> Duration {
    let inside = acked.iter().copied().filter(|t| (from..=to).contains(t));
    let mut last = from;
    let mut longest = Duration::ZERO;
    for t in inside.chain([to]) {
        longest = longest.max(t - last);
        last = t;
    }
    longest
}

/// What a run did and found.
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Every fault, in order.
    pub events: Vec<Event>,
    /// Counts of the history.
    pub tally: Tally,
    /// What the checker found.
    pub anomalies: Vec<Anomaly>,
    /// Module uploads: acknowledged, and every one of them on every node at the end.
    pub uploads: Uploads,
}

/// Module uploads made during a run.
#[derive(Clone, Debug, Default)]
pub struct Uploads {
    /// Names whose upload was acknowledged.
    pub acknowledged: Vec<String>,
    /// Uploads that failed or got no answer.
    pub failed: usize,
}

impl Report {
    /// The schedule and findings, for a failure message.
    pub fn describe(&self) -> String {
        let mut out = format!("seed {} (GREX_SEED={} replays the schedule)\nschedule:\n", self.seed, self.seed);
        for e in &self.events {
            let gap =
                e.leaderless.map(|g| format!(", leaders again after {:.2} s", g.as_secs_f64())).unwrap_or_default();
            out.push_str(&format!(
                "  {:>7.2}s node {} {:?}{gap}{}, nothing acknowledged for {:.2} s\n",
                e.at.as_secs_f64(),
                e.node,
                e.fault,
                e.note,
                e.unavailable.as_secs_f64()
            ));
        }
        out.push_str(&format!("history: {:?}\n", self.tally));
        if !self.uploads.acknowledged.is_empty() || self.uploads.failed > 0 {
            out.push_str(&format!(
                "module uploads: {} acknowledged, {} failed or unanswered\n",
                self.uploads.acknowledged.len(),
                self.uploads.failed
            ));
        }
        for a in &self.anomalies {
            out.push_str(&a.to_string());
        }
        out
    }

    /// The longest time any kill left a flock without a leader (kills whose victim stayed down
    /// long enough to tell).
    pub fn longest_leaderless(&self) -> Option<Duration> {
        self.events.iter().filter_map(|e| e.leaderless).max()
    }
}

/// The schedule of a run: faults 3–6 s apart, drawn from `mix`. At most one join a run.
pub fn schedule(rng: &mut StdRng, config: &RunConfig) -> Vec<(Duration, Fault)> {
    let mut at = Duration::from_secs(2);
    let mut faults = Vec::new();
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
    let mut joined = false;
    while at < config.duration {
        let node = rng.random_range(0..config.nodes);
        let fault = match (config.mix, rng.random_range(0..8)) {
            (Mix::LongKills, _) => Fault::Kill { node, down: Duration::from_secs(4) },
            (Mix::LeaderKills, 0..4) | (Mix::Mixed, 0 | 1) => Fault::KillLeader { down: ms(rng, 50, 400) },
            (Mix::LeaderKills, _) | (Mix::Mixed, 2 | 3) => Fault::KillLeader { down: ms(rng, 1000, 3000) },
            (Mix::Mixed, 4) | (Mix::Partitions | Mix::Everything, 0) => {
                if rng.random_bool(0.5) {
                    Fault::Kill { node, down: ms(rng, 1000, 3000) }
                } else {
                    Fault::Move { node, down: ms(rng, 1000, 3000) }
                }
            }
            (Mix::Mixed, 5) => Fault::Kill { node, down: ms(rng, 1000, 3000) },
            (Mix::Mixed, _) | (Mix::Everything, 1) => Fault::Pause { node, paused: ms(rng, 2000, 4000) },
            (Mix::Partitions, 1..5) | (Mix::Everything, 2 | 3) => Fault::Isolate { node, lasting: ms(rng, 1000, 5000) },
            (Mix::Partitions, _) | (Mix::Everything, 4) => Fault::CutPair { node, lasting: ms(rng, 1000, 5000) },
            (Mix::Everything, 5) if !joined => {
                joined = true;
                Fault::Join { node }
            }
            (Mix::Everything, _) => Fault::DiskFail { node, down: ms(rng, 500, 2000) },
        };
        faults.push((at, fault));
        at += ms(rng, 3000, 6000) + fault.lasting();
    }
    faults
}

/// Starts a cluster, loads `list-append`, runs the workload under the schedule, heals, reads the
/// final state and checks the history.
pub async fn run(config: RunConfig) -> Report {
    println!("nemesis run: seed {} (GREX_SEED={} replays the schedule), {:?}", config.seed, config.seed, config);
    let mut args: Vec<&str> = config.args.iter().map(String::as_str).collect();
    args.extend(["--resp", "127.0.0.1:0"]);
    let mut cluster = TestCluster::start(config.nodes, &args).await;
    cluster.nodes[0].client().await.put_module(list_append::MODULE, job_wasm("list_append")).await.expect("upload");
    let endpoints = Arc::new(Mutex::new(cluster.nodes.iter().map(Endpoint::of).collect::<Vec<_>>()));
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.http_addr().to_owned()).collect();
    let buckets: Vec<String> = (0..config.buckets).map(|b| format!("list-{}-{b}", config.seed % 1000)).collect();
    wait_loaded(&addrs, &buckets[0]);

    let mut rng = StdRng::seed_from_u64(config.seed);
    let faults = schedule(&mut rng, &config);
    let start = Instant::now();
    let history = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..config.workers)
        .map(|w| {
            let (endpoints, buckets, history, stop) =
                (endpoints.clone(), buckets.clone(), history.clone(), stop.clone());
            let mut rng = StdRng::seed_from_u64(config.seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            std::thread::spawn(move || {
                let mut clients = Clients::new();
                let mut next = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (node, endpoint) = {
                        let endpoints = endpoints.lock().unwrap_or_else(|p| p.into_inner());
                        let node = rng.random_range(0..endpoints.len());
                        (node, endpoints[node].clone())
                    };
                    let bucket = rng.random_range(0..buckets.len());
                    let kind = match rng.random_range(0..8) {
                        0..6 => {
                            next += 1;
                            Kind::Append(w as u64 * 1_000_000_000 + next)
                        }
                        6 => Kind::Read,
                        _ => Kind::FollowerRead,
                    };
                    let via = [Via::Http, Via::Quic, Via::Resp, Via::Router][rng.random_range(0..4)];
                    let op = clients.perform(start, w, (node, &endpoint), (bucket, &buckets[bucket]), kind, via);
                    let failed = !matches!(op.outcome, Outcome::Ok(_));
                    history.lock().unwrap_or_else(|p| p.into_inner()).push(op);
                    if failed {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();

    let uploader = (config.mix == Mix::Everything).then(|| {
        let (endpoints, stop) = (endpoints.clone(), stop.clone());
        let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5eed_0f00_u64);
        let seed = config.seed;
        std::thread::spawn(move || upload_modules(&endpoints, &stop, &mut rng, seed))
    });

    let mut events = Vec::new();
    let mut anomalies = Vec::new();
    for (at, fault) in faults {
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let (event, anomaly) = inject(&mut cluster, &buckets[0], start, fault);
        *endpoints.lock().unwrap_or_else(|p| p.into_inner()) = cluster.nodes.iter().map(Endpoint::of).collect();
        // As it happens, so a run that fails before its report still shows its schedule.
        println!("fault at {:>7.2}s node {} {:?}{}", event.at.as_secs_f64(), event.node, event.fault, event.note);
        events.push(event);
        anomalies.extend(anomaly);
    }
    if let Some(rest) = config.duration.checked_sub(start.elapsed()) {
        std::thread::sleep(rest);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a workload thread panicked");
    }
    let uploads = uploader.map(|u| u.join().expect("the uploader panicked")).unwrap_or_default();
    let count = cluster.nodes.len();
    cluster.wait_formed(count).await;
    let nodes: Vec<(String, String)> = cluster.nodes.iter().map(|n| (n.id.clone(), n.http_addr().to_owned())).collect();
    let finals: Vec<Final> = buckets.iter().map(|b| final_state(&nodes, b)).collect();
    let history: Vec<Op> = std::mem::take(&mut *history.lock().unwrap_or_else(|p| p.into_inner()));
    let mut acked: Vec<Duration> =
        history.iter().filter(|o| matches!(o.outcome, Outcome::Ok(_))).map(|o| o.completed).collect();
    acked.sort();
    for e in &mut events {
        // A fault's event is recorded when its injection returns: kills, pauses and cuts have
        // lasted their time by then.
        let end = (e.at + e.fault.lasting() + RECOVERY).min(config.duration);
        e.unavailable = longest_gap(&acked, e.at, end.max(e.at));
    }
    anomalies.extend(list_append::check(&history, &finals));
    anomalies.extend(modules_lost(&nodes, &uploads));
    anomalies.extend(panics(&cluster));
    Report { seed: config.seed, events, tally: list_append::tally(&history), anomalies, uploads }
}

/// Uploads the `counter` module under a new name through a random node about once a second
/// until `stop`.
fn upload_modules(endpoints: &Mutex<Vec<Endpoint>>, stop: &AtomicBool, rng: &mut StdRng, seed: u64) -> Uploads {
    let wasm = job_wasm("counter");
    let mut uploads = Uploads::default();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
        n += 1;
        let name = format!("up-{}-{n}", seed % 1000);
        let node = {
            let endpoints = endpoints.lock().unwrap_or_else(|p| p.into_inner());
            endpoints[rng.random_range(0..endpoints.len())].http.clone()
        };
        let node = &node;
        let path = format!("/v1/modules/{name}");
        match list_append::request_typed(node, "PUT", &path, "application/wasm", &wasm, Duration::from_secs(20)) {
            Ok((200, _)) => uploads.acknowledged.push(name),
            _ => uploads.failed += 1,
        }
    }
    uploads
}

/// Every acknowledged upload must be listed by every node once the faults healed.
/// A panic in any node's log: a task of the node died (the process may live on without it).
fn panics(cluster: &TestCluster) -> Vec<Anomaly> {
    let found = cluster.nodes.iter().find_map(|n| {
        let log = n.log();
        let at = log.find("panicked at")?;
        let line = log[at..].lines().take(2).collect::<Vec<_>>().join(" ");
        Some((n.id.clone(), line))
    });
    found
        .map(|(id, line)| Anomaly {
            kind: "node-panicked",
            bucket: 0,
            what: format!("node {id}: {line}"),
            ops: Vec::new(),
        })
        .into_iter()
        .collect()
}

fn modules_lost(nodes: &[(String, String)], uploads: &Uploads) -> Vec<Anomaly> {
    let listed = |addr: &str| -> Vec<String> {
        get_json(addr, "/v1/modules")
            .and_then(|m| {
                m["modules"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|m| m["name"].as_str().map(str::to_owned)).collect())
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    for (id, addr) in nodes {
        let missing = loop {
            let have = listed(addr);
            let missing: Vec<&String> = uploads.acknowledged.iter().filter(|n| !have.contains(n)).collect();
            if missing.is_empty() || Instant::now() >= deadline {
                break missing;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !missing.is_empty() {
            return vec![Anomaly {
                kind: "module-lost",
                bucket: 0,
                what: format!("node {id} ({addr}) does not list acknowledged uploads {missing:?}"),
                ops: Vec::new(),
            }];
        }
    }
    Vec::new()
}

/// Waits until a job runs on the first bucket through every node (the module reached them all).
fn wait_loaded(addrs: &[String], bucket: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for addr in addrs {
        while !matches!(list_append::run_job(addr, bucket, Kind::Read, Duration::from_secs(10)), Ok((200, _))) {
            assert!(Instant::now() < deadline, "list-append did not run through {addr} within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn inject(cluster: &mut TestCluster, bucket: &str, start: Instant, fault: Fault) -> (Event, Option<Anomaly>) {
    let at = start.elapsed();
    let event =
        |node: usize| Event { at, node, fault, leaderless: None, note: String::new(), unavailable: Duration::ZERO };
    let count = cluster.nodes.len();
    match fault {
        Fault::Pause { node, paused } => {
            cluster.nodes[node].signal("STOP");
            std::thread::sleep(paused);
            cluster.nodes[node].signal("CONT");
            (event(node), None)
        }
        Fault::Kill { node, down } | Fault::Move { node, down } => {
            (kill_and_restart(cluster, node, down, at, fault), None)
        }
        Fault::KillLeader { down } => {
            let node = leader_of(cluster, bucket).unwrap_or(0);
            (kill_and_restart(cluster, node, down, at, fault), None)
        }
        Fault::Isolate { node, lasting } => {
            let others: Vec<usize> = (0..count).filter(|n| *n != node).collect();
            partition(cluster, &[(node, others)], lasting);
            (event(node), None)
        }
        Fault::CutPair { node, lasting } => {
            let other = (node + 1) % count;
            partition(cluster, &[(node, vec![other])], lasting);
            (event(node), None)
        }
        Fault::DiskFail { node, down } => {
            cluster.nodes[node].tell("disk fail");
            let failed = Instant::now();
            let mut event = event(node);
            let anomaly = match cluster.nodes[node].wait_exit(Duration::from_secs(15)) {
                Some(code) => {
                    event.note =
                        format!(", stopped by itself after {:.2} s (exit {code:?})", failed.elapsed().as_secs_f64());
                    None
                }
                None => {
                    cluster.nodes[node].kill9();
                    Some(Anomaly {
                        kind: "disk-fail-not-stopped",
                        bucket: 0,
                        what: format!("node {node} was still running 15 s after its disk failed"),
                        ops: Vec::new(),
                    })
                }
            };
            std::thread::sleep(down);
            cluster.nodes[node].restart();
            (event, anomaly)
        }
        Fault::Join { node } => {
            let args = cluster.nodes[0].args().to_vec();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster.join_via(node, &args);
            let mut event = event(node);
            event.note = format!(", node {} joined", cluster.nodes.len() - 1);
            (event, None)
        }
    }
}

/// Cuts the traffic between each `(node, others)` pair's node and each of its others, on both
/// sides, for `lasting`; then heals every cut.
fn partition(cluster: &mut TestCluster, cuts: &[(usize, Vec<usize>)], lasting: Duration) {
    let mut cut: Vec<Vec<String>> = vec![Vec::new(); cluster.nodes.len()];
    for (node, others) in cuts {
        for other in others {
            cut[*node].push(cluster.nodes[*other].id.clone());
            cut[*other].push(cluster.nodes[*node].id.clone());
        }
    }
    for (node, ids) in cut.iter().enumerate() {
        if !ids.is_empty() {
            cluster.nodes[node].tell(&format!("cut {}", ids.join(" ")));
        }
    }
    std::thread::sleep(lasting);
    for (node, ids) in cut.iter().enumerate() {
        if !ids.is_empty() {
            cluster.nodes[node].tell("cut");
        }
    }
}

fn kill_and_restart(cluster: &mut TestCluster, node: usize, down: Duration, at: Duration, fault: Fault) -> Event {
    let victim = cluster.nodes[node].id.clone();
    cluster.nodes[node].kill9();
    let killed = Instant::now();
    let survivor = cluster.nodes[(node + 1) % cluster.nodes.len()].http_addr().to_owned();
    let mut leaderless = None;
    while killed.elapsed() < down {
        if leaderless.is_none() && every_flock_led_by_other_than(&survivor, &victim) {
            leaderless = Some(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut note = String::new();
    if let Fault::Move { .. } = fault {
        let args = cluster.nodes[node].args().to_vec();
        let old = cluster.nodes[node].http.clone();
        cluster.nodes[node].restart_elsewhere(&args.iter().map(String::as_str).collect::<Vec<_>>());
        note = format!(", moved from {old} to {}", cluster.nodes[node].http);
    } else {
        cluster.nodes[node].restart();
    }
    Event { at, node, fault, leaderless, note, unavailable: Duration::ZERO }
}

/// A GET's JSON answer, if `node` answers 200 within a second.
fn get_json(node: &str, path: &str) -> Option<serde_json::Value> {
    match list_append::request(node, "GET", path, b"", Duration::from_secs(1)) {
        Ok((200, body)) => serde_json::from_slice(&body).ok(),
        _ => None,
    }
}

/// Whether `via` sees every flock led by a node other than `victim`.
fn every_flock_led_by_other_than(via: &str, victim: &str) -> bool {
    get_json(via, "/v1/flocks").is_some_and(|map| {
        map["flocks"]
            .as_array()
            .is_some_and(|flocks| flocks.iter().all(|f| f["leader"].as_str().is_some_and(|l| l != victim)))
    })
}

/// The node the canary names for `bucket`, asked of any node that answers.
fn leader_of(cluster: &TestCluster, bucket: &str) -> Option<usize> {
    let url = cluster.nodes.iter().find_map(|n| get_json(n.http_addr(), &format!("/v1/canary/{bucket}")))?;
    let url = url["url"].as_str()?;
    cluster.nodes.iter().position(|n| n.http == url)
}

/// The list a read returns through node 0 after healing, and the committed copy of every node
/// that herds the bucket's flock once they agree with it (followers apply what they learn is
/// committed within moments).
fn final_state(nodes: &[(String, String)], bucket: &str) -> Final {
    let deadline = Instant::now() + Duration::from_secs(30);
    let list = loop {
        match list_append::run_job(&nodes[0].1, bucket, Kind::Read, Duration::from_secs(20)) {
            Ok((200, body)) => break list_append::parse_list(&String::from_utf8_lossy(&body)).expect("a list"),
            other => {
                assert!(Instant::now() < deadline, "the final read of {bucket} failed: {other:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let herders = herders_of(&nodes[0].1, bucket);
    let addrs: Vec<&str> =
        nodes.iter().filter(|(id, _)| herders.is_empty() || herders.contains(id)).map(|(_, a)| a.as_str()).collect();
    let copy = |addr: &str| match list_append::request(
        addr,
        "GET",
        &format!("/v1/buckets/{bucket}/items/list"),
        b"",
        Duration::from_secs(10),
    ) {
        Ok((200, body)) => list_append::parse_list(&String::from_utf8_lossy(&body)).unwrap_or_default(),
        _ => Vec::new(),
    };
    let mut copies: Vec<Vec<u64>> = addrs.iter().map(|a| copy(a)).collect();
    while copies.iter().any(|c| *c != list) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        copies = addrs.iter().map(|a| copy(a)).collect();
    }
    Final { list, copies }
}

/// The ids of the nodes that herd `bucket`'s flock, as `via` sees the map.
fn herders_of(via: &str, bucket: &str) -> Vec<String> {
    let Some(flock) = get_json(via, &format!("/v1/canary/{bucket}")).and_then(|c| c["flock"].as_u64()) else {
        return Vec::new();
    };
    get_json(via, "/v1/flocks")
        .and_then(|map| {
            map["flocks"].as_array()?.iter().find(|f| f["flock"].as_u64() == Some(flock)).and_then(|f| {
                f["herders"].as_array().map(|h| h.iter().filter_map(|h| h.as_str().map(str::to_owned)).collect())
            })
        })
        .unwrap_or_default()
}
