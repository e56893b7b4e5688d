//! `teia eval`: a client of a node's HTTP API (seed 000): submit a ZIP, a folder or git
//! URLs and follow the evaluation to its grades; show one evaluation, or list them.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::{EvalArgs, EvalCommand};

/// A field of a JSON object (null when absent).
pub(super) fn at<'a>(value: &'a Value, key: &str) -> &'a Value {
    value.get(key).unwrap_or(&Value::Null)
}

/// Bytes of an answer read at most.
const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// How long a client waits for a node that is starting (its HTTP API refuses connections
/// until it is up); past it, the command ends with what to do.
const NODE_START_WAIT: Duration = Duration::from_secs(10);
/// How long a client that announced its body (`Expect: 100-continue`) waits for the node's
/// go-ahead before sending it anyway.
const CONTINUE_WAIT: Duration = Duration::from_secs(3);

/// A connection to the node's HTTP API at `host`. A node that is starting refuses
/// connections for a moment: they are tried again for up to [`NODE_START_WAIT`], with a
/// spinner on a terminal.
async fn connect(host: &str) -> anyhow::Result<tokio::net::TcpStream> {
    let deadline = tokio::time::Instant::now() + NODE_START_WAIT;
    let mut spinner: Option<indicatif::ProgressBar> = None;
    loop {
        match tokio::net::TcpStream::connect(host).await {
            Ok(stream) => {
                if let Some(spinner) = spinner {
                    spinner.finish_and_clear();
                }
                return Ok(stream);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() < deadline =>
            {
                let spinner = spinner.get_or_insert_with(|| {
                    let spinner = indicatif::ProgressBar::new_spinner();
                    spinner.set_message(format!("waiting for a node's HTTP API at {host}"));
                    spinner.enable_steady_tick(Duration::from_millis(100));
                    spinner
                });
                spinner.tick();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                if let Some(spinner) = spinner {
                    spinner.finish_and_clear();
                }
                bail!(
                    "no node's HTTP API answers at {host}: start one with `teia node --name NAME \
                     --http {port}`, or point --node (or TEIA_NODE) at one",
                    port = host.rsplit(':').next().unwrap_or("5001")
                );
            }
            Err(e) => {
                if let Some(spinner) = spinner {
                    spinner.finish_and_clear();
                }
                return Err(e).with_context(|| {
                    format!("cannot reach the node's HTTP API at {host} (--node)")
                });
            }
        }
    }
}

/// Reads an answer's head (up to its blank line) into `buffer`; the head's length with its
/// blank line, or `None` when the connection ends first.
async fn read_head(
    stream: &mut tokio::net::TcpStream,
    buffer: &mut Vec<u8>,
) -> anyhow::Result<Option<usize>> {
    let mut piece = vec![0u8; 16 * 1024];
    loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(at + 4));
        }
        if buffer.len() > MAX_HEAD {
            bail!("the node's answer is not HTTP");
        }
        let n = stream.read(&mut piece).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(piece.get(..n).unwrap_or_default());
    }
}

/// The status code of an answer's head.
fn status_of(head: &[u8]) -> anyhow::Result<u16> {
    head.get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .context("the node's answer is not HTTP")
}

/// The node's `host:port` from `http://host:port`, `host:port` or a bare port.
fn authority(node: &str) -> String {
    let trimmed = node
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    if trimmed.parse::<u16>().is_ok() {
        format!("127.0.0.1:{trimmed}")
    } else {
        trimmed
    }
}

/// The `Authorization` header line for the node's HTTP API: the token in `TEIA_TOKEN`, else
/// the one in the default data directory (the node's, on this machine), else none (a
/// request from this machine to a loopback address needs none).
fn authorization() -> String {
    let token = std::env::var("TEIA_TOKEN").ok().or_else(|| {
        let dir = std::env::var_os("TEIA_DATA_DIR")
            .map(std::path::PathBuf::from)
            .or_else(|| dirs::data_dir().map(|d| d.join("teia")))?;
        std::fs::read_to_string(dir.join(teia_http::guard::TOKEN_FILE)).ok()
    });
    match token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()) {
        Some(token) => format!("Authorization: Bearer {token}\r\n"),
        None => String::new(),
    }
}

