//! The service router: how services (file sharing, the job engine, …) plug into a node,
//! never through its chat interface, in the manner of iroh's `ProtocolHandler` and `Router`.
//!
//! A node is started with the [`ServiceRoute`]s it serves ([`crate::node::NodeConfig::services`]).
//! The node hands each service what is addressed to it (messages the core tagged with the
//! service's name, queries for it, answers to its own queries, the outcome of the SENDs it
//! made, data streams of its kinds, and course programs' requests when it takes them) through
//! the service's bounded inbox; the chat ([`crate::chat`]) is the service of messages with no
//! service named. The application hears the rest (links, dials, the rendezvous) as
//! [`crate::node::NodeEvent`]s, and what a route it was not started with would take. Once the services
//! are built (they need the node's handle), a [`RouterBuilder`] attaches each [`Service`] to
//! its inbox and [`Router::shutdown`] stops them all. What arrives before that waits in the
//! inbox; a route left without a service drops what comes for it.
//!
//! Bounds: each inbox holds [`INBOX`] deliveries. When it is full the node never waits: one
//! more is dropped and the drop warned about (summarised); a dropped message stays unshown in
//! the node's store and is handed over again at the next start (so is one that arrives
//! while the services stop); a dropped stream is closed (the stream ends at once), a dropped
//! course request closed. Each service runs at most [`HANDLERS`] deliveries at once; beyond, its inbox
//! fills. Shutdown waits [`SHUTDOWN_GRACE`] for the deliveries being handled, aborts the
//! rest, then runs each service's own shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use teia_core::identity::PublicKey;
use teia_core::overlay::Cast;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::stream::DataStream;

/// Deliveries waiting in one service's inbox, at most.
pub const INBOX: usize = 1024;
/// Deliveries one service handles at once, at most.
pub const HANDLERS: usize = 256;
/// Time the deliveries being handled get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The route of messages that name no service (a chat line from a course peer, an older
/// teia node, `/msg`): the chat's ([`crate::chat`]).
pub const UNTAGGED: &str = "chat";

/// A service's work on one delivery: a future that owns what it needs.
pub type Handling = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A message addressed to a service.
#[derive(Debug, Clone)]
pub struct ServiceMessage {
    /// Its id.
    pub msg_id: String,
    /// Its origin.
    pub src: String,
    /// How it was sent.
    pub cast: Cast,
    /// Its content (with its `svc`).
    pub payload: Value,
    /// The key that proved `src` sent it (see [`teia_core::overlay::Event::Message`]).
    pub origin_key: Option<PublicKey>,
    /// Its destination as addressed (`name@namespace`, `#namespace` or `*`).
    pub dst: String,
}

/// How a SEND a service made ended.
#[derive(Debug, Clone)]
pub enum SendOutcome {
    /// Acknowledged end to end.
    Acked {
        /// The SEND's id.
        msg_id: String,
        /// Who acknowledged.
        from: String,
        /// Time from the first transmission to the ACK.
        elapsed: Duration,
    },
    /// Not delivered before its deadline.
    Undelivered {
        /// The SEND's id.
        msg_id: String,
        /// Its destination.
        dst: String,
        /// Why (the last error seen, or `timeout`).
        reason: String,
    },
}

/// A query for a service, or an answer to one of its own: the same three parts.
#[derive(Debug, Clone)]
pub struct ServiceQuery {
    /// The query's id.
    pub query_id: String,
    /// Who asks, or who answers.
    pub src: String,
    /// The question, or the answer.
    pub body: Value,
}

/// What a node hands a service.
pub enum Delivery {
    /// A message tagged with the service's name.
    Message(ServiceMessage),
    /// A query for the service (answer it with [`crate::node::NodeHandle::answer`]).
    Query(ServiceQuery),
    /// An answer to a query the service asked.
    Hit(ServiceQuery),
    /// How a SEND the service made ended.
    Outcome(SendOutcome),
    /// A data stream of one of the service's kinds.
    Stream(DataStream),
    /// A course program's request (a connection opening with
    /// [`crate::node::COURSE_REQUEST_PREFIX`]) and where it came from.
    CourseRequest(TcpStream, SocketAddr),
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Message(message) => f.debug_tuple("Message").field(message).finish(),
            Self::Query(query) => f.debug_tuple("Query").field(query).finish(),
            Self::Hit(hit) => f.debug_tuple("Hit").field(hit).finish(),
            Self::Outcome(outcome) => f.debug_tuple("Outcome").field(outcome).finish(),
            Self::Stream(stream) => f.debug_tuple("Stream").field(&stream.service()).finish(),
            Self::CourseRequest(_, addr) => f.debug_tuple("CourseRequest").field(addr).finish(),
        }
    }
}

