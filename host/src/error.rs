//! Errors. What crosses a boundary (to a client, from a job) is a [`RemoteError`]: a closed,
//! serializable code plus a message that says what to do. Storage failures have their own type,
//! since the node reacts to them (it stops taking writes) rather than just reporting them.

pub use grex_client::proto::{ErrorCode, RemoteError};

/// The result of an operation that can fail in a way a client sees.
pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

/// Shorthand for a [`RemoteError`].
pub fn error(code: ErrorCode, message: impl Into<String>) -> RemoteError {
    RemoteError::new(code, message)
}

/// A failure of the node's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine or the disk failed.
    #[error("storage failure: {0}")]
    Engine(String),
    /// The data file was written by an incompatible version of Grex.
    #[error("data file has schema version {found}; this binary reads version {expected}: {hint}")]
    Schema {
        /// Version in the file.
        found: u32,
        /// Version this binary reads.
        expected: u32,
        /// What to do.
        hint: &'static str,
    },
    /// The data file holds something this binary cannot read.
    #[error("data file is corrupt: {0}")]
    Corrupt(String),
    /// An injected fault (tests).
    #[error("injected storage fault after {0} operations")]
    Injected(u64),
}

impl From<StoreError> for RemoteError {
    fn from(e: StoreError) -> Self {
        RemoteError::new(ErrorCode::StorageFailed, format!("{e}; the node refuses writes until it is restarted"))
    }
}
