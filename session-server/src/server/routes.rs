//! Hands each call to the service its path names, in place of tonic's
//! `Router`.
//!
//! tonic's `Router` is an axum router: per call it matches the path against
//! a route table, stores the matched parameters in the request's extensions,
//! clones the boxed route service, and boxes the request and response bodies
//! into axum's body type and back into tonic's. A gRPC path is always
//! `/{package.Service}/{Method}` and the generated servers match the method
//! themselves, so a prefix comparison per service does the same routing
//! without any of that (BENCHMARKS.md, "#15 hot path").
//!
//! The routes are a chain, [`Route`] after [`Route`], ending in
//! [`Unimplemented`]; every service in it answers with tonic's boxed future,
//! so the chain adds no allocation of its own.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use tonic::{
    body::Body,
    codegen::{
        BoxFuture,
        http::{Request, Response},
    },
    server::NamedService,
};
use tower::Service;

/// The response future every generated tonic server returns.
type CallFuture = BoxFuture<Response<Body>, Infallible>;

/// The calls whose path starts with `/{S::NAME}/` go to `service`; the
/// others to `next`. No field but the two services: tonic clones the whole
/// stack for every call, so a stored prefix would be an allocation per call.
#[derive(Clone, Debug)]
pub(crate) struct Route<S, Next> {
    service: S,
    next: Next,
}

/// A route to `service`, by its gRPC service name, before the routes of
/// `next`.
pub(crate) fn route<S: NamedService, Next>(service: S, next: Next) -> Route<S, Next> {
    Route { service, next }
}

/// Whether `path` is `/{name}/…`.
fn names(path: &str, name: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|rest| rest.strip_prefix(name))
        .is_some_and(|rest| rest.starts_with('/'))
}

impl<S, Next> Service<Request<Body>> for Route<S, Next>
where
    S: NamedService
        + Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = CallFuture>,
    Next:
        Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = CallFuture>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Generated servers are always ready; asked anyway, as tower requires
        // of a service before it is called.
        if self.service.poll_ready(cx)?.is_pending() {
            return Poll::Pending;
        }
        self.next.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if names(request.uri().path(), S::NAME) {
            self.service.call(request)
        } else {
            self.next.call(request)
        }
    }
}

/// The end of the routes: UNIMPLEMENTED, as tonic's router answers a path
/// no service claims.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unimplemented;

impl Service<Request<Body>> for Unimplemented {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<Body>) -> Self::Future {
        Box::pin(std::future::ready(Ok(
            tonic::Status::unimplemented("").into_http()
        )))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tower::ServiceExt;

    use super::*;

    /// A service named `N` that answers with its own index as the message.
    #[derive(Clone)]
    struct Named<const N: u8>;

    impl NamedService for Named<1> {
        const NAME: &'static str = "pkg.One";
    }

    impl NamedService for Named<2> {
        const NAME: &'static str = "pkg.OneMore";
    }

    impl<const N: u8> Service<Request<Body>> for Named<N> {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = CallFuture;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: Request<Body>) -> Self::Future {
            Box::pin(std::future::ready(Ok(tonic::Status::new(
                tonic::Code::Ok,
                N.to_string(),
            )
            .into_http())))
        }
    }

    async fn answer(path: &str) -> tonic::Status {
        let routes = route(Named::<1>, route(Named::<2>, Unimplemented));
        let request = Request::builder().uri(path).body(Body::empty()).unwrap();
        let response = routes.oneshot(request).await.unwrap();
        tonic::Status::from_header_map(response.headers()).unwrap()
    }

    #[tokio::test]
    async fn each_path_reaches_the_service_it_names() {
        assert_eq!(answer("/pkg.One/Get").await.message(), "1");
        // A name that starts like another service's is not that service.
        assert_eq!(answer("/pkg.OneMore/Get").await.message(), "2");
        for path in ["/pkg.On/Get", "/pkg.One", "/other.Service/Get", "/"] {
            assert_eq!(answer(path).await.code(), Code::Unimplemented, "{path}");
        }
    }
}
