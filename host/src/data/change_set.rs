//! Change sets: what one job changed in one bucket.

use serde::{Deserialize, Serialize};

/// One item written or deleted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemWrite {
    /// Item key.
    pub item: String,
    /// New value, or `None` for a delete.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

/// The writes one job made to one bucket, and the version they produce. Commits entirely or not
/// at all; applying the same change set to the same version always gives the same state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSet {
    /// Bucket key.
    #[serde(with = "serde_bytes")]
    pub bucket: Vec<u8>,
    /// The bucket's flock.
    pub flock: u32,
    /// The bucket's version after this change set (the previous version plus one).
    pub version: u64,
    /// Writes in item-key order, one per item.
    pub writes: Vec<ItemWrite>,
}

impl ChangeSet {
    /// Bytes of keys and values, the measure of the change-set limit.
    pub fn bytes(&self) -> usize {
        self.writes.iter().map(|w| w.item.len() + w.value.as_ref().map_or(0, Vec::len)).sum()
    }
}
