//! The `search` command (PROTOCOL.md section 10) as the chat core sees it: the query
//! parsed and checked on the shard that received it, and the request handed to the search
//! service once the user's conversations are known. The index itself lives in the
//! gateway (it does I/O); this module only decides what may be asked and of which
//! conversations.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::auth::is_valid_id;
use crate::command::{Refusal, MAX_CONV_ID_BYTES};
use crate::limits::ChatLimits;

/// The largest `q`, in bytes.
pub const MAX_QUERY_BYTES: usize = 1024;
/// Words, phrases and prefixes one `q` may hold.
pub const MAX_QUERY_TERMS: usize = 16;
/// `limit` when the client names none, and the largest it may name (PROTOCOL.md 10).
pub const DEFAULT_SEARCH_LIMIT: usize = 20;
pub const MAX_SEARCH_LIMIT: usize = 100;

/// One part of `q`; a hit must match every part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// A word (the index's tokenizer may split it, e.g. `e-mail`: then its pieces must
    /// appear together, as a phrase).
    Word(String),
    /// `"several words"`, in this order.
    Phrase(String),
    /// `prefix*`: any word starting so.
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    pub terms: Vec<Term>,
    pub conv: Option<String>,
    pub from: Option<String>,
    /// Exclusive bounds on the message's `ts` (Unix ms).
    pub after_ts: Option<u64>,
    pub before_ts: Option<u64>,
    pub limit: usize,
    /// Hits skipped: where the cursor's page starts.
    pub offset: usize,
}

/// A search whose user's conversations are known: what the search service runs.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// The session asking, on the shard that gathered its conversations.
    pub conn: u64,
    pub re: u64,
    pub user: Arc<str>,
    /// The conversations the user is a member of now, narrowed by `query.conv`.
    pub convs: Vec<String>,
    pub query: SearchQuery,
}

#[derive(Deserialize)]
struct SearchArgs {
    q: String,
    #[serde(default)]
    conv: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    after_ts: Option<u64>,
    #[serde(default)]
    before_ts: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
}

/// Parse and check a `search` command's fields.
pub fn parse(document: &str, limits: &ChatLimits) -> Result<SearchQuery, Refusal> {
    let args: SearchArgs = serde_json::from_str(document)
        .map_err(|e| Refusal::bad(format!("malformed search: {e}")))?;
    if args.q.len() > MAX_QUERY_BYTES {
        return Err(Refusal::bad(format!("q exceeds {MAX_QUERY_BYTES} bytes")));
    }
    let terms = parse_q(&args.q)?;
    if let Some(conv) = &args.conv {
        if conv.is_empty() || conv.len() > MAX_CONV_ID_BYTES {
            return Err(Refusal::bad(format!(
                "conv must be 1-{MAX_CONV_ID_BYTES} bytes"
            )));
        }
    }
    if let Some(from) = &args.from {
        if !is_valid_id(from) {
            return Err(Refusal::bad("from is not a valid user id"));
        }
    }
    let limit = args.limit.unwrap_or(DEFAULT_SEARCH_LIMIT);
    if limit == 0 || limit > MAX_SEARCH_LIMIT {
        return Err(Refusal::bad(format!(
            "search limit must be 1-{MAX_SEARCH_LIMIT}"
        )));
    }
    let mut query = SearchQuery {
        terms,
        conv: args.conv,
        from: args.from,
        after_ts: args.after_ts,
        before_ts: args.before_ts,
        limit,
        offset: 0,
    };
    if let Some(cursor) = &args.cursor {
        query.offset = decode_cursor(cursor, &query)?;
    }
    if query.offset >= limits.search_max_results {
        return Err(Refusal::bad(format!(
            "a search pages through at most {} hits (search_max_results)",
            limits.search_max_results
        )));
    }
    Ok(query)
}

/// `q` as words, `"phrases"` and `prefix*`es, separated by white space.
pub fn parse_q(q: &str) -> Result<Vec<Term>, Refusal> {
    let mut terms = Vec::new();
    let mut rest = q.trim_start();
    while !rest.is_empty() {
        let (term, after) = if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted
                .find('"')
                .ok_or_else(|| Refusal::bad("q has an unterminated \"phrase\""))?;
            (Term::Phrase(quoted[..end].to_string()), &quoted[end + 1..])
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let word = &rest[..end];
            let term = match word.strip_suffix('*') {
                Some(prefix) if !prefix.is_empty() => Term::Prefix(prefix.to_string()),
                Some(_) => return Err(Refusal::bad("q has a '*' with no prefix before it")),
                None => Term::Word(word.to_string()),
            };
            (term, &rest[end..])
        };
        terms.push(term);
        if terms.len() > MAX_QUERY_TERMS {
            return Err(Refusal::bad(format!(
                "q holds more than {MAX_QUERY_TERMS} words, phrases and prefixes"
            )));
        }
        rest = after.trim_start();
    }
    if terms.is_empty() {
        return Err(Refusal::bad("q is empty"));
    }
    Ok(terms)
}

