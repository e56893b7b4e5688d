//! The runtime of seed 003's peer-exchange chat: connections to Node.js peers (one reader
//! and one writer task each), carrying out what [`teia_core::pex::Pex`] decides, and each
//! linked Node peer presented to the overlay as a link of its own (PROTOCOL.md section 11).
//!
//! **Bounds**: one connection's writes wait in a queue of [`WRITE_QUEUE`] objects (beyond,
//! an object is dropped and a warning logged); a connection being closed gets
//! [`CLOSE_GRACE`] to be closed by the Node peer too before its reader is stopped; objects
//! read are bounded by [`teia_wire::pex::MAX_OBJECT`]; the rest is bounded by the machine.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use teia_core::overlay::{Event, LinkId, Node};
use teia_core::pex::{ConnId, Pex, PexAction, PexEvent};
use teia_wire::pex::{ObjectReader, MAX_OBJECT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::dial::dial;

/// Objects waiting to be written on one connection, at most.
pub const WRITE_QUEUE: usize = 64;
/// Time a Node peer has to close a connection we stopped writing on.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How a node meets seed 003's peers.
#[derive(Debug, Clone, Default)]
pub struct PexSettings {
    /// Node peers to link with at start and keep linked (`--pex-peer`).
    pub peers: Vec<SocketAddr>,
    /// Namespace the Node peers are placed in; `None` for the node's own.
    pub namespace: Option<String>,
}

/// What the connections to Node peers report to the driver.
#[derive(Debug)]
pub(crate) enum PexInput {
    /// A connection opening with a seed 003 welcome was accepted.
    Accepted(TcpStream, SocketAddr),
    /// Our dial connected.
    Dialed(TcpStream, SocketAddr),
    /// Our dial failed.
    DialFailed(SocketAddr, String),
    /// An object was read.
    Object(ConnId, Value),
    /// The connection ended.
    Closed(ConnId),
}

struct Conn {
    writer: mpsc::Sender<Vec<u8>>,
    reader: JoinHandle<()>,
}

/// The Node peers' side of the driver: the machine, the connections, and the overlay links
/// that stand for linked Node peers.
/// `I` is the node's input, which a [`PexInput`] becomes with `wrap`.
pub(crate) struct PexLinks<I> {
    pub(crate) machine: Pex,
    /// Where the node listens: a Node peer must be able to dial back to it.
    listen: SocketAddr,
    conns: HashMap<ConnId, Conn>,
    next_conn: ConnId,
    link_of: HashMap<SocketAddr, LinkId>,
    peer_of: HashMap<LinkId, SocketAddr>,
    /// The address of each teia neighbour (their views' loopback addresses are theirs).
    teia_ips: HashMap<String, IpAddr>,
    inputs: mpsc::Sender<I>,
    wrap: fn(PexInput) -> I,
}

impl<I: Send + 'static> PexLinks<I> {
    pub(crate) fn new(
        machine: Pex,
        listen: SocketAddr,
        inputs: mpsc::Sender<I>,
        wrap: fn(PexInput) -> I,
    ) -> Self {
        Self {
            machine,
            listen,
            conns: HashMap::new(),
            next_conn: 1,
            link_of: HashMap::new(),
            peer_of: HashMap::new(),
            teia_ips: HashMap::new(),
            inputs,
            wrap,
        }
    }

    /// The Node peer an overlay link stands for.
    pub(crate) fn peer_of(&self, link: LinkId) -> Option<SocketAddr> {
        self.peer_of.get(&link).copied()
    }

    /// What the overlay says of teia neighbours: their links (for views), their going.
    pub(crate) fn overlay_event(&mut self, now: Instant, event: &Event) {
        match event {
            Event::LinkDown { peer, .. } => {
                self.teia_ips.remove(peer);
                self.machine.teia_gone(now, peer);
            }
            Event::LinkUp {
                peer,
                addr,
                features,
                ..
            } if features.iter().any(|f| f == teia_wire::peer::feature::TEIA) => {
                self.teia_ips.insert(peer.clone(), addr.ip());
                self.machine.teia_linked(now);
            }
            _ => {}
        }
    }

    /// A view from the teia node `from`, read in our frame when it is a neighbour.
    pub(crate) fn view(&mut self, now: Instant, from: &str, payload: &Value) {
        let ip = self.teia_ips.get(from).copied();
        self.machine.view(now, from, ip, payload);
    }

    /// The overlay closed a Node peer's link.
    pub(crate) fn link_closed(&mut self, now: Instant, link: LinkId) {
        if let Some(peer) = self.peer_of.remove(&link) {
            self.link_of.remove(&peer);
            self.machine.overlay_closed(now, peer);
        }
    }

    /// Hands an input from the connections to the machine.
    pub(crate) fn input(&mut self, now: Instant, input: PexInput) {
        match input {
            PexInput::Accepted(stream, addr) => {
                let conn = self.open(stream);
                self.machine.accepted(now, conn, addr);
            }
            PexInput::Dialed(stream, addr) => {
                let conn = self.open(stream);
                self.machine.dialed(now, conn, addr);
            }
            PexInput::DialFailed(addr, error) => self.machine.dial_failed(now, addr, &error),
            PexInput::Object(conn, value) => self.machine.object(now, conn, &value),
            PexInput::Closed(conn) => {
                self.conns.remove(&conn);
                self.machine.closed(now, conn);
            }
        }
    }

    /// Carries out what the machine asked for; `next_link` numbers new overlay links.
    /// Returns the events people should hear about, and whether anything was done.
    pub(crate) fn drive(
        &mut self,
        now: Instant,
        node: &mut Node,
        next_link: &mut LinkId,
    ) -> (Vec<Event>, bool) {
        let mut events = Vec::new();
        let mut acted = false;
        while let Some(action) = self.machine.poll_action() {
            acted = true;
            match action {
                PexAction::Dial { addr } if addr.is_ipv4() != self.listen.is_ipv4() => {
                    let error = format!(
                        "this node listens on {}, which it could not dial back",
                        self.listen
                    );
                    self.machine.dial_failed(now, addr, &error);
                }
                PexAction::Dial { addr } => {
                    let (inputs, wrap) = (self.inputs.clone(), self.wrap);
                    tokio::spawn(async move {
                        let input = match dial(addr).await {
                            Ok(stream) => PexInput::Dialed(stream, addr),
                            Err(error) => PexInput::DialFailed(addr, error.to_string()),
                        };
                        let _ = inputs.send(wrap(input)).await;
                    });
                }
                PexAction::Write { conn, bytes } => {
                    if let Some(c) = self.conns.get(&conn) {
                        if c.writer.try_send(bytes).is_err() {
                            tracing::warn!(conn, "peer-exchange write queue full; object dropped");
                        }
                    }
                }
                PexAction::Close { conn } => {
                    if let Some(Conn { writer, mut reader }) = self.conns.remove(&conn) {
                        drop(writer);
                        tokio::spawn(async move {
                            if tokio::time::timeout(CLOSE_GRACE, &mut reader)
                                .await
                                .is_err()
                            {
                                reader.abort();
                            }
                        });
                    }
                }
                PexAction::LinkUp { peer } => {
                    let link = *next_link;
                    *next_link += 1;
                    self.link_of.insert(peer, link);
                    self.peer_of.insert(link, peer);
                    node.link_opened(now, link, peer, true);
                }
                PexAction::LinkLine { peer, line } => {
                    if let Some(link) = self.link_of.get(&peer) {
                        node.line_received(now, *link, Ok(line));
                    }
                }
                PexAction::LinkDown { peer, reason } => {
                    if let Some(link) = self.link_of.remove(&peer) {
                        self.peer_of.remove(&link);
                        node.link_closed(now, link, &reason);
                    }
                }
                PexAction::Publish { payload } => {
                    if let Err(e) = node.publish(now, "*", payload) {
                        tracing::warn!(error = %e, "peer-exchange view not published");
                    }
                }
                PexAction::Event(event) => events.extend(self.report(event)),
            }
        }
        (events, acted)
    }

    /// Stops every connection (at shutdown).
    pub(crate) fn shutdown(&mut self) {
        for (_, conn) in self.conns.drain() {
            drop(conn.writer);
            conn.reader.abort();
        }
    }

    fn report(&self, event: PexEvent) -> Option<Event> {
        match event {
            PexEvent::Declined { peer, home } => {
                tracing::info!(%peer, %home, "peer-exchange peer left to its home");
                None
            }
            PexEvent::DialFailed {
                peer,
                error,
                retry_in,
                asked,
            } => Some(Event::DialFailed {
                addr: peer,
                error: format!("peer-exchange peer: {error}"),
                retry_in,
                asked,
            }),
            PexEvent::Dropped { peer, bytes } => {
                tracing::warn!(%peer, bytes, "peer-exchange peer not reading; lines dropped");
                None
            }
            PexEvent::View { from, homed } => {
                if homed.is_empty() {
                    tracing::info!("peer-exchange: {from} is home to no peer");
                }
                for (addr, adjacent) in homed {
                    let adjacent: Vec<String> = adjacent.iter().map(ToString::to_string).collect();
                    tracing::info!(
                        "peer-exchange: {from} is home to {addr}, directly linked with [{}]",
                        adjacent.join(", ")
                    );
                }
                None
            }
            PexEvent::Refused { addr, why } => {
                tracing::warn!(%addr, "peer-exchange connection closed: {why}");
                None
            }
        }
    }

    fn open(&mut self, stream: TcpStream) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        let _ = stream.set_nodelay(true);
        let (read_half, write_half) = stream.into_split();
        let (writer, objects) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(write_objects(write_half, objects));
        let reader = tokio::spawn(read_objects(
            read_half,
            conn,
            self.inputs.clone(),
            self.wrap,
        ));
        self.conns.insert(conn, Conn { writer, reader });
        conn
    }
}

