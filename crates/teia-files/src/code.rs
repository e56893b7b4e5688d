//! Short codes over TCP: the sender answers code exchanges on a listener of its own
//! ([`offer`]), the receiver dials it ([`redeem`]). The exchange itself, without I/O, is
//! [`crate::proto::code`]. A receiver finds the sender by its nameplate at a rendezvous
//! (the caller's part: a record `NAMEPLATE@teia-codes`) or on the LAN: it broadcasts
//! `CODE_WHERE` on the port of LAN discovery ([`find_on_lan`]) and the sender, listening
//! there ([`answer_on_lan`]), answers `CODE_HERE` with its port.
//!
//! **Bounds**: one exchange at a time, each given [`EXCHANGE_TIME`] (a slower one is closed
//! and is no try); lines of at most [`MAX_LINE`] bytes (a longer one ends the exchange);
//! the first wrong proof ends the offer, the first right one too. On the LAN, datagrams of
//! at most [`MAX_LAN_DATAGRAM`] bytes (longer ones are dropped unread), at most
//! [`LAN_ANSWERS_PER_SECOND`] answers a second (more queries go unanswered), and a search
//! of [`LAN_ROUNDS`] broadcasts [`LAN_ROUND`] apart.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use teia_node::lan::LanSettings;

use crate::proto::code::{
    Code, CodeError, CodeMessage, LanMessage, Receiver, Sender, MAX_LAN_DATAGRAM, MAX_LINE,
};

/// Time one exchange may take, connection included.
pub const EXCHANGE_TIME: Duration = Duration::from_secs(10);
/// Broadcasts of one LAN search.
pub const LAN_ROUNDS: u32 = 3;
/// Time between them (and after the last).
pub const LAN_ROUND: Duration = Duration::from_millis(400);
/// Answers a sender gives on the LAN per second.
pub const LAN_ANSWERS_PER_SECOND: u32 = 20;

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

/// Answers the LAN's `CODE_WHERE` for `nameplate` with `port`, on the port of LAN discovery
/// (shared with the nodes of this machine), until dropped. An error if that port cannot be
/// bound.
pub async fn answer_on_lan(
    settings: &LanSettings,
    nameplate: u32,
    port: u16,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let socket = teia_node::lan::bind(settings.port, true)?;
    Ok(async move {
        let mut buffer = vec![0u8; MAX_LAN_DATAGRAM + 1];
        let mut second = tokio::time::Instant::now();
        let mut answered = 0;
        loop {
            let Ok((len, from)) = socket.recv_from(&mut buffer).await else {
                continue;
            };
            let asked = buffer.get(..len).and_then(LanMessage::parse);
            if asked != Some(LanMessage::Where { nameplate }) {
                continue;
            }
            if second.elapsed() >= Duration::from_secs(1) {
                second = tokio::time::Instant::now();
                answered = 0;
            }
            if answered >= LAN_ANSWERS_PER_SECOND {
                continue;
            }
            answered += 1;
            let here = LanMessage::Here { nameplate, port };
            if let Err(e) = socket.send_to(&here.bytes(), from).await {
                tracing::debug!(%from, error = %e, "CODE_HERE not sent");
            }
        }
    })
}

/// Asks the LAN who has `nameplate`: the first sender's exchange address, or `None` when
/// none answers within `rounds` rounds (a receiver uses [`LAN_ROUNDS`]).
pub async fn find_on_lan(
    settings: &LanSettings,
    nameplate: u32,
    rounds: u32,
) -> Option<SocketAddr> {
    let socket = match teia_node::lan::bind(0, false) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::debug!(error = %e, "no LAN search for the code");
            return None;
        }
    };
    let query = LanMessage::Where { nameplate }.bytes();
    let mut buffer = vec![0u8; MAX_LAN_DATAGRAM + 1];
    for _ in 0..rounds {
        for ip in teia_node::lan::targets(settings) {
            let to = SocketAddr::new(ip, settings.port);
            if let Err(e) = socket.send_to(&query, to).await {
                tracing::debug!(%to, error = %e, "CODE_WHERE not sent");
            }
        }
        let round = tokio::time::sleep(LAN_ROUND);
        tokio::pin!(round);
        loop {
            tokio::select! {
                () = &mut round => break,
                got = socket.recv_from(&mut buffer) => {
                    let Ok((len, from)) = got else { continue };
                    if let Some(LanMessage::Here { nameplate: n, port }) =
                        buffer.get(..len).and_then(LanMessage::parse)
                    {
                        if n == nameplate {
                            return Some(SocketAddr::new(from.ip(), port));
                        }
                    }
                }
            }
        }
    }
    None
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
