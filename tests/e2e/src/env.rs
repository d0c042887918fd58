//! The machine the tests run on: the shared broker and PostgreSQL server (started once),
//! packages installed on demand, markers and processes, logs and dead letters.

use super::*;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The broker the tests use: `GATEHOUSE_TEST_AMQP_URL`, or the local default, where a
/// private node is started (once, shared by all tests and later runs) if nothing answers.
pub fn broker_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let url = std::env::var("GATEHOUSE_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        if let Err(e) = gatehouse_devenv::broker_node::ensure(&url, &private_node_home()) {
            panic!("the end-to-end tests need RabbitMQ: {e:#}");
        }
        apply_shipped_policies();
        url
    })
    .clone()
}

/// The tests' PostgreSQL server (the private one, started — and installed — when it does not
/// answer yet), under `.gatehouse/postgres`.
pub fn postgres() -> &'static gatehouse_devenv::postgres_node::PostgresNode {
    static NODE: OnceLock<gatehouse_devenv::postgres_node::PostgresNode> = OnceLock::new();
    NODE.get_or_init(|| {
        let node =
            gatehouse_devenv::postgres_node::PostgresNode::local(&repo_root().join(".gatehouse/postgres"));
        if let Err(e) = node.ensure(None) {
            panic!("the PostgreSQL tests need PostgreSQL: {e:#}");
        }
        node
    })
}

/// A new, empty database on [`postgres`]: its url (no password in it) and the password. Its
/// name carries this process's id; the first call of a process drops the databases that
/// processes no longer running left (`t` + pid + random, in hex). Tests run in parallel
/// processes (nextest), so a sweep must never take a living process's database: one that has
/// no connection at the moment (between a test's steps, during a server restart) would go.
pub async fn fresh_database() -> (String, String) {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let node = tokio::task::spawn_blocking(postgres).await.expect("postgres");
    let password = node.password().expect("postgres password");
    let admin = admin_connection(&node.url("postgres"), &password).await;
    SWEPT
        .get_or_init(|| async {
            let old = admin
                .query("SELECT datname FROM pg_database WHERE datname ~ '^t[0-9a-f]{12}$'", &[])
                .await
                .expect("list databases");
            for row in old {
                let name: String = row.get(0);
                let pid = u32::from_str_radix(&name[1..9], 16).unwrap_or(0);
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = admin.batch_execute(&format!("DROP DATABASE {name}")).await;
                }
            }
        })
        .await;
    // Once seen failing on a server just started (the error was not kept): tried again,
    // under a new name, and said on stderr.
    for attempt in 1.. {
        let name = format!("t{:08x}{}", std::process::id(), random_hex(2));
        match admin.batch_execute(&format!("CREATE DATABASE {name}")).await {
            Ok(()) => return (node.url(&name), password),
            Err(e) if attempt < 5 => {
                eprintln!("CREATE DATABASE {name} failed ({e:?}); trying again");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("create database: {e:?}"),
        }
    }
    unreachable!("the loop returns")
}

/// A plain connection to `url` (for set-up and the tests' own reading).
pub async fn admin_connection(url: &str, password: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = url.parse().expect("postgres url");
    config.password(password);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.expect("connect to postgres");
    tokio::spawn(connection);
    client
}

/// The policies of `config/rabbitmq/definitions.json` (queue storage), applied in vhost `/`
/// to the tests' prefixed names, so that tests run on the queues production runs on.
fn apply_shipped_policies() {
    let defs =
        std::fs::read_to_string(repo_root().join("config/rabbitmq/definitions.json")).expect("definitions");
    let defs: serde_json::Value = serde_json::from_str(&defs).expect("definitions are JSON");
    for p in defs["policies"].as_array().into_iter().flatten() {
        let (name, definition) = (p["name"].as_str().expect("policy name"), p["definition"].to_string());
        // The shipped pattern, for names under any test's prefix.
        let pattern = p["pattern"].as_str().expect("policy pattern").replacen('^', r"(^|\.)", 1);
        let priority = p["priority"].as_u64().unwrap_or(0).to_string();
        broker_ctl(&[
            "set_policy",
            "-p",
            "/",
            "--apply-to",
            "queues",
            "--priority",
            &priority,
            name,
            &pattern,
            &definition,
        ]);
    }
}

/// Installs Debian `package` unless `path` exists (once per test binary), like the broker:
/// on a Debian machine as root; elsewhere the test fails with the command to run.
fn installed(path: &Path, package: &gatehouse_devenv::apt::Package) {
    static INSTALL: Mutex<()> = Mutex::new(());
    if path.exists() {
        return;
    }
    let _one = INSTALL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !path.exists() {
        let host = gatehouse_devenv::apt::Host::this();
        if let Err(e) =
            gatehouse_devenv::apt::install(host, Path::new(gatehouse_devenv::apt::APT_GET), package)
        {
            panic!("{e:#}");
        }
    }
}

/// Debian's Chromium, for the browser tests.
pub fn chromium() -> PathBuf {
    const CHROMIUM: gatehouse_devenv::apt::Package = gatehouse_devenv::apt::Package {
        name: "chromium",
        missing: "the browser tests need Chromium (/usr/bin/chromium), which is not installed",
        elsewhere: "install Chromium and link it as /usr/bin/chromium",
    };
    let path = PathBuf::from("/usr/bin/chromium");
    installed(&path, &CHROMIUM);
    path
}

