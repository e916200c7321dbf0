//! A deterministic simulation of one flock herded by three of four nodes, driving grex's real consensus engine
//! (`grex::cluster::engine`: raft-rs behind the engine's seam) on a simulated clock, network and
//! disk, in one thread, checked with the list-append checker ([`crate::list_append::check`]).
//!
//! Around the engines runs a model of the rest of a node, as the driver (`cluster::consensus`)
//! and the executors run it:
//! - a durable log and hard state written with a delay, in order, and lost if the node crashes
//!   before the write completes; a state machine (the store) written without a sync and
//!   checkpointed every second, so a restarted node starts from its checkpoint and re-applies its
//!   log; logs purged behind the checkpoint, so lagging nodes catch up from snapshots;
//! - the failure detector: pings every 150 ms, a peer not heard from for 600 ms is down (the
//!   engine is told, and elects at once);
//! - jobs on the ready leader against its cache (the proposed, uncommitted lists of its term),
//!   answered once the entry is applied in the term it was proposed in; reads through the leader
//!   confirmed by a read-index round and answered once what they saw is committed; read-only
//!   reads answered by any node from its applied state; a node that does not lead forwards once
//!   to the leader it knows, and retries within a 4 s patience.
//!
//! Faults: crashes (losing unfinished writes and the state since the checkpoint) and restarts,
//! pauses longer than the failure detector's timeout, one node cut off, two nodes cut from each
//! other, message loss, and moves of the group from one voter to the fourth node, as the cluster
//! moves a flock to a new herder (`cluster/membership.rs`): the leader adds the new node as a
//! learner, which starts the group empty when the leader's first message reaches it and catches
//! up from a snapshot, and once it holds the entry that added it, promotes it and removes the old
//! voter in one joint change. Whichever node leads carries a move on; faults go on throughout. Each schedule is random from its seed; the same seed replays the same
//! run exactly. [`Mutation`] switches a safeguard off, to show the checker catches what it
//! guards against.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grex::cluster::engine::{
    Engine, EngineConfig, EntrySource, Envelope, GroupLog, NodeId, Output, Proposal, StateRole, Write,
};
use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState,
    MessageType, SnapshotMetadata,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::list_append::{self, Anomaly, Final, Kind, Op, Outcome, Via};

/// The simulated flock's group.
const GROUP: u32 = 7;
/// Nodes (ids 1..=NODES); the first `VOTERS` start as the group's voters, the rest outside it.
const NODES: u64 = 4;
const VOTERS: u64 = 3;
/// How often the leader carries a membership change a step further.
const RECONFIGURE_EVERY: u64 = 300_000;
/// Buckets the workload spreads over.
const BUCKETS: usize = 3;
/// Client workers.
const WORKERS: usize = 4;
/// The engine's tick.
const TICK: u64 = 100_000;
/// Failure detector: ping interval and timeout (grex's `PING_INTERVAL`, `DEAD_AFTER`).
const PING_EVERY: u64 = 150_000;
const DEAD_AFTER: u64 = 600_000;
/// How often a node checkpoints its state machine.
const CHECKPOINT_EVERY: u64 = 1_000_000;
/// Log entries kept behind the checkpoint before purging.
const KEEP_LOG: u64 = 30;
/// How long a routed job looks for a leader, and how long a client waits for any answer.
const ROUTE_PATIENCE: u64 = 4_000_000;
const CLIENT_TIMEOUT: u64 = 12_000_000;
/// Faults go on this long; then everything heals and the cluster settles.
const FAULT_TIME: u64 = 10_000_000;
const SETTLE_TIME: u64 = 8_000_000;

/// A safeguard switched off, to show that the checker notices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Appends are acknowledged when proposed, not when committed.
    AckOnPropose,
    /// Reads through the leader are answered without confirming the lead (no read index).
    ReadWithoutConfirm,
}

/// What one schedule did.
#[derive(Debug)]
pub struct Report {
    /// Its seed.
    pub seed: u64,
    /// Operations run.
    pub ops: usize,
    /// Of them acknowledged.
    pub acknowledged: usize,
    /// Faults injected.
    pub faults: Vec<String>,
    /// What the checker found.
    pub anomalies: Vec<Anomaly>,
    /// The group's voters at the end (as its last leader saw them; empty if none led).
    pub voters: BTreeSet<NodeId>,
    /// The voters the last move aimed at.
    pub wanted: BTreeSet<NodeId>,
    /// Appends the nodes dropped because their log memory was full.
    pub appends_dropped: u64,
}

impl Report {
    /// The group ended on other voters than it began with.
    pub fn moved(&self) -> bool {
        !self.voters.is_empty() && self.voters != (1..=VOTERS).collect()
    }
}

/// Microseconds of simulated time.
type Time = u64;

#[derive(Default)]
struct Disk {
    log: BTreeMap<u64, Entry>,
    hard: HardState,
    base: (u64, u64),
    /// The node runs the group (a founder, or added since).
    member: bool,
}

/// A node's disk, shared with its engine's log (which reads evicted entries back).
#[derive(Clone, Default)]
struct SharedDisk(Arc<Mutex<Disk>>);

