//! [`Builder::connect`]: the settings checked (everything that needs no
//! network), the endpoints dialed or resolved, and the client assembled from
//! its parts: the pool, the attempt loop's policy and budget, the near-cache.

use std::sync::Arc;

use tonic::transport::Endpoint;

use crate::{
    balance::{Discovery, Member, Pool, Seed, system_resolver},
    call::{CallPolicy, Caller},
    client::SessionClient,
    endpoint::{Dialer, is_https},
    error::{Error, Result},
    metadata::Auth,
    near_cache::NearCacheSettings,
    retry::RetryThrottle,
};

use super::Builder;

impl Builder {
    /// Builds the client; with [`lazy`](Self::lazy) off, also connects.
    ///
    /// Must run inside a Tokio runtime: connections, reconnection probes and
    /// DNS refreshes run as tasks there.
    ///
    /// # Errors
    ///
    /// - [`Error::Config`] when an endpoint is not an `http://` or `https://`
    ///   URL; a TLS option is set for an `http://` endpoint; a CA or identity
    ///   holds no PEM certificate (or the key no PEM key); an `https://`
    ///   endpoint has no CA and the system has no roots; a bearer token would
    ///   go to an `http://` endpoint without
    ///   [`allow_plaintext_token`](Self::allow_plaintext_token), or cannot be
    ///   a header; a timeout, refresh interval or the retry budget is out of
    ///   range; the near-cache's `max_entries` or `max_staleness` is zero.
    /// - [`Error::Unavailable`] when not lazy and no endpoint can be reached,
    ///   or (DNS discovery) no endpoint's name resolves to any address.
    pub async fn connect(self) -> Result<SessionClient> {
        self.validate()?;
        let dialer = Dialer::new(self.connect_timeout, self.tls.clone());
        let mut statics = Vec::new();
        let mut seeds = Vec::new();
        let mut plaintext = None;
        for url in &self.endpoints {
            let endpoint = dialer.endpoint(url, None)?;
            let uri = endpoint.uri();
            let https = is_https(uri, url)?;
            if !https && plaintext.is_none() {
                plaintext = Some(url.clone());
            }
            if self.dns_refresh.is_some() {
                let host = uri.host().unwrap_or_default();
                seeds.push(Seed {
                    https,
                    host: host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                    port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
                });
            } else {
                statics.push((url.clone(), endpoint));
            }
        }
        let auth = Auth::new(
            self.bearer_token.as_deref(),
            plaintext.filter(|_| !self.allow_plaintext_token),
        )?;

        let mut discovery = self.dns_refresh.map(|refresh| Discovery {
            seeds,
            resolver: self.resolver.clone().unwrap_or_else(system_resolver),
            dialer,
            refresh,
            known: Vec::new(),
        });
        let targets = match discovery.as_mut() {
            None => statics,
            Some(discovery) => match discovery.resolve().await {
                Ok(targets) => targets,
                // A lazy client starts with no address and keeps resolving.
                Err(_) if self.lazy => Vec::new(),
                Err(err) => return Err(err),
            },
        };
        let members = targets
            .into_iter()
            .map(|(url, endpoint)| Member::lazy(url, endpoint))
            .collect();
        let pool = Pool::new(members);
        if !self.lazy {
            pool.connect_any(self.connect_timeout).await?;
        }
        if let Some(discovery) = discovery {
            tokio::spawn(discovery.run(Arc::downgrade(&pool)));
        }
        let caller = Caller {
            pool,
            auth: Arc::new(auth),
            policy: CallPolicy {
                timeout: self.timeout,
                attempt_timeout: self.attempt_timeout,
                retry: self.retry,
            },
            throttle: RetryThrottle::new(self.retry_max_tokens, self.retry_token_ratio),
        };
        let near_cache = self.near_cache.map(|max_entries| NearCacheSettings {
            max_entries,
            max_staleness: self.near_cache_max_staleness,
            stream_lifetime: self.near_cache_stream_lifetime,
            metadata: self.near_cache_metadata,
        });
        Ok(SessionClient::new(caller, near_cache))
    }

