//! A headless Chromium driven over the Chrome DevTools Protocol: what the dashboard test uses to
//! load a page, read its DOM as it updates, and take screenshots. Debian's `chromium`
//! (`scripts/test.sh` installs it).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// A running headless Chromium with one page open; killed when dropped.
pub struct Browser {
    child: Child,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    session: Option<String>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// The Chromium binary: `GREX_CHROMIUM`, else Debian's.
fn chromium() -> PathBuf {
    let path = std::env::var_os("GREX_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found: install Debian's chromium (scripts/test.sh does: apt-get install chromium), or set GREX_CHROMIUM",
        path.display()
    );
    path
}

impl Browser {
    /// Starts Chromium headless with a fresh profile, and connects to it.
    pub fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            // Its scratch files go with the profile, not into the machine's /tmp.
            .env("TMPDIR", profile.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // It says where its DevTools endpoint listens on stderr.
        let stderr = child.stderr.take().expect("piped stderr");
        let (found, endpoint) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = found.send(url.trim().to_owned());
                }
            }
        });
        let url = endpoint.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("chromium did not open its DevTools endpoint within 30 s")
        });
        let (socket, _) = tungstenite::connect(url.as_str()).expect("connect to chromium's DevTools endpoint");
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
        }
        Browser { child, socket, session: None, next_id: 0, _profile: profile }
    }

    /// Sends one DevTools command (to the open page, once there is one) and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        self.socket.send(Message::text(message.to_string())).expect("send to chromium");
        loop {
            let reply = self.socket.read().unwrap_or_else(|e| panic!("no answer from chromium to {method}: {e}"));
            let Message::Text(text) = reply else { continue };
            let reply: Value = serde_json::from_str(&text).expect("DevTools answers in JSON");
            // Events (no id) and answers to other commands are skipped.
            if reply["id"] != json!(id) {
                continue;
            }
            if let Some(error) = reply.get("error") {
                panic!("chromium refused {method}: {error}");
            }
            return reply["result"].clone();
        }
    }

    /// Opens `url` in a new page of `width` × `height` pixels; later calls go to it.
    pub fn open(&mut self, url: &str, width: u32, height: u32) {
        let target = self.call("Target.createTarget", json!({ "url": "about:blank" }));
        let attached = self.call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true }));
        self.session = Some(attached["sessionId"].as_str().expect("a session id").to_owned());
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        self.call("Page.navigate", json!({ "url": url }));
    }

    /// The value of a JavaScript expression on the page (`null` if it throws).
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }));
        if result.get("exceptionDetails").is_some() { Value::Null } else { result["result"]["value"].clone() }
    }

    /// Evaluates `expression` until `holds` accepts its value; fails after `timeout` with the
    /// last value.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        expression: &str,
        holds: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(expression);
            if holds(&value) {
                return value;
            }
            assert!(Instant::now() < deadline, "the page did not show {what} within {timeout:?}; last: {value}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the page as it is shown.
    pub fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot in base64")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
