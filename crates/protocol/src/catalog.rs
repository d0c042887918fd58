//! The job catalog (`config/jobs.toml`): which kinds exist, where they queue, how they behave.
//! Read by the gatekeeper (schemas, queue class, default priority) and the worker (attempts,
//! timeouts, sequencing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Priority;

/// One queue class: a durable classic priority queue `gatehouse.jobs.<name>` (priorities 0
/// to 9), or with `type = "quorum"` a few replicated quorum queues, one per priority lane,
/// `gatehouse.jobs.<name>.p<lowest priority of the lane>` (RabbitMQ's quorum queues have no
/// message priorities; the worker runs what it holds from the lanes in priority order).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueClass {
    pub name: String,
    /// Messages the queue (each lane) holds before the broker refuses publishes
    /// (`reject-publish`), which the gatekeeper turns into `503` + `Retry-After`.
    pub max_length: u32,
    #[serde(default, rename = "type")]
    pub queue_type: QueueType,
    /// Quorum only: the lowest priority of each lane (it includes 0); `[7, 4, 0]` unless set:
    /// lanes for priorities 7–9, 4–6 and 0–3.
    #[serde(default)]
    pub lanes: Option<Vec<u8>>,
    /// Quorum only: deliveries of one message after which the broker dead-letters it
    /// (`x-delivery-limit`), a backstop behind the worker's own attempt counting; high, so that
    /// deliveries that were only prefetched when a worker died never reach it.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// Queues per route that clients are spread over, so that one client's backlog does not
    /// hold up the others (1 to [`MAX_FAIR_SHARDS`], default 1): the gatekeeper publishes the
    /// n-th client of its policy to shard n modulo this, and the worker takes turns between
    /// clients over what it holds from all of them (`gatehouse_worker::delivery::turns`).
    /// Shard 0 is the class's queue as without shards; shard k's are `<route>.s<k>`.
    #[serde(default = "one")]
    pub fair_shards: u8,
}

fn one() -> u8 {
    1
}

/// Most fair shards a class may have.
pub const MAX_FAIR_SHARDS: u8 = 16;

/// `base`, with `.s<shard>` after it unless `shard` is 0.
fn with_shard(base: String, shard: u8) -> String {
    if shard == 0 { base } else { format!("{base}.s{shard}") }
}

fn default_delivery_limit() -> u32 {
    50
}

/// What kind of broker queue a class is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// One classic queue with message priorities 0–9, on one node.
    #[default]
    Classic,
    /// Replicated quorum queues, one per priority lane.
    Quorum,
}

impl QueueType {
    /// As the catalog spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

impl QueueClass {
    /// The lanes' lowest priorities, highest lane first; empty for a classic queue.
    pub fn lanes(&self) -> Vec<u8> {
        if self.queue_type == QueueType::Classic {
            return Vec::new();
        }
        let mut lanes = self.lanes.clone().unwrap_or_else(|| vec![7, 4, 0]);
        lanes.sort_unstable_by(|a, b| b.cmp(a));
        lanes.dedup();
        lanes
    }

    /// The route of a job of this class at `priority` in shard 0: the class's name, or for
    /// quorum lanes `<name>.p<lane>`.
    pub fn route(&self, priority: u8) -> String {
        self.route_in(priority, 0)
    }

    /// The routing key (and queue name suffix) of a job of this class at `priority` in fair
    /// shard `shard` (taken modulo the class's shards): the route of shard 0, with `.s<shard>`
    /// after it for the others.
    pub fn route_in(&self, priority: u8, shard: u8) -> String {
        let base = match self.lanes().into_iter().find(|lane| *lane <= priority) {
            Some(lane) => format!("{}.p{lane}", self.name),
            None => self.name.clone(),
        };
        with_shard(base, self.shard(shard))
    }

    /// Every route of this class: for each fair shard, its lanes' (highest first), or its name.
    pub fn routes(&self) -> Vec<String> {
        let bases = self.base_routes();
        (0..self.shards()).flat_map(|s| bases.iter().map(move |b| with_shard(b.clone(), s))).collect()
    }

    /// Whether the worker orders this class's deliveries itself (quorum lanes or fair shards:
    /// several queues the broker orders nothing across) rather than in the broker's order.
    pub fn takes_turns(&self) -> bool {
        !self.lanes().is_empty() || self.shards() > 1
    }

    /// How many fair shards the class has (1 to [`MAX_FAIR_SHARDS`]).
    pub fn shards(&self) -> u8 {
        self.fair_shards.clamp(1, MAX_FAIR_SHARDS)
    }

