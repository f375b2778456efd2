//! The example auth service (examples/auth-service) over HTTP, against the
//! real server and Redis, walking its whole story: login with a device
//! cookie, a protected call, refresh, two concurrent refreshes, a replayed
//! refresh credential after the grace, logout, logout everywhere seen by a
//! second service's near-cache within its bound, and an attacker locking the
//! account while its owner, with her device cookie, still logs in.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use auth_service::{
    Config,
    config::users,
    tokens::{Claims, Keys},
};
use session_client::SessionClient;
use session_server::Config as ServerConfig;
use tokio::net::TcpListener;

use crate::support::{HttpAnswer, Serving, TestServer, http, test_config};

/// The test's signing key.
const SECRET: &[u8] = b"the test's signing key, 32 bytes or more";
/// The server's ROTATION_GRACE_MS here: short, so a replay after it is quick
/// to reach.
const GRACE: Duration = Duration::from_millis(1000);
/// The second service's near-cache staleness bound.
const STALENESS: Duration = Duration::from_secs(5);

/// The server settings of these tests: a short rotation grace, and an account
/// limit an attacker reaches in three attempts (the address limit is high,
/// so that it is the account that locks).
fn server_config() -> ServerConfig {
    let mut config = test_config();
    config.rotation_grace_ms = GRACE.as_millis() as u64;
    config.rate_limit_account_max_attempts = 3;
    config.rate_limit_max_attempts = 100;
    config
}

/// An auth service on a free port, for `server`; its client, to read the
/// near-cache's statistics.
async fn auth_service(server: &TestServer) -> (SocketAddr, SessionClient, Serving) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        listen_addr: addr,
        sessionstore_url: server.url(),
        sessionstore_token: None,
        jwt_secret: SECRET.to_vec(),
        users: users("alice:wonderland,bob:builder").unwrap(),
        access_ttl: Duration::from_secs(900),
        refresh_idle: Duration::from_secs(3600),
        device_cookie_max_age: Duration::from_secs(3600),
        near_cache_entries: 1000,
        near_cache_max_staleness: Some(STALENESS),
    };
    let client = auth_service::connect(&config).await.unwrap();
    let app = auth_service::router(config, client.clone())
        .into_make_service_with_connect_info::<SocketAddr>();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, client, Serving(task))
}

/// A browser: the service's address and the device cookie it keeps.
struct Browser {
    addr: SocketAddr,
    cookie: Option<String>,
}

impl Browser {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, cookie: None }
    }

    /// POST /login; keeps the device cookie a success sets.
    async fn login(&mut self, account: &str, password: &str) -> HttpAnswer {
        let body = serde_json::json!({ "account": account, "password": password }).to_string();
        let headers: Vec<(&str, &str)> = self
            .cookie
            .as_deref()
            .map(|cookie| vec![("cookie", cookie)])
            .unwrap_or_default();
        let answer = http(self.addr, "POST", "/login", &headers, Some(&body)).await;
        if let Some(set) = answer.header("set-cookie") {
            assert!(
                set.contains("; HttpOnly; Secure; SameSite=Strict; Path=/"),
                "{set}"
            );
            self.cookie = Some(set.split(';').next().unwrap().to_owned());
        }
        answer
    }

    /// POST /login that must succeed: its tokens.
    async fn logged_in(&mut self, account: &str, password: &str) -> Tokens {
        let answer = self.login(account, password).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        Tokens::from(&answer)
    }
}

/// A login's or refresh's tokens.
#[derive(Clone, Debug)]
struct Tokens {
    access: String,
    refresh: String,
}

impl Tokens {
    fn from(answer: &HttpAnswer) -> Self {
        let json = answer.json();
        assert_eq!(json["token_type"], "Bearer");
        Self {
            access: json["access_token"].as_str().unwrap().to_owned(),
            refresh: json["refresh_token"].as_str().unwrap().to_owned(),
        }
    }

    /// The access token's claims (`jti` = the session's token id).
    fn claims(&self) -> Claims {
        Keys::new(SECRET).check_access(&self.access).unwrap()
    }
}

/// GET `path` with the access token.
async fn get(addr: SocketAddr, path: &str, access: &str) -> HttpAnswer {
    let bearer = format!("Bearer {access}");
    http(addr, "GET", path, &[("authorization", &bearer)], None).await
}

