//! Shared pieces of Parley's command-line tools.

pub mod load;
pub mod quic;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parley_router::auth::{Claims, JwtKey};

/// Name of the secret file `parleyd` creates in its data directory.
pub const JWT_SECRET_FILE: &str = "jwt-secret";

/// The HS256 secret: given directly, or read from a data directory.
pub fn load_secret(secret: Option<&str>, data_dir: Option<&Path>) -> Result<String, String> {
    match (secret, data_dir) {
        (Some(secret), _) => Ok(secret.to_string()),
        (None, Some(dir)) => {
            let path = dir.join(JWT_SECRET_FILE);
            let text = std::fs::read_to_string(&path)
                .map_err(|error| format!("{}: {error}", path.display()))?;
            let secret = text.trim();
            if secret.is_empty() {
                return Err(format!("{}: file is empty", path.display()));
            }
            Ok(secret.to_string())
        }
        (None, None) => {
            Err("give --secret, PARLEY_JWT_SECRET, or --data-dir of the parleyd".into())
        }
    }
}

/// Split `16KiB` into `(16, "KiB")`; `None` without leading digits.
pub fn split_number_unit(text: &str) -> Option<(u64, &str)> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    Some((digits.parse().ok()?, unit))
}

/// Parse `250ms`, `90`, `90s`, `15m`, `1h` or `2d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (value, unit) = split_number_unit(text)
        .ok_or_else(|| format!("{text:?} is not a duration such as 90s, 15m, 1h or 2d"))?;
    let seconds = match unit {
        "ms" => return Ok(Duration::from_millis(value)),
        "" | "s" => value,
        "m" => value * 60,
        "h" => value * 3600,
        "d" => value * 86_400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    Ok(Duration::from_secs(seconds))
}

/// A token for `user` valid for `ttl` from now.
pub fn mint_token(secret: &str, user: &str, device: Option<&str>, ttl: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    JwtKey::new(secret.as_bytes()).sign(&Claims {
        sub: user.to_string(),
        exp: now + ttl.as_secs(),
        dev: device.map(str::to_string),
    })
}

/// Turn a typed line into a command document: JSON passes through (an `id` is added if
/// missing), and `op key=value ...` is shorthand for `{"op": op, "key": value, ...}`.
pub fn line_to_command(line: &str, id: u64) -> Result<String, String> {
    let line = line.trim();
    let mut command = if line.starts_with('{') {
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
            .map_err(|error| format!("not a JSON object: {error}"))?
    } else {
        let mut words = line.split_whitespace();
        let op = words.next().ok_or("empty line")?;
        let mut map = serde_json::Map::new();
        map.insert("op".into(), op.into());
        for word in words {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| format!("{word:?} is not key=value"))?;
            // Numbers, booleans, arrays and objects as JSON; anything else as a string.
            let value = serde_json::from_str(value).unwrap_or_else(|_| value.into());
            map.insert(key.into(), value);
        }
        map
    };
    command.entry("id").or_insert_with(|| id.into());
    Ok(serde_json::Value::Object(command).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn shorthand_and_json_lines() {
        let doc: serde_json::Value =
            serde_json::from_str(&line_to_command("send conv=c1 body=hi seq=3", 7).unwrap())
                .unwrap();
        assert_eq!(
            doc,
            serde_json::json!({"op": "send", "conv": "c1", "body": "hi", "seq": 3, "id": 7})
        );
        let doc: serde_json::Value =
            serde_json::from_str(&line_to_command(r#"{"op":"ping","id":1}"#, 9).unwrap()).unwrap();
        assert_eq!(doc["id"], 1);
        assert!(line_to_command("{not json", 1).is_err());
        assert!(line_to_command("send conv", 1).is_err());
    }

    #[test]
    fn minted_tokens_verify() {
        let token = mint_token("s", "alice", Some("phone"), Duration::from_secs(60));
        let claims = JwtKey::new(b"s").verify(&token, 0).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.dev.as_deref(), Some("phone"));
    }
}
