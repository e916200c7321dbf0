//! Who may use a cluster: users with tokens and permissions, enforced by every node over QUIC,
//! HTTP and the Redis protocol (a real Redis client), against real `grex serve` processes.

use std::process::Command;
use std::time::Duration;

use grex_client::proto::ErrorCode;
use grex_client::{Client, ClientError, ConnectOptions, Permissions, Request};
use grex_tests::{GrexNode, TestCluster, eventually, grex_bin, http, job_wasm};

const PATIENCE: Duration = Duration::from_secs(60);

/// A QUIC client of `node` signed in with `token`.
async fn signed_in(node: &GrexNode, token: &str) -> Client {
    let options = ConnectOptions { ca_file: Some(node.ca.clone()), token: Some(token.to_owned()) };
    Client::connect_with(&node.quic, &options).await.expect("sign in over QUIC")
}

/// An HTTP client of `node` that sends `token`.
async fn http_signed_in(node: &GrexNode, token: &str) -> Client {
    let options = ConnectOptions { ca_file: None, token: Some(token.to_owned()) };
    Client::connect_with(&node.http, &options).await.expect("sign in over HTTP")
}

/// The error code of a call that must fail.
fn code<T>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(e) => e.code().unwrap_or_else(|| panic!("not a node's error: {e}")),
        Ok(_) => panic!("expected a refusal, and it was done"),
    }
}

/// Every kind of request a client can send, none of which may take effect when refused.
fn every_request() -> Vec<Request> {
    let bucket = b"customer-1".to_vec();
    vec![
        Request::Status,
        Request::ListModules,
        Request::Flocks,
        Request::Nodes,
        Request::Canary { bucket: bucket.clone() },
        Request::RunJob { bucket: bucket.clone(), module: "counter".into(), input: b"1000".to_vec(), read_only: false },
        Request::GetItem { bucket: bucket.clone(), item: "count".into() },
        Request::ListItems { bucket, prefix: String::new(), start_after: None, limit: 10 },
        Request::PutModule { name: "intruder".into(), wasm: job_wasm("counter") },
        Request::DeleteModule { name: "counter".into() },
        Request::DrainNode { node: "0".into() },
        Request::RemoveNode { node: "0".into() },
        Request::Users,
        Request::AddUser { name: "intruder".into(), permissions: Permissions::admin() },
        Request::SetUser { name: "reader".into(), permissions: Permissions::admin() },
        Request::DeleteUser { name: "root".into() },
    ]
}

