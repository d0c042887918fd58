//! Separate test hosts on this one machine: a network namespace per host, each with a veth link
//! to a bridge in the machine's own namespace (which reaches every host, as a router would), and
//! its own `/etc/hosts` (`/etc/netns/<name>/hosts`, which `ip netns exec` puts in place).
//! Needs root and iproute2; addresses are private (10.77.0.0/16) and exist only here.
//!
//! [`Hosts::wired`] makes networks the way docker-compose does: one bridge per network, and a
//! host reaches only the hosts of the networks it is on (it has no route anywhere else).

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
    /// The networks (1-based, bridge `ghbrN`, 10.77.N.0/24) and their hosts; empty for the
    /// single network of [`Hosts::create`] (bridge `ghbr0`, 10.77.0.0/24).
    networks: Vec<Vec<usize>>,
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
        let hosts = Self { count, networks: Vec::new() };
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

    /// Creates `count` hosts wired to `networks` (each a list of 1-based hosts): network `n`
    /// (1-based) is bridge `ghbrN` with subnet 10.77.N.0/24, host `i` is 10.77.N.(10 + i) on it.
    /// This machine's namespace is on every network (10.77.N.1), as a client outside would be.
    ///
    /// # Errors
    /// Without root or iproute2.
    pub fn wired(count: usize, networks: &[&[usize]]) -> anyhow::Result<Self> {
        let hosts = Self { count, networks: networks.iter().map(|n| n.to_vec()).collect() };
        hosts.remove();
        let machine = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let mut names = String::from("127.0.0.1 localhost\n");
        for i in 1..=count {
            names.push_str(&format!("{} {}\n", hosts.addr(i), hosts.name(i)));
        }
        for i in 1..=count {
            ip(&["netns", "add", &hosts.namespace(i)])?;
            ip(&["netns", "exec", &hosts.namespace(i), "ip", "link", "set", "lo", "up"])?;
            let dir = PathBuf::from("/etc/netns").join(hosts.namespace(i));
            fs::create_dir_all(&dir)?;
            fs::write(dir.join("hosts"), format!("{names}{} {}\n", hosts.addr(i), machine.trim()))?;
        }
        for (n, members) in networks.iter().enumerate().map(|(n, m)| (n + 1, m)) {
            let bridge = format!("ghbr{n}");
            ip(&["link", "add", &bridge, "type", "bridge"])?;
            ip(&["addr", "add", &format!("10.77.{n}.1/24"), "dev", &bridge])?;
            ip(&["link", "set", &bridge, "up"])?;
            for &i in *members {
                let (ns, outer, inner) = (hosts.namespace(i), format!("ghv{n}x{i}"), format!("ghp{n}x{i}"));
                ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
                ip(&["link", "set", &inner, "netns", &ns])?;
                ip(&["link", "set", &outer, "master", &bridge, "up"])?;
                let addr = format!("10.77.{n}.{}/24", 10 + i);
                ip(&["netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &inner])?;
                ip(&["netns", "exec", &ns, "ip", "link", "set", &inner, "up"])?;
            }
        }
        Ok(hosts)
    }

    /// Host `i`'s address on network `n` (1-based) of [`Hosts::wired`].
    pub fn addr_on(&self, n: usize, i: usize) -> String {
        format!("10.77.{n}.{}", 10 + i)
    }

    /// Host `i`'s name (1-based).
    pub fn name(&self, i: usize) -> String {
        format!("ghh{i}")
    }

    /// Host `i`'s address (on its first network, for [`Hosts::wired`] hosts).
    pub fn addr(&self, i: usize) -> String {
        match self.networks.iter().position(|m| m.contains(&i)) {
            Some(n) => self.addr_on(n + 1, i),
            None => format!("10.77.0.{}", 10 + i),
        }
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
            // What still runs on the host (RabbitMQ's epmd daemon, say) would keep its namespace,
            // and so its links, alive after the name is gone.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.namespace(i)]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &self.namespace(i)]).output();
            let _ = Command::new("ip").args(["link", "del", &format!("ghv{i}")]).output();
            for n in 1..=self.networks.len() {
                let _ = Command::new("ip").args(["link", "del", &format!("ghv{n}x{i}")]).output();
            }
            let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(self.namespace(i)));
        }
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
        for n in 1..=self.networks.len() {
            let _ = Command::new("ip").args(["link", "del", &format!("ghbr{n}")]).output();
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.remove();
    }
}
