//! Who may use the API: optional API keys (`Authorization: Bearer pm-…`), each with a name and
//! its own request and token rates.
//!
//! Keys live in a TOML file (mode 0600) that holds only their SHA-256 hashes: a key is 256
//! random bits, so a plain hash is as good as a slow one, and the file leaks nothing usable.
//! `proofmesh-gateway keys create|list|revoke` edits it; the gateway reads it at start. A
//! presented key is hashed and compared with every stored hash in constant time. Without a key
//! file the API is open, as a local llama-server's is.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::AppState;

/// What every key starts with, so a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "pm-";
/// Keys one file may hold.
pub const MAX_KEYS: usize = 10_000;
/// Longest key name.
pub const MAX_NAME_LEN: usize = 64;

/// Failures reading or writing the key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The file could not be read or written.
    #[error("API key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not a key file.
    #[error("API key file {path} is not valid: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A request the file cannot take (a duplicate or malformed name, too many keys).
    #[error("{0}")]
    Refused(String),
}

/// One key as stored: its name, hash and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// Who holds it (shown in logs and `keys list`).
    pub name: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// When it was created (Unix seconds).
    pub created: u64,
    /// Requests a minute it may make (none: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens a minute it may use (none: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u32>,
}

/// The key file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// The keys.
    #[serde(default, rename = "key")]
    pub keys: Vec<StoredKey>,
}

impl KeyFile {
    /// Reads `path`; a missing file holds no keys.
    pub fn load(path: &Path) -> Result<Self, AccessError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(AccessError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let invalid = |message: String| AccessError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: Self = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if file.keys.len() > MAX_KEYS {
            return Err(invalid(format!("more than {MAX_KEYS} keys")));
        }
        for key in &file.keys {
            if key.requests_per_minute == Some(0) || key.tokens_per_minute == Some(0) {
                return Err(invalid(format!(
                    "key '{}': a rate is at least 1 a minute",
                    key.name
                )));
            }
            if parse_hash(&key.sha256).is_none() {
                return Err(invalid(format!(
                    "key '{}': sha256 is not 64 hex digits",
                    key.name
                )));
            }
        }
        Ok(file)
    }

