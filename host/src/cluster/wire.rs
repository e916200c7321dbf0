//! How consensus messages, log entries and configurations travel between peers and rest on disk:
//! serde mirrors of raft-rs's protobuf types, encoded with the project's bincode codec. Peer
//! bytes never reach the protobuf parser (protobuf 2's parser recurses on nested unknown fields);
//! only configuration-change entries, which the group's own leader made, are parsed by it, and
//! only under a size bound (`engine`).
//!
//! An entry's data (a change set or a meta command, serialized once by the leader that proposed
//! it) is carried as is: the same bytes are the log entry, the frame's payload and the
//! follower's stored record.

use bytes::Bytes;
use protobuf::ProtobufEnum;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot, SnapshotMetadata};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::storage::{GroupId, LogEntry};

/// The most bytes one decode may claim for its strings, byte strings and lists. Without a limit,
/// bytes that are not the value decoded (a stored value of an older layout, a damaged frame) can
/// name a length that aborts the process ("capacity overflow"); with one, they fail to decode.
/// It is far above any frame or stored value (a meta snapshot carries every module).
const DECODE_LIMIT: usize = 4 << 30;

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encodes a value with the project's codec.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, codec()).expect("in-memory encoding cannot fail")
}

/// [`encode`] into a buffer made for about `bytes`, so that a large value (a log entry, a change
/// set) is written once rather than copied each time the buffer would grow.
pub fn encode_sized<T: Serialize>(value: &T, bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes);
    bincode::serde::encode_into_std_write(value, &mut out, codec()).expect("in-memory encoding cannot fail");
    out
}

/// [`encode`] onto the end of `out` (a file, a page at a time).
pub fn encode_into<T: Serialize>(value: &T, out: &mut impl std::io::Write) -> std::io::Result<()> {
    bincode::serde::encode_into_std_write(value, out, codec()).map(|_| ()).map_err(std::io::Error::other)
}

/// Decodes the next value from `input`, reading no further than its end.
pub fn decode_from<T: serde::de::DeserializeOwned>(input: &mut impl std::io::Read) -> Result<T, String> {
    bincode::serde::decode_from_std_read(input, codec()).map_err(|e| e.to_string())
}

/// Decodes a value encoded by [`encode`].
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    bincode::serde::decode_from_slice(bytes, codec()).map(|(v, _)| v).map_err(|e| e.to_string())
}

/// [`decode`], failing unless the value takes every byte: where one of several layouts may have
/// written the bytes, a shorter layout can otherwise read a prefix of a longer one.
pub fn decode_whole<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, codec()).map_err(|e| e.to_string())?;
    if read == bytes.len() {
        Ok(value)
    } else {
        Err(format!("{} bytes were left over after the value", bytes.len() - read))
    }
}

/// A log entry on the wire and on disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireEntry {
    /// raft-rs's entry type (normal, configuration change).
    pub kind: i32,
    /// Term.
    pub term: u64,
    /// Index.
    pub index: u64,
    /// The payload, as its proposer serialized it: shared with raft-rs's entry, not copied, and
    /// written as a byte string (the same bytes as `serde_bytes`).
    pub data: Bytes,
}

impl WireEntry {
    /// About how many bytes it takes encoded.
    pub fn encoded_bytes(&self) -> usize {
        self.data.len() + 32
    }
}

/// A raft-rs entry as the log stores it: the encoding of its [`WireEntry`], in two parts so that
/// the payload is shared with the entry rather than copied before the log's write.
pub fn log_entry(entry: &Entry) -> LogEntry {
    /// What the encoding of a [`WireEntry`] starts with: its fields up to the payload's length.
    #[derive(Serialize)]
    struct Head {
        kind: i32,
        term: u64,
        index: u64,
        len: u64,
    }
    let head = Head {
        kind: entry.get_entry_type().value(),
        term: entry.term,
        index: entry.index,
        len: entry.data.len() as u64,
    };
    let mut buf = [0; LogEntry::HEAD_BYTES_MAX];
    let len = bincode::serde::encode_into_slice(&head, &mut buf, codec()).expect("four integers fit in 32 bytes");
    LogEntry::new(&buf[..len], entry.data.clone())
}

impl From<&Entry> for WireEntry {
    fn from(entry: &Entry) -> Self {
        WireEntry {
            kind: entry.get_entry_type().value(),
            term: entry.term,
            index: entry.index,
            data: entry.data.clone(),
        }
    }
}

impl TryFrom<WireEntry> for Entry {
    type Error = String;

