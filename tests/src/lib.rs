//! Test harness: builds the example jobs for wasm32, starts the real `grex` binary on loopback
//! with ports chosen by the OS, and talks to it over QUIC and raw HTTP.

pub mod browser;
pub mod clients;
pub mod counting;
pub mod list_append;
pub mod nemesis;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use grex_client::Client;
use grex_client::proto::FlockMapInfo;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// The `grex` binary, built from the current sources once per test process. Tests in this package
/// cannot name another package's binary (`CARGO_BIN_EXE_*` is per package), and `cargo test -p
/// grex-tests` alone would not rebuild it, so the harness asks cargo to, with the test's profile.
/// `GREX_BIN=PATH` runs the tests against another binary instead (an older build, to show that a
/// test finds the bug it guards against).
pub fn grex_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(bin) = std::env::var_os("GREX_BIN") {
                println!("testing the grex binary at {} (GREX_BIN)", Path::new(&bin).display());
                return PathBuf::from(bin);
            }
            let exe = std::env::current_exe().expect("test executable path");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
            let status = build_grex(&workspace_root(), profile_dir).status().expect("run cargo build -p grex");
            assert!(status.success(), "building the grex binary failed");
            profile_dir.join(format!("grex{}", std::env::consts::EXE_SUFFIX))
        })
        .clone()
}

/// `cargo build` of the `grex` binary in the workspace at `root`, with the profile of
/// `profile_dir` (`target/debug` or `target/release`).
fn build_grex(root: &Path, profile_dir: &Path) -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    // `--workspace`, as `scripts/test.sh` and `scripts/soak.sh` build the tests: features
    // unify over the packages built, so `-p grex` alone would rebuild shared dependencies
    // with other features, and the next test build would rebuild them back.
    cargo.current_dir(root).args(["build", "--quiet", "--workspace", "--bin", "grex"]);
    // What `cargo test` sets for this test process, not for builds: ring's build script
    // tracks CARGO_MANIFEST_DIR, so passing it on would rebuild the TLS stack here and
    // again in the next `cargo test`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let per_test = ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"];
        if per_test.iter().any(|prefix| key.starts_with(prefix)) {
            cargo.env_remove(key.as_ref());
        }
    }
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        cargo.arg("--release");
    }
    cargo
}

/// The release before this one, which the upgrade test runs beside it: its commit in this
/// repository's history, its version, and the peer protocol it speaks.
pub const PREVIOUS_RELEASE: (&str, &str, u32) = ("aa808bbf6f738f048738be7dafc3e83f0f1fc422", "0.3.0", 11);

/// The `grex` binary of [`PREVIOUS_RELEASE`], built once from its sources in git history (taken
/// with `git archive` into `target/previous/`) and kept there. Its build shares this workspace's
/// compiled dependencies (`build.build-dir`), and its own crates, of another version, do not
/// displace this build's. `GREX_PREVIOUS_BIN=PATH` names a binary built elsewhere.
pub fn previous_grex_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(bin) = std::env::var_os("GREX_PREVIOUS_BIN") {
                return PathBuf::from(bin);
            }
            let (commit, version, _) = PREVIOUS_RELEASE;
            let root = workspace_root();
            let current = grex_bin();
            let profile_dir = current.parent().expect("target/<profile>/grex");
            let target = profile_dir.parent().expect("target/<profile>");
            let dir = target.join("previous").join(commit);
            let bin = dir.join(format!("grex{}", std::env::consts::EXE_SUFFIX));
            if bin.exists() {
                return bin;
            }
            println!("building grex {version} (commit {commit}) for the upgrade test");
            let src = dir.join("src");
            let _ = std::fs::remove_dir_all(&src);
            std::fs::create_dir_all(&src).expect("create target/previous");
            let git = |args: &[&str]| Command::new("git").current_dir(&root).args(args).output().expect("run git");
            if !git(&["cat-file", "-e", &format!("{commit}^{{commit}}")]).status.success() {
                // A shallow clone: fetch the history it left out.
                let fetched = git(&["fetch", "--quiet", "--unshallow"]);
                assert!(
                    fetched.status.success(),
                    "the upgrade test builds grex {version} from commit {commit}, which this clone lacks; \
                     clone the repository with its history (git fetch --unshallow): {}",
                    String::from_utf8_lossy(&fetched.stderr)
                );
            }
            let archive = git(&["archive", "--format=tar", commit]);
            assert!(archive.status.success(), "git archive {commit}: {}", String::from_utf8_lossy(&archive.stderr));
            let mut tar = Command::new("tar").arg("-x").current_dir(&src).stdin(Stdio::piped()).spawn().expect("tar");
            tar.stdin.take().expect("piped").write_all(&archive.stdout).expect("unpack the sources");
            assert!(tar.wait().expect("tar").success(), "unpacking the sources of {commit} failed");
            let status = build_grex(&src, profile_dir)
                .arg("--target-dir")
                .arg(dir.join("out"))
                .arg("--config")
                .arg(format!("build.build-dir={:?}", target.to_str().expect("UTF-8 path")))
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building grex {version} from commit {commit} failed");
            let profile = profile_dir.file_name().expect("profile");
            std::fs::copy(dir.join("out").join(profile).join(bin.file_name().expect("name")), &bin)
                .expect("keep the previous release's binary");
            let _ = std::fs::remove_dir_all(dir.join("out"));
            bin
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

