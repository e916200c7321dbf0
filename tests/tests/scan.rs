//! Scans: a read-only job on every bucket of a 3-node cluster, streamed over QUIC and HTTP,
//! folded by a reduce module, and with a node killed mid-scan.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use grex_client::proto::{ErrorCode, ScanEvent, ScanRequest};
use grex_client::{Client, ClientError, ScanSummary};
use grex_tests::{TEST_FLOCKS, TestCluster, http, job_wasm};

/// Writes `counts[key]` increments of 1 to each bucket, 64 at a time, each bucket once
/// (`counter` with input N adds N).
async fn fill(client: &Client, counts: &BTreeMap<String, i64>) {
    let keys: Vec<(&String, &i64)> = counts.iter().collect();
    for chunk in keys.chunks(64) {
        let inputs: Vec<String> = chunk.iter().map(|(_, n)| n.to_string()).collect();
        let runs = chunk
            .iter()
            .zip(&inputs)
            .map(|((key, _), input)| client.run_job(key.as_bytes(), "counter", input.as_bytes(), false));
        for (result, (key, _)) in join_all(runs).await.into_iter().zip(chunk) {
            result.unwrap_or_else(|e| panic!("writing {key}: {e}"));
        }
    }
}

/// Every event of a scan, and how it ended.
async fn scan(client: &Client, request: ScanRequest) -> (Vec<ScanEvent>, Result<ScanSummary, ClientError>) {
    let mut events = Vec::new();
    let summary = client.scan(request, |event| events.push(event.clone())).await;
    (events, summary)
}

/// The results of a scan by bucket, asserting that no bucket came twice.
fn results(events: &[ScanEvent]) -> BTreeMap<String, Result<String, ErrorCode>> {
    let mut seen = BTreeMap::new();
    for event in events {
        if let ScanEvent::Results { flock, items } = event {
            for item in items {
                let key = String::from_utf8(item.bucket.clone()).unwrap();
                assert_eq!(grex_client::proto::flock_of(&item.bucket, TEST_FLOCKS), *flock, "{key} under its flock");
                let result = match (&item.output, &item.error) {
                    (Some(output), None) => Ok(String::from_utf8(output.clone()).unwrap()),
                    (None, Some(e)) => Err(e.code),
                    other => panic!("an item with neither or both of output and error: {other:?}"),
                };
                assert!(seen.insert(key.clone(), result).is_none(), "{key} came twice");
            }
        }
    }
    seen
}

