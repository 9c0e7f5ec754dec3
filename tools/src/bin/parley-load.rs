//! `parley-load`: the load generator. Its scenarios land with their own issue; until then
//! it says so instead of pretending to measure anything.

fn main() -> std::process::ExitCode {
    eprintln!("parley-load: not built yet: the load generator lands with its own issue");
    std::process::ExitCode::from(2)
}
