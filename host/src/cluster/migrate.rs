//! Forward migration of a node's data directory from storage schemas 3, 4 and 5 to the current
//! one (6), run by `grex serve` before the node opens its store.
//!
//! What changed, and what each step does:
//!
//! - **Schema 3 and early schema 4 ran openraft**: a group's log entries carried openraft's log ids
//!   (a term *and* a leader's node id: openraft lets two leaders share a term) and the state held
//!   `(applied log id, membership)`. Later schema 4 and schema 5 ran raft-rs, as today, with the
//!   log in a redb file; schema 6 keeps it in segments. Which of the two a directory holds is read
//!   from its values' names (`vote` for openraft, `hard_state` for raft-rs).
//! - **Each group's log restarts at its applied point.** The state holds every entry up to it, so
//!   the new log's base is (applied index, applied term) with the membership of that point, and
//!   the hard state keeps the term and vote (the commit is at least the applied index). Entries
//!   after the applied point (a tail) are kept as they are when they are raft-rs entries whose
//!   commands this version reads. An openraft tail is refused: its entries' terms do not say which
//!   leader wrote them, so raft-rs could take two different entries for the same one. A node
//!   stopped cleanly has applied its log (a leader commits and applies what it appended within
//!   milliseconds), so a tail is rare; the refusal says what to do.
//!   Why this is safe: every node's log still ends at the same (index, term) as before, so the
//!   election rule (a voter grants its vote only to a log at least as up to date as its own)
//!   keeps every committed entry as it did; entries before the base reach a lagging peer by
//!   snapshot, in the current format.
//! - **The meta state** is re-encoded in the current layout (schema 3 kept no Redis address).
//! - **Schema 3 cut buckets into flocks by `xxh3 mod F`; schema 4 on by Redis hash slots.** A
//!   schema-3 directory of a one-member cluster is re-filed bucket by bucket (that node holds
//!   every flock). One of a larger cluster is refused: no single node holds every bucket of a new
//!   flock, so the members cannot be migrated one at a time.
//!
//! The storage part (where older schemas kept their values, and the crash-safe rewrite) is
//! `storage::legacy`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, bail};
use raft::prelude::EntryType;
use serde::Deserialize;

use super::consensus::{APPLIED_KEY, BASE_KEY, Command, HARD_STATE_KEY, META_STATE_KEY};
use super::meta::MetaState;
use super::wire::{self, AppliedPoint, WireConf, WireEntry, WireHardState};
use super::{NodeId, parse_node_id};
use crate::storage::{GroupId, LegacyStore, LogOp, META_GROUP, Refile, Rewrite, SCHEMA_VERSION, ValueKind};

/// openraft's log id: the leader that proposed the entry (term, node) and the index.
#[derive(Clone, Copy, Debug, Deserialize)]
struct OpenraftLogId {
    term: u64,
    _node_id: u64,
    index: u64,
}

/// openraft's vote: the leader (term, node) this node last voted for or knows, and whether a
/// quorum granted it.
#[derive(Deserialize)]
struct OpenraftVote {
    term: u64,
    node_id: u64,
    _committed: bool,
}

/// openraft's membership: one configuration of voters (two while joint), and every member with
/// its addresses (those in no configuration are learners). The addresses are read as strings:
/// schema 3 kept three, schema 4 four.
#[derive(Deserialize)]
struct OpenraftMembership<Addresses> {
    _log_id: Option<OpenraftLogId>,
    configs: Vec<BTreeSet<u64>>,
    nodes: BTreeMap<u64, Addresses>,
}

/// What a directory's groups were run by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Era {
    Openraft,
    RaftRs,
}

