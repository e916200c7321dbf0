//! A group's snapshot as a file in the data directory's `snapshots/`, so that neither the node
//! that sends a flock's snapshot nor the one that installs it holds the flock in memory.
//!
//! A flock's snapshot is the encoding of its buckets as one list of `(key, version, items)` in
//! the project's codec (the layout every release has sent): the count, then each bucket. The
//! sender writes it from one [`FlockView`] a page of buckets at a time, leaving room for the count
//! at the file's start, and sends the file in chunks; the receiver gathers the chunks in a file of
//! its own, reads it through once to check it ([`check`]), and its store installs the buckets one
//! at a time ([`buckets`]) in the write that sets the snapshot's point. redb spills a large
//! write's pages to the file past half its cache, so that write is bounded too. The meta group's
//! snapshot (its state and every module) is written and read whole.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_bytes::ByteBuf;

use super::{NodeId, wire};
use crate::data::{ChangeSet, ItemWrite};
use crate::storage::{BucketStream, FlockView, GroupId};

/// The data directory's folder for snapshots on their way out or in.
const DIR: &str = "snapshots";

/// Bytes of buckets read from the store at a time.
const PAGE_BYTES: usize = 1 << 20;

/// Buckets read from the store at a time.
const PAGE_BUCKETS: usize = 4096;

/// Room at a flock snapshot file's start for the bucket count (a varint of at most 9 bytes).
const COUNT_ROOM: u64 = 9;

/// One bucket in a flock snapshot: key, version, items.
pub(super) type SnapshotBucket = (ByteBuf, u64, Vec<(String, ByteBuf)>);

/// A snapshot written to a file: its bytes are `len` bytes from `start`.
#[derive(Debug)]
pub(super) struct SnapshotFile {
    pub path: PathBuf,
    pub start: u64,
    pub len: u64,
}

/// Empties (or makes) the snapshot folder: what a stopped node left there is of no use.
pub(super) fn clear_dir(data_dir: &Path) -> std::io::Result<()> {
    let dir = data_dir.join(DIR);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir_all(dir)
}

/// Where the snapshot of `group` for peer `to` is written before it is sent.
pub(super) fn outgoing_path(data_dir: &Path, group: GroupId, to: NodeId) -> PathBuf {
    data_dir.join(DIR).join(format!("out-{group}-{to:016x}"))
}

/// What a received snapshot's message carries through the engine as its data: the path of the
/// file its chunks were gathered in ([`path_from_data`] reads it back).
pub(super) fn path_as_data(path: &Path) -> &[u8] {
    path.as_os_str().as_bytes()
}

/// The file a received snapshot's message names ([`path_as_data`]).
pub(super) fn path_from_data(data: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(data))
}

/// Writes every bucket of `view` to a new file at `path`, a page at a time.
pub(super) fn write_flock(view: &dyn FlockView, path: &Path) -> anyhow::Result<SnapshotFile> {
    let mut out = BufWriter::new(File::create(path)?);
    out.write_all(&[0; COUNT_ROOM as usize])?;
    let (mut count, mut after) = (0u64, None::<Vec<u8>>);
    loop {
        let page = view.buckets(b"", after.as_deref(), PAGE_BUCKETS, PAGE_BYTES)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (key, data) in page {
            let version = data.version;
            let items = data.into_items().into_iter().map(|(item, value)| (item, ByteBuf::from(value))).collect();
            let bucket: SnapshotBucket = (ByteBuf::from(key), version, items);
            wire::encode_into(&bucket, &mut out)?;
            count += 1;
        }
    }
    let len = out.stream_position()?;
    let head = wire::encode(&count);
    let start = COUNT_ROOM - head.len() as u64;
    out.seek(SeekFrom::Start(start))?;
    out.write_all(&head)?;
    out.flush()?;
    Ok(SnapshotFile { path: path.to_owned(), start, len: len - start })
}

/// Writes a snapshot held whole (the meta group's) to a new file at `path`.
pub(super) fn write_whole(data: &[u8], path: &Path) -> std::io::Result<SnapshotFile> {
    std::fs::write(path, data)?;
    Ok(SnapshotFile { path: path.to_owned(), start: 0, len: data.len() as u64 })
}

/// A snapshot's chunks as they arrive, gathered in a file.
pub(super) struct Incoming {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Incoming {
    /// Starts a file for `group`'s snapshot from peer `from`, named apart from any other: one
    /// gathered earlier may still be installed from while this one arrives.
    pub fn create(data_dir: &Path, group: GroupId, from: NodeId) -> Result<Incoming, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = data_dir.join(DIR).join(format!("in-{group}-{from:016x}-{n}"));
        let file = File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Incoming { file, path, len: 0 })
    }

    /// Deletes the chunks gathered (a transfer that broke off or went wrong).
    pub fn discard(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "a snapshot's file stays: {e}");
        }
    }

    /// Bytes gathered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Adds the next chunk.
    pub fn append(&mut self, data: &[u8]) -> Result<(), String> {
        self.file.write_all(data).map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Where the chunks are.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the file, leaving the chunks there.
    pub fn into_path(self) -> PathBuf {
        self.path
    }
}

/// Reads a flock snapshot file through, as its store will: an error names what is wrong with it.
pub(super) fn check(path: &Path, flock: u32) -> Result<u64, String> {
    let mut reader = Buckets::open(path, flock)?;
    let count = reader.left;
    for bucket in reader.by_ref() {
        bucket?;
    }
    reader.finish()?;
    Ok(count)
}

