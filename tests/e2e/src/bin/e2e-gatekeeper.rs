//! The gatekeeper binary, built with the test crate so that tests can run it as a real process
//! (on a test host of its own) through `CARGO_BIN_EXE_e2e-gatekeeper`.

fn main() -> std::process::ExitCode {
    gatehouse_gatekeeper::process::main()
}
