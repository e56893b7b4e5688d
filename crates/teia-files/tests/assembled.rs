//! A node with file sharing assembled in-process, without the binary: the node started with
//! the service's route, the service attached through the router. Two such nodes find a file
//! by a search flooded through the overlay and download it over a data stream, verified.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use teia_core::overlay::{Config as OverlayConfig, Event};
use teia_files::{Files, FilesConfig, FilesEvent};
use teia_node::node::{start, NodeConfig, NodeEvent};
use teia_node::router::Router;
use tokio::sync::mpsc;

/// Longest wait for one event; the machine may be busy.
const WAIT: Duration = Duration::from_secs(60);

/// One node with file sharing.
struct Assembled {
    files: Files,
    files_events: mpsc::Receiver<FilesEvent>,
    node_events: mpsc::Receiver<NodeEvent>,
    listen: SocketAddr,
    router: Router,
}

async fn assemble(
    name: &str,
    dir: &Path,
    shares: Vec<PathBuf>,
    peers: Vec<SocketAddr>,
) -> Assembled {
    let identity = teia_node::identity::ephemeral().unwrap();
    let key = identity.public_key();
    let peer_id = format!("{name}@test");
    let mut overlay = OverlayConfig::new(peer_id.clone());
    overlay.identity = Some(identity);
    let config = NodeConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        peers,
        services: vec![teia_files::route()],
        ..NodeConfig::new(overlay)
    };
    let started = start(config).await.unwrap();
    let listen = started.handle.listen_addr().unwrap();
    let files_config = FilesConfig::defaults(
        dir.join(format!("{name}.sqlite3")),
        dir.join(format!("{name}-downloads")),
        shares,
        (key, peer_id),
        Some(listen),
    );
    let (files, files_events) = Files::start(files_config, started.handle.clone())
        .await
        .unwrap();
    let router = Router::builder(started.inboxes)
        .service(teia_files::routed::SERVICE, Arc::new(files.clone()))
        .unwrap()
        .spawn();
    Assembled {
        files,
        files_events,
        node_events: started.events,
        listen,
        router,
    }
}

/// The first event of `events` that `pick` takes, within [`WAIT`].
async fn until<E, T>(events: &mut mpsc::Receiver<E>, mut pick: impl FnMut(E) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.recv().await.expect("the events ended");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    })
    .await
    .expect("the event never came")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_assembled_nodes_find_and_download_a_file_through_their_routers() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(shared.join("quarterly report.bin"), &content).unwrap();

    let mut holder = assemble("holder", dir.path(), vec![shared], Vec::new()).await;
    until(&mut holder.files_events, |e| {
        matches!(e, FilesEvent::Shared { .. }).then_some(())
    })
    .await;
    let mut seeker = assemble("seeker", dir.path(), Vec::new(), vec![holder.listen]).await;
    until(&mut seeker.node_events, |e| match e {
        NodeEvent::Overlay(Event::LinkUp { peer, .. }) if peer == "holder@test" => Some(()),
        _ => None,
    })
    .await;

    seeker.files.search("quarterly").await.unwrap();
    let hash = until(&mut seeker.files_events, |e| match e {
        FilesEvent::SearchResults { holder, files, .. } if holder == "holder@test" => {
            files.into_iter().next().map(|f| f.hash)
        }
        _ => None,
    })
    .await;
    let target = dir.path().join("got");
    let started = seeker.files.get(&hash, Some(target.clone())).await.unwrap();
    assert_eq!(started, hash);
    let path = until(&mut seeker.files_events, |e| match e {
        FilesEvent::Done { info, path, .. } if info.hash.to_hex() == hash => Some(path),
        FilesEvent::Failed { reason, .. } => panic!("the download failed: {reason}"),
        _ => None,
    })
    .await;
    assert_eq!(std::fs::read(path).unwrap(), content);

    seeker.router.shutdown().await;
    holder.router.shutdown().await;
}
