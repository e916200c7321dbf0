//! The cluster's replicated logs as append-only segment files (`grex-log/` beside the state file).
//!
//! One write of the committer is one *frame* appended to the active segment and, when the write
//! asks for it, one `fdatasync`: a write is a sequential append of its own bytes, with none of a
//! B-tree's page copies, allocator bookkeeping or header commits. Every group's records share the
//! segments, so one sync covers the appends of every flock in a round.
//!
//! A frame holds records: an entry (group, index, bytes), a truncation (`>= from`), a purge
//! (`<= upto`), a named value of a group's log (vote, base), and a relocated entry (below). Where
//! each group's entries are is kept in memory ([`Index`]: 16 bytes an entry), as are the named
//! values, so reading an entry is one `pread` and reading a value none.
//!
//! Frame layout (little-endian): body length (u32), body checksum (u64), header checksum (u32,
//! of the 12 bytes before it), body. Both checksums are xxh3 seeded with the segment's number and
//! the frame's offset, so bytes left from another file or place never pass as a frame.
//!
//! A new segment is preallocated to its full size (`fallocate`), so a synced append writes the
//! frame's blocks and not, as the file grows, its inode as well (on ext4 that is a journal commit
//! per sync: see docs/benchmarks.md). A sealed segment is cut to the bytes written before the next
//! one is created, so only the last segment ever ends in unused space, which reads as zeros.
//!
//! Recovery reads every segment in order and replays its records. In the last segment, zeros
//! from the end of the last frame on are unused space. A frame that fails its checksum
//! is a torn write if it is in the last segment and no valid frame follows it anywhere in that
//! segment (only the last write can be torn, and it was never acknowledged): the segment is cut
//! there. Anywhere else it is damage, and the node refuses to start with advice, rather than
//! silently drop the acknowledged writes after it.
//!
//! Space: a segment is sealed at [`SEGMENT_BYTES`]. The oldest sealed segment is deleted once
//! nothing in it is live (its entries purged or replaced, its values set again later). If at most
//! half of it is live (say an idle flock's last entries, or its vote), those records are first
//! copied forward in one synced frame (relocations: they set where an entry is and never
//! truncate; a replay in which the older segment is gone may meet them after entries that
//! followed them, so a group's entries may have gaps until every segment is replayed, and must
//! have none after), then it is deleted. Truncations and purges are never copied: they only act on records written
//! before them, which are in the same or older segments, so deleted first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{GroupId, LogOp, LogRead};
use crate::error::StoreError;

/// A frame that would take the active segment past this size starts a new segment.
pub const SEGMENT_BYTES: u64 = 16 << 20;
/// The longest frame body recovery accepts; a longer length field is not a frame.
const FRAME_MAX: usize = 1 << 30;
const FRAME_HEADER: usize = 16;
const SEGMENT_SUFFIX: &str = ".seg";

const ENTRY: u8 = 1;
const TRUNCATE: u8 = 2;
const PURGE: u8 = 3;
const VALUE: u8 = 4;
const RELOCATE: u8 = 5;
const DROP: u8 = 6;
/// Bytes of an entry record before the entry: tag, group, index, length.
const ENTRY_HEADER: usize = 1 + 4 + 8 + 4;

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Engine(format!("{what} {}: {e}", path.display()))
}

/// Where an entry's bytes are: 12 bytes, as every entry a node keeps has one in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    segment: u32,
    offset: u32,
    len: u32,
}

impl Loc {
    /// A hole in [`Entries`] while segments are replayed (no record is this long: [`FRAME_MAX`]).
    const MISSING: Loc = Loc { segment: 0, offset: 0, len: u32::MAX };

    fn new(segment: u64, offset: u64, len: u32) -> Result<Loc, StoreError> {
        match (u32::try_from(segment), u32::try_from(offset)) {
            (Ok(segment), Ok(offset)) => Ok(Loc { segment, offset, len }),
            _ => Err(corrupt(format!("a log entry at byte {offset} of segment {segment:x} is out of range"))),
        }
    }

    fn missing(&self) -> bool {
        *self == Loc::MISSING
    }

    fn segment(&self) -> u64 {
        self.segment as u64
    }

    fn offset(&self) -> u64 {
        self.offset as u64
    }

    /// The bytes its record takes in the segment.
    fn record_bytes(&self) -> u64 {
        ENTRY_HEADER as u64 + self.len as u64
    }
}

/// One group's entries: where entry `first + i` is, for each `i`. Contiguous once the log is
/// open; while segments are replayed it may have holes for a moment ([`Loc::MISSING`]: entries
/// copied forward from a deleted segment come back after later ones). Never starts or ends with
/// a hole.
#[derive(Default)]
struct Entries {
    first: u64,
    locs: VecDeque<Loc>,
}

