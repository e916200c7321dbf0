//! The wasm runtime: one wasmtime [`Engine`](wasmtime::Engine) with the pooling allocator, modules
//! compiled once and cached by content hash, and a fresh sandbox per job.
//!
//! Read first: [`Runtime::run`], which runs one job against a bucket and returns the bucket and the
//! job's result; `host_fns` for every import a guest sees.
//!
//! Invariants:
//! - A job sees only the `grex:job` world (`guest-sdk/wit/job.wit`): no WASI, no clock, no
//!   randomness. Its timestamp is assigned by the node before it starts.
//! - Every job gets a new `Store` and instance; nothing survives between jobs.
//! - A job that traps, times out or breaks a limit returns a named error and produces no change
//!   set; the bucket it ran against comes back untouched.
//! - Deadlines use epoch interruption (a ticker thread, [`EPOCH_TICK_MS`]); fuel is optional.
//!   Both are armed before instantiation, since instantiation already runs guest code.

pub mod compile;
mod engine;
mod host_fns;
mod modules;
mod runner;

pub use engine::{EPOCH_TICK_MS, PoolUsage, Runtime};
pub use modules::{LoadedModule, module_id_text, parse_module_id};
pub use runner::{JobInput, JobRun};
