//! The node as a library, with its seams: a failing store, a fixed clock.

use std::sync::Arc;

use grex::node::FixedClock;
use grex::storage::{FaultyStore, MemoryStore};
use grex::{ErrorCode, Node, NodeConfig};
use grex_tests::job_wasm;

fn node_over(store: Arc<dyn grex::storage::Store>, now_ms: u64) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::with_store(NodeConfig::new(dir.path()), store, Arc::new(FixedClock(now_ms))).unwrap();
    (dir, node)
}

#[tokio::test]
async fn a_failing_disk_stops_writes_with_storage_failed_and_keeps_what_was_acknowledged() {
    let (_dir, node) = node_over(Arc::new(FaultyStore::new(MemoryStore::new(16), 3)), 0);
    node.put_module("counter", job_wasm("counter")).await.unwrap();
    for expected in ["1", "2", "3"] {
        let out = node.run_job(b"b", "counter", Vec::new(), false).await.unwrap();
        assert_eq!(out.output, expected.as_bytes());
    }
    for _ in 0..2 {
        let err = node.run_job(b"b", "counter", Vec::new(), false).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::StorageFailed, "{err}");
        assert!(err.message.contains("restart"), "{err}");
    }
    // Reads still serve what was acknowledged; nothing unacknowledged shows.
    assert_eq!(node.get_item(b"b", "count").await.unwrap(), b"3");
    node.shutdown().await;
}

#[tokio::test]
async fn jobs_see_the_node_assigned_timestamp_not_a_clock_of_their_own() {
    // 2026-11-21T00:00:00Z
    let (_dir, node) = node_over(Arc::new(MemoryStore::new(16)), 1_795_219_200_000);
    node.put_module("ledger", job_wasm("ledger")).await.unwrap();
    let record = br#"{"description":"tea","other":"Shop","amount":-300}"#.to_vec();
    node.run_job(b"c", "ledger", record, false).await.unwrap();
    let stored = node.get_item(b"c", "transactions").await.unwrap();
    assert!(stored.windows(10).any(|w| w == b"2026-11-21"), "the record's default date comes from the node's clock");
    node.shutdown().await;
}

#[tokio::test]
async fn after_shutdown_jobs_are_refused_as_shutting_down() {
    let (_dir, node) = node_over(Arc::new(MemoryStore::new(16)), 0);
    node.put_module("counter", job_wasm("counter")).await.unwrap();
    node.run_job(b"b", "counter", Vec::new(), false).await.unwrap();
    node.shutdown().await;
    let err = node.run_job(b"b", "counter", Vec::new(), false).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::ShuttingDown, "{err}");
}

#[tokio::test]
async fn compiled_code_is_kept_on_disk_and_a_damaged_copy_is_compiled_again() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(NodeConfig::new(dir.path())).unwrap();
    let info = node.put_module("counter", job_wasm("counter")).await.unwrap();
    let code = dir.path().join(grex::node::CODE_DIR).join(format!("{}.cwasm", info.id.trim_start_matches("sha256:")));
    assert!(code.exists(), "compiled code should be kept at {}", code.display());
    node.run_job(b"b", "counter", Vec::new(), false).await.unwrap();
    node.shutdown().await;
    drop(node);

    std::fs::write(&code, b"not machine code").unwrap();
    let node = Node::open(NodeConfig::new(dir.path())).unwrap();
    let out = node.run_job(b"b", "counter", Vec::new(), false).await.unwrap();
    assert_eq!(out.output, b"2");
    assert!(std::fs::metadata(&code).unwrap().len() > 1000, "the damaged copy was replaced");
    node.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_jobs_on_a_module_not_loaded_yet_loads_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(NodeConfig::new(dir.path())).unwrap();
    node.put_module("counter", job_wasm("counter")).await.unwrap();
    node.shutdown().await;
    drop(node);

    // Reopened, the node has the module stored but not loaded: 64 jobs arrive at once.
    let node = Node::open(NodeConfig::new(dir.path())).unwrap();
    let jobs = (0..64).map(|i| {
        let node = node.clone();
        tokio::spawn(async move { node.run_job(format!("b{i}").as_bytes(), "counter", Vec::new(), false).await })
    });
    for job in futures::future::join_all(jobs).await {
        assert_eq!(job.unwrap().unwrap().output, b"1");
    }
    let metrics = node.metrics().render();
    let loads = metrics.lines().find(|l| l.starts_with("grex_module_load_seconds_count")).expect("the load metric");
    assert_eq!(loads, "grex_module_load_seconds_count 1", "every job but the first should wait for its load");
    node.shutdown().await;
}
