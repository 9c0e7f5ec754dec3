//! `parley-load`: the capacity planner's load generator.
//!
//! Scenarios: `idle`, `chat-1to1`, `group`, `reconnect-storm` and `mixed`, over
//! WebSocket. Load is open-loop: every send has a scheduled time and its latency is
//! counted from then, so a stall shows up instead of slowing the generator down. The
//! engine is in `parley_tools::load`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use parley_tools::load::report::Report;
use parley_tools::load::run::{self, Options};
use parley_tools::load::scenario::{Churn, EngineChoice, Kind, Mix, Plan, Protocol, Storm};
use parley_tools::{load_secret, parse_duration};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "parley-load", version, about = "Parley load generator")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Ramp up N authenticated sessions, ping each once, hold them; report the target's
    /// memory per session (--pid) and ping latency.
    Idle {
        #[command(flatten)]
        common: Common,
        /// How long to hold the sessions after the ping round.
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        hold: Duration,
    },
    /// Pairs of users in direct conversations, both sending at an open-loop rate.
    #[command(name = "chat-1to1")]
    OneToOne {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        send: SendArgs,
    },
    /// Groups of --group-size members; the first --senders of each send.
    Group {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        send: SendArgs,
        /// Members per group.
        #[arg(long, default_value_t = 100)]
        group_size: u32,
        /// Senders per group.
        #[arg(long, default_value_t = 1)]
        senders: u32,
    },
    /// Pairs chatting; at --storm-at, --drop percent of the sessions vanish at once and
    /// reconnect after a jittered delay, resuming; checks nothing was missed.
    ReconnectStorm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        send: SendArgs,
        /// Percent of sessions dropped.
        #[arg(long, default_value_t = 100.0)]
        drop: f64,
        /// When the storm hits, after sending starts.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        storm_at: Duration,
        /// Each dropped session reconnects after a uniform random delay up to this.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        jitter: Duration,
    },
    /// Pairs doing sends, acks, reads, typing and history pages at --mix ratios;
    /// --rate counts operations. With --churn, misbehaving sessions beside them, each
    /// checked against what the protocol says the server does with it.
    Mixed {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        send: SendArgs,
        /// Weights of the operations.
        #[arg(long, default_value = "send=50,ack=20,read=15,typing=10,history=5", value_parser = parse_mix)]
        mix: Mix,
        #[command(flatten)]
        churn: ChurnArgs,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Address of parleyd: its WebSocket listener, or with --quic its QUIC listener.
    #[arg(long, default_value = "127.0.0.1:7070")]
    target: SocketAddr,
    /// `parley` (WebSocket), `quic` (Parley over QUIC), or `nats` for the peer comparison
    /// against nats-server's WebSocket listener (core NATS: no acknowledgements, no
    /// persistence; idle and chat-1to1).
    #[arg(long, default_value = "parley", value_parser = parse_protocol)]
    protocol: Protocol,
    /// Speak QUIC to --target (the same as --protocol quic). The certificate is not
    /// verified: this is a measuring tool for loopback and lab networks.
    #[arg(long)]
    quic: bool,
    /// Sessions to open (each a distinct user).
    #[arg(long, default_value_t = 1000)]
    connections: u32,
    /// Connections opened per second during setup (open-loop).
    #[arg(long, default_value_t = 5000.0)]
    connect_rate: f64,
    /// Spread client sockets over source addresses 127.0.0.1 .. 127.0.0.N, past one
    /// address's ephemeral ports.
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// Client socket engine: `uring` (io_uring with direct descriptors: no file descriptor
    /// per session, so past `ulimit -n`; the idle scenario over Parley WebSocket only),
    /// `epoll` (every scenario), or `auto` (uring where it serves and the kernel has it).
    #[arg(long, default_value = "auto", value_parser = parse_engine)]
    engine: EngineChoice,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Do not pin worker threads to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Sending before measuring starts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Measured window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Longest wait for all sessions to be set up.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    setup_timeout: Duration,
    /// Longest wait after the last send for every answer and delivery.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// PID of the target, to read its memory and CPU from /proc (when it runs locally).
    #[arg(long)]
    pid: Option<u32>,
    /// Prefix of the user ids (default: unique per run).
    #[arg(long)]
    tag: Option<String>,
    #[arg(long, env = "PARLEY_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Data directory of the parleyd, to read its JWT secret.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write a self-contained HTML report here.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Clone)]
struct ChurnArgs {
    /// Churn, each kind once per --churn-every: reconnect=PERCENT of the chat sessions
    /// dropped and resumed (a different subset each period), slow=N chat sessions that
    /// stop reading (4009, then resume), and sessions of their own: flood=N (rate_limited,
    /// then 4008), garbage=N (malformed input: its error, or its close code) and
    /// half-open=N (cut mid-upgrade, or silent after it: dropped by the server's auth and
    /// idle timeouts). For example reconnect=5,slow=4,flood=2,garbage=4,half-open=4. The
    /// expectations assume the server's default frame, rate and abuse limits.
    #[arg(long, value_parser = parse_churn)]
    churn: Option<Churn>,
    /// The churn's period.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    churn_every: Duration,
    /// Each session a churn storm drops reconnects after a uniform random delay up to this.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    reconnect_jitter: Duration,
    /// How long a slow reader stops reading (keep it under the server's idle timeout).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    slow_for: Duration,
    /// Longest a churn session waits for the server's answer (a half-open one: for the
    /// server's auth or idle timeout) before the run counts a violation.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    churn_wait: Duration,
}

#[derive(Args, Clone)]
struct SendArgs {
    /// Total scheduled sends (mixed: operations) per second, over all senders.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Unanswered commands per session at most; later ones wait (their latency counts).
    #[arg(long, default_value_t = 256)]
    max_inflight: usize,
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    match text {
        "parley" => Ok(Protocol::Parley),
        "nats" => Ok(Protocol::Nats),
        "quic" => Ok(Protocol::Quic),
        _ => Err(format!("{text:?}: use parley, quic or nats")),
    }
}

fn parse_engine(text: &str) -> Result<EngineChoice, String> {
    match text {
        "auto" => Ok(EngineChoice::Auto),
        "uring" => Ok(EngineChoice::Uring),
        "epoll" => Ok(EngineChoice::Epoll),
        _ => Err(format!("{text:?}: use auto, uring or epoll")),
    }
}

fn parse_mix(text: &str) -> Result<Mix, String> {
    let mut mix = Mix {
        send: 0,
        ack: 0,
        read: 0,
        typing: 0,
        history: 0,
    };
    for part in text.split(',') {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not op=weight"))?;
        let weight: u32 = weight
            .parse()
            .map_err(|_| format!("{weight:?} is not a whole number"))?;
        match name.trim() {
            "send" => mix.send = weight,
            "ack" => mix.ack = weight,
            "read" => mix.read = weight,
            "typing" => mix.typing = weight,
            "history" => mix.history = weight,
            other => {
                return Err(format!(
                    "unknown op {other:?} (send, ack, read, typing, history)"
                ))
            }
        }
    }
    Ok(mix)
}

fn parse_churn(text: &str) -> Result<Churn, String> {
    let mut churn = Churn::default();
    for part in text.split(',') {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not kind=number"))?;
        let number = |value: &str| {
            value
                .parse::<u32>()
                .map_err(|_| format!("{value:?} is not a whole number"))
        };
        match name.trim() {
            "reconnect" => {
                let percent: f64 = value
                    .parse()
                    .map_err(|_| format!("{value:?} is not a percentage"))?;
                churn.reconnect = percent / 100.0;
            }
            "slow" => churn.slow_readers = number(value)?,
            "flood" => churn.floods = number(value)?,
            "garbage" => churn.garbage = number(value)?,
            "half-open" => churn.half_open = number(value)?,
            other => {
                return Err(format!(
                    "unknown churn {other:?} (reconnect, slow, flood, garbage, half-open)"
                ))
            }
        }
    }
    Ok(churn)
}

fn main() -> ExitCode {
    let params: BTreeMap<String, String> = command_line();
    let Cli { scenario } = Cli::parse();
    match execute(scenario, params) {
        Ok(report) => exit_code(&report),
        Err(error) => {
            eprintln!("parley-load: error: {error}");
            ExitCode::from(1)
        }
    }
}

/// 128 + the signal for a run a signal stopped (as a shell reports it), 1 for one a
/// failure stopped, 2 for a run whose verification failed, else 0. The report is written
/// in every case.
fn exit_code(report: &Report) -> ExitCode {
    match report.stop.reason.as_str() {
        "signal" => {
            let signal = match report.stop.detail.starts_with("SIGINT") {
                true => libc::SIGINT,
                false => libc::SIGTERM,
            };
            ExitCode::from(128 + signal as u8)
        }
        "worker_failed" | "error" => ExitCode::from(1),
        _ if report.verification.checked && !report.verification.ok => ExitCode::from(2),
        _ => ExitCode::SUCCESS,
    }
}

/// The command line as `--name value` pairs, for the report.
fn command_line() -> BTreeMap<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut params = BTreeMap::new();
    if let Some(scenario) = args.first() {
        params.insert("scenario".into(), scenario.clone());
    }
    let mut i = 1;
    while i < args.len() {
        let name = args[i].trim_start_matches('-').to_string();
        let value = match args.get(i + 1) {
            Some(next) if !next.starts_with("--") => {
                i += 1;
                next.clone()
            }
            _ => "true".into(),
        };
        if name != "secret" {
            params.insert(name, value);
        }
        i += 1;
    }
    params
}

