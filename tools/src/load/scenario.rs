//! What a run does: the scenario, its clients and each client's part in it. Pure data,
//! decided before any socket opens, so every worker derives the same plan.

use std::net::{Ipv4Addr, SocketAddr};

/// The five scenarios of `parley-load`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Connect, authenticate, ping, hold.
    Idle,
    /// Pairs of users in direct conversations, both sending.
    OneToOne,
    /// Groups; the first `senders` members of each send.
    Group,
    /// Pairs as in `OneToOne`, then a fraction of sessions dropped at once and resumed.
    ReconnectStorm,
    /// Pairs doing sends, acks, reads, typing and history at given ratios.
    Mixed,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::OneToOne => "chat-1to1",
            Kind::Group => "group",
            Kind::ReconnectStorm => "reconnect-storm",
            Kind::Mixed => "mixed",
        }
    }
}

/// The protocol the clients speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Parley over WebSocket (`/v1/ws`).
    Parley,
    /// Core NATS over nats-server's WebSocket listener: the peer comparison.
    Nats,
    /// Parley over QUIC (ALPN `parley/1`), one UDP socket per session.
    Quic,
}

/// The client socket engine a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Readiness (mio) over one regular descriptor per session: every scenario and
    /// protocol, at most `ulimit -n` sessions per process.
    Epoll,
    /// io_uring with direct descriptors (`load::uring`): the idle scenario over Parley
    /// WebSocket, past the descriptor limit.
    Uring,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Epoll => "epoll",
            Engine::Uring => "uring",
        }
    }
}

/// `--engine`: `auto` takes io_uring where it serves the run and the kernel has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    Auto,
    Uring,
    Epoll,
}

/// Relative weights of the mixed scenario's operations.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub send: u32,
    pub ack: u32,
    pub read: u32,
    pub typing: u32,
    pub history: u32,
}

/// One operation of the mixed scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixedOp {
    Send,
    Ack,
    Read,
    Typing,
    History,
}

impl Mix {
    pub fn total(&self) -> u32 {
        self.send + self.ack + self.read + self.typing + self.history
    }

    /// The operation a uniform draw in `0..total()` picks.
    pub fn pick(&self, draw: u32) -> MixedOp {
        let mut left = draw;
        for (weight, op) in [
            (self.send, MixedOp::Send),
            (self.ack, MixedOp::Ack),
            (self.read, MixedOp::Read),
            (self.typing, MixedOp::Typing),
        ] {
            if left < weight {
                return op;
            }
            left -= weight;
        }
        MixedOp::History
    }
}

/// The reconnect storm: which sessions drop, when, and how they come back.
#[derive(Clone, Copy, Debug)]
pub struct Storm {
    /// Fraction of sessions dropped, 0..=1.
    pub fraction: f64,
    /// Nanoseconds after sending starts at which they drop.
    pub at_ns: u64,
    /// Each reconnects after a uniform random delay in `0..jitter`.
    pub jitter_ns: u64,
}

/// The mixed scenario's churn: sessions that misbehave, each kind as the protocol
/// (docs/protocol.md) says the server must meet it, beside the chat traffic it must not
/// disturb. Each kind acts once per `every`, its sessions spread evenly over the period.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Churn {
    /// Reconnect storms: the fraction (0..=1) of chat sessions dropped each period (a
    /// different subset each time), each back after a jittered delay, resuming.
    pub reconnect: f64,
    pub reconnect_jitter_ns: u64,
    /// Slow readers: chat sessions (the second member of the first pairs) that ask for a
    /// burst of history pages and then stop reading for `slow_for_ns` (9.7: 4009 when
    /// their queue overflows; they resume and miss nothing).
    pub slow_readers: u32,
    pub slow_for_ns: u64,
    /// Sessions of their own that flood one frame of pings past the rate limit
    /// (9.5, 9.6: `rate_limited`, then 4008).
    pub floods: u32,
    /// Sessions of their own that send malformed input, one case a period (9.3, 9.4).
    pub garbage: u32,
    /// Connections of their own that stop mid-upgrade or go silent after it (9.1, 9.8:
    /// dropped after `auth_timeout_ms`, or pinged and closed 1001 at `idle_timeout_ms`).
    pub half_open: u32,
    pub every_ns: u64,
    /// Longest a churn session waits for the server's answer before that is a violation.
    pub wait_ns: u64,
}

/// What one churn session does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChurnKind {
    Flood,
    Garbage,
    HalfOpen,
}

impl Churn {
    /// Sessions of their own (floods, garbage, half-open), beside the chat clients.
    pub fn sessions(&self) -> u32 {
        self.floods + self.garbage + self.half_open
    }

    /// The kind of churn session `index` (0..sessions()).
    pub fn kind(&self, index: u32) -> ChurnKind {
        if index < self.floods {
            ChurnKind::Flood
        } else if index < self.floods + self.garbage {
            ChurnKind::Garbage
        } else {
            ChurnKind::HalfOpen
        }
    }

    pub fn is_active(&self) -> bool {
        self.reconnect > 0.0 || self.slow_readers > 0 || self.sessions() > 0
    }
}

