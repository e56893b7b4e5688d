//! The ledger of evaluations: each project's test modules, who runs which (a lease with a
//! deadline, renewed while the module runs), their results, and the grades. No I/O; time is
//! passed in (milliseconds of a monotonic clock).
//!
//! Scheduling is pull: a worker asks ([`Ledger::lease`]) and gets the next module, taking
//! evaluations in turn (fairness) and, within one, the module that took longest before
//! (longest first, so the end is not held up by a long module started last). A lease that
//! is not renewed by its deadline, or whose worker is lost, goes back to pending with its
//! attempt number raised; a module that lost its worker [`MAX_CRASHES`] times is recorded
//! as failed (one error), so the evaluation still finishes. Results are idempotent: only
//! the result of the current attempt of a module not yet done counts.
//!
//! Stragglers are split ([`Ledger::split_stragglers`]): a module expected (from its last
//! run) to take longer than its share of the evaluation's expected work over the workers,
//! and whose last run said it may be split (no class- or module-scoped fixture, no
//! `teia_no_split` mark), is replaced by pieces ([`Piece`]: `path [i/k]`), each running the
//! i-th of k contiguous runs of its collected tests; their counts add up to the module's.
//! A module never run here is not split.
//!
//! Failed tests are run again ([`Rerun`]): a result with failed or errored tests, listed
//! by node id, does not end its module when its evaluation allows reruns
//! ([`Evaluation::rerun_failures`]); those tests alone (`pytest MODULE::test ...`, the
//! lease's [`Lease::selection`]) run again, on another worker when the cluster has one.
//! A test that then passes is flaky. The first result is the one that counts, its flaky
//! tests named beside it ([`ModuleResult::flaky`]); reruns go on while tests still fail
//! and runs are left. What is not a listed test (a collection error, a module that
//! crashed or timed out) is never run again.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proto::discover::FoundModule;

/// An evaluation's id: a JSON integer below 2^53.
pub type EvalId = u64;

/// Times a module may lose its worker before it is recorded as failed.
pub const MAX_CRASHES: u32 = 2;

/// Tests a result lists at most in each of its lists (the first ones reported); the
/// others are counted but never run again.
pub const MAX_LISTED_TESTS: usize = 32;

/// Bytes of a test's node id listed at most; a longer one is counted but not listed.
pub const MAX_TEST_ID_BYTES: usize = 512;

/// Bytes one list of tests takes at most, as JSON: a result with its lists, and a lease
/// with its selection, stay well within one line of the overlay (32 KiB).
pub const MAX_LISTED_BYTES: usize = 6 * 1024;

/// Adds `test` to `list` when it is a test of `module` ([`is_test_of`]), not listed yet,
/// and the list stays within [`MAX_LISTED_TESTS`] and [`MAX_LISTED_BYTES`]; false if not
/// added.
pub fn list_test(list: &mut Vec<String>, module: &str, test: &str) -> bool {
    let bytes = |t: &str| serde_json::to_string(t).map_or(usize::MAX, |json| json.len() + 1);
    let used: usize = list.iter().map(|t| bytes(t)).sum();
    if list.len() >= MAX_LISTED_TESTS
        || !is_test_of(module, test)
        || list.iter().any(|t| t == test)
        || used.saturating_add(bytes(test)) > MAX_LISTED_BYTES
    {
        return false;
    }
    list.push(test.to_owned());
    true
}

/// Bytes of a failed test's output kept at most: its end, where pytest says what failed
/// and where; a longer output is cut at its start.
pub const MAX_FAILURE_OUTPUT_BYTES: usize = 1024;

/// Bytes a result's failed tests' outputs take at most, as JSON: past it, further failed
/// tests are listed (in [`ModuleResult::failed_tests`]) without their output.
pub const MAX_FAILURES_BYTES: usize = 8 * 1024;

/// Why a test (or its module) failed: the end of pytest's report of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailure {
    /// The test's node id, or the module's path for an error of the module itself (it
    /// could not be collected, crashed or timed out).
    pub test: String,
    /// The end of its report (at most [`MAX_FAILURE_OUTPUT_BYTES`]).
    pub output: String,
}

/// The last `max` bytes of `text` at most, starting on a character.
pub fn tail(text: &str, max: usize) -> &str {
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// Adds why `test` failed to `failures` when `test` is `module` itself or listed among
/// `failed_tests`, has no output there yet, and the outputs stay within
/// [`MAX_FAILURES_BYTES`]; the output is cut to its end ([`MAX_FAILURE_OUTPUT_BYTES`]).
/// False if not added.
pub fn list_failure(
    failures: &mut Vec<TestFailure>,
    module: &str,
    failed_tests: &[String],
    test: &str,
    output: &str,
) -> bool {
    let bytes = |f: &TestFailure| serde_json::to_string(f).map_or(usize::MAX, |j| j.len() + 1);
    let failure = TestFailure {
        test: test.to_owned(),
        output: tail(output, MAX_FAILURE_OUTPUT_BYTES).to_owned(),
    };
    let used: usize = failures.iter().map(bytes).sum();
    if !(test == module || failed_tests.iter().any(|t| t == test))
        || failures.iter().any(|f| f.test == test)
        || used.saturating_add(bytes(&failure)) > MAX_FAILURES_BYTES
    {
        return false;
    }
    failures.push(failure);
    true
}

/// `failures` kept as [`list_failure`] keeps them, in order.
fn listed_failures(
    module: &str,
    failed_tests: &[String],
    failures: &[TestFailure],
) -> Vec<TestFailure> {
    let mut list = Vec::new();
    for failure in failures {
        list_failure(
            &mut list,
            module,
            failed_tests,
            &failure.test,
            &failure.output,
        );
    }
    list
}

/// `tests` kept as [`list_test`] keeps them, in order.
fn listed(module: &str, tests: &[String]) -> Vec<String> {
    let mut list = Vec::new();
    for test in tests {
        list_test(&mut list, module, test);
    }
    list
}

/// Reruns of a module's failed tests an evaluation may ask for at most.
pub const MAX_RERUNS: u32 = 5;

/// Time a rerun waits for another worker than those that ran its module (Unix ms from
/// when it was queued); past it, any worker takes it (the others may not be taking work).
pub const RERUN_ELSEWHERE_MS: u64 = 3_000;

/// Pieces a module is split into at most.
pub const MAX_PIECES: u32 = 16;

/// Seconds a piece of a split module is expected to take at least (each piece starts a
/// process and collects the whole module again).
pub const MIN_PIECE_SECONDS: f64 = 1.0;

/// Tests (estimated from its source) a module never run on the cluster must hold to be
/// split on its first run; below, nothing says it takes long.
pub const MIN_UNSEEN_SPLIT_TESTS: u32 = 100;

/// Tests (estimated) each piece of a module split before it ever ran holds at least.
pub const MIN_UNSEEN_PIECE_TESTS: u32 = 50;

/// Equal parts of a module's time its profile cuts it in ([`Shape::cuts`]).
pub const PROFILE_PARTS: u32 = 16;

/// What a module held when it last ran whole here (or on a node of the cluster), for
/// splitting it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Tests it held; 0 when it may not be split.
    pub tests: u32,
    /// Its tests' durations, in short: for each j from 1 to [`PROFILE_PARTS`] - 1, how
    /// many of its tests (in pytest's order) had run when j parts of its time had passed.
    /// Empty when not known: pieces are then cut by count.
    #[serde(default)]
    pub cuts: Vec<u32>,
}

impl Shape {
    /// Where `pieces` pieces of such a module start (the first at 0), each taking about
    /// the same time (the same number of tests without a profile); fewer when tests are
    /// too few to cut there.
    pub fn starts(&self, pieces: u32) -> Vec<u32> {
        let pieces = pieces.max(1);
        let profiled = self.cuts.len() == (PROFILE_PARTS - 1) as usize;
        let mut starts = vec![0];
        for m in 1..pieces {
            let start = if profiled {
                let part = ((m * PROFILE_PARTS + pieces / 2) / pieces).clamp(1, PROFILE_PARTS - 1);
                self.cuts.get(part as usize - 1).copied().unwrap_or(0)
            } else {
                (u64::from(m) * u64::from(self.tests) / u64::from(pieces)) as u32
            };
            if starts.last().is_some_and(|last| start > *last) && start < self.tests {
                starts.push(start);
            }
        }
        starts
    }
}

/// How a module is cut in pieces.
enum Cut {
    /// Where each piece starts, in the tests of its last run.
    Starts(Vec<u32>),
    /// In that many runs of equal count of the tests it holds when it runs.
    EqualParts(u32),
}

/// One piece of a split module: the tests of the module at `path` from `start` (in
/// pytest's order, from 0) up to `end` (excluded; none: to the last), the `index`-th (from
/// 1) of `of`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The module's path.
    pub path: String,
    /// Which piece, from 1.
    pub index: u32,
    /// Of how many.
    pub of: u32,
    /// Its first test.
    pub start: u32,
    /// The test after its last (none: it runs to the last test the module holds).
    pub end: Option<u32>,
    /// Whether the piece is rather the `index`-th of `of` runs of equal count of the tests
    /// the module holds when it runs (`start` and `end` unused): the module was split
    /// before it ever ran, on its estimated tests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub equal_part: bool,
}

impl Shape {
    /// What a run of a whole module says of it, if it says (collected, splittable).
    pub fn of(result: &ModuleResult) -> Option<Self> {
        let (tests, splittable) = (result.collected?, result.splittable?);
        Some(if splittable {
            Self {
                tests,
                cuts: result.profile.clone(),
            }
        } else {
            Self::default()
        })
    }
}

