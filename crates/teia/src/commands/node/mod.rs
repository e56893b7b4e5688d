//! `teia node`: runs a node, its services on the node's router, and the chat's interface:
//! the interactive shell on a terminal, plain text lines otherwise, or JSON events with
//! `--json`. Here the node is assembled and stopped; [`jobs`] starts the job engine and its
//! HTTP API, [`session`] is the chat's interface, [`describe`] puts events into words.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use teia_core::overlay::Config as OverlayConfig;
use teia_files::{Files, FilesConfig};
use teia_node::node::{start, NodeConfig};
use teia_node::router::Router;

use super::{data_dir, node_file, seconds};
use crate::cli::NodeArgs;
use crate::logging::LogControl;

mod describe;
mod jobs;
mod session;

use jobs::{start_jobs, start_master};
use session::{lines, shell};

/// The rendezvous a node uses when told of none.
const LOCAL_RENDEZVOUS: &str = "127.0.0.1:8080";
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
        services: vec![teia_files::route(), teia_jobs::routed::route()],
        lan: (!args.no_lan).then(|| teia_node::lan::LanSettings {
            port: args.lan_port,
            broadcast: args.lan_broadcast.clone(),
        }),
    };
    let started = start(config).await?;
    let (handle, events, task) = (started.handle, started.events, started.task);
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
    let (files, files_events) = Files::start(files_config, handle.clone()).await?;
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
    // The services hear what is addressed to them from the node itself; the session below
    // is the chat's interface and hears the rest. Without an engine, what comes for the
    // jobs service is dropped.
    let mut router = Router::builder(started.inboxes)
        .service(teia_files::routed::SERVICE, Arc::new(files.clone()))?;
    if let Some(engine) = &engine {
        router = router.service(
            teia_jobs::proto::messages::SERVICE,
            Arc::new(engine.clone()),
        )?;
    }
    let router = router.spawn();
    let style = if args.json { Style::Json } else { Style::Text };
    let interactive = !args.json && std::io::stdin().is_terminal();
    let services = Services {
        files: files.clone(),
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
    router.shutdown().await;
    let _ = handle.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    if let Some(stop) = embedded {
        let _ = stop.send(());
    }
    result
}

/// The services whose commands a session offers (`/get`, `/share`, …).
#[derive(Clone)]
struct Services {
    files: Files,
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
