//! The pre-shared key of a private mesh (libp2p `pnet`).
//!
//! Nodes started with the same key encrypt every TCP connection with it before Noise even
//! begins, so a node without it cannot complete a handshake, learn a peer id over a connection
//! or send a byte the application reads. (mDNS still announces peer ids on the LAN in the clear:
//! keep it off in a private mesh.) The file is go-libp2p's `swarm.key` format, created with mode 0600;
//! only its fingerprint is ever logged.

use std::path::{Path, PathBuf};

pub use libp2p::pnet::PreSharedKey;

/// The largest mesh key file read (the format needs about 90 bytes).
const MAX_KEY_FILE: u64 = 1024;

/// Failures reading or writing a mesh key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshKeyError {
    /// The file could not be read or written.
    #[error("mesh key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a `swarm.key` file.
    #[error(
        "mesh key file {path} is not a pre-shared key file (`/key/swarm/psk/1.0.0/`, `/base16/`, \
         then 64 hex digits; `proofmesh-gateway mesh-key FILE` writes one): {message}"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// Reads the key at `path`; warns when others than its owner may read it.
pub fn load(path: &Path) -> Result<PreSharedKey, MeshKeyError> {
    let io = |source| MeshKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if meta.len() > MAX_KEY_FILE {
        return Err(MeshKeyError::Invalid {
            path: path.to_path_buf(),
            message: format!("{} bytes, more than any key file", meta.len()),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "the mesh key file is readable by others than its owner; chmod 600 it");
        }
    }
    let text = std::io::read_to_string(file).map_err(io)?;
    // The parser slices by byte: anything but ASCII would make it panic.
    if !text.is_ascii() {
        return Err(MeshKeyError::Invalid {
            path: path.to_path_buf(),
            message: "it holds non-ASCII characters".into(),
        });
    }
    text.parse().map_err(|e| MeshKeyError::Invalid {
        path: path.to_path_buf(),
        message: format!("{e}"),
    })
}

/// Writes a new random key to `path` (mode 0600; never over an existing file) and returns it.
pub fn create(path: &Path) -> Result<PreSharedKey, MeshKeyError> {
    let io = |source| MeshKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let key = PreSharedKey::new(rand::random());
    crate::identity::create_private(path, key.to_key_file().as_bytes()).map_err(io)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_is_private_loads_back_and_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("proofmesh-psk-{}", rand::random::<u64>()));
        let path = dir.join("swarm.key");
        let key = create(&path).unwrap();
        assert_eq!(load(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(create(&path), Err(MeshKeyError::Io { .. })));
        std::fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nnot hex\n").unwrap();
        let err = load(&path).unwrap_err();
        assert!(
            err.to_string().contains("not a pre-shared key file"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