/// Writes each object with one `write`; closes the sending side when told to stop.
async fn write_objects(
    mut stream: tokio::net::tcp::OwnedWriteHalf,
    mut objects: mpsc::Receiver<Vec<u8>>,
) {
    while let Some(bytes) = objects.recv().await {
        if stream.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = stream.shutdown().await;
}

/// Reads objects back to back until the connection ends or sends what is not JSON.
async fn read_objects<I>(
    mut stream: tokio::net::tcp::OwnedReadHalf,
    conn: ConnId,
    inputs: mpsc::Sender<I>,
    wrap: fn(PexInput) -> I,
) {
    let mut reader = ObjectReader::new(MAX_OBJECT);
    let mut chunk = vec![0u8; 16 * 1024];
    'read: loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        reader.push(chunk.get(..n).unwrap_or_default());
        while let Some(object) = reader.next_object() {
            let Ok(value) = object else {
                // What it sends is no longer read; its connection ends when it has closed
                // its side (a reset would crash it).
                let _ = inputs.send(wrap(PexInput::Closed(conn))).await;
                drain(&mut stream).await;
                return;
            };
            if inputs
                .send(wrap(PexInput::Object(conn, value)))
                .await
                .is_err()
            {
                break 'read;
            }
        }
    }
    let _ = inputs.send(wrap(PexInput::Closed(conn))).await;
}

/// Reads and drops what comes until the other side closes, for at most [`CLOSE_GRACE`].
async fn drain(stream: &mut (impl AsyncReadExt + Unpin)) {
    let mut chunk = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Closes a connection of a seed 003 peer this node does not take: our side first, then
/// theirs once they closed it.
pub(crate) async fn close_gently(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    drain(&mut stream).await;
}
