//! Schedules: `config/schedules.toml`, the worker's own trusted file, names jobs to run on a cron
//! expression in a time zone, as a client identity.
//!
//! A firing is a job whose id derives from the schedule's name and the firing time, so it is
//! one job however many workers see it come due. Each worker plans the firings of every
//! schedule in one storage transaction ([`plan`]): the schedule's row says up to which time
//! firings were dealt with, and the transaction that moves it on also records the firing's job
//! and holds its message in storage, exactly as a delayed job's (the `delayed` sweeper sends it
//! to its queue). Two workers planning at once are serialised by storage; the second finds the
//! firing dealt with. The message is made and vouched for by the worker itself (a key derived
//! from its sealing key, see [`WorkerKeys::own_job`]) and checked on arrival like
//! any other.
//!
//! **No overlap**: while the job of a schedule's previous firing has not been decided, a new
//! firing is skipped and counted, unless the schedule sets `overlap = true`.
//!
//! **Missed firings** (no worker ran at their time; due longer than [`MISSED_AFTER_MS`] ago
//! when a worker plans them) follow `catch_up`: `"none"` lets them all go, `"last"` (the
//! default) runs the latest of them once, `"all"` runs each (at most [`MAX_PER_PASS`] per
//! pass). A schedule seen for the first time starts from now.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::schemas::Schemas;
use gatehouse_protocol::{Catalog, JobEnvelope, JobId, JobState, Priority};
use gatehouse_storage::{ScheduleState, StorageError, Store, StoredJob, Tx};
use serde::Deserialize;
use serde_json::Value;

use super::Sweep;
use crate::admin::metrics::WorkerMetrics;
use crate::security::WorkerKeys;

/// A firing due longer ago than this when planned was missed (no worker ran at its time).
pub const MISSED_AFTER_MS: i64 = 10_000;
/// Most firings of one schedule planned in one transaction.
pub const MAX_PER_PASS: usize = 1_000;
/// Most missed firings counted one by one (a longer gap is counted as this many).
const MAX_COUNTED: usize = 100_000;
/// Longest pause between two planning passes.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// What happens to firings missed while no worker ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    None,
    #[default]
    Last,
    All,
}

/// One `[[schedule]]` of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Unique; letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week) or six (seconds first).
    pub cron: String,
    /// An IANA time zone (`Europe/Berlin`); `UTC` by default.
    #[serde(default = "utc")]
    pub timezone: String,
    pub kind: String,
    #[serde(default = "empty_object")]
    pub payload: Value,
    /// The client identity the jobs run as (whose vault records, whose ledger keys).
    pub client: String,
    /// The kind's priority unless set.
    #[serde(default)]
    pub priority: Option<u8>,
    /// Start a firing even while the previous one still runs.
    #[serde(default)]
    pub overlap: bool,
    #[serde(default)]
    pub catch_up: CatchUp,
}

fn utc() -> String {
    "UTC".into()
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    schedule: Vec<ScheduleSpec>,
}

/// A checked schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub spec: ScheduleSpec,
    cron: croner::Cron,
    tz: chrono_tz::Tz,
    priority: Priority,
}

impl Schedule {
    /// `ms` in the schedule's time zone, down to the whole second (firings are at whole
    /// seconds, whatever time a worker asks from).
    fn at(&self, ms: i64) -> DateTime<chrono_tz::Tz> {
        Utc.timestamp_opt(ms.div_euclid(1000), 0).single().unwrap_or_default().with_timezone(&self.tz)
    }

