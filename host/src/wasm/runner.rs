//! Running one job: a fresh store and instance, the limits armed, the outcome classified.

use wasmtime::Store;
use wasmtime::{Trap, WasmBacktrace};

use super::engine::Runtime;
use super::host_fns::JobState;
use super::modules::LoadedModule;
use crate::data::{BucketData, ChangeSet, JobView};
use crate::error::{ErrorCode, RemoteError, error};

/// What a job is asked to do.
pub struct JobInput<'a> {
    /// Bucket key.
    pub bucket: &'a [u8],
    /// The bucket's flock.
    pub flock: u32,
    /// Module name as the client gave it (for logs).
    pub module_name: &'a str,
    /// Input bytes.
    pub input: &'a [u8],
    /// Refuse writes.
    pub read_only: bool,
    /// The timestamp the job sees.
    pub timestamp_ms: u64,
}

/// A job that ran to completion.
#[derive(Debug)]
pub struct JobRun {
    /// What it returned.
    pub output: Vec<u8>,
    /// What it wrote, if anything.
    pub change: Option<ChangeSet>,
}

impl Runtime {
    /// Runs `module` against `bucket`. The bucket always comes back, unchanged: the caller applies
    /// the change set once it decides to commit it.
    pub fn run(
        &self,
        module: &LoadedModule,
        bucket: BucketData,
        job: &JobInput<'_>,
    ) -> (BucketData, Result<JobRun, RemoteError>) {
        let limits = &self.limits;
        let _running = self.job_running();
        let view = JobView::new(bucket, limits.item_bytes_max, limits.change_set_bytes_max);
        let mut store = Store::new(&self.engine, JobState::new(view, job, job.module_name, limits));
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(self.deadline_ticks());
        if let Some(fuel) = limits.fuel {
            store.set_fuel(fuel).expect("fuel is enabled when a fuel limit is set");
        }
        let outcome = module.pre.instantiate(&mut store).and_then(|world| world.call_run(&mut store, job.input));
        let state = store.into_data();
        if state.log_dropped() > 0 {
            tracing::warn!(
                module = job.module_name,
                dropped = state.log_dropped(),
                "job log lines over the limit were dropped"
            );
        }
        let outcome = match outcome {
            Err(e) => Err(classify_failure(e, &state, self)),
            Ok(Err(message)) => Err(error(ErrorCode::JobFailed, message)),
            Ok(Ok(output)) if output.len() > limits.output_bytes_max => Err(error(
                ErrorCode::OutputTooLarge,
                format!(
                    "the job returned {} bytes, over the {}-byte output limit (raise --output-bytes-max, or return less)",
                    output.len(),
                    limits.output_bytes_max
                ),
            )),
            Ok(Ok(output)) => Ok(output),
        };
        let (bucket, change) = state.view.finish(job.bucket, job.flock);
        (bucket, outcome.map(|output| JobRun { output, change }))
    }
}

fn classify_failure(e: wasmtime::Error, state: &JobState, runtime: &Runtime) -> RemoteError {
    if let Some(reason) = &state.abort {
        return reason.clone();
    }
    let limits = &runtime.limits;
    if state.limiter.memory_refused {
        return error(
            ErrorCode::JobMemoryLimit,
            format!(
                "the job tried to grow its memory past {} MiB (raise --memory-mib, or use less memory)",
                limits.memory_bytes_max >> 20
            ),
        );
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => error(
            ErrorCode::JobTimeout,
            format!("the job exceeded its {} ms deadline (raise --timeout-ms, or do less per job)", limits.timeout_ms),
        ),
        Some(Trap::OutOfFuel) => error(
            ErrorCode::JobFuelExhausted,
            format!(
                "the job used up its {} units of fuel (raise --fuel, or do less per job)",
                limits.fuel.unwrap_or(0)
            ),
        ),
        Some(Trap::MemoryOutOfBounds) if state.panic_message.is_none() && stack_exhausted(&e) => error(
            ErrorCode::JobTrapped,
            "the job trapped: stack overflow (its stack, in its linear memory, ran out: too deep a recursion or \
             too large locals; recurse less, or link it with a larger stack, e.g. -C link-arg=-zstack-size=4194304)",
        ),
        Some(trap) => {
            let cause = state.panic_message.clone().unwrap_or_else(|| trap.to_string());
            error(ErrorCode::JobTrapped, format!("the job trapped: {cause}"))
        }
        None => error(ErrorCode::JobTrapped, format!("the job failed to run: {e:#}")),
    }
}

/// Whether an out-of-bounds access is the job's stack running out. Rust and C put a wasm module's
/// stack in its linear memory, and an overflow shows as an out-of-bounds access (the stack pointer
/// went below 0) with a backtrace of one recursion: wasmtime keeps the innermost 20 frames, and
/// when they are full and hold at most 3 distinct functions, the job was recursing deeply.
fn stack_exhausted(e: &wasmtime::Error) -> bool {
    let Some(trace) = e.downcast_ref::<WasmBacktrace>() else { return false };
    let frames = trace.frames();
    let mut functions: Vec<u32> = frames.iter().map(|frame| frame.func_index()).collect();
    functions.sort_unstable();
    functions.dedup();
    frames.len() >= 16 && functions.len() <= 3
}
