//! `teia node`: runs a node and its chat interface: the interactive shell on a terminal,
//! plain text lines otherwise, or JSON events with `--json`.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use teia_core::overlay::{Cast, Config as OverlayConfig, Direction, Event};
use teia_files::{Files, FilesConfig, FilesEvent};
use teia_node::node::{start, NodeConfig, NodeEvent, NodeHandle};
use teia_node::rendezvous::RegistrarEvent;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::{data_dir, files, node_file, seconds, shutdown_signal};
use crate::chat::{self, ChatCommand};
use crate::cli::NodeArgs;
use crate::logging::LogControl;

/// The rendezvous a node uses when told of none.
const LOCAL_RENDEZVOUS: &str = "127.0.0.1:8080";
/// Input lines waiting for the interface, at most.
const INPUT_LINES: usize = 64;
/// Data streams accepted and waiting for the file-sharing service, at most.
const STREAMS_WAITING: usize = 16;

/// How events and command output are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Json,
    Text,
}

/// Runs the node until `/quit`, end of input, or a signal.
pub async fn run(args: NodeArgs, log: LogControl) -> anyhow::Result<()> {
    let peer_id = args.home.peer_id(&args.name)?;
    let mut overlay = OverlayConfig::new(peer_id.clone());
    overlay.ping_interval = seconds(args.ping_interval, "--ping-interval")?;
    overlay.target_neighbours = args.max_neighbours;
    overlay.send_deadline = seconds(args.send_deadline, "--send-deadline")?;
    overlay.reconnect_attempts = args.reconnect_attempts;
    overlay.seed = super::random_seed();
    overlay.require_encryption = args.require_encryption;
    let mut peers = Vec::new();
    for peer in &args.peers {
        peers.push(resolve(peer).await?);
    }
    if let Some(server) = &args.rendezvous {
        resolve(server).await?;
    }
    let data_dir = data_dir(args.home.data_dir.clone())?;
    let _lock = lock(&node_file(&data_dir, &peer_id, "lock"), &peer_id)?;
    overlay.identity = Some(teia_node::identity::load_or_create(&node_file(
        &data_dir, &peer_id, "key",
    ))?);
    let store = node_file(&data_dir, &peer_id, "sqlite3");
    let files_db = node_file(&data_dir, &peer_id, "files.sqlite3");
    let key = overlay
        .identity
        .as_ref()
        .map(|i| i.public_key())
        .context("the node has no key")?;
    let mut trusted = Vec::new();
    for text in &args.trusted {
        trusted.push(
            teia_core::identity::PublicKey::parse(text)
                .with_context(|| format!("--trust {text:?} is not a key as `teia id` prints it"))?,
        );
    }
    let trusted_keys = trusted.clone();
    let (stream_tx, stream_rx) = mpsc::channel(STREAMS_WAITING);
    let (course_tx, mut course_rx) = mpsc::channel(STREAMS_WAITING);
    let mut embedded = None;
    let rendezvous = match (args.rendezvous.clone(), peers.is_empty()) {
        (Some(server), _) => Some(server),
        (None, false) => None,
        (None, true) => {
            embedded = local_rendezvous(data_dir.clone()).await?;
            Some(LOCAL_RENDEZVOUS.to_owned())
        }
    };
    let config = NodeConfig {
        overlay,
        listen: (!args.no_listen).then_some(SocketAddr::new(args.listen_ip, args.port)),
        rendezvous,
        peers,
        discover_interval: seconds(args.discover_interval, "--discover-interval")?,
        register_ttl: args.register_ttl.clamp(1, 86_400),
        store: Some(store),
        streams: Some(stream_tx),
        foreign: Some(course_tx),
        lan: (!args.no_lan).then(|| teia_node::lan::LanSettings {
            port: args.lan_port,
            broadcast: args.lan_broadcast.clone(),
        }),
    };
    let (handle, events, task) = start(config).await?;
    let files_config = FilesConfig {
        db: files_db,
        shares: args.shares.clone(),
        approval: args.approve,
        trusted: trusted.clone(),
        download_dir: args.download_dir.clone(),
        listen: handle.listen_addr(),
        key,
        upload_limit: args.upload_limit,
        peer_id: peer_id.clone(),
        index: args.index.clone(),
    };
    let (files_streams, files_stream_rx) = mpsc::channel(STREAMS_WAITING);
    let (files, files_events) = Files::start(files_config, handle.clone(), files_stream_rx).await?;
    let master = match &args.tasks_dir {
        Some(tasks) => Some(
            start_master(
                &args,
                &peer_id,
                tasks,
                &node_file(&data_dir, &peer_id, "tasks"),
            )
            .await?,
        ),
        None => None,
    };
    let (engine, http) =
        start_jobs(&args, &data_dir, &peer_id, &handle, trusted_keys, master).await?;
    // Data streams go to their service: the job engine's, or file sharing's.
    let stream_engine = engine.clone();
    tokio::spawn(async move {
        let mut stream_rx = stream_rx;
        while let Some(stream) = stream_rx.recv().await {
            match (&stream_engine, stream.service()) {
                (Some(engine), teia_jobs::proto::messages::SERVICE) => {
                    let engine = engine.clone();
                    tokio::spawn(async move { engine.serve_stream(stream).await });
                }
                _ => {
                    let _ = files_streams.try_send(stream);
                }
            }
        }
    });
    let course_files = files.clone();
    tokio::spawn(async move {
        while let Some((stream, addr)) = course_rx.recv().await {
            course_files.serve_course_peer(stream, addr);
        }
    });
    let style = if args.json { Style::Json } else { Style::Text };
    let interactive = !args.json && std::io::stdin().is_terminal();
    let services = Services {
        files: files.clone(),
        engine: engine.clone(),
    };
    let result = if interactive {
        shell(handle.clone(), services, events, files_events, log).await
    } else {
        // A node that serves the HTTP API or works for a cluster is a server: the end of its
        // input (`</dev/null`, a service manager) does not stop it; a signal does.
        let server = args.http.is_some() || args.cluster_secret.is_some();
        let stop_at_end = style == Style::Text && !server;
        lines(
            handle.clone(),
            services,
            (events, files_events),
            style,
            stop_at_end,
            log,
        )
        .await
    };
    if let Some(stop) = http {
        let _ = stop.send(());
    }
    files.shutdown().await;
    if let Some(engine) = &engine {
        engine.shutdown().await;
    }
    let _ = handle.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    if let Some(stop) = embedded {
        let _ = stop.send(());
    }
    result
}

