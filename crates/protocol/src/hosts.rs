//! Which `Host` an admin listener answers (plain HTTP, no TLS): a page in a browser on the
//! operator's machine could otherwise read it through a name of its own that resolves to
//! 127.0.0.1 (DNS rebinding). IP addresses and `localhost` are never such names; other names
//! must be listed (`[admin] allowed_hosts`, e.g. the service name a Prometheus scrapes).

use std::net::IpAddr;

/// Whether a request with `Host: host` may be answered. No `Host` (HTTP/1.0 tools): yes — a
/// browser always sends one.
pub fn admin_host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(host) = host else { return true };
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => {
            host.rsplit_once(':').map_or(host, |(n, port)| if port.parse::<u16>().is_ok() { n } else { host })
        }
    };
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name) || a.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::admin_host_allowed;

    #[test]
    fn addresses_and_localhost_pass_other_names_only_when_listed() {
        let listed = vec!["worker".to_owned()];
        for ok in [
            None,
            Some("127.0.0.1:9102"),
            Some("[::1]:9102"),
            Some("localhost:9102"),
            Some("10.0.0.7"),
            Some("worker:9102"),
        ] {
            assert!(admin_host_allowed(ok, &listed), "{ok:?}");
        }
        for refused in
            [Some("attacker.example:9102"), Some("rebind.127.0.0.1.nip.io"), Some("workers:9102"), Some("")]
        {
            assert!(!admin_host_allowed(refused, &listed), "{refused:?}");
        }
    }
}
