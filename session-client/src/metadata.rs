//! What the client adds to every attempt: the bearer token (replaceable at
//! run time, for rotation) and the attempt's deadline as `grpc-timeout`; the
//! near-cache's revocation stream carries the token alone.

use std::{
    fmt,
    sync::{PoisonError, RwLock},
    time::Duration,
};

use tonic::{
    Request,
    metadata::{AsciiMetadataValue, MetadataValue},
};

use crate::error::Error;

/// The bearer token sent with every call, shared by a client's clones.
pub(crate) struct Auth {
    authorization: RwLock<Option<AsciiMetadataValue>>,
    /// Why a token may not be set, when one would travel in plaintext and
    /// the builder did not allow it.
    plaintext: Option<String>,
}

impl Auth {
    /// Prepares the header once, so no call pays for formatting it.
    ///
    /// `plaintext` names an `http://` endpoint when the token would travel
    /// unencrypted and that was not allowed: then any token is refused.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the token cannot be a header value (it must be
    /// visible ASCII), or would travel in plaintext.
    pub(crate) fn new(
        bearer_token: Option<&str>,
        plaintext: Option<String>,
    ) -> Result<Self, Error> {
        let auth = Self {
            authorization: RwLock::new(None),
            plaintext,
        };
        if let Some(token) = bearer_token {
            auth.set(token)?;
        }
        Ok(auth)
    }

    /// Replaces the token for every later call.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new); the old token stays in use.
    pub(crate) fn set(&self, token: &str) -> Result<(), Error> {
        if let Some(url) = &self.plaintext {
            return Err(Error::config(format!(
                "a bearer token would be sent in plaintext to {url}; use https://, or \
                 allow_plaintext_token(true) when a sidecar encrypts the hop"
            )));
        }
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Error::config("the bearer token must be visible ASCII without line breaks")
        })?;
        // Keeps the token out of HPACK's dynamic table and out of logs.
        value.set_sensitive(true);
        *self
            .authorization
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(value);
        Ok(())
    }

    /// Adds the token (when there is one) and `timeout` as `grpc-timeout`, so
    /// the server stops working on an attempt its caller has given up on.
    pub(crate) fn prepare<T>(&self, request: &mut Request<T>, timeout: Duration) {
        self.authorize(request);
        request.set_timeout(timeout);
    }

    /// Adds the token (when there is one) and nothing else: for the
    /// revocation stream, which has no deadline.
    pub(crate) fn authorize<T>(&self, request: &mut Request<T>) {
        let authorization = self
            .authorization
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(authorization) = authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization);
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token.
        let set = self
            .authorization
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        f.debug_struct("Auth")
            .field("bearer_token", &set.then_some("<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token and grpc-timeout are added, a new token replaces the old, and Debug hides it.
    #[test]
    fn token_and_deadline_are_added_and_the_token_is_not_printed() {
        let auth = Auth::new(Some("s3cret"), None).unwrap();
        let mut request = Request::new(());
        auth.prepare(&mut request, Duration::from_millis(250));
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert_eq!(request.metadata().get("grpc-timeout").unwrap(), "250000u");
        assert!(!format!("{auth:?}").contains("s3cret"));

        auth.set("n3w").unwrap();
        let mut request = Request::new(());
        auth.prepare(&mut request, Duration::from_secs(1));
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer n3w"
        );

        let anonymous = Auth::new(None, None).unwrap();
        let mut request = Request::new(());
        anonymous.prepare(&mut request, Duration::from_secs(2));
        assert!(request.metadata().get("authorization").is_none());
    }

    /// A token that cannot be a header value, or would go out in plaintext, is refused.
    #[test]
    fn bad_or_plaintext_tokens_are_config_errors() {
        let err = Auth::new(Some("line\nbreak"), None).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        let auth = Auth::new(None, Some("http://host:1".into())).unwrap();
        let err = auth.set("t").unwrap_err();
        assert!(err.to_string().contains("allow_plaintext_token"), "{err}");
    }
}
