//! The node runtime: one driver task owns the sans-IO [`Node`] and carries out its actions;
//! one reader and one writer task per link; the accept loop, dials and the rendezvous
//! client feed it events. No protocol decision is taken here.
//!
//! Bounds: the driver's inbox holds [`INBOX`] events (readers wait when it is full, which
//! slows their peers through TCP); each link's write queue holds [`LINK_QUEUE`] lines (when
//! full, further lines for that link are dropped and counted, so one slow peer never stalls
//! the others); the command queue holds [`COMMANDS`] requests; events to the application
//! queue up to [`EVENTS`] and then make the node wait for the application.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use teia_core::overlay::{
    ApiError, Config as OverlayConfig, Counters, Event, LinkId, NeighbourInfo, Node, RouteInfo,
};
use teia_wire::codec::LineDecoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::rendezvous::{Registrar, RegistrarEvent, RendezvousClient};
use crate::store::{NodeStore, StoreError};

/// Events waiting for the driver, at most.
pub const INBOX: usize = 4096;
/// Lines waiting to be written on one link, at most.
pub const LINK_QUEUE: usize = 1024;
/// API requests waiting, at most.
pub const COMMANDS: usize = 256;
/// Events waiting for the application, at most.
pub const EVENTS: usize = 4096;
/// Inputs handled in a row before the driver carries out the resulting actions.
const INPUT_BATCH: usize = 64;
/// Bytes written in one `write` at most when a link coalesces lines.
const COALESCE_MAX: usize = 64 * 1024;
/// Time allowed to connect to a peer.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Time BYEs get to go out at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The overlay's settings (peer id, timers, limits).
    pub overlay: OverlayConfig,
    /// Where to accept links; `None` for a node that only dials out.
    pub listen: Option<SocketAddr>,
    /// Rendezvous server to register with and discover from.
    pub rendezvous: Option<String>,
    /// Peers to dial at start and keep connected.
    pub peers: Vec<SocketAddr>,
    /// Interval between two DISCOVERs.
    pub discover_interval: Duration,
    /// ttl asked for when registering, in seconds.
    pub register_ttl: u32,
    /// Database keeping SENDs awaiting their ACK and delivered ids across restarts; `None`
    /// keeps them in memory only.
    pub store: Option<std::path::PathBuf>,
}

/// What the application hears: the overlay's events plus the runtime's own.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// The node is running.
    Ready {
        /// Our peer id.
        peer_id: String,
        /// Where we accept links.
        listen: Option<SocketAddr>,
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
    /// Traffic counters.
    pub counters: Counters,
    /// Lines dropped because a link's write queue was full.
    pub dropped: u64,
}