impl Piece {
    /// The name the piece goes by in its project: `path [index/of]`.
    pub fn name(&self) -> String {
        format!("{} [{}/{}]", self.path, self.index, self.of)
    }

    /// The tests it runs, as teia's pytest plugin reads them (`TEIA_SHARD`): `START:END`
    /// (`START:` to the last), or `INDEX/OF` for an equal part.
    pub fn shard(&self) -> String {
        match (self.equal_part, self.end) {
            (true, _) => format!("{}/{}", self.index, self.of),
            (false, Some(end)) => format!("{}:{end}", self.start),
            (false, None) => format!("{}:", self.start),
        }
    }
}

/// Whether `test` is a test of `module` that may be listed and run again: its node id is
/// the module's path, `::`, and the rest (so never a pytest option), within
/// [`MAX_TEST_ID_BYTES`].
pub fn is_test_of(module: &str, test: &str) -> bool {
    test.len() <= MAX_TEST_ID_BYTES
        && test
            .strip_prefix(module)
            .is_some_and(|rest| rest.len() > 2 && rest.starts_with("::"))
}

/// The result of running one module.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModuleResult {
    /// Tests passed.
    pub passed: u32,
    /// Tests failed.
    pub failed: u32,
    /// Errors (collection errors, errors in fixtures, a timeout or crash of the module).
    pub errors: u32,
    /// Tests skipped.
    pub skipped: u32,
    /// Seconds the module ran.
    pub seconds: f64,
    /// The node that ran it (of a split module's result joined from its pieces', the
    /// first piece's: [`Project::joined_pieces`]).
    pub node: String,
    /// The nodes that ran the pieces of a split module, when this result joins theirs
    /// (at most [`MAX_PIECES`]), so that the cache evicts it with the results of any one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pieces_by: Vec<String>,
    /// Where the result was reused from, when it was not run for this evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<CachedFrom>,
    /// Tests that failed or errored, by node id (at most [`MAX_LISTED_TESTS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_tests: Vec<String>,
    /// Why its failed tests failed, or its module erred, as pytest reported it (within
    /// [`MAX_FAILURES_BYTES`]; [`list_failure`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<TestFailure>,
    /// Tests that passed, by node id: listed only by a run of selected tests (a rerun).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed_tests: Vec<String>,
    /// Tests that failed here, then passed when run again: flaky (they still count as
    /// this result says).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flaky: Vec<String>,
    /// The workers that ran its failed tests again, in turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rerun_on: Vec<String>,
    /// Tests its module holds, as collected (of the whole module, for a piece).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collected: Option<u32>,
    /// Whether its module may be split: no class- or module-scoped fixture, no
    /// `teia_no_split` mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splittable: Option<bool>,
    /// Its tests' durations in short ([`Shape::cuts`]), from a run of the whole module.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<u32>,
    /// The environment it ran in, as the result cache keys it
    /// ([`super::result_cache::environment`]); none from a node without a result cache,
    /// or a seed 000 node: such a result is never kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
}

/// The run a reused result came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFrom {
    /// The evaluation it was run for.
    pub eval: EvalId,
    /// The node that ran it.
    pub node: String,
}

/// Where a module stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ModuleState {
    /// Waiting for a worker.
    Pending {
        /// The attempt it will be.
        attempt: u32,
    },
    /// A worker runs it until `deadline` (renewed while it runs).
    Leased {
        /// The worker.
        worker: String,
        /// Which attempt.
        attempt: u32,
        /// When the lease ends, in ledger milliseconds.
        deadline: u64,
    },
    /// Finished (a result, possibly a failure recorded after crashes).
    Done(Box<ModuleResult>),
}

/// One module of a project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Module {
    /// Its state.
    pub state: ModuleState,
    /// Tests it seems to hold (for the pending counts).
    pub estimated_tests: u32,
    /// Workers it lost.
    pub crashes: u32,
    /// Its first result while it is run again on another worker to verify it: the worker
    /// that ran it (not to be given the verification) and what it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifying: Option<(String, ModuleResult)>,
    /// The result that disagreed with the one that stands ([`ModuleState::Done`]), when
    /// a verification disagreed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disputed: Option<ModuleResult>,
    /// Hash of the module's file, for the result cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Seconds it took when it last ran here, at submission (none: never seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_seconds: Option<f64>,
    /// Its failed tests being run again, when they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun: Option<Rerun>,
    /// The module it is a piece of, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piece: Option<Piece>,
    /// Whether its source lets it be split before it ever ran (a cheap reading of it:
    /// [`may_split`](crate::proto::discover::may_split)).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub may_split_unseen: bool,
}

impl Module {
    /// The path of its test module's file (a piece's module's).
    pub fn path<'a>(&'a self, name: &'a str) -> &'a str {
        self.piece
            .as_ref()
            .map_or(name, |piece| piece.path.as_str())
    }
}

/// A module's failed tests being run again, to tell flaky tests from real failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rerun {
    /// The module's result that counts (its first), the flaky tests found so far named.
    pub first: ModuleResult,
    /// The tests that still fail, which the next run runs (node ids).
    pub tests: Vec<String>,
    /// Runs left after the next one.
    pub runs_left: u32,
    /// The workers that ran the module so far.
    pub ran_on: Vec<String>,
    /// Whether the next run goes to another worker than those (there was one when the
    /// last result came), for [`RERUN_ELSEWHERE_MS`] from `queued_at`.
    pub elsewhere: bool,
    /// Unix milliseconds of when the next run was queued.
    #[serde(default)]
    pub queued_at: u64,
}

/// What a result did to its module.
#[derive(Debug, Clone, PartialEq)]
pub enum Completed {
    /// Refused: the sender does not hold the module's lease for its current attempt.
    Refused,
    /// The module is done.
    Done,
    /// Kept; the module runs again, on another worker, to verify it.
    Verifying,
    /// Kept; its failed tests run again, to find the flaky ones.
    Rerunning,
    /// The reruns of its failed tests are over: its first result, by `first_worker`,
    /// stands, the flaky tests named.
    RerunsOver {
        /// The worker whose result stands.
        first_worker: String,
    },
    /// A verification agreed with the first result, which stands.
    Agreed,
    /// A verification disagreed: `stands` is kept (the owner's own run, else the first),
    /// `other` is recorded beside it.
    Disputed {
        /// The result kept.
        stands: Box<ModuleResult>,
        /// The other.
        other: Box<ModuleResult>,
    },
}

/// Whether two results of a module count the same.
fn same_counts(a: &ModuleResult, b: &ModuleResult) -> bool {
    (a.passed, a.failed, a.errors, a.skipped) == (b.passed, b.failed, b.errors, b.skipped)
}

/// One project of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Project {
    /// Content hash of the project's bytes, which workers fetch.
    pub blob: String,
    /// Hash of its files but its test modules (paths and bytes, not times), for the result
    /// cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Its modules by path.
    pub modules: BTreeMap<String, Module>,
}

impl Project {
    /// The result of module `path`, which was split, joined from its pieces' once every
    /// piece is done: their counts and seconds added, their failed and flaky tests (and
    /// why they failed) listed together (within [`MAX_LISTED_TESTS`]), run by the first piece's node, `pieces_by`
    /// naming every piece's. None while a piece is not done, and when one was reused,
    /// disputed, or ran in another environment than the first (or in none said).
    pub fn joined_pieces(&self, path: &str) -> Option<ModuleResult> {
        let mut joined: Option<ModuleResult> = None;
        let pieces = self
            .modules
            .values()
            .filter(|m| m.piece.as_ref().is_some_and(|p| p.path == path));
        for module in pieces {
            let ModuleState::Done(result) = &module.state else {
                return None;
            };
            if module.disputed.is_some() || result.cached.is_some() {
                return None;
            }
            let whole = joined.get_or_insert_with(|| ModuleResult {
                node: result.node.clone(),
                environment: result.environment.clone(),
                collected: result.collected,
                ..Default::default()
            });
            if result.environment.is_none() || whole.environment != result.environment {
                return None;
            }
            whole.passed = whole.passed.saturating_add(result.passed);
            whole.failed = whole.failed.saturating_add(result.failed);
            whole.errors = whole.errors.saturating_add(result.errors);
            whole.skipped = whole.skipped.saturating_add(result.skipped);
            whole.seconds += result.seconds;
            for test in &result.failed_tests {
                list_test(&mut whole.failed_tests, path, test);
            }
            for failure in &result.failures {
                list_failure(
                    &mut whole.failures,
                    path,
                    &whole.failed_tests,
                    &failure.test,
                    &failure.output,
                );
            }
            for test in &result.flaky {
                list_test(&mut whole.flaky, path, test);
            }
            if !whole.pieces_by.contains(&result.node) {
                whole.pieces_by.push(result.node.clone());
            }
        }
        joined
    }
}

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Its id.
    pub id: EvalId,
    /// The node that owns it.
    pub owner: String,
    /// Unix milliseconds of the submission.
    pub submitted_at: u64,
    /// Unix milliseconds of the first module started, and of the last finished.
    pub started_at: Option<u64>,
    /// Unix milliseconds of the end.
    pub finished_at: Option<u64>,
    /// Why it failed before running (no module, a bundle that could not be read).
    pub failure: Option<String>,
    /// Why modules of it wait (a project's bytes not to be had here yet), if they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Its projects by name.
    pub projects: BTreeMap<String, Project>,
    /// Times a module's failed tests are run again, at most (`--rerun-failures`).
    #[serde(default)]
    pub rerun_failures: u32,
}

