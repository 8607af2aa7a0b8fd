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
    compile_stored_event_log();
    Ok(())
}

/// `orderflow.v1.EventLog` once more, with `Subscribe` answering `crate::stored::StoredEventBatch`:
/// the same bytes on the wire as `EventBatch`, but each event stays encoded. The server sends events
/// as the outbox stores them instead of decoding them only to encode them again; the client (a
/// downstream stage) decodes each event itself, into the view of it that the stage reads. Other
/// clients (and reflection) keep the generated `EventBatch`.
fn compile_stored_event_log() {
    use tonic_prost_build::manual::{Builder, Method, Service};
    let method = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::v1::{input}"))
            .output_type(output)
            .codec_path("crate::codec::StrictCodec")
    };
    let service = Service::builder()
        .name("EventLog")
        .package("orderflow.v1")
        .method(
            method(
                "subscribe",
                "Subscribe",
                "SubscribeRequest",
                "crate::stored::StoredEventBatch",
            )
            .server_streaming()
            .build(),
        )
        .method(method("ack", "Ack", "AckRequest", "crate::v1::AckResponse").build())
        .method(method("head", "Head", "HeadRequest", "crate::v1::HeadResponse").build())
        .build();
    Builder::new().compile(&[service]);
}
