//! `teia node`: runs a node, its services on the node's router, and the chat's interface:
//! the interactive shell on a terminal, plain text lines otherwise, or JSON events with
//! `--json`. Here the node is assembled and stopped; [`jobs`] starts the job engine and its
//! HTTP API, [`session`] is the chat's interface, [`describe`] puts events into words.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use teia_core::overlay::Config as OverlayConfig;
use teia_files::{Files, FilesConfig};
use teia_node::chat::Chat;
use teia_node::node::{start, NodeConfig};
use teia_node::router::Router;

use super::{data_dir, node_file, seconds};
use crate::cli::NodeArgs;
use crate::logging::LogControl;

mod describe;
mod jobs;
mod session;

use jobs::{prepare, start_jobs, Prepared};
use session::{lines, shell};

/// How long a node that lost the race for the local rendezvous's port waits for the
/// winner's rendezvous to accept; past it, the node stops with an error.
const RENDEZVOUS_RACE: Duration = Duration::from_secs(5);
/// Input lines waiting for the interface, at most.
const INPUT_LINES: usize = 64;

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
    let mut pex_peers = Vec::new();
    for peer in &args.pex_peers {
        pex_peers.push(resolve_like(peer, args.listen_ip).await?);
    }
    if let Some(namespace) = &args.pex_namespace {
        teia_wire::fields::validate_name(namespace)
            .map_err(|e| anyhow::anyhow!("--pex-namespace {namespace:?}: {e}"))?;
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
    // Every listener is bound before the node links to anyone or starts its engine: an
    // address in use ends the start here, at once, with nothing else started.
    let prepared = prepare(&args, &peer_id, &data_dir).await?;
    let mut embedded = None;
    let rendezvous: Option<String> = match (args.rendezvous.clone(), peers.is_empty()) {
        (Some(server), _) => Some(server),
        (None, false) => None,
        (None, true) => {
            embedded = local_rendezvous(data_dir.clone(), args.local_rendezvous).await?;
            Some(args.local_rendezvous.to_string())
        }
    };
    let facts = serde_json::json!({
        "pid": std::process::id(),
        "peer_id": peer_id,
        "key": key.to_string(),
        "started_at": super::status::unix_now(),
        "rendezvous": rendezvous,
        "log": log.file(),
    });
    let config = NodeConfig {
        overlay,
        listen: (!args.no_listen).then_some(SocketAddr::new(args.listen_ip, args.port)),
        // A seed 004 index takes the JOIN's source port for ours.
        share_listen_port: args.index.is_some(),
        rendezvous,
        peers,
        discover_interval: seconds(args.discover_interval, "--discover-interval")?,
        register_ttl: args.register_ttl.clamp(1, 86_400),
        store: Some(store),
        services: vec![
            teia_node::chat::route(),
            teia_files::route(),
            teia_jobs::routed::route(),
        ],
        lan: (!args.no_lan).then(|| teia_node::lan::LanSettings {
            port: args.lan_port,
            broadcast: args.lan_broadcast.clone(),
        }),
        pex: teia_node::pex::PexSettings {
            peers: pex_peers,
            namespace: args.pex_namespace.clone(),
        },
    };
    let started = match start(config).await {
        Ok(started) => started,
        Err(e) => {
            if let Some(stop) = embedded {
                let _ = stop.send(());
            }
            return Err(e.into());
        }
    };
    let (handle, task) = (started.handle.clone(), started.task);
    // Whatever the services and the session end with, the node says BYE and stops.
    let node = (started.handle, started.events, started.inboxes);
    let result = serve(args, data_dir, (trusted, key), prepared, node, (log, facts)).await;
    let _ = handle.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    if let Some(stop) = embedded {
        let _ = stop.send(());
    }
    result
}

