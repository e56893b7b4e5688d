//! Helpers for integration tests: start real `teia` processes on 127.0.0.1, wait for their
//! log lines, and talk to them over TCP.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long any wait in a test may last before it fails: generous, for loaded machines.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The `teia` binary built for these tests.
/// LAN discovery is off (`TEIA_NO_LAN`): tests broadcast nothing, and nodes of different
/// tests never find each other.
pub fn teia() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_teia"));
    command.env("TEIA_NO_LAN", "1");
    command
}

/// Lines a child printed on stderr, shared with the thread that reads them.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A running `teia` process, killed when dropped.
pub struct Process {
    pub child: Child,
    stderr: Arc<Lines>,
}

impl Process {
    /// Spawns `command` with stdin piped and both stdout and stderr captured as lines
    /// (carriage returns removed), for [`Process::wait_for_log`].
    pub fn spawn_capturing(mut command: Command) -> (Self, std::process::ChildStdin) {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let lines = Arc::new(Lines::default());
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for pipe in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let sink = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).split(b'\n') {
                    let Ok(line) = line else { break };
                    let text = String::from_utf8_lossy(&line).replace('\r', "\n");
                    sink.lines.lock().unwrap().push(text);
                    sink.changed.notify_all();
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        (
            Self {
                child,
                stderr: lines,
            },
            stdin,
        )
    }

    /// Spawns `teia ARGS` with stderr captured.
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = teia()
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn teia");
        let stderr = Arc::new(Lines::default());
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.lines.lock().unwrap().push(line);
                sink.changed.notify_all();
            }
        });
        Self { child, stderr }
    }

    /// Waits until a stderr line contains `needle`, and returns it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_log_after(needle, 0).1
    }

    /// Waits for a stderr line containing `needle` among lines `from..`; returns its index.
    pub fn wait_for_log_after(&self, needle: &str, from: usize) -> (usize, String) {
        let deadline = Instant::now() + PATIENCE;
        let mut lines = self.stderr.lines.lock().unwrap();
        loop {
            if let Some((i, line)) = lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.contains(needle))
            {
                return (i, line.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needle:?}; log:\n{}",
                lines.join("\n")
            );
            lines = self.stderr.changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Every line captured so far.
    pub fn lines(&self) -> Vec<String> {
        self.stderr.lines.lock().unwrap().clone()
    }

    /// Number of stderr lines so far.
    pub fn log_len(&self) -> usize {
        self.stderr.lines.lock().unwrap().len()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        self.wait_exit()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "teia did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills with SIGKILL (`kill -9`) and reaps.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `teia rendezvous` on 127.0.0.1 with an ephemeral port.
pub struct Rendezvous {
    pub process: Process,
    pub addr: SocketAddr,
    /// Records it reported at start.
    pub records_at_start: usize,
}

impl Rendezvous {
    /// Starts a server on `data_dir` with extra flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let dir = data_dir.to_str().unwrap();
        let mut args = vec!["rendezvous", "--listen", "127.0.0.1:0", "--data-dir", dir];
        args.extend_from_slice(extra);
        let process = Process::spawn(&args);
        let line = process.wait_for_log("rendezvous listening");
        let addr = field(&line, "addr").parse().unwrap();
        let records_at_start = field(&line, "records").parse().unwrap();
        Self {
            process,
            addr,
            records_at_start,
        }
    }
}

/// A `teia rendezvous` with its data in a directory of its own, removed with it.
pub fn rendezvous() -> (tempfile::TempDir, Rendezvous) {
    let dir = tempfile::tempdir().unwrap();
    let server = Rendezvous::start(dir.path(), &[]);
    (dir, server)
}

/// The value of `key=value` in a log line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        + key.len()
        + 2;
    line[start..].split_whitespace().next().unwrap()
}

/// Connects from `source` (any 127.x.y.z) to `addr`.
pub async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends raw bytes on a new connection from `source` and returns everything the server
/// answered before closing.
pub async fn exchange_from(source: &str, addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = connect_from(source, addr).await;
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("server answers and closes")
        .unwrap();
    answer
}

/// Sends one request line from 127.0.0.1 and parses the one answer line.
pub async fn request(addr: SocketAddr, request: Value) -> Value {
    request_from("127.0.0.1", addr, request).await
}

/// Sends one request line from `source` and parses the one answer line.
pub async fn request_from(source: &str, addr: SocketAddr, request: Value) -> Value {
    let mut line = request.to_string().into_bytes();
    line.push(b'\n');
    parse_answer(&exchange_from(source, addr, &line).await)
}

