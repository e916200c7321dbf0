//! Every import a guest sees (`grex:job/bucket` and `grex:job/context`), over the job's
//! [`JobState`]. A host function that catches a limit breach records the named error in
//! [`JobState::abort`] and traps, so the job ends at once and the runner reports that error.

use wasmtime::component::bindgen;
use wasmtime::{ResourceLimiter, Result};

use super::runner::JobInput;
use crate::config::Limits;
use crate::data::{JobView, ViewError};
use crate::error::{ErrorCode, RemoteError, error};

bindgen!({
    world: "job",
    path: "../guest-sdk/wit",
    imports: { default: trappable },
});

use self::grex::job::{bucket, context};
pub(crate) use Job as JobWorld;
pub(crate) use JobPre as JobWorldPre;

/// The longest log line kept.
const LOG_LINE_BYTES_MAX: usize = 1024;
/// The most keys one `list` call returns.
const LIST_PAGE_MAX: u32 = 1000;

/// What one job's store holds.
pub struct JobState {
    pub(crate) view: JobView,
    pub(crate) bucket_key: Vec<u8>,
    pub(crate) module: String,
    pub(crate) timestamp_ms: u64,
    pub(crate) read_only: bool,
    /// Why the host ended the job, if it did.
    pub(crate) abort: Option<RemoteError>,
    /// The first panic message the guest logged, for the trap report.
    pub(crate) panic_message: Option<String>,
    pub(crate) limiter: JobLimiter,
    log_lines: u32,
    log_lines_max: u32,
    log_dropped: u32,
}

impl JobState {
    pub(crate) fn new(view: JobView, input: &JobInput<'_>, module: &str, limits: &Limits) -> Self {
        JobState {
            view,
            bucket_key: input.bucket.to_vec(),
            module: module.to_owned(),
            timestamp_ms: input.timestamp_ms,
            read_only: input.read_only,
            abort: None,
            panic_message: None,
            limiter: JobLimiter { memory_bytes_max: limits.memory_bytes_max, memory_refused: false },
            log_lines: 0,
            log_lines_max: limits.log_lines_max,
            log_dropped: 0,
        }
    }

    /// Log lines the job wrote past its limit.
    pub(crate) fn log_dropped(&self) -> u32 {
        self.log_dropped
    }

    fn stop(&mut self, reason: RemoteError) -> wasmtime::Error {
        let message = reason.message.clone();
        self.abort.get_or_insert(reason);
        wasmtime::Error::msg(message)
    }

    fn stop_on_view_error(&mut self, e: ViewError) -> wasmtime::Error {
        let code = e.code();
        let hint = match code {
            ErrorCode::ItemTooLarge => " (raise the node's --item-bytes-max, or split the value)",
            ErrorCode::ChangeSetTooLarge => " (raise --change-set-bytes-max, or split the work over several jobs)",
            _ => "",
        };
        self.stop(error(code, format!("{e}{hint}")))
    }

    fn refuse_write_if_read_only(&mut self, item: &str) -> Result<()> {
        if self.read_only {
            return Err(self.stop(error(
                ErrorCode::ReadOnlyViolation,
                format!("a read-only job tried to write item `{item}`; run it without --read-only"),
            )));
        }
        Ok(())
    }
}

impl bucket::Host for JobState {
    fn get(&mut self, item: String) -> Result<Option<Vec<u8>>> {
        match self.view.get(&item) {
            Ok(value) => Ok(value.map(<[u8]>::to_vec)),
            Err(e) => Err(self.stop_on_view_error(e)),
        }
    }

    fn put(&mut self, item: String, value: Vec<u8>) -> Result<()> {
        self.refuse_write_if_read_only(&item)?;
        self.view.put(&item, value).map_err(|e| self.stop_on_view_error(e))
    }

    fn delete(&mut self, item: String) -> Result<bool> {
        self.refuse_write_if_read_only(&item)?;
        self.view.delete(&item).map_err(|e| self.stop_on_view_error(e))
    }

    fn list_keys(&mut self, prefix: String, start_after: Option<String>, limit: u32) -> Result<Vec<String>> {
        Ok(self.view.list(&prefix, start_after.as_deref(), limit.min(LIST_PAGE_MAX) as usize))
    }
}

impl context::Host for JobState {
    fn bucket_key(&mut self) -> Result<Vec<u8>> {
        Ok(self.bucket_key.clone())
    }

    fn timestamp_ms(&mut self) -> Result<u64> {
        Ok(self.timestamp_ms)
    }

    fn log(&mut self, level: context::Level, message: String) -> Result<()> {
        if level == context::Level::Error && message.starts_with("job panicked") && self.panic_message.is_none() {
            self.panic_message = Some(truncate(&message, LOG_LINE_BYTES_MAX).to_owned());
        }
        if self.log_lines >= self.log_lines_max {
            self.log_dropped += 1;
            return Ok(());
        }
        self.log_lines += 1;
        let line = truncate(&message, LOG_LINE_BYTES_MAX);
        let bucket = String::from_utf8_lossy(&self.bucket_key);
        let module = &self.module;
        // Within a span that names the module, so that `GREX_LOG` can pick one module's lines:
        // `grex::job[job{module=counter}]=debug` (docs/operations.md, "Logs").
        let span = tracing::info_span!(target: "grex::job", "job", module = %module);
        let _in_span = span.enter();
        match level {
            context::Level::Debug => tracing::debug!(target: "grex::job", %module, %bucket, "{line}"),
            context::Level::Info => tracing::info!(target: "grex::job", %module, %bucket, "{line}"),
            context::Level::Warn => tracing::warn!(target: "grex::job", %module, %bucket, "{line}"),
            context::Level::Error => tracing::error!(target: "grex::job", %module, %bucket, "{line}"),
        }
        Ok(())
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Refuses memory growth past the job's limit and remembers that it did, so the runner can report
/// `job_memory_limit` rather than the trap the guest's allocator turns the refusal into.
pub struct JobLimiter {
    pub(crate) memory_bytes_max: usize,
    pub(crate) memory_refused: bool,
}

/// Tables a job may have: generous for real code, small enough to bound memory.
const TABLE_ELEMENTS_MAX: usize = 100_000;

impl ResourceLimiter for JobLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> Result<bool> {
        if desired > self.memory_bytes_max {
            self.memory_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> Result<bool> {
        Ok(desired <= TABLE_ELEMENTS_MAX)
    }
}
