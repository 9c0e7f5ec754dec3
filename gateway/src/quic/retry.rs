//! Stateless retry tokens (RFC 9000 section 8.1.2): a new client proves that it owns its
//! address by echoing a token bound to that address, the time and the connection ids,
//! before the endpoint allocates anything for it. The key is process-wide
//! ([`QuicKeys::retry`](super::QuicKeys)), so any shard checks a token another minted.

use std::net::SocketAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use parley_router::clock::Now;
use sha2::Sha256;

/// A retry token is honoured this long after it was issued.
const RETRY_TOKEN_LIFETIME: Duration = Duration::from_secs(10);
const RETRY_TOKEN_MAGIC: &[u8; 4] = b"prt1";
const RETRY_MAC_BYTES: usize = 16;

/// Mints and checks retry tokens with the process's retry key.
pub(super) struct RetryTokens {
    key: [u8; 32],
}

impl RetryTokens {
    pub(super) fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// `magic | issued (unix s, u64) | odcid len | odcid | mac`, the MAC binding the
    /// client's address, the time, the original id and the retry's source id.
    pub(super) fn mint(
        &self,
        now: Now,
        from: SocketAddr,
        odcid: &[u8],
        retry_scid: &[u8],
    ) -> Vec<u8> {
        // quiche parses connection ids of at most 20 bytes (RFC 9000 section 17.2).
        debug_assert!(
            odcid.len() <= quiche::MAX_CONN_ID_LEN,
            "odcid of {} bytes",
            odcid.len()
        );
        let issued = now.unix_ms / 1000;
        let mut token = Vec::with_capacity(4 + 8 + 1 + odcid.len() + RETRY_MAC_BYTES);
        token.extend_from_slice(RETRY_TOKEN_MAGIC);
        token.extend_from_slice(&issued.to_be_bytes());
        token.push(odcid.len() as u8);
        token.extend_from_slice(odcid);
        let mac = self.mac(from, issued, odcid, retry_scid);
        token.extend_from_slice(&mac);
        token
    }

    /// The original destination id a valid token carries.
    pub(super) fn validate(
        &self,
        now: Now,
        from: SocketAddr,
        token: &[u8],
        retry_scid: &[u8],
    ) -> Option<Vec<u8>> {
        let rest = token.strip_prefix(RETRY_TOKEN_MAGIC)?;
        let issued = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let odcid_len = usize::from(*rest.get(8)?);
        let odcid = rest.get(9..9 + odcid_len)?;
        let mac = rest.get(9 + odcid_len..)?;
        let age = (now.unix_ms / 1000).checked_sub(issued)?;
        if age > RETRY_TOKEN_LIFETIME.as_secs() || mac.len() != RETRY_MAC_BYTES {
            return None;
        }
        let expected = self.mac(from, issued, odcid, retry_scid);
        // Constant time: the MAC is a secret-derived value.
        let differs = expected
            .iter()
            .zip(mac)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (differs == 0).then(|| odcid.to_vec())
    }

    fn mac(
        &self,
        from: SocketAddr,
        issued: u64,
        odcid: &[u8],
        retry_scid: &[u8],
    ) -> [u8; RETRY_MAC_BYTES] {
        let mut mac =
            <Hmac<Sha256>>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        match from {
            SocketAddr::V4(addr) => mac.update(&addr.ip().octets()),
            SocketAddr::V6(addr) => mac.update(&addr.ip().octets()),
        }
        mac.update(&from.port().to_be_bytes());
        mac.update(&issued.to_be_bytes());
        mac.update(&[odcid.len() as u8]);
        mac.update(odcid);
        mac.update(retry_scid);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; RETRY_MAC_BYTES];
        out.copy_from_slice(&full[..RETRY_MAC_BYTES]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn at(unix_s: u64) -> Now {
        Now {
            instant: Instant::now(),
            unix_ms: unix_s * 1000,
        }
    }

    #[test]
    fn a_token_is_good_only_for_its_address_ids_key_and_lifetime() {
        let tokens = RetryTokens::new([7; 32]);
        let client: SocketAddr = "127.0.0.2:4000".parse().unwrap();
        let (odcid, scid) = (b"original-dcid".as_slice(), b"retry-scid-16byt".as_slice());
        let token = tokens.mint(at(1_000), client, odcid, scid);
        assert_eq!(
            tokens.validate(at(1_005), client, &token, scid).as_deref(),
            Some(odcid)
        );
        let lifetime = RETRY_TOKEN_LIFETIME.as_secs();
        assert!(tokens
            .validate(at(1_000 + lifetime), client, &token, scid)
            .is_some());
        assert!(tokens
            .validate(at(1_001 + lifetime), client, &token, scid)
            .is_none());
        // Issued in the future (a clock that went back): refused, not underflowed.
        assert!(tokens.validate(at(999), client, &token, scid).is_none());
        let other_port: SocketAddr = "127.0.0.2:4001".parse().unwrap();
        assert!(tokens
            .validate(at(1_005), other_port, &token, scid)
            .is_none());
        assert!(tokens
            .validate(at(1_005), client, &token, b"another-scid")
            .is_none());
        assert!(RetryTokens::new([8; 32])
            .validate(at(1_005), client, &token, scid)
            .is_none());
        for cut in 0..token.len() {
            assert!(tokens
                .validate(at(1_005), client, &token[..cut], scid)
                .is_none());
        }
        let mut flipped = token.clone();
        for byte in 0..flipped.len() {
            flipped[byte] ^= 1;
            assert!(
                tokens.validate(at(1_005), client, &flipped, scid).is_none(),
                "byte {byte} flipped"
            );
            flipped[byte] ^= 1;
        }
    }
}
