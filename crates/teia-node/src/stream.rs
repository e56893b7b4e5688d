//! Data streams (PROTOCOL.md section 6): a second TCP connection to a peer's listen port for
//! bulk bytes, opened with `STREAM` / `STREAM_OK` / `NOISE` (a Noise XX handshake proving both
//! keys, AES-GCM) and carrying encrypted frames after that, so a download never queues behind
//! chat on the link and chat never queues behind a download.
//!
//! A [`DataStream`] is a byte pipe: [`DataStream::queue`] seals bytes, [`DataStream::flush`]
//! writes them; [`DataStream::fill`] reads into one buffer and opens the frames there, in
//! place, and [`DataStream::buffered`] shows their plaintext until [`DataStream::consume`]
//! empties it. Its buffers are bounded: one read of [`READ_CHUNK`] bytes, one partial frame,
//! and what the owner leaves unconsumed.
//!
//! A node that listens also splices streams for two of its neighbours that asked it to
//! (the splicer, with the decisions of [`teia_core::splice::SpliceBroker`]): a connection
//! joins with the token its side was granted, once; a joined splice relays at most
//! [`SPLICE_BUDGET`] bytes and is cut after [`SPLICE_IDLE`] without one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use teia_core::identity::{decode, encode, Identity, PublicKey};
use teia_core::overlay::secure::{Handshake, SecureError, SecureReader, SecureWriter, Suite};
use teia_core::overlay::ApiError;
use teia_core::splice::{
    Joined, SpliceBroker, SpliceId, SpliceRefusal, SPLICE_BUDGET, SPLICE_IDLE, SPLICE_WAIT,
};
use teia_wire::stream::{Opening, MAX_OPENING_LINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};

/// Bytes of kernel socket buffer asked for, each way.
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Bytes read from the socket at once.
pub const READ_CHUNK: usize = 256 * 1024;
/// Time a stream's opening (connect and handshake) may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams being opened towards us at once; beyond, a new one is refused `busy`.
pub const MAX_PENDING_ACCEPTS: usize = 32;

/// Why a stream could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The opening did not complete in time.
    #[error("the stream's handshake timed out")]
    Timeout,
    /// The peer broke the opening protocol.
    #[error("bad stream opening: {0}")]
    Protocol(String),
    /// The peer refused the stream.
    #[error("stream refused: {code} {detail}")]
    Refused {
        /// Its code.
        code: String,
        /// Its explanation.
        detail: String,
    },
    /// The Noise handshake or a frame failed.
    #[error(transparent)]
    Secure(#[from] SecureError),
    /// The peer proved another key than the one expected.
    #[error("{peer_id} proved key {proven}, expected {expected}")]
    WrongKey {
        /// The peer.
        peer_id: String,
        /// What it proved.
        proven: PublicKey,
        /// What we expected.
        expected: PublicKey,
    },
    /// This node has no identity (streams need one).
    #[error("this node has no key; data streams need one")]
    NoIdentity,
    /// The splicing neighbour refused the ask.
    #[error("splice through {relay}: {reason}")]
    SpliceRefused {
        /// The splicing neighbour.
        relay: String,
        /// Why.
        reason: SpliceRefusal,
    },
    /// The overlay refused the ask (the relay is not a neighbour that proved its key, or
    /// the peer id is not one).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
}

/// Who we are on streams we open or accept.
#[derive(Clone)]
pub struct StreamIdentity {
    /// Our key pair.
    pub identity: Identity,
    /// Our peer id.
    pub peer_id: String,
}

/// One encrypted data stream with a peer whose key it proved.
pub struct DataStream {
    tcp: TcpStream,
    reader: SecureReader,
    writer: SecureWriter,
    /// What was read: plaintext already consumed (`..consumed`), plaintext not yet
    /// consumed (`consumed..opened`), frames' overhead left behind by their opening
    /// (`opened..sealed_from`), and the start of a frame not complete yet
    /// (`sealed_from..filled`).
    read: Vec<u8>,
    consumed: usize,
    opened: usize,
    sealed_from: usize,
    filled: usize,
    sealed: Vec<u8>,
    peer_id: String,
    key: PublicKey,
    service: String,
    remote: SocketAddr,
}

