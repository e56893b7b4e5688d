//! Seed 000's own nodes as workers of this node (`teia node --http ADDR --pytest-port
//! [IP:]PORT`): the runtime around [`crate::proto::seed000_members::Members`]. One task owns
//! the state and the UDP socket; the HTTP API reaches it through a [`MembersHandle`] (a
//! bounded command queue, each command answered once): `GET /file/<project_id>` for the
//! projects announced, `POST /task` for results. Leases, renewals and results go through
//! the engine's ledger, as for teia's workers.
//!
//! **Bounds**: [`COMMANDS`] commands queued (an HTTP request past it is answered 503); the
//! projects' ZIPs for their nodes are kept only while their evaluation is under way (in
//! `seed000/` under the engine's folder, emptied at start); the state machine's own bounds
//! ([`crate::proto::seed000_members`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::bundle;
use crate::engine::Engine;
use crate::proto::ledger::ModuleResult;
use crate::proto::seed000::MAX_DATAGRAM;
use crate::proto::seed000_members::{
    course_module, worker_key, MemberAction, MemberNote, Members, Offer, TaskRefusal, LEASE_MS,
};

/// Numbers the ZIPs being made, so that two made at once do not share a file.
static PACKING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Commands from the HTTP API queued at most.
pub const COMMANDS: usize = 64;
/// Time between two looks at the engine's evaluations under way.
const OFFERS_EVERY: Duration = Duration::from_secs(1);

/// Where the UDP side listens and what it advertises.
#[derive(Debug, Clone)]
pub struct MembersConfig {
    /// The UDP address to bind.
    pub bind: SocketAddr,
    /// The UDP address their nodes reach this node at (port 0: the bound port).
    pub advertise: SocketAddr,
    /// The HTTP API's port, given to their nodes as `api_port`.
    pub api_port: u16,
    /// Where the projects' ZIPs for their nodes are made.
    pub dir: PathBuf,
}

/// Why the HTTP API's request was not answered by the members' task.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    /// The result was not counted.
    #[error(transparent)]
    Refused(#[from] TaskRefusal),
    /// The task is stopped or too busy.
    #[error("the seed 000 side is not answering")]
    Unavailable,
}

enum Command {
    File {
        from: IpAddr,
        course_id: String,
        reply: oneshot::Sender<Option<PathBuf>>,
    },
    Result {
        from: IpAddr,
        body: Value,
        reply: oneshot::Sender<Result<(), TaskRefusal>>,
    },
}

/// The HTTP API's way to the members' task.
#[derive(Debug, Clone)]
pub struct MembersHandle {
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File { course_id, .. } => write!(f, "File({course_id})"),
            Self::Result { .. } => write!(f, "Result"),
        }
    }
}

impl MembersHandle {
    /// The ZIP of project `course_id` (top folder `course_id/`), if `from` is a member's
    /// address and the project one announced.
    pub async fn file(
        &self,
        from: IpAddr,
        course_id: &str,
    ) -> Result<Option<PathBuf>, MembersError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .try_send(Command::File {
                from,
                course_id: course_id.to_owned(),
                reply,
            })
            .map_err(|_| MembersError::Unavailable)?;
        answer.await.map_err(|_| MembersError::Unavailable)
    }

    /// Counts a result their node `from` posted.
    pub async fn result(&self, from: IpAddr, body: Value) -> Result<(), MembersError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .try_send(Command::Result { from, body, reply })
            .map_err(|_| MembersError::Unavailable)?;
        Ok(answer.await.map_err(|_| MembersError::Unavailable)??)
    }
}

/// Binds the UDP socket and starts the members' task; it ends when the runtime stops.
pub async fn start(config: MembersConfig, engine: Engine) -> std::io::Result<MembersHandle> {
    let socket = UdpSocket::bind(config.bind).await?;
    let me = if config.advertise.port() == 0 {
        SocketAddr::new(config.advertise.ip(), socket.local_addr()?.port())
    } else {
        config.advertise
    };
    let _ = std::fs::remove_dir_all(&config.dir);
    std::fs::create_dir_all(&config.dir)?;
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let id = format!("{micros}{:05}", micros % 100_000);
    tracing::info!(udp = %me, %id, "seed 000 nodes can join this node");
    let members = Members::new(me, id, config.api_port, micros);
    let (commands, queue) = mpsc::channel(COMMANDS);
    tokio::spawn(run(socket, me, members, engine, config.dir, queue));
    Ok(MembersHandle { commands })
}

