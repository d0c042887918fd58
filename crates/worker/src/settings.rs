//! Worker settings (`config/worker.toml`, overridable as `WORKER__SECTION__KEY`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use gatehouse_broker::BrokerSettings;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    pub broker: BrokerSettings,
    pub consumer: ConsumerSettings,
    #[serde(default)]
    pub storage: StorageSettings,
    pub catalog: CatalogSettings,
    pub keys: KeySettings,
    #[serde(default)]
    pub testing: TestingSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    #[serde(default)]
    pub retention: RetentionSettings,
    #[serde(default)]
    pub schedules: ScheduleSettings,
    #[serde(default)]
    pub sandbox: SandboxSettings,
    #[serde(default)]
    pub telemetry: gatehouse_broker::telemetry::TelemetrySettings,
}

impl gatehouse_broker::process::HasTelemetry for WorkerSettings {
    fn telemetry(&self) -> &gatehouse_broker::telemetry::TelemetrySettings {
        &self.telemetry
    }
}

/// `[sandbox]`: how executable kinds are confined (see the `handlers::exec::sandbox` module).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSettings {
    /// `bubblewrap` (namespaces, the default) or `none` (development only: the child then
    /// runs as the worker's own user and can read whatever the worker can; refused unless
    /// `[testing] enabled`).
    pub mode: SandboxMode,
    /// With a worker running as root: each client's jobs run under a uid of their own, from
    /// this one up (one per client, in the order clients first run a job).
    pub uid_base: u32,
    /// How many such uids there are (more clients than this share them round-robin, each job
    /// still in namespaces of its own).
    pub uids: u32,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self { mode: SandboxMode::Bubblewrap, uid_base: 200_000, uids: 50_000 }
    }
}

/// How executable kinds are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    Bubblewrap,
    None,
}

/// `[schedules]`: the file of cron schedules this worker fires (see the `sweep::schedules` module).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    /// None: no schedules.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// The worker's admin listener: `/healthz`, `/readyz`, `/metrics` and the dashboard (`/`) over
/// plain HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Keep it on loopback (or a management network): it has no TLS. Port 0 picks a free port.
    pub listen: std::net::SocketAddr,
    /// With `basic_auth_password_file`: `/metrics` and the dashboard ask for this user and
    /// that password (the probes `/healthz` and `/readyz` stay open).
    #[serde(default)]
    pub basic_auth_user: Option<String>,
    /// A file holding the password (surrounding whitespace ignored).
    #[serde(default)]
    pub basic_auth_password_file: Option<PathBuf>,
    /// Host names answered besides IP addresses and `localhost` (a request for any other
    /// name is refused: DNS rebinding from a browser), e.g. the name Prometheus scrapes.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9102)),
            basic_auth_user: None,
            basic_auth_password_file: None,
            allowed_hosts: Vec::new(),
        }
    }
}

impl AdminSettings {
    /// The digest of `user:password` when basic auth is on.
    ///
    /// # Errors
    /// When only one of user and password file is set, or the file cannot be read or is empty.
    pub fn credentials(&self) -> Result<Option<[u8; 32]>, String> {
        match (&self.basic_auth_user, &self.basic_auth_password_file) {
            (None, None) => Ok(None),
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file)
                    .map_err(|e| format!("admin.basic_auth_password_file {}: {e}", file.display()))?;
                let password = password.trim();
                if password.is_empty() || user.is_empty() || user.contains(':') {
                    return Err("admin basic auth needs a user without ':' and a non-empty password".into());
                }
                Ok(Some(credentials(user, password)))
            }
            _ => Err("admin.basic_auth_user and admin.basic_auth_password_file go together".into()),
        }
    }
}

