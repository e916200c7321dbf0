//! `grex top`: the cluster in a terminal, refreshed every few seconds: per node its jobs per
//! second, latency quantiles, running jobs, flocks led and how far behind its followers and its
//! own applying are, and the cluster's last failed jobs. Rates and quantiles are the difference
//! between two readings of every member's load (`/v1/cluster/stats`, gathered by the node asked).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use grex_client::proto::latency_quantile;
use grex_client::{ClusterStats, NodeStats};

use super::Target;

#[derive(Args)]
pub(super) struct TopArgs {
    /// Seconds between readings.
    #[arg(long, default_value_t = 2.0, value_parser = parse_interval)]
    interval: f64,
    /// Print one view (two readings an interval apart) and exit, without clearing the screen.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    target: Target,
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.2..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err("give the seconds between readings, from 0.2 to 3600".to_owned()),
    }
}

/// Failed jobs listed under the nodes.
const FAILED_SHOWN: usize = 5;

pub(super) async fn top(args: TopArgs) -> anyhow::Result<()> {
    let client = grex_client::Client::connect_with(&args.target.node, &args.target.options()).await?;
    let interval = Duration::from_secs_f64(args.interval);
    let mut previous = client.cluster_stats().await?;
    let interactive = !args.once && std::io::stdout().is_terminal();
    if interactive {
        print!("{}", screen(&render(&previous, None, args.interval)));
        std::io::stdout().flush()?;
    }
    loop {
        tokio::time::sleep(interval).await;
        let now = match client.cluster_stats().await {
            Ok(now) => now,
            // A node restarting, say: keep showing the last view with the error under it.
            Err(e) if !args.once => {
                let mut view = render(&previous, None, args.interval);
                let _ = writeln!(view, "\ncannot read the cluster's load from {}: {e}", args.target.node);
                print!("{}", if interactive { screen(&view) } else { view });
                std::io::stdout().flush()?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let view = render(&now, Some(&previous), args.interval);
        if args.once {
            print!("{view}");
            return Ok(());
        }
        print!("{}", if interactive { screen(&view) } else { format!("{view}\n") });
        std::io::stdout().flush()?;
        previous = now;
    }
}

/// `view` over the whole terminal: cursor home, the view, and the rest of the screen cleared.
fn screen(view: &str) -> String {
    format!("\x1b[H{}\x1b[J", view.replace('\n', "\x1b[K\n"))
}

/// One member's rates between two readings.
struct Rates {
    jobs_per_s: f64,
    p50_s: Option<f64>,
    p99_s: Option<f64>,
}

fn rates(now: &NodeStats, before: Option<&NodeStats>, seconds: f64) -> Option<Rates> {
    let before = before?;
    let done = |s: &NodeStats| s.status.jobs_ok + s.status.jobs_failed;
    // A member that restarted counts from zero again: no rate until the next reading.
    if seconds <= 0.0 || done(now) < done(before) {
        return None;
    }
    Some(Rates {
        jobs_per_s: (done(now) - done(before)) as f64 / seconds,
        p50_s: latency_quantile(&before.latency, &now.latency, 0.5),
        p99_s: latency_quantile(&before.latency, &now.latency, 0.99),
    })
}

fn millis(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".to_owned(), |s| format!("{:.1}", s * 1000.0))
}

/// The view of `now` (rates against `before`, when given).
fn render(now: &ClusterStats, before: Option<&ClusterStats>, interval: f64) -> String {
    let seconds = before.map_or(0.0, |b| now.at_ms.saturating_sub(b.at_ms) as f64 / 1000.0);
    let earlier: HashMap<&str, &NodeStats> = before
        .map(|b| b.members.iter().filter_map(|m| Some((m.id.as_str(), m.stats.as_ref()?))).collect())
        .unwrap_or_default();
    let up = now.members.iter().filter(|m| m.alive).count();
    let flocks = now.members.iter().find_map(|m| m.stats.as_ref()).map_or(0, |s| s.status.flock_count);
    let led: usize = now.members.iter().filter_map(|m| m.stats.as_ref()).map(|s| s.leads.len()).sum();

    let mut rows = String::new();
    let (mut total_jobs, mut before_latency, mut after_latency) = (0.0, Vec::<u64>::new(), Vec::<u64>::new());
    for member in &now.members {
        let reach = if member.alive { "up" } else { "down" };
        let Some(stats) = &member.stats else {
            let why = member.error.as_deref().unwrap_or("no answer");
            let _ = writeln!(rows, "{:<16}  {:<5}  {why}", member.id, reach);
            continue;
        };
        let rate = rates(stats, earlier.get(member.id.as_str()).copied(), seconds);
        if let (Some(r), Some(earlier)) = (&rate, earlier.get(member.id.as_str())) {
            total_jobs += r.jobs_per_s;
            add(&mut before_latency, &earlier.latency);
            add(&mut after_latency, &stats.latency);
        }
        let repl_lag = stats.leads.iter().map(|l| l.lag).max().unwrap_or(0);
        let _ = writeln!(
            rows,
            "{:<16}  {:<5}  {:>8}  {:>8}  {:>8}  {:>7}  {:>5}  {:>8}  {:>9}  {:>9}  {}{}",
            member.id,
            reach,
            rate.as_ref().map_or_else(|| "-".to_owned(), |r| format!("{:.1}", r.jobs_per_s)),
            millis(rate.as_ref().and_then(|r| r.p50_s)),
            millis(rate.as_ref().and_then(|r| r.p99_s)),
            stats.status.jobs_running,
            stats.leads.len(),
            repl_lag,
            stats.apply_lag,
            format!("{:.1} MiB", stats.status.cache_bytes as f64 / (1024.0 * 1024.0)),
            stats.status.version,
            if member.id == now.node { "  (asked)" } else { "" },
        );
    }
    let mut view = String::new();
    let _ = write!(view, "grex top · {} nodes, {up} up · {flocks} flocks, {led} led", now.members.len());
    if before.is_some() {
        let _ = write!(
            view,
            " · {total_jobs:.1} jobs/s · p50 {} ms · p99 {} ms",
            millis(latency_quantile(&before_latency, &after_latency, 0.5)),
            millis(latency_quantile(&before_latency, &after_latency, 0.99)),
        );
    }
    let _ = writeln!(view, "\nevery {interval} s, as {} gathers it\n", now.node);
    let _ = writeln!(
        view,
        "{:<16}  {:<5}  {:>8}  {:>8}  {:>8}  {:>7}  {:>5}  {:>8}  {:>9}  {:>9}  VERSION",
        "NODE", "REACH", "JOBS/S", "P50 MS", "P99 MS", "RUNNING", "LEADS", "REPL LAG", "APPLY LAG", "CACHE"
    );
    view.push_str(&rows);
    let mut failed: Vec<_> = now
        .members
        .iter()
        .filter_map(|m| Some((m.id.as_str(), m.stats.as_ref()?)))
        .flat_map(|(id, s)| s.failed.iter().map(move |job| (id, job)))
        .collect();
    failed.sort_by_key(|(_, job)| std::cmp::Reverse(job.at_ms));
    if !failed.is_empty() {
        let _ = writeln!(view, "\nLAST FAILED JOBS");
        for (node, job) in failed.into_iter().take(FAILED_SHOWN) {
            let code = job.error.map_or("-", |c| c.as_str());
            let _ = writeln!(
                view,
                "{node:<16}  {:<16}  bucket {}  {code}  {:.1} ms",
                job.module,
                job.bucket_hash,
                job.total_us as f64 / 1000.0
            );
        }
    }
    view
}

/// Adds `counts` into `sum`, bucket by bucket.
fn add(sum: &mut Vec<u64>, counts: &[u64]) {
    if sum.len() < counts.len() {
        sum.resize(counts.len(), 0);
    }
    for (total, n) in sum.iter_mut().zip(counts) {
        *total += n;
    }
}
