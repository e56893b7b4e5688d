//! teia file sharing (seed 004, beyond Napster): content-addressed files, verified chunk by
//! chunk, downloaded from every holder at once over encrypted data streams, resumable, found
//! by a query flooded through the overlay or through an index server.
//!
//! `proto` holds the decisions, with no I/O: content addressing ([`proto::tree`]), the
//! download planner ([`proto::plan`]), the messages ([`proto::msg`]) and name matching. The
//! other modules are the runtime: the share index on disk, serving, downloading.

mod approvals;
pub mod code;
mod dial_back;
pub mod download;
mod fetch;
mod findings;
pub mod index;
mod index_client;
mod limits;
pub mod proto;
pub mod routed;
pub mod seed;
pub mod serve;
pub mod service;
pub mod share;
mod state;
pub mod store;
mod tasks;

pub use approvals::PendingApproval;
pub use download::{DownloadInfo, Source};
pub use routed::route;
pub use service::{Approval, Files, FilesConfig, FilesError, FilesEvent};