/// A module handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The evaluation.
    pub eval: EvalId,
    /// The project.
    pub project: String,
    /// Its bytes' hash.
    pub blob: String,
    /// The module's path.
    pub module: String,
    /// Which attempt.
    pub attempt: u32,
    /// The tests to run (node ids), when not the whole module: a rerun of failed tests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selection: Vec<String>,
    /// The piece of a split module to run (`module` is then the piece's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piece: Option<Piece>,
}

impl Lease {
    /// The path of the test module to run.
    pub fn path(&self) -> &str {
        self.piece
            .as_ref()
            .map_or(self.module.as_str(), |piece| piece.path.as_str())
    }
}

/// A project as submitted: its name, bytes' hash and modules.
#[derive(Debug, Clone)]
pub struct NewProject {
    /// Its name (the top-level folder, or the repository's name).
    pub name: String,
    /// Its bytes' hash.
    pub blob: String,
    /// Hash of its files but its test modules (paths and bytes, not times), for the result
    /// cache.
    pub content: Option<String>,
    /// Its modules, with their estimated tests.
    pub modules: Vec<FoundModule>,
    /// Each module's file hash, by path, for the result cache.
    pub module_content: BTreeMap<String, String>,
}

/// Durations of modules remembered at most; past it, those of modules not seen yet are not
/// remembered.
pub const MAX_DURATIONS: usize = 100_000;

/// All evaluations this node knows, and durations seen before.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Ledger {
    evaluations: BTreeMap<EvalId, Evaluation>,
    /// Seconds each module took last time, by `project/module` path.
    durations: HashMap<String, f64>,
    /// What each module held when it last ran whole, by `project/module` path (within
    /// [`MAX_DURATIONS`]).
    #[serde(default)]
    shapes: HashMap<String, Shape>,
    /// The evaluation served last, for taking turns.
    last_served: Option<EvalId>,
}

/// Counts of tests, as the HTTP API shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TestCounts {
    /// Passed.
    pub passed: u32,
    /// Failed.
    pub failed: u32,
    /// Errors.
    pub errors: u32,
    /// Skipped.
    pub skipped: u32,
    /// Passed, failed, errors and skipped.
    pub executed: u32,
    /// In modules running now (estimated).
    pub running: u32,
    /// In modules not started (estimated).
    pub pending: u32,
}

impl TestCounts {
    fn add(&mut self, other: &TestCounts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.errors += other.errors;
        self.skipped += other.skipped;
        self.executed += other.executed;
        self.running += other.running;
        self.pending += other.pending;
    }

    /// Percent passed, of the tests that passed, failed or erred (skipped left out).
    pub fn percent_passed(&self) -> f64 {
        let counted = self.passed + self.failed + self.errors;
        if counted == 0 {
            0.0
        } else {
            f64::from(self.passed) * 100.0 / f64::from(counted)
        }
    }

    /// Percent failed or erred, of the same.
    pub fn percent_failed(&self) -> f64 {
        let counted = self.passed + self.failed + self.errors;
        if counted == 0 {
            0.0
        } else {
            f64::from(self.failed + self.errors) * 100.0 / f64::from(counted)
        }
    }

    /// The grade on 0–20: percent passed, scaled.
    pub fn grade(&self) -> f64 {
        self.percent_passed() / 5.0
    }
}

/// Counts of modules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ModuleCounts {
    /// Done.
    pub executed: u32,
    /// Leased.
    pub running: u32,
    /// Waiting.
    pub pending: u32,
}

fn counts_of(module: &Module) -> (TestCounts, ModuleCounts) {
    let mut tests = TestCounts::default();
    let mut modules = ModuleCounts::default();
    match &module.state {
        ModuleState::Done(r) => {
            tests.passed = r.passed;
            tests.failed = r.failed;
            tests.errors = r.errors;
            tests.skipped = r.skipped;
            tests.executed = r.passed + r.failed + r.errors + r.skipped;
            modules.executed = 1;
        }
        ModuleState::Leased { .. } => {
            tests.running = module.estimated_tests;
            modules.running = 1;
        }
        ModuleState::Pending { .. } => {
            tests.pending = module.estimated_tests;
            modules.pending = 1;
        }
    }
    (tests, modules)
}

/// Time a finished evaluation is still sent to the nodes that replicate it.
pub const REPLICATED_AFTER_END: Duration = Duration::from_secs(60);

impl Evaluation {
    /// Whether the owner still sends it to the nodes that replicate it at `now` (Unix ms):
    /// while it is queued or running, and for [`REPLICATED_AFTER_END`] after its end.
    pub fn worth_replicating(&self, now: u64) -> bool {
        matches!(self.status(), "queued" | "running")
            || self.finished_at.is_some_and(|end| {
                now.saturating_sub(end) < REPLICATED_AFTER_END.as_millis() as u64
            })
    }

    /// Puts the modules that were running back in the queue, their attempt raised (their
    /// worker's result will not count): after a restart, or when another node takes over.
    pub fn requeue_running(&mut self) {
        for module in self
            .projects
            .values_mut()
            .flat_map(|p| p.modules.values_mut())
        {
            if let ModuleState::Leased { attempt, .. } = module.state {
                module.state = ModuleState::Pending {
                    attempt: attempt + 1,
                };
            }
        }
    }

    /// `queued`, `running`, `done` or `failed`.
    pub fn status(&self) -> &'static str {
        if self.failure.is_some() {
            return "failed";
        }
        let mut started = false;
        let mut all_done = true;
        for module in self.projects.values().flat_map(|p| p.modules.values()) {
            match module.state {
                ModuleState::Done(_) => started = true,
                ModuleState::Leased { .. } => {
                    started = true;
                    all_done = false;
                }
                ModuleState::Pending { attempt } => {
                    started |= attempt > 0;
                    all_done = false;
                }
            }
        }
        match (all_done, started) {
            (true, _) => "done",
            (false, true) => "running",
            (false, false) => "queued",
        }
    }

    /// The counts of one project.
    pub fn project_counts(project: &Project) -> (TestCounts, ModuleCounts) {
        let mut tests = TestCounts::default();
        let mut modules = ModuleCounts::default();
        for module in project.modules.values() {
            let (t, m) = counts_of(module);
            tests.add(&t);
            modules.executed += m.executed;
            modules.running += m.running;
            modules.pending += m.pending;
        }
        (tests, modules)
    }

    /// The counts of the whole evaluation.
    pub fn counts(&self) -> (TestCounts, ModuleCounts) {
        let mut tests = TestCounts::default();
        let mut modules = ModuleCounts::default();
        for project in self.projects.values() {
            let (t, m) = Self::project_counts(project);
            tests.add(&t);
            modules.executed += m.executed;
            modules.running += m.running;
            modules.pending += m.pending;
        }
        (tests, modules)
    }

    /// The mean of the projects' grades.
    pub fn grade(&self) -> f64 {
        if self.projects.is_empty() {
            return 0.0;
        }
        let sum: f64 = self
            .projects
            .values()
            .map(|p| Self::project_counts(p).0.grade())
            .sum();
        sum / self.projects.len() as f64
    }
}

impl Ledger {
    /// Records a new evaluation (nothing happens if the id is known).
    pub fn submit(
        &mut self,
        id: EvalId,
        owner: &str,
        submitted_at: u64,
        projects: Vec<NewProject>,
    ) {
        if self.evaluations.contains_key(&id) {
            return;
        }
        let failure = (projects.iter().all(|p| p.modules.is_empty()))
            .then(|| "no test module found (tests/test_*.py)".to_owned());
        let projects = projects
            .into_iter()
            .map(|p| {
                let mut module_content = p.module_content;
                let modules = p
                    .modules
                    .into_iter()
                    .map(|found| {
                        let FoundModule {
                            path,
                            estimated_tests,
                            may_split,
                        } = found;
                        let content = module_content.remove(&path);
                        let expected_seconds =
                            self.durations.get(&format!("{}/{path}", p.name)).copied();
                        (
                            path,
                            Module {
                                state: ModuleState::Pending { attempt: 0 },
                                estimated_tests,
                                crashes: 0,
                                verifying: None,
                                disputed: None,
                                content,
                                expected_seconds,
                                rerun: None,
                                piece: None,
                                may_split_unseen: may_split,
                            },
                        )
                    })
                    .collect();
                (
                    p.name,
                    Project {
                        blob: p.blob,
                        content: p.content,
                        modules,
                    },
                )
            })
            .collect();
        self.evaluations.insert(
            id,
            Evaluation {
                id,
                owner: owner.to_owned(),
                submitted_at,
                started_at: None,
                finished_at: None,
                failure,
                waiting: None,
                projects,
                rerun_failures: 0,
            },
        );
    }

    /// Lets the failed tests of evaluation `id`'s modules run again up to `times` times
    /// (at most [`MAX_RERUNS`]); false if there is no such evaluation.
    pub fn set_rerun_failures(&mut self, id: EvalId, times: u32) -> bool {
        match self.evaluations.get_mut(&id) {
            Some(evaluation) => {
                evaluation.rerun_failures = times.min(MAX_RERUNS);
                true
            }
            None => false,
        }
    }

    /// Takes in an evaluation replicated from its owner (replacing an older copy).
    pub fn replicate(&mut self, evaluation: Evaluation) {
        self.evaluations.insert(evaluation.id, evaluation);
    }

    /// An evaluation.
    pub fn get(&self, id: EvalId) -> Option<&Evaluation> {
        self.evaluations.get(&id)
    }

    /// Forgets evaluation `id`; whether it was here.
    pub fn remove(&mut self, id: EvalId) -> bool {
        self.evaluations.remove(&id).is_some()
    }

    /// Every evaluation.
    pub fn all(&self) -> impl Iterator<Item = &Evaluation> {
        self.evaluations.values()
    }

