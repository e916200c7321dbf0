//! Bad input of every kind gets a clear 4xx error with a stable code, and loses nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use grex_client::ErrorCode;
use grex_tests::{GrexNode, http, job_wasm, wait_until};

fn start() -> (tempfile::TempDir, GrexNode) {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--input-bytes-max", "1000", "--module-bytes-max", "2000000"]);
    let counter = job_wasm("counter");
    let put = http(node.http_addr(), "PUT", "/v1/modules/counter", &[("content-type", "application/wasm")], &counter);
    assert_eq!(put.status, 200, "{}", String::from_utf8_lossy(&put.body));
    (dir, node)
}

fn assert_error(answer: &grex_tests::HttpAnswer, status: u16, code: &str, hint: &str) {
    let json = answer.json();
    assert_eq!(answer.status, status, "{json}");
    assert_eq!(json["code"], code, "{json}");
    let message = json["error"].as_str().unwrap();
    assert!(message.contains(hint), "message `{message}` should mention `{hint}`");
}

#[test]
fn malformed_wasm_is_refused_with_a_reason() {
    let (_dir, node) = start();
    let addr = node.http_addr();
    let ct = [("content-type", "application/wasm")];
    assert_error(&http(addr, "PUT", "/v1/modules/junk", &ct, b"hello"), 400, "module_invalid", "not a wasm module");
    // Cut anywhere (a broken upload): refused, never a panic or an `internal` error.
    let counter = job_wasm("counter");
    for end in (8..counter.len()).step_by(counter.len() / 50).chain([counter.len() - 1]) {
        let truncated = &counter[..end];
        assert_error(&http(addr, "PUT", "/v1/modules/junk", &ct, truncated), 400, "module_invalid", "");
    }
    // A valid core module that is not a Grex job: no component type, no `run` export.
    let bare = b"\0asm\x01\0\0\0";
    assert_error(&http(addr, "PUT", "/v1/modules/junk", &ct, bare), 400, "module_invalid", "grex");
    assert_error(&http(addr, "PUT", "/v1/modules/bad%20name", &ct, bare), 400, "bad_request", "module name");
    let huge = vec![0u8; 2_000_001];
    assert_error(&http(addr, "PUT", "/v1/modules/huge", &ct, &huge), 413, "module_too_large", "limit");
    // None of it replaced the good module.
    let run = http(addr, "POST", "/v1/jobs/b?module=counter", &[], b"");
    assert_eq!((run.status, run.body.as_slice()), (200, &b"1"[..]));
}

/// A module that compiles for longer than the node allows is refused with `module_too_complex`;
/// the compile (a child process) is stopped, and the node keeps serving.
#[test]
fn a_module_that_compiles_too_long_is_refused_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--compile-timeout-secs", "5"]);
    let addr = node.http_addr();
    let ct = [("content-type", "application/wasm")];
    // 20,000 small functions, about 12 MB of wasm: many seconds of Cranelift even in a release
    // build (over 100 s in a debug one), in little memory. The deadline leaves ordinary modules
    // room on a loaded machine.
    let bomb = grex_tests::compile_bomb(20_000, 130);
    let answer = http(addr, "PUT", "/v1/modules/bomb", &ct, &bomb);
    assert_error(&answer, 422, "module_too_complex", "--compile-timeout-secs");
    let put = http(addr, "PUT", "/v1/modules/counter", &ct, &job_wasm("counter"));
    assert_eq!(put.status, 200, "{}", String::from_utf8_lossy(&put.body));
    let run = http(addr, "POST", "/v1/jobs/b?module=counter", &[], b"");
    assert_eq!((run.status, run.body.as_slice()), (200, &b"1"[..]));
    let listed = http(addr, "GET", "/v1/modules", &[], b"").json();
    assert!(!listed.to_string().contains("bomb"), "the refused module was kept: {listed}");
}

/// A module whose compile needs more memory than the node allows is refused with
/// `module_too_complex`, while a job module compiles under the same cap.
#[test]
fn a_module_that_compiles_too_big_is_refused_and_small_ones_still_compile() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--compile-memory-mib", "96", "--compile-timeout-secs", "600"]);
    let addr = node.http_addr();
    let ct = [("content-type", "application/wasm")];
    let put = http(addr, "PUT", "/v1/modules/counter", &ct, &job_wasm("counter"));
    assert_eq!(put.status, 200, "{}", String::from_utf8_lossy(&put.body));
    // One function of 200,000 additions: about 1 MB of wasm that takes Cranelift over 2 GiB.
    let bomb = grex_tests::compile_bomb(1, 200_000);
    let answer = http(addr, "PUT", "/v1/modules/bomb", &ct, &bomb);
    assert_error(&answer, 422, "module_too_complex", "--compile-memory-mib");
    let run = http(addr, "POST", "/v1/jobs/b?module=counter", &[], b"");
    assert_eq!((run.status, run.body.as_slice()), (200, &b"1"[..]));
}

