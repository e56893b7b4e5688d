//! Data streams (PROTOCOL.md section 6): a second TCP connection to a peer's listen port for
//! bulk bytes, opened with `STREAM` / `STREAM_OK` / `NOISE` (a Noise XX handshake proving both
//! keys, AES-GCM) and carrying encrypted frames after that, so a download never queues behind
//! chat on the link and chat never queues behind a download.
//!
//! A [`DataStream`] is a byte pipe: [`DataStream::queue`] seals bytes, [`DataStream::flush`]
//! writes them; [`DataStream::fill`] reads and opens frames into a buffer that
//! [`DataStream::buffered`] shows and [`DataStream::consume`] empties. Its buffers are bounded:
//! one read of [`READ_CHUNK`] bytes, one partial frame, and what the owner leaves unconsumed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use teia_core::identity::{decode, encode, Identity, PublicKey};
use teia_core::overlay::secure::{Handshake, SecureError, SecureReader, SecureWriter, Suite};
use teia_wire::stream::{Opening, MAX_OPENING_LINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

/// Bytes of kernel socket buffer asked for, each way.
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Bytes read from the socket at once.
pub const READ_CHUNK: usize = 256 * 1024;
/// Time a stream's opening (connect and handshake) may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Spliced pairs waiting, and joined, at once at most; beyond, a new one is refused `busy`.
pub const MAX_SPLICES: usize = 32;
/// Time the first connection of a splice waits for the second.
pub const SPLICE_WAIT: Duration = Duration::from_secs(15);
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
    raw: Vec<u8>,
    plain: Vec<u8>,
    consumed: usize,
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
        if self.consumed > 0 && self.consumed >= self.plain.len() / 2 {
            self.plain.drain(..self.consumed);
            self.consumed = 0;
        }
        self.raw.resize(READ_CHUNK, 0);
        let n = self.tcp.read(&mut self.raw).await?;
        if n == 0 {
            return Ok(false);
        }
        let input = self.raw.get(..n).unwrap_or_default();
        self.reader.open(input, &mut self.plain)?;
        Ok(true)
    }

    /// Plaintext read and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        self.plain.get(self.consumed..).unwrap_or_default()
    }

    /// Drops the first `n` bytes of [`buffered`](Self::buffered).
    pub fn consume(&mut self, n: usize) {
        self.consumed = (self.consumed + n).min(self.plain.len());
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
            raw: Vec::new(),
            plain: Vec::new(),
            consumed: 0,
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

/// Opens a stream to the peer that joins `relay` with `token` (the relay splices the two
/// connections; the handshake runs end to end through it, so the relay sees only
/// ciphertext); the peer must prove `expected`.
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

/// Accepts, through `relay`, the stream of the peer that joins it with `token`; the peer
/// must prove `expected`.
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

/// Connects to `relay`, asks it to splice with `token`, and waits (at most
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

/// Joins pairs of connections that ask for the same token (PROTOCOL.md section 6): at
/// most [`MAX_SPLICES`] waiting and as many joined at once; one waits at most
/// [`SPLICE_WAIT`].
#[derive(Clone, Default)]
pub(crate) struct Splicer {
    waiting: Arc<std::sync::Mutex<std::collections::HashMap<String, TcpStream>>>,
    active: Arc<std::sync::atomic::AtomicUsize>,
}

impl Splicer {
    /// Handles a connection that opened with `{"type":"SPLICE"`.
    pub(crate) async fn handle(self, mut tcp: TcpStream, remote: SocketAddr) {
        let token = match tokio::time::timeout(OPEN_TIMEOUT, read_opening(&mut tcp)).await {
            Ok(Ok(Opening::Splice { token })) if !token.is_empty() && token.len() <= 128 => token,
            _ => return,
        };
        let busy = || {
            Opening::Error {
                code: "busy".into(),
                detail: "too many spliced streams".into(),
            }
            .to_line()
        };
        enum Pair {
            Joined(TcpStream, TcpStream),
            Full(TcpStream),
            Waiting,
        }
        let pair = {
            let mut waiting = self
                .waiting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match waiting.remove(&token) {
                Some(other) => Pair::Joined(tcp, other),
                None if waiting.len() >= MAX_SPLICES => Pair::Full(tcp),
                None => {
                    waiting.insert(token.clone(), tcp);
                    Pair::Waiting
                }
            }
        };
        let (mut tcp, mut other) = match pair {
            Pair::Joined(tcp, other) => (tcp, other),
            Pair::Full(mut tcp) => {
                let _ = tcp.write_all(&busy()).await;
                return;
            }
            Pair::Waiting => {
                // The first of the pair waits for the second.
                tokio::time::sleep(SPLICE_WAIT).await;
                let _ = self
                    .waiting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&token);
                return;
            }
        };
        use std::sync::atomic::Ordering;
        if self.active.fetch_add(1, Ordering::Relaxed) >= MAX_SPLICES {
            self.active.fetch_sub(1, Ordering::Relaxed);
            let _ = tcp.write_all(&busy()).await;
            let _ = other.write_all(&busy()).await;
            return;
        }
        tracing::debug!(%remote, "splicing a stream");
        let ok = Opening::SpliceOk.to_line();
        if tcp.write_all(&ok).await.is_ok() && other.write_all(&ok).await.is_ok() {
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut other).await;
        }
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
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

/// Accepts streams on behalf of a node: bounded handshakes, then hands each stream to the
/// application's channel (a full channel refuses the stream `busy`).
#[derive(Clone)]
pub(crate) struct StreamAcceptor {
    pub(crate) us: Option<StreamIdentity>,
    pub(crate) sink: Option<mpsc::Sender<DataStream>>,
    pub(crate) pending: Arc<Semaphore>,
}

impl StreamAcceptor {
    /// Handles one connection that opened with `{"type":"STREAM"`.
    pub(crate) async fn handle(self, mut tcp: TcpStream, remote: SocketAddr) {
        let refuse = |code: &str, detail: &str| {
            Opening::Error {
                code: code.into(),
                detail: detail.into(),
            }
            .to_line()
        };
        let (Some(us), Some(sink)) = (self.us, self.sink) else {
            let _ = tcp
                .write_all(&refuse("unsupported", "this node accepts no data streams"))
                .await;
            return;
        };
        let Ok(_permit) = self.pending.try_acquire() else {
            let _ = tcp
                .write_all(&refuse("busy", "too many streams opening"))
                .await;
            return;
        };
        match tokio::time::timeout(OPEN_TIMEOUT, accept(&us, tcp, remote)).await {
            Ok(Ok(stream)) => {
                if let Err(mpsc::error::TrySendError::Full(mut stream)) = sink.try_send(stream) {
                    tracing::debug!(%remote, "stream refused: the service is busy");
                    stream.shutdown().await;
                }
            }
            Ok(Err(e)) => tracing::debug!(%remote, error = %e, "stream opening failed"),
            Err(_) => tracing::debug!(%remote, "stream opening timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
