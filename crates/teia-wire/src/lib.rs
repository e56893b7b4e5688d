//! teia wire protocol: message types and the JSON-lines codec.
//!
//! This crate does no I/O. It turns bytes into validated messages and messages into bytes,
//! following `PROTOCOL.md`: strict when writing, liberal when reading.

pub mod codec;
pub mod fields;
pub mod peer;
pub mod pex;
pub mod rendezvous;
pub mod stream;