impl Entries {
    /// The index after the last entry.
    fn end(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.first + self.locs.len() as u64)
    }

    /// Where entry `index` is, if the log holds it.
    fn get(&self, index: u64) -> Option<Loc> {
        let at = usize::try_from(index.checked_sub(self.first)?).ok()?;
        self.locs.get(at).copied().filter(|loc| !loc.missing())
    }

    /// Sets where entry `index` is, leaving holes between it and the entries held; returns where
    /// it was.
    fn insert(&mut self, index: u64, loc: Loc) -> Option<Loc> {
        if self.locs.is_empty() {
            self.first = index;
        }
        if index < self.first {
            for _ in index..self.first - 1 {
                self.locs.push_front(Loc::MISSING);
            }
            self.locs.push_front(loc);
            self.first = index;
            return None;
        }
        let at = (index - self.first) as usize;
        if at < self.locs.len() {
            return Some(std::mem::replace(&mut self.locs[at], loc)).filter(|old| !old.missing());
        }
        self.locs.resize(at, Loc::MISSING);
        self.locs.push_back(loc);
        None
    }

    /// Forgets the entries with index `>= from`; returns where they were.
    fn truncate_from(&mut self, from: u64) -> Vec<Loc> {
        let keep = from.saturating_sub(self.first).min(self.locs.len() as u64) as usize;
        let gone = self.locs.drain(keep..).filter(|loc| !loc.missing()).collect();
        while self.locs.back().is_some_and(Loc::missing) {
            self.locs.pop_back();
        }
        gone
    }

    /// Forgets the entries with index `<= upto`; returns where they were.
    fn purge_upto(&mut self, upto: u64) -> Vec<Loc> {
        let drop = upto.saturating_add(1).saturating_sub(self.first).min(self.locs.len() as u64) as usize;
        let gone = self.locs.drain(..drop).filter(|loc| !loc.missing()).collect();
        self.first += drop as u64;
        while self.locs.front().is_some_and(Loc::missing) {
            self.locs.pop_front();
            self.first += 1;
        }
        gone
    }

    /// Each entry's index and where it is.
    fn iter(&self) -> impl Iterator<Item = (u64, Loc)> + '_ {
        (self.first..).zip(self.locs.iter().copied()).filter(|(_, loc)| !loc.missing())
    }

    /// Whether some index between the first and the last entry has none.
    fn has_holes(&self) -> bool {
        self.locs.iter().any(Loc::missing)
    }
}

/// A named value of a group's log, and the segment its latest record is in.
struct Value {
    value: Vec<u8>,
    segment: u64,
    record_bytes: u64,
}

struct Segment {
    file: Arc<File>,
    /// Bytes written.
    size: u64,
    /// Bytes of its records that are still the current ones.
    live: u64,
}

/// What the segments hold, as replaying them gives it.
#[derive(Default)]
struct Index {
    groups: HashMap<GroupId, Entries>,
    values: HashMap<(GroupId, String), Value>,
    segments: BTreeMap<u64, Segment>,
}

impl Index {
    fn add_live(&mut self, segment: u64, bytes: u64) {
        if let Some(s) = self.segments.get_mut(&segment) {
            s.live += bytes;
        }
    }

    fn drop_bytes(&mut self, segment: u64, bytes: u64) {
        if let Some(s) = self.segments.get_mut(&segment) {
            s.live -= bytes;
        }
    }

    fn drop_live(&mut self, locs: impl IntoIterator<Item = Loc>) {
        for loc in locs {
            self.drop_bytes(loc.segment(), loc.record_bytes());
        }
    }

    /// Replays the records of a frame body that starts at `offset` of `segment`. While
    /// `recovering`, a group's entries may have gaps (see [`Entries`]); afterwards they may not.
    fn replay(&mut self, segment: u64, offset: u64, body: &[u8], recovering: bool) -> Result<(), StoreError> {
        let mut r = Reader { bytes: body, at: 0 };
        while r.at < body.len() {
            let start = r.at;
            let tag = r.u8()?;
            let group = r.u32()?;
            match tag {
                ENTRY | RELOCATE => {
                    let index = r.u64()?;
                    let len = r.u32()?;
                    if len as usize > FRAME_MAX {
                        return Err(corrupt(format!("a log entry of {len} bytes")));
                    }
                    let loc = Loc::new(segment, offset + r.at as u64, len)?;
                    r.take(len as usize)?;
                    let entries = self.groups.entry(group).or_default();
                    if tag == ENTRY {
                        // An entry at an index the log holds replaces it and every later one.
                        let gone = entries.truncate_from(index);
                        if !recovering && let Some(end) = entries.end().filter(|end| index != *end) {
                            return Err(corrupt(format!(
                                "log entry {index} of group {group} does not follow entry {}",
                                end - 1
                            )));
                        }
                        entries.insert(index, loc);
                        self.drop_live(gone);
                    } else if let Some(old) = entries.insert(index, loc) {
                        self.drop_live([old]);
                    }
                    self.add_live(segment, loc.record_bytes());
                }
                TRUNCATE => {
                    let from = r.u64()?;
                    let gone = self.groups.entry(group).or_default().truncate_from(from);
                    self.drop_live(gone);
                }
                PURGE => {
                    let upto = r.u64()?;
                    let gone = self.groups.entry(group).or_default().purge_upto(upto);
                    self.drop_live(gone);
                }
                DROP => {
                    if let Some(entries) = self.groups.remove(&group) {
                        let gone: Vec<Loc> = entries.iter().map(|(_, loc)| loc).collect();
                        self.drop_live(gone);
                    }
                    let values: Vec<(GroupId, String)> =
                        self.values.keys().filter(|(g, _)| *g == group).cloned().collect();
                    for key in values {
                        let old = self.values.remove(&key).expect("listed");
                        self.drop_bytes(old.segment, old.record_bytes);
                    }
                }
                VALUE => {
                    let key_len = r.u8()? as usize;
                    let key = std::str::from_utf8(r.take(key_len)?)
                        .map_err(|_| corrupt("a log value's name is not UTF-8"))?
                        .to_owned();
                    let len = r.u32()? as usize;
                    let value = r.take(len)?.to_vec();
                    let record_bytes = (r.at - start) as u64;
                    if let Some(old) = self.values.insert((group, key), Value { value, segment, record_bytes }) {
                        self.drop_bytes(old.segment, old.record_bytes);
                    }
                    self.add_live(segment, record_bytes);
                }
                other => return Err(corrupt(format!("unknown log record type {other}"))),
            }
        }
        Ok(())
    }