    fn try_from(wire: WireEntry) -> Result<Entry, String> {
        let kind = EntryType::from_i32(wire.kind).ok_or_else(|| format!("unknown entry type {}", wire.kind))?;
        let mut entry = Entry { term: wire.term, index: wire.index, data: wire.data, ..Default::default() };
        entry.set_entry_type(kind);
        Ok(entry)
    }
}

/// A group's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireConf {
    /// Voters (of the incoming half, in a joint configuration).
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Voters of the outgoing half of a joint configuration.
    pub voters_outgoing: Vec<u64>,
    /// Learners that become so when the joint configuration is left.
    pub learners_next: Vec<u64>,
    /// The joint configuration is left automatically.
    pub auto_leave: bool,
}

impl From<&ConfState> for WireConf {
    fn from(c: &ConfState) -> Self {
        WireConf {
            voters: c.voters.clone(),
            learners: c.learners.clone(),
            voters_outgoing: c.voters_outgoing.clone(),
            learners_next: c.learners_next.clone(),
            auto_leave: c.auto_leave,
        }
    }
}

impl From<WireConf> for ConfState {
    fn from(c: WireConf) -> Self {
        ConfState {
            voters: c.voters,
            learners: c.learners,
            voters_outgoing: c.voters_outgoing,
            learners_next: c.learners_next,
            auto_leave: c.auto_leave,
            ..Default::default()
        }
    }
}

/// A group's applied point: what a snapshot taken there holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedPoint {
    /// Last applied index.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// The configuration there.
    pub conf: WireConf,
}

impl AppliedPoint {
    /// As raft-rs's snapshot metadata.
    pub fn metadata(&self) -> SnapshotMetadata {
        SnapshotMetadata {
            index: self.index,
            term: self.term,
            conf_state: Some(ConfState::from(self.conf.clone())).into(),
            ..Default::default()
        }
    }

    /// From raft-rs's snapshot metadata.
    pub fn of(meta: &SnapshotMetadata) -> AppliedPoint {
        AppliedPoint { index: meta.index, term: meta.term, conf: WireConf::from(meta.get_conf_state()) }
    }
}

/// A group's hard state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireHardState {
    /// Current term.
    pub term: u64,
    /// Vote in it (0: none).
    pub vote: u64,
    /// Commit index.
    pub commit: u64,
}

impl From<&HardState> for WireHardState {
    fn from(h: &HardState) -> Self {
        WireHardState { term: h.term, vote: h.vote, commit: h.commit }
    }
}

impl From<WireHardState> for HardState {
    fn from(h: WireHardState) -> Self {
        HardState { term: h.term, vote: h.vote, commit: h.commit, ..Default::default() }
    }
}

/// One group's consensus message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RaftMessage {
    /// The group.
    pub group: GroupId,
    /// raft-rs's message type.
    pub kind: i32,
    /// Receiver.
    pub to: u64,
    /// Sender.
    pub from: u64,
    /// Sender's term.
    pub term: u64,
    /// Term of the entry before `entries` (or of the candidate's last entry).
    pub log_term: u64,
    /// Index of that entry.
    pub index: u64,
    /// Entries.
    pub entries: Vec<WireEntry>,
    /// The sender's commit index.
    pub commit: u64,
    /// Term of the commit index (votes).
    pub commit_term: u64,
    /// A snapshot's metadata (its data travels in chunks beside the message).
    pub snapshot: Option<AppliedPoint>,
    /// A follower asks for a snapshot from this index.
    pub request_snapshot: u64,
    /// Refused.
    pub reject: bool,
    /// Where the refusing follower's log ends.
    pub reject_hint: u64,
    /// Read-index and campaign context.
    pub context: ByteBuf,
    /// Election priority.
    pub priority: i64,
}

impl RaftMessage {
    /// About how many bytes it takes encoded.
    pub fn encoded_bytes(&self) -> usize {
        64 + self.context.len() + self.entries.iter().map(WireEntry::encoded_bytes).sum::<usize>()
    }

    /// A message of `group` as it travels.
    pub fn of(group: GroupId, m: &Message) -> RaftMessage {
        let snapshot = m.snapshot.as_ref().map(|s| AppliedPoint::of(s.get_metadata()));
        RaftMessage {
            group,
            kind: m.get_msg_type().value(),
            to: m.to,
            from: m.from,
            term: m.term,
            log_term: m.log_term,
            index: m.index,
            entries: m.entries.iter().map(WireEntry::from).collect(),
            commit: m.commit,
            commit_term: m.commit_term,
            snapshot,
            request_snapshot: m.request_snapshot,
            reject: m.reject,
            reject_hint: m.reject_hint,
            context: ByteBuf::from(m.context.to_vec()),
            priority: m.priority,
        }
    }

