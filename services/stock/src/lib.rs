//! The **stock checker**: consumes the receiver's log and reserves every line of each order or none.
//! A reservation emits `StockReserved` (with each line's name and unit price, for the invoice);
//! otherwise `OrderRejected` names each line that failed and why.
//!
//! Orders are applied one after another inside the subscription's single write transaction, so no
//! interleaving of orders or admin `SetStock` calls can oversell: every check reads the state the
//! previous reservation committed. With several partitions the stock is sharded by sku, each shard
//! a store of its own, and an order whose lines fall in several shards is reserved through holds
//! its home shard asks of the others (`shards`).
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
//! - `shards`: stock sharded by sku — holds asked of the other shards through the logs, their
//!   answers and the home shard's decision, for orders whose lines fall in several shards.
//! - `set_stock`, `get_stock`: one file per admin/query RPC; `service` only delegates.

mod catalog;
mod get_stock;
mod items;
mod release;
mod reserve;
mod service;
mod set_stock;
mod shards;

use std::{path::PathBuf, str::FromStr, sync::Arc};

use clap::Parser;
use orderflow_proto::v1::stock_checker_server::StockCheckerServer;
use orderflow_runtime::{
    Link, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Peers, ServeError, ServerArgs, StageServer,
    Subscription, UpstreamArgs, UpstreamUrl,
};
use shards::Shards;
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

/// Opens the store of every shard this replica owns, seeds the catalog and binds the socket.
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
    let peers = config.server.peers().map_err(ServeError::config)?;
    let count = config.server.partitions;
    if count > 1 && peers.is_none() && config.server.tls_cert.is_some() {
        return Err(ServeError::config(
            "the stock stage's shards read each other's logs: with TLS and several partitions, \
             give this replica's own https URL with --peers / ORDERFLOW_PEERS"
                .to_owned(),
        ));
    }
    let server = StageServer::bind_partitions(STAGE, config.server)
        .await?
        // Each shard's log is also read by every other shard, whatever --retain-for says.
        .retain_for_and(CONSUMERS, move |partition| {
            Shards {
                me: partition.index,
                count,
            }
            .others()
            .map(Shards::consumer)
            .collect()
        })
        .await?;
    for store in server.stores() {
        let shard = store.partition().index;
        let mine: Vec<CatalogEntry> = entries
            .iter()
            .filter(|entry| shards::shard_of(&entry.sku, count) == shard)
            .cloned()
            .collect();
        let seeded = store
            .call(move |store| catalog::seed(store, &mine))
            .await
            .map_err(|status| {
                ServeError::Config(format!("cannot seed the catalog: {}", status.message()))
            })?;
        if seeded > 0 {
            tracing::info!(items = seeded, shard, "catalog seeded");
        }
    }
    // The shards' own stage: the replicas --peers names, or this one alone.
    let peers = match peers {
        Some(link) => Some(link),
        None if count > 1 => Some(own_link(&server)?),
        None => None,
    };
    let replicas = match &peers {
        Some(link) => Some(
            Peers::new(link, server.args().replicas, server.args().replica_index())
                .map_err(ServeError::config)?,
        ),
        None => None,
    };
    let service = service::StockCheckerService::new(
        server.store(),
        server.stores(),
        count,
        replicas,
        server.admin_guard(),
    );
    let mut server = server.with_service(
        Routes::new(
            StockCheckerServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        ),
        "orderflow.v1.StockChecker",
    );
    for store in server.stores().to_vec() {
        let shards = Shards {
            me: store.partition().index,
            count,
        };
        let orders = Subscription::new(
            STAGE,
            "receiver",
            upstream.clone(),
            store.clone(),
            Arc::new(reserve::Reserver { shards }),
        );
        let compensation = Subscription::new(
            STAGE,
            "invoice",
            invoice.clone(),
            store.clone(),
            Arc::new(release::Releaser { shards }),
        );
        server = server
            .with_task(move |shutdown| tokio::spawn(orders.run(shutdown)))
            .with_task(move |shutdown| tokio::spawn(compensation.run(shutdown)));
        for other in shards.others() {
            let Some(link) = peers.clone() else { break };
            let traffic = Subscription::new(
                STAGE,
                Shards::consumer(other),
                link,
                store.clone(),
                Arc::new(shards::ShardTraffic { shards }),
            )
            .reading(other, Shards::consumer(shards.me));
            server = server.with_task(move |shutdown| tokio::spawn(traffic.run(shutdown)));
        }
    }
    Ok(server)
}

/// A link to this replica itself, the only one: its shards read each other's logs through it.
fn own_link(server: &StageServer) -> Result<Link, ServeError> {
    let mut addr = server.local_addr();
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = UpstreamUrl::from_str(&format!("http://{addr}")).map_err(ServeError::config)?;
    server.args().link(&url).map_err(ServeError::config)
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