#[test]
fn unknown_module_names_say_how_to_upload_one() {
    let (_dir, node) = start();
    let answer = http(node.http_addr(), "POST", "/v1/jobs/b?module=nope", &[], b"");
    assert_error(&answer, 404, "module_not_found", "grex module put");
    let answer = http(node.http_addr(), "POST", "/v1/jobs/b", &[], b"");
    assert_error(&answer, 400, "bad_request", "module=NAME");
}

#[test]
fn oversized_input_is_refused_before_the_job_runs() {
    let (_dir, node) = start();
    let answer = http(node.http_addr(), "POST", "/v1/jobs/b?module=counter", &[], &[b'1'; 1001]);
    assert_error(&answer, 413, "input_too_large", "1000-byte limit");
    let answer = http(node.http_addr(), "GET", "/v1/buckets/b/items/count", &[], b"");
    assert_error(&answer, 404, "item_not_found", "count");
}

#[test]
fn empty_and_oversized_bucket_keys_are_refused() {
    let (_dir, node) = start();
    let answer = http(node.http_addr(), "POST", "/v1/jobs/%20?module=counter", &[], b"");
    assert_eq!(answer.status, 200, "a single space is a valid key");
    let long = "k".repeat(513);
    let answer = http(node.http_addr(), "POST", &format!("/v1/jobs/{long}?module=counter"), &[], b"");
    assert_error(&answer, 400, "invalid_bucket_key", "513 bytes");
    let answer = http(node.http_addr(), "GET", &format!("/v1/canary/{long}"), &[], b"");
    assert_error(&answer, 400, "invalid_bucket_key", "limit is 512");
    // An empty path segment does not match the route at all.
    let answer = http(node.http_addr(), "POST", "/v1/jobs/?module=counter", &[], b"");
    assert_eq!(answer.status / 100, 4);
}

#[tokio::test]
async fn an_empty_bucket_key_over_quic_is_refused() {
    let (_dir, node) = start();
    let client = node.client().await;
    let err = client.run_job(b"", "counter", b"", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidBucketKey));
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn wrong_content_types_are_refused_with_the_right_one_named() {
    let (_dir, node) = start();
    let addr = node.http_addr();
    let form = [("content-type", "application/x-www-form-urlencoded")];
    assert_error(
        &http(addr, "POST", "/v1/jobs/b?module=counter", &form, b"5"),
        415,
        "unsupported_media_type",
        "--data-binary",
    );
    let json = [("content-type", "application/json")];
    assert_error(&http(addr, "PUT", "/v1/modules/x", &json, b"{}"), 415, "unsupported_media_type", "application/wasm");
    // The refused job did not run.
    assert_error(&http(addr, "GET", "/v1/buckets/b/items/count", &[], b""), 404, "item_not_found", "");
}

#[test]
fn binary_bucket_keys_round_trip_through_percent_encoding() {
    let (_dir, node) = start();
    let addr = node.http_addr();
    let answer = http(addr, "POST", "/v1/jobs/%00%FF%2F?module=counter", &[("content-type", "text/plain")], b"3");
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"3"[..]));
    let item = http(addr, "GET", "/v1/buckets/%00%FF%2F/items/count", &[], b"");
    assert_eq!((item.status, item.body.as_slice()), (200, &b"3"[..]));
}

/// A QUIC connection to `node` that sends whatever bytes a test writes (the endpoint must live
/// as long as the connection).
async fn raw_quic(node: &GrexNode) -> (quinn::Endpoint, quinn::Connection) {
    let config = grex_client::quic::client_config(&node.ca).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let addr = node.quic.trim_start_matches("quic://").parse().unwrap();
    let connection = endpoint.connect(addr, "127.0.0.1").unwrap().await.unwrap();
    (endpoint, connection)
}

