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
    gatehouse_devenv::certs::write_dev(foreign.path()).unwrap();
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

/// The certificate grid: client certificates that are each wrong in one way. Made beside the
/// test system's CA before its gatekeeper starts; `ca.crl` revokes `revoked`.
fn grid(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
        SerialNumber, date_time_ymd,
    };
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(
        &ca_pem,
        KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap(),
    )
    .unwrap();
    let base = |name: &str| {
        let mut p = CertificateParams::new(Vec::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p
    };
    let write = |name: &str, pem: String, key: &KeyPair| {
        std::fs::write(dir.join(format!("{name}.pem")), pem).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    let signed = |name: &str, p: CertificateParams| {
        let key = KeyPair::generate().unwrap();
        write(name, p.signed_by(&key, &issuer).unwrap().pem(), &key);
    };
    let mut expired = base("expired");
    expired.not_before = date_time_ymd(2020, 1, 1);
    expired.not_after = date_time_ymd(2021, 1, 1);
    signed("expired", expired);
    let mut future = base("future");
    future.not_before = date_time_ymd(2099, 1, 1);
    future.not_after = date_time_ymd(2100, 1, 1);
    signed("future", future);
    let mut server_only = base("serveronly");
    server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    signed("serveronly", server_only);
    let mut ca_client = base("caclient");
    ca_client.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_client.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
    signed("caclient", ca_client);
    let self_key = KeyPair::generate().unwrap();
    write("selfsigned", base("selfsigned").self_signed(&self_key).unwrap().pem(), &self_key);
    let mut revoked = base("revoked");
    revoked.serial_number = Some(SerialNumber::from(4242u64));
    signed("revoked", revoked);
    let crl = CertificateRevocationListParams {
        this_update: date_time_ymd(2024, 1, 1),
        next_update: date_time_ymd(2099, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(4242u64),
            revocation_time: date_time_ymd(2024, 1, 1),
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    };
    std::fs::write(dir.join("ca.crl"), crl.signed_by(&issuer).unwrap().pem().unwrap()).unwrap();
    // A certificate with another client's key.
    std::fs::copy(dir.join("client.pem"), dir.join("mismatch.pem")).unwrap();
    std::fs::copy(dir.join("other-client.key"), dir.join("mismatch.key")).unwrap();
}

#[tokio::test]
async fn the_certificate_grid_is_refused_at_tls() {
    let sys = TestSystem::start_with(gatehouse_e2e::Options {
        prepare_certs: Some(grid),
        client_crl: Some("ca.crl"),
        ..Default::default()
    })
    .await;
    let dir = sys.certs.path();
    let mut outcomes = Vec::new();
    for name in ["expired", "future", "serveronly", "caclient", "selfsigned", "revoked", "mismatch"] {
        let identity =
            Identity { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
        let outcome = match tls_config(&dir.join("ca.pem"), Some(&identity)) {
            // rustls itself may refuse to build a client from a certificate and key that differ.
            Err(e) => format!("client refused to use it: {e}"),
            Ok(config) => refused(Client::with_tls(&sys.url(), config).unwrap()).await,
        };
        outcomes.push((name, outcome));
    }
    let expected = [
        ("expired", "alert: CertificateExpired"),
        ("future", "alert: CertificateExpired"),
        ("serveronly", "alert: UnsupportedCertificate"),
        ("caclient", "alert: CertificateUnknown"),
        ("selfsigned", "alert: UnknownCA"),
        ("revoked", "alert: CertificateRevoked"),
        ("mismatch", "KeyMismatch"),
    ];
    for ((name, outcome), (_, want)) in outcomes.iter().zip(expected) {
        assert!(outcome.contains(want), "{name}: want {want}, got {outcome}");
    }
    // Control: with the CRL in force, a client it does not revoke still gets in.
    let mut conn = sys.connect().await;
    assert_eq!(
        conn.request(gatehouse_client::Method::GET, "/healthz", &[], Vec::new()).await.unwrap().status,
        200
    );
    println!(
        "certificate grid: {}",
        outcomes
            .iter()
            .map(|(n, o)| format!("{n}: {}", o.rsplit(" <- ").next().unwrap_or(o)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    sys.stop().await;
}

/// Reads until the server closes; answers how long that took (or `None` past `limit`).
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: std::time::Duration,
) -> Option<std::time::Duration> {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => continue,
            }
        }
    })
    .await
    .ok()
}

#[tokio::test]
async fn slow_clients_are_closed_within_the_configured_timeouts() {
    use tokio::io::AsyncWriteExt;
    // The test system: handshake and header read timeouts of 2 s each.
    let sys = TestSystem::start().await;
    let limit = std::time::Duration::from_secs(4);

    // A TCP connection that never starts the TLS handshake.
    let mut idle = tokio::net::TcpStream::connect(sys.addr).await.unwrap();
    let idle_closed = closed_within(&mut idle, limit).await.expect("idle connection left open");

    // A client that completes mTLS, then trickles its request headers a byte at a time.
    let identity =
        Identity { cert: sys.certs.path().join("client.pem"), key: sys.certs.path().join("client.key") };
    let config = tls_config(&sys.certs.path().join("ca.pem"), Some(&identity)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(sys.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let start = std::time::Instant::now();
    let trickle = async {
        for b in
            b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a'))
        {
            if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
                return start.elapsed();
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        unreachable!()
    };
    let slow_closed = tokio::time::timeout(limit, trickle).await.expect("slow client left open");

    // A keep-alive connection that went quiet after one request.
    let tcp = tokio::net::TcpStream::connect(sys.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut quiet = connector.connect(name, tcp).await.unwrap();
    quiet.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let quiet_closed = closed_within(&mut quiet, std::time::Duration::from_secs(30))
        .await
        .expect("idle keep-alive left open");
    println!("idle keep-alive connection closed after {quiet_closed:?}");
    assert!(quiet_closed <= limit, "an idle keep-alive connection stayed open {quiet_closed:?}");
    println!(
        "slow clients: no handshake closed after {idle_closed:?}, trickled headers after {slow_closed:?}"
    );
    assert!(idle_closed >= std::time::Duration::from_millis(1500), "closed too early: {idle_closed:?}");
    sys.stop().await;
}

#[tokio::test]
async fn a_slow_body_gets_408_and_too_many_headers_get_431() {
    let sys = TestSystem::start().await;
    // Headers on time, then the body a byte every 250 ms: the request timeout (15 s here) ends it.
    let mut conn = sys.connect().await;
    let start = std::time::Instant::now();
    let headers = [("content-type", "application/json")];
    // 200 bytes at 250 ms: 50 s, far past the timeout.
    let pace = std::time::Duration::from_millis(250);
    let slow =
        conn.request_streamed(gatehouse_client::Method::POST, "/v1/jobs", &headers, vec![b' '], 200, pace);
    let res = tokio::time::timeout(std::time::Duration::from_secs(25), slow)
        .await
        .expect("a slow body was not cut off");
    match res {
        Ok(r) => {
            gatehouse_e2e::assert_problem(&r, 408, "request-timeout");
        }
        Err(e) => panic!("no 408: {e}"),
    }
    assert!(
        start.elapsed() >= std::time::Duration::from_secs(14),
        "cut off too early: {:?}",
        start.elapsed()
    );

    let mut conn = sys.connect().await;
    let names: Vec<String> = (0..100).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let res = conn.request(gatehouse_client::Method::GET, "/healthz", &many, Vec::new()).await.unwrap();
    assert_eq!(res.status, 431, "100 headers were accepted");
    sys.stop().await;
}

#[tokio::test]
async fn tls_below_1_2_is_refused() {
    // rustls implements nothing below TLS 1.2; check it from the outside with OpenSSL.
    let Ok(out) = std::process::Command::new("openssl").arg("version").output() else {
        eprintln!("openssl is not installed; not checked");
        return;
    };
    assert!(out.status.success());
    let sys = TestSystem::start().await;
    let dir = sys.certs.path();
    for version in ["-tls1_1", "-tls1"] {
        let out = tokio::process::Command::new("openssl")
            .args(["s_client", "-connect", &sys.addr.to_string(), version, "-cipher", "DEFAULT@SECLEVEL=0"])
            .arg("-cert")
            .arg(dir.join("client.pem"))
            .arg("-key")
            .arg(dir.join("client.key"))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{version} was accepted:\n{text}");
        assert!(
            text.contains("alert")
                || text.contains("no protocols available")
                || text.contains("unsupported protocol")
                || text.contains("wrong version"),
            "{version}: {text}"
        );
    }
    sys.stop().await;
}
