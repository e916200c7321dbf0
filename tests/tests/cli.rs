//! The `grex` client commands against a real node, as a shell user runs them.

use std::process::{Command, Stdio};

use grex_tests::{GrexNode, grex, grex_bin};

#[test]
fn a_reader_that_goes_away_ends_a_listing_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &[]);
    let url = format!("http://{}", node.http_addr());
    // As `grex flock ls | head -0`: the pipe's reader is gone before the listing is written.
    let mut child = Command::new(grex_bin())
        .args(["flock", "ls", "--node", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run grex");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("grex ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {err}", out.status);
    assert!(err.is_empty(), "{err}");
}

#[test]
fn a_paced_bench_sends_no_more_than_its_rate_and_a_rate_that_is_not_positive_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &[]);
    let wasm = dir.path().join("counter.wasm");
    std::fs::write(&wasm, grex_tests::job_wasm("counter")).unwrap();
    let ca = node.ca.to_str().unwrap().to_owned();
    grex_tests::grex(&["module", "put", wasm.to_str().unwrap(), "--name", "counter", "--node", &node.http]);
    // 4 clients at 100 jobs/s in all for 2 s: pacing never lets them run ahead of the schedule,
    // however fast the node answers.
    let out = grex_tests::grex(&[
        "bench",
        "--clients",
        "4",
        "--seconds",
        "2",
        "--rate",
        "100",
        "--node",
        &node.http,
        "--ca",
        &ca,
    ]);
    let jobs: u64 = out
        .split_once(" jobs, ")
        .and_then(|(before, _)| before.rsplit('(').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no job count in: {out}"));
    assert!(jobs > 0 && jobs <= 2 * 100 + 4, "{jobs} jobs in 2 s paced to 100/s: {out}");
    for rate in ["0", "-5"] {
        let out = Command::new(grex_bin())
            .args(["bench", &format!("--rate={rate}"), "--node", &node.http, "--ca", &ca])
            .output()
            .expect("run grex");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--rate {rate} was taken");
        assert!(err.contains("--rate must be a positive number"), "{err}");
    }
}

#[test]
fn a_memory_budget_too_small_for_the_node_or_its_cache_is_refused_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (flags, says) in [
        (&["--node-memory-mib", "16"][..], "--node-memory-mib 16 is too small: a node needs at least 32 MiB"),
        (
            &["--node-memory-mib", "64", "--cache-mib", "40"][..],
            "--cache-mib 40 is more than half of --node-memory-mib 64",
        ),
    ] {
        let out = Command::new(grex_bin())
            .args(["serve", "--data", data.to_str().unwrap(), "--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
            .args(["--peer", "127.0.0.1:0"])
            .args(flags)
            .output()
            .expect("run grex");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was taken");
        assert!(err.contains(says), "{flags:?}: {err}");
        assert!(!data.exists(), "{flags:?} left a data directory behind");
    }
}

/// `grex new` makes a Rust job project that builds without editing; `grex module put DIR`
/// builds it (once) and uploads it under its name; it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_rust_project_builds_uploads_and_runs_without_editing() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("hello-job");
    let project_arg = project.to_str().unwrap();
    let made = grex(&["new", "hello-job", "--lang", "rust", "--dir", project_arg]);
    assert!(made.contains("made") && made.contains("grex module put ."), "{made}");
    for file in ["Cargo.toml", "src/lib.rs", "README.md", "grex-sdk/Cargo.toml", "grex-sdk/wit/job.wit"] {
        assert!(project.join(file).exists(), "{file} missing");
    }
    // A second project in the same place, or a name Cargo would refuse, is refused with why.
    let again = Command::new(grex_bin()).args(["new", "hello-job", "--dir", project_arg]).output().unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not empty"));
    let bad = Command::new(grex_bin()).args(["new", "Bad Name"]).current_dir(dir.path()).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("cannot name a job"));

    let data = tempfile::tempdir().unwrap();
    let node = GrexNode::start(data.path(), &[]);
    let put = |project: &str| {
        Command::new(grex_bin()).args(["module", "put", project, "--node", &node.http]).output().unwrap()
    };
    let first = put(project_arg);
    let log = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{log}");
    assert!(String::from_utf8_lossy(&first.stdout).starts_with("sha256:"));
    assert!(log.contains("Compiling hello-job"), "{log}");
    // Built already: Cargo does nothing, the same module is uploaded.
    let second = put(project_arg);
    assert!(second.status.success() && !String::from_utf8_lossy(&second.stderr).contains("Compiling"));
    assert_eq!(first.stdout, second.stdout);

    let client = node.client().await;
    let out = client.run_job(b"customer-1", "hello-job", b"5", false).await.expect("the job runs");
    assert_eq!(out.output, b"5");
    let out = client.run_job(b"customer-1", "hello-job", b"2", false).await.expect("the job runs");
    assert_eq!(out.output, b"7");
    let failed = client.run_job(b"customer-1", "hello-job", b"five", false).await.expect_err("not a number");
    assert_eq!(failed.code(), Some(grex_client::ErrorCode::JobFailed));
}