/// A loopback port that is free for TCP and UDP now, below the range the OS draws ports for
/// outgoing connections from (32768 and up on Linux). A node restarted on a port that port 0 gave it
/// could find the port taken meanwhile by some client's connection; ports down here are taken only
/// by listeners.
pub fn free_port() -> u16 {
    static DRAWN: AtomicU64 = AtomicU64::new(0);
    const FIRST: u64 = 20_000;
    const COUNT: u64 = 12_000;
    let salt = u64::from(std::process::id())
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    loop {
        let drawn = DRAWN.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + salt.wrapping_add(drawn.wrapping_mul(7_919)) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

/// Three free loopback addresses: a node's HTTP, QUIC and peer listeners.
fn free_addrs() -> [String; 3] {
    [(); 3].map(|()| format!("127.0.0.1:{}", free_port()))
}

/// A `grex serve` process.
pub struct GrexNode {
    child: Option<Child>,
    /// The node's id (16 hex digits).
    pub id: String,
    /// `http://127.0.0.1:PORT`.
    pub http: String,
    /// `quic://127.0.0.1:PORT`.
    pub quic: String,
    /// Peer (node-to-node) address, `127.0.0.1:PORT`.
    pub peer: String,
    /// The CA file that signs the node's QUIC certificate.
    pub ca: PathBuf,
    /// `redis://127.0.0.1:PORT` when started with `--resp`.
    pub resp: Option<String>,
    /// Data directory.
    pub data: PathBuf,
    /// The arguments it was started with (after the listen addresses).
    args: Vec<String>,
    /// The `grex` binary it runs.
    bin: PathBuf,
}

impl GrexNode {
    /// Starts `grex serve --data DATA` on free loopback ports ([`free_port`]), plus `args`, and
    /// waits until it listens.
    pub fn start(data: &Path, args: &[&str]) -> GrexNode {
        Self::start_binary(&grex_bin(), data, args)
    }

    /// As [`start`](Self::start), running the `grex` binary at `bin`.
    pub fn start_binary(bin: &Path, data: &Path, args: &[&str]) -> GrexNode {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::spawn(bin, data, free_addrs().each_ref().map(String::as_str), args, None)
    }

    /// As [`start`](Self::start), listening on the given HTTP, QUIC and peer addresses
    /// (`HOST:PORT`), as a data directory made elsewhere expects its members to be found.
    pub fn start_at(data: &Path, [http, quic, peer]: [&str; 3], args: &[&str]) -> GrexNode {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::spawn(&grex_bin(), data, [http, quic, peer], args, None)
    }

    /// Starts the node again (after [`kill9`](Self::kill9) or [`terminate`](Self::terminate)) on
    /// the same addresses, which its peers know it by.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the node is still running");
        let addrs =
            [self.http_addr().to_owned(), self.quic.trim_start_matches("quic://").to_owned(), self.peer.clone()];
        let args = std::mem::take(&mut self.args);
        *self = Self::spawn(&self.bin, &self.data, addrs.each_ref().map(String::as_str), args, None);
    }

    /// Like [`restart`](Self::restart), running the `grex` binary at `bin` from now on (an
    /// upgrade in place).
    pub fn restart_binary(&mut self, bin: &Path) {
        self.bin = bin.to_owned();
        self.restart();
    }

    /// Like [`restart`](Self::restart), but with `args` in place of the ones it was started with
    /// (for example without `--credentials` and `--join`, as an operator restarts a member).
    pub fn restart_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self.restart();
    }

    /// Like [`restart_with`](Self::restart_with), with every address (HTTP, QUIC, peer) on a new
    /// free port, as a node moved to another host would be.
    pub fn restart_elsewhere(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "the node is still running");
        let args = args.iter().map(|a| a.to_string()).collect();
        *self = Self::spawn(&self.bin, &self.data, free_addrs().each_ref().map(String::as_str), args, None);
    }

    /// As [`start`](Self::start), with `GREX_LOG=filter` (this start only).
    pub fn start_with_log(data: &Path, args: &[&str], filter: &str) -> GrexNode {
        let args = args.iter().map(|a| a.to_string()).collect();
        Self::spawn(&grex_bin(), data, free_addrs().each_ref().map(String::as_str), args, Some(filter))
    }

    fn spawn(
        bin: &Path,
        data: &Path,
        [http, quic, peer]: [&str; 3],
        args: Vec<String>,
        log_filter: Option<&str>,
    ) -> GrexNode {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(log_path(data)).expect("open the node log");
        let mut child = Command::new(bin)
            .args(["serve", "--data"])
            .arg(data)
            .args(["--http", http, "--quic", quic, "--peer", peer])
            .args(&args)
            // Job log lines (the hostile fixture panics on purpose) would only be noise here;
            // GREX_TEST_LOG sets another filter for a run that needs more detail.
            .env(
                "GREX_LOG",
                log_filter.map(str::to_owned).unwrap_or_else(|| {
                    std::env::var("GREX_TEST_LOG")
                        .unwrap_or_else(|_| "warn,grex::cluster=info,grex::job=off,openraft=off".into())
                }),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start grex serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let Some(Ok(line)) = lines.next() else {
            let status = child.wait();
            panic!("grex serve exited before listening ({status:?}); its log:\n{}", read_log(data));
        };
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in `{line}`"))
                .to_owned()
        };
        GrexNode {
            id: line.split_whitespace().nth(2).expect("grex node ID listening ...").to_owned(),
            http: field("http"),
            quic: field("quic"),
            peer: field("peer"),
            ca: PathBuf::from(field("ca")),
            resp: line.split_whitespace().find_map(|w| w.strip_prefix("resp=")).map(str::to_owned),
            data: data.to_owned(),
            child: Some(child),
            args,
            bin: bin.to_owned(),
        }
    }

    /// The arguments it was started with (after the listen addresses).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// What the node has logged (its standard error) in every run so far.
    pub fn log(&self) -> String {
        read_log(&self.data)
    }

    /// Sends a signal (`USR1`, `TERM`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("the node is running");
        let status = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} failed");
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

    /// Writes a line to the process's standard input (`--fault-injection` reads commands there).
    pub fn tell(&mut self, line: &str) {
        use std::io::Write;
        let child = self.child.as_mut().expect("the node is running");
        let stdin = child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).expect("write to the node's stdin");
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit code if it did (the
    /// node is then down, to be [`restart`](Self::restart)ed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status.code());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for GrexNode {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- log of node {} ({}) ---\n{}", self.id, self.http, self.log());
        }
    }
}