    /// `shard` within the class's shards.
    fn shard(&self, shard: u8) -> u8 {
        shard % self.shards()
    }

    /// The routes of shard 0: the lanes', or the class's name.
    fn base_routes(&self) -> Vec<String> {
        let lanes = self.lanes();
        if lanes.is_empty() {
            return vec![self.name.clone()];
        }
        lanes.into_iter().map(|lane| format!("{}.p{lane}", self.name)).collect()
    }

    /// The routing key the gatekeeper publishes a job of this class at `priority` with:
    /// `<name>.p<priority>` whatever the queue type, so that the broker's bindings alone say
    /// which queue (or lane) takes it, and a class moves between types without the gatekeeper.
    pub fn publish_key(&self, priority: u8) -> String {
        self.publish_key_in(priority, 0)
    }

    /// The publish key of a job at `priority` in fair shard `shard`: `<name>.p<priority>`, with
    /// `.s<shard>` after it for shards other than 0.
    pub fn publish_key_in(&self, priority: u8, shard: u8) -> String {
        with_shard(format!("{}.p{}", self.name, priority.min(9)), self.shard(shard))
    }

    /// The keys the queue of `route` is bound with, on the jobs and the requeue exchanges: the
    /// publish keys of the priorities (and shard) it takes, its route (what retries and
    /// replays come back with), and for the class's lowest queue of shard 0 (its only queue,
    /// or lane 0) the class's name too (what the route of a classic class was, kept by
    /// retries and dead letters from before a move between types).
    pub fn keys(&self, route: &str) -> Vec<String> {
        let Some((base, shard)) = self.split(route) else { return Vec::new() };
        let lanes = self.lanes();
        let (low, high) = if lanes.is_empty() {
            (0, 9)
        } else {
            let Some(at) = lanes.iter().position(|l| format!("{}.p{l}", self.name) == base) else {
                return Vec::new();
            };
            (lanes[at], if at == 0 { 9 } else { lanes[at - 1] - 1 })
        };
        let mut keys: Vec<String> = (low..=high).map(|p| self.publish_key_in(p, shard)).collect();
        if !keys.iter().any(|k| k == route) {
            keys.push(route.to_owned());
        }
        if low == 0 && shard == 0 && !keys.contains(&self.name) {
            keys.push(self.name.clone());
        }
        keys
    }

    /// Every key a queue of `route` may have been bound with under any type, lanes or shards
    /// of this class: what to take from a queue the class left behind.
    pub fn retired_keys(&self, route: &str) -> Vec<String> {
        let shard = self.former_shard(route);
        let mut keys: Vec<String> =
            (0..=9).map(|p| with_shard(format!("{}.p{p}", self.name), shard)).collect();
        keys.push(self.name.clone());
        if !keys.iter().any(|k| k == route) {
            keys.push(route.to_owned());
        }
        keys
    }

    /// The lowest priority the queue of `route` takes (0 for a classic class), if the route
    /// is this class's.
    pub fn floor(&self, route: &str) -> Option<u8> {
        let (base, _) = self.split(route)?;
        let lanes = self.lanes();
        if lanes.is_empty() {
            return (base == self.name).then_some(0);
        }
        lanes.into_iter().find(|l| format!("{}.p{l}", self.name) == base)
    }

    /// The fair shard of a route this class has or may have had (0 when it names none).
    pub fn former_shard(&self, route: &str) -> u8 {
        self.split_any(route).map_or(0, |(_, s)| s)
    }

    /// The fair shard a route of this class belongs to.
    pub fn shard_of(&self, route: &str) -> Option<u8> {
        self.split(route).map(|(_, s)| s)
    }

    /// `route` as (route of shard 0, shard), if it is one of this class's routes.
    fn split<'r>(&self, route: &'r str) -> Option<(&'r str, u8)> {
        let (base, shard) = self.split_any(route)?;
        (shard < self.shards() && self.base_routes().iter().any(|b| b == base)).then_some((base, shard))
    }

