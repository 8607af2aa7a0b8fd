//! The `orderflow.v1` gRPC contract: messages, clients and servers generated from `proto/orderflow/v1`
//! at build time, and the encoded descriptor set that gRPC reflection serves.
//!
//! This crate is the public protocol and nothing else; behaviour lives in the stage crates.
//!
//! # Layout
//! - [`v1`]: everything generated from the `.proto` files, one module for the package.
//! - [`health`]: `grpc.health.v1`, generated with the same strict codec (served by every stage).
//! - [`FILE_DESCRIPTOR_SET`]: what the reflection service registers (both packages).
//! - [`money`]: display of [`v1::Money`] in major units, for humans.
//! - [`codec`]: prost encoding with `INVALID_ARGUMENT` for malformed messages.
//! - [`views`]: partial views of messages, for stages that read only some of their fields.
//! - [`stored`]: the `EventLog` server as stages run it, streaming outbox entries as stored
//!   (wire-identical to the generated `EventBatch`).

pub mod codec;
pub mod money;
pub mod stored;
pub mod views;

/// Generated code for the `orderflow.v1` package.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("orderflow.v1");
}

/// Generated code for the standard `grpc.health.v1` package, with [`codec::StrictCodec`].
pub mod health {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("grpc.health.v1");
}

/// The encoded `FileDescriptorSet` of every `orderflow.v1` file and of `grpc.health.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("orderflow_descriptor");
