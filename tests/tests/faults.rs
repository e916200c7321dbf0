//! Faults against real `grex serve` processes, checked with the list-append checker
//! (`grex_tests::list_append`): kill -9 and restart, the flock leader's death, pauses longer than
//! the failure detector's timeout, restarts under load, partitions (whole and between two nodes),
//! failing disks, a node joining and module uploads. Each test is randomized from a seed
//! it prints (`GREX_SEED=... replays the schedule`); `scripts/soak.sh` runs many more.

use std::time::Duration;

use grex_tests::nemesis::{self, Mix, Report, RunConfig};

/// Seconds of faults per test: `GREX_FAULT_SECS`, default 20.
fn duration() -> Duration {
    let secs = std::env::var("GREX_FAULT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    Duration::from_secs(secs)
}

fn config(mix: Mix) -> RunConfig {
    RunConfig {
        seed: grex_tests::seed(),
        nodes: 3,
        buckets: 3,
        workers: 6,
        duration: duration(),
        mix,
        args: Vec::new(),
    }
}

fn assert_clean(report: &Report) {
    println!("{}", report.describe());
    assert!(report.anomalies.is_empty(), "the checker found anomalies:\n{}", report.describe());
    assert!(report.tally.appends_ok > 0, "no append was acknowledged:\n{}", report.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_flock_leader_loses_no_acknowledged_append() {
    let report = nemesis::run(config(Mix::LeaderKills)).await;
    assert_clean(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_pauses_and_restarts_lose_nothing_and_return_no_stale_list() {
    let report = nemesis::run(config(Mix::Mixed)).await;
    assert_clean(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_node_answers_no_job_before_its_cluster_side_is_wired() {
    // Two I/O threads: the servers' tasks run while start-up awaits the cluster side.
    let mut config = config(Mix::Mixed);
    config.args = vec!["--io-threads".into(), "2".into()];
    let report = nemesis::run(config).await;
    assert_clean(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_node_of_three_down_every_flock_has_a_leader_again_within_3_s() {
    let report = nemesis::run(config(Mix::LongKills)).await;
    assert_clean(&report);
    let kills = report.events.len();
    let longest = report.longest_leaderless().expect("no kill was timed");
    assert!(
        report.events.iter().all(|e| e.leaderless.is_some()),
        "a kill left some flock without a leader for its whole 4 s:\n{}",
        report.describe()
    );
    assert!(longest < Duration::from_secs(3), "{kills} kills, longest leaderless {longest:?}:\n{}", report.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_lose_nothing_and_a_cut_off_leader_returns_no_stale_list() {
    let mut config = config(Mix::Partitions);
    config.args = vec!["--fault-injection".into()];
    let report = nemesis::run(config).await;
    assert_clean(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_disks_a_join_and_module_uploads_under_faults_lose_nothing() {
    let mut config = config(Mix::Everything);
    config.args = vec!["--fault-injection".into()];
    let report = nemesis::run(config).await;
    assert_clean(&report);
    assert!(!report.uploads.acknowledged.is_empty(), "no module upload was acknowledged:\n{}", report.describe());
}