    /// The first firing after `after_ms` (unix ms).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        self.cron.find_next_occurrence(&self.at(after_ms), false).ok().map(|t| t.timestamp_millis())
    }

    /// The last firing at or before `ms`.
    fn last_at_or_before(&self, ms: i64) -> Option<i64> {
        self.cron.find_previous_occurrence(&self.at(ms), true).ok().map(|t| t.timestamp_millis())
    }

    /// Firings after `after_ms` up to `upto_ms`, at most `limit`.
    pub fn firings(&self, after_ms: i64, upto_ms: i64, limit: usize) -> Vec<i64> {
        let mut out = Vec::new();
        let mut at = after_ms;
        while out.len() < limit {
            match self.next_after(at) {
                Some(next) if next <= upto_ms && next > at => {
                    out.push(next);
                    at = next;
                }
                _ => break,
            }
        }
        out
    }

    /// The job of the firing at `fire_ms` (its id keyed with the worker's secret).
    pub fn job(&self, fire_ms: i64, keys: &WorkerKeys) -> JobEnvelope {
        JobEnvelope {
            id: keys.firing_id(&self.spec.name, fire_ms),
            kind: self.spec.kind.clone(),
            client: self.spec.client.clone(),
            priority: self.priority,
            sequence: None,
            payload: self.spec.payload.clone(),
            submitted_at_ms: fire_ms.max(0) as u64,
            not_before_ms: None,
            reply: None,
            trace_id: None,
            span_id: None,
            shard: 0,
            share: 1,
            idempotency_key: None,
            completes: None,
            after: Vec::new(),
            on_parent_failure: gatehouse_protocol::envelope::ParentFailure::Cancel,
        }
    }
}

/// The schedules of a worker.
#[derive(Debug, Clone, Default)]
pub struct Schedules(pub Vec<Schedule>);

impl Schedules {
    /// Loads and checks `path`: unique names, cron expressions and time zones that parse, kinds
    /// this worker runs (not sequenced), payloads their schemas accept, priorities 0 to 9.
    ///
    /// # Errors
    /// The first problem, in one line.
    pub fn load(path: &Path, catalog: &Catalog, schemas: &Schemas, testing: bool) -> Result<Self, String> {
        let file: File = config::Config::builder()
            .add_source(config::File::from(path))
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for spec in file.schedule {
            let at = |what: String| format!("{}: schedule {:?}: {what}", path.display(), spec.name);
            let name_ok = !spec.name.is_empty()
                && spec.name.len() <= 100
                && spec.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !name_ok {
                return Err(at("a name is 1 to 100 letters, digits, '.', '_' or '-'".into()));
            }
            if !names.insert(spec.name.clone()) {
                return Err(at("named twice".into()));
            }
            let cron = croner::Cron::from_str(&spec.cron)
                .map_err(|e| at(format!("cron {:?} does not parse: {e}", spec.cron)))?;
            let tz: chrono_tz::Tz =
                spec.timezone.parse().map_err(|_| at(format!("unknown time zone {:?}", spec.timezone)))?;
            let kind = catalog
                .kind(&spec.kind)
                .filter(|k| testing || !k.testing)
                .ok_or_else(|| at(format!("kind {} is not in the job catalog", spec.kind)))?;
            if kind.sequenced {
                return Err(at(format!(
                    "kind {} is sequenced; a schedule cannot number its jobs",
                    kind.name
                )));
            }
            if let Some(field) = schemas.sealed(&spec.kind).first() {
                return Err(at(format!(
                    "kind {} has a field its clients seal ({field}); a schedule's payload is in the clear",
                    kind.name
                )));
            }
            if let Err(violations) = schemas.validate(&spec.kind, &spec.payload) {
                let paths: Vec<String> = violations.into_iter().map(|v| v.path).collect();
                return Err(at(format!(
                    "payload does not match the schema of {} at {}",
                    spec.kind,
                    paths.join(", ")
                )));
            }
            if spec.client.trim().is_empty() {
                return Err(at("client is empty".into()));
            }
            let priority = Priority::new(spec.priority.unwrap_or(kind.priority.get()))
                .map_err(|_| at("priority is 0 to 9".into()))?;
            out.push(Schedule { spec, cron, tz, priority });
        }
        Ok(Self(out))
    }
}

/// What one planning pass did for a schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Firings whose jobs were made: (job, firing time).
    pub fired: Vec<(JobId, i64)>,
    pub skipped: u64,
    pub missed: u64,
    /// The schedule's last firing dealt with (unix ms).
    pub last_fire_ms: i64,
}

