//! Measures failover: kills (SIGKILL) the node leading a bucket's flock while jobs on that bucket
//! run back to back through another node, and prints how long the flock was without an
//! acknowledged job: from the kill to the first answer after it.
//!
//! Usage: `failover BUCKET HTTP_URL=PID...` (every node of the cluster, as `scripts/bench-cluster.sh`
//! starts them). Prints `failover_ms N` and `killed URL`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use grex_client::Client;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let bucket = args.next().context("usage: failover BUCKET HTTP_URL=PID...")?.into_bytes();
    let nodes: Vec<(String, u32)> = args
        .map(|a| {
            let (url, pid) = a.split_once('=').context("nodes are given as HTTP_URL=PID")?;
            Ok((url.to_owned(), pid.parse().context("a PID")?))
        })
        .collect::<anyhow::Result<_>>()?;
    if nodes.len() < 3 {
        bail!("failover needs at least three nodes");
    }
    let leader_url = Client::connect(&nodes[0].0, None).await?.canary(&bucket).await?.url;
    let (leader, pid) = nodes.iter().find(|(url, _)| *url == leader_url).context("the canary names no given node")?;
    let (via, _) = nodes.iter().find(|(url, _)| url != leader).expect("three nodes");
    let client = Client::connect(via, None).await?;
    // Warm: the flock has a leader and the job's module is loaded everywhere it matters.
    for _ in 0..20 {
        client.run_job(&bucket, "counter", b"1", false).await.context("warm-up job")?;
    }
    let status = std::process::Command::new("kill").arg("-KILL").arg(pid.to_string()).status()?;
    if !status.success() {
        bail!("kill -KILL {pid} failed");
    }
    let killed = Instant::now();
    loop {
        match client.run_job(&bucket, "counter", b"1", false).await {
            Ok(_) => break,
            Err(_) if killed.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => bail!("no job was acknowledged within 30 s of the kill: {e}"),
        }
    }
    println!("failover_ms {}", killed.elapsed().as_millis());
    println!("killed {leader}");
    Ok(())
}
