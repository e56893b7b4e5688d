//! How the job engine plugs into a node: its route (messages and data streams of service
//! `jobs`) and what it does with each delivery the node's router hands it.
//!
//! Bounds: the router's (each delivery is one handler, at most
//! [`teia_node::router::HANDLERS`] at once); a stream is served within the engine's limits.

use teia_core::overlay::Cast;
use teia_node::router::{Handling, Service, ServiceMessage, ServiceRoute};
use teia_node::stream::DataStream;

use crate::engine::Engine;
use crate::proto::messages::SERVICE;

/// What a node routes to the job engine.
pub fn route() -> ServiceRoute {
    ServiceRoute::new(SERVICE)
}

impl Service for Engine {
    /// The engine's messages go to one node: anything else with its name is not its own.
    fn on_message(&self, message: ServiceMessage) -> Handling {
        let engine = self.clone();
        Box::pin(async move {
            if message.cast == Cast::Unicast {
                engine
                    .on_message(&message.src, message.origin_key, &message.payload)
                    .await;
            }
        })
    }

    fn on_stream(&self, stream: DataStream) -> Handling {
        let engine = self.clone();
        Box::pin(async move { engine.serve_stream(stream).await })
    }

    fn shutdown(&self) -> Handling {
        let engine = self.clone();
        Box::pin(async move { engine.shutdown().await })
    }
}
