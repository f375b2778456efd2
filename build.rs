//! Compiles `proto/` into the Rust code of the `sessionstore` crate and writes the
//! file descriptor set that the server's reflection service publishes.
//!
//! protoc comes from `protoc-bin-vendored`, so a fresh machine needs no system
//! protoc (Debian's lacks the well-known types without libprotobuf-dev).

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    // The generator does not print this itself; without it any change in the
    // package root would rerun the build script and rebuild every dependant.
    println!("cargo:rerun-if-changed=proto");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    let include = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        // A method the service trait gains answers UNIMPLEMENTED in every
        // implementation that does not write it (the test fakes, the
        // benchmark floor) instead of breaking their build: a new RPC is
        // written where it is served, not in every stand-in. The real
        // service implements each one, which its e2e tests show.
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("sessionstore_v1_descriptor.bin"))
        .compile_with_config(
            config,
            &[PathBuf::from("proto/sessionstore/v1/session_store.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    Ok(())
}
