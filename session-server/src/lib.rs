//! The SessionStore server: user sessions and login rate limits in Redis,
//! served over gRPC (`sessionstore.v1.SessionStore`).
//!
//! A request flows through these modules:
//!
//! - [`server`]: the transport: tonic, the logging layer, gRPC health,
//!   reflection and graceful shutdown. [`server::run`] is the entry point,
//!   given a [`server::ServerSettings`] that `config` builds (as it builds
//!   the store's `Settings`); it imports neither `config` nor clap.
//!   Split as tonic's `transport/server/`: the assembly (`server/mod.rs`),
//!   binding, accepting and guarding connections (`incoming`), TLS
//!   handshakes and certificate reloads (`tls`), readiness as a pure state
//!   step with a thin loop over Redis (`readiness`), and dispatch by
//!   service (`routes`).
//! - [`methods`]: the table of served methods (label, streaming, health),
//!   built once from the descriptor sets; what the layers ask of a path.
//! - [`observe`]: one log line and the metrics of each RPC.
//! - [`trace`]: OpenTelemetry traces, off unless OTEL_EXPORTER_OTLP_ENDPOINT
//!   is set: the span per RPC (made by `observe`) and per Redis operation
//!   (`store/op.rs`), the caller's `traceparent`, the bounded export.
//! - `log_gate`: the one rate limit on log lines (the RPC log, the Redis
//!   failure and contention warnings, the failed-accept warning), counting
//!   the lines it leaves out.
//! - `shutdown`: open streams end when the listener closes, so the drain
//!   does not wait for them.
//! - [`limits`]: the concurrency cap and per-call deadline.
//! - [`auth`]: optional bearer-token authentication of callers.
//! - [`metrics`]: metric names, the Prometheus recorder and `/metrics`.
//! - [`service`]: the generated trait's implementation; thin handlers.
//! - [`watch`]: the WatchRevocations response stream.
//! - `convert`: proto messages to and from domain types, with validation.
//! - [`model`]: the domain types; ids are validated on construction.
//! - [`store`]: Redis: the key layout, the Lua scripts and the pool, one
//!   concern per file (sessions, login limiter, connection, credentials,
//!   revocations). It imports neither `config` nor clap.
//! - [`error`]: the error type and its single mapping to gRPC codes.
//! - [`config`]: every setting, from the environment or flags (`config.rs`:
//!   the definitions), how single values parse (`config/values.rs`), the
//!   rules across settings (`config/validate.rs`), and the typed settings of
//!   the server, the store and the traces built from them
//!   (`config/components.rs`).

#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
// Public only for the fuzz target in `fuzz/` (it feeds decoded requests through
// the same validation as the handlers); not part of the supported API.
#[doc(hidden)]
pub mod convert;
pub mod error;
pub mod limits;
mod log_gate;
pub mod methods;
pub mod metrics;
pub mod model;
pub mod observe;
#[cfg(test)]
mod proptests;
mod secret_file;
pub mod server;
pub mod service;
mod shutdown;
pub mod store;
pub mod trace;
pub mod watch;

pub use config::Config;
pub use error::Error;
pub use store::Store;
