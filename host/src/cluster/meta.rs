//! The meta state: what the meta group agrees on about the cluster itself (its members, their
//! addresses and lifecycle, and the flock map), and how each meta command changes it.
//!
//! A member's lifecycle: it joins (`AddNode`) and is *active*; `DrainNode` makes it *draining*
//! (placement gives its flocks to the active nodes, and the meta leader removes it once no group
//! counts it as a voter); `RemoveNode` makes it *removed*: no longer a member, and remembered so
//! that peers refuse it if it comes back. A removed machine rejoins only with a wiped data
//! directory, under a new id.
//!
//! The meta state also holds the cluster's users (`access`), so every node checks requests
//! against the same users.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::consensus::Command;
use super::placement::{FlockMap, Site};
use super::wire;
use super::{NodeId, PeerInfo, node_id_text};
use crate::access::Users;

/// The membership and node list the meta group agrees on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Every member and its addresses.
    pub nodes: BTreeMap<NodeId, PeerInfo>,
    /// Flock → herders.
    pub map: FlockMap,
    /// Members handing their flocks to the others before they leave.
    pub draining: BTreeSet<NodeId>,
    /// Former members, refused if they come back.
    pub removed: BTreeSet<NodeId>,
    /// Who may use the cluster, and how.
    pub users: Users,
}

/// The meta state as stored before users.
#[derive(Deserialize)]
struct MetaStateBeforeUsers {
    nodes: BTreeMap<NodeId, PeerInfo>,
    map: FlockMap,
    draining: BTreeSet<NodeId>,
    removed: BTreeSet<NodeId>,
}

/// The meta state as schema 6 stored it (before nodes could leave, or had zones).
#[derive(Deserialize)]
struct MetaStateV6 {
    nodes: BTreeMap<NodeId, PeerInfoV6>,
    map: FlockMap,
}

/// The meta state as schema 3 stored it: a node's addresses were peer, HTTP and QUIC.
#[derive(Deserialize)]
struct MetaStateV3 {
    nodes: BTreeMap<NodeId, (String, String, String)>,
    map: FlockMap,
}

/// A node's addresses as schema 6 stored them.
#[derive(Deserialize)]
struct PeerInfoV6 {
    peer: String,
    http: String,
    quic: String,
    resp: String,
}

impl MetaState {
    /// Decodes a stored meta state, of this layout or of the three before it.
    pub fn decode(bytes: &[u8]) -> Result<MetaState, String> {
        wire::decode_whole::<MetaState>(bytes).or_else(|newer| {
            if let Ok(MetaStateBeforeUsers { nodes, map, draining, removed }) = wire::decode_whole(bytes) {
                return Ok(MetaState { nodes, map, draining, removed, users: Users::new() });
            }
            if let Ok(old) = wire::decode_whole::<MetaStateV6>(bytes) {
                let nodes = old
                    .nodes
                    .into_iter()
                    .map(|(id, PeerInfoV6 { peer, http, quic, resp })| {
                        (id, PeerInfo { peer, http, quic, resp, ..PeerInfo::default() })
                    })
                    .collect();
                return Ok(MetaState { nodes, map: old.map, ..MetaState::default() });
            }
            let old: MetaStateV3 = wire::decode_whole(bytes).map_err(|_| newer)?;
            let nodes = old
                .nodes
                .into_iter()
                .map(|(id, (peer, http, quic))| (id, PeerInfo { peer, http, quic, ..PeerInfo::default() }))
                .collect();
            Ok(MetaState { nodes, map: old.map, ..MetaState::default() })
        })
    }

    /// The members that take flocks (neither draining nor removed), and where each stands.
    pub fn active(&self) -> BTreeMap<NodeId, Site> {
        self.nodes.iter().filter(|(n, _)| !self.draining.contains(n)).map(|(n, info)| (*n, info.site())).collect()
    }

