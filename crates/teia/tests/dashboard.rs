//! The node's web face on real processes: every route of the services' API (`/api/...`),
//! the live `/events` stream, `/metrics`, the token's cookie and the CSRF rule; then the
//! dashboard itself in headless Chromium (Debian's `chromium`, driven by Playwright from
//! `tests/browser`), against three linked nodes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One HTTP request with `headers` (name, value); the status, the head (lowercase) and the
/// body.
fn raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_lowercase(), body.to_owned())
}

/// A node's API as a program with its token calls it.
struct Api {
    addr: String,
    bearer: String,
}

impl Api {
    fn of(node: &NodeProcess, addr: &str) -> Self {
        Self {
            addr: addr.to_owned(),
            bearer: format!("Bearer {}", teia_token(node.data_dir())),
        }
    }

    /// One request, with a JSON body if given; the status and the answer as JSON.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(Value::to_string).unwrap_or_default();
        let headers = [
            ("Authorization", self.bearer.as_str()),
            ("Content-Type", "application/json"),
        ];
        let (status, _, text) = raw(&self.addr, method, path, &headers, &body);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, Some(body))
    }

    fn delete(&self, path: &str) -> (u16, Value) {
        self.call("DELETE", path, None)
    }
}

/// A folder with a 3 MB file and a file whose name is HTML.
fn shared_folder(dir: &Path) -> PathBuf {
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(share.join("big.bin"), big).unwrap();
    std::fs::write(share.join("<img src=x onerror=alert(1)>.txt"), "odd\n").unwrap();
    share
}

/// The `/events` stream of `api`, read on a thread: each event's JSON as it comes. Returns
/// once the stream's head came (the node sends it subscribed).
fn events(api: &Api) -> Stream {
    let addr = &api.addr;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}\r\nAccept: text/event-stream\r\n\r\n",
        api.bearer
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    while head != "\r\n" {
        head.clear();
        assert!(reader.read_line(&mut head).unwrap() > 0, "/events closed");
    }
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if let Some(data) = line.strip_prefix("data: ") {
                if let Ok(event) = serde_json::from_str(data) {
                    if sender.send(event).is_err() {
                        return;
                    }
                }
            }
        }
    });
    Stream {
        receiver,
        seen: Vec::new(),
    }
}