async fn run(
    socket: UdpSocket,
    me: SocketAddr,
    mut members: Members,
    engine: Engine,
    dir: PathBuf,
    mut queue: mpsc::Receiver<Command>,
) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut offers_due = Instant::now();
    loop {
        while let Some(action) = members.poll_action() {
            perform(action, &socket, me, &mut members, &engine, &dir).await;
        }
        if Instant::now() >= offers_due {
            offers_due = Instant::now() + OFFERS_EVERY;
            let offers = engine
                .projects_under_way()
                .into_iter()
                .map(|(eval, project, blob)| Offer {
                    eval,
                    project,
                    blob,
                })
                .collect();
            members.set_offers(offers, engine.pending_modules() > 0, Instant::now());
            continue;
        }
        let deadline = members
            .poll_timeout()
            .map_or(offers_due, |t| t.min(offers_due));
        tokio::select! {
            received = socket.recv_from(&mut buffer) => match received {
                Ok((n, from)) => {
                    let datagram = buffer.get(..n).unwrap_or_default();
                    if let Err(e) = members.handle_datagram(Instant::now(), datagram) {
                        tracing::debug!(%from, error = %e, "seed 000 datagram dropped");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "seed 000 socket"),
            },
            () = tokio::time::sleep_until(deadline.into()) => members.handle_timeout(Instant::now()),
            command = queue.recv() => match command {
                None => return,
                Some(Command::File { from, course_id, reply }) => {
                    let offer = members.offer_for(from, &course_id).cloned();
                    let engine = engine.clone();
                    let zip = dir.join(format!("{course_id}.zip"));
                    tokio::task::spawn_blocking(move || {
                        let path = offer.and_then(|offer| project_zip(&engine, &offer, &zip));
                        let _ = reply.send(path);
                    });
                }
                Some(Command::Result { from, body, reply }) => {
                    let answer = members.result(from, &body).and_then(|counted| {
                        let result = ModuleResult {
                            passed: counted.passed,
                            failed: counted.failed,
                            seconds: counted.seconds,
                            node: format!("{} (seed 000)", counted.member),
                            ..ModuleResult::default()
                        };
                        if engine.complete(&counted.lease, &counted.worker, result) {
                            tracing::info!(module = %counted.lease.module, node = %counted.member,
                                passed = counted.passed, failed = counted.failed,
                                "result of a seed 000 node counted");
                            Ok(())
                        } else {
                            Err(TaskRefusal::LeaseLost)
                        }
                    });
                    let _ = reply.send(answer);
                }
            },
        }
    }
}

async fn perform(
    action: MemberAction,
    socket: &UdpSocket,
    me: SocketAddr,
    members: &mut Members,
    engine: &Engine,
    dir: &std::path::Path,
) {
    match action {
        MemberAction::Send(outgoing) => crate::seed000_worker::send(socket, me, &outgoing).await,
        MemberAction::Lease { member } => {
            // Their nodes run whole modules only, and say no test by name.
            let lease = engine.lease_matching(&worker_key(member), LEASE_MS, |path, whole| {
                whole && course_module(path).is_some()
            });
            members.hand(Instant::now(), member, lease);
        }
        MemberAction::Renew { lease, worker } => {
            engine.renew_course(&lease, &worker, LEASE_MS);
        }
        MemberAction::Release { lease, worker } => engine.release_course(&lease, &worker),
        MemberAction::Forget { course_id } => {
            let _ = std::fs::remove_file(dir.join(format!("{course_id}.zip")));
        }
        MemberAction::Note(note) => match note {
            MemberNote::Joined { addr, id } => tracing::info!(%addr, %id, "a seed 000 node joined"),
            MemberNote::Gone { addr } => tracing::warn!(%addr, "a seed 000 node went silent"),
            MemberNote::Handed { task, to } => {
                tracing::info!(%task, %to, "module handed to a seed 000 node")
            }
        },
    }
}

/// The project's ZIP with its files under `course_id/`, made once (aside, then renamed).
fn project_zip(engine: &Engine, offer: &Offer, zip: &std::path::Path) -> Option<PathBuf> {
    if zip.is_file() {
        return Some(zip.to_owned());
    }
    let folder = engine.project_dir(offer.eval, &offer.project, &offer.blob)?;
    let partial = zip.with_extension(format!(
        "partial-{}",
        PACKING.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    match bundle::pack_under(&folder, &offer.course_id(), &partial) {
        Ok(()) => {
            std::fs::rename(&partial, zip).ok()?;
            Some(zip.to_owned())
        }
        Err(e) => {
            tracing::warn!(project = %offer.project, error = %e, "project not packed for seed 000 nodes");
            let _ = std::fs::remove_file(&partial);
            None
        }
    }
}
