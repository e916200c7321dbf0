//! The decoded-bucket cache of one executor shard: LRU by bytes.
//!
//! An entry whose latest change set is not yet durable is never evicted: reloading it from the
//! store would lose writes that later jobs already saw. Eviction passes over such entries to
//! the next least recently used ones, so the cache runs over its budget only by buckets whose
//! writes are on their way (and stays over it only while there are no others to evict).

use std::cell::Cell;

use lru::LruCache;

use super::Ticket;
use crate::data::BucketData;

/// A cached bucket and what its latest change set waits for.
pub(crate) struct CachedBucket {
    pub(crate) data: BucketData,
    /// Commit sequence of the latest change set on a standalone node (0: nothing pending).
    pub(crate) last_seq: u64,
    /// In a cluster: the leader term the entry was built under (0: a follower's copy of
    /// committed state), and the ticket of the latest change set proposed to the flock's log.
    pub(crate) term: u64,
    pub(crate) pending: Option<Ticket>,
    /// Once eviction has found the latest change set failed: what had been submitted to the
    /// committer by then. The entry may go once that is durable.
    pub(crate) failed_at: Cell<Option<u64>>,
}

/// Where the committer stands, for eviction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CommitSeqs {
    /// Every write up to this sequence is in the store.
    pub(crate) durable: u64,
    /// Writes handed to the committer so far.
    pub(crate) submitted: u64,
}

/// Entries one eviction looks at, least recently used first, for ones it may evict.
const EVICT_SCAN_MAX: usize = 1024;

impl CachedBucket {
    /// A bucket as loaded from the store.
    pub(crate) fn loaded(data: BucketData, term: u64) -> Self {
        CachedBucket { data, last_seq: 0, term, pending: None, failed_at: Cell::new(None) }
    }

    /// True while a change set it holds may still fail to commit, or is committed but not yet
    /// in the store (reloading it from there would go back in time). An entry whose latest change
    /// set failed stays too: an earlier one may still be on its way to the store, and only the
    /// next job on the bucket, which waits for the committer before it reloads, may drop it.
    fn has_pending(&self, durable_seq: u64) -> bool {
        self.last_seq > durable_seq
            || self.pending.as_ref().is_some_and(|t| match t.peek() {
                None | Some(Err(_)) => true,
                Some(Ok(written)) => *written > durable_seq,
            })
    }

    /// True if it may leave the cache: nothing it holds is on its way to the store. One whose
    /// latest change set failed may go once everything submitted when that was first seen here
    /// is durable (as the next job on it would wait for before reloading it).
    fn evictable(&self, seqs: CommitSeqs) -> bool {
        if self.failed() {
            let failed_at = self.failed_at.get().unwrap_or(seqs.submitted);
            self.failed_at.set(Some(failed_at));
            return failed_at <= seqs.durable;
        }
        !self.has_pending(seqs.durable)
    }

    /// The commit-log sequence after which the store holds everything this entry was built from:
    /// its latest change set's write, or (if that failed) everything queued so far.
    pub(crate) fn written_seq(&self, submitted_seq: u64) -> Option<u64> {
        match self.pending.as_ref()?.peek()? {
            Ok(written) => Some(*written),
            Err(_) => Some(submitted_seq),
        }
    }

    /// True if a change set it holds failed to commit: its contents are not the committed state.
    pub(crate) fn failed(&self) -> bool {
        self.pending.as_ref().is_some_and(|t| matches!(t.peek(), Some(Err(_))))
    }
}

/// Bytes an entry takes beyond its bucket's items: the LRU list's node (key, entry and two
/// links), the hash table's slot for it (16 bytes, at up to twice the entries), the key's bytes
/// and a finished proposal's shared answer.
fn entry_bytes(bucket: &[u8], entry: &CachedBucket) -> usize {
    const NODE_BYTES: usize = size_of::<(Vec<u8>, CachedBucket)>() + 2 * size_of::<usize>();
    const TICKET_BYTES: usize = 128;
    NODE_BYTES + 32 + bucket.len() + entry.data.bytes() + if entry.pending.is_some() { TICKET_BYTES } else { 0 }
}

/// Counters the cache keeps.
#[derive(Default, Clone, Copy, Debug)]
pub struct CacheStats {
    /// Lookups that found the bucket.
    pub hits: u64,
    /// Lookups that had to load it.
    pub misses: u64,
    /// Buckets held.
    pub buckets: u64,
    /// Bytes held.
    pub bytes: u64,
}

pub(crate) struct BucketCache {
    entries: LruCache<Vec<u8>, CachedBucket>,
    bytes: usize,
    bytes_max: usize,
    hits: u64,
    misses: u64,
}

