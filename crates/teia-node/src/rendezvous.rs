//! Rendezvous client: one request per connection, with timeouts on connect and read, and a
//! registrar that keeps a registration alive until shutdown.

use std::future::Future;
use std::time::Duration;

use teia_core::rendezvous::refresh_after;
use teia_wire::codec::{DecodeError, LineDecoder};
use teia_wire::rendezvous::{
    parse_answer, parse_discover_answer, parse_register_answer, AnswerError, PeerRecord,
    Registration, Request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a rendezvous request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot connect to rendezvous {server}: {source}")]
    Connect {
        /// The server address as given.
        server: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The connection broke while talking.
    #[error("rendezvous {server}: {source}")]
    Io {
        /// The server address as given.
        server: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("rendezvous {server} did not answer within {timeout:?}")]
    Timeout {
        /// The server address as given.
        server: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The server closed without answering.
    #[error("rendezvous {server} closed the connection without answering")]
    NoAnswer {
        /// The server address as given.
        server: String,
    },
    /// The answer was an error or could not be read.
    #[error("rendezvous {server}: {source}")]
    Answer {
        /// The server address as given.
        server: String,
        /// What was wrong.
        source: AnswerError,
    },
}

/// A client for one rendezvous server.
#[derive(Debug, Clone)]
pub struct RendezvousClient {
    server: String,
    connect_timeout: Duration,
    read_timeout: Duration,
}

impl RendezvousClient {
    /// A client for `server` (`host:port`), with 5 s to connect and 10 s to answer.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
        }
    }

    /// Sets the connect and answer timeouts.
    pub fn with_timeouts(mut self, connect: Duration, read: Duration) -> Self {
        self.connect_timeout = connect;
        self.read_timeout = read;
        self
    }

    /// The server address.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Registers `name@namespace` on `port` for `ttl` seconds.
    pub async fn register(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        ttl: u32,
    ) -> Result<Registration, ClientError> {
        let request = Request::Register {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port,
            ttl,
        };
        let answer = self.request(&request).await?;
        parse_register_answer(&answer, ttl).map_err(|source| self.answer_error(source))
    }

    /// Lists the records of `namespace`, or of every namespace for `None`.
    pub async fn discover(&self, namespace: Option<&str>) -> Result<Vec<PeerRecord>, ClientError> {
        let request = Request::Discover {
            namespace: namespace.map(str::to_owned),
        };
        let answer = self.request(&request).await?;
        parse_discover_answer(&answer).map_err(|source| self.answer_error(source))
    }

    /// Removes our records of `namespace` (only `name` and `port` when given).
    pub async fn unregister(
        &self,
        namespace: &str,
        name: Option<&str>,
        port: Option<u16>,
    ) -> Result<(), ClientError> {
        let request = Request::Unregister {
            namespace: namespace.to_owned(),
            name: name.map(str::to_owned),
            port,
        };
        let answer = self.request(&request).await?;
        parse_answer(&answer)
            .map(drop)
            .map_err(|source| self.answer_error(source))
    }

    /// Sends one request and returns the answer line as received (without its `\n`).
    pub async fn request(&self, request: &Request) -> Result<Vec<u8>, ClientError> {
        let connect = TcpStream::connect(&self.server);
        let mut stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| self.timeout(self.connect_timeout))?
            .map_err(|source| ClientError::Connect {
                server: self.server.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let exchange = async {
            stream.write_all(&request.to_line()).await?;
            read_answer(&mut stream).await
        };
        match tokio::time::timeout(self.read_timeout, exchange).await {
            Err(_) => Err(self.timeout(self.read_timeout)),
            Ok(Err(source)) => Err(ClientError::Io {
                server: self.server.clone(),
                source,
            }),
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => Err(ClientError::NoAnswer {
                server: self.server.clone(),
            }),
        }
    }

    fn timeout(&self, timeout: Duration) -> ClientError {
        ClientError::Timeout {
            server: self.server.clone(),
            timeout,
        }
    }

    fn answer_error(&self, source: AnswerError) -> ClientError {
        ClientError::Answer {
            server: self.server.clone(),
            source,
        }
    }
}

/// Reads one answer line, or the unterminated answer at end of stream.
async fn read_answer(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut decoder = LineDecoder::default();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(decoder.finish());
        }
        let mut input = chunk.get(..n).unwrap_or_default();
        match decoder.decode(&mut input) {
            Some(Ok(line)) => return Ok(Some(line)),
            Some(Err(DecodeError::LineTooLong { limit })) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("answer longer than {limit} bytes"),
                ))
            }
            Some(Err(other)) => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, other))
            }
            None => {}
        }
    }
}

