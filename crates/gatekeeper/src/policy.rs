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
    #[serde(default)]
    rate_per_s: Option<f64>,
    #[serde(default)]
    burst: Option<f64>,
    #[serde(default)]
    sequence_key_prefixes: Option<Vec<String>>,
    #[serde(default)]
    max_delay_s: Option<u64>,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_streams")]
    max_streams: usize,
    #[serde(default = "default_share")]
    share: u16,
    #[serde(default = "default_max_batch_jobs")]
    max_batch_jobs: usize,
    #[serde(default = "default_max_workflow_steps")]
    max_workflow_steps: usize,
}

fn default_max_batch_jobs() -> usize {
    gatehouse_protocol::batch::MAX_BATCH_JOBS
}

fn default_max_workflow_steps() -> usize {
    gatehouse_protocol::batch::MAX_WORKFLOW_STEPS
}

fn default_share() -> u16 {
    1
}

/// The largest `share` a client may have.
pub const MAX_SHARE: u16 = 1000;

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

fn default_max_streams() -> usize {
    32
}

/// Open connections a listed client may hold unless its policy says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Open connections of an identity the policy does not list: enough to be told `403`.
pub const UNLISTED_MAX_CONNECTIONS: usize = 4;

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
    /// Submits per second (token bucket refill); `None`: unlimited.
    pub rate_per_s: Option<f64>,
    /// Bucket size: how many submits may come at once.
    pub burst: f64,
    sequence_key_prefixes: Option<Vec<String>>,
    /// Longest delay (`not_before` / `delay_s`) this client may ask for, in seconds; 0: none.
    /// `None`: what each kind allows.
    pub max_delay_s: Option<u64>,
    /// Open TLS connections at most (past it, a new connection is closed after the handshake).
    pub max_connections: usize,
    /// Open event streams at most (past it, `429 too-many-streams`).
    pub max_streams: usize,
    /// Its weight when clients take turns at the worker (1 to [`MAX_SHARE`]).
    pub share: u16,
    /// Most jobs of one batch (`POST /v1/batches`), 1 to [`gatehouse_protocol::batch::MAX_BATCH_JOBS`].
    pub max_batch_jobs: usize,
    /// Most steps of one workflow (`POST /v1/workflows`), 1 to
    /// [`gatehouse_protocol::batch::MAX_WORKFLOW_STEPS`].
    pub max_workflow_steps: usize,
    /// Its place in the policy file (from 0): which fair shard of a class its jobs go to.
    pub place: usize,
}

impl ClientPolicy {
    /// Whether one of the client's kind patterns matches `kind`.
    pub fn allows_kind(&self, kind: &str) -> bool {
        self.kinds.iter().any(|p| glob_match(p, kind))
    }

    /// Whether the client may use sequence key `key` (any key when no prefixes are set).
    /// Sequence keys are the client's own anyway (the worker namespaces them by identity);
    /// prefixes narrow what it may use further.
    ///
    /// A prefix matches whole segments: `acct-a` allows `acct-a` and `acct-a-7` or `acct-a:7`,
    /// not `acct-ab` (a prefix that ends in a separator, like `acct-`, allows anything after
    /// it).
    pub fn allows_sequence_key(&self, key: &str) -> bool {
        self.sequence_key_prefixes.as_ref().is_none_or(|ps| ps.iter().any(|p| prefix_matches(p, key)))
    }
}

/// Characters that end a segment of a sequence key.
const SEPARATORS: &[char] = &['-', '_', '.', ':', '/'];

fn prefix_matches(prefix: &str, key: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else { return false };
    rest.is_empty() || prefix.ends_with(SEPARATORS) || rest.starts_with(SEPARATORS)
}

/// Token buckets per client identity.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: std::sync::Mutex<HashMap<String, (f64, std::time::Instant)>>,
}

