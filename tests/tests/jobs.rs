//! Jobs against a real node: results, the example jobs, concurrency, hostile fixtures.

use std::sync::Arc;

use grex_client::{Client, ErrorCode};
use grex_tests::{GrexNode, job_wasm};

async fn node_with(jobs: &[&str]) -> (tempfile::TempDir, GrexNode, Client) {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &[]);
    let client = node.client().await;
    for job in jobs {
        client.put_module(job, job_wasm(job)).await.unwrap();
    }
    (dir, node, client)
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn counter_adds_its_input_and_the_item_reads_back() {
    let (_dir, node, client) = node_with(&["counter"]).await;
    let out = client.run_job(b"customer-1", "counter", b"", false).await.unwrap();
    assert_eq!(text(&out.output), "1");
    assert_eq!(out.bucket_version, 1);
    let out = client.run_job(b"customer-1", "counter", b"41", false).await.unwrap();
    assert_eq!(text(&out.output), "42");
    assert_eq!(out.bucket_version, 2);
    let out = client.run_job(b"customer-1", "counter", b" -2\n", false).await.unwrap();
    assert_eq!(text(&out.output), "40");
    assert_eq!(client.get_item(b"customer-1", "count").await.unwrap(), b"40");
    // Other buckets are untouched, and HTTP sees the same data.
    let http = node.http_client().await;
    assert_eq!(http.get_item(b"customer-1", "count").await.unwrap(), b"40");
    assert_eq!(http.get_item(b"customer-2", "count").await.unwrap_err().code(), Some(ErrorCode::ItemNotFound));
    let out = http.run_job(b"customer-2", "counter", b"7", false).await.unwrap();
    assert_eq!(text(&out.output), "7");
}

#[tokio::test]
async fn counter_refuses_non_decimal_input_and_commits_nothing() {
    let (_dir, _node, client) = node_with(&["counter"]).await;
    client.run_job(b"c", "counter", b"3", false).await.unwrap();
    let err = client.run_job(b"c", "counter", b"three", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::JobFailed));
    assert!(err.to_string().contains("decimal integer"), "{err}");
    assert_eq!(client.get_item(b"c", "count").await.unwrap(), b"3");
}

