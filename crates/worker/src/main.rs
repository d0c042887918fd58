//! `worker [CONFIG]` — see [`gatehouse_worker::process::main`].

fn main() -> std::process::ExitCode {
    gatehouse_worker::process::main()
}
