//! `teia send` and `teia receive`: one-shot transfers with a ticket, like `sendme`, or with a
//! short code a person can read out, like magic-wormhole. Each side runs a short-lived node
//! of its own (a fresh key, no peers, nothing kept) with the file-sharing service, so a
//! transfer is the same verified, encrypted data stream as a download between nodes. A
//! code's number is registered at a rendezvous (the local one by default, which `teia send`
//! runs when none does); its words are checked by a PAKE ([`teia_files::proto::code`]).
//!
//! **Bounds**: a code's record lives [`CODE_TTL`] seconds at the rendezvous and is renewed
//! at half of it while `teia send` runs; [`NAMEPLATE_DRAWS`] numbers are drawn before the
//! rendezvous is called full.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use teia_core::identity::PublicKey;
use teia_core::overlay::Config as OverlayConfig;
use teia_files::code::OfferEnd;
use teia_files::proto::code::{Code, MAX_NAMEPLATE, NAMESPACE as CODES};
use teia_files::proto::ticket::{Ticket, PREFIX};
use teia_files::proto::tree::Hash;
use teia_files::{Approval, Files, FilesConfig, FilesEvent, Source};
use teia_node::node::{start, NodeConfig};
use teia_node::rendezvous::RendezvousClient;
use teia_node::router::{Router, ServiceRoute};
use tokio::sync::mpsc;

use super::files::describe;
use super::shutdown_signal;
use crate::cli::{CodeRendezvous, ReceiveArgs, SendArgs};
use crate::present::human_bytes;

/// Seconds a code's rendezvous record lives (renewed at half of it).
const CODE_TTL: u32 = 600;
/// How often a code's record at a local rendezvous is checked (and the rendezvous run here
/// when the node that ran it stopped).
const LOCAL_RENEW: Duration = Duration::from_secs(1);
/// How long a receiver waits for a local rendezvous that does not answer (it changes hands
/// when the node that ran it stops).
const LOCAL_HANDOVER: Duration = Duration::from_secs(3);
/// Numbers drawn for a code before the rendezvous is called full.
const NAMEPLATE_DRAWS: usize = 32;

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
        pex: Default::default(),
        share_listen_port: false,
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
    let rendezvous_dir = Scratch::new("send-rendezvous")?;
    let offer = if args.no_code {
        None
    } else {
        match offer_code(&args.codes, args.listen.ip(), &encoded, &rendezvous_dir.0).await {
            Ok(offer) => Some(offer),
            Err(e) => {
                eprintln!("no short code: {e:#}; the ticket works without one");
                None
            }
        }
    };
    let code = offer.as_ref().map(|o| o.code.to_string());
    if args.json {
        println!(
            "{}",
            json!({"event":"ticket","ticket":encoded,"code":code,"hash":ticket.hash,
                   "size":ticket.size,"name":ticket.name,"addrs":ticket.addrs})
        );
    } else {
        println!(
            "sending {} ({}), BLAKE3 {}",
            summary.path.display(),
            human_bytes(file.size),
            ticket.hash
        );
        match &code {
            Some(code) => println!(
                "to receive it, run:\n\n  teia receive {code}\n\n(one receiver, one try: a wrong \
                 code voids it; beyond this machine{}, add --rendezvous HOST:PORT on both \
                 sides)\nor, for anyone, the ticket:\n  teia receive {encoded}\n",
                if args.codes.lan().is_some() {
                    " and its LAN"
                } else {
                    ""
                }
            ),
            None => println!("to receive it, run:\n\n  teia receive {encoded}\n"),
        }
        println!("serving until Ctrl-C");
    }
    let _ = std::io::stdout().flush();
    let mut shot = shot;
    let (ended_tx, mut ended) = mpsc::channel::<OfferEnd>(1);
    let mut code_open = offer.is_some();
    let mut offer = offer;
    if let Some(offer) = offer.as_mut() {
        if let Some(task) = offer.task.take() {
            tokio::spawn(async move {
                if let Ok(end) = task.await {
                    let _ = ended_tx.send(end).await;
                }
            });
        }
    }
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            end = ended.recv(), if code_open => {
                code_open = false;
                if let (Some(end), Some(offer)) = (end, offer.as_mut()) {
                    say_offer_end(&end, &offer.code, args.json);
                    offer.withdraw().await;
                }
            }
            event = shot.events.recv() => {
                let Some(event) = event else { break };
                if let FilesEvent::Served { .. } = &event {
                    let (json, text) = describe(&event);
                    if args.json {
                        println!("{json}");
                    } else {
                        println!("{text}");
                    }
                }
            }
        }
    }
    if let Some(offer) = offer.as_mut() {
        if code_open {
            offer.withdraw().await;
        }
    }
    let _ = shot.node.shutdown().await;
    Ok(())
}

