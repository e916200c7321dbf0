//! `GET /metrics` and `grex jobs recent` on real nodes: the text parses as Prometheus exposition,
//! and its values and the recent jobs move as a known load says they must.

use std::collections::BTreeMap;
use std::time::Duration;

use grex_tests::counting::load_counter;
use grex_tests::{GrexNode, TestCluster, eventually, grex, http};

/// Every sample of a node's metrics: (name, sorted labels) → value.
type Scrape = BTreeMap<(String, Vec<(String, String)>), f64>;

fn scrape(node: &GrexNode) -> Scrape {
    let answer = http(node.http_addr(), "GET", "/metrics", &[], b"");
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let text = String::from_utf8(answer.body).expect("UTF-8");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed =
        prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{text}"));
    assert!(!parsed.samples.is_empty());
    let mut samples = Scrape::new();
    for sample in parsed.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            // Histograms come as their `_count`, `_sum` and `_bucket` series.
            prometheus_parse::Value::Histogram(_) | prometheus_parse::Value::Summary(_) => continue,
        };
        let mut labels: Vec<(String, String)> = sample.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.sort();
        samples.insert((sample.metric, labels), value);
    }
    // Every family has its HELP and TYPE.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {family} ")) || text.contains(&format!("# TYPE {name} ")),
            "{name} has no TYPE"
        );
    }
    samples
}

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut labels: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    labels.sort();
    scrape.get(&(name.to_owned(), labels)).copied().unwrap_or(0.0)
}

