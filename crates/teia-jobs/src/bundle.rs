//! Submissions on disk: unpacking a submitted ZIP safely (no path out of the folder, no
//! links, bounded in entries and in bytes actually written, so a zip bomb stops at the
//! limit), finding its projects (one per top-level folder with a `tests/` folder, or the
//! archive itself when it has `tests/` at its root) and their test modules, and packing a
//! project into a ZIP of its own for the workers that fetch it.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::proto::discover::{estimate_tests, is_test_module, may_split, FoundModule};

/// Entries an archive may hold at most.
pub const MAX_ENTRIES: usize = 20_000;
/// Bytes an archive may expand to at most.
pub const MAX_EXPANDED: u64 = 1024 * 1024 * 1024;
/// Expansion ratio an entry may have at most (beyond 1 MiB): more is taken for a zip bomb.
pub const MAX_RATIO: u64 = 200;

/// Why a submission is refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a ZIP archive.
    #[error("not a ZIP archive: {0}")]
    NotZip(String),
    /// An entry's path leaves the archive (`..`, absolute) or is a link.
    #[error("entry {0:?} escapes the archive (zip-slip) or is a link; refused")]
    Escape(String),
    /// Too many entries.
    #[error("more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// It expands beyond the limits (a zip bomb, or just too big).
    #[error("expands to more than {limit} bytes (or more than {MAX_RATIO} times its size): refused as a zip bomb")]
    TooBig {
        /// The limit passed.
        limit: u64,
    },
    /// No project in it.
    #[error("no project: the archive must hold folders with a tests/ folder of test_*.py modules")]
    NoProject,
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn zip_error(e: zip::result::ZipError) -> BundleError {
    match e {
        zip::result::ZipError::Io(e) => BundleError::Io(e),
        other => BundleError::NotZip(other.to_string()),
    }
}

/// Unpacks the archive at `archive` into `into` (created), within the limits.
pub fn unpack(archive: &Path, into: &Path) -> Result<(), BundleError> {
    unpack_within(archive, into, MAX_EXPANDED)
}

/// Unpacks as [`unpack`] does, expanding to `limit` bytes at most (and [`MAX_EXPANDED`]).
pub fn unpack_within(archive: &Path, into: &Path, limit: u64) -> Result<(), BundleError> {
    let limit = limit.min(MAX_EXPANDED);
    let file = std::fs::File::open(archive)?;
    let mut zip = zip::ZipArchive::new(file).map_err(zip_error)?;
    if zip.len() > MAX_ENTRIES {
        return Err(BundleError::TooManyEntries);
    }
    std::fs::create_dir_all(into)?;
    let mut written: u64 = 0;
    let mut buffer = vec![0u8; 64 * 1024];
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(zip_error)?;
        let name = entry.name().map(|n| n.into_owned()).unwrap_or_default();
        let Some(relative) = entry.enclosed_name() else {
            return Err(BundleError::Escape(name));
        };
        if entry.is_symlink()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(BundleError::Escape(name));
        }
        let target = into.join(&relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&target)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let compressed = entry.compressed_size().max(1);
        let mut out = std::fs::File::create(&target)?;
        let mut entry_bytes: u64 = 0;
        loop {
            let n = entry.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            entry_bytes += n as u64;
            written += n as u64;
            if written > limit {
                return Err(BundleError::TooBig { limit });
            }
            if entry_bytes > 1024 * 1024 && entry_bytes / compressed > MAX_RATIO {
                return Err(BundleError::TooBig { limit: written });
            }
            out.write_all(buffer.get(..n).unwrap_or_default())?;
        }
    }
    Ok(())
}

/// A project found in a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundProject {
    /// Its name.
    pub name: String,
    /// Its folder.
    pub dir: PathBuf,
    /// Its test modules (paths relative to it), with their estimated tests.
    pub modules: Vec<FoundModule>,
}

/// The test modules of the project in `dir`; none may be split before it ran when one of
/// the project's `conftest.py` files (its own or under `tests/`) says it must not.
fn modules_of(dir: &Path) -> std::io::Result<Vec<FoundModule>> {
    let mut found = Vec::new();
    let splittable_source =
        |path: &Path| may_split(&std::fs::read_to_string(path).unwrap_or_default());
    let mut conftests_allow = splittable_source(&dir.join("conftest.py"));
    let mut stack = vec![dir.join("tests")];
    while let Some(folder) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let relative = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .replace('\\', "/");
                if is_test_module(&relative) {
                    let source = std::fs::read_to_string(&path).unwrap_or_default();
                    found.push(FoundModule {
                        path: relative,
                        estimated_tests: estimate_tests(&source),
                        may_split: may_split(&source),
                    });
                } else if relative.ends_with("/conftest.py") {
                    conftests_allow &= splittable_source(&path);
                }
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    for module in &mut found {
        module.may_split &= conftests_allow;
    }
    Ok(found)
}

