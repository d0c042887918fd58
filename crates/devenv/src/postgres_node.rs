//! A private PostgreSQL server for development and tests, from Debian's `postgresql` package
//! (installed when missing, like the broker): its own data directory, listening on one address
//! only (127.0.0.1:[`PORT`] unless told otherwise), SCRAM password login for its superuser
//! [`USER`], whose password is in [`PostgresNode::password_file`]. `.ci/run` stops it when CI
//! is done.
//!
//! PostgreSQL refuses to run as root: as root, the data directory belongs to the package's
//! `postgres` user and lives under `/var/tmp` (a checkout may sit in a folder that user cannot
//! enter), and its commands run through `runuser`.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

pub use crate::apt::{APT_GET, Host, Package, install};

/// Where the private server listens (beside a system cluster's 5432).
pub const PORT: u16 = 5439;
/// Its superuser.
pub const USER: &str = "gatehouse";

/// Debian's PostgreSQL, as the tests install it when it is missing.
pub const POSTGRESQL: Package = Package {
    name: "postgresql",
    missing: "PostgreSQL storage was asked for and postgresql is not installed",
    elsewhere: "install PostgreSQL 13 or later with your package manager, or point [storage] url at a running server",
};

/// A private PostgreSQL server: its data directory, address and port.
#[derive(Debug, Clone)]
pub struct PostgresNode {
    /// Where its state is kept: the password file, the start lock.
    pub home: PathBuf,
    /// Its data directory (owned by `postgres` when running as root).
    pub data: PathBuf,
    /// The one address it listens on.
    pub listen: String,
    pub port: u16,
    /// The network namespace it runs in (see [`crate::hosts`]), if any.
    pub netns: Option<String>,
}

/// The newest PostgreSQL's programs (`/usr/lib/postgresql/<version>/bin`).
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Host::this().root
}

/// Whether something accepts connections at `addr`.
fn answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

impl PostgresNode {
    /// The private server of the checkout whose state is under `home` (running or not), on
    /// 127.0.0.1:[`PORT`].
    pub fn local(home: &Path) -> Self {
        Self::at(home, "127.0.0.1", PORT, None)
    }

    /// A server whose state is under `home`, listening on `listen:port`, in network namespace
    /// `netns` when given.
    pub fn at(home: &Path, listen: &str, port: u16, netns: Option<&str>) -> Self {
        let data = if is_root() {
            PathBuf::from(format!("/var/tmp/gatehouse-postgres-{listen}-{port}"))
        } else {
            home.join("data")
        };
        Self { home: home.to_owned(), data, listen: listen.to_owned(), port, netns: netns.map(str::to_owned) }
    }

    /// The file holding [`USER`]'s password (mode 0600), beside the data directory: whoever
    /// finds the server running finds its password.
    pub fn password_file(&self) -> PathBuf {
        PathBuf::from(format!("{}.password", self.data.display()))
    }

