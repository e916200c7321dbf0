//! Grex: a node that keeps buckets of items on disk and runs sandboxed wasm jobs next to them.
//!
//! # Layout
//!
//! - [`data`]: buckets, the view a job has of one, change sets. Pure logic, no I/O.
//! - [`storage`]: the [`Store`](storage::Store) trait; redb on disk, maps in memory for tests.
//! - [`wasm`]: wasmtime engine, module cache, host functions (the guest's imports), job runner.
//! - [`node`]: the [`Node`]: executor threads that own buckets and the cache, the group committer.
//!   This is the library API an application embeds to run jobs without a network hop.
//! - [`api`]: the client-facing servers, HTTP/JSON (axum) and QUIC (quinn), and their TLS identity.
//! - [`cli`]: the `grex` command line.
//! - [`config`], [`error`]: settings with their defaults, and the error types.
//!
//! `ARCHITECTURE.md` at the repository root follows a job through these pieces.

pub mod access;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod data;
pub mod error;
pub mod metrics;
pub mod node;
pub mod scan;
pub mod storage;
pub mod wasm;

#[cfg(test)]
pub(crate) mod testing;

pub use config::{Limits, NodeConfig};
pub use error::{ErrorCode, RemoteError};
pub use node::Node;
