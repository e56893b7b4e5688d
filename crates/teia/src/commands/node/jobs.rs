//! The job engine of `teia node`: the script jobs' master and the engine with its HTTP API.
//! What they listen on is bound, and their Python checked, before the node links to anyone
//! ([`prepare`]); they start once the node is up ([`start_jobs`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use teia_node::node::NodeHandle;

use crate::cli::NodeArgs;
use crate::commands::node_file;

/// What `teia node` makes ready before it links to anyone: the job engine's Python, the
/// HTTP API's listener and the script jobs' master with its ports. An address in use or a
/// missing Python stops the node here, at once, before anything else has started.
pub(super) struct Prepared {
    /// The Python that runs test modules and script tasks, when there is one.
    python: Option<teia_jobs::runner::FoundPython>,
    /// The HTTP API's listener (`--http`).
    http: Option<tokio::net::TcpListener>,
    /// The script jobs' master (`--tasks-dir`), already listening.
    pub(super) master: Option<teia_jobs::master::MasterHandle>,
}

/// Finds Python (with pytest when `--http` asks for it), binds the HTTP API and starts the
/// script jobs' master.
pub(super) async fn prepare(
    args: &NodeArgs,
    peer_id: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<Prepared> {
    let python = teia_jobs::runner::resolve_python(&args.python);
    let found = match teia_jobs::runner::find_python(&python).await {
        Ok(found) => Some(found),
        Err(e) if args.http.is_some() => bail!("--http needs Python 3 with pytest: {e}"),
        Err(e) => {
            tracing::warn!("this node runs no test modules and no script tasks: {e}");
            None
        }
    };
    if args.http.is_some() && found.as_ref().is_some_and(|f| f.pytest.is_none()) {
        bail!(
            "--http needs Python 3 with pytest: {} has no pytest; install it (pip install pytest, or apt-get install python3-pytest)",
            python.display()
        );
    }
    let http = match &args.http {
        Some(addr) => Some(
            teia_http::bind(addr)
                .await
                .with_context(|| format!("cannot serve the HTTP API on {addr} (--http)"))?,
        ),
        None => None,
    };
    let master = match &args.tasks_dir {
        Some(tasks) => Some(
            start_master(
                args,
                peer_id,
                tasks,
                &node_file(data_dir, peer_id, "tasks"),
                found.as_ref(),
            )
            .await
            .context("cannot start the script jobs' master (--tasks-dir)")?,
        ),
        None => None,
    };
    Ok(Prepared {
        python: found,
        http,
        master,
    })
}

/// Starts the script jobs' master on `tasks`, with the node's own workers (which keep their
/// files in `dir`) when it has Python.
async fn start_master(
    args: &NodeArgs,
    peer_id: &str,
    tasks: &std::path::Path,
    dir: &std::path::Path,
    python: Option<&teia_jobs::runner::FoundPython>,
) -> anyhow::Result<teia_jobs::master::MasterHandle> {
    let slots = args.task_workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let local = match (slots, python) {
        (0, _) => None,
        (_, None) => {
            tracing::warn!(
                "script tasks go to course workers and cluster nodes only: no Python here"
            );
            None
        }
        (slots, Some(found)) => {
            let python = found.executable.clone();
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

/// The job engine of a started node, and its HTTP API when it serves one.
pub(super) struct Jobs {
    /// The engine (none without Python).
    pub(super) engine: Option<teia_jobs::engine::Engine>,
    /// What stops the HTTP API.
    pub(super) http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Where the HTTP API answers, and the dashboard's link (with the token).
    pub(super) http: Option<HttpFacts>,
}

/// Where a node's HTTP API answers.
#[derive(Clone)]
pub(super) struct HttpFacts {
    /// The bound address.
    pub(super) addr: SocketAddr,
    /// The dashboard's link, with the token: opening it logs the browser in.
    pub(super) dashboard: String,
}

/// Starts the job engine when Python is here, and the HTTP API on the listener
/// [`prepare`] bound.
pub(super) async fn start_jobs(
    args: &NodeArgs,
    data_dir: &std::path::Path,
    peer_id: &str,
    handle: &NodeHandle,
    trusted: Vec<teia_core::identity::PublicKey>,
    prepared: Prepared,
    node_services: teia_http::api::NodeServices,
) -> anyhow::Result<Jobs> {
    let Prepared {
        python,
        http,
        master,
    } = prepared;
    let Some(found) = python else {
        return Ok(Jobs {
            engine: None,
            http_stop: None,
            http: None,
        });
    };
    let modules = found.pytest.is_some();
    match &found.pytest {
        Some(pytest) => tracing::info!(python = %found.version, %pytest, "job engine's Python"),
        None => tracing::warn!(
            python = %found.version,
            "this node runs script tasks but no test modules: {} has no pytest",
            found.executable.display()
        ),
    }
    let result_cache = (!args.no_result_cache).then(|| teia_jobs::proto::result_cache::Policy {
        environment: teia_jobs::proto::result_cache::environment(
            &found.version,
            found.pytest.as_deref().unwrap_or("none"),
        ),
        keep_failures: args.cache_failures,
        max_bytes: args.result_cache_mib.saturating_mul(1 << 20),
    });
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
        result_cache,
        rerun_failures: args.rerun_failures,
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

    let Some(listener) = http else {
        return Ok(Jobs {
            engine: Some(engine),
            http_stop: None,
            http: None,
        });
    };
    let bound = listener.local_addr()?;
    let seed000 = match &args.pytest_port {
        Some(given) => Some(
            start_seed000_members(given, bound, &jobs_dir, &engine)
                .await
                .with_context(|| {
                    format!("cannot take seed 000 nodes on {given} (--pytest-port)")
                })?,
        ),
        None => None,
    };
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
    let link_host = if bound.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], bound.port()))
    } else {
        bound
    };
    let dashboard = format!("http://{link_host}/?token={token}");
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
                seed000,
                node: Some(node_services),
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
    Ok(Jobs {
        engine: Some(engine),
        http_stop: Some(stop),
        http: Some(HttpFacts {
            addr: bound,
            dashboard,
        }),
    })
}

/// Binds `--pytest-port` and starts taking seed 000's nodes; they reach the HTTP API on
/// `http`'s port at the advertised address.
async fn start_seed000_members(
    given: &str,
    http: SocketAddr,
    jobs_dir: &std::path::Path,
    engine: &teia_jobs::engine::Engine,
) -> anyhow::Result<teia_jobs::seed000_members::MembersHandle> {
    let bind: SocketAddr = match given.parse::<u16>() {
        Ok(port) => SocketAddr::from(([0, 0, 0, 0], port)),
        Err(_) => given
            .parse()
            .with_context(|| format!("{given:?} is neither a port nor IP:PORT"))?,
    };
    let advertise_ip = if !bind.ip().is_unspecified() {
        bind.ip()
    } else if !http.ip().is_unspecified() {
        http.ip()
    } else {
        bail!(
            "the HTTP API and the UDP port listen on every address: say which one seed 000 \
             nodes reach this node at, --pytest-port IP:PORT"
        );
    };
    let config = teia_jobs::seed000_members::MembersConfig {
        bind,
        advertise: SocketAddr::new(advertise_ip, bind.port()),
        api_port: http.port(),
        dir: jobs_dir.join("seed000"),
    };
    Ok(teia_jobs::seed000_members::start(config, engine.clone()).await?)
}
