//! `parley`: mint tokens and talk to a running parleyd.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use parley_tools::quic::{BlockingQuic, QuicClientError, QuicOptions, Trust};
use parley_tools::{line_to_command, load_secret, mint_token, parse_duration};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often `connect` looks at typed lines while waiting for events.
const INPUT_POLL: Duration = Duration::from_millis(50);
/// Longest wait for a QUIC handshake.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);

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
        /// WebSocket URL of parleyd (unless --quic).
        #[arg(long, default_value = "ws://127.0.0.1:7070/v1/ws")]
        url: String,
        /// Use this token instead of minting one.
        #[arg(long)]
        token: Option<String>,
        /// Speak QUIC (ALPN parley/1) to this address instead of WebSocket.
        #[arg(long, value_name = "HOST:PORT")]
        quic: Option<String>,
        /// QUIC: accept only the certificate with this SHA-256 fingerprint (parleyd logs it).
        #[arg(long, value_name = "FINGERPRINT")]
        pin: Option<String>,
        /// QUIC: verify the certificate against this PEM file.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// QUIC: accept any certificate (development only).
        #[arg(long)]
        insecure: bool,
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
            quic,
            pin,
            ca,
            insecure,
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
            match quic {
                Some(addr) => {
                    let trust = match (pin, ca, insecure) {
                        (Some(pin), _, _) => Trust::Pin(pin),
                        (None, Some(ca), _) => Trust::Ca(ca),
                        (None, None, true) => Trust::Insecure,
                        (None, None, false) => {
                            return Err("QUIC needs --pin FINGERPRINT (parleyd logs it), --ca FILE or --insecure".into())
                        }
                    };
                    let link = quic_link(&addr, trust)?;
                    converse(Box::new(link), Some(&token), device.as_deref())
                }
                None => converse(Box::new(ws_link(&url, &token)?), None, device.as_deref()),
            }
        }
    }
}

/// A session's transport, as the interactive loop sees it.
trait Link {
    fn send(&mut self, document: String) -> Result<(), String>;
    /// Documents that arrived within `wait`; `Err` with why once the session is over.
    fn receive(&mut self, wait: Duration) -> Result<Vec<String>, Ended>;
    fn close(&mut self);
}

/// The session ended: normally (the server closed, saying why) or by an error.
enum Ended {
    Closed(String),
    Failed(String),
}

struct WsLink(WebSocket<TcpStream>);

impl Link for WsLink {
    fn send(&mut self, document: String) -> Result<(), String> {
        self.0
            .send(Message::text(document))
            .map_err(|error| format!("send failed: {error}"))
    }

    fn receive(&mut self, wait: Duration) -> Result<Vec<String>, Ended> {
        let _ = self.0.get_mut().set_read_timeout(Some(wait));
        match self.0.read() {
            Ok(Message::Text(text)) => Ok(text.split('\n').map(str::to_string).collect()),
            Ok(Message::Close(frame)) => Err(Ended::Closed(match frame {
                Some(frame) => format!("{} {}", u16::from(frame.code), frame.reason),
                None => String::new(),
            })),
            Ok(_) => Ok(Vec::new()),
            Err(tungstenite::Error::Io(error))
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(Vec::new())
            }
            Err(tungstenite::Error::ConnectionClosed) => Err(Ended::Closed(String::new())),
            Err(error) => Err(Ended::Failed(error.to_string())),
        }
    }

    fn close(&mut self) {
        let _ = self.0.close(None);
        let _ = self.0.flush();
    }
}

struct QuicLink(BlockingQuic);

impl Link for QuicLink {
    fn send(&mut self, document: String) -> Result<(), String> {
        self.0
            .send_document(&document)
            .map_err(|error| format!("send failed: {error}"))
    }

    fn receive(&mut self, wait: Duration) -> Result<Vec<String>, Ended> {
        let deadline = Instant::now() + wait;
        let mut documents = Vec::new();
        while let Some(document) = self.0.session.next_document() {
            documents.push(document);
        }
        if !documents.is_empty() {
            return Ok(documents);
        }
        match self.0.step(deadline, "for events") {
            Ok(()) | Err(QuicClientError::Timeout(_)) => {}
            Err(error) => return Err(Ended::Failed(error.to_string())),
        }
        while let Some(document) = self.0.session.next_document() {
            documents.push(document);
        }
        match self.0.session.check_closed() {
            Err(_) if !documents.is_empty() => Ok(documents),
            Err(QuicClientError::Closed { code, reason }) => {
                Err(Ended::Closed(format!("{code} {reason}")))
            }
            Err(error) => Err(Ended::Failed(error.to_string())),
            Ok(()) => Ok(documents),
        }
    }

    fn close(&mut self) {
        self.0.session.close(1000, "bye");
        let _ = self.0.flush();
    }
}

fn ws_link(url: &str, token: &str) -> Result<WsLink, String> {
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
    let (ws, _) =
        tungstenite::client(request, stream).map_err(|error| format!("{url}: {error}"))?;
    Ok(WsLink(ws))
}

fn quic_link(addr: &str, trust: Trust) -> Result<QuicLink, String> {
    let peer: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|error| format!("{addr}: {error}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let options = QuicOptions {
        trust,
        server_name: addr
            .rsplit_once(':')
            .map_or(addr, |(host, _)| host)
            .trim_matches(['[', ']'])
            .to_string(),
        datagrams: true,
    };
    BlockingQuic::connect(peer, &options, HANDSHAKE_WAIT)
        .map(QuicLink)
        .map_err(|error| format!("{addr}: {error}"))
}

/// The interactive loop: hello first (with the token over QUIC, whose first document
/// must authenticate), then typed lines out and events in.
fn converse(
    mut link: Box<dyn Link>,
    hello_token: Option<&str>,
    device: Option<&str>,
) -> Result<ExitCode, String> {
    let mut next_id = 1u64;
    let hello =
        serde_json::json!({"id": next_id, "op": "hello", "token": hello_token, "device": device});
    next_id += 1;
    link.send(hello.to_string())?;

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
                        link.send(command)?;
                    }
                    Err(error) => eprintln!("parley: {error}"),
                },
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    link.close();
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        match link.receive(INPUT_POLL) {
            Ok(documents) => {
                let mut out = stdout.lock();
                for document in documents {
                    let _ = writeln!(out, "{document}");
                }
                let _ = out.flush();
            }
            Err(Ended::Closed(why)) => {
                eprintln!("parley: closed by server: {why}");
                return Ok(ExitCode::SUCCESS);
            }
            Err(Ended::Failed(error)) => return Err(error),
        }
    }
}
