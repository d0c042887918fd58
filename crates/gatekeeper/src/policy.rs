//! Per-client policy (`config/policy.toml`): deny by default.

use std::collections::HashMap;
use std::path::Path;

use gatehouse_protocol::Priority;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    identity: String,
    kinds: Vec<String>,
    max_priority: Priority,
}

#[derive(Debug, Deserialize)]
struct PolicyFile {
    #[serde(default)]
    client: Vec<ClientEntry>,
}

/// What one client may do.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    kinds: Vec<String>,
    pub max_priority: Priority,
}

impl ClientPolicy {
    /// Whether one of the client's kind patterns matches `kind`.
    pub fn allows_kind(&self, kind: &str) -> bool {
        self.kinds.iter().any(|p| glob_match(p, kind))
    }
}

/// All clients' policies.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    clients: HashMap<String, ClientPolicy>,
}

impl Policy {
    /// # Errors
    /// When the file cannot be read or parsed, or an identity repeats.
    pub fn load(path: &Path) -> Result<Self, config::ConfigError> {
        let file: PolicyFile =
            config::Config::builder().add_source(config::File::from(path)).build()?.try_deserialize()?;
        let mut clients = HashMap::new();
        for c in file.client {
            let policy = ClientPolicy { kinds: c.kinds, max_priority: c.max_priority };
            if clients.insert(c.identity.clone(), policy).is_some() {
                return Err(config::ConfigError::Message(format!(
                    "policy lists client {} twice",
                    c.identity
                )));
            }
        }
        Ok(Self { clients })
    }

    /// The policy of `identity`; `None` means the client may do nothing.
    pub fn client(&self, identity: &str) -> Option<&ClientPolicy> {
        self.clients.get(identity)
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, s: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = parts.collect();
    let Some(last) = parts.pop() else {
        return rest.is_empty();
    };
    for p in parts {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "vault.put"));
        assert!(glob_match("vault.*", "vault.put"));
        assert!(!glob_match("vault.*", "ledger.apply"));
        assert!(glob_match("ledger.apply", "ledger.apply"));
        assert!(!glob_match("ledger.apply", "ledger.apply2"));
        assert!(glob_match("*.get", "vault.get"));
        assert!(glob_match("v*.*t", "vault.get"));
        assert!(!glob_match("a*a", "a"));
    }

    #[test]
    fn shipped_policy_allows_dev_client_only() {
        let p =
            Policy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/policy.toml")).unwrap();
        assert!(p.client("dev-client").unwrap().allows_kind("ledger.apply"));
        assert!(p.client("stranger").is_none());
    }
}