/// The sum of a metric over every label set that has `labels`.
fn total(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .iter()
        .filter(|((n, l), _)| n == name && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_jobs_commands_and_the_cluster() {
    const JOBS: u64 = 40;
    const HSETS: u64 = 25;
    let cluster = TestCluster::start(3, &["--resp", "127.0.0.1:0"]).await;
    load_counter(&cluster).await;
    let ok = [("module", "counter"), ("outcome", "ok")];
    let before: Vec<Scrape> = cluster.nodes.iter().map(scrape).collect();

    // Jobs through node 0: each runs once, on its flock's leader; those led elsewhere are
    // forwarded by node 0.
    let client = cluster.nodes[0].http_client().await;
    let mut forwarded = 0.0;
    for i in 0..JOBS {
        let out = client.run_job(format!("metrics-{i}").as_bytes(), "counter", b"1", false).await.expect("job");
        if out.node != cluster.nodes[0].id {
            forwarded += 1.0;
        }
    }
    let failed = client.run_job(b"metrics-x", "no-such-module", b"", false).await.expect_err("no module");
    assert_eq!(failed.code(), Some(grex_client::ErrorCode::ModuleNotFound));

    // Redis commands on node 1, and one it does not know.
    let mut redis =
        redis::Client::open(cluster.nodes[1].resp.clone().unwrap().as_str()).unwrap().get_connection().unwrap();
    for i in 0..HSETS {
        let _: () = redis::cmd("HSET").arg(format!("metrics-h{i}")).arg("f").arg("v").query(&mut redis).unwrap();
    }
    let unknown: redis::RedisResult<()> = redis::cmd("NOSUCHCOMMAND").query(&mut redis);
    assert!(unknown.is_err());

    let after: Vec<Scrape> = cluster.nodes.iter().map(scrape).collect();
    let ran: f64 =
        (0..3).map(|i| value(&after[i], "grex_jobs_total", &ok) - value(&before[i], "grex_jobs_total", &ok)).sum();
    assert_eq!(ran, JOBS as f64, "every job counted once, where it ran");
    let timed: f64 = (0..3)
        .map(|i| {
            let labels = [("module", "counter"), ("phase", "total")];
            value(&after[i], "grex_job_seconds_count", &labels) - value(&before[i], "grex_job_seconds_count", &labels)
        })
        .sum();
    assert_eq!(timed, JOBS as f64, "every job timed once");
    assert_eq!(
        value(&after[0], "grex_jobs_forwarded_total", &[]) - value(&before[0], "grex_jobs_forwarded_total", &[]),
        forwarded
    );
    assert_eq!(value(&after[0], "grex_jobs_total", &[("module", "other"), ("outcome", "module_not_found")]), 1.0);
    assert_eq!(value(&after[1], "grex_resp_commands_total", &[("command", "HSET"), ("result", "ok")]), HSETS as f64);
    assert_eq!(value(&after[1], "grex_resp_commands_total", &[("command", "UNKNOWN"), ("result", "error")]), 1.0);
    assert_eq!(value(&after[1], "grex_connections_open", &[("protocol", "resp")]), 1.0);
    // The instance pool: room for a job per executor and one more; nothing in use between jobs.
    for scraped in &after {
        assert!(value(scraped, "grex_instance_pool_slots", &[]) >= 2.0);
        assert_eq!(value(scraped, "grex_instance_pool_instances", &[]), 0.0);
        assert_eq!(value(scraped, "grex_instance_pool_memories", &[]), 0.0);
    }
    drop(redis);
    eventually("the closed Redis connection leaves the open count", Duration::from_secs(10), || async {
        value(&scrape(&cluster.nodes[1]), "grex_connections_open", &[("protocol", "resp")]) == 0.0
    })
    .await;

    // The slowest and failed recent jobs of every member, as `grex jobs recent --all` reports them.
    let node0 = &cluster.nodes[0].http;
    let json = grex(&["jobs", "recent", "--all", "--json", "--node", node0]);
    let reports: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.len(), 3, "one report per member: {json}");
    let jobs = |key: &str| -> Vec<serde_json::Value> {
        reports.iter().flat_map(|r| r[key].as_array().unwrap().clone()).collect()
    };
    let failed = jobs("failed");
    assert_eq!(failed.len(), 1, "{json}");
    assert_eq!(failed[0]["error"], "module_not_found");
    let slowest = jobs("slowest");
    // Each node keeps its 32 slowest jobs of any module: all it ran, if it ran fewer.
    for report in &reports {
        let i = cluster.index_of(report["node"].as_str().unwrap());
        let ended = total(&after[i], "grex_jobs_total", &[]);
        assert_eq!(report["slowest"].as_array().unwrap().len() as f64, ended.min(32.0), "node {i}: {json}");
    }
    assert!(slowest.iter().any(|j| j["module"] == "counter"), "{json}");
    assert!(slowest.iter().all(|j| j["total_us"].as_u64() >= j["run_us"].as_u64()));
    assert!(!json.contains("metrics-"), "a bucket key is shown only by its hash: {json}");
    let table = grex(&["jobs", "recent", "--node", node0]);
    assert!(table.contains("slowest recent jobs") && table.contains("module_not_found"), "{table}");

    // The cluster as the engines hold it: each flock and the meta group led by exactly one node,
    // every peer up.
    let groups = value(&after[0], "grex_groups", &[("role", "leader")])
        + value(&after[0], "grex_groups", &[("role", "follower")]);
    assert_eq!(groups, 17.0, "16 flocks and the meta group, each on every node of three");
    for group in (0..16).map(|f| f.to_string()).chain(["meta".to_owned()]) {
        let leaders: f64 = after.iter().map(|s| value(s, "grex_group_leader", &[("group", &group)])).sum();
        assert_eq!(leaders, 1.0, "group {group} has one leader");
    }
    for (i, scrape) in after.iter().enumerate() {
        assert_eq!(total(scrape, "grex_peer_up", &[]), 2.0, "node {i} hears both peers");
        assert!(value(scrape, "grex_cache_bytes_max", &[]) > 0.0);
        // The consensus engine's log memory: reported, within its share (1/16 of the default
        // 256 MiB), and nothing dropped under this small load.
        for name in ["grex_consensus_log_bytes", "grex_consensus_appends_dropped_total"] {
            assert!(scrape.contains_key(&(name.to_owned(), Vec::new())), "node {i} has no {name}");
        }
        assert!(value(scrape, "grex_consensus_log_bytes", &[]) <= f64::from(16u32 << 20), "node {i}");
        assert_eq!(value(scrape, "grex_consensus_appends_dropped_total", &[]), 0.0, "node {i}");
    }
    assert!(total(&after[0], "grex_store_commits_total", &[]) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_pool_shows_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--timeout-ms", "3000"]);
    let client = node.client().await;
    client.put_module("hostile", grex_tests::job_wasm("hostile")).await.expect("upload");
    let spinning = tokio::spawn(async move { client.run_job(b"spin", "hostile", b"loop", false).await });
    eventually("the spinning job to hold an instance and its memory", Duration::from_secs(10), || async {
        let scraped = scrape(&node);
        value(&scraped, "grex_instance_pool_instances", &[]) == 1.0
            && value(&scraped, "grex_instance_pool_memories", &[]) == 1.0
    })
    .await;
    let ended = spinning.await.unwrap().expect_err("it runs out of time");
    assert_eq!(ended.code(), Some(grex_client::ErrorCode::JobTimeout));
    eventually("the instance to go back to the pool", Duration::from_secs(10), || async {
        value(&scrape(&node), "grex_instance_pool_instances", &[]) == 0.0
    })
    .await;
}
