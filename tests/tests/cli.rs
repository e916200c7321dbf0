//! The `grex` client commands against a real node, as a shell user runs them.

use std::process::{Command, Stdio};

use grex_tests::{GrexNode, grex_bin};

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
