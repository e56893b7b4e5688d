//! The node's key file: created on first start with fresh randomness from the operating
//! system, readable by its owner only (mode 0600); a key file others can read is refused.
//! It holds one line: the 32-byte secret, unpadded base64url.

use std::io::Write;
use std::path::{Path, PathBuf};

use teia_core::identity::{self, Identity};

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing it failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Others may read it.
    #[error("key file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Its content is not a key.
    #[error("key file {0} does not hold a teia secret key (one line of 43 base64url characters)")]
    Malformed(PathBuf),
    /// The operating system gave no randomness.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

fn random_seed() -> Result<[u8; 32], IdentityError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
    Ok(seed)
}

/// A fresh key kept in memory only (for one-shot commands such as `teia send`).
pub fn ephemeral() -> Result<Identity, IdentityError> {
    Ok(Identity::from_seed(&random_seed()?))
}

/// Reads the key at `path`, or creates it (and its directory) if there is none.
pub fn load_or_create(path: &Path) -> Result<Identity, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            check_private(path)?;
            let seed = identity::decode(text.trim())
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| IdentityError::Malformed(path.to_owned()))?;
            Ok(Identity::from_seed(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed = random_seed()?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(io)?;
            writeln!(file, "{}", identity::encode(&seed)).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(Identity::from_seed(&seed))
        }
        Err(e) => Err(io(e)),
    }
}

/// Reads the public key of the key file at `path`, without creating one.
pub fn load(path: &Path) -> Result<Identity, IdentityError> {
    if !path.exists() {
        return Err(IdentityError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such key file"),
        });
    }
    load_or_create(path)
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|source| IdentityError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), IdentityError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_refused_when_exposed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes/a@U.key");
        let first = load_or_create(&path).unwrap();
        let again = load_or_create(&path).unwrap();
        assert_eq!(first.public_key(), again.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let error = load_or_create(&path).unwrap_err();
            assert!(error.to_string().contains("chmod 600"), "{error}");
        }
        std::fs::write(dir.path().join("bad.key"), "nonsense\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.path().join("bad.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        assert!(matches!(
            load_or_create(&dir.path().join("bad.key")),
            Err(IdentityError::Malformed(_))
        ));
        assert!(load(&dir.path().join("none.key")).is_err());
    }
}