/// `grex new --lang js` makes a JavaScript job project; `grex module put DIR` installs its
/// build tools (componentize-js, from npm), builds it once and uploads it; it runs, with its
/// errors. The `ledger` example, built with the same SDK, keeps its semantics and its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_js_project_and_the_js_ledger_build_upload_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("hello-js");
    let project_arg = project.to_str().unwrap();
    let made = grex(&["new", "hello-js", "--lang", "js", "--dir", project_arg]);
    assert!(made.contains("JavaScript") && made.contains("npm test"), "{made}");
    let tested =
        Command::new("npm").args(["test", "--silent"]).current_dir(&project).output().expect("npm (Node.js 20)");
    assert!(tested.status.success(), "npm test: {}", String::from_utf8_lossy(&tested.stdout));

    let data = tempfile::tempdir().unwrap();
    // A JavaScript job embeds its engine (about 12 MB): its first compile takes longer than a Rust one.
    let node = GrexNode::start(data.path(), &["--compile-timeout-secs", "600", "--timeout-ms", "2000"]);
    check_counter_project(&node, project_arg, "hello-js", &["npm install", "npm run build"], "npm run build").await;

    // The ledger example, built by the project's SDK and tools.
    let ledger_js = grex_tests::workspace_root().join("guest-sdk-js/ledger.js");
    let ledger_wasm = dir.path().join("ledger.wasm");
    let built = Command::new("node")
        .arg(project.join("sdk/build.mjs"))
        .args([&ledger_js, &ledger_wasm])
        .output()
        .expect("node");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    check_ledger(&node, &ledger_wasm, "ledger-js").await;
}

/// `grex new --lang python` makes a Python job project; `grex module put DIR` makes its `.venv`
/// with componentize-py (from the Python package index), builds it once and uploads it; it runs,
/// with its errors. The `ledger` example, built with the same SDK, keeps its semantics and its
/// deadline, and the SDK's native parts pass their tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_python_project_and_the_python_ledger_build_upload_and_run() {
    let sdk = grex_tests::workspace_root().join("guest-sdk-py");
    let tested = Command::new("python3").args(["-m", "unittest"]).current_dir(&sdk).output().expect("python3");
    assert!(tested.status.success(), "the SDK's tests: {}", String::from_utf8_lossy(&tested.stderr));

    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("hello-py");
    let project_arg = project.to_str().unwrap();
    let made = grex(&["new", "hello-py", "--lang", "python", "--dir", project_arg]);
    assert!(made.contains("Python") && made.contains("python3 -m unittest"), "{made}");
    let tested = Command::new("python3").args(["-m", "unittest"]).current_dir(&project).output().expect("python3");
    assert!(tested.status.success(), "the project's tests: {}", String::from_utf8_lossy(&tested.stderr));

    let data = tempfile::tempdir().unwrap();
    // A Python job embeds its interpreter (about 18 MB): it compiles for longer than a Rust one.
    let node = GrexNode::start(data.path(), &["--compile-timeout-secs", "600", "--timeout-ms", "2000"]);
    let steps = ["-m venv", "sdk/build.py job.py hello-py.wasm"];
    check_counter_project(&node, project_arg, "hello-py", &steps, "sdk/build.py").await;

    // The ledger example, built by the project's SDK and tools.
    let ledger_wasm = dir.path().join("ledger.wasm");
    let built = Command::new(project.join(".venv/bin/python"))
        .arg(project.join("sdk/build.py"))
        .args([&sdk.join("ledger.py"), &ledger_wasm])
        .output()
        .expect("the project's python");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    check_ledger(&node, &ledger_wasm, "ledger-py").await;
}