/// One HTTP/1.1 request; the body is given as bytes or streamed from a file.
pub(super) async fn request(
    node: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: Body<'_>,
) -> anyhow::Result<(u16, Value)> {
    let host = authority(node);
    let mut stream = connect(&host).await?;
    let length = match &body {
        Body::Bytes(bytes) => bytes.len() as u64,
        Body::Multipart { head, file, tail } => {
            head.len() as u64 + std::fs::metadata(file)?.len() + tail.len() as u64
        }
    };
    // A file is announced first: a node that refuses it (no --tasks-dir, no token, too
    // large) answers before a byte of it is sent, and that answer is what the user sees.
    let announce = matches!(body, Body::Multipart { .. });
    let header = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{}Content-Type: {content_type}\r\nContent-Length: {length}\r\n{}\r\n",
        authorization(),
        if announce { "Expect: 100-continue\r\n" } else { "" }
    );
    stream.write_all(header.as_bytes()).await?;
    let mut answer = Vec::new();
    if announce {
        match tokio::time::timeout(CONTINUE_WAIT, read_head(&mut stream, &mut answer)).await {
            Ok(Ok(Some(end))) if status_of(&answer)? == 100 => {
                answer.drain(..end);
            }
            Ok(Ok(Some(_))) => return finish(stream, answer).await,
            Ok(Ok(None)) => bail!("the node closed the connection before answering"),
            Ok(Err(e)) => return Err(e),
            Err(_) => {}
        }
    }
    let sent = async {
        match body {
            Body::Bytes(bytes) => stream.write_all(bytes).await?,
            Body::Multipart { head, file, tail } => {
                stream.write_all(head.as_bytes()).await?;
                let mut source = tokio::fs::File::open(file).await?;
                tokio::io::copy(&mut source, &mut stream).await?;
                stream.write_all(tail.as_bytes()).await?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = sent {
        // The node may have answered and closed while the body was on its way: its answer
        // says why, better than the broken connection.
        return match finish(stream, answer).await {
            Ok(answer) => Ok(answer),
            Err(_) => Err(e.context("the node closed the connection while the request was sent")),
        };
    }
    finish(stream, answer).await
}

/// Reads the rest of an answer (after what is already in `answer`): its status and JSON body.
async fn finish(
    mut stream: tokio::net::TcpStream,
    mut answer: Vec<u8>,
) -> anyhow::Result<(u16, Value)> {
    (&mut stream)
        .take(MAX_ANSWER as u64)
        .read_to_end(&mut answer)
        .await?;
    let status = status_of(&answer)?;
    let text = String::from_utf8_lossy(&answer);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// Bytes of an answer's head read at most.
const MAX_HEAD: usize = 64 * 1024;

/// A GET whose `200` answer's body is written to `to` as it comes (to a file beside, then
/// renamed: whole or absent); its size. Any other answer is an error with the node's
/// message.
pub(super) async fn download(node: &str, path: &str, to: &Path) -> anyhow::Result<u64> {
    let host = authority(node);
    let mut stream = connect(&host).await?;
    let header = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{}\r\n",
        authorization()
    );
    stream.write_all(header.as_bytes()).await?;
    let mut head = Vec::new();
    let Some(end) = read_head(&mut stream, &mut head).await? else {
        bail!("the node closed the connection before answering");
    };
    let body_start = head.split_off(end);
    let status = status_of(&head)?;
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if status != 200 {
        let mut body = body_start;
        (&mut stream)
            .take(MAX_ANSWER as u64)
            .read_to_end(&mut body)
            .await?;
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        return Err(api_error(status, &body));
    }
    let length: Option<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let partial = to.with_extension("part");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("cannot write {}", partial.display()))?;
    file.write_all(&body_start).await?;
    let size = body_start.len() as u64 + tokio::io::copy(&mut stream, &mut file).await?;
    file.sync_all().await?;
    if length.is_some_and(|expected| expected != size) {
        let _ = tokio::fs::remove_file(&partial).await;
        bail!("the node's answer ended early ({size} bytes of {length:?})");
    }
    tokio::fs::rename(&partial, to).await?;
    Ok(size)
}

pub(super) enum Body<'a> {
    Bytes(&'a [u8]),
    Multipart {
        head: String,
        file: &'a Path,
        tail: String,
    },
}

pub(super) fn api_error(status: u16, body: &Value) -> anyhow::Error {
    let error = at(body, "error").as_str().unwrap_or("(no detail)");
    anyhow::anyhow!("the node answered {status}: {error}")
}

/// A GET answered 200, as JSON; any other answer as an error.
pub(super) async fn get(node: &str, path: &str) -> anyhow::Result<Value> {
    let (status, body) = request(node, "GET", path, "text/plain", Body::Bytes(b"")).await?;
    if status != 200 {
        return Err(api_error(status, &body));
    }
    Ok(body)
}

/// Runs `teia eval ...`.
pub async fn run(args: EvalArgs) -> anyhow::Result<()> {
    match args.command {
        EvalCommand::Submit {
            targets,
            token,
            fail_under,
            no_cache,
            no_split,
            rerun_failures,
        } => {
            let mut query = Vec::new();
            if no_cache {
                query.push("cache=false".to_owned());
            }
            if no_split {
                query.push("split=false".to_owned());
            }
            if let Some(times) = rerun_failures {
                query.push(format!("rerun_failures={times}"));
            }
            let path = if query.is_empty() {
                "/evaluation".to_owned()
            } else {
                format!("/evaluation?{}", query.join("&"))
            };
            let body = submit(&args.node, &path, &targets, token, args.json).await?;
            judge(&body, fail_under)
        }
        EvalCommand::Status { id } => {
            let body = get(&args.node, &format!("/evaluation/{id}")).await?;
            if args.json {
                println!("{body}");
            } else {
                print_report(&body);
            }
            Ok(())
        }
        EvalCommand::List => {
            let body = get(&args.node, "/evaluation").await?;
            if args.json {
                println!("{body}");
            } else {
                println!("{:<20} {:<8} submitted", "id", "status");
                for evaluation in body.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<8} {}",
                        at(evaluation, "id").to_string(),
                        at(evaluation, "status").as_str().unwrap_or("?"),
                        at(evaluation, "submitted_at")
                    );
                }
            }
            Ok(())
        }
    }
}

