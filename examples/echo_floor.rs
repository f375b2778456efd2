//! The floor of any tonic service on this machine (#15, BENCHMARKS.md "How we
//! compare"): the contract's generated `SessionStore` server whose GetSession
//! answers one fixed session from memory, under the ids the caller asked
//! for. No Redis, no layers, no auth, no health or reflection, tonic's
//! default `Server` settings; every other method is the generated default,
//! `UNIMPLEMENTED`. What a load generator measures against it is
//! what HTTP/2, tonic and protobuf alone cost per call, which SessionStore
//! cannot go below.
//!
//! ```sh
//! cargo run --release --example echo_floor -- 127.0.0.1:0
//! LISTEN_ADDR=127.0.0.1:0 cargo run --release --example echo_floor
//! ```
//!
//! The address is the first argument, else `LISTEN_ADDR`, else
//! `127.0.0.1:0`; the bound address is printed as `listening on ADDR` (port 0
//! picks a free one). `scripts/bench-compare.sh` drives it with h2load and
//! `benches/session_bench.rs` (`--profile get-hint --no-populate`).

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context;
use sessionstore::v1::{
    GetSessionRequest, GetSessionResponse, Session,
    session_store_server::{SessionStore, SessionStoreServer},
};
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// The server's allocator (session-server's `main.rs`), so that the floor is
/// not raised by glibc malloc where the server pays mimalloc's lower price:
/// the gap to the server is then its own work, not the allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Answers GetSession with a copy of `session` carrying the request's token
/// and user ids, as the server answers with a session built for each call.
#[derive(Debug)]
struct Echo {
    /// Everything but the ids: the same two metadata entries as the load
    /// generator's sessions (`benches/session_bench.rs`,
    /// `examples/grpc_frame.rs`) and timestamps to the millisecond. With the
    /// caller's ids the answer is byte for byte as long as the server's
    /// (`scripts/bench-compare.sh` prints both lengths).
    session: Session,
}

/// The fixed part of every answer (see [`Echo::session`]).
fn fixed_session() -> Session {
    let created = prost_types::Timestamp {
        seconds: 1_764_400_000,
        // Past 2^28, so five bytes on the wire like most of the server's.
        nanos: 456_000_000,
    };
    Session {
        user_id: String::new(),
        token_id: String::new(),
        metadata: [
            ("ip".to_string(), "10.12.34.56".to_string()),
            (
                "user_agent".to_string(),
                "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0".to_string(),
            ),
        ]
        .into(),
        expires_at: Some(prost_types::Timestamp {
            seconds: created.seconds + 900,
            ..created
        }),
        created_at: Some(created),
        family_id: "0123456789abcdef0123456789abcdef".to_string(),
        family_expires_at: Some(prost_types::Timestamp {
            seconds: created.seconds + 2_592_000,
            ..created
        }),
    }
}

#[tonic::async_trait]
impl SessionStore for Echo {
    async fn get_session(
        &self,
        request: Request<GetSessionRequest>,
    ) -> Result<Response<GetSessionResponse>, Status> {
        // The ids are moved, not copied; the template's are empty, so its
        // clone allocates only the metadata, as the server's answer does.
        let GetSessionRequest { token_id, user_id } = request.into_inner();
        Ok(Response::new(GetSessionResponse {
            session: Some(Session {
                user_id,
                token_id,
                ..self.session.clone()
            }),
        }))
    }
}

/// The same runtime as session-server: `#[tokio::main]`, multi-threaded, one
/// worker per core unless TOKIO_WORKER_THREADS says otherwise.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("LISTEN_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("listen address {addr:?}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!("listening on {}", listener.local_addr()?);
    // What `Server::serve(addr)` does with the default settings: TCP_NODELAY
    // on (the default `tcp_nodelay(true)`), no TCP keepalive.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(SessionStoreServer::new(Echo {
            session: fixed_session(),
        }))
        .serve_with_incoming(incoming)
        .await
        .context("serving")
}
