//! `parley-wal`: WAL inspection. It lands with the WAL itself; until then it says so.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    eprintln!("parley-wal: not built yet: the WAL and its tool land with their own issue");
    std::process::ExitCode::from(2)
}
