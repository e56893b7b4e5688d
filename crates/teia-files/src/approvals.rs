//! Under `--approve ask`, the requests waiting for the user and the grants remembered.
//! [`Approvals`] owns them; deciding one request is an operation of the service's state
//! (`state.rs`), since it applies the policy, may write `WAIT` on the requester's stream and
//! tells the interface.
//!
//! **Bounds**: [`MAX_PENDING_APPROVALS`] requests wait at once (one more is denied), each at
//! most [`APPROVAL_TIMEOUT`] (then denied); [`GRANTS_KEPT`] grants are remembered (beyond,
//! all are forgotten and asked again).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use teia_core::identity::PublicKey;
use tokio::sync::oneshot;

use crate::proto::tree::Hash;

/// Time the user has to approve a request under `--approve ask`.
pub const APPROVAL_TIMEOUT: Duration = Duration::from_secs(300);
/// Requests waiting for the user's approval at once.
pub const MAX_PENDING_APPROVALS: usize = 64;
/// Approvals remembered (requester key and file); beyond, they are forgotten and asked again.
pub const GRANTS_KEPT: usize = 4_096;

/// Requests waiting for the user's answer, and what the user granted.
pub(crate) struct Approvals {
    /// The next request's id.
    next: u64,
    /// Request id → what is asked, and where its answer goes.
    pending: HashMap<u64, (PendingApproval, oneshot::Sender<bool>)>,
    /// Requester key (none for a course peer) and file the user let through.
    granted: HashSet<(Option<PublicKey>, Hash)>,
}

impl Default for Approvals {
    fn default() -> Self {
        Self {
            next: 1,
            pending: HashMap::new(),
            granted: HashSet::new(),
        }
    }
}

/// A request waiting for the user's answer, as an interface lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PendingApproval {
    /// The request's id (answer it with `Files::approve` or `Files::deny`).
    pub id: u64,
    /// Who asks.
    pub peer: String,
    /// The requester's key, as `teia id` prints it (none for a course peer).
    pub key: Option<String>,
    /// The file's name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its hash, in hex.
    pub hash: String,
}

/// What the approvals say of one request.
pub(crate) enum Asked {
    /// Granted before.
    Granted,
    /// Too many requests wait already.
    Full,
    /// Waiting for the user, as request `id`.
    Waiting(u64, oneshot::Receiver<bool>),
}

impl Approvals {
    /// Asks the user whether `key` may download `hash` (`asked` says who and what, its id
    /// is set here), unless granted already.
    pub(crate) fn ask(
        &mut self,
        key: Option<PublicKey>,
        hash: Hash,
        mut asked: PendingApproval,
    ) -> Asked {
        if self.granted.contains(&(key, hash)) {
            return Asked::Granted;
        }
        if self.pending.len() >= MAX_PENDING_APPROVALS {
            return Asked::Full;
        }
        let id = self.next;
        self.next += 1;
        let (reply, answer) = oneshot::channel();
        asked.id = id;
        self.pending.insert(id, (asked, reply));
        Asked::Waiting(id, answer)
    }

    /// Request `id` is over, answered `yes` or not; a yes is remembered.
    pub(crate) fn settle(&mut self, id: u64, yes: bool, key: Option<PublicKey>, hash: Hash) {
        self.pending.remove(&id);
        if yes {
            if self.granted.len() >= GRANTS_KEPT {
                self.granted.clear();
            }
            self.granted.insert((key, hash));
        }
    }

    /// The user's answer to request `id`; false if no such request waits.
    pub(crate) fn answer(&mut self, id: u64, yes: bool) -> bool {
        self.pending
            .remove(&id)
            .is_some_and(|(_, reply)| reply.send(yes).is_ok())
    }

    /// The requests waiting, oldest first.
    pub(crate) fn pending(&self) -> Vec<PendingApproval> {
        let mut pending: Vec<PendingApproval> = self
            .pending
            .values()
            .map(|(asked, _)| asked.clone())
            .collect();
        pending.sort_by_key(|asked| asked.id);
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked() -> PendingApproval {
        PendingApproval {
            id: 0,
            peer: "bob@lab".into(),
            key: None,
            name: "notes.txt".into(),
            size: 5,
            hash: String::new(),
        }
    }

    fn hash(byte: u8) -> Hash {
        Hash::from_hex(&format!("{byte:02x}").repeat(32)).expect("a hash")
    }

    #[test]
    fn a_granted_request_is_not_asked_again_and_a_denied_one_is() {
        let mut approvals = Approvals::default();
        let Asked::Waiting(id, mut answer) = approvals.ask(None, hash(1), asked()) else {
            panic!("the first request waits for the user");
        };
        assert!(approvals.answer(id, true));
        assert_eq!(answer.try_recv(), Ok(true));
        approvals.settle(id, true, None, hash(1));
        assert!(matches!(
            approvals.ask(None, hash(1), asked()),
            Asked::Granted
        ));
        assert!(!approvals.answer(id, true), "an answered request is gone");

        let Asked::Waiting(id, _) = approvals.ask(None, hash(2), asked()) else {
            panic!("another file is asked");
        };
        approvals.settle(id, false, None, hash(2));
        assert!(matches!(
            approvals.ask(None, hash(2), asked()),
            Asked::Waiting(..)
        ));
    }

    #[test]
    fn requests_beyond_the_bound_are_denied_at_once() {
        let mut approvals = Approvals::default();
        let mut waiting = Vec::new();
        for n in 0..MAX_PENDING_APPROVALS {
            match approvals.ask(None, hash((n % 250) as u8), asked()) {
                Asked::Waiting(_, answer) => waiting.push(answer),
                _ => panic!("request {n} should wait"),
            }
        }
        assert!(matches!(
            approvals.ask(None, hash(251), asked()),
            Asked::Full
        ));
    }
}