/// POST `path` with the access token.
async fn post(addr: SocketAddr, path: &str, access: &str) -> HttpAnswer {
    let bearer = format!("Bearer {access}");
    http(addr, "POST", path, &[("authorization", &bearer)], None).await
}

/// POST /refresh with `refresh`.
async fn refresh(addr: SocketAddr, refresh: &str) -> HttpAnswer {
    let body = serde_json::json!({ "refresh_token": refresh }).to_string();
    http(addr, "POST", "/refresh", &[], Some(&body)).await
}

/// Asserts a 401 whose `error` is `error`.
fn assert_401(answer: &HttpAnswer, error: &str) {
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(answer.json()["error"], error, "{answer:?}");
}

/// Login, a protected call, a refresh, two tabs refreshing at once (both get
/// the same successor), and a refresh credential replayed after the grace:
/// 401, and the family is gone, the other tab's tokens included.
#[tokio::test]
async fn login_refresh_and_a_replay_after_the_grace() {
    let server = TestServer::start_with(server_config()).await;
    let (addr, _client, _serving) = auth_service(&server).await;
    let mut browser = Browser::new(addr);

    assert_401(
        &browser.login("alice", "wrong").await,
        "invalid_credentials",
    );
    assert_401(
        &browser.login("nobody", "wonderland").await,
        "invalid_credentials",
    );
    assert!(browser.cookie.is_none(), "a failed login set a cookie");
    // The account as typed, normalised.
    let login = browser.logged_in(" Alice ", "wonderland").await;
    assert!(browser.cookie.is_some(), "no device cookie");

    let me = get(addr, "/me", &login.access).await;
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.json()["account"], "alice");
    assert_eq!(me.json()["user_id"], "user-1");
    // No token, a forged one, a refresh credential as an access token.
    let bare = http(addr, "GET", "/me", &[], None).await;
    assert_eq!(bare.status, 401);
    assert_eq!(bare.header("www-authenticate"), Some("Bearer"));
    let forged = get(addr, "/me", "e30.e30.e30").await;
    assert_eq!(
        forged.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );
    assert_eq!(get(addr, "/me", &login.refresh).await.status, 401);
    assert_401(&refresh(addr, &login.access).await, "invalid_refresh_token");

    // A refresh: new tokens for a new session of the same family; the old
    // access token's session is gone.
    let first = refresh(addr, &login.refresh).await;
    assert_eq!(first.status, 200, "{first:?}");
    let first = Tokens::from(&first);
    assert_ne!(first.claims().jti, login.claims().jti);
    assert_eq!(first.claims().sid, login.claims().sid);
    assert_eq!(get(addr, "/me", &first.access).await.status, 200);
    let old = get(addr, "/me", &login.access).await;
    assert_eq!(old.status, 401, "{old:?}");
    assert_eq!(
        old.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );

    // Two tabs refresh with the same credential at once: both succeed, with
    // the same successor.
    let (a, b) = tokio::join!(refresh(addr, &first.refresh), refresh(addr, &first.refresh));
    assert_eq!((a.status, b.status), (200, 200), "{a:?} {b:?}");
    let (a, b) = (Tokens::from(&a), Tokens::from(&b));
    assert_eq!(a.claims().jti, b.claims().jti);
    assert_ne!(a.claims().jti, first.claims().jti);
    assert_eq!(get(addr, "/me", &a.access).await.status, 200);
    assert_eq!(get(addr, "/me", &b.access).await.status, 200);

    // Past the grace, the old credential again: a thief's replay.
    tokio::time::sleep(GRACE + Duration::from_millis(300)).await;
    assert_401(&refresh(addr, &first.refresh).await, "refresh_token_reused");
    // The whole family is gone: both tabs' tokens.
    assert_eq!(get(addr, "/me", &a.access).await.status, 401);
    assert_401(&refresh(addr, &b.refresh).await, "session_ended");
}