    /// `route` as (route of shard 0, shard) for any type, lanes and shards this class could
    /// have had.
    fn split_any<'r>(&self, route: &'r str) -> Option<(&'r str, u8)> {
        let sharded = route.rsplit_once(".s").and_then(|(base, digits)| {
            let shard = digits.parse::<u8>().ok().filter(|s| (1..MAX_FAIR_SHARDS).contains(s))?;
            (shard.to_string() == digits).then_some((base, shard))
        });
        let (base, shard) = sharded.unwrap_or((route, 0));
        let rest = base.strip_prefix(self.name.as_str())?;
        let lane_ok = rest.is_empty()
            || rest.strip_prefix(".p").is_some_and(|p| p.len() == 1 && p.as_bytes()[0].is_ascii_digit());
        lane_ok.then_some((base, shard))
    }

    /// The queues (routes) this class may have left on the broker under another type, other
    /// lanes or more shards, which its bindings must be taken from: every route a class of
    /// this name can have, but its own.
    pub fn other_routes(&self) -> Vec<String> {
        let own = self.routes();
        let mut bases = vec![self.name.clone()];
        bases.extend((0..=9).map(|p| format!("{}.p{p}", self.name)));
        let mut others: Vec<String> =
            (0..MAX_FAIR_SHARDS).flat_map(|s| bases.iter().map(move |b| with_shard(b.clone(), s))).collect();
        others.retain(|r| !own.contains(r));
        others
    }

    fn check(&self) -> Result<(), String> {
        if !(1..=MAX_FAIR_SHARDS).contains(&self.fair_shards) {
            return Err(format!("queue {}: fair_shards is 1 to {MAX_FAIR_SHARDS}", self.name));
        }
        match (self.queue_type, &self.lanes) {
            (QueueType::Classic, Some(_)) => {
                Err(format!("queue {}: lanes are for type = \"quorum\"", self.name))
            }
            (QueueType::Quorum, Some(l)) if l.is_empty() || l.iter().any(|p| *p > 9) || !l.contains(&0) => {
                Err(format!("queue {}: lanes are priorities 0 to 9 and include 0", self.name))
            }
            _ => Ok(()),
        }
    }
}

/// How many jobs of a kind may run at once, across all workers.
#[derive(Debug, Clone, PartialEq)]
pub struct StartRate {
    /// Per value of this payload field (the client's own), or for the whole kind.
    pub per_key: Option<String>,
    /// Microseconds between starts.
    pub interval_us: i64,
    /// Starts let through at once after a quiet while.
    pub burst: u32,
}

/// `"N/s"`, `"N/min"`, `"N/h"` (N > 0): microseconds between starts.
fn parse_rate(text: &str) -> Result<i64, String> {
    let bad = || format!("rate {text:?}: say N/s, N/min or N/h with N above 0");
    let (n, per) = text.split_once('/').ok_or_else(bad)?;
    let n: f64 = n.trim().parse().map_err(|_| bad())?;
    let per_us = match per.trim() {
        "s" => 1e6,
        "min" => 60e6,
        "h" => 3600e6,
        _ => return Err(bad()),
    };
    if !(n > 0.0 && n.is_finite()) {
        return Err(bad());
    }
    Ok(((per_us / n).round() as i64).max(1))
}

/// How many jobs of a kind may run at once, across all workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunningLimit {
    /// This many of the kind.
    Kind(u32),
    /// This many per client and value of this payload field.
    PerKey { field: String, max: u32 },
}

