//! The login limiter through [`SessionClient`]: counting attempts (per
//! address, account and trusted device), resetting them after a successful
//! login, and forgetting an account's devices.

use sessionstore::v1 as pb;

#[cfg(doc)]
use crate::error::Error;
use crate::{
    error::Result,
    types::{self, LoginAttempt, LoginReset},
};

use super::SessionClient;

impl SessionClient {
    /// Counts one login attempt from a client address (IPv4, or IPv6 counted
    /// per the server's RATE_LIMIT_IPV6_PREFIX network) and says whether it
    /// may proceed. Without an account, a reset clears everything the address
    /// did: prefer [`record_login_attempt_for`](Self::record_login_attempt_for)
    /// when the account is known.
    ///
    /// Retried only when the server provably never processed the request
    /// (each attempt counts, so a repeat after it may have reached the
    /// server would count twice).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `ip`; [`Error::Unavailable`],
    /// [`Error::Overloaded`], [`Error::DeadlineExceeded`] (the attempt may
    /// have been counted),
    /// [`Error::Unauthenticated`], [`Error::Other`]; see [`Error::is_retryable`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let verdict = client.record_login_attempt("192.0.2.1").await?;
    /// if let Some(wait) = verdict.retry_after {
    ///     println!("too many attempts; retry in {} s", wait.as_secs());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn record_login_attempt(&self, ip: impl Into<String>) -> Result<LoginAttempt> {
        self.login_attempt(ip.into(), String::new(), String::new())
            .await
    }

    /// Counts one login attempt from a client address for an account (login
    /// name, email or user id; any UTF-8 up to 256 bytes, sent as is and
    /// hashed by the server), against the address's limit and the account's
    /// together; [`LoginAttempt::refused_by`] says which refused. Call it
    /// before checking the password, and after a successful login call
    /// [`reset_login_attempts_for`](Self::reset_login_attempts_for) with the
    /// same account.
    ///
    /// Retried only when the server provably never processed the request, as
    /// [`record_login_attempt`](Self::record_login_attempt).
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt`](Self::record_login_attempt), and
    /// [`Error::InvalidArgument`] naming `account` when it is over 256 bytes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let verdict = client
    ///     .record_login_attempt_for("192.0.2.1", "alice@example.com")
    ///     .await?;
    /// if !verdict.allowed {
    ///     println!("refused by {:?}", verdict.refused_by);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn record_login_attempt_for(
        &self,
        ip: impl Into<String>,
        account: impl Into<String>,
    ) -> Result<LoginAttempt> {
        self.login_attempt(ip.into(), account.into(), String::new())
            .await
    }

    /// As [`record_login_attempt_for`](Self::record_login_attempt_for),
    /// presenting the device token an earlier successful login of this
    /// account issued to this client (read from its cookie). When the token
    /// is valid for the account, the attempt counts against that device alone
    /// ([`LoginAttempt::device_trusted`]), so an attacker who locked the
    /// account or the address does not lock its owner out; otherwise it
    /// counts as without a token (never an error). An empty token is none.
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt_for`](Self::record_login_attempt_for), and
    /// [`Error::InvalidArgument`] naming `device_token` when it is over 256
    /// bytes or not printable ASCII.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient, cookie: &str) -> session_client::Result<()> {
    /// let verdict = client
    ///     .record_login_attempt_with_device("192.0.2.1", "alice@example.com", cookie)
    ///     .await?;
    /// if !verdict.allowed {
    ///     println!("refused by {:?}", verdict.refused_by);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn record_login_attempt_with_device(
        &self,
        ip: impl Into<String>,
        account: impl Into<String>,
        device_token: impl Into<String>,
    ) -> Result<LoginAttempt> {
        self.login_attempt(ip.into(), account.into(), device_token.into())
            .await
    }

    async fn login_attempt(
        &self,
        ip: String,
        account: String,
        device_token: String,
    ) -> Result<LoginAttempt> {
        let request = pb::RecordLoginAttemptRequest {
            ip,
            account,
            device_token,
        };
        let response = self
            .shared
            .caller
            .write("RecordLoginAttempt", request, |mut stub, req| async move {
                stub.record_login_attempt(req).await
            })
            .await?;
        types::login_attempt_from_proto(response)
    }

    /// Clears a client address's whole login attempt counter. Returns whether
    /// a counter existed.
    ///
    /// Weaker than [`reset_login_attempts_for`](Self::reset_login_attempts_for):
    /// a client that owns any account can clear its guesses against other
    /// accounts by logging in to its own. Use it only when the account is
    /// unknown.
    ///
    /// Retried only when the server provably never processed the request
    /// (see [`SessionClient`]).
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt`](Self::record_login_attempt).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// client.reset_login_attempts("192.0.2.1").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reset_login_attempts(&self, ip: impl Into<String>) -> Result<bool> {
        self.reset_login(ip.into(), String::new(), String::new(), false)
            .await
            .map(|reset| reset.reset)
    }

    /// After a successful login: clears the account's counter and the
    /// address's attempts for that account only; what the address did against
    /// other accounts stays counted. Returns whether any attempt was cleared.
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt_for`](Self::record_login_attempt_for).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// client
    ///     .reset_login_attempts_for("192.0.2.1", "alice@example.com")
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reset_login_attempts_for(
        &self,
        ip: impl Into<String>,
        account: impl Into<String>,
    ) -> Result<bool> {
        self.reset_login(ip.into(), account.into(), String::new(), false)
            .await
            .map(|reset| reset.reset)
    }

    /// After a successful login: as
    /// [`reset_login_attempts_for`](Self::reset_login_attempts_for), with the
    /// device token the login presented (empty for none), and issuing a new
    /// one when `issue_device_token` is set ([`LoginReset::device_token`]:
    /// set it as this account's HttpOnly, Secure cookie). A valid token
    /// presented clears only that device's attempts (a login from a trusted
    /// device proves nothing about the others) and, with an issue, is
    /// replaced by the new one.
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt_with_device`](Self::record_login_attempt_with_device).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient, cookie: &str) -> session_client::Result<()> {
    /// let outcome = client
    ///     .reset_login_attempts_with_device("192.0.2.1", "alice@example.com", cookie, true)
    ///     .await?;
    /// if let Some(token) = outcome.device_token {
    ///     // Set-Cookie: __Host-device=<token>; HttpOnly; Secure; SameSite=Strict; Path=/
    ///     # let _ = token;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reset_login_attempts_with_device(
        &self,
        ip: impl Into<String>,
        account: impl Into<String>,
        device_token: impl Into<String>,
        issue_device_token: bool,
    ) -> Result<LoginReset> {
        self.reset_login(
            ip.into(),
            account.into(),
            device_token.into(),
            issue_device_token,
        )
        .await
    }

    async fn reset_login(
        &self,
        ip: String,
        account: String,
        device_token: String,
        issue_device_token: bool,
    ) -> Result<LoginReset> {
        let request = pb::ResetLoginAttemptsRequest {
            ip,
            account,
            issue_device_token,
            device_token,
        };
        let response = self
            .shared
            .caller
            .write("ResetLoginAttempts", request, |mut stub, req| async move {
                stub.reset_login_attempts(req).await
            })
            .await?;
        Ok(LoginReset {
            reset: response.reset,
            device_token: Some(response.device_token).filter(|token| !token.is_empty()),
        })
    }

    /// Forgets every device token of an account (after a password reset, or
    /// when its owner says "this wasn't me"): each is untrusted from now on.
    /// Returns how many unexpired tokens were forgotten.
    ///
    /// # Errors
    ///
    /// As [`record_login_attempt_for`](Self::record_login_attempt_for).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: session_client::SessionClient) -> session_client::Result<()> {
    /// let forgotten = client.forget_login_devices("alice@example.com").await?;
    /// # let _ = forgotten;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn forget_login_devices(&self, account: impl Into<String>) -> Result<u32> {
        let request = pb::ForgetLoginDevicesRequest {
            account: account.into(),
        };
        let response = self
            .shared
            .caller
            .write("ForgetLoginDevices", request, |mut stub, req| async move {
                stub.forget_login_devices(req).await
            })
            .await?;
        Ok(response.forgotten)
    }
}
