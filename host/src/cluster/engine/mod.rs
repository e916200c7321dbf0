//! The consensus engine: one per node, driving every group it takes part in (each flock it
//! herds, and the meta group) with raft-rs's sans-IO [`RawNode`], per-group state as data.
//!
//! The engine does no I/O and reads no clock. Everything enters through its methods (`step`
//! for peers' messages, `tick` for time, `propose`, `peer_down` from the failure detector,
//! `persisted` and `applied` from the driver) and everything leaves through [`Engine::output`]:
//!
//! - `messages`: one list per peer holding every group's messages, to go out as one frame;
//! - `write`: every group's new entries, hard state and snapshot, as one durable write (one
//!   fsync for all groups). The driver writes them in order and reports each with
//!   [`Engine::persisted`]. A leader's messages go out at once, before its own write (Raft
//!   allows it, so leader and follower writes overlap); a follower's answers are held until
//!   the write they depend on is durable;
//! - `committed`: entries to apply, per group, in order (configuration changes are already
//!   applied to the group; the driver applies the data and reports with [`Engine::applied`]);
//! - `reads`: read-index answers; `changed`: groups whose role or leader changed.
//!
//! No group has a task, channel or timer of its own, and an idle group costs only memory: once
//! a group has had nothing to do for [`EngineConfig::hibernate_ticks`] (a leader whose
//! members hold its whole log and have told it they know it committed, a follower of a known
//! leader with its whole log committed and applied), it sleeps: it is no longer ticked, so a leader sends no heartbeats and a
//! follower runs no election timer. Anything but a heartbeat wakes it (a proposal, an append, a
//! vote request, a read, `peer_down`), and the failure detector stands in for the timers while
//! it sleeps: a lost leader's followers learn of it from [`Engine::peer_down`] (TiKV's
//! hibernate regions work the same way). A sleeping follower rejects pre-votes as a ticking
//! one does within its leader's lease, so one node that lost its link alone cannot depose a
//! leader the others still reach. A leader's commit index reaches its followers on the next
//! append or heartbeat, never in a round of its own (`skip_bcast_commit`).
//!
//! Elections: every group has raft's own election timer, a backstop of a few seconds. The node
//! pair failure detector makes them fast: [`Engine::peer_down`] lets this node vote at once in
//! the groups the lost node led and schedules its own campaign, staggered by a rank per group
//! so the herders do not split their votes. An election can also end with no leader while no
//! node is down: a transfer to a herder whose log is behind, split votes, or a candidate that
//! steps down when a vote's answer commits a configuration change (raft-rs's
//! `maybe_commit_by_vote`) after others voted for it in that term. So a voter that has known no
//! leader for [`LEADERLESS_TICKS`] campaigns after its rank's wait, as when its leader's node is
//! lost, instead of waiting for the backstop. Pre-vote and check-quorum keep a node that lost
//! only its own link to the leader from deposing it.
//!
//! Determinism: raft-rs draws its randomized election timeouts from a thread-local generator
//! whenever a group's node becomes follower, candidate or leader; the engine replaces each with
//! one drawn from its own seeded generator, so a seeded schedule of inputs gives the same
//! outputs. A draw is seen by its changing the timeout, the term or the role: raft may draw the
//! very value the engine set, so the value alone would miss one now and then.

pub mod log;
mod logging;
#[cfg(test)]
mod scenarios;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::mem;

use protobuf::Message as _;
use raft::prelude::{ConfChangeV2, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus};

pub use log::{BOOTSTRAP_INDEX, EntrySource, GroupLog, entry_bytes};
pub use raft::ReadState;
pub use raft::StateRole;
pub use raft::prelude::ConfState;

use crate::storage::GroupId;

/// A node's id (never 0: raft-rs reserves it).
pub type NodeId = u64;

/// Bytes of a configuration change entry parsed at most (a real one is tens of bytes; the
/// bound keeps the protobuf parser, which recurses, away from deep input).
const CONF_CHANGE_BYTES_MAX: usize = 64 * 1024;

/// How the engine runs its groups. Times are in ticks (the driver's tick is 100 ms).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Ticks without a leader before a follower runs on its own (the backstop; the failure
    /// detector starts elections sooner). Randomized in `[election_ticks, 2 × election_ticks)`.
    pub election_ticks: usize,
    /// Ticks between the campaigns of successive herders once the leader's node is lost.
    pub campaign_stagger_ticks: u64,
    /// Bytes of entries in one append message.
    pub max_msg_bytes: u64,
    /// Append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Bytes of proposed, uncommitted entries a leader accepts before refusing more.
    pub max_uncommitted_bytes: u64,
    /// Bytes of committed entries handed out to apply per group per output, and of entries
    /// handed out (to apply or in messages) per output over all groups: once an output holds
    /// this much, the groups left wait for the next (one group's may go past it).
    pub max_apply_bytes: u64,
    /// Applied, durable entries a group keeps in memory for followers that lag a little.
    pub cached_entries: u64,
    /// Bytes of log entries all groups together hold in memory. Over half of it, applied and
    /// durable entries leave memory at once (followers that lag read them from the log); over
    /// all of it, proposals are refused ([`Refusal::Memory`]) until commits and applies catch up.
    pub max_mem_bytes: u64,
    /// Ticks a follower may stay waiting for a snapshot before its leader counts the snapshot
    /// as lost and sends again (the driver reports most outcomes sooner; this covers a receiver
    /// that took the snapshot and crashed before answering).
    pub snapshot_patience_ticks: u64,
    /// Ticks a group must have had nothing to do before it sleeps (see the module's notes);
    /// less than `election_ticks`, so a follower sleeps before it misses its leader's heartbeats.
    /// 0: groups never sleep.
    pub hibernate_ticks: u64,
    /// Seed of the election timeouts.
    pub seed: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            heartbeat_ticks: 10,
            election_ticks: 30,
            campaign_stagger_ticks: 3,
            max_msg_bytes: 1 << 20,
            max_inflight_msgs: 32,
            max_uncommitted_bytes: 64 << 20,
            max_apply_bytes: 4 << 20,
            cached_entries: 64,
            max_mem_bytes: 32 << 20,
            snapshot_patience_ticks: 100,
            hibernate_ticks: 20,
            seed: 0x6772_6578,
        }
    }
}

