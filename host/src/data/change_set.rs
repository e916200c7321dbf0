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

impl ChangeSet {
    /// The change set as a [`ChangeView`] of its own fields.
    pub fn view(&self) -> ChangeView<'_> {
        ChangeView {
            bucket: &self.bucket,
            flock: self.flock,
            version: self.version,
            writes: self.writes.iter().map(|w| WriteView { item: &w.item, value: w.value.as_deref() }).collect(),
        }
    }
}

/// One item written or deleted, borrowed ([`ItemWrite`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct WriteView<'a> {
    /// Item key.
    pub item: &'a str,
    /// New value, or `None` for a delete.
    #[serde(with = "serde_bytes", borrow)]
    pub value: Option<&'a [u8]>,
}

/// A change set whose keys and values are borrowed: from a [`ChangeSet`], or read in place
/// from its encoding ([`Change::Encoded`]), one allocation for the list of writes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ChangeView<'a> {
    /// Bucket key.
    #[serde(with = "serde_bytes", borrow)]
    pub bucket: &'a [u8],
    /// The bucket's flock.
    pub flock: u32,
    /// The bucket's version after this change set.
    pub version: u64,
    /// Writes in item-key order, one per item.
    #[serde(borrow)]
    pub writes: Vec<WriteView<'a>>,
}

/// A change set on its way to the store: decoded, or as the bytes of its encoding (bincode's
/// standard configuration, as the cluster's wire format writes it), shared with the log entry
/// that carried it. The store reads the second in place ([`Change::view`]), so a replicated
/// change set is never decoded into owned keys and values on its way to disk.
#[derive(Clone, Debug)]
pub enum Change {
    /// A change set as the job made it.
    Decoded(ChangeSet),
    /// A [`ChangeSet`]'s encoding, checked to decode ([`Change::encoded`]).
    Encoded(EncodedChange),
}

/// A [`ChangeSet`]'s encoding, known to decode: made only by [`Change::encoded`].
#[derive(Clone, Debug)]
pub struct EncodedChange(bytes::Bytes);

impl Change {
    /// A change set's encoding, checked: the error says what is wrong with it.
    pub fn encoded(bytes: bytes::Bytes) -> Result<Change, String> {
        decode_view(&bytes)?;
        Ok(Change::Encoded(EncodedChange(bytes)))
    }

    /// The change set, borrowed.
    pub fn view(&self) -> ChangeView<'_> {
        match self {
            Change::Decoded(change) => change.view(),
            Change::Encoded(EncodedChange(bytes)) => decode_view(bytes).expect("checked when made"),
        }
    }

    /// The bucket and the version it goes to, without reading the writes.
    pub fn head(&self) -> (&[u8], u64) {
        match self {
            Change::Decoded(change) => (&change.bucket, change.version),
            Change::Encoded(EncodedChange(bytes)) => {
                /// What a change set's encoding starts with.
                #[derive(Deserialize)]
                struct Head<'a> {
                    #[serde(with = "serde_bytes", borrow)]
                    bucket: &'a [u8],
                    _flock: u32,
                    version: u64,
                }
                let (head, _): (Head<'_>, usize) =
                    bincode::serde::borrow_decode_from_slice(bytes, bincode::config::standard())
                        .expect("checked when made");
                (head.bucket, head.version)
            }
        }
    }

    /// Bytes it holds, about: what a queue of writes counts.
    pub fn bytes(&self) -> usize {
        match self {
            Change::Decoded(change) => change.bucket.len() + change.bytes(),
            Change::Encoded(EncodedChange(bytes)) => bytes.len(),
        }
    }
}

impl From<ChangeSet> for Change {
    fn from(change: ChangeSet) -> Change {
        Change::Decoded(change)
    }
}

fn decode_view(bytes: &[u8]) -> Result<ChangeView<'_>, String> {
    let (view, read) =
        bincode::serde::borrow_decode_from_slice(bytes, bincode::config::standard()).map_err(|e| e.to_string())?;
    match bytes.len() - read {
        0 => Ok(view),
        left => Err(format!("{left} bytes were left over after the change set")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_set_read_in_place_from_its_encoding_is_the_change_set() {
        let change = ChangeSet {
            bucket: b"customer-1".to_vec(),
            flock: 3,
            version: 7,
            writes: vec![
                ItemWrite { item: "a".into(), value: Some(vec![1; 300]) },
                ItemWrite { item: "b".into(), value: None },
                ItemWrite { item: "c".into(), value: Some(Vec::new()) },
            ],
        };
        let encoded = bincode::serde::encode_to_vec(&change, bincode::config::standard()).unwrap();
        let read = Change::encoded(encoded.clone().into()).unwrap();
        assert_eq!(read.view(), change.view());
        assert_eq!(Change::from(change.clone()).view(), change.view());
        assert_eq!(read.bytes(), encoded.len());
        assert_eq!(read.head(), (&b"customer-1"[..], 7));

        let short = bytes::Bytes::copy_from_slice(&encoded[..encoded.len() - 1]);
        assert!(Change::encoded(short).is_err());
        let mut long = encoded.clone();
        long.push(0);
        let error = Change::encoded(long.into()).unwrap_err();
        assert!(error.contains("1 bytes were left over"), "{error}");
    }
}