/// `grex module put PATH [--name NAME]` against `node`, as a user would run it.
fn module_put(node: &GrexNode, path: &str, name: Option<&str>) -> std::process::Output {
    let mut command = Command::new(grex_bin());
    command.args(["module", "put", path, "--node", &node.http]);
    if let Some(name) = name {
        command.args(["--name", name]);
    }
    command.output().unwrap()
}

/// A project made by `grex new` (whose job is the Rust `counter`'s) builds once on its first
/// upload and not on its second (`built_by`: what the build says it ran), and runs, with its errors.
async fn check_counter_project(node: &GrexNode, project: &str, name: &str, built_by: &[&str], build: &str) {
    let first = module_put(node, project, None);
    let log = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{log}");
    assert!(built_by.iter().all(|step| log.contains(step)), "{log}");
    let second = module_put(node, project, None);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(!String::from_utf8_lossy(&second.stderr).contains(build), "built already: no rebuild");
    assert_eq!(first.stdout, second.stdout, "the same module");

    let client = node.client().await;
    assert_eq!(client.run_job(b"c-1", name, b"5", false).await.expect("runs").output, b"5");
    assert_eq!(client.run_job(b"c-1", name, b" 2 ", false).await.expect("runs").output, b"7");
    let failed = client.run_job(b"c-1", name, b"five", false).await.expect_err("not a number");
    assert_eq!(failed.code(), Some(grex_client::ErrorCode::JobFailed));
    assert!(failed.to_string().contains("`five` is not a decimal integer"), "{failed}");
    let read_only = client.run_job(b"c-1", name, b"1", true).await.expect_err("a read-only job may not write");
    assert_eq!(read_only.code(), Some(grex_client::ErrorCode::ReadOnlyViolation), "{read_only}");
}

/// The `ledger` example in another language, uploaded from `wasm` as `name`, keeps the Rust
/// ledger's semantics and its deadline, and keeps nothing a failed job wrote.
async fn check_ledger(node: &GrexNode, wasm: &std::path::Path, name: &str) {
    let uploaded = module_put(node, wasm.to_str().unwrap(), Some(name));
    assert!(uploaded.status.success(), "{}", String::from_utf8_lossy(&uploaded.stderr));
    let client = node.client().await;
    let run = |input: &'static [u8]| client.run_job(b"acct-1", name, input, false);
    let rent = br#"{"description":"rent","other":"ACME","amount":-120000,"date":"2026-11-01"}"#;
    assert_eq!(run(rent).await.unwrap().output, br#"{"balance":-120000,"count":1}"#);
    let pay =
        br#"[{"description":"pay","other":"Boss","amount":300000},{"description":"tea","other":"Cafe","amount":-450}]"#;
    assert_eq!(run(pay).await.unwrap().output, br#"{"balance":179550,"count":3}"#);
    assert_eq!(run(b"").await.unwrap().output, br#"{"balance":179550,"count":3}"#);
    let bad = run(br#"{"amount":"lots"}"#).await.expect_err("refused");
    assert_eq!(bad.code(), Some(grex_client::ErrorCode::JobFailed));
    let spun = run(b"spin").await.expect_err("stopped");
    assert_eq!(spun.code(), Some(grex_client::ErrorCode::JobTimeout));
    assert_eq!(
        run(b"").await.unwrap().output,
        br#"{"balance":179550,"count":3}"#,
        "nothing failed jobs wrote was kept"
    );
}
