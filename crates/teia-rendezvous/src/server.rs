//! The rendezvous server's runtime: accept loop, one short task per connection, the expiry
//! sweeper and graceful shutdown. Protocol decisions live in `teia-wire` (parsing, answers)
//! and `teia-core` (the registry); this module only moves bytes and time between them.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use teia_core::rate::RateLimiter;
use teia_core::rendezvous::{Limits, RecordKey, RegisterError, Registration, Registry, UnixMillis};
use teia_wire::codec::{DecodeError, LineDecoder, MAX_LINE};
use teia_wire::rendezvous::{
    discover_answer_line, parse_request, register_answer_line, request_from_object,
    unregister_answer_line, ErrorCode, RdvError, RegisterOk, Request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

use crate::store::{Change, Store, StoreError};

/// Most records listed in one DISCOVER answer before the line-size cut; more could never
/// fit in a 32 KiB line.
const DISCOVER_MAX_RECORDS: usize = MAX_LINE / 64;
/// Sources tracked by the rate limiter at most.
const RATE_TABLE_SIZE: usize = 65_536;
/// Refused connections being answered at once; beyond this they are closed unanswered.
const MAX_REFUSALS: usize = 256;
/// After answering, how long unread input is drained before closing, so the client reads
/// the answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes drained at most while lingering.
const LINGER_BYTES: usize = 64 * 1024;

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of the database.
    pub data_dir: PathBuf,
    /// Connections served at once; one more is answered `busy` and closed.
    pub max_connections: usize,
    /// Time a connection has to deliver its request line before it is answered `timeout`.
    pub idle_timeout: Duration,
    /// Requests per second allowed per source IP (with a burst of the same size), or `None`
    /// for no limit.
    pub rate_limit: Option<u32>,
    /// Record limits.
    pub limits: Limits,
}

impl Config {
    /// Defaults from PROTOCOL.md: port 8080, 1024 connections, 5 s idle timeout, no rate limit.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(5),
            rate_limit: None,
            limits: Limits::default(),
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Storage could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Shared {
    registry: Mutex<Registry>,
    limiter: Option<Mutex<RateLimiter<IpAddr>>>,
    store: Store,
    /// When the sweeper plans to wake next (UNIX ms); a registration expiring sooner wakes it.
    sweep_at: AtomicU64,
    sweep_wake: Notify,
    idle_timeout: Duration,
    started: Instant,
}

/// A bound server, ready to serve.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
}

impl Server {
    /// Binds the listen address, then opens storage and restores the records still alive
    /// (a server that cannot bind never touches the database another one may be using).
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let (store, stored) = Store::open(&config.data_dir)?;
        let mut registry = Registry::new(config.limits);
        registry.restore(stored, now_millis());
        let limiter = config
            .rate_limit
            .map(|rate| Mutex::new(RateLimiter::new(rate, rate, RATE_TABLE_SIZE)));
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                registry: Mutex::new(registry),
                limiter,
                store,
                sweep_at: AtomicU64::new(u64::MAX),
                sweep_wake: Notify::new(),
                idle_timeout: config.idle_timeout,
                started: Instant::now(),
            }),
            max_connections: config.max_connections.max(1),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Number of records held.
    pub fn records(&self) -> usize {
        self.shared.registry().len()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets the connections in
    /// progress finish (for at most the idle timeout) and flushes storage.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            shared,
            max_connections,
        } = self;
        let connections = Arc::new(Semaphore::new(max_connections));
        let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
        let sweeper = tokio::spawn(sweep(Arc::clone(&shared)));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => admit(stream, peer, &shared, &connections, &refusals, max_connections),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; pausing");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        tracing::info!("shutting down: finishing connections in progress");
        let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
        let drain = connections.acquire_many(all);
        if tokio::time::timeout(shared.idle_timeout + Duration::from_secs(1), drain)
            .await
            .is_err()
        {
            tracing::warn!("some connections were still open at shutdown");
        }
        sweeper.abort();
        let _ = sweeper.await;
        match Arc::try_unwrap(shared) {
            Ok(shared) => {
                let records = shared.registry().len();
                let _ = tokio::task::spawn_blocking(move || shared.store.close()).await;
                tracing::info!(records, "rendezvous stopped");
            }
            Err(_) => tracing::warn!("connections outlived shutdown; storage not flushed cleanly"),
        }
    }
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn monotonic_millis(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Applies the rate and connection limits to a new connection, then serves it.
fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    connections: &Arc<Semaphore>,
    refusals: &Arc<Semaphore>,
    max_connections: usize,
) {
    let ip = peer.ip().to_canonical();
    if let Some(limiter) = &shared.limiter {
        let now = shared.monotonic_millis();
        let allowed = limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(&ip, now);
        if !allowed {
            refuse(stream, RdvError::new(ErrorCode::RateLimited), refusals);
            return;
        }
    }
    let Ok(permit) = Arc::clone(connections).try_acquire_owned() else {
        tracing::debug!(%peer, "connection limit reached");
        refuse(
            stream,
            RdvError::new(ErrorCode::Busy)
                .detail("too many connections")
                .limit(max_connections as u64),
            refusals,
        );
        return;
    };
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        serve_connection(stream, peer, &shared).await;
        drop(permit);
    });
}

/// Answers a connection that will not be served with one error line. At most
/// [`MAX_REFUSALS`] are answered at once; past that a refused connection is just closed.
fn refuse(stream: TcpStream, error: RdvError, refusals: &Arc<Semaphore>) {
    let Ok(permit) = Arc::clone(refusals).try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        answer_and_close(stream, &error.to_line(), Linger::Always).await;
        drop(permit);
    });
}

/// When to drain a client's input before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linger {
    /// The request was not read whole (refused, too long, malformed): more may be coming.
    Always,
    /// The request was read whole: drain only what is already pending.
    IfPending,
}

