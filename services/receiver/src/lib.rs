//! The **receiver**: the door of the pipeline. `PlaceOrder` validates an order, makes its
//! `OrderPlaced` event durable through group commit (concurrent calls share one fsync), and only then
//! answers ACCEPTED. Its outbox is what the stock stage subscribes to.
//!
//! It does not check stock, price or notify: it only promises that an accepted order is on disk and
//! will flow downstream.
//!
//! # Layout
//! - [`Config`]: flags and env vars.
//! - `intake`: the group-commit writer, the only code that writes orders.
//! - `validate`: the rules of a well-formed order, as field violations.
//! - `place_order`, `get_order`: one file per RPC; `service` only delegates.

mod get_order;
mod intake;
mod place_order;
mod service;
mod validate;

use clap::Parser;
use orderflow_proto::v1::order_receiver_server::OrderReceiverServer;
use orderflow_runtime::{ServeError, ServerArgs, StageServer};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use validate::{MAX_CUSTOMER_ID, MAX_LINES, MAX_QUANTITY, MAX_SKU_CHARS};

/// Name of the stage: its store file, logs and health.
pub const STAGE: &str = "receiver";
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50051;
/// Orders written in one group commit at most.
pub const DEFAULT_MAX_COMMIT_BATCH: usize = 1000;

/// Configuration of `orderflow-receiver`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "orderflow-receiver",
    version,
    about = "orderflow receiver: accepts orders and makes them durable"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    /// Orders written in one group commit (one fsync) at most
    #[arg(long, env = "ORDERFLOW_MAX_COMMIT_BATCH", default_value_t = DEFAULT_MAX_COMMIT_BATCH, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000), value_name = "N")]
    pub max_commit_batch: usize,
}

impl Config {
    /// Defaults for a receiver started from code.
    pub fn new(server: ServerArgs) -> Self {
        Config {
            server,
            max_commit_batch: DEFAULT_MAX_COMMIT_BATCH,
        }
    }

    /// From the command line and `ORDERFLOW_*` variables; exits with a message on a bad value.
    pub fn from_args() -> Self {
        orderflow_runtime::parse_args(&[
            ("listen", format!("0.0.0.0:{DEFAULT_PORT}")),
            ("data_dir", format!("data/{STAGE}")),
        ])
    }
}

/// Opens the receiver's store and binds its socket; serve the result with [`StageServer::serve`].
pub async fn bind(config: Config) -> Result<StageServer, ServeError> {
    let server = StageServer::bind(STAGE, config.server).await?;
    let (intake, writer) = intake::Intake::start(server.store().clone(), config.max_commit_batch);
    let service = service::OrderReceiverService::new(intake, server.store().clone());
    Ok(server
        .with_service(
            Routes::new(OrderReceiverServer::new(service)),
            "orderflow.v1.OrderReceiver",
        )
        // The writer ends by itself once the service (the last sender) is gone, after committing
        // every order it was handed.
        .with_task(move |_| writer))
}

/// Runs the receiver until `shutdown`.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    bind(config).await?.serve(shutdown).await
}
