//! The node runtime: one driver task owns the sans-IO [`Node`] and carries out its actions;
//! one reader and one writer task per link; the accept loop, dials and the rendezvous
//! client feed it events. No protocol decision is taken here.
//!
//! Bounds: the driver's inbox holds [`INBOX`] events (readers wait when it is full, which
//! slows their peers through TCP); each link's write queue holds at most [`LINK_QUEUE`] lines
//! and [`LINK_QUEUE_BYTES`] bytes, and all links together [`TOTAL_QUEUE_BYTES`] (beyond,
//! lines for that link are dropped and counted; a link whose queue stays over half its
//! budget while nothing of it is written for [`STALL_LIMIT`] is closed).
//!
//! Back-pressure: when a turn's lines fill a link's queue past its high-water mark (a
//! quarter of either budget), the links whose lines that turn handled stop being read, and,
//! when the turn was the application's, the node takes no new command, until that queue
//! drains below an eighth: a publisher faster than the path is slowed down to its pace
//! (through TCP, hop by hop, back to the application's `send`), instead of losing messages,
//! while links that feed other queues go on. The command queue holds
//! [`COMMANDS`] requests; events to the application queue up to [`EVENTS`] and then make the
//! node wait for the application; at most [`MAX_OPEN_LINKS`] connections are open at once
//! (one more is answered BYE `busy` and closed); at most [`MAX_SPLICE_ASKS`] of our splice
//! asks wait for their relay's answer (one more fails at once). What the node splices for
//! its neighbours is bounded as [`teia_core::splice`] says.
//!
//! Encrypted links: while a link is in its handshake its reader hands lines over one at a
//! time and waits to hear whether the bytes after it are encrypted ([`Action::Encrypt`]);
//! after that, the writer seals and the reader opens frames with the link's keys.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use teia_core::identity::PublicKey;
use teia_core::overlay::secure::{SecureReader, SecureWriter};
use teia_core::overlay::{
    Action, ApiError, Config as OverlayConfig, Counters, Event, LinkCipher, LinkId, NeighbourInfo,
    Node, Refusal, RouteInfo,
};
use teia_wire::codec::{DecodeError, LineDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::dial::dial;
use crate::pex::{PexInput, PexLinks, PexSettings};
use crate::rendezvous::{Registrar, RegistrarEvent, RendezvousClient};
use crate::router::{
    Delivery, Inboxes, Routes, SendOutcome, ServiceMessage, ServiceQuery, ServiceRoute,
    Undeliverable, UNTAGGED,
};
use crate::store::{NodeStore, StoreError};
use crate::stream::{
    self, DataStream, SharedSplices, Splicer, StreamAcceptor, StreamError, StreamIdentity,
};
use teia_core::splice::{SpliceAnswer, SpliceRefusal, SPLICE_WAIT};
use teia_wire::stream::{SPLICE_PREFIX, STREAM_PREFIX};

/// Events waiting for the driver, at most.
pub const INBOX: usize = 4096;
/// Lines of one link waiting for the driver, at most (plus those of one read): the link
/// is not read meanwhile, so one neighbour cannot fill the inbox, and a paced one is
/// paused within this many lines.
const READ_AHEAD: usize = 256;
/// Bytes of one link's lines waiting for the driver, at most (plus those of one read).
const READ_AHEAD_BYTES: usize = 64 * 1024;
/// Lines waiting to be written on one link, at most.
pub const LINK_QUEUE: usize = 4096;
/// Bytes waiting to be written on one link, at most.
pub const LINK_QUEUE_BYTES: usize = 1024 * 1024;
/// A link's queue past this share of either budget (1/`HIGH_WATER`) holds back what fills
/// it; below half of it, what it held goes on.
const HIGH_WATER: usize = 4;
/// Bytes waiting to be written on all links together, at most.
pub const TOTAL_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Time a link's full queue may hold others back with nothing of it written: past it, the
/// link is taken as stuck (not slow), lets go of what it held, and its lines are dropped
/// at its budget until it writes again.
const STUCK_AFTER: Duration = Duration::from_secs(1);
/// Time a link may keep its write queue over half its budget, with nothing of it written,
/// before it is closed.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Connections open at once, handshaking ones included; one more is answered BYE `busy`.
pub const MAX_OPEN_LINKS: usize = 256;
/// API requests waiting, at most.
pub const COMMANDS: usize = 256;
/// Events waiting for the application, at most.
pub const EVENTS: usize = 4096;
/// Inputs handled in a row before the driver carries out the resulting actions.
const INPUT_BATCH: usize = 64;
/// Bytes written in one `write` at most when a link coalesces lines.
pub const COALESCE_MAX: usize = 64 * 1024;
/// Bytes of what a link first receives handed to the core, to name a failed handshake.
const FIRST_BYTES: usize = 256;
/// Wait before asking a rendezvous again that refused a DISCOVER as not yet registered.
const DISCOVER_EARLY_RETRY: Duration = Duration::from_millis(500);
/// Such early retries at most.
const DISCOVER_EARLY_RETRIES: u32 = 10;
/// New connections being looked at, at once, to tell streams from links.
const CLASSIFYING: usize = 64;
/// Time a new connection has to send its first bytes before it is handed to the overlay.
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(3);
/// Time BYEs get to go out at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// Our splice asks waiting for their relay's answer, at most; beyond, one more is refused
/// `busy` at once (an ask whose caller stopped waiting is forgotten first).
pub const MAX_SPLICE_ASKS: usize = 64;

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The overlay's settings (peer id, timers, limits).
    pub overlay: OverlayConfig,
    /// Where to accept links; `None` for a node that only dials out.
    pub listen: Option<SocketAddr>,
    /// Bind the listen port with `SO_REUSEPORT` too, so that a connection can be opened
    /// *from* it: a seed 004 index takes a JOIN's source port for the peer's port. Another
    /// program of the same user could then bind the port as well; off unless needed.
    pub share_listen_port: bool,
    /// Rendezvous server to register with and discover from.
    pub rendezvous: Option<String>,
    /// Peers to dial at start and keep connected.
    pub peers: Vec<SocketAddr>,
    /// Interval between two DISCOVERs.
    pub discover_interval: Duration,
    /// ttl asked for when registering, in seconds.
    pub register_ttl: u32,
    /// Database keeping SENDs awaiting their ACK, delivered messages and pinned keys
    /// across restarts; `None` keeps them in memory only.
    pub store: Option<std::path::PathBuf>,
    /// The services the node routes to ([`crate::router`]): their messages, queries, hits,
    /// data streams (PROTOCOL.md section 6; a node with no route for streams refuses them)
    /// and course programs' requests (connections opening with [`COURSE_REQUEST_PREFIX`],
    /// such as seed 004's `DOWNLOAD_REQUEST`; closed when no route takes them).
    pub services: Vec<ServiceRoute>,
    /// LAN discovery (needs an identity to sign with); `None` turns it off.
    pub lan: Option<crate::lan::LanSettings>,
    /// Seed 003's peers to link with, and their namespace (a listening node also takes those
    /// that dial it).
    pub pex: PexSettings,
}

impl NodeConfig {
    /// A node with only its overlay settings: no listener, rendezvous, peers, database,
    /// services, LAN discovery or seed 003 peers; the binary's discovery interval (30 s) and
    /// registration ttl (120 s). Set the rest with struct update syntax.
    pub fn new(overlay: OverlayConfig) -> Self {
        Self {
            overlay,
            listen: None,
            share_listen_port: false,
            rendezvous: None,
            peers: Vec::new(),
            discover_interval: Duration::from_secs(30),
            register_ttl: 120,
            store: None,
            services: Vec::new(),
            lan: None,
            pex: PexSettings::default(),
        }
    }
}

/// What a course program's request (one JSON object with a `method`, no newline) starts
/// with, as the seeds' programs write it.
pub const COURSE_REQUEST_PREFIX: &[u8] = b"{\"method\"";

/// What the application hears: the overlay's events plus the runtime's own.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// The node is running.
    Ready {
        /// Our peer id.
        peer_id: String,
        /// Where we accept links.
        listen: Option<SocketAddr>,
        /// Our public key, if the node has an identity.
        key: Option<PublicKey>,
    },
    /// An overlay event.
    Overlay(Event),
    /// A rendezvous registration succeeded or failed.
    Rendezvous(RegistrarEvent),
    /// A DISCOVER failed.
    DiscoverFailed(String),
    /// The node has stopped.
    Stopped,
}

/// A snapshot of the node for `/routes`, `/conn` and `/metrics`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Connected neighbours.
    pub neighbours: Vec<NeighbourInfo>,
    /// Fresh cached routes.
    pub routes: Vec<RouteInfo>,
    /// Peers known (from the rendezvous and peer lists).
    pub known: Vec<(String, SocketAddr)>,
    /// Traffic counters (lines dropped because a write queue was full included).
    pub counters: Counters,
    /// Pinned keys.
    pub pins: Vec<(String, PublicKey)>,
    /// Our public key.
    pub key: Option<PublicKey>,
    /// Bytes in all links' write queues (bounded by [`TOTAL_QUEUE_BYTES`]).
    pub queued_bytes: usize,
    /// Bytes in the fullest link's write queue (bounded by [`LINK_QUEUE_BYTES`]).
    pub fullest_queue_bytes: usize,
    /// Bytes in each neighbour's write queue, by peer id (each bounded by
    /// [`LINK_QUEUE_BYTES`]).
    pub queue_bytes_by_peer: Vec<(String, usize)>,
}