#[tokio::test]
async fn malformed_quic_frames_get_an_error_answer_and_the_node_keeps_serving() {
    let (_dir, node) = start();
    let (_endpoint, connection) = raw_quic(&node).await;
    let frames: [&[u8]; 4] = [
        b"\x00\x00\x00\x05\x01\xff\xff\xff\xff", // version 1, garbage payload
        b"\x00\x00\x00\x02\x09\x00",             // unknown wire version
        b"\xff\xff\xff\xff",                     // announces 4 GiB
        b"\x00\x00\x01\x00\x01",                 // announces 256 bytes, sends 1
    ];
    for frame in frames {
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(frame).await.unwrap();
        send.finish().unwrap();
        let answer = recv.read_to_end(1 << 20).await.unwrap();
        let response: grex_client::Response = grex_client::proto::decode_frame(&answer).unwrap();
        match response {
            grex_client::Response::Error(e) => assert_eq!(e.code, ErrorCode::BadRequest, "{e}"),
            other => panic!("expected an error for {frame:?}, got {other:?}"),
        }
    }
    let client = node.client().await;
    assert_eq!(client.run_job(b"b", "counter", b"", false).await.unwrap().output, b"1");
}

/// Reads the next frame of a stream that carries one after another; `None` at its end.
async fn next_frame(recv: &mut quinn::RecvStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return None,
        Err(e) => panic!("reading a frame header: {e}"),
    }
    let mut frame = header.to_vec();
    frame.resize(4 + u32::from_be_bytes(header) as usize, 0);
    recv.read_exact(&mut frame[4..]).await.expect("a whole frame");
    Some(frame)
}

#[tokio::test]
async fn a_session_answers_each_request_by_its_id_and_a_malformed_frame_ends_it_with_a_reason() {
    use grex_client::proto::{ALPN_SESSIONS, Tagged, decode_frame, encode_frame};
    use grex_client::{Request, Response};
    let (_dir, node) = start();
    let (_endpoint, connection) = raw_quic(&node).await;
    let alpn = connection.handshake_data().unwrap().downcast::<quinn::crypto::rustls::HandshakeData>().unwrap();
    assert_eq!(alpn.protocol.as_deref(), Some(ALPN_SESSIONS), "a node offers sessions first");

    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut bytes = encode_frame(&Request::Session).unwrap();
    // Ten jobs on ten buckets, each adding its own id; a scan, which needs a stream of its own;
    // and a job that fails. All written at once, before any answer is read.
    for id in 1..=10u64 {
        let job = Request::RunJob {
            bucket: format!("s{id}").into_bytes(),
            module: "counter".into(),
            input: id.to_string().into_bytes(),
            read_only: false,
        };
        bytes.extend(encode_frame(&Tagged { id, message: job }).unwrap());
    }
    let scan = Request::Scan(grex_client::ScanRequest { module: "counter".into(), ..Default::default() });
    bytes.extend(encode_frame(&Tagged { id: 11, message: scan }).unwrap());
    let unknown = Request::RunJob { bucket: b"s".to_vec(), module: "nothing".into(), input: vec![], read_only: false };
    bytes.extend(encode_frame(&Tagged { id: 12, message: unknown }).unwrap());
    send.write_all(&bytes).await.unwrap();

    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 12 {
        let frame = next_frame(&mut recv).await.expect("an answer per request");
        let Tagged { id, message } = decode_frame::<Tagged<Response>>(&frame).unwrap();
        assert!(answers.insert(id, message).is_none(), "request {id} answered twice");
    }
    for id in 1..=10u64 {
        match &answers[&id] {
            Response::Job(out) => assert_eq!(out.output, id.to_string().into_bytes(), "request {id}"),
            other => panic!("request {id}: {other:?}"),
        }
    }
    match &answers[&11] {
        Response::Error(e) => {
            assert!(e.code == ErrorCode::BadRequest && e.message.contains("stream of its own"), "{e}")
        }
        other => panic!("a scan on a session: {other:?}"),
    }
    match &answers[&12] {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::ModuleNotFound, "{e}"),
        other => panic!("an unknown module: {other:?}"),
    }

    // Garbage where a tagged request belongs: the node says why under id 0 and ends the session.
    send.write_all(b"\x00\x00\x00\x05\x01\xff\xff\xff\xff").await.unwrap();
    let frame = next_frame(&mut recv).await.expect("a reason");
    match decode_frame::<Tagged<Response>>(&frame).unwrap() {
        Tagged { id: 0, message: Response::Error(e) } => {
            assert!(e.code == ErrorCode::BadRequest && e.message.contains("malformed session frame"), "{e}")
        }
        other => panic!("expected the session's end, got {other:?}"),
    }
    assert!(next_frame(&mut recv).await.is_none(), "the session ends after its reason");

    // The connection and the node serve on.
    let client = node.client().await;
    assert!(client.has_sessions());
    assert_eq!(client.run_job(b"s3", "counter", b"", false).await.unwrap().output, b"4");
}