impl std::fmt::Debug for DataStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataStream")
            .field("peer_id", &self.peer_id)
            .field("service", &self.service)
            .field("remote", &self.remote)
            .finish()
    }
}

impl DataStream {
    /// The peer's id as it claimed it (its key signs it).
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// The peer's proven key.
    pub fn key(&self) -> PublicKey {
        self.key
    }

    /// The service the stream was opened for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Seals `data` for the next [`flush`](Self::flush).
    pub fn queue(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.writer.seal(data, &mut self.sealed)?;
        Ok(())
    }

    /// Seals, for the next [`flush`](Self::flush), `len` bytes that `fill` writes straight
    /// into the frames (a frame's worth at a time, in order: a file read there is never
    /// copied before it is sealed); the outer error is the stream's, the inner `fill`'s.
    pub fn queue_from(
        &mut self,
        len: usize,
        fill: impl FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<std::io::Result<()>, StreamError> {
        Ok(self.writer.seal_from(len, &mut self.sealed, fill)?)
    }

    /// Writes everything sealed.
    pub async fn flush(&mut self) -> Result<(), StreamError> {
        if !self.sealed.is_empty() {
            self.tcp.write_all(&self.sealed).await?;
            self.sealed.clear();
        }
        Ok(())
    }

    /// Seals and writes `data`.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.queue(data)?;
        self.flush().await
    }

    /// Reads once from the socket and opens the frames that completed; `false` at the end
    /// of the stream.
    pub async fn fill(&mut self) -> Result<bool, StreamError> {
        self.make_room();
        let end = self.filled + READ_CHUNK;
        if self.read.len() < end {
            self.read.resize(end, 0);
        }
        let room = self.read.get_mut(self.filled..end).unwrap_or_default();
        let n = self.tcp.read(room).await?;
        if n == 0 {
            return Ok(false);
        }
        self.filled += n;
        let unopened = self
            .read
            .get_mut(self.opened..self.filled)
            .unwrap_or_default();
        let (plaintext, frames_end) = self
            .reader
            .open_in_place(unopened, self.sealed_from - self.opened)?;
        self.opened += plaintext;
        self.sealed_from = self.opened + (frames_end - plaintext);
        Ok(true)
    }

    /// Moves what is still needed to the front of the read buffer once what was consumed
    /// is at least half of it and a read would not fit (each byte moved at most once per
    /// half a buffer read), or when nothing is left.
    fn make_room(&mut self) {
        let nothing_left = self.consumed == self.opened && self.sealed_from == self.filled;
        let short = self.read.len() - self.filled < READ_CHUNK;
        if nothing_left {
            (self.consumed, self.opened, self.sealed_from, self.filled) = (0, 0, 0, 0);
        } else if short && self.consumed > 0 && self.consumed >= self.read.len() / 2 {
            let plaintext = self.opened - self.consumed;
            self.read.copy_within(self.consumed..self.opened, 0);
            self.read
                .copy_within(self.sealed_from..self.filled, plaintext);
            self.filled = plaintext + (self.filled - self.sealed_from);
            (self.consumed, self.opened, self.sealed_from) = (0, plaintext, plaintext);
        }
    }