/// A service a node runs. Each method starts the handling of one delivery and returns it as
/// a future the router runs on a task of its own; what a service does not take is dropped.
pub trait Service: Send + Sync + 'static {
    /// A message addressed to the service.
    fn on_message(&self, message: ServiceMessage) -> Handling {
        drop(message);
        Box::pin(async {})
    }

    /// A query for the service.
    fn on_query(&self, query: ServiceQuery) -> Handling {
        drop(query);
        Box::pin(async {})
    }

    /// An answer to a query the service asked.
    fn on_hit(&self, hit: ServiceQuery) -> Handling {
        drop(hit);
        Box::pin(async {})
    }

    /// How a SEND the service made ([`crate::node::NodeHandle::send_for`]) ended.
    fn on_outcome(&self, outcome: SendOutcome) -> Handling {
        drop(outcome);
        Box::pin(async {})
    }

    /// A data stream of one of the service's kinds.
    fn on_stream(&self, stream: DataStream) -> Handling {
        Box::pin(async move {
            let mut stream = stream;
            stream.shutdown().await;
        })
    }

    /// A course program's request.
    fn on_course_request(&self, tcp: TcpStream, addr: SocketAddr) -> Handling {
        drop((tcp, addr));
        Box::pin(async {})
    }

    /// Stops the service's own tasks (the router has stopped handing it deliveries).
    fn shutdown(&self) -> Handling {
        Box::pin(async {})
    }
}

/// What a node routes to one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    /// The service's name: messages whose payload's `svc` is it, and queries for it.
    pub name: String,
    /// The kinds of data streams it takes (PROTOCOL.md section 6).
    pub streams: Vec<String>,
    /// Whether it takes course programs' requests (one service at most does).
    pub course_requests: bool,
}

impl ServiceRoute {
    /// A route for `name`, taking data streams of kind `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            streams: vec![name.to_owned()],
            course_requests: false,
        }
    }

    /// Also takes data streams of kind `kind`.
    pub fn stream(mut self, kind: &str) -> Self {
        self.streams.push(kind.to_owned());
        self
    }

    /// Also takes course programs' requests.
    pub fn course_requests(mut self) -> Self {
        self.course_requests = true;
        self
    }
}

/// Why a delivery was not handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Undeliverable {
    /// No route takes it: the application hears it.
    NoRoute,
    /// The service's inbox is full: dropped.
    Full,
    /// The route has no service attached: dropped.
    Closed,
}

/// A delivery not handed over, and why.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) why: Undeliverable,
    pub(crate) delivery: Delivery,
}

impl Refused {
    fn new(why: Undeliverable, delivery: Delivery) -> Box<Self> {
        Box::new(Self { why, delivery })
    }
}

/// The node's side of the routes: where each service's deliveries go.
#[derive(Clone, Default)]
pub(crate) struct Routes {
    inboxes: Arc<HashMap<String, mpsc::Sender<Delivery>>>,
    streams: Arc<HashMap<String, String>>,
    course: Option<String>,
}

impl Routes {
    /// The routes for `services`, and the inboxes their services read.
    pub(crate) fn new(services: &[ServiceRoute]) -> (Self, Inboxes) {
        let mut inboxes = HashMap::new();
        let mut receivers = HashMap::new();
        let mut streams = HashMap::new();
        let mut course = None;
        for route in services {
            let (sender, receiver) = mpsc::channel(INBOX);
            inboxes.insert(route.name.clone(), sender);
            receivers.insert(route.name.clone(), receiver);
            for kind in &route.streams {
                streams.insert(kind.clone(), route.name.clone());
            }
            if route.course_requests && course.is_none() {
                course = Some(route.name.clone());
            }
        }
        (
            Self {
                inboxes: Arc::new(inboxes),
                streams: Arc::new(streams),
                course,
            },
            Inboxes { receivers },
        )
    }

