//! `parley-load`: the capacity planner's load generator.
//!
//! This build has one scenario, `idle`: ramp up authenticated WebSocket sessions at a
//! target rate, ping each one to prove it is live, and report the target's memory per
//! session. The other scenarios (chat, group, reconnect storms, mixed) land with the
//! load-generator issue.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use parley_tools::{load_secret, mint_token};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest wait for any one handshake or reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(name = "parley-load", version, about = "Parley load generator")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Ramp up N idle authenticated sessions, ping each, and report memory per session.
    Idle {
        /// Sessions to open.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Target connections per second during the ramp.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// WebSocket address of parleyd.
        #[arg(long, default_value = "127.0.0.1:7070")]
        target: SocketAddr,
        /// Spread client sockets over this many source addresses 127.0.0.1, .2, ...
        /// (past one address's ephemeral ports).
        #[arg(long, default_value_t = 1)]
        sources: u8,
        /// PID of the target, to read its memory from /proc (when it runs locally).
        #[arg(long)]
        pid: Option<u32>,
        /// How long to hold the sessions open after the ramp.
        #[arg(long, default_value = "0s", value_parser = parley_tools::parse_duration)]
        hold: Duration,
        #[arg(long, env = "PARLEY_JWT_SECRET", hide_env_values = true)]
        secret: Option<String>,
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let Cli { scenario } = Cli::parse();
    match scenario {
        Scenario::Idle {
            connections,
            rate,
            target,
            sources,
            pid,
            hold,
            secret,
            data_dir,
            json,
        } => match load_secret(secret.as_deref(), data_dir.as_deref()).and_then(|secret| {
            idle(IdleRun {
                connections,
                rate,
                target,
                sources: sources.max(1),
                pid,
                hold,
                secret,
                json,
            })
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("parley-load: error: {error}");
                ExitCode::from(1)
            }
        },
    }
}

struct IdleRun {
    connections: usize,
    rate: f64,
    target: SocketAddr,
    sources: u8,
    pid: Option<u32>,
    hold: Duration,
    secret: String,
    json: bool,
}

/// Resident and anonymous memory of a process, in KiB, from /proc/PID/status.
fn memory_kib(pid: u32) -> Result<(u64, u64), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|error| format!("/proc/{pid}/status: {error}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .ok_or_else(|| format!("/proc/{pid}/status has no {name}"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

fn open_session(
    target: SocketAddr,
    source: Ipv4Addr,
    token: &str,
) -> Result<WebSocket<TcpStream>, String> {
    let domain = socket2::Domain::IPV4;
    let socket =
        socket2::Socket::new(domain, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
    socket
        .bind(&SocketAddr::new(IpAddr::V4(source), 0).into())
        .map_err(|error| format!("bind {source}: {error}"))?;
    socket
        .connect_timeout(&target.into(), IO_TIMEOUT)
        .map_err(|error| format!("connect {target}: {error}"))?;
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut request = format!("ws://{target}/v1/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| "bad token header")?;
    request.headers_mut().insert("authorization", bearer);
    let (ws, _) =
        tungstenite::client(request, stream).map_err(|error| format!("upgrade: {error}"))?;
    Ok(ws)
}

fn ping(ws: &mut WebSocket<TcpStream>) -> Result<Duration, String> {
    let started = Instant::now();
    ws.send(Message::text(r#"{"id":1,"op":"ping"}"#))
        .map_err(|e| e.to_string())?;
    loop {
        match ws.read().map_err(|e| e.to_string())? {
            Message::Text(text) if text.contains(r#""re":1"#) => return Ok(started.elapsed()),
            Message::Text(text) => return Err(format!("unexpected reply {text}")),
            Message::Close(frame) => return Err(format!("closed: {frame:?}")),
            _ => {}
        }
    }
}

fn idle(run: IdleRun) -> Result<(), String> {
    let before = run.pid.map(memory_kib).transpose()?;
    let interval = Duration::from_secs_f64(1.0 / run.rate.max(0.001));
    let started = Instant::now();
    let mut sessions = Vec::with_capacity(run.connections);
    let mut last_progress = Instant::now();
    for i in 0..run.connections {
        // Open-loop ramp: connection i is due at i * interval from the start.
        let due = started + interval.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let source = Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(run.sources)) as u8);
        let token = mint_token(
            &run.secret,
            &format!("load-{i}"),
            None,
            Duration::from_secs(86_400),
        );
        sessions.push(
            open_session(run.target, source, &token).map_err(|e| format!("session {i}: {e}"))?,
        );
        if last_progress.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "parley-load: idle: {}/{} sessions, {:.0}/s",
                i + 1,
                run.connections,
                (i + 1) as f64 / started.elapsed().as_secs_f64()
            );
            last_progress = Instant::now();
        }
    }
    let ramp = started.elapsed();
    let mut rtts = Vec::with_capacity(sessions.len());
    for (i, ws) in sessions.iter_mut().enumerate() {
        rtts.push(ping(ws).map_err(|e| format!("ping on session {i}: {e}"))?);
    }
    rtts.sort();
    std::thread::sleep(run.hold);
    let after = run.pid.map(memory_kib).transpose()?;
    let percentile = |p: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * p) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let n = sessions.len() as f64;
    let per_session = |pick: fn(&(u64, u64)) -> u64| match (&before, &after) {
        (Some(b), Some(a)) => Some((pick(a) as f64 - pick(b) as f64) * 1024.0 / n),
        _ => None,
    };
    let rss_per = per_session(|m| m.0);
    let anon_per = per_session(|m| m.1);
    if run.json {
        println!(
            "{}",
            serde_json::json!({
                "scenario": "idle", "sessions": sessions.len(), "ramp_s": ramp.as_secs_f64(),
                "connect_rate": n / ramp.as_secs_f64(),
                "ping_us": {"p50": percentile(0.5), "p99": percentile(0.99), "max": percentile(1.0)},
                "rss_kib_before": before.map(|m| m.0), "rss_kib_after": after.map(|m| m.0),
                "rss_bytes_per_session": rss_per, "anon_bytes_per_session": anon_per,
            })
        );
    } else {
        println!("scenario        idle");
        println!(
            "sessions        {} (each authenticated and answered one ping)",
            sessions.len()
        );
        println!(
            "ramp            {:.2} s ({:.0} sessions/s)",
            ramp.as_secs_f64(),
            n / ramp.as_secs_f64()
        );
        println!(
            "ping (µs)       p50 {:.0}  p99 {:.0}  max {:.0} (sequential, one in flight)",
            percentile(0.5),
            percentile(0.99),
            percentile(1.0)
        );
        if let (Some(b), Some(a), Some(rss), Some(anon)) = (before, after, rss_per, anon_per) {
            println!("target RSS      {} KiB -> {} KiB", b.0, a.0);
            println!("per session     {rss:.0} B RSS, {anon:.0} B anonymous");
        }
    }
    Ok(())
}
