//! The **notifier**: consumes the invoice stage's log and tells each customer how their order ended
//! — confirmed with its invoice, or rejected with the reason per line. Every message is delivered
//! through a sink (the structured log), recorded, and announced as the terminal `CustomerNotified`
//! event, in the batch's one transaction.
//!
//! # Layout
//! - [`Config`]: flags and env vars.
//! - `render`: the customer-facing text of confirmations and rejections.
//! - `notifying`: the `Apply` for invoice events, the log sink and the notification tables.
//! - `list_notifications`: `ListNotifications`; `service` only delegates.

mod list_notifications;
mod notifying;
mod render;
mod service;

use std::sync::Arc;

use clap::Parser;
use orderflow_proto::v1::notifier_server::NotifierServer;
use orderflow_runtime::{ServeError, ServerArgs, StageServer, Subscription, UpstreamArgs};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use render::reason as describe_rejection;

/// Name of the stage: its store file, logs and health.
pub const STAGE: &str = "notifier";
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50054;

/// Configuration of `orderflow-notifier`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "orderflow-notifier",
    version,
    about = "orderflow notifier: tells customers whether their order was confirmed or rejected"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

impl Config {
    pub fn new(server: ServerArgs, upstream: UpstreamArgs) -> Self {
        Config { server, upstream }
    }

    /// From the command line and `ORDERFLOW_*` variables; exits with a message on a bad value.
    pub fn from_args() -> Self {
        orderflow_runtime::parse_args(&[
            ("listen", format!("0.0.0.0:{DEFAULT_PORT}")),
            ("data_dir", format!("data/{STAGE}")),
            ("upstream", "http://127.0.0.1:50053".to_owned()),
        ])
    }
}

/// Opens the notifier store and binds the socket.
pub async fn bind(config: Config) -> Result<StageServer, ServeError> {
    let server = StageServer::bind(STAGE, config.server).await?;
    server
        .store()
        .call(notifying::create_tables)
        .await
        .map_err(|status| {
            ServeError::Config(format!("cannot prepare the store: {}", status.message()))
        })?;
    let service = service::NotifierService::new(server.store().clone());
    let subscription = Subscription {
        consumer: STAGE.to_owned(),
        upstream_name: "invoice".to_owned(),
        upstream: config.upstream.upstream.endpoint(),
        store: server.store().clone(),
        applier: Arc::new(notifying::Notifier),
    };
    Ok(server
        .with_service(
            Routes::new(NotifierServer::new(service)),
            "orderflow.v1.Notifier",
        )
        .with_task(move |shutdown| tokio::spawn(subscription.run(shutdown))))
}

/// Runs the notifier until `shutdown`.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    bind(config).await?.serve(shutdown).await
}