/// Logout ends the session and its refresh credential; logout everywhere
/// ends every device's, and a second service checking the same tokens
/// through its own near-cache stops accepting them within its bound.
#[tokio::test]
async fn logout_and_logout_everywhere() {
    let server = TestServer::start_with(server_config()).await;
    let (addr, _client, _serving) = auth_service(&server).await;
    let (api, api_client, _api_serving) = auth_service(&server).await;

    let mut laptop = Browser::new(addr);
    let session = laptop.logged_in("bob", "builder").await;
    assert_eq!(post(addr, "/logout", &session.access).await.status, 204);
    assert_eq!(get(addr, "/me", &session.access).await.status, 401);
    assert_401(&refresh(addr, &session.refresh).await, "session_ended");
    // Logging out again is fine.
    assert_eq!(post(addr, "/logout", &session.access).await.status, 204);

    let laptop = laptop.logged_in("bob", "builder").await;
    let phone = Browser::new(addr).logged_in("bob", "builder").await;
    let devices = get(addr, "/sessions", &phone.access).await;
    assert_eq!(devices.status, 200, "{devices:?}");
    let devices = devices.json();
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), 2, "{devices:?}");
    assert_eq!(
        devices.iter().filter(|d| d["current"] == true).count(),
        1,
        "{devices:?}"
    );
    assert_eq!(devices[0]["ip"], "127.0.0.1");

    // The API service has the laptop's session in its near-cache.
    assert_eq!(get(api, "/me", &laptop.access).await.status, 200);
    let hits = api_client.near_cache_stats().unwrap().hits;
    assert_eq!(get(api, "/me", &laptop.access).await.status, 200);
    assert_eq!(api_client.near_cache_stats().unwrap().hits, hits + 1);

    let ended = post(addr, "/logout-everywhere", &phone.access).await;
    assert_eq!(ended.status, 200, "{ended:?}");
    assert_eq!(ended.json()["ended"], 2);
    let start = Instant::now();
    while get(api, "/me", &laptop.access).await.status != 401 {
        assert!(
            start.elapsed() < STALENESS,
            "the API service still accepted a signed-out session after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(addr, "/me", &phone.access).await.status, 401);
    assert_401(&refresh(addr, &laptop.refresh).await, "session_ended");
}

/// "Sign out other devices": the phone ends the laptop's session (its access
/// and refresh credentials stop working) and keeps its own, refresh included.
#[tokio::test]
async fn logout_others_keeps_this_device() {
    let server = TestServer::start_with(server_config()).await;
    let (addr, _client, _serving) = auth_service(&server).await;
    let laptop = Browser::new(addr).logged_in("bob", "builder").await;
    let phone = Browser::new(addr).logged_in("bob", "builder").await;

    let ended = post(addr, "/logout-others", &phone.access).await;
    assert_eq!(ended.status, 200, "{ended:?}");
    assert_eq!(ended.json()["ended"], 1);
    assert_eq!(get(addr, "/me", &laptop.access).await.status, 401);
    assert_401(&refresh(addr, &laptop.refresh).await, "session_ended");
    assert_eq!(get(addr, "/me", &phone.access).await.status, 200);
    let refreshed = refresh(addr, &phone.refresh).await;
    assert_eq!(refreshed.status, 200, "{refreshed:?}");
}

/// An attacker guessing passwords locks the account for every browser
/// without a device cookie (429 with Retry-After, the owner's new browser
/// included), while the owner's browser with its cookie still logs in.
#[tokio::test]
async fn an_attacker_locks_the_account_but_not_its_owner() {
    let server = TestServer::start_with(server_config()).await;
    let (addr, _client, _serving) = auth_service(&server).await;
    let mut owner = Browser::new(addr);
    owner.logged_in("alice", "wonderland").await;

    let mut attacker = Browser::new(addr);
    for _ in 0..3 {
        assert_401(
            &attacker.login("alice", "guess").await,
            "invalid_credentials",
        );
    }
    let refused = attacker.login("alice", "wonderland").await;
    assert_eq!(refused.status, 429, "{refused:?}");
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(wait > 0);
    // The owner on a new browser is refused too: nothing tells her apart.
    assert_eq!(
        Browser::new(addr).login("alice", "wonderland").await.status,
        429
    );

    // Her own browser, with its device cookie, is not.
    let cookie = owner.cookie.clone();
    let tokens = owner.logged_in("alice", "wonderland").await;
    assert_ne!(owner.cookie, cookie, "each login renews the device cookie");
    assert_eq!(get(addr, "/me", &tokens.access).await.status, 200);
}
