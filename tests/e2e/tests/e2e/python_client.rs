//! The Python client (`clients/python`) against a real system: its own tests
//! (`clients/python/tests`, the standard library's unittest), installed into the tests' virtual
//! environment as a user would (`pip install ./clients/python`), over real mTLS.

use std::process::Command;

use gatehouse_e2e::{OTHER_CLIENT, Options, TestSystem};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_clients_tests_pass_against_a_running_system() {
    // (Test kinds on: its workflow test sleeps.)
    let sys = TestSystem::start_with(Options { testing: true, ..Default::default() }).await;
    let python = tokio::task::spawn_blocking(gatehouse_e2e::python_with_client).await.unwrap();
    let certs = sys.certs.path();
    let tests = gatehouse_e2e::repo_root().join("clients/python/tests");
    let mut run = Command::new(python);
    run.args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(&tests)
        // The installed package, not the sources beside the tests.
        .current_dir(std::env::temp_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("GATEHOUSE_URL", sys.url())
        .env("GATEHOUSE_CA", certs.join("ca.pem"))
        .env("GATEHOUSE_CERT", certs.join("client.pem"))
        .env("GATEHOUSE_KEY", certs.join("client.key"))
        .env("GATEHOUSE_OTHER_CERT", certs.join(format!("{OTHER_CLIENT}.pem")))
        .env("GATEHOUSE_OTHER_KEY", certs.join(format!("{OTHER_CLIENT}.key")))
        .env("GATEHOUSE_OPERATOR_KEY", certs.join("operator-signing.pub"))
        .env("GATEHOUSE_CATALOG", sys.catalog_path());
    let out = tokio::task::spawn_blocking(move || run.output()).await.unwrap().expect("python runs");
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the Python client's tests failed:\n{report}");
    assert!(report.contains("Ran 12 tests"), "not every test ran:\n{report}");
    sys.stop().await;
}
