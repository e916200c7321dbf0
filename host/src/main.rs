//! The `grex` binary; everything lives in the library (`grex::cli`).

use std::ffi::{c_int, c_long};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    /// mimalloc's option setter (`mimalloc.h`), linked in by the `mimalloc` crate.
    fn mi_option_set(option: c_int, value: c_long);
}

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t`: how many ms freed memory is kept
/// before it goes back to the OS (1,000 by default).
const MI_OPTION_PURGE_DELAY: c_int = 15;

fn main() -> std::process::ExitCode {
    // Give freed pages back at once: a node's large buffers (lane frames, bulk change sets) are
    // short-lived, and kept for a second they put bulk writes' peak RSS past the node's memory
    // budget (docs/benchmarks.md, "The allocator's purge delay"). It cost no measurable CPU per
    // job. `MIMALLOC_PURGE_DELAY` still overrides it.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads it when it next purges.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    grex::cli::main()
}
