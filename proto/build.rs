//! Generates the `orderflow.v1` messages, clients and servers into `OUT_DIR`, plus the encoded file
//! descriptor set that gRPC reflection serves. Uses the vendored `protoc`, so a fresh machine needs no
//! system package.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "orderflow/v1/common.proto",
    "orderflow/v1/receiver.proto",
    "orderflow/v1/stock.proto",
    "orderflow/v1/invoice.proto",
    "orderflow/v1/notifier.proto",
    "orderflow/v1/eventlog.proto",
    "grpc/health/v1/health.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=orderflow");
    println!("cargo:rerun-if-changed=grpc");
    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        .file_descriptor_set_path(out_dir.join("orderflow_descriptor.bin"))
        .compile_with_config(prost_config, PROTOS, &["."])?;
    Ok(())
}
