//! The engine: configuration, the pooling allocator and the epoch ticker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::compile::{CodeSettings, Compiler};

use super::host_fns::{JobState, JobWorld};
use super::modules::Modules;
use crate::config::Limits;

/// How often the epoch advances: the granularity of job deadlines.
pub const EPOCH_TICK_MS: u64 = 10;
/// Ticks with no job running after which the ticker sleeps until the next job starts.
const IDLE_TICKS_BEFORE_PARKING: u32 = 100;

/// Linear memory kept mapped and reset by copying (the memory's image) or `memset` between
/// instances instead of being released with `madvise`: much cheaper for small jobs (FACTS.md:
/// about 3×), and for jobs with large pre-initialized images (JavaScript, Python) it turns every
/// page a job writes from a copy-on-write fault, with its TLB shootdown across cores, into a copy
/// at the end (docs/benchmarks.md, "A job's cost by language": Python jobs 2× faster than at
/// 1 MiB). A job's memory stays within `--memory-mib` either way; this much of it per executor
/// stays resident between jobs.
const MEMORY_KEEP_RESIDENT_BYTES: usize = 32 << 20;
const TABLE_KEEP_RESIDENT_BYTES: usize = 64 << 10;

/// Core instances one job's component may have: a Rust or JavaScript job has one or two; a
/// Python job (componentize-py) links its interpreter from several libraries, each an instance.
pub(crate) const CORE_INSTANCES_PER_JOB: u32 = 64;
/// Function tables one job's component may have.
const TABLES_PER_JOB: u32 = 4;

/// Compiled modules kept in memory; least recently used ones are dropped beyond this.
pub const MODULES_CACHED_MAX: usize = 256;

/// Everything needed to run jobs: engine, linker, compiled modules, limits.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) modules: Modules,
    pub(crate) limits: Limits,
    ticker: Arc<Ticker>,
    /// Jobs the pool has room for at once.
    instances: u32,
}

/// How much of the instance pool is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// Jobs the pool has room for at once (one instance and one linear memory each).
    pub slots: u64,
    /// Component instances allocated now (running jobs).
    pub instances: u64,
    /// Linear memories allocated now.
    pub memories: u64,
}

impl Runtime {
    /// A runtime whose pool has room for `instances` jobs at once.
    pub fn new(limits: Limits, instances: u32) -> wasmtime::Result<Self> {
        let engine = Engine::new(&engine_config(&limits, instances))?;
        let mut linker: Linker<JobState> = Linker::new(&engine);
        JobWorld::add_to_linker::<JobState, HasSelf<JobState>>(&mut linker, |state| state)?;
        let ticker = Ticker::spawn(engine.clone());
        let modules = Modules::new(engine.clone(), linker, MODULES_CACHED_MAX);
        Ok(Runtime { engine, modules, limits, ticker, instances })
    }

    /// How much of the instance pool is taken now.
    pub fn pool_usage(&self) -> PoolUsage {
        let metrics = self.engine.pooling_allocator_metrics();
        PoolUsage {
            slots: u64::from(self.instances),
            instances: metrics.as_ref().map_or(0, |m| m.component_instances()),
            memories: metrics.as_ref().map_or(0, |m| m.memories() as u64),
        }
    }

    /// Compiles modules in child processes of `program` (a `grex` binary), under the limits'
    /// compile deadline and memory cap.
    pub fn with_compiler(mut self, program: std::path::PathBuf) -> Self {
        let compiler = Compiler {
            program,
            timeout: Duration::from_millis(self.limits.compile_timeout_ms),
            memory_bytes_max: self.limits.compile_memory_bytes_max,
        };
        self.modules.set_compiler(compiler, code_settings(&self.limits));
        self
    }

    /// Keeps compiled modules in `dir` too, so a restart loads them instead of compiling again.
    pub fn with_code_dir(mut self, dir: std::path::PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        self.modules.set_code_dir(dir);
        Ok(self)
    }

    /// Compiles a module (a component or an SDK-built core module) for [`Runtime::run`].
    pub fn compile(&self, wasm: &[u8]) -> crate::error::Result<std::sync::Arc<super::LoadedModule>> {
        self.modules.compile(wasm)
    }

    /// Epoch ticks to allow a job with this timeout (one extra so a job never gets less).
    pub(crate) fn deadline_ticks(&self) -> u64 {
        self.limits.timeout_ms.div_ceil(EPOCH_TICK_MS) + 1
    }

