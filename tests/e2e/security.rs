//! Who may call and how much: bearer tokens, the concurrency cap and deadlines.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use sessionstore::v1::{
    CreateSessionRequest, GetSessionRequest, GetUserSessionCountRequest, RevokeSessionRequest,
    WatchRevocationsRequest, WatchRevocationsResponse, session_store_client::SessionStoreClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Status, Streaming, metadata::MetadataValue, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    Client, Pki, PrivateRedis, TempFiles, TestServer, check_on, config_on, lookups_work_within,
    wait_until,
};

/// A tokens file in the temp dir, removed on drop.
struct TokensFile(PathBuf);

impl TokensFile {
    fn new(contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "sessionstore-tokens-{}",
            crate::support::unique_prefix().trim_end_matches(':')
        ));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TokensFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn count_request(token: Option<&str>) -> Request<GetUserSessionCountRequest> {
    let mut request = Request::new(GetUserSessionCountRequest {
        user_id: "authd".into(),
    });
    if let Some(token) = token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// With AUTH_TOKENS_FILE set, a missing or wrong bearer token gets
/// UNAUTHENTICATED, a listed one is served, health stays open to probes, and
/// a changed file takes effect without a restart.
#[tokio::test]
async fn bearer_tokens_guard_every_call_but_health() {
    let file = TokensFile::new("# test tokens\nfirst-secret\nsecond-secret\n");
    let server = TestServer::start_tuned(|c| c.auth_tokens_file = Some(file.0.clone())).await;
    let mut client = server.client().await;

    let missing = client
        .get_user_session_count(count_request(None))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(missing.message().contains("missing bearer token"));
    let wrong = client
        .get_user_session_count(count_request(Some("first-secreT")))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(
        !wrong.message().contains("first-secret"),
        "tokens never echo back"
    );
    for token in ["first-secret", "second-secret"] {
        let count = client
            .get_user_session_count(count_request(Some(token)))
            .await
            .unwrap();
        assert_eq!(count.into_inner().count, 0);
    }

    check_on(server.channel().await, "")
        .await
        .expect("health needs no token");

    // Rotate: the old token goes, a new one comes.
    std::fs::write(&file.0, "third-secret\n").unwrap();
    let rotated = accepted_within(Duration::from_secs(15), &client, "third-secret").await;
    assert!(
        rotated,
        "the new token was not accepted after the file changed"
    );
    let old = client
        .get_user_session_count(count_request(Some("first-secret")))
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated);
}

/// Past MAX_CONCURRENT_REQUESTS, calls are refused at once with
/// RESOURCE_EXHAUSTED instead of queueing; health still answers.
#[tokio::test]
async fn excess_calls_are_refused_not_queued() {
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| {
        c.redis_timeout_ms = 1000;
        c.max_concurrent_requests = 2;
    })
    .await;
    let client = server.client().await;
    let get = || GetSessionRequest {
        token_id: "busy".into(),
        user_id: "busy".into(),
    };
    client.clone().get_session(get()).await.unwrap();

    // Slow every Redis call down so the admitted ones stay in flight.
    redis.pause(800).await;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (client.get_session(get()).await, started.elapsed())
            })
        })
        .collect();
    let mut refused = 0;
    let mut admitted = 0;
    for call in calls {
        let (result, _elapsed) = call.await.unwrap();
        match result {
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(status.message().contains("limit of 2"), "{status:?}");
                refused += 1;
            }
            _ => admitted += 1,
        }
    }
    assert!(
        refused >= 5,
        "only {refused} of 10 refused with a limit of 2"
    );
    assert!(admitted >= 1, "nothing was admitted");
    check_on(server.channel().await, "")
        .await
        .expect("health is exempt from the cap");
}

