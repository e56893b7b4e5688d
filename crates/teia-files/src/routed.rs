//! How file sharing plugs into a node: its route (queries and hits of service `files`,
//! data streams of kinds `files` and `files-back`, seed 004 peers' requests) and what it does
//! with each delivery the node's router hands it.
//!
//! Bounds: the router's (each delivery is one handler, at most [`teia_node::router::HANDLERS`]
//! at once); a stream or a course request is served within the limits of [`crate::serve`] and
//! [`crate::seed`].

use std::net::SocketAddr;
use std::sync::Arc;

use teia_node::router::{Handling, Service, ServiceQuery, ServiceRoute};
use teia_node::stream::DataStream;
use tokio::net::TcpStream;

use crate::service::Files;
use crate::{seed, serve};

pub use crate::proto::msg::{DIAL_BACK_STREAM, SERVICE};

/// What a node routes to file sharing.
pub fn route() -> ServiceRoute {
    ServiceRoute::new(SERVICE)
        .stream(DIAL_BACK_STREAM)
        .course_requests()
}

impl Service for Files {
    fn on_query(&self, query: ServiceQuery) -> Handling {
        let files = self.clone();
        Box::pin(async move {
            files
                .on_query(&query.query_id, &query.src, &query.body)
                .await;
        })
    }

    fn on_hit(&self, hit: ServiceQuery) -> Handling {
        let files = self.clone();
        Box::pin(async move { files.on_hit(&hit.query_id, &hit.src, &hit.body).await })
    }

    fn on_stream(&self, stream: DataStream) -> Handling {
        Box::pin(serve::serve(Arc::clone(&self.inner), stream))
    }

    fn on_course_request(&self, tcp: TcpStream, addr: SocketAddr) -> Handling {
        Box::pin(seed::serve(Arc::clone(&self.inner), tcp, addr))
    }

    fn shutdown(&self) -> Handling {
        let files = self.clone();
        Box::pin(async move { files.shutdown().await })
    }
}
