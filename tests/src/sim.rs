//! A deterministic simulation of one flock: its herders' elections, leader readiness, routing and
//! jobs on a simulated network and clock, in one thread, checked like the process tests.
//!
//! The decisions are grex's own code: [`decide::verdict`], [`ElectionTimer`], [`decide::route`],
//! [`decide::relay`] and [`LeadStart::ready_term`], with grex's constants (ping interval,
//! dead-after, supervision pace, vote lease, outranking window, unclaimed-leader time). Around them
//! runs a model of the rest, as grex runs it:
//!
//! - Raft as openraft 0.9 runs in grex: no timers of its own (elections only when the supervisor
//!   calls one, heartbeats only when a leader has something to say or confirms its lead), votes
//!   refused under a live leader's lease, a refused candidate told the voter's last log id, and a
//!   node whose persisted vote was its own, committed, restored as leader at restart;
//! - durable log and vote, but a state that is checkpointed about once a second: a restarted node
//!   starts from its checkpoint and re-applies only once a leader tells it what is committed;
//! - a job that runs on the ready leader against its applied state and commits the whole list it
//!   computed (as a change set does), answered once applied; a read confirmed by a heartbeat
//!   round sent after it ran (the read index);
//! - a failure detector fed by pings that carry the sender's ready leads (the claims non-herders
//!   route by), and forwarding with one redirect, retries every 50 ms and a 4 s patience; a job
//!   for a leader the entry node has down goes through a herder that passes it on once.
//!
//! Faults: crash and restart (slow, or faster than the failure detector notices), pauses longer
//! than the detector's timeout, one node cut off, two nodes cut from each other, message loss,
//! and a node joining: the flock map moves the flock onto it, and the leader changes the group's
//! membership as grex does (learner, catch-up, joint change; one change at a time).
//! After them the cluster must serve a read within 10 s, and every herder the map names must hold
//! the same list and have the map's herders as its committed membership.
//! Each schedule is random from its seed; the same seed replays the same run exactly.
//!
//! [`Mutation`] switches a safeguard off, to show the checker catches what it guards against.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use grex::cluster::decide::{self, ElectionTimer, GroupSight, SUPERVISE_EVERY, VOTE_LEASE, Verdict};
use grex::cluster::leadership::{LeadStart, LeadView, OUTRANKED_FOR};
use grex::cluster::{DEAD_AFTER, NodeId, PING_INTERVAL};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::list_append::{self, Anomaly, Final, Kind, Op, Outcome, Via};

/// The simulated flock's group id.
const GROUP: u32 = 7;
/// How long a leader waits for a follower's answer before it sends again (openraft's heartbeat
/// interval in grex).
const RESEND_AFTER: Duration = Duration::from_millis(450);
/// How often a leader looks at what its followers lack.
const REPLICATE_EVERY: Duration = Duration::from_millis(50);
/// How often a node checkpoints its state (the state file is synced about once a second).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How often an idle led flock is considered for handing back to its preferred herder.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How long a job keeps looking for its leader.
const ROUTE_PATIENCE: Duration = Duration::from_secs(4);
/// Pause between routing tries.
const ROUTE_RETRY: Duration = Duration::from_millis(50);
/// How long a client waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(6);
/// Jobs a leader holds waiting for the bucket.
const QUEUE_MAX: usize = 32;
/// Entries per append message.
const BATCH_MAX: usize = 64;
/// After the faults: how long clients go on, and how long the cluster has to serve a read.
const CALM: Duration = Duration::from_secs(1);
const RECOVERY: Duration = Duration::from_secs(10);

/// A safeguard switched off, to show that the checker notices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mutation {
    /// Everything as in grex.
    #[default]
    None,
    /// A leader runs jobs as soon as it leads, before it applied what it committed before.
    NoReadiness,
    /// A job that wrote nothing is answered without confirming the lead.
    NoReadConfirm,
    /// A herder answers a read-only job from the newest entry of its log, committed or not,
    /// instead of from its applied state.
    FollowerReadsUnapplied,
    /// A voter that refused a candidate because its own log is longer still leaves the election
    /// to the herders when the map moved the flock away from it.
    NoRightToRun,
    /// Followers go on following a live leader that no longer claims the flock.
    FollowUnclaimed,
}

impl Mutation {
    /// Every mutation, for choosing one by name.
    pub const ALL: [Mutation; 6] = [
        Mutation::None,
        Mutation::NoReadiness,
        Mutation::NoReadConfirm,
        Mutation::FollowerReadsUnapplied,
        Mutation::NoRightToRun,
        Mutation::FollowUnclaimed,
    ];
}

/// One simulated run's shape, all drawn from its seed.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// The seed everything below and every random choice of the run comes from.
    pub seed: u64,
    /// Nodes; the first three herd the flock, the others route to it.
    pub nodes: usize,
    /// Concurrent clients.
    pub workers: usize,
    /// How long faults are injected.
    pub faults_for: Duration,
    /// The safeguard switched off, if any.
    pub mutation: Mutation,
}

impl Schedule {
    /// The schedule of `seed`.
    pub fn of(seed: u64, mutation: Mutation) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        Schedule {
            seed,
            nodes: rng.random_range(3..=5),
            workers: rng.random_range(2..=6),
            faults_for: Duration::from_millis(rng.random_range(3_000..10_000)),
            mutation,
        }
    }
}

/// What one run did and found.
pub struct Report {
    /// The run's shape.
    pub schedule: Schedule,
    /// Every client operation.
    pub history: Vec<Op>,
    /// The faults, in order, as `(time, what)`.
    pub faults: Vec<(Duration, String)>,
    /// What the checker and the invariants found.
    pub anomalies: Vec<Anomaly>,
    /// Elections called.
    pub elections: u64,
    /// Terms in which a node became leader.
    pub leaders: u64,
    /// Longest stretch during the faults with no operation acknowledged while one was waiting.
    pub longest_unavailable: Duration,
}

impl Report {
    /// Seed, schedule and anomalies, for a failure message.
    pub fn explain(&self) -> String {
        let s = &self.schedule;
        let mut out = format!(
            "seed {} (GREX_SEED={} replays it): {} nodes, {} clients, faults for {:.1} s, {:?}\nschedule:\n",
            s.seed,
            s.seed,
            s.nodes,
            s.workers,
            s.faults_for.as_secs_f64(),
            s.mutation
        );
        for (at, what) in &self.faults {
            let _ = writeln!(out, "  {:>7.3}s {what}", at.as_secs_f64());
        }
        for anomaly in &self.anomalies {
            let _ = write!(out, "{anomaly}");
        }
        out
    }
}

/// Runs the schedule of `seed`.
pub fn run(seed: u64, mutation: Mutation) -> Report {
    let schedule = Schedule::of(seed, mutation);
    let mut sim = Sim::new(schedule.clone());
    sim.run();
    let fin = sim.finals();
    let mut anomalies = std::mem::take(&mut sim.anomalies);
    if let Some(fin) = fin {
        anomalies.extend(list_append::check(&sim.history, &[fin]));
    }
    Report {
        schedule,
        longest_unavailable: sim.longest_unavailable(),
        history: sim.history,
        faults: sim.fault_log,
        anomalies,
        elections: sim.elections,
        leaders: sim.leaders.len() as u64,
    }
}

