//! teia protocol logic as plain state machines.
//!
//! Sans-IO: nothing here opens a socket, reads a clock or spawns a task. Every function
//! takes the events and the current time it needs and returns what should happen, so a
//! whole network can be simulated in one process, deterministically.

pub mod identity;
pub mod lan;
pub mod overlay;
pub mod pex;
pub mod rate;
pub mod rendezvous;
pub mod rng;
pub mod splice;
