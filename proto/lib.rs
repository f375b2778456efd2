//! The SessionStore gRPC contract, `sessionstore.v1`, compiled from
//! `proto/sessionstore/v1/session_store.proto`.
//!
//! Both `session-server` and `session-client` build on this crate, so the wire
//! types exist once. Services in other languages generate their own stubs from
//! the same `.proto` file.

#![forbid(unsafe_code)]

/// Generated messages, the client stub and the server trait of `sessionstore.v1`.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("sessionstore.v1");
}

/// The encoded `FileDescriptorSet` of `sessionstore.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("sessionstore_v1_descriptor");

/// The fully-qualified gRPC service name, as used by health checks and reflection.
pub const SERVICE_NAME: &str = "sessionstore.v1.SessionStore";
