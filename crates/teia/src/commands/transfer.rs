//! `teia send` and `teia receive`: one-shot transfers with a ticket, like `sendme`. Each side
//! runs a short-lived node of its own (a fresh key, no rendezvous, no peers, nothing kept)
//! with the file-sharing service, so a transfer is the same verified, encrypted data stream
//! as a download between nodes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use teia_core::identity::PublicKey;
use teia_core::overlay::Config as OverlayConfig;
use teia_files::proto::ticket::Ticket;
use teia_files::proto::tree::Hash;
use teia_files::{Approval, Files, FilesConfig, FilesEvent, Source};
use teia_node::node::{start, NodeConfig};
use teia_node::router::{Router, ServiceRoute};
use tokio::sync::mpsc;

use super::files::describe;
use super::shutdown_signal;
use crate::cli::{ReceiveArgs, SendArgs};
use crate::present::human_bytes;

/// A scratch folder for a one-shot node's database, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(role: &str) -> anyhow::Result<Self> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let dir = std::env::temp_dir().join(format!(
            "teia-{role}-{}-{}",
            std::process::id(),
            u64::from_le_bytes(nonce)
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct OneShot {
    files: Files,
    events: mpsc::Receiver<FilesEvent>,
    node: teia_node::node::NodeHandle,
    /// Feeds `files` its streams while the one-shot node runs.
    _router: Router,
    key: PublicKey,
    peer_id: String,
    _scratch: Scratch,
}

async fn one_shot(
    role: &str,
    listen: Option<SocketAddr>,
    shares: Vec<PathBuf>,
    download_dir: PathBuf,
) -> anyhow::Result<OneShot> {
    let scratch = Scratch::new(role)?;
    let identity = teia_node::identity::ephemeral()?;
    let key = identity.public_key();
    let peer_id = format!("{role}-{}@teia", key.fingerprint());
    let mut overlay = OverlayConfig::new(peer_id.clone());
    overlay.identity = Some(identity);
    let config = NodeConfig {
        overlay,
        listen,
        rendezvous: None,
        peers: Vec::new(),
        discover_interval: Duration::from_secs(3600),
        register_ttl: 60,
        store: None,
        // Streams only: a one-shot node answers no course program.
        services: vec![ServiceRoute::new(teia_files::routed::SERVICE)
            .stream(teia_files::routed::DIAL_BACK_STREAM)],
        lan: None,
    };
    let started = start(config).await?;
    let (node, mut node_events) = (started.handle, started.events);
    tokio::spawn(async move { while node_events.recv().await.is_some() {} });
    let files_config = FilesConfig {
        db: scratch.0.join("files.sqlite3"),
        shares,
        approval: Approval::All,
        trusted: Vec::new(),
        download_dir,
        listen: node.listen_addr(),
        key,
        upload_limit: None,
        peer_id: peer_id.clone(),
        index: None,
    };
    let (files, events) = Files::start(files_config, node.clone()).await?;
    let router = Router::builder(started.inboxes)
        .service(teia_files::routed::SERVICE, Arc::new(files.clone()))?
        .spawn();
    Ok(OneShot {
        files,
        events,
        node,
        _router: router,
        key,
        peer_id,
        _scratch: scratch,
    })
}

/// `teia send PATH`: serves one file until interrupted.
pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    let path = args
        .path
        .canonicalize()
        .with_context(|| format!("cannot read {}", args.path.display()))?;
    if !path.is_file() {
        bail!(
            "{} is not a file; send one file (folders: share them with teia node --share)",
            path.display()
        );
    }
    let shot = one_shot("send", Some(args.listen), Vec::new(), PathBuf::from(".")).await?;
    let summary = shot.files.share(&path).await?;
    let (_, shared) = shot.files.shared()?;
    let file = shared
        .into_iter()
        .find(|f| f.path == path)
        .with_context(|| format!("{} could not be hashed", path.display()))?;
    let listen = shot
        .node
        .listen_addr()
        .context("the sender is not listening")?;
    let ticket = Ticket {
        hash: file.hash.to_hex(),
        size: file.size,
        name: path
            .file_name()
            .map_or_else(|| file.hash.to_hex(), |n| n.to_string_lossy().into_owned()),
        peer_id: shot.peer_id.clone(),
        key: shot.key.to_string(),
        addrs: teia_files::service::reachable(listen)
            .iter()
            .map(ToString::to_string)
            .collect(),
    };
    let encoded = ticket.encode();
    if args.json {
        println!(
            "{}",
            json!({"event":"ticket","ticket":encoded,"hash":ticket.hash,"size":ticket.size,
                   "name":ticket.name,"addrs":ticket.addrs})
        );
    } else {
        println!(
            "sending {} ({}), BLAKE3 {}\nto receive it, run:\n\n  teia receive {encoded}\n\nserving until Ctrl-C",
            summary.path.display(),
            human_bytes(file.size),
            ticket.hash
        );
    }
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    let _ = shot.node.shutdown().await;
    Ok(())
}