/// Sends `bytes` on a new connection to `addr` and returns everything the other side answers
/// before it closes (a node may refuse and close before it read all of it).
fn exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

/// Whether everything sent on `stream` (a loopback connection) has been read by the other side's
/// program: nothing in this side's send queue nor in the other side's receive queue
/// (`/proc/net/tcp`).
fn all_read(stream: &TcpStream) -> bool {
    let hex = |addr: std::net::SocketAddr| match addr {
        std::net::SocketAddr::V4(a) => format!("{:08X}:{:04X}", u32::from_le_bytes(a.ip().octets()), a.port()),
        std::net::SocketAddr::V6(_) => unreachable!("loopback IPv4 only"),
    };
    let (here, there) = (hex(stream.local_addr().unwrap()), hex(stream.peer_addr().unwrap()));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let queues = |local: &str, remote: &str| {
        table.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&local) && fields.get(2) == Some(&remote)).then(|| {
                let (tx, rx) = fields[4].split_once(':').unwrap();
                (u64::from_str_radix(tx, 16).unwrap(), u64::from_str_radix(rx, 16).unwrap())
            })
        })
    };
    matches!((queues(&here, &there), queues(&there, &here)), (Some((0, _)), Some((_, 0))))
}

/// `HSET key f <value>` as the Redis protocol sends it, then `QUIT`.
fn hset(key: &str, value: &[u8]) -> Vec<u8> {
    let mut wire =
        format!("*4\r\n$4\r\nHSET\r\n${}\r\n{key}\r\n$1\r\nf\r\n${}\r\n", key.len(), value.len()).into_bytes();
    wire.extend_from_slice(value);
    wire.extend_from_slice(b"\r\n*1\r\n$4\r\nQUIT\r\n");
    wire
}

/// Large requests received in part share one node-wide budget (`--request-buffer-mib`) over HTTP,
/// the Redis protocol and QUIC: while one upload holds most of it, a large request over any of
/// them is refused with `overloaded` (small ones still run), and once the upload goes away the
/// budget is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_in_part_share_one_node_wide_budget() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--request-buffer-mib", "2", "--resp", "127.0.0.1:0"]);
    let addr = node.http_addr().to_owned();
    let resp = node.resp.clone().unwrap().trim_start_matches("redis://").to_owned();
    let put = http(&addr, "PUT", "/v1/modules/counter", &[("content-type", "application/wasm")], &job_wasm("counter"));
    assert_eq!(put.status, 200);

    // The holder: an upload that announces 8 MiB and sends 1.5 MiB of it. What is left of the
    // budget is under 0.6 MiB.
    let mut holder = TcpStream::connect(&addr).unwrap();
    let head = format!("PUT /v1/modules/big HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n", 8 << 20);
    holder.write_all(head.as_bytes()).unwrap();
    holder.write_all(&vec![0u8; 3 << 19]).unwrap();
    // Only once the node has read all of it is its claim whole (else a request that came
    // first could hold the budget, and the upload would be the one refused).
    wait_until("the node to read all the upload sent", Duration::from_secs(20), || all_read(&holder));
    // Large, but within every per-request limit (a job's input is at most 1 MiB).
    let large = vec![b'v'; 900 << 10];
    let refused = exchange(&resp, &hset("k", &large));
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.contains("--request-buffer-mib") && refused.contains("(overloaded)"), "{refused}");

    let over_http = http(&addr, "PUT", "/v1/modules/other", &[("content-type", "application/wasm")], &large);
    assert_error(&over_http, 503, "overloaded", "--request-buffer-mib");
    let small = http(&addr, "POST", "/v1/jobs/b?module=counter", &[], b"");
    assert_eq!((small.status, small.body.as_slice()), (200, &b"1"[..]));

    let config = grex_client::quic::client_config(&node.ca).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let connection = endpoint.connect(node.quic.trim_start_matches("quic://").parse().unwrap(), "127.0.0.1").unwrap();
    let connection = connection.await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut frame = (large.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&large);
    let _ = send.write_all(&frame).await;
    let answer = recv.read_to_end(1 << 20).await.unwrap();
    match grex_client::proto::decode_frame::<grex_client::Response>(&answer).unwrap() {
        grex_client::Response::Error(e) => assert_eq!(e.code, ErrorCode::Overloaded, "{e}"),
        other => panic!("a large QUIC request was not refused: {other:?}"),
    }

    drop(holder);
    let mut answer = Vec::new();
    wait_until("a large Redis request to be served once the upload is gone", Duration::from_secs(20), || {
        answer = exchange(&resp, &hset("k", &large));
        answer.starts_with(b":")
    });
}