/// The exit of `teia eval submit`: with `--fail-under GRADE`, a grade under it is an error;
/// without it, any test that failed or errored is.
fn judge(body: &Value, fail_under: Option<f64>) -> anyhow::Result<()> {
    let grade = at(body, "grade").as_f64().unwrap_or(0.0);
    if let Some(minimum) = fail_under {
        if grade < minimum {
            bail!("grade {grade} / 20 is under --fail-under {minimum}");
        }
        return Ok(());
    }
    let tests = at(body, "tests");
    let failed = at(tests, "failed").as_u64().unwrap_or(0);
    let errors = at(tests, "errors").as_u64().unwrap_or(0);
    if failed + errors > 0 {
        bail!(
            "{failed} test(s) failed and {errors} errored (grade {grade} / 20); \
             --fail-under GRADE accepts a grade instead"
        );
    }
    Ok(())
}

/// Submits and follows an evaluation; its final state.
async fn submit(
    node: &str,
    path_and_query: &str,
    targets: &[String],
    token: Option<String>,
    json_output: bool,
) -> anyhow::Result<Value> {
    let urls: Vec<&String> = targets
        .iter()
        .filter(|t| t.contains("://") || t.starts_with("git@"))
        .collect();
    let (status, body) = if !urls.is_empty() {
        if urls.len() != targets.len() {
            bail!("give either git URLs or one ZIP or folder, not both");
        }
        let body = json!({"auth_token": token, "projects": urls});
        request(
            node,
            "POST",
            path_and_query,
            "application/json",
            Body::Bytes(body.to_string().as_bytes()),
        )
        .await?
    } else {
        let [target] = targets else {
            bail!("give one ZIP or folder (or git URLs)");
        };
        let path = Path::new(target);
        let scratch;
        let archive = if path.is_dir() {
            scratch = std::env::temp_dir().join(format!("teia-eval-{}.zip", std::process::id()));
            teia_jobs::bundle::pack(path, &scratch)
                .with_context(|| format!("cannot pack {}", path.display()))?;
            scratch.as_path()
        } else if path.is_file() {
            path
        } else {
            bail!("{target} is not a ZIP, a folder or a git URL");
        };
        let boundary = "teia-eval-boundary-4b1d";
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"submission.zip\"\r\nContent-Type: application/zip\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let answer = request(
            node,
            "POST",
            path_and_query,
            &format!("multipart/form-data; boundary={boundary}"),
            Body::Multipart {
                head,
                file: archive,
                tail,
            },
        )
        .await;
        if path.is_dir() {
            let _ = std::fs::remove_file(archive);
        }
        answer?
    };
    if status != 201 {
        return Err(api_error(status, &body));
    }
    let id = at(&body, "id")
        .as_u64()
        .context("the node answered no id")?;
    if let Some(warning) = body.get("warning").and_then(Value::as_str) {
        eprintln!("WARNING: {warning}");
    }
    if json_output {
        println!("{}", json!({"event": "submitted", "id": id}));
    } else {
        println!("evaluation {id} submitted");
    }
    follow(node, id, json_output).await
}