/// An `/events` stream and every event it brought so far.
struct Stream {
    receiver: std::sync::mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Stream {
    /// The first event so far, or within [`PATIENCE`], that `matches` (events come in the
    /// node's order, which need not be the test's: an ACK may come before its `sent`).
    fn find(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(event) = self.seen.iter().find(|e| matches(e)) {
            return event.clone();
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(left) {
                Ok(event) => {
                    self.seen.push(event.clone());
                    if matches(&event) {
                        return event;
                    }
                }
                Err(_) => panic!("no {what} on /events; seen: {:?}", self.seen),
            }
        }
    }
}

/// Every route of the services' API, as a program with the node's token calls them (even
/// on the node's machine: only the course's routes go without it), and the token's rules
/// for a browser.
#[test]
fn every_route_of_the_services_api_answers() {
    let dir = tempfile::tempdir().unwrap();
    let share = shared_folder(dir.path());
    let downloads = dir.path().join("downloads");
    let (ana, ana_http) = http_node(
        "ana",
        "api",
        &["--download-dir", downloads.to_str().unwrap()],
    );
    let ana_addr = ana.addr();
    let (bob, bob_http) = http_node(
        "bob",
        "api",
        &[
            "--peer",
            &ana_addr,
            "--share",
            share.to_str().unwrap(),
            "--approve",
            "ask",
        ],
    );
    ana.wait_link(&bob.peer_id);
    let (ana_api, bob_api) = (Api::of(&ana, &ana_http), Api::of(&bob, &bob_http));
    // A program of this machine without the token: the course's routes, not the others.
    assert_eq!(get(&ana_http, "/stats").0, 200);
    for path in ["/api/peers", "/api/chat", "/events", "/metrics", "/"] {
        let (status, answer) = get(&ana_http, path);
        assert_eq!(status, 401, "{path}: {answer}");
    }
    let mut live = events(&ana_api);

    let (status, node) = ana_api.get("/api/node");
    assert_eq!(
        (status, node["peer_id"].as_str()),
        (200, Some("ana@api")),
        "{node}"
    );
    let (status, peers) = ana_api.get("/api/peers");
    assert_eq!(status, 200, "{peers}");
    let link = peers["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["peer"] == "bob@api")
        .unwrap_or_else(|| panic!("no link to bob: {peers}"));
    assert_eq!(
        (link["encrypted"].as_bool(), link["teia"].as_bool()),
        (Some(true), Some(true))
    );

    // Chat: sent, delivered, kept; bad input is a 4xx.
    let (status, sent) = ana_api.post("/api/chat", &json!({"to":"bob@api","text":"oi"}));
    assert_eq!(status, 201, "{sent}");
    let msg_id = sent["msg_id"].as_str().unwrap().to_owned();
    live.find("the sent event", |e| {
        e["event"] == "sent" && e["msg_id"] == msg_id
    });
    live.find("the ack", |e| e["event"] == "ack" && e["msg_id"] == msg_id);
    bob.wait_message(&msg_id);
    let (_, history) = ana_api.get("/api/chat");
    let entry = history
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["msg_id"] == msg_id.as_str())
        .unwrap_or_else(|| panic!("{history}"));
    assert_eq!(entry["state"], "delivered", "{entry}");
    let (_, bob_history) = bob_api.get("/api/chat");
    assert!(
        bob_history
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["msg_id"] == msg_id.as_str() && e["direction"] == "in"),
        "{bob_history}"
    );
    for (body, expected) in [
        (json!({"to":"bob@api","text":"  "}), 400),
        (json!({"to":"no such","text":"x"}), 400),
        (json!({"to":"bob@api","text":"x".repeat(20_000)}), 413),
        (json!({"text":"x"}), 422),
    ] {
        let (status, answer) = ana_api.post("/api/chat", &body);
        assert_eq!(status, expected, "{answer}");
    }