/// The services a session routes messages to.
#[derive(Clone)]
struct Services {
    files: Files,
    engine: Option<teia_jobs::engine::Engine>,
}

/// Starts the seed 001 master on `tasks`, with the node's own workers (which keep their
/// files in `dir`) when it has Python.
async fn start_master(
    args: &NodeArgs,
    peer_id: &str,
    tasks: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<teia_jobs::master::MasterHandle> {
    let slots = args.task_workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let python = teia_jobs::runner::resolve_python(&args.python);
    let local = match (slots, teia_jobs::runner::find_python(&python).await) {
        (0, _) => None,
        (_, Err(e)) => {
            tracing::warn!("tasks go to course workers only: {e}");
            None
        }
        (slots, Ok(found)) => {
            let python = found.executable;
            let limits = teia_jobs::runner::Limits {
                timeout: Duration::from_secs(args.module_timeout.max(1)),
                ..teia_jobs::runner::Limits::default()
            };
            let isolation = teia_jobs::runner::Isolation::detect();
            let runner = teia_jobs::runner::Runner::new(dir, python, limits, isolation)
                .with_context(|| format!("cannot prepare {}", dir.display()))?;
            Some(teia_jobs::master::LocalWorkers {
                slots,
                runner: std::sync::Arc::new(runner),
                node: peer_id.to_owned(),
            })
        }
    };
    let listen = match args.master_port.parse::<u16>() {
        Ok(port) => SocketAddr::from(([0, 0, 0, 0], port)),
        Err(_) => args.master_port.parse().with_context(|| {
            format!(
                "--master-port {:?} is neither a port nor IP:PORT",
                args.master_port
            )
        })?,
    };
    let results = args.results_dir.clone().unwrap_or_else(|| {
        tasks
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."))
            .join("results")
    });
    let discovery_ports = if args.discovery_ports.is_empty() {
        vec![9999, 55001]
    } else {
        args.discovery_ports.clone()
    };
    let allow = if args.master_allow.is_empty() {
        teia_jobs::master::default_allow()
    } else {
        args.master_allow.clone()
    };
    let master = teia_jobs::master::start(teia_jobs::master::MasterConfig {
        tasks: tasks.to_owned(),
        results,
        listen,
        discovery_ports,
        allow,
        local,
    })
    .await?;
    Ok(master.1)
}

/// Whether this node may run other nodes' code: with a working sandbox, or when told to
/// without (`--unsandboxed`, said loudly). Without either, it says that it runs only its
/// own submissions.
fn sandboxed_or_allowed(isolation: &teia_jobs::runner::Isolation, unsandboxed: bool) -> bool {
    super::warn_if_root();
    if *isolation != teia_jobs::runner::Isolation::Limits {
        return true;
    }
    if unsandboxed {
        tracing::warn!(
            "--unsandboxed: no working sandbox here, and this node runs other nodes' test \
             modules and script tasks with everything this user can reach"
        );
    } else {
        tracing::warn!(
            "no working sandbox here (install bubblewrap): this node runs only what is submitted \
             to it, unsandboxed, and no other node's modules or tasks (--unsandboxed to run them)"
        );
    }
    unsandboxed
}

/// Starts the job engine when Python with pytest is here (required with `--http`), and the
/// HTTP API when asked; returns the engine and what stops the API.
async fn start_jobs(
    args: &NodeArgs,
    data_dir: &std::path::Path,
    peer_id: &str,
    handle: &NodeHandle,
    trusted: Vec<teia_core::identity::PublicKey>,
    master: Option<teia_jobs::master::MasterHandle>,
) -> anyhow::Result<(
    Option<teia_jobs::engine::Engine>,
    Option<tokio::sync::oneshot::Sender<()>>,
)> {
    let python = teia_jobs::runner::resolve_python(&args.python);
    let found = match teia_jobs::runner::find_python(&python).await {
        Ok(found) => found,
        Err(e) if args.http.is_some() => bail!("--http needs Python 3 with pytest: {e}"),
        Err(e) => {
            tracing::warn!("this node runs no test modules and no script tasks: {e}");
            return Ok((None, None));
        }
    };
    let modules = found.pytest.is_some();
    match (&found.pytest, &args.http) {
        (Some(pytest), _) => tracing::info!(python = %found.version, %pytest, "job engine's Python"),
        (None, Some(_)) => bail!(
            "--http needs Python 3 with pytest: {} has no pytest; install it (pip install pytest, or apt-get install python3-pytest)",
            python.display()
        ),
        (None, None) => tracing::warn!(
            python = %found.version,
            "this node runs script tasks but no test modules: {} has no pytest",
            python.display()
        ),
    }
    let python = found.executable;
    let listen = handle.listen_addr();
    let address = listen
        .map(|a| {
            if a.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], a.port())).to_string()
            } else {
                a.to_string()
            }
        })
        .unwrap_or_else(|| peer_id.to_owned());
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let jobs_dir = node_file(data_dir, peer_id, "jobs");
    let isolation = teia_jobs::runner::Isolation::detect();
    let config = teia_jobs::engine::EngineConfig {
        dir: jobs_dir.clone(),
        node: peer_id.to_owned(),
        address: address.clone(),
        python,
        workers,
        limits: teia_jobs::runner::Limits {
            timeout: Duration::from_secs(args.module_timeout.max(1)),
            ..teia_jobs::runner::Limits::default()
        },
        others: sandboxed_or_allowed(&isolation, args.unsandboxed),
        verify: args.verify,
        keep_finished: args.keep_evaluations,
        git_schemes: std::iter::once("https".to_owned())
            .chain(args.allow_git_schemes.iter().cloned())
            .collect(),
        isolation,
        modules,
    };
    let cluster = teia_jobs::remote::ClusterConfig {
        node: handle.clone(),
        trusted,
        secret: args.cluster_secret.clone(),
        scripts: master.clone(),
    };
    let engine = teia_jobs::engine::Engine::start(config, Some(cluster))?;

    let Some(addr) = &args.http else {
        return Ok((Some(engine), None));
    };
    let listener = teia_http::bind(addr)
        .await
        .with_context(|| format!("cannot serve the HTTP API on {addr}"))?;
    let bound = listener.local_addr()?;
    let token = teia_http::guard::load_or_create_token(data_dir)
        .with_context(|| format!("cannot keep the HTTP API's token in {}", data_dir.display()))?;
    tracing::info!(%bound, "HTTP API listening");
    if !bound.ip().is_loopback() {
        tracing::warn!(
            %bound,
            "the HTTP API is reachable from other machines: their requests need the node's token (`teia token` prints it; send it as Authorization: Bearer TOKEN)"
        );
    }
    let viewer = engine.clone();
    let network: teia_http::NetworkView = std::sync::Arc::new(move || {
        let engine = viewer.clone();
        Box::pin(async move { engine.network().await })
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = engine.clone();
    tokio::spawn(async move {
        let stop = async {
            let _ = stopped.await;
        };
        if let Err(e) = teia_http::serve(
            listener,
            teia_http::Services {
                engine: served,
                master,
            },
            network,
            jobs_dir.join("uploads"),
            token,
            stop,
        )
        .await
        {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
    Ok((Some(engine), Some(stop)))
}

/// Checks `127.0.0.1:8080`; when nothing answers there, starts a rendezvous on it.
async fn local_rendezvous(
    data_dir: std::path::PathBuf,
) -> anyhow::Result<Option<tokio::sync::oneshot::Sender<()>>> {
    let probe = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(LOCAL_RENDEZVOUS),
    )
    .await;
    if matches!(probe, Ok(Ok(_))) {
        return Ok(None);
    }
    let addr: SocketAddr = LOCAL_RENDEZVOUS.parse()?;
    let mut config = teia_rendezvous::Config::new(addr, data_dir.join("rendezvous"));
    config.max_connections = super::connection_cap(config.max_connections as u64);
    let server = teia_rendezvous::Server::bind(config)
        .await
        .context("no rendezvous answers on 127.0.0.1:8080 and one cannot be started there")?;
    tracing::info!(%addr, "started a local rendezvous");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    Ok(Some(stop))
}

/// Holds the node's lock file for as long as it runs: a second node with the same peer id
/// and data directory is refused.
fn lock(path: &std::path::Path, peer_id: &str) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    if file.try_lock().is_err() {
        bail!(
            "node {peer_id} is already running with this data directory (its lock {} is held); \
             stop it, or use another --name or --data-dir",
            path.display()
        );
    }
    Ok(file)
}

async fn resolve(peer: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(peer)
        .await
        .with_context(|| format!("cannot resolve peer {peer:?}; use HOST:PORT"))?
        .next()
        .with_context(|| format!("peer {peer:?} resolves to no address"))
}

/// Non-interactive interface: commands from stdin lines, events and output on stdout; the
/// end of stdin stops the node when `stop_at_end`, else it runs until a signal.
async fn lines(
    handle: NodeHandle,
    services: Services,
    (mut events, mut files_events): (mpsc::Receiver<NodeEvent>, mpsc::Receiver<FilesEvent>),
    style: Style,
    stop_at_end: bool,
    log: LogControl,
) -> anyhow::Result<()> {
    let (tx, mut input) = mpsc::channel::<String>(INPUT_LINES);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let mut session = Session {
        handle,
        files: services.files,
        engine: services.engine,
        progress_shown: Default::default(),
        bars: None,
        style,
        log,
        watching: false,
        registered: false,
        connected: std::collections::HashSet::new(),
        print: Box::new(|line: String| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }),
    };
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut input_open = true;
    let mut stopping = false;
    loop {
        tokio::select! {
            () = &mut signal, if !stopping => {
                stopping = true;
                let _ = session.handle.shutdown().await;
            }
            event = events.recv() => match event {
                Some(event @ NodeEvent::Stopped) => {
                    session.show(&event).await;
                    return Ok(());
                }
                None => return Ok(()),
                Some(event) => session.show(&event).await,
            },
            Some(event) = files_events.recv() => session.show_files(&event),
            line = input.recv(), if input_open && !stopping => match line {
                Some(line) => {
                    if !session.command(&line).await {
                        stopping = true;
                        let _ = session.handle.shutdown().await;
                    }
                }
                None => {
                    input_open = false;
                    if stop_at_end {
                        stopping = true;
                        let _ = session.handle.shutdown().await;
                    }
                }
            },
        }
    }
}

/// Interactive shell: line editing and history, incoming messages printed above the line
/// being typed.
async fn shell(
    handle: NodeHandle,
    services: Services,
    mut events: mpsc::Receiver<NodeEvent>,
    mut files_events: mpsc::Receiver<FilesEvent>,
    log: LogControl,
) -> anyhow::Result<()> {
    use rustyline::ExternalPrinter;
    let mut editor = rustyline::DefaultEditor::new().context("cannot open the terminal")?;
    let printer = editor
        .create_external_printer()
        .context("cannot print on the terminal")?;
    let printer = Arc::new(std::sync::Mutex::new(printer));
    let (tx, mut input) = mpsc::channel::<Option<String>>(INPUT_LINES);
    std::thread::spawn(move || loop {
        match editor.readline("> ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if tx.blocking_send(Some(line)).is_err() {
                    return;
                }
            }
            Err(_) => {
                let _ = tx.blocking_send(None);
                return;
            }
        }
    });
    let mut session = Session {
        handle,
        files: services.files,
        engine: services.engine,
        progress_shown: Default::default(),
        style: Style::Text,
        log,
        watching: false,
        registered: false,
        connected: std::collections::HashSet::new(),
        bars: Some(files::ShellBars::new(Arc::new({
            let printer = Arc::clone(&printer);
            move |line: String| {
                if let Ok(mut printer) = printer.lock() {
                    let _ = printer.print(format!("{line}\n"));
                }
            }
        }))),
        print: Box::new(move |line: String| {
            if let Ok(mut printer) = printer.lock() {
                let _ = printer.print(format!("{line}\n"));
            }
        }),
    };
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => return Ok(()),
            event = events.recv() => match event {
                Some(NodeEvent::Stopped) | None => return Ok(()),
                Some(event) => session.show(&event).await,
            },
            Some(event) = files_events.recv() => session.show_files(&event),
            line = input.recv() => match line.flatten() {
                Some(line) => {
                    if !session.command(&line).await {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            },
        }
    }
}