/// Migrates the data directory's state file at `path` (and its logs) to the current schema, if
/// it holds an older one. Returns the schema it found, if it migrated.
pub fn forward(path: &Path) -> anyhow::Result<Option<u32>> {
    let Some(old) = LegacyStore::open(path).with_context(|| format!("cannot open {}", path.display()))? else {
        return Ok(None);
    };
    let schema = old.schema();
    let me = parse_node_id(&old.node_meta().node_id)?;
    let flock_count = old.node_meta().flock_count;
    tracing::info!(schema, to = SCHEMA_VERSION, path = %path.display(), "migrating the data directory");
    let values = old.values()?;
    let era = if values.keys().any(|(_, _, name)| name == HARD_STATE_KEY) { Era::RaftRs } else { Era::Openraft };
    let groups: BTreeSet<GroupId> = values.keys().map(|(group, _, _)| *group).collect();
    let value = |group: GroupId, kind: ValueKind, name: &str| values.get(&(group, kind, name.to_string()));

    // Each group's applied point and hard state, read in its era's form.
    let mut points: BTreeMap<GroupId, (AppliedPoint, WireHardState)> = BTreeMap::new();
    for &group in &groups {
        let (applied, hard) = match era {
            Era::RaftRs => {
                let applied: AppliedPoint = match value(group, ValueKind::State, APPLIED_KEY) {
                    Some(bytes) => {
                        wire::decode(bytes).map_err(|e| anyhow::anyhow!("group {group}'s applied point: {e}"))?
                    }
                    None => AppliedPoint::default(),
                };
                let hard: WireHardState = match value(group, ValueKind::Log, HARD_STATE_KEY) {
                    Some(bytes) => {
                        wire::decode(bytes).map_err(|e| anyhow::anyhow!("group {group}'s hard state: {e}"))?
                    }
                    None => WireHardState::default(),
                };
                (applied, hard)
            }
            Era::Openraft => openraft_point(
                group,
                value(group, ValueKind::State, APPLIED_KEY),
                value(group, ValueKind::Log, "vote"),
            )?,
        };
        points.insert(group, (applied, hard));
    }

    // Entries past each applied point.
    let after: BTreeMap<GroupId, u64> = points.iter().map(|(&group, (applied, _))| (group, applied.index)).collect();
    let tails = old.entries_after(&after)?;
    let mut log = Vec::new();
    for (&group, (applied, hard)) in &points {
        let tail = tails.get(&group).map(Vec::as_slice).unwrap_or_default();
        if !tail.is_empty() {
            if era == Era::Openraft {
                bail!(
                    "{}: group {} holds {} log entries it has not applied (from index {}), written by openraft, which \
                     this version cannot take over; start this directory once more with the grex version that wrote \
                     it, together with the rest of its cluster, until it has applied them, stop it with SIGTERM, then \
                     start this version",
                    path.display(),
                    group_name(group),
                    tail.len(),
                    tail[0].0
                );
            }
            check_tail(group, tail).with_context(|| {
                format!(
                    "{}: group {} holds entries past its applied point that this version cannot read; start this \
                     directory once more with the grex version that wrote it until it has applied them, then this one",
                    path.display(),
                    group_name(group)
                )
            })?;
        }
        let hard = WireHardState { commit: hard.commit.max(applied.index), ..*hard };
        log.push(LogOp::PutLogState { group, key: HARD_STATE_KEY, value: wire::encode(&hard) });
        log.push(LogOp::PutLogState { group, key: BASE_KEY, value: wire::encode(&(applied.index, applied.term)) });
        if !tail.is_empty() {
            log.push(LogOp::Append { group, entries: tail.iter().map(|(i, e)| (*i, e.clone().into())).collect() });
        }
    }

    let mut state: Vec<(GroupId, &'static str, Vec<u8>)> = points
        .iter()
        .filter(|(_, (applied, _))| applied.index > 0)
        .map(|(&group, (applied, _))| (group, APPLIED_KEY, wire::encode(applied)))
        .collect();
    let meta_state = match value(META_GROUP, ValueKind::State, META_STATE_KEY)
        .or_else(|| value(META_GROUP, ValueKind::Log, META_STATE_KEY))
    {
        Some(bytes) => Some(MetaState::decode(bytes).map_err(|e| anyhow::anyhow!("the stored meta state: {e}"))?),
        None => None,
    };
    if let Some(meta) = &meta_state {
        state.push((META_GROUP, META_STATE_KEY, wire::encode(meta)));
    }

    let refile: Option<Refile> = if schema == 3 {
        let members: Vec<NodeId> = meta_state.as_ref().map(|m| m.nodes.keys().copied().collect()).unwrap_or_default();
        if members.iter().any(|&member| member != me) {
            bail!(
                "{}: schema 3 cut buckets into flocks by another hash than this version, and this directory belongs to \
                 a cluster of {} members: no member holds every bucket of a flock as this version cuts them, so the \
                 members cannot be migrated one at a time. Serve it with the grex version that wrote it, or start \
                 this version on new --data directories and copy the data over with a client",
                path.display(),
                members.len()
            );
        }
        Some(Box::new(move |bucket: &[u8]| crate::data::flock_of(bucket, flock_count)))
    } else {
        None
    };

    old.rewrite(Rewrite { log, state, refile })
        .with_context(|| format!("cannot migrate {} from schema {schema}", path.display()))?;
    tracing::info!(schema, to = SCHEMA_VERSION, groups = points.len(), ?era, "migrated the data directory");
    Ok(Some(schema))
}

/// A group's name in messages.
fn group_name(group: GroupId) -> String {
    if group == META_GROUP { "meta".into() } else { format!("flock {group}") }
}

/// A group's applied point and hard state from openraft's `(applied log id, membership)` and vote.
fn openraft_point(
    group: GroupId,
    applied: Option<&Vec<u8>>,
    vote: Option<&Vec<u8>>,
) -> anyhow::Result<(AppliedPoint, WireHardState)> {
    let mut point = AppliedPoint::default();
    if let Some(bytes) = applied {
        // The membership's addresses: three strings (schema 3) or four (schema 4).
        let (log_id, configs, nodes): (Option<OpenraftLogId>, Vec<BTreeSet<u64>>, BTreeSet<u64>) =
            if let Ok((log_id, m)) =
                wire::decode_whole::<(Option<OpenraftLogId>, OpenraftMembership<(String, String, String)>)>(bytes)
            {
                (log_id, m.configs, m.nodes.into_keys().collect())
            } else if let Ok((log_id, m)) = wire::decode_whole::<(
                Option<OpenraftLogId>,
                OpenraftMembership<(String, String, String, String)>,
            )>(bytes)
            {
                (log_id, m.configs, m.nodes.into_keys().collect())
            } else {
                bail!("group {}'s applied point is not openraft's as grex stored it", group_name(group));
            };
        let voters = match configs.as_slice() {
            [] => BTreeSet::new(),
            [voters] => voters.clone(),
            _ => bail!(
                "group {} was changing its membership (a joint configuration) when it stopped; start it once more \
                 with the grex version that wrote it until the change is done",
                group_name(group)
            ),
        };
        let learners = nodes.difference(&voters).copied().collect();
        if let Some(log_id) = log_id {
            point = AppliedPoint {
                index: log_id.index,
                term: log_id.term,
                conf: WireConf { voters: voters.into_iter().collect(), learners, ..WireConf::default() },
            };
        }
    }
    let mut hard = WireHardState { term: point.term, vote: 0, commit: point.index };
    if let Some(bytes) = vote {
        let vote: OpenraftVote = wire::decode_whole(bytes)
            .ok()
            .ok_or_else(|| anyhow::anyhow!("group {}'s vote is not openraft's as grex stored it", group_name(group)))?;
        if vote.term >= hard.term {
            hard.term = vote.term;
            hard.vote = vote.node_id;
        }
    }
    Ok((point, hard))
}

/// Checks that this version reads every entry of a raft-rs tail.
fn check_tail(group: GroupId, tail: &[(u64, Vec<u8>)]) -> anyhow::Result<()> {
    for (index, bytes) in tail {
        let entry: WireEntry = wire::decode(bytes).map_err(|e| anyhow::anyhow!("entry {index}: {e}"))?;
        if entry.kind == EntryType::EntryNormal as i32 && !entry.data.is_empty() {
            let command: Command =
                wire::decode(&entry.data).map_err(|e| anyhow::anyhow!("entry {index}'s command: {e}"))?;
            if matches!(command, Command::Change(_)) == (group == META_GROUP) {
                bail!("entry {index} holds a command of another kind of group");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use raft::prelude::EntryType;

    use super::*;
    use crate::storage::legacy_testing::OldDirectory;
    use crate::storage::{LogRead, RedbStore, Store};

    const ME: u64 = 0x0102_0304_0506_0708;

    /// openraft's `(applied log id, membership)` as grex stored it: log id (term, node, index),
    /// then the membership's log id, configurations and members with three addresses (schema 3).
    type OpenraftApplied = (
        Option<(u64, u64, u64)>,
        (Option<(u64, u64, u64)>, Vec<BTreeSet<u64>>, BTreeMap<u64, (String, String, String)>),
    );

    fn openraft_applied(term: u64, index: u64, voters: &[u64], members: &[u64]) -> Vec<u8> {
        let log_id = Some((term, ME, index));
        let nodes = members.iter().map(|&m| (m, (format!("peer{m}"), String::new(), String::new()))).collect();
        let value: OpenraftApplied = (log_id, (log_id, vec![voters.iter().copied().collect()], nodes));
        wire::encode(&value)
    }

    fn raft_rs_entry(term: u64, index: u64) -> Vec<u8> {
        wire::encode(&WireEntry { kind: EntryType::EntryNormal as i32, term, index, data: bytes::Bytes::new() })
    }

    fn state_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join("grex.redb")
    }

    #[test]
    fn openraft_groups_restart_at_their_applied_point_with_their_vote_and_a_lone_node_refiles_its_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_file(&dir);
        let (a, b, c, d) = (11, 12, ME, 13);
        // Meta state of schema 3: one member (this node), addresses without Redis.
        type MetaStateV3 = (BTreeMap<u64, (String, String, String)>, (u64, Vec<Vec<u64>>));
        let meta: MetaStateV3 =
            ([(ME, ("p".to_string(), "h".to_string(), "q".to_string()))].into(), (1, vec![vec![ME]; 4]));
        // Two buckets filed under flocks of another hash.
        let keys: Vec<Vec<u8>> = (0..40).map(|i| format!("customer-{i}").into_bytes()).collect();
        let misfiled = |key: &[u8]| (crate::data::flock_of(key, 4) + 1) % 4;
        OldDirectory {
            schema: 3,
            node_id: ME.to_be_bytes(),
            flocks: 4,
            state: vec![
                (0, "applied", openraft_applied(2, 7, &[a, b, c], &[a, b, c, d])),
                (META_GROUP, "applied", openraft_applied(1, 3, &[a], &[a])),
                (META_GROUP, "meta_state", wire::encode(&meta)),
            ],
            log_state: vec![(0, "vote", wire::encode(&(3u64, b, true)))],
            entries: (1..=7).map(|i| (0, i, vec![0xEE; 10])).collect(),
            buckets: keys.iter().map(|k| (misfiled(k), k.clone(), 1, vec![("n".into(), b"1".to_vec())])).collect(),
        }
        .write(&path);

        assert_eq!(forward(&path).unwrap(), Some(3));
        assert_eq!(forward(&path).unwrap(), None, "a migrated directory is current");
        let store = RedbStore::open(&path, 4, false).unwrap();
        let applied: AppliedPoint = wire::decode(&store.log_state(0, APPLIED_KEY).unwrap().unwrap()).unwrap();
        assert_eq!(
            applied,
            AppliedPoint {
                index: 7,
                term: 2,
                conf: WireConf { voters: vec![a, b, c], learners: vec![d], ..Default::default() }
            }
        );
        let hard: WireHardState = wire::decode(&store.log_state(0, HARD_STATE_KEY).unwrap().unwrap()).unwrap();
        assert_eq!(hard, WireHardState { term: 3, vote: b, commit: 7 });
        let base: (u64, u64) = wire::decode(&store.log_state(0, BASE_KEY).unwrap().unwrap()).unwrap();
        assert_eq!(base, (7, 2));
        assert!(
            store.log_entries(0, 0, u64::MAX, LogRead::count(100)).unwrap().is_empty(),
            "the applied entries are gone"
        );
        let meta = MetaState::decode(&store.log_state(META_GROUP, META_STATE_KEY).unwrap().unwrap()).unwrap();
        assert_eq!(meta.nodes[&ME].peer, "p");
        assert_eq!(meta.map.herders.len(), 4);
        for flock in 0..4 {
            for (key, bucket) in store.flock_buckets(flock).unwrap() {
                assert_eq!(
                    crate::data::flock_of(&key, 4),
                    flock,
                    "{} is filed under flock {flock}",
                    String::from_utf8_lossy(&key)
                );
                assert_eq!(bucket.version, 1);
            }
        }
        let filed: usize = (0..4).map(|f| store.flock_buckets(f).unwrap().len()).sum();
        assert_eq!(filed, keys.len());
        assert!(!dir.path().join("grex-log.redb").exists(), "the old log file is deleted");
    }

    #[test]
    fn an_openraft_log_past_the_applied_point_is_refused_and_the_directory_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_file(&dir);
        OldDirectory {
            schema: 4,
            node_id: ME.to_be_bytes(),
            flocks: 4,
            state: vec![(0, "applied", openraft_applied(2, 7, &[ME], &[ME]))],
            log_state: vec![(0, "vote", wire::encode(&(2u64, ME, true)))],
            entries: (1..=8).map(|i| (0, i, vec![0xEE; 10])).collect(),
            ..Default::default()
        }
        .write(&path);
        let error = forward(&path).unwrap_err().to_string();
        assert!(error.contains("flock 0 holds 1 log entries it has not applied (from index 8)"), "{error}");
        let old = LegacyStore::open(&path).unwrap().expect("still the old schema");
        assert_eq!(old.schema(), 4);
        assert_eq!(old.entries_after(&BTreeMap::new()).unwrap()[&0].len(), 8);
    }

    #[test]
    fn a_raft_rs_log_keeps_its_tail_after_a_base_at_the_applied_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_file(&dir);
        let applied = AppliedPoint { index: 3, term: 2, conf: WireConf { voters: vec![ME], ..Default::default() } };
        OldDirectory {
            schema: 5,
            node_id: ME.to_be_bytes(),
            flocks: 4,
            state: vec![(1, "applied", wire::encode(&applied))],
            log_state: vec![
                (1, "hard_state", wire::encode(&WireHardState { term: 2, vote: ME, commit: 2 })),
                (1, "base", wire::encode(&(0u64, 0u64))),
            ],
            entries: (1..=5).map(|i| (1, i, raft_rs_entry(2, i))).collect(),
            ..Default::default()
        }
        .write(&path);
        assert_eq!(forward(&path).unwrap(), Some(5));
        let store = RedbStore::open(&path, 4, false).unwrap();
        let kept: Vec<u64> =
            store.log_entries(1, 0, u64::MAX, LogRead::count(100)).unwrap().into_iter().map(|(i, _)| i).collect();
        assert_eq!(kept, [4, 5]);
        let hard: WireHardState = wire::decode(&store.log_state(1, HARD_STATE_KEY).unwrap().unwrap()).unwrap();
        assert_eq!(hard, WireHardState { term: 2, vote: ME, commit: 3 }, "the commit reaches the applied point");
        let base: (u64, u64) = wire::decode(&store.log_state(1, BASE_KEY).unwrap().unwrap()).unwrap();
        assert_eq!(base, (3, 2));
    }

    #[test]
    fn a_raft_rs_tail_this_version_cannot_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_file(&dir);
        let applied = AppliedPoint { index: 1, term: 1, conf: WireConf { voters: vec![ME], ..Default::default() } };
        let unreadable = wire::encode(&WireEntry {
            kind: EntryType::EntryNormal as i32,
            term: 1,
            index: 2,
            data: bytes::Bytes::from(vec![250, 1, 2]),
        });
        OldDirectory {
            schema: 5,
            node_id: ME.to_be_bytes(),
            flocks: 4,
            state: vec![(1, "applied", wire::encode(&applied))],
            log_state: vec![(1, "hard_state", wire::encode(&WireHardState { term: 1, vote: ME, commit: 2 }))],
            entries: vec![(1, 1, raft_rs_entry(1, 1)), (1, 2, unreadable)],
            ..Default::default()
        }
        .write(&path);
        let error = format!("{:#}", forward(&path).unwrap_err());
        assert!(
            error.contains("flock 1 holds entries past its applied point that this version cannot read"),
            "{error}"
        );
        assert_eq!(LegacyStore::open(&path).unwrap().expect("still old").schema(), 5);
    }
}
