//! Outgoing TCP connections, each bounded in time.
//!
//! **Bounds**: a dial gives up after [`DIAL_TIMEOUT`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Time allowed to connect to a peer.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The connection was refused or failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No answer within [`DIAL_TIMEOUT`].
    #[error("connect timed out")]
    TimedOut,
}

/// Connects to `addr` within [`DIAL_TIMEOUT`].
pub async fn dial(addr: SocketAddr) -> Result<TcpStream, DialError> {
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(DialError::TimedOut),
    }
}
