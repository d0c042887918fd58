//! Development PKI: two CAs — one for the API (the gatekeeper's server certificate and client
//! certificates), one for the components' links (the broker's TLS listener and the
//! gatekeeper's and worker's AMQP client certificates, and PostgreSQL's TLS certificate) — the
//! gatekeeper's job-id secret and PostgreSQL's password. Separate CAs keep the two worlds apart: a component's broker certificate is no API
//! client, and an API client certificate does not pass the broker's `verify_peer`. For local
//! use and tests only.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::Context as _;
use gatehouse_protocol::{hex, keys};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Identity of the client certificate that `certs dev` writes (allowed everything by the
/// shipped dev policy).
pub const DEV_CLIENT: &str = "dev-client";

/// Writes `ca.pem`, `ca.key` (the API CA), `server.pem`, `server.key`, `client.pem`,
/// `client.key`, `components-ca.pem` / `.key` (the CA of the broker link), `broker.pem` /
/// `broker.key` (for a broker's TLS listener), `gatekeeper-amqp.pem` /
/// `worker-amqp.pem` (+ keys, for the components' amqps link), `gatekeeper-ids.secret`, and the
/// signing, sealing and data keys of gatekeeper and worker (see `gatehouse_protocol::keys`)
/// into `dir`.
///
/// # Errors
/// When a file cannot be written or a certificate cannot be made.
pub fn write_dev(dir: &Path) -> anyhow::Result<()> {
    write_dev_for(dir, &[])
}

/// [`write_dev`], the gatekeeper's certificate valid for `addresses` too (a test host's).
///
/// # Errors
/// As [`write_dev`].
pub fn write_dev_for(dir: &Path, addresses: &[IpAddr]) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let issuer = write_ca(dir, "ca", "Gatehouse dev API CA")?;

    let mut server = CertificateParams::new(Vec::new())?;
    server.distinguished_name.push(DnType::CommonName, "localhost");
    server.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    server.subject_alt_names.extend(addresses.iter().map(|a| SanType::IpAddress(*a)));
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    let server_key = KeyPair::generate()?;
    write(dir, "server.pem", &server.signed_by(&server_key, &issuer)?.pem(), false)?;
    write(dir, "server.key", &server_key.serialize_pem(), true)?;

    write_client_with(dir, "client", DEV_CLIENT, &issuer)?;

    // The broker's TLS listener (docker-compose names it `rabbitmq`) and the two components'
    // client certificates for the link to it, under their own CA.
    let issuer = write_ca(dir, "components-ca", "Gatehouse dev components CA")?;
    let mut broker = CertificateParams::new(Vec::new())?;
    broker.distinguished_name.push(DnType::CommonName, "rabbitmq");
    broker.subject_alt_names =
        vec![SanType::DnsName("rabbitmq".try_into()?), SanType::DnsName("localhost".try_into()?)];
    broker.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    broker.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let broker_key = KeyPair::generate()?;
    write(dir, "broker.pem", &broker.signed_by(&broker_key, &issuer)?.pem(), false)?;
    write(dir, "broker.key", &broker_key.serialize_pem(), true)?;
    write_client_with(dir, "gatekeeper-amqp", "gatekeeper", &issuer)?;
    write_client_with(dir, "worker-amqp", "worker", &issuer)?;
    // PostgreSQL's TLS certificate (docker-compose names it `postgres`; the tests' private
    // server is 127.0.0.1), under the same CA, and its password for the worker.
    let mut postgres = CertificateParams::new(Vec::new())?;
    postgres.distinguished_name.push(DnType::CommonName, "postgres");
    postgres.subject_alt_names = vec![
        SanType::DnsName("postgres".try_into()?),
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ];
    postgres.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    postgres.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let postgres_key = KeyPair::generate()?;
    write(dir, "postgres.pem", &postgres.signed_by(&postgres_key, &issuer)?.pem(), false)?;
    write(dir, "postgres.key", &postgres_key.serialize_pem(), true)?;

    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    write(dir, "gatekeeper-ids.secret", &(hex::encode(&secret) + "\n"), true)?;
    let mut password = [0u8; 18];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut password)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    write(dir, "postgres.password", &(hex::encode(&password) + "\n"), true)?;
    keys::write_dev(dir)?;
    Ok(())
}

/// A new CA written as `NAME.pem` / `NAME.key`.
fn write_ca(dir: &Path, name: &str, common_name: &str) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let mut ca = CertificateParams::new(Vec::new())?;
    ca.distinguished_name.push(DnType::CommonName, common_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write(dir, &format!("{name}.pem"), &ca_cert.pem(), false)?;
    write(dir, &format!("{name}.key"), &ca_key.serialize_pem(), true)?;
    Ok(Issuer::new(ca, ca_key))
}

/// Writes `NAME.pem` / `NAME.key`, a client certificate with identity `NAME`, signed by the CA
/// in `dir`.
///
/// # Errors
/// When the CA files are missing or a file cannot be written.
pub fn write_client(dir: &Path, name: &str) -> anyhow::Result<()> {
    let ca_pem =
        fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem (run `gatehouse certs dev` first)")?;
    let ca_key = KeyPair::from_pem(&fs::read_to_string(dir.join("ca.key")).context("reading ca.key")?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    write_client_with(dir, name, name, &issuer)
}

fn write_client_with(
    dir: &Path,
    file: &str,
    identity: &str,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !identity.is_empty() && identity.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "a client name is letters, digits, '-', '_' and '.'"
    );
    let mut params = CertificateParams::new(Vec::new())?;
    params.distinguished_name.push(DnType::CommonName, identity);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    write(dir, &format!("{file}.pem"), &params.signed_by(&key, issuer)?.pem(), false)?;
    write(dir, &format!("{file}.key"), &key.serialize_pem(), true)?;
    Ok(())
}

fn write(dir: &Path, name: &str, contents: &str, private: bool) -> anyhow::Result<()> {
    Ok(keys::write_file(&dir.join(name), contents, private)?)
}