fn counter_scan(prefix: &str) -> ScanRequest {
    ScanRequest { module: "counter".into(), input: b"0".to_vec(), prefix: prefix.into(), reduce: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scan_runs_once_on_every_bucket_at_one_version_per_flock_and_folds() {
    let cluster = TestCluster::start(3, &[]).await;
    let client = cluster.nodes[1].client().await;
    client.put_module("counter", job_wasm("counter")).await.unwrap();
    client.put_module("sum", job_wasm("sum")).await.unwrap();
    let mut counts = BTreeMap::new();
    for i in 0..1500 {
        counts.insert(format!("user-{i:04}"), i % 7 + 1);
    }
    for i in 0..300 {
        counts.insert(format!("shop-{i:03}"), 100);
    }
    fill(&client, &counts).await;
    let expected = |prefix: &str| -> BTreeMap<String, Result<String, ErrorCode>> {
        counts.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, n)| (k.clone(), Ok(n.to_string()))).collect()
    };

    // Every bucket once, with its count, over QUIC; every flock once, read by a node that leads it.
    let (events, summary) = scan(&client, counter_scan("")).await;
    let summary = summary.expect("the scan completes");
    assert_eq!(results(&events), expected(""));
    assert_eq!((summary.flocks, summary.buckets, summary.failed), (TEST_FLOCKS, counts.len() as u64, 0));
    let map = client.flocks().await.unwrap();
    let mut flocks: Vec<u32> = Vec::new();
    for event in &events {
        if let ScanEvent::Flock(done) = event {
            flocks.push(done.flock);
            assert!(done.version > 0, "flock {} was read at an applied index", done.flock);
            let herders = &map.flocks[done.flock as usize].herders;
            assert!(
                herders.contains(&done.node),
                "flock {} was read on {}, not one of its herders",
                done.flock,
                done.node
            );
        }
    }
    flocks.sort();
    assert_eq!(flocks, (0..TEST_FLOCKS).collect::<Vec<_>>(), "each flock reported once");

    // A prefix, over HTTP, through the client and as raw JSON lines.
    let over_http = cluster.nodes[2].http_client().await;
    let (events, summary) = scan(&over_http, counter_scan("shop-")).await;
    assert_eq!(results(&events), expected("shop-"));
    assert_eq!(summary.unwrap().buckets, 300);
    let answer = http(
        cluster.nodes[0].http_addr(),
        "POST",
        "/v1/scan?module=counter&prefix=user-000",
        &[("content-type", "text/plain")],
        b"0",
    );
    assert_eq!(answer.status, 200);
    let lines: Vec<serde_json::Value> = answer
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let buckets: Vec<&str> = lines
        .iter()
        .filter_map(|line| line.get("results"))
        .flat_map(|r| r["items"].as_array().unwrap())
        .map(|item| item["bucket"].as_str().unwrap())
        .collect();
    assert_eq!(buckets.len(), 10, "user-0000 to user-0009: {lines:?}");
    assert_eq!(lines.last().unwrap()["done"]["buckets"], 10);

    // A reduce module folds every output into one; only failures are streamed then.
    let total: i64 = counts.values().sum();
    let mut request = counter_scan("");
    request.reduce = Some("sum".into());
    let (events, summary) = scan(&client, request).await;
    assert_eq!(summary.unwrap().reduced.as_deref(), Some(total.to_string().as_bytes()));
    assert!(results(&events).is_empty(), "outputs are folded, not streamed");

    // A job that writes fails on each bucket (a scan is read-only), and the scan says how many.
    let (events, summary) = scan(&client, ScanRequest { input: b"1".to_vec(), ..counter_scan("shop-01") }).await;
    let failures = results(&events);
    assert_eq!(failures.len(), 10);
    assert!(failures.values().all(Result::is_err), "{failures:?}");
    assert_eq!(summary.unwrap().failed, 10);
    assert_eq!(client.run_job(b"shop-010", "counter", b"0", true).await.unwrap().output, b"100", "nothing was written");

    // Bad requests: no such module, a prefix longer than any key, a built-in.
    let (_, summary) = scan(&client, ScanRequest { module: "nope".into(), ..counter_scan("") }).await;
    let e = summary.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::ModuleNotFound), "{e}");
    let (_, summary) = scan(&client, counter_scan(&"p".repeat(600))).await;
    assert_eq!(summary.unwrap_err().code(), Some(ErrorCode::InvalidBucketKey));
    let (_, summary) = scan(&client, ScanRequest { module: "builtin:hget".into(), ..counter_scan("") }).await;
    assert_eq!(summary.unwrap_err().code(), Some(ErrorCode::BadRequest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_scan_never_leaves_a_flock_out_silently() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let client = cluster.nodes[0].client().await;
    client.put_module("counter", job_wasm("counter")).await.unwrap();
    let counts: BTreeMap<String, i64> = (0..3000).map(|i| (format!("c-{i:04}"), i % 5 + 1)).collect();
    fill(&client, &counts).await;

    // Leadership spreads a few seconds after the cluster forms: wait until nodes 1 and 2 lead
    // flocks, so that killing one takes flocks from under the scan.
    let (one, two) = (cluster.nodes[1].id.clone(), cluster.nodes[2].id.clone());
    grex_tests::eventually("nodes 1 and 2 lead flocks", Duration::from_secs(30), || async {
        let map = client.flocks().await.unwrap();
        let leads = |id: &String| map.flocks.iter().filter(|f| f.leader.as_ref() == Some(id)).count();
        leads(&one) >= 2 && leads(&two) >= 2
    })
    .await;

    // Scan from node 0; once the first flock is in, kill a node that leads flocks still to come.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let scanning = tokio::spawn(async move {
        let summary = client.scan(counter_scan(""), |event| drop(tx.send(event.clone()))).await;
        (client, summary)
    });
    let mut events = Vec::new();
    let mut killed = None;
    while let Some(event) = rx.recv().await {
        if killed.is_none() && matches!(event, ScanEvent::Flock(_)) {
            let ScanEvent::Flock(first) = &event else { unreachable!() };
            // Not the node that read the first flock, if that is node 1 or 2: one still reading.
            let victim = if first.node == one { 2 } else { 1 };
            cluster.nodes[victim].kill9();
            killed = Some(victim);
            println!("killed node {victim} after the first flock");
        }
        events.push(event);
    }
    let (client, summary) = scanning.await.unwrap();
    let victim_id = &cluster.nodes[killed.expect("a node was killed")].id;
    let moved = events.iter().filter(|e| matches!(e, ScanEvent::Flock(f) if f.node != *victim_id)).count();
    println!("{moved} flocks read elsewhere than on the killed node");
    let seen = results(&events);
    for (key, result) in &seen {
        assert_eq!(result.as_ref().ok().map(String::as_str), Some(counts[key].to_string().as_str()), "{key}");
    }
    match summary {
        Ok(summary) => {
            println!("the scan completed despite the kill");
            assert_eq!(seen.len(), counts.len(), "every bucket, none left out");
            assert_eq!((summary.flocks, summary.buckets), (TEST_FLOCKS, counts.len() as u64));
        }
        Err(e) => {
            println!("the scan failed: {e}");
            assert!(e.to_string().contains("flock"), "the error names the flock it lost: {e}");
        }
    }

    // Once the survivors lead every flock, a scan completes with every bucket.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (events, summary) = scan(&client, counter_scan("")).await;
        match summary {
            Ok(summary) => {
                assert_eq!(results(&events).len(), counts.len());
                assert_eq!(summary.buckets, counts.len() as u64);
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                println!("retrying the scan after: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("no complete scan after the kill: {e}"),
        }
    }
}
