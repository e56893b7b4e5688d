//! The bubblewrap sandbox tasks run in, as root and as an ordinary user. A task sees the
//! system's binaries and libraries (`/usr`, `/etc`) and the interpreter's prefix read-only,
//! its own work folder, and a private `/tmp`: not the node's data directory, not the home
//! folder, not other tasks. It has no network (a namespace of its own, with only `lo`),
//! its own PID namespace (every process of it dies when it ends), its own IPC namespace,
//! and no capabilities. When the node runs as root, each task runs as a user id of its
//! own ([`TASK_ID_BASE`] + a slot), so that the process limit holds and root's files stay
//! root's; its folder is given to that id first.
//!
//! Warm interpreters (see `warm`) run in one such sandbox that keeps the few capabilities
//! a forked child needs to make each task's own namespaces (`isolate.py`), which it then
//! drops for good; a task started cold gets a sandbox of its own.
//!
//! **Bounds**: [`MAX_TASK_IDS`] tasks at once hold a user id as root; one more waits.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use teia_node::sync::lock;

/// The first user (and group) id a task runs as when the node is root.
pub const TASK_ID_BASE: u32 = 2_000_000;
/// User ids handed to tasks at once at most (tasks past it wait for one).
pub const MAX_TASK_IDS: u32 = 4096;

/// Whether the node runs as root (tasks then run as ids of their own).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The user ids tasks run as when the node is root: one per task running.
#[derive(Default)]
pub(crate) struct TaskIds {
    used: Mutex<BTreeSet<u32>>,
    freed: tokio::sync::Notify,
}

/// A task's user id, given back when dropped.
pub(crate) struct TaskId {
    /// The id (user and group).
    pub id: u32,
    ids: Arc<TaskIds>,
}

impl Drop for TaskId {
    fn drop(&mut self) {
        lock(&self.ids.used).remove(&self.id);
        self.ids.freed.notify_one();
    }
}

impl TaskIds {
    /// The lowest free id; waits while [`MAX_TASK_IDS`] are taken.
    pub async fn take(self: &Arc<Self>) -> TaskId {
        loop {
            let freed = self.freed.notified();
            {
                let mut used = lock(&self.used);
                if let Some(id) =
                    (TASK_ID_BASE..TASK_ID_BASE + MAX_TASK_IDS).find(|id| !used.contains(id))
                {
                    used.insert(id);
                    return TaskId {
                        id,
                        ids: Arc::clone(self),
                    };
                }
            }
            freed.await;
        }
    }
}

/// Gives `path` and everything under it (links themselves, not followed) to `id`.
pub(crate) fn give_tree(path: &Path, id: u32) -> std::io::Result<()> {
    let mut stack = vec![path.to_owned()];
    while let Some(next) = stack.pop() {
        std::os::unix::fs::lchown(&next, Some(id), Some(id))?;
        let kind = std::fs::symlink_metadata(&next)?.file_type();
        if kind.is_dir() {
            for entry in std::fs::read_dir(&next)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// What a sandbox shows and allows.
pub(crate) struct Plan<'a> {
    /// Folders shown read-only (at their own path).
    pub readable: Vec<&'a Path>,
    /// Folders shown writable (at their own path).
    pub writable: Vec<&'a Path>,
    /// Whether it may use the network (installing requirements only).
    pub network: bool,
    /// Capabilities kept inside (the warm interpreter's, to isolate each task).
    pub keep_capabilities: bool,
}

/// `bwrap`'s arguments for `plan`, up to the command to run.
pub(crate) fn bwrap_args(plan: &Plan<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]);
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        match std::fs::read_link(top) {
            Ok(target) => {
                args.extend(["--symlink".into(), target.into_os_string(), top.into()]);
            }
            Err(_) if Path::new(top).is_dir() => {
                args.extend(["--ro-bind".into(), top.into(), top.into()]);
            }
            Err(_) => {}
        }
    }
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&[
        "--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp",
    ]);
    // bwrap makes a bound folder's missing parents private to root: made reachable first.
    let mut made: BTreeSet<PathBuf> = BTreeSet::new();
    for path in plan.readable.iter().chain(&plan.writable) {
        let mut parents: Vec<&Path> = path.ancestors().skip(1).collect();
        parents.reverse();
        for parent in parents {
            let shown = ["/", "/tmp", "/usr", "/etc", "/dev", "/proc"]
                .iter()
                .any(|p| parent == Path::new(p))
                || parent.starts_with("/usr")
                || parent.starts_with("/etc");
            if !shown && made.insert(parent.to_owned()) {
                args.extend([
                    "--perms".into(),
                    "0755".into(),
                    "--dir".into(),
                    parent.into(),
                ]);
            }
        }
    }
    for path in &plan.readable {
        args.extend(["--ro-bind".into(), path.into(), path.into()]);
    }
    for path in &plan.writable {
        args.extend(["--bind".into(), path.into(), path.into()]);
    }
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    if !plan.network {
        push(&["--unshare-net"]);
    }
    push(&[
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        "--new-session",
    ]);
    let root = running_as_root();
    if !root {
        push(&["--unshare-user"]);
    }
    push(&["--cap-drop", "ALL"]);
    // The warm interpreter's: to make each task's namespaces (and, as root, to give it its
    // own id and end it). A cold task's, as root: only to become its own id with no
    // capability left (setpriv).
    let kept: &[&str] = match (plan.keep_capabilities, root) {
        (true, true) => &[
            "CAP_SYS_ADMIN",
            "CAP_NET_ADMIN",
            "CAP_SETUID",
            "CAP_SETGID",
            "CAP_KILL",
        ],
        (true, false) => &["CAP_SYS_ADMIN", "CAP_NET_ADMIN"],
        (false, true) => &["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"],
        (false, false) => &[],
    };
    for capability in kept {
        push(&["--cap-add", capability]);
    }
    args
}

/// The words that make a command run as task id `id` inside a sandbox started as root
/// (none otherwise): `setpriv` becomes that user and group with no other group, and drops
/// every capability, the bounding set's included.
pub(crate) fn become_task(id: Option<u32>) -> Vec<String> {
    match id {
        Some(id) => vec![
            "setpriv".into(),
            format!("--reuid={id}"),
            format!("--regid={id}"),
            "--clear-groups".into(),
            "--inh-caps=-all".into(),
            "--ambient-caps=-all".into(),
            "--bounding-set=-all".into(),
            "--".into(),
        ],
        None => Vec::new(),
    }
}