struct Session {
    handle: NodeHandle,
    files: Files,
    engine: Option<teia_jobs::engine::Engine>,
    /// The last tenth of each download's progress shown in text.
    progress_shown: std::collections::HashMap<teia_files::proto::tree::Hash, u64>,
    /// The shell's progress bars (interactive shell only).
    bars: Option<files::ShellBars>,
    style: Style,
    log: LogControl,
    watching: bool,
    /// Registered at the rendezvous (so renewals are not shown again in text).
    registered: bool,
    /// Peers shown connected in text (a link replaced by a simultaneous one is not shown
    /// again); at most one per link.
    connected: std::collections::HashSet<String>,
    print: Box<dyn FnMut(String) + Send>,
}

impl Session {
    fn emit(&mut self, json: Value, text: String) {
        let line = match self.style {
            Style::Json => json.to_string(),
            Style::Text => text,
        };
        (self.print)(line);
    }

    fn output(&mut self, command: &str, data: Value, text: String) {
        self.emit(
            json!({"event":"output","command":command,"data":data}),
            text,
        );
    }

    fn usage(&mut self, error: &str) {
        self.emit(json!({"event":"usage","error":error}), format!("! {error}"));
    }

    /// Runs one input line; false when the session should end.
    async fn command(&mut self, line: &str) -> bool {
        let command = match chat::parse(line) {
            Ok(Some(command)) => command,
            Ok(None) => return true,
            Err(error) => {
                self.usage(&error);
                return true;
            }
        };
        if let Err(e) = self.execute(command.clone()).await {
            self.emit(
                json!({"event":"command_error","error":format!("{e:#}")}),
                format!("! {e:#}"),
            );
        }
        command != ChatCommand::Quit
    }