impl BucketCache {
    pub(crate) fn new(bytes_max: usize) -> Self {
        BucketCache { entries: LruCache::unbounded(), bytes: 0, bytes_max, hits: 0, misses: 0 }
    }

    /// Takes a bucket out of the cache (to run a job on it), counting a hit or a miss.
    pub(crate) fn take(&mut self, bucket: &[u8]) -> Option<CachedBucket> {
        match self.entries.pop(bucket) {
            Some(entry) => {
                self.hits += 1;
                self.bytes -= entry_bytes(bucket, &entry);
                Some(entry)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Puts a bucket back as the most recently used, then evicts entries over budget.
    pub(crate) fn put(&mut self, bucket: Vec<u8>, entry: CachedBucket, seqs: CommitSeqs) {
        self.bytes += entry_bytes(&bucket, &entry);
        self.entries.put(bucket, entry);
        self.evict(seqs);
    }

    /// Evicts least recently used entries while over budget, passing over those whose writes
    /// are on their way to the store (looking at most at [`EVICT_SCAN_MAX`] entries).
    pub(crate) fn evict(&mut self, seqs: CommitSeqs) {
        // The usual case: the least recently used entries may go as they are.
        while self.bytes > self.bytes_max && self.entries.peek_lru().is_some_and(|(_, entry)| entry.evictable(seqs)) {
            let (bucket, entry) = self.entries.pop_lru().expect("peeked");
            self.bytes -= entry_bytes(&bucket, &entry);
        }
        // Past one still waiting: look further along.
        let Some(mut over) = self.bytes.checked_sub(self.bytes_max).filter(|&over| over > 0) else { return };
        let mut gone = Vec::new();
        for (bucket, entry) in self.entries.iter().rev().take(EVICT_SCAN_MAX) {
            if entry.evictable(seqs) {
                gone.push(bucket.clone());
                over = over.saturating_sub(entry_bytes(bucket, entry));
                if over == 0 {
                    break;
                }
            }
        }
        for bucket in gone {
            if let Some(entry) = self.entries.pop(&bucket) {
                self.bytes -= entry_bytes(&bucket, &entry);
            }
        }
    }

    /// Drops one bucket's entry if `stale` says so.
    pub(crate) fn remove_if(&mut self, bucket: &[u8], stale: impl FnOnce(&CachedBucket) -> bool) {
        if self.entries.peek(bucket).is_some_and(stale)
            && let Some(entry) = self.entries.pop(bucket)
        {
            self.bytes -= entry_bytes(bucket, &entry);
        }
    }

    /// Drops the entries `keep` says no to (a scan of the whole cache).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&[u8], &CachedBucket) -> bool) {
        let gone: Vec<Vec<u8>> =
            self.entries.iter().filter(|(bucket, entry)| !keep(bucket, entry)).map(|(b, _)| b.clone()).collect();
        for bucket in gone {
            if let Some(entry) = self.entries.pop(&bucket) {
                self.bytes -= entry_bytes(&bucket, &entry);
            }
        }
    }

    /// Drops everything (after a storage failure the cache may hold writes that never committed).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits,
            misses: self.misses,
            buckets: self.entries.len() as u64,
            bytes: self.bytes as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn bucket_of(bytes: usize) -> BucketData {
        BucketData::new(1, BTreeMap::from([("v".to_string(), vec![0; bytes])]))
    }

    /// The committer with everything up to `seq` submitted and durable.
    fn at(seq: u64) -> CommitSeqs {
        CommitSeqs { durable: seq, submitted: seq }
    }

    /// What one entry of `bucket_of(1000)` under a one-byte key counts for.
    fn one() -> usize {
        entry_bytes(b"a", &CachedBucket::loaded(bucket_of(1000), 0))
    }

    #[test]
    fn least_recently_used_durable_buckets_go_first() {
        let one = one();
        let mut cache = BucketCache::new(one * 2);
        cache.put(b"a".to_vec(), CachedBucket { last_seq: 1, ..CachedBucket::loaded(bucket_of(1000), 0) }, at(10));
        cache.put(b"b".to_vec(), CachedBucket { last_seq: 2, ..CachedBucket::loaded(bucket_of(1000), 0) }, at(10));
        assert!(cache.take(b"a").is_some());
        cache.put(b"a".to_vec(), CachedBucket { last_seq: 3, ..CachedBucket::loaded(bucket_of(1000), 0) }, at(10));
        cache.put(b"c".to_vec(), CachedBucket { last_seq: 4, ..CachedBucket::loaded(bucket_of(1000), 0) }, at(10));
        assert!(cache.take(b"b").is_none(), "b was least recently used");
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.buckets), (1, 1, 2));
        assert_eq!(stats.bytes as usize, one * 2);
    }

