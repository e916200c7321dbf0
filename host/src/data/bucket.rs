//! A decoded bucket and the view a job has of it.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ops::Bound;

use super::{ChangeSet, ItemWrite};

/// Bytes of one leaf of a bucket's item map: up to 11 items' `String` and `Vec` headers and a
/// parent link (std's B-tree; an inner node adds 12 child links).
const MAP_LEAF_BYTES: usize = 11 * (size_of::<String>() + size_of::<Vec<u8>>()) + 16;
const MAP_INNER_BYTES: usize = MAP_LEAF_BYTES + 12 * size_of::<usize>();

/// A change set of at least [`MERGE_WRITES_MIN`] writes, and at least 1/`MERGE_RATIO` as many as
/// the bucket has items, is merged in one pass rather than searched for write by write (a
/// smaller one costs a few key comparisons per write, less than building the map anew).
const MERGE_RATIO: usize = 8;
const MERGE_WRITES_MIN: usize = 16;

/// Bytes counted per item beyond its key and value: the allocator's rounding of the two.
const ITEM_OVERHEAD_BYTES: usize = 16;

/// Bytes the nodes of a map of `items` take: one leaf up to 11 items, then a leaf per 8 (items
/// inserted in key order leave leaves about half full, a map built at once fills them) and an
/// inner node per 8 leaves.
fn map_bytes(items: usize) -> usize {
    let leaves = if items <= 11 { 1 } else { items.div_ceil(8) };
    let inner = if leaves == 1 { 0 } else { leaves.div_ceil(8) };
    leaves * MAP_LEAF_BYTES + inner * MAP_INNER_BYTES
}

/// A bucket's items and version, as the cache holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketData {
    /// Version of the last committed change set; 0 for a bucket never written.
    pub version: u64,
    items: BTreeMap<String, Vec<u8>>,
    bytes: usize,
}

impl BucketData {
    /// A bucket with these items at this version.
    pub fn new(version: u64, items: BTreeMap<String, Vec<u8>>) -> Self {
        let bytes = items.iter().map(|(k, v)| item_bytes(k, v)).sum();
        BucketData { version, items, bytes }
    }

    /// Takes the items out (for snapshots).
    pub fn into_items(self) -> BTreeMap<String, Vec<u8>> {
        self.items
    }

