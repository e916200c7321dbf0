//! The bucket handle a job works through.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::bindings::grex::job::{bucket as host, context};

/// The most keys one [`Bucket::list_page`] call may ask for.
pub const LIST_PAGE_MAX: u32 = 1000;

/// The bucket a job runs against.
///
/// Reads see the latest committed state plus this job's own writes. Writes commit together when
/// the job returns `Ok`.
pub struct Bucket {
    _private: (),
}

impl Bucket {
    pub(crate) fn new() -> Self {
        Bucket { _private: () }
    }

    /// The bucket's key.
    pub fn key(&self) -> Vec<u8> {
        context::bucket_key()
    }

    /// An item's raw bytes, or `None` if the bucket has no such item.
    pub fn get_bytes(&self, item: &str) -> Option<Vec<u8>> {
        host::get(item)
    }

    /// Sets an item's raw bytes.
    pub fn put_bytes(&mut self, item: &str, value: &[u8]) {
        host::put(item, value);
    }

    /// An item as UTF-8 text, or `None` if the bucket has no such item.
    pub fn get_text(&self, item: &str) -> Result<Option<String>, Error> {
        self.get_bytes(item)
            .map(|bytes| String::from_utf8(bytes).map_err(|_| Error::msg(format!("item `{item}` is not UTF-8 text"))))
            .transpose()
    }

    /// Sets an item to UTF-8 text.
    pub fn put_text(&mut self, item: &str, value: &str) {
        self.put_bytes(item, value.as_bytes());
    }

    /// An item decoded with serde + bincode, or `None` if the bucket has no such item.
    pub fn get<T: DeserializeOwned>(&self, item: &str) -> Result<Option<T>, Error> {
        let Some(bytes) = self.get_bytes(item) else { return Ok(None) };
        let (value, _) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map_err(|e| Error::msg(format!("item `{item}` does not decode as the requested type: {e}")))?;
        Ok(Some(value))
    }

    /// Sets an item to a value encoded with serde + bincode.
    pub fn put<T: Serialize + ?Sized>(&mut self, item: &str, value: &T) -> Result<(), Error> {
        let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| Error::msg(format!("item `{item}` could not be encoded: {e}")))?;
        self.put_bytes(item, &bytes);
        Ok(())
    }

    /// Removes an item; returns whether it existed.
    pub fn delete(&mut self, item: &str) -> bool {
        host::delete(item)
    }

    /// One page of item keys starting with `prefix`, strictly after `start_after`, at most
    /// `limit` (capped at [`LIST_PAGE_MAX`]).
    pub fn list_page(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Vec<String> {
        host::list_keys(prefix, start_after, limit.min(LIST_PAGE_MAX))
    }

    /// Every item key starting with `prefix`, in byte order, fetched a page at a time.
    pub fn list(&self, prefix: &str) -> ItemKeys {
        ItemKeys { prefix: prefix.to_owned(), page: Vec::new().into_iter(), last: None, done: false }
    }
}

/// The item keys under a prefix, fetched lazily a page at a time; see [`Bucket::list`].
pub struct ItemKeys {
    prefix: String,
    page: std::vec::IntoIter<String>,
    last: Option<String>,
    done: bool,
}

impl Iterator for ItemKeys {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if let Some(key) = self.page.next() {
            self.last = Some(key.clone());
            return Some(key);
        }
        if self.done {
            return None;
        }
        let page = host::list_keys(&self.prefix, self.last.as_deref(), LIST_PAGE_MAX);
        self.done = page.len() < LIST_PAGE_MAX as usize;
        self.page = page.into_iter();
        let key = self.page.next()?;
        self.last = Some(key.clone());
        Some(key)
    }
}
