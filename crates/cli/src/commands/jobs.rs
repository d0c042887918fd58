//! `gatehouse submit` and `gatehouse status`: client commands over mTLS.

use std::path::PathBuf;

use anyhow::Context as _;
use gatehouse_client::{Client, Identity, Response};
use serde_json::{Value, json};

/// Where the gatekeeper is and which certificate to present.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoint {
    /// Gatekeeper URL.
    #[arg(long, default_value = "https://127.0.0.1:8443", env = "GATEHOUSE_URL")]
    pub url: String,
    /// Client certificate (PEM).
    #[arg(long, default_value = "certs/dev/client.pem")]
    pub cert: PathBuf,
    /// Client key (PEM).
    #[arg(long, default_value = "certs/dev/client.key")]
    pub key: PathBuf,
    /// CA that signed the gatekeeper's certificate (PEM).
    #[arg(long, default_value = "certs/dev/ca.pem")]
    pub ca: PathBuf,
}

impl Endpoint {
    /// The mTLS client these options describe.
    ///
    /// # Errors
    /// When a certificate file is bad.
    pub fn client(&self) -> anyhow::Result<Client> {
        let identity = Identity { cert: self.cert.clone(), key: self.key.clone() };
        Ok(Client::new(&self.url, &self.ca, Some(identity))?)
    }
}

/// A job to submit.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// Job kind, e.g. vault.put or ledger.apply.
    pub kind: String,
    /// Payload, as JSON.
    #[arg(long)]
    pub data: String,
    /// Priority 0..9 (9 highest); default from the job catalog.
    #[arg(long)]
    pub priority: Option<u8>,
    /// Sequence position, KEY:NUMBER (for sequenced kinds such as ledger.apply).
    #[arg(long, value_name = "KEY:N")]
    pub seq: Option<String>,
    /// Idempotency key: the same key always maps to the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Run it this many seconds from now, not before (a delayed job).
    #[arg(long)]
    pub delay: Option<u64>,
    /// Wait up to S seconds for the outcome.
    #[arg(long, value_name = "S")]
    pub wait: Option<u64>,
    /// The job catalog: fields its schemas mark `x-gatehouse-sealed` are sealed here, before
    /// the job leaves this machine.
    #[arg(long, default_value = "config/jobs.toml")]
    pub catalog: PathBuf,
    /// The operator's public key (hex) that must have certified the worker key sealed to.
    #[arg(long, default_value = "certs/dev/operator-signing.pub")]
    pub operator_key: PathBuf,
}

/// Builds the request body of `submit`.
///
/// # Errors
/// When `--data` is not JSON or `--seq` is not `KEY:N`.
pub fn submit_body(args: &SubmitArgs) -> anyhow::Result<Value> {
    let payload: Value = serde_json::from_str(&args.data).context("--data is not valid JSON")?;
    let mut body = json!({ "kind": args.kind, "payload": payload });
    if let Some(p) = args.priority {
        body["priority"] = json!(p);
    }
    if let Some(seq) = &args.seq {
        let (key, n) = seq.rsplit_once(':').context("--seq takes KEY:NUMBER")?;
        let n: u64 = n.parse().context("--seq takes KEY:NUMBER")?;
        body["sequence"] = json!({ "key": key, "number": n });
    }
    if let Some(k) = &args.idempotency_key {
        body["idempotency_key"] = json!(k);
    }
    if let Some(d) = args.delay {
        body["delay_s"] = json!(d);
    }
    Ok(body)
}

/// `gatehouse submit`. Returns whether the gatekeeper accepted the job.
///
/// # Errors
/// When the request cannot be built or sent.
pub async fn submit(endpoint: &Endpoint, args: &SubmitArgs, as_json: bool) -> anyhow::Result<bool> {
    let mut body = submit_body(args)?;
    let mut conn = endpoint.client()?.connect().await?;
    let sealed = sealed_fields(&args.catalog, &args.kind);
    if !sealed.is_empty() {
        let operator = gatehouse_protocol::keys::read_hex(&args.operator_key)?;
        let client = gatehouse_client::client_name(&endpoint.cert)?;
        conn.sealer(&operator, &client).await?.seal(&mut body, &sealed)?;
    }
    let res = conn.submit(&body, args.wait).await?;
    Ok(print(&res, as_json))
}