/// An evaluation's work by the modules' expected times (`expected_seconds`: what each took
/// when it last ran; a module never seen counts as the mean of those seen, or 1 s).
struct Work {
    /// Expected milliseconds of the modules done.
    done_ms: u64,
    /// Expected milliseconds of all its modules.
    total_ms: u64,
    /// Expected seconds of work left (running modules count whole), when every module left
    /// has an expectation.
    left_seconds: Option<f64>,
}

impl Work {
    fn of(body: &Value) -> Self {
        let modules: Vec<&Value> = at(body, "projects")
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(_, p)| at(p, "modules").as_object().into_iter().flatten())
            .map(|(_, m)| m)
            .collect();
        let known: Vec<f64> = modules
            .iter()
            .filter_map(|m| at(m, "expected_seconds").as_f64())
            .collect();
        let fallback = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let (mut done_ms, mut total_ms, mut left, mut all_known) = (0u64, 0u64, 0.0, true);
        for module in modules {
            let expected = at(module, "expected_seconds").as_f64();
            let ms = (expected.unwrap_or(fallback).max(0.001) * 1000.0) as u64;
            total_ms += ms;
            if at(module, "status") == "done" {
                done_ms += ms;
            } else {
                all_known &= expected.is_some();
                left += expected.unwrap_or(0.0);
            }
        }
        Self {
            done_ms,
            total_ms,
            left_seconds: all_known.then_some((left * 100.0).round() / 100.0),
        }
    }
}