    async fn execute(&mut self, command: ChatCommand) -> anyhow::Result<()> {
        match command {
            ChatCommand::Msg { dst, text } | ChatCommand::Pub { dst, text } => {
                let msg_id = self.handle.send(&dst, Value::String(text)).await?;
                self.emit(
                    json!({"event":"sent","msg_id":msg_id,"dst":dst}),
                    format!("… sent to {dst} ({})", short(&msg_id)),
                );
            }
            ChatCommand::Connect(target) => {
                let addr = match target.parse::<SocketAddr>() {
                    Ok(addr) => addr,
                    Err(_) if teia_core::overlay::is_peer_id(&target) => {
                        let known = self.handle.snapshot().await?.known;
                        known
                            .into_iter()
                            .find(|(peer, _)| *peer == target)
                            .map(|(_, addr)| addr)
                            .with_context(|| {
                                format!("{target} is not known yet; use /connect HOST:PORT")
                            })?
                    }
                    Err(_) => resolve(&target).await?,
                };
                self.handle.connect(addr).await?;
                self.output(
                    "connect",
                    json!({"addr":addr.to_string()}),
                    format!("… connecting to {addr}"),
                );
            }
            ChatCommand::Peers(filter) => self.peers(filter).await?,
            ChatCommand::Routes => self.routes().await?,
            ChatCommand::Conn => self.conn().await?,
            ChatCommand::Rtt => self.rtt().await?,
            ChatCommand::Watch => {
                self.watching = !self.watching;
                self.handle.watch(self.watching).await?;
                let state = if self.watching { "on" } else { "off" };
                self.output(
                    "watch",
                    json!({"watching":self.watching}),
                    format!("… watch {state}"),
                );
            }
            ChatCommand::Reconnect => {
                self.handle.reconnect().await?;
                self.output("reconnect", json!({}), "… redialing known peers".into());
            }
            ChatCommand::Log(level) => {
                self.log.set(&level)?;
                self.output(
                    "log",
                    json!({"level":level}),
                    format!("… log level {level}"),
                );
            }
            ChatCommand::Metrics(Some(peer)) => {
                self.handle.request_metrics(&peer).await?;
            }
            ChatCommand::Metrics(None) => {
                let snapshot = self.handle.snapshot().await?;
                let c = snapshot.counters;
                self.output(
                    "metrics",
                    json!({"sent":c.sent,"received":c.received,"forwarded":c.forwarded,
                           "duplicates":c.duplicates,"errors":c.errors,"delivered":c.delivered,
                           "dropped":c.dropped,"forged":c.forged}),
                    format!(
                        "sent {} received {} forwarded {} duplicates dropped {} errors {} delivered {} queue drops {} forged refused {}",
                        c.sent, c.received, c.forwarded, c.duplicates, c.errors, c.delivered, c.dropped, c.forged
                    ),
                );
            }
            ChatCommand::Id => {
                let key = self.handle.snapshot().await?.key;
                let key = key.map(|k| k.to_string());
                self.output(
                    "id",
                    json!({"key":key}),
                    format!("… key {}", key.as_deref().unwrap_or("(none)")),
                );
            }
            ChatCommand::Trust { peer, key } => {
                let key = teia_core::identity::PublicKey::parse(&key)?;
                self.handle.trust(&peer, key).await?;
                self.output(
                    "trust",
                    json!({"peer":peer,"key":key.to_string()}),
                    format!("… {peer} pinned to key {key}"),
                );
            }
            ChatCommand::Forget(peer) => {
                let old = self.handle.forget(&peer).await?;
                let text = match &old {
                    Some(key) => format!("… {} unpinned (was {key})", clean(&peer)),
                    None => format!("… {} had no pinned key", clean(&peer)),
                };
                self.output(
                    "forget",
                    json!({"peer":peer,"was":old.map(|k| k.to_string())}),
                    text,
                );
            }
            ChatCommand::Files(command) => {
                let (name, data, text) = files::run(&self.files, command).await?;
                self.output(name, data, text);
            }
            ChatCommand::Help => self.output("help", json!(chat::HELP), chat::HELP.to_owned()),
            ChatCommand::Quit => self.output("quit", json!({}), "… bye".into()),
        }
        Ok(())
    }

