//! The shape both component processes share: logging, settings (exit 64 when they are bad,
//! before anything is bound or connected), a runtime, then run until stopped.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A configuration that cannot be used, found while building a component (the catalog against
/// the handlers, a key file): exits 64 with one line, like settings that do not load.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines; colours only when standard output is a terminal.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The log format: `--log-format text|json` (taken out of `args`), else the environment's
/// `<NAME>__LOG__FORMAT` (e.g. `WORKER__LOG__FORMAT=json`), else text.
///
/// # Errors
/// For any other value.
pub fn log_format(name: &str, args: &mut Vec<std::ffi::OsString>) -> Result<LogFormat, String> {
    let mut chosen = std::env::var(format!("{}__LOG__FORMAT", name.to_uppercase())).ok();
    if let Some(i) = args.iter().position(|a| a == "--log-format") {
        args.remove(i);
        (i < args.len()).then_some(()).ok_or("--log-format needs a value (text or json)")?;
        chosen = Some(args.remove(i).to_string_lossy().into_owned());
    } else if let Some(i) = args.iter().position(|a| a.to_string_lossy().starts_with("--log-format=")) {
        let a = args.remove(i).to_string_lossy().into_owned();
        chosen = a.split_once('=').map(|(_, v)| v.to_owned());
    }
    match chosen.as_deref() {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(format!("unknown log format {other:?} (text or json)")),
    }
}

/// What is logged unless `RUST_LOG` says otherwise. lapin logs every channel the broker closes
/// as an ERROR of its own (e.g. `NOT_FOUND` while the worker has not declared the topology
/// yet); each such close also reaches our code as an error, which logs it with its context and
/// level, so lapin's own line is left out. Likewise deadpool logs at WARN each pooled
/// PostgreSQL connection it finds broken (16 lines when the server cuts them all); the worker
/// says once that storage refuses writes, and when it takes them again.
pub const DEFAULT_FILTER: &str = "info,lapin=warn,lapin::channel=off,deadpool=error";

/// Settings that say where traces go (`[telemetry]`).
pub trait HasTelemetry {
    fn telemetry(&self) -> &crate::telemetry::TelemetrySettings;
}

/// Log lines to standard output, and spans to an OTLP collector when one is configured.
fn init_logs(
    name: &str,
    format: LogFormat,
    telemetry: &crate::telemetry::TelemetrySettings,
) -> Result<Option<crate::telemetry::Exporting>, String> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_FILTER.into());
    if telemetry.otlp_endpoint.is_none() {
        // Without export, the subscriber of before: the spans that exist only to be exported
        // are off, and no layer stack is built around the log lines (measured: both cost the
        // components 10-15 % more CPU per job).
        let off = format!("{}=off", crate::telemetry::SPANS).parse().map_err(|e| format!("{e}"))?;
        let logs = tracing_subscriber::fmt().with_env_filter(filter.add_directive(off));
        match format {
            LogFormat::Text => logs.with_ansi(std::io::stdout().is_terminal()).init(),
            LogFormat::Json => logs.json().with_current_span(true).init(),
        }
        return Ok(None);
    }
    let lines = tracing_subscriber::fmt::layer();
    let lines = match format {
        LogFormat::Text => lines.with_ansi(std::io::stdout().is_terminal()).boxed(),
        LogFormat::Json => lines.json().with_current_span(true).boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(lines);
    let Some((spans, exporting)) = crate::telemetry::layer(&format!("gatehouse-{name}"), telemetry)? else {
        return Err("no exporter".into());
    };
    registry.with(spans).init();
    Ok(Some(exporting))
}

/// Runs component `name`: `NAME [--log-format text|json] [CONFIG]` (default `config/NAME.toml`), settings read by
/// `load`, then `run` until it returns.
pub fn main<S, E, F, Fut>(name: &str, load: impl FnOnce(&Path) -> Result<S, E>, run: F) -> ExitCode
where
    S: HasTelemetry,
    E: std::fmt::Display,
    F: FnOnce(S) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut args: Vec<_> = std::env::args_os().skip(1).collect();
    let format = match log_format(name, &mut args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(64);
        }
    };
    let path = args.first().map_or_else(|| PathBuf::from(format!("config/{name}.toml")), PathBuf::from);
    let settings = match load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: bad configuration in {}: {e}", path.display());
            return ExitCode::from(64);
        }
    };
    // After the settings (they say where spans go); nothing logs before.
    let _exporting = match init_logs(name, format, settings.telemetry()) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{name}: bad configuration in {}: {e}", path.display());
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Spawned rather than run on this thread by `block_on`: the component's own loops (the
    // worker's dispatch of deliveries) then run on the runtime's threads, beside the tasks they
    // hand work to, instead of waking the main thread for every message.
    let ran = runtime.block_on(runtime.spawn(run(settings)));
    match ran.unwrap_or_else(|e| Err(anyhow::anyhow!("{name} stopped: {e}"))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<BadConfig>().is_some() => {
            eprintln!("{name}: bad configuration: {e}");
            ExitCode::from(64)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            ExitCode::FAILURE
        }
    }
}