    /// Writes the file to `path` (directories created, mode 0600), replacing it atomically.
    pub fn save(&self, path: &Path) -> Result<(), AccessError> {
        let io = |source| AccessError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = toml::to_string(self).map_err(|e| AccessError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let temporary = path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        {
            use std::io::Write;
            let mut file = options.open(&temporary).map_err(io)?;
            file.write_all(text.as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&temporary, path).map_err(io)
    }

    /// Adds a key named `name` and returns the key itself, which is shown once and stored
    /// nowhere.
    pub fn create(
        &mut self,
        name: &str,
        requests_per_minute: Option<u32>,
        tokens_per_minute: Option<u32>,
    ) -> Result<String, AccessError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
        if !valid {
            return Err(AccessError::Refused(format!(
                "a key name is 1 to {MAX_NAME_LEN} letters, digits or - _ . @"
            )));
        }
        if requests_per_minute == Some(0) || tokens_per_minute == Some(0) {
            return Err(AccessError::Refused(
                "a rate is at least 1 a minute (revoke a key to stop it)".into(),
            ));
        }
        if self.keys.iter().any(|k| k.name == name) {
            return Err(AccessError::Refused(format!(
                "a key named '{name}' exists already (revoke it first)"
            )));
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(AccessError::Refused(format!(
                "the file holds {MAX_KEYS} keys already"
            )));
        }
        let secret = format!("{KEY_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
        self.keys.push(StoredKey {
            name: name.to_string(),
            sha256: hex::encode(hash(&secret)),
            created: crate::openai::response::unix_now(),
            requests_per_minute,
            tokens_per_minute,
        });
        Ok(secret)
    }

    /// Removes the key named `name`; whether there was one.
    pub fn revoke(&mut self, name: &str) -> bool {
        let before = self.keys.len();
        self.keys.retain(|k| k.name != name);
        self.keys.len() != before
    }
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// A rate as a token bucket: `capacity` a minute, refilled continuously. It may go into debt
/// (tokens are charged once known, after the answer), and takes nothing until repaid.
#[derive(Debug)]
struct Bucket {
    level: f64,
    capacity: f64,
    refilled: Instant,
}

impl Bucket {
    fn per_minute(capacity: u32) -> Self {
        let capacity = f64::from(capacity.max(1));
        Self {
            level: capacity,
            capacity,
            refilled: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.level = (self.level + elapsed * self.capacity / 60.0).min(self.capacity);
        self.refilled = now;
    }

    /// Time until `amount` could be taken, zero when it can now.
    fn wait_for(&mut self, amount: f64) -> Duration {
        self.refill();
        let missing = amount.min(self.capacity) - self.level;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((missing * 60.0 / self.capacity).min(3600.0))
        }
    }

    fn charge(&mut self, amount: f64) {
        self.refill();
        self.level -= amount;
    }
}

/// One usable key: its name, hash and live rate limits.
#[derive(Debug)]
struct Key {
    name: String,
    hash: [u8; 32],
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

/// The caller a request was authenticated as; handlers charge its tokens.
#[derive(Debug, Clone)]
pub struct Caller(Arc<Key>);

impl Caller {
    /// The key's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// A stable id of this very key (not of its name, which a revoked key's successor may
    /// reuse): records made under it are its own. Derived from the stored hash, so it reveals
    /// nothing usable.
    pub fn owner_id(&self) -> String {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"proofmesh-record-owner");
        hasher.update(self.0.hash);
        hex::encode(&hasher.finalize()[..16])
    }

    /// Charges tokens an answer used against the key's token rate.
    pub fn charge_tokens(&self, tokens: u64) {
        if let Some(bucket) = &self.0.tokens {
            lock(bucket).charge(tokens as f64);
        }
    }

    /// Takes one request from the key's rates, or says how long to wait: a request needs one
    /// request and a token balance that is not in debt.
    fn admit(&self) -> Result<(), Duration> {
        if let Some(bucket) = &self.0.tokens {
            let wait = lock(bucket).wait_for(0.0);
            if !wait.is_zero() {
                return Err(wait);
            }
        }
        if let Some(bucket) = &self.0.requests {
            let mut bucket = lock(bucket);
            let wait = bucket.wait_for(1.0);
            if !wait.is_zero() {
                return Err(wait);
            }
            bucket.charge(1.0);
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which routes need a key, and the keys.
#[derive(Debug, Clone, Default)]
pub struct Access {
    keys: Option<Arc<Vec<Arc<Key>>>>,
    /// `GET /v1/models` without a key.
    pub public_models: bool,
    /// `/healthz`, `/readyz` and `/metrics` without a key.
    pub public_operations: bool,
}

impl Access {
    /// No keys: every route open.
    pub fn open() -> Self {
        Self {
            keys: None,
            public_models: true,
            public_operations: true,
        }
    }

    /// Keys from `file`: every API route needs one of them (none at all locks the API).
    pub fn with_keys(file: &KeyFile, public_models: bool, public_operations: bool) -> Self {
        let keys = file
            .keys
            .iter()
            .filter_map(|stored| {
                Some(Arc::new(Key {
                    name: stored.name.clone(),
                    hash: parse_hash(&stored.sha256)?,
                    requests: stored
                        .requests_per_minute
                        .map(|n| Mutex::new(Bucket::per_minute(n))),
                    tokens: stored
                        .tokens_per_minute
                        .map(|n| Mutex::new(Bucket::per_minute(n))),
                }))
            })
            .collect();
        Self {
            keys: Some(Arc::new(keys)),
            public_models,
            public_operations,
        }
    }

    /// Whether keys are required at all.
    pub fn requires_keys(&self) -> bool {
        self.keys.is_some()
    }

    /// Whether `path` needs a key.
    fn guards(&self, path: &str) -> bool {
        match path {
            "/docs" | "/openapi.json" => false,
            _ if path.starts_with("/docs/") => false,
            "/v1/models" => !self.public_models,
            "/healthz" | "/readyz" | "/metrics" => !self.public_operations,
            _ => true,
        }
    }

    /// The caller `headers` name, or OpenAI's 401.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                ApiError::invalid_api_key(
                    "You didn't provide an API key. Provide it in the Authorization header as \
                     'Bearer YOUR_KEY'; the gateway's operator issues keys with \
                     'proofmesh-gateway keys create'.",
                )
            })?;
        let presented = hash(presented);
        // Every stored hash is compared, in constant time, whichever matches.
        let mut found = None;
        for key in keys.iter() {
            if bool::from(key.hash.ct_eq(&presented)) {
                found = Some(Arc::clone(key));
            }
        }
        found.map(|key| Some(Caller(key))).ok_or_else(|| {
            ApiError::invalid_api_key(
                "Incorrect API key provided. Ask the gateway's operator for a key.",
            )
        })
    }
}

/// The middleware: routes that need a key get the caller as a request extension, or a 401;
/// a caller over its rate gets a 429 with `Retry-After`.
pub async fn authorize(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let access = &state.access;
    if !access.requires_keys() || !access.guards(request.uri().path()) {
        return next.run(request).await;
    }
    let caller = match access.authenticate(request.headers()) {
        Ok(Some(caller)) => caller,
        Ok(None) => return next.run(request).await,
        Err(e) => return e.into_response(),
    };
    if let Err(wait) = caller.admit() {
        tracing::info!(key = caller.name(), "API key over its rate");
        return ApiError::busy(
            format!(
                "Rate limit reached for API key '{}'; retry after the time in Retry-After",
                caller.name()
            ),
            wait.as_secs_f64().ceil() as u64,
        )
        .into_response();
    }
    tracing::Span::current().record("api_key", caller.name());
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {key}").parse().expect("header"),
        );
        headers
    }

