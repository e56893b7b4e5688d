//! Command-line arguments as typed by the user (clap). Validation into the settings each
//! command runs with happens in `commands`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The version `teia --version` prints: the crate's, and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TEIA_COMMIT"),
    ")"
);

/// Examples under `teia --help`.
const EXAMPLES: &str = "\
Examples:
  teia node --name alice             a node and its chat shell (in another terminal:
                                     teia node --name bob, then /msg alice hi)
  teia send photo.jpg                send one file; the other side runs the printed
                                     `teia receive 174-cider-chimney` line
  teia node --name judge --http 5001 serve evaluations; then: teia eval submit work.zip
  teia status                        what the nodes of this machine are doing

Every flag can also be set by an environment variable (shown as [env: ...]); a flag on the
command line wins. `teia COMMAND --help` tells more of each command.";

/// Examples under `teia node --help`.
const NODE_EXAMPLES: &str = "\
Examples:
  teia node --name alice                          chat with the nodes of this machine and LAN
  teia node --name bob --peer 10.0.0.5:7000       link to a node on another network
  teia node --name alice --share ~/Music          share a folder; others /search and /get
  teia node --name judge --http 5001              evaluations over HTTP (teia eval, curl)
  teia node --name boss --tasks-dir tasks --http 5002
                                                  script jobs (teia job submit DIR)

In the chat shell, /help lists the commands; /quit or Ctrl-D stops the node.";

/// teia: one peer-to-peer node for chat, file sharing and distributed jobs.
#[derive(Debug, Parser)]
#[command(name = "teia", version = VERSION, about, long_about = None, propagate_version = true,
          after_help = EXAMPLES)]
pub struct Cli {
    /// Log level or filter (error, warn, info, debug, trace, or a RUST_LOG-style filter such
    /// as `teia_rendezvous=debug`). Without it, RUST_LOG is used, else `info`.
    #[arg(long, global = true, env = "TEIA_LOG", value_name = "LEVEL")]
    pub log: Option<String>,

    /// Append logs to this file instead of standard error.
    #[arg(long, global = true, env = "TEIA_LOG_FILE", value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a rendezvous server: peers register `name@namespace` and discover each other.
    Rendezvous(RendezvousArgs),
    /// Talk to a rendezvous server once: register, discover or unregister, and print the answer.
    #[command(subcommand)]
    Rdv(RdvCommand),
    /// Run a peer node: links to other peers, relays for them, and opens the chat shell
    /// (or, with --json, reads commands on stdin and prints one JSON event per line).
    #[command(after_help = NODE_EXAMPLES)]
    Node(Box<NodeArgs>),
    /// Print a node's public key (its identity; created on the node's first start).
    Id(IdArgs),
    /// Print the HTTP API's token of a data directory (made if it has none): requests to a
    /// node's HTTP API from another machine or from a web page need it, as
    /// `Authorization: Bearer TOKEN` (`teia eval` and `teia job` send it, from `TEIA_TOKEN`
    /// or this data directory).
    Token(TokenArgs),
    /// Run an index server: peers join with the files they share and search them by name
    /// (a central index, as in Napster; plain Python peers of that protocol can use it too).
    Index(IndexArgs),
    /// Submit an evaluation to a node's HTTP API and follow it; or show or list evaluations.
    Eval(EvalArgs),
    /// Send one file without running a node: prints a short code and a ticket, then serves
    /// the file until interrupted.
    Send(SendArgs),
    /// Fetch the file of a code or ticket printed by `teia send`, verified, and exit.
    Receive(ReceiveArgs),
    /// Submit script jobs (a `main.py` run over its `input.csv`) to a node's HTTP API and
    /// follow them; or show one.
    Job(JobArgs),
    /// Work for the course programs' job networks, their tasks run in the sandbox: a
    /// master/worker program's master found by UDP broadcast (--master-compat; tasks are
    /// `main.py input.csv`), or a distributed pytest network of seed 000 nodes joined
    /// through one of them (--pytest-compat HOST:PORT; tasks are test modules).
    Worker(WorkerArgs),
    /// Say what the nodes of this machine's data directory are doing: peers, downloads,
    /// evaluations and jobs, their addresses, and where their data and log are.
    Status(StatusArgs),
    /// Remove a stopped node's state (messages, shares, downloads under way, evaluations
    /// and jobs), keeping its identity unless --identity; with --all, the whole data
    /// directory.
    Reset(ResetArgs),
    /// Print a completion script for a shell, e.g. `teia completions bash >
    /// ~/.local/share/bash-completion/completions/teia`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Flags of `teia status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The data directory whose nodes to show (default: the platform's data directory,
    /// e.g. ~/.local/share/teia).
    #[arg(long, env = "TEIA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print one JSON object per node instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `teia reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The node's name; without it, the only node of the data directory.
    #[arg(long, env = "TEIA_NAME")]
    pub name: Option<String>,