fn execute(scenario: Scenario, params: BTreeMap<String, String>) -> Result<Report, String> {
    let default_send = SendArgs {
        rate: 0.0,
        size: 100,
        max_inflight: 256,
    };
    let mut churn = None;
    let (kind, common, send, hold, group_size, senders, storm, mix) = match scenario {
        Scenario::Idle { common, hold } => {
            (Kind::Idle, common, default_send, hold, 2, 1, None, None)
        }
        Scenario::OneToOne { common, send } => (
            Kind::OneToOne,
            common,
            send,
            Duration::ZERO,
            2,
            1,
            None,
            None,
        ),
        Scenario::Group {
            common,
            send,
            group_size,
            senders,
        } => (
            Kind::Group,
            common,
            send,
            Duration::ZERO,
            group_size,
            senders,
            None,
            None,
        ),
        Scenario::ReconnectStorm {
            common,
            send,
            drop,
            storm_at,
            jitter,
        } => {
            let storm = Storm {
                fraction: (drop / 100.0).clamp(0.0, 1.0),
                at_ns: storm_at.as_nanos() as u64,
                jitter_ns: jitter.as_nanos() as u64,
            };
            (
                Kind::ReconnectStorm,
                common,
                send,
                Duration::ZERO,
                2,
                1,
                Some(storm),
                None,
            )
        }
        Scenario::Mixed {
            common,
            send,
            mix,
            churn: args,
        } => {
            churn = args.churn.map(|counts| Churn {
                reconnect_jitter_ns: args.reconnect_jitter.as_nanos() as u64,
                slow_for_ns: args.slow_for.as_nanos() as u64,
                every_ns: args.churn_every.as_nanos() as u64,
                wait_ns: args.churn_wait.as_nanos() as u64,
                ..counts
            });
            (
                Kind::Mixed,
                common,
                send,
                Duration::ZERO,
                2,
                1,
                None,
                Some(mix),
            )
        }
    };
    let protocol = if common.quic {
        Protocol::Quic
    } else {
        common.protocol
    };
    let secret = match protocol {
        // NATS runs without authentication; no token is minted.
        Protocol::Nats => String::new(),
        Protocol::Parley | Protocol::Quic => {
            load_secret(common.secret.as_deref(), common.data_dir.as_deref())?
        }
    };
    let tag = common.tag.clone().unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("load{:x}", nanos % (1 << 40))
    });
    let plan = Plan {
        kind,
        protocol,
        tag,
        clients: common.connections,
        target: common.target,
        sources: common.sources,
        connect_rate: common.connect_rate,
        message_size: send.size,
        rate: send.rate,
        max_inflight: send.max_inflight.max(1),
        group_size,
        senders_per_group: senders,
        mix: mix.unwrap_or(Mix {
            send: 1,
            ack: 0,
            read: 0,
            typing: 0,
            history: 0,
        }),
        storm,
        churn,
        secret,
    };
    let workers = common
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let report = run::run(Options {
        plan,
        workers,
        pin: !common.no_pin,
        warmup: common.warmup,
        duration: common.duration,
        setup_timeout: common.setup_timeout,
        drain_timeout: common.drain_timeout,
        hold,
        pid: common.pid,
        params,
        progress: !common.quiet,
        engine: common.engine,
    })?;
    if common.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &common.report {
        std::fs::write(path, parley_tools::load::html::render(&report))
            .map_err(|error| format!("{}: {error}", path.display()))?;
        eprintln!("parley-load: report written to {}", path.display());
    }
    Ok(report)
}
