//! The teia rendezvous server (PROTOCOL.md section 2): peers register `name@namespace` with
//! their port and discover each other. Records are durable in SQLite and expire on time.

pub mod server;
pub mod store;

pub use server::{Config, Server, ServerError};
