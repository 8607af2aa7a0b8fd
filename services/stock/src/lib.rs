//! The **stock checker**: consumes the receiver's log and reserves every line of each order or none.
//! A reservation emits `StockReserved` (with each line's name and unit price, for the invoice);
//! otherwise `OrderRejected` names each line that failed and why.
//!
//! Orders are applied one after another inside the subscription's single write transaction, so no
//! interleaving of orders or admin `SetStock` calls can oversell: every check reads the state the
//! previous reservation committed.
//!
//! It also consumes the invoice stage's log, for compensation: a `PaymentFailed` order's lines are
//! given back (`StockReleased`), exactly once.
//!
//! # Layout
//! - [`Config`], [`CatalogSource`]: flags and env vars; where the initial catalog comes from.
//! - `items`: the `items` table and the rules of a valid catalog item.
//! - `catalog`: catalog files (TOML or JSON), the built-in demo catalog, and seeding the store.
//! - `reserve`: the all-or-nothing reservation, applied per `OrderPlaced`.
//! - `release`: giving a failed payment's reservation back, per `PaymentFailed`.
//! - `set_stock`, `get_stock`: one file per admin/query RPC; `service` only delegates.

mod catalog;
mod get_stock;
mod items;
mod release;
mod reserve;
mod service;
mod set_stock;

use std::{path::PathBuf, str::FromStr, sync::Arc};

use clap::Parser;
use orderflow_proto::v1::stock_checker_server::StockCheckerServer;
use orderflow_runtime::{
    MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, ServeError, ServerArgs, StageServer, Subscription,
    UpstreamArgs, UpstreamUrl,
};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use catalog::{CatalogEntry, demo_catalog};
pub use items::{MAX_AVAILABLE, MAX_NAME_CHARS, MAX_UNIT_PRICE_MINOR};

/// Name of the stage: its store file, logs and health.
pub const STAGE: &str = "stock";
/// The stages that read this stage's log: it is kept for them unless `--retain-for` says otherwise.
pub const CONSUMERS: &[&str] = &["invoice", "receiver"];
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50052;
/// Default metrics port.
pub const DEFAULT_METRICS_PORT: u16 = 9452;

/// Configuration of `orderflow-stock`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "orderflow-stock",
    version,
    about = "orderflow stock checker: reserves every line of an order or none"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub upstream: UpstreamArgs,

    /// Initial catalog: a TOML or JSON file, `demo` for the built-in demo catalog, or `none`. Items
    /// already in the store are kept as they are (restarts never reset stock)
    #[arg(
        long,
        env = "ORDERFLOW_CATALOG",
        default_value = "demo",
        value_name = "PATH|demo|none"
    )]
    pub catalog: CatalogSource,

    /// The invoice stage, whose `PaymentFailed` events give reservations back
    #[arg(long, env = "ORDERFLOW_INVOICE_URL", value_name = "URL", value_parser = UpstreamUrl::from_str)]
    pub invoice_url: UpstreamUrl,
}

impl Config {
    pub fn new(
        server: ServerArgs,
        upstream: UpstreamArgs,
        catalog: CatalogSource,
        invoice_url: UpstreamUrl,
    ) -> Self {
        Config {
            server,
            upstream,
            catalog,
            invoice_url,
        }
    }

    /// From the command line and `ORDERFLOW_*` variables; exits with a message on a bad value.
    pub fn from_args() -> Self {
        orderflow_runtime::parse_args(&[
            ("listen", format!("0.0.0.0:{DEFAULT_PORT}")),
            ("data_dir", format!("data/{STAGE}")),
            ("metrics_listen", format!("0.0.0.0:{DEFAULT_METRICS_PORT}")),
            ("upstream", "http://127.0.0.1:50051".to_owned()),
            ("invoice_url", "http://127.0.0.1:50053".to_owned()),
        ])
    }
}

/// Where the initial catalog comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogSource {
    Demo,
    None,
    File(PathBuf),
}

impl FromStr for CatalogSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("expected a file path, `demo` or `none`".into()),
            "demo" => Ok(CatalogSource::Demo),
            "none" => Ok(CatalogSource::None),
            path => Ok(CatalogSource::File(PathBuf::from(path))),
        }
    }
}

/// Opens the stock store, seeds the catalog and binds the socket.
pub async fn bind(config: Config) -> Result<StageServer, ServeError> {
    let entries = catalog::load(&config.catalog).map_err(ServeError::Config)?;
    let upstream = config
        .server
        .link(&config.upstream.upstream)
        .map_err(ServeError::config)?;
    let invoice = config
        .server
        .link(&config.invoice_url)
        .map_err(ServeError::config)?;
    let server = StageServer::bind(STAGE, config.server)
        .await?
        .retain_for(CONSUMERS)
        .await?;
    let seeded = server
        .store()
        .call(move |store| catalog::seed(store, &entries))
        .await
        .map_err(|status| {
            ServeError::Config(format!("cannot seed the catalog: {}", status.message()))
        })?;
    if seeded > 0 {
        tracing::info!(items = seeded, "catalog seeded");
    }
    let service = service::StockCheckerService::new(server.store().clone(), server.admin_guard());
    let orders = Subscription::new(
        STAGE,
        "receiver",
        upstream,
        server.store().clone(),
        Arc::new(reserve::Reserver),
    );
    let compensation = Subscription::new(
        STAGE,
        "invoice",
        invoice,
        server.store().clone(),
        Arc::new(release::Releaser),
    );
    Ok(server
        .with_service(
            Routes::new(
                StockCheckerServer::new(service)
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            ),
            "orderflow.v1.StockChecker",
        )
        .with_task(move |shutdown| tokio::spawn(orders.run(shutdown)))
        .with_task(move |shutdown| tokio::spawn(compensation.run(shutdown))))
}

/// Runs the stock checker until `shutdown`.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    bind(config).await?.serve(shutdown).await
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Config::command().debug_assert();
    }
}
