//! Agent credentials: the one-string token an operator copies to an agent, and the handshake
//! signature both sides compute the same way.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frame::{is_short_id, AgentName, Hello, ServiceKind};

type HmacSha256 = Hmac<Sha256>;

/// Token prefix; versioned so the format can change without ambiguity.
const TOKEN_PREFIX: &str = "st1";

/// Bytes of secret in a freshly made credential.
pub const SECRET_BYTES: usize = 32;

/// Why a token could not be read. Never carries any part of the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not `st1.<name>.<key id>.<secret>`.
    #[error("token is not of the form st1.<agent>.<key-id>.<secret>")]
    Format,
    /// The agent name part is not a DNS label.
    #[error("token names an invalid agent")]
    AgentName,
    /// The key id part is not a short id.
    #[error("token has an invalid key id")]
    KeyId,
    /// The secret part is not base64url of the right length.
    #[error("token has an invalid secret")]
    Secret,
}

/// Secret key material. Has no `Display`, and `Debug` prints `<redacted>`, so it cannot end up in
/// a log line or an error by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps raw key bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }
    /// A fresh random secret.
    pub fn generate() -> Self {
        Secret((0..SECRET_BYTES).map(|_| rand::random::<u8>()).collect())
    }
    /// The raw bytes, for signing and storage only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Everything an agent needs to authenticate, in one copy-pasteable string.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken {
    /// Agent name.
    pub agent: AgentName,
    /// Key id the gateway stores the secret under.
    pub key_id: String,
    /// HMAC key.
    pub secret: Secret,
}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentToken")
            .field("agent", &self.agent)
            .field("key_id", &self.key_id)
            .field("secret", &self.secret)
            .finish()
    }
}

impl AgentToken {
    /// Parses `st1.<agent>.<key id>.<base64url secret>`. Surrounding whitespace is ignored.
    pub fn parse(s: &str) -> Result<Self, CredentialError> {
        let mut parts = s.trim().split('.');
        let (Some(prefix), Some(agent), Some(key_id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CredentialError::Format);
        };
        if prefix != TOKEN_PREFIX {
            return Err(CredentialError::Format);
        }
        let agent = AgentName::new(agent).ok_or(CredentialError::AgentName)?;
        if !is_short_id(key_id) || key_id.contains('.') {
            return Err(CredentialError::KeyId);
        }
        let secret = URL_SAFE_NO_PAD.decode(secret).map_err(|_| CredentialError::Secret)?;
        if secret.len() < 16 || secret.len() > 64 {
            return Err(CredentialError::Secret);
        }
        Ok(AgentToken {
            agent,
            key_id: key_id.to_owned(),
            secret: Secret(secret),
        })
    }

    /// The token string. Only for showing the operator once; never log it.
    pub fn reveal(&self) -> String {
        format!(
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.agent,
            self.key_id,
            URL_SAFE_NO_PAD.encode(self.secret.expose())
        )
    }
}

/// The canonical byte string a `Hello` signature covers: every field but the signature, in a
/// fixed order with unambiguous separators (lengths are prefixed, so no field can bleed into another).
pub fn signing_payload(h: &Hello) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(256);
    field(&mut out, b"strait-hello-v1");
    field(&mut out, h.agent.as_str().as_bytes());
    field(&mut out, h.instance_id.as_bytes());
    field(&mut out, h.key_id.as_bytes());
    field(&mut out, &h.timestamp_ms.to_be_bytes());
    field(&mut out, &h.nonce);
    field(&mut out, &h.version.to_be_bytes());
    out.extend_from_slice(&(h.capabilities.len() as u32).to_be_bytes());
    for c in &h.capabilities {
        field(&mut out, c.as_bytes());
    }
    out.extend_from_slice(&(h.services.len() as u32).to_be_bytes());
    for s in &h.services {
        field(&mut out, s.name.as_bytes());
        field(
            &mut out,
            match s.kind {
                ServiceKind::Http => b"http",
                ServiceKind::Tcp => b"tcp",
            },
        );
    }
    out
}

/// Computes the signature for a `Hello` (the `signature` field itself is ignored).
pub fn sign(secret: &Secret, h: &Hello) -> [u8; 32] {
    #[allow(clippy::expect_used)]
    let mut mac = HmacSha256::new_from_slice(secret.expose()).expect("HMAC takes keys of any length");
    mac.update(&signing_payload(h));
    mac.finalize().into_bytes().into()
}

/// Checks a `Hello`'s signature in constant time.
pub fn verify(secret: &Secret, h: &Hello) -> bool {
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.expose()) else {
        return false;
    };
    mac.update(&signing_payload(h));
    mac.verify_slice(&h.signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::ServiceDecl;

    fn hello() -> Hello {
        Hello {
            agent: AgentName::new("alpha").unwrap(),
            instance_id: "i-1".into(),
            key_id: "k1".into(),
            timestamp_ms: 1_700_000_000_000,
            nonce: [7; 16],
            signature: [0; 32],
            version: 1,
            capabilities: vec!["terminal".into()],
            services: vec![ServiceDecl {
                name: String::new(),
                kind: ServiceKind::Http,
            }],
        }
    }

    #[test]
    fn token_round_trips() {
        let t = AgentToken {
            agent: AgentName::new("alpha").unwrap(),
            key_id: "abc123".into(),
            secret: Secret::generate(),
        };
        assert_eq!(AgentToken::parse(&t.reveal()).unwrap(), t);
    }

    #[test]
    fn token_debug_hides_secret() {
        let t = AgentToken {
            agent: AgentName::new("alpha").unwrap(),
            key_id: "abc".into(),
            secret: Secret::new(vec![0xAB; 32]),
        };
        let printed = format!("{t:?}");
        assert!(printed.contains("<redacted>"));
        assert!(!printed.contains(&URL_SAFE_NO_PAD.encode(t.secret.expose())));
    }

    #[test]
    fn token_refuses_bad_forms() {
        assert_eq!(AgentToken::parse("nope"), Err(CredentialError::Format));
        assert_eq!(
            AgentToken::parse("st2.a.b.AAAAAAAAAAAAAAAAAAAAAA"),
            Err(CredentialError::Format)
        );
        assert_eq!(
            AgentToken::parse("st1.A!.b.AAAAAAAAAAAAAAAAAAAAAA"),
            Err(CredentialError::AgentName)
        );
        assert_eq!(
            AgentToken::parse("st1.a.b$.AAAAAAAAAAAAAAAAAAAAAA"),
            Err(CredentialError::KeyId)
        );
        assert_eq!(AgentToken::parse("st1.a.b.***"), Err(CredentialError::Secret));
        assert_eq!(AgentToken::parse("st1.a.b.AAAA"), Err(CredentialError::Secret));
    }

    #[test]
    fn signature_verifies_and_detects_tampering() {
        let secret = Secret::generate();
        let mut h = hello();
        h.signature = sign(&secret, &h);
        assert!(verify(&secret, &h));
        assert!(!verify(&Secret::generate(), &h));
        let mut t = h.clone();
        t.timestamp_ms += 1;
        assert!(!verify(&secret, &t));
        let mut t = h.clone();
        t.nonce[0] ^= 1;
        assert!(!verify(&secret, &t));
        let mut t = h.clone();
        t.services.push(ServiceDecl {
            name: "ssh".into(),
            kind: ServiceKind::Tcp,
        });
        assert!(!verify(&secret, &t));
    }
}
