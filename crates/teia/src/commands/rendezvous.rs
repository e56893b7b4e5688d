//! `teia rendezvous`: runs the rendezvous server until SIGINT or SIGTERM.

use anyhow::Context;
use teia_core::rendezvous::Limits;
use teia_rendezvous::{Config, Server};

use super::{connection_cap, data_dir, seconds, shutdown_signal};
use crate::cli::RendezvousArgs;

/// Starts the server and serves until a shutdown signal.
pub async fn run(args: RendezvousArgs) -> anyhow::Result<()> {
    let data_dir = data_dir(args.data_dir)?;
    let mut config = Config::new(args.listen, data_dir.clone());
    config.max_connections = connection_cap(u64::from(args.max_connections));
    config.idle_timeout = seconds(args.idle_timeout, "--idle-timeout")?;
    config.rate_limit = (args.rate_limit > 0).then_some(args.rate_limit);
    config.limits = Limits {
        max_records: args.max_records,
        max_records_per_ip: args.max_records_per_ip,
    };
    let server = Server::bind(config)
        .await
        .context("cannot start the rendezvous server")?;
    let addr = server
        .local_addr()
        .context("cannot read the bound address")?;
    tracing::info!(
        %addr,
        records = server.records(),
        data_dir = %data_dir.display(),
        "rendezvous listening"
    );
    server.serve(shutdown_signal()).await;
    Ok(())
}