/// The JSON pointers of `kind`'s sealed fields in `catalog`; none when the catalog or the kind
/// cannot be read here (the gatekeeper then refuses a field that must be sealed).
fn sealed_fields(catalog: &std::path::Path, kind: &str) -> Vec<String> {
    let schema = gatehouse_protocol::Catalog::load(catalog)
        .ok()
        .and_then(|c| c.kind(kind).map(|k| k.schema.clone()))
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str::<Value>(&text).ok());
    schema.map(|s| gatehouse_protocol::fields::sealed_paths(&s)).unwrap_or_default()
}

/// `gatehouse status ID`. Returns whether the job was found.
///
/// # Errors
/// When the request cannot be sent.
pub async fn status(endpoint: &Endpoint, id: &str, as_json: bool) -> anyhow::Result<bool> {
    let mut conn = endpoint.client()?.connect().await?;
    let res = conn.status(id).await?;
    Ok(print(&res, as_json))
}

/// `gatehouse status ID --follow`: the job's live event stream, a line per state and a
/// progress bar while it runs, until it ends; reconnects (resuming after the last event) when
/// the stream breaks. With `--json`, one event per line. The bar is redrawn in place only on
/// a terminal without `NO_COLOR`; elsewhere (a pipe, a log) each progress report is a plain
/// line. Returns whether the job succeeded.
///
/// # Errors
/// When the gatekeeper cannot be reached at all.
pub async fn follow(endpoint: &Endpoint, id: &str, as_json: bool) -> anyhow::Result<bool> {
    let client = endpoint.client()?;
    let live = Live::detect();
    let mut last: Option<u64> = None;
    let mut breaks = 0;
    loop {
        let mut conn = client.connect().await?;
        let mut stream = match conn.events(id, last).await? {
            Ok(stream) => stream,
            Err(res) => return Ok(print(&res, as_json)),
        };
        loop {
            let event = match stream.next().await {
                Ok(Some(event)) => event,
                // The server ended the stream (it lasts `max_stream_s`): resume at once.
                Ok(None) => break,
                Err(_) => {
                    breaks += 1;
                    anyhow::ensure!(breaks <= 10, "the event stream kept breaking");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    break;
                }
            };
            if let Some(n) = event.id.as_deref().and_then(|n| n.parse().ok()) {
                last = Some(n);
            }
            let data = event.json();
            if as_json {
                println!("{}", serde_json::json!({"event": event.event, "id": event.id, "data": data}));
            }
            match event.event.as_str() {
                "progress" if !as_json => {
                    let percent = data["progress"]["percent"].as_u64().unwrap_or(0).min(100) as usize;
                    let message = data["progress"]["message"].as_str().unwrap_or("");
                    live.progress(&mut std::io::stderr(), percent, message);
                }
                "state" => {
                    let state = data["status"].as_str().unwrap_or("?");
                    if !as_json {
                        live.line(&mut std::io::stderr(), state);
                    }
                    if ["succeeded", "failed", "dead_lettered", "cancelled"].contains(&state) {
                        if !as_json {
                            for key in ["result", "error", "reason"] {
                                if !data[key].is_null() {
                                    println!("  {key}: {}", data[key]);
                                }
                            }
                        }
                        return Ok(state == "succeeded");
                    }
                }
                _ => {}
            }
        }
    }
}

/// Where `--follow` writes its progress: a terminal gets a bar redrawn in place; anything else
/// plain lines, without carriage returns or escape sequences.
#[derive(Clone, Copy)]
struct Live(bool);

impl Live {
    fn detect() -> Self {
        use std::io::IsTerminal as _;
        Self(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
    }

    fn progress(self, out: &mut impl std::io::Write, percent: usize, message: &str) {
        let _ = if self.0 {
            let bar = format!("{}{}", "#".repeat(percent / 5), ".".repeat(20 - percent / 5));
            write!(out, "\r[{bar}] {percent:>3}% {message}\x1b[K")
        } else {
            writeln!(out, "{percent:>3}% {message}")
        };
    }

    fn line(self, out: &mut impl std::io::Write, text: &str) {
        let _ = if self.0 { writeln!(out, "\r{text}\x1b[K") } else { writeln!(out, "{text}") };
    }
}

/// `gatehouse cancel ID`. Returns whether it was cancelled (or told to stop).
///
/// # Errors
/// When the request cannot be sent.
pub async fn cancel(endpoint: &Endpoint, id: &str, as_json: bool) -> anyhow::Result<bool> {
    let mut conn = endpoint.client()?.connect().await?;
    let res =
        conn.request(gatehouse_client::Method::DELETE, &format!("/v1/jobs/{id}"), &[], Vec::new()).await?;
    Ok(print(&res, as_json))
}

/// Options of `gatehouse jobs list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only jobs in this state (succeeded, failed, waiting_for_turn, …).
    #[arg(long)]
    pub state: Option<String>,
    /// Only jobs of this kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only jobs submitted after this RFC 3339 time.
    #[arg(long)]
    pub submitted_after: Option<String>,
    /// Only the jobs of this batch (its id).
    #[arg(long)]
    pub batch: Option<String>,
    /// Only the steps of this workflow (its id).
    #[arg(long)]
    pub workflow: Option<String>,
    /// Jobs per page (1 to 500).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Where the previous page ended (the `next_cursor` it printed).
    #[arg(long)]
    pub cursor: Option<String>,
}