    /// Hands the next module to `worker`, leased until `now + lease_ms`: evaluations owned
    /// by `owner` in turn, longest module first.
    pub fn lease(
        &mut self,
        owner: &str,
        worker: &str,
        now: u64,
        lease_ms: u64,
        unix_ms: u64,
    ) -> Option<Lease> {
        self.lease_matching(
            owner,
            worker,
            now,
            lease_ms,
            unix_ms,
            |_, _| true,
            |_, _| true,
        )
    }

    /// As [`Ledger::lease`], handing out only modules of projects for which
    /// `ready(submitted_at, blob)` holds (their bytes are replicated enough), and only
    /// modules that `module_ok(path, whole)` takes (a worker that can run only some, or
    /// only whole modules: `whole` is false for a rerun of some tests).
    #[allow(clippy::too_many_arguments)]
    pub fn lease_matching(
        &mut self,
        owner: &str,
        worker: &str,
        now: u64,
        lease_ms: u64,
        unix_ms: u64,
        ready: impl Fn(u64, &str) -> bool,
        module_ok: impl Fn(&str, bool) -> bool,
    ) -> Option<Lease> {
        let ids: Vec<EvalId> = self
            .evaluations
            .values()
            .filter(|e| e.owner == owner && e.failure.is_none())
            .map(|e| e.id)
            .collect();
        if ids.is_empty() {
            return None;
        }
        let start = self
            .last_served
            .and_then(|last| ids.iter().position(|id| *id > last))
            .unwrap_or(0);
        let order: Vec<EvalId> = ids
            .iter()
            .cycle()
            .skip(start)
            .take(ids.len())
            .copied()
            .collect();
        for id in order {
            let Some(evaluation) = self.evaluations.get_mut(&id) else {
                continue;
            };
            let mut best: Option<(f64, String, String)> = None;
            for (project_name, project) in &evaluation.projects {
                if !ready(evaluation.submitted_at, &project.blob) {
                    continue;
                }
                for (path, module) in &project.modules {
                    let whole = module.rerun.is_none() && module.piece.is_none();
                    if !matches!(module.state, ModuleState::Pending { .. })
                        || !module_ok(path, whole)
                    {
                        continue;
                    }
                    // A rerun goes to another worker when there was one, for a while.
                    if module.rerun.as_ref().is_some_and(|r| {
                        r.elsewhere
                            && r.ran_on.iter().any(|w| w == worker)
                            && unix_ms < r.queued_at.saturating_add(RERUN_ELSEWHERE_MS)
                    }) {
                        continue;
                    }
                    // A verification goes to another worker than the first run's.
                    if module.verifying.as_ref().is_some_and(|(w, _)| w == worker) {
                        continue;
                    }
                    let seconds = module.expected_seconds.unwrap_or(0.0);
                    if best.as_ref().is_none_or(|(s, _, _)| seconds > *s) {
                        best = Some((seconds, project_name.clone(), path.clone()));
                    }
                }
            }
            let Some((_, project_name, path)) = best else {
                continue;
            };
            let project = evaluation.projects.get_mut(&project_name)?;
            let module = project.modules.get_mut(&path)?;
            let ModuleState::Pending { attempt } = module.state else {
                continue;
            };
            module.state = ModuleState::Leased {
                worker: worker.to_owned(),
                attempt,
                deadline: now + lease_ms,
            };
            evaluation.started_at.get_or_insert(unix_ms);
            self.last_served = Some(id);
            return Some(Lease {
                eval: id,
                project: project_name,
                blob: project.blob.clone(),
                module: path,
                attempt,
                selection: module
                    .rerun
                    .as_ref()
                    .map(|r| r.tests.clone())
                    .unwrap_or_default(),
                piece: module.piece.clone(),
            });
        }
        None
    }

    fn module_mut(&mut self, eval: EvalId, project: &str, module: &str) -> Option<&mut Module> {
        self.evaluations
            .get_mut(&eval)?
            .projects
            .get_mut(project)?
            .modules
            .get_mut(module)
    }

    /// Extends `worker`'s lease of a module to `now + lease_ms`; false if it is not (or no
    /// longer) its lease.
    pub fn renew(&mut self, lease: &Lease, worker: &str, now: u64, lease_ms: u64) -> bool {
        let Some(module) = self.module_mut(lease.eval, &lease.project, &lease.module) else {
            return false;
        };
        match &mut module.state {
            ModuleState::Leased {
                worker: w,
                attempt,
                deadline,
            } if w == worker && *attempt == lease.attempt => {
                *deadline = now + lease_ms;
                true
            }
            _ => false,
        }
    }

    /// Gives a module leased to `worker` back to the queue, as the same attempt (it did not
    /// run: its project's bytes were not to be had); false if it is not `worker`'s lease.
    pub fn give_back(&mut self, lease: &Lease, worker: &str, why: &str) -> bool {
        if !self.release(lease, worker) {
            return false;
        }
        if let Some(evaluation) = self.evaluations.get_mut(&lease.eval) {
            evaluation.waiting = Some(why.to_owned());
        }
        true
    }

    /// Gives a module leased to `worker` back to the queue, as the same attempt (it never
    /// started); false if it is not `worker`'s lease.
    pub fn release(&mut self, lease: &Lease, worker: &str) -> bool {
        let Some(module) = self.module_mut(lease.eval, &lease.project, &lease.module) else {
            return false;
        };
        match &module.state {
            ModuleState::Leased {
                worker: holder,
                attempt,
                ..
            } if holder == worker && *attempt == lease.attempt => {
                module.state = ModuleState::Pending { attempt: *attempt };
                true
            }
            _ => false,
        }
    }

    /// Records `worker`'s result of a module; false (and nothing changes) unless the module
    /// is leased to `worker` for the lease's attempt (a module pending, leased to another,
    /// taken back or done takes no result).
    pub fn complete(
        &mut self,
        lease: &Lease,
        worker: &str,
        result: ModuleResult,
        unix_ms: u64,
    ) -> bool {
        self.complete_or_verify(lease, worker, result, unix_ms, false, "", false)
            != Completed::Refused
    }

    /// Records `worker`'s result as [`Ledger::complete`] does; when `verify`, the result is
    /// kept and the module runs again on another worker, whose result then either agrees
    /// (the first stands) or not (the module is disputed: the run of `owner_worker`, the
    /// owner's own workers, stands, else the first). A result that stands with failed
    /// tests has them run again ([`Rerun`]) when its evaluation allows, on another worker
    /// when `elsewhere` (the cluster has one).
    #[allow(clippy::too_many_arguments)]
    pub fn complete_or_verify(
        &mut self,
        lease: &Lease,
        worker: &str,
        mut result: ModuleResult,
        unix_ms: u64,
        verify: bool,
        owner_worker: &str,
        elsewhere: bool,
    ) -> Completed {
        // What a worker lists is kept within bounds; only the owner names flaky tests.
        result.failed_tests = listed(lease.path(), &result.failed_tests);
        result.passed_tests = listed(lease.path(), &result.passed_tests);
        result.failures = listed_failures(lease.path(), &result.failed_tests, &result.failures);
        result.flaky.clear();
        result.rerun_on.clear();
        let seconds = result.seconds;
        let shape = Shape::of(&result);
        let reruns = self
            .evaluations
            .get(&lease.eval)
            .map_or(0, |e| e.rerun_failures);
        let Some(module) = self.module_mut(lease.eval, &lease.project, &lease.module) else {
            return Completed::Refused;
        };
        let attempt = match &module.state {
            ModuleState::Leased {
                worker: holder,
                attempt,
                ..
            } if holder == worker && *attempt == lease.attempt => *attempt,
            _ => return Completed::Refused,
        };
        if let Some(mut rerun) = module.rerun.take() {
            // A rerun: the tests that passed (and did not then fail) are flaky.
            let (flaky, still): (Vec<String>, Vec<String>) =
                rerun.tests.into_iter().partition(|test| {
                    result.passed_tests.contains(test) && !result.failed_tests.contains(test)
                });
            rerun.first.flaky.extend(flaky);
            rerun.ran_on.push(worker.to_owned());
            if !still.is_empty() && rerun.runs_left > 0 {
                rerun.tests = still;
                rerun.runs_left -= 1;
                rerun.elsewhere = elsewhere;
                rerun.queued_at = unix_ms;
                module.rerun = Some(rerun);
                module.state = ModuleState::Pending {
                    attempt: attempt + 1,
                };
                return Completed::Rerunning;
            }
            let first_worker = rerun.ran_on.first().cloned().unwrap_or_default();
            rerun.first.rerun_on = rerun.ran_on.split_off(1);
            module.state = ModuleState::Done(Box::new(rerun.first));
            if let Some(evaluation) = self.evaluations.get_mut(&lease.eval) {
                evaluation.waiting = None;
            }
            self.mark_finished(lease.eval, unix_ms);
            return Completed::RerunsOver { first_worker };
        }
        let (result, completed) = match module.verifying.take() {
            Some((first_worker, first)) if same_counts(&first, &result) => {
                let _ = first_worker;
                (first, Completed::Agreed)
            }
            Some((first_worker, first)) => {
                let (stands, other) = if first_worker != owner_worker && worker == owner_worker {
                    (result, first)
                } else {
                    (first, result)
                };
                module.disputed = Some(other.clone());
                (
                    stands.clone(),
                    Completed::Disputed {
                        stands: Box::new(stands),
                        other: Box::new(other),
                    },
                )
            }
            None if verify => {
                module.verifying = Some((worker.to_owned(), result));
                module.state = ModuleState::Pending {
                    attempt: attempt + 1,
                };
                return Completed::Verifying;
            }
            None => (result, Completed::Done),
        };
        let failed_tests = result.failed_tests.clone();
        if reruns > 0
            && !failed_tests.is_empty()
            && !matches!(completed, Completed::Disputed { .. })
        {
            module.rerun = Some(Rerun {
                first: result,
                tests: failed_tests,
                runs_left: reruns - 1,
                ran_on: vec![worker.to_owned()],
                elsewhere,
                queued_at: unix_ms,
            });
            module.state = ModuleState::Pending {
                attempt: attempt + 1,
            };
            self.learn_run(lease, seconds, shape);
            return Completed::Rerunning;
        }
        module.state = ModuleState::Done(Box::new(result));
        if let Some(evaluation) = self.evaluations.get_mut(&lease.eval) {
            evaluation.waiting = None;
        }
        self.learn_run(lease, seconds, shape);
        self.mark_finished(lease.eval, unix_ms);
        completed
    }

