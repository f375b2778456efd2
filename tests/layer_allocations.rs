//! session-client's session layer adds no allocation of its own when the
//! near-cache answers: a request through it allocates exactly what the
//! lookup's answer costs (the cloned `Session`, and its slot in the
//! request's extensions). Alone in its binary, on a current-thread runtime,
//! so the allocator's count is this test's; the server runs on the same
//! runtime and sleeps while the count is taken (nothing is awaited then).

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::pin,
    task::{Context, Poll, Waker},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::http::{Request, Response, StatusCode, request::Parts};
use session_client::{RequireSessionLayer, Session, SessionClient};
use session_server::{Config, Store, server};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::net::TcpListener;
use tower::{Layer, Service, service_fn};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

fn ids(parts: &Parts) -> Option<(&str, &str)> {
    let user = parts.headers.get("x-user")?.to_str().ok()?;
    let token = parts.headers.get("x-token")?.to_str().ok()?;
    Some((user, token))
}

fn request() -> Request<()> {
    Request::builder()
        .header("x-user", "u-1")
        .header("x-token", "t-1")
        .body(())
        .unwrap()
}

/// Sends `request` through `service` and polls its answer once: a near-cache
/// hit must answer without waiting.
fn call_once<S>(service: &mut S, request: Request<()>) -> Response<()>
where
    S: Service<Request<()>, Response = Response<()>, Error = Infallible>,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(service.poll_ready(&mut cx).is_ready());
    let mut future = pin!(service.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(response) => response.unwrap(),
        Poll::Pending => panic!("the layer waited: not a near-cache hit"),
    }
}

/// On a near-cache hit the layer allocates what the lookup's answer costs
/// (the `Session` cloned and put in the request's extensions), and nothing
/// more: no boxed future, no owned ids.
#[tokio::test(flavor = "current_thread")]
async fn a_near_cache_hit_allocates_only_the_lookups_answer() {
    let mut config = Config::defaults();
    config.redis_url =
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    config.key_prefix = format!("test-alloc-{}-{nanos}:", std::process::id());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = Store::new(config.store_settings().unwrap()).unwrap();
    let settings = config.server_settings();
    tokio::spawn(async move {
        server::run(listener, &settings, store, std::future::pending::<()>()).await
    });

    let client = SessionClient::builder(url)
        .near_cache(100)
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    for _ in 0..500 {
        if client.near_cache_stats().unwrap().healthy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metadata = HashMap::from([("ip".to_owned(), "192.0.2.1".to_owned())]);
    client.create_session("u-1", "t-1", metadata).await.unwrap();
    // Fills the near-cache.
    let session = client
        .get_user_session("u-1", "t-1")
        .await
        .unwrap()
        .unwrap();

    let inner = service_fn(|request: Request<()>| async move {
        let mut response = Response::new(());
        if request.extensions().get::<Session>().is_none() {
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        Ok::<_, Infallible>(response)
    });
    let mut service = RequireSessionLayer::new(client.clone(), ids).layer(inner);
    // Once before counting: anything allocated lazily on first use.
    assert_eq!(call_once(&mut service, request()).status(), StatusCode::OK);

    // What the lookup's answer costs, without the layer.
    let mut bare = request();
    let region = Region::new(GLOBAL);
    bare.extensions_mut().insert(session.clone());
    let answer = region.change().allocations;
    drop(bare);

    let hits = client.near_cache_stats().unwrap().hits;
    let request = request();
    let region = Region::new(GLOBAL);
    let response = call_once(&mut service, request);
    let through_layer = region.change().allocations;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(client.near_cache_stats().unwrap().hits, hits + 1);
    assert!(answer > 0, "the answer's cost was not counted");
    assert_eq!(
        through_layer, answer,
        "a near-cache hit through the layer made {through_layer} allocations; \
         the lookup's answer alone makes {answer}"
    );
}
