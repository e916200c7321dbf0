//! Durability: acknowledged jobs survive kill -9; a clean stop and restart keeps everything.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use grex_tests::{GrexNode, job_wasm, seed, wait_until};
use rand::{Rng, SeedableRng};

const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_stream_of_jobs_loses_no_acknowledged_increment() {
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let mut node = GrexNode::start(dir.path(), &[]);
    node.client().await.put_module("counter", job_wasm("counter")).await.unwrap();

    // Each client owns one bucket and adds random steps; it records what the node acknowledged.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    let in_flight_step: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    let total_acks = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let client = node.client().await;
        let (acked, in_flight_step, total_acks) = (acked.clone(), in_flight_step.clone(), total_acks.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed + i as u64);
            loop {
                let step: u64 = rng.random_range(1..=9);
                in_flight_step[i].store(step, Ordering::SeqCst);
                let bucket = format!("k-{i}");
                match client.run_job(bucket.as_bytes(), "counter", step.to_string().as_bytes(), false).await {
                    Ok(out) => {
                        let value: u64 = std::str::from_utf8(&out.output).unwrap().parse().unwrap();
                        let before = acked[i].fetch_add(step, Ordering::SeqCst);
                        assert_eq!(value, before + step, "client {i} saw a count that skips its own acknowledged jobs");
                        total_acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => return, // the node died under us
                }
            }
        }));
    }
    wait_until("300 acknowledged jobs", Duration::from_secs(60), || total_acks.load(Ordering::SeqCst) >= 300);
    node.kill9();
    // Jobs in flight now have unknown outcomes; stop the clients rather than wait for them to notice.
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        if let Err(e) = task.await {
            assert!(e.is_cancelled(), "a client task failed: {e}");
        }
    }

    let node = GrexNode::start(dir.path(), &[]);
    let client = node.client().await;
    for i in 0..CLIENTS {
        let acknowledged = acked[i].load(Ordering::SeqCst);
        let count = match client.get_item(format!("k-{i}").as_bytes(), "count").await {
            Ok(bytes) => String::from_utf8(bytes).unwrap().parse::<u64>().unwrap(),
            Err(e) => {
                assert_eq!(acknowledged, 0, "bucket k-{i} lost every acknowledged job: {e}");
                0
            }
        };
        // At most the one unacknowledged job per client may have committed.
        let lost_answer = in_flight_step[i].load(Ordering::SeqCst);
        assert!(
            count == acknowledged || count == acknowledged + lost_answer,
            "bucket k-{i}: {count} on disk, {acknowledged} acknowledged (+{lost_answer} possibly in flight)"
        );
    }
    // The restarted node serves and continues from the recovered state.
    let before: u64 = String::from_utf8(client.get_item(b"k-0", "count").await.unwrap()).unwrap().parse().unwrap();
    let after = client.run_job(b"k-0", "counter", b"1", false).await.unwrap();
    assert_eq!(String::from_utf8(after.output).unwrap(), (before + 1).to_string());
}

#[tokio::test]
async fn a_clean_stop_and_restart_keeps_items_modules_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = GrexNode::start(dir.path(), &[]);
    let client = node.client().await;
    client.put_module("counter", job_wasm("counter")).await.unwrap();
    client.run_job(b"kept", "counter", b"12", false).await.unwrap();
    let id = client.status().await.unwrap().node;
    drop(client);
    assert!(node.terminate(), "SIGTERM should stop the node cleanly");

    let node = GrexNode::start(dir.path(), &[]);
    let client = node.client().await;
    assert_eq!(client.status().await.unwrap().node, id);
    assert_eq!(client.get_item(b"kept", "count").await.unwrap(), b"12");
    let out = client.run_job(b"kept", "counter", b"", false).await.unwrap();
    assert_eq!((out.output.as_slice(), out.bucket_version), (&b"13"[..], 2));
}
