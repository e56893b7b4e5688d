//! The commands: each turns its arguments into settings and runs on a tokio runtime.

mod eval;
mod files;
mod id;
mod job;
mod node;
mod rdv;
mod rendezvous;
pub(crate) mod status;
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::Command;
use crate::logging::LogControl;

/// Runs one command to completion.
pub fn run(command: Command, log: LogControl) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        survive_file_size_limit();
        match command {
            Command::Rendezvous(args) => rendezvous::run(args).await,
            Command::Rdv(command) => rdv::run(command).await,
            Command::Node(args) => node::run(*args, log).await,
            Command::Id(args) => id::run(args),
            Command::Token(args) => {
                let dir = data_dir(args.data_dir)?;
                let token = teia_http::guard::load_or_create_token(&dir).with_context(|| {
                    format!("cannot read or make the token in {}", dir.display())
                })?;
                println!("{token}");
                Ok(())
            }
            Command::Index(args) => index(args).await,
            Command::Eval(args) => eval::run(args).await,
            Command::Send(args) => transfer::send(args).await,
            Command::Receive(args) => transfer::receive(args).await,
            Command::Worker(args) => worker(args).await,
            Command::Job(args) => job::run(args).await,
            Command::Status(args) => status::show(args),
            Command::Reset(args) => status::reset(args),
            Command::Completions { shell } => {
                use clap::CommandFactory;
                let mut command = crate::cli::Cli::command();
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut command, "teia", &mut script);
                std::io::Write::write_all(&mut std::io::stdout(), &script)
                    .context("cannot print the completion script")
            }
        }
    });
    // A read of stdin blocks a thread that only ends with more input: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

/// `teia worker --master-compat` or `--pytest-compat`: works for a master/worker
/// program's master, or in a seed 000 pytest network, until a signal.
async fn worker(args: crate::cli::WorkerArgs) -> anyhow::Result<()> {
    if !args.master_compat && args.pytest_compat.is_none() {
        bail!(
            "say whose tasks to run: --master-compat (a master/worker program's master, found \
             by broadcast) or --pytest-compat HOST:PORT (a distributed pytest network)"
        );
    }
    let dir = data_dir(args.data_dir)?.join("worker");
    let python = teia_jobs::runner::resolve_python(&args.python);
    let found = teia_jobs::runner::find_python(&python)
        .await
        .map_err(|e| anyhow::anyhow!("tasks need Python: {e}"))?;
    let (python, version) = (found.executable, found.version);
    let isolation = teia_jobs::runner::Isolation::detect();
    if isolation == teia_jobs::runner::Isolation::Limits {
        if !args.unsandboxed {
            bail!(
                "no working sandbox here, and a master's tasks are other people's code: install \
                 bubblewrap (apt-get install bubblewrap), or pass --unsandboxed to run them with \
                 everything this user can reach"
            );
        }
        tracing::warn!("--unsandboxed: the master's tasks run with everything this user can reach");
    }
    warn_if_root();
    tracing::info!(python = %version, isolation = %isolation.describe(), "worker ready");
    let default_timeout = if args.pytest_compat.is_some() {
        35
    } else {
        300
    };
    let limits = teia_jobs::runner::Limits {
        timeout: Duration::from_secs(args.task_timeout.unwrap_or(default_timeout).max(1)),
        ..teia_jobs::runner::Limits::default()
    };
    let runner = teia_jobs::runner::Runner::new(&dir, python, limits, isolation)
        .with_context(|| format!("cannot prepare {}", dir.display()))?;
    if let Some(host) = &args.pytest_compat {
        let host = tokio::net::lookup_host(host.as_str())
            .await
            .ok()
            .and_then(|mut found| found.find(std::net::SocketAddr::is_ipv4))
            .with_context(|| format!("--pytest-compat {host}: not an IPv4 HOST:PORT"))?;
        let advertise_ip = match args.advertise_ip {
            Some(ip) => ip,
            None => route_to(host)
                .with_context(|| format!("no route to {host}: pass --advertise-ip"))?,
        };
        let config = teia_jobs::seed000_worker::Seed000Config {
            host,
            bind: std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), args.udp_port),
            advertise: std::net::SocketAddr::new(advertise_ip, args.udp_port),
            slots: args.slots.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            }),
            work: dir.join("pytest"),
        };
        let runner = std::sync::Arc::new(runner);
        // The warm interpreter starts now, not with the first module a holder waits for.
        let warming = runner.clone();
        tokio::spawn(async move { warming.warm_up().await });
        return tokio::select! {
            ended = teia_jobs::seed000_worker::run(config, runner.clone()) => {
                runner.stop().await;
                ended.context("the seed 000 worker's socket failed")
            }
            () = shutdown_signal() => {
                runner.stop().await;
                Ok(())
            }
        };
    }
    let config = teia_jobs::course_worker::CourseWorkerConfig {
        peer_id: args
            .peer_id
            .unwrap_or_else(|| format!("teia-{:016x}", random_seed())),
        discovery_ports: if args.discovery_ports.is_empty() {
            vec![9999, 55001]
        } else {
            args.discovery_ports
        },
        broadcast: args.broadcast,
        work: dir.join("work"),
    };
    tokio::select! {
        () = teia_jobs::course_worker::run(config, std::sync::Arc::new(runner)) => Ok(()),
        () = shutdown_signal() => Ok(()),
    }
}