    #[test]
    fn buckets_with_pending_writes_stay_until_durable() {
        let one = one();
        let mut cache = BucketCache::new(one);
        cache.put(b"a".to_vec(), CachedBucket { last_seq: 5, ..CachedBucket::loaded(bucket_of(1000), 0) }, at(4));
        cache.put(b"b".to_vec(), CachedBucket { last_seq: 6, ..CachedBucket::loaded(bucket_of(1000), 0) }, at(4));
        assert_eq!(cache.stats().buckets, 2, "nothing durable yet, so nothing evicted");
        cache.evict(at(6));
        assert_eq!(cache.stats().buckets, 1);
        assert!(cache.take(b"b").is_some());
    }

    fn resolved(result: Result<u64, crate::error::RemoteError>) -> Ticket {
        use futures::FutureExt;
        let ticket = futures::future::ready(result).boxed().shared();
        let _ = futures::executor::block_on(ticket.clone());
        ticket
    }

    #[test]
    fn a_committed_bucket_stays_until_its_apply_is_written_and_a_failed_one_until_what_was_queued_is() {
        let one = one();
        let mut cache = BucketCache::new(one);
        let failure = crate::error::error(crate::error::ErrorCode::Unavailable, "lost the lead");
        let committed = CachedBucket { pending: Some(resolved(Ok(7))), ..CachedBucket::loaded(bucket_of(1000), 1) };
        let failed = CachedBucket { pending: Some(resolved(Err(failure))), ..CachedBucket::loaded(bucket_of(1000), 1) };
        assert_eq!(committed.written_seq(9), Some(7));
        assert_eq!(failed.written_seq(9), Some(9), "a failed entry waits for everything queued");
        cache.put(b"c".to_vec(), CachedBucket::loaded(bucket_of(1000), 1), at(6));
        cache.put(b"a".to_vec(), committed, at(6));
        cache.put(b"b".to_vec(), failed, CommitSeqs { durable: 6, submitted: 9 });
        assert_eq!(cache.stats().buckets, 2, "only the plain entry went");
        cache.evict(CommitSeqs { durable: 7, submitted: 12 });
        assert_eq!(cache.stats().buckets, 1, "the apply is written: the committed entry may go");
        cache.put(b"d".to_vec(), CachedBucket::loaded(bucket_of(1000), 1), CommitSeqs { durable: 8, submitted: 12 });
        assert_eq!(cache.stats().buckets, 1, "over budget: the plain entry went, the failed one waits");
        cache.evict(CommitSeqs { durable: 9, submitted: 15 });
        assert_eq!(cache.stats().buckets, 0, "what was queued when the failure was first seen (9) is durable");
        assert!(cache.take(b"b").is_none());
    }

    #[test]
    fn an_entry_on_its_way_to_the_store_does_not_hold_the_others_in() {
        let one = one();
        let mut cache = BucketCache::new(one * 3);
        let waiting: Ticket = futures::FutureExt::shared(futures::FutureExt::boxed(futures::future::pending()));
        cache.put(
            b"a".to_vec(),
            CachedBucket { pending: Some(waiting), ..CachedBucket::loaded(bucket_of(1000), 1) },
            at(1),
        );
        for key in [b"b", b"c", b"d", b"e"] {
            cache.put(key.to_vec(), CachedBucket::loaded(bucket_of(1000), 1), at(1));
        }
        let stats = cache.stats();
        assert_eq!((stats.buckets, stats.bytes as usize), (2, one * 2 + 128), "the waiting entry and the newest");
        assert!(cache.take(b"a").is_some(), "the least recently used entry is still waiting: it stays");
        assert!(cache.take(b"e").is_some());
    }

    #[test]
    fn a_stale_entry_is_dropped_and_its_bytes_returned() {
        let one = one();
        let mut cache = BucketCache::new(one * 4);
        cache.put(b"a".to_vec(), CachedBucket::loaded(bucket_of(1000), 0), at(0));
        cache.put(b"b".to_vec(), CachedBucket::loaded(bucket_of(1000), 0), at(0));
        cache.remove_if(b"a", |entry| entry.data.version < 1);
        assert_eq!(cache.stats().buckets, 2, "version 1 is not older than 1");
        cache.remove_if(b"a", |entry| entry.data.version < 2);
        cache.remove_if(b"missing", |_| true);
        assert_eq!((cache.stats().buckets, cache.stats().bytes as usize), (1, one));
        assert!(cache.take(b"a").is_none());
        assert!(cache.take(b"b").is_some());
    }
}