#[derive(Clone)]
struct Entry {
    term: u64,
    /// The whole list the job computed; `None` for a leader's blank entry or a membership change.
    list: Option<Rc<[u64]>>,
    /// A membership change: the group's membership from this entry on (as openraft, a node uses
    /// the latest one in its log, committed or not).
    config: Option<Rc<Config>>,
}

impl Entry {
    fn blank(term: u64) -> Entry {
        Entry { term, list: None, config: None }
    }
}

/// A group's membership: its voters, in a joint change also the new voters (a decision then needs
/// a majority of each), and learners that receive the log without voting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Config {
    voters: Vec<usize>,
    joint: Vec<usize>,
    learners: Vec<usize>,
}

impl Config {
    /// Who votes: both sides of a joint change.
    fn voter_ids(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self.voters.iter().chain(&self.joint).copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    fn votes(&self, n: usize) -> bool {
        self.voters.contains(&n) || self.joint.contains(&n)
    }

    /// Who the leader sends the log to (itself included).
    fn members(&self) -> Vec<usize> {
        let mut all = self.voter_ids();
        all.extend(&self.learners);
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Whether the nodes `has` holds make a decision: a majority of the voters, and in a joint
    /// change a majority of the new voters too.
    fn quorum(&self, has: impl Fn(usize) -> bool) -> bool {
        let majority = |set: &[usize]| set.iter().filter(|v| has(**v)).count() * 2 > set.len();
        majority(&self.voters) && (self.joint.is_empty() || majority(&self.joint))
    }
}

#[derive(Clone)]
enum Msg {
    Ping {
        lead: u64,
    },
    Vote {
        term: u64,
        last: (u64, u64),
    },
    VoteReply {
        term: u64,
        granted: bool,
        last: (u64, u64),
    },
    Append {
        term: u64,
        prev: (u64, u64),
        entries: Vec<Entry>,
        commit: u64,
        round: u64,
    },
    AppendReply {
        term: u64,
        ok: bool,
        matched: u64,
        round: u64,
    },
    /// With `relay`, the sender cannot reach the leader: pass the job on if this node can.
    Job {
        op: usize,
        relay: bool,
    },
    NotLeader {
        op: usize,
        leader: Option<usize>,
    },
    JobReply {
        op: usize,
        outcome: Outcome,
    },
}

enum Event {
    Deliver { to: usize, to_inc: u64, from: usize, from_inc: u64, msg: Msg },
    Ping(usize, u64),
    Supervise(usize, u64),
    Replicate(usize, u64),
    Checkpoint(usize, u64),
    Route(usize, u64, usize),
    Invoke(usize),
    Timeout(usize),
    Fault(Fault),
    FinalRead,
}

#[derive(Clone, Debug)]
enum Fault {
    Crash(usize),
    Restart(usize),
    Pause(usize, Duration),
    Cut(Vec<(usize, usize)>),
    Heal(Vec<(usize, usize)>),
    Loss(f64),
    /// The flock map moves the flock: `add` replaces `drop` among its herders (a node joined).
    Move {
        add: usize,
        drop: usize,
    },
}

struct Timed {
    at: Duration,
    seq: u64,
    event: Event,
}

impl PartialEq for Timed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timed {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Follower,
    Candidate,
    Leader,
}

/// Where a job's answer goes: its client, or the node that forwarded it.
#[derive(Clone, Copy)]
enum ReplyTo {
    Client,
    Node(usize),
}

/// A job waiting at the node its client sent it to.
struct Routing {
    deadline: Duration,
    redirect: Option<usize>,
    redirects: u32,
    forwarded_to: Option<usize>,
    /// `forwarded_to` passes the job on to a leader this node cannot reach.
    relayed: bool,
}

#[derive(Default)]
struct Lead {
    next: BTreeMap<usize, u64>,
    matched: BTreeMap<usize, u64>,
    in_flight: BTreeMap<usize, Duration>,
    told_commit: BTreeMap<usize, u64>,
    running: Option<(usize, ReplyTo, u64, Rc<[u64]>)>,
    queue: Vec<(usize, ReplyTo)>,
    reads: Vec<(usize, ReplyTo, Rc<[u64]>, u64)>,
    rounds_started: u64,
    round_acks: BTreeSet<usize>,
    round_since: Option<Duration>,
}

struct Node {
    id: NodeId,
    index: usize,
    up: bool,
    inc: u64,
    paused_until: Duration,
    // Durable.
    term: u64,
    voted_for: Option<usize>,
    led_term: bool,
    log: Vec<Entry>,
    /// The membership entries of the log by index, after the initial membership at index 0.
    configs: Vec<(u64, Rc<Config>)>,
    checkpoint: (u64, u64, Rc<[u64]>),
    // Volatile.
    role: Role,
    leader: Option<usize>,
    lease_until: Duration,
    votes: BTreeSet<usize>,
    commit: u64,
    applied: (u64, u64),
    state: Rc<[u64]>,
    heard: Vec<Option<Duration>>,
    claims: Vec<u64>,
    hint: Option<usize>,
    timer: ElectionTimer,
    lead_start: LeadStart,
    ready_term: u64,
    outranked: Option<(usize, Duration)>,
    /// When this node last refused a candidate because its own log is longer.
    outranks: Option<Duration>,
    active_at: Duration,
    last_reconcile: Duration,
    lead: Lead,
    routing: BTreeMap<usize, Routing>,
    /// Jobs this node passed on for a node that could not reach the leader: op → (that node, the
    /// leader).
    relaying: BTreeMap<usize, (usize, usize)>,
}

impl Node {
    fn last(&self) -> (u64, u64) {
        (self.log.last().map_or(0, |e| e.term), self.log.len() as u64)
    }

    /// The membership this node goes by: the latest in its log.
    fn config(&self) -> &Config {
        &self.configs.last().expect("the initial membership").1
    }

    fn votes(&self) -> bool {
        self.config().votes(self.index)
    }

    fn push(&mut self, entry: Entry) {
        if let Some(config) = &entry.config {
            self.configs.push((self.log.len() as u64 + 1, config.clone()));
        }
        self.log.push(entry);
    }

    /// Drops the entries from `index` on (a conflicting suffix), and the memberships they held.
    fn truncate(&mut self, index: u64) {
        self.log.truncate(index as usize - 1);
        self.configs.retain(|(at, _)| *at == 0 || *at < index);
    }

    fn term_at(&self, index: u64) -> u64 {
        if index == 0 { 0 } else { self.log.get(index as usize - 1).map_or(0, |e| e.term) }
    }
}

struct ClientOp {
    worker: usize,
    node: usize,
    kind: Kind,
    invoked: Duration,
    done: bool,
}

struct Sim {
    schedule: Schedule,
    rng: StdRng,
    now: Duration,
    seq: u64,
    events: BinaryHeap<Timed>,
    nodes: Vec<Node>,
    herders: Vec<NodeId>,
    cuts: BTreeMap<(usize, usize), u32>,
    loss: f64,
    ops: Vec<ClientOp>,
    history: Vec<Op>,
    next_value: u64,
    final_read: Option<Rc<[u64]>>,
    fault_log: Vec<(Duration, String)>,
    anomalies: Vec<Anomaly>,
    leaders: BTreeMap<u64, usize>,
    applied_terms: Vec<u64>,
    elections: u64,
    /// Prints what happens (`GREX_SIM_TRACE=1`), for replaying one seed.
    trace: bool,
}

impl Sim {
    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("{:>9.3}s {}", self.now.as_secs_f64(), what());
        }
    }

