//! Each component's typed settings, built from [`Config`] in the units the
//! component uses, so that no component imports `config` (the way
//! linkerd2-proxy's `env.rs` builds each component's config): the store's
//! [`Settings`], the server's [`ServerSettings`], the traces'
//! [`TraceSettings`].

use std::time::Duration;

use crate::secret_file;
use crate::server::{Bounds, ReadinessPolicy, ServerSettings, TlsFiles};
use crate::store::{Settings, credentials::password_from_file};
use crate::trace::TraceSettings;

use super::Config;

impl Config {
    /// The store's share of the configuration, reading the Redis password and
    /// CA files.
    ///
    /// # Errors
    ///
    /// A message naming the variable whose file cannot be read.
    pub fn store_settings(&self) -> Result<Settings, String> {
        let redis_password = self
            .redis_password_file
            .as_ref()
            .map(|path| secret_file::read("REDIS_PASSWORD_FILE", path))
            .transpose()?
            .map(|bytes| password_from_file(&bytes));
        let redis_ca_pem = self
            .redis_ca_file
            .as_ref()
            .map(|path| secret_file::read("REDIS_CA_FILE", path))
            .transpose()?;
        Ok(Settings {
            mode: self.redis_mode,
            redis_url: self.redis_url.clone(),
            sentinel_master: self.redis_sentinel_master.clone(),
            key_prefix: self.key_prefix.clone(),
            session_ttl: Duration::from_secs(self.session_ttl),
            session_ttl_max: Duration::from_secs(self.session_ttl_max),
            session_max_lifetime: Duration::from_secs(self.session_max_lifetime),
            rotation_grace: Duration::from_millis(self.rotation_grace_ms),
            max_sessions_per_user: self.max_sessions_per_user,
            limit_policy: self.session_limit_policy,
            rate_limit_window: Duration::from_secs(self.rate_limit_window),
            rate_limit_max_attempts: self.rate_limit_max_attempts,
            rate_limit_account_max_attempts: self.rate_limit_account_max_attempts,
            rate_limit_ipv6_prefix: self.rate_limit_ipv6_prefix,
            rate_limit_device_max_attempts: self.rate_limit_device_max_attempts,
            login_device_ttl: Duration::from_secs(self.login_device_ttl),
            login_device_max: self.login_device_max,
            login_device_lockout_factor: self.login_device_lockout_factor,
            pool_size: self.redis_pool_size,
            timeout: Duration::from_millis(self.redis_timeout_ms),
            revocation_heartbeat: Duration::from_millis(self.revocation_heartbeat_ms),
            revocation_min_replicas: self.revocation_min_replicas,
            revocation_replica_timeout: Duration::from_millis(self.revocation_replica_timeout_ms),
            owner_grace: crate::store::OWNER_GRACE,
            redis_password,
            redis_ca_pem,
            redis_password_file: self.redis_password_file.clone(),
            redis_ca_file: self.redis_ca_file.clone(),
        })
    }

    /// The server's share of the configuration, in the units the server
    /// uses. Its files (AUTH_TOKENS_FILE, TLS_*) are read by the server when
    /// it starts, and again when they change.
    pub fn server_settings(&self) -> ServerSettings {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        };
        ServerSettings {
            health_addr: self.health_addr,
            health_check_interval: Duration::from_millis(self.health_check_interval_ms),
            readiness: ReadinessPolicy {
                allow_eviction: self.redis_allow_eviction,
                follows_redis: self
                    .readiness_follows_redis
                    .then_some(self.readiness_redis_failures),
            },
            max_request_bytes: usize::try_from(self.max_request_bytes).unwrap_or(usize::MAX),
            auth_tokens_file: self.auth_tokens_file.clone(),
            max_concurrent_requests: usize::try_from(self.max_concurrent_requests)
                .unwrap_or(usize::MAX),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_connection_age: (self.max_connection_age > 0)
                .then(|| Duration::from_secs(self.max_connection_age)),
            max_connection_age_grace: Duration::from_secs(self.max_connection_age_grace),
            shutdown_delay: Duration::from_millis(self.shutdown_delay_ms),
            tls,
            bounds: Bounds::with_max_connections(
                usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            ),
        }
    }

    /// The traces' share of the configuration: `None` (no traces) unless
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set and not empty.
    pub fn trace_settings(&self) -> Option<TraceSettings> {
        let endpoint = self
            .otel_exporter_otlp_endpoint
            .as_ref()
            .filter(|endpoint| !endpoint.trim().is_empty())?;
        Some(TraceSettings {
            endpoint: endpoint.clone(),
            service_name: self.otel_service_name.clone(),
            sampler: self.otel_traces_sampler,
            ratio: self.otel_traces_sampler_arg,
            max_queue: usize::try_from(self.otel_bsp_max_queue_size).unwrap_or(usize::MAX),
        })
    }
}