    /// The oldest segment, if it is not the active one.
    fn oldest_sealed(&self, active: u64) -> Option<(u64, &Segment)> {
        self.segments.iter().next().filter(|(n, _)| **n != active).map(|(n, s)| (*n, s))
    }

    /// Where the live records of `segment` are: its entries and values.
    fn live_in(&self, segment: u64) -> Live {
        let mut entries = Vec::new();
        for (group, e) in &self.groups {
            for (index, loc) in e.iter() {
                if loc.segment() == segment {
                    entries.push((*group, index, loc));
                }
            }
        }
        let values = self
            .values
            .iter()
            .filter(|(_, v)| v.segment == segment)
            .map(|((group, key), v)| (*group, key.clone(), v.value.clone()))
            .collect();
        Live { entries, values }
    }
}

/// The records of a segment that are still current.
struct Live {
    /// Group, index, where.
    entries: Vec<(GroupId, u64, Loc)>,
    /// Group, name, value.
    values: Vec<(GroupId, String, Vec<u8>)>,
}

/// Reads a frame body's fields.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let bytes = self.bytes.get(self.at..self.at + n).ok_or_else(|| corrupt("a log record runs past its frame"))?;
        self.at += n;
        Ok(bytes)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

/// Appends the records of `ops` (log operations only) to a frame body.
fn encode(ops: &[&LogOp], body: &mut Vec<u8>) {
    for op in ops {
        match op {
            LogOp::Append { group, entries } => {
                for (index, entry) in entries {
                    encode_entry(body, ENTRY, *group, *index, &entry.parts());
                }
            }
            LogOp::TruncateFrom { group, from } => encode_cut(body, TRUNCATE, *group, *from),
            LogOp::PurgeUpto { group, upto } => encode_cut(body, PURGE, *group, *upto),
            LogOp::PutLogState { group, key, value } => encode_value(body, *group, key, value),
            LogOp::DropGroupLog { group } => {
                body.push(DROP);
                body.extend_from_slice(&group.to_le_bytes());
            }
            _ => unreachable!("state operations are written to the state file"),
        }
    }
}

fn encode_entry(body: &mut Vec<u8>, tag: u8, group: GroupId, index: u64, parts: &[&[u8]]) {
    body.push(tag);
    body.extend_from_slice(&group.to_le_bytes());
    body.extend_from_slice(&index.to_le_bytes());
    let len: usize = parts.iter().map(|p| p.len()).sum();
    body.extend_from_slice(&(len as u32).to_le_bytes());
    for part in parts {
        body.extend_from_slice(part);
    }
}

fn encode_cut(body: &mut Vec<u8>, tag: u8, group: GroupId, index: u64) {
    body.push(tag);
    body.extend_from_slice(&group.to_le_bytes());
    body.extend_from_slice(&index.to_le_bytes());
}

fn encode_value(body: &mut Vec<u8>, group: GroupId, key: &str, value: &[u8]) {
    assert!(key.len() <= u8::MAX as usize, "log value names are short constants");
    body.push(VALUE);
    body.extend_from_slice(&group.to_le_bytes());
    body.push(key.len() as u8);
    body.extend_from_slice(key.as_bytes());
    body.extend_from_slice(&(value.len() as u32).to_le_bytes());
    body.extend_from_slice(value);
}

fn seed(segment: u64, offset: u64) -> u64 {
    segment.rotate_left(40) ^ offset
}