    /// Whether a route for `service` exists (with its service attached or not).
    pub(crate) fn serves(&self, service: &str) -> bool {
        self.inboxes.contains_key(service)
    }

    /// Hands `delivery` to `service`.
    pub(crate) fn deliver(&self, service: &str, delivery: Delivery) -> Result<(), Box<Refused>> {
        let Some(inbox) = self.inboxes.get(service) else {
            return Err(Refused::new(Undeliverable::NoRoute, delivery));
        };
        inbox.try_send(delivery).map_err(|e| match e {
            mpsc::error::TrySendError::Full(d) => Refused::new(Undeliverable::Full, d),
            mpsc::error::TrySendError::Closed(d) => Refused::new(Undeliverable::Closed, d),
        })
    }

    /// Whether some service takes data streams.
    pub(crate) fn takes_streams(&self) -> bool {
        !self.streams.is_empty()
    }

    /// Hands a data stream to the service of its kind.
    pub(crate) fn deliver_stream(&self, stream: DataStream) -> Result<(), Box<Refused>> {
        match self.streams.get(stream.service()) {
            Some(service) => self.deliver(&service.clone(), Delivery::Stream(stream)),
            None => Err(Refused::new(
                Undeliverable::NoRoute,
                Delivery::Stream(stream),
            )),
        }
    }

    /// Hands a course program's request to the service that takes them.
    pub(crate) fn deliver_course_request(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> Result<(), Box<Refused>> {
        let delivery = Delivery::CourseRequest(tcp, addr);
        match &self.course {
            Some(service) => self.deliver(service, delivery),
            None => Err(Refused::new(Undeliverable::NoRoute, delivery)),
        }
    }
}

/// The inboxes of a node's services, to attach them with [`Router::builder`].
pub struct Inboxes {
    receivers: HashMap<String, mpsc::Receiver<Delivery>>,
}

/// Attaches services to their inboxes.
pub struct RouterBuilder {
    inboxes: Inboxes,
    services: Vec<(String, Arc<dyn Service>, mpsc::Receiver<Delivery>)>,
}

/// A route asked for that the node was not started with.
#[derive(Debug, thiserror::Error)]
#[error("the node was started without a route for the service {0:?}")]
pub struct UnknownService(pub String);

impl RouterBuilder {
    /// Attaches `service` to the inbox of the route `name`.
    pub fn service(
        mut self,
        name: &str,
        service: Arc<dyn Service>,
    ) -> Result<Self, UnknownService> {
        let inbox = self
            .inboxes
            .receivers
            .remove(name)
            .ok_or_else(|| UnknownService(name.to_owned()))?;
        self.services.push((name.to_owned(), service, inbox));
        Ok(self)
    }

    /// Starts handing each service its deliveries. Routes left without a service drop what
    /// comes for them (as taken: a message is not handed over again after a restart).
    pub fn spawn(self) -> Router {
        let cancel = CancellationToken::new();
        let mut dispatchers = JoinSet::new();
        for (_, mut inbox) in self.inboxes.receivers {
            let cancel = cancel.clone();
            dispatchers.spawn(async move {
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        delivery = inbox.recv() => if delivery.is_none() { break },
                    }
                }
            });
        }
        let mut services = Vec::new();
        for (name, service, inbox) in self.services {
            dispatchers.spawn(dispatch(
                name.clone(),
                Arc::clone(&service),
                inbox,
                cancel.clone(),
            ));
            services.push((name, service));
        }
        Router {
            cancel,
            dispatchers,
            services,
        }
    }
}

/// The services attached to a node, each fed from its inbox.
pub struct Router {
    cancel: CancellationToken,
    dispatchers: JoinSet<()>,
    services: Vec<(String, Arc<dyn Service>)>,
}

impl Router {
    /// A builder attaching services to `inboxes` (from [`crate::node::start`]).
    pub fn builder(inboxes: Inboxes) -> RouterBuilder {
        RouterBuilder {
            inboxes,
            services: Vec::new(),
        }
    }