    /// Learns from a run of `lease` that took `seconds` and said `shape`: a whole module's
    /// duration and shape; for a piece, the module's duration (the sum of its pieces') once
    /// every piece is done, that it may no longer be split if the piece says so, and its
    /// tests (without a profile) when no shape of that many tests is known.
    fn learn_run(&mut self, lease: &Lease, seconds: f64, shape: Option<Shape>) {
        let key = format!("{}/{}", lease.project, lease.path());
        let Some(piece) = &lease.piece else {
            self.learn_duration(key.clone(), seconds);
            if let Some(shape) = shape {
                self.learn_shape(key, shape);
            }
            return;
        };
        if let Some(shape) = shape {
            let known = self.shapes.get(&key);
            if shape.tests == 0 || known.is_none_or(|known| known.tests != shape.tests) {
                self.learn_shape(key.clone(), shape);
            }
        }
        let Some(project) = self
            .evaluations
            .get(&lease.eval)
            .and_then(|e| e.projects.get(&lease.project))
        else {
            return;
        };
        let mut total = 0.0;
        for module in project.modules.values() {
            if module.piece.as_ref().is_some_and(|p| p.path == piece.path) {
                let ModuleState::Done(done) = &module.state else {
                    return;
                };
                total += done.seconds;
            }
        }
        self.learn_duration(key, total);
    }

    /// Remembers what module `key` (`project/module`) held when it last ran whole
    /// (within [`MAX_DURATIONS`]).
    pub fn learn_shape(&mut self, key: String, shape: Shape) {
        if self.shapes.len() < MAX_DURATIONS || self.shapes.contains_key(&key) {
            self.shapes.insert(key, shape);
        }
    }

    /// What module `module` of project `project` held when it last ran whole; none if it
    /// never did here.
    pub fn shape(&self, project: &str, module: &str) -> Option<&Shape> {
        self.shapes.get(&format!("{project}/{module}"))
    }

    /// Splits the stragglers of evaluation `id` for `workers` workers. A module waiting for
    /// its first run, expected to take longer than its share of the evaluation's expected
    /// work (a fifth more than the work over the workers), that holds tests enough and may
    /// be split, is replaced by `k` pieces expected to take that share each (at most
    /// [`MAX_PIECES`], none under [`MIN_PIECE_SECONDS`]). A module never run on the
    /// cluster is split likewise by its estimated tests against the evaluation's (at least
    /// [`MIN_UNSEEN_SPLIT_TESTS`], [`MIN_UNSEEN_PIECE_TESTS`] a piece) when its source lets
    /// it, in equal parts of the tests it holds. Returns the modules split.
    pub fn split_stragglers(&mut self, id: EvalId, workers: usize) -> usize {
        let Some(evaluation) = self.evaluations.get(&id) else {
            return 0;
        };
        let workers = workers.max(1) as f64;
        let waiting =
            |m: &Module| m.state == ModuleState::Pending { attempt: 0 } && m.piece.is_none();
        let modules = || {
            evaluation
                .projects
                .iter()
                .flat_map(|(name, p)| p.modules.iter().map(move |(path, m)| (name, path, m)))
                .filter(|(_, _, m)| waiting(m))
        };
        let known: Vec<f64> = modules()
            .filter_map(|(_, _, m)| m.expected_seconds)
            .collect();
        let mean = known.iter().sum::<f64>() / known.len().max(1) as f64;
        let work: f64 = modules()
            .map(|(_, _, m)| m.expected_seconds.unwrap_or(mean))
            .sum();
        let share = (work / workers).max(MIN_PIECE_SECONDS);
        let tests: u64 = modules()
            .map(|(_, _, m)| u64::from(m.estimated_tests))
            .sum();
        let test_share = tests as f64 / workers;
        let mut splits = Vec::new();
        for (project_name, path, module) in modules() {
            match (module.expected_seconds, self.shape(project_name, path)) {
                (Some(expected), Some(shape)) if expected > share * 1.2 => {
                    let pieces = (expected / share)
                        .ceil()
                        .min((expected / MIN_PIECE_SECONDS).floor())
                        .min(f64::from(shape.tests))
                        .min(f64::from(MAX_PIECES)) as u32;
                    let starts = shape.starts(pieces);
                    if starts.len() >= 2 {
                        splits.push((project_name.clone(), path.clone(), Cut::Starts(starts)));
                    }
                }
                (None, None)
                    if module.may_split_unseen
                        && module.estimated_tests >= MIN_UNSEEN_SPLIT_TESTS
                        && f64::from(module.estimated_tests) > test_share * 1.2 =>
                {
                    let estimated = module.estimated_tests;
                    let pieces = ((f64::from(estimated) / test_share).ceil() as u32)
                        .min(estimated / MIN_UNSEEN_PIECE_TESTS)
                        .min(MAX_PIECES);
                    if pieces >= 2 {
                        splits.push((project_name.clone(), path.clone(), Cut::EqualParts(pieces)));
                    }
                }
                _ => {}
            }
        }
        let Some(evaluation) = self.evaluations.get_mut(&id) else {
            return 0;
        };
        for (project_name, path, cut) in &splits {
            let Some(project) = evaluation.projects.get_mut(project_name) else {
                continue;
            };
            let Some(module) = project.modules.remove(path) else {
                continue;
            };
            let (of, starts, equal_part) = match cut {
                Cut::Starts(starts) => (starts.len() as u32, starts.as_slice(), false),
                Cut::EqualParts(of) => (*of, &[][..], true),
            };
            for index in 1..=of {
                let piece = Piece {
                    path: path.clone(),
                    index,
                    of,
                    start: starts.get(index as usize - 1).copied().unwrap_or(0),
                    end: starts.get(index as usize).copied(),
                    equal_part,
                };
                let part = Module {
                    estimated_tests: module.estimated_tests / of
                        + u32::from(index <= module.estimated_tests % of),
                    expected_seconds: module.expected_seconds.map(|s| s / f64::from(of)),
                    piece: Some(piece.clone()),
                    ..module.clone()
                };
                project.modules.insert(piece.name(), part);
            }
        }
        splits.len()
    }

    /// Remembers that module `key` (`project/module`) took `seconds` (within
    /// [`MAX_DURATIONS`]).
    pub fn learn_duration(&mut self, key: String, seconds: f64) {
        if self.durations.len() < MAX_DURATIONS || self.durations.contains_key(&key) {
            self.durations.insert(key, seconds);
        }
    }

    /// Seconds module `module` of project `project` took when it last ran.
    pub fn duration(&self, project: &str, module: &str) -> Option<f64> {
        self.durations.get(&format!("{project}/{module}")).copied()
    }

    /// Records a reused result for a module still waiting for its first worker; false
    /// (nothing changes) if it is not.
    pub fn fill_cached(
        &mut self,
        eval: EvalId,
        project: &str,
        module: &str,
        result: ModuleResult,
        unix_ms: u64,
    ) -> bool {
        let Some(entry) = self.module_mut(eval, project, module) else {
            return false;
        };
        if entry.state != (ModuleState::Pending { attempt: 0 }) {
            return false;
        }
        entry.state = ModuleState::Done(Box::new(result));
        if let Some(evaluation) = self.evaluations.get_mut(&eval) {
            evaluation.started_at.get_or_insert(unix_ms);
        }
        self.mark_finished(eval, unix_ms);
        true
    }

    fn mark_finished(&mut self, eval: EvalId, unix_ms: u64) {
        if let Some(evaluation) = self.evaluations.get_mut(&eval) {
            if evaluation.status() == "done" {
                evaluation.finished_at.get_or_insert(unix_ms);
            }
        }
    }

    /// Takes back the leases past their deadline; returns them.
    pub fn expire(&mut self, now: u64, unix_ms: u64) -> Vec<Lease> {
        self.take_back(|_, deadline| deadline <= now, unix_ms)
    }

    /// Takes back every lease of a worker found gone; returns them.
    pub fn worker_lost(&mut self, worker: &str, unix_ms: u64) -> Vec<Lease> {
        self.take_back(|w, _| w == worker, unix_ms)
    }