/// Key files (see `gatehouse_protocol::keys`).
#[derive(Debug, Clone, Deserialize)]
pub struct KeySettings {
    /// The worker's X25519 secret; opens job payloads (and so the sessions whose reply keys
    /// seal the worker's answers), and fields clients sealed themselves to its public key.
    pub sealing_key: PathBuf,
    /// Earlier sealing keys still in the certified key set (a rotation's overlap): fields
    /// sealed to them still open. Leave a key out once no certified set lists it.
    #[serde(default)]
    pub previous_sealing_keys: Vec<PathBuf>,
    /// Public keys of the gatekeeper(s); a job whose session none of them signed is
    /// dead-lettered unread. Several during a key rotation.
    pub gatekeeper_signing_keys: Vec<PathBuf>,
    /// Public keys of the operators who may replay dead letters (`gatehouse dlq replay` signs
    /// each replay with one of their private keys). None: no replay is ever honoured.
    #[serde(default)]
    pub operator_keys: Vec<PathBuf>,
    /// Data keys for encryption at rest (the last one is active).
    pub data_keyring: PathBuf,
    /// Jobs submitted longer ago than this are dead-lettered as `stale`.
    pub max_message_age_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerSettings {
    /// Unacked deliveries per queue: the most jobs one storage commit can group, and how many
    /// a high-priority job can find ahead of it in the worker.
    pub prefetch: u16,
    /// How long in-flight jobs may take to finish after SIGTERM.
    pub stopping_wait_time_ms: u64,
    /// Most jobs one client may have parked (waiting for an earlier sequence number) at once;
    /// past it, a job that would park is dead-lettered `parked_limit` (replayable), so that one
    /// client cannot fill the worker's storage with numbers far ahead of its key.
    #[serde(default = "default_max_parked_per_client")]
    pub max_parked_per_client: u64,
    /// Most delayed jobs (`not_before` / `delay_s`, held in storage until due) one client may
    /// have at once; past it, `delayed_limit` (dead-lettered, replayable).
    #[serde(default = "default_max_parked_per_client")]
    pub max_delayed_per_client: u64,
    /// Most jobs one client may have waiting for a singleton turn; past it, `waiting_limit`.
    #[serde(default = "default_max_parked_per_client")]
    pub max_waiting_per_client: u64,
    /// A job still running after this long has its delivery acked and its message held in
    /// storage under a renewed lease instead (see the `delivery::lease` module): keep it well below the
    /// broker's `consumer_timeout` (30 minutes by default).
    #[serde(default = "default_hand_off_after_ms")]
    pub hand_off_after_ms: u64,
    /// How long such a lease lasts unless renewed: after a worker dies, its long jobs go back
    /// to their queue this long after its last renewal.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_hand_off_after_ms() -> u64 {
    10 * 60 * 1000
}

fn default_lease_ms() -> u64 {
    60_000
}

fn default_max_parked_per_client() -> u64 {
    10_000
}

/// `[consumer] hand_off_after_ms` and `lease_ms`, checked.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// How long a job runs before its delivery is handed off.
    pub hand_off_after: Duration,
    /// How long a lease lasts unless renewed; renewed every quarter of it.
    pub lease: Duration,
}

/// SHA-256 of `user:password`, as a `Basic` header carries them.
pub fn credentials(user: &str, password: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{user}:{password}").as_bytes());
    out.copy_from_slice(digest.as_ref());
    out
}

impl ConsumerSettings {
    pub fn stopping_wait_time(&self) -> Duration {
        Duration::from_millis(self.stopping_wait_time_ms)
    }

    /// When long jobs are handed off, and their leases.
    ///
    /// # Errors
    /// When `lease_ms` is under a second (renewals every quarter of it would hammer storage).
    pub fn leases(&self) -> Result<LeaseSettings, String> {
        if self.lease_ms < 1000 {
            return Err(format!("consumer.lease_ms = {} is under 1000", self.lease_ms));
        }
        Ok(LeaseSettings {
            hand_off_after: Duration::from_millis(self.hand_off_after_ms),
            lease: Duration::from_millis(self.lease_ms),
        })
    }
}