    /// Plaintext read and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        self.read
            .get(self.consumed..self.opened)
            .unwrap_or_default()
    }

    /// Drops the first `n` bytes of [`buffered`](Self::buffered).
    pub fn consume(&mut self, n: usize) {
        self.consumed = (self.consumed + n).min(self.opened);
    }

    /// Reads one `\n`-terminated line of at most `max` bytes (without its `\n`); `None` at
    /// the end of the stream.
    pub async fn read_line(&mut self, max: usize) -> Result<Option<Vec<u8>>, StreamError> {
        loop {
            let buffered = self.buffered();
            if let Some(end) = buffered.iter().position(|&b| b == b'\n') {
                let line = buffered.get(..end).unwrap_or_default().to_vec();
                self.consume(end + 1);
                return Ok(Some(line));
            }
            if buffered.len() > max {
                return Err(StreamError::Protocol(format!(
                    "line longer than {max} bytes"
                )));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Closes our side for writing (the peer reads the end of the stream).
    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.tcp.shutdown().await;
    }

    fn new(
        tcp: TcpStream,
        keys: teia_core::overlay::LinkCipher,
        peer_id: String,
        key: PublicKey,
        service: String,
        remote: SocketAddr,
    ) -> Self {
        // Large socket buffers let the sender seal the next bytes while the receiver is
        // still checking and writing the last ones (the kernel caps them at its maximum).
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&tcp, SOCKET_BUFFER);
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&tcp, SOCKET_BUFFER);
        Self {
            tcp,
            reader: keys.reader(),
            writer: keys.writer(),
            read: Vec::new(),
            consumed: 0,
            opened: 0,
            sealed_from: 0,
            filled: 0,
            sealed: Vec::new(),
            peer_id,
            key,
            service,
            remote,
        }
    }
}

/// Reads one opening line byte by byte (the opening is lockstep: nothing follows it until
/// the other side answers, so no byte of the encrypted part is read here).
async fn read_opening(tcp: &mut TcpStream) -> Result<Opening, StreamError> {
    let mut line = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    loop {
        if tcp.read(&mut byte).await? == 0 {
            return Err(StreamError::Protocol("closed during the opening".into()));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() >= MAX_OPENING_LINE {
            return Err(StreamError::Protocol("opening line too long".into()));
        }
    }
    Opening::parse(&line).map_err(|e| StreamError::Protocol(e.to_string()))
}

fn noise_bytes(text: &str) -> Result<Vec<u8>, StreamError> {
    decode(text).ok_or_else(|| StreamError::Protocol("noise is not base64url".into()))
}

/// Opens a stream to `addr` for `service`; when `expected` is given, the peer must prove
/// that key.
pub async fn open(
    us: &StreamIdentity,
    addr: SocketAddr,
    service: &str,
    expected: Option<PublicKey>,
) -> Result<DataStream, StreamError> {
    tokio::time::timeout(OPEN_TIMEOUT, open_inner(us, addr, service, expected))
        .await
        .map_err(|_| StreamError::Timeout)?
}

async fn open_inner(
    us: &StreamIdentity,
    addr: SocketAddr,
    service: &str,
    expected: Option<PublicKey>,
) -> Result<DataStream, StreamError> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    as_opener(us, tcp, addr, service, expected).await
}

/// The opener's side of the opening, on a connection already made.
async fn as_opener(
    us: &StreamIdentity,
    mut tcp: TcpStream,
    addr: SocketAddr,
    service: &str,
    expected: Option<PublicKey>,
) -> Result<DataStream, StreamError> {
    let (handshake, first) = Handshake::initiate(&us.identity, Suite::Stream)?;
    let opening = Opening::Stream {
        peer_id: us.peer_id.clone(),
        service: service.to_owned(),
        noise: encode(&first),
    };
    tcp.write_all(&opening.to_line()).await?;
    let (peer_id, second) = match read_opening(&mut tcp).await? {
        Opening::StreamOk { peer_id, noise } => (peer_id, noise_bytes(&noise)?),
        Opening::Error { code, detail } => return Err(StreamError::Refused { code, detail }),
        other => {
            return Err(StreamError::Protocol(format!(
                "expected STREAM_OK, got {other:?}"
            )))
        }
    };
    let (key, third, keys) =
        handshake.finish_initiator(&us.identity, &us.peer_id, &peer_id, &second)?;
    if let Some(expected) = expected {
        if key != expected {
            return Err(StreamError::WrongKey {
                peer_id,
                proven: key,
                expected,
            });
        }
    }
    tcp.write_all(
        &Opening::Noise {
            noise: encode(&third),
        }
        .to_line(),
    )
    .await?;
    Ok(DataStream::new(
        tcp,
        keys,
        peer_id,
        key,
        service.to_owned(),
        addr,
    ))
}