/// One job kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSpec {
    pub name: String,
    /// The queue class it is published to.
    pub queue: String,
    /// JSON Schema of the payload, relative to the catalog file.
    pub schema: PathBuf,
    /// Priority when the client gives none.
    pub priority: Priority,
    /// Jobs of this kind must carry a `sequence` and apply in number order per key.
    #[serde(default)]
    pub sequenced: bool,
    /// For sequenced kinds: the payload field that must equal the sequence key, so that the
    /// order is kept per the thing the job changes (e.g. the ledger account).
    #[serde(default)]
    pub sequence_key_field: Option<String>,
    /// Deliveries of one job before it is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; later retries double it.
    pub retry_backoff_ms: u64,
    /// Longest a handler may run.
    pub timeout_ms: u64,
    /// How long later numbers of a sequence wait for a missing one.
    #[serde(default = "default_gap_timeout")]
    pub gap_timeout_s: u64,
    /// At most one job of this kind runs at a time (across all workers); the others wait their
    /// turn in arrival order, without using up attempts.
    #[serde(default)]
    pub singleton: bool,
    /// At most one job of this kind per value of this payload field (a string) runs at a time;
    /// values are the client's own (two clients' `"x"` do not wait for each other).
    #[serde(default)]
    pub singleton_key: Option<String>,
    /// At most this many jobs of this kind run at once, across all workers (`singleton` is
    /// 1); the others wait their turn in arrival order, without using up attempts.
    #[serde(default)]
    pub max_running: Option<u32>,
    /// With `max_running_per_key`: the payload field (a string) whose values are limited each
    /// on their own (`singleton_key` is this with 1); values are the client's own.
    #[serde(default)]
    pub limit_key: Option<String>,
    /// At most this many jobs per value of `limit_key` run at once, across all workers.
    #[serde(default)]
    pub max_running_per_key: Option<u32>,
    /// At most this many jobs of the kind start per second, minute or hour, across all workers
    /// (`"100/s"`, `"20/min"`, `"500/h"`); the others are held (`throttled`) and start in
    /// arrival order, each at its reserved time.
    #[serde(default)]
    pub rate: Option<String>,
    /// The same rate for each value of `limit_key` on its own.
    #[serde(default)]
    pub rate_per_key: Option<String>,
    /// Starts a rate lets through at once after a quiet while (default 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Longest delay a client may ask for (`not_before` / `delay_s`), in seconds; 0: none.
    #[serde(default = "default_max_delay")]
    pub max_delay_s: u64,
    /// How long the worker keeps a decided job's record (outcome, result, error) before
    /// pruning it; the worker's `[retention] retain_s` when absent. Never shorter than the
    /// worker's `keys.max_message_age_s` (the worker refuses to start otherwise).
    #[serde(default)]
    pub retain_s: Option<u64>,
    /// Its handler is given the results of the jobs it waited for (`after`): Rust handlers
    /// through `JobContext::parents`, executables through the file `GATEHOUSE_PARENTS` names,
    /// stream mode in the job line. They never leave the worker.
    #[serde(default)]
    pub parent_results: bool,
    /// Exists only when the worker runs with `testing.enabled`.
    #[serde(default)]
    pub testing: bool,
    /// Run by an executable instead of a handler compiled into the worker.
    #[serde(default)]
    pub exec: Option<ExecSpec>,
}

impl KindSpec {
    /// Its limit on jobs running at once, if it has one (`singleton`, `singleton_key`,
    /// `max_running`, `limit_key` with `max_running_per_key`).
    pub fn running_limit(&self) -> Option<RunningLimit> {
        if let Some(field) = &self.singleton_key {
            return Some(RunningLimit::PerKey { field: field.clone(), max: 1 });
        }
        if let (Some(field), Some(max)) = (&self.limit_key, self.max_running_per_key) {
            return Some(RunningLimit::PerKey { field: field.clone(), max });
        }
        if self.singleton {
            return Some(RunningLimit::Kind(1));
        }
        self.max_running.map(RunningLimit::Kind)
    }

    /// Its limit on starts per unit of time, if it has one (`rate`, or `rate_per_key` with
    /// `limit_key`).
    pub fn start_rate(&self) -> Option<StartRate> {
        let (text, per_key) = match (&self.rate, &self.rate_per_key) {
            (Some(r), _) => (r, None),
            (None, Some(r)) => (r, self.limit_key.clone()),
            (None, None) => return None,
        };
        let interval_us = parse_rate(text).ok()?;
        Some(StartRate { per_key, interval_us, burst: self.burst.unwrap_or(1) })
    }

    /// One limit at a time, and none of 0.
    fn check_limit(&self) -> Result<(), String> {
        for rate in [&self.rate, &self.rate_per_key].into_iter().flatten() {
            parse_rate(rate)?;
        }
        if self.rate.is_some() && self.rate_per_key.is_some() {
            return Err("one rate: the kind's (rate) or per key (rate_per_key), not both".into());
        }
        if self.rate_per_key.is_some() && self.limit_key.is_none() {
            return Err("rate_per_key needs limit_key".into());
        }
        if self.limit_key.is_some() && self.max_running_per_key.is_none() && self.rate_per_key.is_none() {
            return Err("limit_key limits nothing without max_running_per_key or rate_per_key".into());
        }
        if self.burst == Some(0)
            || (self.burst.is_some() && self.rate.is_none() && self.rate_per_key.is_none())
        {
            return Err("burst is 1 or more, with a rate".into());
        }
        let kind_wide = self.singleton || self.max_running.is_some();
        let per_key = self.singleton_key.is_some() || self.max_running_per_key.is_some();
        if kind_wide && per_key {
            return Err("one limit on running jobs: the kind's (singleton, max_running) or per key \
                        (singleton_key, limit_key), not both"
                .into());
        }
        if (self.singleton && self.max_running.is_some())
            || (self.singleton_key.is_some() && self.limit_key.is_some())
        {
            return Err("singleton and singleton_key are max_running = 1 and limit_key: say it once".into());
        }
        if self.max_running_per_key.is_some() && self.limit_key.is_none() {
            return Err("max_running_per_key needs limit_key".into());
        }
        if self.max_running == Some(0) || self.max_running_per_key == Some(0) {
            return Err("a running limit of 0 would run nothing".into());
        }
        Ok(())
    }
}

