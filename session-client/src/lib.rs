//! A typed Rust client for SessionStore, the gRPC service that says whether a
//! JWT's session is still alive and makes logout and "sign out everywhere"
//! take effect at once.
//!
//! [`SessionClient`] wraps the generated stub the way a driver wraps its wire
//! protocol: it takes and returns domain types ([`Session`], [`Created`],
//! [`LoginAttempt`], `SystemTime`, `Duration`) and fails with an [`Error`]
//! whose variants are the cases a caller branches on, with
//! [`Error::is_retryable`] and [`Error::code`] for the rest.
//!
//! What it does for you:
//!
//! - **Balancing that survives a server going away.** One connection per
//!   endpoint (or per address of a DNS name, re-resolved periodically: see
//!   [`Builder::dns_discovery`], the way to spread load over a Kubernetes
//!   headless Service). An endpoint whose connection cannot be opened, or
//!   that leaves three attempts in a row unanswered (a hung server), gets no
//!   calls until a background probe reconnects it and its health check is
//!   answered.
//! - **One budget per call.** [`Builder::timeout`] bounds the whole call,
//!   retries included; each attempt sends the time left as `grpc-timeout`.
//! - **Retries that cannot make an outage worse.** Reads are retried on
//!   transient failures, writes only when the server provably never
//!   processed them (a connection that could not be opened, one the server
//!   was closing at `MAX_CONNECTION_AGE`); bounded per call and by a retry
//!   budget shared across calls.
//! - **Validity checks at memory speed, opt in.** [`Builder::near_cache`]
//!   answers repeated checks of a live session from memory, kept true by
//!   revocations the server pushes; a revoked session may be answered as
//!   alive for the stream's delivery latency, never longer than
//!   [`Builder::near_cache_max_staleness`].
//! - **Settings checked at start-up**: a CA that is not PEM, a bearer token
//!   over plaintext, are [`Error::Config`] from [`Builder::connect`].
//!
//! Modules, each importing only those listed after it (`builder` and
//! `require_session` → `client` → `call` and `near_cache` → `balance` →
//! `endpoint`; `retry`, `metadata`, `types` and `error` are leaves any of
//! them may use):
//!
//! - `builder`: [`Builder`]: the settings (endpoints and DNS discovery,
//!   timeouts, retries, TLS and mutual TLS, the bearer token, lazy or eager
//!   connection); `builder::connect` checks them and assembles a client.
//! - `client`: [`SessionClient`]: one method per RPC, speaking domain types,
//!   and the near-cache kept true around the calls that concern it; the
//!   methods in one file per area of the API (`client::sessions`: create,
//!   rotate, extend; `client::lookups`: get, count, list;
//!   `client::revocations`; `client::login`: the login limiter).
//! - `call`: the attempt loop: the budget per call, the pick of an endpoint
//!   per attempt, and the retry decisions (unit-tested there).
//! - `near_cache`: the opt-in near-cache ([`Builder::near_cache`]): its
//!   state and [`NearCacheStats`]; `near_cache::watcher` is the task that
//!   follows the revocation stream.
//! - `balance`: the per-address channels, their health, the pick, the eager
//!   connect and DNS discovery.
//! - `endpoint`: TLS settings and the dialer that turns a URL into a tonic
//!   endpoint.
//! - `require_session` (feature `tower`): `RequireSessionLayer`, tower
//!   middleware for axum and tonic services that lets a request through only
//!   while its session is live, and answers 401 / 503 (or their gRPC codes).
//! - `retry`: backoff, the shared retry budget, and deadlines.
//! - `metadata`: the bearer token (rotatable) and `grpc-timeout` per attempt.
//! - `types`: the domain types and their proto conversions.
//! - `error`: [`Error`] and its one mapping from gRPC status codes.
//! - `trace` (the `otel` feature): the call's and attempts' spans, and the
//!   `traceparent` each attempt carries.
//!
//! A new RPC gets its method in `client`, in the file of its area: domain
//! types in and out (with their conversions in `types`), sent through
//! `Caller::read` when it is safe to repeat or `Caller::write` when it is
//! not; the retries, deadline and balancing come with it.
//!
//! The generated code is re-exported as [`proto`] for anything the typed
//! client does not cover.
//!
//! # Examples
//!
//! Checking a request's JWT against SessionStore, failing closed when it
//! cannot answer:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use session_client::{Error, SessionClient};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     let client = SessionClient::builder("http://127.0.0.1:50051")
//!         .timeout(Duration::from_millis(500))
//!         .connect()
//!         .await?;
//!
//!     // The JWT's `sub` and `jti`, after its signature was checked.
//!     let (sub, jti) = ("user-42", "jti-7f3a");
//!     match client.get_user_session(sub, jti).await {
//!         Ok(Some(session)) => println!("valid until {:?}", session.expires_at),
//!         Ok(None) => println!("revoked or expired: 401"),
//!         Err(err) if err.is_retryable() => println!("503, retry later: {err}"),
//!         Err(err) => return Err(err),
//!     }
//!
//!     // Sign out everywhere.
//!     let ended = client.revoke_all_user_sessions(sub).await?;
//!     println!("ended {ended} sessions");
//!     Ok(())
//! }
//! ```

#![forbid(unsafe_code)]

mod balance;
mod builder;
mod call;
mod client;
mod endpoint;
mod error;
mod metadata;
mod near_cache;
#[cfg(feature = "tower")]
mod require_session;
mod retry;
#[cfg(feature = "otel")]
mod trace;
mod types;

pub use builder::Builder;
pub use client::SessionClient;
pub use error::{BoxError, CallError, Code, Error, Result};
/// The near-cache driven without a client, for `examples/near_cache_scale.rs`
/// only (feature `bench-internals`): not part of the API.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub use near_cache::bench as __near_cache_bench;
pub use near_cache::{CompactSession, NearCacheStats, SessionView};
#[cfg(feature = "tower")]
pub use require_session::{RequireSession, RequireSessionLayer, ResponseFuture, SessionUnchecked};
/// The generated `sessionstore.v1` messages and stub, for raw use.
pub use sessionstore::v1 as proto;
pub use types::{
    CreateOutcome, Created, LoginAttempt, LoginLimit, LoginReset, NewSession, RotateOutcome,
    Rotation, Session,
};
