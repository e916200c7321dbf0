//! The `grex` binary; everything lives in the library (`grex::cli`).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    grex::cli::main()
}