/// `[kind.exec]`: an executable that runs the kind (any language). Relative paths in
/// `command` resolve from the catalog file's folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// `oneshot`: one process per job.
    #[serde(default)]
    pub mode: ExecMode,
    /// Most bytes of stdout taken as the result; more is a failure.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
    /// Copy the child's stderr to the worker's log (truncated lines, marked with the job id).
    /// Off by default: stderr may hold sensitive data.
    #[serde(default)]
    pub log_stderr: bool,
    /// Most bytes the child may write to stderr in one attempt; past it the attempt fails
    /// (`stderr over N bytes`) and the child is killed: the worker never holds more than one
    /// line of it.
    #[serde(default = "default_max_stderr_bytes")]
    pub max_stderr_bytes: u64,
    /// Resource limits of the child.
    #[serde(default)]
    pub limits: ExecLimits,
    /// Paths (files or folders) the child may read besides the system's `/usr` and the files
    /// named in `command`: everything else of the host is invisible to it (see the worker's
    /// `[sandbox]`). Relative paths resolve from the catalog file's folder.
    #[serde(default)]
    pub read_only: Vec<std::path::PathBuf>,
    /// Stream mode: how many long-lived children run at once, across all clients (each
    /// client's jobs go to children of its own).
    #[serde(default = "default_processes")]
    pub processes: usize,
    /// Stream mode: an idle child is stopped after this long.
    #[serde(default = "default_idle_s")]
    pub idle_s: u64,
}

fn default_max_stderr_bytes() -> u64 {
    1024 * 1024
}

fn default_idle_s() -> u64 {
    60
}

fn default_processes() -> usize {
    2
}

/// How an executable kind runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecMode {
    /// One process per job: payload on stdin, result on stdout, exit status for the outcome.
    #[default]
    Oneshot,
    /// A pool of long-lived processes, one JSON line per job each way.
    Stream,
}

/// Resource limits of an executable kind's child (`setrlimit`, through `prlimit`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecLimits {
    /// CPU seconds.
    pub cpu_s: u64,
    /// Address space, MiB.
    pub address_space_mb: u64,
    /// Open files.
    pub open_files: u64,
    /// Processes of the child's user.
    pub processes: u64,
    /// What the child may write to its working folder and `/tmp` together, MiB (a memory
    /// file system of this size: writes past it fail with "no space left").
    pub disk_mb: u64,
}

impl Default for ExecLimits {
    fn default() -> Self {
        Self { cpu_s: 60, address_space_mb: 2048, open_files: 256, processes: 256, disk_mb: 64 }
    }
}

fn default_max_output_bytes() -> usize {
    1024 * 1024
}

fn default_max_delay() -> u64 {
    7 * 24 * 3600
}

fn default_gap_timeout() -> u64 {
    3600
}

#[derive(Debug, Deserialize)]
struct CatalogFile {
    queue: Vec<QueueClass>,
    kind: Vec<KindSpec>,
}

/// The whole catalog, with schema paths made absolute.
#[derive(Debug, Clone)]
pub struct Catalog {
    queues: Vec<QueueClass>,
    kinds: BTreeMap<String, KindSpec>,
}

/// A catalog that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the job catalog {path}: {source}")]
    Read { path: PathBuf, source: config::ConfigError },
    #[error("job catalog: {0}")]
    Invalid(String),
}