/// One group's message.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The group.
    pub group: GroupId,
    /// raft-rs's message.
    pub message: Message,
}

/// What of one group an engine write makes durable.
#[derive(Clone, Debug, Default)]
pub struct GroupWrite {
    /// The group.
    pub group: GroupId,
    /// A snapshot that replaces the group's log (written before `entries`).
    pub snapshot: Option<Snapshot>,
    /// Entries to append; an entry at an index the log holds replaces it and every later one.
    pub entries: Vec<Entry>,
    /// The new hard state (term, vote, commit).
    pub hard_state: Option<HardState>,
}

/// One durable write for every group: written in order of `id`, then reported with
/// [`Engine::persisted`]. A write with no groups still waits for the writes before it.
#[derive(Clone, Debug, Default)]
pub struct Write {
    /// Sequence number.
    pub id: u64,
    /// What each group needs written.
    pub groups: Vec<GroupWrite>,
}

/// Committed entries of one group, to apply in order.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The group.
    pub group: GroupId,
    /// The entries (an entry with no data is a leader's no-op or a configuration change).
    pub entries: Vec<Entry>,
    /// The configuration after each configuration change among `entries`, by index: the
    /// driver stores it with its applied point.
    pub conf_states: Vec<(u64, ConfState)>,
}

/// Everything an engine asks of the world after its inputs.
#[derive(Debug, Default)]
pub struct Output {
    /// Per peer, every group's messages to it, in order.
    pub messages: BTreeMap<NodeId, Vec<Envelope>>,
    /// The durable write this output needs (absent if nothing waits on one).
    pub write: Option<Write>,
    /// Entries to apply.
    pub committed: Vec<Committed>,
    /// Answers to read-index requests: a read may be served once the group has applied `index`.
    pub reads: Vec<(GroupId, ReadState)>,
    /// Groups whose role, leader or readiness to lead changed.
    pub changed: Vec<GroupId>,
}

impl Output {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.write.is_none()
            && self.committed.is_empty()
            && self.reads.is_empty()
            && self.changed.is_empty()
    }
}

/// Why a proposal or request was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This node has no such group.
    NoGroup,
    /// This node does not lead the group; `leader` is who does, if known.
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
    },
    /// The group has too much uncommitted (or a configuration change is under way).
    Busy,
    /// The node holds as many log entries in memory as [`EngineConfig::max_mem_bytes`] allows.
    Memory {
        /// Bytes held.
        held: u64,
    },
}

/// Where a proposal went: it is committed as proposed if the entry at `index` has `term`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// Log index of the entry.
    pub index: u64,
    /// Term it was proposed in.
    pub term: u64,
}

/// A group's leadership as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lead {
    /// This node's role.
    pub role: StateRole,
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// This node's current term.
    pub term: u64,
    /// This node leads and has applied everything committed before its term: it may serve.
    pub ready: bool,
}

struct Group {
    raw: RawNode<GroupLog>,
    /// When this node campaigns, and the leader whose loss made it.
    campaign: Option<(u64, NodeId)>,
    /// The election timeout this engine last set, and the term and role it was set in (see
    /// the module's notes on determinism).
    timeout: (usize, u64, StateRole),
    /// Configurations of configuration changes handed out and not yet applied by the driver.
    confs: VecDeque<(u64, ConfState)>,
    lead: Lead,
    /// Followers waiting for a snapshot from this leader, since which tick.
    snapshots: BTreeMap<NodeId, u64>,
    /// Ticks in a row the group had nothing to do.
    idle: u64,
    /// Not ticked until something wakes it.
    asleep: bool,
    /// Ticks in a row this node, a follower, knew no leader and had no campaign planned.
    leaderless: u64,
}

/// Ticks a voter knows no leader before it plans a campaign of its own (see the module's notes):
/// longer than an election in progress takes to make its winner known.
pub const LEADERLESS_TICKS: u64 = 5;

impl Group {
    /// Its leader `lost` is gone: this node (if a voter without it) votes at once and campaigns
    /// after its rank's wait, counted from tick `at`.
    fn campaign_without(&mut self, group: GroupId, me: NodeId, lost: NodeId, at: u64, stagger: u64) {
        let raft = &mut self.raw.raft;
        let voters: Vec<NodeId> = raft.prs().conf().voters().ids().iter().filter(|&v| v != lost).collect();
        if !voters.contains(&me) {
            return;
        }
        raft.election_elapsed = raft.election_elapsed.max(raft.election_timeout());
        self.campaign = Some((at + campaign_rank(group, me, &voters) * stagger, lost));
        self.wake();
    }