/// Opens a stream through the splicing node at `relay`, joining it with the `token` it
/// granted us (the handshake runs end to end through it, so the relay sees only
/// ciphertext); the peer at the other end must prove `expected`.
pub async fn open_spliced(
    us: &StreamIdentity,
    relay: SocketAddr,
    token: &str,
    service: &str,
    expected: PublicKey,
) -> Result<DataStream, StreamError> {
    let tcp = join_splice(relay, token).await?;
    tokio::time::timeout(
        OPEN_TIMEOUT,
        as_opener(us, tcp, relay, service, Some(expected)),
    )
    .await
    .map_err(|_| StreamError::Timeout)?
}

/// Accepts, through the splicing node at `relay`, joined with the `token` it granted us,
/// the stream of the peer at the other end; the peer must prove `expected`.
pub async fn accept_spliced(
    us: &StreamIdentity,
    relay: SocketAddr,
    token: &str,
    expected: PublicKey,
) -> Result<DataStream, StreamError> {
    let tcp = join_splice(relay, token).await?;
    let stream = tokio::time::timeout(OPEN_TIMEOUT, accept(us, tcp, relay))
        .await
        .map_err(|_| StreamError::Timeout)??;
    if stream.key() != expected {
        return Err(StreamError::WrongKey {
            peer_id: stream.peer_id().to_owned(),
            proven: stream.key(),
            expected,
        });
    }
    Ok(stream)
}

/// Connects to `relay`, joins the splice with `token`, and waits (at most
/// [`SPLICE_WAIT`]) for the other end.
async fn join_splice(relay: SocketAddr, token: &str) -> Result<TcpStream, StreamError> {
    let mut tcp = tokio::time::timeout(OPEN_TIMEOUT, TcpStream::connect(relay))
        .await
        .map_err(|_| StreamError::Timeout)??;
    let _ = tcp.set_nodelay(true);
    let request = Opening::Splice {
        token: token.to_owned(),
    };
    tcp.write_all(&request.to_line()).await?;
    match tokio::time::timeout(SPLICE_WAIT, read_opening(&mut tcp))
        .await
        .map_err(|_| StreamError::Timeout)??
    {
        Opening::SpliceOk => Ok(tcp),
        Opening::Error { code, detail } => Err(StreamError::Refused { code, detail }),
        other => Err(StreamError::Protocol(format!(
            "expected SPLICE_OK, got {other:?}"
        ))),
    }
}

/// A splicing node's state, behind one lock: the broker's decisions
/// ([`teia_core::splice`]), and the first connections of splices waiting for their
/// second (one per splice the broker holds, so at most its bound).
#[derive(Default)]
pub(crate) struct SpliceState {
    /// Asks, grants and tokens.
    pub(crate) broker: SpliceBroker,
    waiting: std::collections::HashMap<SpliceId, (TcpStream, oneshot::Sender<()>)>,
}

/// The splicing node's state, shared by the driver (asks) and the splicer (joins).
pub(crate) type SharedSplices = Arc<std::sync::Mutex<SpliceState>>;

pub(crate) fn lock_splices(state: &SharedSplices) -> std::sync::MutexGuard<'_, SpliceState> {
    crate::sync::lock(state)
}

/// Ends a splice in the broker when its task ends, however it ends.
struct EndSplice(SharedSplices, SpliceId);

impl Drop for EndSplice {
    fn drop(&mut self) {
        let mut state = lock_splices(&self.0);
        state.waiting.remove(&self.1);
        state.broker.end(self.1);
    }
}

/// Joins the two connections of a splice the broker granted (PROTOCOL.md section 6,
/// Splicing): each must come with its side's token, once, before it expires; the first
/// waits at most [`SPLICE_WAIT`] for the second; then bytes flow, at most
/// [`SPLICE_BUDGET`] of them, until both ends close or neither sends for [`SPLICE_IDLE`].
#[derive(Clone)]
pub(crate) struct Splicer {
    pub(crate) state: SharedSplices,
}

