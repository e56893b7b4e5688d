//! teia benchmarks. Each one measures teia and, in the same run and under the same load, a
//! minimal reference that marks the ceiling of the machine, and prints the ratio.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod all;
mod assembled;
mod eval;
mod files;
mod jobs;
mod load;
mod node;
mod overlay;
mod rendezvous;
mod web;

use clap::{Parser, Subcommand};

/// Load generators for teia, each compared against a reference measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "teia-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Rendezvous server: N concurrent clients doing connect / REGISTER or DISCOVER / close,
    /// against `teia rendezvous` and against a server that answers a constant line.
    Rendezvous(rendezvous::Args),
    /// Overlay: SEND->ACK round trips over 0, 1 and 3 relays, PUB throughput over one link
    /// against raw TCP lines, and one PUB flooding a 100-node mesh.
    Overlay(overlay::Args),
    /// File sharing: a 1 GiB file by /get and by teia receive (rate, peak RSS, CPU per GiB),
    /// resume after kill -9 at 50 %, two holders, a 20 MiB file; against a raw TCP copy.
    Files(files::Args),
    /// Evaluations: a corpus by serial pytest, pytest-xdist and teia with 2 and 3 nodes, and
    /// the times to recover from a killed worker and a killed owner.
    Eval(eval::Args),
    /// Script tasks (seed 001): 200 tasks of 50 ms over 3 nodes against the ideal and
    /// against `xargs -P 3 python`, and the time from a worker's kill -9 to its task
    /// running elsewhere.
    Jobs(jobs::Args),
    /// The dashboard: its first load from a `teia node --http` against the same bytes from
    /// memory, and the time from a chat message posted to its event on `/events`.
    Web(web::Args),
    /// Every benchmark above, one after the other (each in its own process, with its
    /// defaults), under a header naming the machine (CPU count and model), the date and the
    /// commit: the whole table of docs/BENCHMARKS.md from one run.
    All(all::Args),
    /// The reference server: reads one line per connection, answers a constant line, closes.
    /// Started by the benchmarks themselves.
    #[command(hide = true)]
    ReferenceServer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Rendezvous(args) => rendezvous::run(args).await,
            Command::Overlay(args) => overlay::run(args).await,
            Command::Files(args) => files::run(args).await,
            Command::Eval(args) => eval::run(args).await,
            Command::Jobs(args) => jobs::run(args).await,
            Command::Web(args) => web::run(args).await,
            Command::All(args) => all::run(args),
            Command::ReferenceServer { listen } => rendezvous::reference_server(listen).await,
        }
    })
}