    fn new(schedule: Schedule) -> Sim {
        let mut rng = StdRng::seed_from_u64(schedule.seed ^ 0x5EED_F10C);
        let nodes: Vec<Node> = (0..schedule.nodes)
            .map(|i| Node {
                id: rng.random::<u64>() | 1,
                index: i,
                up: true,
                inc: 0,
                paused_until: Duration::ZERO,
                term: 0,
                voted_for: None,
                led_term: false,
                log: Vec::new(),
                configs: vec![(0, Rc::new(Config { voters: vec![0, 1, 2], ..Config::default() }))],
                checkpoint: (0, 0, Rc::from([])),
                role: Role::Follower,
                leader: None,
                lease_until: Duration::ZERO,
                votes: BTreeSet::new(),
                commit: 0,
                applied: (0, 0),
                state: Rc::from([]),
                heard: vec![None; schedule.nodes],
                claims: vec![0; schedule.nodes],
                hint: None,
                timer: ElectionTimer::default(),
                lead_start: LeadStart::default(),
                ready_term: 0,
                outranked: None,
                outranks: None,
                active_at: Duration::ZERO,
                last_reconcile: Duration::ZERO,
                lead: Lead::default(),
                routing: BTreeMap::new(),
                relaying: BTreeMap::new(),
            })
            .collect();
        // The flock map's order of the herders: its first is the preferred leader.
        let mut herders: Vec<NodeId> = nodes[..3].iter().map(|n| n.id).collect();
        herders.rotate_left(rng.random_range(0..3));
        Sim {
            schedule,
            rng,
            now: Duration::ZERO,
            seq: 0,
            events: BinaryHeap::new(),
            nodes,
            herders,
            cuts: BTreeMap::new(),
            loss: 0.0,
            ops: Vec::new(),
            history: Vec::new(),
            next_value: 1,
            final_read: None,
            fault_log: Vec::new(),
            anomalies: Vec::new(),
            leaders: BTreeMap::new(),
            applied_terms: Vec::new(),
            elections: 0,
            trace: std::env::var_os("GREX_SIM_TRACE").is_some(),
        }
    }

    fn at(&mut self, after: Duration, event: Event) {
        self.seq += 1;
        self.events.push(Timed { at: self.now + after, seq: self.seq, event });
    }

