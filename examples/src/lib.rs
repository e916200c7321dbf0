//! Programs that use Grex: `embedded` runs a node inside the application's own process;
//! `client` talks to a running node over QUIC. Run them with
//! `cargo run -p grex-examples --bin embedded` (after `scripts/build-jobs.sh`).
