//! `docker-compose.yml` is valid, the gatekeeper is on no network with storage, PostgreSQL on
//! the storage network only, and gatekeepers and workers run two each.

use std::process::Command;

use gatehouse_e2e::repo_root;

/// The networks of `service` in `docker-compose config` output (normalized YAML).
fn networks_of(config: &str, service: &str) -> Vec<String> {
    let mut in_services = false;
    let mut in_service = false;
    let mut in_networks = false;
    let mut found = Vec::new();
    for line in config.lines() {
        let indent = line.len() - line.trim_start().len();
        let key = line.trim().trim_end_matches(':');
        if indent == 0 {
            in_services = key == "services";
            in_service = false;
            continue;
        }
        if in_services && indent == 2 {
            in_service = key == service;
            in_networks = false;
            continue;
        }
        if in_service && indent == 4 {
            in_networks = key == "networks";
            continue;
        }
        if in_networks && indent == 6 {
            let name = key.trim_start_matches("- ").split(':').next().unwrap_or_default();
            found.push(name.trim().to_owned());
        }
    }
    found
}

/// The lines of `service`'s block in `docker-compose config` output.
fn block_of<'a>(config: &'a str, service: &str) -> Vec<&'a str> {
    let mut lines = config.lines().skip_while(|l| l.trim_end() != format!("  {service}:"));
    lines.next();
    lines.take_while(|l| l.starts_with("    ") || l.trim().is_empty()).collect()
}

#[test]
fn compose_file_is_valid_and_keeps_the_gatekeeper_off_storage() {
    let file = repo_root().join("docker-compose.yml");
    let out = match Command::new("docker-compose").arg("-f").arg(&file).arg("config").output() {
        Ok(out) => out,
        Err(_) => {
            eprintln!("docker-compose is not installed (apt-get install docker-compose); not checked");
            return;
        }
    };
    assert!(out.status.success(), "docker-compose config failed: {}", String::from_utf8_lossy(&out.stderr));
    let config = String::from_utf8_lossy(&out.stdout);
    let gatekeeper = networks_of(&config, "gatekeeper");
    let worker = networks_of(&config, "worker");
    assert!(gatekeeper.contains(&"broker".to_owned()), "gatekeeper networks: {gatekeeper:?}");
    assert!(!gatekeeper.contains(&"storage".to_owned()), "gatekeeper is on the storage network");
    assert!(worker.contains(&"storage".to_owned()) && worker.contains(&"broker".to_owned()), "{worker:?}");
    assert_eq!(networks_of(&config, "postgres"), ["storage"], "postgres is on another network too");
    for service in ["gatekeeper", "worker"] {
        let block = block_of(&config, service);
        assert!(block.iter().any(|l| l.trim() == "replicas: 2"), "{service} does not run twice: {block:?}");
    }
    let worker = block_of(&config, "worker").join("\n");
    assert!(worker.contains("WORKER__STORAGE__URL: postgres://"), "{worker}");
    assert!(worker.contains("WORKER__STORAGE__TLS_CA"), "the workers reach PostgreSQL without TLS: {worker}");
    // Executable kinds' sandboxes need no capability: none is kept, none can be gained.
    for needed in ["cap_drop:\n    - ALL", "no-new-privileges:true", "read_only: true"] {
        assert!(worker.contains(needed), "the worker container lacks {needed:?}: {worker}");
    }
    assert!(!worker.contains("cap_add") && !worker.contains("privileged: true"), "{worker}");
}