    #[command(flatten)]
    pub home: NodeHome,

    /// Remove the node's identity (its key) too: it comes back as a new node, which its
    /// peers, having pinned the old key, refuse under the same name until they /forget it.
    #[arg(long)]
    pub identity: bool,

    /// Remove the whole data directory: every node, the local rendezvous's records, the
    /// HTTP API's token.
    #[arg(long, conflicts_with_all = ["name", "identity"])]
    pub all: bool,

    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long, short)]
    pub yes: bool,
}

/// Flags of `teia job`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The node's HTTP API (`http://HOST:PORT`, `HOST:PORT` or a port on 127.0.0.1); the
    /// node needs --tasks-dir.
    #[arg(
        long,
        env = "TEIA_NODE",
        default_value = "127.0.0.1:5001",
        global = true
    )]
    pub node: String,
    /// Print JSON lines instead of a progress bar and a summary.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: JobCommand,
}

/// `teia job` commands.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit tasks (ZIPs, or folders zipped for you, each with main.py and input.csv) and
    /// follow them to the end.
    Submit {
        /// ZIPs or folders.
        #[arg(required = true)]
        targets: Vec<PathBuf>,
        /// Cut each task's input.csv into N row ranges (header kept), run as N tasks whose
        /// stdouts are printed concatenated in order.
        #[arg(long, value_name = "N")]
        split_csv: Option<usize>,
        /// Save each job's result ZIP (stdout, stderr, result.json, output files) in DIR,
        /// as result_<job>.zip.
        #[arg(long, value_name = "DIR")]
        results: Option<PathBuf>,
    },
    /// Show one job.
    Status {
        /// Its id.
        id: String,
    },
    /// List the node's jobs: how many are queued, running and done, and each one's status.
    List,
}

/// Flags of `teia worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Speak the master/worker protocol of the Python masters that hand out `main.py` tasks
    /// over TCP after a UDP broadcast.
    #[arg(long, conflicts_with = "pytest_compat")]
    pub master_compat: bool,

    /// Join the distributed pytest network (seed 000's nodes) through the node whose UDP
    /// address this is (their `HOST`), and run the test modules it hands out.
    #[arg(long, value_name = "HOST:PORT")]
    pub pytest_compat: Option<String>,

    /// UDP port to bind with --pytest-compat (0: any free port, shown at start).
    #[arg(long, default_value_t = 0, value_name = "PORT")]
    pub udp_port: u16,

    /// Address the other nodes reach this worker at, with --pytest-compat (default: this
    /// machine's address on the route to HOST).
    #[arg(long, value_name = "IP")]
    pub advertise_ip: Option<std::net::IpAddr>,

    /// Modules run at once, with --pytest-compat (default: the number of cores).
    #[arg(long, value_name = "N")]
    pub slots: Option<usize>,

    /// UDP port the master answers discovery on (repeatable; default 9999 and 55001).
    #[arg(long = "discovery-port", value_name = "PORT")]
    pub discovery_ports: Vec<u16>,

    /// Where discovery is broadcast (repeatable; 127.255.255.255 stays on this machine).
    #[arg(long, value_name = "IP", default_value = "255.255.255.255")]
    pub broadcast: Vec<std::net::IpAddr>,

    /// This worker's id, as the master sees it (default: a new one each start).
    #[arg(long, value_name = "ID")]
    pub peer_id: Option<String>,

    /// Python that runs the tasks.
    #[arg(
        long,
        env = "TEIA_PYTHON",
        default_value = "python3",
        value_name = "PATH"
    )]
    pub python: PathBuf,

    /// Seconds a task may run; then it is killed with its process group (default: 300, and
    /// 35 with --pytest-compat, whose holders give a module to another after 40 s).
    #[arg(long, value_name = "SECONDS")]
    pub task_timeout: Option<u64>,

    /// Run the master's tasks even without a working sandbox (bubblewrap): they could then
    /// read and change everything this user can.
    #[arg(long, env = "TEIA_UNSANDBOXED")]
    pub unsandboxed: bool,

    /// Where the worker keeps its files (tasks run in `worker/work/` under it).
    #[arg(long, env = "TEIA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Flags of `teia eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The node's HTTP API (`http://HOST:PORT`, `HOST:PORT` or a port on 127.0.0.1).
    #[arg(
        long,
        env = "TEIA_NODE",
        default_value = "127.0.0.1:5001",
        global = true
    )]
    pub node: String,
    /// Print JSON lines instead of a progress bar and tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: EvalCommand,
}