enum Command {
    Send {
        dst: String,
        payload: Value,
        /// The service sending it, whose ACK the application does not hear.
        service: Option<String>,
        reply: oneshot::Sender<Result<String, ApiError>>,
    },
    Connect(SocketAddr),
    Reconnect,
    Watch(bool),
    Metrics {
        peer: String,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Snapshot(oneshot::Sender<Snapshot>),
    Trust {
        peer_id: String,
        key: PublicKey,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Forget {
        peer_id: String,
        reply: oneshot::Sender<Option<PublicKey>>,
    },
    Shown(String),
    Query {
        service: String,
        body: Value,
        ttl: u32,
        reply: oneshot::Sender<String>,
    },
    Answer {
        query_id: String,
        body: Value,
    },
    SpliceAsk {
        relay: String,
        with: String,
        ask: String,
        reply: oneshot::Sender<Result<(SocketAddr, String), StreamError>>,
    },
    Shutdown,
}

/// What a link's reader does after handing over a line of the handshake.
pub(crate) enum ReadNext {
    /// Hand over the next line and wait again.
    Lockstep,
    /// Plaintext from now on: hand lines over freely.
    Free,
    /// What follows is encrypted with these keys.
    Decrypt(LinkCipher),
}

/// What a link's writer is given.
enum Out {
    Line(Vec<u8>),
    /// Seal everything after this with these keys.
    Encrypt(LinkCipher),
}

pub(crate) enum Input {
    Accepted(TcpStream, SocketAddr),
    Dialed(TcpStream, SocketAddr),
    DialFailed(SocketAddr, String),
    Frame(LinkId, Result<Vec<u8>, DecodeError>),
    /// The first bytes read on a link (at most [`FIRST_BYTES`]), line or not.
    FirstBytes(LinkId, Vec<u8>),
    /// A line of the handshake; the reader waits for the answer.
    HandshakeFrame(
        LinkId,
        Result<Vec<u8>, DecodeError>,
        oneshot::Sender<ReadNext>,
    ),
    Closed(LinkId, String),
    Discovered(Vec<(String, SocketAddr)>),
    Registrar(RegistrarEvent),
    DiscoverFailed(String),
    /// From the connections to seed 003's peers.
    Pex(PexInput),
}

/// Handle to a running node: the node's API for services and interfaces.
#[derive(Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    us: Option<StreamIdentity>,
    listen: Option<SocketAddr>,
}

/// Why the node could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
    /// The node's database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The overlay refused the request.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl NodeHandle {
    /// This node's public key, if it has an identity.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.us.as_ref().map(|us| us.identity.public_key())
    }

    /// Where the node accepts links and streams, if it listens.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen
    }

    /// Floods a question for `service` through the overlay (at most `ttl` hops); answers
    /// come as [`Event::QueryHit`] with the returned id.
    pub async fn query(&self, service: &str, body: Value, ttl: u32) -> Result<String, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::Query {
            service: service.to_owned(),
            body,
            ttl,
            reply,
        })
        .await?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// Answers a query heard as [`Event::Query`].
    pub async fn answer(&self, query_id: &str, body: Value) -> Result<(), NodeError> {
        self.request(Command::Answer {
            query_id: query_id.to_owned(),
            body,
        })
        .await
    }

    /// Asks neighbour `relay` (a teia node that listens) to splice a data stream between
    /// this node and `peer`, which asks the same with the same `ask`; waits (at most
    /// [`SPLICE_WAIT`]) for the relay's grant: where to join it, with which token.
    async fn splice_grant(
        &self,
        relay: &str,
        peer: &str,
        ask: &str,
    ) -> Result<(SocketAddr, String), StreamError> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::SpliceAsk {
            relay: relay.to_owned(),
            with: peer.to_owned(),
            ask: ask.to_owned(),
            reply,
        })
        .await
        .map_err(|_| StreamError::Stopped)?;
        match tokio::time::timeout(SPLICE_WAIT, answer).await {
            Ok(Ok(granted)) => granted,
            Ok(Err(_)) => Err(StreamError::Stopped),
            Err(_) => Err(StreamError::Timeout),
        }
    }

    /// Opens a data stream for `service` to `peer` through neighbour `relay`, which splices
    /// it once `peer` asked it too, with the same `ask` (PROTOCOL.md section 6, Splicing);
    /// the peer must prove `expected`.
    pub async fn open_spliced_stream(
        &self,
        relay: &str,
        peer: &str,
        ask: &str,
        service: &str,
        expected: PublicKey,
    ) -> Result<DataStream, StreamError> {
        let us = self.us.as_ref().ok_or(StreamError::NoIdentity)?;
        let (addr, token) = self.splice_grant(relay, peer, ask).await?;
        stream::open_spliced(us, addr, &token, service, expected).await
    }

    /// Accepts, through neighbour `relay`, the data stream `peer` opens, once both asked it
    /// to splice them with the same `ask`; the peer must prove `expected`.
    pub async fn accept_spliced_stream(
        &self,
        relay: &str,
        peer: &str,
        ask: &str,
        expected: PublicKey,
    ) -> Result<DataStream, StreamError> {
        let us = self.us.as_ref().ok_or(StreamError::NoIdentity)?;
        let (addr, token) = self.splice_grant(relay, peer, ask).await?;
        stream::accept_spliced(us, addr, &token, expected).await
    }

    /// Opens a data stream to the peer listening at `addr` for `service`; when `expected` is
    /// given, the peer must prove that key.
    pub async fn open_stream(
        &self,
        addr: SocketAddr,
        service: &str,
        expected: Option<PublicKey>,
    ) -> Result<DataStream, StreamError> {
        let us = self.us.as_ref().ok_or(StreamError::NoIdentity)?;
        stream::open(us, addr, service, expected).await
    }

    /// Sends `payload` to `name@namespace` (acknowledged), `#namespace` or `*`; returns the
    /// message id.
    pub async fn send(&self, dst: &str, payload: Value) -> Result<String, NodeError> {
        self.send_as(None, dst, payload).await
    }

    /// Sends `payload` (whose `svc` names `service`) on behalf of a service, like
    /// [`Self::send`]; its ACK or failure is the service's business, not the application's.
    pub async fn send_for(
        &self,
        service: &str,
        dst: &str,
        payload: Value,
    ) -> Result<String, NodeError> {
        self.send_as(Some(service.to_owned()), dst, payload).await
    }

    async fn send_as(
        &self,
        service: Option<String>,
        dst: &str,
        payload: Value,
    ) -> Result<String, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::Send {
            dst: dst.to_owned(),
            payload,
            service,
            reply,
        })
        .await?;
        Ok(answer.await.map_err(|_| NodeError::Stopped)??)
    }

    /// Dials `addr` and keeps it connected.
    pub async fn connect(&self, addr: SocketAddr) -> Result<(), NodeError> {
        self.request(Command::Connect(addr)).await
    }

    /// Redials every known peer that is not connected now.
    pub async fn reconnect(&self) -> Result<(), NodeError> {
        self.request(Command::Reconnect).await
    }

    /// Starts or stops traffic events.
    pub async fn watch(&self, on: bool) -> Result<(), NodeError> {
        self.request(Command::Watch(on)).await
    }

    /// Asks a neighbour for its metrics; the answer comes as an event.
    pub async fn request_metrics(&self, peer: &str) -> Result<(), NodeError> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::Metrics {
            peer: peer.to_owned(),
            reply,
        })
        .await?;
        Ok(answer.await.map_err(|_| NodeError::Stopped)??)
    }

    /// The node's neighbours, routes, known peers and counters.
    pub async fn snapshot(&self) -> Result<Snapshot, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::Snapshot(reply)).await?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// Pins `key` for `peer_id`, replacing any earlier pin.
    pub async fn trust(&self, peer_id: &str, key: PublicKey) -> Result<(), NodeError> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::Trust {
            peer_id: peer_id.to_owned(),
            key,
            reply,
        })
        .await?;
        Ok(answer.await.map_err(|_| NodeError::Stopped)??)
    }

    /// Drops the pin of `peer_id`; returns the key that was pinned.
    pub async fn forget(&self, peer_id: &str) -> Result<Option<PublicKey>, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::Forget {
            peer_id: peer_id.to_owned(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// The application has shown the message `msg_id` to its user: it will not be handed
    /// over again after a restart.
    pub async fn shown(&self, msg_id: &str) -> Result<(), NodeError> {
        self.request(Command::Shown(msg_id.to_owned())).await
    }

    /// Says BYE to every neighbour, unregisters and stops.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        self.request(Command::Shutdown).await
    }

    async fn request(&self, command: Command) -> Result<(), NodeError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| NodeError::Stopped)
    }
}