/// Starts the services of a started node, attaches them to its router and runs the chat's
/// interface until it ends; stops the services (those started, on a start-up error too).
async fn serve(
    args: NodeArgs,
    data_dir: std::path::PathBuf,
    (trusted, key): (
        Vec<teia_core::identity::PublicKey>,
        teia_core::identity::PublicKey,
    ),
    prepared: Prepared,
    (handle, events, inboxes): (
        teia_node::node::NodeHandle,
        tokio::sync::mpsc::Receiver<teia_node::node::NodeEvent>,
        teia_node::router::Inboxes,
    ),
    (log, facts): (LogControl, serde_json::Value),
) -> anyhow::Result<()> {
    let peer_id = args.home.peer_id(&args.name)?;
    let master = prepared.master.clone();
    let files_config = FilesConfig {
        db: node_file(&data_dir, &peer_id, "files.sqlite3"),
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
    let (files, files_events) = Files::start(files_config, handle.clone()).await?;
    let (chat, chat_service, chat_events) = Chat::start(handle.clone());
    // With the dashboard, the chat's history is kept for the next start.
    let history = args.http.as_ref().and_then(|_| {
        let path = node_file(&data_dir, &peer_id, "chat.sqlite3");
        teia_http::history::ChatHistory::open(&path)
            .map_err(|e| tracing::warn!("{e}; the dashboard keeps this run's chat only"))
            .ok()
    });
    let live = teia_http::live::Live::with_history(&peer_id, history);
    let node_services = teia_http::api::NodeServices {
        peer_id: peer_id.clone(),
        node: handle.clone(),
        chat: chat.clone(),
        files: files.clone(),
        live: Arc::clone(&live),
    };
    let jobs = start_jobs(
        &args,
        &data_dir,
        &peer_id,
        &handle,
        trusted,
        prepared,
        node_services,
    )
    .await;
    let jobs::Jobs {
        engine,
        http_stop,
        http,
    } = match jobs {
        Ok(jobs) => jobs,
        Err(e) => {
            files.shutdown().await;
            return Err(e);
        }
    };
    // The services hear what is addressed to them from the node itself; the session below
    // is the chat's interface and also shows the node's own events (links, dials, the
    // rendezvous). Without an engine, what comes for the jobs service is dropped.
    let mut router = Router::builder(inboxes)
        .service(teia_node::chat::SERVICE, chat_service)?
        .service(teia_files::routed::SERVICE, Arc::new(files.clone()))?;
    if let Some(engine) = &engine {
        router = router.service(
            teia_jobs::proto::messages::SERVICE,
            Arc::new(engine.clone()),
        )?;
    }
    let stop = Stopper::new(http_stop, router.spawn(), handle.clone());
    let status_path = node_file(&data_dir, &peer_id, "status.json");
    let status = tokio::spawn(keep_status(
        status_path.clone(),
        facts,
        Watched {
            node: handle.clone(),
            files: files.clone(),
            engine: engine.clone(),
            master,
            http: http.as_ref().map(|h| h.addr),
        },
    ));
    let style = if args.json { Style::Json } else { Style::Text };
    let interactive = !args.json && std::io::stdin().is_terminal();
    let services = Services {
        chat,
        files: files.clone(),
        stop: stop.clone(),
        http,
    };
    let feeds = Feeds {
        node: events,
        chat: chat_events,
        files: files_events,
    };
    // With the HTTP API, every event also goes to the web (`/events`, the dashboard).
    let feeds = if services.http.is_some() {
        publish(feeds, live)
    } else {
        feeds
    };
    let result = if interactive {
        shell(handle.clone(), services, feeds, log).await
    } else {
        // A node that serves the HTTP API or works for a cluster is a server: the end of its
        // input (`</dev/null`, a service manager) does not stop it; a signal does.
        let server = args.http.is_some() || args.cluster_secret.is_some();
        let stop_at_end = style == Style::Text && !server;
        lines(handle.clone(), services, feeds, style, stop_at_end, log).await
    };
    status.abort();
    let _ = std::fs::remove_file(&status_path);
    stop.stop().await;
    result
}

/// What a node's status file is made of, besides the facts known at start.
struct Watched {
    node: teia_node::node::NodeHandle,
    files: Files,
    engine: Option<teia_jobs::engine::Engine>,
    master: Option<teia_jobs::master::MasterHandle>,
    http: Option<SocketAddr>,
}

/// Rewrites the node's status file (`teia status` reads it) every
/// [`super::status::STATUS_EVERY`] until aborted: the `facts` known at start, its addresses,
/// peers, downloads, evaluations and jobs.
async fn keep_status(path: std::path::PathBuf, facts: serde_json::Value, watched: Watched) {
    use super::status::{DOWNLOADS_LISTED, PEERS_LISTED};
    let mut ticker = tokio::time::interval(super::status::STATUS_EVERY);
    loop {
        ticker.tick().await;
        let mut status = facts.clone();
        let Some(map) = status.as_object_mut() else {
            return;
        };
        let peers: Vec<String> = match watched.node.snapshot().await {
            Ok(snapshot) => snapshot.neighbours.into_iter().map(|n| n.peer).collect(),
            Err(_) => return,
        };
        map.insert("peer_count".into(), peers.len().into());
        map.insert(
            "peers".into(),
            peers
                .into_iter()
                .take(PEERS_LISTED)
                .collect::<Vec<_>>()
                .into(),
        );
        let downloads = watched.files.downloads();
        map.insert("download_count".into(), downloads.len().into());
        let downloads: Vec<serde_json::Value> = downloads
            .iter()
            .take(DOWNLOADS_LISTED)
            .map(|d| serde_json::json!({"name": d.name, "bytes": d.bytes, "size": d.size}))
            .collect();
        map.insert("downloads".into(), downloads.into());
        map.insert(
            "listen".into(),
            serde_json::json!(watched.node.listen_addr().map(|a| a.to_string())),
        );
        map.insert(
            "http".into(),
            serde_json::json!(watched.http.map(|a| a.to_string())),
        );
        if let Some(engine) = &watched.engine {
            map.insert("evaluations_unfinished".into(), engine.unfinished().into());
        }
        if let Some(master) = &watched.master {
            map.insert("jobs_queued".into(), master.waiting().into());
            map.insert("jobs_running".into(), master.running().into());
        }
        map.insert("updated_at".into(), super::status::unix_now().into());
        if let Err(e) = super::status::write(&path, &status).await {
            tracing::debug!(error = %e, path = %path.display(), "status file not written");
        }
    }
}

/// The services whose commands a session offers (`/get`, `/share`, …), and what stops the
/// node.
#[derive(Clone)]
struct Services {
    chat: teia_node::chat::Chat,
    files: Files,
    stop: Stopper,
    /// Where the HTTP API answers and the dashboard's link (said once the node is ready).
    http: Option<jobs::HttpFacts>,
}

/// What a session shows: the node's own events, the chat's, and file sharing's.
struct Feeds {
    node: tokio::sync::mpsc::Receiver<teia_node::node::NodeEvent>,
    chat: tokio::sync::mpsc::Receiver<teia_node::chat::ChatEvent>,
    files: tokio::sync::mpsc::Receiver<teia_files::FilesEvent>,
}

/// Publishes every event of `feeds` to the web as `--json` shows it (the chat's, file
/// sharing's and the node's own), then hands it on, in order, to the interface: the feeds
/// returned, bounded as the ones given. Each feed has a task of its own, so one the
/// interface is slow to read holds up only its own producer, as without the web: the
/// node's events and file sharing's wait for room, the chat's are dropped when the
/// interface lags (an unshown message is handed over again at the next start). A feed whose
/// interface is gone is still read and published.
fn publish(feeds: Feeds, live: Arc<teia_http::live::Live>) -> Feeds {
    use tokio::sync::mpsc::{channel, Receiver, Sender};
    fn forward<T: Send + 'static>(
        mut from: Receiver<T>,
        to: Sender<T>,
        live: Arc<teia_http::live::Live>,
        json: fn(&T) -> Option<serde_json::Value>,
        wait_for_room: bool,
    ) {
        tokio::spawn(async move {
            let mut to = Some(to);
            while let Some(event) = from.recv().await {
                if let Some(json) = json(&event) {
                    live.publish(&json);
                }
                let Some(sender) = &to else { continue };
                let gone = if wait_for_room {
                    sender.send(event).await.is_err()
                } else {
                    matches!(
                        sender.try_send(event),
                        Err(tokio::sync::mpsc::error::TrySendError::Closed(_))
                    )
                };
                if gone {
                    to = None;
                }
            }
        });
    }
    let (node, node_out) = channel(teia_node::node::EVENTS);
    let (chat, chat_out) = channel(teia_node::chat::EVENTS);
    let (files, files_out) = channel(teia_files::service::EVENTS);
    forward(
        feeds.node,
        node,
        Arc::clone(&live),
        describe::event_json,
        true,
    );
    forward(
        feeds.chat,
        chat,
        Arc::clone(&live),
        |event| Some(describe::describe_chat(event).0),
        false,
    );
    forward(
        feeds.files,
        files,
        live,
        |event| Some(crate::commands::files::describe(event).0),
        true,
    );
    Feeds {
        node: node_out,
        chat: chat_out,
        files: files_out,
    }
}