/// `teia eval` subcommands.
#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Submit a ZIP, a folder (zipped for you) or git URLs, and follow it to its grades.
    Submit {
        /// `PATH.zip`, a folder, or one or more git URLs.
        #[arg(required = true)]
        targets: Vec<String>,
        /// Token for cloning private repositories.
        #[arg(long, env = "TEIA_GIT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Exit with an error only when the grade (0 to 20) is under GRADE. Without it, the
        /// command fails when any test failed or errored.
        #[arg(long, value_name = "GRADE", value_parser = grade)]
        fail_under: Option<f64>,
        /// Run every module, even those whose results the node has from an earlier run of
        /// the same files.
        #[arg(long)]
        no_cache: bool,
        /// Run each module whole, never split over several workers.
        #[arg(long)]
        no_split: bool,
        /// Times failed tests run again to find the flaky ones (0: never; default: the
        /// node's `--rerun-failures`).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=i64::from(teia_jobs::engine::MAX_RERUNS)))]
        rerun_failures: Option<u32>,
    },
    /// Show one evaluation.
    Status {
        /// Its id.
        id: u64,
    },
    /// List the evaluations the node knows.
    List,
}

/// Flags of `teia index`.
#[derive(Debug, Args)]
pub struct IndexArgs {
    /// Address and port to listen on.
    #[arg(
        long,
        env = "TEIA_LISTEN",
        default_value = "0.0.0.0:9000",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// Directory for the records (created if missing). Default: the platform's data
    /// directory, e.g. ~/.local/share/teia.
    #[arg(long, env = "TEIA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seconds a peer's record is kept after its connection is gone (it is kept if the
    /// peer joins again within that time).
    #[arg(
        long,
        env = "TEIA_INDEX_GRACE",
        default_value_t = 60,
        value_name = "SECONDS"
    )]
    pub grace: u64,
    /// Mebibytes of memory the records and their search index may take (one source address
    /// a quarter of it); a JOIN or UPDATE beyond is refused (`full`).
    #[arg(
        long,
        env = "TEIA_INDEX_MAX_MEMORY",
        default_value_t = 256,
        value_name = "MIB"
    )]
    pub max_memory: usize,
    /// Mebibytes the records' database may take; a JOIN or UPDATE beyond is refused
    /// (`full`).
    #[arg(
        long,
        env = "TEIA_INDEX_MAX_DISK",
        default_value_t = 512,
        value_name = "MIB"
    )]
    pub max_disk: u64,
    /// Peers of one source IP address the index holds at most; a JOIN beyond is refused
    /// (`busy`), after dropping that address's records whose connection is gone.
    #[arg(
        long,
        env = "TEIA_INDEX_MAX_PEERS_PER_IP",
        default_value_t = 64,
        value_name = "N"
    )]
    pub max_peers_per_ip: usize,
}

/// Flags of `teia send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The file to send.
    pub path: PathBuf,
    /// Address to serve it on (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0", value_name = "ADDR")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub codes: CodeRendezvous,
    /// Print the ticket only, no short code.
    #[arg(long)]
    pub no_code: bool,
    /// Print JSON lines (the ticket and code, then one per stream served) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `teia receive`.