/// `gatehouse jobs list`: one page of your jobs, newest first (metadata only), and the cursor of
/// the next. Returns whether the gatekeeper answered it.
///
/// # Errors
/// When the gatekeeper cannot be reached.
pub async fn list(endpoint: &Endpoint, args: &ListArgs, as_json: bool) -> anyhow::Result<bool> {
    let limit = args.limit.to_string();
    let params = [
        ("state", args.state.as_deref()),
        ("kind", args.kind.as_deref()),
        ("submitted_after", args.submitted_after.as_deref()),
        ("batch", args.batch.as_deref()),
        ("workflow", args.workflow.as_deref()),
        ("limit", Some(limit.as_str())),
        ("cursor", args.cursor.as_deref()),
    ];
    let query: Vec<String> =
        params.iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", percent_encoded(v)))).collect();
    let mut conn = endpoint.client()?.connect().await?;
    let path = format!("/v1/jobs?{}", query.join("&"));
    let res = conn.request(gatehouse_client::Method::GET, &path, &[], Vec::new()).await?;
    if as_json || !(200..300).contains(&res.status) {
        return Ok(print(&res, as_json));
    }
    let page = res.json();
    for job in page["jobs"].as_array().into_iter().flatten() {
        let attempts = job["attempts"].as_u64().map(|n| format!("  attempts {n}")).unwrap_or_default();
        println!(
            "{}  {:<14} {:<22} submitted {}{attempts}",
            job["id"].as_str().unwrap_or("?"),
            job["kind"].as_str().unwrap_or("?"),
            job["status"].as_str().unwrap_or("?"),
            job["submitted_at"].as_str().unwrap_or("?"),
        );
    }
    if let Some(next) = page["next_cursor"].as_str() {
        println!("more: --cursor {next}");
    }
    Ok(true)
}

/// `s` for a URL's query: unreserved characters as they are, every other byte as `%XX`.
fn percent_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prints an answer; `--json` prints the body alone. Returns whether it was a success.
fn print(res: &Response, as_json: bool) -> bool {
    let ok = (200..300).contains(&res.status);
    let body = res.json();
    if as_json {
        println!("{}", if body.is_null() { res.text() } else { body.to_string() });
    } else if ok {
        let state = body["status"].as_str().unwrap_or("?");
        println!("{} {}  job {}", res.status, state, body["id"].as_str().unwrap_or("?"));
        for key in ["result", "error", "expected", "reason", "not_before"] {
            if !body[key].is_null() {
                println!("  {key}: {}", body[key]);
            }
        }
    } else {
        eprintln!(
            "{} {}: {}",
            res.status,
            body["title"].as_str().unwrap_or(""),
            body["detail"].as_str().unwrap_or(&res.text())
        );
        if let Some(errors) = body["errors"].as_array() {
            for e in errors {
                eprintln!("  {}: {}", e["path"].as_str().unwrap_or(""), e["message"].as_str().unwrap_or(""));
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::{Live, percent_encoded};

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encoded("vault.put"), "vault.put");
        assert_eq!(percent_encoded("2026-12-04T10:00:00+01:00"), "2026-12-04T10%3A00%3A00%2B01%3A00");
        assert_eq!(percent_encoded("a b&c"), "a%20b%26c");
    }

    #[test]
    fn progress_is_plain_lines_off_a_terminal_and_a_bar_on_one() {
        let mut plain = Vec::new();
        Live(false).progress(&mut plain, 40, "copying");
        Live(false).line(&mut plain, "succeeded");
        assert_eq!(String::from_utf8(plain).unwrap(), " 40% copying\nsucceeded\n");
        let mut bar = Vec::new();
        Live(true).progress(&mut bar, 40, "copying");
        assert_eq!(String::from_utf8(bar).unwrap(), "\r[########............]  40% copying\x1b[K");
    }
}