/// Parses one answer: a single JSON object ending in `\n`.
pub fn parse_answer(answer: &[u8]) -> Value {
    assert_eq!(
        answer.last(),
        Some(&b'\n'),
        "answer ends with a newline: {answer:?}"
    );
    assert_eq!(
        answer.iter().filter(|b| **b == b'\n').count(),
        1,
        "one line"
    );
    serde_json::from_slice(answer).unwrap()
}

/// Checks an error answer: status ERROR, `error` and `message` both equal to `code`.
pub fn assert_error(answer: &Value, code: &str) {
    assert_eq!(answer["status"], "ERROR", "{answer}");
    assert_eq!(answer["error"], code, "{answer}");
    assert_eq!(answer["message"], code, "{answer}");
}

/// Polls `check` until it returns true, failing after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `teia node --json` process: commands on its stdin, events parsed from its stdout.
pub struct NodeProcess {
    _data: tempfile::TempDir,
    pub process: Process,
    stdin: std::process::ChildStdin,
    events: Arc<Events>,
    /// Peer id.
    pub peer_id: String,
    /// Port it accepts links on (0 with --no-listen).
    pub port: u16,
    stdout_reader: std::thread::JoinHandle<()>,
}

#[derive(Default)]
struct Events {
    list: Mutex<Vec<Value>>,
    changed: Condvar,
    /// The node's stdout has ended (it exited): no event will come any more.
    ended: std::sync::atomic::AtomicBool,
}

/// Marks the events ended when the stdout reader stops, however it stops.
struct EndOnDrop(Arc<Events>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        let _list = self.0.list.lock();
        self.0
            .ended
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.changed.notify_all();
    }
}

