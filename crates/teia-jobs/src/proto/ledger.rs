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

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An evaluation's id: a JSON integer below 2^53.
pub type EvalId = u64;

/// Times a module may lose its worker before it is recorded as failed.
pub const MAX_CRASHES: u32 = 2;

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
    /// The node that ran it.
    pub node: String,
    /// Where the result was reused from, when it was not run for this evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<CachedFrom>,
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
    Done(ModuleResult),
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
    /// A verification agreed with the first result, which stands.
    Agreed,
    /// A verification disagreed: `stands` is kept (the owner's own run, else the first),
    /// `other` is recorded beside it.
    Disputed {
        /// The result kept.
        stands: ModuleResult,
        /// The other.
        other: ModuleResult,
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
    /// Its modules and their estimated tests.
    pub modules: Vec<(String, u32)>,
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
                    .map(|(path, estimated_tests)| {
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
            },
        );
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
        self.lease_matching(owner, worker, now, lease_ms, unix_ms, |_, _| true, |_| true)
    }

    /// As [`Ledger::lease`], handing out only modules of projects for which
    /// `ready(submitted_at, blob)` holds (their bytes are replicated enough), and only
    /// modules whose path `module_ok` takes (a worker that can run only some).
    #[allow(clippy::too_many_arguments)]
    pub fn lease_matching(
        &mut self,
        owner: &str,
        worker: &str,
        now: u64,
        lease_ms: u64,
        unix_ms: u64,
        ready: impl Fn(u64, &str) -> bool,
        module_ok: impl Fn(&str) -> bool,
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
            let durations = &self.durations;
            let Some(evaluation) = self.evaluations.get_mut(&id) else {
                continue;
            };
            let mut best: Option<(f64, String, String)> = None;
            for (project_name, project) in &evaluation.projects {
                if !ready(evaluation.submitted_at, &project.blob) {
                    continue;
                }
                for (path, module) in &project.modules {
                    if !matches!(module.state, ModuleState::Pending { .. }) || !module_ok(path) {
                        continue;
                    }
                    // A verification goes to another worker than the first run's.
                    if module.verifying.as_ref().is_some_and(|(w, _)| w == worker) {
                        continue;
                    }
                    let seconds = durations
                        .get(&format!("{project_name}/{path}"))
                        .copied()
                        .unwrap_or(0.0);
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
        self.complete_or_verify(lease, worker, result, unix_ms, false, "") != Completed::Refused
    }

    /// Records `worker`'s result as [`Ledger::complete`] does; when `verify`, the result is
    /// kept and the module runs again on another worker, whose result then either agrees
    /// (the first stands) or not (the module is disputed: the run of `owner_worker`, the
    /// owner's own workers, stands, else the first).
    pub fn complete_or_verify(
        &mut self,
        lease: &Lease,
        worker: &str,
        result: ModuleResult,
        unix_ms: u64,
        verify: bool,
        owner_worker: &str,
    ) -> Completed {
        let key = format!("{}/{}", lease.project, lease.module);
        let seconds = result.seconds;
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
                (stands.clone(), Completed::Disputed { stands, other })
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
        module.state = ModuleState::Done(result);
        if let Some(evaluation) = self.evaluations.get_mut(&lease.eval) {
            evaluation.waiting = None;
        }
        self.learn_duration(key, seconds);
        self.mark_finished(lease.eval, unix_ms);
        completed
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
        entry.state = ModuleState::Done(result);
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
                    });
                    module.crashes += 1;
                    module.state = if module.crashes >= MAX_CRASHES {
                        finished.push(evaluation.id);
                        match module.verifying.take() {
                            // The verification could not run: the first result stands.
                            Some((_, first)) => ModuleState::Done(first),
                            None => ModuleState::Done(ModuleResult {
                                errors: 1,
                                node: worker,
                                ..ModuleResult::default()
                            }),
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

    fn project(name: &str, modules: &[(&str, u32)]) -> NewProject {
        NewProject {
            name: name.into(),
            blob: format!("blob-{name}"),
            content: None,
            module_content: BTreeMap::new(),
            modules: modules.iter().map(|(m, t)| ((*m).into(), *t)).collect(),
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
            ledger.complete_or_verify(&first, "liar", lie.clone(), 0, true, "own"),
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
            ledger.complete_or_verify(&again, "own", truth.clone(), 0, true, "own"),
            Completed::Disputed {
                stands: truth.clone(),
                other: lie.clone()
            }
        );
        let module = &ledger.get(3).unwrap().projects["p"].modules[&first.module];
        assert_eq!(module.state, ModuleState::Done(truth));
        assert_eq!(module.disputed, Some(lie));
        // Agreeing, the first stands.
        assert_eq!(
            ledger.complete_or_verify(&other, "liar", ok(2, 0, 1.0), 0, true, "own"),
            Completed::Verifying
        );
        let check = ledger.lease("o", "own", 0, 1000, 0).unwrap();
        assert_eq!(
            ledger.complete_or_verify(&check, "own", ok(2, 0, 3.0), 0, true, "own"),
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
}
