//! `parleyd`, the Parley gateway daemon.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    parley_gateway::daemon::main()
}
