//! `grex new NAME --lang rust|js`: a job project that builds without editing (a manifest, the job
//! with a test, the SDK of this grex beside it, a README); and the build of such a project when
//! `grex module put DIR` is given its directory.
//!
//! The SDK is written into the project (`grex-sdk/` for Rust, `sdk/` for JavaScript) rather than
//! named by a machine path or a registry version: it is the SDK this binary was built with, so the
//! job and the node agree on the guest contract (`guest-sdk/wit/job.wit`) whatever else is
//! installed.

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
    /// JavaScript with the grex SDK, built into a component by componentize-js (needs Node.js).
    Js,
    /// Python with the grex SDK, built into a component by componentize-py (needs Python 3.10+
    /// with `venv`).
    Python,
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
    ("grex-sdk/src/fold.rs", include_str!("../../../guest-sdk/src/fold.rs")),
    ("grex-sdk/wit/job.wit", include_str!("../../../guest-sdk/wit/job.wit")),
];

/// The JavaScript template's files, the same way; `sdk/` holds the JavaScript SDK as it is.
const JS_FILES: &[(&str, &str)] = &[
    ("package.json", include_str!("templates/js/package.json.in")),
    ("job.js", include_str!("templates/js/job.js.in")),
    ("increment.js", include_str!("templates/js/increment.js.in")),
    ("increment.test.js", include_str!("templates/js/increment.test.js.in")),
    ("README.md", include_str!("templates/js/README.md.in")),
    (".gitignore", include_str!("templates/js/gitignore.in")),
    ("sdk/index.js", include_str!("../../../guest-sdk-js/sdk/index.js")),
    ("sdk/build.mjs", include_str!("../../../guest-sdk-js/build.mjs")),
    ("sdk/wit/job.wit", include_str!("../../../guest-sdk/wit/job.wit")),
];