/// A short code on offer: what ends it, and what to withdraw at the end.
struct CodeOffer {
    code: Code,
    /// Answers exchanges until one proves the code or a proof is wrong (taken to wait on).
    task: Option<tokio::task::JoinHandle<OfferEnd>>,
    /// The code's record at the rendezvous, if it has one, and what renews it.
    record: Option<(RendezvousClient, tokio::task::JoinHandle<()>)>,
    /// Answers the LAN's searches for the code's number, if it does.
    lan: Option<tokio::task::JoinHandle<()>>,
    port: u16,
    /// Stops the local rendezvous this sender runs, if it runs one.
    _local: Option<tokio::sync::oneshot::Sender<()>>,
}

impl CodeOffer {
    /// Removes the code's record and stops answering for it (a local rendezvous it runs
    /// keeps running until the offer is dropped).
    async fn withdraw(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(lan) = self.lan.take() {
            lan.abort();
        }
        if let Some((client, renew)) = self.record.take() {
            renew.abort();
            let name = self.code.nameplate.to_string();
            if let Err(e) = client.unregister(CODES, Some(&name), Some(self.port)).await {
                tracing::debug!(error = %e, "code record not removed (it expires)");
            }
        }
    }
}

/// Draws a code whose number is free at the rendezvous and on the LAN, registers it at the
/// rendezvous and answers the LAN's searches for it, and answers exchanges for it with
/// `ticket` on a listener of its own on `ip`. On a loopback rendezvous that nothing
/// answers, runs one (its database in `dir`). It needs one of the two ways found.
async fn offer_code(
    meeting: &CodeRendezvous,
    ip: std::net::IpAddr,
    ticket: &str,
    dir: &Path,
) -> anyhow::Result<CodeOffer> {
    let rendezvous = meeting.rendezvous.as_str();
    let lan = meeting.lan();
    let mut local = None;
    if let Ok(addr) = rendezvous.parse::<SocketAddr>() {
        if addr.ip().is_loopback() {
            match super::node::local_rendezvous(dir.to_path_buf(), addr).await {
                Ok(started) => local = started,
                Err(e) => tracing::info!(error = %e, "no local rendezvous for the code"),
            }
        }
    }
    let client = RendezvousClient::new(rendezvous)
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(5));
    let taken = client.discover(Some(CODES)).await;
    if let (Err(e), None) = (&taken, &lan) {
        bail!("the rendezvous {rendezvous} does not answer ({e}) and LAN discovery is off");
    }
    let taken: Vec<String> = taken
        .as_ref()
        .map(|records| records.iter().map(|r| r.name.clone()).collect())
        .unwrap_or_default();
    let mut nameplate = None;
    for _ in 0..NAMEPLATE_DRAWS {
        let mut draw = [0u8; 2];
        getrandom::fill(&mut draw).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let number = u32::from(u16::from_le_bytes(draw)) % MAX_NAMEPLATE + 1;
        if taken.contains(&number.to_string()) {
            continue;
        }
        if let Some(lan) = &lan {
            if teia_files::code::find_on_lan(lan, number, 1)
                .await
                .is_some()
            {
                continue;
            }
        }
        nameplate = Some(number);
        break;
    }
    let nameplate = nameplate.context("every code number drawn is taken")?;
    let code = Code::random(nameplate)?;
    let listener = tokio::net::TcpListener::bind((ip, 0))
        .await
        .context("cannot listen for code exchanges")?;
    let port = listener.local_addr()?.port();
    let name = nameplate.to_string();
    let record = match client.register(CODES, &name, port, CODE_TTL).await {
        Ok(_) => {
            // The local rendezvous changes hands when the node that runs it stops: checked
            // every LOCAL_RENEW, and run here when it is gone.
            let local_addr = rendezvous
                .parse::<SocketAddr>()
                .ok()
                .filter(|a| a.ip().is_loopback());
            let every = if local_addr.is_some() {
                LOCAL_RENEW
            } else {
                Duration::from_secs(u64::from(CODE_TTL / 2))
            };
            let dir = dir.to_path_buf();
            let renew = tokio::spawn({
                let client = client.clone();
                async move {
                    let mut hosted = None;
                    loop {
                        tokio::time::sleep(every).await;
                        let Err(e) = client.register(CODES, &name, port, CODE_TTL).await else {
                            continue;
                        };
                        match (local_addr, &hosted) {
                            (Some(addr), None) => {
                                hosted = super::node::local_rendezvous(dir.clone(), addr)
                                    .await
                                    .ok()
                                    .flatten();
                                let _ = client.register(CODES, &name, port, CODE_TTL).await;
                            }
                            _ => {
                                tracing::warn!(error = %e, "the code's record could not be renewed")
                            }
                        }
                    }
                }
            });
            Some((client, renew))
        }
        Err(e) => {
            tracing::info!(%rendezvous, error = %e, "the code is not at the rendezvous");
            None
        }
    };
    let mut answering = None;
    if let Some(lan) = &lan {
        match teia_files::code::answer_on_lan(lan, nameplate, port).await {
            Ok(answer) => answering = Some(tokio::spawn(answer)),
            Err(e) => tracing::info!(port = lan.port, error = %e, "the code is not on the LAN"),
        }
    }
    if record.is_none() && answering.is_none() {
        bail!("neither the rendezvous {rendezvous} nor the LAN can carry the code");
    }
    let task = tokio::spawn(teia_files::code::offer(
        listener,
        code.clone(),
        ticket.to_owned(),
    ));
    Ok(CodeOffer {
        code,
        task: Some(task),
        record,
        lan: answering,
        port,
        _local: local,
    })
}

