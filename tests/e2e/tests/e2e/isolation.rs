//! The gatekeeper cannot reach storage: not even transitively does it depend on the storage
//! crate, the worker crate, or a database driver (SPEC §1), read from `cargo metadata`.

use std::collections::{HashMap, HashSet};
use std::process::Command;

use gatehouse_e2e::repo_root;
use serde_json::Value;

const FORBIDDEN: &[&str] = &[
    "gatehouse-storage",
    "gatehouse-worker",
    "rusqlite",
    "libsqlite3-sys",
    "sqlx",
    "postgres",
    "tokio-postgres",
];

/// Names of every package `root` depends on (normal and build dependencies, transitively).
fn reachable(root: &str) -> HashSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(repo_root().join("Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, &Value> =
        meta["resolve"]["nodes"].as_array().unwrap().iter().map(|n| (n["id"].as_str().unwrap(), n)).collect();
    let start = names.iter().find(|(_, n)| **n == root).map(|(id, _)| *id).expect("root package");
    let mut seen = HashSet::new();
    let mut todo = vec![start];
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let runtime =
                dep["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].as_str() != Some("dev"));
            if runtime {
                todo.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    seen.iter().map(|id| names[id].to_owned()).collect()
}

#[test]
fn the_gatekeeper_does_not_depend_on_storage() {
    let deps = reachable("gatehouse-gatekeeper");
    let found: Vec<_> = FORBIDDEN.iter().filter(|f| deps.contains(**f)).collect();
    assert!(found.is_empty(), "the gatekeeper depends on {found:?}");
    // Control: the walk does see storage where it is.
    assert!(reachable("gatehouse-worker").contains("rusqlite"));
}
