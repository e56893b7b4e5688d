//! The teia node's runtime: tokio networking around the sans-IO core. For now it holds the
//! rendezvous client that nodes use to find each other.

pub mod rendezvous;