/// The projects of an unpacked submission: each top-level folder with a `tests/` folder,
/// or the folder itself (named `fallback`) when it has one.
pub fn projects(root: &Path, fallback: &str) -> Result<Vec<FoundProject>, BundleError> {
    let mut found = Vec::new();
    if root.join("tests").is_dir() {
        found.push(FoundProject {
            name: fallback.to_owned(),
            dir: root.to_owned(),
            modules: modules_of(root)?,
        });
    } else {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(root)?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        entries.sort();
        for dir in entries {
            if !dir.join("tests").is_dir() {
                continue;
            }
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            found.push(FoundProject {
                name,
                modules: modules_of(&dir)?,
                dir,
            });
        }
    }
    if found.iter().all(|p| p.modules.is_empty()) {
        return Err(BundleError::NoProject);
    }
    Ok(found)
}

/// What pytest and Python write into a project as it runs: left out of its content hash.
fn written_by_runs(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    name == "__pycache__" || name == ".pytest_cache" || name.ends_with(".pyc")
}

/// A project's files as the result cache sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectContent {
    /// The hash of every file but the test modules (sources, `conftest.py`, data,
    /// requirements): what any module may depend on.
    pub shared: String,
    /// Each test module's own hash, by path.
    pub modules: std::collections::BTreeMap<String, String>,
}