    /// Stops handing over deliveries, lets those being handled finish ([`SHUTDOWN_GRACE`] at
    /// most), then stops each service in the order they were attached.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.dispatchers.join_next().await.is_some() {}
        for (name, service) in &self.services {
            tracing::debug!(service = %name, "stopping");
            service.shutdown().await;
        }
    }
}

/// Feeds one service from its inbox until the router stops.
async fn dispatch(
    name: String,
    service: Arc<dyn Service>,
    mut inbox: mpsc::Receiver<Delivery>,
    cancel: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(HANDLERS));
    let mut running = JoinSet::new();
    loop {
        let delivery = tokio::select! {
            () = cancel.cancelled() => break,
            delivery = inbox.recv() => match delivery {
                Some(delivery) => delivery,
                None => break,
            },
        };
        let permit = tokio::select! {
            () = cancel.cancelled() => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        while running.try_join_next().is_some() {}
        let handling = match delivery {
            Delivery::Message(message) => service.on_message(message),
            Delivery::Query(query) => service.on_query(query),
            Delivery::Hit(hit) => service.on_hit(hit),
            Delivery::Outcome(outcome) => service.on_outcome(outcome),
            Delivery::Stream(stream) => service.on_stream(stream),
            Delivery::CourseRequest(tcp, addr) => service.on_course_request(tcp, addr),
        };
        running.spawn(async move {
            handling.await;
            drop(permit);
        });
    }
    inbox.close();
    let finished = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(service = %name, left = running.len(), "deliveries aborted at shutdown");
        running.abort_all();
        while running.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts queries and shutdowns.
    #[derive(Default)]
    struct Counting {
        queries: Arc<AtomicUsize>,
        stopped: Arc<AtomicUsize>,
    }

    impl Service for Counting {
        fn on_query(&self, _query: ServiceQuery) -> Handling {
            let queries = Arc::clone(&self.queries);
            Box::pin(async move {
                queries.fetch_add(1, Ordering::SeqCst);
            })
        }

        fn shutdown(&self) -> Handling {
            let stopped = Arc::clone(&self.stopped);
            Box::pin(async move {
                stopped.fetch_add(1, Ordering::SeqCst);
            })
        }
    }

    fn query(id: &str) -> Delivery {
        Delivery::Query(ServiceQuery {
            query_id: id.into(),
            src: "a@teia".into(),
            body: Value::Null,
        })
    }

    #[tokio::test]
    async fn deliveries_reach_their_service_and_shutdown_stops_it() {
        let (routes, inboxes) = Routes::new(&[ServiceRoute::new("files")]);
        routes.deliver("files", query("q1")).unwrap();
        let service = Arc::new(Counting::default());
        let (queries, stopped) = (Arc::clone(&service.queries), Arc::clone(&service.stopped));
        let router = Router::builder(inboxes)
            .service("files", service)
            .unwrap()
            .spawn();
        routes.deliver("files", query("q2")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while queries.load(Ordering::SeqCst) < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        router.shutdown().await;
        assert_eq!(stopped.load(Ordering::SeqCst), 1);
        assert!(matches!(
            routes.deliver("files", query("q3")),
            Err(refused) if refused.why == Undeliverable::Closed
        ));
    }

    #[test]
    fn what_no_route_takes_is_given_back_and_a_full_inbox_drops() {
        let (routes, _inboxes) = Routes::new(&[ServiceRoute::new("jobs")]);
        assert!(matches!(
            routes.deliver("chat", query("q")),
            Err(refused) if refused.why == Undeliverable::NoRoute
        ));
        for n in 0..INBOX {
            routes.deliver("jobs", query(&n.to_string())).unwrap();
        }
        assert!(matches!(
            routes.deliver("jobs", query("one more")),
            Err(refused) if refused.why == Undeliverable::Full
        ));
    }

    #[test]
    fn a_route_for_a_service_that_was_not_started_is_refused() {
        let (_routes, inboxes) = Routes::new(&[ServiceRoute::new("files")]);
        let refused = Router::builder(inboxes).service("jobs", Arc::new(Counting::default()));
        assert!(refused.is_err());
    }
}
