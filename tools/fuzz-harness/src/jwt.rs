//! Target `jwt`: the HS256 verifier (router/src/auth.rs).
//!
//! Input: one mode byte. Mode even: the rest is the token (lossy UTF-8). Mode odd: the
//! rest is a header and a claims object (split at the first NUL, each base64url-encoded
//! here) that this target signs with the server's key, so that inputs get past the
//! signature to the header and claims parsing.
//!
//! Invariants:
//! - a token over `MAX_TOKEN_BYTES` is `TooLong`, whatever it holds;
//! - an accepted token is three base64url parts whose HMAC-SHA256 under the key is the
//!   third (computed here, apart from auth.rs), whose header says HS256, whose subject
//!   and device are valid ids, and which had not expired; under any other key, or at
//!   its expiry, the same token is refused;
//! - a token signed here with the server's key is never refused for its signature;
//! - claims re-signed by the key verify to the same claims.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use parley_router::auth::{is_valid_id, AuthError, JwtKey, MAX_TOKEN_BYTES};
use sha2::Sha256;

use crate::fixture::{self, NOW_MS, SECRET};

pub fn jwt(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let signed_here = mode % 2 == 1;
    let token = if signed_here {
        let (header, claims) = match rest.iter().position(|&b| b == 0) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], rest),
        };
        sign(SECRET, header, claims)
    } else {
        String::from_utf8_lossy(rest).into_owned()
    };
    let now_s = NOW_MS / 1000;
    let key = fixture::key();
    let verdict = key.verify(&token, now_s);
    if token.len() > MAX_TOKEN_BYTES {
        assert_eq!(verdict, Err(AuthError::TooLong));
        return;
    }
    if signed_here {
        assert_ne!(verdict, Err(AuthError::BadSignature), "{token}");
    }
    let Ok(claims) = verdict else {
        return;
    };
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let signed = &token[..parts[0].len() + 1 + parts[1].len()];
    let signature = URL_SAFE_NO_PAD
        .decode(parts[2])
        .expect("signature is base64url");
    assert_eq!(signature, mac(SECRET, signed.as_bytes()), "{token}");
    // The header's alg, read as a JWT library reads it; its other members are not
    // parleyd's to check (they may even hold bytes that are not UTF-8, which the verifier
    // skips unread: the signature already vouches for them).
    #[derive(serde::Deserialize)]
    struct Header {
        alg: String,
    }
    let header = URL_SAFE_NO_PAD
        .decode(parts[0])
        .expect("header is base64url");
    let header: Header = serde_json::from_slice(&header).expect("header has an alg");
    assert_eq!(header.alg, "HS256", "{token}");
    assert!(claims.exp > now_s);
    assert!(is_valid_id(&claims.sub));
    assert!(claims.dev.as_deref().is_none_or(is_valid_id));
    assert!(JwtKey::new(b"another secret")
        .verify(&token, now_s)
        .is_err());
    assert_eq!(key.verify(&token, claims.exp), Err(AuthError::Expired));
    assert_eq!(key.verify(&key.sign(&claims), now_s).as_ref(), Ok(&claims));
}

/// `header.claims.signature` as a client's library would make it.
pub fn sign(secret: &[u8], header: &[u8], claims: &[u8]) -> String {
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = URL_SAFE_NO_PAD.encode(mac(secret, signed.as_bytes()));
    format!("{signed}.{signature}")
}

fn mac(secret: &[u8], bytes: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(bytes);
    mac.finalize().into_bytes().to_vec()
}