    /// The message for raft-rs, with a snapshot's data if it carries one.
    pub fn into_message(self, snapshot_data: Option<Vec<u8>>) -> Result<(GroupId, Message), String> {
        let kind = MessageType::from_i32(self.kind).ok_or_else(|| format!("unknown message type {}", self.kind))?;
        let entries = self.entries.into_iter().map(Entry::try_from).collect::<Result<Vec<_>, _>>()?;
        let mut m = Message {
            to: self.to,
            from: self.from,
            term: self.term,
            log_term: self.log_term,
            index: self.index,
            entries: entries.into(),
            commit: self.commit,
            commit_term: self.commit_term,
            request_snapshot: self.request_snapshot,
            reject: self.reject,
            reject_hint: self.reject_hint,
            context: Bytes::from(self.context.into_vec()),
            priority: self.priority,
            ..Default::default()
        };
        m.set_msg_type(kind);
        if let Some(point) = self.snapshot {
            let data = Bytes::from(snapshot_data.unwrap_or_default());
            m.snapshot = Some(Snapshot { data, metadata: Some(point.metadata()).into(), ..Default::default() }).into();
        }
        Ok((self.group, m))
    }

    /// Whether this is a snapshot (whose data is sent separately).
    pub fn is_snapshot(&self) -> bool {
        self.kind == MessageType::MsgSnapshot.value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_as_the_log_stores_it_is_its_wire_encoding() {
        for (term, index, data) in
            [(1, 1, Vec::new()), (3, 9, b"change".to_vec()), (u64::MAX, u64::MAX, vec![7; 70_000])]
        {
            let mut entry = Entry { term, index, data: Bytes::from(data), ..Default::default() };
            for kind in [EntryType::EntryNormal, EntryType::EntryConfChangeV2] {
                entry.set_entry_type(kind);
                assert_eq!(log_entry(&entry).to_vec(), encode(&WireEntry::from(&entry)), "{term} {index} {kind:?}");
            }
        }
    }

    #[test]
    fn an_entry_keeps_the_encoding_that_logs_and_peers_of_earlier_releases_hold() {
        #[derive(Serialize, Deserialize)]
        struct Earlier {
            kind: i32,
            term: u64,
            index: u64,
            data: ByteBuf,
        }
        let earlier = encode(&Earlier { kind: 0, term: 3, index: 9, data: ByteBuf::from(vec![7; 300]) });
        let entry = WireEntry { kind: 0, term: 3, index: 9, data: Bytes::from(vec![7; 300]) };
        assert_eq!(encode(&entry), earlier);
        let read: WireEntry = decode(&earlier).unwrap();
        assert_eq!((read.term, read.index, read.data), (3, 9, entry.data));
    }

    #[test]
    fn a_message_with_entries_and_a_snapshot_survives_the_wire() {
        let mut entry = Entry { term: 3, index: 9, data: Bytes::from_static(b"change"), ..Default::default() };
        entry.set_entry_type(EntryType::EntryConfChangeV2);
        let conf = ConfState { voters: vec![1, 2], learners: vec![3], ..Default::default() };
        let meta = SnapshotMetadata { index: 8, term: 2, conf_state: Some(conf.clone()).into(), ..Default::default() };
        let mut m = Message {
            to: 2,
            from: 1,
            term: 3,
            log_term: 2,
            index: 8,
            entries: vec![entry.clone()].into(),
            commit: 7,
            context: Bytes::from_static(b"ctx"),
            ..Default::default()
        };
        m.set_msg_type(MessageType::MsgSnapshot);
        m.snapshot = Some(Snapshot { metadata: Some(meta).into(), ..Default::default() }).into();
        let wire: RaftMessage = decode(&encode(&RaftMessage::of(5, &m))).unwrap();
        assert!(wire.is_snapshot());
        let (group, back) = wire.into_message(Some(b"data".to_vec())).unwrap();
        assert_eq!(group, 5);
        assert_eq!(back.get_msg_type(), MessageType::MsgSnapshot);
        assert_eq!((back.to, back.from, back.term, back.log_term, back.index, back.commit), (2, 1, 3, 2, 8, 7));
        assert_eq!(back.entries[0], entry);
        assert_eq!(back.get_snapshot().get_metadata().get_conf_state(), &conf);
        assert_eq!(&back.get_snapshot().data[..], b"data");
        assert_eq!(&back.context[..], b"ctx");
    }

    #[test]
    fn an_unknown_message_type_is_refused() {
        let mut wire = RaftMessage::of(1, &Message::default());
        wire.kind = 99;
        assert!(wire.into_message(None).is_err());
    }
}