/// This machine's address on the route to `to` (a UDP socket connected to it: nothing is
/// sent).
fn route_to(to: std::net::SocketAddr) -> std::io::Result<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(to)?;
    Ok(socket.local_addr()?.ip())
}

/// A random 64-bit number (the standard library seeds `RandomState` from the operating
/// system's randomness).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// `teia index`: serves the index until a signal.
async fn index(args: crate::cli::IndexArgs) -> anyhow::Result<()> {
    let dir = data_dir(args.data_dir)?.join("index");
    let mut limits =
        teia_files::proto::napster::Limits::with_memory(args.max_memory.saturating_mul(1 << 20));
    limits.max_peers_per_ip = args.max_peers_per_ip;
    let config = teia_files::index::IndexConfig {
        grace: Duration::from_secs(args.grace),
        limits,
        max_disk: args.max_disk.saturating_mul(1 << 20),
    };
    let server = teia_files::index::IndexServer::bind(args.listen, &dir, config).await?;
    if let Some(addr) = server.local_addr() {
        tracing::info!(
            %addr,
            records = server.records(),
            bytes = server.bytes(),
            "index listening"
        );
    }
    server.serve(shutdown_signal()).await;
    Ok(())
}

/// A write beyond the process's file-size limit (`ulimit -f`) then fails with an error
/// the command reports (a download fails cleanly) instead of killing the process: SIGXFSZ
/// is caught and ignored.
fn survive_file_size_limit() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        /// SIGXFSZ on Linux.
        const SIGXFSZ: i32 = 25;
        if let Ok(mut limit) = signal(SignalKind::from_raw(SIGXFSZ)) {
            tokio::spawn(async move { while limit.recv().await.is_some() {} });
        }
    }
}

/// Says, when this process runs as root, what that means for the tasks it runs.
pub fn warn_if_root() {
    if teia_jobs::runner::sandbox::running_as_root() {
        tracing::warn!(
            "teia runs as root: tasks run in the sandbox as user ids of their own ({} and up), \
             with no capabilities; running teia as an ordinary user is safer still",
            teia_jobs::runner::sandbox::TASK_ID_BASE
        );
    }
}

/// The data directory: the one given (made absolute: tasks and the warm interpreter run in
/// other folders), else the platform's data directory plus `teia`.
pub fn data_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(dir) => std::path::absolute(&dir)
            .with_context(|| format!("--data-dir {}: cannot make it absolute", dir.display())),
        None => dirs::data_dir()
            .map(|d| d.join("teia"))
            .context("no platform data directory is known here; pass --data-dir DIR"),
    }
}

/// A duration given in (possibly fractional) seconds on the command line.
fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value > 0.0 && value <= 86_400.0) {
        bail!("{flag} must be a number of seconds above 0 and at most 86400, got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

/// Set once the user pressed Ctrl-C: the command then exits with 130, as a shell expects
/// of a program interrupted by SIGINT.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that the user interrupted the command (Ctrl-C).
pub(crate) fn interrupted() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Resolves on SIGINT (Ctrl-C, recorded in [`INTERRUPTED`]) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
        interrupted();
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    () = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => interrupt.await,
        }
    }
    #[cfg(not(unix))]
    {
        interrupt.await;
    }
}

/// Where the files of node `peer_id` live in `data_dir` (`nodes/PEER_ID.EXT`), with any
/// character that could break a path replaced by `_`.
pub fn node_file(data_dir: &std::path::Path, peer_id: &str, extension: &str) -> PathBuf {
    let name: String = peer_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect();
    data_dir.join("nodes").join(format!("{name}.{extension}"))
}

/// Descriptors kept free beyond the connections a server serves (database, listener, logs,
/// a node's own links).
const SPARE_DESCRIPTORS: u64 = 320;

/// `wanted` connections, or fewer if the process may not open that many files even after
/// raising its soft limit to the hard one: beyond the cap clients are answered `busy` at once
/// rather than left waiting in the accept queue.
pub fn connection_cap(wanted: u64) -> usize {
    let limit = rlimit::increase_nofile_limit(wanted + SPARE_DESCRIPTORS).unwrap_or(1024);
    let cap = wanted.min(limit.saturating_sub(SPARE_DESCRIPTORS)).max(1);
    if cap < wanted {
        tracing::warn!(
            wanted,
            cap,
            open_files_limit = limit,
            "the open-files limit allows fewer connections; raise `ulimit -n` to serve more"
        );
    }
    usize::try_from(cap).unwrap_or(usize::MAX)
}