    // Shares: listed, added, removed.
    let (status, shares) = bob_api.get("/api/shares");
    assert_eq!(
        (status, shares["file_count"].as_u64()),
        (200, Some(2)),
        "{shares}"
    );
    let extra = dir.path().join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("notes.txt"), "notes\n").unwrap();
    let (status, added) = ana_api.post("/api/shares", &json!({"path": extra.to_str().unwrap()}));
    assert_eq!((status, added["files"].as_u64()), (201, Some(1)), "{added}");
    let path = extra.canonicalize().unwrap();
    let (status, _) = ana_api.delete(&format!("/api/shares?path={}", path.to_str().unwrap()));
    assert_eq!(status, 204);
    let (status, _) = ana_api.delete("/api/shares?path=/no/such/folder");
    assert_eq!(status, 404);
    let (status, answer) = ana_api.post("/api/shares", &json!({"path":"/no/such"}));
    assert_eq!(status, 400, "{answer}");

    // Search, then get under `--approve ask`: bob approves from his API.
    let (status, answer) = ana_api.post("/api/search", &json!({"text":"big"}));
    assert_eq!(status, 200, "{answer}");
    let hit = live.find("search results", |e| e["event"] == "search_results");
    let hash = hit["results"][0]["hash"].as_str().unwrap().to_owned();
    let (status, answer) = ana_api.post("/api/search", &json!({"text":""}));
    assert_eq!(status, 400, "{answer}");
    let (status, started) = ana_api.post("/api/downloads", &json!({"target": hash}));
    assert_eq!(status, 202, "{started}");
    let deadline = Instant::now() + PATIENCE;
    let request = loop {
        let (status, pending) = bob_api.get("/api/approvals");
        assert_eq!(status, 200, "{pending}");
        if let Some(first) = pending.as_array().unwrap().first() {
            break first.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no approval request at bob; ana's downloads {:?}\nana's log:\n{}\nbob's log:\n{}",
            ana_api.get("/api/downloads").1,
            ana.process.lines().join("\n"),
            bob.process.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (request["peer"].as_str(), request["hash"].as_str()),
        (Some("ana@api"), Some(hash.as_str()))
    );
    let (status, downloads) = ana_api.get("/api/downloads");
    assert_eq!(status, 200, "{downloads}");
    assert!(
        downloads
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["hash"] == hash.as_str()),
        "{downloads}"
    );
    let id = request["id"].as_u64().unwrap();
    let (status, answered) = bob_api.post(&format!("/api/approvals/{id}"), &json!({"allow": true}));
    assert_eq!(status, 200, "{answered}");
    live.find("the download's end", |e| {
        e["event"] == "download_done" && e["hash"] == hash.as_str()
    });
    let (status, _) = bob_api.post(&format!("/api/approvals/{id}"), &json!({"allow": true}));
    assert_eq!(status, 404, "answered twice");
    let (status, _) = ana_api.post("/api/downloads", &json!({"target":"nothing found"}));
    assert_eq!(status, 400);
    let (status, _) = ana_api.delete("/api/downloads/zz");
    assert_eq!(status, 400);
    let (status, _) = ana_api.delete(&format!("/api/downloads/{}", "ab".repeat(32)));
    assert_eq!(status, 404);

    // Metrics, in Prometheus' text format.
    let (status, head, text) = raw(
        &ana_http,
        "GET",
        "/metrics",
        &[("Authorization", &ana_api.bearer)],
        "",
    );
    assert_eq!(status, 200, "{text}");
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    for series in [
        "teia_links{kind=\"teia\",encrypted=\"true\"} 1",
        "teia_events_total{event=\"download_done\"} 1",
        "teia_downloads_max 16",
        "teia_lines_sent_total ",
        "teia_service_bytes_total{service=\"files\",direction=\"in\"} 3000000",
        "teia_sandbox_failures_total 0",
        "teia_link_queue_bytes_max 1048576",
        "teia_link_queue_bytes{peer=\"bob@api\"} ",
        "teia_chat_history_dropped_total 0",
    ] {
        assert!(text.contains(series), "no {series} in:\n{text}");
    }

    // A browser: refused without the token; the link sets the cookie; the cookie reads;
    // a change needs the page's CSRF header too.
    let browser = [("Sec-Fetch-Site", "none"), ("Sec-Fetch-Mode", "navigate")];
    let (status, _, _) = raw(&ana_http, "GET", "/", &browser, "");
    assert_eq!(status, 403);
    let token = teia_token(ana.data_dir());
    let (status, head, _) = raw(&ana_http, "GET", &format!("/?token={token}"), &browser, "");
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("\r\nlocation: /\r\n"), "{head}");
    let port = ana_http.rsplit(':').next().unwrap();
    let set = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    let cookie = set.split(';').next().unwrap().to_owned();
    let (name, session) = cookie.split_once('=').unwrap();
    assert_eq!(name, format!("teia_session_{port}"));
    assert!(
        session.len() == 64 && session != token,
        "the cookie is not the token"
    );
    assert!(
        set.ends_with("; httponly; samesite=strict; path=/"),
        "{set}"
    );
    // The link answers a program (no browser) with no cookie; the wrong token, none either.
    let (status, _, _) = raw(&ana_http, "GET", &format!("/stats?token={token}"), &[], "");
    assert_eq!(status, 200);
    let (status, _, _) = raw(&ana_http, "GET", "/?token=00", &browser, "");
    assert_eq!(status, 403);
    let with_cookie = [
        ("Sec-Fetch-Site", "same-origin"),
        ("Cookie", cookie.as_str()),
    ];
    let (status, head, page) = raw(&ana_http, "GET", "/", &with_cookie, "");
    assert_eq!(status, 200);
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );
    let csrf = page
        .split("name=\"teia-csrf\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    assert_eq!(csrf.len(), 64);
    for asset in ["/app.js", "/app.css"] {
        let (status, _, _) = raw(&ana_http, "GET", asset, &with_cookie, "");
        assert_eq!(status, 200, "{asset}");
    }
    let say = r#"{"to":"*","text":"from a page"}"#;
    let json_type = ("Content-Type", "application/json");
    let (status, _, _) = raw(
        &ana_http,
        "POST",
        "/api/chat",
        &[with_cookie[0], with_cookie[1], json_type],
        say,
    );
    assert_eq!(status, 403, "a change without the CSRF header");
    let (status, _, body) = raw(
        &ana_http,
        "POST",
        "/api/chat",
        &[
            with_cookie[0],
            with_cookie[1],
            json_type,
            ("X-Teia-Csrf", &csrf),
        ],
        say,
    );
    assert_eq!(status, 201, "{body}");
    let wrong = format!("teia_session_{port}={token}");
    let (status, _, _) = raw(
        &ana_http,
        "GET",
        "/api/peers",
        &[with_cookie[0], ("Cookie", &wrong)],
        "",
    );
    assert_eq!(status, 403);
    let bearer = format!("Bearer {token}");
    let (status, _, _) = raw(
        &ana_http,
        "GET",
        "/api/peers",
        &[browser[0], ("Authorization", &bearer)],
        "",
    );
    assert_eq!(status, 200);
}

