//! Separate test hosts on this one machine: a network namespace per host, each with a veth link
//! to a bridge in the machine's own namespace (which reaches every host, as a router would), and
//! its own `/etc/hosts` (`/etc/netns/<name>/hosts`, which `ip netns exec` puts in place).
//! Needs root and iproute2; addresses are private (10.77.0.0/24) and exist only here.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;

/// The bridge in the machine's namespace, and its address.
const BRIDGE: &str = "ghbr0";
const BRIDGE_ADDR: &str = "10.77.0.1";

/// Test hosts `gh-h1` … `gh-hN`, removed when dropped.
#[derive(Debug)]
pub struct Hosts {
    count: usize,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Hosts {
    /// Creates `count` hosts named `ghh1` … (namespaces `gh-h1` …) at 10.77.0.11, .12, …
    ///
    /// # Errors
    /// Without root or iproute2.
    pub fn create(count: usize) -> anyhow::Result<Self> {
        let hosts = Self { count };
        hosts.remove();
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        let machine = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let mut names = String::from("127.0.0.1 localhost\n");
        for i in 1..=count {
            names.push_str(&format!("{} {}\n", hosts.addr(i), hosts.name(i)));
        }
        for i in 1..=count {
            let (ns, outer, inner) = (hosts.namespace(i), format!("ghv{i}"), format!("ghp{i}"));
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", BRIDGE, "up"])?;
            ip(&[
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", hosts.addr(i)),
                "dev",
                &inner,
            ])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", &inner, "up"])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
            let dir = PathBuf::from("/etc/netns").join(&ns);
            fs::create_dir_all(&dir)?;
            // The machine's own name too: RabbitMQ's CLI names itself after it.
            fs::write(dir.join("hosts"), format!("{names}{} {}\n", hosts.addr(i), machine.trim()))?;
        }
        Ok(hosts)
    }

    /// Host `i`'s name (1-based).
    pub fn name(&self, i: usize) -> String {
        format!("ghh{i}")
    }

    pub fn addr(&self, i: usize) -> String {
        format!("10.77.0.{}", 10 + i)
    }

    /// The network namespace of host `i`.
    pub fn namespace(&self, i: usize) -> String {
        format!("gh-h{i}")
    }

    /// A command that runs on host `i`.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.namespace(i)]).arg(program);
        cmd
    }

    /// Cuts host `i` off (its link down), or connects it again.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        ip(&["link", "set", &format!("ghv{i}"), if up { "up" } else { "down" }])
    }

    fn remove(&self) {
        for i in 1..=self.count {
            let _ = Command::new("ip").args(["netns", "del", &self.namespace(i)]).output();
            let _ = Command::new("ip").args(["link", "del", &format!("ghv{i}")]).output();
            let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(self.namespace(i)));
        }
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.remove();
    }
}
