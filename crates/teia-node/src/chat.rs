//! The chat as a service on the node's router, like file sharing and the job engine: it takes
//! the messages that name no service and the outcome of its own SENDs, and hands them, in the
//! order they came, to the one interface that shows them (the shell, plain lines or `--json`
//! in the binary), which reads [`ChatEvent`]s and says which messages it has shown.
//!
//! **Bounds**: [`EVENTS`] events wait for the interface. When it lags that far behind, the
//! node never waits for it: one more event is dropped and the drop logged (one warning, then
//! one per [`DROPS_WARNED_EVERY`]); a dropped message stays unshown in the node's store and is
//! handed over again at the next start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::node::{NodeError, NodeHandle};
use crate::router::{Handling, SendOutcome, Service, ServiceMessage, ServiceRoute, UNTAGGED};

/// The chat's route name: the route of messages that name no service.
pub const SERVICE: &str = UNTAGGED;
/// Events waiting for the interface, at most.
pub const EVENTS: usize = 1024;
/// Dropped events between two warnings.
pub const DROPS_WARNED_EVERY: u64 = 100;

/// What the chat tells its interface.
#[derive(Debug, Clone)]
pub enum ChatEvent {
    /// A message for the user (show it, then call [`Chat::shown`]).
    Message(ServiceMessage),
    /// How a SEND of the user's ended.
    Outcome(SendOutcome),
    /// The user said something, from any interface ([`Chat::say`]).
    Sent {
        /// The message's id (its outcome names it).
        msg_id: String,
        /// Where it went: `name@namespace`, `#namespace` or `*`.
        dst: String,
        /// What was said.
        payload: Value,
    },
}

/// The chat's route: messages that name no service (it takes no data streams).
pub fn route() -> ServiceRoute {
    ServiceRoute {
        name: SERVICE.to_owned(),
        streams: Vec::new(),
        course_requests: false,
    }
}

/// What an interface calls: say something, and say what it has shown.
#[derive(Clone)]
pub struct Chat {
    node: NodeHandle,
    service: Arc<ChatService>,
}

impl Chat {
    /// The chat of a running node: its handle, the service to attach to the node's router
    /// under [`SERVICE`], and the events for the interface.
    pub fn start(node: NodeHandle) -> (Self, Arc<ChatService>, mpsc::Receiver<ChatEvent>) {
        let (events, receiver) = mpsc::channel(EVENTS);
        let service = Arc::new(ChatService {
            events,
            dropped: AtomicU64::new(0),
        });
        let chat = Self {
            node,
            service: Arc::clone(&service),
        };
        (chat, service, receiver)
    }

    /// Sends `payload` to `name@namespace` (acknowledged: its outcome comes as a
    /// [`ChatEvent::Outcome`]), `#namespace` or `*`; returns the message id. Every
    /// interface hears of it as a [`ChatEvent::Sent`], which its outcome may overtake (the
    /// ACK of a neighbour can come back first).
    pub async fn say(&self, dst: &str, payload: Value) -> Result<String, NodeError> {
        let msg_id = self.node.send_for(SERVICE, dst, payload.clone()).await?;
        self.service.queue(ChatEvent::Sent {
            msg_id: msg_id.clone(),
            dst: dst.to_owned(),
            payload,
        });
        Ok(msg_id)
    }

    /// The interface has shown the message `msg_id` to its user: it is not handed over
    /// again after a restart.
    pub async fn shown(&self, msg_id: &str) -> Result<(), NodeError> {
        self.node.shown(msg_id).await
    }
}

/// The chat's side of the router: queues what comes for the interface.
pub struct ChatService {
    events: mpsc::Sender<ChatEvent>,
    dropped: AtomicU64,
}

impl ChatService {
    /// Queues `event` at once (so lines keep their order), or drops it when the interface
    /// lags [`EVENTS`] behind.
    fn queue(&self, event: ChatEvent) {
        if self.events.try_send(event).is_ok() {
            return;
        }
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed);
        if dropped.is_multiple_of(DROPS_WARNED_EVERY) {
            tracing::warn!(
                dropped = dropped + 1,
                "the chat's interface lags behind; events dropped (messages are handed over \
                 again at the next start)"
            );
        }
    }
}

impl Service for ChatService {
    fn on_message(&self, message: ServiceMessage) -> Handling {
        self.queue(ChatEvent::Message(message));
        Box::pin(async {})
    }

    fn on_outcome(&self, outcome: SendOutcome) -> Handling {
        self.queue(ChatEvent::Outcome(outcome));
        Box::pin(async {})
    }
}
