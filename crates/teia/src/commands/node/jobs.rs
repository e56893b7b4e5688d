//! The job engine of `teia node`: seed 001's master and the engine with its HTTP API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use teia_node::node::NodeHandle;

use crate::cli::NodeArgs;
use crate::commands::node_file;

/// Starts the seed 001 master on `tasks`, with the node's own workers (which keep their
/// files in `dir`) when it has Python.
pub(super) async fn start_master(
    args: &NodeArgs,
    peer_id: &str,
    tasks: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<teia_jobs::master::MasterHandle> {
    let slots = args.task_workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let python = teia_jobs::runner::resolve_python(&args.python);
    let local = match (slots, teia_jobs::runner::find_python(&python).await) {
        (0, _) => None,
        (_, Err(e)) => {
            tracing::warn!("tasks go to course workers only: {e}");
            None
        }
        (slots, Ok(found)) => {
            let python = found.executable;
            let limits = teia_jobs::runner::Limits {
                timeout: Duration::from_secs(args.module_timeout.max(1)),
                ..teia_jobs::runner::Limits::default()
            };
            let isolation = teia_jobs::runner::Isolation::detect();
            let runner = teia_jobs::runner::Runner::new(dir, python, limits, isolation)
                .with_context(|| format!("cannot prepare {}", dir.display()))?;
            Some(teia_jobs::master::LocalWorkers {
                slots,
                runner: std::sync::Arc::new(runner),
                node: peer_id.to_owned(),
            })
        }
    };
    let listen = match args.master_port.parse::<u16>() {
        Ok(port) => SocketAddr::from(([0, 0, 0, 0], port)),
        Err(_) => args.master_port.parse().with_context(|| {
            format!(
                "--master-port {:?} is neither a port nor IP:PORT",
                args.master_port
            )
        })?,
    };
    let results = args.results_dir.clone().unwrap_or_else(|| {
        tasks
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."))
            .join("results")
    });
    let discovery_ports = if args.discovery_ports.is_empty() {
        vec![9999, 55001]
    } else {
        args.discovery_ports.clone()
    };
    let allow = if args.master_allow.is_empty() {
        teia_jobs::master::default_allow()
    } else {
        args.master_allow.clone()
    };
    let master = teia_jobs::master::start(teia_jobs::master::MasterConfig {
        tasks: tasks.to_owned(),
        results,
        listen,
        discovery_ports,
        allow,
        local,
    })
    .await?;
    Ok(master.1)
}

/// Whether this node may run other nodes' code: with a working sandbox, or when told to
/// without (`--unsandboxed`, said loudly). Without either, it says that it runs only its
/// own submissions.
fn sandboxed_or_allowed(isolation: &teia_jobs::runner::Isolation, unsandboxed: bool) -> bool {
    crate::commands::warn_if_root();
    if *isolation != teia_jobs::runner::Isolation::Limits {
        return true;
    }
    if unsandboxed {
        tracing::warn!(
            "--unsandboxed: no working sandbox here, and this node runs other nodes' test \
             modules and script tasks with everything this user can reach"
        );
    } else {
        tracing::warn!(
            "no working sandbox here (install bubblewrap): this node runs only what is submitted \
             to it, unsandboxed, and no other node's modules or tasks (--unsandboxed to run them)"
        );
    }
    unsandboxed
}

/// Starts the job engine when Python with pytest is here (required with `--http`), and the
/// HTTP API when asked; returns the engine and what stops the API.
pub(super) async fn start_jobs(
    args: &NodeArgs,
    data_dir: &std::path::Path,
    peer_id: &str,
    handle: &NodeHandle,
    trusted: Vec<teia_core::identity::PublicKey>,
    master: Option<teia_jobs::master::MasterHandle>,
) -> anyhow::Result<(
    Option<teia_jobs::engine::Engine>,
    Option<tokio::sync::oneshot::Sender<()>>,
)> {
    let python = teia_jobs::runner::resolve_python(&args.python);
    let found = match teia_jobs::runner::find_python(&python).await {
        Ok(found) => found,
        Err(e) if args.http.is_some() => bail!("--http needs Python 3 with pytest: {e}"),
        Err(e) => {
            tracing::warn!("this node runs no test modules and no script tasks: {e}");
            return Ok((None, None));
        }
    };
    let modules = found.pytest.is_some();
    match (&found.pytest, &args.http) {
        (Some(pytest), _) => tracing::info!(python = %found.version, %pytest, "job engine's Python"),
        (None, Some(_)) => bail!(
            "--http needs Python 3 with pytest: {} has no pytest; install it (pip install pytest, or apt-get install python3-pytest)",
            python.display()
        ),
        (None, None) => tracing::warn!(
            python = %found.version,
            "this node runs script tasks but no test modules: {} has no pytest",
            python.display()
        ),
    }
    let python = found.executable;
    let listen = handle.listen_addr();
    let address = listen
        .map(|a| {
            if a.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], a.port())).to_string()
            } else {
                a.to_string()
            }
        })
        .unwrap_or_else(|| peer_id.to_owned());
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let jobs_dir = node_file(data_dir, peer_id, "jobs");
    let isolation = teia_jobs::runner::Isolation::detect();
    let config = teia_jobs::engine::EngineConfig {
        dir: jobs_dir.clone(),
        node: peer_id.to_owned(),
        address: address.clone(),
        python,
        workers,
        limits: teia_jobs::runner::Limits {
            timeout: Duration::from_secs(args.module_timeout.max(1)),
            ..teia_jobs::runner::Limits::default()
        },
        others: sandboxed_or_allowed(&isolation, args.unsandboxed),
        verify: args.verify,
        keep_finished: args.keep_evaluations,
        git_schemes: std::iter::once("https".to_owned())
            .chain(args.allow_git_schemes.iter().cloned())
            .collect(),
        isolation,
        modules,
    };
    let cluster = teia_jobs::remote::ClusterConfig {
        node: handle.clone(),
        trusted,
        secret: args.cluster_secret.clone(),
        scripts: master.clone(),
    };
    let engine = teia_jobs::engine::Engine::start(config, Some(cluster))?;

    let Some(addr) = &args.http else {
        return Ok((Some(engine), None));
    };
    let listener = teia_http::bind(addr)
        .await
        .with_context(|| format!("cannot serve the HTTP API on {addr}"))?;
    let bound = listener.local_addr()?;
    let token = teia_http::guard::load_or_create_token(data_dir)
        .with_context(|| format!("cannot keep the HTTP API's token in {}", data_dir.display()))?;
    tracing::info!(%bound, "HTTP API listening");
    if !bound.ip().is_loopback() {
        tracing::warn!(
            %bound,
            "the HTTP API is reachable from other machines: their requests need the node's token (`teia token` prints it; send it as Authorization: Bearer TOKEN)"
        );
    }
    let viewer = engine.clone();
    let network: teia_http::NetworkView = std::sync::Arc::new(move || {
        let engine = viewer.clone();
        Box::pin(async move { engine.network().await })
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = engine.clone();
    tokio::spawn(async move {
        let stop = async {
            let _ = stopped.await;
        };
        if let Err(e) = teia_http::serve(
            listener,
            teia_http::Services {
                engine: served,
                master,
            },
            network,
            jobs_dir.join("uploads"),
            token,
            stop,
        )
        .await
        {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
    Ok((Some(engine), Some(stop)))
}
