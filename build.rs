//! Compiles keygate's protos with protox (pure Rust: no system `protoc`) and writes the
//! file descriptor set that gRPC reflection serves.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/keygate/admin/v1/admin.proto",
        "proto/keygate/snapshot/v1/snapshot.proto",
    ];
    // Reflection also describes google.rpc.BadRequest, so grpcurl can print field violations.
    let reflected = [
        "proto/keygate/admin/v1/admin.proto",
        "proto/keygate/snapshot/v1/snapshot.proto",
        "proto/google/rpc/error_details.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("keygate_descriptor.bin"),
        prost::Message::encode_to_vec(&protox::compile(reflected, ["proto"])?),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Messages that carry a key value get a hand-written, redacting Debug (src/proto.rs).
        .skip_debug([
            "keygate.admin.v1.CreateConsumerKeyRequest",
            "keygate.admin.v1.CreateConsumerKeyResponse",
            "keygate.admin.v1.CreateModelKeyRequest",
            "keygate.admin.v1.CreateAdminTokenResponse",
            "keygate.admin.v1.RotateConsumerKeyRequest",
            "keygate.admin.v1.RotateConsumerKeyResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}
