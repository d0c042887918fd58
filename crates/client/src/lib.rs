//! The client end of the flow: an mTLS HTTP client for the gatekeeper API, used by the
//! `gatehouse` CLI and the end-to-end tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gatehouse_client::ClientError> {
//! use gatehouse_client::{Client, Identity};
//! let client = Client::new(
//!     "https://127.0.0.1:8443",
//!     "certs/dev/ca.pem".as_ref(),
//!     Some(Identity { cert: "certs/dev/client.pem".into(), key: "certs/dev/client.key".into() }),
//! )?;
//! let mut conn = client.connect().await?;
//! let res = conn.submit(&serde_json::json!({"kind": "ledger.balance", "payload": {"account": "a"}}), Some(5)).await?;
//! println!("{} {}", res.status, res.text());
//! # Ok(()) }
//! ```

mod sealing;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
pub use hyper::Method;
use hyper::Request;
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub use sealing::{Sealer, client_name};

/// What went wrong talking to the gatekeeper.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {0:?}: expected https://host:port")]
    Url(String),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// Sealing fields failed: the worker key set is not certified by the pinned operator key,
    /// no key is valid now, or the job cannot be sealed.
    #[error("sealing: {0}")]
    Seal(String),
}

/// A client certificate and its key (PEM files).
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A gatekeeper's address and the TLS settings to reach it.
#[derive(Clone)]
pub struct Client {
    addr: String,
    host: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    /// The same TLS settings offering only `h2` in ALPN.
    tls_h2: TlsConnector,
    http2: bool,
}

/// An answer from the gatekeeper.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    /// The W3C trace context the gatekeeper answered with (its trace id is in its logs).
    pub traceparent: Option<String>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn file_err(path: &Path, e: impl ToString) -> ClientError {
    ClientError::File { path: path.display().to_string(), reason: e.to_string() }
}

/// Reads the certificates of a PEM file.
///
/// # Errors
/// When the file cannot be read or holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    gatehouse_protocol::pem::load_certs(path).map_err(|e| file_err(path, e))
}

/// A rustls client configuration trusting `ca`, presenting `identity` if given.
///
/// # Errors
/// When a file cannot be read or the key does not fit the certificate.
pub fn tls_config(ca: &Path, identity: Option<&Identity>) -> Result<ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| file_err(ca, e))?;
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => {
            let key = PrivateKeyDer::from_pem_file(&id.key).map_err(|e| file_err(&id.key, e))?;
            builder.with_client_auth_cert(load_certs(&id.cert)?, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Client {
    /// A client for `url` (`https://host:port`) trusting `ca`, presenting `identity`.
    ///
    /// # Errors
    /// When the URL or a file is bad.
    pub fn new(url: &str, ca: &Path, identity: Option<Identity>) -> Result<Self, ClientError> {
        Self::with_tls(url, tls_config(ca, identity.as_ref())?)
    }

    /// A client with a rustls configuration of the caller's (tests use this for bad cases).
    ///
    /// # Errors
    /// When the URL is bad.
    pub fn with_tls(url: &str, config: ClientConfig) -> Result<Self, ClientError> {
        let bad = || ClientError::Url(url.to_owned());
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let addr = rest.trim_end_matches('/').to_owned();
        let host = match addr.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
            None => return Err(bad()),
        };
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
        let mut h2 = config.clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            addr,
            host,
            server_name,
            tls: TlsConnector::from(Arc::new(config)),
            tls_h2: TlsConnector::from(Arc::new(h2)),
            http2: false,
        })
    }

    /// The same client speaking HTTP/2 (one connection carries concurrent requests).
    pub fn http2(mut self) -> Self {
        self.http2 = true;
        self
    }

    /// Opens one keep-alive HTTP/1.1 connection over TLS.
    ///
    /// # Errors
    /// When TCP, TLS or the HTTP handshake fails.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let tcp = TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        let connector = if self.http2 { &self.tls_h2 } else { &self.tls };
        let tls = TokioIo::new(connector.connect(self.server_name.clone(), tcp).await?);
        let sender = if self.http2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), tls).await?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(tls).await?;
            tokio::spawn(conn);
            Sender::H1(sender)
        };
        Ok(Connection { sender, host: self.host.clone() })
    }
}