/// The addresses a ticket's sender served on, for people.
fn where_sent(ticket: &Ticket) -> String {
    ticket
        .addrs
        .iter()
        .take(3)
        .map(|a| crate::present::clean(a))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `teia receive TICKET`: fetches, verifies, exits 0 when the file is on disk.
pub async fn receive(args: ReceiveArgs) -> anyhow::Result<()> {
    let ticket = Ticket::decode(&args.ticket)?;
    let hash = Hash::from_hex(&ticket.hash).context("the ticket's hash is not 64 hex digits")?;
    let key = PublicKey::parse(&ticket.key).context("the ticket's key is malformed")?;
    let addrs: Vec<SocketAddr> = ticket
        .addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .take(8)
        .collect();
    if addrs.is_empty() {
        bail!("the ticket has no address to fetch from");
    }
    std::fs::create_dir_all(&args.to)
        .with_context(|| format!("cannot create {}", args.to.display()))?;
    let mut shot = one_shot("receive", None, Vec::new(), args.to.clone()).await?;
    shot.files.add_source(
        hash,
        Source {
            peer_id: ticket.peer_id.clone(),
            key,
            addrs,
        },
    );
    let name = Path::new(&ticket.name)
        .file_name()
        .map_or_else(|| ticket.hash.clone(), |n| n.to_string_lossy().into_owned());
    shot.files
        .get_named(hash, &name, ticket.size, Some(args.to.clone()))
        .await?;
    let bar = (!args.json).then(|| {
        let bar = indicatif::ProgressBar::new(ticket.size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("#>."),
        );
        bar.set_message(crate::present::clean(&name));
        bar
    });
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let result = loop {
        let event = tokio::select! {
            () = &mut signal => break Err(anyhow::anyhow!("interrupted; run the same command again to resume")),
            event = shot.events.recv() => event,
        };
        let Some(event) = event else {
            break Err(anyhow::anyhow!("the transfer stopped"));
        };
        if args.json {
            println!("{}", describe(&event).0);
        }
        match &event {
            FilesEvent::Progress(info) => {
                if let Some(bar) = &bar {
                    bar.set_position(info.bytes);
                }
            }
            FilesEvent::Done {
                path,
                already_here: true,
                ..
            } => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                    println!("✓ {} already here, whole and verified", path.display());
                }
                break Ok(());
            }
            FilesEvent::Done { info, path, .. } => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                    let rate = info.fetched as f64 / info.seconds.max(1e-6);
                    println!(
                        "✓ {} verified ({}, {}/s)",
                        path.display(),
                        human_bytes(ticket.size),
                        human_bytes(rate as u64)
                    );
                }
                break Ok(());
            }
            FilesEvent::Failed { reason, .. } => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                break Err(anyhow::anyhow!("{reason}"));
            }
            // A ticket names one sender: without it, nothing more can come.
            FilesEvent::HolderDropped {
                reason,
                unreachable,
                ..
            } => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                tracing::info!(%reason, "the sender was dropped");
                break Err(if *unreachable {
                    anyhow::anyhow!(
                        "the sender cannot be reached at {}: its `teia send` has stopped, or a \
                         firewall is in the way; ask for it to be run again, then run this \
                         command again (what arrived so far is kept)",
                        where_sent(&ticket)
                    )
                } else {
                    anyhow::anyhow!(
                        "the sender stopped the transfer ({}); run this command again to \
                         resume (what arrived so far is kept)",
                        crate::present::clean(reason)
                    )
                });
            }
            _ => {}
        }
    };
    let _ = shot.node.shutdown().await;
    result
}
