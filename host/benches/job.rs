//! In-process cost of a job, without the network: `cargo bench -p grex --bench job`.
//!
//! Three figures for the `counter` job, each the median of several rounds:
//! - `sandbox`: `Runtime::run` alone: a fresh store and instance, the call, the change set.
//! - `node, sequential`: `Node::run_job` one at a time (queue hop to the shard, cache, commit
//!   queue), fsync off so the disk does not dominate.
//! - `node, 64 concurrent, durable`: throughput with group commit and fsync on.
//!
//! Needs the jobs built: `scripts/build-jobs.sh`. `GREX_BENCH_MODULES=NAME=PATH,...` adds the
//! sandbox figure of other builds of the same job (`scripts/bench-languages.sh` passes the
//! JavaScript and Python counters); those run in a runtime with the compile limits raised, as a
//! node's would have to be, and fewer iterations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use grex::data::BucketData;
use grex::wasm::{JobInput, Runtime};
use grex::{Limits, Node, NodeConfig};

const ROUNDS: usize = 7;

fn counter_wasm() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/jobs/wasm32-unknown-unknown/wasm/counter.wasm");
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}; run scripts/build-jobs.sh first"))
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn bench_sandbox(wasm: &[u8], iterations: usize) -> f64 {
    let runtime = Runtime::new(Limits::default(), 4).expect("runtime");
    let module = runtime.compile(wasm).expect("compile counter");
    let input =
        JobInput { bucket: b"bench", flock: 0, module_name: "counter", input: b"1", read_only: false, timestamp_ms: 0 };
    let mut bucket = BucketData::default();
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..iterations {
            let (mut data, result) = runtime.run(&module, bucket, &input);
            let change = result.expect("counter runs").change.expect("counter writes");
            data.apply(&change);
            bucket = data;
        }
        rounds.push(start.elapsed().as_secs_f64() * 1e6 / iterations as f64);
    }
    median(rounds)
}

fn node(durable: bool) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = NodeConfig::new(dir.path());
    config.durable = durable;
    (dir, Node::open(config).expect("node"))
}

async fn bench_node_sequential(wasm: &[u8]) -> f64 {
    let (_dir, node) = node(false);
    node.put_module("counter", wasm.to_vec()).await.expect("upload");
    let iterations = 20_000;
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for i in 0..iterations {
            let bucket = format!("b-{}", i % 1000);
            node.run_job(bucket.as_bytes(), "counter", b"1".to_vec(), false).await.expect("job");
        }
        rounds.push(start.elapsed().as_secs_f64() * 1e6 / iterations as f64);
    }
    node.shutdown().await;
    median(rounds)
}

async fn bench_node_concurrent(wasm: &[u8]) -> f64 {
    let (_dir, node) = node(true);
    node.put_module("counter", wasm.to_vec()).await.expect("upload");
    let node = Arc::new(node);
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let window = Duration::from_secs(1);
        let mut tasks = Vec::new();
        for t in 0..64 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0u64;
                while start.elapsed() < window {
                    let bucket = format!("b-{t}-{}", done % 100);
                    node.run_job(bucket.as_bytes(), "counter", b"1".to_vec(), false).await.expect("job");
                    done += 1;
                }
                done
            }));
        }
        let mut jobs = 0;
        for task in tasks {
            jobs += task.await.expect("task");
        }
        rounds.push(jobs as f64 / start.elapsed().as_secs_f64());
    }
    node.shutdown().await;
    median(rounds)
}

fn main() {
    let wasm = counter_wasm();
    println!("counter job, median of {ROUNDS} rounds");
    println!("sandbox (instantiate + run + change set): {:>8.2} µs/job", bench_sandbox(&wasm, 20_000));
    for (name, path) in
        std::env::var("GREX_BENCH_MODULES").unwrap_or_default().split(',').filter_map(|m| m.split_once('='))
    {
        let other = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        println!("sandbox, {name:<33} {:>8.2} µs/job", bench_sandbox(&other, 500));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    println!("node, sequential, no fsync:               {:>8.2} µs/job", rt.block_on(bench_node_sequential(&wasm)));
    println!("node, 64 concurrent, durable (fsync):     {:>8.0} jobs/s", rt.block_on(bench_node_concurrent(&wasm)));
}
