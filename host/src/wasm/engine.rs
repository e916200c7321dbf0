//! The engine: configuration, the pooling allocator and the epoch ticker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::host_fns::{JobState, JobWorld};
use super::modules::Modules;
use crate::config::Limits;

/// How often the epoch advances: the granularity of job deadlines.
pub const EPOCH_TICK_MS: u64 = 10;

/// Linear memory kept mapped and reset with `memset` between instances instead of being unmapped:
/// much cheaper for small jobs (FACTS.md: about 3×).
const MEMORY_KEEP_RESIDENT_BYTES: usize = 1 << 20;
const TABLE_KEEP_RESIDENT_BYTES: usize = 64 << 10;

/// Compiled modules kept in memory; least recently used ones are dropped beyond this.
pub const MODULES_CACHED_MAX: usize = 256;

/// Everything needed to run jobs: engine, linker, compiled modules, limits.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) modules: Modules,
    pub(crate) limits: Limits,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    /// A runtime whose pool has room for `instances` jobs at once.
    pub fn new(limits: Limits, instances: u32) -> wasmtime::Result<Self> {
        let engine = Engine::new(&engine_config(&limits, instances))?;
        let mut linker: Linker<JobState> = Linker::new(&engine);
        JobWorld::add_to_linker::<JobState, HasSelf<JobState>>(&mut linker, |state| state)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_ticker(engine.clone(), ticker_stop.clone());
        let modules = Modules::new(engine.clone(), linker, MODULES_CACHED_MAX);
        Ok(Runtime { engine, modules, limits, ticker_stop })
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
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn engine_config(limits: &Limits, instances: u32) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances * 2)
        .total_memories(instances)
        .total_tables(instances * 2)
        .max_memories_per_component(1)
        .max_tables_per_component(2)
        .max_memory_size(limits.memory_bytes_max)
        .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT_BYTES)
        .table_keep_resident(TABLE_KEEP_RESIDENT_BYTES);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .concurrency_support(false)
        .epoch_interruption(true)
        .consume_fuel(limits.fuel.is_some())
        .max_wasm_stack(512 << 10)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

fn spawn_ticker(engine: Engine, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("grex-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                engine.increment_epoch();
            }
        })
        .expect("spawn the epoch ticker");
}