    #[test]
    fn only_a_stored_key_authenticates_and_the_file_holds_no_key() {
        let mut file = KeyFile::default();
        let alice = file.create("alice", None, None).expect("create");
        let bob = file.create("bob", Some(2), None).expect("create");
        assert!(alice.starts_with(KEY_PREFIX) && alice.len() == KEY_PREFIX.len() + 64);
        assert!(file.create("alice", None, None).is_err());
        assert!(file.create("no spaces", None, None).is_err());
        assert!(file.create("zero", Some(0), None).is_err());
        let text = toml::to_string(&file).expect("toml");
        assert!(
            !text.contains(&alice[KEY_PREFIX.len()..]) && !text.contains(&bob[KEY_PREFIX.len()..])
        );

        let access = Access::with_keys(&file, true, true);
        let who = |h: &HeaderMap| {
            access
                .authenticate(h)
                .map(|c| c.map(|c| c.name().to_string()))
        };
        assert_eq!(
            who(&bearer(&alice)).ok().flatten().as_deref(),
            Some("alice")
        );
        assert_eq!(who(&bearer(&bob)).ok().flatten().as_deref(), Some("bob"));
        let wrong = who(&bearer(&format!("{alice}0"))).expect_err("wrong key");
        assert_eq!(wrong.status().as_u16(), 401);
        assert_eq!(wrong.code(), Some("invalid_api_key"));
        assert!(who(&HeaderMap::new()).is_err());
        assert!(file.revoke("alice") && !file.revoke("alice"));
        let access = Access::with_keys(&file, true, true);
        assert!(access.authenticate(&bearer(&alice)).is_err());
    }

    #[test]
    fn a_key_over_its_rates_waits() {
        let mut file = KeyFile::default();
        let _ = file.create("two-a-minute", Some(2), None).expect("create");
        let _ = file.create("tokens", None, Some(600)).expect("create");
        let access = Access::with_keys(&file, true, true);
        let keys = access.keys.as_ref().expect("keys");
        let requests = Caller(Arc::clone(&keys[0]));
        assert!(requests.admit().is_ok() && requests.admit().is_ok());
        let wait = requests.admit().expect_err("third request in a minute");
        assert!(
            wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        let tokens = Caller(Arc::clone(&keys[1]));
        assert!(tokens.admit().is_ok());
        tokens.charge_tokens(900);
        // 300 tokens in debt at 10 a second.
        let wait = tokens.admit().expect_err("in debt");
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
    }

    #[test]
    fn the_docs_stay_open_and_the_rest_is_configurable() {
        let access = Access::with_keys(&KeyFile::default(), false, true);
        assert!(!access.guards("/docs/index.html") && !access.guards("/openapi.json"));
        assert!(access.guards("/v1/models") && access.guards("/v1/chat/completions"));
        assert!(!access.guards("/healthz") && !access.guards("/metrics"));
    }

    #[test]
    fn the_file_is_private_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("pm-keys-{}", rand::random::<u64>()));
        let path = dir.join("keys.toml");
        let mut file = KeyFile::default();
        let _ = file
            .create("alice", Some(60), Some(10_000))
            .expect("create");
        file.save(&path).expect("save");
        assert_eq!(KeyFile::load(&path).expect("load"), file);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
