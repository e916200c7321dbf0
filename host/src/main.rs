//! The `grex` binary; everything lives in the library (`grex::cli`).

fn main() -> std::process::ExitCode {
    grex::cli::main()
}