/// Plans the firings of `s` due by `now` in one transaction (see the module docs).
///
/// # Errors
/// Storage failures (nothing is planned).
pub fn plan(tx: &Tx<'_>, s: &Schedule, keys: &WorkerKeys, now: i64) -> Result<Plan, StorageError> {
    // Workers sharing PostgreSQL plan one at a time; the next finds the firings dealt with.
    tx.lock(&format!("schedule {}", s.spec.name))?;
    let Some(mut state) = tx.schedule_state(&s.spec.name)? else {
        tx.save_schedule_state(&ScheduleState {
            name: s.spec.name.clone(),
            last_fire_ms: now,
            last_job: None,
            running_job: None,
            running_fire_ms: None,
            fired: 0,
            skipped: 0,
            missed: 0,
        })?;
        return Ok(Plan { last_fire_ms: now, ..Plan::default() });
    };
    let mut plan = Plan::default();
    // Missed firings: let go (none), or all but the latest (last).
    let cutoff = now - MISSED_AFTER_MS;
    if s.spec.catch_up != CatchUp::All
        && let Some(latest) = s.last_at_or_before(cutoff).filter(|l| *l > state.last_fire_ms)
    {
        let missed = s.firings(state.last_fire_ms, latest, MAX_COUNTED).len().max(1) as u64;
        let (let_go, resume_after) = match s.spec.catch_up {
            CatchUp::Last => (missed - 1, latest - 1),
            _ => (missed, latest),
        };
        plan.missed += let_go;
        state.last_fire_ms = resume_after;
    }
    let max_age = keys.max_message_age.as_millis() as i64;
    for fire in s.firings(state.last_fire_ms, now, MAX_PER_PASS) {
        state.last_fire_ms = fire;
        if !s.spec.overlap && still_runs(tx, &state, now, max_age)? {
            plan.skipped += 1;
            continue;
        }
        let env = s.job(fire, keys);
        let id = env.id.clone();
        if tx.job(&id)?.is_none() && tx.attempts(&id)?.is_none() {
            let message =
                keys.own_job(&env).map_err(|e| StorageError::Corrupt(format!("sealing a firing: {e}")))?;
            tx.record_job(&StoredJob {
                id: id.clone(),
                client: env.client.clone(),
                kind: env.kind.clone(),
                state: JobState::Scheduled,
                result: None,
                error: None,
                reason: None,
                sequence: None,
                submitted_at_ms: i64::try_from(env.submitted_at_ms).ok(),
            })?;
            // Held like a delayed job that is due: the sweeper sends it to its queue.
            tx.schedule(&id, fire.max(0) as u64, &message)?;
        }
        state.last_job = Some(id.clone());
        state.running_job = Some(id.clone());
        state.running_fire_ms = Some(fire);
        plan.fired.push((id, fire));
    }
    if state.last_fire_ms < cutoff && s.spec.catch_up != CatchUp::All {
        state.last_fire_ms = state.last_fire_ms.max(cutoff.min(now));
    }
    state.fired += plan.fired.len() as u64;
    state.skipped += plan.skipped;
    state.missed += plan.missed;
    plan.last_fire_ms = state.last_fire_ms;
    tx.save_schedule_state(&state)?;
    Ok(plan)
}

/// Whether the job of the schedule's latest firing is undecided (and could still run: its
/// message is younger than the oldest a worker accepts).
fn still_runs(tx: &Tx<'_>, state: &ScheduleState, now: i64, max_age_ms: i64) -> Result<bool, StorageError> {
    let Some(id) = &state.running_job else { return Ok(false) };
    if tx.job(id)?.is_some_and(|j| j.state.is_final()) {
        return Ok(false);
    }
    Ok(state.running_fire_ms.is_some_and(|f| now - f <= max_age_ms))
}

/// Plans every schedule's firings as they come due.
pub struct Planning {
    store: Store,
    schedules: Arc<Schedules>,
    keys: Arc<WorkerKeys>,
    metrics: Arc<WorkerMetrics>,
    /// When each schedule next needs planning; 0: at once (its state is read).
    due: Vec<i64>,
}

impl Planning {
    pub fn new(
        store: Store,
        schedules: Arc<Schedules>,
        keys: Arc<WorkerKeys>,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        let due = vec![0; schedules.0.len()];
        Self { store, schedules, keys, metrics, due }
    }

