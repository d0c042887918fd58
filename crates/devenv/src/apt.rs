//! Installing a missing Debian package the way a newcomer's first command needs it: on Debian
//! as root, with `apt-get`, saying so on one line and letting apt's own progress show;
//! anywhere else, failing with the exact command to run.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context as _;

/// `apt-get`, from `PATH`.
pub const APT_GET: &str = "apt-get";

/// What decides whether this process may install a package itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// Running as root (apt-get needs it).
    pub root: bool,
    /// A Debian (or derived) system: `/etc/debian_version` exists.
    pub debian: bool,
}

impl Host {
    /// This machine.
    pub fn this() -> Self {
        let root = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        Self { root, debian: Path::new("/etc/debian_version").exists() }
    }
}

/// A Debian package something needs.
#[derive(Debug, Clone, Copy)]
pub struct Package {
    /// The Debian package.
    pub name: &'static str,
    /// What is wrong while it is missing (the start of every error).
    pub missing: &'static str,
    /// What to do on a system that is not Debian.
    pub elsewhere: &'static str,
}

impl Package {
    /// The command a user must run when this process cannot install it.
    pub fn command(&self) -> String {
        format!("apt-get update && apt-get install -y {}", self.name)
    }
}

/// Installs `package` with `apt_get` (normally [`APT_GET`]).
///
/// # Errors
/// When the host cannot install it (not root, not Debian), or apt-get fails.
pub fn install(host: Host, apt_get: &Path, package: &Package) -> anyhow::Result<()> {
    let Package { name, missing, elsewhere } = *package;
    anyhow::ensure!(host.debian, "{missing}; this is not a Debian system: {elsewhere}");
    anyhow::ensure!(host.root, "{missing}; run as root: sudo sh -c '{}'", package.command());
    eprintln!("{name} is not installed: installing it with apt-get (Debian package)");
    for args in [&["update"][..], &["install", "-y", "--no-install-recommends", name]] {
        let status = Command::new(apt_get)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            // apt's progress goes to our stderr: stdout may be a test's captured output.
            .stdout(std::io::stderr())
            .status()
            .with_context(|| format!("running {}", apt_get.display()))?;
        anyhow::ensure!(
            status.success(),
            "{} {} failed ({status}); run it yourself: {}",
            apt_get.display(),
            args.join(" "),
            package.command()
        );
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A fake `apt-get` that records its arguments and environment, one call per line.
    ///
    /// Written by a child `sh`, never through a file descriptor of this process: the test
    /// binary's other threads fork children all the time, and a child forked while we held the
    /// script open for writing would keep that descriptor until it execs, so that running the
    /// script fails with `ETXTBSY` ("Text file busy"). A descriptor of another process cannot
    /// leak into our children.
    pub(crate) fn fake_apt_get(dir: &Path, exit: u8) -> (PathBuf, PathBuf) {
        use std::io::Write as _;
        let (script, calls) = (dir.join(format!("apt-get-{exit}")), dir.join("calls"));
        let body = format!("#!/bin/sh\necho \"$DEBIAN_FRONTEND $*\" >> {}\nexit {exit}\n", calls.display());
        let mut writer = Command::new("/bin/sh")
            .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
            .arg(&script)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        writer.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        assert!(writer.wait().unwrap().success(), "writing {}", script.display());
        (script, calls)
    }

    const TOOL: Package =
        Package { name: "sometool", missing: "sometool is missing", elsewhere: "get it elsewhere" };

    #[test]
    fn a_debian_root_host_installs_with_apt_get() {
        let dir = tempfile::tempdir().unwrap();
        let (apt, calls) = fake_apt_get(dir.path(), 0);
        install(Host { root: true, debian: true }, &apt, &TOOL).unwrap();
        let calls = fs::read_to_string(calls).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            ["noninteractive update", "noninteractive install -y --no-install-recommends sometool"]
        );
    }

    #[test]
    fn other_hosts_are_told_the_exact_command_and_nothing_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (apt, calls) = fake_apt_get(dir.path(), 0);
        let user = install(Host { root: false, debian: true }, &apt, &TOOL).unwrap_err().to_string();
        assert!(
            user.contains("apt-get update && apt-get install -y sometool") && user.contains("root"),
            "{user}"
        );
        let other = install(Host { root: true, debian: false }, &apt, &TOOL).unwrap_err().to_string();
        assert!(other.contains("not a Debian system: get it elsewhere"), "{other}");
        assert!(!calls.exists(), "apt-get ran");
        // A failing apt-get stops at its step and names the command to run by hand.
        let (failing, _) = fake_apt_get(dir.path(), 100);
        let e = install(Host { root: true, debian: true }, &failing, &TOOL).unwrap_err().to_string();
        assert!(e.contains("update failed") && e.contains(&TOOL.command()), "{e}");
    }
}