impl NodeProcess {
    /// Starts `teia node --json --name NAME --namespace NS` on 127.0.0.1 with extra flags,
    /// and waits for its `ready` event.
    pub fn start(name: &str, namespace: &str, extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), name, namespace, extra)
    }

    /// A node registered at `rendezvous` that dials `peer`.
    pub fn joining(name: &str, namespace: &str, rendezvous: &str, peer: &str) -> Self {
        Self::start(
            name,
            namespace,
            &["--rendezvous", rendezvous, "--peer", peer],
        )
    }

    /// Like [`NodeProcess::start`], with the node's data in `data`.
    pub fn start_in(data: tempfile::TempDir, name: &str, namespace: &str, extra: &[&str]) -> Self {
        Self::start_with(teia(), data, name, namespace, extra)
    }

    /// Like [`NodeProcess::start_in`], running `command` (the `teia` binary, or a wrapper
    /// that runs it) with the node's arguments.
    pub fn start_with(
        mut command: Command,
        data: tempfile::TempDir,
        name: &str,
        namespace: &str,
        extra: &[&str],
    ) -> Self {
        let mut child = command
            .args(["node", "--json", "--name", name, "--namespace", namespace])
            .args(["--listen-ip", "127.0.0.1"])
            .args(if extra.contains(&"--discover-interval") {
                &[][..]
            } else {
                &["--discover-interval", "0.3"][..]
            })
            .arg("--data-dir")
            .arg(data.path())
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn teia node");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let events = Arc::new(Events::default());
        let sink = Arc::clone(&events);
        let stdout_reader = std::thread::spawn(move || {
            let _end = EndOnDrop(Arc::clone(&sink));
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
                sink.list.lock().unwrap().push(value);
                sink.changed.notify_all();
            }
        });
        let stderr = Arc::new(Lines::default());
        let pipe = child.stderr.take().unwrap();
        let log = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                log.lines.lock().unwrap().push(line);
                log.changed.notify_all();
            }
        });
        let mut node = Self {
            _data: data,
            process: Process { child, stderr },
            stdin,
            events,
            peer_id: format!("{name}@{namespace}"),
            port: 0,
            stdout_reader,
        };
        let ready = node.wait_event("ready", |e| e["event"] == "ready");
        node.port = ready["listen"]
            .as_str()
            .and_then(|a| a.rsplit(':').next())
            .map_or(0, |p| p.parse().unwrap());
        node
    }

    /// Kills the node with SIGKILL and hands back its data directory.
    pub fn kill9(self) -> tempfile::TempDir {
        self.kill9_with_events().0
    }

    /// Kills the node with SIGKILL; hands back its data directory and every event it
    /// printed before it died.
    pub fn kill9_with_events(self) -> (tempfile::TempDir, Vec<Value>) {
        let Self {
            _data,
            process,
            events,
            stdout_reader,
            ..
        } = self;
        process.kill9();
        let _ = stdout_reader.join();
        let list = events.list.lock().unwrap().clone();
        (_data, list)
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.list.lock().unwrap().clone()
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &Path {
        self._data.path()
    }

    /// `127.0.0.1:PORT` of this node.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Types a command.
    pub fn command(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for an event matching `predicate`, and returns it.
    pub fn wait_event(&self, what: &str, predicate: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        let mut list = self.events.list.lock().unwrap();
        loop {
            if let Some(found) = list.iter().find(|e| predicate(e)) {
                return found.clone();
            }
            let ended = self.events.ended.load(std::sync::atomic::Ordering::SeqCst);
            let left = if ended {
                // The node exited: what its stderr says is read before it is shown.
                std::thread::sleep(Duration::from_millis(200));
                Duration::ZERO
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            assert!(
                !left.is_zero(),
                "{}: no event {what}{}; events:\n{}\nlog:\n{}",
                self.peer_id,
                if ended { " (the node exited)" } else { "" },
                list.iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.process.stderr.lines.lock().unwrap().join("\n")
            );
            list = self.events.changed.wait_timeout(list, left).unwrap().0;
        }
    }

    /// Waits until `count` events match `predicate`.
    pub fn wait_count(&self, what: &str, count: usize, predicate: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        let mut list = self.events.list.lock().unwrap();
        while list.iter().filter(|e| predicate(e)).count() < count {
            let ended = self.events.ended.load(std::sync::atomic::Ordering::SeqCst);
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero() && !ended,
                "{}: fewer than {count} events {what}{}",
                self.peer_id,
                if ended { " (the node exited)" } else { "" }
            );
            list = self.events.changed.wait_timeout(list, left).unwrap().0;
        }
    }

    /// Events matching `predicate` so far.
    pub fn count(&self, predicate: impl Fn(&Value) -> bool) -> usize {
        self.events
            .list
            .lock()
            .unwrap()
            .iter()
            .filter(|e| predicate(e))
            .count()
    }

    /// Waits until a link to `peer` is up.
    pub fn wait_link(&self, peer: &str) {
        self.wait_event(&format!("link_up {peer}"), |e| {
            e["event"] == "link_up" && e["peer"] == peer
        });
    }

    /// Sends `/msg DST TEXT` and returns the message id from the `sent` event.
    pub fn msg(&mut self, dst: &str, text: &str) -> String {
        // Earlier commands' `sent` events may still be on their way: count only those to
        // `dst` (as the shell names it, without a leading `@`), answered in order.
        let named = dst.strip_prefix('@').unwrap_or(dst);
        let to_dst = |e: &Value| e["event"] == "sent" && e["dst"] == named;
        let before = self.count(to_dst);
        self.command(&format!("/msg {dst} {text}"));
        let deadline = Instant::now() + PATIENCE;
        loop {
            let sent: Vec<Value> = self
                .events
                .list
                .lock()
                .unwrap()
                .iter()
                .filter(|e| to_dst(e))
                .cloned()
                .collect();
            if sent.len() > before {
                return sent[before]["msg_id"].as_str().unwrap().to_owned();
            }
            if let Some(usage) = self
                .events
                .list
                .lock()
                .unwrap()
                .iter()
                .find(|e| e["event"] == "command_error" || e["event"] == "usage")
            {
                panic!("/msg refused: {usage}");
            }
            assert!(Instant::now() < deadline, "no sent event");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the message `msg_id` to be delivered here and returns it.
    pub fn wait_message(&self, msg_id: &str) -> Value {
        self.wait_event(&format!("message {msg_id}"), |e| {
            e["event"] == "message" && e["msg_id"] == msg_id
        })
    }

    /// Waits for the ACK of `msg_id`.
    pub fn wait_ack(&self, msg_id: &str) -> Value {
        self.wait_event(&format!("ack {msg_id}"), |e| {
            e["event"] == "ack" && e["msg_id"] == msg_id
        })
    }
}

/// A raw client in the style of the course's: plain TCP, `ttl:1`, no teia feature.
pub struct CourseClient {
    pub stream: std::net::TcpStream,
    reader: BufReader<std::net::TcpStream>,
}

impl CourseClient {
    pub fn connect(addr: &str, peer_id: &str) -> Self {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut client = Self { stream, reader };
        client.send(&json!({"type":"HELLO","peer_id":peer_id,"version":"1.0","features":["ack","metrics"],"ttl":1}));
        let ok = client.read_until(|m| m["type"] == "HELLO_OK");
        assert!(
            !ok["features"].as_array().unwrap().contains(&json!("teia")),
            "no teia extensions toward a course peer"
        );
        client
    }

    pub fn send(&mut self, message: &Value) {
        self.send_raw(format!("{message}\n").as_bytes());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn read_until(&mut self, predicate: impl Fn(&Value) -> bool) -> Value {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "the node closed the link");
            let message: Value = serde_json::from_str(&line).unwrap();
            if predicate(&message) {
                return message;
            }
        }
    }
}

/// One raw HTTP/1.1 request to `addr` (`head`: method and path) with `headers` (lines,
/// each ending in CRLF) and `body`, with `Connection: close`: the status and the whole
/// answer, head included.
pub fn raw_request(addr: &str, head: &str, headers: &str, body: &[u8]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let request = format!(
        "{head} HTTP/1.1\r\n{headers}Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    (text[9..12].parse().unwrap(), text)
}

/// One HTTP request with `Connection: close`; the status and the body as JSON.
pub fn http(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let headers = format!("Host: {addr}\r\nContent-Type: {content_type}\r\n");
    let (status, text) = raw_request(addr, &format!("{method} {path}"), &headers, body);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The node's `/metrics` text at the HTTP API `addr`, asked with its token (from its data
/// folder `data_dir`).
pub fn metrics(addr: &str, data_dir: &Path) -> String {
    let token = std::fs::read_to_string(data_dir.join("http-token")).unwrap();
    let headers = format!("Host: {addr}\r\nAuthorization: Bearer {}\r\n", token.trim());
    let (status, answer) = raw_request(addr, "GET /metrics", &headers, b"");
    assert_eq!(status, 200, "{answer}");
    answer
}

/// A JSON body POSTed to `path`.
pub fn post_json(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    http(
        addr,
        "POST",
        path,
        "application/json",
        body.to_string().as_bytes(),
    )
}

/// Waits for evaluation `id` at the HTTP API `addr` to end (done or failed); its detail.
pub fn wait_evaluation(addr: &str, id: u64) -> Value {
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        let (status, detail) = get(addr, &format!("/evaluation/{id}"));
        assert_eq!(status, 200, "{detail}");
        if detail["status"] == "done" || detail["status"] == "failed" {
            return detail;
        }
        assert!(Instant::now() < deadline, "not done: {detail}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node with the HTTP API on a free port and `extra` flags, linked to no one unless
/// `extra` says so; the node and its HTTP address.
pub fn http_node(name: &str, namespace: &str, extra: &[&str]) -> (NodeProcess, String) {
    let mut args = vec!["--http", "127.0.0.1:0"];
    if !extra.contains(&"--peer") {
        args.extend_from_slice(&["--peer", "127.0.0.1:1"]);
    }
    args.extend_from_slice(extra);
    let node = NodeProcess::start(name, namespace, &args);
    let listening = node.wait_event("http_listening", |e| e["event"] == "http_listening");
    let addr = listening["addr"].as_str().unwrap().to_owned();
    (node, addr)
}

pub fn get(addr: &str, path: &str) -> (u16, Value) {
    http(addr, "GET", path, "text/plain", b"")
}

/// A multipart form with one `file` field holding `bytes`, POSTed to `path`.
pub fn post_file(addr: &str, path: &str, bytes: &[u8]) -> (u16, Value) {
    let boundary = "teiaboundary7MA4YWxkTrZu0gW";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"all.zip\"\r\nContent-Type: application/zip\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    http(
        addr,
        "POST",
        path,
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
    )
}

/// A UDP port free now on 127.0.0.1, for one test's discovery alone.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP port free now on 127.0.0.1, for a program a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a ZIP at `path` holding each (name, content) as given, names unchecked,
/// written by Python's zipfile.
pub fn zip_files(path: &Path, files: &[(&str, &str)]) {
    let script = "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1], 'w')\nfor i in range(2, len(sys.argv), 2):\n    z.writestr(sys.argv[i], sys.argv[i + 1])\nz.close()";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .args(files.iter().flat_map(|(name, content)| [name, content]))
        .status()
        .unwrap();
    assert!(status.success());
}
