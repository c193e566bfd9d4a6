//! Mutual challenge–response on the cluster secret. No secret crosses the wire, and the
//! server reads nothing but the handshake from a peer until that peer has proved itself.
//!
//! ```text
//! client -> server: AUTH_MAGIC, client_nonce[32]
//! server -> client: server_nonce[32], HMAC(secret, "tessera-server" | client_nonce | server_nonce)
//! client -> server: HMAC(secret, "tessera-client" | server_nonce | client_nonce)
//! server -> client: 1 byte AUTH_OK, or the connection is closed
//! ```
//! Fresh nonces on both sides defeat replay; the distinct labels stop a peer from
//! reflecting one side's proof back as the other's.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::fmt;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const AUTH_MAGIC: [u8; 8] = *b"TSAUTH01";
pub const NONCE_BYTES: usize = 32;
pub const PROOF_BYTES: usize = 32;
pub const AUTH_OK: u8 = 0xA5;
/// A peer that does not finish the handshake in this time is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; 32]);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        ClusterSecret(b)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Result<Self, AuthError> {
        let t = text.trim();
        if t.len() != 64 || !t.is_ascii() {
            return Err(AuthError::BadSecret);
        }
        let mut b = [0u8; 32];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| AuthError::BadSecret)?;
        }
        Ok(ClusterSecret(b))
    }

    fn proof(&self, label: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(first);
        mac.update(second);
        mac
    }
}

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("the cluster secret must be 64 hex digits")]
    BadSecret,
    #[error("peer is not a Tessera endpoint (bad handshake magic)")]
    BadMagic,
    #[error("peer failed authentication (wrong cluster secret?)")]
    Rejected,
    #[error("authentication timed out")]
    Timeout,
    #[error("connection failed during authentication: {0}")]
    Io(#[from] std::io::Error),
}

fn nonce() -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

async fn with_timeout<T>(f: impl std::future::Future<Output = Result<T, AuthError>>) -> Result<T, AuthError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f).await.map_err(|_| AuthError::Timeout)?
}

/// Client side: proves itself and checks the server's proof.
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: &ClusterSecret,
) -> Result<(), AuthError> {
    with_timeout(async {
        let client_nonce = nonce();
        let mut hello = [0u8; 8 + NONCE_BYTES];
        hello[..8].copy_from_slice(&AUTH_MAGIC);
        hello[8..].copy_from_slice(&client_nonce);
        stream.write_all(&hello).await?;
        stream.flush().await?;
        let mut challenge = [0u8; NONCE_BYTES + PROOF_BYTES];
        stream.read_exact(&mut challenge).await?;
        let (server_nonce, server_proof) = challenge.split_at(NONCE_BYTES);
        secret
            .proof(b"tessera-server", &client_nonce, server_nonce)
            .verify_slice(server_proof)
            .map_err(|_| AuthError::Rejected)?;
        let proof = secret.proof(b"tessera-client", server_nonce, &client_nonce).finalize().into_bytes();
        stream.write_all(&proof).await?;
        stream.flush().await?;
        let mut ok = [0u8; 1];
        stream.read_exact(&mut ok).await.map_err(|_| AuthError::Rejected)?;
        if ok[0] != AUTH_OK {
            return Err(AuthError::Rejected);
        }
        Ok(())
    })
    .await
}

/// Server side: nothing else is read from the peer until this returns `Ok`.
pub async fn authenticate_server<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: &ClusterSecret,
) -> Result<(), AuthError> {
    with_timeout(async {
        let mut hello = [0u8; 8 + NONCE_BYTES];
        stream.read_exact(&mut hello).await?;
        if hello[..8] != AUTH_MAGIC {
            return Err(AuthError::BadMagic);
        }
        let client_nonce = &hello[8..];
        let server_nonce = nonce();
        let proof = secret.proof(b"tessera-server", client_nonce, &server_nonce).finalize().into_bytes();
        let mut challenge = [0u8; NONCE_BYTES + PROOF_BYTES];
        challenge[..NONCE_BYTES].copy_from_slice(&server_nonce);
        challenge[NONCE_BYTES..].copy_from_slice(&proof);
        stream.write_all(&challenge).await?;
        stream.flush().await?;
        let mut client_proof = [0u8; PROOF_BYTES];
        stream.read_exact(&mut client_proof).await?;
        secret
            .proof(b"tessera-client", &server_nonce, client_nonce)
            .verify_slice(&client_proof)
            .map_err(|_| AuthError::Rejected)?;
        stream.write_all(&[AUTH_OK]).await?;
        stream.flush().await?;
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_secret_authenticates() {
        let s = ClusterSecret::generate();
        let (mut a, mut b) = tokio::io::duplex(1024);
        let s2 = s.clone();
        let server = tokio::spawn(async move { authenticate_server(&mut b, &s2).await });
        authenticate_client(&mut a, &s).await.unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_both_ways() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move { authenticate_server(&mut b, &ClusterSecret::generate()).await });
        assert!(authenticate_client(&mut a, &ClusterSecret::generate()).await.is_err());
        drop(a);
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move { authenticate_server(&mut b, &ClusterSecret::generate()).await });
        a.write_all(&[0u8; 64]).await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(AuthError::BadMagic)));
    }

    #[test]
    fn secret_hex_round_trip() {
        let s = ClusterSecret::generate();
        assert_eq!(ClusterSecret::from_hex(&s.to_hex()).unwrap(), s);
        assert!(ClusterSecret::from_hex("zz").is_err());
        assert!(ClusterSecret::from_hex(&"é".repeat(32)).is_err());
        assert!(!format!("{s:?}").contains(&s.to_hex()));
    }
}
