//! The rendezvous benchmark: `teia rendezvous` against a reference server that reads a line
//! and answers a constant line (the ceiling of one-request-per-connection on this machine).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::load::{self, mix, print_header, print_row, Outcome};

/// Flags of the rendezvous benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds each run lasts.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Rounds; each round runs the reference and every teia load once, so that drift in
    /// the machine's load falls on all of them alike.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Records registered before the runs (spread over namespaces of 10).
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// The `teia` binary to measure; default: the one beside this benchmark.
    #[arg(long)]
    teia: Option<PathBuf>,
}

const REFERENCE_ANSWER: &[u8] = b"{\"status\":\"OK\",\"peers\":[]}\n";
const RECORDS_PER_NAMESPACE: usize = 10;

/// Kills the child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the benchmark and prints its table.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(args.duration);
    let teia = match args.teia {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("teia"),
    };
    if !teia.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p teia -p teia-bench)",
            teia.display()
        );
    }
    let (_reference, reference_addr) = start_reference()?;
    let data_dir = std::env::temp_dir().join(format!("teia-bench-rdv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let (_server, teia_addr) = start_teia(&teia, &data_dir, args.records)?;

    println!(
        "rendezvous benchmark: {} clients, {} rounds of {:.1} s per load, {} records in namespaces of {}",
        args.clients, args.rounds, args.duration, args.records, RECORDS_PER_NAMESPACE
    );
    let registered = tokio::time::timeout(
        Duration::from_secs(600),
        preload(teia_addr, args.clients, args.records),
    )
    .await
    .context("preload did not finish in 600 s")?;
    if registered != args.records {
        bail!(
            "preload registered {registered} of {} records",
            args.records
        );
    }

    let namespaces = args.records.div_ceil(RECORDS_PER_NAMESPACE).max(1);
    let records = args.records.max(1);
    let (mut reference, mut discover, mut register) =
        (Outcome::default(), Outcome::default(), Outcome::default());
    for round in 0..args.rounds.max(1) {
        let salt = (round as u64) << 48;
        reference.merge(
            load::run(args.clients, duration, move |_, _| async move {
                exchange(
                    reference_addr,
                    b"{\"type\":\"DISCOVER\",\"namespace\":\"ns0\"}\n",
                )
                .await
                .is_some_and(|a| a == REFERENCE_ANSWER)
            })
            .await,
        );
        discover.merge(
            teia_load(args.clients, duration, teia_addr, salt, move |key| {
                let ns = key as usize % namespaces;
                format!("{{\"type\":\"DISCOVER\",\"namespace\":\"ns{ns}\"}}\n")
            })
            .await,
        );
        register.merge(
            teia_load(args.clients, duration, teia_addr, salt, move |key| {
                register_line(key as usize % records)
            })
            .await,
        );
    }
    print_header();
    let ceiling = reference.per_second();
    print_row("reference (constant answer)", &reference, ceiling);
    print_row("teia DISCOVER (10 peers answered)", &discover, ceiling);
    print_row("teia REGISTER (refresh, durable)", &register, ceiling);
    println!(
        "ratio to ceiling: DISCOVER {:.2}, REGISTER {:.2}",
        discover.per_second() / ceiling,
        register.per_second() / ceiling
    );
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}

/// Registers records `0..records` with `clients` concurrent clients; returns how many succeeded.
async fn preload(addr: SocketAddr, clients: usize, records: usize) -> usize {
    let clients = clients.max(1);
    let mut tasks = Vec::new();
    for client in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for index in (client..records).step_by(clients) {
                let answer = exchange(addr, register_line(index).as_bytes()).await;
                ok += usize::from(answer.is_some_and(|a| a.starts_with(b"{\"status\":\"OK\"")));
            }
            ok
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap_or(0);
    }
    total
}

/// Runs the load against teia: each exchange sends the line made from a pseudo-random key
/// (a different sequence for each `salt`) and expects an OK answer.
async fn teia_load(
    clients: usize,
    duration: Duration,
    addr: SocketAddr,
    salt: u64,
    line_for: impl Fn(u64) -> String + Copy + Send + Sync + 'static,
) -> Outcome {
    load::run(clients, duration, move |client, iteration| async move {
        let key = mix(salt ^ (client as u64) << 32 | iteration);
        exchange(addr, line_for(key).as_bytes())
            .await
            .is_some_and(is_ok)
    })
    .await
}

fn is_ok(answer: Vec<u8>) -> bool {
    answer.starts_with(b"{\"status\":\"OK\"")
}

fn register_line(index: usize) -> String {
    format!(
        "{{\"type\":\"REGISTER\",\"namespace\":\"ns{}\",\"name\":\"peer{index}\",\"port\":{},\"ttl\":3600}}\n",
        index / RECORDS_PER_NAMESPACE,
        1024 + index % 60_000
    )
}

/// One connection: write the request, read the answer to the end.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    stream.write_all(request).await.ok()?;
    let mut answer = Vec::with_capacity(2048);
    stream.read_to_end(&mut answer).await.ok()?;
    Some(answer)
}

fn start_reference() -> anyhow::Result<(Guard, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("reference-server")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the reference server")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let guard = Guard(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .context("reference server did not report its address")?
        .parse()?;
    Ok((guard, addr))
}

fn start_teia(
    teia: &PathBuf,
    data_dir: &std::path::Path,
    records: usize,
) -> anyhow::Result<(Guard, SocketAddr)> {
    let per_ip = (records + 1).to_string();
    let total = (records + 1000).to_string();
    let mut child = Command::new(teia)
        .args([
            "rendezvous",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "info",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(["--max-records-per-ip", &per_ip, "--max-records", &total])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", teia.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let guard = Guard(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let Some(line) = lines.next() else {
            bail!("teia rendezvous exited before listening");
        };
        let line = line?;
        if let Some(start) = line.find(" addr=") {
            let rest = &line[start + 6..];
            break rest.split_whitespace().next().unwrap_or_default().parse()?;
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((guard, addr))
}

/// The reference: per connection, read one line, answer a constant line, close.
pub async fn reference_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut reader = tokio::io::BufReader::new(stream);
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line).await.is_ok() {
                let mut stream = reader.into_inner();
                let _ = stream.write_all(REFERENCE_ANSWER).await;
                let _ = stream.shutdown().await;
            }
        });
    }
}
