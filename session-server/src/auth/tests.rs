use http_body::Body as _;

use super::*;
use crate::secret_file::TempFile;
use std::time::Duration;

fn file(contents: &str) -> TempFile {
    TempFile::new(contents)
}

/// A body that never ends, like an idle WatchRevocations stream.
struct Endless;

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Poll::Pending
    }
}

async fn next_frame(body: &mut Body) -> Option<Result<Frame<Bytes>, Status>> {
    std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
}

/// Whether `body` is still open (waiting) after a moment.
async fn still_open(body: &mut Body) -> bool {
    tokio::time::timeout(Duration::from_millis(50), next_frame(body))
        .await
        .is_err()
}

const WATCH: &str = "/sessionstore.v1.SessionStore/WatchRevocations";

fn methods() -> &'static Methods {
    Methods::served().unwrap()
}

fn call_to(path: &str, token: &str) -> Request<()> {
    let mut request = Request::new(());
    *request.uri_mut() = path.parse().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Streams opened with a token end with UNAUTHENTICATED when a reload
/// removes it, and only those: a reload of the same file, one that adds
/// a token, one that fails, leave every stream open; a unary answer is
/// not wrapped; emptying the file ends every stream.
#[tokio::test]
async fn a_removed_token_ends_its_streams_and_only_those() {
    let f = file("kappa\nlambda\n");
    let tokens = Tokens::load(&f.0).unwrap();
    let endless = tower::service_fn(|_request: Request<()>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Body::new(Endless)))
    });
    let mut service = AuthLayer::new(Some(tokens.clone()), methods()).layer(endless);
    let open = |service: &mut Auth<_>, token| service.call(call_to(WATCH, token));
    let mut kappa = open(&mut service, "kappa").await.unwrap().into_body();
    let mut kappa_too = open(&mut service, "kappa").await.unwrap().into_body();
    let mut lambda = open(&mut service, "lambda").await.unwrap().into_body();
    let mut unary = service
        .call(call_to("/sessionstore.v1.SessionStore/GetSession", "kappa"))
        .await
        .unwrap()
        .into_body();

    tokens.reload().unwrap();
    std::fs::write(&f.0, "lambda\nkappa\nmu\n").unwrap();
    tokens.reload().unwrap();
    std::fs::remove_file(&f.0).unwrap();
    assert!(tokens.reload().is_err());
    for body in [&mut kappa, &mut kappa_too, &mut lambda] {
        assert!(
            still_open(body).await,
            "a reload keeping the token ended a stream"
        );
    }

    std::fs::write(&f.0, "lambda\nmu\n").unwrap();
    tokens.reload().unwrap();
    for body in [&mut kappa, &mut kappa_too] {
        let last = next_frame(body).await.unwrap().unwrap();
        let status = Status::from_header_map(&last.into_trailers().unwrap()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), TOKEN_REMOVED);
        assert!(next_frame(body).await.is_none());
        assert!(body.is_end_stream());
    }
    assert!(
        still_open(&mut lambda).await,
        "another token's stream ended"
    );
    assert!(still_open(&mut unary).await, "a unary answer was wrapped");
    let refused = service.call(call_to(WATCH, "kappa")).await.unwrap();
    assert_eq!(
        Status::from_header_map(refused.headers()).map(|s| s.code()),
        Some(tonic::Code::Unauthenticated)
    );

    std::fs::write(&f.0, "# all revoked\n").unwrap();
    tokens.reload().unwrap();
    let last = next_frame(&mut lambda).await.unwrap().unwrap();
    assert!(last.is_trailers());
}

#[tokio::test]
async fn the_layer_guards_everything_but_health() {
    let f = file("iota\n");
    let tokens = Tokens::load(&f.0).unwrap();
    let ok = tower::service_fn(|_request: Request<()>| async {
        Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::default()))
    });
    let mut service = AuthLayer::new(Some(tokens), methods()).layer(ok);
    let code = |response: Response<tonic::body::Body>| {
        tonic::Status::from_header_map(response.headers()).map(|s| s.code())
    };
    let mut reflection = Request::new(());
    *reflection.uri_mut() = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        .parse()
        .unwrap();
    let refused = service.call(reflection).await.unwrap();
    assert_eq!(code(refused), Some(tonic::Code::Unauthenticated));
    let mut probe = Request::new(());
    *probe.uri_mut() = "/grpc.health.v1.Health/Check".parse().unwrap();
    assert_eq!(code(service.call(probe).await.unwrap()), None);
    let mut authed = Request::new(());
    authed
        .headers_mut()
        .insert("authorization", "bearer iota".parse().unwrap());
    assert_eq!(code(service.call(authed).await.unwrap()), None);
    let mut open = AuthLayer::new(None, methods()).layer(ok);
    assert_eq!(code(open.call(Request::new(())).await.unwrap()), None);
}
