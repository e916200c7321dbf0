//! Write Grex jobs in Rust.
//!
//! A job is one function over a [`Bucket`] and the input bytes; [`job!`] exports it. The node runs
//! it once per request in a fresh sandbox, against the bucket's latest committed state. What the
//! job writes commits atomically when it returns `Ok`, and is discarded when it returns `Err`,
//! panics or breaks a limit.
//!
//! ```no_run
//! use grex_sdk::{Bucket, Error};
//!
//! grex_sdk::job!(counter);
//!
//! /// Adds the decimal increment in `input` (default 1) to the item `count`.
//! fn counter(bucket: &mut Bucket, input: &[u8]) -> Result<String, Error> {
//!     let text = std::str::from_utf8(input).map_err(|_| Error::msg("input must be UTF-8"))?;
//!     let step: i64 = match text.trim() {
//!         "" => 1,
//!         t => t.parse().map_err(|_| Error::msg(format!("`{t}` is not a decimal integer")))?,
//!     };
//!     let count = bucket.get_text("count")?.map_or(Ok(0), |c| c.parse::<i64>())
//!         .map_err(|_| Error::msg("item `count` is not a decimal integer"))?;
//!     let count = count.checked_add(step).ok_or(Error::msg("count would overflow"))?;
//!     bucket.put_text("count", &count.to_string());
//!     Ok(count.to_string())
//! }
//! ```
//!
//! Build it for `wasm32-unknown-unknown` as a `cdylib` and upload the `.wasm` file: the node turns
//! the core module into a component on upload. Link with a 64 KiB stack
//! (`-C link-arg=-zstack-size=65536`) for the fastest start; the workspace's `.cargo/config.toml`
//! shows how.
//!
//! Typed items ([`Bucket::get`], [`Bucket::put`]) are encoded with serde and bincode 2's standard
//! configuration, so any job (or client) that uses the same types reads them back.
//!
//! The default feature `bump-alloc` installs a never-freeing allocator: a job's instance is thrown
//! away after one run, so freeing memory is wasted work. A job that allocates far more than it keeps
//! (and so could exhaust its memory limit) turns the feature off to get Rust's default allocator.

mod alloc;
mod bucket;
mod error;
pub mod fold;

pub use bucket::{Bucket, ItemKeys, LIST_PAGE_MAX};
pub use error::Error;

/// Generated from `wit/job.wit`; the SDK's types wrap it, jobs need not use it directly.
#[doc(hidden)]
#[allow(missing_docs, unsafe_op_in_unsafe_fn, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "job",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_job_world",
        default_bindings_module: "::grex_sdk::bindings",
    });
}

pub use bindings::grex::job::context::Level;

/// Milliseconds since the Unix epoch, assigned by the node before the job started.
///
/// The same value for the whole job: jobs never read a clock, so replaying a job gives the same
/// result.
pub fn timestamp_ms() -> u64 {
    bindings::grex::job::context::timestamp_ms()
}

/// Writes a line to the node's log (truncated to 1 KiB; at most 64 lines a job).
pub fn log(level: Level, message: &str) {
    bindings::grex::job::context::log(level, message);
}

/// What a job can return as its output.
pub trait Output {
    /// The bytes sent back to the client.
    fn into_output(self) -> Vec<u8>;
}

impl Output for Vec<u8> {
    fn into_output(self) -> Vec<u8> {
        self
    }
}

impl Output for String {
    fn into_output(self) -> Vec<u8> {
        self.into_bytes()
    }
}

impl Output for &str {
    fn into_output(self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

impl Output for () {
    fn into_output(self) -> Vec<u8> {
        Vec::new()
    }
}

/// Exports `fn(&mut Bucket, &[u8]) -> Result<impl Output, Error>` as the crate's job.
///
/// Use it once, at the top level of a `cdylib` crate.
#[macro_export]
macro_rules! job {
    ($run:path) => {
        #[doc(hidden)]
        pub struct __GrexJob;

        impl $crate::bindings::Guest for __GrexJob {
            fn run(input: ::std::vec::Vec<u8>) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                $crate::__private::run_job(&input, $run)
            }
        }

        $crate::bindings::__export_job_world!(__GrexJob with_types_in $crate::bindings);
    };
}

#[doc(hidden)]
pub mod __private {
    use crate::{Bucket, Error, Output};

    /// Runs a job function: reports panics to the node's log and turns errors into the WIT result.
    pub fn run_job<O: Output>(
        input: &[u8],
        run: fn(&mut Bucket, &[u8]) -> Result<O, Error>,
    ) -> Result<Vec<u8>, String> {
        std::panic::set_hook(Box::new(|info| {
            crate::log(crate::Level::Error, &format!("job panicked: {info}"));
        }));
        let mut bucket = Bucket::new();
        run(&mut bucket, input).map(Output::into_output).map_err(|e| e.to_string())
    }
}
