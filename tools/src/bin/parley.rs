//! `parley`: mint tokens and talk to a running parleyd.

use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use parley_tools::{line_to_command, load_secret, mint_token, parse_duration};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often `connect` looks at typed lines while waiting for events.
const INPUT_POLL: Duration = Duration::from_millis(50);

#[derive(Parser)]
#[command(name = "parley", version, about = "Parley command-line client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct SecretArgs {
    /// HS256 secret (as parleyd's --jwt-secret).
    #[arg(long, env = "PARLEY_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Data directory of the parleyd whose generated secret to use.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a client token (JWT HS256).
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: Option<String>,
        /// Lifetime: 90s, 15m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Open a session, print events as they arrive, and send each typed line as a command:
    /// JSON (`{"op":"ping"}`) or shorthand (`ping`, `send conv=c1 cmid=m1 body=hi`).
    Connect {
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: Option<String>,
        /// WebSocket URL of parleyd.
        #[arg(long, default_value = "ws://127.0.0.1:7070/v1/ws")]
        url: String,
        /// Use this token instead of minting one.
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("parley: error: {error}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Token {
            user,
            device,
            ttl,
            secret,
        } => {
            let secret = load_secret(secret.secret.as_deref(), secret.data_dir.as_deref())?;
            println!("{}", mint_token(&secret, &user, device.as_deref(), ttl));
            Ok(ExitCode::SUCCESS)
        }
        Command::Connect {
            user,
            device,
            url,
            token,
            secret,
        } => {
            let token = match token {
                Some(token) => token,
                None => {
                    let secret = load_secret(secret.secret.as_deref(), secret.data_dir.as_deref())?;
                    mint_token(
                        &secret,
                        &user,
                        device.as_deref(),
                        Duration::from_secs(86_400),
                    )
                }
            };
            connect(&url, &token, device.as_deref())
        }
    }
}

fn connect(url: &str, token: &str, device: Option<&str>) -> Result<ExitCode, String> {
    let mut request = url
        .into_client_request()
        .map_err(|error| format!("{url}: {error}"))?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| "token is not a valid header value")?;
    request.headers_mut().insert("authorization", bearer);
    let host = request.uri().host().unwrap_or("127.0.0.1").to_string();
    let port = request.uri().port_u16().unwrap_or(80);
    let stream =
        TcpStream::connect((host.as_str(), port)).map_err(|error| format!("{url}: {error}"))?;
    let (mut ws, _) =
        tungstenite::client(request, stream).map_err(|error| format!("{url}: {error}"))?;
    ws.get_mut()
        .set_read_timeout(Some(INPUT_POLL))
        .map_err(|error| error.to_string())?;

    let mut next_id = 1u64;
    let hello = serde_json::json!({"id": next_id, "op": "hello", "device": device});
    next_id += 1;
    send(&mut ws, hello.to_string())?;

    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stdout = std::io::stdout();
    loop {
        loop {
            match lines_rx.try_recv() {
                Ok(line) if line.trim().is_empty() => {}
                Ok(line) => match line_to_command(&line, next_id) {
                    Ok(command) => {
                        next_id += 1;
                        send(&mut ws, command)?;
                    }
                    Err(error) => eprintln!("parley: {error}"),
                },
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    let _ = ws.close(None);
                    let _ = ws.flush();
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        match ws.read() {
            Ok(Message::Text(text)) => {
                let mut out = stdout.lock();
                for document in text.split('\n') {
                    let _ = writeln!(out, "{document}");
                }
                let _ = out.flush();
            }
            Ok(Message::Close(frame)) => {
                match frame {
                    Some(frame) => eprintln!(
                        "parley: closed by server: {} {}",
                        u16::from(frame.code),
                        frame.reason
                    ),
                    None => eprintln!("parley: closed by server"),
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(error))
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(tungstenite::Error::ConnectionClosed) => return Ok(ExitCode::SUCCESS),
            Err(error) => return Err(error.to_string()),
        }
    }
}

fn send(ws: &mut WebSocket<TcpStream>, document: String) -> Result<(), String> {
    ws.send(Message::text(document))
        .map_err(|error| format!("send failed: {error}"))
}
