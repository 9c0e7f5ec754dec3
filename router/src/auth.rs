//! JWT HS256 verification and minting (PROTOCOL.md section 2).
//!
//! Hand-rolled on RustCrypto's `hmac`/`sha2` rather than a general JWT crate: Parley
//! accepts exactly one algorithm, and owning the ~100 lines keeps the `alg: none` and
//! algorithm-confusion classes of bug out by construction, with no crypto backend choice.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The longest token accepted; a bound on the work an unauthenticated peer can cause.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Why a token was refused. Every variant maps to close code 4001.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("token is not three base64url segments")]
    Malformed,
    #[error("token header is not {{\"alg\":\"HS256\"}}")]
    UnsupportedAlgorithm,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token claims are not valid JSON with sub and exp")]
    BadClaims,
    #[error("token expired")]
    Expired,
    #[error("token subject is not a valid user id (1-64 bytes of [A-Za-z0-9._@-])")]
    BadSubject,
}

/// The identity a verified token carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

/// True for 1-64 bytes of `[A-Za-z0-9._@-]` (user and device ids share the rule).
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: &'a str,
}

/// Verifies and mints HS256 tokens with one shared secret.
#[derive(Clone)]
pub struct JwtKey {
    mac: HmacSha256,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKey(..)")
    }
}

impl JwtKey {
    pub fn new(secret: &[u8]) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        Self { mac }
    }

    /// Verify `token` at wall-clock time `now_unix_s`.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let header = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| AuthError::Malformed)?;
        let header: Header = serde_json::from_slice(&header).map_err(|_| AuthError::Malformed)?;
        if header.alg != "HS256" {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| AuthError::Malformed)?;
        let signed_len = token.len() - signature_len(token);
        let mut mac = self.mac.clone();
        mac.update(&token.as_bytes()[..signed_len]);
        // verify_slice compares in constant time.
        mac.verify_slice(&signature)
            .map_err(|_| AuthError::BadSignature)?;
        let claims = URL_SAFE_NO_PAD
            .decode(claims)
            .map_err(|_| AuthError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&claims).map_err(|_| AuthError::BadClaims)?;
        if claims.exp <= now_unix_s {
            return Err(AuthError::Expired);
        }
        if !is_valid_id(&claims.sub) {
            return Err(AuthError::BadSubject);
        }
        if let Some(dev) = &claims.dev {
            if !is_valid_id(dev) {
                return Err(AuthError::BadClaims);
            }
        }
        Ok(claims)
    }

    /// Mint a token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = serde_json::to_vec(claims).expect("claims serialize");
        let mut token = format!("{header}.{}", URL_SAFE_NO_PAD.encode(body));
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        token.push('.');
        token.push_str(&signature);
        token
    }
}

/// Length of the `.signature` suffix, including the dot.
fn signature_len(token: &str) -> usize {
    token.rfind('.').map_or(0, |dot| token.len() - dot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            exp,
            dev: Some("phone".into()),
        }
    }

    #[test]
    fn round_trip() {
        let key = JwtKey::new(b"secret");
        let token = key.sign(&claims(100));
        assert_eq!(key.verify(&token, 99), Ok(claims(100)));
    }

    #[test]
    fn expired_wrong_key_and_tampering_are_refused() {
        let key = JwtKey::new(b"secret");
        let token = key.sign(&claims(100));
        assert_eq!(key.verify(&token, 100), Err(AuthError::Expired));
        assert_eq!(
            JwtKey::new(b"other").verify(&token, 1),
            Err(AuthError::BadSignature)
        );
        let forged = key.sign(&Claims {
            sub: "mallory".into(),
            ..claims(100)
        });
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = forged.split('.').nth(1).unwrap();
        assert_eq!(
            key.verify(&parts.join("."), 1),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let body = URL_SAFE_NO_PAD.encode(br#"{"sub":"alice","exp":9999999999}"#);
        let token = format!("{header}.{body}.");
        assert_eq!(
            JwtKey::new(b"k").verify(&token, 1),
            Err(AuthError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let key = JwtKey::new(b"k");
        for token in ["", "a", "a.b", "a.b.c.d", "!!.!!.!!"] {
            assert_eq!(key.verify(token, 1), Err(AuthError::Malformed), "{token}");
        }
        assert_eq!(key.verify(&"a".repeat(5000), 1), Err(AuthError::TooLong));
    }

    #[test]
    fn bad_subject_is_refused() {
        let key = JwtKey::new(b"k");
        let token = key.sign(&Claims {
            sub: "no spaces".into(),
            exp: 10,
            dev: None,
        });
        assert_eq!(key.verify(&token, 1), Err(AuthError::BadSubject));
    }

    #[test]
    fn id_rule() {
        assert!(is_valid_id("a.b_c@d-1"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id("é"));
    }
}
