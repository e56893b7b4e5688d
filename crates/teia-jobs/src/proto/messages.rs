//! The job engine's messages between nodes (PROTOCOL.md section 8), named after seed 000's:
//! carried as SEND payloads `{"svc":"jobs","msg":{...}}` (so they are acknowledged,
//! retransmitted and signed by their origin like any SEND), to one node at a time: nothing
//! of the engine is flooded. A node is a member of its cluster for another once its
//! CLUSTER_HELLO, signed by its key, proved that key trusted (`--trust`) or the cluster
//! secret bound to that key; every other message counts only from a member, by the key
//! that proved it.

use serde::{Deserialize, Serialize};

use teia_core::identity::PublicKey;

use super::ledger::{Lease, ModuleResult};

/// The service name of the job engine's messages and streams.
pub const SERVICE: &str = "jobs";

/// One message of the job engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobMessage {
    /// A node asks to be known as a member of the cluster (sent to each teia neighbour that
    /// is not a member yet, and to the nodes members name, every few seconds at most).
    ClusterHello {
        /// Proof that the sender holds the cluster secret, bound to its key, if it has one.
        #[serde(default)]
        proof: Option<String>,
        /// Its listen port (for data streams), if it listens.
        #[serde(default)]
        port: Option<u16>,
    },
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
    },
    /// A worker asks an owner for a module.
    TaskRequest {
        /// Names the request, echoed by the answer.
        request: u64,
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
    /// A node of the cluster holds a project's bytes now (fetched and checked against their
    /// hash): the owner counts it among the project's replicas.
    ProjectHeld {
        /// The bytes' BLAKE3 hash.
        blob: String,
    },
    /// The module's result.
    TaskResult {
        /// The lease.
        lease: Lease,
        /// The counts.
        result: Box<ModuleResult>,
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

impl JobMessage {
    /// Its type, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ClusterHello { .. } => "CLUSTER_HELLO",
            Self::TaskAnnounce { .. } => "TASK_ANNOUNCE",
            Self::TaskRequest { .. } => "TASK_REQUEST",
            Self::TaskSend { .. } => "TASK_SEND",
            Self::NoTasks { .. } => "NO_TASKS",
            Self::TaskRenew { .. } => "TASK_RENEW",
            Self::TaskResult { .. } => "TASK_RESULT",
            Self::ProjectHeld { .. } => "PROJECT_HELD",
            Self::RecoveryElection { .. } => "RECOVERY_ELECTION",
            Self::NodeStatus { .. } => "NODE_STATUS",
            Self::EvaluationResponsibilityUpdate { .. } => "EVALUATION_RESPONSIBILITY_UPDATE",
        }
    }
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

/// Proof that the node `peer_id` with key `key` holds the cluster secret: BLAKE3 keyed by
/// a key derived from the secret, over the key and the peer id. Bound to the key, it is
/// worth nothing to anyone who sees it but cannot sign with that key.
pub fn proof(secret: &str, peer_id: &str, key: &PublicKey) -> String {
    let derived = blake3::derive_key("teia cluster secret v2", secret.as_bytes());
    let mut hasher = blake3::Hasher::new_keyed(&derived);
    hasher.update(key.as_bytes());
    hasher.update(peer_id.as_bytes());
    hasher.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payloads_round_trip_and_proofs_bind_the_peer_and_its_key() {
        let one = teia_core::identity::Identity::from_seed(&[1; 32]).public_key();
        let two = teia_core::identity::Identity::from_seed(&[2; 32]).public_key();
        let message = JobMessage::ClusterHello {
            proof: Some(proof("s", "a@x", &one)),
            port: Some(9),
        };
        assert_eq!(message.kind(), "CLUSTER_HELLO");
        assert_eq!(from_payload(&payload(&message)), Some(message));
        assert_eq!(from_payload(&serde_json::json!("hello")), None);
        assert_eq!(from_payload(&serde_json::json!({"svc": "other"})), None);
        assert_ne!(proof("s", "a@x", &one), proof("s", "b@x", &one));
        assert_ne!(proof("s", "a@x", &one), proof("t", "a@x", &one));
        assert_ne!(proof("s", "a@x", &one), proof("s", "a@x", &two));
    }

    /// A result with every list full (a rerun's selection, its failed and passed tests and
    /// why they failed) still fits in one signed line of the overlay, its envelope beside.
    #[test]
    fn the_largest_result_fits_in_a_line() {
        use crate::proto::ledger::{
            list_failure, list_test, TestFailure, MAX_FAILURE_OUTPUT_BYTES, MAX_LISTED_TESTS,
            MAX_TEST_ID_BYTES,
        };
        let module = "tests/test_m.py";
        let mut tests = Vec::new();
        for i in 0..MAX_LISTED_TESTS {
            let id = format!("{module}::t{i}_{}", "\"".repeat(MAX_TEST_ID_BYTES));
            list_test(&mut tests, module, &id[..MAX_TEST_ID_BYTES]);
            list_test(&mut tests, module, &format!("{module}::t{i}"));
        }
        let mut failures: Vec<TestFailure> = Vec::new();
        for test in &tests {
            let why = "\u{1}".repeat(MAX_FAILURE_OUTPUT_BYTES);
            list_failure(&mut failures, module, &tests, test, &why);
        }
        assert!(!failures.is_empty());
        let lease = Lease {
            eval: u64::MAX,
            project: "p".repeat(255),
            blob: "b".repeat(64),
            module: module.into(),
            attempt: u32::MAX,
            selection: tests.clone(),
            piece: None,
        };
        let result = ModuleResult {
            node: "n".repeat(255),
            failed_tests: tests.clone(),
            passed_tests: tests,
            failures,
            profile: vec![u32::MAX; 15],
            environment: Some("e".repeat(64)),
            ..ModuleResult::default()
        };
        let message = JobMessage::TaskResult {
            lease,
            result: Box::new(result),
        };
        let bytes = serde_json::to_string(&payload(&message)).unwrap().len();
        assert!(
            bytes + 4096 <= teia_wire::codec::MAX_LINE,
            "{bytes} bytes leave too little room"
        );
    }
}