#[tokio::test]
async fn ledger_appends_transactions_and_reports_balance_and_count() {
    let (_dir, _node, client) = node_with(&["ledger"]).await;
    let one = br#"{"description":"salary","other":"ACME Ltd","amount":250000,"date":"2026-11-01"}"#;
    let out = client.run_job(b"cust-9", "ledger", one, false).await.unwrap();
    assert_eq!(text(&out.output), r#"{"balance":250000,"count":1}"#);
    let many = br#"[{"description":"rent","other":"Landlord","amount":-120000},
                    {"description":"coffee","other":"Cafe","amount":-450,"date":"2026-11-03"}]"#;
    let out = client.run_job(b"cust-9", "ledger", many, false).await.unwrap();
    assert_eq!(text(&out.output), r#"{"balance":129550,"count":3}"#);
    let out = client.run_job(b"cust-9", "ledger", b"", true).await.unwrap();
    assert_eq!(text(&out.output), r#"{"balance":129550,"count":3}"#);
    let err = client.run_job(b"cust-9", "ledger", b"{\"amount\": 5}", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::JobFailed));
    assert_eq!(client.list_items(b"cust-9", "", None, 10).await.unwrap(), ["transactions"]);
}

#[tokio::test]
async fn profile_adds_removes_and_lists_contacts_orders_and_favourites() {
    let (_dir, _node, client) = node_with(&["profile"]).await;
    let run = |input: &'static str| {
        let client = &client;
        async move {
            String::from_utf8(client.run_job(b"cust-3", "profile", input.as_bytes(), false).await.unwrap().output)
                .unwrap()
        }
    };
    assert_eq!(
        run(r#"{"op":"add","kind":"contact","id":"bob","value":{"email":"bob@example.com"}}"#).await,
        r#"{"added":"contact/bob"}"#
    );
    run(r#"{"op":"add","kind":"contact","id":"amy","value":{"email":"amy@example.com"}}"#).await;
    run(r#"{"op":"add","kind":"order","id":"o-1","value":{"total":1999}}"#).await;
    run(r#"{"op":"add","kind":"favourite","id":"p-7","value":"blue mug"}"#).await;
    assert_eq!(run(r#"{"op":"remove","kind":"contact","id":"bob"}"#).await, r#"{"removed":true}"#);
    assert_eq!(run(r#"{"op":"remove","kind":"contact","id":"bob"}"#).await, r#"{"removed":false}"#);
    let all: serde_json::Value = serde_json::from_str(&run(r#"{"op":"list"}"#).await).unwrap();
    assert_eq!(
        all,
        serde_json::json!({
            "contact": {"amy": {"email": "amy@example.com"}},
            "order": {"o-1": {"total": 1999}},
            "favourite": {"p-7": "blue mug"}
        })
    );
    assert_eq!(client.list_items(b"cust-3", "order/", None, 10).await.unwrap(), ["order/o-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_clients_times_two_hundred_increments_on_one_bucket_make_exactly_1600() {
    let (_dir, node, client) = node_with(&["counter"]).await;
    drop(client);
    let node = Arc::new(node);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let client = node.client().await;
            for _ in 0..200 {
                client.run_job(b"hot", "counter", b"1", false).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let client = node.client().await;
    assert_eq!(client.get_item(b"hot", "count").await.unwrap(), b"1600");
    let status = client.status().await.unwrap();
    assert!(status.commits < status.change_sets, "group commit should put several jobs in one fsync: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_with_more_jobs_in_flight_than_its_session_holds_gets_each_its_own_answer() {
    let (_dir, _node, client) = node_with(&["counter"]).await;
    assert!(client.has_sessions(), "a QUIC client of this build shares one session stream");
    let client = Arc::new(client);
    // A caller that gives up before its answer leaves the session usable for the others.
    let gave_up = tokio::time::timeout(std::time::Duration::ZERO, client.run_job(b"j0", "counter", b"1", false)).await;
    assert!(gave_up.is_err(), "a zero timeout gives up at once");
    let jobs = grex_client::quic::SESSION_IN_FLIGHT_MAX + 100;
    let mut tasks = Vec::new();
    for i in 1..=jobs {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let out = client.run_job(format!("j{i}").as_bytes(), "counter", i.to_string().as_bytes(), false).await;
            (i, out.unwrap().output)
        }));
    }
    for task in tasks {
        let (i, output) = task.await.unwrap();
        assert_eq!(text(&output), i.to_string(), "job {i} got another job's answer");
    }
}

#[tokio::test]
async fn each_hostile_job_fails_with_its_named_error_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(
        dir.path(),
        &[
            "--timeout-ms",
            "300",
            "--memory-mib",
            "16",
            "--change-set-bytes-max",
            "4000000",
            "--item-bytes-max",
            "1100000",
        ],
    );
    let client = node.client().await;
    client.put_module("hostile", job_wasm("hostile")).await.unwrap();
    client.put_module("counter", job_wasm("counter")).await.unwrap();
    let cases: [(&str, ErrorCode); 7] = [
        ("loop", ErrorCode::JobTimeout),
        ("balloon", ErrorCode::JobMemoryLimit),
        ("panic", ErrorCode::JobTrapped),
        ("big-output 2000000", ErrorCode::OutputTooLarge),
        ("big-changeset 8000000", ErrorCode::ChangeSetTooLarge),
        ("big-item 2000000", ErrorCode::ItemTooLarge),
        ("fail", ErrorCode::JobFailed),
    ];
    for (input, code) in cases {
        let err = client.run_job(b"victim", "hostile", input.as_bytes(), false).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "`{input}` gave {err}");
        // Each failure commits nothing, and the node still runs other jobs.
        assert_eq!(client.list_items(b"victim", "", None, 10).await.unwrap(), Vec::<String>::new(), "after `{input}`");
        assert!(client.run_job(b"ok", "counter", b"", false).await.unwrap().bucket_version > 0);
    }
    let err = client.run_job(b"victim", "hostile", b"panic", false).await.unwrap_err();
    assert!(err.to_string().contains("panicked on purpose"), "the panic message reaches the client: {err}");
}

#[tokio::test]
async fn huge_errors_stack_exhaustion_and_endless_host_calls_end_with_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--timeout-ms", "300"]);
    let client = node.client().await;
    client.put_module("hostile", job_wasm("hostile")).await.unwrap();
    let err = client.run_job(b"victim", "hostile", b"recurse 100000000", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::JobTrapped), "{err}");
    assert!(err.to_string().contains("stack"), "a stack overflow should say so: {err}");
    let err = client.run_job(b"victim", "hostile", b"host-calls", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::JobTimeout), "{err}");
    // A shallow recursion still works: the limit is on depth, not on recursion.
    let shallow = client.run_job(b"victim", "hostile", b"recurse 50", false).await;
    assert!(shallow.is_ok(), "{shallow:?}");
    // A 10 MiB error message is cut, over QUIC and HTTP alike.
    let err = client.run_job(b"victim", "hostile", b"big-error 10000000", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::JobFailed), "{err}");
    assert!(err.to_string().len() < 2 * grex_client::proto::ERROR_MESSAGE_BYTES_MAX, "{} bytes", err.to_string().len());
    let answer =
        grex_tests::http(node.http_addr(), "POST", "/v1/jobs/victim?module=hostile", &[], b"big-error 10000000");
    assert_eq!(answer.status, 422);
    assert!(answer.body.len() < 2 * grex_client::proto::ERROR_MESSAGE_BYTES_MAX, "{} bytes", answer.body.len());
}

#[tokio::test]
async fn fuel_limit_stops_a_spinning_job_with_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--fuel", "5000000"]);
    let client = node.client().await;
    client.put_module("hostile", job_wasm("hostile")).await.unwrap();
    let err = client.run_job(b"b", "hostile", b"loop", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::JobFuelExhausted), "{err}");
}

#[tokio::test]
async fn a_read_only_job_that_writes_is_refused_and_commits_nothing() {
    let (_dir, _node, client) = node_with(&["counter"]).await;
    let err = client.run_job(b"ro", "counter", b"1", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ReadOnlyViolation), "{err}");
    assert_eq!(client.get_item(b"ro", "count").await.unwrap_err().code(), Some(ErrorCode::ItemNotFound));
}

#[tokio::test]
async fn a_module_runs_by_its_sha256_id_and_a_name_can_move_to_a_new_version() {
    let (_dir, node, client) = node_with(&[]).await;
    let counter = client.put_module("job", job_wasm("counter")).await.unwrap();
    assert!(counter.id.starts_with("sha256:") && counter.id.len() == 7 + 64, "{}", counter.id);
    let by_id = client.run_job(b"b", &counter.id, b"2", false).await.unwrap();
    assert_eq!(text(&by_id.output), "2");
    client.put_module("job", job_wasm("ledger")).await.unwrap();
    // No name points to the old version any more: it is gone.
    let gone = client.run_job(b"b", &counter.id, b"2", false).await.unwrap_err();
    assert_eq!(gone.code(), Some(ErrorCode::ModuleNotFound), "{gone}");
    let by_name = client.run_job(b"b2", "job", b"", false).await.unwrap();
    assert_eq!(text(&by_name.output), r#"{"balance":0,"count":0}"#);
    let listed = client.list_modules().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].size), ("job", job_wasm("ledger").len() as u64));
    assert_eq!(node.http_client().await.list_modules().await.unwrap(), listed);
}