    /// An item's value.
    pub fn get(&self, item: &str) -> Option<&[u8]> {
        self.items.get(item).map(Vec::as_slice)
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the bucket has no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Memory held on the heap, estimated, for the cache's byte limit (tested against an
    /// allocator's count: `the_estimate_of_a_bucket_s_memory_follows_its_allocations`).
    pub fn bytes(&self) -> usize {
        self.bytes + map_bytes(self.items.len())
    }

    /// Applies a change set made against this bucket's current version.
    pub fn apply(&mut self, change: &ChangeSet) {
        self.apply_owned(change.clone());
    }

    /// Applies a change set made against this bucket's current version, moving its items in.
    pub fn apply_owned(&mut self, change: ChangeSet) {
        debug_assert_eq!(change.version, self.version + 1, "change sets apply in version order");
        let many = change.writes.len() >= MERGE_WRITES_MIN && change.writes.len() * MERGE_RATIO >= self.items.len();
        // Checked only for a merge: a few writes need no order.
        if many && change.writes.windows(2).all(|w| w[0].item < w[1].item) {
            self.merge(change.writes);
        } else {
            for write in change.writes {
                self.write(write);
            }
        }
        self.version = change.version;
    }

    /// One write, one search of the map.
    fn write(&mut self, write: ItemWrite) {
        let ItemWrite { item, value } = write;
        match (self.items.entry(item), value) {
            (Entry::Occupied(mut slot), Some(value)) => {
                self.bytes = self.bytes - item_bytes(slot.key(), slot.get()) + item_bytes(slot.key(), &value);
                slot.insert(value);
            }
            (Entry::Occupied(slot), None) => {
                let (item, old) = slot.remove_entry();
                self.bytes -= item_bytes(&item, &old);
            }
            (Entry::Vacant(slot), Some(value)) => {
                self.bytes += item_bytes(slot.key(), &value);
                slot.insert(value);
            }
            (Entry::Vacant(_), None) => {}
        }
    }

    /// Writes in key order merged with the items in one pass, the map then built at once from the
    /// sorted result (no search per key: a 200-item `HSET` would otherwise compare keys about 16
    /// times per item, in a search to remove and one to insert).
    fn merge(&mut self, writes: Vec<ItemWrite>) {
        let mut old = std::mem::take(&mut self.items).into_iter().peekable();
        let mut merged = Vec::with_capacity(old.len() + writes.len());
        for ItemWrite { item, value } in writes {
            while let Some((key, _)) = old.peek() {
                match key.as_str().cmp(&item) {
                    std::cmp::Ordering::Less => merged.extend(old.next()),
                    std::cmp::Ordering::Equal => _ = old.next(),
                    std::cmp::Ordering::Greater => break,
                }
            }
            if let Some(value) = value {
                merged.push((item, value));
            }
        }
        merged.extend(old);
        self.bytes = merged.iter().map(|(k, v)| item_bytes(k, v)).sum();
        self.items = merged.into_iter().collect();
    }

    /// Item keys with `prefix`, strictly after `start_after`, at most `limit`.
    pub fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Vec<String> {
        keys_in(&self.items, prefix, start_after).take(limit).map(str::to_owned).collect()
    }
}

fn item_bytes(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + ITEM_OVERHEAD_BYTES
}

fn keys_in<'a, V>(
    map: &'a BTreeMap<String, V>,
    prefix: &'a str,
    start_after: Option<&str>,
) -> impl Iterator<Item = &'a str> + 'a {
    let lower = match start_after {
        Some(after) if after >= prefix => Bound::Excluded(after.to_owned()),
        _ => Bound::Included(prefix.to_owned()),
    };
    map.range::<String, _>((lower, Bound::Unbounded))
        .map(|(k, _)| k.as_str())
        .take_while(move |k| k.starts_with(prefix))
}

