//! The node key: one secp256k1 keypair per node, the libp2p identity and the commitment signer.
//!
//! Stored as libp2p's protobuf encoding in a file created with mode 0600 and reused on every start.

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// Failures loading or creating a node key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file exists but holds no valid secp256k1 key.
    #[error("key file {path} does not hold a secp256k1 key")]
    Invalid {
        /// The key file.
        path: PathBuf,
    },
}

/// Loads the key at `path`, or creates a new one there (directories included, file mode 0600).
pub fn load_or_create(path: &Path) -> Result<Keypair, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let key = Keypair::from_protobuf_encoding(&bytes).map_err(|_| KeyError::Invalid {
                path: path.to_path_buf(),
            })?;
            if key.clone().try_into_secp256k1().is_err() {
                return Err(KeyError::Invalid {
                    path: path.to_path_buf(),
                });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_secp256k1();
            let bytes = key.to_protobuf_encoding().map_err(|_| KeyError::Invalid {
                path: path.to_path_buf(),
            })?;
            create_private(path, &bytes).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Writes `bytes` to a new file at `path` (directories included) that only its owner can read
/// (mode 0600); never over an existing file.
pub(crate) fn create_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("proofmesh-key-{}", rand::random::<u64>()));
        let path = dir.join("node.key");
        let first = load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let second = load_or_create(&path).unwrap();
        assert_eq!(first.public(), second.public());
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(KeyError::Invalid { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
