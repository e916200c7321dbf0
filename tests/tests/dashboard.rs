//! The cluster as an operator sees it: `/v1/cluster/stats` (every member's load, gathered by
//! the node asked), and the dashboard page at `/ui` in a real headless Chromium, showing a
//! running 3-node cluster and updating when a node is killed.
//!
//! `GREX_SCREENSHOTS=DIR` keeps the dashboard test's screenshots there (docs/ takes them).

use std::time::Duration;

use grex_client::proto::latency_quantile;
use grex_tests::browser::Browser;
use grex_tests::counting::load_counter;
use grex_tests::{TEST_FLOCKS, TestCluster, eventually, job_wasm};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_stats_count_every_members_jobs_and_name_the_unreachable() {
    const JOBS: u64 = 30;
    let mut cluster = TestCluster::start(3, &[]).await;
    load_counter(&cluster).await;
    let client = cluster.nodes[0].http_client().await;
    let before = client.cluster_stats().await.expect("stats");
    assert_eq!(before.node, cluster.nodes[0].id);
    assert_eq!(before.members.len(), 3);
    for i in 0..JOBS {
        client.run_job(format!("stats-{i}").as_bytes(), "counter", b"1", false).await.expect("job");
    }
    let after = client.cluster_stats().await.expect("stats");
    let total = |stats: &grex_client::ClusterStats, f: &dyn Fn(&grex_client::NodeStats) -> u64| -> u64 {
        stats.members.iter().map(|m| f(m.stats.as_ref().expect("every member answers"))).sum()
    };
    // Each job ran once, on its flock's leader, wherever it was sent.
    assert_eq!(total(&after, &|s| s.status.jobs_ok) - total(&before, &|s| s.status.jobs_ok), JOBS);
    let latency = |stats: &grex_client::ClusterStats| -> Vec<u64> {
        let mut sum = vec![0; grex_client::proto::LATENCY_BOUNDS_S.len() + 1];
        for member in &stats.members {
            for (i, n) in member.stats.as_ref().expect("stats").latency.iter().enumerate() {
                sum[i] += n;
            }
        }
        sum
    };
    let (was, is) = (latency(&before), latency(&after));
    assert_eq!(is.iter().sum::<u64>() - was.iter().sum::<u64>(), JOBS, "every job's latency is counted once");
    let p50 = latency_quantile(&was, &is, 0.5).expect("jobs ran");
    let p99 = latency_quantile(&was, &is, 0.99).expect("jobs ran");
    assert!(p50 > 0.0 && p50 <= p99 && p99 < 2.0, "p50 {p50} s, p99 {p99} s");
    // Every flock is led by exactly one member, which reports it.
    let mut led: Vec<u32> =
        after.members.iter().flat_map(|m| m.stats.as_ref().unwrap().leads.iter().map(|l| l.flock)).collect();
    led.sort_unstable();
    assert_eq!(led, (0..TEST_FLOCKS).collect::<Vec<_>>());

    let killed = cluster.nodes[2].id.clone();
    cluster.nodes[2].kill9();
    eventually("node 0 to report the killed node down", PATIENCE, || async {
        let stats = client.cluster_stats().await.expect("stats");
        let member = stats.members.iter().find(|m| m.id == killed).expect("still a member");
        !member.alive && member.stats.is_none() && member.error.is_some()
    })
    .await;
    let stats = client.cluster_stats().await.expect("stats");
    assert!(stats.members.iter().filter(|m| m.id != killed).all(|m| m.alive && m.stats.is_some()), "{stats:#?}");
}

/// The page's nodes table: id → shown reachable.
const NODES: &str = "Object.fromEntries([...document.querySelectorAll('#nodes tbody tr')]\
                     .map(tr => [tr.dataset.node, tr.dataset.alive === 'true']))";