/// A limit a job broke while writing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// An item key is empty or longer than 1 KiB.
    #[error("item key of {0} bytes; item keys are 1 to 1024 bytes")]
    ItemKey(usize),
    /// A value is larger than the item limit.
    #[error("item `{item}` of {bytes} bytes is over the {max}-byte item limit")]
    ItemTooLarge {
        /// Item key.
        item: String,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The change set is larger than its limit.
    #[error("the job's writes reached {bytes} bytes, over the {max}-byte change-set limit")]
    ChangeSetTooLarge {
        /// Size reached.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

impl ViewError {
    /// The error code a client sees for this breach.
    pub fn code(&self) -> grex_client::proto::ErrorCode {
        use grex_client::proto::ErrorCode;
        match self {
            ViewError::ItemKey(_) => ErrorCode::InvalidItemKey,
            ViewError::ItemTooLarge { .. } => ErrorCode::ItemTooLarge,
            ViewError::ChangeSetTooLarge { .. } => ErrorCode::ChangeSetTooLarge,
        }
    }
}

/// A job's view of a bucket: the committed items overlaid with the job's own writes.
pub struct JobView {
    base: BucketData,
    writes: BTreeMap<String, Option<Vec<u8>>>,
    write_bytes: usize,
    item_bytes_max: usize,
    change_set_bytes_max: usize,
}

impl JobView {
    /// A view over `base` that enforces the item and change-set limits.
    pub fn new(base: BucketData, item_bytes_max: usize, change_set_bytes_max: usize) -> Self {
        JobView { base, writes: BTreeMap::new(), write_bytes: 0, item_bytes_max, change_set_bytes_max }
    }

    /// The current value of an item.
    pub fn get(&self, item: &str) -> Result<Option<&[u8]>, ViewError> {
        check_key(item)?;
        Ok(match self.writes.get(item) {
            Some(written) => written.as_deref(),
            None => self.base.get(item),
        })
    }

    /// Writes an item.
    pub fn put(&mut self, item: &str, value: Vec<u8>) -> Result<(), ViewError> {
        self.set(item, value).map(|_| ())
    }

    /// Writes an item; returns whether it existed before (one lookup in the job's writes, and in
    /// the bucket only if the job has not written it, where `get` then `put` would take four).
    pub fn set(&mut self, item: &str, value: Vec<u8>) -> Result<bool, ViewError> {
        check_key(item)?;
        if value.len() > self.item_bytes_max {
            return Err(ViewError::ItemTooLarge {
                item: item.to_owned(),
                bytes: value.len(),
                max: self.item_bytes_max,
            });
        }
        self.record(item, Some(value))
    }

    /// Deletes an item; returns whether it existed.
    pub fn delete(&mut self, item: &str) -> Result<bool, ViewError> {
        let existed = self.get(item)?.is_some();
        if existed || self.writes.contains_key(item) {
            self.record(item, None)?;
        }
        Ok(existed)
    }

    /// Records a write if it keeps the change set within its limit; returns whether the item
    /// existed before it.
    fn record(&mut self, item: &str, value: Option<Vec<u8>>) -> Result<bool, ViewError> {
        let new_bytes = item.len() + value.as_ref().map_or(0, Vec::len);
        let slot = self.writes.entry(item.to_owned());
        let (old_bytes, existed) = match &slot {
            Entry::Occupied(written) => {
                (item.len() + written.get().as_ref().map_or(0, Vec::len), written.get().is_some())
            }
            Entry::Vacant(_) => (0, self.base.get(item).is_some()),
        };
        let total = self.write_bytes - old_bytes + new_bytes;
        if total > self.change_set_bytes_max {
            return Err(ViewError::ChangeSetTooLarge { bytes: total, max: self.change_set_bytes_max });
        }
        self.write_bytes = total;
        match slot {
            Entry::Occupied(mut written) => *written.get_mut() = value,
            Entry::Vacant(new) => _ = new.insert(value),
        }
        Ok(existed)
    }

    /// Item keys as the job sees them: committed keys merged with its writes, deletes removed.
    pub fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Vec<String> {
        let mut base = keys_in(&self.base.items, prefix, start_after).peekable();
        let mut own = keys_in(&self.writes, prefix, start_after).peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let key = match (base.peek(), own.peek()) {
                (None, None) => break,
                (Some(_), None) => base.next(),
                (None, Some(_)) => own.next(),
                (Some(b), Some(o)) => match b.cmp(o) {
                    std::cmp::Ordering::Less => base.next(),
                    std::cmp::Ordering::Greater => own.next(),
                    std::cmp::Ordering::Equal => {
                        base.next();
                        own.next()
                    }
                },
            }
            .expect("peeked");
            if !matches!(self.writes.get(key), Some(None)) {
                out.push(key.to_owned());
            }
        }
        out
    }

    /// Whether the job wrote anything.
    pub fn has_writes(&self) -> bool {
        !self.writes.is_empty()
    }

    /// Ends the view: the bucket as it was, and the change set of the job's writes (if any).
    pub fn finish(self, bucket: &[u8], flock: u32) -> (BucketData, Option<ChangeSet>) {
        let change = (!self.writes.is_empty()).then(|| ChangeSet {
            bucket: bucket.to_vec(),
            flock,
            version: self.base.version + 1,
            writes: self.writes.into_iter().map(|(item, value)| ItemWrite { item, value }).collect(),
        });
        (self.base, change)
    }
}

fn check_key(item: &str) -> Result<(), ViewError> {
    if item.is_empty() || item.len() > grex_client::proto::ITEM_KEY_BYTES_MAX {
        return Err(ViewError::ItemKey(item.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    use super::*;

    /// Counts the bytes each thread has allocated and not freed, so a test can weigh what it builds.
    struct Counting;

    thread_local! {
        static HELD: Cell<isize> = const { Cell::new(0) };
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            HELD.with(|h| h.set(h.get() + layout.size() as isize));
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            HELD.with(|h| h.set(h.get() - layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// What `build` leaves allocated on this thread, and what it returns.
    fn weigh<T>(build: impl FnOnce() -> T) -> (T, usize) {
        let before = HELD.with(Cell::get);
        let built = build();
        (built, (HELD.with(Cell::get) - before) as usize)
    }

    #[test]
    fn the_estimate_of_a_bucket_s_memory_follows_its_allocations() {
        // (items, key bytes, value bytes): one large item, a small record, a hash of 200 records.
        for (count, key_len, value_len) in [(1, 12, 1000), (1, 5, 8), (10, 8, 20), (200, 4, 70), (2000, 10, 100)] {
            let items: Vec<(String, Vec<u8>)> =
                (0..count).map(|i| (format!("{i:0key_len$}"), vec![7; value_len])).collect();
            // Built at once (a bucket loaded from the store) and item by item (applied writes).
            let (loaded, loaded_bytes) = weigh(|| BucketData::new(1, items.iter().cloned().collect()));
            let (applied, applied_bytes) = weigh(|| {
                let mut bucket = BucketData::default();
                let writes = items.iter().map(|(k, v)| ItemWrite { item: k.clone(), value: Some(v.clone()) });
                bucket.apply_owned(ChangeSet { bucket: Vec::new(), flock: 0, version: 1, writes: writes.collect() });
                bucket
            });
            assert_eq!(loaded.bytes(), applied.bytes());
            for (how, held) in [("loaded", loaded_bytes), ("applied", applied_bytes)] {
                let ratio = loaded.bytes() as f64 / held as f64;
                assert!(
                    (0.75..=1.35).contains(&ratio),
                    "{count} items of {key_len}+{value_len} bytes, {how}: estimated {} bytes, allocated {held}",
                    loaded.bytes()
                );
            }
        }
    }

    fn bucket(items: &[(&str, &str)]) -> BucketData {
        BucketData::new(3, items.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect())
    }

    #[test]
    fn set_says_whether_the_item_existed_as_the_job_sees_it() {
        let mut view = JobView::new(bucket(&[("a", "1"), ("b", "2")]), 1000, 1000);
        assert!(view.set("a", b"9".to_vec()).unwrap(), "committed");
        assert!(!view.set("c", b"3".to_vec()).unwrap(), "new");
        assert!(view.set("c", b"4".to_vec()).unwrap(), "written by this job");
        assert!(view.delete("b").unwrap());
        assert!(!view.set("b", b"5".to_vec()).unwrap(), "deleted by this job");
        let e = view.set("d", vec![0; 995]).unwrap_err();
        assert!(matches!(e, ViewError::ChangeSetTooLarge { .. }));
        assert_eq!(view.get("d").unwrap(), None, "a refused write leaves nothing behind");
        assert_eq!(view.list("", None, 10), ["a", "b", "c"]);
    }

    #[test]
    fn view_reads_its_own_writes_over_the_committed_items() {
        let mut view = JobView::new(bucket(&[("a", "1"), ("b", "2")]), 100, 1000);
        view.put("a", b"9".to_vec()).unwrap();
        assert!(view.delete("b").unwrap());
        assert_eq!(view.get("a").unwrap(), Some(&b"9"[..]));
        assert_eq!(view.get("b").unwrap(), None);
        assert!(!view.delete("b").unwrap());
    }

    #[test]
    fn list_merges_writes_and_hides_deletes_in_key_order() {
        let mut view = JobView::new(bucket(&[("c/1", ""), ("c/3", ""), ("c/5", ""), ("d/1", "")]), 100, 1000);
        view.put("c/2", vec![]).unwrap();
        view.put("c/3", vec![1]).unwrap();
        view.delete("c/5").unwrap();
        assert_eq!(view.list("c/", None, 10), ["c/1", "c/2", "c/3"]);
        assert_eq!(view.list("c/", Some("c/1"), 1), ["c/2"]);
        assert_eq!(view.list("", None, 10), ["c/1", "c/2", "c/3", "d/1"]);
    }

    #[test]
    fn finish_yields_a_change_set_that_reproduces_the_view() {
        let mut view = JobView::new(bucket(&[("a", "1"), ("b", "2")]), 100, 1000);
        view.put("c", b"3".to_vec()).unwrap();
        view.delete("a").unwrap();
        let expected: Vec<_> = view.list("", None, 10);
        let (mut base, change) = view.finish(b"k", 7);
        let change = change.unwrap();
        assert_eq!((change.version, change.flock), (4, 7));
        base.apply(&change);
        assert_eq!(base.list("", None, 10), expected);
        assert_eq!(base.version, 4);
        assert_eq!(base.bytes(), bucket(&[("b", "2"), ("c", "3")]).bytes());
    }

    #[test]
    fn limits_are_checked_at_the_write_that_breaks_them() {
        let mut view = JobView::new(BucketData::default(), 10, 25);
        assert!(matches!(view.put("big", vec![0; 11]), Err(ViewError::ItemTooLarge { .. })));
        view.put("a", vec![0; 10]).unwrap();
        view.put("a", vec![0; 10]).unwrap(); // rewriting the same item does not count twice
        view.put("b", vec![0; 10]).unwrap();
        assert!(matches!(view.put("c", vec![0; 10]), Err(ViewError::ChangeSetTooLarge { .. })));
        assert!(matches!(view.put("", vec![]), Err(ViewError::ItemKey(0))));
        assert!(matches!(view.get(&"x".repeat(1025)), Err(ViewError::ItemKey(1025))));
    }

    #[test]
    fn a_job_without_writes_makes_no_change_set() {
        let view = JobView::new(bucket(&[("a", "1")]), 10, 10);
        assert!(view.get("a").unwrap().is_some());
        assert!(view.finish(b"k", 0).1.is_none());
    }

    /// A model-based test: random gets, puts, deletes and listings on a view must answer as a
    /// plain map of the committed items with the job's writes laid over it, limits included, and
    /// the change set the view ends with must turn the committed bucket into that map.
    mod model {
        use std::collections::BTreeMap;

        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        const KEYS: [&str; 6] = ["a", "a/1", "a/2", "b", "b/1", "c"];
        const ITEM_MAX: usize = 6;
        const CHANGE_MAX: usize = 24;

        #[derive(Clone, Debug)]
        enum Step {
            Get(&'static str),
            Put(&'static str, Vec<u8>),
            Delete(&'static str),
            List(&'static str, Option<&'static str>, usize),
        }

        fn step() -> impl Strategy<Value = Step> {
            let key = || prop::sample::select(&KEYS[..]);
            prop_oneof![
                key().prop_map(Step::Get),
                (key(), vec(any::<u8>(), 0..ITEM_MAX + 2)).prop_map(|(k, v)| Step::Put(k, v)),
                key().prop_map(Step::Delete),
                (prop::sample::select(&["", "a", "a/", "b/", "z"][..]), prop::option::of(key()), 0usize..5)
                    .prop_map(|(prefix, after, limit)| Step::List(prefix, after, limit)),
            ]
        }

        /// The model's listing: keys with the prefix, after `after`, at most `limit`.
        fn listing(map: &BTreeMap<String, Vec<u8>>, prefix: &str, after: Option<&str>, limit: usize) -> Vec<String> {
            map.keys()
                .filter(|k| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
                .take(limit)
                .cloned()
                .collect()
        }

        proptest! {
            #![proptest_config(crate::testing::proptest_config(1000))]

            #[test]
            fn a_view_answers_as_a_map_with_the_writes_laid_over(
                base in prop::collection::btree_map(prop::sample::select(&KEYS[..]).prop_map(String::from), vec(any::<u8>(), 0..4), 0..6),
                steps in vec(step(), 0..30),
            ) {
                let committed = BucketData::new(4, base.clone());
                let mut view = JobView::new(committed.clone(), ITEM_MAX, CHANGE_MAX);
                let mut model = base;
                // What the change set would hold: per key, its item bytes plus value bytes.
                let mut written: BTreeMap<&str, usize> = BTreeMap::new();
                for step in steps {
                    match step {
                        Step::Get(k) => prop_assert_eq!(view.get(k).unwrap(), model.get(k).map(Vec::as_slice)),
                        Step::Put(k, v) => {
                            let mut sizes = written.clone();
                            sizes.insert(k, k.len() + v.len());
                            let total: usize = sizes.values().sum();
                            match view.put(k, v.clone()) {
                                Ok(()) => {
                                    prop_assert!(v.len() <= ITEM_MAX && total <= CHANGE_MAX);
                                    written = sizes;
                                    model.insert(k.to_string(), v);
                                }
                                Err(ViewError::ItemTooLarge { .. }) => prop_assert!(v.len() > ITEM_MAX),
                                Err(ViewError::ChangeSetTooLarge { bytes, .. }) => {
                                    prop_assert!(total > CHANGE_MAX);
                                    prop_assert_eq!(bytes, total);
                                }
                                Err(e) => prop_assert!(false, "unexpected {e}"),
                            }
                        }
                        Step::Delete(k) => {
                            let existed = model.contains_key(k);
                            let mut sizes = written.clone();
                            if existed || written.contains_key(k) {
                                sizes.insert(k, k.len());
                            }
                            let total: usize = sizes.values().sum();
                            match view.delete(k) {
                                Ok(found) => {
                                    prop_assert_eq!(found, existed);
                                    written = sizes;
                                    model.remove(k);
                                }
                                Err(ViewError::ChangeSetTooLarge { .. }) => prop_assert!(total > CHANGE_MAX),
                                Err(e) => prop_assert!(false, "unexpected {e}"),
                            }
                        }
                        Step::List(prefix, after, limit) => {
                            prop_assert_eq!(view.list(prefix, after, limit), listing(&model, prefix, after, limit));
                        }
                    }
                }
                let (before, change) = view.finish(b"k", 0);
                prop_assert_eq!(&before, &committed);
                let mut after = committed;
                if let Some(change) = change {
                    prop_assert_eq!(change.version, 5);
                    after.apply(&change);
                } else {
                    prop_assert!(written.is_empty());
                }
                prop_assert_eq!(after.into_items(), model);
            }

            /// Both ways of applying (a merge for many writes, a search per write for few) leave
            /// the items and the byte count a bucket built from scratch would have.
            #[test]
            fn a_change_set_applies_as_a_map_update_whether_merged_or_written_one_by_one(
                base in prop::collection::btree_map("[a-e]{1,3}", vec(any::<u8>(), 0..4), 0..100),
                writes in prop::collection::btree_map("[a-e]{1,3}", prop::option::of(vec(any::<u8>(), 0..4)), 0..40),
                reversed in any::<bool>(),
            ) {
                let mut model = base.clone();
                for (item, value) in &writes {
                    match value {
                        Some(value) => _ = model.insert(item.clone(), value.clone()),
                        None => _ = model.remove(item),
                    }
                }
                let mut writes: Vec<_> = writes.into_iter().map(|(item, value)| ItemWrite { item, value }).collect();
                if reversed {
                    writes.reverse(); // not in key order: applied one by one
                }
                let mut bucket = BucketData::new(3, base);
                bucket.apply_owned(ChangeSet { bucket: b"k".to_vec(), flock: 0, version: 4, writes });
                prop_assert_eq!(bucket, BucketData::new(4, model));
            }
        }
    }
}