/// A caller's deadline (grpc-timeout) shorter than the Redis timeout is
/// honoured: the call ends near the deadline, not after the Redis timeout, and
/// the server keeps serving. (tonic's client enforces the same deadline and
/// reports it as CANCELLED "Timeout expired" when it fires first; the server's
/// own DEADLINE_EXCEEDED answer is proven by the unit tests in `limits.rs`.)
#[tokio::test]
async fn the_callers_deadline_is_honoured() {
    let redis = PrivateRedis::start();
    let server = TestServer::on_tuned(&redis, |c| c.redis_timeout_ms = 3000).await;
    let mut client = server.client().await;
    let get = || GetSessionRequest {
        token_id: "slow".into(),
        user_id: "slow".into(),
    };
    client.get_session(get()).await.unwrap();

    redis.pause(1500).await;
    let mut request = Request::new(get());
    request.set_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let status = client.get_session(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert!(lookups_work_within(Duration::from_secs(5), &client, get).await);
}

/// Redis over TLS (`rediss://`) verified with REDIS_CA_FILE, authenticated with
/// REDIS_PASSWORD_FILE: calls work; without the CA or with a wrong password they
/// fail as UNAVAILABLE, and no secret reaches the caller.
#[tokio::test]
async fn redis_over_tls_with_a_custom_ca_and_a_password_file() {
    let pki = Pki::new();
    let files = TempFiles::new();
    let ca = files.write("ca.pem", &pki.ca);
    let tls_port = crate::support::free_port().to_string();
    let redis = PrivateRedis::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        files.write("redis.pem", &pki.redis_cert).to_str().unwrap(),
        "--tls-key-file",
        files.write("redis.key", &pki.redis_key).to_str().unwrap(),
        "--tls-ca-cert-file",
        ca.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ]);
    let mut admin = redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("correct-horse-battery")
        .query_async(&mut admin)
        .await
        .unwrap();

    let tls_config = |password: &str, with_ca: bool| {
        let mut config = config_on(&redis);
        config.redis_url = format!("rediss://127.0.0.1:{tls_port}");
        config.redis_password_file = Some(files.write("password", &format!("{password}\n")));
        config.redis_ca_file = with_ca.then(|| ca.clone());
        config.redis_timeout_ms = 1000;
        config
    };

    let server = TestServer::start_with(tls_config("correct-horse-battery", true)).await;
    let mut client = server.client().await;
    let created = client
        .create_session(sessionstore::v1::CreateSessionRequest {
            user_id: "tls-user".into(),
            token_id: "tls-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    let found = client
        .get_session(GetSessionRequest {
            token_id: "tls-1".into(),
            user_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(found.session.is_some());
    server.shutdown().await;

    // An untrusted certificate is an I/O error to redis-rs, indistinguishable
    // from a network failure: UNAVAILABLE. Wrong credentials are refused by
    // Redis itself and no retry fixes them: INTERNAL (logged with the cause).
    for (password, with_ca, why, code) in [
        (
            "correct-horse-battery",
            false,
            "untrusted certificate",
            Code::Unavailable,
        ),
        ("wrong-password", true, "wrong password", Code::Internal),
    ] {
        let server = TestServer::start_with(tls_config(password, with_ca)).await;
        let mut client = server.client().await;
        let status = client
            .get_session(GetSessionRequest {
                token_id: "tls-1".into(),
                user_id: "tls-user".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{why}: {status:?}");
        assert!(
            !status.message().contains(password),
            "{why}: the password leaked"
        );
        server.shutdown().await;
    }
}

/// With TLS on the gRPC port, HEALTH_ADDR serves gRPC health in plaintext for
/// kubelet probes (which cannot speak TLS), and only health: the session
/// service is not reachable there.
#[tokio::test]
async fn a_plaintext_health_port_beside_a_tls_port() {
    let pki = Pki::new();
    let files = TempFiles::new();
    let mut config = pki.server_config(&files, false);
    let health_addr: std::net::SocketAddr = format!("127.0.0.1:{}", crate::support::free_port())
        .parse()
        .unwrap();
    config.health_addr = Some(health_addr);
    let server = TestServer::start_with(config).await;

    let channel = wait_for_channel(format!("http://{health_addr}")).await;
    let overall = check_on(channel.clone(), "").await.unwrap();
    assert_eq!(overall, ServingStatus::Serving);
    let ready = wait_until(Duration::from_secs(5), || {
        let channel = channel.clone();
        async move {
            matches!(
                check_on(channel, sessionstore::SERVICE_NAME).await,
                Ok(ServingStatus::Serving)
            )
        }
    })
    .await;
    assert!(ready, "readiness on the health port never became SERVING");
    let mut sessions = sessionstore::v1::session_store_client::SessionStoreClient::new(channel);
    let status = sessions
        .get_session(GetSessionRequest {
            token_id: "t".into(),
            user_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // The main port speaks only TLS.
    let plaintext = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        assert!(
            check_on(channel, "").await.is_err(),
            "the TLS port answered plaintext"
        );
    }
    server.shutdown().await;
}

/// A channel to `url`, retried until the listener (bound by the server task) accepts.
async fn wait_for_channel(url: String) -> tonic::transport::Channel {
    let endpoint = tonic::transport::Channel::from_shared(url).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(err) if Instant::now() > deadline => panic!("health port never accepted: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Emptying the tokens file (an operator revoking every token after a leak)
/// refuses every call but health once the reload sees it; the file is
/// replaced the supported way, written beside it and renamed into place.
#[tokio::test]
async fn emptying_the_tokens_file_denies_all() {
    let file = TokensFile::new("leaked-secret\n");
    let server = TestServer::start_tuned(|c| c.auth_tokens_file = Some(file.0.clone())).await;
    let mut client = server.client().await;
    client
        .get_user_session_count(count_request(Some("leaked-secret")))
        .await
        .unwrap();

    let staged = file.0.with_extension("new");
    std::fs::write(&staged, "# every token revoked\n").unwrap();
    std::fs::rename(&staged, &file.0).unwrap();
    let denied = wait_until(Duration::from_secs(20), || {
        let mut client = client.clone();
        async move {
            client
                .get_user_session_count(count_request(Some("leaked-secret")))
                .await
                .is_err_and(|status| status.code() == Code::Unauthenticated)
        }
    })
    .await;
    assert!(
        denied,
        "the old token was still accepted after the file was emptied"
    );
    check_on(server.channel().await, "")
        .await
        .expect("health needs no token");
}

/// Whether a call with `token` is accepted within `limit`, asked every
/// 20 ms: the server has read a tokens file that holds it.
async fn accepted_within(limit: Duration, client: &Client, token: &str) -> bool {
    wait_until(limit, || {
        let mut client = client.clone();
        async move {
            client
                .get_user_session_count(count_request(Some(token)))
                .await
                .is_ok()
        }
    })
    .await
}

/// `request` with `authorization: Bearer <token>`.
fn bearer<T>(mut request: Request<T>, token: &str) -> Request<T> {
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// Replaces the tokens file the supported way: written beside it, renamed
/// into place.
fn replace_tokens(file: &TokensFile, contents: &str) {
    let staged = file.0.with_extension("new");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, &file.0).unwrap();
}

/// Opens WatchRevocations with `token` and waits for its opening reset.
async fn watch_with(
    client: &mut SessionStoreClient<Channel>,
    token: &str,
) -> Streaming<WatchRevocationsResponse> {
    let mut stream = client
        .watch_revocations(bearer(Request::new(WatchRevocationsRequest {}), token))
        .await
        .expect("WatchRevocations opens")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a first message")
        .expect("the stream is open")
        .expect("the first message");
    assert!(first.reset, "the first message must be a reset: {first:?}");
    stream
}

/// Creates a session and revokes it, with `token`; returns its token id.
async fn create_and_revoke(client: &mut SessionStoreClient<Channel>, token: &str, id: &str) {
    let created = client
        .create_session(bearer(
            Request::new(CreateSessionRequest {
                user_id: "stream-user".into(),
                token_id: id.into(),
                ..Default::default()
            }),
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(created.created, "{created:?}");
    let revoked = client
        .revoke_session(bearer(
            Request::new(RevokeSessionRequest {
                token_id: id.into(),
                user_id: "stream-user".into(),
            }),
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
}

/// Reads `stream` until the revocation of session `id` arrives, skipping
/// heartbeats; panics if the stream fails or ends first.
async fn receives(stream: &mut Streaming<WatchRevocationsResponse>, id: &str) {
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(message)) => {
                    assert!(!message.reset, "unexpected reset: {message:?}");
                    if message.revocations.iter().any(|r| r.token_id == id) {
                        return;
                    }
                }
                Some(Err(status)) => panic!("the stream failed: {status:?}"),
                None => panic!("the stream ended"),
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "the revocation of {id} did not arrive");
}

/// The status `stream` ends with, skipping the messages before it; `None`
/// if it is still open after `limit`.
async fn ends_within(
    stream: &mut Streaming<WatchRevocationsResponse>,
    limit: Duration,
) -> Option<Status> {
    tokio::time::timeout(limit, async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => break status,
                None => panic!("the stream ended without a status"),
            }
        }
    })
    .await
    .ok()
}

/// A WatchRevocations stream opened with a token ends with UNAUTHENTICATED
/// ("no longer accepted") at the reload that removes the token from
/// AUTH_TOKENS_FILE, the one that refuses its unary calls; a stream opened
/// with a token still listed is untouched, by that reload and by one that
/// only adds a token (a rotation's first step), and still receives the
/// revocations made afterwards.
#[tokio::test]
async fn removing_a_token_ends_the_streams_opened_with_it() {
    let file = TokensFile::new("stream-a\nstream-b\n");
    let server = TestServer::start_tuned(|c| c.auth_tokens_file = Some(file.0.clone())).await;
    let mut client = server.client().await;
    let mut a = watch_with(&mut client, "stream-a").await;
    let mut b = watch_with(&mut client, "stream-b").await;

    // A reload that keeps both tokens (a third is added) ends neither.
    replace_tokens(&file, "stream-a\nstream-b\nstream-c\n");
    let added = accepted_within(Duration::from_secs(20), &client, "stream-c").await;
    assert!(added, "the added token was not accepted");
    create_and_revoke(&mut client, "stream-c", "kept-1").await;
    receives(&mut a, "kept-1").await;
    receives(&mut b, "kept-1").await;

    // Remove A: a change is installed once the file looked the same on two
    // checks one reload interval (5 s) apart, so within 10 s.
    let removed_at = Instant::now();
    replace_tokens(&file, "stream-b\nstream-c\n");
    let status = ends_within(&mut a, Duration::from_secs(20))
        .await
        .expect("the removed token's stream is still open");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("no longer accepted"),
        "{status:?}"
    );
    assert!(
        removed_at.elapsed() < Duration::from_secs(12),
        "ended {:?} after the file changed",
        removed_at.elapsed()
    );
    // The same reload refuses A's calls: the stream did not end early or
    // for another reason.
    let refused = client
        .get_user_session_count(count_request(Some("stream-a")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let reopened = client
        .watch_revocations(bearer(Request::new(WatchRevocationsRequest {}), "stream-a"))
        .await
        .unwrap_err();
    assert_eq!(reopened.code(), Code::Unauthenticated);

    // B's stream is untouched and still receives what is revoked after.
    create_and_revoke(&mut client, "stream-b", "after-removal").await;
    receives(&mut b, "after-removal").await;
    drop(b);
    server.shutdown().await;
}

/// One client connection (as session-client keeps per server) issuing 5,000
/// GetSession and CreateSession calls, about 1,000 of them cancelled at
/// random (the future dropped: RST_STREAM CANCEL), keeps its
/// connection: the server's HTTP/2 reset limits do not take a cancelling
/// client for a rapid-reset attack, and every call not cancelled succeeds.
#[tokio::test]
async fn a_client_cancelling_calls_at_random_keeps_its_connection() {
    const CALLS: u64 = 5_000;
    const IN_FLIGHT: usize = 512;
    // Calls failing for want of time on a loaded machine would hide what is
    // tested here: whether the connection survives.
    let server = TestServer::start_tuned(|c| {
        c.redis_timeout_ms = 10_000;
        c.request_timeout_ms = 30_000;
    })
    .await;
    let client = server.client().await;
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut calls = Vec::new();
    for i in 0..CALLS {
        // A fixed pseudo-random sequence (SplitMix64), so a failure repeats.
        let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let random = z ^ (z >> 31);
        // One call in five: half after a few µs to 2 ms (the timer rounds up
        // to its millisecond), half after 1 to 30 polls (finer: often while
        // its HEADERS are still on the way).
        let cancel = (random % 5 == 0).then_some(random >> 8);
        let permit = std::sync::Arc::clone(&permits)
            .acquire_owned()
            .await
            .unwrap();
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let call = async {
                if i % 2 == 0 {
                    client
                        .get_session(GetSessionRequest {
                            token_id: format!("cancel-{i}"),
                            user_id: String::new(),
                        })
                        .await
                        .map(drop)
                } else {
                    client
                        .create_session(CreateSessionRequest {
                            user_id: format!("cancel-{i}"),
                            token_id: format!("cancel-{i}"),
                            ..Default::default()
                        })
                        .await
                        .map(drop)
                }
            };
            let outcome = match cancel {
                Some(r) if r % 2 == 0 => {
                    tokio::time::timeout(Duration::from_micros(r % 2_000), call)
                        .await
                        .ok()
                }
                Some(r) => cancelled_after_polls(call, 1 + r % 30).await,
                None => Some(call.await),
            };
            drop(permit);
            (cancel.is_some(), outcome)
        }));
    }
    let (mut cancelled, mut failed) = (0, Vec::new());
    for call in calls {
        match call.await.unwrap() {
            (_, Some(Ok(()))) => {}
            (true, None) => cancelled += 1,
            (_, Some(Err(status))) => failed.push(status),
            (false, None) => unreachable!("only calls given a timeout can time out"),
        }
    }
    eprintln!(
        "{CALLS} calls: {cancelled} cancelled, {} failed",
        failed.len()
    );
    assert!(cancelled >= 500, "only {cancelled} calls were cancelled");
    // Every call on the one connection failed together if it was closed.
    assert!(
        failed.is_empty(),
        "{} calls failed, the first: {:?}",
        failed.len(),
        failed.first()
    );
}

/// `call`, polled `polls` times (yielding to the runtime between polls, so
/// its request gets on the wire) and dropped if not done by then: a cancel
/// finer than the timer's millisecond.
async fn cancelled_after_polls<F: std::future::Future>(call: F, polls: u64) -> Option<F::Output> {
    let mut call = std::pin::pin!(call);
    for _ in 0..polls.max(1) {
        let poll = std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
        if let std::task::Poll::Ready(output) = poll {
            return Some(output);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// A rapid-reset flood in CVE-2023-44487's pattern (streams opened with
/// HEADERS and at once cancelled with RST_STREAM, written in bursts of 1,000
/// pairs, as an attacker's client does) gets its connection closed by the
/// server with GOAWAY ENHANCE_YOUR_CALM long before 100,000 streams. (The
/// `h2` crate's client cannot be made to burst: it writes as the server
/// reads, and the server, accepting each stream before the next arrives,
/// never has a reset one waiting; so the frames are written by hand.)
#[tokio::test]
async fn a_rapid_reset_flood_is_cut_off_with_goaway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BURST: u32 = 1_000;
    const MOST_STREAMS: u32 = 100_000;
    let server = TestServer::start().await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let flood = tokio::spawn(async move {
        let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
            let mut frame = Vec::with_capacity(9 + payload.len());
            frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
            frame.extend_from_slice(&[kind, flags]);
            frame.extend_from_slice(&stream.to_be_bytes());
            frame.extend_from_slice(payload);
            frame
        };
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend(frame(0x4, 0, 0, &[]));
        writer.write_all(&preface).await?;
        let mut next = 1u32;
        let started = Instant::now();
        while next / 2 < MOST_STREAMS {
            let mut burst = Vec::new();
            for _ in 0..BURST {
                // HEADERS, END_HEADERS: :method POST, :scheme http, :path /
                // (HPACK static table entries 3, 6 and 4).
                burst.extend(frame(0x1, 0x4, next, &[0x83, 0x86, 0x84]));
                // RST_STREAM CANCEL.
                burst.extend(frame(0x3, 0, next, &8u32.to_be_bytes()));
                next += 2;
            }
            if writer.write_all(&burst).await.is_err() {
                break;
            }
        }
        Ok::<_, std::io::Error>((next / 2, started.elapsed()))
    });
    // The server's frames, until its GOAWAY: (type, payload).
    let mut buffer = Vec::new();
    let goaway = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            while buffer.len() >= 9 {
                let length = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
                if buffer.len() < 9 + length {
                    break;
                }
                let kind = buffer[3];
                let payload = buffer[9..9 + length].to_vec();
                buffer.drain(..9 + length);
                if kind == 0x7 {
                    return Some(payload);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server sent no GOAWAY and kept the connection open for 10 s");
    let sent = flood.await.unwrap();
    eprintln!("rapid reset: {sent:?} (streams, time) sent; GOAWAY payload {goaway:?}");
    let goaway = goaway.expect("a GOAWAY before the connection closed");
    let code = u32::from_be_bytes([goaway[4], goaway[5], goaway[6], goaway[7]]);
    assert_eq!(
        code, 0xb,
        "GOAWAY with ENHANCE_YOUR_CALM, got code {code:#x}"
    );
    // The last stream the server processed: the flood was cut off early,
    // not after the server had taken most of it.
    let last = u32::from_be_bytes([goaway[0], goaway[1], goaway[2], goaway[3]]);
    assert!(
        last / 2 < MOST_STREAMS / 10,
        "cut off only after stream {last}"
    );
}