#[tokio::test]
async fn canary_on_a_single_node_names_that_node() {
    let (_dir, node, client) = node_with(&["counter"]).await;
    client.run_job(b"cust-5", "counter", b"", false).await.unwrap();
    let canary = client.canary(b"cust-5").await.unwrap();
    assert_eq!(canary.url, node.http);
    assert_eq!(canary.quic.as_deref(), Some(node.quic.as_str()));
    assert_eq!(canary.role, "leader");
    assert_eq!(canary.bucket_version, 1);
    assert_eq!(canary.flock, grex_client::proto::flock_of(b"cust-5", 256));
}

/// `GREX_LOG` picks log lines by the code's module (`grex::cluster=debug`) and by the job's
/// module (`grex::job[job{module=NAME}]=LEVEL`), and each job line names its module and bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grex_log_picks_one_job_modules_lines_and_each_names_its_module_and_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start_with_log(dir.path(), &[], "warn,grex::job[job{module=chatty}]=debug");
    let client = node.client().await;
    for name in ["chatty", "quiet"] {
        client.put_module(name, job_wasm("hostile")).await.expect("upload");
    }
    client.run_job(b"bucket-c", "chatty", b"log", false).await.expect("chatty logs");
    client.run_job(b"bucket-q", "quiet", b"log", false).await.expect("quiet logs");
    grex_tests::wait_until("both jobs' warnings in the log", std::time::Duration::from_secs(10), || {
        node.log().matches("hostile logs at warn").count() == 2
    });
    let log = node.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("hostile logs at")).collect();
    let has = |module: &str, level: &str| {
        lines.iter().any(|l| {
            l.contains(&format!("hostile logs at {level}"))
                && l.contains(&format!("module={module}"))
                && l.contains(&format!("bucket=bucket-{}", &module[..1]))
        })
    };
    assert!(has("chatty", "debug") && has("chatty", "info") && has("chatty", "warn"), "{lines:#?}");
    assert!(has("quiet", "warn"), "the default level still shows: {lines:#?}");
    assert!(!has("quiet", "info") && !has("quiet", "debug"), "another module's detail stays out: {lines:#?}");
}
