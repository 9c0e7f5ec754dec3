//! What the protocol says the server does with each kind of churn, as a check over what
//! the server sent in one episode: sans-IO, fed the response, the frames and the end of
//! the connection in order, answering whether the episode is still open, passed (and
//! under which event it is counted) or failed (and why).

use super::raw::{ServerFrame, OP_PING, OP_TEXT};
use crate::load::wire::Incoming;

/// One episode of a churn session: what it sends and what it must get back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// One frame of pings past the rate limit: replies `ok` or `rate_limited` (9.5),
    /// then close 4008 once `abuse_strikes` were rejected in a row (9.6).
    Flood,
    /// Garbage the session survives (9.3, 9.4): the defined error, then a `ping` sent
    /// behind it is answered.
    NotJson,
    NotAnObject,
    NoOp,
    UnknownOp,
    Binary,
    TooLarge,
    /// Garbage that ends the session with a close code (9.4, 9.9).
    NotUtf8,
    ReservedBits,
    Unmasked,
    OverHardLimit,
    /// Part of an upgrade request, then nothing: dropped after `auth_timeout_ms` with no
    /// answer (9.1).
    StopMidUpgrade,
    /// Upgraded, then silent (no frame, no pong): one heartbeat ping, then close 1001
    /// after `idle_timeout_ms` (9.8).
    SilentAfterUpgrade,
}

/// The garbage cases, in the order a garbage session goes through them.
pub const GARBAGE: [Case; 10] = [
    Case::NotJson,
    Case::NotAnObject,
    Case::NoOp,
    Case::UnknownOp,
    Case::Binary,
    Case::TooLarge,
    Case::NotUtf8,
    Case::ReservedBits,
    Case::Unmasked,
    Case::OverHardLimit,
];

/// The half-open cases, alternated.
pub const HALF_OPEN: [Case; 2] = [Case::StopMidUpgrade, Case::SilentAfterUpgrade];

impl Case {
    /// The event a passed episode is counted under.
    pub fn event(self) -> &'static str {
        match self {
            Case::Flood => "flood_closed_4008",
            Case::NotJson => "garbage_not_json",
            Case::NotAnObject => "garbage_not_an_object",
            Case::NoOp => "garbage_no_op",
            Case::UnknownOp => "garbage_unknown_op",
            Case::Binary => "garbage_binary",
            Case::TooLarge => "garbage_too_large",
            Case::NotUtf8 => "garbage_not_utf8_closed_4000",
            Case::ReservedBits => "garbage_reserved_bits_closed_4000",
            Case::Unmasked => "garbage_unmasked_closed_4000",
            Case::OverHardLimit => "garbage_over_hard_limit_closed_1009",
            Case::StopMidUpgrade => "half_open_mid_upgrade_dropped",
            Case::SilentAfterUpgrade => "half_open_silent_closed_1001",
        }
    }

    /// Whether the episode starts on an upgraded session (with a token at the upgrade).
    pub fn needs_session(self) -> bool {
        self != Case::StopMidUpgrade
    }

    /// The error code and reply id a surviving garbage case must get first.
    fn error_first(self, garbage_id: u64) -> Option<(&'static str, Option<u64>)> {
        match self {
            Case::NotJson | Case::NotAnObject | Case::NoOp | Case::Binary => {
                Some(("bad_request", None))
            }
            Case::UnknownOp => Some(("bad_request", Some(garbage_id))),
            Case::TooLarge => Some(("too_large", None)),
            _ => None,
        }
    }

    /// The close code the case must end with, for the ones that end the session.
    fn close_code(self) -> Option<u16> {
        match self {
            Case::Flood => Some(4008),
            Case::NotUtf8 | Case::ReservedBits | Case::Unmasked => Some(4000),
            Case::OverHardLimit => Some(1009),
            Case::SilentAfterUpgrade => Some(1001),
            _ => None,
        }
    }
}

/// What the IO side saw, in order.
#[derive(Debug)]
pub enum Seen<'a> {
    /// The upgrade's response status.
    Response(u16),
    Frame(&'a ServerFrame),
    /// The server ended the connection (EOF or reset).
    Ended,
}

/// Where an episode stands after what was seen.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Open,
    Passed(&'static str),
    Failed(String),
}

/// One episode's check.
#[derive(Debug)]
pub struct Episode {
    case: Case,
    /// The id of the garbage document (for `UnknownOp`), and of the ping sent behind it.
    garbage_id: u64,
    ping_id: u64,
    error_seen: bool,
    pinged: bool,
    /// Flood: replies `ok` and `rate_limited`.
    pub accepted: u64,
    pub rate_limited: u64,
}