/// A node just started.
pub struct Started {
    /// Its handle.
    pub handle: NodeHandle,
    /// What the application hears: everything no service route takes.
    pub events: mpsc::Receiver<NodeEvent>,
    /// Its services' inboxes, to attach the services with [`crate::router::Router::builder`].
    pub inboxes: Inboxes,
    /// The task that ends when the node stops.
    pub task: JoinHandle<()>,
}

/// A TCP socket bound to `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`, so that the node's
/// listener and connections opened from its listen port share it (see
/// [`NodeConfig::share_listen_port`]).
pub fn port_sharing_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Binds the node's listener on `addr`; `shared` adds `SO_REUSEPORT` (see
/// [`NodeConfig::share_listen_port`]).
async fn bind_listener(addr: SocketAddr, shared: bool) -> std::io::Result<TcpListener> {
    if !shared {
        return TcpListener::bind(addr).await;
    }
    port_sharing_socket(addr)?.listen(1024)
}

/// Starts a node.
pub async fn start(mut config: NodeConfig) -> Result<Started, NodeError> {
    let listener = match config.listen {
        Some(addr) => Some(
            bind_listener(addr, config.share_listen_port)
                .await
                .map_err(|source| NodeError::Bind { addr, source })?,
        ),
        None => None,
    };
    let listen = listener.as_ref().and_then(|l| l.local_addr().ok());
    config.overlay.listen_port = listen.map(|a| a.port());
    let (inputs, inbox) = mpsc::channel(INBOX);
    let (commands, command_rx) = mpsc::channel(COMMANDS);
    let (events, event_rx) = mpsc::channel(EVENTS);
    let (routes, inboxes) = Routes::new(&config.services);
    let mut background = Vec::new();
    let us = config
        .overlay
        .identity
        .clone()
        .map(|identity| StreamIdentity {
            identity,
            peer_id: config.overlay.peer_id.clone(),
        });
    // Only a node that listens splices (the sides must reach it).
    let splices: Option<SharedSplices> = listener.as_ref().map(|_| SharedSplices::default());
    if let Some(listener) = listener {
        let acceptor = StreamAcceptor {
            us: us.clone(),
            wanted: routes.takes_streams(),
            pending: Arc::new(Semaphore::new(stream::MAX_PENDING_ACCEPTS)),
        };
        let splicer = Splicer {
            state: splices.clone().unwrap_or_default(),
        };
        background.push(tokio::spawn(accept_loop(
            listener,
            inputs.clone(),
            acceptor,
            splicer,
            routes.clone(),
        )));
    }
    let (stop_registrar, registrar_stopped) = oneshot::channel::<()>();
    let mut registrar = None;
    if let Some(server) = &config.rendezvous {
        let client = RendezvousClient::new(server.clone());
        let (name, namespace) = split_peer_id(&config.overlay.peer_id);
        if let Some(port) = listen.map(|a| a.port()) {
            let task = Registrar {
                client: client.clone(),
                namespace: namespace.clone(),
                name,
                port,
                ttl: config.register_ttl,
            };
            let sink = inputs.clone();
            registrar = Some(tokio::spawn(task.run(
                async {
                    let _ = registrar_stopped.await;
                },
                move |event| {
                    let _ = sink.try_send(Input::Registrar(event));
                },
            )));
        }
        background.push(tokio::spawn(discover_loop(
            client,
            namespace,
            config.discover_interval,
            inputs.clone(),
        )));
    }
    if let (Some(settings), Some(identity)) = (config.lan.clone(), &config.overlay.identity) {
        // Nonces need only be unique to this run: a random start, counted on from there.
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let seed = u64::from_le_bytes(seed) ^ unix_millis();
        let lan = teia_core::lan::Lan::new(
            &config.overlay.peer_id,
            identity,
            listen.map(|a| a.port()),
            seed,
        );
        let sink = inputs.clone();
        background.push(tokio::spawn(crate::lan::run(
            lan,
            settings,
            move |peer, addr| {
                // A full inbox drops it: the next announcement comes within 30 s.
                let _ = sink.try_send(Input::Discovered(vec![(peer, addr)]));
            },
        )));
    }
    let mut node = Node::new(config.overlay.clone(), Instant::now(), unix_millis());
    let store = match &config.store {
        Some(path) => {
            let (store, restored) = NodeStore::open(path)?;
            node.restore(Instant::now(), restored);
            Some(store)
        }
        None => None,
    };
    let pex = listen
        .map(|addr| {
            let (_, namespace) = split_peer_id(&config.overlay.peer_id);
            let namespace = config.pex.namespace.clone().unwrap_or(namespace);
            let mut seed = [0u8; 8];
            let _ = getrandom::fill(&mut seed);
            let settings = teia_core::pex::PexConfig::new(
                config.overlay.peer_id.clone(),
                namespace,
                addr.port(),
                u64::from_le_bytes(seed) ^ unix_millis(),
            );
            PexLinks::new(
                teia_core::pex::Pex::new(settings),
                addr,
                inputs.clone(),
                Input::Pex,
            )
        })
        // Node peers are plaintext: a node that requires encryption takes none.
        .filter(|_| !config.overlay.require_encryption);
    let driver = Driver {
        node,
        store,
        inputs,
        events,
        links: HashMap::new(),
        next_link: 1,
        queued_total: Arc::new(AtomicUsize::new(0)),
        drained: Arc::new(tokio::sync::Notify::new()),
        turn: Turn::default(),
        held: HashMap::new(),
        commands_held_by: Vec::new(),
        paced: HashMap::new(),
        warnings: Warnings::default(),
        service_sends: ServiceSends::default(),
        routes,
        splices,
        splice_asks: HashMap::new(),
        pex,
    };
    let peer_id = config.overlay.peer_id.clone();
    let peers = config.peers.clone();
    let pex_peers = config.pex.peers.clone();
    let task = tokio::spawn(async move {
        driver
            .run(peer_id, listen, (peers, pex_peers), inbox, command_rx)
            .await;
        let _ = stop_registrar.send(());
        if let Some(registrar) = registrar {
            let _ = tokio::time::timeout(Duration::from_secs(3), registrar).await;
        }
        for task in background {
            task.abort();
        }
    });
    Ok(Started {
        handle: NodeHandle {
            commands,
            us,
            listen,
        },
        events: event_rx,
        inboxes,
        task,
    })
}

struct LinkTasks {
    writer: mpsc::Sender<Out>,
    reader: JoinHandle<()>,
    /// What the link's reader and writer share with the driver.
    shared: Arc<LinkShared>,
    /// Since when this link's queue is over half its budget, and the bytes written then.
    full_since: Option<(Instant, u64)>,
    /// The links this link's full queue holds back (their reading paused).
    holding: Vec<LinkId>,
    /// Keys for the reader, set by [`Action::Encrypt`] and handed over with the answer to
    /// the handshake line that caused it.
    read_cipher: Option<LinkCipher>,
}

/// The state a link's reader and writer tasks share with the driver.
struct LinkShared {
    /// Set when lines may be written several per `write`.
    coalesce: AtomicBool,
    /// Bytes in this link's write queue.
    queued: AtomicUsize,
    /// Bytes written so far (the writer's progress).
    written: AtomicU64,
    /// Set while the driver waits for this link's queue to drain below the low-water mark.
    watched: AtomicBool,
    /// Set while this link is not read (another link's full queue holds it back, or it is
    /// paced).
    paused: AtomicBool,
    /// Lines read from this link that the driver has not handled yet.
    unread: AtomicUsize,
    /// Their bytes.
    unread_bytes: AtomicUsize,
    /// Wakes the reader when `paused` is cleared or `unread` falls back.
    resume: tokio::sync::Notify,
}

impl LinkShared {
    fn new() -> Self {
        Self {
            coalesce: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            written: AtomicU64::new(0),
            watched: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            unread: AtomicUsize::new(0),
            unread_bytes: AtomicUsize::new(0),
            resume: tokio::sync::Notify::new(),
        }
    }

    /// Waits while the link is paused, or while [`READ_AHEAD`] of its lines (or
    /// [`READ_AHEAD_BYTES`] of them) wait for the driver.
    async fn wait_resumed(&self) {
        loop {
            let resumed = self.resume.notified();
            if !self.paused.load(Ordering::Acquire) && !self.read_ahead_full() {
                return;
            }
            resumed.await;
        }
    }

    fn read_ahead_full(&self) -> bool {
        self.unread.load(Ordering::Acquire) >= READ_AHEAD
            || self.unread_bytes.load(Ordering::Acquire) >= READ_AHEAD_BYTES
    }

    /// The reader handed a line of `len` bytes to the driver.
    fn read_one(&self, len: usize) {
        self.unread.fetch_add(1, Ordering::AcqRel);
        self.unread_bytes.fetch_add(len, Ordering::AcqRel);
    }

    /// The driver handled one of this link's lines, of `len` bytes: the reader, if it
    /// waits for room, is woken (a spare wake-up only makes it look again).
    fn handled(&self, len: usize) {
        self.unread.fetch_sub(1, Ordering::AcqRel);
        self.unread_bytes.fetch_sub(len, Ordering::AcqRel);
        if !self.read_ahead_full() {
            self.resume.notify_one();
        }
    }
}

