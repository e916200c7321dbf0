//! raft-rs logs through `slog`; this drain hands its records to `tracing` under the target
//! `grex::raft`, one level quieter than raft-rs's own (its `info` is every election of every
//! group, which is `debug` for a node with hundreds of groups).

use std::fmt::{self, Write as _};

use slog::{Drain, KV, Key, Level, OwnedKVList, Record, Serializer, o};

/// A logger for raft-rs that writes through `tracing`.
pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), o!())
}

struct TracingDrain;

/// Collects a record's key-value pairs as ` key=value` text.
struct Pairs(String);

impl Serializer for Pairs {
    fn emit_arguments(&mut self, key: Key, value: &fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), slog::Never> {
        let enabled = match record.level() {
            Level::Critical | Level::Error => tracing::enabled!(target: "grex::raft", tracing::Level::ERROR),
            Level::Warning => tracing::enabled!(target: "grex::raft", tracing::Level::WARN),
            Level::Info => tracing::enabled!(target: "grex::raft", tracing::Level::DEBUG),
            Level::Debug | Level::Trace => tracing::enabled!(target: "grex::raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut pairs = Pairs(String::new());
        let _ = record.kv().serialize(record, &mut pairs);
        let _ = values.serialize(record, &mut pairs);
        let message = record.msg();
        let pairs = pairs.0;
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "grex::raft", "{message}{pairs}"),
            Level::Warning => tracing::warn!(target: "grex::raft", "{message}{pairs}"),
            Level::Info => tracing::debug!(target: "grex::raft", "{message}{pairs}"),
            Level::Debug | Level::Trace => tracing::trace!(target: "grex::raft", "{message}{pairs}"),
        }
        Ok(())
    }
}
