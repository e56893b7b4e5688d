//! The result cache's rules, sans-IO: the key a module's result is kept under, which
//! results are kept, and which are reused.
//!
//! A module's result is reused when nothing it can depend on changed, as far as a node can
//! see: the project's files but its other test modules (`bundle::content_hashes`: paths
//! and bytes, not times, without what pytest writes), the module's own file and path, and
//! the environment it ran in (Python's version, pytest's, the operating system and
//! processor), hashed together ([`key`]). So a change to one test module runs that module
//! alone again, and a change to anything else (sources, `conftest.py`, data,
//! requirements) runs every module. What it cannot see: a test module that imports
//! another test module, what a test reads from outside its project (the network, the
//! clock, files elsewhere, environment variables), and the packages a project's
//! `requirements.txt` leaves unpinned (its environment is built again from the index).
//! Those who depend on such things turn it off: per submission (`cache=false`) or per node
//! (`--no-result-cache`).
//!
//! Kept: results of modules run by this node or a node of its cluster (never by course
//! nodes, which prove nothing), that were not themselves reused, and, unless
//! [`Policy::keep_failures`], only those with no failure and no error: a module that failed
//! runs again. A result that a verification disputed is not kept. Each result is keyed on
//! the environment of the node that ran it ([`ModuleResult::environment`]), and reused
//! under the environment of the node looking: so a cluster shares its cache (each node
//! keeps the results it sees in the evaluations it owns and those it replicates) while a
//! node with another Python or pytest reuses none of them.
//!
//! **Bounds**: [`Policy::max_bytes`] bytes of kept results ([`MAX_BYTES`] by default); past
//! it, the oldest are evicted first.

use super::ledger::ModuleResult;

/// Bytes of results kept by default.
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;

/// How a node uses its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What the results depend on besides the project and the module ([`environment`]).
    pub environment: String,
    /// Whether results with failures or errors are reused too (`--cache-failures`).
    pub keep_failures: bool,
    /// Bytes of results kept at most.
    pub max_bytes: u64,
}

/// The environment part of the key: Python's version, pytest's, the operating system and
/// the processor.
pub fn environment(python: &str, pytest: &str) -> String {
    format!(
        "python {python}; pytest {pytest}; {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// The key of module `module` (its file hashing to `module_content`) of a project whose
/// other files hash to `shared`, run in `environment`.
pub fn key(environment: &str, shared: &str, module: &str, module_content: &str) -> String {
    let mut hasher = blake3::Hasher::new_derive_key("teia result cache v1");
    for part in [environment, shared, module, module_content] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

/// Whether a result is kept: run (not reused) by a worker whose results count for the
/// cache, in an environment it says, and reusable under `policy`.
pub fn keeps(policy: &Policy, result: &ModuleResult, trusted_worker: bool) -> bool {
    trusted_worker
        && result.cached.is_none()
        && result.environment.is_some()
        && reusable(policy, result)
}

/// The key `result` of module `module` (its file hashing to `module_content`, the other
/// files of its project to `shared`) is kept under: in the environment it ran in.
pub fn key_of_result(
    result: &ModuleResult,
    shared: &str,
    module: &str,
    module_content: &str,
) -> Option<String> {
    let environment = result.environment.as_deref()?;
    Some(key(environment, shared, module, module_content))
}

/// Whether a kept result may serve a new evaluation.
pub fn reusable(policy: &Policy, result: &ModuleResult) -> bool {
    policy.keep_failures || (result.failed == 0 && result.errors == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(keep_failures: bool) -> Policy {
        Policy {
            environment: environment("3.11.7", "8.3.5"),
            keep_failures,
            max_bytes: MAX_BYTES,
        }
    }

    #[test]
    fn the_key_changes_with_each_part() {
        let env = environment("3.11.7", "8.3.5");
        let base = key(&env, "abc", "tests/test_a.py", "m1");
        assert_eq!(base, key(&env, "abc", "tests/test_a.py", "m1"));
        assert_ne!(base, key(&env, "abd", "tests/test_a.py", "m1"));
        assert_ne!(base, key(&env, "abc", "tests/test_b.py", "m1"));
        assert_ne!(base, key(&env, "abc", "tests/test_a.py", "m2"));
        assert_ne!(
            base,
            key(
                &environment("3.12.1", "8.3.5"),
                "abc",
                "tests/test_a.py",
                "m1"
            )
        );
        // Parts are length-prefixed: moving a boundary changes the key.
        assert_ne!(
            key(&env, "ab", "ctests/test_a.py", "m1"),
            key(&env, "abc", "tests/test_a.py", "m1")
        );
    }

    #[test]
    fn failures_run_again_unless_kept_and_reused_results_are_not_kept_again() {
        let passed = ModuleResult {
            passed: 3,
            environment: Some(policy(false).environment),
            ..ModuleResult::default()
        };
        let failed = ModuleResult {
            passed: 2,
            failed: 1,
            environment: Some(policy(false).environment),
            ..ModuleResult::default()
        };
        assert!(keeps(&policy(false), &passed, true));
        assert!(!keeps(&policy(false), &passed, false));
        let unsaid = ModuleResult {
            environment: None,
            ..passed.clone()
        };
        assert!(
            !keeps(&policy(false), &unsaid, true),
            "an environment unknown"
        );
        assert!(!keeps(&policy(false), &failed, true));
        assert!(keeps(&policy(true), &failed, true));
        let reused = ModuleResult {
            cached: Some(crate::proto::ledger::CachedFrom {
                eval: 1,
                node: "n".into(),
            }),
            ..passed
        };
        assert!(!keeps(&policy(false), &reused, true));
    }
}
