//! `grex bench`: a load generator. N clients, each with its own connections, run a job on random
//! buckets back to back for a fixed time (or, with `--rate`, paced to a total rate); prints
//! throughput and latency percentiles. Each client is a [`Router`]: in a cluster it sends every
//! job straight to the node that serves its bucket. With `--in-flight N` each client keeps N jobs
//! under way on its connections (as many QUIC streams), as a pipelining Redis client keeps N
//! requests on its one connection.
//!
//! Paced, a job's latency counts from when it was due, not from when a client that fell behind
//! got to send it, so a stall shows in the percentiles instead of hiding in fewer samples
//! (coordinated omission).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use grex_client::Router;
use rand::{Rng, SeedableRng};

use super::Target;

#[derive(Args)]
pub(super) struct BenchArgs {
    /// Concurrent clients, each with its own connections (one per node it talks to).
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// How long to run, in seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of jobs run first and not counted (0: every job counts, for scripts that divide
    /// the nodes' CPU by the jobs).
    #[arg(long, default_value_t = 1)]
    warm_up: u64,
    /// Jobs each client keeps under way at once, on its one set of connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    in_flight: u16,
    /// Module to run.
    #[arg(long, default_value = "counter")]
    module: String,
    /// Job input.
    #[arg(long, default_value = "1")]
    input: String,
    /// Buckets to pick from at random.
    #[arg(long, default_value_t = 100_000)]
    buckets: u64,
    /// Seed for bucket choice (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Jobs per second over all clients, each client sending at an even share of it (default:
    /// as fast as the answers come).
    #[arg(long)]
    rate: Option<f64>,
    #[command(flatten)]
    target: Target,
}

/// Latency percentiles and throughput of one run.
#[derive(Debug)]
pub struct BenchReport {
    /// Jobs completed in the measured window.
    pub jobs: u64,
    /// Jobs that failed.
    pub errors: u64,
    /// Jobs per second.
    pub jobs_per_s: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

pub(super) async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    println!(
        "bench: {} clients with {} jobs in flight each, {} s, module {}, {} buckets, seed {seed}{}",
        args.clients,
        args.in_flight,
        args.seconds,
        args.module,
        args.buckets,
        args.rate.map(|r| format!(", paced to {r:.0} jobs/s")).unwrap_or_default()
    );
    // Lanes: a client's jobs in flight, each sent back to back (or paced) on the client's connections.
    let lanes = args.clients * usize::from(args.in_flight);
    // Between one lane's jobs, when paced.
    let interval = match args.rate {
        Some(rate) if rate > 0.0 && rate.is_finite() => Some(Duration::from_secs_f64(lanes as f64 / rate)),
        Some(rate) => anyhow::bail!("--rate must be a positive number of jobs per second, not {rate}"),
        None => None,
    };
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        clients.push(Arc::new(
            Router::connect_with(&args.target.node, args.target.options()).await.context("connecting")?,
        ));
    }
    let warm_up = Instant::now() + Duration::from_secs(args.warm_up);
    let end = warm_up + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    let lanes_of_clients = clients.iter().flat_map(|c| std::iter::repeat_n(c, usize::from(args.in_flight)));
    for (i, client) in lanes_of_clients.cloned().enumerate() {
        let module = args.module.clone();
        let input = args.input.clone().into_bytes();
        let buckets = args.buckets;
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(i as u64));
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            // Lanes start spread over one interval, not all at once.
            let mut due = interval.map(|every| Instant::now() + every.mul_f64(i as f64 / lanes as f64));
            loop {
                let bucket = format!("bench-{}", rng.random_range(0..buckets));
                let start = match (due.as_mut(), interval) {
                    (Some(due), Some(every)) => {
                        tokio::time::sleep_until((*due).into()).await;
                        let at = *due;
                        *due += every;
                        at
                    }
                    _ => Instant::now(),
                };
                let result = client.run_job(bucket.as_bytes(), &module, &input, false).await;
                let done = Instant::now();
                if done >= end {
                    break;
                }
                if start >= warm_up {
                    match result {
                        Ok(_) => latencies.push(done - start),
                        Err(_) => errors += 1,
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        errors += e;
    }
    let report = summarize(latencies, errors, Duration::from_secs(args.seconds));
    println!(
        "jobs/s {:.0}  p50 {:.2} ms  p99 {:.2} ms  ({} jobs, {} errors)",
        report.jobs_per_s,
        report.p50.as_secs_f64() * 1e3,
        report.p99.as_secs_f64() * 1e3,
        report.jobs,
        report.errors
    );
    if report.errors > 0 {
        anyhow::bail!("{} jobs failed during the run", report.errors);
    }
    Ok(())
}

/// Throughput and percentiles of a set of latencies measured over `window`.
pub fn summarize(mut latencies: Vec<Duration>, errors: u64, window: Duration) -> BenchReport {
    latencies.sort_unstable();
    let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    BenchReport {
        jobs: latencies.len() as u64,
        errors,
        jobs_per_s: latencies.len() as f64 / window.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_sorted_latencies() {
        let latencies = (1..=100).rev().map(Duration::from_millis).collect();
        let report = summarize(latencies, 0, Duration::from_secs(2));
        assert_eq!(report.jobs, 100);
        assert_eq!(report.jobs_per_s, 50.0);
        assert_eq!(report.p50, Duration::from_millis(51));
        assert_eq!(report.p99, Duration::from_millis(99));
    }
}