    fn take_back(&mut self, lost: impl Fn(&str, u64) -> bool, unix_ms: u64) -> Vec<Lease> {
        let mut taken = Vec::new();
        let mut finished = Vec::new();
        for evaluation in self.evaluations.values_mut() {
            for (project_name, project) in evaluation.projects.iter_mut() {
                for (path, module) in project.modules.iter_mut() {
                    let ModuleState::Leased {
                        worker,
                        attempt,
                        deadline,
                    } = &module.state
                    else {
                        continue;
                    };
                    if !lost(worker, *deadline) {
                        continue;
                    }
                    let (worker, attempt) = (worker.clone(), *attempt);
                    taken.push(Lease {
                        eval: evaluation.id,
                        project: project_name.clone(),
                        blob: project.blob.clone(),
                        module: path.clone(),
                        attempt,
                        selection: module
                            .rerun
                            .as_ref()
                            .map(|r| r.tests.clone())
                            .unwrap_or_default(),
                        piece: module.piece.clone(),
                    });
                    module.crashes += 1;
                    module.state = if module.crashes >= MAX_CRASHES {
                        finished.push(evaluation.id);
                        if let Some(rerun) = module.rerun.take() {
                            // The reruns could not run: the first result stands.
                            ModuleState::Done(Box::new(rerun.first))
                        } else {
                            match module.verifying.take() {
                                // The verification could not run: the first result stands.
                                Some((_, first)) => ModuleState::Done(Box::new(first)),
                                None => ModuleState::Done(Box::new(ModuleResult {
                                    errors: 1,
                                    node: worker,
                                    ..ModuleResult::default()
                                })),
                            }
                        }
                    } else {
                        ModuleState::Pending {
                            attempt: attempt + 1,
                        }
                    };
                }
            }
        }
        for eval in finished {
            self.mark_finished(eval, unix_ms);
        }
        taken
    }

