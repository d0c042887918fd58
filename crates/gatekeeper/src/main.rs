//! `gatekeeper [CONFIG]` — see [`gatehouse_gatekeeper::process::main`].

fn main() -> std::process::ExitCode {
    gatehouse_gatekeeper::process::main()
}
