//! The trusted-device cookie: one per account, so a shared browser keeps one
//! per person; read from the request's `Cookie` headers, written as an
//! HttpOnly, Secure, SameSite=Strict `__Host-` cookie (sent only over HTTPS,
//! or to localhost, never seen by page scripts, never sent cross-site).

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};

/// The cookie's name for `account`: `__Host-device-` and a hash of the
/// account, so the name does not show the account (FNV-1a: a stable name,
/// not a secret).
pub fn name(account: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in account.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("__Host-device-{hash:016x}")
}

/// The value of the cookie `name` in the request, if sent.
pub fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The `Set-Cookie` value storing `token` under `name`; `None` if the token
/// is not valid header text (the server's tokens always are).
pub fn set(name: &str, token: &str, max_age: Duration) -> Option<HeaderValue> {
    HeaderValue::try_from(format!(
        "{name}={token}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={}",
        max_age.as_secs()
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_named_cookie_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        headers.append(header::COOKIE, HeaderValue::from_static("c=3"));
        assert_eq!(get(&headers, "b"), Some("2"));
        assert_eq!(get(&headers, "c"), Some("3"));
        assert_eq!(get(&headers, "d"), None);
    }

    #[test]
    fn one_stable_name_per_account() {
        assert_eq!(name("alice"), name("alice"));
        assert_ne!(name("alice"), name("bob"));
        assert!(name("alice").starts_with("__Host-device-"));
    }
}