enum Command {
    Send {
        dst: String,
        payload: Value,
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
    Shutdown,
}

enum Input {
    Accepted(TcpStream, SocketAddr),
    Dialed(TcpStream, SocketAddr),
    DialFailed(SocketAddr, String),
    Frame(LinkId, Result<Vec<u8>, teia_wire::codec::DecodeError>),
    Closed(LinkId, String),
    Discovered(Vec<(String, SocketAddr)>),
    Registrar(RegistrarEvent),
    DiscoverFailed(String),
}

/// Handle to a running node: the node's API for services and interfaces.
#[derive(Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
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
    /// Sends `payload` to `name@namespace` (acknowledged), `#namespace` or `*`; returns the
    /// message id.
    pub async fn send(&self, dst: &str, payload: Value) -> Result<String, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::Send {
            dst: dst.to_owned(),
            payload,
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

/// Starts a node. Returns its handle, its events, and the task that ends when it stops.
pub async fn start(
    mut config: NodeConfig,
) -> Result<(NodeHandle, mpsc::Receiver<NodeEvent>, JoinHandle<()>), NodeError> {
    let listener = match config.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
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
    let mut background = Vec::new();
    if let Some(listener) = listener {
        background.push(tokio::spawn(accept_loop(listener, inputs.clone())));
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
    let mut node = Node::new(config.overlay.clone(), Instant::now(), unix_millis());
    let store = match &config.store {
        Some(path) => {
            let (store, restored) = NodeStore::open(path)?;
            node.restore(Instant::now(), restored.sends, restored.delivered);
            Some(store)
        }
        None => None,
    };
    let driver = Driver {
        node,
        store,
        inputs,
        events,
        links: HashMap::new(),
        next_link: 1,
        dropped: 0,
    };
    let peer_id = config.overlay.peer_id.clone();
    let peers = config.peers.clone();
    let task = tokio::spawn(async move {
        driver.run(peer_id, listen, peers, inbox, command_rx).await;
        let _ = stop_registrar.send(());
        if let Some(registrar) = registrar {
            let _ = tokio::time::timeout(Duration::from_secs(3), registrar).await;
        }
        for task in background {
            task.abort();
        }
    });
    Ok((NodeHandle { commands }, event_rx, task))
}

struct LinkTasks {
    writer: mpsc::Sender<Vec<u8>>,
    reader: JoinHandle<()>,
    /// Set when lines may be written several per `write`.
    coalesce: Arc<AtomicBool>,
}

struct Driver {
    node: Node,
    store: Option<NodeStore>,
    inputs: mpsc::Sender<Input>,
    events: mpsc::Sender<NodeEvent>,
    links: HashMap<LinkId, LinkTasks>,
    next_link: LinkId,
    dropped: u64,
}

impl Driver {
    async fn run(
        mut self,
        peer_id: String,
        listen: Option<SocketAddr>,
        peers: Vec<SocketAddr>,
        mut inbox: mpsc::Receiver<Input>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let _ = self.events.send(NodeEvent::Ready { peer_id, listen }).await;
        for addr in peers {
            self.node.connect(Instant::now(), addr);
        }
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        loop {
            self.execute().await;
            let wake = self
                .node
                .poll_timeout()
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
                command = commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(Command::Send { dst, payload, reply }) => {
                        let sent = self.node.send(Instant::now(), &dst, payload);
                        // Stored (and on its way) before the sender hears it was sent.
                        self.execute().await;
                        let _ = reply.send(sent);
                    }
                    Some(command) => self.command(command),
                },
                () = &mut timer => self.node.handle_timeout(Instant::now()),
            }
        }
        self.node.shutdown(Instant::now());
        self.execute().await;
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
        while let Some(action) = self.node.poll_action() {
            match action {
                teia_core::overlay::Action::Write { link, line } => {
                    if let Some(tasks) = self.links.get(&link) {
                        if tasks.writer.try_send(line).is_err() {
                            self.dropped += 1;
                            tracing::warn!(link, "write queue full; line dropped");
                        }
                    }
                }
                teia_core::overlay::Action::Close { link } => {
                    if let Some(tasks) = self.links.remove(&link) {
                        drop(tasks.writer);
                        tasks.reader.abort();
                    }
                }
                teia_core::overlay::Action::Remember(send) => {
                    if let Some(store) = &mut self.store {
                        if let Err(e) = store.remember(&send) {
                            tracing::error!(error = %e, "message not stored");
                        }
                    }
                }
                teia_core::overlay::Action::Forget { msg_id } => {
                    if let Some(store) = &mut self.store {
                        if let Err(e) = store.forget(&msg_id) {
                            tracing::error!(error = %e, "message not dropped from storage");
                        }
                    }
                }
                teia_core::overlay::Action::Delivered { msg_id } => {
                    if let Some(store) = &mut self.store {
                        if let Err(e) = store.delivered(&msg_id) {
                            tracing::error!(error = %e, "delivery not stored");
                        }
                    }
                }
                teia_core::overlay::Action::Coalesce { link } => {
                    if let Some(tasks) = self.links.get(&link) {
                        tasks.coalesce.store(true, Ordering::Relaxed);
                    }
                }
                teia_core::overlay::Action::Dial { addr } => {
                    let inputs = self.inputs.clone();
                    tokio::spawn(async move {
                        let input = match tokio::time::timeout(
                            DIAL_TIMEOUT,
                            TcpStream::connect(addr),
                        )
                        .await
                        {
                            Ok(Ok(stream)) => Input::Dialed(stream, addr),
                            Ok(Err(e)) => Input::DialFailed(addr, e.to_string()),
                            Err(_) => Input::DialFailed(addr, "connect timed out".to_owned()),
                        };
                        let _ = inputs.send(input).await;
                    });
                }
                teia_core::overlay::Action::Event(event) => {
                    log_event(&event);
                    let _ = self.events.send(NodeEvent::Overlay(event)).await;
                }
            }
        }
    }

    async fn input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Accepted(stream, addr) => self.open(now, stream, addr, true),
            Input::Dialed(stream, addr) => self.open(now, stream, addr, false),
            Input::DialFailed(addr, error) => self.node.dial_failed(now, addr, &error),
            Input::Frame(link, frame) => self.node.line_received(now, link, frame),
            Input::Closed(link, reason) => {
                if let Some(tasks) = self.links.remove(&link) {
                    tasks.reader.abort();
                }
                self.node.link_closed(now, link, &reason);
            }
            Input::Discovered(peers) => self.node.discovered(now, peers),
            Input::Registrar(event) => {
                let _ = self.events.send(NodeEvent::Rendezvous(event)).await;
            }
            Input::DiscoverFailed(error) => {
                let _ = self.events.send(NodeEvent::DiscoverFailed(error)).await;
            }
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
                let _ = reply.send(Snapshot {
                    neighbours: self.node.neighbours(),
                    routes: self.node.routes(now),
                    known: self.node.known_peers(),
                    counters: self.node.counters(),
                    dropped: self.dropped,
                });
            }
            Command::Send { .. } | Command::Shutdown => {}
        }
    }

    fn open(&mut self, now: Instant, stream: TcpStream, addr: SocketAddr, inbound: bool) {
        if inbound && self.links.len() >= MAX_OPEN_LINKS {
            tracing::warn!(%addr, "too many links; connection refused");
            return;
        }
        let _ = stream.set_nodelay(true);
        let link = self.next_link;
        self.next_link += 1;
        let (read_half, write_half) = stream.into_split();
        let (writer, lines) = mpsc::channel(LINK_QUEUE);
        let coalesce = Arc::new(AtomicBool::new(false));
        tokio::spawn(write_loop(write_half, lines, Arc::clone(&coalesce)));
        let reader = tokio::spawn(read_loop(read_half, link, self.inputs.clone()));
        self.links.insert(
            link,
            LinkTasks {
                writer,
                reader,
                coalesce,
            },
        );
        self.node.link_opened(now, link, addr, inbound);
    }
}

