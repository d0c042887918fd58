//! The RabbitMQ management HTTP API (plain HTTP on 127.0.0.1:15672, as guest): what an
//! operator with admin credentials, or an attacker who has them, sees and can do.

use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// `method path` with a JSON body; answers (status, body).
pub async fn call(method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    call_at("127.0.0.1:15672".parse().expect("addr"), method, path, body).await
}

/// The same against any plain-HTTP listener (e.g. the gatekeeper's admin listener).
pub async fn call_at(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    call_as(addr, method, path, body, Some("Basic Z3Vlc3Q6Z3Vlc3Q=")).await // guest:guest
}

/// The same with this `Authorization` header (or none).
pub async fn call_as(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    authorization: Option<&str>,
) -> (u16, String) {
    let headers: Vec<(&str, &str)> = authorization.map(|a| ("authorization", a)).into_iter().collect();
    call_with(addr, method, path, body, &headers).await
}

/// The same with these headers besides `Host` and `Content-Type: application/json`.
pub async fn call_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("plain HTTP listener");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("http");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req =
        req.body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default()))).expect("request");
    let res = sender.send_request(req).await.expect("management API answers");
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The status of `GET path` on a plain-HTTP listener asked for as `Host: host`.
pub async fn status_for_host(addr: std::net::SocketAddr, path: &str, host: &str) -> u16 {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("plain HTTP listener");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("http");
    tokio::spawn(conn);
    let req =
        Request::builder().uri(path).header("host", host).body(Full::new(Bytes::new())).expect("request");
    sender.send_request(req).await.expect("the listener answers").status().as_u16()
}

/// Reads up to `count` messages of `queue` in vhost `/` and puts them back
/// (`ackmode: reject_requeue_true`); answers the raw JSON the API returned.
pub async fn peek(queue: &str, count: u32) -> String {
    let body = serde_json::json!({"count": count, "ackmode": "reject_requeue_true", "encoding": "auto"});
    let (status, text) = call("POST", &format!("/api/queues/%2f/{queue}/get"), Some(body)).await;
    assert_eq!(status, 200, "{text}");
    text
}

/// Publishes `payload` straight to `queue` (through the default exchange) in vhost `/`, with
/// `headers`; answers whether it was routed.
pub async fn publish_to_queue(queue: &str, payload: &str, headers: Value) -> bool {
    publish_with(queue, payload, serde_json::json!({"headers": headers, "delivery_mode": 2})).await
}

/// Publishes `payload` straight to `queue` (default exchange, vhost `/`) with AMQP
/// `properties` as the management API takes them (`priority`, `reply_to`, `correlation_id`,
/// `headers`, ...); answers whether it was routed.
pub async fn publish_with(queue: &str, payload: &str, properties: Value) -> bool {
    let body = serde_json::json!({
        "properties": properties,
        "routing_key": queue,
        "payload": payload,
        "payload_encoding": "string",
    });
    let (status, text) = call("POST", "/api/exchanges/%2f/amq.default/publish", Some(body)).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str::<Value>(&text).expect("json")["routed"] == true
}

/// Takes up to `count` messages off `queue` for good (`ackmode: ack_requeue_false`), as an
/// attacker with admin rights can; answers them.
pub async fn take(queue: &str, count: u32) -> Vec<Value> {
    let body = serde_json::json!({"count": count, "ackmode": "ack_requeue_false", "encoding": "auto"});
    let (status, text) = call("POST", &format!("/api/queues/%2f/{queue}/get"), Some(body)).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("json")
}
