//! [`Config::validate`]: the rules that involve more than one setting, and
//! the files read once to prove they are readable, checked before the server
//! listens. A rule on one value alone is its field's `value_parser`.

use crate::secret_file;
use crate::store::RedisMode;

use super::Config;

impl Config {
    /// Checks the rules that involve more than one setting.
    ///
    /// # Errors
    ///
    /// A message naming the variables at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.session_ttl > self.session_ttl_max {
            return Err(format!(
                "SESSION_TTL ({}) must not exceed SESSION_TTL_MAX ({})",
                self.session_ttl, self.session_ttl_max
            ));
        }
        if self.session_max_lifetime < self.session_ttl {
            return Err(format!(
                "SESSION_MAX_LIFETIME ({}) must be at least SESSION_TTL ({}): every session would \
                 be cut to its family's end",
                self.session_max_lifetime, self.session_ttl
            ));
        }
        for url in self.redis_url.split(',').map(str::trim) {
            if let Err(e) = redis::Client::open(url) {
                // The redis error never echoes the URL, so no password leaks here.
                return Err(format!("REDIS_URL is not a valid Redis URL: {e}"));
            }
        }
        if self.redis_mode == RedisMode::Standalone && self.redis_url.contains(',') {
            return Err("REDIS_URL lists several nodes: set REDIS_MODE=cluster or sentinel".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("TLS_CERT and TLS_KEY must be set together".into());
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err("TLS_CLIENT_CA needs TLS_CERT and TLS_KEY".into());
        }
        let files = [
            ("TLS_CERT", &self.tls_cert),
            ("TLS_KEY", &self.tls_key),
            ("TLS_CLIENT_CA", &self.tls_client_ca),
            ("AUTH_TOKENS_FILE", &self.auth_tokens_file),
            ("REDIS_PASSWORD_FILE", &self.redis_password_file),
            ("REDIS_CA_FILE", &self.redis_ca_file),
        ];
        for (variable, path) in files {
            if let Some(path) = path {
                secret_file::read(variable, path)?;
            }
        }
        if self.max_connection_age > 0
            && self.max_connection_age_grace.saturating_mul(1000) < self.request_timeout_ms
        {
            return Err(format!(
                "MAX_CONNECTION_AGE_GRACE ({} s) must be at least REQUEST_TIMEOUT_MS ({} ms), so \
                 a call in flight when its connection ages out is never cut",
                self.max_connection_age_grace, self.request_timeout_ms
            ));
        }
        if self.revocation_replica_timeout_ms >= self.redis_timeout_ms {
            return Err(format!(
                "REVOCATION_REPLICA_TIMEOUT_MS ({}) must be below REDIS_TIMEOUT_MS ({}), so a \
                 revocation's wait for its replicas ends within the operation's bound",
                self.revocation_replica_timeout_ms, self.redis_timeout_ms
            ));
        }
        if self.redis_timeout_ms >= self.request_timeout_ms {
            return Err(format!(
                "REDIS_TIMEOUT_MS ({}) must be below REQUEST_TIMEOUT_MS ({}), so Redis trouble is \
                 reported as UNAVAILABLE before the call's deadline",
                self.redis_timeout_ms, self.request_timeout_ms
            ));
        }
        Ok(())
    }
}