    fn tls_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}.tls", self.data.display()))
    }

    /// The CA that signed the server's TLS certificate (valid for 127.0.0.1 and localhost).
    pub fn tls_ca(&self) -> PathBuf {
        self.tls_dir().join("components-ca.pem")
    }

    /// [`USER`]'s password.
    ///
    /// # Errors
    /// When the password file cannot be read (the server was never set up).
    pub fn password(&self) -> anyhow::Result<String> {
        let text = fs::read_to_string(self.password_file())
            .with_context(|| format!("reading {}", self.password_file().display()))?;
        Ok(text.trim().to_owned())
    }

    /// The url of database `db` on this server, for [`USER`] (the password is apart).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@{}:{}/{db}?sslmode=disable", self.listen, self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen.parse().expect("an IP address"), self.port)
    }

    /// Whether it accepts connections (checked from this process's namespace).
    pub fn answers(&self) -> bool {
        answers(self.addr())
    }

    /// `program` of PostgreSQL, run as `postgres` when this process is root, in the namespace.
    fn command(&self, program: &str) -> anyhow::Result<Command> {
        let bin = match bin_dir() {
            Some(bin) => bin,
            None => {
                install(Host::this(), Path::new(APT_GET), &POSTGRESQL)?;
                stop_system_clusters();
                bin_dir().context("apt-get installed postgresql, but its programs are not there")?
            }
        };
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        if is_root() {
            argv.extend(["runuser", "-u", "postgres", "--"].map(String::from));
        }
        argv.push(bin.join(program).display().to_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null());
        Ok(cmd)
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = self.command(program)?.args(args).output().with_context(|| format!("running {program}"))?;
        anyhow::ensure!(
            out.status.success(),
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Starts the server unless it answers already (initializing its data directory the
    /// first time, with a new random password); `allow` is a further network (CIDR) whose
    /// hosts may log in with the password. Several processes may call it at once: a lock file
    /// makes them take turns.
    ///
    /// # Errors
    /// When PostgreSQL cannot be installed, initialized or started.
    pub fn ensure(&self, allow: Option<&str>) -> anyhow::Result<()> {
        let ready = || self.password_file().exists() && self.tls_ca().exists();
        if self.netns.is_none() && self.answers() && ready() {
            return Ok(());
        }
        fs::create_dir_all(&self.home)?;
        let lock = fs::File::create(self.home.join("start.lock"))?;
        lock.lock()?;
        if self.netns.is_none() && self.answers() {
            if ready() {
                return Ok(());
            }
            // Ours, from before it had what this release sets up: set up afresh.
            anyhow::ensure!(
                self.data.join("postmaster.pid").exists(),
                "something that is not the private PostgreSQL server listens on {}:{}",
                self.listen,
                self.port
            );
            self.stop()?;
        }
        if !self.data.join("PG_VERSION").exists() || !ready() {
            self.init(allow)?;
        }
        self.pg_ctl("start")
    }

    fn init(&self, allow: Option<&str>) -> anyhow::Result<()> {
        let _ = fs::remove_dir_all(&self.data);
        fs::create_dir_all(&self.data)?;
        let password = {
            let mut raw = [0u8; 18];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
                .map_err(|_| anyhow::anyhow!("no randomness"))?;
            gatehouse_protocol::hex::encode(&raw)
        };
        write_private(&self.password_file(), &password)?;
        // initdb reads the password from a file its user can read; gone right after.
        let pwfile = self.data.with_extension("pw");
        write_private(&pwfile, &password)?;
        if is_root() {
            for p in [&self.data, &pwfile] {
                let status = Command::new("chown").arg("postgres:postgres").arg(p).status()?;
                anyhow::ensure!(status.success(), "chown postgres {} failed", p.display());
            }
        }
        let result = self.run(
            "initdb",
            &[
                "-D",
                &self.data.display().to_string(),
                "-U",
                USER,
                &format!("--pwfile={}", pwfile.display()),
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        );
        let _ = fs::remove_file(&pwfile);
        result?;
        // TLS: a dev certificate for 127.0.0.1 and localhost (see [`PostgresNode::tls_ca`]),
        // where PostgreSQL looks by default (server.crt / server.key in the data directory).
        let tls = self.tls_dir();
        let _ = fs::remove_dir_all(&tls);
        crate::certs::write_dev(&tls)?;
        fs::copy(tls.join("postgres.pem"), self.data.join("server.crt"))?;
        fs::copy(tls.join("postgres.key"), self.data.join("server.key"))?;
        if is_root() {
            for f in ["server.crt", "server.key"] {
                let status =
                    Command::new("chown").arg("postgres:postgres").arg(self.data.join(f)).status()?;
                anyhow::ensure!(status.success(), "chown postgres {f} failed");
            }
        }
        if let Some(cidr) = allow {
            let hba = self.data.join("pg_hba.conf");
            let mut text = fs::read_to_string(&hba)?;
            text.push_str(&format!("host all all {cidr} scram-sha-256\n"));
            fs::write(&hba, text)?;
        }
        Ok(())
    }

    /// `pg_ctl start|stop|restart` (fast shutdown; waits until it is done).
    fn pg_ctl(&self, action: &str) -> anyhow::Result<()> {
        let options = format!(
            "-c listen_addresses={} -p {} -k {} -c max_connections=300 -c ssl=on",
            self.listen,
            self.port,
            self.data.display()
        );
        let data = self.data.display().to_string();
        let log = self.data.join("server.log").display().to_string();
        let mut args = vec!["-D", &data, "-w", "-t", "60", "-m", "fast"];
        if action != "stop" {
            args.extend(["-l", &log, "-o", &options]);
        }
        args.push(action);
        self.run("pg_ctl", &args)
    }

    /// Creates database `name` unless it exists.
    ///
    /// # Errors
    /// When `psql` fails.
    pub fn create_database(&self, name: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "bad database name {name}"
        );
        let psql = |sql: &str| -> anyhow::Result<String> {
            let out = self
                .command("psql")?
                .args([
                    "-h",
                    &self.listen,
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    USER,
                    "-d",
                    "postgres",
                    "-tAc",
                    sql,
                ])
                .env("PGPASSWORD", self.password()?)
                .output()
                .context("running psql")?;
            anyhow::ensure!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr).trim());
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        if psql(&format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"))? != "1" {
            psql(&format!("CREATE DATABASE {name}"))?;
        }
        Ok(())
    }

    /// Stops the server (fast shutdown: running transactions are rolled back).
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn stop(&self) -> anyhow::Result<()> {
        if !self.data.join("postmaster.pid").exists() {
            return Ok(());
        }
        self.pg_ctl("stop")
    }

    /// Restarts the server (fast shutdown, then start): every connection is cut.
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl("restart")
    }

    /// Stops the server and deletes its data.
    ///
    /// # Errors
    /// When it cannot be stopped.
    pub fn destroy(&self) -> anyhow::Result<()> {
        self.stop()?;
        let _ = fs::remove_dir_all(&self.data);
        let _ = fs::remove_dir_all(self.tls_dir());
        let _ = fs::remove_file(self.password_file());
        Ok(())
    }
}

/// Debian's package starts its own cluster: stopped, as the private server is what runs here.
fn stop_system_clusters() {
    let _ = Command::new("service")
        .args(["postgresql", "stop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
