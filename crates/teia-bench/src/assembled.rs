//! Nodes assembled in this process the way `teia node` assembles them, without the binary:
//! the node started with the file service's route, the service attached through the router.
//! Used by the files benchmark to time a `/get` through the service API with no process,
//! terminal or JSON in between, beside the same `/get` between two `teia node` processes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use teia_core::overlay::{Config as OverlayConfig, Event};
use teia_files::{Files, FilesConfig, FilesEvent};
use teia_node::node::{start, NodeConfig, NodeEvent, NodeHandle};
use teia_node::router::Router;
use tokio::sync::mpsc;

/// Longest wait for one event (indexing a large share included).
const WAIT: Duration = Duration::from_secs(600);

/// One node with file sharing, assembled in-process.
struct Assembled {
    files: Files,
    files_events: mpsc::Receiver<FilesEvent>,
    node_events: mpsc::Receiver<NodeEvent>,
    listen: SocketAddr,
    router: Router,
    node: NodeHandle,
}

impl Assembled {
    /// Stops the services, then the node.
    async fn stop(self) {
        self.router.shutdown().await;
        let _ = self.node.shutdown().await;
    }
}

/// Starts a node named `name` with its data in `dir`, sharing `shares`, linked to `peers`;
/// the binary's defaults otherwise (durable store, signatures, approval `all`).
async fn assemble(
    name: &str,
    dir: &Path,
    shares: Vec<PathBuf>,
    peers: Vec<SocketAddr>,
) -> anyhow::Result<Assembled> {
    std::fs::create_dir_all(dir)?;
    let identity = teia_node::identity::load_or_create(&dir.join(format!("{name}.key")))?;
    let key = identity.public_key();
    let peer_id = format!("{name}@bench");
    let mut overlay = OverlayConfig::new(peer_id.clone());
    overlay.identity = Some(identity);
    let config = NodeConfig {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        peers,
        store: Some(dir.join(format!("{name}.sqlite3"))),
        services: vec![teia_files::route()],
        ..NodeConfig::new(overlay)
    };
    let started = start(config).await?;
    let listen = started
        .handle
        .listen_addr()
        .context("the node does not listen")?;
    let files_config = FilesConfig::defaults(
        dir.join(format!("{name}.files.sqlite3")),
        dir.join(format!("{name}-downloads")),
        shares,
        (key, peer_id),
        Some(listen),
    );
    let (files, files_events) = Files::start(files_config, started.handle.clone()).await?;
    let router = Router::builder(started.inboxes)
        .service(teia_files::routed::SERVICE, Arc::new(files.clone()))?
        .spawn();
    Ok(Assembled {
        files,
        files_events,
        node_events: started.events,
        listen,
        router,
        node: started.handle,
    })
}

/// The first event of `events` that `pick` takes, within [`WAIT`].
async fn until<E, T>(
    what: &str,
    events: &mut mpsc::Receiver<E>,
    mut pick: impl FnMut(E) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events
                .recv()
                .await
                .with_context(|| format!("the events ended before {what}"))?;
            if let Some(found) = pick(event)? {
                return Ok(found);
            }
        }
    })
    .await
    .with_context(|| format!("no {what} within {WAIT:?}"))?
}

/// A `/get` of `file` (of `size` bytes, in `share`) between two assembled nodes, timed from
/// the call to the verified file on disk. Returns bytes per second.
pub async fn get(work: &Path, share: &Path, file: &str, size: u64) -> anyhow::Result<f64> {
    let mut holder = assemble(
        "holder",
        &work.join("assembled"),
        vec![share.to_owned()],
        Vec::new(),
    )
    .await?;
    until("the share indexed", &mut holder.files_events, |e| {
        Ok(matches!(e, FilesEvent::Shared { .. }).then_some(()))
    })
    .await?;
    let mut seeker = assemble(
        "seeker",
        &work.join("assembled"),
        Vec::new(),
        vec![holder.listen],
    )
    .await?;
    until("the link", &mut seeker.node_events, |e| {
        Ok(match e {
            NodeEvent::Overlay(Event::LinkUp { peer, .. }) if peer == "holder@bench" => Some(()),
            _ => None,
        })
    })
    .await?;
    seeker.files.search(file).await?;
    let hash = until("the search's answer", &mut seeker.files_events, |e| {
        Ok(match e {
            FilesEvent::SearchResults { files, .. } => files
                .into_iter()
                .find(|f| f.size == size && f.name.ends_with(file))
                .map(|f| f.hash),
            _ => None,
        })
    })
    .await?;
    let target = work.join("assembled-out");
    let began = Instant::now();
    seeker.files.get(&hash, Some(target.clone())).await?;
    let bytes = until(
        "the download's end",
        &mut seeker.files_events,
        |e| match e {
            FilesEvent::Done { info, .. } if info.hash.to_hex() == hash => Ok(Some(info.bytes)),
            FilesEvent::Failed { reason, .. } => anyhow::bail!("the download failed: {reason}"),
            _ => Ok(None),
        },
    )
    .await?;
    let seconds = began.elapsed().as_secs_f64();
    anyhow::ensure!(bytes == size, "got {bytes} bytes of {size}");
    seeker.stop().await;
    holder.stop().await;
    let _ = std::fs::remove_dir_all(&target);
    Ok(size as f64 / seconds)
}
