//! CPU time of the processes a job passes through on this machine (Linux `/proc/<pid>/stat`:
//! user + system time of all threads), to report CPU per job where the machine is the limit.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The processes measured, by name (`comm`): gatekeeper(s), worker(s), the broker's Erlang VM,
/// PostgreSQL's server processes.
const GROUPS: [(&str, &str); 4] =
    [("gatekeeper", "gatekeeper"), ("worker", "worker"), ("beam.smp", "broker"), ("postgres", "postgres")];

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ: 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// CPU ticks so far of each measured process: `(group, pid) -> ticks`.
#[derive(Debug, Clone, Default)]
pub struct Cpu(BTreeMap<(&'static str, u32), u64>);

impl Cpu {
    /// The CPU time used so far by every measured process.
    pub fn now() -> Self {
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else { return Self(out) };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
            let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) else { continue };
            let Some((_, group)) = GROUPS.iter().find(|(c, _)| *c == comm.trim()) else { continue };
            if let Some(ticks) = ticks(pid) {
                out.insert((*group, pid), ticks);
            }
        }
        Self(out)
    }

    /// What each process used since `before` (processes that started meanwhile count from 0).
    pub fn since(&self, before: &Cpu) -> Cpu {
        Cpu(self.0.iter().map(|(k, v)| (*k, v.saturating_sub(*before.0.get(k).unwrap_or(&0)))).collect())
    }

    /// Adds what another interval used.
    pub fn add(&mut self, other: &Cpu) {
        for (k, v) in &other.0 {
            *self.0.entry(*k).or_default() += v;
        }
    }

    /// CPU milliseconds per job, by group, and per worker process; `jobs` jobs were done.
    pub fn per_job(&self, jobs: usize) -> Value {
        let ms = |ticks: u64| {
            ((ticks as f64 / TICKS_PER_S * 1000.0 / jobs.max(1) as f64) * 1000.0).round() / 1000.0
        };
        let mut groups: BTreeMap<&str, u64> = BTreeMap::new();
        for ((group, _), v) in &self.0 {
            *groups.entry(group).or_default() += v;
        }
        let workers: Vec<f64> =
            self.0.iter().filter(|((g, _), _)| *g == "worker").map(|(_, v)| ms(*v)).collect();
        json!({
            "cpu_ms_per_job": groups.into_iter().map(|(g, v)| (g.to_owned(), json!(ms(v)))).collect::<serde_json::Map<_, _>>(),
            "worker_processes_cpu_ms_per_job": workers,
        })
    }
}

/// utime + stime of process `pid`, in clock ticks.
fn ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces), from field 3: utime is 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}
