//! The job engine's messages between nodes (PROTOCOL.md section 8), named after seed 000's:
//! carried as SEND payloads `{"svc":"jobs","msg":{...}}` (so they are acknowledged,
//! retransmitted and signed by their origin like any SEND), except TASK_ANNOUNCE,
//! RECOVERY_ELECTION and EVALUATION_RESPONSIBILITY_UPDATE, which are flooded as `jobs`
//! QUERYs.

use serde::{Deserialize, Serialize};

use super::ledger::{Lease, ModuleResult};

/// The service name of the job engine's messages and streams.
pub const SERVICE: &str = "jobs";

/// One message of the job engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobMessage {
    /// An owner has evaluations not finished (flooded now and then while it has).
    TaskAnnounce {
        /// The owner.
        owner: String,
        /// Its listen port (for fetching projects), if it listens.
        port: Option<u16>,
        /// Modules waiting.
        pending: u32,
        /// Evaluations not finished.
        #[serde(default)]
        unfinished: u32,
        /// Script tasks (seed 001) waiting, taken over a `jobs` stream.
        #[serde(default)]
        scripts: u32,
        /// Proof that the owner holds the cluster secret, if it has one.
        #[serde(default)]
        proof: Option<String>,
    },
    /// A worker asks an owner for a module.
    TaskRequest {
        /// Names the request, echoed by the answer.
        request: u64,
        /// Proof that the worker holds the cluster secret, if it has one.
        #[serde(default)]
        proof: Option<String>,
    },
    /// The owner hands a module to the worker.
    TaskSend {
        /// The request answered.
        request: u64,
        /// What to run.
        lease: Lease,
        /// Seconds the module may run.
        timeout_s: u64,
        /// Milliseconds between two renewals the owner waits at most.
        lease_ms: u64,
        /// Other workers that have the project's bytes (ran one of its modules), to fetch
        /// them from instead of the owner.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        holders: Vec<String>,
    },
    /// The owner has nothing for the worker.
    NoTasks {
        /// The request answered.
        request: u64,
    },
    /// The worker still runs the module.
    TaskRenew {
        /// The lease.
        lease: Lease,
    },
    /// The module's result.
    TaskResult {
        /// The lease.
        lease: Lease,
        /// The counts.
        result: ModuleResult,
    },
    /// A node holding a replica of an evaluation whose owner is gone stands to take it over
    /// (flooded); the lowest peer id among the candidates wins.
    RecoveryElection {
        /// The evaluation.
        eval: u64,
        /// The candidate.
        candidate: String,
    },
    /// A node's work and links, flooded every few seconds, for `/stats` and `/network`.
    NodeStatus {
        /// Its peer id.
        peer_id: String,
        /// Its overlay address (`ip:port`).
        address: String,
        /// The peer ids it has links to.
        neighbours: Vec<String>,
        /// Tests it ran that passed.
        passed: u64,
        /// Tests it ran that failed or erred.
        failed: u64,
        /// Projects it ran modules of.
        projects: u64,
        /// Modules it ran.
        modules: u64,
        /// Evaluations it worked on.
        evaluations: Vec<u64>,
    },
    /// The new owner of an evaluation (flooded by the winner of the election).
    EvaluationResponsibilityUpdate {
        /// The evaluation.
        eval: u64,
        /// Its new owner.
        owner: String,
    },
}

/// A SEND payload carrying `message`.
pub fn payload(message: &JobMessage) -> serde_json::Value {
    serde_json::json!({"svc": SERVICE, "msg": message})
}

/// The job message a SEND payload carries, if it is one.
pub fn from_payload(payload: &serde_json::Value) -> Option<JobMessage> {
    if payload.get("svc")?.as_str()? != SERVICE {
        return None;
    }
    serde_json::from_value(payload.get("msg")?.clone()).ok()
}

/// Proof that `peer_id` holds the cluster secret: BLAKE3 keyed by a key derived from the
/// secret, over the peer id (the message carrying it is signed by that peer).
pub fn proof(secret: &str, peer_id: &str) -> String {
    let key = blake3::derive_key("teia cluster secret v1", secret.as_bytes());
    blake3::keyed_hash(&key, peer_id.as_bytes())
        .to_hex()
        .to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payloads_round_trip_and_proofs_bind_the_peer() {
        let message = JobMessage::TaskRequest {
            request: 7,
            proof: Some(proof("s", "a@x")),
        };
        assert_eq!(from_payload(&payload(&message)), Some(message));
        assert_eq!(from_payload(&serde_json::json!("hello")), None);
        assert_eq!(from_payload(&serde_json::json!({"svc": "other"})), None);
        assert_ne!(proof("s", "a@x"), proof("s", "b@x"));
        assert_ne!(proof("s", "a@x"), proof("t", "a@x"));
    }
}