/// The links whose lines the current turn handled (and whether the application's
/// commands were among them): a queue they fill past its high-water mark holds them back.
#[derive(Default)]
struct Turn {
    links: Vec<LinkId>,
    local: bool,
}

struct Driver {
    node: Node,
    store: Option<NodeStore>,
    inputs: mpsc::Sender<Input>,
    events: mpsc::Sender<NodeEvent>,
    links: HashMap<LinkId, LinkTasks>,
    next_link: LinkId,
    /// Bytes in all write queues.
    queued_total: Arc<AtomicUsize>,
    /// Signalled by a watched link's writer once its queue drained below the low-water mark.
    drained: Arc<tokio::sync::Notify>,
    /// What the current turn handled.
    turn: Turn,
    /// How many full queues hold each paused link back.
    held: HashMap<LinkId, usize>,
    /// The links whose full queues hold the application's commands back.
    commands_held_by: Vec<LinkId>,
    /// Links not read until a time, for sending faster than their share ([`Action::Pace`]).
    paced: HashMap<LinkId, Instant>,
    warnings: Warnings,
    service_sends: ServiceSends,
    /// Where services' deliveries go.
    routes: Routes,
    /// What this node splices for its neighbours; `None` when it does not listen.
    splices: Option<SharedSplices>,
    /// Our splice asks waiting for their relay's answer: (relay, with, ask) → the waiter.
    splice_asks: HashMap<SpliceKey, SpliceWaiter>,
    /// Seed 003's peers; `None` when the node does not listen (they must dial back).
    pex: Option<PexLinks<Input>>,
}

/// Names one of our splice asks: the relay, the other side, the ask.
type SpliceKey = (String, String, String);
/// Who waits for a relay's answer to a splice ask.
type SpliceWaiter = oneshot::Sender<Result<(SocketAddr, String), StreamError>>;

/// SENDs of services awaiting their ACK (sent with [`NodeHandle::send_for`]):
/// their acknowledgement or failure is the service's business, not shown as chat events.
#[derive(Default)]
struct ServiceSends {
    services: HashMap<String, String>,
    order: std::collections::VecDeque<String>,
}

/// Service SENDs remembered; past it, the oldest is forgotten (its outcome goes to the
/// application).
const MAX_SERVICE_SENDS: usize = 4096;

impl ServiceSends {
    fn remember(&mut self, msg_id: &str, service: String) {
        if self.order.len() >= MAX_SERVICE_SENDS {
            if let Some(oldest) = self.order.pop_front() {
                self.services.remove(&oldest);
            }
        }
        if self.services.insert(msg_id.to_owned(), service).is_none() {
            self.order.push_back(msg_id.to_owned());
        }
    }

    /// When `event` ends a service SEND: the service and the outcome (the SEND forgotten).
    fn ends(&mut self, event: &Event) -> Option<(String, SendOutcome)> {
        let (outcome, msg_id) = match event {
            Event::Acked {
                msg_id,
                from,
                elapsed,
            } => (
                SendOutcome::Acked {
                    msg_id: msg_id.clone(),
                    from: from.clone(),
                    elapsed: *elapsed,
                },
                msg_id,
            ),
            Event::Undelivered {
                msg_id,
                dst,
                reason,
            } => (
                SendOutcome::Undelivered {
                    msg_id: msg_id.clone(),
                    dst: dst.clone(),
                    reason: reason.clone(),
                },
                msg_id,
            ),
            _ => return None,
        };
        let service = self.services.remove(msg_id)?;
        self.order.retain(|id| id != msg_id);
        Some((service, outcome))
    }
}

/// Repeated warnings, summarised: the first of a kind is logged at once, the rest counted
/// and logged as one line per [`WARNING_PERIOD`].
#[derive(Default)]
struct Warnings {
    counts: HashMap<&'static str, (u64, Option<Instant>)>,
}

/// Shortest time between two log lines of one kind of warning.
const WARNING_PERIOD: Duration = Duration::from_secs(10);

impl Warnings {
    fn warn(&mut self, kind: &'static str, detail: &dyn std::fmt::Display) {
        let now = Instant::now();
        let (count, last) = self.counts.entry(kind).or_insert((0, None));
        *count += 1;
        if last.is_none_or(|at| now.duration_since(at) >= WARNING_PERIOD) {
            if *count > 1 {
                tracing::warn!(count = *count, "{kind} (repeated; last: {detail})");
            } else {
                tracing::warn!("{kind}: {detail}");
            }
            *count = 0;
            *last = Some(now);
        }
    }
}

