//! The floor of GetSession on this project's mandated stack (#22,
//! BENCHMARKS.md "#22 hot path", third pass): `echo_floor.rs`'s tonic
//! server, whose GetSession reads the session from Redis through the
//! project's [`Store`] (the bb8 pool of redis-rs multiplexed connections, the
//! GET of the session's key, its parse) and answers it as the proto
//! `Session`, as the server does. Nothing else: no limits or deadline of the
//! call, no metrics recorder, no log subscriber, no connection guard, no
//! EndStreams, no auth, no health or reflection; the ids are checked only as
//! far as the store's types need (`TokenId`, `UserId`); every other method is
//! the generated default, `UNIMPLEMENTED`. What the store does itself stays:
//! its Redis deadline (REDIS_TIMEOUT_MS) and its Redis latency histogram
//! (recorded into no recorder here). What a load generator measures against
//! it is what the server cannot go below without a different Redis client,
//! pool or proto; the server's count above it is the price of everything
//! else the server does. A sibling of `echo_floor.rs` rather than a mode of
//! it: it is configured as the server is, not by one argument.
//!
//! ```sh
//! cargo run --release --example redis_floor
//! ```
//!
//! Configured as the server is, from the same environment and flags
//! (`Config`: LISTEN_ADDR, REDIS_URL, KEY_PREFIX, REDIS_POOL_SIZE,
//! REDIS_TIMEOUT_MS, ...), so it reads the sessions a server with the same
//! settings wrote; the bound address is printed as `listening on ADDR`.
//! The generated server is served alone, with no router (the server routes
//! by a prefix comparison, `session-server/src/server/routes.rs`); with
//! FLOOR_ROUTER set, behind tonic's `Router`, as echo_floor serves.
//! `scripts/bench-callgrind.sh` measures it with `MEASURED_BIN`.

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use session_server::{config::Config, convert, store::Store};
use sessionstore::v1::{
    GetSessionRequest, GetSessionResponse,
    session_store_server::{SessionStore, SessionStoreServer},
};
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// The server's allocator (session-server's `main.rs`), as in
/// `echo_floor.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// GetSession through the store and nothing else.
#[derive(Debug)]
struct Floor {
    store: Store,
}

#[tonic::async_trait]
impl SessionStore for Floor {
    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<GetSessionResponse>, Status> {
        // The store takes only checked ids; these are the checks its types
        // make (the server's handler makes the same).
        let GetSessionRequest { token_id, user_id } = request.into_inner();
        let token = convert::token_id(token_id)?;
        let hint = convert::user_hint(user_id)?;
        let session = self.store.get_session(token, hint).await?;
        Ok(Response::new(GetSessionResponse {
            session: session.map(convert::session_to_proto),
        }))
    }
}

/// The same runtime as session-server and echo_floor: `#[tokio::main]`,
/// multi-threaded, one worker per core unless TOKIO_WORKER_THREADS says
/// otherwise.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let settings = config
        .store_settings()
        .map_err(anyhow::Error::msg)
        .context("store settings")?;
    let store = Store::new(settings).context("REDIS_URL")?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding {}", config.listen_addr))?;
    println!("listening on {}", listener.local_addr()?);
    // echo_floor's settings: tonic's defaults, TCP_NODELAY on.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let service = SessionStoreServer::new(Floor { store });
    let mut server = tonic::transport::Server::builder();
    if std::env::var_os("FLOOR_ROUTER").is_some() {
        // tonic's `Router`, as echo_floor serves: an axum route match per
        // call, which the server does not pay (session-server's
        // `server/routes.rs`).
        server
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
    } else {
        // The generated server alone: it matches the method itself, as
        // behind the server's own routes.
        server.serve_with_incoming(service, incoming).await
    }
    .context("serving")
}
