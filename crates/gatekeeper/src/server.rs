//! The mTLS accept loop: connection limit, handshake timeout, client identity per connection,
//! HTTP/1.1 and HTTP/2, graceful drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::tally::Place;
use crate::tls::{ClientIdentity, client_identity};

/// Admits one more connection of a client (its place, given back when the connection ends),
/// or refuses it.
pub type ConnectionGate = Arc<dyn Fn(&ClientIdentity) -> Option<Place> + Send + Sync>;

/// Limits the accept loop enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams (requests) per connection.
    pub http2_max_streams: u32,
    pub stopping_wait_time: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and lets open
/// requests finish within `stopping_wait_time`.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    limits: Limits,
    gate: ConnectionGate,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = Builder::new(TokioExecutor::new());
    // Headers: at most 64 of them, 16 KiB in all (hyper answers 431 past that).
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(64)
        .max_buf_size(16 * 1024);
    http.http2().timer(TokioTimer::new()).max_concurrent_streams(limits.http2_max_streams);
    let http = Arc::new(http);
    tokio::pin!(shutdown);

    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: too many open connections");
            drop(tcp);
            continue;
        };
        // Answers are small and written in more than one piece (TLS records, HTTP head and
        // body): with Nagle's algorithm on, a piece can wait for the client's delayed ACK
        // (40 ms on Linux).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let router = router.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        let gate = gate.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::info!(%peer, error = %e, "TLS handshake refused"),
                Err(_) => return tracing::info!(%peer, "TLS handshake timed out"),
            };
            let identity =
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(client_identity);
            let Some(identity) = identity else {
                return tracing::warn!(%peer, "client certificate has no usable identity");
            };
            // The client's own share of the connection table (its policy's max_connections).
            let Some(_place) = gate(&identity) else {
                return tracing::info!(%peer, client = %identity.0, "connection closed: the client holds its most open connections");
            };
            let service = router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(identity.clone());
                req
            });
            let conn = http.serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    tracing::info!("gatekeeper stopping: draining open connections");
    if tokio::time::timeout(limits.stopping_wait_time, graceful.shutdown()).await.is_err() {
        tracing::warn!("open connections did not finish in time");
    }
}
