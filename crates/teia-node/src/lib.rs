//! The teia node's runtime: tokio networking around the sans-IO overlay in `teia-core`,
//! the rendezvous client and LAN discovery that nodes use to find each other.

pub mod chat;
pub mod dial;
pub mod identity;
pub mod lan;
pub mod node;
pub mod pex;
pub mod rendezvous;
pub mod router;
pub mod store;
pub mod stream;
pub mod sync;