/// A client's part in the scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// No conversation.
    Idle,
    /// In a direct conversation with `partner`.
    Pair { partner: u32 },
    /// In the group whose members are clients `first..first + size`; the first creates it.
    Group { first: u32, size: u32 },
}

/// The whole run, shared read-only by every worker.
#[derive(Clone, Debug)]
pub struct Plan {
    pub kind: Kind,
    pub protocol: Protocol,
    /// Prefix of every user id, unique per run, so runs against one server never share
    /// conversations.
    pub tag: String,
    pub clients: u32,
    pub target: SocketAddr,
    /// Source addresses 127.0.0.1 .. 127.0.0.<sources>.
    pub sources: u8,
    /// Connections opened per second during setup.
    pub connect_rate: f64,
    /// Message body size in bytes.
    pub message_size: usize,
    /// Total rate of sends (or of operations, for mixed) per second, over all senders.
    pub rate: f64,
    /// Commands a client keeps unanswered at most; later sends wait, their latency
    /// still counted from their scheduled time.
    pub max_inflight: usize,
    pub group_size: u32,
    pub senders_per_group: u32,
    pub mix: Mix,
    pub storm: Option<Storm>,
    /// The mixed scenario's churn; `None` without `--churn`.
    pub churn: Option<Churn>,
    pub secret: String,
}

impl Plan {
    pub fn user(&self, client: u32) -> String {
        format!("{}-{client}", self.tag)
    }

    pub fn source(&self, client: u32) -> Ipv4Addr {
        Ipv4Addr::new(
            127,
            0,
            0,
            1 + (client % u32::from(self.sources.max(1))) as u8,
        )
    }

    pub fn role(&self, client: u32) -> Role {
        match self.kind {
            Kind::Idle => Role::Idle,
            Kind::OneToOne | Kind::ReconnectStorm | Kind::Mixed => Role::Pair {
                partner: client ^ 1,
            },
            Kind::Group => Role::Group {
                first: client - client % self.group_size,
                size: self.group_size,
            },
        }
    }

    /// Whether the client sends (or, for mixed, operates) on a schedule.
    pub fn is_sender(&self, client: u32) -> bool {
        match self.kind {
            Kind::Idle => false,
            Kind::Group => client % self.group_size < self.senders_per_group,
            _ => true,
        }
    }

    pub fn senders(&self) -> u32 {
        (0..self.clients).filter(|&c| self.is_sender(c)).count() as u32
    }

    /// Nanoseconds between one sender's scheduled sends.
    pub fn send_interval_ns(&self) -> u64 {
        let senders = f64::from(self.senders().max(1));
        if self.rate <= 0.0 {
            return u64::MAX;
        }
        (senders / self.rate * 1e9).max(1.0) as u64
    }

    /// Sessions other than the sender's that receive each message.
    pub fn recipients_per_message(&self) -> u64 {
        match self.kind {
            Kind::Idle => 0,
            Kind::Group => u64::from(self.group_size - 1),
            _ => 1,
        }
    }

    /// Whether the storm drops this client: a fixed, evenly spread subset.
    pub fn storm_drops(&self, client: u32) -> bool {
        self.storm.is_some_and(|storm| {
            let every = (1.0 / storm.fraction.clamp(1e-9, 1.0)).max(1.0);
            let position = f64::from(client) / every;
            position.fract() * every < 1.0
        })
    }

    /// Whether chat client `client` is one of the churn's slow readers: the odd member of
    /// each of the first `slow_readers` pairs, so every partner reads promptly.
    pub fn is_slow_reader(&self, client: u32) -> bool {
        self.churn
            .is_some_and(|churn| client % 2 == 1 && client / 2 < churn.slow_readers)
    }