    /// Plans `s` (due now); answers when it next needs planning.
    async fn plan_one(&self, s: &Schedule, now: i64) -> i64 {
        let (s2, keys) = (s.clone(), self.keys.clone());
        match self.store.transact(move |tx| plan(tx, &s2, &keys, now)).await {
            Ok(p) => {
                self.metrics.schedule_fired(&s.spec.name, p.fired.len() as u64, p.skipped, p.missed);
                for (id, fire) in &p.fired {
                    tracing::info!(schedule = %s.spec.name, job_id = %id, fire_ms = fire, "schedule fired");
                }
                if p.skipped > 0 {
                    tracing::info!(schedule = %s.spec.name, skipped = p.skipped, "firing skipped: the previous one still runs");
                }
                if p.missed > 0 {
                    tracing::warn!(schedule = %s.spec.name, missed = p.missed, "firings missed while no worker ran");
                }
                s.next_after(p.last_fire_ms.max(now - MISSED_AFTER_MS)).unwrap_or(i64::MAX)
            }
            Err(e) => {
                tracing::warn!(schedule = %s.spec.name, error = %e, "planning a schedule failed; trying again");
                now + 500
            }
        }
    }
}

impl Sweep for Planning {
    fn name(&self) -> &'static str {
        "schedules"
    }

    /// Until the next schedule is due, at most [`MAX_PAUSE`].
    fn pause(&self) -> Duration {
        let next = self.due.iter().copied().min().unwrap_or(i64::MAX);
        Duration::from_millis(next.saturating_sub(now_ms()).clamp(0, MAX_PAUSE.as_millis() as i64) as u64)
    }

    async fn run_once(&mut self) -> anyhow::Result<()> {
        let now = now_ms();
        let schedules = self.schedules.clone();
        for (i, s) in schedules.0.iter().enumerate() {
            if self.due[i] <= now {
                self.due[i] = self.plan_one(s, now).await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn catalog() -> Catalog {
        Catalog::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml")).unwrap()
    }

    fn keys(dir: &Path) -> WorkerKeys {
        gatehouse_protocol::keys::write_dev(dir).unwrap();
        keys_at(dir)
    }

    /// The keys already written in `dir`.
    fn keys_at(dir: &Path) -> WorkerKeys {
        WorkerKeys::load(&crate::settings::KeySettings {
            sealing_key: dir.join("worker-sealing.key"),
            previous_sealing_keys: vec![],
            gatekeeper_signing_keys: vec![dir.join("gatekeeper-signing.pub")],
            operator_keys: vec![],
            data_keyring: dir.join("worker-data.keys"),
            max_message_age_s: 3600,
        })
        .unwrap()
    }

    fn schedules(dir: &Path, text: &str) -> Result<Schedules, String> {
        let path = dir.join("schedules.toml");
        std::fs::write(&path, text).unwrap();
        let catalog = catalog();
        Schedules::load(&path, &catalog, &Schemas::compile(&catalog).unwrap(), true)
    }

    fn every_second(catch_up: &str, overlap: bool) -> String {
        format!(
            "[[schedule]]\nname = \"s\"\ncron = \"* * * * * *\"\nkind = \"test.sleep\"\npayload = {{ ms = 1 }}\n\
             client = \"c\"\ncatch_up = \"{catch_up}\"\noverlap = {overlap}\n"
        )
    }

    /// Plans `text`'s schedule at `t0`, then again a minute later (as after a minute's
    /// downtime): answers the second plan.
    async fn after_a_minute_away(text: &str) -> Plan {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(keys(dir.path()));
        let s = schedules(dir.path(), text).unwrap().0.remove(0);
        let keyring = gatehouse_protocol::keys::keyring(&dir.path().join("worker-data.keys")).unwrap();
        let store = Store::open_sqlite(&dir.path().join("db"), keyring, &[]).unwrap();
        let t0 = 1_800_000_000_000_i64;
        let (s1, k1) = (s.clone(), keys.clone());
        let first = store.transact(move |tx| plan(tx, &s1, &k1, t0)).await.unwrap();
        assert!(first.fired.is_empty(), "a new schedule starts from now");
        store.transact(move |tx| plan(tx, &s, &keys, t0 + 60_000)).await.unwrap()
    }

    #[tokio::test]
    async fn missed_firings_follow_the_catch_up_policy() {
        // Firings at t0+1 s .. t0+60 s; those up to t0+50 s are older than MISSED_AFTER_MS.
        let none = after_a_minute_away(&every_second("none", true)).await;
        assert_eq!((none.fired.len(), none.missed), (10, 50));
        let last = after_a_minute_away(&every_second("last", true)).await;
        assert_eq!((last.fired.len(), last.missed), (11, 49));
        let all = after_a_minute_away(&every_second("all", true)).await;
        assert_eq!((all.fired.len(), all.missed), (60, 0));
        // Each firing's job id is its own.
        let ids: std::collections::HashSet<JobId> = all.fired.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(ids.len(), 60);
    }

    #[test]
    fn firing_ids_derive_from_name_and_time_keyed_with_the_workers_secret() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ka, kb) = (keys(a.path()), keys(b.path()));
        let t = 1_800_000_000_000_i64;
        // The same for every worker with this sealing key (they share a database)...
        assert_eq!(ka.firing_id("s", t), keys_at(a.path()).firing_id("s", t));
        // ... and nobody without it can compute one (a gatekeeper could otherwise submit a job
        // under a future firing's id, which planning skips as already there).
        assert_ne!(ka.firing_id("s", t), kb.firing_id("s", t));
        assert_ne!(ka.firing_id("s", t), ka.firing_id("s", t + 1000));
        assert_ne!(ka.firing_id("s", t), ka.firing_id("t", t));
    }

    #[tokio::test]
    async fn without_overlap_a_firing_is_skipped_while_the_previous_one_is_undecided() {
        let plan = after_a_minute_away(&every_second("all", false)).await;
        assert_eq!((plan.fired.len(), plan.skipped), (1, 59));
    }

    #[test]
    fn a_schedule_file_with_a_mistake_is_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = every_second("last", false);
        assert!(schedules(dir.path(), &good).is_ok());
        for (text, says) in [
            (good.replace("* * * * * *", "every minute"), "does not parse"),
            (format!("{good}timezone = \"Mars/Olympus\"\n"), "unknown time zone"),
            (good.replace("test.sleep", "acme.nothing"), "not in the job catalog"),
            (good.replace("{ ms = 1 }", "{ ms = \"soon\" }"), "does not match the schema"),
            (format!("{good}{good}"), "named twice"),
            (good.replace("name = \"s\"", "name = \"a b\""), "a name is"),
            (good.replace("kind = \"test.sleep\"", "kind = \"ledger.apply\""), "sequenced"),
            (
                good.replace("kind = \"test.sleep\"", "kind = \"vault.put_sealed\"")
                    .replace("{ ms = 1 }", "{ record = { a = 1 } }"),
                "seal",
            ),
            (good.replace("\"last\"", "\"sometimes\""), "sometimes"),
        ] {
            let e = schedules(dir.path(), &text).unwrap_err();
            assert!(e.contains(says) && !e.contains('\n'), "{says}: {e}");
        }
    }

    #[test]
    fn the_shipped_example_schedule_loads_once_uncommented() {
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/schedules.toml"),
        )
        .unwrap();
        let example: String = shipped
            .lines()
            .skip_while(|l| !l.starts_with("# [[schedule]]"))
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let loaded = schedules(dir.path(), &example).unwrap();
        assert_eq!(loaded.0.len(), 1, "{example}");
        assert_eq!(loaded.0[0].spec.catch_up, CatchUp::Last);
    }

    #[test]
    fn firings_are_whole_seconds_in_the_schedules_time_zone() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[[schedule]]\nname = \"daily\"\ncron = \"0 2 * * *\"\ntimezone = \"Europe/Berlin\"\n\
                    kind = \"test.sleep\"\npayload = { ms = 1 }\nclient = \"c\"\n";
        let s = schedules(dir.path(), text).unwrap().0.remove(0);
        // 2026-11-30 12:00:00.437 UTC: the next 02:00 in Berlin (UTC+1 in winter) is 01:00 UTC.
        let next = s.next_after(1_796_040_000_437).unwrap();
        assert_eq!(next, 1_796_086_800_000);
        assert_eq!(s.firings(1_796_040_000_437, next + 86_400_000, 10).len(), 2);
    }
}
