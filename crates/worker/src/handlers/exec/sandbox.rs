//! The sandbox an executable kind's child runs in (`[sandbox]` in the worker's settings).
//!
//! With `mode = "bubblewrap"` (the default) every child runs under Debian's `bwrap` in
//! namespaces of its own — mount, PID, IPC, network, UTS and cgroup, and user when the worker
//! is not root — and sees only:
//!
//! | path | what |
//! |---|---|
//! | `/usr` (and the `/bin`, `/lib*` links), `/etc/ld.so.cache`, `/etc/alternatives`, `/etc/localtime` | the system's programs and libraries, read-only |
//! | the files its `command` names, the kind's `read_only` paths | read-only, at their own paths |
//! | `/job` (its working folder) and `/tmp` | memory file systems of `limits.disk_mb` each, its own |
//! | `/gatehouse/checkpoint.json` | an earlier attempt's checkpoint, read-only |
//! | `/proc`, `/dev` | its own PID namespace's processes; the minimal devices |
//!
//! So it cannot open the worker's key files, database, config or `/proc/<pid>` of the worker
//! or of other jobs, cannot signal or trace them (it cannot name them), has no network, and its
//! whole process tree ends with the attempt: `bwrap` is the worker's child, dies with it
//! (`--die-with-parent`), and when it dies the kernel ends every process of its PID namespace,
//! `setsid()` and double forks included.
//!
//! **Uids.** A worker running as root runs each client's jobs under a host uid of their own
//! (`uid_base` + n, switched to inside the sandbox by util-linux's `setpriv`, with no
//! capabilities): two clients never share a uid, and `RLIMIT_NPROC` holds (the kernel does not
//! apply it to root). A worker that is not root cannot switch uids: the child keeps the
//! worker's host uid inside a user namespace of its own (with a per-client uid inside it), and
//! the namespaces above keep clients apart.
//!
//! Why `bwrap` and not our own `clone3` + namespaces or `landlock`: the workspace forbids
//! `unsafe`, which a pre-exec hook needs; `bwrap` is small, audited, packaged by Debian, and
//! works unprivileged; landlock restricts file access but leaves `/proc`, signals and process
//! lifetime to us.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use gatehouse_protocol::catalog::ExecSpec;

use crate::settings::{SandboxMode, SandboxSettings};

/// Where `bwrap`, `prlimit` and `setpriv` live on Debian (`bubblewrap`, `util-linux`).
pub const BWRAP: &str = "/usr/bin/bwrap";
const PRLIMIT: &str = "/usr/bin/prlimit";
const SETPRIV: &str = "/usr/bin/setpriv";
/// `PATH` inside the sandbox (programs named without a slash are looked up there).
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The child's working folder inside the sandbox.
pub const WORK_DIR: &str = "/job";
/// Where the child's read-only inputs (its checkpoint) are inside the sandbox.
pub const INPUT_DIR: &str = "/gatehouse";
/// Host files every child may read (those that exist).
const SYSTEM_FILES: &[&str] = &["/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime"];

/// How children are confined, and which uid each client's jobs get.
pub struct Sandbox {
    mode: SandboxMode,
    /// The worker runs as root: switch each client's jobs to a uid of its own.
    root: bool,
    uid_base: u32,
    uids: u32,
    assigned: Mutex<HashMap<String, u32>>,
}

impl Sandbox {
    /// Checks the sandbox can be set up on this machine: `bwrap` installed and able to create
    /// its namespaces (a real probe), `prlimit` and `setpriv` present. `none` only with
    /// `testing` (and one WARN line).
    ///
    /// # Errors
    /// What is missing, in one line.
    pub fn new(settings: &SandboxSettings, testing: bool) -> Result<Self, String> {
        let root = is_root();
        let this = Self {
            mode: settings.mode,
            root,
            uid_base: settings.uid_base,
            uids: settings.uids.max(1),
            assigned: Mutex::default(),
        };
        for tool in [PRLIMIT, SETPRIV] {
            if !is_executable(Path::new(tool)) {
                return Err(format!("executable kinds need {tool} (util-linux) to confine their children"));
            }
        }
        if this.mode == SandboxMode::None {
            if !testing {
                return Err(
                    "[sandbox] mode = \"none\" is for development only: it needs [testing] enabled = true"
                        .into(),
                );
            }
            tracing::warn!(
                "[sandbox] mode = none: executable kinds run unconfined, as the worker's own user"
            );
            return Ok(this);
        }
        if !is_executable(Path::new(BWRAP)) {
            return Err(format!(
                "executable kinds need bubblewrap ({BWRAP}) for their sandbox: apt-get install bubblewrap"
            ));
        }
        this.probe()?;
        Ok(this)
    }