/// The page's flock grid: each cell's leader, in flock order.
const FLOCKS: &str = "[...document.querySelectorAll('#flocks .flock')].map(c => c.dataset.leader)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_and_follows_a_node_that_dies() {
    let mut cluster = TestCluster::start(3, &[]).await;
    load_counter(&cluster).await;
    let client = cluster.nodes[0].http_client().await;
    client.put_module("hostile", job_wasm("hostile")).await.expect("upload hostile");
    for i in 0..20 {
        client.run_job(format!("ui-{i}").as_bytes(), "counter", b"1", false).await.expect("job");
    }
    let failed = client.run_job(b"ui-failing", "hostile", b"panic", false).await.expect_err("it panics");
    let ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();

    let mut browser = Browser::launch();
    browser.open(&format!("{}/ui", cluster.nodes[0].http), 1280, 1100);
    let all_up =
        |v: &Value| ids.iter().all(|id| v[id.as_str()] == Value::Bool(true)) && v.as_object().unwrap().len() == 3;
    browser.wait_for("every node, reachable", PATIENCE, NODES, |v| v.is_object() && all_up(v));
    let leaders = browser.wait_for("every flock with a leader", PATIENCE, FLOCKS, |v| {
        v.as_array().is_some_and(|cells| cells.len() == TEST_FLOCKS as usize && cells.iter().all(|c| c != ""))
    });
    for leader in leaders.as_array().unwrap() {
        assert!(ids.iter().any(|id| leader == id.as_str()), "a flock led by an unknown node: {leader}");
    }
    // The failed job is among the recent errors, with its code.
    let code = failed.code().expect("the node refused it").as_str();
    browser.wait_for(
        "the failed job",
        PATIENCE,
        "[...document.querySelectorAll('#errors td.error')].map(td => td.textContent)",
        |v| v.as_array().is_some_and(|codes| codes.iter().any(|c| c == code)),
    );
    // Two readings apart, the rates are shown.
    browser.wait_for(
        "a job rate for node 0",
        PATIENCE,
        &format!("document.querySelector('#nodes tr[data-node=\"{}\"] td:nth-child(8)').textContent", ids[0]),
        |v| v.as_str().is_some_and(|s| s.parse::<f64>().is_ok()),
    );
    let up = browser.screenshot();
    assert!(up.starts_with(b"\x89PNG\r\n\x1a\n") && up.len() > 10_000, "a screenshot of the page: {} bytes", up.len());

    // Kill node 2: the same page, without a reload, shows it down and its flocks led by others.
    let killed = ids[2].clone();
    cluster.nodes[2].kill9();
    browser.wait_for("the killed node down", PATIENCE, NODES, |v| {
        v[killed.as_str()] == Value::Bool(false)
            && v[ids[0].as_str()] == Value::Bool(true)
            && v[ids[1].as_str()] == Value::Bool(true)
    });
    browser.wait_for("every flock led by a live node", PATIENCE, FLOCKS, |v| {
        v.as_array().is_some_and(|cells| {
            cells.len() == TEST_FLOCKS as usize && cells.iter().all(|c| c != "" && c != killed.as_str())
        })
    });
    let down = browser.screenshot();
    assert!(down.starts_with(b"\x89PNG\r\n\x1a\n"), "a screenshot");
    if let Some(dir) = std::env::var_os("GREX_SCREENSHOTS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::write(dir.join("dashboard.png"), &up).expect("write screenshot");
        std::fs::write(dir.join("dashboard-node-down.png"), &down).expect("write screenshot");
    }
}

/// A tmux server of its own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux (scripts/test.sh installs it: apt-get install tmux)");
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the terminal shows now.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grex_top_shows_every_node_in_a_terminal_and_follows_a_node_that_dies() {
    let mut cluster = TestCluster::start(3, &[]).await;
    load_counter(&cluster).await;
    let tmux = Tmux { socket: format!("grex-top-test-{}", std::process::id()) };
    let command = format!("{} top --node {} --interval 0.5", grex_tests::grex_bin().display(), cluster.nodes[0].http);
    tmux.run(&["new-session", "-d", "-s", "top", "-x", "160", "-y", "40", &command]);
    let client = cluster.nodes[0].http_client().await;
    let ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    let row = |screen: &str, id: &str| screen.lines().find(|l| l.starts_with(id)).map(str::to_owned);
    let shows_all = |screen: &str| {
        screen.contains("grex top · 3 nodes, 3 up")
            && ids.iter().all(|id| {
                row(screen, id).is_some_and(|r| {
                    let cells: Vec<&str> = r.split_whitespace().collect();
                    cells[1] == "up" && cells[2].parse::<f64>().is_ok()
                })
            })
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    for i in 0.. {
        // Jobs keep coming, so some reading sees them.
        let _ = client.run_job(format!("top-{i}").as_bytes(), "counter", b"1", false).await;
        let screen = tmux.screen();
        if shows_all(&screen) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "grex top did not show every node up with a rate:\n{screen}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let screen = tmux.screen();
    assert!(screen.contains("NODE") && screen.contains("P99 MS") && screen.contains("LEADS"), "{screen}");
    let leads: usize = ids
        .iter()
        .map(|id| row(&screen, id).unwrap().split_whitespace().nth(6).unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(leads, TEST_FLOCKS as usize, "every flock is led by one node:\n{screen}");

    cluster.nodes[2].kill9();
    eventually("grex top to show the killed node down", PATIENCE, || async {
        let screen = tmux.screen();
        screen.contains("3 nodes, 2 up")
            && row(&screen, &ids[2]).is_some_and(|r| r.split_whitespace().nth(1) == Some("down"))
    })
    .await;
}
