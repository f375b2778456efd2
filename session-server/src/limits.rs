//! Bounds on each call, as a tower layer in front of every service but health:
//! a cap on concurrent calls (the excess gets RESOURCE_EXHAUSTED at once, never
//! a growing queue) and a deadline (the caller's `grpc-timeout`, shortened to
//! the server's REQUEST_TIMEOUT_MS) past which the work is dropped and the
//! caller gets DEADLINE_EXCEEDED.
//!
//! Health checks are exempt: an overloaded pod is still alive, and probes must
//! not queue behind (or be refused by) the calls that overload it.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::Semaphore;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tower::{Layer, Service};

/// Adds the concurrency cap and the deadline to a service stack.
#[derive(Clone, Debug)]
pub struct LimitsLayer {
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    timeout: Duration,
}

impl LimitsLayer {
    /// At most `max_concurrent` calls at once, each at most `timeout` long.
    pub fn new(max_concurrent: usize, timeout: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            timeout,
        }
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = Limits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limits {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`LimitsLayer`].
#[derive(Clone, Debug)]
pub struct Limits<S> {
    inner: S,
    layer: LimitsLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Limits<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            let response = self.inner.call(request);
            return Box::pin(response);
        }
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            let status = tonic::Status::resource_exhausted(format!(
                "server is at its limit of {} concurrent calls; retry with backoff",
                self.layer.max_concurrent
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let timeout = caller_timeout(request.headers())
            .map_or(self.layer.timeout, |t| t.min(self.layer.timeout));
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = tokio::time::timeout(timeout, response).await;
            drop(permit);
            match result {
                Ok(result) => result,
                // Dropping the inner future cancels the work, Redis round trip
                // included.
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "deadline of {} ms exceeded",
                    timeout.as_millis()
                ))
                .into_http()),
            }
        })
    }
}

/// The caller's deadline from the `grpc-timeout` header: up to 8 digits and a
/// unit (H, M, S, m, u, n). A malformed header is ignored, as gRPC servers do.
fn caller_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(
            caller_timeout(&header("2H")),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(
            caller_timeout(&header("3M")),
            Some(Duration::from_secs(180))
        );
        assert_eq!(caller_timeout(&header("5S")), Some(Duration::from_secs(5)));
        assert_eq!(
            caller_timeout(&header("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            caller_timeout(&header("7u")),
            Some(Duration::from_micros(7))
        );
        assert_eq!(caller_timeout(&header("9n")), Some(Duration::from_nanos(9)));
    }

    /// A service that takes `delay` and records whether it ran to the end.
    fn slow_service(
        delay: Duration,
        finished: Arc<std::sync::atomic::AtomicBool>,
    ) -> impl Service<
        Request<()>,
        Response = Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Future + Send + 'static,
    > + Clone {
        tower::service_fn(move |_request: Request<()>| {
            let finished = finished.clone();
            async move {
                tokio::time::sleep(delay).await;
                finished.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::default()))
            }
        })
    }

    fn grpc_status(response: &Response<tonic::body::Body>) -> Option<tonic::Code> {
        tonic::Status::from_header_map(response.headers()).map(|s| s.code())
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_deadline_cuts_the_call_short_and_drops_the_work() {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut service = LimitsLayer::new(8, Duration::from_secs(5))
            .layer(slow_service(Duration::from_secs(2), finished.clone()));
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert("grpc-timeout", "100m".parse().unwrap());
        let started = tokio::time::Instant::now();
        let response = service.call(request).await.unwrap();
        assert_eq!(grpc_status(&response), Some(tonic::Code::DeadlineExceeded));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !finished.load(std::sync::atomic::Ordering::SeqCst),
            "work was not cancelled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_server_timeout_caps_a_longer_caller_deadline() {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut service = LimitsLayer::new(8, Duration::from_millis(300))
            .layer(slow_service(Duration::from_secs(2), finished));
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert("grpc-timeout", "10S".parse().unwrap());
        let started = tokio::time::Instant::now();
        let response = service.call(request).await.unwrap();
        assert_eq!(grpc_status(&response), Some(tonic::Code::DeadlineExceeded));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn excess_calls_are_refused_and_health_is_exempt() {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut service = LimitsLayer::new(1, Duration::from_secs(5))
            .layer(slow_service(Duration::from_secs(1), finished));
        let first = service.call(Request::new(()));
        let refused = service.call(Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&refused), Some(tonic::Code::ResourceExhausted));
        let mut probe = Request::new(());
        *probe.uri_mut() = "/grpc.health.v1.Health/Check".parse().unwrap();
        let probed = service.call(probe).await.unwrap();
        assert_eq!(grpc_status(&probed), None, "health was refused");
        let first = first.await.unwrap();
        assert_eq!(grpc_status(&first), None);
        // The permit is back once the first call is done.
        let again = service.call(Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&again), None);
    }

    #[test]
    fn malformed_grpc_timeout_is_ignored() {
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(caller_timeout(&header(bad)), None, "{bad:?}");
        }
        assert_eq!(caller_timeout(&HeaderMap::new()), None);
    }
}
