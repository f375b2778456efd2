//! Writes one gRPC request body (the 5-byte length prefix, then the protobuf
//! message) to standard output, made from the contract's own generated types,
//! for drivers that send raw HTTP/2 such as h2load (`scripts/bench-h2load.sh`).
//!
//! ```sh
//! cargo run --example grpc_frame -- create USER TOKEN > create.bin
//! cargo run --example grpc_frame -- get USER TOKEN > get.bin
//! ```
//!
//! `create` carries the same metadata as the load generator's sessions
//! (`benches/session_bench.rs`), so the stored JSON is as long as Redis's
//! values in `scripts/bench.sh`.

use std::io::Write;

use prost::Message;
use sessionstore::v1::{CreateSessionRequest, GetSessionRequest};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, user, token] = args.as_slice() else {
        eprintln!("usage: grpc_frame create|get USER TOKEN");
        std::process::exit(2);
    };
    let message = match kind.as_str() {
        "create" => CreateSessionRequest {
            user_id: user.clone(),
            token_id: token.clone(),
            metadata: [
                ("ip".to_string(), "10.12.34.56".to_string()),
                (
                    "user_agent".to_string(),
                    "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0".to_string(),
                ),
            ]
            .into(),
            ttl: None,
            max_lifetime: None,
        }
        .encode_to_vec(),
        "get" => GetSessionRequest {
            token_id: token.clone(),
            user_id: user.clone(),
        }
        .encode_to_vec(),
        other => {
            eprintln!("grpc_frame: unknown request {other:?} (create or get)");
            std::process::exit(2);
        }
    };
    let len = u32::try_from(message.len()).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(5 + message.len());
    // Not compressed, then the length, big-endian (the gRPC HTTP/2 framing).
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&message);
    std::io::stdout().lock().write_all(&frame)
}