/// The header of a frame with `body` at `offset` of `segment`.
fn frame_header(segment: u64, offset: u64, body: &[u8]) -> [u8; FRAME_HEADER] {
    let mut header = [0u8; FRAME_HEADER];
    header[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    header[4..12].copy_from_slice(&xxh3_64_with_seed(body, seed(segment, offset)).to_le_bytes());
    let check = xxh3_64_with_seed(&header[..12], seed(segment, offset)) as u32;
    header[12..].copy_from_slice(&check.to_le_bytes());
    header
}

/// The body of the valid frame at `offset` of `bytes` (a segment's contents), if there is one.
fn frame_at(bytes: &[u8], segment: u64, offset: usize) -> Option<&[u8]> {
    let header = bytes.get(offset..offset + FRAME_HEADER)?;
    let check = u32::from_le_bytes(header[12..].try_into().expect("4 bytes"));
    if xxh3_64_with_seed(&header[..12], seed(segment, offset as u64)) as u32 != check {
        return None;
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let body = bytes.get(offset + FRAME_HEADER..(offset + FRAME_HEADER).checked_add(len.min(FRAME_MAX))?)?;
    let sum = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
    (len <= FRAME_MAX && xxh3_64_with_seed(body, seed(segment, offset as u64)) == sum).then_some(body)
}

/// The one writer's state: the segment it appends to.
struct Writer {
    active: u64,
    file: Arc<File>,
    size: u64,
    /// A frame was written without a sync since the last one.
    unsynced: bool,
    /// The buffer frames are encoded in, kept between writes.
    frame: Vec<u8>,
}

/// The replicated logs of every group, in segment files under one directory.
pub struct SegmentLog {
    dir: PathBuf,
    durable: bool,
    segment_bytes: u64,
    writer: Mutex<Writer>,
    index: Mutex<Index>,
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:016x}{SEGMENT_SUFFIX}"))
}

/// Creates segment file `number`, `bytes` long (and makes it and its name durable), and indexes it.
fn create_segment(
    dir: &Path,
    durable: bool,
    number: u64,
    bytes: u64,
    index: &mut Index,
) -> Result<Arc<File>, StoreError> {
    let path = segment_path(dir, number);
    let file =
        OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| io("creating", &path, e))?;
    preallocate(&file, bytes).map_err(|e| io("preallocating", &path, e))?;
    if durable {
        file.sync_all().map_err(|e| io("syncing", &path, e))?;
        sync_dir(dir)?;
    }
    let file = Arc::new(file);
    index.segments.insert(number, Segment { file: file.clone(), size: 0, live: 0 });
    Ok(file)
}

