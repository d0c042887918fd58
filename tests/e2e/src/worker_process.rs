//! A worker as a real child process (the fault tests kill it), optionally restarted when it
//! exits.

use super::*;

/// A worker child process, optionally restarted when it exits.
pub struct WorkerProcess {
    pub(crate) binary: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) log_filter: &'static str,
    pub(crate) child: Mutex<Option<Child>>,
    /// How many times the process was started.
    pub starts: std::sync::atomic::AtomicU32,
    pub(crate) supervising: std::sync::atomic::AtomicBool,
    /// Run as this uid and gid.
    pub(crate) uid: Option<u32>,
}

/// A test that fails (panics) before [`TestSystem::stop`] leaves no worker process behind.
impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl WorkerProcess {
    /// Starts the process (if it is not running).
    pub fn start(&self) {
        let mut child = self.child.lock().expect("lock");
        if child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none()) {
            return;
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let mut cmd = Command::new(&self.binary);
        cmd.arg(&self.config)
            .env("RUST_LOG", self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(uid) = self.uid {
            use std::os::unix::process::CommandExt as _;
            // (std drops root's supplementary groups when it sets the uid.) It works in its
            // config's folder: the test's own may be closed to it.
            cmd.uid(uid).gid(uid);
            if let Some(folder) = self.config.parent() {
                cmd.current_dir(folder);
            }
        }
        let spawned = cmd.spawn().expect("worker process starts");
        self.starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *child = Some(spawned);
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().expect("lock").as_ref().map(Child::id)
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().expect("lock").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; waits for the exit. Returns how it exited and how long that took.
    pub fn terminate(&self) -> Option<(ExitStatus, Duration)> {
        let mut c = self.child.lock().expect("lock").take()?;
        let started = Instant::now();
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let status = c.wait().ok()?;
        Some((status, started.elapsed()))
    }

    /// Restarts the process whenever it exits, while supervising.
    pub(crate) async fn supervise(self: Arc<Self>) {
        while self.supervising.load(std::sync::atomic::Ordering::SeqCst) {
            let exited = {
                let mut child = self.child.lock().expect("lock");
                child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some())
            };
            if exited && self.supervising.load(std::sync::atomic::Ordering::SeqCst) {
                self.start();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The worker settings as a TOML file for the worker binary.
pub(crate) fn worker_toml(s: &WorkerSettings) -> String {
    format!(
        "[broker]\nurl = \"{}\"\nother_urls = [{}]\nprefix = \"{}\"\n\n[consumer]\nprefetch = {}\nstopping_wait_time_ms = {}\nmax_parked_per_client = {}\n\
         max_delayed_per_client = {}\nmax_waiting_per_client = {}\n\
         hand_off_after_ms = {}\nlease_ms = {}\n\n\
         [storage]\nurl = \"{}\"\n{}\n[catalog]\npath = \"{}\"\n\n[testing]\nenabled = {}\n\n\
         [keys]\nsealing_key = \"{}\"\ngatekeeper_signing_keys = [\"{}\"]\n\
         operator_keys = [\"{}\"]\ndata_keyring = \"{}\"\nmax_message_age_s = {}\n\n[admin]\nlisten = \"{}\"\n\n\
         [retention]\n{}prune_batch = {}\nprune_every_ms = {}\n\n[schedules]\n{}",
        s.broker.url.expose(),
        s.broker.other_urls.iter().map(|u| format!("\"{}\"", u.expose())).collect::<Vec<_>>().join(", "),
        s.broker.prefix,
        s.consumer.prefetch,
        s.consumer.stopping_wait_time_ms,
        s.consumer.max_parked_per_client,
        s.consumer.max_delayed_per_client,
        s.consumer.max_waiting_per_client,
        s.consumer.hand_off_after_ms,
        s.consumer.lease_ms,
        s.storage.url.as_deref().expect("a storage url"),
        s.storage
            .password_file
            .as_ref()
            .map(|f| format!("password_file = \"{}\"\n", f.display()))
            .unwrap_or_default(),
        s.catalog.path.display(),
        s.testing.enabled,
        s.keys.sealing_key.display(),
        s.keys.gatekeeper_signing_keys[0].display(),
        s.keys.operator_keys[0].display(),
        s.keys.data_keyring.display(),
        s.keys.max_message_age_s,
        s.admin.listen,
        s.retention.retain_s.map(|r| format!("retain_s = {r}\n")).unwrap_or_default(),
        s.retention.prune_batch,
        s.retention.prune_every_ms,
        s.schedules.path.as_ref().map(|p| format!("path = \"{}\"\n", p.display())).unwrap_or_default(),
    ) + &s
        .telemetry
        .otlp_endpoint
        .as_ref()
        .map(|e| format!("\n[telemetry]\notlp_endpoint = \"{e}\"\n"))
        .unwrap_or_default()
}
