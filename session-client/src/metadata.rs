//! What the client adds to every call, as a tonic interceptor: the bearer
//! token and the call's deadline as `grpc-timeout`.

use std::{fmt, time::Duration};

use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::Interceptor,
};

use crate::error::Error;

/// Adds `authorization: Bearer <token>` (when configured) and `grpc-timeout`
/// to each request.
///
/// The deadline is sent so the server can stop working on a call its caller
/// has given up on; tonic's `Endpoint::timeout` only bounds the wait locally.
#[derive(Clone)]
pub(crate) struct CallMetadata {
    authorization: Option<AsciiMetadataValue>,
    timeout: Duration,
}

impl CallMetadata {
    /// Prepares the metadata once, so no call pays for formatting it.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the token cannot be a header value (it must be
    /// visible ASCII).
    pub(crate) fn new(bearer_token: Option<&str>, timeout: Duration) -> Result<Self, Error> {
        let authorization = bearer_token
            .map(|token| {
                let mut value =
                    MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                        Error::config("the bearer token must be visible ASCII without line breaks")
                    })?;
                // Keeps the token out of HPACK's dynamic table and out of logs.
                value.set_sensitive(true);
                Ok::<_, Error>(value)
            })
            .transpose()?;
        Ok(Self {
            authorization,
            timeout,
        })
    }
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        request.set_timeout(self.timeout);
        Ok(request)
    }
}

impl fmt::Debug for CallMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token.
        f.debug_struct("CallMetadata")
            .field(
                "bearer_token",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interceptor adds the bearer token and grpc-timeout, and Debug hides the token.
    #[test]
    fn token_and_deadline_are_added_and_the_token_is_not_printed() {
        let mut metadata = CallMetadata::new(Some("s3cret"), Duration::from_millis(250)).unwrap();
        let request = metadata.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert_eq!(request.metadata().get("grpc-timeout").unwrap(), "250000u");
        assert!(!format!("{metadata:?}").contains("s3cret"));

        let mut anonymous = CallMetadata::new(None, Duration::from_secs(2)).unwrap();
        let request = anonymous.call(Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    /// A token that cannot be a header value is refused when building, not per call.
    #[test]
    fn a_token_that_cannot_be_a_header_is_a_config_error() {
        let err = CallMetadata::new(Some("line\nbreak"), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
    }
}