    async fn peers(&mut self, filter: Option<String>) -> anyhow::Result<()> {
        let snapshot = self.handle.snapshot().await?;
        let matches = |peer: &str| match filter.as_deref() {
            None | Some("*") => true,
            Some(ns) => peer.ends_with(&format!("@{}", ns.trim_start_matches('#'))),
        };
        let links: Vec<&teia_core::overlay::NeighbourInfo> = snapshot
            .neighbours
            .iter()
            .filter(|n| matches(&n.peer))
            .collect();
        let connected: Vec<&str> = links.iter().map(|n| n.peer.as_str()).collect();
        let known: Vec<(String, String)> = snapshot
            .known
            .iter()
            .filter(|(peer, _)| matches(peer) && !connected.contains(&peer.as_str()))
            .map(|(peer, addr)| (peer.clone(), addr.to_string()))
            .collect();
        let mut text = String::from("connected:");
        let mut links_json = Vec::new();
        for n in &links {
            let security = match (n.encrypted, n.key) {
                (true, Some(key)) => format!("encrypted, key {}…", key.fingerprint()),
                _ => "plaintext (course peer)".to_owned(),
            };
            text.push_str(&format!("\n  {:<30} {security}", clean(&n.peer)));
            links_json.push(json!({"peer":n.peer,"encrypted":n.encrypted,
                "key":n.key.map(|k| k.to_string()),
                "fingerprint":n.key.map(|k| k.fingerprint())}));
        }
        text.push_str("\nknown, not connected:");
        for (peer, addr) in &known {
            text.push_str(&format!("\n  {} ({addr})", clean(peer)));
        }
        let known_json: Vec<Value> = known
            .iter()
            .map(|(peer, addr)| json!({"peer":peer,"addr":addr}))
            .collect();
        self.output(
            "peers",
            json!({"connected":connected,"links":links_json,"known":known_json}),
            text,
        );
        Ok(())
    }