    /// Evaluations whose owner is `owner`.
    pub fn owned_by<'a>(&'a self, owner: &'a str) -> impl Iterator<Item = &'a Evaluation> + 'a {
        self.evaluations.values().filter(move |e| e.owner == owner)
    }

    /// Makes `new_owner` the owner of `eval` (after the old one died): its leases are kept
    /// (their workers report to the new owner).
    pub fn take_over(&mut self, eval: EvalId, new_owner: &str) -> bool {
        match self.evaluations.get_mut(&eval) {
            Some(evaluation) => {
                evaluation.owner = new_owner.to_owned();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    /// A split module's result, for the cache, joins its pieces' once all are done, in one
    /// environment, none reused.
    #[test]
    fn the_pieces_of_a_module_join_in_one_result() {
        let piece = |index: u32, node: &str, environment: &str, failed: &[&str]| {
            let result = ModuleResult {
                passed: 10,
                failed: failed.len() as u32,
                skipped: 1,
                seconds: 2.0,
                node: node.into(),
                failed_tests: failed
                    .iter()
                    .map(|t| format!("tests/test_x.py::{t}"))
                    .collect(),
                collected: Some(24),
                environment: Some(environment.into()),
                ..Default::default()
            };
            let module = Module {
                state: ModuleState::Done(Box::new(result)),
                estimated_tests: 12,
                crashes: 0,
                verifying: None,
                disputed: None,
                content: Some("c".into()),
                expected_seconds: None,
                rerun: None,
                piece: Some(Piece {
                    path: "tests/test_x.py".into(),
                    index,
                    of: 2,
                    start: 0,
                    end: None,
                    equal_part: true,
                }),
                may_split_unseen: true,
            };
            (format!("tests/test_x.py [{index}/2]"), module)
        };
        let mut project = Project {
            blob: "b".into(),
            content: Some("s".into()),
            modules: [piece(1, "a", "py", &["t1"]), piece(2, "b", "py", &["t2"])].into(),
        };
        let joined = project.joined_pieces("tests/test_x.py").unwrap();
        assert_eq!((joined.passed, joined.failed, joined.skipped), (20, 2, 2));
        assert_eq!(joined.seconds, 4.0);
        assert_eq!(joined.node, "a");
        assert_eq!(joined.pieces_by, ["a", "b"]);
        assert_eq!(
            joined.failed_tests,
            ["tests/test_x.py::t1", "tests/test_x.py::t2"]
        );
        assert_eq!(joined.collected, Some(24));
        assert!(project.joined_pieces("tests/test_y.py").is_none());

        let (name, other) = piece(2, "b", "another python", &[]);
        project.modules.insert(name.clone(), other);
        assert!(project.joined_pieces("tests/test_x.py").is_none());
        project.modules.get_mut(&name).unwrap().state = ModuleState::Pending { attempt: 0 };
        assert!(project.joined_pieces("tests/test_x.py").is_none());
    }

    fn project(name: &str, modules: &[(&str, u32)]) -> NewProject {
        NewProject {
            name: name.into(),
            blob: format!("blob-{name}"),
            content: None,
            module_content: BTreeMap::new(),
            modules: modules
                .iter()
                .map(|(m, t)| FoundModule {
                    path: (*m).into(),
                    estimated_tests: *t,
                    may_split: true,
                })
                .collect(),
        }
    }

    fn ok(passed: u32, failed: u32, seconds: f64) -> ModuleResult {
        ModuleResult {
            passed,
            failed,
            seconds,
            node: "w".into(),
            ..ModuleResult::default()
        }
    }

    #[test]
    fn modules_run_once_and_grades_follow() {
        let mut ledger = Ledger::default();
        ledger.submit(
            1,
            "o",
            0,
            vec![
                project("a", &[("tests/test_1.py", 2), ("tests/test_2.py", 1)]),
                project("b", &[("tests/test_x.py", 4)]),
            ],
        );
        assert_eq!(ledger.get(1).unwrap().status(), "queued");
        let (tests, modules) = ledger.get(1).unwrap().counts();
        assert_eq!((tests.pending, modules.pending), (7, 3));
        assert!(
            !ledger.complete(
                &Lease {
                    eval: 1,
                    project: "b".into(),
                    blob: String::new(),
                    module: "tests/test_x.py".into(),
                    attempt: 0,
                    selection: Vec::new(),
                    piece: None,
                },
                "w",
                ok(4, 0, 1.0),
                0
            ),
            "a module never leased takes no result"
        );
        let mut leases = Vec::new();
        while let Some(lease) = ledger.lease("o", "w", 0, 1000, 5) {
            leases.push(lease);
        }
        assert_eq!(leases.len(), 3);
        assert_eq!(ledger.get(1).unwrap().status(), "running");
        let results = [ok(2, 0, 1.0), ok(0, 1, 1.0), ok(3, 1, 1.0)];
        for (lease, result) in leases.iter().zip(results) {
            let project = lease.project.clone();
            let r = if project == "b" {
                ok(3, 1, 1.0)
            } else {
                result
            };
            assert!(!ledger.complete(lease, "x", r.clone(), 9), "not its lease");
            assert!(ledger.complete(lease, "w", r, 9));
        }
        assert!(
            !ledger.complete(&leases[0], "w", ok(9, 9, 1.0), 9),
            "idempotent"
        );
        let evaluation = ledger.get(1).unwrap();
        assert_eq!(evaluation.status(), "done");
        assert_eq!(evaluation.finished_at, Some(9));
        let a = evaluation.projects.get("a").unwrap();
        let b = evaluation.projects.get("b").unwrap();
        let (ta, _) = Evaluation::project_counts(a);
        let (tb, _) = Evaluation::project_counts(b);
        assert_eq!((ta.passed + ta.failed, tb.passed, tb.failed), (3, 3, 1));
        assert!((evaluation.grade() - (ta.grade() + tb.grade()) / 2.0).abs() < 1e-9);
        assert!((tb.grade() - 15.0).abs() < 1e-9);
    }

    /// A result chosen for verification is kept while another worker runs the module
    /// again (never the first one); agreeing, the first stands; disagreeing, the module is
    /// disputed and the owner's own run stands.
    #[test]
    fn a_module_seen_before_is_expected_to_take_what_it_took() {
        let mut ledger = Ledger::default();
        ledger.submit(1, "o", 0, vec![project("a", &[("tests/test_1.py", 1)])]);
        let module = |ledger: &Ledger, id| {
            ledger.get(id).unwrap().projects["a"].modules["tests/test_1.py"].expected_seconds
        };
        assert_eq!(module(&ledger, 1), None);
        let lease = ledger.lease("o", "w", 0, 1000, 0).unwrap();
        assert!(ledger.complete(&lease, "w", ok(1, 0, 1.5), 0));
        ledger.submit(2, "o", 0, vec![project("a", &[("tests/test_1.py", 1)])]);
        assert_eq!(module(&ledger, 2), Some(1.5));
        // Durations learnt from the database count the same.
        let mut restarted = Ledger::default();
        restarted.learn_duration("a/tests/test_1.py".into(), 0.5);
        restarted.submit(3, "o", 0, vec![project("a", &[("tests/test_1.py", 1)])]);
        assert_eq!(module(&restarted, 3), Some(0.5));
    }

    #[test]
    fn verifications_go_to_another_worker_and_the_owners_run_stands() {
        let mut ledger = two_modules(3, 2);
        let first = ledger.lease("o", "liar", 0, 1000, 0).unwrap();
        let lie = ModuleResult {
            node: "liar".into(),
            ..ok(2, 0, 1.0)
        };
        assert_eq!(
            ledger.complete_or_verify(&first, "liar", lie.clone(), 0, true, "own", true),
            Completed::Verifying
        );
        // The liar gets the other module, not its own verification.
        let other = ledger.lease("o", "liar", 0, 1000, 0).unwrap();
        assert_ne!(other.module, first.module);
        assert!(ledger.lease("o", "liar", 0, 1000, 0).is_none());
        let again = ledger.lease("o", "own", 0, 1000, 0).unwrap();
        assert_eq!(
            (again.module.as_str(), again.attempt),
            (first.module.as_str(), 1)
        );
        let truth = ModuleResult {
            node: "own".into(),
            ..ok(1, 1, 1.0)
        };
        assert_eq!(
            ledger.complete_or_verify(&again, "own", truth.clone(), 0, true, "own", true),
            Completed::Disputed {
                stands: Box::new(truth.clone()),
                other: Box::new(lie.clone())
            }
        );
        let module = &ledger.get(3).unwrap().projects["p"].modules[&first.module];
        assert_eq!(module.state, ModuleState::Done(Box::new(truth)));
        assert_eq!(module.disputed, Some(lie));
        // Agreeing, the first stands.
        assert_eq!(
            ledger.complete_or_verify(&other, "liar", ok(2, 0, 1.0), 0, true, "own", true),
            Completed::Verifying
        );
        let check = ledger.lease("o", "own", 0, 1000, 0).unwrap();
        assert_eq!(
            ledger.complete_or_verify(&check, "own", ok(2, 0, 3.0), 0, true, "own", true),
            Completed::Agreed
        );
        assert_eq!(ledger.get(3).unwrap().status(), "done");
    }

    #[test]
    fn lost_workers_give_modules_back_and_twice_means_failed() {
        let mut ledger = Ledger::default();
        ledger.submit(7, "o", 0, vec![project("p", &[("tests/test_hang.py", 1)])]);
        let first = ledger.lease("o", "w1", 0, 1000, 0).unwrap();
        assert_eq!(ledger.expire(999, 0), vec![]);
        assert!(ledger.renew(&first, "w1", 900, 1000));
        assert_eq!(ledger.expire(1500, 0), vec![]);
        assert_eq!(ledger.worker_lost("w1", 0), vec![first.clone()]);
        let second = ledger.lease("o", "w2", 2000, 1000, 0).unwrap();
        assert_eq!(second.attempt, 1);
        assert!(
            !ledger.complete(&first, "w1", ok(1, 0, 1.0), 0),
            "a stale attempt"
        );
        let stale_as_current = Lease {
            attempt: 1,
            ..first.clone()
        };
        assert!(
            !ledger.complete(&stale_as_current, "w1", ok(1, 0, 1.0), 0),
            "another worker's lease"
        );
        assert_eq!(ledger.expire(3000, 5), vec![second]);
        let evaluation = ledger.get(7).unwrap();
        assert_eq!(evaluation.status(), "done");
        assert_eq!(evaluation.counts().0.errors, 1);
        assert!(ledger.lease("o", "w3", 4000, 1000, 0).is_none());
    }

    /// A ledger with evaluation `id` of owner `o`: project `p` of `tests/test_a.py` and
    /// `tests/test_b.py`, each of `tests` tests.
    fn two_modules(id: EvalId, tests: u32) -> Ledger {
        let mut ledger = Ledger::default();
        ledger.submit(
            id,
            "o",
            0,
            vec![project(
                "p",
                &[("tests/test_a.py", tests), ("tests/test_b.py", tests)],
            )],
        );
        ledger
    }

    #[test]
    fn evaluations_take_turns_and_long_modules_go_first() {
        let mut ledger = two_modules(1, 1);
        let a = ledger.lease("o", "w", 0, 1000, 0).unwrap();
        let b = ledger.lease("o", "w", 0, 1000, 0).unwrap();
        ledger.complete(&a, "w", ok(1, 0, 1.0), 0);
        ledger.complete(&b, "w", ok(1, 0, 9.0), 0);
        ledger.submit(
            2,
            "o",
            0,
            vec![project(
                "p",
                &[("tests/test_a.py", 1), ("tests/test_b.py", 1)],
            )],
        );
        ledger.submit(3, "o", 0, vec![project("q", &[("tests/test_c.py", 1)])]);
        let first = ledger.lease("o", "w", 0, 1000, 0).unwrap();
        let second = ledger.lease("o", "w", 0, 1000, 0).unwrap();
        assert_ne!(first.eval, second.eval, "evaluations take turns");
        let from_two = [first, second].into_iter().find(|l| l.eval == 2).unwrap();
        assert_eq!(from_two.module, "tests/test_b.py", "the longest first");
        assert!(
            ledger.lease("x", "w", 0, 1000, 0).is_none(),
            "only the owner's"
        );
    }

    #[test]
    fn an_evaluation_without_modules_fails() {
        let mut ledger = Ledger::default();
        ledger.submit(1, "o", 0, vec![project("p", &[])]);
        assert_eq!(ledger.get(1).unwrap().status(), "failed");
    }

    /// Why a test failed is kept for a listed failed test or the module itself, once,
    /// cut to its end, within the bytes of all outputs; a worker's result keeps only such.
    #[test]
    fn why_tests_failed_is_kept_within_bounds() {
        let module = "tests/test_f.py";
        let listed = [format!("{module}::test_a"), format!("{module}::test_b")];
        let mut failures = Vec::new();
        let long = format!(
            "é{}\nE   assert 1 == 2",
            "x".repeat(2 * MAX_FAILURE_OUTPUT_BYTES)
        );
        assert!(list_failure(
            &mut failures,
            module,
            &listed,
            &listed[0],
            &long
        ));
        assert!(failures[0].output.len() <= MAX_FAILURE_OUTPUT_BYTES);
        assert!(failures[0].output.ends_with("assert 1 == 2"));
        assert!(!list_failure(
            &mut failures,
            module,
            &listed,
            &listed[0],
            "again"
        ));
        assert!(!list_failure(
            &mut failures,
            module,
            &listed,
            "tests/test_f.py::test_z",
            "not listed"
        ));
        assert!(list_failure(
            &mut failures,
            module,
            &listed,
            module,
            "SyntaxError"
        ));
        let many: Vec<String> = (0..MAX_LISTED_TESTS)
            .map(|i| format!("{module}::t{i}"))
            .collect();
        let mut full = Vec::new();
        for test in &many {
            list_failure(&mut full, module, &many, test, &long);
        }
        let bytes = serde_json::to_string(&full).unwrap().len();
        assert!(
            full.len() < many.len() && bytes <= MAX_FAILURES_BYTES,
            "{} {bytes}",
            full.len()
        );

        let mut ledger = Ledger::default();
        ledger.submit(1, "o", 0, vec![project("p", &[(module, 2)])]);
        let lease = ledger.lease("o", "a", 0, 1000, 0).unwrap();
        let mut result = failing(module, 0, &["test_a"], "a");
        result.failures = vec![
            TestFailure {
                test: listed[0].clone(),
                output: long.clone(),
            },
            TestFailure {
                test: listed[1].clone(),
                output: "not among its failed tests".into(),
            },
            TestFailure {
                test: module.into(),
                output: "timed out".into(),
            },
        ];
        ledger.complete_or_verify(&lease, "a", result, 0, false, "o", false);
        let ModuleState::Done(done) = &ledger.get(1).unwrap().projects["p"].modules[module].state
        else {
            panic!("not done");
        };
        let kept: Vec<&str> = done.failures.iter().map(|f| f.test.as_str()).collect();
        assert_eq!(kept, [listed[0].as_str(), module]);
        assert!(done.failures[0].output.len() <= MAX_FAILURE_OUTPUT_BYTES);
    }

    fn failing(module: &str, passed: u32, failed: &[&str], node: &str) -> ModuleResult {
        ModuleResult {
            passed,
            failed: failed.len() as u32,
            node: node.into(),
            failed_tests: failed.iter().map(|t| format!("{module}::{t}")).collect(),
            ..ModuleResult::default()
        }
    }

    /// Failed tests run again, alone, on another worker; one that then passes is flaky, the
    /// first result counts, and one that fails again is a real failure.
    #[test]
    fn failed_tests_run_again_elsewhere_and_flaky_ones_are_named() {
        let module = "tests/test_f.py";
        let mut ledger = Ledger::default();
        ledger.submit(1, "o", 0, vec![project("p", &[(module, 4)])]);
        assert!(ledger.set_rerun_failures(1, 1));
        let first = ledger.lease("o", "a", 0, 1000, 0).unwrap();
        assert!(first.selection.is_empty(), "the whole module first");
        let result = failing(module, 2, &["test_x", "test_y[1-2]"], "a");
        assert_eq!(
            ledger.complete_or_verify(&first, "a", result.clone(), 0, false, "o", true),
            Completed::Rerunning
        );
        assert_eq!(ledger.get(1).unwrap().status(), "running");
        assert!(
            ledger.lease("o", "a", 0, 1000, 0).is_none(),
            "not on the worker that failed them"
        );
        let late = RERUN_ELSEWHERE_MS;
        let mut waited = ledger.clone();
        let taken = waited.lease("o", "a", 0, 1000, late).unwrap();
        assert_eq!(taken.selection.len(), 2, "on it when no other came in time");
        let rerun = ledger.lease("o", "b", 0, 1000, 0).unwrap();
        assert_eq!(
            rerun.selection,
            [
                format!("{module}::test_x"),
                format!("{module}::test_y[1-2]")
            ]
        );
        let mut second = failing(module, 1, &["test_y[1-2]"], "b");
        second.passed_tests = vec![format!("{module}::test_x")];
        assert_eq!(
            ledger.complete_or_verify(&rerun, "b", second, 0, false, "o", true),
            Completed::RerunsOver {
                first_worker: "a".into()
            }
        );
        let evaluation = ledger.get(1).unwrap();
        assert_eq!(evaluation.status(), "done");
        let ModuleState::Done(done) = &evaluation.projects["p"].modules[module].state else {
            panic!("not done");
        };
        assert_eq!((done.passed, done.failed, done.node.as_str()), (2, 2, "a"));
        assert_eq!(done.flaky, [format!("{module}::test_x")]);
        assert_eq!(done.rerun_on, ["b"]);
    }

    /// Without another worker the rerun runs where the first did; reruns stop when every
    /// test passed or none is left; no reruns unless the evaluation asks; what is not a
    /// test of the module (an option, another module's test) is never run again.
    #[test]
    fn reruns_follow_the_evaluations_policy() {
        let module = "tests/test_f.py";
        let mut ledger = Ledger::default();
        ledger.submit(1, "o", 0, vec![project("p", &[(module, 4)])]);
        ledger.set_rerun_failures(1, 3);
        let lease = ledger.lease("o", "a", 0, 1000, 0).unwrap();
        let mut result = failing(module, 0, &["test_x"], "a");
        result.failed_tests.push("--rootdir=/".into());
        result
            .failed_tests
            .push("tests/test_other.py::test_z".into());
        ledger.complete_or_verify(&lease, "a", result, 0, false, "o", false);
        let again = ledger.lease("o", "a", 0, 1000, 0).unwrap();
        assert_eq!(again.selection, [format!("{module}::test_x")]);
        let still = failing(module, 0, &["test_x"], "a");
        assert_eq!(
            ledger.complete_or_verify(&again, "a", still.clone(), 0, false, "o", false),
            Completed::Rerunning,
            "runs left: it fails again"
        );
        let third = ledger.lease("o", "a", 0, 1000, 0).unwrap();
        let mut passed = ModuleResult {
            passed: 1,
            node: "a".into(),
            ..ModuleResult::default()
        };
        passed.passed_tests = vec![format!("{module}::test_x")];
        assert!(matches!(
            ledger.complete_or_verify(&third, "a", passed, 0, false, "o", false),
            Completed::RerunsOver { .. }
        ));

        ledger.submit(2, "o", 0, vec![project("q", &[(module, 1)])]);
        let lease = ledger.lease("o", "a", 0, 1000, 0).unwrap();
        assert_eq!(lease.eval, 2);
        assert_eq!(
            ledger.complete_or_verify(&lease, "a", still, 0, false, "o", true),
            Completed::Done,
            "no reruns unless asked"
        );
    }

    /// A course node, which runs only whole modules, is not given a rerun; a rerun whose
    /// workers keep being lost ends with the first result.
    #[test]
    fn reruns_go_only_to_workers_that_run_tests_by_name_and_end_when_lost() {
        let module = "tests/test_f.py";
        let mut ledger = Ledger::default();
        ledger.submit(1, "o", 0, vec![project("p", &[(module, 2)])]);
        ledger.set_rerun_failures(1, 1);
        let lease = ledger.lease("o", "a", 0, 1000, 0).unwrap();
        let first = failing(module, 1, &["test_x"], "a");
        ledger.complete_or_verify(&lease, "a", first.clone(), 0, false, "o", true);
        let whole_only = |_: &str, whole: bool| whole;
        assert!(ledger
            .lease_matching("o", "course", 0, 1000, 0, |_, _| true, whole_only)
            .is_none());
        for worker in ["b", "c"] {
            let rerun = ledger.lease("o", worker, 0, 1000, 0).unwrap();
            assert_eq!(rerun.selection.len(), 1);
            assert_eq!(ledger.worker_lost(worker, 0), [rerun]);
        }
        let evaluation = ledger.get(1).unwrap();
        assert_eq!(
            evaluation.projects["p"].modules[module].state,
            ModuleState::Done(Box::new(first))
        );
        assert_eq!(evaluation.status(), "done");
    }

    /// A module expected to take more than its share of the work, that ran whole before
    /// and may be split, becomes pieces that take the share each; a module never run, or
    /// that may not be split, stays whole; once every piece is done, the module's duration
    /// is their sum.
    #[test]
    fn stragglers_are_split_in_pieces_whose_times_add_up() {
        let mut ledger = Ledger::default();
        let modules = [
            ("tests/test_big.py", 40),
            ("tests/test_fixture.py", 40),
            ("tests/test_new.py", 4),
            ("tests/test_small.py", 4),
        ];
        let shape = |tests| Shape {
            tests,
            cuts: Vec::new(),
        };
        ledger.learn_duration("p/tests/test_big.py".into(), 8.0);
        ledger.learn_shape("p/tests/test_big.py".into(), shape(40));
        ledger.learn_duration("p/tests/test_fixture.py".into(), 8.0);
        ledger.learn_shape("p/tests/test_fixture.py".into(), shape(0));
        ledger.learn_duration("p/tests/test_small.py".into(), 1.0);
        ledger.learn_shape("p/tests/test_small.py".into(), shape(4));
        ledger.submit(1, "o", 0, vec![project("p", &modules)]);
        // Work: 8 + 8 + 1 + 1 (the unknown module counts the mean of the known, 17/3).
        assert_eq!(ledger.split_stragglers(1, 4), 1);
        let names: Vec<&String> = ledger.get(1).unwrap().projects["p"]
            .modules
            .keys()
            .collect();
        assert!(
            names.contains(&&"tests/test_fixture.py".to_owned()),
            "{names:?}"
        );
        assert!(
            names.contains(&&"tests/test_new.py".to_owned()),
            "{names:?}"
        );
        let pieces: Vec<&String> = names.iter().copied().filter(|n| n.contains(" [")).collect();
        assert_eq!(pieces.len(), 2, "{names:?}");
        assert!(pieces.contains(&&"tests/test_big.py [1/2]".to_owned()));

        let mut leases = Vec::new();
        while let Some(lease) = ledger.lease("o", "w", 0, 1000, 0) {
            leases.push(lease);
        }
        assert_eq!(leases.len(), 5);
        let first = leases.iter().find(|l| l.piece.is_some()).unwrap();
        assert_eq!(first.path(), "tests/test_big.py");
        let ranges: Vec<(u32, Option<u32>)> = leases
            .iter()
            .filter_map(|l| l.piece.as_ref().map(|p| (p.start, p.end)))
            .collect();
        assert!(
            ranges.contains(&(0, Some(20))) && ranges.contains(&(20, None)),
            "{ranges:?}"
        );
        for lease in &leases {
            let mut result = ok(10, 0, 3.0);
            result.collected = Some(40);
            result.splittable = Some(true);
            assert!(ledger.complete(lease, "w", result, 0));
        }
        assert_eq!(ledger.duration("p", "tests/test_big.py"), Some(6.0));
        assert_eq!(ledger.get(1).unwrap().counts().0.passed, 50);
        assert_eq!(ledger.split_stragglers(1, 4), 0, "nothing waits");
    }

    /// A module never run is split on its first run when its source lets it and holds far
    /// more tests than its share, in equal parts; the pieces' runs teach its duration and
    /// its tests, so it is split by them the next time.
    #[test]
    fn a_large_module_never_seen_is_split_in_equal_parts() {
        let mut ledger = Ledger::default();
        let mut whole = project(
            "p",
            &[("tests/test_huge.py", 400), ("tests/test_kept.py", 400)],
        );
        whole.modules[1].may_split = false;
        whole.modules.push(FoundModule {
            path: "tests/test_small.py".into(),
            estimated_tests: 10,
            may_split: true,
        });
        ledger.submit(1, "o", 0, vec![whole.clone()]);
        // 810 tests over 3 workers: a share of 270; 400 is more than a fifth over it.
        assert_eq!(ledger.split_stragglers(1, 3), 1);
        let mut leases = Vec::new();
        while let Some(lease) = ledger.lease("o", "w", 0, 1000, 0) {
            leases.push(lease);
        }
        let shards: Vec<String> = leases
            .iter()
            .filter_map(|l| l.piece.as_ref().map(Piece::shard))
            .collect();
        assert_eq!(shards, ["1/2", "2/2"], "{leases:?}");
        assert_eq!(leases.len(), 4);
        for lease in &leases {
            let mut result = ok(10, 0, 2.0);
            result.collected = Some(400);
            result.splittable = Some(true);
            assert!(ledger.complete(lease, "w", result, 0));
        }
        assert_eq!(ledger.duration("p", "tests/test_huge.py"), Some(4.0));
        assert_eq!(ledger.shape("p", "tests/test_huge.py").unwrap().tests, 400);

        // Known now: split by its duration, in ranges of its tests.
        ledger.submit(2, "o", 0, vec![whole]);
        assert_eq!(ledger.split_stragglers(2, 3), 1);
        let ranges: Vec<String> = ledger.get(2).unwrap().projects["p"]
            .modules
            .values()
            .filter_map(|m| m.piece.as_ref().map(Piece::shard))
            .collect();
        assert_eq!(ranges, ["0:200", "200:"]);

        // Too few tests to tell: never split unseen.
        let mut ledger = Ledger::default();
        ledger.submit(
            3,
            "o",
            0,
            vec![project(
                "p",
                &[("tests/test_a.py", 90), ("tests/test_b.py", 1)],
            )],
        );
        assert_eq!(ledger.split_stragglers(3, 3), 0);
    }

    /// Pieces are cut where the module's time is shared evenly when its profile is known
    /// (a slow test at the start gets a piece of its own), by count when not, and never
    /// leave a piece empty.
    #[test]
    fn pieces_are_cut_by_time_when_the_profile_is_known() {
        let by_count = Shape {
            tests: 10,
            cuts: Vec::new(),
        };
        assert_eq!(by_count.starts(2), [0, 5]);
        assert_eq!(by_count.starts(3), [0, 3, 6]);
        // Test 0 takes half the time; the other 99 the rest, evenly.
        let cuts: Vec<u32> = (1..PROFILE_PARTS)
            .map(|j| if j <= 8 { 1 } else { 1 + (j - 8) * 99 / 8 })
            .collect();
        let profiled = Shape { tests: 100, cuts };
        assert_eq!(profiled.starts(2), [0, 1]);
        let three = profiled.starts(3);
        assert_eq!(three.len(), 3, "{three:?}");
        assert_eq!(three[1], 1);
        let few = Shape {
            tests: 2,
            cuts: Vec::new(),
        };
        assert_eq!(few.starts(4), [0, 1], "no empty piece");
    }
}
