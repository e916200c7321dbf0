//! An application server that is also a Grex node: it opens a data directory, loads the `counter`
//! job and runs jobs with no network hop, then serves the same node over HTTP and QUIC so other
//! clients can reach it too.
//!
//! `cargo run -p grex-examples --bin embedded -- [DATA_DIR]` (build the jobs first with
//! `scripts/build-jobs.sh`).

use anyhow::Context;
use grex::api::{self, ServeConfig};
use grex::{Node, NodeConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let data = std::env::args().nth(1).unwrap_or_else(|| "grex-data-embedded".into());
    let node = Node::open(NodeConfig::new(&data))?;

    let wasm_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/jobs/wasm32-unknown-unknown/wasm/counter.wasm");
    let wasm = std::fs::read(wasm_path).with_context(|| format!("{wasm_path}: run scripts/build-jobs.sh first"))?;
    let module = node.put_module("counter", wasm).await?;
    println!("loaded counter as {}", module.id);

    // In-process: the job runs in this process's sandbox pool and is durable when this returns.
    for step in ["1", "2", "3"] {
        let out = node.run_job(b"customer-42", "counter", step.as_bytes().to_vec(), false).await?;
        println!(
            "customer-42 count = {} (bucket version {})",
            String::from_utf8_lossy(&out.output),
            out.bucket_version
        );
    }

    // The same node, reachable by others.
    let servers =
        api::start(&node, &ServeConfig { http: Some("127.0.0.1:0".parse()?), ..ServeConfig::default() }).await?;
    let url = format!("http://{}", servers.http_addr.context("HTTP is on")?);
    let client = grex_client::Client::connect(&url, None).await?;
    let count = client.get_item(b"customer-42", "count").await?;
    println!("over HTTP at {url}: count = {}", String::from_utf8_lossy(&count));

    servers.stop().await;
    node.shutdown().await;
    Ok(())
}
