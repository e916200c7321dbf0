//! Small buckets packed into one row of the `items` table.
//!
//! A bucket whose items come to at most [`PACKED_BYTES_MAX`] encoded bytes keeps all of them in
//! one row under the item key `""` (which no item can have: item keys are 1 to 1,024 bytes), so a
//! change set costs one B-tree insert whatever the number of items it writes, and loading the
//! bucket one read. A bucket that grows past that is spread: each item in its own row, as every
//! bucket was up to schema 6, and a change set writes the rows it changes.
//!
//! A bucket is packed or spread, never both: packed from its first write, spread for good once it
//! outgrows its row. The top bit of its version in the `buckets` table ([`PACKED_FLAG`]) says
//! which, so a write knows without reading the items table: a schema-6 bucket has no flag and is
//! spread, as schema 6 kept every bucket.
//!
//! A packed row: a format byte (1), then per item in key order its key length (u16 LE), key,
//! value length (u32 LE) and value.

use std::collections::BTreeMap;

use crate::error::StoreError;

/// The item key of a packed bucket's row.
pub(super) const PACKED_KEY: &str = "";

/// The largest packed row: a write to a packed bucket rewrites this much at most.
pub(super) const PACKED_BYTES_MAX: usize = 16 << 10;

/// In a bucket's `buckets` entry, above its version: its items are in a packed row.
pub(super) const PACKED_FLAG: u64 = 1 << 63;

const FORMAT: u8 = 1;

/// Whether the bucket of this `buckets` entry is packed.
pub(super) fn is_packed(entry: u64) -> bool {
    entry & PACKED_FLAG != 0
}

/// The version in a `buckets` entry.
pub(super) fn version(entry: u64) -> u64 {
    entry & !PACKED_FLAG
}

/// Bytes an item takes in a packed row.
fn item_len(key: &str, value: &[u8]) -> usize {
    2 + key.len() + 4 + value.len()
}

/// Bytes of the packed row of these items.
pub(super) fn encoded_len<'a>(items: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> usize {
    1 + items.into_iter().map(|(k, v)| item_len(k, v)).sum::<usize>()
}

/// The packed row of `items`, given in key order.
pub(super) fn encode<'a>(items: impl IntoIterator<Item = (&'a str, &'a [u8])> + Clone) -> Vec<u8> {
    let mut row = Vec::with_capacity(encoded_len(items.clone()));
    row.push(FORMAT);
    for (key, value) in items {
        // Keys are at most 1 KiB and a packed row at most `PACKED_BYTES_MAX`: both fit.
        row.extend_from_slice(&(key.len() as u16).to_le_bytes());
        row.extend_from_slice(key.as_bytes());
        row.extend_from_slice(&(value.len() as u32).to_le_bytes());
        row.extend_from_slice(value);
    }
    row
}

/// The items of a packed row, in key order, borrowed from it.
pub(super) fn decode(row: &[u8]) -> Result<BTreeMap<&str, &[u8]>, StoreError> {
    let mut items = BTreeMap::new();
    for item in Items::new(row)? {
        let (key, value) = item?;
        items.insert(key, value);
    }
    Ok(items)
}

/// The value of `item` in a packed row.
pub(super) fn find<'a>(row: &'a [u8], item: &str) -> Result<Option<&'a [u8]>, StoreError> {
    for found in Items::new(row)? {
        let (key, value) = found?;
        if key == item {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// Walks a packed row's items in order.
pub(super) struct Items<'a> {
    rest: &'a [u8],
}

impl<'a> Items<'a> {
    pub(super) fn new(row: &'a [u8]) -> Result<Self, StoreError> {
        match row.split_first() {
            Some((&FORMAT, rest)) => Ok(Items { rest }),
            Some((format, _)) => Err(corrupt(&format!("format {format}, which this version does not know"))),
            None => Err(corrupt("no bytes")),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.rest.len() < n {
            self.rest = &[];
            return Err(corrupt("an item runs past its end"));
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    fn next_item(&mut self) -> Result<(&'a str, &'a [u8]), StoreError> {
        let key_len = u16::from_le_bytes(self.take(2)?.try_into().expect("two bytes")) as usize;
        let key = std::str::from_utf8(self.take(key_len)?).map_err(|_| corrupt("an item key is not UTF-8"))?;
        let value_len = u32::from_le_bytes(self.take(4)?.try_into().expect("four bytes")) as usize;
        Ok((key, self.take(value_len)?))
    }
}

impl<'a> Iterator for Items<'a> {
    type Item = Result<(&'a str, &'a [u8]), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        (!self.rest.is_empty()).then(|| self.next_item())
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("a packed bucket row is damaged ({what}); restore the data directory from a backup"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_damage_is_an_error_not_a_panic() {
        let items = [("a", &b""[..]), ("count", &b"17"[..]), ("é", &[0u8; 300][..])];
        let row = encode(items.iter().copied());
        assert_eq!(row.len(), encoded_len(items.iter().copied()));
        let decoded = decode(&row).unwrap();
        assert_eq!(decoded.into_iter().collect::<Vec<_>>(), items);
        assert_eq!(find(&row, "count").unwrap(), Some(&b"17"[..]));
        assert_eq!(find(&row, "missing").unwrap(), None);
        assert_eq!(decode(&encode([])).unwrap().len(), 0);
        for cut in 0..row.len() {
            let err = decode(&row[..cut]).err();
            if cut != 0 {
                // Only a cut between items leaves a shorter valid row.
                let between = [1, 1 + 2 + 1 + 4, 1 + 2 + 1 + 4 + 2 + 5 + 4 + 2];
                assert_eq!(err.is_none(), between.contains(&cut), "cut at {cut}: {err:?}");
            } else {
                assert!(err.unwrap().to_string().contains("restore"));
            }
        }
        let mut other = row.clone();
        other[0] = 9;
        assert!(decode(&other).unwrap_err().to_string().contains("format 9"));
    }
}
