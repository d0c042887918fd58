//! Loading component settings: the shipped TOML file, then environment overrides
//! (`GATEKEEPER__BROKER__URL`, `WORKER__STORAGE__URL`, ...).

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Loads `path` and overlays the environment variables that start with `{env_prefix}__`.
///
/// # Errors
/// When the file is missing or a value has the wrong type or is missing.
pub fn load<T: DeserializeOwned>(path: &Path, env_prefix: &str) -> Result<T, config::ConfigError> {
    config::Config::builder()
        .add_source(config::File::from(path))
        .add_source(
            config::Environment::with_prefix(env_prefix)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                // `…__BROKER__OTHER_URLS=amqp://…,amqp://…`: a list; the worker's trusted keys
                // likewise.
                .list_separator(",")
                .with_list_parse_key("broker.other_urls")
                .with_list_parse_key("keys.gatekeeper_signing_keys")
                .with_list_parse_key("keys.operator_keys"),
        )
        .build()?
        .try_deserialize()
}

/// A value that must never reach a log: `Debug` and `Display` print `[redacted]`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("amqp://gatekeeper:hunter2@broker");
        assert_eq!(format!("{s:?}"), "[redacted]");
    }
}