    fn ms(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.rng.random_range(range))
    }

    fn anomaly(&mut self, kind: &'static str, what: String) {
        if self.anomalies.iter().filter(|a| a.kind == kind).count() < 3 {
            self.anomalies.push(Anomaly {
                kind,
                bucket: 0,
                what: format!("at {:.3} s: {what}", self.now.as_secs_f64()),
                ops: Vec::new(),
            });
        }
    }

    fn run(&mut self) {
        for n in 0..self.nodes.len() {
            self.start_node(n);
        }
        // A cluster's first leader: the map's preferred herder calls the first election.
        let first = self.index_of(self.herders[0]);
        self.elect(first);
        for worker in 0..self.schedule.workers {
            let after = self.ms(50..300);
            self.at(after, Event::Invoke(worker));
        }
        self.plan_faults();
        let end_of_clients = self.schedule.faults_for + CALM;
        self.at(end_of_clients, Event::FinalRead);
        // The last client operation may wait out its timeout.
        let deadline = end_of_clients + CLIENT_TIMEOUT + RECOVERY;
        while let Some(Timed { at, event, .. }) = self.events.pop() {
            if at > deadline {
                break;
            }
            self.now = at;
            self.handle(event);
            if self.converged() {
                break;
            }
        }
        // Operations still under way when the run ends may yet commit.
        for op in 0..self.ops.len() {
            self.complete(op, Outcome::Unknown("no answer when the run ended".into()));
        }
        if self.final_read.is_some() {
            for h in self.map_herders() {
                if !self.settled(h) {
                    let what = format!("node {h}'s membership is {:?}, not the map's herders", self.nodes[h].config());
                    self.anomaly("membership-unsettled", what);
                }
            }
        }
        if self.final_read.is_none() {
            self.anomaly(
                "unavailable",
                format!("no read succeeded within {} s after the faults healed", RECOVERY.as_secs()),
            );
        }
    }

    /// The final read is in and every herder holds it.
    fn converged(&self) -> bool {
        let Some(list) = &self.final_read else { return false };
        self.map_herders().iter().all(|h| self.nodes[*h].state == *list && self.settled(*h))
    }

    fn finals(&mut self) -> Option<Final> {
        let list = self.final_read.clone()?;
        let copies = self.map_herders().iter().map(|h| self.nodes[*h].state.to_vec()).collect();
        Some(Final { list: list.to_vec(), copies })
    }

    /// Node `n`'s membership is the map's herders, committed.
    fn settled(&self, n: usize) -> bool {
        let node = &self.nodes[n];
        let mut want = self.map_herders();
        want.sort_unstable();
        let (at, config) = node.configs.last().expect("a membership");
        config.voters == want && config.joint.is_empty() && *at <= node.commit
    }

    fn longest_unavailable(&self) -> Duration {
        let mut oks: Vec<Duration> = self
            .history
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Ok(_)) && o.completed <= self.schedule.faults_for)
            .map(|o| o.completed)
            .collect();
        oks.sort();
        oks.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    fn index_of(&self, id: NodeId) -> usize {
        self.nodes.iter().position(|n| n.id == id).expect("a node of the simulation")
    }

    /// Random faults over the first `faults_for` of the run, each healed before it ends.
    fn plan_faults(&mut self) {
        let end = self.schedule.faults_for;
        // Most runs with a fourth node: it joins, and the map moves the flock onto it.
        // Some of those move it again later: back onto the node it left (whose copy is stale by
        // then), or off the node that joined.
        if self.nodes.len() > 3 && self.rng.random_bool(0.7) {
            let at = self.ms(300..end.as_millis() as u64);
            let drop = self.rng.random_range(0..3);
            self.at(at, Event::Fault(Fault::Move { add: 3, drop }));
            if self.rng.random_bool(0.4) {
                let later = (at + self.ms(500..4_000)).min(end);
                let (add, drop) = if self.rng.random_bool(0.5) {
                    (drop, (drop + self.rng.random_range(1..3)) % 3)
                } else {
                    (drop, 3)
                };
                self.at(later, Event::Fault(Fault::Move { add, drop }));
            }
        }
        let mut t = self.ms(200..800);
        while t < end {
            let n = self.rng.random_range(0..self.nodes.len());
            let lasting = self.ms(300..3_000).min(end.saturating_sub(t));
            // Each fault, and when and how it ends.
            let (start, stop): (Fault, Option<(Duration, Fault)>) = match self.rng.random_range(0..6) {
                0 => (Fault::Crash(n), Some((lasting, Fault::Restart(n)))),
                // Back faster than the failure detector notices.
                1 => (Fault::Crash(n), Some((self.ms(5..200), Fault::Restart(n)))),
                2 => (Fault::Pause(n, lasting), None),
                3 => {
                    let pairs: Vec<(usize, usize)> =
                        (0..self.nodes.len()).filter(|m| *m != n).map(|m| pair(n, m)).collect();
                    (Fault::Cut(pairs.clone()), Some((lasting, Fault::Heal(pairs))))
                }
                4 => {
                    let m = (n + 1 + self.rng.random_range(0..self.nodes.len() - 1)) % self.nodes.len();
                    (Fault::Cut(vec![pair(n, m)]), Some((lasting, Fault::Heal(vec![pair(n, m)]))))
                }
                _ => (Fault::Loss(self.rng.random_range(0.05..0.4)), Some((lasting, Fault::Loss(0.0)))),
            };
            self.at(t, Event::Fault(start));
            if let Some((after, stop)) = stop {
                self.at(t + after, Event::Fault(stop));
            }
            // Faults overlap now and then.
            t += if self.rng.random_bool(0.3) { self.ms(100..600) } else { lasting + self.ms(200..1_500) };
        }
    }

    fn handle(&mut self, event: Event) {
        // A paused node handles nothing until it resumes: its events wait.
        let node_of = match &event {
            Event::Deliver { to, .. } => Some(*to),
            Event::Ping(n, _) | Event::Supervise(n, _) | Event::Replicate(n, _) | Event::Checkpoint(n, _) => Some(*n),
            Event::Route(n, _, _) => Some(*n),
            _ => None,
        };
        if let Some(n) = node_of
            && self.nodes[n].paused_until > self.now
        {
            let wait = self.nodes[n].paused_until - self.now;
            self.at(wait, event);
            return;
        }
        match event {
            Event::Deliver { to, to_inc, from, from_inc, msg } => {
                let live = self.nodes[to].up && self.nodes[to].inc == to_inc && self.nodes[from].inc == from_inc;
                if live && !self.cut(from, to) {
                    self.receive(to, from, msg);
                }
            }
            Event::Ping(n, inc) => self.tick(n, inc, PING_INTERVAL, Event::Ping, Sim::ping),
            Event::Supervise(n, inc) => self.tick(n, inc, SUPERVISE_EVERY, Event::Supervise, Sim::supervise),
            Event::Replicate(n, inc) => self.tick(n, inc, REPLICATE_EVERY, Event::Replicate, Sim::replicate_all),
            Event::Checkpoint(n, inc) => self.tick(n, inc, CHECKPOINT_EVERY, Event::Checkpoint, |sim, n| {
                let node = &mut sim.nodes[n];
                node.checkpoint = (node.applied.1, node.applied.0, node.state.clone());
            }),
            Event::Route(n, inc, op) => {
                if self.nodes[n].up && self.nodes[n].inc == inc {
                    self.route(n, op);
                }
            }
            Event::Invoke(worker) => {
                // Clients stop when the calm after the faults ends; then the final read.
                if self.now < self.schedule.faults_for + CALM {
                    self.invoke(worker, None);
                }
            }
            Event::Timeout(op) => self.complete(op, Outcome::Unknown("timeout".into())),
            Event::Fault(fault) => self.fault(fault),
            Event::FinalRead => {
                // After every client's last operation; then every half second until one succeeds.
                let busy = self.ops.iter().any(|o| !o.done && o.worker != usize::MAX);
                if self.final_read.is_none() {
                    if !busy {
                        self.invoke(usize::MAX, Some(Kind::Read));
                    }
                    self.at(Duration::from_millis(if busy { 50 } else { 500 }), Event::FinalRead);
                }
            }
        }
    }

    fn tick(&mut self, n: usize, inc: u64, every: Duration, again: fn(usize, u64) -> Event, work: fn(&mut Sim, usize)) {
        if !self.nodes[n].up || self.nodes[n].inc != inc {
            return;
        }
        work(self, n);
        self.at(every, again(n, inc));
    }

    fn start_node(&mut self, n: usize) {
        let inc = self.nodes[n].inc;
        for (k, every) in [(0, PING_INTERVAL), (1, SUPERVISE_EVERY), (2, REPLICATE_EVERY), (3, CHECKPOINT_EVERY)] {
            let phase = Duration::from_millis(self.rng.random_range(0..every.as_millis() as u64));
            let event = match k {
                0 => Event::Ping(n, inc),
                1 => Event::Supervise(n, inc),
                2 => Event::Replicate(n, inc),
                _ => Event::Checkpoint(n, inc),
            };
            self.at(phase, event);
        }
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        self.cuts.get(&pair(a, b)).is_some_and(|c| *c > 0)
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if self.cut(from, to) || (self.loss > 0.0 && self.rng.random_bool(self.loss)) {
            return;
        }
        let delay = if self.rng.random_bool(0.05) { self.ms(20..80) } else { self.ms(1..8) };
        let (to_inc, from_inc) = (self.nodes[to].inc, self.nodes[from].inc);
        self.at(delay, Event::Deliver { to, to_inc, from, from_inc, msg });
    }

    fn alive(&self, n: usize, peer: usize) -> bool {
        peer == n || self.nodes[n].heard[peer].is_some_and(|t| self.now.saturating_sub(t) < DEAD_AFTER)
    }

    fn alive_id(&self, n: usize, id: NodeId) -> bool {
        self.alive(n, self.index_of(id))
    }

    /// The flock map's herders, as node indexes.
    fn map_herders(&self) -> Vec<usize> {
        self.herders.iter().map(|id| self.index_of(*id)).collect()
    }

    /// Node `n`'s failure detector holds a majority of the voters alive (grex's `has_quorum`: its
    /// view of the group's voters if it votes, else the map's herders).
    fn sees_majority(&self, n: usize) -> bool {
        let node = &self.nodes[n];
        let voters = if node.votes() { node.config().voter_ids() } else { self.map_herders() };
        voters.iter().filter(|v| self.alive(n, **v)).count() * 2 > voters.len()
    }

    /// The flock's leader as node `n` knows it: from the group if it herds it, else from claims.
    fn leader_of(&self, n: usize) -> Option<usize> {
        let node = &self.nodes[n];
        if node.votes()
            && let Some(leader) = node.leader.filter(|l| node.config().votes(*l))
        {
            return Some(leader);
        }
        let claim =
            (0..self.nodes.len()).filter(|p| node.claims[*p] > 0 && self.alive(n, *p)).max_by_key(|p| node.claims[*p]);
        claim.or(node.hint)
    }

    fn ping(&mut self, n: usize) {
        let lead = self.nodes[n].ready_term;
        for p in 0..self.nodes.len() {
            if p != n {
                self.send(n, p, Msg::Ping { lead });
            }
        }
    }

    // ---- The supervisor: grex's decisions on the node's view.

    fn supervise(&mut self, n: usize) {
        // A job forwarded to a node that went down may have committed.
        let lost: Vec<usize> = (self.nodes[n].routing.iter())
            .filter(|(_, r)| r.forwarded_to.is_some_and(|t| !self.alive(n, t)))
            .map(|(op, _)| *op)
            .collect();
        for op in lost {
            self.nodes[n].routing.remove(&op);
            self.complete(op, Outcome::Unknown("outcome_unknown: the node running the job went down".into()));
        }
        let lost: Vec<(usize, usize)> = (self.nodes[n].relaying.iter())
            .filter(|(_, (_, leader))| !self.alive(n, *leader))
            .map(|(op, (origin, _))| (*op, *origin))
            .collect();
        for (op, origin) in lost {
            self.nodes[n].relaying.remove(&op);
            let outcome = Outcome::Unknown("outcome_unknown: the node running the job went down".into());
            self.send(n, origin, Msg::JobReply { op, outcome });
        }
        if !self.nodes[n].votes() {
            return;
        }
        let node = &self.nodes[n];
        let voters: Vec<NodeId> = node.config().voter_ids().iter().map(|v| self.nodes[*v].id).collect();
        let outranked_by = node
            .outranked
            .filter(|(_, at)| self.now.saturating_sub(*at) < OUTRANKED_FOR)
            .map(|(v, _)| self.nodes[v].id);
        // A leader claims the flock in its pings once it is ready.
        let unclaimed_by = node
            .leader
            .filter(|l| *l != n && node.claims[*l] == 0 && self.schedule.mutation != Mutation::FollowUnclaimed)
            .map(|l| self.nodes[l].id);
        let now = self.now;
        let leader_unclaimed = self.nodes[n].timer.unclaimed(now, unclaimed_by);
        let node = &self.nodes[n];
        let sight = GroupSight {
            me: node.id,
            group: GROUP,
            leader: node.leader.map(|l| self.nodes[l].id),
            leader_votes: node.leader.is_some_and(|l| node.config().votes(l)),
            leader_unclaimed,
            voters: &voters,
            preferred: &self.herders,
            outranked_by,
            outranks: node.outranks.is_some_and(|at| self.now.saturating_sub(at) < OUTRANKED_FOR),
        };
        let alive = |id: NodeId| self.alive_id(n, id);
        let verdict = decide::verdict(&sight, &alive);
        let leading = node.role == Role::Leader;
        let now = self.now;
        let reconcile = now.saturating_sub(node.last_reconcile) >= RECONCILE_EVERY;
        let rank_first = decide::election_rank(node.id, GROUP, &voters, &self.herders, &alive) == Some(0);
        let idle_for = now.saturating_sub(node.active_at);
        let jitter = self.rng.random_range(1.0..2.0);
        let node = &mut self.nodes[n];
        if reconcile {
            node.last_reconcile = now;
            if leading {
                self.reconcile(n);
            }
        }
        let node = &mut self.nodes[n];
        let elect = match verdict {
            Verdict::Led => {
                node.outranked = None;
                node.outranks = None;
                reconcile && node.timer.take_back_now(now, idle_for, node.leader == Some(n), rank_first)
            }
            verdict => node.timer.elect_now(verdict, now, leading, jitter),
        };
        if elect {
            self.elect(n);
        }
    }

    // ---- Raft, as openraft runs it in grex.

    fn elect(&mut self, n: usize) {
        self.elections += 1;
        self.trace(|| format!("node {n} calls an election for term {}", self.nodes[n].term + 1));
        let node = &mut self.nodes[n];
        node.term += 1;
        node.voted_for = Some(n);
        node.led_term = false;
        node.leader = None;
        node.votes = BTreeSet::from([n]);
        self.step_down(n);
        self.nodes[n].role = Role::Candidate;
        let (term, last) = (self.nodes[n].term, self.nodes[n].last());
        for v in self.nodes[n].config().voter_ids() {
            if v != n {
                self.send(n, v, Msg::Vote { term, last });
            }
        }
    }

    /// On a leader that votes: takes the group one step towards the map's herders, as
    /// `Cluster::change_herders` does (add the new herders as learners, let them catch up, change
    /// the voters through a joint membership). One change at a time, each once the last committed.
    fn reconcile(&mut self, n: usize) {
        let map = self.map_herders();
        let node = &self.nodes[n];
        let (at, config) = node.configs.last().map(|(at, c)| (*at, c.clone())).expect("a membership");
        if !config.votes(n) || at > node.commit {
            return;
        }
        let mut want = map.clone();
        want.sort_unstable();
        let next = if !config.joint.is_empty() {
            Config { voters: config.joint.clone(), ..Config::default() }
        } else if config.voters == want {
            return;
        } else if let Some(missing) =
            Some(want.iter().filter(|m| !config.members().contains(m)).copied().collect::<Vec<_>>())
            && !missing.is_empty()
        {
            let mut learners = config.learners.clone();
            learners.extend(missing);
            Config { learners, ..(*config).clone() }
        } else if want.iter().all(|m| config.votes(*m) || node.lead.matched.get(m).is_some_and(|i| *i >= at)) {
            Config { voters: config.voters.clone(), joint: want, learners: Vec::new() }
        } else {
            return;
        };
        self.trace(|| format!("node {n} changes the membership to {next:?}"));
        let term = self.nodes[n].term;
        self.nodes[n].push(Entry { term, list: None, config: Some(Rc::new(next)) });
        self.replicate_all(n);
    }

    /// A higher term was seen: this node follows.
    fn observe_term(&mut self, n: usize, term: u64) {
        if term > self.nodes[n].term {
            let node = &mut self.nodes[n];
            node.term = term;
            node.voted_for = None;
            node.led_term = false;
            node.leader = None;
            self.step_down(n);
        }
    }

    /// Leaves the leader's (or candidate's) role; jobs under way get their answers.
    fn step_down(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.role = Role::Follower;
        let lead = std::mem::take(&mut node.lead);
        if let Some((op, to, _, _)) = lead.running {
            self.answer(
                n,
                op,
                to,
                Outcome::Unknown("outcome_unknown: the lead was lost before the change committed".into()),
            );
        }
        for (op, to) in lead.queue {
            self.answer(n, op, to, Outcome::Failed("unavailable: the lead was lost".into()));
        }
        for (op, to, _, _) in lead.reads {
            self.answer(n, op, to, Outcome::Unknown("outcome_unknown: the lead was lost".into()));
        }
        self.refresh_ready(n);
    }

    fn become_leader(&mut self, n: usize, blank: bool) {
        let term = self.nodes[n].term;
        if let Some(other) = self.leaders.insert(term, n)
            && other != n
        {
            self.anomaly("two-leaders", format!("nodes {other} and {n} both led term {term}"));
        }
        self.trace(|| {
            format!("node {n} leads term {term} (log {:?}, applied {:?})", self.nodes[n].last(), self.nodes[n].applied)
        });
        let node = &mut self.nodes[n];
        node.role = Role::Leader;
        node.led_term = true;
        node.leader = Some(n);
        node.outranked = None;
        if blank {
            node.push(Entry::blank(term));
        }
        node.lead = Lead::default();
        self.refresh_ready(n);
        self.replicate_all(n);
    }

    fn refresh_ready(&mut self, n: usize) {
        let mutation = self.schedule.mutation;
        let node = &mut self.nodes[n];
        let view = LeadView {
            leads: node.role == Role::Leader && node.votes(),
            term: node.term,
            log_last: node.log.len() as u64,
            applied: (node.applied.1 > 0).then_some(node.applied),
        };
        let ready = node.lead_start.ready_term(&view);
        node.ready_term = if mutation == Mutation::NoReadiness && view.leads { view.term } else { ready };
        if node.ready_term > 0 {
            self.pump(n);
        }
    }

    fn replicate_all(&mut self, n: usize) {
        if self.nodes[n].role != Role::Leader {
            return;
        }
        // Every member of the latest membership gets the log; the first message to a new one
        // carries the last entry.
        let node = &mut self.nodes[n];
        let followers: Vec<usize> = node.config().members().into_iter().filter(|f| *f != n).collect();
        let last = (node.log.len() as u64).max(1);
        for f in &followers {
            node.lead.next.entry(*f).or_insert(last);
            node.lead.matched.entry(*f).or_insert(0);
        }
        for f in followers {
            let node = &self.nodes[n];
            let lead = &node.lead;
            let due = match lead.in_flight.get(&f) {
                Some(since) => self.now.saturating_sub(*since) >= RESEND_AFTER,
                None => {
                    lead.matched[&f] < node.log.len() as u64
                        || lead.told_commit.get(&f).copied().unwrap_or(0) < node.commit
                }
            };
            if due {
                self.append_to(n, f, 0);
            }
        }
    }

    fn append_to(&mut self, n: usize, f: usize, round: u64) {
        let node = &mut self.nodes[n];
        let next = node.lead.next[&f].max(1);
        let prev = (next - 1, node.term_at(next - 1));
        let entries: Vec<Entry> = node.log.iter().skip(next as usize - 1).take(BATCH_MAX).cloned().collect();
        let (term, commit) = (node.term, node.commit);
        node.lead.in_flight.insert(f, self.now);
        node.lead.told_commit.insert(f, commit);
        self.send(n, f, Msg::Append { term, prev: (prev.0, prev.1), entries, commit, round });
    }

    fn receive(&mut self, n: usize, from: usize, msg: Msg) {
        match msg {
            Msg::Ping { lead } => {
                let node = &mut self.nodes[n];
                node.heard[from] = Some(self.now);
                node.claims[from] = lead;
            }
            Msg::Vote { term, last } => self.on_vote(n, from, term, last),
            Msg::VoteReply { term, granted, last } => {
                self.observe_term(n, term);
                let node = &mut self.nodes[n];
                if node.role != Role::Candidate || node.term != term {
                    return;
                }
                if granted {
                    node.votes.insert(from);
                    let node = &self.nodes[n];
                    if node.config().quorum(|v| node.votes.contains(&v)) {
                        self.become_leader(n, true);
                    }
                } else if last > node.last() {
                    node.outranked = Some((from, self.now));
                }
            }
            Msg::Append { term, prev, entries, commit, round } => {
                self.on_append(n, from, term, prev, entries, commit, round)
            }
            Msg::AppendReply { term, ok, matched, round } => self.on_append_reply(n, from, term, ok, matched, round),
            Msg::Job { op, relay } => {
                if self.nodes[n].ready_term > 0 {
                    self.run_here(n, op, ReplyTo::Node(from));
                    return;
                }
                let leader = self.leader_of(n).filter(|l| *l != n);
                match leader {
                    Some(l) if relay && self.alive(n, l) => {
                        self.nodes[n].relaying.insert(op, (from, l));
                        self.send(n, l, Msg::Job { op, relay: false });
                    }
                    leader => self.send(n, from, Msg::NotLeader { op, leader }),
                }
            }
            Msg::NotLeader { op, leader } => {
                if let Some((origin, target)) = self.nodes[n].relaying.remove(&op) {
                    let leader = leader.filter(|l| *l != n && *l != target);
                    self.send(n, origin, Msg::NotLeader { op, leader });
                    return;
                }
                let Some(r) = self.nodes[n].routing.get_mut(&op) else { return };
                let target = r.forwarded_to.take();
                r.redirect = leader.filter(|l| *l != n && Some(*l) != target);
                r.redirects += 1;
                let (redirect, first) = (r.redirect, r.redirects == 1);
                self.nodes[n].hint = redirect;
                if first && redirect.is_some() {
                    self.route(n, op);
                } else {
                    let inc = self.nodes[n].inc;
                    self.at(ROUTE_RETRY, Event::Route(n, inc, op));
                }
            }
            Msg::JobReply { op, outcome } => {
                if let Some((origin, _)) = self.nodes[n].relaying.remove(&op) {
                    self.send(n, origin, Msg::JobReply { op, outcome });
                } else if let Some(r) = self.nodes[n].routing.remove(&op) {
                    if !r.relayed {
                        self.nodes[n].hint = Some(from);
                    }
                    self.complete(op, outcome);
                }
            }
        }
    }

    fn on_vote(&mut self, n: usize, candidate: usize, term: u64, last: (u64, u64)) {
        let node = &self.nodes[n];
        // The leader's lease: a voter that heard from a live leader lately does not vote.
        let leased = node.leader.is_some_and(|l| l != candidate) && self.now < node.lease_until;
        let granted = if term < node.term || leased {
            false
        } else {
            self.observe_term(n, term);
            let node = &mut self.nodes[n];
            let granted = last >= node.last() && node.voted_for.is_none_or(|v| v == candidate);
            if granted {
                node.voted_for = Some(candidate);
            }
            granted
        };
        let node = &mut self.nodes[n];
        if !granted && node.last() > last && self.schedule.mutation != Mutation::NoRightToRun {
            node.outranks = Some(self.now);
        }
        let reply = Msg::VoteReply { term: node.term, granted, last: node.last() };
        self.send(n, candidate, reply);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append(
        &mut self,
        n: usize,
        leader: usize,
        term: u64,
        prev: (u64, u64),
        entries: Vec<Entry>,
        commit: u64,
        round: u64,
    ) {
        if term < self.nodes[n].term {
            let reply = Msg::AppendReply { term: self.nodes[n].term, ok: false, matched: 0, round };
            self.send(n, leader, reply);
            return;
        }
        self.observe_term(n, term);
        if self.nodes[n].role != Role::Follower {
            self.step_down(n);
        }
        let now = self.now;
        let node = &mut self.nodes[n];
        node.leader = Some(leader);
        node.voted_for = Some(leader);
        node.lease_until = now + VOTE_LEASE;
        let (prev_index, prev_term) = prev;
        if prev_index > node.log.len() as u64 || node.term_at(prev_index) != prev_term {
            let matched = (node.log.len() as u64).min(prev_index.saturating_sub(1));
            self.send(n, leader, Msg::AppendReply { term, ok: false, matched, round });
            return;
        }
        let count = entries.len() as u64;
        for (i, entry) in entries.into_iter().enumerate() {
            let index = prev_index + 1 + i as u64;
            let node = &mut self.nodes[n];
            if index <= node.log.len() as u64 {
                if node.term_at(index) == entry.term {
                    continue;
                }
                if index <= node.commit {
                    let what = format!("node {n} truncated its log at {index}, below its commit index {}", node.commit);
                    self.anomaly("committed-truncated", what);
                }
                self.nodes[n].truncate(index);
            }
            self.nodes[n].push(entry);
        }
        let node = &mut self.nodes[n];
        let matched = prev_index + count;
        node.commit = node.commit.max(commit.min(matched));
        self.apply(n);
        self.send(n, leader, Msg::AppendReply { term, ok: true, matched, round });
    }

    fn on_append_reply(&mut self, n: usize, f: usize, term: u64, ok: bool, matched: u64, round: u64) {
        self.observe_term(n, term);
        let node = &mut self.nodes[n];
        if node.role != Role::Leader || node.term != term {
            return;
        }
        let lead = &mut node.lead;
        lead.in_flight.remove(&f);
        if ok {
            let m = lead.matched.entry(f).or_default();
            *m = (*m).max(matched);
            lead.next.insert(f, matched + 1);
        } else {
            lead.next.insert(f, matched + 1);
        }
        if round > 0 && round == lead.rounds_started {
            lead.round_acks.insert(f);
        }
        // Commit: the highest index of this term that a quorum of the membership holds.
        let node = &self.nodes[n];
        let holds =
            |index: u64| node.config().quorum(|v| v == n || node.lead.matched.get(&v).is_some_and(|m| *m >= index));
        let commit =
            (node.commit + 1..=node.log.len() as u64).rev().find(|i| node.term_at(*i) == node.term && holds(*i));
        if let Some(index) = commit {
            self.nodes[n].commit = index;
            self.apply(n);
        }
        self.confirm_reads(n);
        self.replicate_all(n);
    }

    fn apply(&mut self, n: usize) {
        let now = self.now;
        loop {
            let node = &mut self.nodes[n];
            let index = node.applied.1 + 1;
            if index > node.commit || index > node.log.len() as u64 {
                break;
            }
            let entry = node.log[index as usize - 1].clone();
            if let Some(list) = &entry.list {
                node.state = list.clone();
            }
            node.applied = (entry.term, index);
            node.active_at = now;
            match self.applied_terms.get(index as usize - 1) {
                Some(t) if *t != entry.term => {
                    let what = format!("node {n} applied term {} at {index}, another node term {t}", entry.term);
                    self.anomaly("applied-diverged", what);
                }
                Some(_) => {}
                None => self.applied_terms.push(entry.term),
            }
            let node = &mut self.nodes[n];
            if let Some((op, to, at, list)) = node.lead.running.take() {
                if at == index {
                    let outcome = if entry.term == node.term && node.role == Role::Leader {
                        Outcome::Ok(list.to_vec())
                    } else {
                        Outcome::Unknown("outcome_unknown".into())
                    };
                    self.answer(n, op, to, outcome);
                } else {
                    self.nodes[n].lead.running = Some((op, to, at, list));
                }
            }
        }
        self.refresh_ready(n);
    }

    // ---- Jobs.

    fn invoke(&mut self, worker: usize, kind: Option<Kind>) {
        let n = self.rng.random_range(0..self.nodes.len());
        let kind = kind.unwrap_or_else(|| match self.rng.random_range(0..10) {
            0..7 => {
                self.next_value += 1;
                Kind::Append(self.next_value)
            }
            7 | 8 => Kind::Read,
            _ => Kind::FollowerRead,
        });
        let op = self.ops.len();
        self.ops.push(ClientOp { worker, node: n, kind, invoked: self.now, done: false });
        self.at(CLIENT_TIMEOUT, Event::Timeout(op));
        let node = &self.nodes[n];
        if !node.up {
            self.complete(op, Outcome::Failed("connection refused".into()));
            return;
        }
        if node.paused_until > self.now {
            // The request waits in the node's socket; it is routed when the node resumes.
            let (inc, deadline) = (node.inc, node.paused_until + ROUTE_PATIENCE);
            self.nodes[n]
                .routing
                .insert(op, Routing { deadline, redirect: None, redirects: 0, forwarded_to: None, relayed: false });
            self.at(Duration::ZERO, Event::Route(n, inc, op));
            return;
        }
        if matches!(kind, Kind::Append(_)) && !self.sees_majority(n) {
            self.complete(op, Outcome::Failed("no_quorum".into()));
            return;
        }
        if kind == Kind::FollowerRead && self.herders.contains(&node.id) {
            // A read-only job on a herder runs there, against what it applied.
            let list = match self.schedule.mutation {
                Mutation::FollowerReadsUnapplied => {
                    node.log.iter().rev().find_map(|e| e.list.clone()).unwrap_or_else(|| node.state.clone())
                }
                _ => node.state.clone(),
            };
            self.complete(op, Outcome::Ok(list.to_vec()));
            return;
        }
        let deadline = self.now + ROUTE_PATIENCE;
        self.nodes[n]
            .routing
            .insert(op, Routing { deadline, redirect: None, redirects: 0, forwarded_to: None, relayed: false });
        self.route(n, op);
    }

    /// One routing step for a job waiting at its entry node `n`.
    fn route(&mut self, n: usize, op: usize) {
        if !self.nodes[n].routing.contains_key(&op) || self.ops[op].done {
            self.nodes[n].routing.remove(&op);
            return;
        }
        if self.nodes[n].ready_term > 0 {
            self.nodes[n].routing.remove(&op);
            self.run_here(n, op, ReplyTo::Client);
            return;
        }
        let me = self.nodes[n].id;
        let leader = self.leader_of(n).map(|l| self.nodes[l].id);
        let redirect = self.nodes[n].routing.get_mut(&op).and_then(|r| r.redirect.take());
        let target = redirect.or_else(|| {
            let route = decide::route(me, leader, &self.herders, &|id| self.alive_id(n, id));
            route.map(|id| self.index_of(id))
        });
        if let Some(t) = target {
            let via = decide::relay(me, self.nodes[t].id, &self.herders, &|id| self.alive_id(n, id));
            let (to, relay) = match via {
                Some(via) => (self.index_of(via), true),
                None => (t, false),
            };
            if self.alive(n, to) {
                let r = self.nodes[n].routing.get_mut(&op).expect("routing");
                (r.forwarded_to, r.relayed) = (Some(to), relay);
                self.send(n, to, Msg::Job { op, relay });
                return;
            }
        }
        if self.now >= self.nodes[n].routing[&op].deadline {
            self.nodes[n].routing.remove(&op);
            self.complete(op, Outcome::Failed("unavailable: no reachable leader".into()));
            return;
        }
        let inc = self.nodes[n].inc;
        self.at(ROUTE_RETRY, Event::Route(n, inc, op));
    }

    fn run_here(&mut self, n: usize, op: usize, to: ReplyTo) {
        if matches!(self.ops[op].kind, Kind::Append(_)) && !self.sees_majority(n) {
            self.answer(n, op, to, Outcome::Failed("no_quorum".into()));
            return;
        }
        let lead = &mut self.nodes[n].lead;
        if lead.queue.len() >= QUEUE_MAX {
            self.answer(n, op, to, Outcome::Failed("overloaded".into()));
            return;
        }
        lead.queue.push((op, to));
        self.pump(n);
    }

    /// Runs waiting jobs, one change at a time.
    fn pump(&mut self, n: usize) {
        loop {
            let node = &mut self.nodes[n];
            if node.ready_term == 0 || node.lead.running.is_some() || node.lead.queue.is_empty() {
                return;
            }
            let (op, to) = node.lead.queue.remove(0);
            match self.ops[op].kind {
                Kind::Append(v) => {
                    let list: Rc<[u64]> = node.state.iter().copied().chain([v]).collect();
                    node.push(Entry { term: node.term, list: Some(list.clone()), config: None });
                    let index = node.log.len() as u64;
                    node.lead.running = Some((op, to, index, list));
                    self.replicate_all(n);
                }
                Kind::Read | Kind::FollowerRead => {
                    let list = node.state.clone();
                    if self.schedule.mutation == Mutation::NoReadConfirm {
                        self.answer(n, op, to, Outcome::Ok(list.to_vec()));
                    } else {
                        let want = node.lead.rounds_started + 1;
                        node.lead.reads.push((op, to, list, want));
                        self.confirm_reads(n);
                    }
                }
            }
        }
    }

    /// Answers reads whose confirmation round a majority acknowledged; starts the next round.
    fn confirm_reads(&mut self, n: usize) {
        let now = self.now;
        let node = &mut self.nodes[n];
        if node.role != Role::Leader {
            return;
        }
        let acked = node.config().quorum(|v| v == n || node.lead.round_acks.contains(&v));
        let lead = &mut node.lead;
        let confirmed = if lead.round_since.is_some() && acked {
            lead.round_since = None;
            lead.rounds_started
        } else {
            lead.rounds_started.saturating_sub(1)
        };
        let (done, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut lead.reads).into_iter().partition(|r| r.3 <= confirmed);
        lead.reads = waiting;
        let stale_round = lead.round_since.is_some_and(|s| now.saturating_sub(s) >= RESEND_AFTER);
        let start = !lead.reads.is_empty() && (lead.round_since.is_none() || stale_round);
        if start {
            lead.rounds_started += 1;
            lead.round_acks.clear();
            lead.round_since = Some(now);
            let round = lead.rounds_started;
            // A read waiting for an earlier round is answered by this one.
            for r in &mut lead.reads {
                r.3 = round;
            }
            let followers: Vec<usize> = lead.next.keys().copied().collect();
            for f in followers {
                self.append_to(n, f, round);
            }
        }
        for (op, to, list, _) in done {
            self.answer(n, op, to, Outcome::Ok(list.to_vec()));
        }
    }

    fn answer(&mut self, n: usize, op: usize, to: ReplyTo, outcome: Outcome) {
        match to {
            ReplyTo::Client => self.complete(op, outcome),
            ReplyTo::Node(entry) => self.send(n, entry, Msg::JobReply { op, outcome }),
        }
    }

    fn complete(&mut self, op: usize, outcome: Outcome) {
        let client = &mut self.ops[op];
        if client.done {
            return;
        }
        client.done = true;
        let (worker, node, kind, invoked) = (client.worker, client.node, client.kind, client.invoked);
        if worker == usize::MAX {
            // The final read: retried until it succeeds.
            if let Outcome::Ok(list) = &outcome {
                self.final_read = Some(list.as_slice().into());
            }
        } else if self.now < self.schedule.faults_for + CALM {
            let think = self.ms(0..20);
            self.at(think, Event::Invoke(worker));
        }
        self.trace(|| format!("op {op} worker {worker} at node {node}: {kind:?} -> {outcome:?}"));
        self.history.push(Op {
            worker: worker.min(1_000),
            bucket: 0,
            node,
            via: Via::Simulated,
            kind,
            invoked,
            completed: self.now,
            outcome,
        });
    }

    // ---- Faults.

    fn fault(&mut self, fault: Fault) {
        self.trace(|| format!("fault {fault:?}"));
        self.fault_log.push((self.now, format!("{fault:?}")));
        match fault {
            Fault::Crash(n) => {
                let node = &mut self.nodes[n];
                node.up = false;
                node.routing.clear();
                node.relaying.clear();
            }
            Fault::Restart(n) => self.restart(n),
            Fault::Pause(n, lasting) => self.nodes[n].paused_until = self.now + lasting,
            Fault::Cut(pairs) => {
                for p in pairs {
                    *self.cuts.entry(p).or_default() += 1;
                }
            }
            Fault::Heal(pairs) => {
                for p in pairs {
                    if let Some(c) = self.cuts.get_mut(&p) {
                        *c = c.saturating_sub(1);
                    }
                }
            }
            Fault::Loss(p) => self.loss = p.max(0.0),
            Fault::Move { add, drop } => {
                let (add, drop) = (self.nodes[add].id, self.nodes[drop].id);
                for h in &mut self.herders {
                    if *h == drop {
                        *h = add;
                    }
                }
            }
        }
    }

    fn restart(&mut self, n: usize) {
        if self.nodes[n].up {
            return;
        }
        let count = self.nodes.len();
        let node = &mut self.nodes[n];
        node.up = true;
        node.inc += 1;
        node.paused_until = Duration::ZERO;
        let (applied_index, applied_term, state) = node.checkpoint.clone();
        node.applied = (applied_term, applied_index);
        node.commit = applied_index;
        node.state = state;
        node.role = Role::Follower;
        node.leader = None;
        node.lease_until = Duration::ZERO;
        node.votes.clear();
        node.heard = vec![None; count];
        node.claims = vec![0; count];
        node.hint = None;
        node.timer = ElectionTimer::default();
        node.lead_start = LeadStart::default();
        node.ready_term = 0;
        node.outranked = None;
        node.outranks = None;
        node.lead = Lead::default();
        node.routing.clear();
        node.relaying.clear();
        // openraft restores a node whose persisted vote was its own and committed as leader.
        if node.led_term && node.voted_for == Some(n) {
            self.become_leader(n, false);
        }
        self.start_node(n);
    }
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// Runs `count` schedules from seeds derived from `base`, on `threads` threads; the reports of
/// the failing ones, the operations and acknowledged operations run, and the schedules.
pub fn sweep(base: u64, count: u64, mutation: Mutation, threads: usize) -> Sweep {
    let next = std::sync::atomic::AtomicU64::new(0);
    let results = std::sync::Mutex::new(Sweep::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let report = run(seed_of(base, i), mutation);
                    let mut results = results.lock().unwrap_or_else(|p| p.into_inner());
                    results.add(report);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// The seed of the `i`th schedule of a sweep from `base` (schedule 0 has seed `base`).
pub fn seed_of(base: u64, i: u64) -> u64 {
    base.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Totals of a sweep.
#[derive(Default)]
pub struct Sweep {
    /// Schedules run.
    pub schedules: u64,
    /// Operations, and those acknowledged.
    pub ops: u64,
    /// Acknowledged operations.
    pub ok: u64,
    /// Elections called.
    pub elections: u64,
    /// The longest unavailability during faults in any schedule.
    pub longest_unavailable: Duration,
    /// Reports of schedules with anomalies (the first few).
    pub failed: Vec<Report>,
    /// Schedules with anomalies.
    pub failures: u64,
}

impl Sweep {
    fn add(&mut self, report: Report) {
        self.schedules += 1;
        self.ops += report.history.len() as u64;
        self.ok += report.history.iter().filter(|o| matches!(o.outcome, Outcome::Ok(_))).count() as u64;
        self.elections += report.elections;
        self.longest_unavailable = self.longest_unavailable.max(report.longest_unavailable);
        if !report.anomalies.is_empty() {
            self.failures += 1;
            if self.failed.len() < 3 {
                self.failed.push(report);
            }
        }
    }

    /// One line of totals.
    pub fn summary(&self) -> String {
        format!(
            "{} schedules, {} operations ({:.1}% ok), {} elections, longest unavailability during faults {:.2} s, {} with anomalies",
            self.schedules,
            self.ops,
            100.0 * self.ok as f64 / self.ops.max(1) as f64,
            self.elections,
            self.longest_unavailable.as_secs_f64(),
            self.failures
        )
    }
}
