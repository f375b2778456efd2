//! The Redis secrets: the one reloader of REDIS_PASSWORD_FILE and
//! REDIS_CA_FILE ([`Secrets`]), what a password file holds, and how
//! REDIS_URL is shown in logs without its passwords. Here, beside the
//! connections that use them, so that `config` uses the store's helpers and
//! the store never imports `config`. The files are read as every secret file
//! is ([`crate::secret_file`]).

use std::fmt;

use super::Settings;

/// The one reloader of REDIS_PASSWORD_FILE and REDIS_CA_FILE, shared by the
/// pool's connector and the revocation subscriber's pub/sub connections, so
/// that both use the same credentials: those read last by either. Each new
/// connection asks it (rare: the pool keeps its connections, the subscriber
/// keeps its subscription), so a rotated Secret needs no restart.
#[derive(Debug)]
pub(super) struct Secrets {
    /// What the files held at the last read that succeeded.
    last: std::sync::Mutex<Credentials>,
}

impl Secrets {
    /// The credentials `settings` were built with (read at start).
    pub(super) fn new(settings: &Settings) -> Self {
        Self {
            last: std::sync::Mutex::new(Credentials {
                password: settings.redis_password.clone(),
                ca_pem: settings.redis_ca_pem.clone(),
            }),
        }
    }

    /// The credentials the files hold now, remembered as the last read; a
    /// file that cannot be read gives what was last read from it.
    pub(super) fn current(&self, settings: &Settings) -> Credentials {
        // A poisoned lock only means another thread panicked mid-read; the
        // value is plain data, replaced as a whole, and still usable. The
        // files are small and local: read under the lock, so that concurrent
        // connections agree on the last credentials read.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = last.reread(settings);
        *last = now.clone();
        now
    }
}

/// The Redis password and CA as REDIS_PASSWORD_FILE and REDIS_CA_FILE held
/// them at one read (see [`Secrets`]). A file that cannot be read keeps what
/// was last read from it (logged).
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Credentials {
    password: Option<String>,
    ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// The settings' credentials, re-read from their files when set; a file
    /// that cannot be read (a Secret briefly swapped, a rename in progress)
    /// gives these, the last read: after a rotation, falling back to the
    /// value read at start would bring back the old password, which Redis
    /// now refuses.
    fn reread(&self, settings: &Settings) -> Self {
        let read = |path: &Option<std::path::PathBuf>, variable: &str| {
            crate::secret_file::read(variable, path.as_ref()?)
                .inspect_err(|error| {
                    tracing::warn!(%error,
                        "cannot re-read a Redis secret; new connections use the one read before");
                })
                .ok()
        };
        Self {
            password: match read(&settings.redis_password_file, "REDIS_PASSWORD_FILE") {
                Some(bytes) => Some(password_from_file(&bytes)),
                None => self.password.clone(),
            },
            ca_pem: read(&settings.redis_ca_file, "REDIS_CA_FILE").or_else(|| self.ca_pem.clone()),
        }
    }

    /// `settings` with these credentials.
    pub(super) fn apply(&self, settings: &Settings) -> Settings {
        Settings {
            redis_password: self.password.clone(),
            redis_ca_pem: self.ca_pem.clone(),
            ..settings.clone()
        }
    }
}

/// The password a REDIS_PASSWORD_FILE holds: its text without the trailing
/// line break editors and `echo` add.
pub(crate) fn password_from_file(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches(['\r', '\n'])
        .to_string()
}

/// REDIS_URL fit for logs and `Debug`: in each comma-separated URL the
/// password becomes `***`, keeping the scheme, user name, host, port and
/// database readable.
///
/// Errs on the side of hiding: user info without a `:` is hidden whole (it may
/// be a password written in the wrong place), as is a query other than `db`,
/// `protocol` and `user` (a unix socket's `pass=`) and a fragment other than
/// `insecure`; a URL whose `@` cannot be placed is hidden but for its scheme.
pub(crate) fn redact_redis_urls(urls: &str) -> String {
    urls.split(',')
        .map(redact_redis_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_redis_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(end) => url.split_at(end + 3),
        None => ("", url),
    };
    // User info runs to the last `@`, so that a password holding an
    // unescaped `@` is still hidden whole.
    let Some(at) = rest.rfind('@') else {
        return format!("{scheme}{}", redact_after_userinfo(rest));
    };
    let (userinfo, tail) = rest.split_at(at);
    if userinfo.contains(['/', '?', '#']) {
        // The `@` may sit in a path, query or fragment (a `pass=` value):
        // nothing after the scheme can be shown safely.
        return format!("{scheme}***");
    }
    let shown = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}{shown}{}", redact_after_userinfo(tail))
}

/// Host, port and path are kept; a query or fragment only when known to hold
/// no secret.
fn redact_after_userinfo(tail: &str) -> String {
    let (before_fragment, fragment) = match tail.split_once('#') {
        Some((before, "insecure")) => (before, "#insecure"),
        Some((before, _)) => (before, "#***"),
        None => (tail, ""),
    };
    let (location, query) = match before_fragment.split_once('?') {
        Some((location, query)) => (location, Some(query)),
        None => (before_fragment, None),
    };
    let safe_pair = |pair: &str| {
        pair.split_once('=').is_some_and(|(key, value)| {
            matches!(key, "db" | "protocol" | "user")
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
    };
    let query = match query {
        Some(query) if query.split('&').all(safe_pair) => format!("?{query}"),
        Some(_) => "?***".to_string(),
        None => String::new(),
    };
    format!("{location}{query}{fragment}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_url_passwords_are_redacted() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "redis://:secret@redis-host:6379",
                "redis://:***@redis-host:6379",
            ),
            ("rediss://app:secret@h:6380/2", "rediss://app:***@h:6380/2"),
            (
                "rediss://app:secret@h/0?protocol=resp3#insecure",
                "rediss://app:***@h/0?protocol=resp3#insecure",
            ),
            ("redis://secret@h", "redis://***@h"),
            ("redis://:se@cr:et@h:1", "redis://:***@h:1"),
            ("redis://:se/cret@h", "redis://***"),
            (
                "redis+unix:///run/redis.sock?db=1",
                "redis+unix:///run/redis.sock?db=1",
            ),
            (
                "redis+unix:///run/r.sock?db=1&pass=secret",
                "redis+unix:///run/r.sock?***",
            ),
            ("redis+unix:///run/r.sock?pass=se@cret", "redis+unix://***"),
            (
                "redis+unix:///run/r.sock?pass=se#cret",
                "redis+unix:///run/r.sock?***#***",
            ),
            (
                "redis://:secret@n1:7000, redis://:secret@n2:7001,rediss://u:secret@n3",
                "redis://:***@n1:7000, redis://:***@n2:7001,rediss://u:***@n3",
            ),
        ] {
            let redacted = redact_redis_urls(url);
            assert_eq!(redacted, shown, "{url}");
            assert!(
                !redacted.contains("secret") && !redacted.contains("cret"),
                "{url}"
            );
        }
    }
}
