//! The chat as a service on the router, assembled in-process: a line said through one node's
//! chat reaches the other's chat interface, its ACK comes back to the sayer's, and a line the
//! interface never marked shown is handed over again after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use teia_core::overlay::{Cast, Config as OverlayConfig};
use teia_node::chat::{self, Chat, ChatEvent};
use teia_node::node::{start, NodeConfig, NodeHandle};
use teia_node::router::{Router, SendOutcome};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Longest wait for one event; the machine may be busy.
const WAIT: Duration = Duration::from_secs(60);

/// A node with only its chat.
struct ChatNode {
    chat: Chat,
    events: mpsc::Receiver<ChatEvent>,
    handle: NodeHandle,
    router: Router,
    task: JoinHandle<()>,
    listen: SocketAddr,
}

impl ChatNode {
    async fn start(name: &str, store: Option<PathBuf>, peers: Vec<SocketAddr>) -> Self {
        let mut overlay = OverlayConfig::new(format!("{name}@test"));
        overlay.identity = Some(teia_node::identity::ephemeral().unwrap());
        let started = start(NodeConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            peers,
            store,
            services: vec![chat::route()],
            ..NodeConfig::new(overlay)
        })
        .await
        .unwrap();
        let (chat, service, events) = Chat::start(started.handle.clone());
        let router = Router::builder(started.inboxes)
            .service(chat::SERVICE, service)
            .unwrap()
            .spawn();
        // The node's own events (links, dials) are not the chat's: drained.
        let mut node_events = started.events;
        tokio::spawn(async move { while node_events.recv().await.is_some() {} });
        Self {
            chat,
            events,
            listen: started.handle.listen_addr().unwrap(),
            handle: started.handle,
            router,
            task: started.task,
        }
    }

    async fn stop(self) {
        self.router.shutdown().await;
        let _ = self.handle.shutdown().await;
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }

    /// The next chat event that `pick` takes, skipping the others.
    async fn next<T>(&mut self, mut pick: impl FnMut(ChatEvent) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let event = self.events.recv().await.expect("the chat stopped");
                if let Some(found) = pick(event) {
                    return found;
                }
            }
        })
        .await
        .expect("no such chat event in time")
    }
}

/// Says `text` to `dst` (a SEND waits in the outbox until a route is found): its message id.
async fn say(from: &ChatNode, dst: &str, text: &str) -> String {
    from.chat
        .say(dst, Value::String(text.to_owned()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_reaches_the_other_chat_and_an_unshown_one_comes_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("bob.sqlite3");
    let mut bob = ChatNode::start("bob", Some(store.clone()), Vec::new()).await;
    let mut alice = ChatNode::start("alice", None, vec![bob.listen]).await;

    let sent = say(&alice, "bob@test", "hello bob").await;
    let message = bob
        .next(|event| match event {
            ChatEvent::Message(m) if m.msg_id == sent => Some(m),
            _ => None,
        })
        .await;
    assert_eq!(message.payload, Value::String("hello bob".into()));
    assert_eq!(message.src, "alice@test");
    assert_eq!(message.cast, Cast::Unicast);
    let from = alice
        .next(|event| match event {
            ChatEvent::Outcome(SendOutcome::Acked { msg_id, from, .. }) if msg_id == sent => {
                Some(from)
            }
            _ => None,
        })
        .await;
    assert_eq!(from, "bob@test");

    // Bob's interface never said it showed the line: a restart hands it over again.
    bob.stop().await;
    let mut bob = ChatNode::start("bob", Some(store), Vec::new()).await;
    let again = bob
        .next(|event| match event {
            ChatEvent::Message(m) if m.msg_id == sent => Some(m.payload),
            _ => None,
        })
        .await;
    assert_eq!(again, Value::String("hello bob".into()));
    alice.stop().await;
    bob.stop().await;
}
