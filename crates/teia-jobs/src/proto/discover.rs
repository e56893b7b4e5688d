//! Finding a project's test modules cheaply, without a `pytest --collect-only` pass: the
//! files `tests/test_*.py` and `tests/**/test_*.py`, with an estimate of their tests (the
//! `def test_` lines, parametrisation not counted).

/// A test module found in a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundModule {
    /// Its path relative to the project (`tests/test_x.py`).
    pub path: String,
    /// Tests it seems to hold.
    pub estimated_tests: u32,
}

/// Whether `path` (relative to the project, `/`-separated) is a test module.
pub fn is_test_module(path: &str) -> bool {
    let mut parts = path.split('/');
    if parts.next() != Some("tests") {
        return false;
    }
    let Some(name) = path.rsplit('/').next() else {
        return false;
    };
    name.starts_with("test_") && name.ends_with(".py") && path.len() > "tests/".len()
}

/// Tests a module's source seems to define.
pub fn estimate_tests(source: &str) -> u32 {
    source
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("def test") || l.starts_with("async def test"))
        .count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_test_files_under_tests() {
        assert!(is_test_module("tests/test_a.py"));
        assert!(is_test_module("tests/unit/deep/test_b.py"));
        assert!(!is_test_module("tests/helpers.py"));
        assert!(!is_test_module("src/test_a.py"));
        assert!(!is_test_module("tests/test_a.pyc"));
        assert!(!is_test_module("test_a.py"));
        let source = "import x\n\ndef test_one():\n    pass\n\nclass T:\n    def test_two(self):\n        pass\n    async def test_three(self): pass\ndef helper(): pass\n";
        assert_eq!(estimate_tests(source), 3);
    }
}