fn log_path(data: &Path) -> PathBuf {
    let mut name = data.file_name().unwrap_or_default().to_os_string();
    name.push(".log");
    data.with_file_name(name)
}

fn read_log(data: &Path) -> String {
    std::fs::read_to_string(log_path(data)).unwrap_or_default()
}

/// Runs `grex ARGS` to completion and returns its standard output; panics if it fails.
pub fn grex(args: &[&str]) -> String {
    grex_of(&grex_bin(), args)
}

/// As [`grex()`], running the `grex` binary at `bin`.
pub fn grex_of(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect("run grex");
    assert!(
        out.status.success(),
        "grex {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A cluster of `grex serve` processes on loopback: the first node created with `grex init`, the
/// others joined through it with credentials it issued.
pub struct TestCluster {
    /// The nodes, in start order.
    pub nodes: Vec<GrexNode>,
    /// Where their data directories and logs live.
    pub dir: tempfile::TempDir,
    /// The `grex` binary that made it (and issues credentials to joining nodes).
    bin: PathBuf,
}

/// Flocks in a test cluster: few, so it forms fast.
pub const TEST_FLOCKS: u32 = 16;

impl TestCluster {
    /// Starts `count` nodes with `args` each, and waits until every flock has its herders and a
    /// leader.
    pub async fn start(count: usize, args: &[&str]) -> TestCluster {
        Self::start_binary(&grex_bin(), count, args).await
    }

    /// As [`start`](Self::start), every node running the `grex` binary at `bin`.
    pub async fn start_binary(bin: &Path, count: usize, args: &[&str]) -> TestCluster {
        // GREX_TEST_KEEP=1 keeps the data directories and node logs for a post-mortem.
        let keep = std::env::var_os("GREX_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new().prefix("grex-test").disable_cleanup(keep).tempdir().expect("temp dir");
        if keep {
            println!("keeping the cluster's data and logs in {}", dir.path().display());
        }
        let first = dir.path().join("node-0");
        let first_str = first.to_str().expect("UTF-8 path");
        grex_of(bin, &["init", "--data", first_str, "--flocks", &TEST_FLOCKS.to_string()]);
        let first = GrexNode::start_binary(bin, &first, args);
        let mut cluster = TestCluster { nodes: vec![first], dir, bin: bin.to_owned() };
        for _ in 1..count {
            cluster.join(args);
        }
        cluster.wait_formed(count).await;
        cluster
    }

    /// Starts one more node with `args`, joined through node 0 with credentials node 0 issued;
    /// returns as soon as it listens (it has joined; the flocks have not moved yet).
    pub fn join(&mut self, args: &[&str]) -> &mut GrexNode {
        self.join_via(0, args)
    }

    /// As [`TestCluster::join`], with the hail sent to node `via`.
    pub fn join_via(&mut self, via: usize, args: &[&str]) -> &mut GrexNode {
        let i = self.nodes.len();
        let first = self.dir.path().join("node-0");
        let creds = self.dir.path().join(format!("node-{i}.creds"));
        let creds = creds.to_str().expect("UTF-8 path");
        grex_of(&self.bin, &["cluster", "credentials", "--data", first.to_str().expect("UTF-8 path"), "--out", creds]);
        let mut node_args = vec!["--credentials", creds, "--join", &self.nodes[via].peer];
        node_args.extend_from_slice(args);
        let node = GrexNode::start_binary(&self.bin, &self.dir.path().join(format!("node-{i}")), &node_args);
        self.nodes.push(node);
        &mut self.nodes[i]
    }

    /// Waits until every node sees `count` nodes, each herding some flock, every flock with
    /// min(3, count) herders and its membership settled, and the same leader for every flock.
    pub async fn wait_formed(&self, count: usize) {
        let mut clients = Vec::new();
        for node in &self.nodes {
            clients.push(node.http_client().await);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut views = Vec::new();
            for client in &clients {
                views.push(client.flocks().await.ok());
            }
            // The map lists a joined node before it places flocks on it: wait for both.
            let formed = |map: &FlockMapInfo| {
                map.nodes.len() == count
                    && map.flocks.iter().all(|f| f.leader.is_some() && f.settled && f.herders.len() == count.min(3))
                    && map.nodes.iter().all(|(id, _)| map.flocks.iter().any(|f| f.herders.contains(id)))
            };
            let leaders = |map: &FlockMapInfo| map.flocks.iter().map(|f| f.leader.clone()).collect::<Vec<_>>();
            if let Some(Some(first)) = views.first()
                && views.iter().all(|v| v.as_ref().is_some_and(|v| formed(v) && leaders(v) == leaders(first)))
            {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not form within 60 s: {views:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The index of the node with this id.
    pub fn index_of(&self, id: &str) -> usize {
        self.nodes.iter().position(|n| n.id == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    /// The index of the node whose HTTP URL this is.
    pub fn index_of_url(&self, url: &str) -> usize {
        self.nodes.iter().position(|n| n.http == url).unwrap_or_else(|| panic!("no node at {url}"))
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
    // A node may answer before it reads the body (a declared length over a limit) and close: the
    // rest of the body then meets a closed connection, and the answer is still there to read.
    if let Err(e) = stream.write_all(body) {
        assert!(
            matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset),
            "send body: {e}"
        );
    }
    let mut answer = Vec::new();
    if let Err(e) = stream.read_to_end(&mut answer) {
        assert!(e.kind() == std::io::ErrorKind::ConnectionReset && !answer.is_empty(), "read answer: {e}");
    }
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

/// Polls `condition` (async) every few milliseconds until it holds, failing after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A valid component that is slow and memory-hungry to compile: one core module of `functions`
/// functions, each `adds` additions long (about 3 bytes of wasm per addition). It exports no
/// `run`, so it could never be a job; it only has to get as far as the compiler.
pub fn compile_bomb(functions: u32, adds: u32) -> Vec<u8> {
    use wasm_encoder::{
        CodeSection, Component, Function, FunctionSection, Instruction, Module, ModuleSection, TypeSection, ValType,
    };
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32], [ValType::I32]);
    let mut funcs = FunctionSection::new();
    let mut code = CodeSection::new();
    for f in 0..functions {
        funcs.function(0);
        let mut body = Function::new([]);
        body.instruction(&Instruction::LocalGet(0));
        for a in 0..adds {
            body.instruction(&Instruction::I32Const((f ^ a) as i32)).instruction(&Instruction::I32Add);
        }
        body.instruction(&Instruction::End);
        code.function(&body);
    }
    let mut module = Module::new();
    module.section(&types).section(&funcs).section(&code);
    let mut component = Component::new();
    component.section(&ModuleSection(&module));
    component.finish()
}
pub mod sim;