    async fn routes(&mut self) -> anyhow::Result<()> {
        let snapshot = self.handle.snapshot().await?;
        let mut text = String::from("neighbours:");
        let mut neighbours = Vec::new();
        for n in &snapshot.neighbours {
            let rtt = n.rtt.map(|r| r.as_secs_f64() * 1000.0);
            text.push_str(&format!("\n  {:<30} rtt {}", n.peer, fmt_rtt(rtt)));
            neighbours.push(json!({"peer":n.peer,"addr":n.addr.to_string(),"rtt_ms":rtt}));
        }
        text.push_str("\nroutes:");
        let mut routes = Vec::new();
        for r in &snapshot.routes {
            text.push_str(&format!(
                "\n  {:<30} via {:<30} {} hops, {} s old",
                clean(&r.dst),
                clean(&r.next_hop),
                r.hops,
                r.age.as_secs()
            ));
            routes.push(
                json!({"dst":r.dst,"next_hop":r.next_hop,"hops":r.hops,"age_s":r.age.as_secs()}),
            );
        }
        let c = snapshot.counters;
        text.push_str(&format!(
            "\ncounters: sent {} received {} forwarded {} duplicates {} errors {}",
            c.sent, c.received, c.forwarded, c.duplicates, c.errors
        ));
        self.output(
            "routes",
            json!({"neighbours":neighbours,"routes":routes,
                   "counters":{"sent":c.sent,"received":c.received,"forwarded":c.forwarded,
                               "duplicates":c.duplicates,"errors":c.errors}}),
            text,
        );
        Ok(())
    }

    async fn conn(&mut self) -> anyhow::Result<()> {
        let snapshot = self.handle.snapshot().await?;
        let mut text = String::from("connections:");
        let mut list = Vec::new();
        for n in &snapshot.neighbours {
            let direction = if n.inbound { "in" } else { "out" };
            text.push_str(&format!(
                "\n  {:<30} {:<22} {:<3} sent {} received {}{}",
                n.peer,
                n.addr,
                direction,
                n.sent,
                n.received,
                if n.teia { "" } else { " (course peer)" }
            ));
            list.push(
                json!({"peer":n.peer,"addr":n.addr.to_string(),"direction":direction,
                             "sent":n.sent,"received":n.received,"teia":n.teia}),
            );
        }
        self.output("conn", Value::Array(list), text);
        Ok(())
    }

    async fn rtt(&mut self) -> anyhow::Result<()> {
        let snapshot = self.handle.snapshot().await?;
        let mut text = String::from("round-trip times:");
        let mut list = Vec::new();
        for n in &snapshot.neighbours {
            let rtt = n.rtt.map(|r| r.as_secs_f64() * 1000.0);
            text.push_str(&format!("\n  {:<30} {}", n.peer, fmt_rtt(rtt)));
            list.push(json!({"peer":n.peer,"rtt_ms":rtt}));
        }
        self.output("rtt", Value::Array(list), text);
        Ok(())
    }

    /// Shows an event; a message is then marked shown, so a restart does not hand it over
    /// again. A renewed registration is shown in text only the first time.
    async fn show(&mut self, event: &NodeEvent) {
        match event {
            NodeEvent::Overlay(Event::Query {
                query_id,
                src,
                service,
                body,
            }) => {
                if service == "files" {
                    let (files, query_id, src, body) = (
                        self.files.clone(),
                        query_id.clone(),
                        src.clone(),
                        body.clone(),
                    );
                    tokio::spawn(async move { files.on_query(&query_id, &src, &body).await });
                }
                return;
            }
            NodeEvent::Overlay(Event::Message {
                msg_id,
                src,
                payload,
                cast: Cast::Unicast,
                origin_key,
                ..
            }) if teia_jobs::proto::messages::from_payload(payload).is_some() => {
                // A job engine's message, not chat.
                if let Some(engine) = &self.engine {
                    let (engine, src, payload, key) =
                        (engine.clone(), src.clone(), payload.clone(), *origin_key);
                    tokio::spawn(async move { engine.on_message(&src, key, &payload).await });
                }
                let _ = self.handle.shown(msg_id).await;
                return;
            }
            NodeEvent::Overlay(Event::QueryHit {
                query_id,
                src,
                body,
            }) => {
                let (files, query_id, src, body) = (
                    self.files.clone(),
                    query_id.clone(),
                    src.clone(),
                    body.clone(),
                );
                tokio::spawn(async move { files.on_hit(&query_id, &src, &body).await });
                return;
            }
            _ => {}
        }
        let (json, text) = describe(event);
        let renewal = matches!(event, NodeEvent::Rendezvous(RegistrarEvent::Registered(_)))
            && std::mem::replace(&mut self.registered, true);
        if matches!(event, NodeEvent::Rendezvous(RegistrarEvent::Failed { .. })) {
            self.registered = false;
        }
        // Two nodes that found each other at once both dial: one link stays, nothing to say.
        let simultaneous = matches!(
            event,
            NodeEvent::Overlay(Event::Refused { reason, .. }) if reason.starts_with("duplicate")
        );
        let again = match event {
            NodeEvent::Overlay(Event::LinkUp { peer, .. }) => !self.connected.insert(peer.clone()),
            NodeEvent::Overlay(Event::LinkDown { peer, .. }) => {
                self.connected.remove(peer);
                false
            }
            _ => false,
        };
        if !((renewal || simultaneous || again) && self.style == Style::Text) {
            self.emit(json, text);
        }
        if let NodeEvent::Overlay(Event::Message {
            msg_id,
            cast: Cast::Unicast,
            ..
        }) = event
        {
            let _ = self.handle.shown(msg_id).await;
        }
    }
}

