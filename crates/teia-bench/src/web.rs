//! `teia-bench web`: the dashboard's first load and its live events, on a `teia node --http`
//! with the binary's defaults. A first load is what the page fetches before it shows
//! anything (the page, its script and style, `/api/node`, `/api/peers` and `/stats`), each
//! on a new connection, one after the other (a browser does some at once: this is the slow
//! end). The reference is a server in this process that answers the same requests with
//! the same bytes, already in memory, in the same run. The live figure is the time from a
//! `POST /api/chat` to its `sent` event on an open `/events` stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::node::{remove_all, Node, Programs};

/// Flags of `teia-bench web`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// First loads measured (after 5 unmeasured).
    #[arg(long, default_value_t = 200)]
    loads: usize,
    /// Chat messages whose event is timed.
    #[arg(long, default_value_t = 200)]
    messages: usize,
    #[command(flatten)]
    programs: Programs,
}

/// What the page fetches first.
const FIRST_LOAD: [&str; 6] = [
    "/",
    "/app.js",
    "/app.css",
    "/api/node",
    "/api/peers",
    "/stats",
];

/// One GET on a new connection; the whole answer (head and body).
fn fetch(addr: &str, path: &str, cookie: &str) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nSec-Fetch-Site: same-origin\r\nCookie: {cookie}\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
    Ok(answer)
}

/// Opens the dashboard's link as a browser does; the session's cookie (`name=value`).
fn log_in(addr: &str, token: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    write!(
        stream,
        "GET /?token={token} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nSec-Fetch-Site: none\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().starts_with("set-cookie: ").then(|| {
                l["set-cookie: ".len()..]
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
        })
        .context("the dashboard's link set no cookie")
}

/// A server that answers each path of `answers` with its bytes, and closes.
fn reference(answers: Vec<(String, Vec<u8>)>) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = first.split_whitespace().nth(1).unwrap_or("/");
            if let Some((_, bytes)) = answers.iter().find(|(p, _)| p == path) {
                let _ = reader.get_mut().write_all(bytes);
            }
        }
    });
    Ok(addr)
}

/// Times `loads` first loads from `addr`; the sorted durations.
fn first_loads(addr: &str, cookie: &str, loads: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(loads);
    for n in 0..loads + 5 {
        let started = Instant::now();
        for path in FIRST_LOAD {
            fetch(addr, path, cookie)?;
        }
        if n >= 5 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    Ok(times)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn at(times: &[Duration], p: f64) -> Duration {
    let index = ((times.len() as f64 - 1.0) * p).round() as usize;
    times
        .get(index.min(times.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || measure(&args)).await?
}

fn measure(args: &Args) -> anyhow::Result<()> {
    let teia = args.programs.teia()?;
    let dir = std::env::temp_dir().join(format!("teia-bench-web-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = measure_in(args, &teia, &dir);
    remove_all(&dir);
    result
}

fn measure_in(args: &Args, teia: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<()> {
    let node = Node::start(teia, dir, "web", None, &["--http", "127.0.0.1:0"])?;
    let token = std::fs::read_to_string(dir.join("http-token"))
        .context("no http-token in the node's data directory")?;
    let cookie = log_in(&node.http, token.trim())?;

    // The same answers, from memory.
    let mut answers = Vec::new();
    let mut bytes = 0;
    for path in FIRST_LOAD {
        let answer = fetch(&node.http, path, &cookie)?;
        bytes += answer.len();
        answers.push((path.to_owned(), answer));
    }
    let reference_addr = reference(answers)?;

    let reference_times = first_loads(&reference_addr, &cookie, args.loads)?;
    let teia_times = first_loads(&node.http, &cookie, args.loads)?;
    let (teia_p50, reference_p50) = (at(&teia_times, 0.5), at(&reference_times, 0.5));
    println!(
        "web first load ({} requests, {bytes} bytes, {} loads, each request on a new connection, in turn)",
        FIRST_LOAD.len(),
        args.loads
    );
    println!(
        "  teia node:       p50 {:.2} ms, p99 {:.2} ms",
        ms(teia_p50),
        ms(at(&teia_times, 0.99))
    );
    println!(
        "  reference:       p50 {:.2} ms, p99 {:.2} ms (the same bytes from memory)",
        ms(reference_p50),
        ms(at(&reference_times, 0.99))
    );
    println!(
        "  ratio:           {:.2} of the reference's rate",
        reference_p50.as_secs_f64() / teia_p50.as_secs_f64().max(f64::EPSILON)
    );

    // Live: POST /api/chat to its `sent` event on /events.
    let mut events = TcpStream::connect(&node.http)?;
    write!(
        events,
        "GET /events HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
        node.http,
        token.trim()
    )?;
    let mut events = BufReader::new(events);
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        if events.read_line(&mut line)? == 0 {
            bail!("/events closed");
        }
    }
    let mut latencies = Vec::with_capacity(args.messages);
    for n in 0..args.messages {
        let body = format!("{{\"to\":\"#bench\",\"text\":\"m{n}\"}}");
        let started = Instant::now();
        let mut post = TcpStream::connect(&node.http)?;
        write!(
            post,
            "POST /api/chat HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            node.http,
            token.trim(),
            body.len()
        )?;
        let needle = format!("\"payload\":\"m{n}\"");
        loop {
            line.clear();
            if events.read_line(&mut line)? == 0 {
                bail!("/events closed");
            }
            if line.starts_with("data: ")
                && line.contains("\"event\":\"sent\"")
                && line.contains(&needle)
            {
                break;
            }
        }
        latencies.push(started.elapsed());
        let mut answer = Vec::new();
        post.read_to_end(&mut answer)?;
    }
    latencies.sort();
    println!(
        "web live event: POST /api/chat to its `sent` on /events, {} messages: p50 {:.2} ms, p99 {:.2} ms",
        args.messages,
        ms(at(&latencies, 0.5)),
        ms(at(&latencies, 0.99))
    );
    drop(node);
    Ok(())
}
