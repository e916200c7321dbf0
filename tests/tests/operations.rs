//! Operating a cluster of real `grex serve` processes: draining a node while jobs flow, removing
//! a dead one by hand or after `--dead-after`, and refusing a removed node that comes back.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use grex_client::Client;
use grex_client::proto::ErrorCode;
use grex_tests::counting::{
    PATIENCE, add_to_each_flock, bucket_per_flock, check_copies, load_counter, wait_members, write_until,
};
use grex_tests::{GrexNode, TEST_FLOCKS, TestCluster, eventually, grex, grex_bin, job_wasm};

/// Bytes of snapshots the members have sent, as `node` heard.
async fn client_nodes_copied(node: &GrexNode) -> u64 {
    node.http_client().await.nodes().await.expect("nodes").nodes.iter().map(|n| n.snapshot_bytes_sent).sum()
}

/// Runs `grex ARGS`; returns whether it succeeded, and its standard output and error.
fn grex_status(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(grex_bin()).args(args).output().expect("run grex");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_over_its_flocks_while_jobs_flow_then_leaves() {
    let mut cluster = TestCluster::start(4, &[]).await;
    load_counter(&cluster).await;
    let buckets = bucket_per_flock();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(vec![cluster.nodes[0].client().await], buckets, stop.clone()));

    // Draining a node that does not exist, or every node, is refused and changes nothing.
    let node0 = cluster.nodes[0].http.clone();
    let (ok, _, err) = grex_status(&["cluster", "drain", "ffffffffffffffff", "--node", &node0]);
    assert!(!ok && err.contains("no member's id starts with"), "{err}");
    let drained = cluster.nodes[3].id.clone();
    let (ok, out, err) = grex_status(&["cluster", "drain", &drained, "--node", &node0]);
    println!("{out}{err}");
    assert!(ok && err.contains("flocks moved") && err.contains("left the cluster"), "{err}");
    let copied: u64 = client_nodes_copied(&cluster.nodes[0]).await;
    assert!(copied > 0, "the new herders caught up from snapshots, so some bytes were copied");
    let (ok, _, err) = grex_status(&["cluster", "drain", &cluster.nodes[2].id, "--node", &node0]);
    assert!(!ok && err.contains("would leave 2 active node(s)"), "a second drain must be refused: {err}");

    // The drain returned once the node had left: it is removed, and it stops by itself.
    let client = cluster.nodes[1].http_client().await;
    let nodes = client.nodes().await.expect("nodes");
    assert!(nodes.removed.contains(&drained), "{nodes:#?}");
    let exit = cluster.nodes[3].wait_exit(PATIENCE);
    assert!(matches!(exit, Some(Some(code)) if code != 0), "the drained node must stop with an error: {exit:?}");
    assert!(cluster.nodes[3].log().contains("was removed from the cluster"), "{}", cluster.nodes[3].log());
    let members: Vec<&str> = cluster.nodes[..3].iter().map(|n| n.id.as_str()).collect();
    wait_members(&client, &members).await;

    stop.store(true, Ordering::Relaxed);
    let (tallies, longest_gap) = writer.await.expect("writer");
    println!("longest time without an acknowledged job during the drain: {longest_gap:?}");
    assert!(tallies.values().all(|t| t.acked > 0), "{tallies:?}");
    assert!(longest_gap < Duration::from_secs(5), "jobs stopped for {longest_gap:?} during the drain");
    check_copies(&cluster.nodes[..3].iter().collect::<Vec<_>>(), &tallies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_removed_by_hand_is_copied_again_and_refused_when_it_comes_back() {
    let mut cluster = TestCluster::start(4, &[]).await;
    load_counter(&cluster).await;
    let client = cluster.nodes[0].client().await;
    let (_, tallies) = add_to_each_flock(&client, 7).await;
    let victim = cluster.nodes[3].id.clone();
    let node0 = cluster.nodes[0].http.clone();
    // A live node is not removed: it must be drained.
    let (ok, _, err) = grex_status(&["cluster", "remove", &victim, "--node", &node0]);
    assert!(!ok && err.contains("is up: drain it instead"), "{err}");

    cluster.nodes[3].kill9();
    eventually("node 0 to see the killed node down", PATIENCE, || async {
        client.nodes().await.is_ok_and(|n| n.nodes.iter().any(|n| n.id == victim && !n.alive))
    })
    .await;
    // By a prefix of its id, through node 1.
    let out = grex(&["cluster", "remove", &victim[..6], "--node", &cluster.nodes[1].http]);
    assert!(out.contains("removed"), "{out}");
    let survivors: Vec<String> = cluster.nodes[..3].iter().map(|n| n.id.clone()).collect();
    let members: Vec<&str> = survivors.iter().map(String::as_str).collect();
    wait_members(&client, &members).await;
    check_copies(&cluster.nodes[..3].iter().collect::<Vec<_>>(), &tallies).await;

    // The dead node comes back: its peers refuse it, and it stops with the reason.
    let args = cluster.nodes[3].args().to_vec();
    cluster.nodes[3].restart();
    let exit = cluster.nodes[3].wait_exit(PATIENCE);
    assert!(matches!(exit, Some(Some(code)) if code != 0), "the removed node must stop: {exit:?}");
    let log = cluster.nodes[3].log();
    assert!(log.contains("was removed from the cluster") && log.contains("wipe it"), "{log}");

    // Wiped, it joins again as a new node.
    std::fs::remove_dir_all(&cluster.nodes[3].data).expect("wipe");
    let creds = args.iter().position(|a| a == "--credentials").map(|i| args[i + 1].clone()).expect("credentials");
    grex(&["cluster", "credentials", "--data", cluster.nodes[0].data.to_str().unwrap(), "--out", &creds]);
    let joined = GrexNode::start(&cluster.nodes[3].data, &["--credentials", &creds, "--join", &cluster.nodes[0].peer]);
    assert_ne!(joined.id, victim, "a wiped node joins under a new id");
    let mut members: Vec<&str> = survivors.iter().map(String::as_str).collect();
    members.push(&joined.id);
    wait_members(&client, &members).await;
    let mut up: Vec<&GrexNode> = cluster.nodes[..3].iter().collect();
    up.push(&joined);
    check_copies(&up, &tallies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_unreachable_for_longer_than_dead_after_is_removed_without_being_asked() {
    let mut cluster = TestCluster::start(4, &["--dead-after", "3s"]).await;
    load_counter(&cluster).await;
    let client = cluster.nodes[1].client().await;
    let (_, tallies) = add_to_each_flock(&client, 3).await;
    // The meta group takes its voters one change at a time: with fewer than four, losing node 0
    // could cost it its quorum, and nobody could then remove anyone.
    eventually("every node to vote in the meta group", PATIENCE, || async {
        client.nodes().await.is_ok_and(|n| n.nodes.iter().all(|n| n.meta_voter) && !n.meta_changing)
    })
    .await;
    let victim = cluster.nodes[0].id.clone();
    cluster.nodes[0].kill9();
    let members: Vec<&str> = cluster.nodes[1..].iter().map(|n| n.id.as_str()).collect();
    wait_members(&client, &members).await;
    let nodes = client.nodes().await.expect("nodes");
    assert_eq!(nodes.removed, vec![victim], "{nodes:#?}");
    check_copies(&cluster.nodes[1..].iter().collect::<Vec<_>>(), &tallies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deletes_its_copy_of_a_flock_moved_away_and_a_restart_brings_nothing_back() {
    let mut cluster = TestCluster::start(3, &[]).await;
    load_counter(&cluster).await;
    let client = cluster.nodes[0].client().await;
    let (buckets, tallies) = add_to_each_flock(&client, 5).await;
    // A fourth node takes a share: every old node loses some flocks.
    let new = cluster.join(&[]).id.clone();
    let members: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    wait_members(&cluster.nodes[0].http_client().await, &members.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let map = client.flocks().await.expect("flock map");
    assert!(map.flocks.iter().any(|f| f.herders.contains(&new)), "{map:?}");
    let ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    let moved = |node: usize| -> Vec<&String> {
        buckets.iter().filter(|b| !map.flocks[flock_of(b)].herders.contains(&ids[node])).collect()
    };
    for node in 0..3 {
        assert!(!moved(node).is_empty(), "the map moved no flock away from node {node}: {map:?}");
        let local = cluster.nodes[node].http_client().await;
        for bucket in moved(node) {
            eventually(&format!("node {node} to delete its copy of {bucket}"), PATIENCE, || async {
                matches!(local.get_item(bucket.as_bytes(), "count").await, Err(e) if e.code() == Some(ErrorCode::ItemNotFound))
            })
            .await;
        }
    }
    assert!(cluster.nodes[0].log().contains("deleted this node's copy of a flock it no longer herds"));
    check_copies(&cluster.nodes.iter().collect::<Vec<_>>(), &tallies).await;

    // After a restart the copies stay gone, and jobs on those buckets through the node go on.
    assert!(cluster.nodes[0].terminate(), "node 0 stops cleanly");
    cluster.nodes[0].restart();
    let local = cluster.nodes[0].http_client().await;
    let through = cluster.nodes[0].client().await;
    for bucket in moved(0) {
        let read = local.get_item(bucket.as_bytes(), "count").await;
        assert!(matches!(&read, Err(e) if e.code() == Some(ErrorCode::ItemNotFound)), "{bucket}: {read:?}");
        let out = loop {
            match through.run_job(bucket.as_bytes(), "counter", b"1", false).await {
                Ok(out) => break out,
                Err(e) if matches!(e.code(), Some(ErrorCode::Unavailable | ErrorCode::NoQuorum)) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{bucket}: {e}"),
            }
        };
        assert_eq!(out.output, b"6", "{bucket}");
    }
}

fn flock_of(bucket: &str) -> usize {
    grex_client::proto::flock_of(bucket.as_bytes(), TEST_FLOCKS) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_flock_spreads_over_zones_and_a_bigger_node_herds_more() {
    // Zone a holds two nodes (one of capacity 2), zones b and c one each: every flock keeps one
    // copy per zone, so the two nodes of zone a never herd the same flock.
    let mut cluster = TestCluster::start(1, &["--zone", "a", "--capacity", "2"]).await;
    cluster.join(&["--zone", "a"]);
    cluster.join(&["--zone", "b"]);
    cluster.join(&["--zone", "c"]);
    let ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    let client = cluster.nodes[1].http_client().await;
    wait_members(&client, &ids.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let nodes = client.nodes().await.expect("nodes");
    let zone: BTreeMap<&str, &str> = nodes.nodes.iter().map(|n| (n.id.as_str(), n.zone.as_str())).collect();
    assert_eq!(zone[ids[0].as_str()], "a");
    assert_eq!(nodes.nodes.iter().find(|n| n.id == ids[0]).map(|n| n.capacity), Some(2));
    let map = client.flocks().await.expect("flock map");
    for flock in &map.flocks {
        let zones: std::collections::BTreeSet<&str> = flock.herders.iter().map(|h| zone[h.as_str()]).collect();
        assert_eq!(zones.len(), 3, "flock {} is not in three zones: {:?}", flock.flock, flock.herders);
    }
    // Zone a takes one copy of each flock, shared 2 : 1 by capacity.
    let herds = |id: &str| map.flocks.iter().filter(|f| f.herders.iter().any(|h| h == id)).count();
    let (big, small) = (herds(&ids[0]), herds(&ids[1]));
    assert_eq!(big + small, TEST_FLOCKS as usize);
    assert!(big > small, "capacity 2 herds {big}, capacity 1 herds {small}");
    let (ok, out, _) = grex_status(&["cluster", "nodes", "--node", &cluster.nodes[0].http]);
    assert!(ok && out.contains("zone") && out.contains("capacity"), "{out}");
}

/// Compiled code files in a node's code directory.
fn code_files(node: &GrexNode) -> Vec<String> {
    match std::fs::read_dir(node.data.join("code")) {
        Ok(dir) => dir.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_module_goes_from_every_node_with_its_code_and_a_running_job_finishes() {
    let mut cluster = TestCluster::start(3, &["--timeout-ms", "1500"]).await;
    load_counter(&cluster).await;
    let first = cluster.nodes[0].client().await;
    let hostile = first.put_module("hostile", job_wasm("hostile")).await.expect("upload hostile");
    let counter_id = first.list_modules().await.expect("modules").into_iter().find(|m| m.name == "counter").unwrap().id;
    let hex = |id: &str| format!("{}.cwasm", id.trim_start_matches("sha256:"));
    // A read-only run on each node (every node herds every flock of three) compiles it there; the
    // job itself is refused, as counter writes.
    for node in &cluster.nodes {
        let refused = node.client().await.run_job(b"b", "counter", b"1", true).await.expect_err("counter writes");
        assert_eq!(refused.code(), Some(ErrorCode::ReadOnlyViolation), "{refused}");
        assert!(code_files(node).contains(&hex(&counter_id)), "{:?}", code_files(node));
    }

    // A job that runs `hostile` until its deadline, sent to the node that runs it.
    let canary = first.canary(b"spinner").await.expect("canary");
    let runner = cluster.index_of_url(&canary.url);
    let spinner = cluster.nodes[runner].client().await;
    let spinning = tokio::spawn(async move { spinner.run_job(b"spinner", "hostile", b"loop", false).await });
    let status = cluster.nodes[runner].http_client().await;
    eventually("the spinning job to run", PATIENCE, || async {
        status.status().await.is_ok_and(|s| s.jobs_running > 0)
    })
    .await;
    let out = grex(&["module", "rm", "hostile", "--node", &cluster.nodes[1].http]);
    assert!(out.contains(&hostile.id), "{out}");
    let ended = spinning.await.expect("task").expect_err("the job spins until its deadline");
    assert_eq!(ended.code(), Some(ErrorCode::JobTimeout), "the running job kept its module: {ended}");

    // A node down while `counter` is deleted learns of it when it comes back.
    cluster.nodes[2].kill9();
    let node1 = cluster.nodes[1].http_client().await;
    assert_eq!(node1.delete_module("counter").await.expect("delete counter").id, counter_id);
    let again = node1.delete_module("counter").await.expect_err("deleted already");
    assert_eq!(again.code(), Some(ErrorCode::ModuleNotFound), "{again}");
    cluster.nodes[2].restart();
    for node in &cluster.nodes {
        let client = node.http_client().await;
        eventually("the names to go from every node", PATIENCE, || async {
            client.list_modules().await.is_ok_and(|m| m.is_empty())
        })
        .await;
        eventually("the compiled code to go", PATIENCE, || async { code_files(node).is_empty() }).await;
        for module in ["counter", "hostile"] {
            let refused = client.run_job(b"x", module, b"1", false).await.expect_err("no such module");
            assert_eq!(refused.code(), Some(ErrorCode::ModuleNotFound), "{refused}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_catches_up_from_a_meta_snapshot_drops_the_modules_deleted_meanwhile() {
    // A short meta log: the node that was down comes back to a purged log and installs a snapshot.
    let mut cluster = TestCluster::start(3, &["--snapshot-logs", "10"]).await;
    load_counter(&cluster).await;
    let counter_id = cluster.nodes[0].client().await.list_modules().await.expect("modules")[0].id.clone();
    // Node 2 compiles counter, then goes down.
    let refused = cluster.nodes[2].client().await.run_job(b"b", "counter", b"1", true).await.expect_err("it writes");
    assert_eq!(refused.code(), Some(ErrorCode::ReadOnlyViolation), "{refused}");
    // The meta log's purge point on both nodes that stay up (either may lead the meta group).
    let (first, second) = (cluster.nodes[0].client().await, cluster.nodes[1].client().await);
    let purged = || async {
        let (a, b) = (first.flocks().await.expect("flock map"), second.flocks().await.expect("flock map"));
        a.meta_log_purged.min(b.meta_log_purged)
    };
    let before = purged().await;
    cluster.nodes[2].kill9();
    for i in 0..30 {
        first.put_module(&format!("copy-{i}"), job_wasm("ledger")).await.expect("upload");
    }
    first.delete_module("counter").await.expect("delete counter");
    first.delete_module("copy-0").await.expect("delete copy-0");
    // Node 2 held at most 12 entries past the purge point then (10 kept, and a purge waits for a
    // checkpoint): once the log starts past that, it cannot catch up from the log.
    eventually("the meta log to be purged past what node 2 holds", PATIENCE, || async { purged().await > before + 12 })
        .await;
    cluster.nodes[2].restart();
    let client = cluster.nodes[2].http_client().await;
    eventually("node 2 to hold the modules as they are now", PATIENCE, || async {
        client
            .list_modules()
            .await
            .is_ok_and(|m| m.len() == 29 && m.iter().all(|m| m.name != "counter" && m.name != "copy-0"))
    })
    .await;
    // The meta group's id is u32::MAX (the log colours its fields, so match within a line).
    let log = cluster.nodes[2].log();
    let meta = u32::MAX.to_string();
    assert!(
        log.lines().any(|l| l.contains("installed a snapshot") && l.contains(&meta)),
        "node 2 caught up from the log, not a snapshot"
    );
    let code = code_files(&cluster.nodes[2]);
    assert!(!code.iter().any(|f| counter_id.ends_with(f.trim_end_matches(".cwasm"))), "{code:?}");
    let refused = client.run_job(b"b", "counter", b"1", false).await.expect_err("deleted");
    assert_eq!(refused.code(), Some(ErrorCode::ModuleNotFound), "{refused}");
}

/// Runs `counter` with `input` on `bucket` through `client`, retrying while the cluster elects
/// leaders; the count it answers.
async fn count_after(client: &Client, bucket: &str, input: &str) -> i64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match client.run_job(bucket.as_bytes(), "counter", input.as_bytes(), false).await {
            Ok(out) => return String::from_utf8(out.output).expect("text").parse().expect("a count"),
            Err(e)
                if matches!(e.code(), Some(ErrorCode::Unavailable | ErrorCode::NoQuorum))
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("counter on {bucket} failed: {e}"),
        }
    }
}

/// Copies a directory with everything in it (`cp -a`).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().expect("run cp");
    assert!(status.success(), "cp -a {} {} failed", from.display(), to.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restored_from_a_backup_holds_what_it_held_then() {
    let mut cluster = TestCluster::start(3, &[]).await;
    load_counter(&cluster).await;
    let (buckets, _) = add_to_each_flock(&cluster.nodes[0].client().await, 5).await;

    // The backup: every node stopped, every data directory copied, as docs/operations.md says.
    for node in &mut cluster.nodes {
        assert!(node.terminate(), "node {} stopped cleanly", node.id);
    }
    let backup = cluster.dir.path().join("backup");
    std::fs::create_dir(&backup).unwrap();
    for (i, node) in cluster.nodes.iter().enumerate() {
        copy_dir(&node.data, &backup.join(format!("node-{i}")));
    }
    for node in &mut cluster.nodes {
        node.restart();
    }
    // Life goes on after the backup: more writes, a new module.
    let client = cluster.nodes[1].client().await;
    for bucket in &buckets {
        assert_eq!(count_after(&client, bucket, "7").await, 12);
    }
    client.put_module("later", job_wasm("counter")).await.expect("upload after the backup");
    drop(client);

    // The restore: every node stopped, every directory replaced by its copy, started again.
    for node in &mut cluster.nodes {
        assert!(node.terminate(), "node {} stopped cleanly", node.id);
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        std::fs::remove_dir_all(&node.data).unwrap();
        copy_dir(&backup.join(format!("node-{i}")), &node.data);
    }
    for node in &mut cluster.nodes {
        node.restart();
    }
    cluster.wait_formed(3).await;
    let client = cluster.nodes[2].client().await;
    for bucket in &buckets {
        assert_eq!(count_after(&client, bucket, "0").await, 5, "{bucket} holds what it held at the backup");
    }
    let names: Vec<String> = client.list_modules().await.unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["counter"], "the module uploaded after the backup is gone");
    // And the restored cluster takes writes, on every node.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let client = node.client().await;
        assert_eq!(count_after(&client, &buckets[i], "1").await, 6);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_is_removed_while_half_the_members_are_down_and_the_dead_go_once_more_are_up() {
    let mut cluster = TestCluster::start(6, &["--dead-after", "2s"]).await;
    let client = cluster.nodes[0].client().await;
    eventually("five members to vote in the meta group, its change over", PATIENCE, || async {
        client.nodes().await.is_ok_and(|n| {
            n.nodes.len() == 6 && n.nodes.iter().filter(|n| n.meta_voter).count() == 5 && !n.meta_changing
        })
    })
    .await;
    // Three of six down, the meta group's quorum kept (the member that does not vote and two that
    // do): the meta leader reaches its quorum, but only half the members are up.
    let nodes = client.nodes().await.unwrap().nodes;
    let non_voter = nodes.iter().find(|n| !n.meta_voter).unwrap().id.clone();
    let voters: Vec<usize> = nodes.iter().filter(|n| n.meta_voter).map(|n| cluster.index_of(&n.id)).collect();
    // The first voter stays up and answers the test.
    let client = cluster.nodes[voters[0]].client().await;
    let victims = vec![cluster.index_of(&non_voter), voters[1], voters[2]];
    for &i in &victims {
        cluster.nodes[i].kill9();
    }
    let live: Vec<usize> = (0..6).filter(|i| !victims.contains(i)).collect();
    eventually("the meta leader to say that the dead stay", PATIENCE, || async {
        live.iter().any(|&i| cluster.nodes[i].log().contains("unreachable for longer than --dead-after stay"))
    })
    .await;
    assert_eq!(client.nodes().await.unwrap().removed, Vec::<String>::new(), "nobody is removed with half down");

    // One comes back: four of six are up, and the two still down are removed.
    cluster.nodes[victims[0]].restart();
    let mut dead: Vec<String> = victims[1..].iter().map(|&i| cluster.nodes[i].id.clone()).collect();
    dead.sort();
    eventually("the two still down to be removed", PATIENCE, || async {
        client.nodes().await.is_ok_and(|n| {
            let mut removed = n.removed.clone();
            removed.sort();
            removed == dead
        })
    })
    .await;
}