/// The buckets of the flock snapshot file at `path`, read one at a time as change sets that
/// write every item, for the store to install.
pub(super) fn buckets(path: &Path, flock: u32) -> Result<BucketStream, String> {
    let reader = Buckets::open(path, flock)?;
    Ok(BucketStream::new(Box::new(reader)))
}

/// Reads a flock snapshot file a bucket at a time.
struct Buckets {
    reader: BufReader<File>,
    /// Buckets not read yet.
    left: u64,
    flock: u32,
    /// The file is unreadable or damaged: nothing more is read.
    failed: bool,
}

impl Buckets {
    fn open(path: &Path, flock: u32) -> Result<Buckets, String> {
        let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let left = wire::decode_from::<u64>(&mut reader).map_err(|e| format!("no bucket count: {e}"))?;
        Ok(Buckets { reader, left, flock, failed: false })
    }

    /// Fails unless every bucket was read and nothing follows them.
    fn finish(mut self) -> Result<(), String> {
        if self.left > 0 {
            return Err(format!("{} buckets were not read", self.left));
        }
        let mut extra = [0u8; 1];
        match self.reader.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err("bytes follow the last bucket".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Iterator for Buckets {
    type Item = Result<ChangeSet, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 || self.failed {
            return None;
        }
        self.left -= 1;
        match wire::decode_from::<SnapshotBucket>(&mut self.reader) {
            Ok((bucket, version, items)) => Some(Ok(ChangeSet {
                bucket: bucket.into_vec(),
                flock: self.flock,
                version,
                writes: items
                    .into_iter()
                    .map(|(item, value)| ItemWrite { item, value: Some(value.into_vec()) })
                    .collect(),
            })),
            Err(e) => {
                self.failed = true;
                Some(Err(format!("a bucket could not be read ({} left): {e}", self.left + 1)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStore, Store};

    /// A store whose flock 1 holds `n` buckets (and flock 2 one), and its flock-1 change sets.
    fn store_with(n: usize, value_bytes: usize) -> (MemoryStore, Vec<ChangeSet>) {
        let store = MemoryStore::new(4);
        let of = |f: u32| (0..).map(|i| format!("b{i}").into_bytes()).filter(move |b| crate::data::flock_of(b, 4) == f);
        let mut changes: Vec<ChangeSet> = of(1)
            .take(n)
            .enumerate()
            .map(|(i, bucket)| ChangeSet {
                bucket,
                flock: 1,
                version: i as u64 + 1,
                writes: vec![
                    ItemWrite { item: "a".into(), value: Some(vec![i as u8; value_bytes]) },
                    ItemWrite { item: "b".into(), value: Some(vec![]) },
                ],
            })
            .collect();
        let stray = ChangeSet {
            bucket: of(2).next().unwrap(),
            flock: 2,
            version: 1,
            writes: vec![ItemWrite { item: "x".into(), value: Some(b"y".to_vec()) }],
        };
        store.commit(&[changes.clone(), vec![stray]].concat()).unwrap();
        changes.sort_by(|a, b| a.bucket.cmp(&b.bucket));
        (store, changes)
    }

    /// Writes flock 1's snapshot, checks its bytes are the list as one encoding, and reads it back.
    fn round_trip(n: usize, value_bytes: usize) {
        let (store, changes) = store_with(n, value_bytes);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = write_flock(store.flock_view(1).unwrap().as_ref(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let listed: Vec<SnapshotBucket> = changes
            .iter()
            .map(|c| {
                let items =
                    c.writes.iter().map(|w| (w.item.clone(), ByteBuf::from(w.value.clone().unwrap()))).collect();
                (ByteBuf::from(c.bucket.clone()), c.version, items)
            })
            .collect();
        assert_eq!(file.start + file.len, bytes.len() as u64);
        assert!(bytes[file.start as usize..] == wire::encode(&listed), "{n} buckets: the layout every release sends");
        let sent = dir.path().join("in");
        std::fs::write(&sent, &bytes[file.start as usize..]).unwrap();
        assert_eq!(check(&sent, 1), Ok(n as u64));
        let read: Vec<ChangeSet> = buckets(&sent, 1).unwrap().take().unwrap().map(Result::unwrap).collect();
        assert_eq!(read, changes);
    }

    #[test]
    fn a_flock_snapshot_file_is_its_buckets_as_one_list_written_and_read_a_page_at_a_time() {
        round_trip(0, 1);
        round_trip(3, 10);
        // More buckets than a page holds, and a count of more than one byte.
        round_trip(PAGE_BUCKETS + 7, 1);
        // More bytes than a page holds.
        round_trip(5, PAGE_BYTES / 2);
    }

    #[test]
    fn a_damaged_snapshot_file_is_refused_and_says_why() {
        let (store, _) = store_with(20, 10);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = write_flock(store.flock_view(1).unwrap().as_ref(), &path).unwrap();
        let whole = std::fs::read(&path).unwrap()[file.start as usize..].to_vec();
        let sent = dir.path().join("in");
        std::fs::write(&sent, &whole[..whole.len() - 3]).unwrap();
        let short = check(&sent, 1).unwrap_err();
        assert!(short.contains("could not be read"), "{short}");
        std::fs::write(&sent, [whole.as_slice(), b"x"].concat()).unwrap();
        assert_eq!(check(&sent, 1), Err("bytes follow the last bucket".into()));
        assert!(check(&dir.path().join("missing"), 1).unwrap_err().contains("cannot open"));
    }
}