/// `[storage]`: where the worker keeps jobs' outcomes and the families' tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// `sqlite:<path>` (the default: one worker, the file created with its folder) or
    /// `postgres://user@host:port/db` (several workers on one database).
    pub url: Option<String>,
    /// The SQLite file, as releases before `url` named it: still read, as `sqlite:<path>`.
    pub path: Option<PathBuf>,
    /// PostgreSQL's password: the first line of this file…
    pub password_file: Option<PathBuf>,
    /// …or this value, given through the environment (`WORKER__STORAGE__PASSWORD`). Never in
    /// the url, which is logged.
    pub password: Option<secrecy::SecretString>,
    /// Most pooled PostgreSQL connections this worker opens for reads (status queries, event
    /// streams, metrics; each held only while its transaction runs).
    pub pool_size: usize,
    /// PostgreSQL connections that write, each running one batch of jobs at a time (every
    /// job of a batch in one transaction, its statements one after another): 3 keeps two
    /// cores busy beside a local server; raise it when the database is across a network,
    /// where each statement waits a round trip.
    pub writers: usize,
    /// The CA (PEM) that signed the PostgreSQL server's certificate: connections use TLS,
    /// the certificate checked against it and the url's host.
    pub tls_ca: Option<PathBuf>,
    /// `"off"`: PostgreSQL on another host without TLS, written explicitly (the password would
    /// cross the network in the clear). Without it, a url whose host is not loopback (or a
    /// local socket) needs `tls_ca`.
    pub tls: Option<StorageTls>,
}

/// `[storage] tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageTls {
    Off,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            url: None,
            path: None,
            password_file: None,
            password: None,
            pool_size: 16,
            writers: gatehouse_storage::DEFAULT_WRITERS,
            tls_ca: None,
            tls: None,
        }
    }
}

/// The host of a `postgres://` url (`None` when it names none: the local socket).
fn postgres_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    // `?host=/run/postgresql`: a socket path.
    let query_host =
        url.split_once('?').and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("host=")));
    match (host, query_host) {
        (_, Some(q)) => Some(q),
        ("", None) => None,
        (h, None) => Some(h),
    }
}

/// Whether `host` is this machine: loopback, `localhost`, or a socket path.
fn is_local(host: Option<&str>) -> bool {
    host.is_none_or(|h| {
        h.starts_with('/')
            || h.eq_ignore_ascii_case("localhost")
            || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    })
}

/// The default storage: an SQLite file beside the working directory's other state.
pub const DEFAULT_STORAGE_URL: &str = "sqlite:.gatehouse/worker.sqlite";

