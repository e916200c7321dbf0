//! Test harness: builds the example jobs for wasm32, starts the real `grex` binary on loopback
//! with ports chosen by the OS, and talks to it over QUIC and raw HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use grex_client::Client;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// The `grex` binary, built from the current sources once per test process. Tests in this package
/// cannot name another package's binary (`CARGO_BIN_EXE_*` is per package), and `cargo test -p
/// grex-tests` alone would not rebuild it, so the harness asks cargo to, with the test's profile.
pub fn grex_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
            let mut cargo = Command::new(env!("CARGO"));
            cargo.current_dir(workspace_root()).args(["build", "--quiet", "-p", "grex", "--bin", "grex"]);
            if profile_dir.file_name().is_some_and(|p| p == "release") {
                cargo.arg("--release");
            }
            let status = cargo.status().expect("run cargo build -p grex");
            assert!(status.success(), "building the grex binary failed");
            profile_dir.join(format!("grex{}", std::env::consts::EXE_SUFFIX))
        })
        .clone()
}

/// The bytes of a job from `jobs/`, built once per test process for wasm32-unknown-unknown.
pub fn job_wasm(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = workspace_root();
        let status = Command::new(root.join("scripts/build-jobs.sh"))
            .stdout(Stdio::null())
            .status()
            .expect("run scripts/build-jobs.sh");
        assert!(status.success(), "building the jobs failed (needs `rustup target add wasm32-unknown-unknown`)");
        root.join("target/jobs/wasm32-unknown-unknown/wasm")
    });
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Waits for `condition` to hold, checking every few milliseconds, failing after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `grex serve` process.
pub struct GrexNode {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub http: String,
    /// `quic://127.0.0.1:PORT`.
    pub quic: String,
    /// The CA file that signs the node's QUIC certificate.
    pub ca: PathBuf,
    /// Data directory.
    pub data: PathBuf,
}

impl GrexNode {
    /// Starts `grex serve --data DATA` on loopback ports chosen by the OS, plus `args`, and waits
    /// until it listens.
    pub fn start(data: &Path, args: &[&str]) -> GrexNode {
        let mut child = Command::new(grex_bin())
            .args(["serve", "--data"])
            .arg(data)
            .args(["--http", "127.0.0.1:0", "--quic", "127.0.0.1:0", "--peer", "127.0.0.1:0"])
            .args(args)
            // Job log lines (the hostile fixture panics on purpose) would only be noise here.
            .env("GREX_LOG", "warn,grex::job=off,openraft=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start grex serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("grex serve exited before listening: {:?}", child.wait()));
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in `{line}`"))
                .to_owned()
        };
        GrexNode {
            http: field("http"),
            quic: field("quic"),
            ca: PathBuf::from(field("ca")),
            data: data.to_owned(),
            child: Some(child),
        }
    }

    /// A QUIC client of this node.
    pub async fn client(&self) -> Client {
        Client::connect(&self.quic, Some(&self.ca)).await.expect("connect over QUIC")
    }

    /// An HTTP client of this node.
    pub async fn http_client(&self) -> Client {
        Client::connect(&self.http, None).await.expect("HTTP client")
    }

    /// `host:port` of the HTTP listener.
    pub fn http_addr(&self) -> &str {
        self.http.trim_start_matches("http://")
    }

    /// Kills the process with SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for a clean exit; returns whether the exit status was success.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return false };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for GrexNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A raw HTTP/1.1 answer.
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends one raw HTTP/1.1 request (so tests can send what a typed client would refuse to).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpAnswer {
    let mut stream = TcpStream::connect(addr).expect("connect to the HTTP API");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("set timeout");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send head");
    stream.write_all(body).expect("send body");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read answer");
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("HTTP head");
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let mut body = answer[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    HttpAnswer { status, body }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).expect("hex").trim(), 16).expect("hex");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 2 + size + 2..];
    }
}

/// A seed for a randomized test: `GREX_SEED` if set, else fresh; printed so a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("GREX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (GREX_SEED={seed} replays this run)");
    seed
}