    /// The checks that need no network.
    fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            // `new` starts the list with one endpoint and nothing removes any.
            return Err(Error::config("no endpoint given"));
        }
        if self.timeout.is_zero() {
            return Err(Error::config("timeout must be above zero"));
        }
        if self.attempt_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::config("attempt_timeout must be above zero"));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::config("connect_timeout must be above zero"));
        }
        if self.dns_refresh.is_some_and(|t| t.is_zero()) {
            return Err(Error::config("the DNS refresh interval must be above zero"));
        }
        if self.near_cache == Some(0) {
            return Err(Error::config(
                "near_cache: max_entries must be above zero (leave near_cache unset to turn it off)",
            ));
        }
        if self.near_cache_max_staleness.is_zero() {
            return Err(Error::config("near_cache_max_staleness must be above zero"));
        }
        if self.near_cache_stream_lifetime.is_zero() {
            return Err(Error::config(
                "near_cache_stream_lifetime must be above zero",
            ));
        }
        if !(1..=1000).contains(&self.retry_max_tokens) {
            return Err(Error::config(format!(
                "retry_throttling: max_tokens must be 1 to 1000, not {}",
                self.retry_max_tokens
            )));
        }
        let ratio = self.retry_token_ratio;
        if !(ratio.is_finite() && ratio > 0.0 && ratio <= f64::from(self.retry_max_tokens)) {
            return Err(Error::config(format!(
                "retry_throttling: token_ratio must be above 0 and at most max_tokens, not {ratio}"
            )));
        }
        // Endpoint URLs before PEM, so that a TLS option on an http://
        // endpoint is reported as such.
        for url in &self.endpoints {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::config(format!("endpoint {url:?} is not a URL: {e}")))?;
            if !is_https(endpoint.uri(), url)? && self.tls.is_set() {
                // tonic would silently speak plaintext to an http:// endpoint.
                return Err(Error::config(format!(
                    "TLS options are set but endpoint {url:?} is http://; use https://"
                )));
            }
        }
        self.tls.validate()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn config_error(builder: Builder) -> String {
        match builder.connect().await {
            Err(Error::Config(err)) => err.to_string(),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    /// Endpoints without an http(s) scheme, or not URLs, are config errors naming the endpoint.
    #[tokio::test]
    async fn endpoints_must_be_http_or_https_urls() {
        assert!(
            config_error(SessionClient::builder("127.0.0.1:50051"))
                .await
                .contains("http://")
        );
        assert!(
            config_error(SessionClient::builder("ftp://host:1"))
                .await
                .contains("http://")
        );
        assert!(
            config_error(SessionClient::builder("http://[bad"))
                .await
                .contains("not a URL")
        );
        let second_bad = SessionClient::builder("http://127.0.0.1:1").endpoint("nope nope");
        assert!(config_error(second_bad).await.contains("nope nope"));
    }

    /// TLS options with an http:// endpoint are refused instead of silently sending plaintext.
    #[tokio::test]
    async fn tls_options_need_https() {
        let builder = SessionClient::builder("http://127.0.0.1:50051").ca_certificate("pem");
        assert!(config_error(builder).await.contains("https://"));
    }

    /// A CA certificate that does not parse is a config error at connect.
    #[tokio::test]
    async fn unparsable_pem_is_a_config_error() {
        let builder = SessionClient::builder("https://127.0.0.1:50051").ca_certificate(
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        );
        config_error(builder).await;
    }

    /// A path (or any text) passed as the CA or identity is a config error
    /// naming the setting, not an empty root store.
    #[tokio::test]
    async fn pem_without_a_certificate_is_a_config_error() {
        let builder =
            SessionClient::builder("https://127.0.0.1:50051").ca_certificate("/etc/ca.pem");
        let err = config_error(builder).await;
        assert!(
            err.contains("ca_certificate holds no PEM certificate"),
            "{err}"
        );
        let builder = SessionClient::builder("https://127.0.0.1:50051")
            .identity("/etc/client.pem", "/etc/client.key");
        let err = config_error(builder).await;
        assert!(err.contains("identity certificate holds no PEM"), "{err}");
    }

    /// A bearer token with a line break is a config error at connect.
    #[tokio::test]
    async fn a_bad_bearer_token_is_a_config_error() {
        let builder = SessionClient::builder("http://127.0.0.1:50051")
            .allow_plaintext_token(true)
            .bearer_token("a\r\nb");
        assert!(config_error(builder).await.contains("bearer token"));
    }

    /// A bearer token to any http:// endpoint needs the explicit opt-in.
    #[tokio::test]
    async fn a_plaintext_bearer_token_needs_the_opt_in() {
        let builder = SessionClient::builder("https://127.0.0.1:50051")
            .endpoint("http://127.0.0.1:50052")
            .bearer_token("t");
        let err = config_error(builder).await;
        assert!(
            err.contains("plaintext") && err.contains("allow_plaintext_token"),
            "{err}"
        );
        let allowed = SessionClient::builder("http://127.0.0.1:50051")
            .bearer_token("t")
            .allow_plaintext_token(true)
            .connect()
            .await;
        assert!(allowed.is_ok(), "{allowed:?}");
    }

    /// Out-of-range timeouts and retry budgets are config errors.
    #[tokio::test]
    async fn out_of_range_settings_are_config_errors() {
        let base = || SessionClient::builder("http://127.0.0.1:50051");
        assert!(
            config_error(base().timeout(Duration::ZERO))
                .await
                .contains("timeout")
        );
        assert!(
            config_error(base().attempt_timeout(Duration::ZERO))
                .await
                .contains("attempt_timeout")
        );
        assert!(
            config_error(base().dns_discovery(Duration::ZERO))
                .await
                .contains("DNS")
        );
        assert!(
            config_error(base().retry_throttling(0, 0.1))
                .await
                .contains("max_tokens")
        );
        let err = config_error(base().near_cache(0)).await;
        assert!(err.contains("near_cache: max_entries"), "{err}");
        let err = config_error(
            base()
                .near_cache(10)
                .near_cache_max_staleness(Duration::ZERO),
        )
        .await;
        assert!(err.contains("near_cache_max_staleness"), "{err}");
        let err = config_error(
            base()
                .near_cache(10)
                .near_cache_stream_lifetime(Duration::ZERO),
        )
        .await;
        assert!(err.contains("near_cache_stream_lifetime"), "{err}");
        for ratio in [0.0, -1.0, f64::NAN, 11.0] {
            assert!(
                config_error(base().retry_throttling(10, ratio))
                    .await
                    .contains("token_ratio"),
                "{ratio}"
            );
        }
    }

    /// A timeout of `Duration::MAX` ("no limit") neither overflows the clock
    /// nor hangs a call to a server that refuses connections.
    #[tokio::test]
    async fn a_huge_timeout_is_accepted() {
        let client = SessionClient::builder("http://127.0.0.1:1")
            .timeout(Duration::MAX)
            .connect_timeout(Duration::MAX)
            .initial_backoff(Duration::from_millis(1))
            .connect()
            .await
            .unwrap();
        let result = client.get_session("t").await;
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
    }

    /// The default (lazy) client is built with nothing listening.
    #[tokio::test]
    async fn lazy_is_the_default_and_needs_no_server() {
        // Nothing listens on port 1; a lazy client is still built.
        let client = SessionClient::builder("http://127.0.0.1:1").connect().await;
        assert!(client.is_ok());
    }
}
