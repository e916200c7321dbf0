//! Data directories of older storage schemas, made by the old code (`tests/fixtures/migrate`,
//! written by `scripts/migration-fixtures.sh`, which builds each schema's last commit and runs
//! it), are migrated when this build starts on them: everything the old cluster acknowledged is
//! read back, new writes work, and what cannot be migrated is refused and left as it was.
//!
//! Each fixture's nodes listened on fixed loopback ports (node i on BASE + 10·i + x, x = 0 HTTP,
//! 1 QUIC, 2 peer, 3 Redis; each fixture its own BASE, below the ports `free_port` draws), since
//! its members find each other at the addresses they recorded.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use grex::storage::{LegacyEntries, LegacyStore, LegacyValues};
use grex_tests::{GrexNode, eventually, grex, grex_bin, wait_until, workspace_root};

/// Buckets the fixtures wrote: `customer-I` holds `name` = `customer-I` and `n` = `I`.
const CUSTOMERS: usize = 200;

/// Unpacks a fixture into a new temporary directory.
fn unpack(name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("grex-test-migrate").tempdir().expect("temp dir");
    let archive = workspace_root().join("tests/fixtures/migrate").join(name);
    let status = Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(dir.path()).status().expect("run tar");
    assert!(status.success(), "cannot unpack {}", archive.display());
    dir
}

/// The fixtures and their port bases (as `scripts/migration-fixtures.sh` made them).
const SCHEMA3_ONE_NODE: (&str, u16) = ("schema3-1nodes.tar.gz", 19300);
const SCHEMA3_THREE_NODES: (&str, u16) = ("schema3-3nodes.tar.gz", 19400);
const SCHEMA4_THREE_NODES: (&str, u16) = ("schema4-3nodes.tar.gz", 19600);
const SCHEMA5_THREE_NODES: (&str, u16) = ("schema5-3nodes.tar.gz", 19500);

/// Node `node`'s address `which` (0 HTTP, 1 QUIC, 2 peer, 3 Redis) in the fixture of `base`.
fn port(base: u16, node: u16, which: u16) -> String {
    format!("127.0.0.1:{}", base + 10 * node + which)
}

/// Starts this build on node `i`'s directory of a fixture, at the addresses it had.
fn start(dir: &Path, base: u16, i: u16) -> GrexNode {
    let resp = port(base, i, 3);
    let addrs = [port(base, i, 0), port(base, i, 1), port(base, i, 2)];
    GrexNode::start_at(&dir.join(format!("n{i}")), addrs.each_ref().map(String::as_str), &["--resp", &resp])
}

fn redis(node: &GrexNode) -> redis::Connection {
    let url = node.resp.as_ref().expect("started with --resp");
    redis::Client::open(url.as_str()).unwrap().get_connection().unwrap()
}

/// Reads every bucket the fixture wrote through `node`, retrying while the cluster elects.
fn check_buckets(node: &GrexNode) {
    let mut con = redis(node);
    for i in 0..CUSTOMERS {
        let key = format!("customer-{i}");
        wait_until(&format!("{key} read through {}", node.http), Duration::from_secs(30), || {
            let found: redis::RedisResult<BTreeMap<String, String>> = redis::cmd("HGETALL").arg(&key).query(&mut con);
            matches!(&found, Ok(items) if items.get("name") == Some(&key) && items.get("n") == Some(&i.to_string()) && items.len() == 2)
        });
    }
    let wide: BTreeMap<String, String> = redis::cmd("HGETALL").arg("wide").query(&mut con).unwrap();
    let expected: BTreeMap<String, String> = (0..100).map(|f| (format!("f{f}"), format!("v{f}"))).collect();
    assert_eq!(wide, expected, "the bucket of 100 items");
}

/// What an older data directory holds, as this build reads it: its schema, every group's named
/// values and every log entry. (Opening a file that its last process did not close makes redb
/// repair it, which rewrites its own bookkeeping but no value.)
type OldContents = (u32, LegacyValues, LegacyEntries);

fn old_contents(data: &Path) -> OldContents {
    let old = LegacyStore::open(&data.join("grex.redb")).unwrap().expect("an older schema");
    (old.schema(), old.values().unwrap(), old.entries_after(&BTreeMap::new()).unwrap())
}

