//! `gatekeeper [CONFIG]` — see [`gatehouse_gatekeeper::process::main`].

/// jemalloc rather than glibc's malloc: after bursts of load and of connections, glibc kept what
/// was freed in its per-thread arenas (1,000 idle mTLS connections: 47 MiB resident in a fresh
/// process, 66–79 MiB after two or three benchmark runs, 26 MiB once trimmed by hand); with
/// jemalloc it stays at 52–53 MiB run after run.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    gatehouse_gatekeeper::process::main()
}
