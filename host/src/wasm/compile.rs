//! Compiling a module in a child process, under a deadline and a memory cap.
//!
//! Compiling is the one thing a user's upload makes the node do whose cost the node cannot bound
//! in advance: Cranelift's time and memory grow with the module's functions, and a few megabytes
//! of wasm can take tens of seconds and gigabytes. So a node started by `grex serve` never
//! compiles in its own process: it runs `grex compile-module`, a child that reads the wasm on
//! stdin, caps its own heap with `RLIMIT_DATA`, and writes the compiled code on stdout. The node
//! kills it at the deadline, and loads the code (a cheap deserialize) only if it finished. Whatever
//! the child allocated goes back to the system when it exits, so a big compile leaves nothing
//! resident in the node.
//!
//! At most [`COMPILES_AT_ONCE`] children run at once; other compiles wait their turn.
//!
//! A child killed at the deadline, out of its memory, or ended by a signal (a stack overflow)
//! gives `module_too_complex`, each with its own message; one that finds the module invalid exits
//! with [`EXIT_INVALID`] and the reason on stderr, which becomes `module_invalid` with that reason.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use wasmtime::{Config, Engine};

use crate::error::{ErrorCode, RemoteError, Result, error};

/// Compiles that may run at once on a node (each a process using up to the memory cap).
pub const COMPILES_AT_ONCE: usize = 2;

/// The child's exit code for a module it refuses; stderr holds the reason.
pub const EXIT_INVALID: i32 = 2;

/// The most compiled code a child may hand back (a module is at most 32 MiB by default; its code
/// is a few times that).
const CODE_BYTES_MAX: usize = 1 << 30;

/// The most of a child's stderr kept for its error message.
const STDERR_BYTES_MAX: usize = 4 << 10;

/// How to compile out of process.
#[derive(Clone, Debug)]
pub struct Compiler {
    /// A `grex` binary (the node's own).
    pub program: PathBuf,
    /// The deadline of one compile.
    pub timeout: Duration,
    /// The cap on the child's heap (`RLIMIT_DATA`).
    pub memory_bytes_max: usize,
}

/// What the engine's compiled code depends on, passed to the child so its code loads in the
/// node's engine (wasmtime checks, and refuses code from a differently configured engine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeSettings {
    /// Fuel metering compiled in.
    pub fuel: bool,
}

impl CodeSettings {
    /// The engine configuration everything compiled code depends on (the node adds its
    /// instance allocator, which code does not depend on).
    pub fn config(&self) -> Config {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .concurrency_support(false)
            .epoch_interruption(true)
            .consume_fuel(self.fuel)
            .max_wasm_stack(512 << 10);
        config
    }

    fn args(&self) -> Vec<&'static str> {
        if self.fuel { vec!["--fuel"] } else { Vec::new() }
    }
}

/// Counts running compiles, so at most [`COMPILES_AT_ONCE`] run.
static RUNNING: Mutex<usize> = Mutex::new(0);
static TURN: Condvar = Condvar::new();

struct Slot;

impl Slot {
    fn take() -> Slot {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        while *running >= COMPILES_AT_ONCE {
            running = TURN.wait(running).unwrap_or_else(|p| p.into_inner());
        }
        *running += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        TURN.notify_one();
    }
}

impl Compiler {
    /// Compiles `component` (component bytes) in a child; the serialized code. Blocks: call off
    /// the async executor.
    pub fn compile(&self, component: &[u8], settings: CodeSettings) -> Result<Vec<u8>> {
        let _slot = Slot::take();
        let started = Instant::now();
        let mut child = Command::new(&self.program)
            .arg("compile-module")
            .args(["--memory-bytes-max", &self.memory_bytes_max.to_string()])
            .args(settings.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                error(
                    ErrorCode::Internal,
                    format!("cannot start {} to compile the module: {e}", self.program.display()),
                )
            })?;
        let (mut stdin, mut stdout, stderr) = (
            child.stdin.take().expect("piped stdin"),
            child.stdout.take().expect("piped stdout"),
            child.stderr.take().expect("piped stderr"),
        );
        let input = component.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let reader = std::thread::spawn(move || {
            let mut code = Vec::new();
            (&mut stdout).take(CODE_BYTES_MAX as u64 + 1).read_to_end(&mut code).map(|_| code)
        });
        let errors = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.take(STDERR_BYTES_MAX as u64).read_to_end(&mut text);
            String::from_utf8_lossy(&text).trim().to_owned()
        });
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if started.elapsed() >= self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(error(ErrorCode::Internal, format!("cannot wait for the compiler: {e}"))),
            }
        };
        let _ = writer.join();
        let code = reader.join().unwrap_or_else(|_| Ok(Vec::new()));
        let stderr = errors.join().unwrap_or_default();
        let Some(status) = status else {
            return Err(too_complex(format!(
                "the module did not compile within {:?} (raise --compile-timeout-secs, or split the module)",
                self.timeout
            )));
        };
        match status.code() {
            Some(0) => {
                let code =
                    code.map_err(|e| error(ErrorCode::Internal, format!("cannot read the compiled code: {e}")))?;
                if code.len() > CODE_BYTES_MAX {
                    return Err(too_complex(format!("the compiled code is over {CODE_BYTES_MAX} bytes")));
                }
                Ok(code)
            }
            Some(EXIT_INVALID) => Err(error(ErrorCode::ModuleInvalid, stderr)),
            _ if out_of_memory(&stderr) => Err(too_complex(format!(
                "compiling the module needed more than {} MiB (raise --compile-memory-mib, or split the module)",
                self.memory_bytes_max >> 20
            ))),
            // Killed by a signal without running out of memory: a stack overflow on a deeply
            // nested function, say.
            None => Err(too_complex(format!("the compiler gave up on the module ({status}): {stderr}"))),
            Some(_) => Err(error(ErrorCode::Internal, format!("the compiler failed ({status}): {stderr}"))),
        }
    }
}

/// Whether a child's stderr says an allocation failed (Rust aborts with that text).
fn out_of_memory(stderr: &str) -> bool {
    stderr.contains("memory allocation of") || stderr.contains("out of memory")
}

fn too_complex(message: String) -> RemoteError {
    error(ErrorCode::ModuleTooComplex, message)
}

/// `grex compile-module`: caps this process's heap at `memory_bytes_max`, reads a component on
/// stdin, compiles it with `settings`, writes the code on stdout. The exit code: 0, or
/// [`EXIT_INVALID`] with the reason on stderr.
pub fn child_main(memory_bytes_max: usize, settings: CodeSettings) -> std::process::ExitCode {
    use std::process::ExitCode;
    // Safety: prctl with PR_SET_PDEATHSIG only sets which signal this process gets when its
    // parent dies: a node killed mid-compile leaves no compiler running on.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if let Err(e) = cap_heap(memory_bytes_max) {
        eprintln!("cannot cap the compiler's memory: {e}");
        return ExitCode::FAILURE;
    }
    let mut component = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut component) {
        eprintln!("cannot read the module: {e}");
        return ExitCode::FAILURE;
    }
    let engine = match Engine::new(&settings.config()) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("cannot start the compiler: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match engine.precompile_component(&component) {
        Ok(code) => match std::io::stdout().lock().write_all(&code) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cannot write the compiled code: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("the component does not compile: {e:#}");
            ExitCode::from(EXIT_INVALID as u8)
        }
    }
}

/// Sets `RLIMIT_DATA` (heap and private writable mappings) of this process.
fn cap_heap(bytes: usize) -> std::io::Result<()> {
    let limit = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
    // Safety: setrlimit reads the struct we pass and changes only this process's limits.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
