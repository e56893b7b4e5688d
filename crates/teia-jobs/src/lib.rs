//! teia's job engine (seeds 000 and 001): evaluations of Python projects by their pytest
//! suites, one test module per task, handed out by pull to the nodes that trust the owner.
//!
//! `proto` holds the decisions with no I/O: the ledger of an evaluation's modules (leases,
//! results, retries, verification), fair longest-first scheduling, grades, module
//! discovery, the cluster's rules (members, which messages count and from whom, failure
//! detection of owners, elections), seed 001's master/worker messages and task table, and
//! seed 000's worker and members; [`remote`] carries the cluster's rules out over the node,
//! [`master`] serves seed 001's workers, [`course_worker`] works for seed 001's masters,
//! [`seed000_worker`] works in seed 000's networks and [`seed000_members`] has seed 000's
//! nodes work for this one.

pub mod bundle;
mod cluster;
pub mod course_worker;
pub mod engine;
pub mod master;
pub mod proto;
pub mod remote;
pub mod remote_scripts;
pub mod routed;
pub mod runner;
pub mod script;
pub mod seed000_members;
pub mod seed000_worker;
pub mod split;
pub mod taskfile;
mod tasks;
pub mod transfer;