impl Catalog {
    /// Loads `config/jobs.toml` (or another path).
    ///
    /// # Errors
    /// When the file cannot be read or parsed, a kind names an unknown queue class, a name
    /// repeats, or a sequenced kind lacks nothing it needs.
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let file: CatalogFile = config::Config::builder()
            .add_source(config::File::from(path))
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|source| CatalogError::Read { path: path.to_owned(), source })?;
        // Absolute: an executable's path must hold in the child's own working folder.
        let base = path.parent().unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
        Self::from_parts(file.queue, file.kind, &base)
    }

    fn from_parts(queues: Vec<QueueClass>, kinds: Vec<KindSpec>, base: &Path) -> Result<Self, CatalogError> {
        for q in &queues {
            q.check().map_err(CatalogError::Invalid)?;
        }
        let mut map = BTreeMap::new();
        for mut kind in kinds {
            if !queues.iter().any(|q| q.name == kind.queue) {
                return Err(CatalogError::Invalid(format!(
                    "kind {} names unknown queue class {}",
                    kind.name, kind.queue
                )));
            }
            if kind.sequence_key_field.is_some() && !kind.sequenced {
                return Err(CatalogError::Invalid(format!(
                    "kind {} has sequence_key_field but is not sequenced",
                    kind.name
                )));
            }
            if kind.max_attempts == 0 {
                return Err(CatalogError::Invalid(format!("kind {}: max_attempts is 0", kind.name)));
            }
            kind.check_limit().map_err(|e| CatalogError::Invalid(format!("kind {}: {e}", kind.name)))?;
            kind.schema = base.join(&kind.schema);
            if let Some(exec) = &mut kind.exec {
                if exec.command.is_empty() {
                    return Err(CatalogError::Invalid(format!("kind {}: exec.command is empty", kind.name)));
                }
                // Paths (with a slash) are relative to the catalog; bare names are looked up
                // in PATH.
                for part in &mut exec.command {
                    if part.contains('/') && Path::new(part.as_str()).is_relative() {
                        *part = base.join(&*part).to_string_lossy().into_owned();
                    }
                }
                for path in &mut exec.read_only {
                    *path = base.join(&*path);
                }
            }
            let name = kind.name.clone();
            if map.insert(name.clone(), kind).is_some() {
                return Err(CatalogError::Invalid(format!("kind {name} is listed twice")));
            }
        }
        Ok(Self { queues, kinds: map })
    }

    /// The kind called `name`, if the catalog has it.
    pub fn kind(&self, name: &str) -> Option<&KindSpec> {
        self.kinds.get(name)
    }

    /// The catalog without the kinds marked `testing` (for a gatekeeper in production: those
    /// kinds are unknown there, and absent from its API document).
    pub fn without_testing(mut self) -> Self {
        self.kinds.retain(|_, k| !k.testing);
        self
    }

    pub fn kinds(&self) -> impl Iterator<Item = &KindSpec> {
        self.kinds.values()
    }

    pub fn queues(&self) -> &[QueueClass] {
        &self.queues
    }

    /// The queue class called `name`.
    pub fn queue(&self, name: &str) -> Option<&QueueClass> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The route of a job of `kind` at `priority` in fair shard `shard` of its class.
    pub fn route_in(&self, kind: &KindSpec, priority: u8, shard: u8) -> String {
        self.queue(&kind.queue).map_or_else(|| kind.queue.clone(), |q| q.route_in(priority, shard))
    }

    /// The fair shard of `kind`'s class that the `n`-th client of the policy (from 0) takes.
    pub fn shard_for(&self, kind: &KindSpec, n: usize) -> u8 {
        self.queue(&kind.queue).map_or(0, |q| (n % usize::from(q.shards())) as u8)
    }

    /// The routing key the gatekeeper publishes a job of `kind` at `priority` in fair shard
    /// `shard` with.
    pub fn publish_key(&self, kind: &KindSpec, priority: u8, shard: u8) -> String {
        self.queue(&kind.queue).map_or_else(|| kind.queue.clone(), |q| q.publish_key_in(priority, shard))
    }

    /// Whether a job of `kind` at `priority` may arrive from the queue of `route`: its own
    /// class's, in its lane or a lower one (where it waits longer, never less; a retry from
    /// before the class moved to quorum lanes comes back in the lowest). A copy in another
    /// class's queue or a higher lane would run early.
    pub fn admits(&self, kind: &KindSpec, priority: u8, route: &str) -> bool {
        self.queue(&kind.queue).and_then(|q| q.floor(route)).is_some_and(|floor| floor <= priority)
    }

    /// The class a route belongs to (a lane's, or the class of that name).
    pub fn class_of_route(&self, route: &str) -> Option<&QueueClass> {
        self.queues.iter().find(|q| q.routes().iter().any(|r| r == route))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(name: &str, queue: &str) -> KindSpec {
        KindSpec {
            name: name.into(),
            queue: queue.into(),
            schema: "s.json".into(),
            priority: Priority::new(5).unwrap(),
            sequenced: false,
            sequence_key_field: None,
            max_attempts: 3,
            retry_backoff_ms: 100,
            timeout_ms: 1000,
            gap_timeout_s: 60,
            max_delay_s: 0,
            singleton: false,
            singleton_key: None,
            max_running: None,
            limit_key: None,
            max_running_per_key: None,
            rate: None,
            rate_per_key: None,
            burst: None,
            retain_s: None,
            parent_results: false,
            testing: false,
            exec: None,
        }
    }

    fn classic(name: &str) -> QueueClass {
        QueueClass {
            name: name.into(),
            max_length: 10,
            queue_type: QueueType::Classic,
            lanes: None,
            delivery_limit: 50,
            fair_shards: 1,
        }
    }

    #[test]
    fn a_quorum_class_routes_each_priority_to_its_lane() {
        let q = QueueClass { queue_type: QueueType::Quorum, ..classic("batch") };
        assert_eq!(q.routes(), ["batch.p7", "batch.p4", "batch.p0"]);
        let lanes: Vec<String> = (0..=9).map(|p| q.route(p)).collect();
        assert_eq!(lanes[..4], ["batch.p0"; 4]);
        assert_eq!(lanes[4..7], ["batch.p4"; 3]);
        assert_eq!(lanes[7..], ["batch.p7"; 3]);
        let two = QueueClass { lanes: Some(vec![0, 9]), ..q.clone() };
        assert_eq!((two.route(8), two.route(9)), ("batch.p0".into(), "batch.p9".into()));
        // A classic class is its own route; lanes must include 0 and are for quorum classes.
        assert_eq!(
            (classic("batch").route(9), classic("batch").routes()),
            ("batch".into(), vec!["batch".into()])
        );
        assert!(QueueClass { lanes: Some(vec![5, 9]), ..q.clone() }.check().is_err());
        assert!(QueueClass { lanes: Some(vec![0, 10]), ..q }.check().is_err());
        assert!(QueueClass { lanes: Some(vec![0]), ..classic("batch") }.check().is_err());
    }

    /// Whatever the type and lanes, each publish key is bound to exactly one queue, the one
    /// `route` names, and the class name (the old classic route) to the lowest; the keys of
    /// the other type's queues are the ones a move takes away.
    #[test]
    fn publish_keys_reach_the_queue_of_their_priority_under_either_type() {
        let quorum = QueueClass { queue_type: QueueType::Quorum, ..classic("batch") };
        let three = QueueClass { lanes: Some(vec![0, 9, 3]), ..quorum.clone() };
        let classes = [classic("batch"), quorum, three];
        let sharded = classes.clone().map(|c| QueueClass { fair_shards: 3, ..c });
        for class in classes.iter().chain(&sharded) {
            for (p, shard) in (0..=9).flat_map(|p| (0..class.shards()).map(move |s| (p, s))) {
                let key = class.publish_key_in(p, shard);
                let holders: Vec<String> =
                    class.routes().into_iter().filter(|r| class.keys(r).contains(&key)).collect();
                assert_eq!(holders, [class.route_in(p, shard)], "{class:?} p{p} s{shard}");
                assert_eq!(class.floor(&class.route_in(p, shard)).map(|f| f <= p), Some(true));
                assert_eq!(class.shard_of(&class.route_in(p, shard)), Some(shard));
            }
            // Retries and replays come back by route.
            assert!(class.routes().iter().all(|r| class.keys(r).contains(r)));
            let lowest: Vec<String> =
                class.routes().into_iter().filter(|r| class.keys(r).contains(&"batch".to_owned())).collect();
            assert_eq!(lowest, [class.route(0)]);
            let others = class.other_routes();
            assert!(
                others.iter().all(|r| !class.routes().contains(r))
                    && others.len() + class.routes().len() == 11 * usize::from(MAX_FAIR_SHARDS)
            );
            assert!(others.iter().all(|r| class.floor(r).is_none()), "{others:?}");
            // A queue left behind is unbound from every key it can have had.
            for r in &others {
                assert!(class.retired_keys(r).contains(r), "{r}");
            }
        }
    }

    /// Shard 0 is the class's queue as without shards; the others have their own, and a shard
    /// number wraps around the class's shards.
    #[test]
    fn fair_shards_add_queues_beside_the_class_queue() {
        let class = QueueClass { fair_shards: 3, ..classic("batch") };
        assert_eq!(class.routes(), ["batch", "batch.s1", "batch.s2"]);
        assert_eq!(
            (class.route_in(5, 4), class.publish_key_in(5, 4)),
            ("batch.s1".into(), "batch.p5.s1".into())
        );
        assert_eq!(class.publish_key_in(5, 3), "batch.p5");
        let quorum = QueueClass { queue_type: QueueType::Quorum, fair_shards: 2, ..classic("batch") };
        assert_eq!(
            quorum.routes(),
            ["batch.p7", "batch.p4", "batch.p0", "batch.p7.s1", "batch.p4.s1", "batch.p0.s1"]
        );
        assert_eq!(class.floor("batch.s01"), None, "not a route of the class");
        assert_eq!(class.floor("batch.s3"), None, "a shard the class does not have");
        assert!(QueueClass { fair_shards: 0, ..classic("batch") }.check().is_err());
        assert!(QueueClass { fair_shards: MAX_FAIR_SHARDS + 1, ..classic("batch") }.check().is_err());
    }

    /// A job arrives from its class's queue, in its lane or a lower one.
    #[test]
    fn a_job_is_admitted_from_its_lane_or_a_lower_one_of_its_class() {
        let quorum = QueueClass { queue_type: QueueType::Quorum, ..classic("batch") };
        let c = Catalog::from_parts(vec![quorum, classic("bulk")], vec![kind("a", "batch")], Path::new("/c"))
            .unwrap();
        let a = c.kind("a").unwrap();
        assert!(c.admits(a, 5, "batch.p4") && c.admits(a, 5, "batch.p0"));
        assert!(!c.admits(a, 5, "batch.p7"), "a higher lane runs it early");
        assert!(
            !c.admits(a, 5, "bulk") && !c.admits(a, 5, "batch"),
            "another class's queue, or one it no longer has"
        );
    }

    /// `singleton` and `singleton_key` are limits of 1; a kind has one limit, never 0.
    #[test]
    fn a_kind_has_one_running_limit() {
        let k = |f: fn(&mut KindSpec)| {
            let mut k = kind("a", "batch");
            f(&mut k);
            k
        };
        assert_eq!(k(|k| k.singleton = true).running_limit(), Some(RunningLimit::Kind(1)));
        assert_eq!(k(|k| k.max_running = Some(4)).running_limit(), Some(RunningLimit::Kind(4)));
        let per_key = RunningLimit::PerKey { field: "f".into(), max: 1 };
        assert_eq!(k(|k| k.singleton_key = Some("f".into())).running_limit(), Some(per_key));
        let three = k(|k| (k.limit_key, k.max_running_per_key) = (Some("f".into()), Some(3)));
        assert_eq!(three.running_limit(), Some(RunningLimit::PerKey { field: "f".into(), max: 3 }));
        assert_eq!(kind("a", "batch").running_limit(), None);
        let rated = k(|k| (k.rate, k.burst) = (Some("20/s".into()), Some(3)));
        assert_eq!(rated.start_rate(), Some(StartRate { per_key: None, interval_us: 50_000, burst: 3 }));
        let hourly = k(|k| (k.limit_key, k.rate_per_key) = (Some("f".into()), Some("7200/h".into())));
        assert_eq!(
            hourly.start_rate(),
            Some(StartRate { per_key: Some("f".into()), interval_us: 500_000, burst: 1 })
        );
        assert_eq!(hourly.running_limit(), None, "a limit_key for the rate only");
        for bad in [
            k(|k| k.rate = Some("20/day".into())),
            k(|k| k.rate = Some("0/s".into())),
            k(|k| k.rate_per_key = Some("1/s".into())),
            k(|k| k.limit_key = Some("f".into())),
            k(|k| k.burst = Some(2)),
            k(|k| (k.max_running, k.limit_key, k.max_running_per_key) = (Some(2), Some("f".into()), Some(1))),
            k(|k| (k.singleton, k.max_running) = (true, Some(2))),
            k(|k| k.max_running_per_key = Some(2)),
            k(|k| k.max_running = Some(0)),
        ] {
            let err = Catalog::from_parts(vec![classic("batch")], vec![bad], Path::new("/c")).unwrap_err();
            assert!(err.to_string().contains("kind a: "), "{err}");
        }
    }

    #[test]
    fn unknown_queue_class_is_refused() {
        let q = vec![classic("batch")];
        let err = Catalog::from_parts(q, vec![kind("a", "nope")], Path::new("/c")).unwrap_err();
        assert!(err.to_string().contains("unknown queue class"));
    }

    #[test]
    fn schema_paths_are_resolved_against_the_catalog() {
        let q = vec![classic("batch")];
        let c = Catalog::from_parts(q, vec![kind("a", "batch")], Path::new("/c")).unwrap();
        assert_eq!(c.kind("a").unwrap().schema, Path::new("/c/s.json"));
    }

    #[test]
    fn shipped_catalog_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml");
        let c = Catalog::load(&path).unwrap();
        for k in ["vault.put", "vault.get", "vault.delete", "ledger.apply", "ledger.balance"] {
            let spec = c.kind(k).unwrap_or_else(|| panic!("{k} missing"));
            assert!(spec.schema.exists(), "{}", spec.schema.display());
        }
        assert!(c.kind("ledger.apply").unwrap().sequenced);
    }
}
