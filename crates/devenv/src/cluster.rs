//! A RabbitMQ cluster of three nodes on this one machine, for trying quorum lanes and for the
//! fault tests: distinct node names (`gh1@localhost` …), AMQP ports (`5681`–`5683` from the
//! default base), distribution ports, management ports and data folders under one base folder,
//! one Erlang cookie; nodes 2 and 3 join node 1. Started from Debian's `rabbitmq-server`
//! scripts directly (the `/usr/sbin` wrappers switch user and folder).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::broker_node::amqp_answers;

/// Nodes in the cluster.
pub const NODES: usize = 3;

/// A running three-node cluster.
#[derive(Debug)]
pub struct Cluster {
    base: PathBuf,
    /// AMQP port of node 1; node `i` (1-based) listens on `port + i - 1` (on this machine's
    /// loopback), or each on 5672 of its own test host.
    port: u16,
    /// Each node on its own test host, or all on this machine.
    hosts: Option<TestHosts>,
    /// How many nodes: [`NODES`], or one broker on a test host ([`Cluster::single_on`]).
    nodes: usize,
}

/// The test hosts a cluster's nodes may run on ([`crate::hosts::Hosts`], feature `hosts`).
#[cfg(feature = "hosts")]
pub type TestHosts = crate::hosts::Hosts;

/// Without the `hosts` feature there are no test hosts: every node runs on this machine.
#[cfg(not(feature = "hosts"))]
#[derive(Debug)]
pub enum TestHosts {}

#[cfg(not(feature = "hosts"))]
impl TestHosts {
    fn name(&self, _: usize) -> String {
        match *self {}
    }

    fn addr(&self, _: usize) -> String {
        match *self {}
    }

    fn command(&self, _: usize, _: &Path) -> Command {
        match *self {}
    }
}

/// The scripts under Debian's `/usr/lib/rabbitmq/bin`.
fn script(name: &str) -> PathBuf {
    Path::new("/usr/lib/rabbitmq/bin").join(name)
}

impl Cluster {
    /// Starts three nodes under `base` (AMQP on `port`, `port + 1`, `port + 2`; management on
    /// `port + 10000`…) and joins them; waits until all three run as one cluster (up to 90 s).
    ///
    /// # Errors
    /// When RabbitMQ is not installed, a node does not start, or the join fails.
    pub fn start(base: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with(Self { base: base.to_owned(), port, hosts: None, nodes: NODES })
    }

    #[cfg(feature = "hosts")]
    /// The same with each node on a test host of its own ([`crate::hosts::Hosts`]: a network
    /// namespace linked to a bridge on this machine), AMQP on 5672 of each host's address, so
    /// that a node's link can be cut. Needs root and iproute2.
    ///
    /// # Errors
    /// As [`Cluster::start`], or when the hosts cannot be made.
    pub fn start_on_hosts(base: &Path) -> anyhow::Result<Self> {
        let hosts = crate::hosts::Hosts::create(NODES)?;
        Self::start_with(Self { base: base.to_owned(), port: 5672, hosts: Some(hosts), nodes: NODES })
    }

    #[cfg(feature = "hosts")]
    /// One broker node on host 1 of `hosts` (AMQP on 5672 of its address), for tests that put
    /// each component on a host of its own. It owns `hosts` from then on.
    ///
    /// # Errors
    /// As [`Cluster::start`].
    pub fn single_on(base: &Path, hosts: TestHosts) -> anyhow::Result<Self> {
        Self::start_with(Self { base: base.to_owned(), port: 5672, hosts: Some(hosts), nodes: 1 })
    }

    /// The test hosts of a cluster started with [`Cluster::start_on_hosts`].
    pub fn hosts(&self) -> Option<&TestHosts> {
        self.hosts.as_ref()
    }