#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// The short code (like 7-maple-otter) or the ticket `teia send` printed.
    pub ticket: String,
    #[command(flatten)]
    pub codes: CodeRendezvous,
    /// Folder to put the file in.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub to: PathBuf,
    /// Print JSON events (download_progress, download_done, download_failed) instead of a
    /// progress bar.
    #[arg(long)]
    pub json: bool,
}

/// Where `teia send` and `teia receive` meet over a short code: a rendezvous, and the LAN.
#[derive(Debug, Args)]
pub struct CodeRendezvous {
    /// Rendezvous where a short code's number is registered by the sender and looked up by
    /// the receiver (on this machine's, if nothing answers, `teia send` runs it).
    #[arg(
        long,
        env = "TEIA_RENDEZVOUS",
        default_value = "127.0.0.1:8080",
        value_name = "HOST:PORT"
    )]
    pub rendezvous: String,
    /// Do not look for (or answer) the code's number on the LAN by UDP broadcast.
    #[arg(long, env = "TEIA_NO_LAN", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_lan: bool,
    /// UDP port of LAN discovery (the nodes' own).
    #[arg(long, env = "TEIA_LAN_PORT", value_name = "PORT", default_value_t = teia_core::lan::LAN_PORT)]
    pub lan_port: u16,
    /// Address LAN broadcasts go to (repeatable; 127.255.255.255 keeps them on this
    /// machine). Default: 255.255.255.255 and each interface's broadcast address.
    #[arg(long = "lan-broadcast", value_name = "IP")]
    pub lan_broadcast: Vec<IpAddr>,
}

impl CodeRendezvous {
    /// LAN discovery's settings, unless it is off.
    pub fn lan(&self) -> Option<teia_node::lan::LanSettings> {
        (!self.no_lan).then(|| teia_node::lan::LanSettings {
            port: self.lan_port,
            broadcast: self.lan_broadcast.clone(),
        })
    }
}

/// Flags of `teia token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The data directory whose token to print (default: the platform's data directory,
    /// e.g. ~/.local/share/teia).
    #[arg(long, env = "TEIA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Flags of `teia id`.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The node's name; without it, the only node of the data directory.
    #[arg(long, env = "TEIA_NAME")]
    pub name: Option<String>,

    #[command(flatten)]
    pub home: NodeHome,
}

/// Where a node lives: its namespace and its data directory (`teia node` and `teia id`).
#[derive(Debug, Args)]
pub struct NodeHome {
    /// Your namespace (room).
    #[arg(
        long,
        env = "TEIA_NAMESPACE",
        default_value = "teia",
        value_name = "NS"
    )]
    pub namespace: String,

    /// Directory for the node's data: `nodes/NAME@NS.key` (its secret key),
    /// `nodes/NAME@NS.sqlite3` (messages awaiting their ACK or not yet shown, ids already
    /// delivered, pinned keys), and the embedded rendezvous's records. Default: the
    /// platform's data directory, e.g. ~/.local/share/teia.
    #[arg(long, env = "TEIA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl NodeHome {
    /// The peer id `name@namespace`, checked.
    pub fn peer_id(&self, name: &str) -> anyhow::Result<String> {
        let peer_id = format!("{name}@{}", self.namespace);
        if !teia_core::overlay::is_peer_id(&peer_id) {
            anyhow::bail!(
                "--name and --namespace must be 1 to 64 characters without '@', '#', '*' or spaces"
            );
        }
        Ok(peer_id)
    }
}

