//! Short codes over TCP: the sender answers code exchanges on a listener of its own
//! ([`offer`]), the receiver dials it ([`redeem`]). The exchange itself, without I/O, is
//! [`crate::proto::code`]; finding the sender by its nameplate is the caller's (a
//! rendezvous record `NAMEPLATE@teia-codes`).
//!
//! **Bounds**: one exchange at a time, each given [`EXCHANGE_TIME`] (a slower one is closed
//! and is no try); lines of at most [`MAX_LINE`] bytes (a longer one ends the exchange);
//! the first wrong proof ends the offer, the first right one too.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::proto::code::{Code, CodeError, CodeMessage, Receiver, Sender, MAX_LINE};

/// Time one exchange may take, connection included.
pub const EXCHANGE_TIME: Duration = Duration::from_secs(10);

/// How an offer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferEnd {
    /// `by` proved the code and got the ticket.
    Used {
        /// Its address.
        by: SocketAddr,
    },
    /// `by` gave a wrong code: the code is void.
    Voided {
        /// Its address.
        by: SocketAddr,
    },
}

/// Why a code could not be redeemed.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    /// The sender could not be reached, or the connection broke.
    #[error("cannot reach the sender at {addr}: {source}")]
    Io {
        /// Where the sender was said to be.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The exchange took longer than [`EXCHANGE_TIME`].
    #[error("the sender at {0} did not finish the code exchange within {EXCHANGE_TIME:?}")]
    TimedOut(SocketAddr),
    /// The exchange failed.
    #[error(transparent)]
    Code(#[from] CodeError),
}

/// Answers exchanges for `code` on `listener`, one at a time, until one proves the code
/// (it gets `ticket`) or gives a wrong proof (the code is void). A connection that sends
/// nothing, junk, or stops midway is no try.
pub async fn offer(listener: TcpListener, code: Code, ticket: String) -> OfferEnd {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "code listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match tokio::time::timeout(EXCHANGE_TIME, answer(stream, &code, &ticket)).await {
            Ok(Ok(())) => return OfferEnd::Used { by: from },
            Ok(Err(CodeError::WrongCode)) => return OfferEnd::Voided { by: from },
            Ok(Err(e)) => tracing::debug!(%from, error = %e, "code exchange abandoned"),
            Err(_) => tracing::debug!(%from, "code exchange timed out"),
        }
    }
}

/// One exchange, as the sender.
async fn answer(stream: TcpStream, code: &Code, ticket: &str) -> Result<(), CodeError> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut sender = Sender::new(code);
    let ours = sender.on_pake(read_message(&mut read).await?)?;
    write
        .write_all(&ours.line())
        .await
        .map_err(|_| CodeError::Protocol("connection closed"))?;
    let confirm = read_message(&mut read).await?;
    let (reply, result) = match sender.on_confirm(confirm, ticket) {
        Ok(sealed) => (sealed, Ok(())),
        Err(CodeError::WrongCode) => (
            CodeMessage::Error {
                error: "wrong_code".into(),
                message: "wrong code; it is void now".into(),
            },
            Err(CodeError::WrongCode),
        ),
        Err(e) => (
            CodeMessage::Error {
                error: "bad_request".into(),
                message: e.to_string(),
            },
            Err(e),
        ),
    };
    let _ = write.write_all(&reply.line()).await;
    let _ = write.shutdown().await;
    result
}

/// Gets the ticket from the sender at `addr` with `code`.
pub async fn redeem(addr: SocketAddr, code: &Code) -> Result<String, RedeemError> {
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| RedeemError::Io { addr, source })?;
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let (mut receiver, first) = Receiver::start(code);
        write
            .write_all(&first.line())
            .await
            .map_err(|source| RedeemError::Io { addr, source })?;
        let confirm = receiver.on_pake(read_message(&mut read).await?)?;
        write
            .write_all(&confirm.line())
            .await
            .map_err(|source| RedeemError::Io { addr, source })?;
        Ok(receiver.on_ticket(read_message(&mut read).await?)?)
    };
    tokio::time::timeout(EXCHANGE_TIME, exchange)
        .await
        .map_err(|_| RedeemError::TimedOut(addr))?
}

/// Reads one message line of at most [`MAX_LINE`] bytes.
async fn read_message(read: &mut (impl AsyncBufRead + Unpin)) -> Result<CodeMessage, CodeError> {
    let mut line = Vec::new();
    let mut limited = read.take(MAX_LINE as u64);
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|_| CodeError::Protocol("connection broken"))?;
    if line.pop() != Some(b'\n') {
        return Err(CodeError::Protocol("line cut or too long"));
    }
    CodeMessage::parse(&line)
}
