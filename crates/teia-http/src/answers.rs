//! The HTTP API's answers as typed structures, in the course statement's format: what
//! `GET /evaluation`, `GET /evaluation/<id>`, `GET /stats`, `POST /evaluation`, `POST /jobs`
//! and every error answer hold, field by field, built from the job engine's ledger. Fields
//! serialise in the order written here. (`GET /network` is the seed's map of addresses.)
//!
//! Bounds: a list holds at most what its page asked (see [`crate::MAX_LISTED`]); a detail
//! holds one evaluation; stats hold this node and the nodes heard from lately.

use std::collections::BTreeMap;

use serde::Serialize;
use teia_jobs::engine::{NodeLoad, Totals};
use teia_jobs::proto::ledger::{
    CachedFrom, EvalId, Evaluation, ModuleCounts, ModuleResult, ModuleState, TestCounts,
    TestFailure,
};

/// A figure rounded to two decimals, as shown.
fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Unix milliseconds as seconds.
fn seconds(unix_ms: u64) -> f64 {
    unix_ms as f64 / 1000.0
}

/// Any error: `{"error": "..."}`.
#[derive(Debug, Serialize)]
pub struct ErrorAnswer {
    /// What went wrong, for people.
    pub error: String,
}

/// `POST /evaluation`'s answer: the new evaluation's id (and a warning about this node), with
/// the two fields the published seed 000 nodes answer, for their clients.
#[derive(Debug, Serialize)]
pub struct Created {
    /// The evaluation's id.
    pub id: EvalId,
    /// The same id as a string, as seed 000's published nodes give it.
    pub eval_id: String,
    /// Always `submitted`, as seed 000's published nodes say.
    pub status: &'static str,
    /// Something the submitter should know (such as a node that runs no one's code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<&'static str>,
}