/// Stops a node in order, once, whoever asks first (the session on `/quit`, a signal or the
/// end of its input, or `run` when the session ended): the HTTP API, then the services
/// (their router: deliveries, then each service's tasks), then the overlay (BYE to every
/// neighbour, which ends with the node's `stopped` event).
#[derive(Clone)]
struct Stopper(Arc<tokio::sync::Mutex<Option<Stopping>>>);

/// What a [`Stopper`] stops.
struct Stopping {
    http: Option<tokio::sync::oneshot::Sender<()>>,
    router: Router,
    node: teia_node::node::NodeHandle,
}

impl Stopper {
    fn new(
        http: Option<tokio::sync::oneshot::Sender<()>>,
        router: Router,
        node: teia_node::node::NodeHandle,
    ) -> Self {
        Self(Arc::new(tokio::sync::Mutex::new(Some(Stopping {
            http,
            router,
            node,
        }))))
    }

    /// Stops the node, or waits for the stop under way; nothing the second time.
    async fn stop(&self) {
        let mut stopping = self.0.lock().await;
        let Some(Stopping { http, router, node }) = stopping.take() else {
            return;
        };
        if let Some(http) = http {
            let _ = http.send(());
        }
        router.shutdown().await;
        let _ = node.shutdown().await;
    }
}