    /// Keeps the epoch advancing until the returned guard drops (a job is running).
    pub(crate) fn job_running(&self) -> JobRunning<'_> {
        self.ticker.running.fetch_add(1, Ordering::SeqCst);
        if self.ticker.parked.load(Ordering::SeqCst) {
            self.ticker.thread.unpark();
        }
        JobRunning(&self.ticker)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::Relaxed);
        self.ticker.thread.unpark();
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK_MS`] while jobs run, and sleeps when none has
/// run for a second, so an idle node does not wake 100 times a second.
struct Ticker {
    thread: Thread,
    running: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
}

impl Ticker {
    fn spawn(engine: Engine) -> Arc<Ticker> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Ticker>>(1);
        let handle = std::thread::Builder::new()
            .name("grex-epoch".into())
            .spawn(move || {
                let Ok(ticker) = rx.recv() else { return };
                ticker.run(&engine);
            })
            .expect("spawn the epoch ticker");
        let ticker = Arc::new(Ticker {
            thread: handle.thread().clone(),
            running: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        tx.send(ticker.clone()).expect("the epoch ticker waits for its state");
        ticker
    }

    fn run(&self, engine: &Engine) {
        let mut idle = 0;
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
            engine.increment_epoch();
            if self.running.load(Ordering::SeqCst) > 0 {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < IDLE_TICKS_BEFORE_PARKING {
                continue;
            }
            // A job that starts after `parked` is set sees it and unparks this thread; one that
            // started before is seen here. (SeqCst on both sides makes one of the two true.)
            self.parked.store(true, Ordering::SeqCst);
            while self.running.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::Relaxed) {
                std::thread::park();
            }
            self.parked.store(false, Ordering::SeqCst);
            idle = 0;
        }
    }
}

/// A running job; see [`Runtime::job_running`].
pub(crate) struct JobRunning<'a>(&'a Ticker);

impl Drop for JobRunning<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

fn engine_config(limits: &Limits, instances: u32) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances * CORE_INSTANCES_PER_JOB)
        .max_core_instances_per_component(CORE_INSTANCES_PER_JOB)
        .total_memories(instances)
        .total_tables(instances * TABLES_PER_JOB)
        .max_memories_per_component(1)
        .max_tables_per_component(TABLES_PER_JOB)
        .max_memory_size(limits.memory_bytes_max)
        .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT_BYTES)
        // Resetting only the pages a job wrote (`PAGEMAP_SCAN`) found none to copy here, so every
        // page was released and faulted in again: measured no faster than 1 MiB kept resident.
        .pagemap_scan(wasmtime::Enabled::No)
        .table_keep_resident(TABLE_KEEP_RESIDENT_BYTES);
    let mut config = code_settings(limits).config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// What the code compiled under `limits` depends on.
fn code_settings(limits: &Limits) -> CodeSettings {
    CodeSettings { fuel: limits.fuel.is_some() }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// `(module (func (export "f") (loop (br 0))))`: spins until interrupted.
    const SPIN: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // header
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: [] -> []
        0x03, 0x02, 0x01, 0x00, // one function of that type
        0x07, 0x05, 0x01, 0x01, b'f', 0x00, 0x00, // export "f"
        0x0a, 0x09, 0x01, 0x07, 0x00, 0x03, 0x40, 0x0c, 0x00, 0x0b, 0x0b, // loop { br 0 }
    ];

    #[test]
    fn an_idle_ticker_sleeps_and_a_job_wakes_it_so_deadlines_still_fire() {
        let runtime = Arc::new(Runtime::new(Limits::default(), 1).expect("runtime"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runtime.ticker.parked.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the ticker never went to sleep while idle");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let spinner = runtime.clone();
        std::thread::spawn(move || {
            let module = wasmtime::Module::new(&spinner.engine, SPIN).expect("module");
            let mut store = wasmtime::Store::new(&spinner.engine, ());
            store.set_epoch_deadline(2);
            let _running = spinner.job_running();
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).expect("instance");
            let spin = instance.get_typed_func::<(), ()>(&mut store, "f").expect("f");
            let _ = tx.send(spin.call(&mut store, ()).map_err(|e| e.downcast_ref::<wasmtime::Trap>().copied()));
        });
        let outcome = rx.recv_timeout(Duration::from_secs(10)).expect("the job was never interrupted");
        assert_eq!(outcome, Err(Some(wasmtime::Trap::Interrupt)));
    }
}