/// Debian's bubblewrap, the sandbox of executable kinds.
pub fn bubblewrap() {
    const BUBBLEWRAP: gatehouse_devenv::apt::Package = gatehouse_devenv::apt::Package {
        name: "bubblewrap",
        missing: "executable kinds run sandboxed by bubblewrap (/usr/bin/bwrap), which is not installed",
        elsewhere: "install bubblewrap (bwrap) as /usr/bin/bwrap",
    };
    installed(Path::new(gatehouse_worker::handlers::exec::sandbox::BWRAP), &BUBBLEWRAP);
}

/// A fresh marker (`MARKER-<hex>`) to look for where it must not be.
pub fn marker() -> String {
    format!("MARKER-{}", random_hex(8))
}

/// Processes (of the whole machine) whose command line holds `marker`.
pub fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// The catalog of the executable-kind tests (tests/e2e/fixtures/exec).
pub fn exec_catalog() -> PathBuf {
    repo_root().join("tests/e2e/fixtures/exec/jobs.toml")
}

/// The tests' Python virtual environment, `.gatehouse/venv`, made on first use with `python3 -m
/// venv`; answers its folder. Callers install into it under [`VENV`]'s lock.
fn venv() -> PathBuf {
    let venv = repo_root().join(".gatehouse/venv");
    if !venv.join("bin/python").exists() {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 -m venv {} failed: the Python tests need Python 3 with venv (Debian: apt-get install python3-venv)",
            venv.display()
        );
    }
    venv
}

/// One installation into the virtual environment at a time.
static VENV: Mutex<()> = Mutex::new(());

/// `pip install ARGS` into the virtual environment.
fn pip_install(venv: &Path, args: &[&str]) {
    let pip = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(args)
        .stdout(std::io::stderr())
        .status();
    assert!(pip.is_ok_and(|s| s.success()), "pip install {args:?} failed");
}

/// The schemathesis CLI (an OpenAPI fuzzer, from PyPI), in the tests' virtual environment,
/// installed on first use.
pub fn schemathesis() -> PathBuf {
    const VERSION: &str = "4.32.5";
    let _one = VENV.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let venv = venv();
    let cli = venv.join("bin/schemathesis");
    let installed = Command::new(&cli)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(VERSION));
    if !installed {
        eprintln!("schemathesis {VERSION} is not installed: installing it in {} (PyPI)", venv.display());
        pip_install(&venv, &[&format!("schemathesis=={VERSION}")]);
    }
    cli
}

/// The Python of the tests' virtual environment with this checkout's `clients/python` installed
/// in it (afresh: the tests run the code of the tree).
pub fn python_with_client() -> PathBuf {
    let _one = VENV.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let venv = venv();
    // Built from a copy under target/: a build writes beside its sources, never in the tree.
    // Its one dependency (sealing), pinned, installed on first use.
    const CRYPTOGRAPHY: &str = "50.0.2";
    let has = Command::new(venv.join("bin/python"))
        .args(["-c", "import cryptography; print(cryptography.__version__)"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == CRYPTOGRAPHY);
    if !has {
        pip_install(&venv, &[&format!("cryptography=={CRYPTOGRAPHY}")]);
    }
    let package = repo_root().join("target/python-client");
    let _ = std::fs::remove_dir_all(&package);
    let copied = Command::new("cp").arg("-r").arg(repo_root().join("clients/python")).arg(&package).status();
    assert!(copied.is_ok_and(|s| s.success()), "copying clients/python to {}", package.display());
    pip_install(&venv, &["--force-reinstall", "--no-deps", &package.to_string_lossy()]);
    venv.join("bin/python")
}

/// Where the private test broker keeps its data and TLS material.
pub fn private_node_home() -> PathBuf {
    repo_root().join(".gatehouse/rabbitmq")
}

/// Everything the in-process components log (gatekeeper, in-process worker) at `filter`, for
/// this test binary: the first call installs the subscriber, later calls share its buffer.
pub fn captured_logs(filter: &str) -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let make = move || LogCapture(writer.clone());
        let _ =
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(make).try_init();
        buf
    })
    .clone()
}

struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The dead letters of `sys` (as `gatehouse dlq list` shows them), once there are `n` (or after
/// 20 s, whatever there are then).
pub async fn dead_letters(sys: &TestSystem, n: usize) -> Vec<Value> {
    let args = gatehouse_cli::commands::dlq::BrokerArgs { broker: broker_url(), prefix: sys.prefix.clone() };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let letters = gatehouse_cli::commands::dlq::list(&args).await.expect("dead letters");
        if letters.len() >= n || Instant::now() > deadline {
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `rabbitmqctl ARGS` against the test broker: the private node if it is the one
/// running, else the system node.
pub fn broker_ctl(args: &[&str]) {
    let home = private_node_home();
    let node = gatehouse_devenv::broker_node::BrokerNode::at(&home);
    let private = node.running_pid().is_some();
    let status = if private {
        node.ctl(args).stdout(Stdio::null()).status()
    } else {
        Command::new("rabbitmqctl").args(args).stdout(Stdio::null()).status()
    };
    assert!(status.is_ok_and(|s| s.success()), "rabbitmqctl {args:?} failed");
}
