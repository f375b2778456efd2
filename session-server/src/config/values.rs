//! How single values of the configuration are parsed: the store's and the
//! traces' enums (`clap::ValueEnum` implemented here, so that neither the
//! store nor `trace` depends on the command-line library), the sampler's
//! ratio and the key prefix.

use clap::{ValueEnum, builder::PossibleValue};

use crate::store::{LimitPolicy, RedisMode};
use crate::trace::TraceSampler;

// The store's enums are parsed here, not derived in the store, so that the
// store does not depend on the command-line library. The names, the alias
// and the help text are those `#[derive(clap::ValueEnum)]` gave them (the
// variants' doc comments, without their final period), so `--help` and the
// errors for bad values read as before.
impl ValueEnum for RedisMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Standalone, Self::Cluster, Self::Sentinel]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Standalone => {
                PossibleValue::new("standalone").help("One Redis server (REDIS_URL is its URL)")
            }
            Self::Cluster => PossibleValue::new("cluster").help(
                "Redis Cluster (REDIS_URL is a comma-separated list of seed nodes); the \
                 connection follows MOVED/ASK redirections and failovers itself",
            ),
            Self::Sentinel => PossibleValue::new("sentinel").help(
                "A master found through Redis Sentinel (REDIS_URL is a comma-separated list of \
                 sentinels, REDIS_SENTINEL_MASTER the master's name); a broken connection is \
                 replaced by one to whichever master the sentinels name",
            ),
        })
    }
}

impl ValueEnum for LimitPolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::EvictOldest, Self::Reject]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::EvictOldest => PossibleValue::new("evict_oldest")
                .alias("evict-oldest")
                .help("Revoke the user's oldest sessions (closest to expiry) to make room"),
            Self::Reject => {
                PossibleValue::new("reject").help("Refuse the new session (created = false)")
            }
        })
    }
}

// The names the OpenTelemetry SDKs give OTEL_TRACES_SAMPLER's values.
impl ValueEnum for TraceSampler {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            Self::AlwaysOn,
            Self::AlwaysOff,
            Self::TraceIdRatio,
            Self::ParentBasedAlwaysOn,
            Self::ParentBasedAlwaysOff,
            Self::ParentBasedTraceIdRatio,
        ]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::AlwaysOn => PossibleValue::new("always_on").help("Every trace"),
            Self::AlwaysOff => PossibleValue::new("always_off").help("No trace"),
            Self::TraceIdRatio => PossibleValue::new("traceidratio")
                .help("A fraction (OTEL_TRACES_SAMPLER_ARG) of the traces, by trace id"),
            Self::ParentBasedAlwaysOn => PossibleValue::new("parentbased_always_on")
                .help("The caller's decision; every trace that starts here"),
            Self::ParentBasedAlwaysOff => PossibleValue::new("parentbased_always_off")
                .help("The caller's decision; no trace that starts here"),
            Self::ParentBasedTraceIdRatio => PossibleValue::new("parentbased_traceidratio")
                .help("The caller's decision; a fraction of the traces that start here"),
        })
    }
}

/// OTEL_TRACES_SAMPLER_ARG: a fraction from 0 to 1.
pub(super) fn parse_ratio(value: &str) -> Result<f64, String> {
    let ratio: f64 = value.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err("must be from 0 to 1".into())
    }
}

/// KEY_PREFIX: no hash-tag braces, at most 128 bytes.
pub(super) fn parse_key_prefix(value: &str) -> Result<String, String> {
    if value.contains(['{', '}']) {
        return Err("must not contain '{' or '}'".into());
    }
    if value.len() > 128 {
        return Err("must be at most 128 bytes".into());
    }
    Ok(value.to_string())
}