/// Writes `answer`, half-closes, and drains what the client still sends (bounded in bytes
/// and time) so that closing does not reset the connection before the answer is read.
async fn answer_and_close(mut stream: TcpStream, answer: &[u8], linger: Linger) {
    if stream.write_all(answer).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    if linger == Linger::IfPending {
        let mut probe = [0u8; 512];
        if !matches!(stream.try_read(&mut probe), Ok(n) if n > 0) {
            return;
        }
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

async fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let (answer, linger) =
        match tokio::time::timeout(shared.idle_timeout, read_request(&mut stream)).await {
            Err(_) => (RdvError::new(ErrorCode::Timeout).to_line(), Linger::Always),
            Ok(Err(error)) => (error.to_line(), Linger::Always),
            Ok(Ok(None)) => return,
            Ok(Ok(Some(request))) => (execute(request, peer, shared).await, Linger::IfPending),
        };
    answer_and_close(stream, &answer, linger).await;
}

/// Reads the one request line of a connection. `Ok(None)` when the client closed without
/// sending anything.
async fn read_request(stream: &mut TcpStream) -> Result<Option<Request>, RdvError> {
    let mut decoder = LineDecoder::default();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk).await else {
            return Ok(None);
        };
        if n == 0 {
            return match decoder.finish() {
                Some(line) => parse_request(&line).map(Some),
                None => Ok(None),
            };
        }
        let mut input = chunk.get(..n).unwrap_or_default();
        match decoder.decode(&mut input) {
            Some(Ok(line)) => return parse_request(&line).map(Some),
            Some(Err(DecodeError::LineTooLong { limit })) => {
                return Err(RdvError::new(ErrorCode::LineTooLong).limit(limit as u64))
            }
            Some(Err(other)) => {
                return Err(RdvError::new(ErrorCode::InvalidJson).detail(other.to_string()))
            }
            None => {
                if let Some(object) = decoder.take_unterminated_object() {
                    return request_from_object(&object).map(Some);
                }
            }
        }
    }
}

async fn execute(request: Request, peer: SocketAddr, shared: &Shared) -> Vec<u8> {
    let ip = peer.ip().to_canonical();
    let now = now_millis();
    match request {
        Request::Register {
            namespace,
            name,
            port,
            ttl,
        } => {
            let registration = Registration {
                key: RecordKey {
                    namespace,
                    name,
                    ip,
                },
                port,
                ttl,
                observed_port: peer.port(),
            };
            let committed = {
                let mut registry = shared.registry();
                let Some(slot) = shared.store.try_reserve() else {
                    return storage_busy();
                };
                match registry.register(registration, now) {
                    Ok(record) => {
                        if record.expires_at < shared.sweep_at.load(Ordering::Relaxed) {
                            shared.sweep_wake.notify_one();
                        }
                        slot.send(Change::Upsert(record))
                    }
                    Err(RegisterError::Full { limit }) => {
                        return RdvError::new(ErrorCode::Busy)
                            .detail("the server holds its maximum number of records")
                            .limit(limit as u64)
                            .to_line()
                    }
                    Err(RegisterError::OverQuota { limit }) => {
                        return RdvError::new(ErrorCode::OverQuota)
                            .detail("this address holds its maximum number of records")
                            .limit(limit as u64)
                            .to_line()
                    }
                }
            };
            if let Err(e) = committed.wait().await {
                tracing::error!(error = %e, "REGISTER not persisted");
                return storage_busy();
            }
            let ip = ip.to_string();
            register_answer_line(&RegisterOk {
                status: "OK",
                ttl,
                observed_ip: ip.clone(),
                ip,
                port,
                observed_port: peer.port(),
            })
        }
        Request::Discover { namespace } => {
            let found = shared
                .registry()
                .discover(namespace.as_deref(), now, DISCOVER_MAX_RECORDS);
            let peers: Vec<_> = found
                .records
                .iter()
                .map(|r| r.to_peer_record(now))
                .collect();
            discover_answer_line(&peers, found.total)
        }
        Request::Unregister {
            namespace,
            name,
            port,
        } => {
            let committed = {
                let mut registry = shared.registry();
                let Some(slot) = shared.store.try_reserve() else {
                    return storage_busy();
                };
                let removed = registry.unregister(ip, &namespace, name.as_deref(), port);
                if removed.is_empty() {
                    return unregister_answer_line(0);
                }
                let count = removed.len();
                (slot.send(Change::Delete(removed)), count)
            };
            if let Err(e) = committed.0.wait().await {
                tracing::error!(error = %e, "UNREGISTER not persisted");
                return storage_busy();
            }
            unregister_answer_line(committed.1)
        }
    }
}

fn storage_busy() -> Vec<u8> {
    RdvError::new(ErrorCode::Busy)
        .detail("storage is saturated; try again")
        .to_line()
}

/// Drops expired records as they expire, so memory is reclaimed without waiting for a request.
async fn sweep(shared: Arc<Shared>) {
    loop {
        let next = shared.registry().next_expiry().unwrap_or(u64::MAX);
        shared.sweep_at.store(next, Ordering::Relaxed);
        let wait = Duration::from_millis(next.saturating_sub(now_millis()).min(3_600_000));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.sweep_wake.notified() => continue,
        }
        let now = now_millis();
        let (dropped, remaining) = {
            let mut registry = shared.registry();
            let dropped = registry.expire(now);
            if dropped > 0 {
                if let Some(slot) = shared.store.try_reserve() {
                    slot.send_detached(Change::PurgeExpired(now));
                }
            }
            (dropped, registry.len())
        };
        if dropped > 0 {
            tracing::debug!(dropped, remaining, "expired records reclaimed");
        }
    }
}

fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