/// The cursor of the page after `query`'s: opaque to clients, bound to the query so that
/// it cannot page another one.
pub fn next_cursor(query: &SearchQuery) -> String {
    let offset = (query.offset + query.limit) as u64;
    let mut bytes = fingerprint(query).to_vec();
    bytes.extend_from_slice(&offset.to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_cursor(cursor: &str, query: &SearchQuery) -> Result<usize, Refusal> {
    let invalid = || Refusal::bad("cursor is not one this server gave for this query");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let (print, offset) = bytes.split_at_checked(8).ok_or_else(invalid)?;
    let offset: [u8; 8] = offset.try_into().map_err(|_| invalid())?;
    if print != fingerprint(query) {
        return Err(invalid());
    }
    usize::try_from(u64::from_be_bytes(offset)).map_err(|_| invalid())
}

/// What the query asks, less its page: the same query with other paging has the same.
fn fingerprint(query: &SearchQuery) -> [u8; 8] {
    let mut hash = Sha256::new();
    let field = |hash: &mut Sha256, tag: u8, text: &str| {
        hash.update([tag]);
        hash.update((text.len() as u64).to_be_bytes());
        hash.update(text.as_bytes());
    };
    for term in &query.terms {
        match term {
            Term::Word(w) => field(&mut hash, b'w', w),
            Term::Phrase(p) => field(&mut hash, b'p', p),
            Term::Prefix(p) => field(&mut hash, b'*', p),
        }
    }
    if let Some(conv) = &query.conv {
        field(&mut hash, b'c', conv);
    }
    if let Some(from) = &query.from {
        field(&mut hash, b'f', from);
    }
    for (tag, bound) in [(b'a', query.after_ts), (b'b', query.before_ts)] {
        if let Some(ts) = bound {
            field(&mut hash, tag, &ts.to_string());
        }
    }
    field(&mut hash, b'l', &query.limit.to_string());
    let digest = hash.finalize();
    let mut print = [0u8; 8];
    print.copy_from_slice(&digest[..8]);
    print
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ChatLimits {
        ChatLimits::default()
    }

    #[test]
    fn q_holds_words_phrases_and_prefixes() {
        let terms = parse_q(r#" Crème  "brûlée recipe" choco* e-mail "#).unwrap();
        assert_eq!(
            terms,
            vec![
                Term::Word("Crème".into()),
                Term::Phrase("brûlée recipe".into()),
                Term::Prefix("choco".into()),
                Term::Word("e-mail".into()),
            ]
        );
    }

    #[test]
    fn a_bad_q_is_refused() {
        for q in [
            "",
            "   ",
            "\"open",
            "*",
            "a *",
            &"w ".repeat(MAX_QUERY_TERMS + 1),
        ] {
            assert!(parse_q(q).is_err(), "{q:?}");
        }
        let long = format!(r#"{{"q":"{}"}}"#, "a".repeat(MAX_QUERY_BYTES + 1));
        assert!(parse(&long, &limits()).is_err());
    }

    #[test]
    fn limit_and_filters_are_checked() {
        let l = limits();
        assert_eq!(
            parse(r#"{"q":"x"}"#, &l).unwrap().limit,
            DEFAULT_SEARCH_LIMIT
        );
        assert!(parse(r#"{"q":"x","limit":0}"#, &l).is_err());
        assert!(parse(r#"{"q":"x","limit":101}"#, &l).is_err());
        assert!(parse(r#"{"q":"x","from":"no spaces"}"#, &l).is_err());
        assert!(parse(r#"{"q":"x","conv":""}"#, &l).is_err());
        assert!(parse(r#"{"q":"x","after_ts":-1}"#, &l).is_err());
    }

    #[test]
    fn a_cursor_pages_only_its_own_query() {
        let l = limits();
        let first = parse(r#"{"q":"x","limit":5}"#, &l).unwrap();
        let cursor = next_cursor(&first);
        let doc = format!(r#"{{"q":"x","limit":5,"cursor":"{cursor}"}}"#);
        assert_eq!(parse(&doc, &l).unwrap().offset, 5);
        let other = format!(r#"{{"q":"y","limit":5,"cursor":"{cursor}"}}"#);
        assert!(parse(&other, &l).is_err());
        assert!(parse(r#"{"q":"x","cursor":"garbage!"}"#, &l).is_err());
    }

    #[test]
    fn paging_stops_at_search_max_results() {
        let l = ChatLimits {
            search_max_results: 10,
            ..limits()
        };
        let mut query = parse(r#"{"q":"x","limit":5}"#, &l).unwrap();
        query.offset = 5;
        let cursor = next_cursor(&query);
        let doc = format!(r#"{{"q":"x","limit":5,"cursor":"{cursor}"}}"#);
        assert!(parse(&doc, &l).is_err());
    }
}