    fn start_with(cluster: Self) -> anyhow::Result<Self> {
        let nodes = cluster.nodes;
        crate::broker_node::installed_server()?;
        let base = cluster.base.clone();
        let base = base.as_path();
        for i in 1..=nodes {
            let addr = format!("{}:{}", cluster.host(i), cluster.amqp_port(i)).parse()?;
            anyhow::ensure!(
                !amqp_answers(addr) || cluster.home(i).join("node.pid").exists(),
                "a broker that is not this cluster's answers on {addr}"
            );
        }
        fs::create_dir_all(base)?;
        for i in 1..=nodes {
            let home = cluster.home(i);
            fs::create_dir_all(&home)?;
            let cookie = home.join(".erlang.cookie");
            if !cookie.exists() {
                fs::write(&cookie, "GATEHOUSECLUSTERCOOKIE")?;
                #[cfg(unix)]
                fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
            }
            fs::write(home.join("enabled_plugins"), "[rabbitmq_management].\n")?;
            fs::write(
                home.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.default = {host}:{}\nmanagement.tcp.ip = {host}\nmanagement.tcp.port = {}\n\
                     loopback_users = none\ncluster_partition_handling = pause_minority\n",
                    cluster.amqp_port(i),
                    cluster.amqp_port(i) + 10_000,
                    host = cluster.host(i),
                ),
            )?;
            cluster.start_node(i)?;
        }
        for i in 1..=nodes {
            cluster.await_node(i, Duration::from_secs(60))?;
        }
        for i in 2..=nodes {
            if !cluster.members(i)?.contains(&cluster.name(1)) {
                cluster.run(i, &["stop_app"])?;
                cluster.run(i, &["join_cluster", &cluster.name(1)])?;
                cluster.run(i, &["start_app"])?;
            }
        }
        Ok(cluster)
    }

    fn home(&self, i: usize) -> PathBuf {
        self.base.join(format!("n{i}"))
    }

    /// The Erlang node name of node `i` (1-based).
    pub fn name(&self, i: usize) -> String {
        match &self.hosts {
            Some(h) => format!("gh{i}@{}", h.name(i)),
            None => format!("gh{i}@localhost"),
        }
    }

    /// The address node `i` listens on.
    pub fn host(&self, i: usize) -> String {
        self.hosts.as_ref().map_or_else(|| "127.0.0.1".to_owned(), |h| h.addr(i))
    }

    pub fn amqp_port(&self, i: usize) -> u16 {
        if self.hosts.is_some() { self.port } else { self.port + (i as u16) - 1 }
    }

    /// AMQP URLs of every node, with `user:password` and `vhost` (URL-encoded).
    pub fn urls(&self, credentials: &str, vhost: &str) -> Vec<String> {
        (1..=self.nodes)
            .map(|i| format!("amqp://{credentials}@{}:{}/{vhost}", self.host(i), self.amqp_port(i)))
            .collect()
    }

    /// `program` on node `i`'s host.
    fn command(&self, i: usize, program: &Path) -> Command {
        match &self.hosts {
            Some(h) => h.command(i, program),
            None => Command::new(program),
        }
    }

    fn env(&self, i: usize, cmd: &mut Command) {
        // Absolute: the command runs in it, and every path below is read from there.
        let h = std::path::absolute(self.home(i)).unwrap_or_else(|_| self.home(i));
        // Erlang writes crash dumps (MnesiaCore.*) and stray Mnesia folders into its working
        // folder: keep them under the node's home, never in the checkout.
        cmd.current_dir(&h);
        cmd.env("HOME", &h)
            .env("RABBITMQ_NODENAME", self.name(i))
            .env("RABBITMQ_NODE_PORT", self.amqp_port(i).to_string())
            .env("RABBITMQ_DIST_PORT", (self.amqp_port(i) + 20_000).to_string())
            .env("RABBITMQ_NODE_IP_ADDRESS", self.host(i))
            .env("RABBITMQ_MNESIA_BASE", h.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", h.join("log"))
            .env("RABBITMQ_PID_FILE", h.join("node.pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", h.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", h.join("rabbitmq"));
    }

    /// Starts node `i`'s Erlang VM (after [`Cluster::kill`], say); it rejoins the cluster.
    ///
    /// # Errors
    /// When the script cannot be run.
    pub fn start_node(&self, i: usize) -> anyhow::Result<()> {
        let log = fs::File::create(self.home(i).join("out.log"))?;
        let mut cmd = self.command(i, &script("rabbitmq-server"));
        self.env(i, &mut cmd);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().context("starting rabbitmq-server")?;
        fs::write(self.home(i).join("server.pid"), child.id().to_string())?;
        Ok(())
    }

    /// Waits until node `i` answers AMQP (its app runs).
    ///
    /// # Errors
    /// When it does not within `limit`.
    pub fn await_node(&self, i: usize, limit: Duration) -> anyhow::Result<()> {
        let addr = format!("{}:{}", self.host(i), self.amqp_port(i)).parse()?;
        let deadline = Instant::now() + limit;
        while !amqp_answers(addr) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "cluster node {i} did not start; see {}",
                self.home(i).join("out.log").display()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// `rabbitmqctl -n <node i> ARGS`, its output.
    ///
    /// # Errors
    /// When it fails.
    pub fn run(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.command(i, &script("rabbitmqctl"));
        self.env(i, &mut cmd);
        let out = cmd.arg("-n").arg(self.name(i)).args(args).output().context("running rabbitmqctl")?;
        anyhow::ensure!(
            out.status.success(),
            "rabbitmqctl {args:?} on node {i}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The running members of the cluster, as node `i` sees them.
    fn members(&self, i: usize) -> anyhow::Result<String> {
        self.run(i, &["-q", "eval", "rabbit_nodes:all_running()."])
    }

    /// Which node (1-based) leads quorum queue `queue` of vhost `/`.
    ///
    /// # Errors
    /// When no node answers, or the queue is not there.
    pub fn leader_of(&self, queue: &str) -> anyhow::Result<usize> {
        for i in 1..=self.nodes {
            let Ok(out) = self.run(i, &["-q", "list_queues", "name", "leader", "--no-table-headers"]) else {
                continue;
            };
            for line in out.lines() {
                let mut cols = line.split_whitespace();
                if cols.next() == Some(queue) {
                    let leader = cols.next().unwrap_or_default();
                    return (1..=self.nodes)
                        .find(|n| self.name(*n) == leader)
                        .context("leader is no node of ours");
                }
            }
        }
        anyhow::bail!("no node lists queue {queue}")
    }

    /// Waits until every node in `nodes` is an online member of each quorum queue of `queues`
    /// (vhost `/`), as any answering node reports; `false` after `limit`.
    pub fn wait_online(&self, queues: &[String], nodes: &[usize], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let online = (1..=self.nodes).find_map(|i| {
                self.run(i, &["-q", "list_queues", "name", "online", "--no-table-headers"]).ok()
            });
            let caught_up = |queue: &String| {
                let line = online
                    .as_deref()
                    .and_then(|o| o.lines().find(|l| l.split_whitespace().next() == Some(queue.as_str())));
                line.is_some_and(|l| nodes.iter().all(|n| l.contains(&self.name(*n))))
            };
            if queues.iter().all(caught_up) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// SIGKILL to node `i`'s Erlang VM (a host lost, no goodbye).
    ///
    /// # Errors
    /// When its pid is not known.
    pub fn kill(&self, i: usize) -> anyhow::Result<()> {
        let pid = fs::read_to_string(self.home(i).join("node.pid")).context("node pid")?;
        let _ = Command::new("kill").arg("-KILL").arg(pid.trim()).status();
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(fs::read_to_string(self.home(i).join("server.pid")).unwrap_or_default().trim())
            .status();
        Ok(())
    }

    /// Stops every node (SIGTERM to their servers, which stop the VMs cleanly); also when the
    /// cluster is dropped.
    pub fn stop(&self) {
        for i in 1..=self.nodes {
            for file in ["server.pid", "node.pid"] {
                if let Ok(pid) = fs::read_to_string(self.home(i).join(file)) {
                    let _ = Command::new("kill").arg("-TERM").arg(pid.trim()).status();
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while (1..=self.nodes).any(|i| {
            fs::read_to_string(self.home(i).join("node.pid"))
                .ok()
                .is_some_and(|p| Path::new(&format!("/proc/{}", p.trim())).exists())
        }) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a copy of the catalog at `from` to `to` with every queue class made quorum lanes
/// (`type = "quorum"`) of one fair shard, schema paths made absolute. (Fair shards multiply a
/// quorum class's Raft groups, lanes × shards; losing nodes is proven here with one shard per
/// class, not yet with several: docs/flow-control.md.)
///
/// # Errors
/// When a file cannot be read or written.
pub fn quorum_catalog(from: &Path, to: &Path) -> anyhow::Result<()> {
    let text = fs::read_to_string(from).with_context(|| from.display().to_string())?;
    let base = std::path::absolute(from.parent().unwrap_or(Path::new(".")))?;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("type = ") || line.trim_start().starts_with("fair_shards") {
            continue;
        }
        match line.strip_prefix("schema = \"") {
            Some(rest) if !rest.starts_with('/') => {
                out.push_str(&format!("schema = \"{}/{rest}", base.display()))
            }
            _ => out.push_str(line),
        }
        out.push('\n');
        if line.starts_with("max_length") {
            out.push_str("type = \"quorum\"\n");
        }
    }
    fs::write(to, out)?;
    Ok(())
}
