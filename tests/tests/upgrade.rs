//! Upgrading a running cluster: three nodes of the previous release (built from its commit in
//! git history, `grex_tests::previous_grex_bin`) are restarted one at a time as this build while
//! jobs flow. Nodes of the two releases speak the older peer protocol with each other, and the
//! newer one once both ends run this build.
//!
//! In its own test binary: the first run builds the previous release, which no other test should
//! wait behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use grex::cluster::messages::{GREX_VERSION, PEER_PROTOCOL};
use grex_client::proto::{NodesInfo, ScanRequest};
use grex_tests::counting::{PATIENCE, bucket_per_flock, check_copies, load_counter, write_until};
use grex_tests::{GrexNode, PREVIOUS_RELEASE, TestCluster, grex, grex_bin, previous_grex_bin};

/// What `node` says of each member: its id, whether it is up, the protocol it speaks with it and
/// the version it runs.
async fn versions_seen_by(node: &GrexNode) -> Option<Vec<(String, bool, u32, String)>> {
    let client = node.http_client().await;
    let nodes: NodesInfo = client.nodes().await.ok()?;
    Some(nodes.nodes.into_iter().map(|n| (n.id, n.alive, n.protocol, n.version)).collect())
}

/// Waits until `node` hears every member, speaking `expected(member)` (protocol, version) with it.
async fn wait_versions(node: &GrexNode, members: &[(String, (u32, String))]) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let seen = versions_seen_by(node).await;
        let matches = seen.as_ref().is_some_and(|seen| {
            members.iter().all(|(id, (protocol, version))| {
                seen.iter().any(|(i, alive, p, v)| i == id && *alive && p == protocol && v == version)
            })
        });
        if matches {
            return;
        }
        assert!(Instant::now() < deadline, "node {} did not come to see {members:?}; it sees {seen:?}", node.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_upgraded_one_node_at_a_time_serves_throughout_and_loses_no_write() {
    let (commit, old_version, old_protocol) = PREVIOUS_RELEASE;
    let old = previous_grex_bin();
    let new = grex_bin();
    println!("upgrading from grex {old_version} (commit {commit}, grex-peer/{old_protocol}) to {GREX_VERSION}");
    assert_eq!(old_protocol + 1, PEER_PROTOCOL, "the previous release speaks the protocol before this one");

    let mut cluster = TestCluster::start_binary(&old, 3, &[]).await;
    load_counter(&cluster).await;
    // A QUIC client of this build and a node of the previous release, which has no sessions: a
    // stream per request, as that release's clients send.
    let quic = cluster.nodes[0].client().await;
    assert!(!quic.has_sessions(), "the previous release offers grex/1 only");
    assert_eq!(quic.run_job(b"over-quic", "counter", b"2", false).await.expect("a job over grex/1").output, b"2");
    drop(quic);
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(node.http_client().await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(clients, bucket_per_flock(), stop.clone()));

    // Each node in turn: a clean stop, and a start of the new build on the same data directory
    // and addresses. The upgraded node speaks the old protocol with the nodes not upgraded yet,
    // and its own with the upgraded ones; every node tells its version (from grex 0.2.0 on).
    for i in 0..cluster.nodes.len() {
        assert!(cluster.nodes[i].terminate(), "node {i} did not stop cleanly:\n{}", cluster.nodes[i].log());
        cluster.nodes[i].restart_binary(&new);
        let expected: Vec<(String, (u32, String))> = cluster
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, n)| {
                let speaks = if j < i {
                    (PEER_PROTOCOL, GREX_VERSION.to_owned())
                } else {
                    (old_protocol, old_version.to_owned())
                };
                (n.id.clone(), speaks)
            })
            .collect();
        wait_versions(&cluster.nodes[i], &expected).await;
        if i == 0 {
            // A node of the previous release cannot scan its flocks (it has no such request): a
            // scan through the upgraded node stops and says why.
            let scan = ScanRequest { module: "counter".into(), input: b"0".to_vec(), ..ScanRequest::default() };
            let e = cluster.nodes[0].http_client().await.scan(scan, |_| {}).await.expect_err("old nodes cannot scan");
            assert!(e.to_string().contains(&format!("grex-peer/{old_protocol}")), "{e}");
        }
        println!("node {i} runs {GREX_VERSION}; it sees {:?}", versions_seen_by(&cluster.nodes[i]).await);
    }

    // Every node upgraded: each speaks the new protocol with every other, and says its version.
    for node in &cluster.nodes {
        let others: Vec<(String, (u32, String))> = cluster
            .nodes
            .iter()
            .filter(|n| n.id != node.id)
            .map(|n| (n.id.clone(), (PEER_PROTOCOL, GREX_VERSION.to_owned())))
            .collect();
        wait_versions(node, &others).await;
    }
    cluster.wait_formed(3).await;
    let quic = cluster.nodes[0].client().await;
    assert!(quic.has_sessions(), "an upgraded node offers sessions");
    assert_eq!(quic.run_job(b"over-quic", "counter", b"3", false).await.expect("a job on a session").output, b"5");
    let scan = ScanRequest { module: "counter".into(), input: b"0".to_vec(), ..ScanRequest::default() };
    let summary = cluster.nodes[1].http_client().await.scan(scan, |_| {}).await.expect("upgraded nodes scan");
    assert_eq!(summary.flocks, grex_tests::TEST_FLOCKS);
    let table = grex(&["cluster", "nodes", "--node", &cluster.nodes[0].http]);
    println!("{table}");
    assert!(table.contains(&format!("{GREX_VERSION} (grex-peer/{PEER_PROTOCOL})")), "{table}");

    stop.store(true, Ordering::Relaxed);
    let (tallies, longest_gap) = writer.await.expect("writer");
    println!("longest time without an acknowledged job during the upgrade: {longest_gap:?}; {tallies:?}");
    assert!(tallies.values().all(|t| t.acked > 0), "{tallies:?}");
    assert!(longest_gap < Duration::from_secs(5), "jobs stopped for {longest_gap:?} during the upgrade");
    check_copies(&cluster.nodes.iter().collect::<Vec<_>>(), &tallies).await;
}