impl Driver {
    async fn run(
        mut self,
        peer_id: String,
        listen: Option<SocketAddr>,
        (peers, pex_peers): (Vec<SocketAddr>, Vec<SocketAddr>),
        mut inbox: mpsc::Receiver<Input>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let key = self.node.public_key();
        let _ = self
            .events
            .send(NodeEvent::Ready {
                peer_id,
                listen,
                key,
            })
            .await;
        for addr in peers {
            self.node.connect(Instant::now(), addr);
        }
        match &mut self.pex {
            Some(pex) => {
                for addr in pex_peers {
                    pex.machine.connect(Instant::now(), addr);
                }
            }
            None if !pex_peers.is_empty() => {
                tracing::warn!(
                    "peer-exchange peers need a node that listens and takes plaintext peers \
                     (no --no-listen, no --require-encryption); not linked"
                );
            }
            None => {}
        }
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        loop {
            self.execute().await;
            let wake = self
                .node
                .poll_timeout()
                .into_iter()
                .chain(self.next_stall_check())
                .chain(self.paced.values().min().copied())
                .chain(self.pex.as_ref().and_then(|p| p.machine.poll_timeout()))
                .min()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            tokio::select! {
                input = inbox.recv() => match input {
                    Some(input) => {
                        self.input(input).await;
                        // Take what else is already waiting before acting, up to a bound.
                        for _ in 0..INPUT_BATCH {
                            match inbox.try_recv() {
                                Ok(input) => self.input(input).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                () = self.drained.notified() => self.release_drained(),
                command = commands.recv(), if self.commands_held_by.is_empty() => {
                    self.turn.local = true;
                    // Take what else is already waiting, so that the messages of one turn
                    // are signed as one batch.
                    let mut batch = vec![command];
                    // Twice: once at once, then once more after letting the tasks just
                    // woken by the last turn's replies run, so that senders who keep
                    // sending share a signature rather than each paying for one.
                    for round in 0..2 {
                        if round == 1 {
                            tokio::task::yield_now().await;
                        }
                        while batch.len() < INPUT_BATCH {
                            match commands.try_recv() {
                                Ok(more) => batch.push(Some(more)),
                                Err(_) => break,
                            }
                        }
                    }
                    let mut replies = Vec::new();
                    let mut stop = false;
                    for command in batch {
                        match command {
                            Some(Command::Shutdown) | None => stop = true,
                            Some(Command::Send { dst, payload, service, reply }) => {
                                let sent = self.node.send(Instant::now(), &dst, payload);
                                if let (Some(service), Ok(msg_id)) = (service, &sent) {
                                    self.service_sends.remember(msg_id, service);
                                }
                                replies.push((reply, sent));
                            }
                            Some(command) => self.command(command),
                        }
                    }
                    // Stored (and on their way) before the senders hear they were sent.
                    self.execute().await;
                    for (reply, sent) in replies {
                        let _ = reply.send(sent);
                    }
                    if stop {
                        break;
                    }
                }
                () = &mut timer => {
                    self.close_stalled();
                    self.release_stuck(Instant::now());
                    self.release_paced(Instant::now());
                    self.node.handle_timeout(Instant::now());
                    if let Some(pex) = &mut self.pex {
                        pex.machine.handle_timeout(Instant::now());
                    }
                }
            }
        }
        self.node.shutdown(Instant::now());
        self.execute().await;
        if let Some(pex) = &mut self.pex {
            pex.shutdown();
        }
        let writers: Vec<_> = self
            .links
            .drain()
            .map(|(_, l)| (l.writer, l.reader))
            .collect();
        let flushed = async {
            for (writer, _) in &writers {
                writer.closed().await;
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, flushed).await;
        for (_, reader) in writers {
            reader.abort();
        }
        let _ = self.events.send(NodeEvent::Stopped).await;
    }

    async fn execute(&mut self) {
        loop {
            self.execute_overlay().await;
            if !self.execute_pex().await {
                break;
            }
        }
        self.turn.links.clear();
        self.turn.local = false;
    }

    /// Carries out what the seed 003 machine asked for; false when it asked for nothing.
    async fn execute_pex(&mut self) -> bool {
        let Some(pex) = &mut self.pex else {
            return false;
        };
        let (events, acted) = pex.drive(Instant::now(), &mut self.node, &mut self.next_link);
        for event in events {
            self.log_event(&event);
            let _ = self.events.send(NodeEvent::Overlay(event)).await;
        }
        acted
    }

    async fn execute_overlay(&mut self) {
        // Lines queued since the last storage write: let their writers run before the next
        // (blocking) commit, so the disk is not in their way.
        let mut queued_lines = false;
        while let Some(action) = self.node.poll_action() {
            let storing = matches!(
                action,
                Action::Remember(_)
                    | Action::Forget { .. }
                    | Action::Delivered(_)
                    | Action::Pin { .. }
                    | Action::Unpin { .. }
            );
            if storing && std::mem::take(&mut queued_lines) {
                tokio::task::yield_now().await;
            }
            match action {
                Action::Write { link, line } => {
                    if let Some(pex) = &mut self.pex {
                        if let Some(peer) = pex.peer_of(link) {
                            pex.machine.overlay_line(Instant::now(), peer, &line);
                            continue;
                        }
                    }
                    self.write(link, line);
                    queued_lines = true;
                }
                Action::Close { link } => {
                    if let Some(pex) = &mut self.pex {
                        pex.link_closed(Instant::now(), link);
                    }
                    self.forget_link(link);
                }
                Action::Encrypt { link, cipher } => {
                    if let Some(tasks) = self.links.get_mut(&link) {
                        tasks.read_cipher = Some(cipher.clone());
                        if tasks.writer.try_send(Out::Encrypt(cipher)).is_err() {
                            self.close_link(link, "write queue full during the handshake");
                        }
                    }
                }
                Action::Remember(send) => {
                    if let Some(store) = &mut self.store {
                        if let Err(e) = store.remember(&send) {
                            tracing::error!(error = %e, "message not stored");
                        }
                    }
                }
                Action::Forget { msg_id } => {
                    if let Some(store) = &mut self.store {
                        if let Err(e) = store.forget(&msg_id) {
                            tracing::error!(error = %e, "message not dropped from storage");
                        }
                    }
                }
                Action::Delivered(message) => {
                    if let Some(store) = &mut self.store {
                        if let Err(e) = store.delivered(&message) {
                            tracing::error!(error = %e, "delivery not stored");
                        }
                    }
                }
                Action::Pin { peer_id, key } => {
                    if let Some(store) = &mut self.store {
                        if let Err(e) = store.pin(&peer_id, &key) {
                            tracing::error!(error = %e, "pinned key not stored");
                        }
                    }
                }
                Action::Unpin { peer_id } => {
                    if let Some(store) = &mut self.store {
                        if let Err(e) = store.unpin(&peer_id) {
                            tracing::error!(error = %e, "pin not dropped from storage");
                        }
                    }
                }
                Action::Pace { link, until } => self.pace(link, until),
                Action::Coalesce { link } => {
                    if let Some(tasks) = self.links.get(&link) {
                        tasks.shared.coalesce.store(true, Ordering::Relaxed);
                    }
                }
                Action::Dial { addr } => {
                    let inputs = self.inputs.clone();
                    tokio::spawn(async move {
                        let input = match dial(addr).await {
                            Ok(stream) => Input::Dialed(stream, addr),
                            Err(error) => Input::DialFailed(addr, error.to_string()),
                        };
                        let _ = inputs.send(input).await;
                    });
                }
                Action::Event(Event::SpliceAsked { peer, with, ask }) => {
                    self.splice_asked(peer, with, ask);
                }
                Action::Event(Event::SpliceGranted {
                    relay,
                    with,
                    ask,
                    token,
                    addr,
                }) => {
                    if let Some(waiter) = self.splice_asks.remove(&(relay, with, ask)) {
                        let _ = waiter.send(Ok((addr, token)));
                    }
                }
                Action::Event(Event::SpliceRefused {
                    relay,
                    with,
                    ask,
                    reason,
                }) => {
                    let key = (relay, with, ask);
                    if let Some(waiter) = self.splice_asks.remove(&key) {
                        let (relay, _, _) = key;
                        let _ = waiter.send(Err(StreamError::SpliceRefused { relay, reason }));
                    }
                }
                Action::Event(Event::Message {
                    src,
                    service: Some(service),
                    payload,
                    origin_key: Some(_),
                    ..
                }) if service == teia_core::pex::VIEW_SERVICE => {
                    if let Some(pex) = &mut self.pex {
                        pex.view(Instant::now(), &src, &payload);
                    }
                }
                Action::Event(event) => {
                    if let Some(pex) = &mut self.pex {
                        pex.overlay_event(Instant::now(), &event);
                    }
                    self.log_event(&event);
                    if let (Event::LinkDown { peer, .. }, Some(splices)) = (&event, &self.splices) {
                        stream::lock_splices(splices).broker.peer_gone(peer);
                    }
                    if let Some((service, outcome)) = self.service_sends.ends(&event) {
                        self.hand_over(&service, Delivery::Outcome(outcome), None);
                        continue;
                    }
                    if let Some(event) = self.route(event) {
                        let _ = self.events.send(NodeEvent::Overlay(event)).await;
                    }
                }
            }
        }
    }

    /// Queues a line for a link's writer within the byte budgets; a line beyond them is
    /// dropped (and counted), and a link that keeps dropping for [`STALL_LIMIT`] is closed.
    fn write(&mut self, link: LinkId, line: Vec<u8>) {
        let Some(tasks) = self.links.get_mut(&link) else {
            return;
        };
        let len = line.len();
        let queued = &tasks.shared.queued;
        let fits = queued.load(Ordering::Relaxed) + len <= LINK_QUEUE_BYTES
            && self.queued_total.load(Ordering::Relaxed) + len <= TOTAL_QUEUE_BYTES;
        if fits {
            queued.fetch_add(len, Ordering::Relaxed);
            self.queued_total.fetch_add(len, Ordering::Relaxed);
            if tasks.writer.try_send(Out::Line(line)).is_ok() {
                if over_high_water(tasks) {
                    self.hold_back(link);
                }
                return;
            }
            queued.fetch_sub(len, Ordering::Relaxed);
            self.queued_total.fetch_sub(len, Ordering::Relaxed);
        }
        let written = tasks.shared.written.load(Ordering::Relaxed);
        tasks.full_since.get_or_insert((Instant::now(), written));
        self.node.line_dropped(link);
        self.warnings.warn(
            "write queue full; line dropped",
            &format_args!("link {link}"),
        );
    }

    /// `link`'s queue is past its high-water mark: the links whose lines this turn handled
    /// stop being read, and the application's commands wait when the turn was theirs, until
    /// it drains (its writer signals [`Self::drained`]).
    fn hold_back(&mut self, link: LinkId) {
        let sources: Vec<LinkId> = self
            .turn
            .links
            .iter()
            .copied()
            .filter(|&source| source != link)
            .collect();
        let local = self.turn.local && !self.commands_held_by.contains(&link);
        let now = Instant::now();
        let Some(tasks) = self.links.get_mut(&link) else {
            return;
        };
        let written = tasks.shared.written.load(Ordering::Relaxed);
        tasks.full_since.get_or_insert((now, written));
        if stuck(tasks, now) {
            return;
        }
        let mut newly_held = Vec::new();
        for source in sources {
            if !tasks.holding.contains(&source) {
                tasks.holding.push(source);
                newly_held.push(source);
            }
        }
        tasks.shared.watched.store(true, Ordering::Release);
        if local {
            self.commands_held_by.push(link);
        }
        for source in newly_held {
            self.hold(source);
        }
        // The writer may have drained the queue before it was watched.
        if self.links.get(&link).is_some_and(|t| !over_low_water(t)) {
            self.drained.notify_one();
        }
    }

    /// Stops reading `link` until `until` (later, if it is already paced longer).
    fn pace(&mut self, link: LinkId, until: Instant) {
        if !self.links.contains_key(&link) {
            return;
        }
        match self.paced.get_mut(&link) {
            Some(paced) => *paced = (*paced).max(until),
            None => {
                self.paced.insert(link, until);
                self.hold(link);
            }
        }
    }

    /// Reads again the paced links whose time has come.
    fn release_paced(&mut self, now: Instant) {
        let due: Vec<LinkId> = self
            .paced
            .iter()
            .filter(|(_, &until)| until <= now)
            .map(|(&link, _)| link)
            .collect();
        for link in &due {
            self.paced.remove(link);
        }
        self.unhold(due);
    }

    /// Adds one hold on `source`; the first stops its reading.
    fn hold(&mut self, source: LinkId) {
        let count = self.held.entry(source).or_insert(0);
        *count += 1;
        if *count == 1 {
            if let Some(source) = self.links.get(&source) {
                source.shared.paused.store(true, Ordering::Release);
            }
        }
    }

    /// Lets go of what the links whose queues drained below the low-water mark held back.
    fn release_drained(&mut self) {
        let mut drained = Vec::new();
        for (&link, tasks) in &self.links {
            if tasks.holding.is_empty() && !self.commands_held_by.contains(&link) {
                continue;
            }
            if !over_low_water(tasks) {
                drained.push(link);
                continue;
            }
            // Filled again since its writer signalled: watched again, then checked again
            // (the writer may have drained it in between).
            tasks.shared.watched.store(true, Ordering::Release);
            if !over_low_water(tasks) {
                drained.push(link);
            }
        }
        for link in drained {
            self.release(link);
        }
    }

    /// Lets go of what `link`'s queue held back (it drained, or it is closed).
    fn release(&mut self, link: LinkId) {
        self.commands_held_by.retain(|&held_by| held_by != link);
        let holding = match self.links.get_mut(&link) {
            Some(tasks) => {
                tasks.shared.watched.store(false, Ordering::Release);
                std::mem::take(&mut tasks.holding)
            }
            None => Vec::new(),
        };
        self.unhold(holding);
    }

    /// Ends one hold on each of `sources`; a link no queue holds any more is read again.
    fn unhold(&mut self, sources: Vec<LinkId>) {
        for source in sources {
            let Some(count) = self.held.get_mut(&source) else {
                continue;
            };
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.held.remove(&source);
                if let Some(source) = self.links.get(&source) {
                    source.shared.paused.store(false, Ordering::Release);
                    source.shared.resume.notify_one();
                }
            }
        }
    }

    /// When the first link whose queue is over half its budget may have to be closed, or
    /// one that holds others back may be stuck.
    fn next_stall_check(&self) -> Option<Instant> {
        self.links
            .iter()
            .filter_map(|(link, t)| {
                let (since, _) = t.full_since?;
                let holds = !t.holding.is_empty() || self.commands_held_by.contains(link);
                Some(since + if holds { STUCK_AFTER } else { STALL_LIMIT })
            })
            .min()
    }

    /// Lets go of what stuck links held back (they write nothing: their lines are dropped
    /// at their budget instead, and they are closed after [`STALL_LIMIT`]).
    fn release_stuck(&mut self, now: Instant) {
        let stuck_links: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(link, t)| {
                (!t.holding.is_empty() || self.commands_held_by.contains(link)) && stuck(t, now)
            })
            .map(|(&link, _)| link)
            .collect();
        for link in stuck_links {
            tracing::debug!(link, "a full write queue writes nothing: stuck");
            self.release(link);
        }
    }

    /// Closes the links whose queue stayed over half its budget, with nothing of it
    /// written, for [`STALL_LIMIT`]; a link that drained below half, or wrote something,
    /// meanwhile is given a fresh start.
    fn close_stalled(&mut self) {
        let now = Instant::now();
        let mut stalled = Vec::new();
        for (&link, tasks) in &mut self.links {
            let Some((since, written_then)) = tasks.full_since else {
                continue;
            };
            let written = tasks.shared.written.load(Ordering::Relaxed);
            let queued = tasks.shared.queued.load(Ordering::Relaxed);
            let lines = LINK_QUEUE - tasks.writer.capacity();
            let over_half = queued >= LINK_QUEUE_BYTES / 2 || lines >= LINK_QUEUE / 2;
            let holds = !tasks.holding.is_empty() || self.commands_held_by.contains(&link);
            if !over_half && !holds {
                tasks.full_since = None;
            } else if written != written_then {
                tasks.full_since = Some((now, written));
            } else if over_half && now.duration_since(since) >= STALL_LIMIT {
                stalled.push(link);
            }
        }
        for link in stalled {
            self.close_link(link, "not reading: its write queue stayed full");
        }
    }

    /// Closes a link on the runtime's own account and tells the overlay.
    fn close_link(&mut self, link: LinkId, reason: &str) {
        self.forget_link(link);
        self.node.link_closed(Instant::now(), link, reason);
    }

    /// Stops a link's tasks and lets go of what its queue held back.
    fn forget_link(&mut self, link: LinkId) {
        self.release(link);
        if let Some(tasks) = self.links.remove(&link) {
            drop(tasks.writer);
            tasks.reader.abort();
        }
        self.held.remove(&link);
        self.paced.remove(&link);
    }

    async fn input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Accepted(stream, addr) => self.open(now, stream, addr, true),
            Input::Dialed(stream, addr) => self.open(now, stream, addr, false),
            Input::DialFailed(addr, error) => self.node.dial_failed(now, addr, &error),
            Input::Frame(link, frame) => {
                if !self.turn.links.contains(&link) {
                    self.turn.links.push(link);
                }
                if let Some(tasks) = self.links.get(&link) {
                    tasks.shared.handled(frame_len(&frame));
                }
                self.node.line_received(now, link, frame);
            }
            Input::FirstBytes(link, bytes) => self.node.first_bytes(now, link, &bytes),
            Input::HandshakeFrame(link, frame, reply) => {
                self.node.line_received(now, link, frame);
                self.execute().await;
                let cipher = self.links.get_mut(&link).and_then(|t| t.read_cipher.take());
                let next = match cipher {
                    Some(cipher) => ReadNext::Decrypt(cipher),
                    None if self.node.handshaking(link) => ReadNext::Lockstep,
                    None => ReadNext::Free,
                };
                let _ = reply.send(next);
            }
            Input::Closed(link, reason) => {
                self.forget_link(link);
                self.node.link_closed(now, link, &reason);
            }
            Input::Discovered(peers) => self.node.discovered(now, peers),
            Input::Registrar(event) => {
                let _ = self.events.send(NodeEvent::Rendezvous(event)).await;
            }
            Input::DiscoverFailed(error) => {
                let _ = self.events.send(NodeEvent::DiscoverFailed(error)).await;
            }
            Input::Pex(input) => match (&mut self.pex, input) {
                (Some(pex), input) => pex.input(now, input),
                (None, PexInput::Accepted(stream, _) | PexInput::Dialed(stream, _)) => {
                    tokio::spawn(crate::pex::close_gently(stream));
                }
                (None, _) => {}
            },
        }
    }

    fn command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Connect(addr) => self.node.connect(now, addr),
            Command::Reconnect => self.node.reconnect(now),
            Command::Watch(on) => self.node.set_watch(on),
            Command::Metrics { peer, reply } => {
                let _ = reply.send(self.node.request_metrics(&peer));
            }
            Command::Snapshot(reply) => {
                let neighbours = self.node.neighbours();
                let queue_bytes_by_peer = neighbours
                    .iter()
                    .filter_map(|n| {
                        let tasks = self.links.get(&n.link)?;
                        Some((n.peer.clone(), tasks.shared.queued.load(Ordering::Relaxed)))
                    })
                    .collect();
                let _ = reply.send(Snapshot {
                    neighbours,
                    queue_bytes_by_peer,
                    routes: self.node.routes(now),
                    known: self.node.known_peers(),
                    counters: self.node.counters(),
                    pins: self.node.pins(),
                    key: self.node.public_key(),
                    queued_bytes: self.queued_total.load(Ordering::Relaxed),
                    fullest_queue_bytes: self
                        .links
                        .values()
                        .map(|tasks| tasks.shared.queued.load(Ordering::Relaxed))
                        .max()
                        .unwrap_or(0),
                });
            }
            Command::Trust {
                peer_id,
                key,
                reply,
            } => {
                let _ = reply.send(self.node.trust(&peer_id, key));
            }
            Command::Forget { peer_id, reply } => {
                let _ = reply.send(self.node.forget_pin(&peer_id));
            }
            Command::Shown(msg_id) => self.shown(&msg_id),
            Command::Query {
                service,
                body,
                ttl,
                reply,
            } => {
                let _ = reply.send(self.node.query(now, &service, body, ttl));
            }
            Command::Answer { query_id, body } => self.node.answer(now, &query_id, body),
            Command::SpliceAsk {
                relay,
                with,
                ask,
                reply,
            } => {
                self.splice_asks.retain(|_, waiter| !waiter.is_closed());
                if self.splice_asks.len() >= MAX_SPLICE_ASKS {
                    let reason = SpliceRefusal::Busy;
                    let _ = reply.send(Err(StreamError::SpliceRefused { relay, reason }));
                    return;
                }
                match self.node.splice_ask(now, &relay, &with, &ask) {
                    Ok(()) => {
                        self.splice_asks.insert((relay, with, ask), reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(StreamError::Api(e)));
                    }
                }
            }
            Command::Send { .. } | Command::Shutdown => {}
        }
    }

    /// A neighbour asks this node to splice it with another: the broker decides, with two
    /// new tokens from the operating system, and its answers go out on the links.
    fn splice_asked(&mut self, peer: String, with: String, ask: String) {
        let now = Instant::now();
        let refused = |reason| {
            vec![SpliceAnswer {
                peer: peer.clone(),
                with: with.clone(),
                ask: ask.clone(),
                outcome: Err(reason),
            }]
        };
        let answers =
            match (&self.splices, splice_token(), splice_token()) {
                (None, _, _) => refused(SpliceRefusal::Unsupported),
                (Some(splices), Some(theirs), Some(ours)) => stream::lock_splices(splices)
                    .broker
                    .ask(now, &peer, &with, &ask, [theirs, ours]),
                (Some(_), _, _) => refused(SpliceRefusal::Busy),
            };
        for answer in answers {
            match &answer.outcome {
                Ok(_) => {
                    tracing::debug!(peer = %answer.peer, with = %answer.with, "splice granted")
                }
                Err(e) => {
                    tracing::debug!(peer = %answer.peer, with = %answer.with, error = %e, "splice refused")
                }
            }
            self.node.splice_answer(now, answer);
        }
    }

    fn open(&mut self, now: Instant, stream: TcpStream, addr: SocketAddr, inbound: bool) {
        if inbound && self.links.len() >= MAX_OPEN_LINKS {
            self.warnings
                .warn("too many connections; answered busy", &addr);
            tokio::spawn(refuse_busy(stream, self.node.busy_line()));
            return;
        }
        let _ = stream.set_nodelay(true);
        let link = self.next_link;
        self.next_link += 1;
        let (read_half, write_half) = stream.into_split();
        let (writer, lines) = mpsc::channel(LINK_QUEUE);
        let shared = Arc::new(LinkShared::new());
        tokio::spawn(write_loop(
            write_half,
            lines,
            Arc::clone(&shared),
            Arc::clone(&self.queued_total),
            Arc::clone(&self.drained),
        ));
        let reader = tokio::spawn(read_loop(
            read_half,
            link,
            self.inputs.clone(),
            Arc::clone(&shared),
        ));
        self.links.insert(
            link,
            LinkTasks {
                writer,
                reader,
                shared,
                full_since: None,
                holding: Vec::new(),
                read_cipher: None,
            },
        );
        self.node.link_opened(now, link, addr, inbound);
    }

    /// Hands `event` to the service it is addressed to; gives it back when no route takes
    /// it. A message handed over is marked shown; one its service could not take (its inbox
    /// full, or the service stopping) is not, so a restart hands it over again.
    fn route(&mut self, event: Event) -> Option<Event> {
        let (service, delivery, msg_id) = match event {
            Event::Message {
                msg_id,
                src,
                dst,
                cast,
                service,
                payload,
                origin_key,
            } if self.routes.serves(service.as_deref().unwrap_or(UNTAGGED)) => {
                let message = ServiceMessage {
                    msg_id: msg_id.clone(),
                    src,
                    cast,
                    payload,
                    origin_key,
                    dst,
                };
                let service = service.unwrap_or_else(|| UNTAGGED.to_owned());
                (service, Delivery::Message(message), Some(msg_id))
            }
            Event::Query {
                query_id,
                src,
                service,
                body,
            } if self.routes.serves(&service) => {
                let query = ServiceQuery {
                    query_id,
                    src,
                    body,
                };
                (service, Delivery::Query(query), None)
            }
            Event::QueryHit {
                query_id,
                src,
                service,
                body,
            } if self.routes.serves(&service) => {
                let hit = ServiceQuery {
                    query_id,
                    src,
                    body,
                };
                (service, Delivery::Hit(hit), None)
            }
            other => return Some(other),
        };
        self.hand_over(&service, delivery, msg_id);
        None
    }

    /// Hands `delivery` to `service`; a message handed over (`msg_id`) is dropped from
    /// storage unless it is the chat's, which its interface marks shown once it has shown it.
    fn hand_over(&mut self, service: &str, delivery: Delivery, msg_id: Option<String>) {
        match self.routes.deliver(service, delivery) {
            Ok(()) => {
                if let Some(msg_id) = msg_id.filter(|_| service != UNTAGGED) {
                    self.shown(&msg_id);
                }
            }
            Err(refused) if refused.why == Undeliverable::Full => self.warnings.warn(
                "a service's inbox is full; delivery dropped",
                &format_args!("service {service}"),
            ),
            Err(refused) if refused.why == Undeliverable::NoRoute => {
                tracing::debug!(%service, "no route for the service; delivery dropped");
            }
            Err(_) => tracing::debug!(%service, "the service is stopping; delivery dropped"),
        }
    }

    /// Drops a message handed over from storage, so a restart does not hand it over again.
    fn shown(&mut self, msg_id: &str) {
        if let Some(store) = &mut self.store {
            if let Err(e) = store.shown(msg_id) {
                tracing::error!(error = %e, "shown message not dropped from storage");
            }
        }
    }

    fn log_event(&mut self, event: &Event) {
        match event {
            Event::LinkUp { peer, addr, .. } => tracing::info!(%peer, %addr, "link up"),
            Event::LinkDown { peer, reason } => tracing::info!(%peer, %reason, "link down"),
            Event::Message {
                msg_id, src, dst, ..
            } => tracing::debug!(%msg_id, %src, %dst, "message"),
            Event::Undelivered {
                msg_id,
                dst,
                reason,
            } => tracing::warn!(%msg_id, %dst, %reason, "undelivered"),
            Event::KeyMismatch {
                peer,
                pinned,
                offered,
                ..
            } => tracing::warn!(
                %peer, %pinned, %offered,
                "refused: {peer} is pinned to key {pinned} but offered key {offered}"
            ),
            Event::Forged {
                from, src, reason, ..
            } => self.warnings.warn(
                "message refused: origin not authentic",
                &format_args!("from {from} claiming {src}: {reason}"),
            ),
            Event::Refused {
                addr,
                refusal: Refusal::Duplicate,
                detail,
                ..
            } => {
                tracing::debug!(%addr, %detail, "second link to a peer refused");
            }
            Event::Refused {
                addr,
                refusal,
                detail,
                ..
            } => self.warnings.warn(
                "connection refused",
                &format_args!("{addr}: {refusal}: {detail}"),
            ),
            Event::DialGaveUp {
                addr,
                attempts,
                reason,
                ..
            } => tracing::warn!(%addr, attempts, %reason, "gave up dialing"),
            Event::RemoteError { code, from, .. } => {
                tracing::debug!(%code, %from, "error received")
            }
            Event::DialFailed {
                addr,
                error,
                asked: false,
                ..
            } => self.warnings.warn(
                "cannot reach peers learnt from a rendezvous, LAN discovery or a peer list",
                &format_args!("{addr}: {error}"),
            ),
            Event::DialFailed { addr, error, .. } => tracing::debug!(%addr, %error, "dial failed"),
            _ => {}
        }
    }
}