/// The Python template's files.
const PY_FILES: &[(&str, &str)] = &[
    ("pyproject.toml", include_str!("templates/python/pyproject.toml.in")),
    ("requirements.txt", include_str!("../../../guest-sdk-py/requirements.txt")),
    ("job.py", include_str!("templates/python/job.py.in")),
    ("increment.py", include_str!("templates/python/increment.py.in")),
    ("test_increment.py", include_str!("templates/python/test_increment.py.in")),
    ("README.md", include_str!("templates/python/README.md.in")),
    (".gitignore", include_str!("templates/python/gitignore.in")),
    ("sdk/grex_sdk/__init__.py", include_str!("../../../guest-sdk-py/grex_sdk/__init__.py")),
    ("sdk/build.py", include_str!("../../../guest-sdk-py/build.py")),
    ("sdk/wit/job.wit", include_str!("../../../guest-sdk/wit/job.wit")),
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
    let (files, sdk) = match args.lang {
        Lang::Rust => (RUST_FILES, "grex-sdk/"),
        Lang::Js => (JS_FILES, "sdk/"),
        Lang::Python => (PY_FILES, "sdk/"),
    };
    let fill = |text: &str| -> anyhow::Result<String> {
        let mut text = text.replace("{name}", &args.name).replace("{grex_version}", env!("CARGO_PKG_VERSION"));
        for krate in ["wit-bindgen", "serde", "bincode"] {
            let version = workspace_version(krate).with_context(|| format!("no version of {krate} in the manifest"))?;
            text = text.replace(&format!("{{{}}}", krate.replace('-', "_")), version);
        }
        Ok(text)
    };
    for (path, text) in files {
        // The SDK's own files are copied as they are; the template's get the names filled in.
        let text =
            if !path.starts_with(sdk) || *path == "grex-sdk/Cargo.toml" { fill(text)? } else { (*text).to_owned() };
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let (language, test) = match args.lang {
        Lang::Rust => ("Rust", "cargo test"),
        Lang::Js => ("JavaScript", "npm test"),
        Lang::Python => ("Python", "python3 -m unittest"),
    };
    println!("made {} (a {language} job); next:", dir.display());
    println!("  cd {} && {test} && grex module put .", dir.display());
    Ok(())
}

/// Builds the job project in `dir` and returns its `.wasm` and its name: a Rust project with
/// Cargo, a JavaScript one (`package.json`) with npm.
pub(super) fn build_project(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    if dir.join("package.json").exists() {
        return build_js(dir);
    }
    if dir.join("pyproject.toml").exists() {
        return build_py(dir);
    }
    if !dir.join("Cargo.toml").exists() {
        bail!(
            "{} has no Cargo.toml, package.json or pyproject.toml: give a .wasm file, or a job project's directory (`grex new`)",
            dir.display()
        );
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

/// Builds a JavaScript job project (`grex new --lang js`): `npm install` when its dependencies
/// are missing, then `npm run build` unless `NAME.wasm` is newer than every source file.
fn build_js(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("package.json"))?)
        .with_context(|| format!("{}/package.json is not JSON", dir.display()))?;
    let name = manifest["name"].as_str().context("package.json names no package")?.to_owned();
    let wasm = dir.join(format!("{name}.wasm"));
    let npm = |args: &[&str]| -> anyhow::Result<()> {
        eprintln!("building the job in {}: npm {}", dir.display(), args.join(" "));
        let status = Command::new("npm")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            // What npm says goes to stderr: stdout carries only the module's id.
            .stdout(Stdio::from(std::io::stderr()))
            .status()
            .context("running npm (is Node.js 20 or later installed?)")?;
        if !status.success() {
            bail!("npm {} failed in {} (above)", args.join(" "), dir.display());
        }
        Ok(())
    };
    if !dir.join("node_modules").exists() {
        npm(&["install", "--no-audit", "--no-fund"])?;
    }
    let built = std::fs::metadata(&wasm).and_then(|m| m.modified()).ok();
    if built.is_none_or(|built| newest_source(dir).is_some_and(|source| source > built)) {
        npm(&["run", "build", "--silent"])?;
    }
    if !wasm.exists() {
        bail!("building {} made no {name}.wasm: its `build` script must write it", dir.display());
    }
    Ok((wasm, name))
}

/// Builds a Python job project (`grex new --lang python`): a `.venv` with `requirements.txt`
/// (componentize-py) when there is none, then `sdk/build.py job.py NAME.wasm` unless `NAME.wasm`
/// is newer than every source file.
fn build_py(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let manifest = std::fs::read_to_string(dir.join("pyproject.toml"))?;
    let name = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("name = \""))
        .and_then(|rest| rest.split('"').next())
        .with_context(|| {
            format!("{}/pyproject.toml names no project (`name = \"...\"` under [project])", dir.display())
        })?
        .to_owned();
    let wasm = dir.join(format!("{name}.wasm"));
    let run = |program: &Path, args: &[&str]| -> anyhow::Result<()> {
        eprintln!("building the job in {}: {} {}", dir.display(), program.display(), args.join(" "));
        let status = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            // What the tools say goes to stderr: stdout carries only the module's id.
            .stdout(Stdio::from(std::io::stderr()))
            .status()
            .with_context(|| format!("running {}", program.display()))?;
        if !status.success() {
            bail!("{} {} failed in {} (above)", program.display(), args.join(" "), dir.display());
        }
        Ok(())
    };
    let python = dir.join(".venv/bin/python");
    if !python.exists() {
        run(Path::new("python3"), &["-m", "venv", ".venv"])
            .context("making a virtual environment (is Python 3.10 or later installed, with venv?)")?;
        run(&python, &["-m", "pip", "install", "--quiet", "-r", "requirements.txt"])?;
    }
    let built = std::fs::metadata(&wasm).and_then(|m| m.modified()).ok();
    if built.is_none_or(|built| newest_source(dir).is_some_and(|source| source > built)) {
        run(&python, &["sdk/build.py", "job.py", &format!("{name}.wasm")])?;
    }
    if !wasm.exists() {
        bail!("building {} made no {name}.wasm", dir.display());
    }
    Ok((wasm, name))
}

/// When the newest source file of a JavaScript or Python project changed (its installed
/// dependencies aside).
fn newest_source(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let modified = if path.is_dir() {
            if name == "node_modules" || name == ".git" || name == ".venv" || name == "__pycache__" {
                continue;
            }
            newest_source(&path)
        } else if path
            .extension()
            .is_some_and(|e| ["js", "mjs", "py", "wit", "json", "toml", "txt"].iter().any(|x| e == *x))
        {
            entry.metadata().and_then(|m| m.modified()).ok()
        } else {
            None
        };
        newest = newest.max(modified);
    }
    newest
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
    fn every_sdk_source_is_vendored() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk/src");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let vendored = format!("grex-sdk/src/{name}");
            assert!(
                RUST_FILES.iter().any(|(path, _)| *path == vendored),
                "{vendored} is missing from the Rust template"
            );
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