impl StorageSettings {
    /// Where the storage is.
    ///
    /// # Errors
    /// A url that names no backend, `url` and `path` both set, a password in the url, an
    /// unreadable password file, or both a password file and a password.
    pub fn location(&self) -> Result<gatehouse_storage::Location, String> {
        use secrecy::ExposeSecret as _;
        let url = match (&self.url, &self.path) {
            (Some(_), Some(_)) => {
                return Err(
                    "[storage] has both url and path: keep url (path is the older name of sqlite:<path>)"
                        .into(),
                );
            }
            (Some(url), None) => url.clone(),
            (None, Some(path)) => format!("sqlite:{}", path.display()),
            (None, None) => DEFAULT_STORAGE_URL.to_owned(),
        };
        let password = match (&self.password_file, &self.password) {
            (Some(_), Some(_)) => {
                return Err("[storage] has both password_file and password: keep one".into());
            }
            (Some(file), None) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| format!("[storage] password_file {}: {e}", file.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            (None, Some(p)) => Some(p.expose_secret().to_owned()),
            (None, None) => None,
        };
        if password.is_some() && url.starts_with("sqlite:") {
            return Err("[storage] has a password, but SQLite storage takes none".into());
        }
        if !(1..=64).contains(&self.writers) {
            return Err(format!("[storage] writers = {}: expected 1 to 64", self.writers));
        }
        let mut location =
            gatehouse_storage::Location::parse_with_tls(&url, password, self.pool_size, self.tls_ca.clone())
                .map_err(|e| e.to_string())?;
        if let gatehouse_storage::Location::Postgres(c) = &mut location {
            c.writers = self.writers;
        }
        if url.starts_with("postgres") {
            match (self.tls, &self.tls_ca) {
                (Some(StorageTls::Off), Some(_)) => {
                    return Err("[storage] has both tls = \"off\" and tls_ca: keep one".into());
                }
                (None, None) if !is_local(postgres_host(&url)) => {
                    return Err(format!(
                        "[storage] PostgreSQL on {} without TLS would send the password in the clear: set tls_ca (or tls = \"off\" on a network you trust)",
                        postgres_host(&url).unwrap_or("?")
                    ));
                }
                _ => {}
            }
        }
        Ok(location)
    }
}

/// `[retention]`: how long decided jobs' records are kept, and how they are pruned.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// Seconds a decided job's record is kept (kinds may set their own `retain_s`). Absent:
    /// `keys.max_message_age_s`, the shortest allowed — a message older than that is refused
    /// as stale, so a job whose record was pruned can never run again.
    pub retain_s: Option<u64>,
    /// Most records deleted by one storage closure.
    pub prune_batch: u32,
    /// Pause between pruning passes.
    pub prune_every_ms: u64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self { retain_s: None, prune_batch: 100, prune_every_ms: 5_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CatalogSettings {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TestingSettings {
    /// Enables the `test.*` kinds. Never in production.
    #[serde(default)]
    pub enabled: bool,
}

impl WorkerSettings {
    /// Loads `path` with environment overrides.
    ///
    /// # Errors
    /// When the file is missing or a key is missing or mistyped.
    pub fn load(path: &Path) -> Result<Self, config::ConfigError> {
        gatehouse_protocol::settings::load(path, "WORKER")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_urls_and_the_older_path_setting() {
        let storage = |url: Option<&str>, path: Option<&str>| StorageSettings {
            url: url.map(str::to_owned),
            path: path.map(PathBuf::from),
            ..StorageSettings::default()
        };
        let sqlite = |s: StorageSettings| match s.location() {
            Ok(gatehouse_storage::Location::Sqlite(p)) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(sqlite(storage(None, None)), PathBuf::from(".gatehouse/worker.sqlite"));
        assert_eq!(sqlite(storage(None, Some("/var/db.sqlite"))), PathBuf::from("/var/db.sqlite"));
        assert_eq!(sqlite(storage(Some("sqlite:/x.sqlite"), None)), PathBuf::from("/x.sqlite"));
        let both = storage(Some("sqlite:a"), Some("b")).location().unwrap_err();
        assert!(both.contains("both url and path"), "{both}");
        let pg = StorageSettings {
            password: Some("s3cret".to_owned().into()),
            tls: Some(StorageTls::Off),
            ..storage(Some("postgres://gatehouse@db:5432/gatehouse"), None)
        };
        match pg.location().unwrap() {
            gatehouse_storage::Location::Postgres(c) => {
                assert_eq!(c.password.as_deref(), Some("s3cret"));
                assert!(!format!("{c:?}").contains("s3cret"), "the password shows in {c:?}");
            }
            other => panic!("{other:?}"),
        }
        // Another host without TLS: refused unless written explicitly.
        let remote = storage(Some("postgres://gatehouse@db.internal:5432/gatehouse"), None);
        let e = remote.location().unwrap_err();
        assert!(e.contains("db.internal") && e.contains("tls_ca"), "{e}");
        assert!(StorageSettings { tls: Some(StorageTls::Off), ..remote.clone() }.location().is_ok());
        assert!(StorageSettings { tls_ca: Some("ca.pem".into()), ..remote }.location().is_ok());
        for local in [
            "postgres://g@127.0.0.1:5439/db",
            "postgres://g@localhost/db",
            "postgres://g@[::1]/db",
            "postgres:///db?host=/run/postgresql",
        ] {
            assert!(storage(Some(local), None).location().is_ok(), "{local}");
        }
        let in_url = storage(Some("postgres://gatehouse:s3cret@db/gatehouse"), None).location().unwrap_err();
        assert!(in_url.contains("must not be in the url") && !in_url.contains("s3cret"), "{in_url}");
    }

    #[test]
    fn shipped_settings_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/worker.toml");
        let s = WorkerSettings::load(&path).unwrap();
        assert!(s.consumer.prefetch >= 1);
        assert!(!s.testing.enabled);
    }
}