/// Answers a connection beyond [`MAX_OPEN_LINKS`] with BYE `busy` and closes it.
async fn refuse_busy(mut stream: TcpStream, bye: Vec<u8>) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&bye)).await;
    let _ = stream.shutdown().await;
}

/// Accepts connections: each is looked at (without reading it) until its first bytes tell a
/// data stream from a peer link, at most [`CLASSIFYING`] at once for at most
/// [`CLASSIFY_TIMEOUT`]; beyond that limit, connections go straight to the overlay, whose
/// handshake admission applies.
async fn accept_loop(
    listener: TcpListener,
    inputs: mpsc::Sender<Input>,
    streams: StreamAcceptor,
    splicer: Splicer,
    routes: Routes,
) {
    let classifying = Arc::new(Semaphore::new(CLASSIFYING));
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let Ok(permit) = Arc::clone(&classifying).try_acquire_owned() else {
                    if inputs.send(Input::Accepted(stream, addr)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let inputs = inputs.clone();
                let streams = streams.clone();
                let splicer = splicer.clone();
                let routes = routes.clone();
                tokio::spawn(async move {
                    let kind = classify(&stream).await;
                    drop(permit);
                    match kind {
                        Kind::Stream => {
                            let Some(stream) = streams.handle(stream, addr).await else {
                                return;
                            };
                            if let Err(refused) = routes.deliver_stream(stream) {
                                let why = refused.why;
                                if let Delivery::Stream(mut stream) = refused.delivery {
                                    tracing::debug!(%addr, kind = stream.service(), ?why, "stream closed");
                                    stream.shutdown().await;
                                }
                            }
                        }
                        Kind::Splice => splicer.handle(stream, addr).await,
                        Kind::Course => {
                            if let Err(refused) = routes.deliver_course_request(stream, addr) {
                                tracing::debug!(%addr, why = ?refused.why, "course request closed");
                            }
                        }
                        Kind::Link => {
                            let _ = inputs.send(Input::Accepted(stream, addr)).await;
                        }
                        Kind::Pex => {
                            let input = Input::Pex(PexInput::Accepted(stream, addr));
                            let _ = inputs.send(input).await;
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a new connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A peer link (or anything else: the overlay judges it).
    Link,
    /// A data stream.
    Stream,
    /// A request to splice two connections into one stream.
    Splice,
    /// A course program's request.
    Course,
    /// A seed 003 peer (its connection opens with a `welcome`).
    Pex,
}

/// Decides what `first` (the bytes that came so far) opens; `None` until enough came.
fn kind_of(first: &[u8]) -> Option<Kind> {
    let kinds = [
        (STREAM_PREFIX, Kind::Stream),
        (SPLICE_PREFIX, Kind::Splice),
        (COURSE_REQUEST_PREFIX, Kind::Course),
        (teia_wire::pex::WELCOME_PREFIX, Kind::Pex),
    ];
    let mut undecided = false;
    for (prefix, kind) in kinds {
        let n = first.len().min(prefix.len());
        if first.get(..n) == prefix.get(..n) {
            if n == prefix.len() {
                return Some(kind);
            }
            undecided = true;
        }
    }
    (!undecided).then_some(Kind::Link)
}

/// What a new connection opens, judged by peeking at its first bytes.
async fn classify(stream: &TcpStream) -> Kind {
    let mut first = [0u8; 17];
    let deadline = tokio::time::Instant::now() + CLASSIFY_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Kind::Link,
        };
        match kind_of(first.get(..n).unwrap_or_default()) {
            Some(kind) => return kind,
            None => {
                if tokio::time::Instant::now() >= deadline {
                    return Kind::Link;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// Whether a link's queue has written nothing for [`STUCK_AFTER`] while full.
fn stuck(tasks: &LinkTasks, now: Instant) -> bool {
    tasks.full_since.is_some_and(|(since, written)| {
        written == tasks.shared.written.load(Ordering::Relaxed)
            && now.duration_since(since) >= STUCK_AFTER
    })
}

/// The bytes of a line read (none for a line refused as too long).
fn frame_len(frame: &Result<Vec<u8>, DecodeError>) -> usize {
    frame.as_ref().map_or(0, Vec::len)
}

/// Whether a link's queue is past its high-water mark (in bytes or in lines).
fn over_high_water(tasks: &LinkTasks) -> bool {
    tasks.shared.queued.load(Ordering::Relaxed) >= LINK_QUEUE_BYTES / HIGH_WATER
        || LINK_QUEUE - tasks.writer.capacity() >= LINK_QUEUE / HIGH_WATER
}

/// Whether a link's queue is still over its low-water mark (half the high-water mark).
fn over_low_water(tasks: &LinkTasks) -> bool {
    tasks.shared.queued.load(Ordering::Relaxed) >= LINK_QUEUE_BYTES / HIGH_WATER / 2
        || LINK_QUEUE - tasks.writer.capacity() >= LINK_QUEUE / HIGH_WATER / 2
}

/// Reads a link: while it is in its handshake, one line at a time, waiting after each to
/// hear whether what follows is encrypted; then lines as fast as they come, decrypting
/// frames on an encrypted link.
async fn read_loop(
    mut stream: tokio::net::tcp::OwnedReadHalf,
    link: LinkId,
    inputs: mpsc::Sender<Input>,
    shared: Arc<LinkShared>,
) {
    let mut decoder = LineDecoder::default();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut plain = Vec::new();
    let mut lockstep = true;
    let mut secure: Option<SecureReader> = None;
    let mut first = true;
    let reason = 'read: loop {
        shared.wait_resumed().await;
        let n = match stream.read(&mut chunk).await {
            Ok(0) => break "closed by peer".to_owned(),
            Ok(n) => n,
            Err(e) => break e.to_string(),
        };
        let mut input = chunk.get(..n).unwrap_or_default();
        if first {
            first = false;
            let said = input.get(..n.min(FIRST_BYTES)).unwrap_or_default().to_vec();
            if inputs.send(Input::FirstBytes(link, said)).await.is_err() {
                return;
            }
        }
        if let Some(reader) = &mut secure {
            plain.clear();
            if let Err(e) = reader.open(input, &mut plain) {
                break e.to_string();
            }
            input = &plain;
        }
        while let Some(frame) = decoder.decode(&mut input) {
            if !lockstep {
                shared.read_one(frame_len(&frame));
                if inputs.send(Input::Frame(link, frame)).await.is_err() {
                    return;
                }
                continue;
            }
            let (reply, next) = oneshot::channel();
            if inputs
                .send(Input::HandshakeFrame(link, frame, reply))
                .await
                .is_err()
            {
                return;
            }
            match next.await {
                Ok(ReadNext::Lockstep) => {}
                Ok(ReadNext::Free) => lockstep = false,
                Ok(ReadNext::Decrypt(cipher)) => {
                    lockstep = false;
                    let mut reader = cipher.reader();
                    let mut opened = Vec::new();
                    if let Err(e) = reader.open(input, &mut opened) {
                        break 'read e.to_string();
                    }
                    secure = Some(reader);
                    let mut rest = opened.as_slice();
                    while let Some(frame) = decoder.decode(&mut rest) {
                        shared.read_one(frame_len(&frame));
                        if inputs.send(Input::Frame(link, frame)).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
                Err(_) => return,
            }
        }
    };
    let _ = inputs.send(Input::Closed(link, reason)).await;
}

/// Writes the queued lines: each with its own `write` call (course clients read one line
/// per read), or, once the link may coalesce, as many as are queued (up to [`COALESCE_MAX`]
/// bytes) in one; sealed into frames once the link is encrypted. Releases each line's bytes
/// from the budgets once written.
async fn write_loop(
    mut stream: tokio::net::tcp::OwnedWriteHalf,
    mut lines: mpsc::Receiver<Out>,
    shared: Arc<LinkShared>,
    total: Arc<AtomicUsize>,
    drained: Arc<tokio::sync::Notify>,
) {
    let (coalesce, queued) = (&shared.coalesce, &shared.queued);
    let mut batch = Vec::new();
    let mut sealed = Vec::new();
    let mut secure: Option<SecureWriter> = None;
    let mut next_keys = None;
    while let Some(out) = lines.recv().await {
        let line = match out {
            Out::Encrypt(cipher) => {
                secure = Some(cipher.writer());
                continue;
            }
            Out::Line(line) => line,
        };
        batch.clear();
        batch.extend_from_slice(&line);
        if coalesce.load(Ordering::Relaxed) {
            while batch.len() < COALESCE_MAX {
                match lines.try_recv() {
                    Ok(Out::Line(more)) => batch.extend_from_slice(&more),
                    Ok(Out::Encrypt(cipher)) => {
                        next_keys = Some(cipher);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        let bytes = match &mut secure {
            Some(writer) => {
                sealed.clear();
                if writer.seal(&batch, &mut sealed).is_err() {
                    return;
                }
                &sealed
            }
            None => &batch,
        };
        let written = stream.write_all(bytes).await;
        queued.fetch_sub(batch.len(), Ordering::Relaxed);
        total.fetch_sub(batch.len(), Ordering::Relaxed);
        if written.is_err() {
            release_all(&mut lines, queued, &total);
            return;
        }
        shared
            .written
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let lines_left = LINK_QUEUE - lines.len().min(LINK_QUEUE);
        let below = queued.load(Ordering::Relaxed) < LINK_QUEUE_BYTES / HIGH_WATER / 2
            && lines_left > LINK_QUEUE - LINK_QUEUE / HIGH_WATER / 2;
        if below && shared.watched.swap(false, Ordering::AcqRel) {
            drained.notify_one();
        }
        if let Some(cipher) = next_keys.take() {
            secure = Some(cipher.writer());
        }
    }
    let _ = stream.shutdown().await;
}

/// Gives back the budget of lines that will never be written.
fn release_all(lines: &mut mpsc::Receiver<Out>, queued: &AtomicUsize, total: &AtomicUsize) {
    lines.close();
    while let Ok(out) = lines.try_recv() {
        if let Out::Line(line) = out {
            queued.fetch_sub(line.len(), Ordering::Relaxed);
            total.fetch_sub(line.len(), Ordering::Relaxed);
        }
    }
}

async fn discover_loop(
    client: RendezvousClient,
    namespace: String,
    interval: Duration,
    inputs: mpsc::Sender<Input>,
) {
    let mut refused_early = 0;
    loop {
        let input = match client.discover(Some(&namespace)).await {
            Ok(records) => Input::Discovered(
                records
                    .into_iter()
                    .filter_map(|r| {
                        Some((r.peer_id(), SocketAddr::new(r.ip.parse().ok()?, r.port)))
                    })
                    .collect(),
            ),
            Err(e) => Input::DiscoverFailed(e.to_string()),
        };
        // A rendezvous that saw our DISCOVER before our first REGISTER refuses it: ask
        // again soon rather than after a whole interval.
        let early = matches!(&input, Input::DiscoverFailed(e) if e.contains("not_registered"));
        if inputs.send(input).await.is_err() {
            return;
        }
        let wait = if early && refused_early < DISCOVER_EARLY_RETRIES {
            refused_early += 1;
            DISCOVER_EARLY_RETRY.min(interval)
        } else {
            interval
        };
        tokio::time::sleep(wait).await;
    }
}

/// `(name, namespace)` of a peer id.
fn split_peer_id(peer_id: &str) -> (String, String) {
    match peer_id.split_once('@') {
        Some((name, namespace)) => (name.to_owned(), namespace.to_owned()),
        None => (peer_id.to_owned(), String::new()),
    }
}

/// A new splice token: 16 bytes from the operating system, unpadded base64url; `None` when
/// it has none to give.
fn splice_token() -> Option<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).ok()?;
    Some(teia_core::identity::encode(&bytes))
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_told_apart_by_their_first_bytes() {
        assert_eq!(kind_of(b"{\"type\":\"HELLO\""), Some(Kind::Link));
        assert_eq!(kind_of(b"{\"type\":\"SPLICE\",\"t"), Some(Kind::Splice));
        assert_eq!(kind_of(b"{\"type\":\"S"), None);
        assert_eq!(kind_of(b"{\"type\":\"STREAM\",\"p"), Some(Kind::Stream));
        assert_eq!(kind_of(b"{\"method\": \"DOWN"), Some(Kind::Course));
        assert_eq!(kind_of(b"{\"meth"), None);
        assert_eq!(kind_of(b"{\""), None);
        assert_eq!(kind_of(b"GET / HTTP/1.1"), Some(Kind::Link));
        assert_eq!(kind_of(b"{\"type\":\"welcome\",\"m"), Some(Kind::Pex));
    }
}
