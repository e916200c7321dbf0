//! `grex new NAME --lang rust`: a job project that builds without editing (a manifest, the job
//! with a test, the SDK of this grex beside it, a README); and the build of such a project when
//! `grex module put DIR` is given its directory.
//!
//! The SDK is written into the project (`grex-sdk/`) rather than named by a machine path or a
//! registry version: it is the SDK this binary was built with, so the job and the node agree on
//! the guest contract (`guest-sdk/wit/job.wit`) whatever else is installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

#[derive(Args)]
pub(super) struct NewArgs {
    /// The job's name: the package's, and the module name `grex module put` uploads it as.
    name: String,
    /// The language to write it in.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    lang: Lang,
    /// Where to make it (default: a new directory named after the job, here).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Lang {
    /// Rust with the grex SDK, built for `wasm32-unknown-unknown`.
    Rust,
}

/// The Rust template's files: path in the project, text (`{name}` and the versions filled in).
const RUST_FILES: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("templates/rust/Cargo.toml.in")),
    ("src/lib.rs", include_str!("templates/rust/lib.rs.in")),
    ("README.md", include_str!("templates/rust/README.md.in")),
    (".gitignore", include_str!("templates/rust/gitignore.in")),
    (".cargo/config.toml", include_str!("templates/rust/cargo-config.toml.in")),
    ("grex-sdk/Cargo.toml", include_str!("templates/rust/sdk-Cargo.toml.in")),
    ("grex-sdk/src/lib.rs", include_str!("../../../guest-sdk/src/lib.rs")),
    ("grex-sdk/src/alloc.rs", include_str!("../../../guest-sdk/src/alloc.rs")),
    ("grex-sdk/src/bucket.rs", include_str!("../../../guest-sdk/src/bucket.rs")),
    ("grex-sdk/src/error.rs", include_str!("../../../guest-sdk/src/error.rs")),
    ("grex-sdk/wit/job.wit", include_str!("../../../guest-sdk/wit/job.wit")),
];

/// The workspace manifest this binary was built from: the SDK's dependency versions.
const WORKSPACE_MANIFEST: &str = include_str!("../../../Cargo.toml");

/// The version a `[workspace.dependencies]` line of [`WORKSPACE_MANIFEST`] gives `krate`.
fn workspace_version(krate: &str) -> Option<&'static str> {
    let line = WORKSPACE_MANIFEST.lines().find(|l| l.starts_with(&format!("{krate} = ")))?;
    let rest =
        line.split_once("version = \"").map_or_else(|| line.split_once("= \"").map(|(_, r)| r), |(_, r)| Some(r))?;
    rest.split('"').next()
}

/// Checks a job name: what Cargo takes as a package name and a module name can be.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        bail!(
            "`{name}` cannot name a job: use 1 to 64 lower-case letters, digits, `-` or `_`, starting with a letter (e.g. `order-totals`)"
        );
    }
    Ok(())
}

pub(super) fn new(args: NewArgs) -> anyhow::Result<()> {
    check_name(&args.name)?;
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() && std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.next().is_some() {
        bail!("{} exists and is not empty: pick another name, or --dir for an empty or new directory", dir.display());
    }
    let Lang::Rust = args.lang;
    let fill = |text: &str| -> anyhow::Result<String> {
        let mut text = text.replace("{name}", &args.name).replace("{grex_version}", env!("CARGO_PKG_VERSION"));
        for krate in ["wit-bindgen", "serde", "bincode"] {
            let version = workspace_version(krate).with_context(|| format!("no version of {krate} in the manifest"))?;
            text = text.replace(&format!("{{{}}}", krate.replace('-', "_")), version);
        }
        Ok(text)
    };
    for (path, text) in RUST_FILES {
        // The SDK's own files are copied as they are; the template's get the names filled in.
        let text = if !path.starts_with("grex-sdk/") || *path == "grex-sdk/Cargo.toml" {
            fill(text)?
        } else {
            (*text).to_owned()
        };
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("made {} (a Rust job); next:", dir.display());
    println!("  cd {} && cargo test && grex module put .", dir.display());
    Ok(())
}

/// Builds the job project in `dir` (`cargo build --release --target wasm32-unknown-unknown`; Cargo
/// does nothing if it is built) and returns its `.wasm` and its package's name.
pub(super) fn build_project(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    if !dir.join("Cargo.toml").exists() {
        bail!("{} has no Cargo.toml: give a .wasm file, or a job project's directory (`grex new`)", dir.display());
    }
    eprintln!("building the job in {} (cargo build --release --target wasm32-unknown-unknown)", dir.display());
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--target", "wasm32-unknown-unknown", "--message-format=json-render-diagnostics"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo (is a Rust toolchain installed?)")?;
    if !out.status.success() {
        bail!(
            "building the job in {} failed (above); for the wasm target, once: rustup target add wasm32-unknown-unknown",
            dir.display()
        );
    }
    // Cargo says what it made, one JSON message a line.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if message["reason"] != "compiler-artifact"
            || !message["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib"))
        {
            continue;
        }
        let wasm = message["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".wasm"));
        if let Some(wasm) = wasm {
            let name = message["target"]["name"].as_str().unwrap_or_default().replace('_', "-");
            return Ok((PathBuf::from(wasm), name));
        }
    }
    bail!("building {} made no .wasm: its Cargo.toml needs `crate-type = [\"cdylib\"]` under [lib]", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_gets_the_workspace_versions() {
        for krate in ["wit-bindgen", "serde", "bincode"] {
            let version = workspace_version(krate).unwrap_or_else(|| panic!("no version of {krate}"));
            assert!(version.trim_start_matches('=').starts_with(|c: char| c.is_ascii_digit()), "{krate} {version}");
        }
    }

    #[test]
    fn job_names_are_checked() {
        assert!(check_name("order-totals").is_ok() && check_name("a1_b").is_ok());
        for bad in ["", "Caps", "1st", "has space", "dot.ted", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