    fn wake(&mut self) {
        self.idle = 0;
        self.asleep = false;
    }

    /// Whether the group has nothing to do that a tick could move on: a leader whose members
    /// all hold its whole log and know it committed, and which has applied it; a follower of a
    /// known leader with its whole log committed and applied.
    fn quiet(&self) -> bool {
        let raft = &self.raw.raft;
        let log = &raft.raft_log;
        let settled = log.committed == log.last_index() && log.applied == log.committed && self.confs.is_empty();
        match raft.state {
            StateRole::Leader => {
                settled
                    && self.snapshots.is_empty()
                    && raft.lead_transferee.is_none()
                    && !joint(raft)
                    && raft.read_only.pending_read_count() == 0
                    // Every member holds the whole log and knows it is committed: the commit
                    // rides on heartbeats, and a member that missed them while its leader sleeps
                    // would hold entries it never applies (a learner never campaigns, nor does a
                    // voter with an unapplied configuration change, to wake the leader).
                    && raft.prs().iter().all(|(_, p)| p.matched == log.last_index() && p.committed_index >= log.committed)
            }
            StateRole::Follower => settled && raft.leader_id != raft::INVALID_ID,
            _ => false,
        }
    }
}

struct Unwritten {
    id: u64,
    readies: Vec<(GroupId, u64)>,
    /// Snapshots in the write, by group and index: the state they hold is applied once durable.
    snapshots: Vec<(GroupId, u64)>,
    held: Vec<(NodeId, Envelope)>,
}

/// The engine. See the module's notes.
pub struct Engine {
    me: NodeId,
    config: EngineConfig,
    logger: slog::Logger,
    groups: BTreeMap<GroupId, Group>,
    /// Groups that may have something to hand out.
    active: BTreeSet<GroupId>,
    /// The group the next output starts from (the first one the last output left waiting).
    output_from: GroupId,
    changed: BTreeSet<GroupId>,
    ticks: u64,
    rng: u64,
    next_write: u64,
    unwritten: VecDeque<Unwritten>,
    outgoing: BTreeMap<NodeId, Vec<Envelope>>,
    /// Bytes of log entries in memory over all groups, kept as each group's log changes (its
    /// sum is needed per proposal and per apply).
    mem_held: u64,
    /// Appends dropped because the entries they carried did not fit in memory.
    appends_dropped: u64,
    /// Groups whose leader had an append dropped here, with that leader and its term: told, once
    /// there is room, to send again (`answer_dropped`).
    dropped: BTreeMap<GroupId, (NodeId, u64)>,
}

/// Runs `change` on a group's log and keeps `held`, the engine's total of entry bytes in memory,
/// in step with it.
fn tracked(held: &mut u64, log: &mut GroupLog, change: impl FnOnce(&mut GroupLog)) {
    let before = log.mem_bytes();
    change(log);
    *held = *held - before + log.mem_bytes();
}

fn lead_of(raw: &RawNode<GroupLog>) -> Lead {
    let raft = &raw.raft;
    Lead {
        role: raft.state,
        leader: (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id),
        term: raft.term,
        ready: raft.state == StateRole::Leader && raft.apply_to_current_term(),
    }
}