impl Session {
    /// Shows a file-sharing event. In text, a download's progress is shown at each tenth
    /// only, so it does not crowd out the chat: in the shell as an `indicatif` bar.
    fn show_files(&mut self, event: &FilesEvent) {
        if let Some(bars) = &mut self.bars {
            match event {
                FilesEvent::Progress(info) => return bars.progress(info),
                FilesEvent::Done { info, .. } => bars.done(&info.hash),
                FilesEvent::Failed { hash, .. } => bars.done(hash),
                _ => {}
            }
        }
        if let (Style::Text, FilesEvent::Progress(info)) = (self.style, event) {
            let tenth = info.bytes.saturating_mul(10) / info.size.unwrap_or(u64::MAX).max(1);
            let last = self.progress_shown.entry(info.hash).or_insert(0);
            if tenth <= *last {
                return;
            }
            *last = tenth;
            if self.progress_shown.len() > 64 {
                self.progress_shown.clear();
            }
        }
        let (json, text) = files::describe(event);
        self.emit(json, text);
    }
}

/// An event as a JSON object and as a line of text. Everything a peer chose (ids, payloads,
/// reasons) goes through [`clean`] in the text, so a peer never controls the terminal; the
/// JSON keeps it exact.
fn describe(event: &NodeEvent) -> (Value, String) {
    match event {
        NodeEvent::Ready {
            peer_id,
            listen,
            key,
        } => (
            json!({"event":"ready","peer_id":peer_id,"listen":listen.map(|a| a.to_string()),
                   "key":key.map(|k| k.to_string())}),
            match listen {
                Some(addr) => {
                    format!("teia node {peer_id}, accepting links on {addr}; /help lists commands")
                }
                None => format!("teia node {peer_id}, not accepting links; /help lists commands"),
            },
        ),
        NodeEvent::Stopped => (json!({"event":"stopped"}), "… stopped".into()),
        NodeEvent::Rendezvous(RegistrarEvent::Registered(r)) => (
            json!({"event":"registered","ttl":r.ttl,"observed_ip":r.observed_ip}),
            format!("… registered at the rendezvous for {} s", r.ttl),
        ),
        NodeEvent::Rendezvous(RegistrarEvent::Failed { error, retry_in }) => (
            json!({"event":"rendezvous_error","error":error,"retry_in_ms":retry_in.as_millis() as u64}),
            format!(
                "! rendezvous: {} (retrying in {} s)",
                clean(error),
                retry_in.as_secs()
            ),
        ),
        NodeEvent::DiscoverFailed(error) => (
            json!({"event":"rendezvous_error","error":error}),
            format!("! rendezvous: {}", clean(error)),
        ),
        NodeEvent::Overlay(event) => describe_overlay(event),
    }
}