/// `POST /jobs`'s answer: the new script job's id.
#[derive(Debug, Serialize)]
pub struct JobCreated {
    /// The job's id.
    pub id: String,
    /// Why no worker can take it yet, when none can (it waits until one comes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// One evaluation in `GET /evaluation`.
#[derive(Debug, Serialize)]
pub struct Listed {
    /// Its id.
    pub id: EvalId,
    /// `pending`, `running`, `finished` or `failed`.
    pub status: &'static str,
    /// Unix seconds of its submission.
    pub submitted_at: f64,
}

impl From<&Evaluation> for Listed {
    fn from(evaluation: &Evaluation) -> Self {
        Self {
            id: evaluation.id,
            status: evaluation.status(),
            submitted_at: seconds(evaluation.submitted_at),
        }
    }
}

/// `GET /evaluation/<id>`.
#[derive(Debug, Serialize)]
pub struct Detail {
    /// Its id.
    pub id: EvalId,
    /// `pending`, `running`, `finished` or `failed`.
    pub status: &'static str,
    /// The node that owns it.
    pub owner: String,
    /// Unix seconds of its submission.
    pub submitted_at: f64,
    /// Seconds from its first module started to its end (or to now).
    pub elapsed_seconds: f64,
    /// Tests passed, in percent of those run.
    pub percent_passed: f64,
    /// Tests failed or in error, in percent of those run.
    pub percent_failed: f64,
    /// Its grade, 0 to 20.
    pub grade: f64,
    /// Why it failed before running, if it did.
    pub error: Option<String>,
    /// Why modules of it wait, if they do.
    pub waiting: Option<String>,
    /// Its tests' counts.
    pub tests: TestCounts,
    /// Its modules' counts.
    pub modules: ModuleCounts,
    /// Each project, by name.
    pub projects: BTreeMap<String, ProjectDetail>,
}

/// One project of a [`Detail`].
#[derive(Debug, Serialize)]
pub struct ProjectDetail {
    /// Tests passed, in percent.
    pub percent_passed: f64,
    /// Tests failed or in error, in percent.
    pub percent_failed: f64,
    /// Its grade, 0 to 20.
    pub grade: f64,
    /// Its tests' counts.
    pub tests: TestCounts,
    /// Its flaky tests (node ids): they failed, then passed when run again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flaky: Vec<String>,
    /// Each test module, by path.
    pub modules: BTreeMap<String, ModuleDetail>,
}

/// One test module of a [`ProjectDetail`].
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum ModuleDetail {
    /// Waiting for a worker.
    Pending {
        /// Seconds it took when it last ran on the owner's cluster, if it did.
        #[serde(skip_serializing_if = "Option::is_none")]
        expected_seconds: Option<f64>,
        /// The failed tests to run again, when that is what waits.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        rerunning: Vec<String>,
    },
    /// Running on `node`.
    Running {
        /// The worker.
        node: String,
        /// Seconds it took when it last ran, if it did.
        #[serde(skip_serializing_if = "Option::is_none")]
        expected_seconds: Option<f64>,
        /// The failed tests it runs again, when that is what runs.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        rerunning: Vec<String>,
    },
    /// Run.
    Done {
        /// Tests passed.
        passed: u32,
        /// Tests failed.
        failed: u32,
        /// Tests in error.
        errors: u32,
        /// Tests skipped.
        skipped: u32,
        /// Seconds it took.
        seconds: f64,
        /// Seconds it took when it last ran before this evaluation, if it did.
        #[serde(skip_serializing_if = "Option::is_none")]
        expected_seconds: Option<f64>,
        /// The worker.
        node: String,
        /// Another worker's different result, when a verification disagreed.
        #[serde(skip_serializing_if = "Option::is_none")]
        disputed: Option<Disputed>,
        /// Whether the result was reused from an earlier run of the same module on the same
        /// files, and which (`cached_from`).
        cached: bool,
        /// The earlier run it was reused from: its evaluation and node.
        #[serde(skip_serializing_if = "Option::is_none")]
        cached_from: Option<CachedFrom>,
        /// Its tests that failed or errored (node ids, the first
        /// [`teia_jobs::proto::ledger::MAX_LISTED_TESTS`]).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        failed_tests: Vec<String>,
        /// Why they failed, or the module erred: the end of pytest's report of each
        /// (within [`teia_jobs::proto::ledger::MAX_FAILURES_BYTES`]).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        failures: Vec<TestFailure>,
        /// Those of them that passed when run again: flaky (they count as failed).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        flaky: Vec<String>,
        /// The workers that ran the failed tests again, in turn.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        rerun_on: Vec<String>,
    },
}

/// Two workers' different results for one module.
#[derive(Debug, Serialize)]
pub struct Disputed {
    /// The two workers.
    pub nodes: [String; 2],
    /// The other worker's counts.
    pub other: Counts,
}

/// A module's counts.
#[derive(Debug, Serialize)]
pub struct Counts {
    /// Tests passed.
    pub passed: u32,
    /// Tests failed.
    pub failed: u32,
    /// Tests in error.
    pub errors: u32,
    /// Tests skipped.
    pub skipped: u32,
}

impl From<&ModuleResult> for Counts {
    fn from(result: &ModuleResult) -> Self {
        Self {
            passed: result.passed,
            failed: result.failed,
            errors: result.errors,
            skipped: result.skipped,
        }
    }
}

impl Detail {
    /// The detail of `evaluation` at `now` (Unix milliseconds, for one still running).
    pub fn of(evaluation: &Evaluation, now: u64) -> Self {
        let (tests, modules) = evaluation.counts();
        let end = evaluation.finished_at.unwrap_or(now);
        let elapsed = evaluation
            .started_at
            .map_or(0.0, |start| seconds(end.saturating_sub(start)));
        let projects = evaluation
            .projects
            .iter()
            .map(|(name, project)| {
                let (tests, _) = Evaluation::project_counts(project);
                let modules = project
                    .modules
                    .iter()
                    .map(|(path, module)| {
                        let expected_seconds = module.expected_seconds.map(round);
                        let rerunning = module
                            .rerun
                            .as_ref()
                            .map(|rerun| rerun.tests.clone())
                            .unwrap_or_default();
                        let detail = match &module.state {
                            ModuleState::Pending { .. } => ModuleDetail::Pending {
                                expected_seconds,
                                rerunning,
                            },
                            ModuleState::Leased { worker, .. } => ModuleDetail::Running {
                                node: worker.clone(),
                                expected_seconds,
                                rerunning,
                            },
                            ModuleState::Done(result) => ModuleDetail::Done {
                                passed: result.passed,
                                failed: result.failed,
                                errors: result.errors,
                                skipped: result.skipped,
                                seconds: round(result.seconds),
                                expected_seconds,
                                node: result.node.clone(),
                                disputed: module.disputed.as_ref().map(|other| Disputed {
                                    nodes: [result.node.clone(), other.node.clone()],
                                    other: Counts::from(other),
                                }),
                                cached: result.cached.is_some(),
                                cached_from: result.cached.clone(),
                                failed_tests: result.failed_tests.clone(),
                                failures: result.failures.clone(),
                                flaky: result.flaky.clone(),
                                rerun_on: result.rerun_on.clone(),
                            },
                        };
                        (path.clone(), detail)
                    })
                    .collect();
                let flaky = project
                    .modules
                    .values()
                    .filter_map(|module| match &module.state {
                        ModuleState::Done(result) => Some(result.flaky.iter().cloned()),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                let project = ProjectDetail {
                    percent_passed: round(tests.percent_passed()),
                    percent_failed: round(tests.percent_failed()),
                    grade: round(tests.grade()),
                    tests,
                    flaky,
                    modules,
                };
                (name.clone(), project)
            })
            .collect();
        Self {
            id: evaluation.id,
            status: evaluation.status(),
            owner: evaluation.owner.clone(),
            submitted_at: seconds(evaluation.submitted_at),
            elapsed_seconds: round(elapsed),
            percent_passed: round(tests.percent_passed()),
            percent_failed: round(tests.percent_failed()),
            grade: round(evaluation.grade()),
            error: evaluation.failure.clone(),
            waiting: evaluation.waiting.clone(),
            tests,
            modules,
            projects,
        }
    }
}

/// `GET /stats`: the sums of every evaluation this node keeps, and each node's load.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Sums over every evaluation kept.
    pub all: Totals,
    /// This node and the nodes heard from lately.
    pub nodes: Vec<NodeLoad>,
}