/// What the registrar reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrarEvent {
    /// The record was registered or refreshed.
    Registered(Registration),
    /// A registration failed; it is tried again after `retry_in`.
    Failed {
        /// The error, as text.
        error: String,
        /// When the next attempt comes.
        retry_in: Duration,
    },
}

/// Keeps `name@namespace` registered: registers, re-registers at half the granted ttl,
/// retries failures with exponential backoff (1 s doubling to at most 60 s), and
/// unregisters when `shutdown` resolves.
pub struct Registrar {
    /// The server's client.
    pub client: RendezvousClient,
    /// Our namespace.
    pub namespace: String,
    /// Our name.
    pub name: String,
    /// Our listen port.
    pub port: u16,
    /// The ttl asked for, in seconds.
    pub ttl: u32,
}

/// Longest wait between two failed registrations.
const MAX_RETRY: Duration = Duration::from_secs(60);

impl Registrar {
    /// Runs until `shutdown` resolves, calling `report` after each attempt.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
        mut report: impl FnMut(RegistrarEvent),
    ) {
        tokio::pin!(shutdown);
        let mut retry = Duration::from_secs(1);
        loop {
            let attempt = self
                .client
                .register(&self.namespace, &self.name, self.port, self.ttl);
            let wait = tokio::select! {
                () = &mut shutdown => break,
                outcome = attempt => match outcome {
                    Ok(registration) => {
                        retry = Duration::from_secs(1);
                        let wait = refresh_after(registration.ttl);
                        report(RegistrarEvent::Registered(registration));
                        wait
                    }
                    Err(e) => {
                        let wait = retry;
                        retry = (retry * 2).min(MAX_RETRY);
                        report(RegistrarEvent::Failed { error: e.to_string(), retry_in: wait });
                        wait
                    }
                },
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Err(e) = self
            .client
            .unregister(&self.namespace, Some(&self.name), Some(self.port))
            .await
        {
            tracing::warn!(error = %e, "could not unregister");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use teia_rendezvous::{Config, Server};
    use tokio::sync::{mpsc, oneshot};

    async fn start_server(dir: &std::path::Path) -> (String, oneshot::Sender<()>) {
        let server = Server::bind(Config::new("127.0.0.1:0".parse().unwrap(), dir.into()))
            .await
            .unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    #[tokio::test]
    async fn client_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _stop) = start_server(dir.path()).await;
        let client = RendezvousClient::new(addr);
        let reg = client.register("UnB", "alice", 7070, 60).await.unwrap();
        assert_eq!(reg.ttl, 60);
        assert_eq!(reg.observed_ip.as_deref(), Some("127.0.0.1"));
        let peers = client.discover(Some("UnB")).await.unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].peer_id(), "alice@UnB");
        client.unregister("UnB", Some("alice"), None).await.unwrap();
        assert!(client.discover(None).await.unwrap().is_empty());
        let refused = client.register("UnB", "a b", 1, 60).await.unwrap_err();
        assert!(
            matches!(&refused, ClientError::Answer { source: AnswerError::Server { code, .. }, .. } if code == "bad_name"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn unreachable_server_is_a_connect_error() {
        let client = RendezvousClient::new("127.0.0.1:1");
        assert!(matches!(
            client.discover(None).await,
            Err(ClientError::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn registrar_refreshes_before_expiry_and_unregisters_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _stop) = start_server(dir.path()).await;
        let registrar = Registrar {
            client: RendezvousClient::new(addr.clone()),
            namespace: "UnB".into(),
            name: "alice".into(),
            port: 7070,
            ttl: 2,
        };
        let (events_tx, mut events) = mpsc::channel(16);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(registrar.run(
            async {
                let _ = stopped.await;
            },
            move |event| {
                let _ = events_tx.try_send(event);
            },
        ));
        for _ in 0..3 {
            let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(event, RegistrarEvent::Registered(_)), "{event:?}");
        }
        let client = RendezvousClient::new(addr);
        assert_eq!(client.discover(Some("UnB")).await.unwrap().len(), 1);
        stop.send(()).unwrap();
        task.await.unwrap();
        assert!(client.discover(Some("UnB")).await.unwrap().is_empty());
    }
}
