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
