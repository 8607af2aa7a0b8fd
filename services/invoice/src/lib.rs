//! The **invoice creator**: consumes the stock stage's log, prices every reserved order, applies the
//! tax rate and numbers the invoice — sequential and gap-free, because the counter moves in the same
//! transaction as the invoice and the consumed offset. Rejections are passed on unchanged so the
//! notifier can tell the customer.
//!
//! # Layout
//! - [`Config`]: flags and env vars.
//! - `pricing`: integer money arithmetic (line totals, half-up tax).
//! - `invoicing`: the `Apply` for stock events and the invoice tables.
//! - `get_invoice`: `GetInvoice` and `ListInvoices`; `service` only delegates.

mod get_invoice;
mod invoicing;
mod pricing;
mod service;

use std::sync::Arc;

use clap::Parser;
use orderflow_proto::v1::invoice_creator_server::InvoiceCreatorServer;
use orderflow_runtime::{ServeError, ServerArgs, StageServer, Subscription, UpstreamArgs};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use pricing::MAX_TAX_RATE_BPS;

/// Name of the stage: its store file, logs and health.
pub const STAGE: &str = "invoice";
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50053;

/// Configuration of `orderflow-invoice`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "orderflow-invoice",
    version,
    about = "orderflow invoice creator: prices, taxes and numbers reserved orders"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub upstream: UpstreamArgs,

    /// Tax rate in basis points applied to every invoice (2000 = 20 %), 0 to 10000
    #[arg(long, env = "ORDERFLOW_TAX_RATE_BPS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_TAX_RATE_BPS)), value_name = "BPS")]
    pub tax_rate_bps: u32,
}

impl Config {
    pub fn new(server: ServerArgs, upstream: UpstreamArgs, tax_rate_bps: u32) -> Self {
        Config {
            server,
            upstream,
            tax_rate_bps,
        }
    }

    /// From the command line and `ORDERFLOW_*` variables; exits with a message on a bad value.
    pub fn from_args() -> Self {
        orderflow_runtime::parse_args(&[
            ("listen", format!("0.0.0.0:{DEFAULT_PORT}")),
            ("data_dir", format!("data/{STAGE}")),
            ("upstream", "http://127.0.0.1:50052".to_owned()),
        ])
    }
}

/// Opens the invoice store and binds the socket.
pub async fn bind(config: Config) -> Result<StageServer, ServeError> {
    if config.tax_rate_bps > MAX_TAX_RATE_BPS {
        return Err(ServeError::Config(format!(
            "--tax-rate-bps / ORDERFLOW_TAX_RATE_BPS must be at most {MAX_TAX_RATE_BPS}"
        )));
    }
    let server = StageServer::bind(STAGE, config.server).await?;
    server
        .store()
        .call(invoicing::create_tables)
        .await
        .map_err(|status| {
            ServeError::Config(format!("cannot prepare the store: {}", status.message()))
        })?;
    let service = service::InvoiceCreatorService::new(server.store().clone());
    let subscription = Subscription {
        consumer: STAGE.to_owned(),
        upstream_name: "stock".to_owned(),
        upstream: config.upstream.upstream.endpoint(),
        store: server.store().clone(),
        applier: Arc::new(invoicing::InvoiceCreator {
            tax_rate_bps: config.tax_rate_bps,
        }),
    };
    Ok(server
        .with_service(
            Routes::new(InvoiceCreatorServer::new(service)),
            "orderflow.v1.InvoiceCreator",
        )
        .with_task(move |shutdown| tokio::spawn(subscription.run(shutdown))))
}

/// Runs the invoice creator until `shutdown`.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    bind(config).await?.serve(shutdown).await
}
