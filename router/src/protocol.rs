//! Wire vocabulary of PROTOCOL.md v1 sections 1-3: error codes, close codes, and the
//! encoders for replies and events. Transport-independent: WebSocket and QUIC share it.

use std::sync::Arc;

use serde::Serialize;

/// One JSON document on its way to a session: a reply of its own, or event bytes encoded
/// once and shared by every session that receives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doc {
    Owned(String),
    Shared(Arc<str>),
}

impl Doc {
    pub fn as_str(&self) -> &str {
        match self {
            Doc::Owned(text) => text,
            Doc::Shared(text) => text,
        }
    }

    pub fn len(&self) -> usize {
        self.as_str().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_str().is_empty()
    }
}

impl From<String> for Doc {
    fn from(text: String) -> Self {
        Doc::Owned(text)
    }
}

impl From<Arc<str>> for Doc {
    fn from(text: Arc<str>) -> Self {
        Doc::Shared(text)
    }
}

/// Error codes carried in `{"re": id, "err": {"code": ...}}` (PROTOCOL.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    Conflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Conflict,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Dense index, for per-code counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Close codes (WebSocket close frame / QUIC application error), PROTOCOL.md section 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1001: drain or idle; reconnect (elsewhere).
    GoingAway,
    /// 1009: a frame over the hard frame limit (RFC 6455's "message too big").
    MessageTooBig,
    /// 4000: the peer broke the transport protocol.
    ProtocolViolation,
    /// 4001: missing, invalid or expired token.
    Unauthorized,
    /// 4002: no valid token in time.
    AuthTimeout,
    /// 4008: rate or abuse policy.
    Policy,
    /// 4009: outbound queue overflow; reconnect and sync.
    TooSlow,
}

impl CloseCode {
    pub const ALL: [CloseCode; 7] = [
        CloseCode::GoingAway,
        CloseCode::MessageTooBig,
        CloseCode::ProtocolViolation,
        CloseCode::Unauthorized,
        CloseCode::AuthTimeout,
        CloseCode::Policy,
        CloseCode::TooSlow,
    ];

    pub fn code(self) -> u16 {
        match self {
            CloseCode::GoingAway => 1001,
            CloseCode::MessageTooBig => 1009,
            CloseCode::ProtocolViolation => 4000,
            CloseCode::Unauthorized => 4001,
            CloseCode::AuthTimeout => 4002,
            CloseCode::Policy => 4008,
            CloseCode::TooSlow => 4009,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Serialize)]
struct ErrBody<'a> {
    code: &'static str,
    msg: &'a str,
}

#[derive(Serialize)]
struct ErrReply<'a> {
    re: Option<u64>,
    err: ErrBody<'a>,
}

#[derive(Serialize)]
struct OkReply<'a, T: Serialize> {
    re: u64,
    ok: &'a T,
}

/// `{"re": id, "err": {"code", "msg"}}`; `re` is `null` when the command had no id.
pub fn encode_err(re: Option<u64>, code: ErrorCode, msg: &str) -> String {
    let reply = ErrReply {
        re,
        err: ErrBody {
            code: code.as_str(),
            msg,
        },
    };
    serde_json::to_string(&reply).expect("error reply serializes")
}

/// `{"re": id, "ok": body}`.
pub fn encode_ok<T: Serialize>(re: u64, body: &T) -> String {
    serde_json::to_string(&OkReply { re, ok: body }).expect("ok reply serializes")
}

/// `{"ev": name}` for events with no fields, such as `synced`.
pub fn encode_bare_event(name: &str) -> String {
    serde_json::json!({ "ev": name }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_shape() {
        let doc = encode_err(None, ErrorCode::BadRequest, "say \"hi\"");
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"re": null, "err": {"code": "bad_request", "msg": "say \"hi\""}})
        );
    }

    #[test]
    fn indices_are_dense() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
        }
        for (i, code) in CloseCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
        }
    }
}
