//! The Parley documents the generator writes and the few fields it reads back.
//!
//! Incoming documents are parsed into borrowed structs that name only what the
//! generator checks, so the cost per received message stays small: no allocation for
//! a `msg` event. The strings read are ones without escapes (event names, conversation
//! ids, the generator's own bodies); a document where one has escapes fails to parse
//! and is counted as an error, never misread.

use std::borrow::Cow;
use std::fmt::Write;

use serde::Deserialize;

/// One received document: a reply (`re`) or an event (`ev`).
#[derive(Deserialize)]
pub struct Incoming<'a> {
    pub re: Option<u64>,
    pub ev: Option<&'a str>,
    #[serde(borrow)]
    pub ok: Option<OkBody<'a>>,
    #[serde(borrow)]
    pub err: Option<ErrBody<'a>>,
    pub conv: Option<&'a str>,
    pub seq: Option<u64>,
    pub body: Option<&'a str>,
    /// `synced.more`: conversations whose replay was cut short.
    pub more: Option<Vec<Cursor>>,
}

#[derive(Deserialize)]
pub struct OkBody<'a> {
    pub conv: Option<&'a str>,
    pub seq: Option<u64>,
}

#[derive(Deserialize)]
pub struct ErrBody<'a> {
    #[serde(borrow)]
    pub code: Cow<'a, str>,
}

#[derive(Deserialize)]
pub struct Cursor {
    pub conv: String,
    pub after: u64,
}

/// What a generated message body carries, so a recipient can measure and check it
/// without any shared state: when the send was scheduled, who sent it, its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Nanoseconds since the run's epoch at which the send was scheduled.
    pub scheduled_ns: u64,
    /// The sending client's index.
    pub sender: u32,
    /// The sender's message counter.
    pub counter: u64,
}

impl Stamp {
    /// `<scheduled_ns hex>.<sender hex>.<counter hex>.` padded with `x` to `size` bytes.
    pub fn write_body(&self, size: usize, out: &mut String) {
        let start = out.len();
        let _ = write!(
            out,
            "{:x}.{:x}.{:x}.",
            self.scheduled_ns, self.sender, self.counter
        );
        let written = out.len() - start;
        out.extend(std::iter::repeat_n('x', size.saturating_sub(written)));
    }

    pub fn parse(body: &str) -> Option<Stamp> {
        let mut parts = body.splitn(4, '.');
        let mut hex = || u64::from_str_radix(parts.next()?, 16).ok();
        Some(Stamp {
            scheduled_ns: hex()?,
            sender: u32::try_from(hex()?).ok()?,
            counter: hex()?,
        })
    }
}

/// Append a `send` document.
pub fn send(out: &mut String, id: u64, conv: &str, stamp: &Stamp, size: usize) {
    let _ = write!(
        out,
        r#"{{"id":{id},"op":"send","conv":"{conv}","cmid":"{}","body":""#,
        stamp.counter
    );
    stamp.write_body(size, out);
    out.push_str("\"}");
}

/// Append a command whose fields are all given as ready JSON (`"conv":"..","seq":3`).
pub fn command(out: &mut String, id: u64, op: &str, fields: &str) {
    let _ = write!(out, r#"{{"id":{id},"op":"{op}""#);
    if !fields.is_empty() {
        out.push(',');
        out.push_str(fields);
    }
    out.push('}');
}

/// `"resume":[{"conv":"c","after":n}]` or `"cursors":[...]`: conversation ids are the
/// server's (`[A-Za-z0-9-]`), so they need no escaping.
pub fn cursors(field: &str, cursors: &[(&str, u64)]) -> String {
    let mut out = format!(r#""{field}":["#);
    for (i, (conv, after)) in cursors.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, r#"{{"conv":"{conv}","after":{after}}}"#);
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_is_json_and_its_stamp_round_trips() {
        let stamp = Stamp {
            scheduled_ns: 123_456_789,
            sender: 42,
            counter: 7,
        };
        let mut doc = String::new();
        send(&mut doc, 9, "d-abc", &stamp, 64);
        let value: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(value["op"], "send");
        assert_eq!(value["cmid"], "7");
        let body = value["body"].as_str().unwrap();
        assert_eq!(body.len(), 64);
        assert_eq!(Stamp::parse(body), Some(stamp));
        assert_eq!(Stamp::parse("hello"), None);
    }

    #[test]
    fn incoming_documents_parse_borrowed() {
        let doc: Incoming = serde_json::from_str(
            r#"{"ev":"msg","conv":"d-1","seq":3,"mid":"d-1#3","from":"u","ts":1,"kind":"text","body":"1.2.3.xx","cmid":"3"}"#,
        )
        .unwrap();
        assert_eq!(doc.body, Some("1.2.3.xx"));
        assert_eq!(doc.seq, Some(3));
        let doc: Incoming =
            serde_json::from_str(r#"{"re":null,"err":{"code":"bad_request","msg":"x"}}"#).unwrap();
        assert_eq!(doc.re, None);
        assert_eq!(doc.err.unwrap().code, "bad_request");
        let doc: Incoming =
            serde_json::from_str(r#"{"ev":"synced","more":[{"conv":"g-1","after":5}]}"#).unwrap();
        assert_eq!(doc.more.unwrap()[0].after, 5);
        assert_eq!(
            cursors("resume", &[("a", 1), ("b", 2)]),
            r#""resume":[{"conv":"a","after":1},{"conv":"b","after":2}]"#
        );
    }
}
