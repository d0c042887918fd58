//! The worker binary, built with the test crate so that fault tests can run it as a real
//! process (and kill it) through `CARGO_BIN_EXE_e2e-worker`.

fn main() -> std::process::ExitCode {
    gatehouse_worker::process::main()
}
