//! End-to-end tests: the real server, started in-process on a port-0 listener,
//! called over gRPC, against a real Redis. One binary with a module per area,
//! so the whole stack is linked once.

mod auth_service;
mod client;
mod client_resilience;
mod commands;

mod connection_age;
mod devices;
mod eviction;
mod failover;
mod families;
mod faults;
mod finality;
mod health;
mod kubernetes;
mod metrics;
mod near_cache;
mod process;
mod properties;
mod rate_limit;
mod require_session;
mod review_others;
mod revocations;
mod security;
mod sessions;
mod shortening;
mod streams;
mod support;
mod traces;
mod validation;
