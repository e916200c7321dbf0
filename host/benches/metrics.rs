//! What counting a job costs: `cargo bench -p grex --bench metrics`.
//!
//! `Metrics::job` as the executor calls it for every job (one counter, four histogram
//! observations and the node-wide latency bucket), on one thread and on two at once (the node's
//! executors share the metrics), and one scrape (`Metrics::render`) of those series. Each figure
//! is the median of several rounds.

use std::time::{Duration, Instant};

use grex::metrics::{Metrics, Phase};

const ROUNDS: usize = 7;
const CALLS: u32 = 1_000_000;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn count_jobs(metrics: &Metrics, calls: u32) {
    let phases = [
        (Phase::Queue, Duration::from_micros(20)),
        (Phase::Run, Duration::from_micros(150)),
        (Phase::Commit, Duration::from_micros(900)),
        (Phase::Total, Duration::from_micros(1_100)),
    ];
    for i in 0..calls {
        let module = if i % 8 == 0 { "ledger" } else { "counter" };
        metrics.job(std::hint::black_box(module), Ok(()), &phases);
    }
}

fn main() {
    let metrics = Metrics::new();
    let mut one = Vec::new();
    let mut two = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        count_jobs(&metrics, CALLS);
        one.push(start.elapsed().as_nanos() as f64 / f64::from(CALLS));
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| count_jobs(&metrics, CALLS));
            }
        });
        two.push(start.elapsed().as_nanos() as f64 / f64::from(2 * CALLS));
    }
    let mut scrapes = Vec::new();
    let mut bytes = 0;
    for _ in 0..ROUNDS * 10 {
        let start = Instant::now();
        bytes = std::hint::black_box(metrics.render()).len();
        scrapes.push(start.elapsed().as_secs_f64() * 1e6);
    }
    println!("counting a job, one thread:          {:.0} ns", median(one));
    println!("counting a job, two threads at once: {:.0} ns a job (wall time / jobs)", median(two));
    println!("one scrape of these series:          {:.0} µs ({bytes} bytes)", median(scrapes));
}
