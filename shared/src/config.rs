//! One way to configure both binaries: built-in defaults, then a TOML file, then environment
//! variables, then command-line flags, each layer overriding the one before.
//!
//! Each binary owns a settings struct (`Serialize + Deserialize + Default`, unknown keys
//! rejected) and a clap struct whose fields are all `Option`s with an `env = "PROOFMESH_…"`
//! attribute; clap resolves flag-over-environment, and [`layered`] puts the result over the file
//! and the defaults with figment.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Environment variable naming the config file, for both binaries.
pub const CONFIG_ENV: &str = "PROOFMESH_CONFIG";

/// A configuration that could not be assembled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The named config file does not exist.
    #[error("config file {0} not found")]
    MissingFile(PathBuf),
    /// A layer held a value of the wrong type or an unknown key.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// A value is outside its allowed range.
    #[error("invalid configuration: {key} = {value}: {why}")]
    OutOfRange {
        /// The setting.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        why: &'static str,
    },
    /// The effective configuration could not be printed as TOML.
    #[error("cannot print the configuration: {0}")]
    Print(#[from] toml::ser::Error),
}

/// Defaults of `T`, then `file` (when given), then `overrides` (flags and environment, as
/// resolved by clap; `None` fields are skipped and so leave the lower layers alone).
pub fn layered<T>(file: Option<&Path>, overrides: &impl Serialize) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile(path.to_path_buf()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment
        .merge(Serialized::defaults(overrides))
        .extract()
        .map_err(|e| ConfigError::Invalid(Box::new(e)))
}

/// `settings` as TOML, for `--print-config`. Callers mask secrets first (see [`mask_header`]).
pub fn to_toml(settings: &impl Serialize) -> Result<String, ConfigError> {
    Ok(toml::to_string_pretty(settings)?)
}

/// `"name=value"` → `"name=***"`: how secrets in header lists are printed.
pub fn mask_header(header: &str) -> String {
    match header.split_once('=') {
        Some((name, _)) => format!("{name}=***"),
        None => "***".to_owned(),
    }
}

/// Checks that `value` lies in `range`, naming the setting otherwise.
pub fn check_range<V>(
    key: &'static str,
    value: V,
    range: std::ops::RangeInclusive<V>,
    why: &'static str,
) -> Result<V, ConfigError>
where
    V: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::OutOfRange {
            key,
            value: value.to_string(),
            why,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Settings {
        port: u16,
        name: String,
        peers: Vec<String>,
    }

    impl Default for Settings {
        fn default() -> Self {
            Self {
                port: 1,
                name: "default".into(),
                peers: vec![],
            }
        }
    }

    #[derive(Serialize, Default)]
    struct Overrides {
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    }

    fn file(contents: &str) -> tempfile_lite::TempFile {
        tempfile_lite::TempFile::new(contents)
    }

    #[test]
    fn each_layer_overrides_the_one_below() {
        let f = file("port = 2\nname = \"file\"\npeers = [\"a\", \"b\"]\n");
        let s: Settings = layered(Some(f.path()), &Overrides::default()).unwrap();
        assert_eq!((s.port, s.name.as_str(), s.peers.len()), (2, "file", 2));
        let over = Overrides {
            port: Some(3),
            name: None,
        };
        let s: Settings = layered(Some(f.path()), &over).unwrap();
        assert_eq!((s.port, s.name.as_str()), (3, "file"));
        let s: Settings = layered(None, &over).unwrap();
        assert_eq!((s.port, s.name.as_str()), (3, "default"));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let f = file("prot = 2\n");
        let err = layered::<Settings>(Some(f.path()), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
        let f = file("port = \"many\"\n");
        let err = layered::<Settings>(Some(f.path()), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = layered::<Settings>(Some(Path::new("/nonexistent.toml")), &Overrides::default())
            .unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }

    #[test]
    fn ranges_and_masks() {
        assert!(check_range("parallel", 4u32, 1..=256, "1 to 256").is_ok());
        let err = check_range("parallel", 0u32, 1..=256, "1 to 256").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: parallel = 0: 1 to 256"
        );
        assert_eq!(mask_header("authorization=Bearer abc"), "authorization=***");
    }

    /// A file removed on drop, without a dev-dependency for it.
    mod tempfile_lite {
        use std::path::{Path, PathBuf};

        pub(super) struct TempFile(PathBuf);

        impl TempFile {
            pub(super) fn new(contents: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "proofmesh-config-{}-{}.toml",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::write(&path, contents).unwrap();
                Self(path)
            }
            pub(super) fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }
}