    /// Whether children run in namespaces (`bubblewrap`).
    pub fn confines(&self) -> bool {
        self.mode == SandboxMode::Bubblewrap
    }

    /// Runs `/usr/bin/true` in a sandbox as a job would, to find out at start-up (not on the
    /// first job) whether this machine allows it (user namespaces, a container's seccomp).
    fn probe(&self) -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| format!("sandbox probe: {e}"))?;
        let mut cmd = std::process::Command::new(BWRAP);
        cmd.args(self.bwrap_args(self.uid_base, dir.path(), 1, &[]))
            .args(self.inner_prefix(self.uid_base))
            .arg("/usr/bin/true")
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let out = cmd.output().map_err(|e| format!("cannot run {BWRAP}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "bubblewrap cannot create a sandbox here ({}); executable kinds need unprivileged user namespaces or a root worker",
            err.lines().next().unwrap_or("no reason given").trim()
        ))
    }

    /// The uid a client's jobs run under (see the module docs).
    pub fn uid(&self, client: &str) -> u32 {
        let mut assigned = self.assigned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = assigned.len() as u32;
        *assigned.entry(client.to_owned()).or_insert_with(|| self.uid_base + next % self.uids)
    }

    /// The command that runs `spec`'s program for `client` in its sandbox: resource limits
    /// (`prlimit`), the namespaces, only `env` (plus `PATH` and `LANG`), `input` (a host folder
    /// the worker wrote) read-only at [`INPUT_DIR`]. Without a sandbox (`none`): the same
    /// limits, killed when the worker dies, working in `input`.
    ///
    /// # Errors
    /// When `input` cannot be handed to the client's uid.
    pub fn command(
        &self,
        spec: &ExecSpec,
        client: &str,
        input: &Path,
        env: &[(&str, String)],
    ) -> std::io::Result<tokio::process::Command> {
        let l = &spec.limits;
        let mut cmd = tokio::process::Command::new(PRLIMIT);
        cmd.arg(format!("--cpu={}", l.cpu_s))
            .arg(format!("--as={}", l.address_space_mb.saturating_mul(1024 * 1024)))
            .arg(format!("--nofile={}", l.open_files))
            .arg(format!("--nproc={}", l.processes))
            .arg("--");
        let path = if self.confines() {
            let uid = self.uid(client);
            if self.root {
                chown_tree(input, uid)?;
            }
            cmd.arg(BWRAP)
                .args(self.bwrap_args(uid, input, l.disk_mb.saturating_mul(1024 * 1024), &grants(spec)))
                .args(self.inner_prefix(uid));
            cmd.current_dir("/");
            SANDBOX_PATH.into()
        } else {
            cmd.arg(SETPRIV).args(["--pdeathsig", "KILL", "--"]);
            cmd.current_dir(input);
            std::env::var_os("PATH").unwrap_or_else(|| SANDBOX_PATH.into())
        };
        cmd.args(&spec.command)
            .env_clear()
            .env("PATH", path)
            .env("LANG", std::env::var_os("LANG").unwrap_or_else(|| "C.UTF-8".into()))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Where a child finds its checkpoint file, given the host folder it was written to.
    pub fn input_path(&self, input: &Path, file: &str) -> PathBuf {
        if self.confines() { Path::new(INPUT_DIR).join(file) } else { input.join(file) }
    }

    /// `bwrap`'s arguments up to the command.
    fn bwrap_args(&self, uid: u32, input: &Path, disk_bytes: u64, grants: &[PathBuf]) -> Vec<OsString> {
        let id = uid.to_string();
        let size = disk_bytes.max(1024 * 1024).to_string();
        let mut a = Args::default();
        a.push(&["--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-net"]);
        a.push(&["--unshare-uts", "--unshare-cgroup-try", "--hostname", "gatehouse-job"]);
        if self.root {
            // Mounts as root; `setpriv` then switches to the client's uid, dropping these two.
            a.push(&["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]);
        } else {
            a.push(&["--unshare-user", "--disable-userns", "--uid", &id, "--gid", &id]);
        }
        a.push(&["--ro-bind", "/usr", "/usr"]);
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            match std::fs::read_link(top) {
                Ok(target) => a.paths("--symlink", &target, Path::new(top)),
                Err(_) if Path::new(top).is_dir() => a.paths("--ro-bind", Path::new(top), Path::new(top)),
                Err(_) => {}
            }
        }
        for f in SYSTEM_FILES {
            a.paths("--ro-bind-try", Path::new(f), Path::new(f));
        }
        // Its own /tmp first: a granted path may lie below /tmp (a checkout there), and is
        // bound into this one.
        a.push(&["--perms", "1777", "--size", &size, "--tmpfs", "/tmp"]);
        // bwrap makes missing parents 0700 (root's) when it runs as root: make them readable.
        let mut parents: Vec<&Path> = grants.iter().flat_map(|g| g.ancestors().skip(1)).collect();
        parents.retain(|p| !["/", "/tmp"].iter().any(|m| *p == Path::new(m)));
        parents.sort_by_key(|p| p.components().count());
        parents.dedup();
        for p in parents {
            a.push(&["--perms", "0755"]);
            a.path("--dir", p);
        }
        for g in grants {
            a.paths("--ro-bind", g, g);
        }
        a.push(&["--proc", "/proc", "--dev", "/dev"]);
        a.push(&["--perms", "1777", "--size", &size, "--tmpfs", WORK_DIR]);
        a.paths("--ro-bind", input, Path::new(INPUT_DIR));
        a.push(&["--chdir", WORK_DIR, "--"]);
        a.0
    }

    /// What runs inside `bwrap` before the command: as root, `setpriv` to the client's uid.
    fn inner_prefix(&self, uid: u32) -> Vec<String> {
        if !self.root {
            return Vec::new();
        }
        vec![
            SETPRIV.into(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "--inh-caps=-all".into(),
            "--bounding-set=-all".into(),
            "--".into(),
        ]
    }
}

/// An argument list under construction.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, args: &[&str]) {
        self.0.extend(args.iter().map(OsString::from));
    }

    fn paths(&mut self, option: &str, from: &Path, to: &Path) {
        self.0.extend([option.into(), from.as_os_str().to_owned(), to.as_os_str().to_owned()]);
    }

    fn path(&mut self, option: &str, path: &Path) {
        self.0.extend([option.into(), path.as_os_str().to_owned()]);
    }
}