/// Says how the offer of `code` ended.
fn say_offer_end(end: &OfferEnd, code: &Code, json: bool) {
    match (end, json) {
        (OfferEnd::Used { by }, true) => {
            println!(
                "{}",
                json!({"event":"code_used","code":code.to_string(),"by":by.to_string()})
            )
        }
        (OfferEnd::Voided { by }, true) => {
            println!(
                "{}",
                json!({"event":"code_void","code":code.to_string(),"by":by.to_string()})
            )
        }
        (OfferEnd::Used { by }, false) => println!(
            "… code {code} used by {}: the ticket went there (the code is spent)",
            by.ip()
        ),
        (OfferEnd::Voided { by }, false) => println!(
            "! {} gave a wrong code: {code} is void (one try per code); the ticket still works",
            by.ip()
        ),
    }
}

/// The ticket of a code: the sender's number looked up at the rendezvous, else on the LAN,
/// then the exchange.
async fn redeem_code(meeting: &CodeRendezvous, code: &Code) -> anyhow::Result<String> {
    let rendezvous = meeting.rendezvous.as_str();
    let name = code.nameplate.to_string();
    let client = RendezvousClient::new(rendezvous)
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(5));
    let local = rendezvous
        .parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    let deadline = tokio::time::Instant::now() + LOCAL_HANDOVER;
    let mut records = client.discover(Some(CODES)).await;
    while records.is_err() && local && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        records = client.discover(Some(CODES)).await;
    }
    let at_rendezvous = match records {
        Ok(records) => match records.iter().find(|record| record.name == name) {
            Some(record) => match record.ip.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SocketAddr::new(ip, record.port)),
                Err(_) => Err(format!(
                    "the rendezvous {rendezvous} gave no address for it"
                )),
            },
            None => Err(format!("it is not at the rendezvous {rendezvous}")),
        },
        Err(e) => Err(format!("the rendezvous {rendezvous} does not answer ({e})")),
    };
    let addr = match (at_rendezvous, meeting.lan()) {
        (Ok(addr), _) => addr,
        (Err(why), None) => bail!(
            "no sender has code number {name}: {why}, and LAN discovery is off; a code works \
             only while its `teia send` runs (give the rendezvous it used with --rendezvous, \
             or use the ticket)"
        ),
        (Err(why), Some(lan)) => {
            match teia_files::code::find_on_lan(&lan, code.nameplate, teia_files::code::LAN_ROUNDS)
                .await
            {
                Some(addr) => addr,
                None => bail!(
                    "no sender has code number {name}: {why}, and none answered on the LAN; a \
                     code works only while its `teia send` runs (give the rendezvous it used \
                     with --rendezvous, or use the ticket)"
                ),
            }
        }
    };
    Ok(teia_files::code::redeem(addr, code).await?)
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
    let given = args.ticket.trim();
    let text = if given.starts_with(PREFIX) {
        given.to_owned()
    } else {
        match Code::parse(given) {
            Ok(code) => redeem_code(&args.codes, &code).await?,
            Err(_) => bail!(
                "{} is neither a code (like 7-maple-otter) nor a ticket (teia1…): copy what \
                 `teia send` printed",
                crate::present::clean(given)
            ),
        }
    };
    let ticket = Ticket::decode(&text)?;
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
