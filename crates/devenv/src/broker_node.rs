//! A private RabbitMQ node for development and tests, started from Debian's `rabbitmq-server`
//! package when no broker answers: its own data directory, AMQP on 127.0.0.1:5672, AMQP over
//! mutual TLS on 127.0.0.1:5671 (its own dev CA, see [`tls_dir`]), the management UI on
//! 127.0.0.1:15672 (guest / guest).

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub use crate::apt::{APT_GET, Host, Package, install};

/// Erlang node name of the private broker.
pub const NODE_NAME: &str = "gatehouse@localhost";
/// File (under the node's home) with the pid of the node's `rabbitmq-server` process.
pub const SERVER_PID: &str = "server.pid";
/// Where the management UI of the private node listens.
pub const MANAGEMENT_URL: &str = "http://127.0.0.1:15672";

/// The private node, as far as this process is concerned.
#[derive(Debug)]
pub struct BrokerNode {
    home: PathBuf,
    /// Whether this process started it (and so should stop it).
    pub started_here: bool,
}

/// `host:port` of an `amqp://` / `amqps://` URL.
pub fn amqp_addr(url: &str) -> Option<SocketAddr> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = if scheme == "amqps" { 5671 } else { 5672 };
    let authority = rest.split('/').next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let with_port = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    };
    with_port.to_socket_addrs().ok()?.next()
}

/// Whether something at `addr` speaks AMQP 0-9-1 (answers the protocol header).
pub fn amqp_answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut first = [0u8; 1];
    // Frame type 1 (method frame: Connection.Start) means a broker is there and booted.
    s.write_all(b"AMQP\x00\x00\x09\x01").is_ok() && s.read_exact(&mut first).is_ok() && first[0] == 1
}

/// The `rabbitmq-server` script to run directly (Debian's `/usr/sbin` wrapper switches to the
/// `rabbitmq` user and would ignore our environment).
fn server_script() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if debian.exists() {
        return Some(debian);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("rabbitmq-server"))
        .find(|p| p.exists())
}