fn describe_overlay(event: &Event) -> (Value, String) {
    match event {
        Event::Query {
            query_id, src, service, ..
        } => (
            json!({"event":"query","query_id":query_id,"src":src,"service":service}),
            format!("* query from {}", clean(src)),
        ),
        Event::QueryHit { query_id, src, .. } => (
            json!({"event":"query_hit","query_id":query_id,"src":src}),
            format!("* answer from {}", clean(src)),
        ),
        // The node's runtime answers these itself; described should one get here.
        Event::SpliceAsked { peer, with, .. } => (
            json!({"event":"splice_asked","peer":peer,"with":with}),
            format!("* {} asks to be spliced with {}", clean(peer), clean(with)),
        ),
        Event::SpliceGranted { relay, with, .. } => (
            json!({"event":"splice_granted","relay":relay,"with":with}),
            format!("* {} splices us with {}", clean(relay), clean(with)),
        ),
        Event::SpliceRefused {
            relay,
            with,
            reason,
            ..
        } => (
            json!({"event":"splice_refused","relay":relay,"with":with,"reason":reason.code()}),
            format!(
                "* {} will not splice us with {}: {}",
                clean(relay),
                clean(with),
                clean(&reason.to_string())
            ),
        ),
        Event::LinkUp {
            peer,
            addr,
            inbound,
            features,
        } => (
            json!({"event":"link_up","peer":peer,"addr":addr.to_string(),"inbound":inbound,"features":features}),
            format!("* {} connected ({addr})", clean(peer)),
        ),
        Event::LinkDown { peer, reason } => (
            json!({"event":"link_down","peer":peer,"reason":reason}),
            format!("* {} disconnected ({})", clean(peer), clean(reason)),
        ),
        Event::Message {
            msg_id,
            src,
            dst,
            cast,
            payload,
            ..
        } => {
            let cast_name = match cast {
                Cast::Unicast => "unicast",
                Cast::Namespace => "namespace",
                Cast::Broadcast => "broadcast",
            };
            let text = match payload {
                Value::String(s) => clean(s),
                other => clean(&other.to_string()),
            };
            let shown = match cast {
                Cast::Unicast => format!("[{}] {text}", clean(src)),
                _ => format!("[{} → {}] {text}", clean(src), clean(dst)),
            };
            (
                json!({"event":"message","msg_id":msg_id,"src":src,"dst":dst,"cast":cast_name,"payload":payload}),
                shown,
            )
        }
        Event::Acked {
            msg_id,
            from,
            elapsed,
        } => (
            json!({"event":"ack","msg_id":msg_id,"from":from,"rtt_ms":elapsed.as_secs_f64() * 1000.0}),
            format!(
                "✓ {} delivered to {} in {} ms",
                short(msg_id),
                clean(from),
                elapsed.as_millis()
            ),
        ),
        Event::Undelivered {
            msg_id,
            dst,
            reason,
        } => (
            json!({"event":"undelivered","msg_id":msg_id,"dst":dst,"reason":reason}),
            format!(
                "! {} not delivered to {}: {}",
                short(msg_id),
                clean(dst),
                clean(reason)
            ),
        ),
        Event::Relayed {
            msg_id,
            via,
            ok,
            reason,
        } => (
            json!({"event":"relay","msg_id":msg_id,"via":via,"ok":ok,"reason":reason}),
            format!(
                "… {} {} by {}",
                short(msg_id),
                if *ok { "relayed" } else { "not relayed" },
                clean(via)
            ),
        ),
        Event::RemoteError {
            code,
            reference,
            detail,
            from,
        } => (
            json!({"event":"error","code":code,"ref":reference,"detail":detail,"from":from}),
            format!(
                "! error from {}: {}{}",
                clean(from),
                clean(code),
                detail
                    .as_deref()
                    .map(|d| format!(" ({})", clean(d)))
                    .unwrap_or_default()
            ),
        ),
        Event::Metrics {
            peer,
            rtt_ms,
            sent,
            received,
        } => (
            json!({"event":"metrics","peer":peer,"rtt_ms":rtt_ms,"sent":sent,"received":received}),
            format!(
                "… {}: rtt {} sent {sent} received {received}",
                clean(peer),
                fmt_rtt(rtt_ms.map(|r| r as f64))
            ),
        ),
        Event::KeyMismatch {
            peer,
            pinned,
            offered,
            addr,
        } => (
            json!({"event":"key_mismatch","peer":peer,"pinned":pinned.to_string(),
                   "offered":offered.to_string(),"addr":addr.map(|a| a.to_string())}),
            format!(
                "! refused {}: it offered key {offered}, but {pinned} is pinned for it (/trust to change)",
                clean(peer)
            ),
        ),
        Event::Refused { peer, addr, reason } => (
            json!({"event":"refused","peer":peer,"addr":addr.to_string(),"reason":reason}),
            format!(
                "! refused {} ({addr}): {}",
                clean(peer.as_deref().unwrap_or("a connection")),
                clean(reason)
            ),
        ),
        Event::DialGaveUp {
            addr,
            attempts,
            reason,
        } => (
            json!({"event":"dial_gave_up","addr":addr.to_string(),"attempts":attempts,"reason":reason}),
            format!(
                "! gave up dialing {addr} after {attempts} attempts: {}",
                clean(reason)
            ),
        ),
        Event::Forged {
            from,
            src,
            msg_id,
            reason,
        } => (
            json!({"event":"forged","from":from,"src":src,"msg_id":msg_id,"reason":reason}),
            format!(
                "! dropped a message from {} claiming to come from {}: {}",
                clean(from),
                clean(src),
                clean(reason)
            ),
        ),
        Event::DialFailed {
            addr,
            error,
            retry_in,
        } => (
            json!({"event":"dial_failed","addr":addr.to_string(),"error":error,
                   "retry_in_ms":retry_in.map(|r| r.as_millis() as u64)}),
            format!("! cannot reach {addr}: {}", clean(error)),
        ),
        Event::Traffic {
            direction,
            peer,
            kind,
            msg_id,
            src,
            dst,
        } => {
            let dir = match direction {
                Direction::In => "in",
                Direction::Out => "out",
            };
            (
                json!({"event":"traffic","dir":dir,"peer":peer,"type":kind,"msg_id":msg_id,"src":src,"dst":dst}),
                format!(
                    "{} {:<12} {} {}→{}",
                    if dir == "in" { "«" } else { "»" },
                    clean(kind),
                    clean(peer),
                    clean(src.as_deref().unwrap_or("-")),
                    clean(dst.as_deref().unwrap_or("-"))
                ),
            )
        }
    }
}

/// Text from a peer, made safe for a terminal: every control character (escape sequences,
/// carriage returns, newlines, bidirectional overrides, ...) is shown as an escape such as
/// `\n` or `\u{1b}` instead of acting on the screen.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn short(msg_id: &str) -> &str {
    msg_id.get(..8).unwrap_or(msg_id)
}

fn fmt_rtt(rtt_ms: Option<f64>) -> String {
    rtt_ms.map_or_else(|| "-".to_owned(), |r| format!("{r:.1} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            clean("oi\x1b[2J\r\n[carol@UnB] x"),
            "oi\\u{1b}[2J\\r\\n[carol@UnB] x"
        );
        assert_eq!(clean("\u{202e}abc\u{7}"), "\\u{202e}abc\\u{7}");
        assert_eq!(clean("Olá, → ok"), "Olá, → ok");
    }
}