/// The hashes of a project's files, whatever their times or the order they were packed in:
/// BLAKE3 over each regular file's path (relative, `/`-separated, in sorted order), length
/// and bytes, the test modules (`tests/**/test_*.py`) apart from the rest; links are not
/// followed, and what pytest and Python write as they run (`__pycache__`, `.pytest_cache`,
/// `*.pyc`) is left out. Files are read in pieces.
pub fn content_hashes(dir: &Path) -> std::io::Result<ProjectContent> {
    let mut stack = vec![dir.to_owned()];
    let mut files = Vec::new();
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            if written_by_runs(&entry.file_name()) {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    let mut named: Vec<(String, std::path::PathBuf)> = files
        .into_iter()
        .map(|path| {
            let relative = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            (relative, path)
        })
        .collect();
    named.sort();
    let mut shared = blake3::Hasher::new_derive_key("teia project content v1");
    let mut modules = std::collections::BTreeMap::new();
    for (relative, path) in named {
        let file = std::fs::File::open(&path)?;
        let length = file.metadata()?.len();
        let mut module = blake3::Hasher::new_derive_key("teia project content v1");
        let hasher = if is_test_module(&relative) {
            &mut module
        } else {
            &mut shared
        };
        hasher.update(&(relative.len() as u64).to_le_bytes());
        hasher.update(relative.as_bytes());
        hasher.update(&length.to_le_bytes());
        hasher.update_reader(file.take(length))?;
        if is_test_module(&relative) {
            modules.insert(relative, module.finalize().to_hex().to_string());
        }
    }
    Ok(ProjectContent {
        shared: shared.finalize().to_hex().to_string(),
        modules,
    })
}

/// Packs `dir` into a ZIP at `out` (entries in sorted order; links not followed).
pub fn pack(dir: &Path, out: &Path) -> Result<(), BundleError> {
    pack_under(dir, "", out)
}

/// Packs `dir` as [`pack`] does, each entry under the folder `prefix` (none when empty).
pub fn pack_under(dir: &Path, prefix: &str, out: &Path) -> Result<(), BundleError> {
    let file = std::fs::File::create(out)?;
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut stack = vec![dir.to_owned()];
    let mut files = Vec::new();
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder)?.flatten() {
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    let mut buffer = vec![0u8; 64 * 1024];
    for path in files {
        let relative = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        let name = if prefix.is_empty() {
            relative
        } else {
            format!("{prefix}/{relative}")
        };
        zip.start_file(name, options).map_err(zip_error)?;
        let mut source = std::fs::File::open(&path)?;
        loop {
            let n = source.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            zip.write_all(buffer.get(..n).unwrap_or_default())?;
        }
    }
    zip.finish().map_err(zip_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in entries {
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    #[test]
    fn the_content_hash_sees_files_not_times_nor_what_runs_write() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("p");
        std::fs::create_dir_all(project.join("tests/__pycache__")).unwrap();
        std::fs::write(project.join("tests/test_a.py"), "def test_1(): pass\n").unwrap();
        std::fs::write(project.join("tests/test_b.py"), "def test_1(): pass\n").unwrap();
        let first = content_hashes(&project).unwrap();
        std::fs::write(project.join("tests/__pycache__/x.pyc"), "junk").unwrap();
        std::fs::write(project.join("tests/test_a.py"), "def test_1(): pass\n").unwrap();
        assert_eq!(content_hashes(&project).unwrap(), first);
        // One module changed: its hash alone.
        std::fs::write(project.join("tests/test_a.py"), "def test_1(): assert 0\n").unwrap();
        let changed = content_hashes(&project).unwrap();
        assert_eq!(changed.shared, first.shared);
        assert_ne!(
            changed.modules["tests/test_a.py"],
            first.modules["tests/test_a.py"]
        );
        assert_eq!(
            changed.modules["tests/test_b.py"],
            first.modules["tests/test_b.py"]
        );
        // Anything else changed: what every module shares.
        std::fs::write(project.join("tests/conftest.py"), "").unwrap();
        assert_ne!(content_hashes(&project).unwrap().shared, first.shared);
    }

    #[test]
    fn projects_and_modules_are_found_and_packed() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("all.zip");
        write_zip(
            &archive,
            &[
                ("alpha/src/a.py", b"x = 1\n"),
                (
                    "alpha/tests/test_a.py",
                    b"def test_1(): pass\ndef test_2(): pass\n",
                ),
                ("alpha/tests/sub/test_b.py", b"def test_3(): pass\n"),
                ("beta/tests/test_c.py", b"def test_4(): pass\n"),
                ("beta/tests/test_d.py", b"def test_5(): pass\n"),
                (
                    "beta/tests/conftest.py",
                    b"@pytest.fixture(scope='module')\ndef db(): pass\n",
                ),
                ("notes/readme.txt", b"no tests here"),
            ],
        );
        let root = dir.path().join("unpacked");
        unpack(&archive, &root).unwrap();
        let found = projects(&root, "project").unwrap();
        let names: Vec<&str> = found.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["alpha", "beta"]);
        let module = |path: &str, estimated_tests, may_split| FoundModule {
            path: path.to_owned(),
            estimated_tests,
            may_split,
        };
        assert_eq!(
            found[0].modules,
            vec![
                module("tests/sub/test_b.py", 1, true),
                module("tests/test_a.py", 2, true)
            ]
        );
        // A conftest.py with a module-scoped fixture keeps all its project's modules whole.
        assert_eq!(
            found[1].modules,
            vec![
                module("tests/test_c.py", 1, false),
                module("tests/test_d.py", 1, false)
            ]
        );
        let packed = dir.path().join("alpha.zip");
        pack(&found[0].dir, &packed).unwrap();
        let again = dir.path().join("again");
        unpack(&packed, &again).unwrap();
        assert!(again.join("tests/sub/test_b.py").is_file());
    }

    #[test]
    fn escapes_bombs_and_empty_archives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let slip = dir.path().join("slip.zip");
        write_zip(&slip, &[("../evil.py", b"x")]);
        assert!(matches!(
            unpack(&slip, &dir.path().join("a")),
            Err(BundleError::Escape(_))
        ));
        assert!(!dir.path().join("evil.py").exists());
        let bomb = dir.path().join("bomb.zip");
        let zeros = vec![0u8; 20 * 1024 * 1024];
        write_zip(&bomb, &[("p/tests/test_x.py", &zeros)]);
        assert!(matches!(
            unpack(&bomb, &dir.path().join("b")),
            Err(BundleError::TooBig { .. })
        ));
        let within = dir.path().join("within.zip");
        write_zip(
            &within,
            &[("p/a.txt", &[b'a'; 600]), ("p/b.txt", &[b'b'; 600])],
        );
        assert!(
            matches!(
                unpack_within(&within, &dir.path().join("w"), 1000),
                Err(BundleError::TooBig { limit: 1000 })
            ),
            "the disk left for evaluations bounds what one expands to"
        );
        unpack_within(&within, &dir.path().join("w2"), 1200).unwrap();
        let empty = dir.path().join("empty.zip");
        write_zip(&empty, &[("p/readme.txt", b"hi")]);
        unpack(&empty, &dir.path().join("c")).unwrap();
        assert!(matches!(
            projects(&dir.path().join("c"), "x"),
            Err(BundleError::NoProject)
        ));
        let junk = dir.path().join("junk.zip");
        std::fs::write(&junk, b"not a zip").unwrap();
        assert!(matches!(
            unpack(&junk, &dir.path().join("d")),
            Err(BundleError::NotZip(_))
        ));
    }
}
