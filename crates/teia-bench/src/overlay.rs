//! The overlay benchmark: real teia nodes (the `teia-node` runtime, real TCP on loopback)
//! in this process. SEND→ACK round trips over 0, 1 and 3 relays and PUB throughput over one
//! link, each in plaintext, with encrypted links, and with encrypted links plus origin
//! signatures, compared as ratios to plaintext and to raw TCP lines measured in the same run;
//! one PUB flooding a 100-node mesh.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use teia_core::identity::Identity;
use teia_core::overlay::{Config as OverlayConfig, Event};
use teia_node::node::{start, NodeConfig, NodeEvent, NodeHandle};
use tokio::sync::mpsc;

use crate::load::mix;

/// Flags of the overlay benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// SENDs per round-trip measurement.
    #[arg(long, default_value_t = 200)]
    sends: usize,
    /// PUBs in the throughput measurement.
    #[arg(long, default_value_t = 100_000)]
    pubs: usize,
    /// Nodes in the mesh.
    #[arg(long, default_value_t = 100)]
    mesh: usize,
    /// PUBs flooded through the mesh (the median is reported).
    #[arg(long, default_value_t = 5)]
    floods: usize,
    /// Keep the chain's messages in memory only (no SQLite), to see what the durable
    /// writes cost in the round trip.
    #[arg(long)]
    memory: bool,
    /// Parts to run (all when none is given): round trips, PUB throughput, mesh flood.
    #[arg(long, value_enum)]
    part: Vec<Part>,
}

/// One part of the overlay benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// SEND -> ACK round trips over 0, 1 and 3 relays.
    Rtt,
    /// PUB throughput over one link and through a relay.
    Pub,
    /// One PUB flooding a mesh.
    Mesh,
}

/// Tasks publishing at once in the PUB throughput measurement.
const PUBLISHERS: usize = 32;

/// How the benchmark's nodes secure their links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Security {
    /// No identity: plaintext links (trusted as teia), no signatures.
    Plaintext,
    /// Encrypted, authenticated links; no origin signatures.
    Encrypted,
    /// Encrypted links and origin signatures: what `teia node` runs.
    Signed,
}

impl Security {
    const ALL: [Self; 3] = [Self::Plaintext, Self::Encrypted, Self::Signed];

    fn label(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Encrypted => "encrypted",
            Self::Signed => "encrypted+signed",
        }
    }
}

/// A node of the benchmark: its handle, address and the events it delivers.
struct BenchNode {
    handle: NodeHandle,
    addr: SocketAddr,
    events: mpsc::Receiver<(Instant, Event)>,
}