/// Connections open at once, handshaking ones included; more are refused.
const MAX_OPEN_LINKS: usize = 256;

async fn accept_loop(listener: TcpListener, inputs: mpsc::Sender<Input>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                if inputs.send(Input::Accepted(stream, addr)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn read_loop(
    mut stream: tokio::net::tcp::OwnedReadHalf,
    link: LinkId,
    inputs: mpsc::Sender<Input>,
) {
    let mut decoder = LineDecoder::default();
    let mut chunk = vec![0u8; 16 * 1024];
    let reason = loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) => break "closed by peer".to_owned(),
            Ok(n) => n,
            Err(e) => break e.to_string(),
        };
        let mut input = chunk.get(..n).unwrap_or_default();
        while let Some(frame) = decoder.decode(&mut input) {
            if inputs.send(Input::Frame(link, frame)).await.is_err() {
                return;
            }
        }
    };
    let _ = inputs.send(Input::Closed(link, reason)).await;
}

/// Writes the queued lines: each with its own `write` call (course clients read one line
/// per read), or, once the link may coalesce, as many as are queued (up to [`COALESCE_MAX`]
/// bytes) in one.
async fn write_loop(
    mut stream: tokio::net::tcp::OwnedWriteHalf,
    mut lines: mpsc::Receiver<Vec<u8>>,
    coalesce: Arc<AtomicBool>,
) {
    let mut batch = Vec::new();
    while let Some(line) = lines.recv().await {
        let written = if coalesce.load(Ordering::Relaxed) {
            batch.clear();
            batch.extend_from_slice(&line);
            while batch.len() < COALESCE_MAX {
                match lines.try_recv() {
                    Ok(more) => batch.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            stream.write_all(&batch).await
        } else {
            stream.write_all(&line).await
        };
        if written.is_err() {
            return;
        }
    }
    let _ = stream.shutdown().await;
}

async fn discover_loop(
    client: RendezvousClient,
    namespace: String,
    interval: Duration,
    inputs: mpsc::Sender<Input>,
) {
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
        if inputs.send(input).await.is_err() {
            return;
        }
        tokio::time::sleep(interval).await;
    }
}

fn log_event(event: &Event) {
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
        } => {
            tracing::warn!(%msg_id, %dst, %reason, "undelivered")
        }
        Event::RemoteError { code, from, .. } => tracing::debug!(%code, %from, "error received"),
        Event::DialFailed { addr, error, .. } => tracing::debug!(%addr, %error, "dial failed"),
        _ => {}
    }
}

/// `(name, namespace)` of a peer id.
fn split_peer_id(peer_id: &str) -> (String, String) {
    match peer_id.split_once('@') {
        Some((name, namespace)) => (name.to_owned(), namespace.to_owned()),
        None => (peer_id.to_owned(), String::new()),
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