impl Splicer {
    /// Handles a connection that opened with `{"type":"SPLICE"`.
    pub(crate) async fn handle(self, tcp: TcpStream, remote: SocketAddr) {
        let mut tcp = Some(tcp);
        let token = match tcp.as_mut() {
            Some(first) => match tokio::time::timeout(OPEN_TIMEOUT, read_opening(first)).await {
                Ok(Ok(Opening::Splice { token })) => token,
                _ => return,
            },
            None => return,
        };
        enum Step {
            Refused(String),
            Wait(SpliceId, oneshot::Receiver<()>),
            Pair(SpliceId, TcpStream),
        }
        let step = {
            let mut state = lock_splices(&self.state);
            match state.broker.join(std::time::Instant::now(), &token) {
                Err(refusal) => Step::Refused(refusal.to_string()),
                Ok(Joined::First(id)) => {
                    let (tell, told) = oneshot::channel();
                    if let Some(first) = tcp.take() {
                        state.waiting.insert(id, (first, tell));
                    }
                    Step::Wait(id, told)
                }
                Ok(Joined::Second(id)) => match state.waiting.remove(&id) {
                    Some((first, tell)) => {
                        let _ = tell.send(());
                        Step::Pair(id, first)
                    }
                    None => {
                        // The first gave up (or its task ended) just now.
                        state.broker.end(id);
                        Step::Refused("the other side of the splice is gone".into())
                    }
                },
            }
        };
        let refuse = |code: &str, detail: String| {
            Opening::Error {
                code: code.into(),
                detail,
            }
            .to_line()
        };
        match step {
            Step::Refused(detail) => {
                tracing::debug!(%remote, %detail, "splice join refused");
                if let Some(mut tcp) = tcp {
                    let _ = tcp.write_all(&refuse("unauthorized", detail)).await;
                }
            }
            Step::Wait(id, told) => {
                // (Should this task end early, the broker forgets the splice when it
                // expires, as it does any splice not joined by both.)
                if let Ok(Ok(())) = tokio::time::timeout(SPLICE_WAIT, told).await {
                    // The second took this connection over; the splice ends with it.
                    return;
                }
                let first = {
                    let mut state = lock_splices(&self.state);
                    let first = state.waiting.remove(&id);
                    // Still ours: the second did not come (else the splice is its now).
                    if first.is_some() {
                        state.broker.end(id);
                    }
                    first
                };
                if let Some((mut first, _)) = first {
                    let detail = "the other side did not join in time".to_owned();
                    let _ = first.write_all(&refuse("timeout", detail)).await;
                }
            }
            Step::Pair(id, mut first) => {
                let _end = EndSplice(Arc::clone(&self.state), id);
                let Some(mut second) = tcp else {
                    return;
                };
                let ok = Opening::SpliceOk.to_line();
                if first.write_all(&ok).await.is_err() || second.write_all(&ok).await.is_err() {
                    return;
                }
                tracing::debug!(%remote, splice = id, "splicing a stream");
                let (end, bytes) = pipe(&mut first, &mut second, SPLICE_IDLE, SPLICE_BUDGET).await;
                tracing::debug!(splice = id, bytes, ?end, "splice ended");
            }
        }
    }
}

/// Copies one way for [`pipe`]: counts the bytes against `budget`, notes when the last
/// came (milliseconds from `started`), and closes `to` for writing at the end of `from`.
async fn one_way(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    relayed: &std::sync::atomic::AtomicU64,
    last: &std::sync::atomic::AtomicU64,
    started: tokio::time::Instant,
    budget: u64,
) -> Result<(), PipeEnd> {
    use std::sync::atomic::Ordering;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = from
            .read(&mut buffer)
            .await
            .map_err(|e| PipeEnd::Failed(e.kind()))?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let total = relayed.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > budget {
            return Err(PipeEnd::Budget);
        }
        let since = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(since, Ordering::Relaxed);
        to.write_all(buffer.get(..n).unwrap_or_default())
            .await
            .map_err(|e| PipeEnd::Failed(e.kind()))?;
    }
}

/// How a splice's copying ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PipeEnd {
    /// Both ends closed.
    Closed,
    /// No byte either way for the idle time.
    Idle,
    /// The byte budget was spent.
    Budget,
    /// A read or write failed.
    Failed(std::io::ErrorKind),
}