impl EntrySource for SharedDisk {
    fn entries(&self, _group: u32, low: u64, high: u64, max_bytes: u64) -> anyhow::Result<Vec<Entry>> {
        let disk = self.0.lock().unwrap();
        let mut out = Vec::new();
        let mut bytes = 0;
        for index in low..high {
            let entry = disk.log.get(&index).ok_or_else(|| anyhow::anyhow!("entry {index} missing"))?;
            bytes += grex::cluster::engine::entry_bytes(entry);
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }
}

/// The state machine: each bucket's list, and the point it was applied to.
#[derive(Clone, Debug, Default)]
struct Machine {
    lists: Vec<Vec<u64>>,
    applied: u64,
    term: u64,
    conf: ConfState,
}

fn encode_change(bucket: usize, list: &[u64]) -> Vec<u8> {
    let mut out = vec![bucket as u8];
    for v in list {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode_change(data: &[u8]) -> (usize, Vec<u64>) {
    let list = data[1..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    (data[0] as usize, list)
}

fn encode_lists(lists: &[Vec<u64>]) -> Vec<u8> {
    let mut out = Vec::new();
    for list in lists {
        out.extend_from_slice(&(list.len() as u64).to_le_bytes());
        for v in list {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

fn decode_lists(data: &[u8]) -> Vec<Vec<u64>> {
    let mut words = data.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()));
    (0..BUCKETS)
        .map(|_| {
            let n = words.next().unwrap_or(0);
            (0..n).map(|_| words.next().unwrap()).collect()
        })
        .collect()
}

/// A job under way on the node that runs it.
#[derive(Clone, Debug)]
struct Job {
    op: usize,
    bucket: usize,
    kind: Kind,
    /// Forwarded once already.
    forwarded: bool,
}

/// A read waiting for its read-index round: (op, term, list it saw, index of what it saw).
type WaitingRead = (usize, u64, Vec<u64>, u64);

struct Node {
    id: NodeId,
    engine: Option<Engine>,
    disk: SharedDisk,
    /// Writes handed out and not yet on disk, with when they complete.
    unwritten: VecDeque<(Time, Write)>,
    machine: Machine,
    checkpoint: Machine,
    last_checkpoint: Time,
    paused_until: Option<Time>,
    incarnation: u64,
    /// The leader's proposed lists, per bucket, in the term they were proposed in.
    cache: BTreeMap<usize, (u64, Vec<u64>, u64)>,
    lead_term: Option<u64>,
    /// Appends waiting to be applied: index → (op, term, list).
    proposals: BTreeMap<u64, (usize, u64, Vec<u64>)>,
    /// Reads waiting for a read-index round: context → (op, term, list, index they saw).
    reads: BTreeMap<u64, Vec<WaitingRead>>,
    /// Reads confirmed, waiting for the index: (op, term, list, read index, index they saw).
    confirmed: Vec<(usize, u64, Vec<u64>, u64, u64)>,
    next_read: u64,
    /// Jobs waiting for a leader, retried on each tick.
    waiting: Vec<(Job, Time)>,
    last_heard: BTreeMap<NodeId, Time>,
    /// Each peer's incarnation as its last ping said.
    incarnations: BTreeMap<NodeId, u64>,
    alive: BTreeSet<NodeId>,
}

#[derive(Debug)]
enum Event {
    Deliver {
        from: NodeId,
        to: NodeId,
        incarnation: u64,
        envelope: Box<Envelope>,
    },
    /// A failure detector's ping, with the sender's incarnation (a restarted process has a new one).
    Ping {
        from: NodeId,
        to: NodeId,
        incarnation: u64,
    },
    WriteDone {
        node: NodeId,
        incarnation: u64,
    },
    Tick(NodeId),
    PingRound,
    Invoke {
        worker: usize,
    },
    Job {
        node: NodeId,
        job: Job,
    },
    Restart(NodeId),
    Resume(NodeId),
    Heal,
    Fault,
}

struct Sim {
    rng: StdRng,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<(Time, u64, usize)>>,
    events: Vec<Option<Event>>,
    nodes: BTreeMap<NodeId, Node>,
    cut: BTreeSet<(NodeId, NodeId)>,
    lossy_until: Time,
    history: Vec<Op>,
    next_value: u64,
    faults: Vec<String>,
    mutation: Option<Mutation>,
    faulting: bool,
    /// The voters the group should have (the last move's target).
    want: BTreeSet<NodeId>,
    /// Each learner's entry that added it: once its log holds it, it may be promoted.
    added: BTreeMap<NodeId, u64>,
    next_reconfigure: Time,
    /// Every engine's bound on log entries in memory: tight in one schedule of four (chosen from
    /// the seed, so the random stream stays the same), so followers drop appends and move durable
    /// entries out of memory under the faults.
    log_memory: u64,
    /// Appends dropped for memory by engines since crashed.
    appends_dropped: u64,
}

/// The log memory of a schedule with a tight bound: a few entries' worth.
const TIGHT_LOG_MEMORY: u64 = 2 << 10;

fn conf() -> ConfState {
    ConfState { voters: (1..=VOTERS).collect(), ..Default::default() }
}

fn change(kind: ConfChangeType, node: NodeId) -> ConfChangeSingle {
    ConfChangeSingle { change_type: kind, node_id: node, ..Default::default() }
}

fn conf_change(changes: Vec<ConfChangeSingle>) -> ConfChangeV2 {
    ConfChangeV2 { changes: changes.into(), transition: ConfChangeTransition::Auto, ..Default::default() }
}

impl Sim {
    fn new(seed: u64, mutation: Option<Mutation>) -> Sim {
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            nodes: BTreeMap::new(),
            cut: BTreeSet::new(),
            lossy_until: 0,
            history: Vec::new(),
            next_value: 1,
            faults: Vec::new(),
            mutation,
            faulting: true,
            want: (1..=VOTERS).collect(),
            added: BTreeMap::new(),
            next_reconfigure: 0,
            log_memory: if seed.is_multiple_of(4) { TIGHT_LOG_MEMORY } else { EngineConfig::default().max_mem_bytes },
            appends_dropped: 0,
        };
        for id in 1..=NODES {
            let disk = SharedDisk::default();
            let mut machine = Machine { lists: vec![Vec::new(); BUCKETS], ..Machine::default() };
            if id <= VOTERS {
                let index = grex::cluster::engine::BOOTSTRAP_INDEX;
                let mut d = disk.0.lock().unwrap();
                d.base = (index, index);
                d.hard = HardState { term: index, commit: index, ..Default::default() };
                d.member = true;
                machine = Machine { applied: index, term: index, conf: conf(), ..machine };
            }
            let mut node = Node {
                id,
                engine: None,
                disk,
                unwritten: VecDeque::new(),
                checkpoint: machine.clone(),
                machine,
                last_checkpoint: 0,
                paused_until: None,
                incarnation: 0,
                cache: BTreeMap::new(),
                lead_term: None,
                proposals: BTreeMap::new(),
                reads: BTreeMap::new(),
                confirmed: Vec::new(),
                next_read: 1,
                waiting: Vec::new(),
                last_heard: BTreeMap::new(),
                incarnations: BTreeMap::new(),
                alive: (1..=NODES).collect(),
            };
            node.engine = Some(open_engine(&node, seed, sim.log_memory));
            sim.nodes.insert(id, node);
            let at = sim.rng.random_range(0..TICK);
            sim.at(at, Event::Tick(id));
        }
        sim.at(0, Event::PingRound);
        for worker in 0..WORKERS {
            let at = sim.rng.random_range(0..200_000);
            sim.at(at, Event::Invoke { worker });
        }
        let first = sim.rng.random_range(500_000..1_500_000);
        sim.at(first, Event::Fault);
        sim.at(FAULT_TIME, Event::Heal);
        sim
    }

    fn at(&mut self, time: Time, event: Event) {
        self.seq += 1;
        self.events.push(Some(event));
        self.queue.push(Reverse((time, self.seq, self.events.len() - 1)));
    }

    fn after(&mut self, delay: Time, event: Event) {
        self.at(self.now + delay, event);
    }

    fn up(&self, id: NodeId) -> bool {
        let node = &self.nodes[&id];
        node.engine.is_some() && node.paused_until.is_none()
    }

    fn linked(&self, a: NodeId, b: NodeId) -> bool {
        !self.cut.contains(&(a, b)) && !self.cut.contains(&(b, a))
    }

    fn run(&mut self, until: Time) {
        while let Some(Reverse((time, _, slot))) = self.queue.peek().copied() {
            if time > until {
                break;
            }
            self.queue.pop();
            self.now = time;
            let event = self.events[slot].take().expect("each event runs once");
            self.handle(event);
        }
        self.now = until;
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { from, to, incarnation, envelope } => {
                let lost = self.now < self.lossy_until && self.rng.random_bool(0.05);
                let sender_alive = self.nodes[&from].incarnation == incarnation && self.nodes[&from].engine.is_some();
                let snapshot = envelope.message.get_msg_type() == MessageType::MsgSnapshot;
                if !self.linked(from, to) || lost || !sender_alive || self.nodes[&to].engine.is_none() {
                    if snapshot && sender_alive {
                        // The sender's transfer failed, and it hears so (as the driver does).
                        let engine = self.nodes.get_mut(&from).unwrap().engine.as_mut().unwrap();
                        engine.report_snapshot(GROUP, to, false);
                        self.pump(from);
                    }
                    return;
                }
                if let Some(until) = self.nodes[&to].paused_until {
                    // A paused process reads its socket when it resumes.
                    self.at(until + 1, Event::Deliver { from, to, incarnation, envelope });
                    return;
                }
                let envelope = *envelope;
                if snapshot {
                    // The transfer arrived: the sender hears so (as the driver does on the ack).
                    let engine = self.nodes.get_mut(&from).unwrap().engine.as_mut().unwrap();
                    engine.report_snapshot(GROUP, to, true);
                    self.pump(from);
                }
                self.heard(to, from);
                let node = self.nodes.get_mut(&to).unwrap();
                for stray in node.engine.as_mut().unwrap().step([envelope]) {
                    adopt(node, stray);
                }
                self.pump(to);
            }
            Event::Ping { from, to, incarnation } => {
                if self.linked(from, to) && self.nodes[&to].engine.is_some() {
                    if let Some(until) = self.nodes[&to].paused_until {
                        self.at(until + 1, Event::Ping { from, to, incarnation });
                    } else {
                        self.heard(to, from);
                        // As the real detector: a peer that came back as a new process leads nothing.
                        let node = self.nodes.get_mut(&to).unwrap();
                        let before = node.incarnations.insert(from, incarnation);
                        if before.is_some_and(|b| b != incarnation) {
                            node.engine.as_mut().unwrap().peer_down(from);
                        }
                    }
                }
            }
            Event::WriteDone { node, incarnation } => {
                if self.nodes[&node].incarnation != incarnation || self.nodes[&node].engine.is_none() {
                    return;
                }
                self.finish_writes(node);
                self.pump(node);
            }
            Event::Tick(id) => {
                self.after(TICK, Event::Tick(id));
                if !self.up(id) {
                    return;
                }
                self.detect(id);
                let node = self.nodes.get_mut(&id).unwrap();
                node.engine.as_mut().unwrap().tick();
                if self.now - node.last_checkpoint >= CHECKPOINT_EVERY {
                    node.last_checkpoint = self.now;
                    node.checkpoint = node.machine.clone();
                    let upto = node.checkpoint.applied;
                    let first = node.disk.0.lock().unwrap().base.0 + 1;
                    if upto > first + KEEP_LOG {
                        let upto = upto - KEEP_LOG / 2;
                        node.engine.as_mut().unwrap().purge(GROUP, upto);
                        let mut disk = node.disk.0.lock().unwrap();
                        if let Some(term) = disk.log.get(&upto).map(|e| e.term) {
                            disk.log.retain(|&i, _| i > upto);
                            disk.base = (upto, term);
                        }
                    }
                }
                let waiting = std::mem::take(&mut self.nodes.get_mut(&id).unwrap().waiting);
                for (job, since) in waiting {
                    self.run_job(id, job, since);
                }
                if self.now >= self.next_reconfigure {
                    self.reconfigure(id);
                }
                self.pump(id);
            }
            Event::PingRound => {
                self.after(PING_EVERY, Event::PingRound);
                for from in 1..=NODES {
                    for to in 1..=NODES {
                        if from != to && self.up(from) {
                            let delay = self.rng.random_range(50..2_000);
                            let incarnation = self.nodes[&from].incarnation;
                            self.after(delay, Event::Ping { from, to, incarnation });
                        }
                    }
                }
            }
            Event::Invoke { worker } => self.invoke(worker),
            Event::Job { node, job } => {
                if self.nodes[&node].engine.is_none() {
                    return self.complete(job.op, Outcome::Unknown("the node was down".into()));
                }
                if let Some(until) = self.nodes[&node].paused_until {
                    return self.at(until + 1, Event::Job { node, job });
                }
                let now = self.now;
                self.run_job(node, job, now);
                self.pump(node);
            }
            Event::Restart(id) => {
                if self.nodes[&id].engine.is_none() {
                    self.restart(id);
                }
            }
            Event::Resume(id) => {
                if self.nodes[&id].paused_until.is_none_or(|until| until > self.now) && self.faulting {
                    return;
                }
                self.nodes.get_mut(&id).unwrap().paused_until = None;
                self.finish_writes(id);
                self.pump(id);
            }
            Event::Heal => {
                self.faulting = false;
                self.cut.clear();
                self.lossy_until = 0;
            }
            Event::Fault => self.fault(),
        }
    }

    fn heard(&mut self, me: NodeId, from: NodeId) {
        self.nodes.get_mut(&me).unwrap().last_heard.insert(from, self.now);
    }

    /// The failure detector of node `id`: a peer not heard from for `DEAD_AFTER` is down.
    fn detect(&mut self, id: NodeId) {
        let now = self.now;
        let node = self.nodes.get_mut(&id).unwrap();
        for peer in 1..=NODES {
            if peer == id {
                continue;
            }
            let heard = node.last_heard.get(&peer).is_some_and(|t| now - t < DEAD_AFTER);
            if !heard && node.alive.remove(&peer) {
                node.engine.as_mut().unwrap().peer_down(peer);
            } else if heard {
                node.alive.insert(peer);
            }
        }
    }

    fn invoke(&mut self, worker: usize) {
        if !self.faulting && self.now > FAULT_TIME + SETTLE_TIME / 2 {
            return;
        }
        let node = self.rng.random_range(1..=NODES);
        let bucket = self.rng.random_range(0..BUCKETS);
        let kind = match self.rng.random_range(0..100) {
            0..60 => {
                self.next_value += 1;
                Kind::Append(self.next_value)
            }
            60..85 => Kind::Read,
            _ => Kind::FollowerRead,
        };
        let invoked = Duration::from_micros(self.now);
        self.history.push(Op {
            worker,
            bucket,
            node: node as usize - 1,
            via: Via::Simulated,
            kind,
            invoked,
            completed: invoked,
            outcome: Outcome::Unknown("no answer".into()),
        });
        let op = self.history.len() - 1;
        let delay = self.rng.random_range(100..500);
        self.after(delay, Event::Job { node, job: Job { op, bucket, kind, forwarded: false } });
    }

    fn complete(&mut self, op: usize, outcome: Outcome) {
        let entry = &mut self.history[op];
        if entry.completed != entry.invoked {
            return;
        }
        entry.completed = Duration::from_micros(self.now.max(1));
        if entry.completed == entry.invoked {
            entry.completed += Duration::from_micros(1);
        }
        entry.outcome = outcome;
        let worker = entry.worker;
        let think = self.rng.random_range(1_000..20_000);
        self.after(think, Event::Invoke { worker });
    }

    /// Runs or routes a job at node `id`.
    fn run_job(&mut self, id: NodeId, job: Job, since: Time) {
        let op = job.op;
        if self.now.saturating_sub(self.history[op].invoked.as_micros() as u64) > CLIENT_TIMEOUT {
            return self.complete(op, Outcome::Unknown("the client gave up".into()));
        }
        let node = self.nodes.get_mut(&id).unwrap();
        let engine = node.engine.as_mut().unwrap();
        if job.kind == Kind::FollowerRead {
            let list = node.machine.lists[job.bucket].clone();
            return self.complete(op, Outcome::Ok(list));
        }
        // A node outside the group knows no leader, as one that has not heard from it yet.
        let lead = engine.lead(GROUP);
        let (ready, leader) = lead.map_or((false, None), |lead| (lead.ready, lead.leader));
        if !ready {
            if let Some(leader) = leader.filter(|l| *l != id && !job.forwarded) {
                let delay = self.rng.random_range(100..1_000);
                let linked = self.linked(id, leader);
                if linked {
                    return self.after(delay, Event::Job { node: leader, job: Job { forwarded: true, ..job } });
                }
            }
            if self.now - since > ROUTE_PATIENCE {
                return self.complete(op, Outcome::Failed("unavailable: no leader".into()));
            }
            self.nodes.get_mut(&id).unwrap().waiting.push((job, since));
            return;
        }
        let lead = lead.expect("a ready leader runs the group");
        let node = self.nodes.get_mut(&id).unwrap();
        if node.lead_term != Some(lead.term) {
            node.cache.clear();
            node.lead_term = Some(lead.term);
        }
        let (list, seen) = match node.cache.get(&job.bucket) {
            Some((term, list, index)) if *term == lead.term => (list.clone(), *index),
            _ => (node.machine.lists[job.bucket].clone(), 0),
        };
        match job.kind {
            Kind::Append(v) => {
                let mut new = list;
                new.push(v);
                let engine = node.engine.as_mut().unwrap();
                match engine.propose(GROUP, encode_change(job.bucket, &new)) {
                    Ok(Proposal { index, term }) => {
                        node.cache.insert(job.bucket, (term, new.clone(), index));
                        if self.mutation == Some(Mutation::AckOnPropose) {
                            self.complete(op, Outcome::Ok(new));
                        } else {
                            node.proposals.insert(index, (op, term, new));
                        }
                    }
                    Err(e) => self.complete(op, Outcome::Failed(format!("unavailable: {e:?}"))),
                }
            }
            Kind::Read => {
                if self.mutation == Some(Mutation::ReadWithoutConfirm) {
                    return self.complete(op, Outcome::Ok(list));
                }
                let ctx = node.next_read;
                node.next_read += 1;
                node.engine.as_mut().unwrap().read_index(GROUP, ctx.to_be_bytes().to_vec()).expect("runs the group");
                node.reads.insert(ctx, vec![(op, lead.term, list, seen)]);
            }
            Kind::FollowerRead => unreachable!("answered above"),
        }
    }

    /// Takes every output node `id`'s engine has.
    fn pump(&mut self, id: NodeId) {
        for _ in 0..100 {
            if !self.up(id) {
                return;
            }
            let node = self.nodes.get_mut(&id).unwrap();
            let out = node.engine.as_mut().unwrap().output();
            if out.is_empty() {
                break;
            }
            self.handle_output(id, out);
        }
        self.answer_reads(id);
    }

    fn handle_output(&mut self, id: NodeId, out: Output) {
        let incarnation = self.nodes[&id].incarnation;
        for (to, envelopes) in out.messages {
            for mut envelope in envelopes {
                if envelope.message.get_msg_type() == MessageType::MsgSnapshot {
                    let machine = &self.nodes[&id].machine;
                    let snapshot = envelope.message.mut_snapshot();
                    snapshot.data = encode_lists(&machine.lists).into();
                    snapshot.metadata = Some(SnapshotMetadata {
                        index: machine.applied,
                        term: machine.term,
                        conf_state: Some(machine.conf.clone()).into(),
                        ..Default::default()
                    })
                    .into();
                }
                let delay = self.rng.random_range(100..3_000);
                self.after(delay, Event::Deliver { from: id, to, incarnation, envelope: Box::new(envelope) });
            }
        }
        if let Some(write) = out.write {
            let delay = self.rng.random_range(200..2_000);
            let node = self.nodes.get_mut(&id).unwrap();
            let due = node.unwritten.back().map_or(0, |(t, _)| *t).max(self.now + delay);
            node.unwritten.push_back((due, write));
            self.at(due, Event::WriteDone { node: id, incarnation });
        }
        for committed in out.committed {
            let node = self.nodes.get_mut(&id).unwrap();
            let mut done = Vec::new();
            let mut confs = committed.conf_states.iter();
            for entry in &committed.entries {
                assert_eq!(entry.index, node.machine.applied + 1, "node {id} applies in order");
                node.machine.applied = entry.index;
                node.machine.term = entry.term;
                if entry.get_entry_type() != EntryType::EntryNormal {
                    if let Some((_, conf)) = confs.next() {
                        node.machine.conf = conf.clone();
                    }
                } else if !entry.data.is_empty() {
                    let (bucket, list) = decode_change(&entry.data);
                    node.machine.lists[bucket] = list;
                }
                if let Some((op, term, list)) = node.proposals.remove(&entry.index) {
                    done.push((op, term == entry.term, list));
                }
            }
            let last = node.machine.applied;
            node.engine.as_mut().unwrap().applied(GROUP, last);
            for (op, kept, list) in done {
                let outcome = if kept { Outcome::Ok(list) } else { Outcome::Failed("unavailable: replaced".into()) };
                self.complete(op, outcome);
            }
        }
        for (_, read) in out.reads {
            let ctx = u64::from_be_bytes(read.request_ctx.as_slice().try_into().unwrap());
            let node = self.nodes.get_mut(&id).unwrap();
            for (op, term, list, seen) in node.reads.remove(&ctx).unwrap_or_default() {
                node.confirmed.push((op, term, list, read.index, seen));
            }
        }
    }

    /// Answers confirmed reads whose read index (and whose own view) is applied, in their term.
    fn answer_reads(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        let Some(lead) = node.engine.as_ref().and_then(|e| e.lead(GROUP)) else { return };
        let applied = node.machine.applied;
        let mut answers = Vec::new();
        node.confirmed.retain(|(op, term, list, index, seen)| {
            if lead.role != StateRole::Leader || lead.term != *term {
                answers.push((*op, Outcome::Failed("unavailable: lost the lead".into())));
                return false;
            }
            if applied < (*index).max(*seen) {
                return true;
            }
            answers.push((*op, Outcome::Ok(list.clone())));
            false
        });
        for (op, outcome) in answers {
            self.complete(op, outcome);
        }
    }

    fn finish_writes(&mut self, id: NodeId) {
        let now = self.now;
        let node = self.nodes.get_mut(&id).unwrap();
        if node.paused_until.is_some() {
            return;
        }
        while node.unwritten.front().is_some_and(|(due, _)| *due <= now) {
            let (_, write) = node.unwritten.pop_front().unwrap();
            {
                let mut disk = node.disk.0.lock().unwrap();
                for gw in &write.groups {
                    if let Some(snapshot) = &gw.snapshot {
                        let meta = snapshot.get_metadata();
                        disk.log.clear();
                        disk.base = (meta.index, meta.term);
                        node.machine = Machine {
                            lists: decode_lists(&snapshot.data),
                            applied: meta.index,
                            term: meta.term,
                            conf: meta.get_conf_state().clone(),
                        };
                        node.checkpoint = node.machine.clone();
                    }
                    if let Some(first) = gw.entries.first() {
                        let from = first.index;
                        disk.log.retain(|&i, _| i < from);
                        for entry in &gw.entries {
                            disk.log.insert(entry.index, entry.clone());
                        }
                    }
                    if let Some(hs) = &gw.hard_state {
                        disk.hard = hs.clone();
                    }
                }
            }
            node.engine.as_mut().unwrap().persisted(write.id);
        }
    }

    fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        self.appends_dropped += node.engine.take().map_or(0, |e| e.appends_dropped());
        node.incarnation += 1;
        node.unwritten.clear();
        node.paused_until = None;
        node.machine = node.checkpoint.clone();
        node.cache.clear();
        node.lead_term = None;
        let lost: Vec<usize> = node
            .proposals
            .values()
            .map(|(op, ..)| *op)
            .chain(node.reads.values().flatten().map(|(op, ..)| *op))
            .chain(node.confirmed.iter().map(|(op, ..)| *op))
            .chain(node.waiting.iter().map(|(job, _)| job.op))
            .collect();
        node.proposals.clear();
        node.reads.clear();
        node.confirmed.clear();
        node.waiting.clear();
        for op in lost {
            self.complete(op, Outcome::Unknown("the node crashed".into()));
        }
    }

    fn restart(&mut self, id: NodeId) {
        let seed = self.rng.random();
        let now = self.now;
        let log_memory = self.log_memory;
        let node = self.nodes.get_mut(&id).unwrap();
        node.engine = Some(open_engine(node, seed, log_memory));
        node.last_checkpoint = now;
        node.last_heard = (1..=NODES).map(|peer| (peer, now)).collect();
        node.alive = (1..=NODES).collect();
        self.pump(id);
    }

    fn fault(&mut self) {
        if !self.faulting {
            return;
        }
        let next = self.rng.random_range(700_000..2_000_000);
        self.after(next, Event::Fault);
        let id = self.rng.random_range(1..=NODES);
        let other = (id % NODES) + 1;
        let length = self.rng.random_range(300_000..3_000_000);
        let what = match self.rng.random_range(0..6) {
            0 if self.nodes[&id].engine.is_some() => {
                self.crash(id);
                self.after(length, Event::Restart(id));
                format!("crash node {id} for {} ms", length / 1000)
            }
            1 if self.up(id) => {
                self.nodes.get_mut(&id).unwrap().paused_until = Some(self.now + length);
                self.after(length, Event::Resume(id));
                format!("pause node {id} for {} ms", length / 1000)
            }
            2 => {
                self.cut.clear();
                for peer in 1..=NODES {
                    if peer != id {
                        self.cut.insert((id, peer));
                    }
                }
                format!("cut node {id} off")
            }
            3 => {
                self.cut.clear();
                self.cut.insert((id, other));
                format!("cut nodes {id} and {other} from each other")
            }
            4 => {
                self.cut.clear();
                self.lossy_until = self.now + length;
                format!("lose 5% of messages for {} ms", length / 1000)
            }
            _ => {
                // The one node outside the target replaces a voter (the leader, at times).
                let spare = (1..=NODES).find(|n| !self.want.contains(n)).expect("one node is spare");
                let voters: Vec<NodeId> = self.want.iter().copied().collect();
                let old = voters[self.rng.random_range(0..voters.len())];
                self.want.remove(&old);
                self.want.insert(spare);
                format!("move the group from node {old} to node {spare}")
            }
        };
        self.faults.push(format!("{:>7.3}s {what}", self.now as f64 / 1e6));
    }

    /// On the group's ready leader: one step towards the wanted voters, as the cluster's
    /// reconciler takes it (`cluster/membership.rs`): drop a learner no longer wanted, add a
    /// wanted node as a learner, or once it holds the entry that added it, promote it and remove
    /// the voter it replaces in one joint change. A step proposed while another change is under
    /// way is ignored by raft; the next leader carries on from the configuration it finds.
    fn reconfigure(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        let Some(engine) = node.engine.as_mut() else { return };
        if !engine.lead(GROUP).is_some_and(|l| l.ready) {
            return;
        }
        self.next_reconfigure = self.now + RECONFIGURE_EVERY;
        let (voters, learners) = engine.members(GROUP).expect("the leader runs the group");
        let step = if let Some(&stale) = learners.iter().find(|l| !self.want.contains(l)) {
            vec![change(ConfChangeType::RemoveNode, stale)]
        } else if let Some(&new) = self.want.iter().find(|n| !voters.contains(n) && !learners.contains(n)) {
            vec![change(ConfChangeType::AddLearnerNode, new)]
        } else {
            let matched = engine.matched(GROUP);
            let caught_up =
                |n: &NodeId| matched.get(n).copied().unwrap_or(0) >= self.added.get(n).copied().unwrap_or(0);
            if !learners.iter().all(caught_up) {
                return;
            }
            let promote = learners.iter().map(|&n| change(ConfChangeType::AddNode, n));
            let remove =
                voters.iter().filter(|v| !self.want.contains(v)).map(|&v| change(ConfChangeType::RemoveNode, v));
            promote.chain(remove).collect()
        };
        if step.is_empty() {
            return;
        }
        let adds = (step.len() == 1 && step[0].change_type == ConfChangeType::AddLearnerNode).then(|| step[0].node_id);
        if let Ok(proposal) = engine.propose_conf_change(GROUP, conf_change(step))
            && let Some(learner) = adds
        {
            self.added.insert(learner, proposal.index);
        }
    }

    /// The group's voters as its leader sees them (none if no node leads).
    fn final_voters(&self) -> BTreeSet<NodeId> {
        let leading = |n: &Node| n.engine.as_ref().and_then(|e| e.lead(GROUP)).is_some_and(|l| l.ready);
        let leader = self.nodes.values().find(|n| leading(n));
        leader.and_then(|n| n.engine.as_ref().unwrap().members(GROUP)).map(|(voters, _)| voters).unwrap_or_default()
    }

    /// After the faults: every node up, a read through the leader, and every node's copy.
    fn finals(&mut self) -> Result<Vec<Final>, Anomaly> {
        for id in 1..=NODES {
            if self.nodes[&id].engine.is_none() {
                self.restart(id);
            }
            if self.nodes[&id].paused_until.is_some() {
                self.handle(Event::Resume(id));
            }
        }
        let end = self.now + SETTLE_TIME;
        self.run(end);
        let leader =
            (1..=NODES).find(|id| self.nodes[id].engine.as_ref().and_then(|e| e.lead(GROUP)).is_some_and(|l| l.ready));
        if std::env::var("GREX_SIM_DEBUG").is_ok() {
            for id in 1..=NODES {
                let n = &self.nodes[&id];
                let e = n.engine.as_ref().unwrap();
                let d = n.disk.0.lock().unwrap();
                eprintln!(
                    "node {id}: lead {:?} log {:?} machine {} disk base {:?} last {:?} unwritten {} paused {:?} matched {:?}",
                    e.lead(GROUP),
                    e.log_state(GROUP),
                    n.machine.applied,
                    d.base,
                    d.log.keys().next_back(),
                    n.unwritten.len(),
                    n.paused_until,
                    e.matched(GROUP)
                );
            }
        }
        let Some(leader) = leader else {
            return Err(Anomaly {
                kind: "unavailable",
                bucket: 0,
                what: format!("no leader {} s after the faults healed", SETTLE_TIME / 1_000_000),
                ops: Vec::new(),
            });
        };
        // The group's voters converge; a node moved out of it keeps what it had then.
        let (voters, _) = self.nodes[&leader].engine.as_ref().unwrap().members(GROUP).unwrap();
        Ok((0..BUCKETS)
            .map(|bucket| Final {
                list: self.nodes[&leader].machine.lists[bucket].clone(),
                copies: voters.iter().map(|id| self.nodes[id].machine.lists[bucket].clone()).collect(),
            })
            .collect())
    }
}

/// A message for a group node `node` does not run: a leader's first message to a node it added
/// starts the group, empty (the leader sends a snapshot), as the driver does (`Driver::adopt`).
fn adopt(node: &mut Node, envelope: Envelope) {
    let from_leader = matches!(
        envelope.message.get_msg_type(),
        MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
    );
    if !from_leader {
        return;
    }
    node.disk.0.lock().unwrap().member = true;
    let engine = node.engine.as_mut().unwrap();
    engine.add_group(GROUP, GroupLog::empty(GROUP, Arc::new(node.disk.clone()))).expect("start the group");
    let stray = engine.step([envelope]);
    assert!(stray.is_empty(), "the group runs now");
}

/// An engine over a node's disk and checkpoint, as a (re)started node opens it.
fn open_engine(node: &Node, seed: u64, log_memory: u64) -> Engine {
    let config = EngineConfig { seed: seed ^ node.id, max_mem_bytes: log_memory, ..EngineConfig::default() };
    let mut engine = Engine::new(node.id, config);
    let disk = node.disk.0.lock().unwrap();
    if !disk.member {
        return engine;
    }
    // A node added to the group whose snapshot had not reached its disk restarts with an empty
    // log, but with the hard state it wrote (its vote) kept.
    let mut terms: Vec<(u64, u64)> = Vec::new();
    for entry in disk.log.values() {
        if terms.last().is_none_or(|&(_, t)| t != entry.term) {
            terms.push((entry.index, entry.term));
        }
    }
    let last = disk.log.keys().next_back().copied().unwrap_or(disk.base.0);
    let applied = SnapshotMetadata {
        index: node.machine.applied,
        term: node.machine.term,
        conf_state: Some(node.machine.conf.clone()).into(),
        ..Default::default()
    };
    let state = raft::RaftState { hard_state: disk.hard.clone(), conf_state: node.machine.conf.clone() };
    let log = GroupLog::restore(GROUP, state, disk.base, last, terms, applied, Arc::new(node.disk.clone()));
    drop(disk);
    engine.add_group(GROUP, log).expect("open the group");
    engine
}

/// Runs one schedule from `seed` and checks it.
pub fn run(seed: u64, mutation: Option<Mutation>) -> Report {
    let mut sim = Sim::new(seed, mutation);
    sim.run(FAULT_TIME);
    let finals = sim.finals();
    let unfinished: Vec<usize> =
        (0..sim.history.len()).filter(|&i| sim.history[i].completed == sim.history[i].invoked).collect();
    for op in unfinished {
        sim.history[op].completed = Duration::from_micros(sim.now);
    }
    let anomalies = match finals {
        Ok(finals) => list_append::check(&sim.history, &finals),
        Err(unavailable) => vec![unavailable],
    };
    let voters = sim.final_voters();
    let appends_dropped = sim.appends_dropped
        + sim.nodes.values().filter_map(|n| n.engine.as_ref()).map(|e| e.appends_dropped()).sum::<u64>();
    let report = Report {
        seed,
        ops: sim.history.len(),
        acknowledged: sim.history.iter().filter(|o| matches!(o.outcome, Outcome::Ok(_))).count(),
        faults: sim.faults,
        anomalies,
        voters,
        wanted: sim.want,
        appends_dropped,
    };
    if std::env::var("GREX_SIM_DEBUG").is_ok() {
        eprintln!("{}", report.explain());
    }
    report
}

impl Report {
    /// The report for a person: seed, faults, anomalies.
    pub fn explain(&self) -> String {
        let mut out = format!(
            "seed {} (GREX_SEED={} replays it): {} ops, {} acknowledged; voters at the end {:?}, wanted {:?}\nfaults:\n",
            self.seed, self.seed, self.ops, self.acknowledged, self.voters, self.wanted
        );
        for fault in &self.faults {
            out += &format!("  {fault}\n");
        }
        for anomaly in &self.anomalies {
            out += &format!("{anomaly}");
        }
        out
    }
}

/// What a sweep of many schedules found.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Schedules run.
    pub schedules: u64,
    /// Operations, and of them acknowledged.
    pub ops: usize,
    /// Acknowledged operations.
    pub acknowledged: usize,
    /// The schedules with anomalies (at most 10 kept).
    pub failed: Vec<Report>,
    /// Schedules whose group ended on other voters than it began with.
    pub moved: u64,
    /// Schedules whose group ended on the voters its last move aimed at.
    pub settled: u64,
    /// How many schedules had anomalies.
    pub failures: u64,
    /// Appends dropped for memory, over all schedules (those with a tight bound).
    pub appends_dropped: u64,
}

impl Sweep {
    /// One line.
    pub fn summary(&self) -> String {
        format!(
            "{} schedules, {} operations ({:.1}% acknowledged), {} with anomalies; {} ended on other voters, \
             {} on the voters their last move aimed at; {} appends dropped for log memory",
            self.schedules,
            self.ops,
            100.0 * self.acknowledged as f64 / self.ops.max(1) as f64,
            self.failures,
            self.moved,
            self.settled,
            self.appends_dropped
        )
    }
}

/// The seed of schedule `i` of a sweep from `base`.
pub fn schedule_seed(base: u64, i: u64) -> u64 {
    base.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Runs `count` schedules from `base` on `threads` threads.
pub fn sweep(base: u64, count: u64, mutation: Option<Mutation>, threads: usize) -> Sweep {
    let next = std::sync::atomic::AtomicU64::new(0);
    let total = Mutex::new(Sweep::default());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let report = run(schedule_seed(base, i), mutation);
                    let mut total = total.lock().unwrap();
                    total.schedules += 1;
                    total.ops += report.ops;
                    total.acknowledged += report.acknowledged;
                    total.moved += u64::from(report.moved());
                    total.settled += u64::from(report.voters == report.wanted);
                    total.appends_dropped += report.appends_dropped;
                    if !report.anomalies.is_empty() {
                        total.failures += 1;
                        if total.failed.len() < 10 {
                            total.failed.push(report);
                        }
                    }
                }
            });
        }
    });
    total.into_inner().unwrap()
}