impl Engine {
    /// An engine for node `me`, with no groups yet.
    pub fn new(me: NodeId, config: EngineConfig) -> Engine {
        assert_ne!(me, 0, "node id 0 is reserved by raft");
        let rng = config.seed | 1;
        Engine {
            me,
            config,
            logger: logging::logger(),
            groups: BTreeMap::new(),
            active: BTreeSet::new(),
            output_from: 0,
            changed: BTreeSet::new(),
            ticks: 0,
            rng,
            next_write: 1,
            unwritten: VecDeque::new(),
            outgoing: BTreeMap::new(),
            mem_held: 0,
            appends_dropped: 0,
            dropped: BTreeMap::new(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.me,
            election_tick: self.config.election_ticks,
            heartbeat_tick: self.config.heartbeat_ticks,
            applied,
            max_size_per_msg: self.config.max_msg_bytes,
            max_inflight_msgs: self.config.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            skip_bcast_commit: true,
            batch_append: true,
            max_uncommitted_size: self.config.max_uncommitted_bytes,
            max_committed_size_per_ready: self.config.max_apply_bytes,
            ..Default::default()
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: enough to spread election timeouts, and reproducible from the seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Starts taking part in `group` with the log `log` (restored from disk, or new).
    pub fn add_group(&mut self, group: GroupId, log: GroupLog) -> anyhow::Result<()> {
        anyhow::ensure!(!self.groups.contains_key(&group), "group {group} is already running");
        let applied = log.applied().0;
        let held = log.mem_bytes();
        let raw = RawNode::new(&self.raft_config(applied), log, &self.logger)
            .map_err(|e| anyhow::anyhow!("group {group}: {e}"))?;
        let lead = lead_of(&raw);
        self.groups.insert(
            group,
            Group {
                raw,
                campaign: None,
                timeout: (0, 0, StateRole::Follower),
                confs: VecDeque::new(),
                lead,
                snapshots: BTreeMap::new(),
                idle: 0,
                asleep: false,
                leaderless: 0,
            },
        );
        self.mem_held += held;
        self.settle(group);
        Ok(())
    }

    /// Whether `group`'s leader tells its followers of a new commit index at once, in a round
    /// of its own (off by default: it rides on the next append or heartbeat). For groups whose
    /// followers must see each change soon, not for throughput.
    pub fn set_eager_commit(&mut self, group: GroupId, eager: bool) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.raw.skip_bcast_commit(!eager);
        }
    }

    /// Stops taking part in `group` (its log stays wherever the driver keeps it).
    pub fn remove_group(&mut self, group: GroupId) -> Option<GroupLog> {
        self.active.remove(&group);
        let g = self.groups.remove(&group)?;
        self.mem_held -= g.raw.store().mem_bytes();
        Some(g.raw.raft.r.raft_log.store)
    }

    /// Whether this node takes part in `group`.
    pub fn has_group(&self, group: GroupId) -> bool {
        self.groups.contains_key(&group)
    }

    /// The groups this node takes part in.
    pub fn group_ids(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied()
    }

    /// After anything touched a group: replace raft's random election timeout with a seeded
    /// one, and note a change of leadership.
    fn settle(&mut self, group: GroupId) {
        let (min, span) = (self.config.election_ticks, self.config.election_ticks.max(1));
        let draw = min + (self.next_random() % span as u64) as usize;
        let Some(g) = self.groups.get_mut(&group) else { return };
        let raft = &mut g.raw.raft;
        if (raft.randomized_election_timeout(), raft.term, raft.state) != g.timeout {
            raft.set_randomized_election_timeout(draw);
            g.timeout = (draw, raft.term, raft.state);
        }
        let lead = lead_of(&g.raw);
        if lead != g.lead {
            g.lead = lead;
            self.changed.insert(group);
        }
        if g.raw.has_ready() {
            self.active.insert(group);
        }
    }

    /// One tick of time for every group that is awake.
    pub fn tick(&mut self) {
        self.ticks += 1;
        let hibernate = self.config.hibernate_ticks;
        let ids: Vec<GroupId> = self.groups.iter().filter(|(_, g)| !g.asleep).map(|(id, _)| *id).collect();
        for group in ids {
            let g = self.groups.get_mut(&group).expect("listed");
            if g.quiet() && g.campaign.is_none() {
                g.idle += 1;
                g.asleep = hibernate > 0 && g.idle >= hibernate;
            } else {
                g.idle = 0;
            }
            g.raw.tick();
            leave_joint(group, &mut g.raw);
            expire_snapshots(g, self.ticks, self.config.snapshot_patience_ticks);
            let raft = &g.raw.raft;
            if g.campaign.is_none() && raft.state == StateRole::Follower && raft.leader_id == raft::INVALID_ID {
                g.leaderless += 1;
                if g.leaderless >= LEADERLESS_TICKS {
                    g.leaderless = 0;
                    g.campaign_without(
                        group,
                        self.me,
                        raft::INVALID_ID,
                        self.ticks,
                        self.config.campaign_stagger_ticks,
                    );
                }
            } else {
                g.leaderless = 0;
            }
            if let Some((at, lost)) = g.campaign
                && at <= self.ticks
            {
                g.campaign = None;
                let raft = &g.raw.raft;
                let leaderless = raft.leader_id == raft::INVALID_ID || raft.leader_id == lost;
                if leaderless && raft.state != StateRole::Leader {
                    let _ = g.raw.campaign();
                    if g.raw.raft.state == StateRole::Follower {
                        // raft refuses while a configuration change waits to be applied: next tick.
                        g.campaign = Some((at, lost));
                    }
                }
            }
            self.settle(group);
        }
    }

    /// The failure detector lost `node`: in the groups it led, this node votes at once and
    /// campaigns after its rank's wait; the groups this node leads with it wake.
    pub fn peer_down(&mut self, node: NodeId) {
        let (me, at) = (self.me, self.ticks + 1);
        let stagger = self.config.campaign_stagger_ticks;
        for (&group, g) in self.groups.iter_mut() {
            let raft = &g.raw.raft;
            if raft.state == StateRole::Leader && raft.prs().get(node).is_some() {
                // It may come back as a new process that knows no leader: heartbeats tell it.
                g.wake();
            } else if raft.leader_id == node && raft.state != StateRole::Leader {
                g.campaign_without(group, me, node, at, stagger);
            }
        }
    }

    /// Sending to `node` failed: leaders probe it again instead of streaming to it.
    pub fn report_unreachable(&mut self, node: NodeId) {
        for (&group, g) in self.groups.iter_mut() {
            if g.raw.raft.state == StateRole::Leader && g.raw.raft.prs().get(node).is_some() {
                g.wake();
                g.raw.report_unreachable(node);
                self.active.insert(group);
            }
        }
    }

    /// A snapshot of `group` sent to `to` was installed (or failed to arrive).
    pub fn report_snapshot(&mut self, group: GroupId, to: NodeId, installed: bool) {
        if let Some(g) = self.groups.get_mut(&group) {
            let status = if installed { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
            g.wake();
            g.raw.report_snapshot(to, status);
            self.active.insert(group);
        }
    }

    /// Peers' messages. Those for groups this node does not take part in come back, for the
    /// driver to decide on (a new herder's first message, or a stale one).
    pub fn step(&mut self, messages: impl IntoIterator<Item = Envelope>) -> Vec<Envelope> {
        let mut unknown = Vec::new();
        for envelope in messages {
            if !self.groups.contains_key(&envelope.group) {
                unknown.push(envelope);
                continue;
            }
            if envelope.message.get_msg_type() == MessageType::MsgAppend && !envelope.message.entries.is_empty() {
                let bytes = envelope.message.entries.iter().map(log::entry_bytes).sum();
                if !self.make_room(bytes) {
                    // As if lost; the leader is told to send again once there is room.
                    self.appends_dropped += 1;
                    self.dropped.insert(envelope.group, (envelope.message.from, envelope.message.term));
                    tracing::debug!(target: "grex::raft", group = envelope.group, bytes, held = self.mem_held, "append dropped: log memory full");
                    continue;
                }
            }
            let g = self.groups.get_mut(&envelope.group).expect("checked");
            // Heartbeats keep a group asleep, and so do pre-votes to a follower: it answers them
            // as one within its leader's lease does, and its own failure detector wakes it if the
            // leader is really gone. A leader wakes on a pre-vote: a member does not hear it (it
            // restarted, or its link was cut), and heartbeats tell it who leads.
            let from = envelope.message.from;
            let raft = &g.raw.raft;
            match envelope.message.get_msg_type() {
                MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse => {}
                MessageType::MsgRequestPreVote if raft.state == StateRole::Leader => g.wake(),
                // A pre-vote from the leader itself: it restarted and leads no more.
                MessageType::MsgRequestPreVote if raft.leader_id == from && raft.state == StateRole::Follower => g
                    .campaign_without(
                        envelope.group,
                        self.me,
                        from,
                        self.ticks + 1,
                        self.config.campaign_stagger_ticks,
                    ),
                MessageType::MsgRequestPreVote if raft.leader_id == from => g.wake(),
                MessageType::MsgRequestPreVote => {}
                _ => g.wake(),
            }
            if let Err(e) = g.raw.step(envelope.message) {
                tracing::debug!(target: "grex::raft", group = envelope.group, "message not taken: {e}");
            }
            self.settle(envelope.group);
        }
        unknown
    }

    fn leader_refusal(&self, group: GroupId) -> Result<&Group, Refusal> {
        let g = self.groups.get(&group).ok_or(Refusal::NoGroup)?;
        if g.raw.raft.state != StateRole::Leader {
            return Err(Refusal::NotLeader { leader: g.lead.leader });
        }
        Ok(g)
    }

    /// Proposes an entry to `group` (this node must lead it).
    pub fn propose(&mut self, group: GroupId, data: Vec<u8>) -> Result<Proposal, Refusal> {
        // Who leads comes first: a proposal sent to the wrong node is redirected, not refused.
        self.leader_refusal(group)?;
        let bytes = data.len() as u64 + log::ENTRY_OVERHEAD_BYTES;
        let fits = |held: u64, max: u64| held == 0 || held + bytes <= max;
        if !fits(self.mem_held, self.config.max_mem_bytes) {
            // Entries applied and durable are only a cache for followers that lag: they make room
            // first, so that one proposal larger than the bound (a large module upload) goes
            // through when nothing else is held.
            for g in self.groups.values_mut().filter(|g| g.raw.store().mem_bytes() > 0) {
                let done = g.raw.raft.raft_log.applied.min(g.raw.raft.raft_log.persisted);
                tracked(&mut self.mem_held, g.raw.mut_store(), |log| log.evict(done));
            }
            if !fits(self.mem_held, self.config.max_mem_bytes) {
                return Err(Refusal::Memory { held: self.mem_held });
            }
        }
        self.append_as_leader(group, |raw| raw.propose(Vec::new(), data))
    }

    /// Proposes a configuration change to `group` (this node must lead it). Refused (`Busy`)
    /// while raft-rs would ignore it: it appends an empty entry in place of a change made while
    /// another is unapplied, or while the group is in a joint configuration the change does not
    /// leave, and that entry would pass for the change.
    pub fn propose_conf_change(&mut self, group: GroupId, change: ConfChangeV2) -> Result<Proposal, Refusal> {
        let raft = &self.leader_refusal(group)?.raw.raft;
        if raft.has_pending_conf() || joint(raft) != change.changes.is_empty() {
            return Err(Refusal::Busy);
        }
        self.append_as_leader(group, |raw| raw.propose_conf_change(Vec::new(), change))
    }

    /// Runs `append` on `group`'s leader; where the entry went, or why it went nowhere (raft-rs
    /// drops a proposal silently when the group is transferring its lead or over its limits).
    fn append_as_leader(
        &mut self,
        group: GroupId,
        append: impl FnOnce(&mut RawNode<GroupLog>) -> raft::Result<()>,
    ) -> Result<Proposal, Refusal> {
        self.leader_refusal(group)?;
        let g = self.groups.get_mut(&group).expect("checked");
        if let Some(next) = g.raw.raft.lead_transferee {
            // raft-rs would drop it: the lead is on its way to `next`, where the caller should
            // go (within an election timeout), rather than be told to back off.
            return Err(Refusal::NotLeader { leader: Some(next) });
        }
        g.wake();
        let before = g.raw.raft.raft_log.last_index();
        append(&mut g.raw).map_err(|_| Refusal::Busy)?;
        let index = g.raw.raft.raft_log.last_index();
        let term = g.raw.raft.term;
        self.settle(group);
        if index == before { Err(Refusal::Busy) } else { Ok(Proposal { index, term }) }
    }

    /// Asks the leader for the commit index a linearizable read must wait for; the answer comes
    /// in [`Output::reads`] with `context`.
    pub fn read_index(&mut self, group: GroupId, context: Vec<u8>) -> Result<(), Refusal> {
        let g = self.groups.get_mut(&group).ok_or(Refusal::NoGroup)?;
        g.wake();
        g.raw.read_index(context);
        self.settle(group);
        Ok(())
    }

    /// Starts an election in `group` now.
    pub fn campaign(&mut self, group: GroupId) -> Result<(), Refusal> {
        let g = self.groups.get_mut(&group).ok_or(Refusal::NoGroup)?;
        g.wake();
        let _ = g.raw.campaign();
        self.settle(group);
        Ok(())
    }

    /// Hands the lead of `group` to `to` (this node must lead it).
    pub fn transfer_leader(&mut self, group: GroupId, to: NodeId) -> Result<(), Refusal> {
        self.leader_refusal(group)?;
        let g = self.groups.get_mut(&group).expect("checked");
        g.wake();
        g.raw.transfer_leader(to);
        self.settle(group);
        Ok(())
    }

    /// The driver applied `group`'s committed entries up to `index`.
    pub fn applied(&mut self, group: GroupId, index: u64) {
        let cached = if self.mem_bytes() * 2 > self.config.max_mem_bytes { 0 } else { self.config.cached_entries };
        let Some(g) = self.groups.get_mut(&group) else { return };
        let last = g.raw.raft.raft_log.last_index();
        g.raw.advance_apply_to(index);
        if g.raw.raft.raft_log.last_index() > last && g.raw.raft.state == StateRole::Leader {
            // Applying a joint configuration made the leader propose leaving it: send it now
            // rather than at the next heartbeat.
            g.raw.raft.bcast_append();
        }
        let mut conf = None;
        while g.confs.front().is_some_and(|&(at, _)| at <= index) {
            conf = g.confs.pop_front().map(|(_, conf)| conf);
        }
        let term = g.raw.raft.raft_log.term(index).unwrap_or(0);
        let store = g.raw.mut_store();
        let conf = conf.unwrap_or_else(|| store.conf_state());
        store.set_applied(index, term, conf);
        let persisted = g.raw.raft.raft_log.persisted;
        tracked(&mut self.mem_held, g.raw.mut_store(), |log| log.evict(index.min(persisted).saturating_sub(cached)));
        self.settle(group);
    }

    /// The driver holds `group`'s state durably up to `upto`: the log may start after it.
    pub fn purge(&mut self, group: GroupId, upto: u64) {
        if let Some(g) = self.groups.get_mut(&group) {
            let applied = g.raw.raft.raft_log.applied;
            tracked(&mut self.mem_held, g.raw.mut_store(), |log| log.purge(upto.min(applied)));
        }
    }

    /// The driver wrote every write up to `id` durably (a snapshot in one is then applied).
    pub fn persisted(&mut self, id: u64) {
        while self.unwritten.front().is_some_and(|w| w.id <= id) {
            let written = self.unwritten.pop_front().expect("checked");
            for (group, number) in written.readies {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.raw.on_persist_ready(number);
                    self.active.insert(group);
                }
            }
            for (group, index) in written.snapshots {
                self.applied(group, index);
            }
            for (to, envelope) in written.held {
                self.outgoing.entry(to).or_default().push(envelope);
            }
        }
    }

    /// The data of the snapshot `group` took from its leader and has not yet handed out in a write.
    pub fn snapshot_taken(&self, group: GroupId) -> Option<&[u8]> {
        let g = self.groups.get(&group)?;
        g.raw.raft.raft_log.unstable.snapshot.as_ref().map(|s| &s.data[..])
    }

    /// A group's leadership as this node sees it.
    pub fn lead(&self, group: GroupId) -> Option<Lead> {
        self.groups.get(&group).map(|g| g.lead)
    }

    /// The voters of `group` (both halves of a joint configuration) and its learners.
    pub fn members(&self, group: GroupId) -> Option<(BTreeSet<NodeId>, BTreeSet<NodeId>)> {
        let g = self.groups.get(&group)?;
        let conf = g.raw.raft.prs().conf();
        Some((conf.voters().ids().iter().collect(), conf.learners().iter().copied().collect()))
    }

    /// On `group`'s leader: each member's matched index (empty elsewhere).
    pub fn matched(&self, group: GroupId) -> BTreeMap<NodeId, u64> {
        let Some(g) = self.groups.get(&group).filter(|g| g.raw.raft.state == StateRole::Leader) else {
            return BTreeMap::new();
        };
        g.raw.raft.prs().iter().map(|(&id, progress)| (id, progress.matched)).collect()
    }

    /// `group`'s log: (first index, last index, committed index, applied index).
    pub fn log_state(&self, group: GroupId) -> Option<(u64, u64, u64, u64)> {
        let g = self.groups.get(&group)?;
        let log = &g.raw.raft.raft_log;
        Some((log.first_index(), log.last_index(), log.committed, log.applied))
    }

    /// Bytes of log entries the engine holds in memory, over all groups.
    pub fn mem_bytes(&self) -> u64 {
        debug_assert_eq!(self.mem_held, self.groups.values().map(|g| g.raw.store().mem_bytes()).sum::<u64>());
        self.mem_held
    }

    /// How many appends this engine dropped because their entries did not fit in memory.
    pub fn appends_dropped(&self) -> u64 {
        self.appends_dropped
    }

    /// Whether `bytes` more of log entries fit within [`EngineConfig::max_mem_bytes`] (always,
    /// when nothing is held). If not, every group's durable entries leave memory first, applied
    /// or not (they are read back from the log when they are applied or sent): then only
    /// entries still being written are held, and those leave once written, so a node that
    /// refuses appends to stay within the bound always gets room again without any peer's help.
    fn make_room(&mut self, bytes: u64) -> bool {
        let max = self.config.max_mem_bytes;
        let fits = |held: u64| held == 0 || held + bytes <= max;
        if fits(self.mem_held) {
            return true;
        }
        for g in self.groups.values_mut().filter(|g| g.raw.store().mem_bytes() > 0) {
            let persisted = g.raw.raft.raft_log.persisted;
            tracked(&mut self.mem_held, g.raw.mut_store(), |log| log.evict(persisted));
        }
        fits(self.mem_held)
    }

    /// Tells the leaders whose appends were dropped here to send again, once half of the memory
    /// bound is free. A dropped append is otherwise sent again only after the leader's next
    /// heartbeat has its answer (a second, `heartbeat_ticks`): a follower catching up on large
    /// entries, whose leader sends many messages ahead, could wait that long for each drop.
    /// The word is a heartbeat's answer: it resumes the leader's sending to this follower, which
    /// then finds where the follower's log ends as after any lost append.
    fn answer_dropped(&mut self) {
        if self.dropped.is_empty() || !self.make_room(self.config.max_mem_bytes / 2) {
            return;
        }
        for (group, (leader, term)) in mem::take(&mut self.dropped) {
            let Some(g) = self.groups.get(&group) else { continue };
            let raft = &g.raw.raft;
            if raft.state != StateRole::Follower || raft.term != term || raft.leader_id != leader {
                continue;
            }
            let mut message = Message::default();
            message.set_msg_type(MessageType::MsgHeartbeatResponse);
            message.from = self.me;
            message.to = leader;
            message.term = term;
            message.commit = raft.raft_log.committed;
            self.outgoing.entry(leader).or_default().push(Envelope { group, message });
        }
    }

    /// Collects what every group has to hand out. Call until it returns an empty output.
    pub fn output(&mut self) -> Output {
        self.answer_dropped();
        let mut out = Output::default();
        let mut writes = Vec::new();
        let mut readies = Vec::new();
        let mut held = Vec::new();
        let mut snapshots = Vec::new();
        // Bytes of entries this output hands out (to apply, or in messages): past the bound, the
        // groups left wait for the next output. Entries that left memory are read back from the
        // log for both, and a round in which many groups catch up would otherwise hold them all.
        // Each output starts where the last one stopped, so no group waits behind the others.
        let mut handed = 0u64;
        let mut active = mem::take(&mut self.active);
        let from = mem::take(&mut self.output_from);
        let later = active.split_off(&from);
        for group in later.into_iter().chain(active) {
            if handed >= self.config.max_apply_bytes {
                if self.output_from == 0 {
                    self.output_from = group;
                }
                self.active.insert(group);
                continue;
            }
            let Some(g) = self.groups.get_mut(&group) else { continue };
            if !g.raw.has_ready() {
                continue;
            }
            let mut rd = g.raw.ready();
            for read in rd.take_read_states() {
                out.reads.push((group, read));
            }
            let snapshot = (!rd.snapshot().is_empty()).then(|| rd.snapshot().clone());
            if let Some(snapshot) = &snapshot {
                g.confs.clear();
                snapshots.push((group, snapshot.get_metadata().index));
            }
            let entries = rd.take_entries();
            tracked(&mut self.mem_held, g.raw.mut_store(), |log| {
                if let Some(snapshot) = &snapshot {
                    log.apply_snapshot(snapshot);
                }
                log.append(&entries);
            });
            let hard_state = rd.hs().cloned();
            if let Some(hs) = &hard_state {
                g.raw.mut_store().set_hard_state(hs.clone());
            }
            for message in rd.take_messages() {
                handed += message.entries.iter().map(log::entry_bytes).sum::<u64>();
                out.messages.entry(message.to).or_default().push(Envelope { group, message });
            }
            for message in rd.take_persisted_messages() {
                held.push((message.to, Envelope { group, message }));
            }
            let committed = rd.take_committed_entries();
            handed += committed.iter().map(log::entry_bytes).sum::<u64>();
            if snapshot.is_some() || !entries.is_empty() || hard_state.is_some() {
                writes.push(GroupWrite { group, snapshot, entries, hard_state });
            }
            readies.push((group, rd.number()));
            g.raw.advance_append_async(rd);
            if !committed.is_empty() {
                let conf_states = apply_conf_changes(group, &mut g.raw, &committed);
                g.confs.extend(conf_states.iter().cloned());
                let raft = &g.raw.raft;
                let leader = raft.leader_id;
                if !conf_states.is_empty()
                    && raft.state == StateRole::Follower
                    && leader != raft::INVALID_ID
                    && !raft.prs().conf().voters().contains(leader)
                {
                    // The change left the leader out: it hands over with TimeoutNow, which its
                    // heir ignores while it has the change to apply, so each voter also
                    // campaigns after its rank's wait, as when the leader's node is lost.
                    g.campaign_without(group, self.me, leader, self.ticks + 1, self.config.campaign_stagger_ticks);
                }
                out.committed.push(Committed { group, entries: committed, conf_states });
            }
            self.settle(group);
        }
        for (to, envelopes) in mem::take(&mut self.outgoing) {
            out.messages.entry(to).or_default().extend(envelopes);
        }
        if !readies.is_empty() {
            let id = self.next_write;
            self.next_write += 1;
            if writes.is_empty() && self.unwritten.is_empty() {
                // Nothing to make durable, nothing before it: done at once.
                for (group, number) in readies {
                    if let Some(g) = self.groups.get_mut(&group) {
                        g.raw.on_persist_ready(number);
                        self.active.insert(group);
                    }
                }
                for (to, envelope) in held {
                    out.messages.entry(to).or_default().push(envelope);
                }
            } else {
                self.unwritten.push_back(Unwritten { id, readies, snapshots, held });
                out.write = Some(Write { id, groups: writes });
            }
        }
        out.changed = mem::take(&mut self.changed).into_iter().collect();
        out
    }
}

/// Whether the group is in a joint configuration (two voter sets, between two configurations).
fn joint(raft: &raft::Raft<GroupLog>) -> bool {
    !raft.prs().conf().to_conf_state().voters_outgoing.is_empty()
}

/// On a leader in a joint configuration that nothing is leaving: proposes leaving it. raft-rs
/// leaves one by itself only when the leader that applies it is the one that entered it; a
/// leader elected in between (a transfer, a lost leader) would stay joint, refusing every later
/// change (raft-rs says as much in `commit_apply`).
fn leave_joint(group: GroupId, raw: &mut RawNode<GroupLog>) {
    let raft = &raw.raft;
    if raft.state == StateRole::Leader && joint(raft) && !raft.has_pending_conf() {
        tracing::info!(target: "grex::raft", group, "leaving a joint configuration that no leader had left");
        let _ = raw.propose_conf_change(Vec::new(), ConfChangeV2::default());
    }
}

/// Applies the configuration changes among `entries` to the group; returns the configuration
/// after each.
fn apply_conf_changes(group: GroupId, raw: &mut RawNode<GroupLog>, entries: &[Entry]) -> Vec<(u64, ConfState)> {
    let mut confs = Vec::new();
    for entry in entries {
        let change = match entry.get_entry_type() {
            EntryType::EntryNormal => continue,
            _ if entry.data.len() > CONF_CHANGE_BYTES_MAX => {
                Err(protobuf::ProtobufError::WireError(protobuf::error::WireError::Other))
            }
            // Grex proposes only version 2 changes.
            EntryType::EntryConfChange => Err(protobuf::ProtobufError::WireError(protobuf::error::WireError::Other)),
            EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(&entry.data),
        };
        match change.map_err(anyhow::Error::from).and_then(|c| raw.apply_conf_change(&c).map_err(Into::into)) {
            Ok(conf) => confs.push((entry.index, conf)),
            Err(e) => tracing::error!(group, index = entry.index, "configuration change not applied: {e}"),
        }
    }
    if !confs.is_empty() {
        hand_over_if_removed(raw);
    }
    confs
}

/// A leader that a configuration change left out of its group steps down at once, and tells
/// the voter with the longest log to campaign now (raft-rs would keep it leading a group it is
/// not in, and cannot commit there: it has no progress of its own). If that voter cannot run yet
/// (it has a configuration change to apply), the voters campaign once they applied it (see
/// `Engine::output`).
fn hand_over_if_removed(raw: &mut RawNode<GroupLog>) {
    let raft = &raw.raft;
    let me = raft.id;
    if raft.state != StateRole::Leader || raft.prs().conf().voters().contains(me) {
        return;
    }
    let heir = raft
        .prs()
        .iter()
        .filter(|&(&id, _)| id != me && raft.prs().conf().voters().contains(id))
        .max_by_key(|&(&id, progress)| (progress.matched, std::cmp::Reverse(id)))
        .map(|(&id, _)| id);
    let term = raft.term;
    if let Some(heir) = heir {
        raw.raft.send_timeout_now(heir);
    }
    raw.raft.become_follower(term, raft::INVALID_ID);
}

/// A leader counts a snapshot as lost when its follower has waited for it `patience` ticks.
fn expire_snapshots(g: &mut Group, now: u64, patience: u64) {
    if g.raw.raft.state != StateRole::Leader {
        g.snapshots.clear();
        return;
    }
    let waiting: Vec<NodeId> =
        g.raw.raft.prs().iter().filter(|(_, p)| p.state == raft::ProgressState::Snapshot).map(|(&id, _)| id).collect();
    g.snapshots.retain(|id, _| waiting.contains(id));
    for id in waiting {
        let since = *g.snapshots.entry(id).or_insert(now);
        if now - since >= patience {
            g.snapshots.remove(&id);
            g.raw.report_snapshot(id, SnapshotStatus::Failure);
        }
    }
}

/// Which place in the order of campaigns `me` takes in `group` among `voters` (0 goes first).
/// A hash of group and node spreads first places over the nodes.
fn campaign_rank(group: GroupId, me: NodeId, voters: &[NodeId]) -> u64 {
    let key =
        |node: NodeId| xxhash_rust::xxh3::xxh3_64(&[group.to_le_bytes().as_slice(), &node.to_le_bytes()].concat());
    let mine = key(me);
    voters.iter().filter(|&&v| v != me && key(v) < mine).count() as u64
}
