//! The sans-IO part of file sharing: no sockets, no files, no clock.

pub mod code;
pub mod exchange;
pub mod msg;
pub mod napster;
pub mod plan;
pub mod swarm;
pub mod ticket;
pub mod tree;

#[cfg(test)]
mod sim;