    /// Whether the churn's reconnect storm of period `round` drops chat client `client`:
    /// a pseudo-random subset of the asked fraction, a different one each round (slow
    /// readers aside, so their stalls are judged whole).
    pub fn churn_drops(&self, client: u32, round: u64) -> bool {
        let Some(churn) = self.churn else {
            return false;
        };
        if churn.reconnect <= 0.0 || self.is_slow_reader(client) {
            return false;
        }
        // splitmix64 of (client, round): cheap, repeatable and evenly spread.
        let mut z = (u64::from(client) << 32 ^ round).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % 1_000_000) as f64 / 1e6 < churn.reconnect
    }

    /// The user of churn session `index`: apart from every chat client's.
    pub fn churn_user(&self, index: u32) -> String {
        format!("{}-churn-{index}", self.tag)
    }

    /// Check the plan's shape before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        if self.clients == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.protocol == Protocol::Nats && !matches!(self.kind, Kind::Idle | Kind::OneToOne) {
            return Err("--protocol nats runs the idle and chat-1to1 scenarios only".into());
        }
        match self.kind {
            Kind::OneToOne | Kind::ReconnectStorm | Kind::Mixed
                if !self.clients.is_multiple_of(2) =>
            {
                Err("this scenario pairs clients: --connections must be even".into())
            }
            Kind::Group if self.group_size < 2 => Err("--group-size must be at least 2".into()),
            Kind::Group if !self.clients.is_multiple_of(self.group_size) => Err(format!(
                "--connections ({}) must be a multiple of --group-size ({})",
                self.clients, self.group_size
            )),
            Kind::Group
                if self.senders_per_group == 0 || self.senders_per_group > self.group_size =>
            {
                Err("--senders must be between 1 and --group-size".into())
            }
            Kind::Mixed if self.mix.total() == 0 => Err("the --mix weights are all zero".into()),
            _ if self.churn.is_some() && self.kind != Kind::Mixed => {
                Err("--churn belongs to the mixed scenario".into())
            }
            _ if self.churn.is_some() && self.protocol != Protocol::Parley => {
                Err("--churn speaks WebSocket: not with --quic or --protocol nats".into())
            }
            _ if self
                .churn
                .is_some_and(|churn| churn.slow_readers > self.clients / 2) =>
            {
                Err("--churn slow=N: at most one slow reader per pair (--connections / 2)".into())
            }
            _ if self
                .churn
                .is_some_and(|churn| !(0.0..=1.0).contains(&churn.reconnect)) =>
            {
                Err("--churn reconnect=PERCENT must be 0-100".into())
            }
            _ if self.churn.is_some_and(|churn| churn.every_ns == 0) => {
                Err("--churn-every must be longer than 0".into())
            }
            _ if self.message_size < 40 => {
                Err("--size must be at least 40 bytes (the body carries a timestamp)".into())
            }
            _ if self.sources == 0 => Err("--sources must be at least 1".into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: Kind, clients: u32) -> Plan {
        Plan {
            kind,
            protocol: Protocol::Parley,
            tag: "t".into(),
            clients,
            target: "127.0.0.1:1".parse().unwrap(),
            sources: 4,
            connect_rate: 1000.0,
            message_size: 64,
            rate: 1000.0,
            max_inflight: 64,
            group_size: 10,
            senders_per_group: 2,
            mix: Mix {
                send: 1,
                ack: 1,
                read: 1,
                typing: 1,
                history: 1,
            },
            storm: Some(Storm {
                fraction: 0.25,
                at_ns: 0,
                jitter_ns: 0,
            }),
            churn: None,
            secret: "s".into(),
        }
    }

    #[test]
    fn roles_rates_and_storm_subset() {
        let pairs = plan(Kind::OneToOne, 100);
        assert_eq!(pairs.role(6), Role::Pair { partner: 7 });
        assert_eq!(pairs.role(7), Role::Pair { partner: 6 });
        assert_eq!(pairs.send_interval_ns(), 100_000_000);
        assert_eq!(pairs.source(5), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!((0..100).filter(|&c| pairs.storm_drops(c)).count(), 25);

        let groups = plan(Kind::Group, 100);
        assert_eq!(
            groups.role(17),
            Role::Group {
                first: 10,
                size: 10
            }
        );
        assert_eq!(groups.senders(), 20);
        assert_eq!(groups.recipients_per_message(), 9);
        assert!(groups.validate().is_ok());
        assert!(plan(Kind::Group, 95).validate().is_err());
        assert!(plan(Kind::OneToOne, 3).validate().is_err());

        let mut churned = plan(Kind::Mixed, 100);
        churned.churn = Some(Churn {
            reconnect: 0.1,
            slow_readers: 3,
            floods: 1,
            garbage: 2,
            half_open: 1,
            every_ns: 1,
            ..Churn::default()
        });
        assert!(churned.validate().is_ok());
        let slow: Vec<u32> = (0..100).filter(|&c| churned.is_slow_reader(c)).collect();
        assert_eq!(slow, [1, 3, 5]);
        let churn = churned.churn.unwrap();
        assert_eq!(churn.sessions(), 4);
        let kinds: Vec<ChurnKind> = (0..4).map(|i| churn.kind(i)).collect();
        use ChurnKind::{Flood, Garbage, HalfOpen};
        assert_eq!(kinds, [Flood, Garbage, Garbage, HalfOpen]);
        // About a tenth each round, a different tenth, never a slow reader.
        let round = |r| -> Vec<u32> { (0..100).filter(|&c| churned.churn_drops(c, r)).collect() };
        let (first, second) = (round(0), round(1));
        assert!((3..=20).contains(&first.len()), "{first:?}");
        assert_ne!(first, second);
        assert!(first
            .iter()
            .chain(&second)
            .all(|&c| !churned.is_slow_reader(c)));
        let mut wrong = churned.clone();
        wrong.kind = Kind::OneToOne;
        assert!(wrong.validate().is_err(), "churn outside mixed");
        let mut wrong = churned.clone();
        wrong.churn = Some(Churn {
            slow_readers: 51,
            ..churn
        });
        assert!(wrong.validate().is_err(), "two slow readers in one pair");

        let mix = pairs.mix;
        let picks: Vec<MixedOp> = (0..mix.total()).map(|d| mix.pick(d)).collect();
        assert_eq!(
            picks,
            [
                MixedOp::Send,
                MixedOp::Ack,
                MixedOp::Read,
                MixedOp::Typing,
                MixedOp::History
            ]
        );
    }
}