/// Starts a node; with `store`, its SENDs and deliveries are kept in SQLite there, as the
/// `teia node` binary keeps them.
async fn spawn_node(
    name: &str,
    peers: Vec<SocketAddr>,
    neighbours: usize,
    store: Option<std::path::PathBuf>,
    security: Security,
) -> anyhow::Result<BenchNode> {
    let mut overlay = OverlayConfig::new(format!("{name}@bench"));
    overlay.target_neighbours = neighbours;
    overlay.seed = mix(name.len() as u64 ^ name.bytes().map(u64::from).sum::<u64>() << 8);
    let mut secret = [0u8; 32];
    for (byte, value) in secret
        .iter_mut()
        .zip(overlay.seed.to_le_bytes().iter().cycle())
    {
        *byte = *value;
    }
    match security {
        Security::Plaintext => {
            overlay.plaintext_teia = true;
            overlay.sign_messages = false;
        }
        Security::Encrypted => {
            overlay.identity = Some(Identity::from_seed(&secret));
            overlay.sign_messages = false;
        }
        Security::Signed => overlay.identity = Some(Identity::from_seed(&secret)),
    }
    let config = NodeConfig {
        listen: Some("127.0.0.1:0".parse()?),
        peers,
        store,
        ..NodeConfig::new(overlay)
    };
    let started = start(config).await?;
    let (handle, mut raw) = (started.handle, started.events);
    let addr = match raw.recv().await {
        Some(NodeEvent::Ready {
            listen: Some(addr), ..
        }) => addr,
        _ => bail!("node {name} did not start"),
    };
    let (tx, events) = mpsc::channel(1 << 16);
    tokio::spawn(async move {
        while let Some(event) = raw.recv().await {
            if let NodeEvent::Overlay(event) = event {
                if tx.send((Instant::now(), event)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(BenchNode {
        handle,
        addr,
        events,
    })
}

async fn wait_links(node: &mut BenchNode, count: usize) -> anyhow::Result<()> {
    let mut up = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while up < count {
        match tokio::time::timeout_at(deadline, node.events.recv()).await {
            Ok(Some((_, Event::LinkUp { .. }))) => up += 1,
            Ok(Some(_)) => {}
            _ => bail!("links did not come up"),
        }
    }
    Ok(())
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    println!("overlay benchmark (teia nodes in this process, real TCP on 127.0.0.1)");
    let runs = |part| args.part.is_empty() || args.part.contains(&part);
    if runs(Part::Rtt) {
        println!(
            "{:<34} {:>9} {:>9} {:>12}",
            "SEND -> ACK round trip", "p50 ms", "p99 ms", "p50 ratio"
        );
        let mut plaintext = Vec::new();
        for security in Security::ALL {
            let p50s = round_trips(&args, security, &plaintext).await?;
            if security == Security::Plaintext {
                plaintext = p50s;
            }
        }
    }
    if runs(Part::Pub) {
        pub_throughput(&args).await?;
    }
    if runs(Part::Mesh) {
        mesh_flood(&args).await?;
    }
    Ok(())
}

/// A chain n0 - n1 - n2 - n3 - n4, each linked only to its neighbours in the chain, each
/// keeping its SENDs and deliveries in SQLite as `teia node` does.
/// Returns the p50 of each distance; prints them with their ratio to `plaintext`'s.
async fn round_trips(
    args: &Args,
    security: Security,
    plaintext: &[f64],
) -> anyhow::Result<Vec<f64>> {
    let storage = std::env::temp_dir().join(format!("teia-bench-overlay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&storage);
    let mut chain: Vec<BenchNode> = Vec::new();
    for i in 0..5 {
        let peers = chain.last().map(|n| vec![n.addr]).unwrap_or_default();
        let store = (!args.memory).then(|| storage.join(format!("n{i}.sqlite3")));
        chain.push(spawn_node(&format!("n{i}"), peers, 0, store, security).await?);
    }
    for node in chain.iter_mut().skip(1) {
        wait_links(node, 1).await?;
    }
    let mut p50s = Vec::new();
    for (relays, target) in [(0, 1), (1, 2), (3, 4)] {
        let dst = format!("n{target}@bench");
        let mut samples = Vec::with_capacity(args.sends);
        for i in 0..args.sends {
            let msg_id = chain[0]
                .handle
                .send(&dst, json!(format!("ping {i}")))
                .await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match tokio::time::timeout_at(deadline, chain[0].events.recv()).await {
                    Ok(Some((
                        _,
                        Event::Acked {
                            msg_id: id,
                            elapsed,
                            ..
                        },
                    ))) if id == msg_id => {
                        samples.push(elapsed);
                        break;
                    }
                    Ok(Some(_)) => {}
                    _ => bail!("no ACK from {dst}"),
                }
            }
        }
        samples.sort();
        let at = |p: f64| {
            samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        let name = match relays {
            0 => "direct link".to_owned(),
            1 => "1 relay hop".to_owned(),
            n => format!("{n} relay hops"),
        };
        let p50 = at(0.5).as_secs_f64() * 1000.0;
        let ratio = plaintext
            .get(p50s.len())
            .map_or_else(|| "1.00".to_owned(), |base| format!("{:.2}", p50 / base));
        println!(
            "{:<34} {:>9.3} {:>9.3} {:>12}",
            format!("{name}, {}", security.label()),
            p50,
            at(0.99).as_secs_f64() * 1000.0,
            ratio
        );
        p50s.push(p50);
    }
    for node in chain {
        let _ = node.handle.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&storage);
    Ok(p50s)
}

/// PUBs of 100-byte payloads over one link in each security mode, and signed through one
/// relay (so the receiver verifies every signature), against raw TCP lines of the same size.
async fn pub_throughput(args: &Args) -> anyhow::Result<()> {
    let mut rates = Vec::new();
    for security in Security::ALL {
        rates.push((security.label(), pub_rate(args, security, false).await?));
    }
    let relayed = pub_rate(args, Security::Signed, true).await?;
    let payload = "x".repeat(100);
    let line = format!(
        "{{\"type\":\"PUB\",\"msg_id\":\"00000000-0000-4000-8000-000000000000\",\"src\":\"source@bench\",\"dst\":\"*\",\"payload\":\"{payload}\",\"require_ack\":false,\"ttl\":8}}\n"
    );
    let raw = raw_lines(line.into_bytes(), args.pubs).await?;
    let plaintext = rates.first().map_or(1.0, |(_, run)| run.rate);
    println!(
        "PUB throughput, 100-byte payloads, {} PUBs (raw TCP lines: {raw:.0} msg/s)",
        args.pubs
    );
    println!(
        "{:<34} {:>9} {:>10} {:>12} {:>12}",
        "mode", "msg/s", "delivered", "vs plaintext", "vs raw TCP"
    );
    for (label, run) in rates
        .iter()
        .copied()
        .chain([("encrypted+signed, via 1 relay", relayed)])
    {
        println!(
            "{:<34} {:>9.0} {:>10} {:>12.2} {:>12.2}",
            label,
            run.rate,
            run.delivered,
            run.rate / plaintext,
            run.rate / raw
        );
    }
    Ok(())
}

/// PUBs per second from a source to a sink, directly or through a relay.
async fn pub_rate(args: &Args, security: Security, relay: bool) -> anyhow::Result<PubRate> {
    let payload = "x".repeat(100);
    let count = args.pubs;
    let storage = std::env::temp_dir().join(format!("teia-bench-pub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&storage);
    let store = |name: &str| (!args.memory).then(|| storage.join(format!("{name}.sqlite3")));
    let mut receiver = spawn_node("sink", Vec::new(), 0, store("sink"), security).await?;
    let mut middle = None;
    let first_hop = if relay {
        let mut node =
            spawn_node("relay", vec![receiver.addr], 0, store("relay"), security).await?;
        wait_links(&mut node, 1).await?;
        let addr = node.addr;
        middle = Some(node);
        addr
    } else {
        receiver.addr
    };
    let mut sender = spawn_node("source", vec![first_hop], 0, store("source"), security).await?;
    match &mut middle {
        Some(node) => wait_links(node, 1).await?,
        None => wait_links(&mut receiver, 1).await?,
    }
    // Up on both ends: a PUB goes to the links its node has, and the dialer's link is up
    // only once the answer to its HELLO came.
    wait_links(&mut sender, 1).await?;
    if let Some(node) = &mut middle {
        // The relay's application hears each PUB too (it is addressed to everyone), and
        // reads what it hears, as a `teia node` does: a node whose application stops
        // reading holds back what it relays rather than lose what it was told.
        let (_, idle) = mpsc::channel(1);
        let mut heard = std::mem::replace(&mut node.events, idle);
        tokio::spawn(async move { while heard.recv().await.is_some() {} });
    }
    let started = Instant::now();
    // Several publishing tasks, as an application with several things to say has: the node
    // signs what they publish in one turn as one batch.
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let handle = sender.handle.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..count / PUBLISHERS {
                    match handle.send("*", json!(payload)).await {
                        Ok(id) => ids.push(id),
                        Err(e) => return (ids, Some(e.to_string())),
                    }
                }
                (ids, None)
            })
        })
        .collect();
    // PUBs are not acknowledged: a hop whose write queue is full holds the publisher back
    // rather than dropping them, but a drop would show here. Count what
    // arrives until the flow stops.
    let count = count / PUBLISHERS * PUBLISHERS;
    let mut delivered = 0;
    let mut seen = std::collections::HashSet::new();
    let mut last = started;
    while delivered < count {
        match tokio::time::timeout(Duration::from_secs(2), receiver.events.recv()).await {
            Ok(Some((at, Event::Message { msg_id, .. }))) => {
                seen.insert(msg_id);
                delivered += 1;
                last = at;
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("the receiving node stopped"),
            Err(_) if delivered > 0 => break,
            Err(_) => bail!("no PUB arrived"),
        }
    }
    let mut refused = Vec::new();
    let mut missing = Vec::new();
    for (index, publisher) in publishers.into_iter().enumerate() {
        let (ids, error) = publisher.await?;
        refused.extend(error);
        let sent = ids.len();
        for (position, id) in ids.into_iter().enumerate() {
            if !seen.contains(&id) && missing.len() < 5 {
                missing.push(format!("{id} (publisher {index}, {position} of {sent})"));
            }
        }
    }
    if delivered < count {
        // Say where the missing ones went.
        let said = sender.handle.snapshot().await?.counters;
        let heard = receiver.handle.snapshot().await?.counters;
        if let Some(node) = &middle {
            let relayed = node.handle.snapshot().await?.counters;
            println!(
                "  relay: received {}, forwarded {}, sent {}, dropped {}, duplicates {}, errors {}, forged {}",
                relayed.received,
                relayed.forwarded,
                relayed.sent,
                relayed.dropped,
                relayed.duplicates,
                relayed.errors,
                relayed.forged
            );
        }
        println!(
            "  {security:?}: {} of {count} missing; source sent {} lines, dropped {}; sink \
             received {}, duplicates {}, errors {}, forged {}, delivered {}; publishers refused: {refused:?}; first missing: {missing:?}",
            count - delivered,
            said.sent,
            said.dropped,
            heard.received,
            heard.duplicates,
            heard.errors,
            heard.forged,
            heard.delivered
        );
    }
    let rate = delivered as f64 / last.duration_since(started).as_secs_f64();
    let _ = sender.handle.shutdown().await;
    let _ = receiver.handle.shutdown().await;
    if let Some(node) = middle {
        let _ = node.handle.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&storage);
    Ok(PubRate { rate, delivered })
}

/// What one PUB throughput run measured.
#[derive(Debug, Clone, Copy)]
struct PubRate {
    /// PUBs delivered per second.
    rate: f64,
    /// PUBs delivered (of [`Args::pubs`]).
    delivered: usize,
}

/// Lines per second from one writer to one line-reading reader (that parses each as JSON)
/// over loopback TCP, the writer's lines coalesced into writes of up to
/// [`teia_node::node::COALESCE_MAX`] bytes as a teia link coalesces them; each end on a
/// thread of its own with blocking sockets, as two processes would be. (One `write` per
/// line made the figure hang on scheduling: from 74,000 to 422,000 lines/s between runs, as
/// every write woke the reader, or not.)
async fn raw_lines(line: Vec<u8>, count: usize) -> anyhow::Result<f64> {
    tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let reader = std::thread::spawn(move || {
            let (stream, _) = listener.accept()?;
            let mut lines =
                std::io::BufReader::with_capacity(teia_node::node::COALESCE_MAX, stream);
            let mut buffer = Vec::new();
            let mut seen = 0;
            while seen < count {
                buffer.clear();
                if lines.read_until(b'\n', &mut buffer)? == 0 {
                    break;
                }
                let _: serde_json::Value = serde_json::from_slice(&buffer)?;
                seen += 1;
            }
            anyhow::Ok((seen, Instant::now()))
        });
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut stream = std::io::BufWriter::with_capacity(teia_node::node::COALESCE_MAX, stream);
        let started = Instant::now();
        for _ in 0..count {
            stream.write_all(&line)?;
        }
        stream.flush()?;
        let (seen, finished) = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the raw reader panicked"))??;
        if seen < count {
            bail!("raw reader saw {seen} of {count} lines");
        }
        Ok(count as f64 / finished.duration_since(started).as_secs_f64())
    })
    .await?
}

/// A random mesh: node i dials two earlier nodes; each keeps up to 4 neighbours.
async fn mesh_flood(args: &Args) -> anyhow::Result<()> {
    let count = args.mesh.max(2);
    let mut nodes: Vec<BenchNode> = Vec::new();
    for i in 0..count {
        let mut peers = Vec::new();
        if i > 0 {
            peers.push(nodes[mix(i as u64) as usize % i].addr);
            peers.push(nodes[mix(i as u64 + 7919) as usize % i].addr);
            peers.dedup();
        }
        nodes.push(
            spawn_node(&format!("m{i}"), peers, 4, None, Security::Signed)
                .await
                .context("mesh node")?,
        );
    }
    for node in nodes.iter_mut().skip(1) {
        wait_links(node, 1).await?;
    }
    // Let peer exchange settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut times = Vec::new();
    for round in 0..args.floods.max(1) {
        let started = Instant::now();
        let msg_id = nodes[0]
            .handle
            .send("*", json!(format!("flood {round}")))
            .await?;
        let mut last = started;
        for node in nodes.iter_mut().skip(1) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match tokio::time::timeout_at(deadline, node.events.recv()).await {
                    Ok(Some((at, Event::Message { msg_id: id, .. }))) if id == msg_id => {
                        last = last.max(at);
                        break;
                    }
                    Ok(Some(_)) => {}
                    _ => bail!("the PUB did not reach every node of the mesh"),
                }
            }
        }
        times.push(last.duration_since(started));
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "one PUB reaching all {count} nodes of a mesh: median {:.2} ms over {} floods (min {:.2}, max {:.2})",
        median.as_secs_f64() * 1000.0,
        times.len(),
        times[0].as_secs_f64() * 1000.0,
        times[times.len() - 1].as_secs_f64() * 1000.0
    );
    for node in nodes {
        let _ = node.handle.shutdown().await;
    }
    Ok(())
}