/// Flags of `teia node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Your name; your peer id is NAME@NAMESPACE.
    #[arg(long, env = "TEIA_NAME")]
    pub name: String,

    #[command(flatten)]
    pub home: NodeHome,

    /// Port to accept links on (0: any free port, shown at start).
    #[arg(help_heading = "Network", long, env = "TEIA_PORT", default_value_t = 0)]
    pub port: u16,

    /// Address to accept links on.
    #[arg(
        help_heading = "Network",
        long,
        env = "TEIA_LISTEN_IP",
        default_value = "0.0.0.0",
        value_name = "IP"
    )]
    pub listen_ip: std::net::IpAddr,

    /// Accept no links: only dial out (as a peer behind NAT does).
    #[arg(help_heading = "Network", long)]
    pub no_listen: bool,

    /// Turn LAN discovery off (UDP broadcasts that find the namespace's nodes on this LAN
    /// with no rendezvous and no --peer).
    #[arg(help_heading = "Network", long, env = "TEIA_NO_LAN", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_lan: bool,

    /// UDP port of LAN discovery (the same on every node of the LAN).
    #[arg(help_heading = "Network", long, env = "TEIA_LAN_PORT", value_name = "PORT", default_value_t = teia_core::lan::LAN_PORT)]
    pub lan_port: u16,

    /// Address LAN announcements are broadcast to (repeatable; 127.255.255.255 keeps them
    /// on this machine). Default: 255.255.255.255 and each network interface's broadcast
    /// address.
    #[arg(help_heading = "Network", long = "lan-broadcast", value_name = "IP")]
    pub lan_broadcast: Vec<IpAddr>,

    /// Rendezvous server to register with and discover peers from. Without it and without
    /// --peer, the node uses --local-rendezvous (127.0.0.1:8080), and starts a rendezvous
    /// there itself if none answers.
    #[arg(
        help_heading = "Network",
        long,
        env = "TEIA_RENDEZVOUS",
        value_name = "HOST:PORT"
    )]
    pub rendezvous: Option<String>,

    /// Where a node given neither --rendezvous nor --peer looks for a rendezvous, and starts
    /// one when none answers (nodes of one machine meet there; another address keeps a
    /// separate network on the same machine).
    #[arg(
        help_heading = "Network",
        long,
        env = "TEIA_LOCAL_RENDEZVOUS",
        default_value = "127.0.0.1:8080",
        value_name = "IP:PORT"
    )]
    pub local_rendezvous: SocketAddr,

    /// A peer to dial at start and keep connected (repeatable); no rendezvous needed.
    #[arg(help_heading = "Network", long = "peer", value_name = "HOST:PORT")]
    pub peers: Vec<String>,

    /// A peer of the Node.js peer-exchange chat (`PORT=3001 npm start`) to link with at start
    /// and keep linked (repeatable). Such peers that dial this node are taken without it.
    #[arg(help_heading = "Network", long = "pex-peer", value_name = "HOST:PORT")]
    pub pex_peers: Vec<String>,

    /// Namespace the peer-exchange chat's peers are placed in: their lines go to
    /// #NAMESPACE, and they see what is sent there and to everyone (default: the node's).
    #[arg(help_heading = "Network", long, value_name = "NAMESPACE")]
    pub pex_namespace: Option<String>,

    /// Refuse peers that do not complete the encrypted, authenticated handshake (chat
    /// programs that speak plain JSON lines are then refused).
    #[arg(help_heading = "Network", long, env = "TEIA_REQUIRE_ENCRYPTION")]
    pub require_encryption: bool,

    /// Share a folder or file (repeatable; also /share). Shared folders are remembered.
    #[arg(help_heading = "Sharing files", long = "share", value_name = "PATH")]
    pub shares: Vec<PathBuf>,

    /// Who may download what you share: all, ask (you /approve each requester), trusted
    /// (only --trust keys) or none.
    #[arg(
        help_heading = "Sharing files",
        long,
        env = "TEIA_APPROVE",
        default_value = "all",
        value_name = "POLICY"
    )]
    pub approve: teia_files::Approval,

    /// A trusted key (repeatable), as `teia id` prints it: `--approve trusted` serves it, and
    /// the job engine runs its test modules and gives it modules to run.
    #[arg(help_heading = "Sharing files", long = "trust", value_name = "KEY")]
    pub trusted: Vec<String>,

    /// Bytes per second this node serves at most, all downloaders together (no limit by
    /// default).
    #[arg(
        help_heading = "Sharing files",
        long,
        env = "TEIA_UPLOAD_LIMIT",
        value_name = "BYTES_PER_SECOND"
    )]
    pub upload_limit: Option<u64>,

    /// An index server to join with the files you share (`teia index`, or a Napster-style
    /// Python index);
    /// /search asks it too.
    #[arg(
        help_heading = "Sharing files",
        long,
        env = "TEIA_INDEX",
        value_name = "HOST:PORT"
    )]
    pub index: Option<String>,

    /// Folder downloads go to unless /get names one.
    #[arg(
        help_heading = "Sharing files",
        long,
        env = "TEIA_DOWNLOAD_DIR",
        default_value = ".",
        value_name = "DIR"
    )]
    pub download_dir: PathBuf,

    /// Serve the HTTP API (evaluations of pytest suites, script jobs, the node's services,
    /// live events, metrics) and the dashboard on this address; a bare port means
    /// 127.0.0.1. The dashboard's link, with the token, is printed at start. Needs Python 3
    /// with pytest.
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_HTTP",
        value_name = "ADDR"
    )]
    pub http: Option<String>,

    /// Let the distributed pytest network's own nodes (seed 000's) join this node and run
    /// modules of its evaluations: the UDP address they send CONNECT to (a bare port: every
    /// address, advertised as the HTTP API's address, which must then be a specific one).
    /// Needs --http.
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_PYTEST_PORT",
        value_name = "[IP:]PORT",
        requires = "http"
    )]
    pub pytest_port: Option<String>,

    /// A secret shared by the nodes of your cluster: they run each other's test modules
    /// (as they do for `--trust` keys).
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_CLUSTER_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub cluster_secret: Option<String>,

    /// Python that runs script tasks, and test modules when it has pytest.
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_PYTHON",
        default_value = "python3",
        value_name = "PATH"
    )]
    pub python: PathBuf,

    /// Test modules run at once on this node (default: its cores).
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_WORKERS",
        value_name = "N"
    )]
    pub workers: Option<usize>,

    /// The share of module results (0 to 1) run again on another trusted node, chosen at
    /// random as each arrives: a disagreement marks the module disputed (both nodes named
    /// in `GET /evaluation/<id>` and the log), and the owner's own run stands.
    #[arg(help_heading = "Evaluations (HTTP API)", long, env = "TEIA_VERIFY", default_value_t = 0.0, value_name = "FRACTION", value_parser = fraction)]
    pub verify: f64,

    /// Run every module of every evaluation, never reusing the result of an earlier run of
    /// the same module on the same files (the result cache is emptied).
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_NO_RESULT_CACHE"
    )]
    pub no_result_cache: bool,

    /// Reuse cached results with failures or errors too (by default a module that failed
    /// runs again).
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_CACHE_FAILURES",
        conflicts_with = "no_result_cache"
    )]
    pub cache_failures: bool,

    /// Mebibytes of module results the cache keeps (the oldest evicted past it).
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_RESULT_CACHE_MIB",
        default_value_t = 64,
        value_name = "MIB"
    )]
    pub result_cache_mib: u64,

    /// Times a module's failed tests run again (alone, on another node when the cluster
    /// has one) for submissions that do not say: a test that then passes is reported
    /// flaky, and counts as it first did. 0 turns reruns off.
    #[arg(help_heading = "Evaluations (HTTP API)", long, env = "TEIA_RERUN_FAILURES", default_value_t = teia_jobs::engine::RERUN_FAILURES, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=i64::from(teia_jobs::engine::MAX_RERUNS)))]
    pub rerun_failures: u32,

    /// Finished evaluations kept (with their results); past it, the oldest finished are
    /// forgotten, their folders removed, when a new one comes.
    #[arg(help_heading = "Evaluations (HTTP API)", long, env = "TEIA_KEEP_EVALUATIONS", default_value_t = teia_jobs::engine::KEEP_FINISHED, value_name = "N")]
    pub keep_evaluations: usize,

    /// A URL scheme of git repositories submitted to clone besides `https` (repeatable:
    /// `http`, `ssh`, `git`, or `file`, which also allows local paths: the node's own
    /// repositories).
    #[arg(help_heading = "Evaluations (HTTP API)", long = "allow-git-scheme", value_name = "SCHEME", value_parser = ["http", "ssh", "git", "file"])]
    pub allow_git_schemes: Vec<String>,

    /// Run other nodes' test modules and script tasks even without a working sandbox
    /// (bubblewrap): they could then read and change everything this user can. Without
    /// it, such a node runs only what is submitted to it.
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_UNSANDBOXED"
    )]
    pub unsandboxed: bool,

    /// Seconds a test module may run before it is killed (its finished tests are kept).
    #[arg(
        help_heading = "Evaluations (HTTP API)",
        long,
        env = "TEIA_MODULE_TIMEOUT",
        default_value_t = 120,
        value_name = "SECONDS"
    )]
    pub module_timeout: u64,

    /// Run script jobs: hand out the ZIPs dropped in this folder (or sent with `teia job
    /// submit`: `main.py` and its inputs) to this node's workers, the nodes of its cluster
    /// and master/worker programs' workers on the LAN, and write `result_<task>.zip` to
    /// --results-dir.
    #[arg(
        help_heading = "Script jobs",
        long,
        env = "TEIA_TASKS_DIR",
        value_name = "DIR"
    )]
    pub tasks_dir: Option<PathBuf>,

    /// Where script jobs' results go (default: `results` beside --tasks-dir).
    #[arg(
        help_heading = "Script jobs",
        long,
        env = "TEIA_RESULTS_DIR",
        value_name = "DIR"
    )]
    pub results_dir: Option<PathBuf>,

    /// TCP address LAN workers connect to (a bare port means every address; workers learn it
    /// from the discovery answer).
    #[arg(
        help_heading = "Script jobs",
        long,
        env = "TEIA_MASTER_PORT",
        value_name = "[IP:]PORT",
        default_value = "0"
    )]
    pub master_port: String,

    /// A network LAN workers may connect from, `ADDR/PREFIX` (repeatable); others are
    /// refused at accept and get no discovery answer. Default: the networks of this
    /// machine's interfaces, and loopback. Everyone: `--master-allow 0.0.0.0/0
    /// --master-allow ::/0`.
    #[arg(
        help_heading = "Script jobs",
        long = "master-allow",
        value_name = "CIDR"
    )]
    pub master_allow: Vec<teia_jobs::proto::seed001::Cidr>,

    /// Tasks of --tasks-dir this node runs itself at once (default: its cores; 0: they go
    /// to LAN workers and to the nodes of its cluster only).
    #[arg(
        help_heading = "Script jobs",
        long,
        env = "TEIA_TASK_WORKERS",
        value_name = "N"
    )]
    pub task_workers: Option<usize>,

    /// UDP port answering LAN workers' discovery broadcasts (repeatable; default 9999 and
    /// 55001, the ports known workers broadcast to).
    #[arg(
        help_heading = "Script jobs",
        long = "discovery-port",
        value_name = "PORT"
    )]
    pub discovery_ports: Vec<u16>,

    /// Print one JSON event per line on stdout and read commands from stdin (for scripts).
    #[arg(help_heading = "Output", long)]
    pub json: bool,

    /// Seconds between two PINGs on a link.
    #[arg(
        help_heading = "Limits and timing",
        long,
        env = "TEIA_PING_INTERVAL",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub ping_interval: f64,

    /// Neighbours the node dials on its own (from the rendezvous and peer lists).
    #[arg(
        help_heading = "Limits and timing",
        long,
        env = "TEIA_MAX_NEIGHBOURS",
        default_value_t = 8,
        value_name = "N"
    )]
    pub max_neighbours: usize,

    /// Seconds between two DISCOVERs at the rendezvous.
    #[arg(
        help_heading = "Limits and timing",
        long,
        env = "TEIA_DISCOVER_INTERVAL",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub discover_interval: f64,

    /// Lifetime asked for the rendezvous registration, in seconds (renewed at half of it).
    #[arg(
        help_heading = "Limits and timing",
        long,
        env = "TEIA_REGISTER_TTL",
        default_value_t = 120,
        value_name = "SECONDS"
    )]
    pub register_ttl: u32,

    /// Seconds a SEND is retransmitted for before it is reported undelivered.
    #[arg(
        help_heading = "Limits and timing",
        long,
        env = "TEIA_SEND_DEADLINE",
        default_value_t = 60.0,
        value_name = "SECONDS"
    )]
    pub send_deadline: f64,

    /// Failed dials in a row before a peer's address is given up.
    #[arg(
        help_heading = "Limits and timing",
        long,
        env = "TEIA_RECONNECT_ATTEMPTS",
        default_value_t = 10,
        value_name = "N"
    )]
    pub reconnect_attempts: u32,
}