impl Episode {
    pub fn new(case: Case, garbage_id: u64, ping_id: u64) -> Self {
        Episode {
            case,
            garbage_id,
            ping_id,
            error_seen: false,
            pinged: false,
            accepted: 0,
            rate_limited: 0,
        }
    }

    pub fn case(&self) -> Case {
        self.case
    }

    fn failed(&self, why: impl std::fmt::Display) -> Verdict {
        Verdict::Failed(format!("{}: {why}", self.case.event()))
    }

    pub fn see(&mut self, seen: Seen) -> Verdict {
        let expected_close = self.case.close_code();
        match seen {
            Seen::Response(status) => match (self.case, status) {
                (Case::StopMidUpgrade, _) => {
                    self.failed(format!("answered {status} to half an upgrade request"))
                }
                (_, 101) => Verdict::Open,
                _ => self.failed(format!("the upgrade was answered {status}")),
            },
            Seen::Ended => match self.case {
                Case::StopMidUpgrade => Verdict::Passed(self.case.event()),
                _ => self.failed("the connection ended without the expected answer"),
            },
            Seen::Frame(frame) if frame.opcode == OP_PING => {
                self.pinged = true;
                Verdict::Open
            }
            Seen::Frame(frame) => match frame.close_code() {
                Some(code) if Some(code) == expected_close => match self.case {
                    Case::Flood if self.rate_limited == 0 => {
                        self.failed("closed 4008 without a rate_limited reply first")
                    }
                    Case::SilentAfterUpgrade if !self.pinged => {
                        self.failed("closed 1001 without a heartbeat ping first")
                    }
                    _ => Verdict::Passed(self.case.event()),
                },
                Some(code) => self.failed(format!("closed {code}")),
                None if frame.opcode == OP_TEXT => self.documents(&frame.payload),
                None => self.failed(format!("an unexpected frame (opcode {})", frame.opcode)),
            },
        }
    }

