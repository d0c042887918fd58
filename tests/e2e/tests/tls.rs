//! The gatekeeper refuses clients without a certificate from its client CA, at the TLS layer:
//! no HTTP answer ever comes back.

use std::error::Error as _;

use gatehouse_client::{Client, ClientError, Identity, tls_config};
use gatehouse_e2e::TestSystem;
use serde_json::json;

/// Sends one request and expects the TLS layer to refuse it; returns the error chain as text.
async fn refused(client: Client) -> String {
    // With TLS 1.3 the server judges the client certificate after the client's side of the
    // handshake, so the refusal may surface at connect or at the first request.
    let outcome = match client.connect().await {
        Err(e) => Err(e),
        Ok(mut conn) => conn.submit(&json!({"kind": "vault.put", "payload": {"record": {}}}), None).await,
    };
    match outcome {
        Ok(res) => panic!("the gatekeeper answered HTTP {}: {}", res.status, res.text()),
        Err(e) => chain(&e),
    }
}

fn chain(e: &ClientError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(" <- ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test]
async fn no_client_certificate_is_refused_at_tls() {
    let sys = TestSystem::start().await;
    let config = tls_config(&sys.certs.path().join("ca.pem"), None).unwrap();
    let err = refused(Client::with_tls(&sys.url(), config).unwrap()).await;
    assert!(err.contains("CertificateRequired"), "unexpected error: {err}");
    sys.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_tls() {
    let sys = TestSystem::start().await;
    let foreign = tempfile::tempdir().unwrap();
    gatehouse_cli::certs::write_dev(foreign.path()).unwrap();
    // Trusts the real server, but presents a client certificate of a foreign CA.
    let identity =
        Identity { cert: foreign.path().join("client.pem"), key: foreign.path().join("client.key") };
    let config = tls_config(&sys.certs.path().join("ca.pem"), Some(&identity)).unwrap();
    let err = refused(Client::with_tls(&sys.url(), config).unwrap()).await;
    // The foreign CA has the same name as ours, so webpki checks the signature against our CA
    // and fails it (alert decrypt_error); a differently named CA gives unknown_ca.
    let alerts = ["DecryptError", "UnknownCA", "BadCertificate"];
    assert!(
        err.contains("received fatal alert") && alerts.iter().any(|a| err.contains(a)),
        "unexpected error: {err}"
    );
    sys.stop().await;
}

#[tokio::test]
async fn the_dev_client_certificate_is_accepted() {
    // The control case of the two above: the same path with the right certificate works.
    let sys = TestSystem::start().await;
    let mut conn = sys.connect().await;
    let res = conn.request(gatehouse_client::Method::GET, "/healthz", &[], Vec::new()).await.unwrap();
    assert_eq!(res.status, 200);
    sys.stop().await;
}