impl RateLimiter {
    /// Takes one token of `identity`'s bucket; when it is empty, answers how long until one
    /// is there.
    pub fn take(&self, identity: &str, policy: &ClientPolicy) -> Result<(), std::time::Duration> {
        let Some(rate) = policy.rate_per_s.filter(|r| *r > 0.0) else { return Ok(()) };
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = buckets.entry(identity.to_owned()).or_insert((policy.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(policy.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

/// The policy in force, replaceable while the gatekeeper runs (SIGHUP reloads the file):
/// requests in flight keep the policy they started with.
pub struct LivePolicy {
    path: std::path::PathBuf,
    current: std::sync::RwLock<std::sync::Arc<Policy>>,
}

impl LivePolicy {
    /// # Errors
    /// When the file cannot be loaded.
    pub fn load(path: &Path) -> Result<Self, config::ConfigError> {
        let current = std::sync::RwLock::new(std::sync::Arc::new(Policy::load(path)?));
        Ok(Self { path: path.to_owned(), current })
    }

    pub fn current(&self) -> std::sync::Arc<Policy> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Reloads the file; on error the policy in force stays.
    ///
    /// # Errors
    /// When the file cannot be loaded.
    pub fn reload(&self) -> Result<(), config::ConfigError> {
        let fresh = std::sync::Arc::new(Policy::load(&self.path)?);
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(())
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
        for (place, c) in file.client.into_iter().enumerate() {
            if !(1..=MAX_SHARE).contains(&c.share) {
                return Err(config::ConfigError::Message(format!(
                    "policy: client {}: share is 1 to {MAX_SHARE}",
                    c.identity
                )));
            }
            let most = gatehouse_protocol::batch::MAX_BATCH_JOBS;
            if !(1..=most).contains(&c.max_batch_jobs) {
                return Err(config::ConfigError::Message(format!(
                    "policy: client {}: max_batch_jobs is 1 to {most}",
                    c.identity
                )));
            }
            let most = gatehouse_protocol::batch::MAX_WORKFLOW_STEPS;
            if !(1..=most).contains(&c.max_workflow_steps) {
                return Err(config::ConfigError::Message(format!(
                    "policy: client {}: max_workflow_steps is 1 to {most}",
                    c.identity
                )));
            }
            let burst = c.burst.or(c.rate_per_s).unwrap_or(1.0).max(1.0);
            let policy = ClientPolicy {
                kinds: c.kinds,
                max_priority: c.max_priority,
                rate_per_s: c.rate_per_s,
                burst,
                sequence_key_prefixes: c.sequence_key_prefixes,
                max_delay_s: c.max_delay_s,
                max_connections: c.max_connections,
                max_streams: c.max_streams,
                share: c.share,
                max_batch_jobs: c.max_batch_jobs,
                max_workflow_steps: c.max_workflow_steps,
                place,
            };
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
    fn sequence_key_prefixes_match_whole_segments() {
        assert!(prefix_matches("acct-a", "acct-a"));
        assert!(prefix_matches("acct-a", "acct-a-7"));
        assert!(prefix_matches("acct-a", "acct-a:7"));
        assert!(!prefix_matches("acct-a", "acct-ab"), "another client's acct-ab");
        assert!(!prefix_matches("acct-a", "acct-"));
        assert!(prefix_matches("acct-", "acct-ab"));
    }

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
    fn the_bucket_refuses_past_the_burst_and_refills() {
        let p = ClientPolicy {
            kinds: vec![],
            max_priority: Priority::new(9).unwrap(),
            rate_per_s: Some(1000.0),
            burst: 2.0,
            sequence_key_prefixes: Some(vec!["acct-".into()]),
            max_delay_s: None,
            max_connections: 1,
            max_streams: 1,
            share: 1,
            max_batch_jobs: 10,
            max_workflow_steps: 10,
            place: 0,
        };
        let limiter = RateLimiter::default();
        assert!(limiter.take("a", &p).is_ok() && limiter.take("a", &p).is_ok());
        let wait = limiter.take("a", &p).unwrap_err();
        assert!(wait <= std::time::Duration::from_millis(1), "{wait:?}");
        assert!(limiter.take("b", &p).is_ok(), "buckets are per client");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(limiter.take("a", &p).is_ok());
        assert!(p.allows_sequence_key("acct-1") && !p.allows_sequence_key("other-1"));
    }

    #[test]
    fn shipped_policy_allows_dev_client_everything_and_the_bench_client_the_vault() {
        let p =
            Policy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/policy.toml")).unwrap();
        assert!(p.client("dev-client").unwrap().allows_kind("ledger.apply"));
        let bench = p.client("bench-1").unwrap();
        assert!(bench.allows_kind("vault.put") && !bench.allows_kind("ledger.apply"));
        assert!(p.client("stranger").is_none());
    }

    /// A client's fair shard comes from its place in the file; its share is 1 unless set, and
    /// never 0.
    #[test]
    fn clients_have_their_place_in_the_file_and_a_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let entry = |id: &str, extra: &str| {
            format!("[[client]]\nidentity = \"{id}\"\nkinds = [\"*\"]\nmax_priority = 9\n{extra}\n")
        };
        std::fs::write(&path, entry("zed", "") + &entry("amy", "share = 3")).unwrap();
        let p = Policy::load(&path).unwrap();
        let (zed, amy) = (p.client("zed").unwrap(), p.client("amy").unwrap());
        assert_eq!((zed.place, zed.share, amy.place, amy.share), (0, 1, 1, 3));
        std::fs::write(&path, entry("zed", "share = 0")).unwrap();
        let e = Policy::load(&path).unwrap_err().to_string();
        assert!(e.contains("share is 1 to 1000"), "{e}");
    }
}
