//! The sans-IO part of the job engine: no processes, no files, no clock reads.

pub mod cluster;
pub mod discover;
pub mod ledger;
pub mod messages;
pub mod result_cache;
pub mod seed000;
pub mod seed000_members;
pub mod seed001;
#[cfg(test)]
mod sim;