/// Copies bytes both ways between `a` and `b` until both have closed, neither sent a
/// byte for `idle`, or `budget` bytes (both ways together) would be passed: the chunk that
/// would pass it is not forwarded. Returns how it ended and the bytes relayed.
pub(crate) async fn pipe(
    a: &mut TcpStream,
    b: &mut TcpStream,
    idle: Duration,
    budget: u64,
) -> (PipeEnd, u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let started = tokio::time::Instant::now();
    let relayed = AtomicU64::new(0);
    // Milliseconds from `started` to the last byte read.
    let last = AtomicU64::new(0);
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let both = async {
        tokio::try_join!(
            one_way(&mut a_read, &mut b_write, &relayed, &last, started, budget),
            one_way(&mut b_read, &mut a_write, &relayed, &last, started, budget)
        )
    };
    let watchdog = async {
        loop {
            let deadline = started + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let end = tokio::select! {
        done = both => match done {
            Ok(_) => PipeEnd::Closed,
            Err(end) => end,
        },
        () = watchdog => PipeEnd::Idle,
    };
    let bytes = relayed.load(Ordering::Relaxed).min(budget);
    (end, bytes)
}

/// Accepts a stream whose first bytes were seen to be `{"type":"STREAM"`.
async fn accept(
    us: &StreamIdentity,
    mut tcp: TcpStream,
    remote: SocketAddr,
) -> Result<DataStream, StreamError> {
    let _ = tcp.set_nodelay(true);
    let (peer_id, service, first) = match read_opening(&mut tcp).await? {
        Opening::Stream {
            peer_id,
            service,
            noise,
        } => (peer_id, service, noise_bytes(&noise)?),
        other => {
            return Err(StreamError::Protocol(format!(
                "expected STREAM, got {other:?}"
            )))
        }
    };
    if !teia_core::overlay::is_peer_id(&peer_id) || service.len() > 64 {
        let refusal = Opening::Error {
            code: "bad_format".into(),
            detail: "peer_id must be name@namespace, service a short name".into(),
        };
        let _ = tcp.write_all(&refusal.to_line()).await;
        return Err(StreamError::Protocol("bad peer id or service".into()));
    }
    let (handshake, second) = Handshake::respond(&us.identity, Suite::Stream, &us.peer_id, &first)?;
    let answer = Opening::StreamOk {
        peer_id: us.peer_id.clone(),
        noise: encode(&second),
    };
    tcp.write_all(&answer.to_line()).await?;
    let third = match read_opening(&mut tcp).await? {
        Opening::Noise { noise } => noise_bytes(&noise)?,
        other => {
            return Err(StreamError::Protocol(format!(
                "expected NOISE, got {other:?}"
            )))
        }
    };
    let (key, keys) = handshake.finish_responder(&peer_id, &third)?;
    Ok(DataStream::new(tcp, keys, peer_id, key, service, remote))
}

/// Accepts streams on behalf of a node: bounded handshakes, then gives each stream to its
/// caller, which hands it to the service of its kind.
#[derive(Clone)]
pub(crate) struct StreamAcceptor {
    pub(crate) us: Option<StreamIdentity>,
    /// Whether some service takes data streams (if not, each is refused `unsupported`).
    pub(crate) wanted: bool,
    pub(crate) pending: Arc<Semaphore>,
}

impl StreamAcceptor {
    /// Handles one connection that opened with `{"type":"STREAM"`: the stream, once open.
    pub(crate) async fn handle(self, mut tcp: TcpStream, remote: SocketAddr) -> Option<DataStream> {
        let refuse = |code: &str, detail: &str| {
            Opening::Error {
                code: code.into(),
                detail: detail.into(),
            }
            .to_line()
        };
        let (Some(us), true) = (self.us, self.wanted) else {
            let _ = tcp
                .write_all(&refuse("unsupported", "this node accepts no data streams"))
                .await;
            return None;
        };
        let Ok(_permit) = self.pending.try_acquire() else {
            let _ = tcp
                .write_all(&refuse("busy", "too many streams opening"))
                .await;
            return None;
        };
        match tokio::time::timeout(OPEN_TIMEOUT, accept(&us, tcp, remote)).await {
            Ok(Ok(stream)) => return Some(stream),
            Ok(Err(e)) => tracing::debug!(%remote, error = %e, "stream opening failed"),
            Err(_) => tracing::debug!(%remote, "stream opening timed out"),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Two connected sockets on 127.0.0.1.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (outer, inner) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (outer.unwrap(), inner.unwrap().0)
    }

    /// A spliced pair: the two outer ends, and the splice's task with how it ended.
    async fn spliced(
        idle: Duration,
        budget: u64,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(PipeEnd, u64)>,
    ) {
        let (a, mut a_inner) = socket_pair().await;
        let (b, mut b_inner) = socket_pair().await;
        let task =
            tokio::spawn(async move { pipe(&mut a_inner, &mut b_inner, idle, budget).await });
        (a, b, task)
    }

    /// Reads `tcp` to its end (or a reset); the bytes read.
    async fn read_to_end(tcp: &mut TcpStream) -> usize {
        let mut total = 0;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return total,
                Ok(Ok(n)) => total += n,
                Err(_) => panic!("the splice never ended"),
            }
        }
    }

    #[tokio::test]
    async fn a_splice_carries_bytes_both_ways_until_both_close() {
        let (mut a, mut b, task) = spliced(Duration::from_secs(30), 1 << 20).await;
        a.write_all(b"hello").await.unwrap();
        a.shutdown().await.unwrap();
        b.write_all(b"hi there").await.unwrap();
        b.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut b).await, 5);
        assert_eq!(read_to_end(&mut a).await, 8);
        assert_eq!(task.await.unwrap(), (PipeEnd::Closed, 13));
    }

    #[tokio::test]
    async fn a_splice_is_cut_at_its_byte_budget() {
        let (mut a, mut b, task) = spliced(Duration::from_secs(30), 100_000).await;
        let writer = tokio::spawn(async move {
            let _ = a.write_all(&vec![7u8; 1_000_000]).await;
            a
        });
        let received = read_to_end(&mut b).await;
        assert!(received <= 100_000, "{received} bytes passed");
        let (end, bytes) = task.await.unwrap();
        assert_eq!(end, PipeEnd::Budget);
        assert!(bytes <= 100_000);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn an_idle_splice_is_cut() {
        let (mut a, mut b, task) = spliced(Duration::from_millis(200), 1 << 20).await;
        a.write_all(b"one line, then nothing").await.unwrap();
        assert_eq!(read_to_end(&mut b).await, 22, "cut after its bytes");
        assert_eq!(read_to_end(&mut a).await, 0);
        assert_eq!(task.await.unwrap(), (PipeEnd::Idle, 22));
    }

    #[tokio::test]
    async fn open_and_accept_carry_bytes_both_ways() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bob = StreamIdentity {
            identity: Identity::from_seed(&[2; 32]),
            peer_id: "bob@t".into(),
        };
        let alice = StreamIdentity {
            identity: Identity::from_seed(&[1; 32]),
            peer_id: "alice@t".into(),
        };
        let bob_key = bob.identity.public_key();
        let server = tokio::spawn(async move {
            let (tcp, remote) = listener.accept().await.unwrap();
            let mut stream = accept(&bob, tcp, remote).await.unwrap();
            assert_eq!(stream.peer_id(), "alice@t");
            let line = stream.read_line(100).await.unwrap().unwrap();
            assert_eq!(line, b"hello");
            let big = vec![7u8; 300_000];
            stream.write_all(&big).await.unwrap();
            stream.shutdown().await;
        });
        let mut stream = open(&alice, addr, "files", Some(bob_key)).await.unwrap();
        stream.write_all(b"hello\n").await.unwrap();
        let mut total = 0;
        loop {
            total += stream.buffered().len();
            let n = stream.buffered().len();
            stream.consume(n);
            if !stream.fill().await.unwrap() {
                break;
            }
        }
        assert_eq!(total, 300_000);
        server.await.unwrap();
    }
}