/// Allocates the first `bytes` of `file` (reading as zeros), where the file system can; where it
/// cannot, the file grows as it is written, which is correct, only slower to sync.
fn preallocate(file: &File, bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(bytes).map_err(|_| std::io::Error::other("segment size out of range"))?;
    // SAFETY: `fallocate` on a file descriptor this function borrows; it touches no memory.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error() {
        e if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => Ok(()),
        e => Err(e),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing the directory", dir, e))
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir` and replays it; with `durable`, writes that ask for it
    /// are fsync'd. Segments of at most `segment_bytes` ([`SEGMENT_BYTES`] but in tests).
    pub fn open(dir: &Path, durable: bool, segment_bytes: u64) -> Result<SegmentLog, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
            let entry = entry.map_err(|e| io("listing", dir, e))?;
            let name = entry.file_name();
            let Some(number) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else { continue };
            let number = u64::from_str_radix(number, 16)
                .map_err(|_| corrupt(format!("{} is not a log segment's name", entry.path().display())))?;
            numbers.push(number);
        }
        numbers.sort_unstable();
        let mut index = Index::default();
        for (i, &number) in numbers.iter().enumerate() {
            let path = segment_path(dir, number);
            let bytes = std::fs::read(&path).map_err(|e| io("reading", &path, e))?;
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| io("opening", &path, e))?;
            index.segments.insert(number, Segment { file: Arc::new(file), size: 0, live: 0 });
            let mut offset = 0;
            while offset < bytes.len() {
                let Some(body) = frame_at(&bytes, number, offset) else { break };
                index.replay(number, (offset + FRAME_HEADER) as u64, body, true)?;
                offset += FRAME_HEADER + body.len();
            }
            let last = i + 1 == numbers.len();
            // The unused, preallocated end of the last segment.
            let unused = last && bytes[offset..].iter().all(|b| *b == 0);
            if offset < bytes.len() && !unused {
                let later_frame = (offset + 1..bytes.len()).find(|at| frame_at(&bytes, number, *at).is_some());
                if !last || later_frame.is_some() {
                    return Err(corrupt(format!(
                        "log segment {} is damaged at byte {offset} and holds writes after it; restore the data \
                         directory from a backup, or start this node on an empty data directory (it catches up \
                         from its peers)",
                        path.display()
                    )));
                }
                tracing::warn!(segment = %path.display(), at = offset, "the log's last write was torn (never acknowledged); cut there");
                let file = &index.segments[&number].file;
                file.set_len(offset as u64)
                    .and_then(|_| preallocate(file, segment_bytes))
                    .and_then(|_| file.sync_all())
                    .map_err(|e| io("cutting", &path, e))?;
            }
            index.segments.get_mut(&number).expect("inserted above").size = offset as u64;
        }
        for (group, entries) in &index.groups {
            if let Some(end) = entries.end().filter(|_| entries.has_holes()) {
                return Err(corrupt(format!(
                    "the log of group {group} has gaps between entries {} and {}; restore the data directory \
                     from a backup, or start this node on an empty data directory",
                    entries.first,
                    end - 1
                )));
            }
        }
        let writer = match index.segments.iter().next_back() {
            Some((active, s)) => {
                Writer { active: *active, file: s.file.clone(), size: s.size, unsynced: false, frame: Vec::new() }
            }
            None => {
                let file = create_segment(dir, durable, 1, segment_bytes, &mut index)?;
                Writer { active: 1, file, size: 0, unsynced: false, frame: Vec::new() }
            }
        };
        Ok(SegmentLog {
            dir: dir.to_owned(),
            durable,
            segment_bytes,
            writer: Mutex::new(writer),
            index: Mutex::new(index),
        })
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the log holds no entries and no values (a node's first start).
    pub fn is_empty(&self) -> bool {
        let index = self.index();
        index.values.is_empty() && index.groups.values().all(|e| e.end().is_none())
    }

    /// Seals the active segment and makes the new segment `number` the one appended to.
    fn start_segment(&self, writer: &mut Writer, number: u64) -> Result<(), StoreError> {
        // Sealed: cut to the bytes written (so recovery meets no unused space but in the last
        // segment), with its unsynced frames (a later sync of the new segment would not cover
        // them), before the new segment exists.
        let path = segment_path(&self.dir, writer.active);
        writer.file.set_len(writer.size).map_err(|e| io("sealing", &path, e))?;
        if self.durable {
            writer.file.sync_all().map_err(|e| io("syncing", &path, e))?;
        }
        writer.unsynced = false;
        let file = create_segment(&self.dir, self.durable, number, self.segment_bytes, &mut self.index())?;
        (writer.active, writer.file, writer.size) = (number, file, 0);
        Ok(())
    }

    /// Makes every frame written to the active segment durable (if the log is).
    fn sync(&self, writer: &mut Writer) -> Result<(), StoreError> {
        if self.durable {
            let path = segment_path(&self.dir, writer.active);
            writer.file.sync_data().map_err(|e| io("syncing", &path, e))?;
        }
        writer.unsynced = false;
        Ok(())
    }

    /// Appends the log operations of one batch as one frame, synced if `sync` (and durable),
    /// then frees space the write made dead.
    pub fn write(&self, ops: &[&LogOp], sync: bool) -> Result<(), StoreError> {
        let mut writer = self.writer();
        let mut frame = std::mem::take(&mut writer.frame);
        frame.clear();
        frame.resize(FRAME_HEADER, 0);
        encode(ops, &mut frame);
        let result = self.append(&mut writer, &mut frame, sync).and_then(|_| self.reclaim(&mut writer));
        writer.frame = frame;
        result
    }

    /// Writes one frame (starting a new segment first if this one is full) and replays it into
    /// the index. `frame` is the body behind [`FRAME_HEADER`] bytes that this fills in, so the
    /// records are written from where they were encoded, in one `pwrite`.
    fn append(&self, writer: &mut Writer, frame: &mut [u8], sync: bool) -> Result<(), StoreError> {
        let body_len = frame.len() - FRAME_HEADER;
        if body_len == 0 {
            // Nothing to add, but what earlier writes left unsynced must be on disk now.
            if sync && writer.unsynced {
                self.sync(writer)?;
            }
            return Ok(());
        }
        if writer.size > 0 && writer.size + frame.len() as u64 > self.segment_bytes {
            self.start_segment(writer, writer.active + 1)?;
        }
        let (segment, offset) = (writer.active, writer.size);
        let header = frame_header(segment, offset, &frame[FRAME_HEADER..]);
        frame[..FRAME_HEADER].copy_from_slice(&header);
        // One write of header and body: a frame is torn or whole, never interleaved.
        writer
            .file
            .write_all_at(frame, offset)
            .map_err(|e| io("appending to", &segment_path(&self.dir, segment), e))?;
        writer.unsynced = true;
        if sync {
            self.sync(writer)?;
        }
        writer.size += frame.len() as u64;
        let mut index = self.index();
        index.segments.get_mut(&segment).expect("the active segment is indexed").size = writer.size;
        index.replay(segment, offset + FRAME_HEADER as u64, &frame[FRAME_HEADER..], false)
    }

    /// Deletes sealed segments that hold nothing live, oldest first, copying forward what little
    /// is still live in one that is at most half live.
    fn reclaim(&self, writer: &mut Writer) -> Result<(), StoreError> {
        loop {
            let (number, file, live, size) = match self.index().oldest_sealed(writer.active) {
                Some((n, s)) => (n, s.file.clone(), s.live, s.size),
                None => return Ok(()),
            };
            if live > 0 {
                if live * 2 > size {
                    return Ok(());
                }
                let Live { entries, values } = self.index().live_in(number);
                let mut body = Vec::with_capacity(FRAME_HEADER + live as usize);
                body.resize(FRAME_HEADER, 0);
                let mut entry = Vec::new();
                for (group, index, loc) in entries {
                    entry.resize(loc.len as usize, 0);
                    file.read_exact_at(&mut entry, loc.offset())
                        .map_err(|e| io("reading", &segment_path(&self.dir, number), e))?;
                    encode_entry(&mut body, RELOCATE, group, index, &[&entry]);
                }
                for (group, key, value) in values {
                    encode_value(&mut body, group, &key, &value);
                }
                self.append(writer, &mut body, true)?;
                let still = self.index().segments.get(&number).map_or(0, |s| s.live);
                if still > 0 {
                    return Err(StoreError::Engine(format!(
                        "log segment {number:x} still holds {still} live bytes after its records were copied forward"
                    )));
                }
            }
            self.index().segments.remove(&number);
            let path = segment_path(&self.dir, number);
            std::fs::remove_file(&path).map_err(|e| io("deleting", &path, e))?;
            if self.durable {
                sync_dir(&self.dir)?;
            }
        }
    }

    /// Entries of `group` with index in `from..to`, at most `limit`.
    pub fn entries(
        &self,
        group: GroupId,
        from: u64,
        to: u64,
        limit: LogRead,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let wanted: Vec<(u64, Loc, Arc<File>)> = {
            let index = self.index();
            let Some(e) = index.groups.get(&group) else { return Ok(Vec::new()) };
            let held = || (from.max(e.first)..to.min(e.end().unwrap_or(0))).map_while(|i| e.get(i).map(|loc| (i, loc)));
            // The index knows each entry's length, so the limit is applied before reading.
            let taken = limit.taken(held().map(|(_, loc)| loc.len as usize));
            held().take(taken).map(|(i, loc)| (i, loc, index.segments[&loc.segment()].file.clone())).collect()
        };
        // Read outside the lock; a segment deleted meanwhile stays readable through its handle.
        wanted
            .into_iter()
            .map(|(i, loc, file)| {
                let mut entry = vec![0; loc.len as usize];
                file.read_exact_at(&mut entry, loc.offset())
                    .map_err(|e| io("reading", &segment_path(&self.dir, loc.segment()), e))?;
                Ok((i, entry))
            })
            .collect()
    }

    /// The last entry of `group`.
    pub fn last(&self, group: GroupId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let end = match self.index().groups.get(&group) {
            Some(e) => match e.end() {
                Some(end) => end,
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        Ok(self.entries(group, end - 1, end, LogRead::count(1))?.pop())
    }

    /// A named value of `group`'s log.
    pub fn value(&self, group: GroupId, key: &str) -> Option<Vec<u8>> {
        self.index().values.get(&(group, key.to_owned())).map(|v| v.value.clone())
    }

    /// Segment files and their total size.
    #[cfg(test)]
    fn segments(&self) -> (usize, u64) {
        let index = self.index();
        (index.segments.len(), index.segments.values().map(|s| s.size).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(group: GroupId, from: u64, n: u64) -> LogOp {
        LogOp::Append {
            group,
            entries: (from..from + n).map(|i| (i, format!("{group}/{i}").into_bytes().into())).collect(),
        }
    }

    fn write(log: &SegmentLog, ops: &[LogOp]) {
        log.write(&ops.iter().collect::<Vec<_>>(), true).unwrap();
    }

    fn expected(group: GroupId, range: std::ops::Range<u64>) -> Vec<(u64, Vec<u8>)> {
        range.map(|i| (i, format!("{group}/{i}").into_bytes())).collect()
    }

    /// The only segment file of a log that has one.
    fn only_segment(dir: &Path) -> PathBuf {
        let files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files[0].clone()
    }

    /// A log of three frames (entries 1..=3 of group 7), with the bytes written after each.
    fn three_frames(dir: &Path) -> Vec<u64> {
        let log = SegmentLog::open(dir, true, SEGMENT_BYTES).unwrap();
        let mut sizes = Vec::new();
        for i in 1..=3 {
            write(&log, &[append(7, i, 1)]);
            sizes.push(log.segments().1);
        }
        sizes
    }

    #[test]
    fn an_index_of_entries_keeps_holes_only_inside_and_reports_them() {
        let at = |n: u32| Loc { segment: 1, offset: n, len: 1 };
        let mut e = Entries::default();
        assert_eq!(e.insert(10, at(10)), None);
        assert_eq!(e.insert(13, at(13)), None);
        assert!(e.has_holes());
        assert_eq!(e.insert(7, at(7)), None);
        assert_eq!((e.first, e.end()), (7, Some(14)));
        assert_eq!(e.get(8), None);
        assert_eq!(e.insert(10, at(100)), Some(at(10)));
        for i in [8, 9, 11, 12] {
            assert_eq!(e.insert(i, at(i as u32)), None);
        }
        assert!(!e.has_holes());
        let indexes: Vec<u64> = e.iter().map(|(i, _)| i).collect();
        assert_eq!(indexes, (7..14).collect::<Vec<_>>());
        assert_eq!(e.truncate_from(12), vec![at(12), at(13)]);
        assert_eq!(e.purge_upto(8), vec![at(7), at(8)]);
        assert_eq!((e.first, e.end(), e.get(10)), (9, Some(12), Some(at(100))));
        // A purge past a hole leaves no hole in front; a truncation into one none behind.
        let mut e = Entries::default();
        e.insert(1, at(1));
        e.insert(4, at(4));
        e.insert(8, at(8));
        assert_eq!(e.purge_upto(1), vec![at(1)]);
        assert_eq!((e.first, e.get(4)), (4, Some(at(4))));
        assert_eq!(e.truncate_from(6), vec![at(8)]);
        assert_eq!((e.end(), e.has_holes()), (Some(5), false));
        assert_eq!(e.truncate_from(0), vec![at(4)]);
        assert_eq!(e.end(), None);
    }

    #[test]
    fn a_dropped_group_log_stays_dropped_across_reopens_and_its_segments_are_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        // Small segments, so the dropped entries' segments become dead and are deleted.
        let log = SegmentLog::open(dir.path(), true, 512).unwrap();
        for i in 0..20 {
            write(&log, &[append(1, 1 + i * 2, 2), append(2, 1 + i, 1)]);
        }
        write(&log, &[LogOp::PutLogState { group: 1, key: "vote", value: vec![9] }]);
        let before = log.segments().0;
        write(&log, &[LogOp::DropGroupLog { group: 1 }]);
        // The next writes reclaim the segments that held only group 1.
        for i in 20..40 {
            write(&log, &[append(2, 1 + i, 1), LogOp::PurgeUpto { group: 2, upto: i }]);
        }
        assert!(log.segments().0 < before, "segments {} then {}", before, log.segments().0);
        for log in [log, SegmentLog::open(dir.path(), true, 512).unwrap()] {
            assert_eq!(log.entries(1, 0, u64::MAX, LogRead::count(100)).unwrap(), vec![]);
            assert_eq!(log.last(1).unwrap(), None);
            assert_eq!(log.value(1, "vote"), None);
            assert_eq!(log.entries(2, 0, u64::MAX, LogRead::count(100)).unwrap(), expected(2, 40..41));
        }
        // A group started again after its drop keeps only its new entries.
        let log = SegmentLog::open(dir.path(), true, 512).unwrap();
        write(&log, &[append(1, 1, 2)]);
        let log = SegmentLog::open(dir.path(), true, 512).unwrap();
        assert_eq!(log.entries(1, 0, u64::MAX, LogRead::count(100)).unwrap(), expected(1, 1..3));
    }

    #[test]
    fn entries_values_truncations_and_purges_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path(), true, SEGMENT_BYTES).unwrap();
        assert!(log.is_empty());
        write(&log, &[append(1, 1, 10), append(2, 5, 3), LogOp::PutLogState { group: 1, key: "vote", value: vec![1] }]);
        write(
            &log,
            &[LogOp::TruncateFrom { group: 1, from: 8 }, append(1, 8, 1), LogOp::PurgeUpto { group: 2, upto: 5 }],
        );
        write(&log, &[LogOp::PutLogState { group: 1, key: "vote", value: vec![2] }]);
        for log in [log, SegmentLog::open(dir.path(), true, SEGMENT_BYTES).unwrap()] {
            assert!(!log.is_empty());
            assert_eq!(log.entries(1, 0, u64::MAX, LogRead::count(100)).unwrap(), expected(1, 1..9));
            assert_eq!(log.entries(1, 3, 5, LogRead::count(100)).unwrap(), expected(1, 3..5));
            assert_eq!(log.entries(1, 0, u64::MAX, LogRead::count(2)).unwrap(), expected(1, 1..3));
            assert_eq!(log.entries(2, 0, u64::MAX, LogRead::count(100)).unwrap(), expected(2, 6..8));
            assert_eq!(log.last(1).unwrap(), expected(1, 8..9).pop());
            assert_eq!(log.last(3).unwrap(), None);
            assert_eq!(log.value(1, "vote"), Some(vec![2]));
            assert_eq!(log.value(2, "vote"), None);
        }
    }

    #[test]
    fn a_torn_last_write_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = three_frames(dir.path());
        let path = only_segment(dir.path());
        let whole = std::fs::read(&path).unwrap();
        // The last write reached the disk in part: half its frame, or its size with zeros (what
        // a crash can leave), or half of it and then bytes of an older frame.
        let half = (sizes[1] + sizes[2]) / 2;
        let mut stale = whole[..half as usize].to_vec();
        stale.extend_from_slice(&whole[..sizes[0] as usize]);
        let zeros = [&whole[..sizes[1] as usize], &vec![0; (sizes[2] - sizes[1]) as usize][..]].concat();
        for torn in [whole[..half as usize].to_vec(), zeros, stale] {
            std::fs::write(&path, &torn).unwrap();
            let log = SegmentLog::open(dir.path(), true, SEGMENT_BYTES).unwrap();
            assert_eq!(
                log.entries(7, 0, u64::MAX, LogRead::count(10)).unwrap(),
                expected(7, 1..3),
                "the torn write is gone"
            );
            let after = std::fs::read(&path).unwrap();
            assert_eq!(after[..sizes[1] as usize], whole[..sizes[1] as usize]);
            assert!(
                after[sizes[1] as usize..].iter().all(|b| *b == 0),
                "the segment is cut after the last whole frame"
            );
            write(&log, &[append(7, 3, 2)]);
            drop(log);
            let log = SegmentLog::open(dir.path(), true, SEGMENT_BYTES).unwrap();
            assert_eq!(log.entries(7, 0, u64::MAX, LogRead::count(10)).unwrap(), expected(7, 1..5));
            drop(log);
        }
    }

    #[test]
    fn segments_are_preallocated_and_cut_to_their_frames_when_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path(), true, 4096).unwrap();
        let len = |n| std::fs::metadata(segment_path(dir.path(), n)).unwrap().len();
        write(&log, &[append(7, 1, 1)]);
        assert_eq!(len(1), 4096, "the active segment has its full size from the start");
        let mut next = 2;
        while log.segments().0 < 2 {
            write(&log, &[append(7, next, 10)]);
            next += 10;
        }
        let sealed = log.index().segments[&1].size;
        assert_eq!(len(1), sealed, "a sealed segment ends at its last frame");
        assert_eq!(len(2), 4096);
        drop(log);
        // The unused end of the last segment is neither damage nor a torn write: nothing is cut.
        let log = SegmentLog::open(dir.path(), true, 4096).unwrap();
        assert_eq!(log.entries(7, 0, u64::MAX, LogRead::count(1000)).unwrap(), expected(7, 1..next));
        assert_eq!(len(2), 4096);
        write(&log, &[append(7, next, 1)]);
        drop(log);
        let log = SegmentLog::open(dir.path(), true, 4096).unwrap();
        assert_eq!(log.entries(7, 0, u64::MAX, LogRead::count(1000)).unwrap(), expected(7, 1..next + 1));
    }

    #[test]
    fn a_damaged_frame_with_writes_after_it_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = three_frames(dir.path());
        let path = only_segment(dir.path());
        let whole = std::fs::read(&path).unwrap();
        // One flipped bit in the second frame's body, then in its header.
        for at in [sizes[1] - 2, sizes[0] + 1] {
            let mut damaged = whole.clone();
            damaged[at as usize] ^= 0x10;
            std::fs::write(&path, &damaged).unwrap();
            let err = SegmentLog::open(dir.path(), true, SEGMENT_BYTES).err().expect("damage must be refused");
            assert!(err.to_string().contains(&format!("damaged at byte {}", sizes[0])), "{err}");
            assert!(err.to_string().contains("restore the data directory"), "{err}");
            assert_eq!(std::fs::read(&path).unwrap(), damaged, "nothing is cut");
        }
    }

    #[test]
    fn damage_at_the_end_of_a_sealed_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path(), true, 200).unwrap();
        for i in 1..=6 {
            write(&log, &[append(7, 4 * i - 3, 4)]);
        }
        drop(log);
        let first = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&first).unwrap();
        let end = bytes.len() - 1;
        bytes[end] ^= 1;
        std::fs::write(&first, &bytes).unwrap();
        let err = SegmentLog::open(dir.path(), true, 200).err().expect("a damaged sealed segment must be refused");
        assert!(err.to_string().contains("0000000000000001.seg is damaged"), "{err}");
    }

    #[test]
    fn dead_segments_are_deleted_and_an_idle_group_is_copied_forward() {
        let dir = tempfile::tempdir().unwrap();
        let open = || SegmentLog::open(dir.path(), true, 4096).unwrap();
        let log = open();
        // An idle group: a few entries and its vote, written once, never purged.
        write(&log, &[append(9, 1, 3), LogOp::PutLogState { group: 9, key: "vote", value: b"idle".to_vec() }]);
        // A busy group, purged as it goes (a snapshot every 50 entries keeps the last 10).
        let mut next = 1;
        for round in 0..400 {
            write(&log, &[append(1, next, 5)]);
            next += 5;
            if round % 10 == 9 {
                write(&log, &[LogOp::PurgeUpto { group: 1, upto: next - 11 }]);
            }
            let (segments, bytes) = log.segments();
            assert!(segments <= 4, "round {round}: {segments} segments, {bytes} bytes");
        }
        for log in [log, open()] {
            assert_eq!(log.entries(9, 0, u64::MAX, LogRead::count(10)).unwrap(), expected(9, 1..4));
            assert_eq!(log.value(9, "vote").as_deref(), Some(&b"idle"[..]));
            assert_eq!(log.entries(1, 0, u64::MAX, LogRead::count(100)).unwrap(), expected(1, next - 10..next));
            assert!(!segment_path(dir.path(), 1).exists(), "the first segment, where the idle group was, is gone");
        }
    }
}
