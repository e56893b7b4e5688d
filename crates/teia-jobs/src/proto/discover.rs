//! Finding a project's test modules cheaply, without a `pytest --collect-only` pass: the
//! files `tests/test_*.py` and `tests/**/test_*.py`, with an estimate of their tests (the
//! `def test_` lines, parametrisation not counted), and whether their source lets them be
//! split before they ever ran.

/// A test module found in a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundModule {
    /// Its path relative to the project (`tests/test_x.py`).
    pub path: String,
    /// Tests it seems to hold.
    pub estimated_tests: u32,
    /// Whether its source, and its project's `conftest.py` files, show nothing that
    /// splitting it could change ([`may_split`]).
    pub may_split: bool,
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

/// Whether a module's (or a `conftest.py`'s) source shows nothing that running its tests
/// in several processes could change: no fixture of another scope than `function`,
/// `package` or `session` (a `scope=` that is not one of those literals, a callable
/// included: each module already runs in a process of its own), no
/// `setup_module`/`setup_class` (nor their `teardown_`, nor unittest's `setUpModule` and
/// `setUpClass`), no `teia_no_split` mark. Cheap and conservative: text, not code, is read,
/// so a comment naming one of them keeps the module whole too.
pub fn may_split(source: &str) -> bool {
    const WHOLE_MODULE: [&str; 9] = [
        "setup_module",
        "teardown_module",
        "setup_class",
        "teardown_class",
        "setUpModule",
        "tearDownModule",
        "setUpClass",
        "tearDownClass",
        "teia_no_split",
    ];
    if WHOLE_MODULE.iter().any(|word| source.contains(word)) {
        return false;
    }
    source.match_indices("scope").all(|(at, word)| {
        let rest = source.get(at + word.len()..).unwrap_or_default();
        let Some(value) = rest.trim_start().strip_prefix('=') else {
            return true;
        };
        let value = value.trim_start();
        ["function", "package", "session"].iter().any(|scope| {
            [format!("\"{scope}\""), format!("'{scope}'")]
                .iter()
                .any(|allowed| value.starts_with(allowed.as_str()))
        })
    })
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

    #[test]
    fn only_function_and_session_scopes_let_a_module_be_split_unseen() {
        assert!(may_split("def test_a():\n    pass\n"));
        assert!(may_split(
            "@pytest.fixture(scope='session')\ndef db(): ...\n@pytest.fixture(scope = \"function\")\ndef x(): ...\n@pytest.fixture(scope='package')\ndef y(): ...\nscope_name = 1\n"
        ));
        for whole in [
            "@pytest.fixture(scope='module')\ndef db(): ...\n",
            "@pytest.fixture(scope=\"class\")\ndef db(): ...\n",
            "@pytest.fixture(scope=pick_scope)\ndef db(): ...\n",
            "def setup_module():\n    pass\n",
            "class T(unittest.TestCase):\n    @classmethod\n    def setUpClass(cls): ...\n",
            "pytestmark = pytest.mark.teia_no_split\n",
        ] {
            assert!(!may_split(whole), "{whole}");
        }
    }
}