/// One open connection; requests on it go one after another.
pub struct Connection {
    sender: Sender,
    host: String,
}

/// Request bodies: whole (with a length) or streamed (chunked, no length).
type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

enum Sender {
    H1(SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Connection {
    /// Another handle on the same HTTP/2 connection (its requests run concurrently); `None`
    /// for HTTP/1.1, where one connection carries one request at a time.
    pub fn share(&self) -> Option<Connection> {
        match &self.sender {
            Sender::H2(s) => Some(Connection { sender: Sender::H2(s.clone()), host: self.host.clone() }),
            Sender::H1(_) => None,
        }
    }

    /// `POST /v1/jobs`, with `Prefer: wait=N` when `wait_s` is given.
    ///
    /// # Errors
    /// When the request cannot be sent or the answer not read.
    pub async fn submit(&mut self, job: &Value, wait_s: Option<u64>) -> Result<Response, ClientError> {
        let wait = wait_s.map(|w| format!("wait={w}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(w) = &wait {
            headers.push(("prefer", w.as_str()));
        }
        self.request(Method::POST, "/v1/jobs", &headers, job.to_string().into_bytes()).await
    }

    /// `POST /v1/batches`: `jobs` (submit bodies) accepted whole or refused whole.
    ///
    /// # Errors
    /// When the request cannot be sent or the answer not read.
    pub async fn submit_batch(&mut self, jobs: &[Value]) -> Result<Response, ClientError> {
        let body = serde_json::json!({ "jobs": jobs }).to_string().into_bytes();
        self.request(Method::POST, "/v1/batches", &[("content-type", "application/json")], body).await
    }

    /// `GET /v1/batches/{id}`.
    ///
    /// # Errors
    /// When the request cannot be sent or the answer not read.
    pub async fn batch(&mut self, id: &str) -> Result<Response, ClientError> {
        self.request(Method::GET, &format!("/v1/batches/{id}"), &[], Vec::new()).await
    }

    /// `POST /v1/workflows` with `steps` (each a job body with `name` and `after`, the names of
    /// the steps it waits for).
    ///
    /// # Errors
    /// When the request cannot be sent or the answer not read.
    pub async fn submit_workflow(&mut self, steps: &[Value]) -> Result<Response, ClientError> {
        let body = serde_json::json!({ "steps": steps }).to_string().into_bytes();
        self.request(Method::POST, "/v1/workflows", &[("content-type", "application/json")], body).await
    }

    /// `GET /v1/workflows/{id}`.
    ///
    /// # Errors
    /// When the request cannot be sent or the answer not read.
    pub async fn workflow(&mut self, id: &str) -> Result<Response, ClientError> {
        self.request(Method::GET, &format!("/v1/workflows/{id}"), &[], Vec::new()).await
    }

    /// `GET /v1/workflows/{id}/events`: each step's transitions as they happen, from after the
    /// event `last_event_id` names when given. Any answer but `200` comes back whole as the
    /// `Err` of the inner result.
    ///
    /// # Errors
    /// When the request cannot be sent.
    pub async fn workflow_events(
        &mut self,
        id: &str,
        last_event_id: Option<&str>,
    ) -> Result<Result<EventStream, Response>, ClientError> {
        self.stream(&format!("/v1/workflows/{id}/events"), last_event_id).await
    }

    /// `GET /v1/jobs/{id}`.
    ///
    /// # Errors
    /// When the request cannot be sent or the answer not read.
    pub async fn status(&mut self, id: &str) -> Result<Response, ClientError> {
        self.request(Method::GET, &format!("/v1/jobs/{id}"), &[], Vec::new()).await
    }

    /// `GET /v1/jobs/{id}/events`: the job's live event stream, from after event
    /// `last_event_id` (`Last-Event-ID`) when given. Any answer but `200` comes back whole as
    /// the `Err` of the inner result (a problem document).
    ///
    /// # Errors
    /// When the request cannot be sent.
    pub async fn events(
        &mut self,
        id: &str,
        last_event_id: Option<u64>,
    ) -> Result<Result<EventStream, Response>, ClientError> {
        let last = last_event_id.map(|n| n.to_string());
        self.stream(&format!("/v1/jobs/{id}/events"), last.as_deref()).await
    }

    /// An event stream at `path`, from after `last_event_id`.
    async fn stream(
        &mut self,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<Result<EventStream, Response>, ClientError> {
        let mut headers = vec![("accept", "text/event-stream")];
        if let Some(last) = last_event_id {
            headers.push(("last-event-id", last));
        }
        let res = self.send_raw(Method::GET, path, &headers, empty()).await?;
        if res.status() != hyper::StatusCode::OK {
            return Ok(Err(Response::read(res).await?));
        }
        Ok(Ok(EventStream { body: res.into_body(), buffer: Vec::new() }))
    }

    /// Any request, with raw headers and body.
    ///
    /// # Errors
    /// When the request cannot be sent or the answer not read.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Response, ClientError> {
        self.send(method, path, headers, Full::new(Bytes::from(body)).boxed()).await
    }

    /// A request whose body is streamed in `count` chunks of `chunk`, `pace` apart (HTTP/1.1:
    /// chunked transfer encoding, no length announced). For testing limits.
    ///
    /// # Errors
    /// When the request cannot be sent or the answer not read.
    pub async fn request_streamed(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        chunk: Vec<u8>,
        count: usize,
        pace: std::time::Duration,
    ) -> Result<Response, ClientError> {
        let chunk = Bytes::from(chunk);
        let frames = futures_util::stream::unfold(0, move |sent| {
            let chunk = chunk.clone();
            async move {
                if sent == count {
                    return None;
                }
                if sent > 0 && !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
                Some((Ok(hyper::body::Frame::data(chunk)), sent + 1))
            }
        });
        let body = http_body_util::StreamBody::new(frames);
        self.send(method, path, headers, BodyExt::boxed(body)).await
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<Response, ClientError> {
        let res = self.send_raw(method, path, headers, body).await?;
        Response::read(res).await
    }

    async fn send_raw(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut req = Request::builder().method(method).uri(path).header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(body).map_err(|e| ClientError::Url(e.to_string()))?;
        let res = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        Ok(res)
    }
}

fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

impl Response {
    async fn read(res: hyper::Response<hyper::body::Incoming>) -> Result<Self, ClientError> {
        let header = |name| res.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let status = res.status().as_u16();
        let content_type = header(hyper::header::CONTENT_TYPE);
        let retry_after = header(hyper::header::RETRY_AFTER);
        let traceparent = header(hyper::header::HeaderName::from_static("traceparent"));
        let body = res.into_body().collect().await?.to_bytes().to_vec();
        Ok(Response { status, content_type, retry_after, traceparent, body })
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEvent {
    /// `state`, `progress`, `error` (`message` when the stream names none).
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl ServerEvent {
    /// The data as JSON (`null` when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// A stream of Server-Sent Events (see [`Connection::events`]).
pub struct EventStream {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
}

impl EventStream {
    /// The next event; `None` when the server ended the stream.
    ///
    /// # Errors
    /// When the connection fails mid-stream.
    pub async fn next(&mut self) -> Result<Option<ServerEvent>, ClientError> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_event(&String::from_utf8_lossy(&block)) {
                    return Ok(Some(event));
                }
                continue;
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                None => return Ok(None),
            }
        }
    }
}

/// One event block (`field: value` lines); `None` for a block of comments only (keep-alives).
fn parse_event(block: &str) -> Option<ServerEvent> {
    let (mut event, mut id, mut data, mut any) = (String::from("message"), None, Vec::new(), false);
    for line in block.lines() {
        let (field, value) =
            line.split_once(':').map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
        match field {
            "" => continue,
            "event" => event = value.to_owned(),
            "id" => id = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            _ => continue,
        }
        any = true;
    }
    any.then(|| ServerEvent { event, id, data: data.join("\n") })
}