/// Flags of `teia rendezvous`.
#[derive(Debug, Args)]
pub struct RendezvousArgs {
    /// Address and port to listen on.
    #[arg(
        long,
        env = "TEIA_LISTEN",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// Directory for the record database (created if missing). Default: the platform's data
    /// directory, e.g. ~/.local/share/teia.
    #[arg(long, env = "TEIA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Connections served at once; one more is answered `busy` and closed at once.
    #[arg(long, env = "TEIA_MAX_CONNECTIONS", default_value_t = 1024, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Seconds a connection has to send its request line before it is answered `timeout`.
    #[arg(
        long,
        env = "TEIA_IDLE_TIMEOUT",
        default_value_t = 5.0,
        value_name = "SECONDS"
    )]
    pub idle_timeout: f64,

    /// Requests per second allowed per source IP (burst of the same size); 0 turns the limit
    /// off. Excess connections are answered `rate_limited`.
    #[arg(
        long,
        env = "TEIA_RATE_LIMIT",
        default_value_t = 0,
        value_name = "PER_SECOND"
    )]
    pub rate_limit: u32,

    /// Records held in total; a REGISTER of a new record beyond it is answered `busy`.
    #[arg(
        long,
        env = "TEIA_MAX_RECORDS",
        default_value_t = 100_000,
        value_name = "N"
    )]
    pub max_records: usize,

    /// Records per source IP; a REGISTER of a new record beyond it is answered `over_quota`.
    #[arg(
        long,
        env = "TEIA_MAX_RECORDS_PER_IP",
        default_value_t = 1024,
        value_name = "N"
    )]
    pub max_records_per_ip: usize,
}