/// Polls the evaluation until it is done, with a progress bar (or JSON lines); its final
/// state.
async fn follow(node: &str, id: u64, json_output: bool) -> anyhow::Result<Value> {
    let bar = (!json_output).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {msg} ETA {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("#>."),
        );
        bar
    });
    loop {
        let body = get(node, &format!("/evaluation/{id}")).await?;
        let modules = &at(&body, "modules");
        let done = at(modules, "executed").as_u64().unwrap_or(0);
        let total = done
            + at(modules, "running").as_u64().unwrap_or(0)
            + at(modules, "pending").as_u64().unwrap_or(0);
        let tests = &at(&body, "tests");
        let work = Work::of(&body);
        if let Some(bar) = &bar {
            // The bar moves by expected work, so that its ETA weighs long modules as such.
            bar.set_length(work.total_ms.max(1));
            bar.set_position(work.done_ms);
            bar.set_message(format!(
                "{done}/{total} modules, tests passed {} failed {}",
                at(tests, "passed"),
                at(tests, "failed").as_u64().unwrap_or(0)
                    + at(tests, "errors").as_u64().unwrap_or(0)
            ));
        } else {
            println!(
                "{}",
                json!({"event": "progress", "id": id, "modules_done": done, "modules": total,
                       "passed": at(tests, "passed"), "failed": at(tests, "failed"), "errors": at(tests, "errors"),
                       "expected_seconds_left": work.left_seconds})
            );
        }
        match at(&body, "status").as_str() {
            Some("done") | Some("failed") => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                    print_report(&body);
                } else {
                    println!("{}", json!({"event": "done", "evaluation": body}));
                }
                if at(&body, "status") == "failed" {
                    bail!(
                        "evaluation {id} failed: {}",
                        at(&body, "error").as_str().unwrap_or("see its status")
                    );
                }
                return Ok(body);
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Characters of a failure's reason printed at most.
const REASON_CHARS: usize = 160;

/// Each failed test (or erring module) by project, with its reason in a line: pytest's
/// `E` lines, else the last line of its report.
fn print_failures(body: &Value) {
    let mut lines = Vec::new();
    for (name, project) in at(body, "projects").as_object().into_iter().flatten() {
        for (path, module) in at(project, "modules").as_object().into_iter().flatten() {
            let failures = at(module, "failures")
                .as_array()
                .cloned()
                .unwrap_or_default();
            let why = |test: &str| {
                failures
                    .iter()
                    .find(|f| at(f, "test") == test)
                    .and_then(|f| at(f, "output").as_str())
                    .map(reason)
            };
            let module_error = why(path).map(|r| (format!("{path} (the module)"), Some(r)));
            let tests = at(module, "failed_tests")
                .as_array()
                .cloned()
                .unwrap_or_default();
            let tests = tests
                .iter()
                .filter_map(Value::as_str)
                .map(|test| (test.to_owned(), why(test)));
            for (test, reason) in module_error.into_iter().chain(tests) {
                let reason = reason.map(|r| format!(": {r}")).unwrap_or_default();
                lines.push(format!(
                    "  {}: {}{}",
                    crate::present::clean(name),
                    crate::present::clean(&test),
                    crate::present::clean(&reason)
                ));
            }
        }
    }
    if !lines.is_empty() {
        println!(
            "failed (pytest's report of each: `teia eval status {} --json`, or the dashboard):",
            at(body, "id")
        );
        for line in lines {
            println!("{line}");
        }
    }
}

/// A failure's reason in a line: its `E` lines joined, else the last line of its report,
/// at most [`REASON_CHARS`].
fn reason(output: &str) -> String {
    let asserted: Vec<&str> = output
        .lines()
        .filter_map(|line| line.strip_prefix("E "))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let said = if asserted.is_empty() {
        output
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_owned()
    } else {
        asserted.join(" ")
    };
    let mut cut: String = said.chars().take(REASON_CHARS).collect();
    if cut.len() < said.len() {
        cut.push('…');
    }
    cut
}

/// A table of the projects' results and the grade.
fn print_report(body: &Value) {
    println!(
        "evaluation {} {} in {} s",
        at(body, "id"),
        at(body, "status").as_str().unwrap_or("?"),
        at(body, "elapsed_seconds")
    );
    println!(
        "{:<24} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "project", "grade", "passed", "failed", "errors", "skipped", "modules"
    );
    for (name, project) in at(body, "projects").as_object().into_iter().flatten() {
        let tests = &at(project, "tests");
        let modules = at(project, "modules").as_object().map_or(0, |m| m.len());
        println!(
            "{:<24} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8}",
            crate::present::clean(name),
            at(project, "grade").to_string(),
            at(tests, "passed").to_string(),
            at(tests, "failed").to_string(),
            at(tests, "errors").to_string(),
            at(tests, "skipped").to_string(),
            modules
        );
    }
    let cached = at(body, "projects")
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(_, project)| at(project, "modules").as_object().into_iter().flatten())
        .filter(|(_, module)| at(module, "cached") == &Value::Bool(true))
        .count();
    if cached > 0 {
        println!(
            "{cached} module(s) reused from earlier runs of the same files (--no-cache runs all)"
        );
    }
    print_failures(body);
    let flaky: Vec<(&String, &Value)> = at(body, "projects")
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(name, project)| {
            at(project, "flaky")
                .as_array()
                .into_iter()
                .flatten()
                .map(move |test| (name, test))
        })
        .collect();
    if !flaky.is_empty() {
        println!("flaky: failed, then passed when run again (counted as failed):");
        for (project, test) in flaky {
            println!(
                "  {}: {}",
                crate::present::clean(project),
                crate::present::clean(test.as_str().unwrap_or("?"))
            );
        }
    }
    println!(
        "grade {} / 20 ({} % passed)",
        at(body, "grade"),
        at(body, "percent_passed")
    );
}
