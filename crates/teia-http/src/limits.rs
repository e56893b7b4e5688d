//! The HTTP API's connections, bounded: a client that opens many connections, or opens one
//! and sends (or reads) nothing, cannot take the node's descriptors or the API from others.
//!
//! **Bounds**: at most [`MAX_CONNECTIONS`] connections at once (more wait in the kernel's
//! backlog until one ends), at most [`MAX_PER_SOURCE`] from one address (more are closed at
//! once); a connection on which no byte moves either way for [`IDLE_TIMEOUT`] (a slow
//! header, a stalled body, a reader that stopped) is closed. An accept that fails (out of
//! descriptors) waits a second, so the overlay keeps the descriptors it has.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use teia_node::sync::lock;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections served at once at most.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections from one address at once at most.
pub const MAX_PER_SOURCE: usize = 32;
/// Time a connection may move no byte either way before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Connections open per source address.
type Sources = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A listener that enforces the bounds above.
pub(crate) struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    sources: Sources,
}

impl BoundedListener {
    /// Wraps `inner`.
    pub(crate) fn new(inner: TcpListener) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            sources: Arc::default(),
        }
    }
}

/// The address of the client, for handlers (`ConnectInfo<Peer>`).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, BoundedListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, BoundedListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
                // The semaphore is never closed; wait as for a failed accept.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "the HTTP API cannot accept a connection now");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            {
                let mut sources = lock(&self.sources);
                let open = sources.entry(addr.ip()).or_insert(0);
                if *open >= MAX_PER_SOURCE {
                    tracing::debug!(%addr, "HTTP connection refused: too many from this address");
                    continue;
                }
                *open += 1;
            }
            let stream = BoundedStream {
                inner: stream,
                idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                _permit: permit,
                source: SourceSlot {
                    sources: Arc::clone(&self.sources),
                    ip: addr.ip(),
                },
            };
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One connection's place in its source's count, given back when it closes.
struct SourceSlot {
    sources: Sources,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut sources = lock(&self.sources);
        if let Some(open) = sources.get_mut(&self.ip) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}

/// A connection that fails with `TimedOut` once no byte moved for [`IDLE_TIMEOUT`].
pub(crate) struct BoundedStream {
    inner: TcpStream,
    idle: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
    source: SourceSlot,
}

impl BoundedStream {
    /// Moves the idle deadline on after progress.
    fn progressed(&mut self) {
        self.idle
            .as_mut()
            .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
    }

    /// `Pending` until the idle deadline; then the error that closes the connection.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::debug!(source = %self.source.ip, "idle HTTP connection closed");
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no byte moved for the idle timeout",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.progressed();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, data) {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    self.progressed();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
