//! Writes across the server's MAX_CONNECTION_AGE: the GOAWAY that ages a
//! connection out must not fail a call the server never saw.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use session_client::SessionClient;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{TestServer, error_chain};

/// Concurrent writers, each its own user.
const WRITERS: usize = 32;
/// How long they write: several age-outs at one second each.
const WRITING: Duration = Duration::from_secs(6);

/// A TCP relay to `target` that counts the connections made through it:
/// the proof that the client's connections were aged out and replaced.
async fn counting_relay(target: std::net::SocketAddr) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }
    });
    (url, accepted)
}

/// What the writers saw.
#[derive(Default)]
struct Tally {
    /// Sessions created and then revoked, both acknowledged.
    revoked: Vec<String>,
    /// Sessions created (acknowledged) and left alive.
    alive: Vec<String>,
    /// Failed or unexpected writes, by error chain.
    failures: BTreeMap<String, usize>,
}

/// MAX_CONNECTION_AGE 1 s (grace 2 s): for 6 s, 32 writers create and
/// revoke sessions through one plain session-client (no near-cache), so
/// every connection it opens is aged out under load. No write fails, none
/// is applied twice (every create answers `true`, every revoke of a session
/// just created answers `true`), every acknowledged create is then found and
/// every acknowledged revoke is final.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_survive_connection_age_outs() {
    let server = TestServer::start_tuned(|c| {
        c.max_connection_age = 1;
        c.max_connection_age_grace = 2;
        c.max_sessions_per_user = 100_000;
    })
    .await;
    let (url, connections) = counting_relay(server.addr).await;
    let client = SessionClient::builder(url)
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();

    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let user = format!("ager-{w}");
                let mut i = 0_usize;
                while started.elapsed() < WRITING {
                    let token = format!("age-{w}-{i}");
                    i += 1;
                    match client
                        .create_session(user.as_str(), token.as_str(), Default::default())
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => {
                            *tally.failures.entry("create: false".into()).or_default() += 1;
                            continue;
                        }
                        Err(err) => {
                            *tally
                                .failures
                                .entry(format!("create: {}", error_chain(&err)))
                                .or_default() += 1;
                            continue;
                        }
                    }
                    // Every other session is revoked at once.
                    if i % 2 == 1 {
                        tally.alive.push(token);
                        continue;
                    }
                    match client.revoke_session(token.as_str()).await {
                        Ok(true) => tally.revoked.push(token),
                        Ok(false) => {
                            *tally.failures.entry("revoke: false".into()).or_default() += 1;
                        }
                        Err(err) => {
                            *tally
                                .failures
                                .entry(format!("revoke: {}", error_chain(&err)))
                                .or_default() += 1;
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for writer in writers {
        let tally = writer.await.unwrap();
        total.revoked.extend(tally.revoked);
        total.alive.extend(tally.alive);
        for (what, n) in tally.failures {
            *total.failures.entry(what).or_default() += n;
        }
    }
    let connections = connections.load(Ordering::Relaxed);
    let failed: usize = total.failures.values().sum();
    eprintln!(
        "{} creates kept, {} revoked, {failed} failed, over {connections} connections",
        total.alive.len(),
        total.revoked.len()
    );
    for (what, n) in &total.failures {
        eprintln!("{n:>5} x {what}");
    }
    assert!(
        connections >= 4,
        "only {connections} connections: the age-outs did not happen"
    );
    assert!(
        total.alive.len() + total.revoked.len() > 300,
        "too little load to mean anything"
    );
    assert_eq!(failed, 0, "writes failed: {:#?}", total.failures);

    // Read back on a fresh client: acknowledged creates are there,
    // acknowledged revokes are final.
    let reader = SessionClient::connect(server.url()).await.unwrap();
    for token in &total.alive {
        let found = reader.get_session(token.as_str()).await.unwrap();
        assert!(found.is_some(), "{token} was created but is not found");
    }
    for token in &total.revoked {
        let found = reader.get_session(token.as_str()).await.unwrap();
        assert!(found.is_none(), "{token} was revoked but is still found");
    }
    server.shutdown().await;
}
