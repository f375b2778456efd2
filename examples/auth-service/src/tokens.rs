//! The two credentials the service signs: the access token every API checks
//! (`sub`, `jti` = the session's token id, `sid` = its family id), and the
//! refresh credential only `/refresh` reads (the same three ids, the family's
//! end as its expiry). Both are HS256 JWTs told apart by their audience, so
//! one can never be used as the other.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The audience of access tokens.
const ACCESS: &str = "access";
/// The audience of refresh credentials.
const REFRESH: &str = "refresh";

/// The claims of both credentials.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The session's token id in SessionStore.
    pub jti: String,
    /// The session's family id: a secret like the token id. In the access
    /// token too, so that logout and the session list can say which family
    /// is the caller's; drop it from there if other services must not see
    /// it.
    pub sid: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// `"access"` or `"refresh"`: which of the two credentials this is.
    pub aud: String,
}

/// Signs and checks the service's credentials.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(***)")
    }
}

impl Keys {
    /// Keys from the HS256 secret.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// An access token for the session `(sub, jti)` of family `sid`, valid
    /// for `ttl`.
    pub fn access(&self, sub: &str, jti: &str, sid: &str, ttl: Duration) -> String {
        let now = unix(SystemTime::now());
        self.sign(Claims {
            sub: sub.to_owned(),
            jti: jti.to_owned(),
            sid: sid.to_owned(),
            exp: now + ttl.as_secs(),
            iat: now,
            aud: ACCESS.to_owned(),
        })
    }

    /// A refresh credential for the session `(sub, jti)` of family `sid`,
    /// valid until the family's end.
    pub fn refresh(&self, sub: &str, jti: &str, sid: &str, family_end: SystemTime) -> String {
        self.sign(Claims {
            sub: sub.to_owned(),
            jti: jti.to_owned(),
            sid: sid.to_owned(),
            exp: unix(family_end),
            iat: unix(SystemTime::now()),
            aud: REFRESH.to_owned(),
        })
    }

    /// The claims of a valid, unexpired access token.
    pub fn check_access(&self, token: &str) -> Option<Claims> {
        self.check(token, ACCESS)
    }

    /// The claims of a valid, unexpired refresh credential.
    pub fn check_refresh(&self, token: &str) -> Option<Claims> {
        self.check(token, REFRESH)
    }

    fn sign(&self, claims: Claims) -> String {
        // HS256 over serde-serialisable claims cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signs any claims")
    }

    fn check(&self, token: &str, audience: &str) -> Option<Claims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()
            .map(|data| data.claims)
    }
}

/// `bytes` random bytes from the operating system, as hex: token ids and
/// the default signing key.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buffer);
    buffer.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}
