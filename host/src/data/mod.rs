//! The data model: a bucket is a sorted map of items with a version; a job reads it through a
//! [`JobView`] that records its writes; those writes become a [`ChangeSet`], the unit that commits
//! atomically (and that a replicated log carries between herders).
//!
//! Everything here is pure: no I/O, no clock, no locks. Limits are checked here, so a breach is
//! caught the moment the job makes it.

mod bucket;
pub mod builtin;
mod change_set;

pub use bucket::{BucketData, JobView, ViewError};
pub use builtin::{Builtin, BuiltinReply};
pub use change_set::{Change, ChangeSet, ChangeView, EncodedChange, ItemWrite, WriteView};
pub use grex_client::proto::flock_of;