/// A copy of `from` at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_node_directory_of_schema_3_is_migrated_and_its_buckets_refiled_into_the_new_flocks() {
    // Made by openraft-era grex with --replication 1: after a second node joins, each flock lives
    // on one node, moved there by a snapshot of the buckets filed under it. A bucket left under
    // the flock schema 3's hash gave it would not travel with its flock, and would be missing
    // once node 0 hands its flocks over.
    let (fixture, base) = SCHEMA3_ONE_NODE;
    let dir = unpack(fixture);
    let mut first = start(dir.path(), base, 0);
    assert!(first.log().contains("migrated the data directory"), "no migration logged:\n{}", first.log());
    check_buckets(&first);

    let creds = dir.path().join("n1.creds");
    let creds = creds.to_str().unwrap();
    grex(&["cluster", "credentials", "--data", dir.path().join("n0").to_str().unwrap(), "--out", creds]);
    let resp = format!("127.0.0.1:{}", grex_tests::free_port());
    let second =
        GrexNode::start(&dir.path().join("n1"), &["--credentials", creds, "--join", &first.peer, "--resp", &resp]);
    let client = first.http_client().await;
    eventually("half the flocks moved to the new node", Duration::from_secs(60), || async {
        client.flocks().await.is_ok_and(|map| {
            let moved = map.flocks.iter().filter(|f| f.herders == [second.id.clone()] && f.settled).count();
            moved == 8 && map.flocks.iter().all(|f| f.settled && f.leader.is_some())
        })
    })
    .await;
    check_buckets(&second);

    // Writes go on, and a restart does not migrate again.
    let mut con = redis(&second);
    let _: () = redis::cmd("HSET").arg("customer-7").arg("n").arg("seven").query(&mut con).unwrap();
    first.terminate();
    first.restart();
    assert_eq!(first.log().matches("migrating the data directory").count(), 1, "migrated twice:\n{}", first.log());
    let mut con = redis(&first);
    wait_until("the later write read through the restarted node", Duration::from_secs(30), || {
        let got: redis::RedisResult<String> = redis::cmd("HGET").arg("customer-7").arg("n").query(&mut con);
        got.is_ok_and(|v| v == "seven")
    });
}

#[test]
fn a_three_node_cluster_of_schema_5_is_migrated_node_by_node_and_keeps_every_write() {
    migrate_three_nodes(SCHEMA5_THREE_NODES);
}

#[test]
fn a_three_node_cluster_of_schema_4_under_openraft_is_migrated_and_keeps_every_write() {
    migrate_three_nodes(SCHEMA4_THREE_NODES);
}

/// Starts this build on every node of a three-node fixture; every write is read back through
/// every node, a member is killed and the others serve, and it catches up when it returns.
fn migrate_three_nodes((fixture, base): (&str, u16)) {
    let dir = unpack(fixture);
    let mut nodes: Vec<GrexNode> = (0..3).map(|i| start(dir.path(), base, i)).collect();
    for node in &nodes {
        assert!(node.log().contains("migrated the data directory"), "no migration logged:\n{}", node.log());
    }
    for node in &nodes {
        check_buckets(node);
    }
    // A member goes: the other two elect leaders for its flocks from their migrated logs.
    nodes[0].kill9();
    check_buckets(&nodes[1]);
    let mut con = redis(&nodes[2]);
    for i in 0..CUSTOMERS {
        // While the flocks node 0 led elect new leaders, a write may be told to retry (`BUSY`,
        // `TRYAGAIN`: it took no effect), as any client would be.
        let key = format!("customer-{i}");
        let mut last = None;
        wait_until(&format!("{key}'s write through node 2"), Duration::from_secs(30), || {
            let written: redis::RedisResult<()> = redis::cmd("HSET").arg(&key).arg("after").arg("yes").query(&mut con);
            match written {
                Ok(()) => true,
                Err(e) if e.to_string().contains("BUSY") || e.to_string().contains("TRYAGAIN") => {
                    last = Some(e.to_string());
                    false
                }
                Err(e) => panic!("{key}: {e} (after {last:?})"),
            }
        });
    }
    // It comes back, catches up, and serves the writes it missed.
    nodes[0].restart();
    let mut con = redis(&nodes[0]);
    for i in 0..CUSTOMERS {
        let key = format!("customer-{i}");
        wait_until(&format!("{key}'s later write through node 0"), Duration::from_secs(30), || {
            let found: redis::RedisResult<Option<String>> = redis::cmd("HGET").arg(&key).arg("after").query(&mut con);
            matches!(&found, Ok(Some(v)) if v == "yes")
        });
    }
}

#[test]
fn a_schema_3_member_of_a_larger_cluster_is_refused_with_why_and_left_as_it_was() {
    let (fixture, base) = SCHEMA3_THREE_NODES;
    let dir = unpack(fixture);
    let data = dir.path().join("n0");
    let pristine = dir.path().join("n0-copy");
    copy_dir(&data, &pristine);
    let out = Command::new(grex_bin())
        .args(["serve", "--data"])
        .arg(&data)
        .args(["--http", &port(base, 0, 0), "--quic", &port(base, 0, 1), "--peer", &port(base, 0, 2)])
        .output()
        .expect("run grex serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "grex serve started on it: {stderr}");
    assert!(
        stderr.contains("a cluster of 3 members") && stderr.contains("cannot be migrated one at a time"),
        "the refusal does not say why: {stderr}"
    );
    let (schema, values, entries) = old_contents(&data);
    assert_eq!(schema, 3, "the refused directory was migrated");
    assert!((schema, values, entries) == old_contents(&pristine), "the refused directory was changed");
}