/// The host paths a kind's child may read: the files its command names and its `read_only`.
fn grants(spec: &ExecSpec) -> Vec<PathBuf> {
    let named = spec.command.iter().map(PathBuf::from).filter(|p| p.is_absolute() && p.exists());
    // Canonical: a `..` in a path would not name the same place inside.
    let mut all: Vec<PathBuf> =
        named.chain(spec.read_only.iter().cloned()).filter_map(|p| p.canonicalize().ok()).collect();
    // Under /usr already.
    all.retain(|p| !p.starts_with("/usr"));
    all.sort();
    all.dedup();
    all
}

/// Checks a kind's command can run in the sandbox: its program found (in the sandbox's `PATH`
/// when named without a slash) and executable, its `read_only` paths present.
///
/// # Errors
/// What is wrong, in one line.
pub fn check_command(kind: &str, spec: &ExecSpec, sandbox: &Sandbox) -> Result<(), String> {
    let program = &spec.command[0];
    let path = if sandbox.confines() { Some(SANDBOX_PATH.to_owned()) } else { std::env::var("PATH").ok() };
    let found = if program.contains('/') {
        Some(PathBuf::from(program))
    } else {
        path.as_deref().and_then(|p| in_path(p, program))
    };
    match found {
        Some(p) if is_executable(&p) => {}
        Some(p) => return Err(format!("kind {kind}: {} is not an executable file", p.display())),
        None if sandbox.confines() => {
            return Err(format!(
                "kind {kind}: program {program:?} not found in the sandbox's PATH ({SANDBOX_PATH}); give its absolute path and list its folder in read_only"
            ));
        }
        None => return Err(format!("kind {kind}: program {program:?} not found in PATH")),
    }
    for p in &spec.read_only {
        if !p.exists() {
            return Err(format!("kind {kind}: read_only path {} does not exist", p.display()));
        }
    }
    Ok(())
}

/// Hands `dir` and what it holds to `uid` (a root worker's client uid).
fn chown_tree(dir: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    for entry in std::fs::read_dir(dir)? {
        std::os::unix::fs::chown(entry?.path(), Some(uid), Some(uid))?;
    }
    Ok(())
}

fn in_path(path: &str, program: &str) -> Option<PathBuf> {
    path.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
    })
}

/// The processes a child started, whatever became of them: every descendant of `pid`
/// (through `/proc/<pid>/task/*/children`), not `pid` itself.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
            for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if !found.contains(&c) {
                    found.push(c);
                    todo.push(c);
                }
            }
        }
    }
    found
}

/// Sends `signal` (`TERM`, `KILL`) to each of `pids`.
pub fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