/// `teia rdv` subcommands.
#[derive(Debug, Subcommand)]
pub enum RdvCommand {
    /// Register `NAME@NAMESPACE` listening on PORT.
    Register {
        /// Where to reach the server.
        #[command(flatten)]
        target: RdvTarget,
        /// Namespace (room) to register in.
        #[arg(long, value_name = "NS")]
        namespace: String,
        /// Name to register.
        #[arg(long)]
        name: String,
        /// Port your peer listens on.
        #[arg(long)]
        port: u16,
        /// Lifetime of the record in seconds (1 to 86400).
        #[arg(long, default_value_t = 7200)]
        ttl: u32,
    },
    /// List the peers of a namespace, or of every namespace.
    Discover {
        /// Where to reach the server.
        #[command(flatten)]
        target: RdvTarget,
        /// Namespace to list; omit for all.
        #[arg(long, value_name = "NS")]
        namespace: Option<String>,
    },
    /// Remove your records from a namespace (only NAME and/or PORT when given).
    Unregister {
        /// Where to reach the server.
        #[command(flatten)]
        target: RdvTarget,
        /// Namespace of the records.
        #[arg(long, value_name = "NS")]
        namespace: String,
        /// Only the record of this name.
        #[arg(long)]
        name: Option<String>,
        /// Only records of this port.
        #[arg(long)]
        port: Option<u16>,
    },
}

/// Which server to ask and how to print.
#[derive(Debug, Args)]
pub struct RdvTarget {
    /// Rendezvous server as HOST:PORT.
    #[arg(
        long,
        env = "TEIA_RENDEZVOUS",
        default_value = "127.0.0.1:8080",
        value_name = "HOST:PORT"
    )]
    pub server: String,
    /// Print the server's answer line as received instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the connection and for the answer, each.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub timeout: f64,
}

/// A grade from 0 to 20 (`--fail-under`).
fn grade(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=20.0).contains(&value) => Ok(value),
        _ => Err(format!("{text:?} is not a grade from 0 to 20")),
    }
}

/// A fraction from 0 to 1 (`--verify`).
fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("{text:?} is not a fraction from 0 to 1")),
    }
}