/// `grex user add NAME FLAGS` through `node`: the token it prints, or its error output.
fn cli_add_user(node: &GrexNode, token: Option<&str>, name: &str, flags: &[&str]) -> Result<String, String> {
    let mut command = Command::new(grex_bin());
    command.args(["user", "add", name, "--node", &node.http]).args(flags).env_remove("GREX_TOKEN");
    if let Some(token) = token {
        command.env("GREX_TOKEN", token);
    }
    let out = command.output().expect("run grex");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_refuses_a_missing_wrong_or_unpermitted_credential_and_nothing_changes() {
    let mut cluster = TestCluster::start(3, &["--resp", "127.0.0.1:0"]).await;
    let (first, other) = (&cluster.nodes[0], &cluster.nodes[2]);

    // No users yet: a client on loopback may do everything, and the first user must be an admin.
    let open = first.client().await;
    open.put_module("counter", job_wasm("counter")).await.expect("upload before any user");
    open.run_job(b"customer-1", "counter", b"1", false).await.expect("run before any user");
    let refused = cli_add_user(first, None, "reader", &["--read"]).unwrap_err();
    assert!(refused.contains("first user must be an admin"), "{refused}");
    let root = cli_add_user(first, None, "root", &["--admin"]).expect("add the first admin");
    assert!(root.starts_with("grex_") && root.len() == 69, "a token is printed: {root}");

    // Users are made by an admin, on any node, and known to every node.
    let admin = signed_in(other, &root).await;
    let reader = admin.add_user("reader", Permissions { read: true, ..Permissions::default() }).await.unwrap().token;
    let runner = admin
        .add_user("runner", Permissions { run: vec!["counter".into()], ..Permissions::default() })
        .await
        .unwrap()
        .token;
    assert_eq!(code(admin.add_user("runner", Permissions::default()).await), ErrorCode::Conflict);
    for node in &cluster.nodes {
        let http = node.http_client().await;
        eventually("every node to know the users", PATIENCE, || async {
            http.status().await.is_err_and(|e| e.code() == Some(ErrorCode::Unauthenticated))
                && Client::connect_with(
                    &node.quic,
                    &ConnectOptions { ca_file: Some(node.ca.clone()), token: Some(runner.clone()) },
                )
                .await
                .is_ok()
        })
        .await;
    }

    // Without a token, with a wrong one, and without the permission: refused, over QUIC and HTTP.
    for node in &cluster.nodes {
        for anonymous in [node.client().await, node.http_client().await] {
            for request in every_request() {
                let kind = format!("{request:?}").chars().take(40).collect::<String>();
                assert_eq!(code(anonymous.call(request).await), ErrorCode::Unauthenticated, "{kind}");
            }
        }
        let wrong = ConnectOptions { ca_file: Some(node.ca.clone()), token: Some("grex_0123".into()) };
        assert_eq!(code(Client::connect_with(&node.quic, &wrong).await), ErrorCode::Unauthenticated);
        assert_eq!(code(Client::connect_with(&node.http, &wrong).await), ErrorCode::Unauthenticated);
    }
    let garbled = http(other.http_addr(), "GET", "/v1/status", &[("authorization", "Basic cm9vdDpyb290")], b"");
    assert_eq!((garbled.status, garbled.json()["code"].as_str()), (401, Some("unauthenticated")));
    let anonymous = http(other.http_addr(), "POST", "/v1/jobs/customer-1?module=counter", &[], b"1000");
    assert_eq!((anonymous.status, anonymous.json()["code"].as_str()), (401, Some("unauthenticated")));

    for (token, allowed) in [
        (&reader, ["Status", "ListModules", "Flocks", "Nodes", "Canary", "GetItem", "ListItems"].as_slice()),
        (&runner, ["Status", "ListModules", "Flocks", "Nodes", "Canary", "RunJob"].as_slice()),
    ] {
        for client in [signed_in(other, token).await, http_signed_in(other, token).await] {
            for request in every_request() {
                let kind = format!("{request:?}");
                let name = kind.split([' ', '{']).next().unwrap().to_owned();
                if allowed.contains(&name.as_str()) {
                    if name == "RunJob" {
                        continue; // Run below, counted.
                    }
                    let result = client.call(request).await;
                    assert!(
                        result.as_ref().is_ok()
                            || result.as_ref().is_err_and(|e| e.code() == Some(ErrorCode::ItemNotFound)
                                || e.code() == Some(ErrorCode::BadRequest)),
                        "{name} must be allowed: {result:?}"
                    );
                } else {
                    assert_eq!(code(client.call(request).await), ErrorCode::Forbidden, "{name}");
                }
            }
        }
    }
    let runs = signed_in(&cluster.nodes[1], &runner).await;
    let out = runs.run_job(b"customer-1", "counter", b"2", false).await.expect("runner runs counter");
    assert_eq!(out.output, b"3", "the refused jobs added nothing");
    assert_eq!(code(runs.run_job(b"customer-1", "ledger", b"1", false).await), ErrorCode::Forbidden);
    for builtin in ["builtin:hset", "builtin:hget"] {
        // The Redis commands' built-ins are item writes and reads, whoever names them.
        assert_eq!(code(runs.run_job(b"customer-1", builtin, b"", false).await), ErrorCode::Forbidden, "{builtin}");
    }

    // Nothing changed: the module is still there, no intruder, the same three users.
    let names: Vec<String> = admin.list_modules().await.unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["counter"]);
    let users: Vec<(String, String)> =
        admin.users().await.unwrap().into_iter().map(|u| (u.name, u.permissions.to_string())).collect();
    assert_eq!(
        users,
        [("reader".into(), "read".into()), ("root".into(), "admin".into()), ("runner".into(), "run:counter".into())]
    );
    assert_eq!(code(admin.delete_user("root").await), ErrorCode::Conflict, "the last admin stays");

    // A real Redis client: AUTH with user and token, NOAUTH before, NOPERM without the permission.
    let resp = other.resp.clone().expect("resp address");
    let (reader_token, runner_token) = (reader.clone(), runner.clone());
    tokio::task::spawn_blocking(move || {
        let host = resp.trim_start_matches("redis://");
        let mut anonymous = redis::Client::open(resp.as_str()).unwrap().get_connection().unwrap();
        let e = redis::cmd("PING").query::<String>(&mut anonymous).unwrap_err();
        assert!(e.to_string().contains("NOAUTH"), "{e}");
        let e = redis::cmd("HSET").arg("customer-1").arg("count").arg("9").query::<i64>(&mut anonymous).unwrap_err();
        assert!(e.to_string().contains("NOAUTH"), "{e}");
        let wrong = redis::Client::open(format!("redis://runner:grex_0123@{host}")).unwrap().get_connection();
        assert_eq!(wrong.err().expect("a wrong token is refused").kind(), redis::ErrorKind::AuthenticationFailed);
        let e = redis::cmd("AUTH").arg("runner").arg("grex_0123").query::<String>(&mut anonymous).unwrap_err();
        assert!(e.to_string().contains("WRONGPASS"), "{e}");
        let e = redis::cmd("AUTH").arg("reader").arg(&runner_token).query::<String>(&mut anonymous).unwrap_err();
        assert!(e.to_string().contains("WRONGPASS"), "another user's token: {e}");
        let mut run =
            redis::Client::open(format!("redis://runner:{runner_token}@{host}")).unwrap().get_connection().unwrap();
        let count: String = redis::cmd("FCALL").arg("counter").arg(1).arg("customer-1").arg(1).query(&mut run).unwrap();
        assert_eq!(count, "4");
        let e = redis::cmd("HGET").arg("customer-1").arg("count").query::<Option<String>>(&mut run).unwrap_err();
        assert!(e.to_string().contains("NOPERM"), "{e}");
        let e = redis::cmd("HSET").arg("customer-1").arg("count").arg("9").query::<i64>(&mut run).unwrap_err();
        assert!(e.to_string().contains("NOPERM"), "{e}");
        let e = redis::cmd("GREX.MODULE").arg("DELETE").arg("counter").query::<String>(&mut run).unwrap_err();
        assert!(e.to_string().contains("NOPERM"), "{e}");
        // The one-argument form, as `redis-cli -a TOKEN` sends it.
        let mut read = redis::Client::open(resp.as_str()).unwrap().get_connection().unwrap();
        let ok: String = redis::cmd("AUTH").arg(&reader_token).query(&mut read).unwrap();
        assert_eq!(ok, "OK");
        let whoami: String = redis::cmd("ACL").arg("WHOAMI").query(&mut read).unwrap();
        assert_eq!(whoami, "reader");
        let count: Option<String> = redis::cmd("HGET").arg("customer-1").arg("count").query(&mut read).unwrap();
        assert_eq!(count.as_deref(), Some("4"), "the refused HSETs wrote nothing");
        let e =
            redis::cmd("FCALL").arg("counter").arg(1).arg("customer-1").arg(1).query::<String>(&mut read).unwrap_err();
        assert!(e.to_string().contains("NOPERM"), "{e}");
    })
    .await
    .expect("redis client");

    // A deleted user's connections that signed in before are refused from then on, on every node.
    let early = signed_in(&cluster.nodes[1], &reader).await;
    admin.delete_user("reader").await.expect("delete reader");
    eventually("the deletion to reach every node", PATIENCE, || async {
        early.status().await.is_err_and(|e| e.code() == Some(ErrorCode::Unauthenticated))
    })
    .await;
    assert_eq!(
        code(Client::connect_with(&other.http, &ConnectOptions { ca_file: None, token: Some(reader) }).await),
        ErrorCode::Unauthenticated
    );

    // Users are kept on disk with the meta state: a restarted node still knows them.
    cluster.nodes[1].kill9();
    cluster.nodes[1].restart();
    let node = &cluster.nodes[1];
    // It replays what its stored state missed before it serves: never a cluster without users.
    assert_eq!(code(node.client().await.status().await), ErrorCode::Unauthenticated);
    let after = http_signed_in(node, &runner).await;
    // Until it has heard from its peers again it refuses writes (`no_quorum`, or `unavailable`
    // while its flock elects), as any node cut off from a majority does, safe to retry; then the
    // runner's job runs.
    eventually("the restarted node to run the runner's job", PATIENCE, || async {
        match after.run_job(b"customer-1", "counter", b"1", false).await {
            Ok(_) => true,
            Err(e) if matches!(e.code(), Some(ErrorCode::NoQuorum | ErrorCode::Unavailable)) => false,
            Err(e) => panic!("the runner runs on the restarted node: {e}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_redis_over_tls_carry_tokens_and_plain_text_gets_no_answer() {
    use std::io::{Read, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--http-tls", "--resp", "127.0.0.1:0", "--resp-tls"]);
    let resp = node.resp.clone().expect("resp address");
    assert!(node.http.starts_with("https://") && resp.starts_with("rediss://"), "{} {resp}", node.http);
    let https =
        |token: Option<&str>| ConnectOptions { ca_file: Some(node.ca.clone()), token: token.map(str::to_owned) };

    // HTTPS, trusted through the cluster's CA, carries the bearer token.
    let open = Client::connect_with(&node.http, &https(None)).await.expect("HTTPS client");
    let root = open.add_user("root", Permissions::admin()).await.expect("add the first admin over HTTPS").token;
    let admin = Client::connect_with(&node.http, &https(Some(&root))).await.expect("sign in over HTTPS");
    admin.status().await.expect("status over HTTPS");
    assert_eq!(code(open.status().await), ErrorCode::Unauthenticated);
    assert!(matches!(Client::connect(&node.http, None).await, Err(ClientError::Config(_))), "https needs the CA");

    // Plain text to either TLS port is never answered in plain text.
    for addr in [node.http.trim_start_matches("https://"), resp.trim_start_matches("rediss://")] {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream.write_all(b"GET /v1/status HTTP/1.1\r\nHost: grex\r\n\r\n*1\r\n$4\r\nPING\r\n").unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(!text.contains("HTTP/1.1") && !text.contains("PONG") && !text.contains("NOAUTH"), "{addr}: {text}");
    }

    // The Redis protocol over TLS: NOAUTH, then AUTH with the token, then PONG.
    let mut config = grex_client::quic::tls_config(&node.ca, b"unused").unwrap();
    config.alpn_protocols.clear();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(resp.trim_start_matches("rediss://")).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake with the Redis port");
    let auth = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{root}\r\n", root.len());
    tls.write_all(format!("*1\r\n$4\r\nPING\r\n{auth}*1\r\n$4\r\nPING\r\n").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"+PONG\r\n") {
        let mut chunk = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut chunk)).await.expect("answers").unwrap();
        assert!(read > 0, "the connection closed after {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..read]);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("-NOAUTH") && text.ends_with("+OK\r\n+PONG\r\n"), "{text}");
}