    /// Applies a membership command (module and change-set commands are not the meta state's).
    pub fn apply(&mut self, command: Command) {
        match command {
            Command::AddNode { id, info } => {
                if self.removed.contains(&id) {
                    tracing::warn!(node = %node_id_text(id), "a removed node's addresses were not recorded");
                } else {
                    self.nodes.insert(id, info);
                }
            }
            Command::SetFlockMap(map) => {
                if map.version > self.map.version {
                    self.map = map;
                }
            }
            Command::DrainNode { id } => {
                if self.nodes.contains_key(&id) {
                    self.draining.insert(id);
                }
            }
            Command::RemoveNode { id } => {
                self.nodes.remove(&id);
                self.draining.remove(&id);
                self.removed.insert(id);
            }
            Command::ChangeUser(change) => change.apply(&mut self.users),
            Command::Change(_) | Command::PutModule { .. } | Command::DeleteModule { .. } => {
                tracing::error!("a data command reached the meta state; ignored")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(port: u16) -> PeerInfo {
        PeerInfo { peer: format!("127.0.0.1:{port}"), ..PeerInfo::default() }
    }

    #[test]
    fn a_meta_state_stored_before_nodes_could_leave_still_reads() {
        #[derive(Serialize)]
        struct Old<'a> {
            nodes: BTreeMap<NodeId, (&'a str, &'a str, &'a str, &'a str)>,
            map: &'a FlockMap,
        }
        let nodes = BTreeMap::from([(1, info(1)), (2, info(2))]);
        let old_nodes =
            nodes.iter().map(|(id, i)| (*id, (i.peer.as_str(), i.http.as_str(), i.quic.as_str(), i.resp.as_str())));
        let map = FlockMap { version: 3, herders: vec![vec![1, 2], vec![2, 1]] };
        let read = MetaState::decode(&wire::encode(&Old { nodes: old_nodes.collect(), map: &map })).unwrap();
        assert_eq!(read, MetaState { nodes, map, ..MetaState::default() });
        assert_eq!(read.nodes[&1].site(), Site::default(), "nodes of an older store share one zone, capacity 1");
        let v7 = MetaState { draining: BTreeSet::from([2]), removed: BTreeSet::from([7]), ..read };
        #[derive(Serialize)]
        struct V7<'a>(&'a BTreeMap<NodeId, PeerInfo>, &'a FlockMap, &'a BTreeSet<NodeId>, &'a BTreeSet<NodeId>);
        let stored_v7 = wire::encode(&V7(&v7.nodes, &v7.map, &v7.draining, &v7.removed));
        assert_eq!(MetaState::decode(&stored_v7).unwrap(), v7, "a state stored before users reads, with none");
        let record =
            crate::access::UserRecord { token_sha256: [7; 32], permissions: grex_client::Permissions::admin() };
        let now = MetaState { users: Users::from([("root".to_owned(), record)]), ..v7 };
        assert_eq!(MetaState::decode(&wire::encode(&now)).unwrap(), now);
    }

    #[test]
    fn a_removed_node_leaves_for_good_and_cannot_be_added_again() {
        let mut state = MetaState::default();
        for id in 1..=3 {
            state.apply(Command::AddNode { id, info: info(id as u16) });
        }
        state.apply(Command::DrainNode { id: 2 });
        state.apply(Command::DrainNode { id: 9 });
        assert_eq!(state.active().into_keys().collect::<BTreeSet<_>>(), BTreeSet::from([1, 3]));
        assert_eq!(state.draining, BTreeSet::from([2]), "only a member drains");
        state.apply(Command::RemoveNode { id: 2 });
        assert_eq!((state.nodes.len(), state.draining.len()), (2, 0));
        state.apply(Command::AddNode { id: 2, info: info(22) });
        assert!(!state.nodes.contains_key(&2), "a removed node stays out");
        assert_eq!(state.removed, BTreeSet::from([2]));
    }
}