/// The dashboard's chat survives the node's `kill -9`: a message delivered before it is
/// there after the restart, with its state, and new ones follow it.
#[test]
fn the_chat_history_survives_a_kill_9() {
    let (ana, ana_http) = http_node("ana", "hist", &[]);
    let (bob, _bob_http) = http_node("bob", "hist", &["--peer", &ana.addr()]);
    ana.wait_link(&bob.peer_id);
    let api = Api::of(&ana, &ana_http);
    let (status, sent) = api.post("/api/chat", &json!({"to":"bob@hist","text":"kept?"}));
    assert_eq!(status, 201, "{sent}");
    let msg_id = sent["msg_id"].as_str().unwrap().to_owned();
    ana.wait_ack(&msg_id);
    // The history's thread commits on its own time: wait until the file says delivered.
    let file = ana.data_dir().join("nodes").join("ana@hist.chat.sqlite3");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let state: Option<String> = rusqlite::Connection::open(&file).ok().and_then(|db| {
            db.query_row(
                "SELECT state FROM chat WHERE msg_id = ?1",
                [&msg_id],
                |row| row.get(0),
            )
            .ok()
        });
        if state.as_deref() == Some("delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "not kept: {state:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let data = ana.kill9();
    let again = NodeProcess::start_in(
        data,
        "ana",
        "hist",
        &["--http", "127.0.0.1:0", "--peer", &bob.addr()],
    );
    let listening = again.wait_event("http_listening", |e| e["event"] == "http_listening");
    let again_http = listening["addr"].as_str().unwrap().to_owned();
    let api = Api::of(&again, &again_http);
    let (status, history) = api.get("/api/chat");
    assert_eq!(status, 200, "{history}");
    let entry = history
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["msg_id"] == msg_id.as_str())
        .unwrap_or_else(|| panic!("lost in the restart: {history}"));
    assert_eq!(
        (entry["state"].as_str(), entry["text"].as_str()),
        (Some("delivered"), Some("kept?")),
        "{entry}"
    );
    again.wait_link(&bob.peer_id);
    let (status, later) = api.post("/api/chat", &json!({"to":"*","text":"after"}));
    assert_eq!(status, 201, "{later}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, history) = api.get("/api/chat");
        let said: Vec<&str> = history
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["text"].as_str())
            .collect();
        if said.len() > 1 {
            assert_eq!(said, ["kept?", "after"], "{history}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new message never came: {history}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The node's token, as `teia token` prints it.
fn teia_token(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("http-token"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The dashboard in a real browser, against three linked nodes: the network graph, a chat
/// message from one page to the other page and to a terminal node, a file searched and
/// fetched with its progress bar, an evaluation dropped on the page and graded, a job's
/// stdout, a peer and a file named with HTML shown as text, the token's refusal, a phone's
/// width and the keyboard. Screenshots are kept in the target folder
/// (`dashboard-screenshots`).
#[test]
fn the_dashboard_shows_and_drives_the_nodes_in_a_real_browser() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir() && Path::new(&chromium).exists(),
        "the browser test needs Debian's chromium and Playwright: apt-get install chromium; \
         npm ci --prefix crates/teia/tests/browser (.ci/run does both)"
    );
    let dir = tempfile::tempdir().unwrap();
    let share = shared_folder(dir.path());
    let tasks = dir.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    let discovery = free_udp_port().to_string();
    let downloads = dir.path().join("downloads");
    let (ana, _) = http_node(
        "ana",
        "dash",
        &[
            "--download-dir",
            downloads.to_str().unwrap(),
            "--tasks-dir",
            tasks.to_str().unwrap(),
            "--master-port",
            "127.0.0.1:0",
            "--discovery-port",
            &discovery,
            "--task-workers",
            "1",
        ],
    );
    let (bob, _) = http_node(
        "bob",
        "dash",
        &["--peer", &ana.addr(), "--share", share.to_str().unwrap()],
    );
    // A terminal node whose name is HTML.
    let carl = NodeProcess::start("<script>carl", "dash", &["--peer", &ana.addr()]);
    ana.wait_link(&bob.peer_id);
    ana.wait_link(&carl.peer_id);
    let link = |node: &NodeProcess| {
        node.wait_event("http_listening", |e| e["event"] == "http_listening")["dashboard"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let eval_zip = dir.path().join("projects.zip");
    zip_files(
        &eval_zip,
        &[
            (
                "good/tests/test_good.py",
                "def test_a():\n    assert True\n\ndef test_b():\n    assert 1 + 1 == 2\n",
            ),
            (
                "half/tests/test_half.py",
                "def test_ok():\n    assert True\n\ndef test_wrong():\n    assert 1 == 2\n",
            ),
        ],
    );
    let job_zip = dir.path().join("sum.zip");
    zip_files(
        &job_zip,
        &[
            ("main.py", "import csv, sys\nrows = list(csv.DictReader(open(sys.argv[1])))\nprint('sum', sum(int(r['value']) for r in rows))\n"),
            ("input.csv", "name,value\na,20\nb,22\n"),
        ],
    );
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut script = Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .current_dir(&browser_dir)
        .env("ANA_LINK", link(&ana))
        .env("BOB_LINK", link(&bob))
        .env("BOB_ID", &bob.peer_id)
        .env("ODD_ID", &carl.peer_id)
        .env("EVAL_ZIP", &eval_zip)
        .env("JOB_ZIP", &job_zip)
        .env("SHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node (Node.js)");
    let mut stdout = String::new();
    let mut stderr = String::new();
    let (mut out, mut err) = (script.stdout.take().unwrap(), script.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let _ = out.read_to_string(&mut stdout);
    let status = script.wait().unwrap();
    stderr.push_str(&reader.join().unwrap());
    println!("{stdout}");
    assert!(
        status.success(),
        "the browser script failed:\n{stdout}\n{stderr}"
    );
    for check in [
        "refused_without_the_token",
        "logged_in_live",
        "network_graph_three_nodes",
        "odd_peer_name_is_text",
        "chat_between_pages",
        "chat_delivery_state",
        "change_without_csrf_refused",
        "file_fetched_with_progress",
        "odd_file_name_is_text",
        "evaluation_dropped_and_graded",
        "job_stdout_shown",
        "narrow_and_keyboard",
    ] {
        assert!(
            stdout.lines().any(|l| l == format!("ok {check}")),
            "no {check}:\n{stdout}"
        );
    }
    // The message typed in ana's page reached the terminal node too.
    let said: String = stdout
        .lines()
        .find_map(|l| l.strip_prefix("said "))
        .map(|s| serde_json::from_str(s).unwrap())
        .unwrap();
    carl.wait_event("the page's message", |e| {
        e["event"] == "message" && e["payload"] == said.as_str()
    });
    for view in ["network", "chat", "files", "evaluations", "jobs"] {
        assert!(
            shots.join(format!("{view}.png")).is_file(),
            "no screenshot of {view}"
        );
    }
}
