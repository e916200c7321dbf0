//! A counting workload for tests that move a cluster's flocks around (drains, removals,
//! upgrades): the `counter` job adds to one bucket of every flock, a writer tallies what was
//! acknowledged, and checks find every acknowledged increment on every herder.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use grex_client::proto::{ErrorCode, FlockMapInfo, NodesInfo};
use grex_client::{Client, ClientError};

use crate::{GrexNode, TEST_FLOCKS, TestCluster, eventually, job_wasm};

/// How long a check waits for the cluster to catch up.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Uploads `counter` through node 0 and waits until every node resolves it.
pub async fn load_counter(cluster: &TestCluster) {
    cluster.nodes[0].client().await.put_module("counter", job_wasm("counter")).await.expect("upload counter");
    for node in &cluster.nodes {
        let client = node.http_client().await;
        eventually("the module to reach every node", PATIENCE, || async {
            client.list_modules().await.is_ok_and(|m| m.iter().any(|m| m.name == "counter"))
        })
        .await;
    }
}

/// One bucket per flock, so every flock holds data that must survive its moves.
pub fn bucket_per_flock() -> Vec<String> {
    let mut buckets: Vec<Option<String>> = vec![None; TEST_FLOCKS as usize];
    for i in 0.. {
        let bucket = format!("customer-{i}");
        buckets[grex_client::proto::flock_of(bucket.as_bytes(), TEST_FLOCKS) as usize].get_or_insert(bucket);
        if buckets.iter().all(Option::is_some) {
            break;
        }
    }
    buckets.into_iter().map(Option::unwrap).collect()
}

/// Adds `step` to a bucket of every flock through `client`; returns the buckets and what each
/// now holds.
pub async fn add_to_each_flock(client: &Client, step: i64) -> (Vec<String>, BTreeMap<String, Tally>) {
    let buckets = bucket_per_flock();
    let mut tallies = BTreeMap::new();
    for bucket in &buckets {
        client.run_job(bucket.as_bytes(), "counter", step.to_string().as_bytes(), false).await.expect("write");
        tallies.insert(bucket.clone(), Tally { acked: step, unknown: 0 });
    }
    (buckets, tallies)
}

/// What a writer saw of one bucket: increments acknowledged, and those whose outcome is unknown.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Increments acknowledged.
    pub acked: i64,
    /// Increments whose outcome is unknown (they may or may not have been applied).
    pub unknown: i64,
}

/// Increments every bucket in turn until `stop`, each job through the next of `clients` that
/// can be reached, and then once more each (a whole pass begun after `stop`, so every bucket is
/// tried on the cluster as it is then); returns each bucket's tally and the longest time between
/// two acknowledged jobs.
pub async fn write_until(
    clients: Vec<Client>,
    buckets: Vec<String>,
    stop: Arc<AtomicBool>,
) -> (BTreeMap<String, Tally>, Duration) {
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let (mut last_ok, mut longest_gap) = (Instant::now(), Duration::ZERO);
    let mut next = 0;
    let mut last_pass = false;
    while !last_pass {
        last_pass = stop.load(Ordering::Relaxed);
        for bucket in &buckets {
            let tally = tallies.entry(bucket.clone()).or_default();
            next = (next + 1) % clients.len();
            match clients[next].run_job(bucket.as_bytes(), "counter", b"1", false).await {
                Ok(_) => {
                    tally.acked += 1;
                    longest_gap = longest_gap.max(last_ok.elapsed());
                    last_ok = Instant::now();
                }
                Err(e) if e.code() == Some(ErrorCode::OutcomeUnknown) || matches!(e, ClientError::NoAnswer(_)) => {
                    tally.unknown += 1
                }
                // A node stopped or restarting: the next job goes to the next node.
                Err(ClientError::Unreachable(_)) if clients.len() > 1 => {}
                Err(e) if matches!(e.code(), Some(ErrorCode::Unavailable | ErrorCode::NoQuorum)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("a job on {bucket} failed: {e}"),
            }
        }
    }
    (tallies, longest_gap)
}

/// Every herder of each bucket's flock (by the map `nodes[0]` has) must come to hold every
/// acknowledged increment in its own store (a follower may trail for a moment; a new herder has
/// copied the flock), and never more than were tried.
pub async fn check_copies(nodes: &[&GrexNode], tallies: &BTreeMap<String, Tally>) {
    let map = nodes[0].http_client().await.flocks().await.expect("flock map");
    for (bucket, tally) in tallies {
        let flock = grex_client::proto::flock_of(bucket.as_bytes(), TEST_FLOCKS) as usize;
        for herder in &map.flocks[flock].herders {
            let node = nodes.iter().find(|n| &n.id == herder).unwrap_or_else(|| panic!("herder {herder} is not up"));
            let client = node.http_client().await;
            let deadline = Instant::now() + PATIENCE;
            loop {
                let count: i64 = match client.get_item(bucket.as_bytes(), "count").await {
                    Ok(bytes) => String::from_utf8(bytes).expect("text").parse().expect("a count"),
                    Err(e) if e.code() == Some(ErrorCode::ItemNotFound) => 0,
                    Err(e) => panic!("reading {bucket} on {herder}: {e}"),
                };
                assert!(count <= tally.acked + tally.unknown, "{bucket} on {herder}: count {count}, over {tally:?}");
                if count >= tally.acked {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{bucket} on herder {herder}: count {count}, acknowledged {tally:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Waits until `client` lists exactly `members` as the cluster's nodes, none draining, every flock
/// has min(3, members) herders among them, a leader, and its membership settled, and every member
/// herds some flock.
pub async fn wait_members(client: &Client, members: &[&str]) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (nodes, map): (Option<NodesInfo>, Option<FlockMapInfo>) =
            (client.nodes().await.ok(), client.flocks().await.ok());
        if let (Some(nodes), Some(map)) = (&nodes, &map) {
            let mut listed: Vec<&str> = nodes.nodes.iter().map(|n| n.id.as_str()).collect();
            let mut wanted = members.to_vec();
            listed.sort_unstable();
            wanted.sort_unstable();
            let placed = map.flocks.iter().all(|f| {
                f.settled
                    && f.leader.is_some()
                    && f.herders.len() == members.len().min(3)
                    && f.herders.iter().all(|h| members.contains(&h.as_str()))
            });
            // Placement balances: every member herds some flocks.
            let shared = members.iter().all(|m| map.flocks.iter().any(|f| f.herders.iter().any(|h| h == m)));
            if listed == wanted && nodes.nodes.iter().all(|n| n.state == "active") && placed && shared {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the members did not become {members:?} within {PATIENCE:?}: {nodes:#?} {map:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