    /// The documents of one text frame.
    fn documents(&mut self, payload: &[u8]) -> Verdict {
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.failed("a text frame that is not UTF-8");
        };
        for line in text.split('\n').filter(|line| !line.is_empty()) {
            let Ok(doc) = serde_json::from_str::<Incoming>(line) else {
                return self.failed(format!("an unreadable document {line:?}"));
            };
            if doc.ev.is_some() {
                continue;
            }
            let verdict = self.reply(&doc);
            if verdict != Verdict::Open {
                return verdict;
            }
        }
        Verdict::Open
    }

    fn reply(&mut self, doc: &Incoming) -> Verdict {
        let code = doc.err.as_ref().map(|err| err.code.as_ref());
        if self.case == Case::Flood {
            return match code {
                None => {
                    self.accepted += 1;
                    Verdict::Open
                }
                Some("rate_limited") => {
                    self.rate_limited += 1;
                    Verdict::Open
                }
                Some(other) => self.failed(format!("a flooded ping answered {other}")),
            };
        }
        let Some((want_code, want_re)) = self.case.error_first(self.garbage_id) else {
            return self.failed(format!("a reply {:?} {code:?} where none was due", doc.re));
        };
        if !self.error_seen {
            if code == Some(want_code) && doc.re == want_re {
                self.error_seen = true;
                return Verdict::Open;
            }
            return self.failed(format!(
                "answered {code:?} (re {:?}), not {want_code} (re {want_re:?})",
                doc.re
            ));
        }
        match (doc.re, code) {
            (Some(re), None) if re == self.ping_id => Verdict::Passed(self.case.event()),
            _ => self.failed(format!(
                "the ping behind the garbage was answered {code:?} (re {:?})",
                doc.re
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::raw::{close_payload, OP_CLOSE};
    use super::*;

    fn text(doc: &str) -> ServerFrame {
        ServerFrame {
            opcode: OP_TEXT,
            payload: doc.as_bytes().to_vec(),
        }
    }

    fn close(code: u16) -> ServerFrame {
        ServerFrame {
            opcode: OP_CLOSE,
            payload: close_payload(code, "why"),
        }
    }

    fn ping() -> ServerFrame {
        ServerFrame {
            opcode: OP_PING,
            payload: Vec::new(),
        }
    }

    #[test]
    fn surviving_garbage_needs_its_error_then_the_pong() {
        let mut episode = Episode::new(Case::UnknownOp, 7, 8);
        assert_eq!(episode.see(Seen::Response(101)), Verdict::Open);
        let error = text(r#"{"re":7,"err":{"code":"bad_request","msg":"unknown op"}}"#);
        assert_eq!(episode.see(Seen::Frame(&error)), Verdict::Open);
        let pong = text(r#"{"re":8,"ok":{"server_ts":1}}"#);
        assert_eq!(
            episode.see(Seen::Frame(&pong)),
            Verdict::Passed("garbage_unknown_op")
        );
        // Both in one batched frame, and the error with the wrong `re`.
        let mut episode = Episode::new(Case::NotJson, 7, 8);
        let both = text("{\"re\":null,\"err\":{\"code\":\"bad_request\"}}\n{\"re\":8,\"ok\":{}}");
        assert_eq!(
            episode.see(Seen::Frame(&both)),
            Verdict::Passed("garbage_not_json")
        );
        let mut episode = Episode::new(Case::UnknownOp, 7, 8);
        let unaddressed = text(r#"{"re":null,"err":{"code":"bad_request"}}"#);
        assert!(matches!(
            episode.see(Seen::Frame(&unaddressed)),
            Verdict::Failed(_)
        ));
        let mut episode = Episode::new(Case::TooLarge, 7, 8);
        assert!(matches!(
            episode.see(Seen::Frame(&close(4000))),
            Verdict::Failed(_)
        ));
        let mut episode = Episode::new(Case::Binary, 7, 8);
        assert!(matches!(episode.see(Seen::Ended), Verdict::Failed(_)));
    }

    #[test]
    fn closing_garbage_needs_its_close_code() {
        let mut episode = Episode::new(Case::NotUtf8, 1, 2);
        assert_eq!(
            episode.see(Seen::Frame(&close(4000))),
            Verdict::Passed("garbage_not_utf8_closed_4000")
        );
        let mut episode = Episode::new(Case::OverHardLimit, 1, 2);
        assert!(
            matches!(episode.see(Seen::Frame(&close(4000))), Verdict::Failed(why) if why.contains("closed 4000"))
        );
    }

    #[test]
    fn a_flood_is_rate_limited_then_closed_4008() {
        let mut episode = Episode::new(Case::Flood, 0, 0);
        let replies = text("{\"re\":1,\"ok\":{}}\n{\"re\":2,\"err\":{\"code\":\"rate_limited\"}}");
        assert_eq!(episode.see(Seen::Frame(&replies)), Verdict::Open);
        assert_eq!((episode.accepted, episode.rate_limited), (1, 1));
        assert_eq!(
            episode.see(Seen::Frame(&close(4008))),
            Verdict::Passed("flood_closed_4008")
        );
        // Closed before any rate limiting, or answered another error.
        let mut episode = Episode::new(Case::Flood, 0, 0);
        assert!(matches!(
            episode.see(Seen::Frame(&close(4008))),
            Verdict::Failed(_)
        ));
        let mut episode = Episode::new(Case::Flood, 0, 0);
        let wrong = text(r#"{"re":3,"err":{"code":"internal"}}"#);
        assert!(matches!(
            episode.see(Seen::Frame(&wrong)),
            Verdict::Failed(_)
        ));
    }

    #[test]
    fn half_open_connections_are_dropped_as_the_timeouts_say() {
        let mut episode = Episode::new(Case::StopMidUpgrade, 0, 0);
        assert_eq!(
            episode.see(Seen::Ended),
            Verdict::Passed("half_open_mid_upgrade_dropped")
        );
        let mut episode = Episode::new(Case::StopMidUpgrade, 0, 0);
        assert!(matches!(
            episode.see(Seen::Response(400)),
            Verdict::Failed(_)
        ));
        let mut episode = Episode::new(Case::SilentAfterUpgrade, 0, 0);
        assert_eq!(episode.see(Seen::Response(101)), Verdict::Open);
        assert_eq!(episode.see(Seen::Frame(&ping())), Verdict::Open);
        assert_eq!(
            episode.see(Seen::Frame(&close(1001))),
            Verdict::Passed("half_open_silent_closed_1001")
        );
        // Closed without the heartbeat ping, or dropped without a close frame.
        let mut episode = Episode::new(Case::SilentAfterUpgrade, 0, 0);
        assert!(matches!(
            episode.see(Seen::Frame(&close(1001))),
            Verdict::Failed(_)
        ));
        let mut episode = Episode::new(Case::SilentAfterUpgrade, 0, 0);
        assert!(matches!(episode.see(Seen::Ended), Verdict::Failed(_)));
    }
}