/// Uses the broker at `url` if it answers; otherwise starts the private node under `home`
/// (when `rabbitmq-server` is installed) and waits until it answers. Safe to call from
/// several processes at once: a lock file makes them take turns.
///
/// # Errors
/// When no broker answers and none can be started, or the node does not come up in 60 s.
pub fn ensure(url: &str, home: &Path) -> anyhow::Result<BrokerNode> {
    let addr = amqp_addr(url).with_context(|| "cannot read host and port of the broker URL")?;
    let node = BrokerNode { home: home.to_owned(), started_here: false };
    if amqp_answers(addr) {
        return Ok(node);
    }
    fs::create_dir_all(home)?;
    let lock = fs::File::create(home.join("start.lock"))?;
    lock.lock()?;
    if amqp_answers(addr) {
        return Ok(node);
    }
    anyhow::ensure!(
        addr.ip().is_loopback() && addr.port() == 5672,
        "no broker answers at {addr}; start it, or point the settings at one"
    );
    let script = installed_server()?;
    fs::write(home.join("enabled_plugins"), "[rabbitmq_management].\n")?;
    write_config(home)?;
    let log = fs::File::create(home.join("node.log"))?;
    let mut cmd = Command::new(script);
    node.env(&mut cmd);
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // Its own process group: Ctrl-C in the terminal reaches `gatehouse up`, which then stops
    // the node in order, instead of killing it mid-write.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting rabbitmq-server")?;
    // Its wrapper script stops the node cleanly on SIGTERM: see [`BrokerNode::stop`].
    fs::write(home.join(SERVER_PID), child.id().to_string())?;

    let deadline = Instant::now() + Duration::from_secs(60);
    while !amqp_answers(addr) {
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!(
                "the private RabbitMQ node exited ({status}); see {}",
                home.join("node.log").display()
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the private RabbitMQ node did not start within 60 s; see {}",
            home.join("node.log").display()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(BrokerNode { started_here: true, ..node })
}

/// The `rabbitmq-server` script, installed first when it is missing (see [`install_rabbitmq`]).
/// Processes that call it at once take turns (a lock file in the temporary directory): the
/// first installs, the others find it installed.
///
/// # Errors
/// When it is missing and cannot be installed.
pub fn installed_server() -> anyhow::Result<PathBuf> {
    if let Some(script) = server_script() {
        return Ok(script);
    }
    let lock = fs::File::create(std::env::temp_dir().join("gatehouse-install-rabbitmq.lock"))?;
    lock.lock()?;
    match server_script() {
        Some(script) => Ok(script),
        None => {
            install_rabbitmq(Host::this(), Path::new(APT_GET))?;
            server_script().context("apt-get installed rabbitmq-server, but its script is not there")
        }
    }
}

/// Debian's RabbitMQ, as `gatehouse up` and the test harness install it when it is missing.
pub const RABBITMQ: Package = Package {
    name: "rabbitmq-server",
    missing: "no broker answers at 127.0.0.1:5672 and rabbitmq-server is not installed",
    elsewhere: "install RabbitMQ 3.10 or later with your package manager, or point the settings at a running broker",
};

/// Installs Debian's `rabbitmq-server` with `apt_get` (see [`install`]), then stops the system
/// node the package starts.
///
/// # Errors
/// When the host cannot install it, or apt-get fails.
pub fn install_rabbitmq(host: Host, apt_get: &Path) -> anyhow::Result<()> {
    install(host, apt_get, &RABBITMQ)?;
    // Debian's package starts (and enables) its own system node on 5672: the private node
    // would then find the port taken. Stop the system service; the private node takes over.
    if Path::new("/usr/sbin/service").exists() || Path::new("/bin/systemctl").exists() {
        let _ = Command::new("service")
            .args(["rabbitmq-server", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}

/// The private node's own PKI for its TLS listener: `ca.pem`, `server.pem` / `server.key`
/// (localhost), and `client.pem` / `client.key`, a client certificate it accepts.
pub fn tls_dir(home: &Path) -> PathBuf {
    home.join("tls")
}

/// Port of the private node's mutual-TLS AMQP listener (`amqps://localhost:5671`).
pub const TLS_PORT: u16 = 5671;

/// `rabbitmq.conf` of the private node: loopback only, plus a mutual-TLS listener.
fn write_config(home: &Path) -> anyhow::Result<()> {
    // Absolute: the node reads them from its own working folder (its home), so a relative
    // home (`gatehouse up`'s `.gatehouse/rabbitmq`) would name files that are not there.
    let tls = tls_dir(&std::path::absolute(home)?);
    if !tls.join("ca.pem").exists() {
        crate::certs::write_dev(&tls)?;
    }
    let conf = format!(
        "listeners.ssl.1 = 127.0.0.1:{TLS_PORT}\n\
         ssl_options.cacertfile = {ca}\n\
         ssl_options.certfile = {cert}\n\
         ssl_options.keyfile = {key}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n\
         management.tcp.ip = 127.0.0.1\n",
        ca = tls.join("ca.pem").display(),
        cert = tls.join("server.pem").display(),
        key = tls.join("server.key").display(),
    );
    fs::write(home.join("rabbitmq.conf"), conf)?;
    Ok(())
}

impl BrokerNode {
    /// A handle on the private node whose data lives under `home` (running or not).
    pub fn at(home: &Path) -> Self {
        Self { home: home.to_owned(), started_here: false }
    }

    fn env(&self, cmd: &mut Command) {
        // Absolute: the command runs in it, and every path below is read from there.
        let home = std::path::absolute(&self.home).unwrap_or_else(|_| self.home.clone());
        let h = &home;
        // Erlang writes crash dumps (MnesiaCore.*) and stray Mnesia folders into its working
        // folder: keep them under the node's home, never in the checkout.
        cmd.current_dir(h);
        cmd.env("HOME", h) // the Erlang cookie lives here
            .env("RABBITMQ_NODENAME", NODE_NAME)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", "5672")
            .env("RABBITMQ_MNESIA_BASE", h.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", h.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", h.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", h.join("node.pid"))
            .env("RABBITMQ_CONFIG_FILE", h.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", h.join("advanced.config"));
    }

    /// `rabbitmqctl` aimed at the private node, e.g. `ctl(&["list_queues"])`.
    pub fn ctl(&self, args: &[&str]) -> Command {
        let ctl = Path::new("/usr/lib/rabbitmq/bin/rabbitmqctl");
        let mut cmd = Command::new(if ctl.exists() { ctl } else { Path::new("rabbitmqctl") });
        self.env(&mut cmd);
        cmd.arg("-n").arg(NODE_NAME).args(args);
        cmd
    }

    /// The pid of the private node's server process, if it runs.
    /// (Its `rabbitmq-server` process, or else the Erlang VM that RabbitMQ records in
    /// `node.pid`: SIGTERM stops either cleanly.)
    pub fn running_pid(&self) -> Option<u32> {
        [SERVER_PID, "node.pid"].iter().find_map(|file| {
            let pid: u32 = fs::read_to_string(self.home.join(file)).ok()?.trim().parse().ok()?;
            is_alive(pid).then_some(pid)
        })
    }

    /// Stops the private node: SIGTERM to its `rabbitmq-server` process, which stops the
    /// Erlang VM cleanly; waits until it is gone (SIGKILL after 30 s).
    ///
    /// # Errors
    /// When `kill` cannot be run.
    pub fn stop(&self) -> anyhow::Result<()> {
        let Some(pid) = self.running_pid() else { return Ok(()) };
        let signal = |sig: &str| Command::new("kill").arg(sig).arg(pid.to_string()).status();
        signal("-TERM").context("running kill")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.running_pid().is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.running_pid().is_some() {
            signal("-KILL").context("running kill")?;
        }
        let _ = fs::remove_file(self.home.join(SERVER_PID));
        Ok(())
    }
}

/// Whether process `pid` runs: it exists and is not a zombie (the node's `rabbitmq-server`
/// is our own child in `gatehouse up`, and stays a zombie until we exit).
fn is_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_debian_root_host_installs_rabbitmq_with_apt_get() {
        let dir = tempfile::tempdir().unwrap();
        let (apt, calls) = crate::apt::tests::fake_apt_get(dir.path(), 0);
        install_rabbitmq(Host { root: true, debian: true }, &apt).unwrap();
        let calls = fs::read_to_string(calls).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            ["noninteractive update", "noninteractive install -y --no-install-recommends rabbitmq-server"]
        );
        let user = install_rabbitmq(Host { root: false, debian: true }, &apt).unwrap_err().to_string();
        assert!(user.starts_with(RABBITMQ.missing) && user.contains(&RABBITMQ.command()), "{user}");
    }

    #[test]
    fn amqp_urls() {
        let a = amqp_addr("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(a, "127.0.0.1:5672".parse().unwrap());
        assert_eq!(amqp_addr("amqp://127.0.0.1").unwrap().port(), 5672);
        assert_eq!(amqp_addr("amqps://u:p@127.0.0.1/vh").unwrap().port(), 5671);
        assert!(amqp_addr("nonsense").is_none());
    }

    /// `gatehouse up` names the node's home relatively (`.gatehouse/rabbitmq`), and the node
    /// reads its configuration from inside that home: every file it names must be absolute.
    #[test]
    fn the_node_configuration_names_its_files_absolutely_for_a_relative_home() {
        // (Under the workspace's target/, relative to this crate's folder where tests run.)
        let home = Path::new("../../target/tmp-devenv-config/rabbitmq");
        let _ = fs::remove_dir_all(home);
        fs::create_dir_all(home).unwrap();
        write_config(home).unwrap();
        let conf = fs::read_to_string(home.join("rabbitmq.conf")).unwrap();
        for line in conf.lines().filter(|l| l.contains("file = ")) {
            let path = line.split(" = ").nth(1).unwrap();
            assert!(Path::new(path).is_absolute() && Path::new(path).exists(), "{line}");
        }
        let _ = fs::remove_dir_all(home.parent().unwrap());
    }
}