/// Whether something accepts connections on the local rendezvous's address.
async fn local_rendezvous_answers(addr: SocketAddr) -> bool {
    let probe =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await;
    matches!(probe, Ok(Ok(_)))
}

/// Checks `addr` (`--local-rendezvous`, 127.0.0.1:8080 by default); when nothing answers
/// there, starts a rendezvous on it. Two nodes
/// started at once both find nothing: the one that binds first runs the rendezvous, the
/// other uses it (it waits up to [`RENDEZVOUS_RACE`] for the winner to accept).
pub(crate) async fn local_rendezvous(
    data_dir: std::path::PathBuf,
    addr: SocketAddr,
) -> anyhow::Result<Option<tokio::sync::oneshot::Sender<()>>> {
    if local_rendezvous_answers(addr).await {
        return Ok(None);
    }
    let mut config = teia_rendezvous::Config::new(addr, data_dir.join("rendezvous"));
    config.max_connections = super::connection_cap(config.max_connections as u64);
    let server = match teia_rendezvous::Server::bind(config).await {
        Ok(server) => server,
        Err(teia_rendezvous::ServerError::Bind { source, .. })
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            let deadline = tokio::time::Instant::now() + RENDEZVOUS_RACE;
            while tokio::time::Instant::now() < deadline {
                if local_rendezvous_answers(addr).await {
                    tracing::info!("another node runs the local rendezvous; using it");
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            bail!(
                "{addr} is taken by a program that does not accept connections; stop it, or \
                 give --local-rendezvous, --rendezvous HOST:PORT or --peer HOST:PORT"
            );
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("no rendezvous answers on {addr} and one cannot be started there")
            })
        }
    };
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

/// `peer` resolved to an address of the family the node listens on when it has one (a
/// peer-exchange peer dials back the address it sees: `localhost` must not be `::1` for a
/// node listening on IPv4).
async fn resolve_like(peer: &str, listen: IpAddr) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(peer)
        .await
        .with_context(|| format!("cannot resolve peer {peer:?}; use HOST:PORT"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4() == listen.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("peer {peer:?} resolves to no address"))
}
