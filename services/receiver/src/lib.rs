//! The **receiver**: the door of the pipeline. `PlaceOrder` validates an order, makes its
//! `OrderPlaced` event durable through group commit (concurrent calls share one fsync), and only then
//! answers ACCEPTED. Its outbox is what the stock stage subscribes to. An idempotency key makes a
//! retried call return the first call's order; a backlog the next stage has not consumed beyond
//! `--max-backlog` turns new orders away with RESOURCE_EXHAUSTED, losing nothing already accepted.
//!
//! It also follows every order to its end: it subscribes to the stock, invoice and notifier logs (as
//! any downstream would; no stage ever calls it) and keeps each order's progress, which `GetOrder`
//! returns and `WatchOrder` streams. The same door is open over HTTP/JSON (`POST /v1/orders`,
//! `GET /v1/orders/{id}`).
//!
//! It does not check stock, price or notify: it promises that an accepted order is on disk and will
//! flow downstream.
//!
//! # Layout
//! - [`Config`]: flags and env vars.
//! - `intake`: the group-commit writer, the only code that writes new orders and idempotency keys.
//! - `validate`: the rules of a well-formed order, as field violations.
//! - `progress`: order progress from the downstream logs, and the watchers waiting for it.
//! - `place_order`, `place_orders` (the bulk stream), `get_order` (with `WatchOrder`): one file per
//!   RPC; `service` only delegates.
//! - `http`: the HTTP/JSON door over the same functions.
//! - `peers`: the other replicas of the receiver, where an order another replica owns goes;
//!   `forwarding`: one `PlaceOrders` stream to each, for the orders whose traces are not sampled.
//!
//! # Partitions
//! With several partitions (`--partitions`), an order lives in its home partition,
//! hash(customer id) mod P ([`orderflow_runtime::home_partition`]), so a customer's idempotency
//! keys stay in one store; its id names that partition ([`orderflow_runtime::order_id`]). This
//! replica keeps the partitions it owns, each with its own store, writer and progress, and any
//! replica accepts any order: one of another replica's partitions is forwarded to it (`--peers`),
//! and so is `GetOrder`/`WatchOrder` of an order that lives there.

mod forwarding;
mod get_order;
mod http;
mod intake;
mod peers;
mod place_order;
mod place_orders;
mod progress;
mod service;
mod validate;

use std::{sync::Arc, time::Duration};

use clap::Parser;
use orderflow_proto::v1::order_receiver_server::OrderReceiverServer;
use orderflow_runtime::{
    MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, OptionalAddr, ServeError, ServerArgs, StageServer,
    Subscription, UpstreamUrl,
};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use http::{BODY_TIMEOUT, HEADER_READ_TIMEOUT, REQUEST_TIMEOUT, order_json};
pub use validate::{MAX_CUSTOMER_ID, MAX_IDEMPOTENCY_KEY, MAX_LINES, MAX_QUANTITY, MAX_SKU_CHARS};

/// Name of the stage: its store file, logs and health.
pub const STAGE: &str = "receiver";
/// The stages that read this stage's log: it is kept for them unless `--retain-for` says otherwise.
pub const CONSUMERS: &[&str] = &["stock"];
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50051;
/// Default port of the HTTP/JSON door.
pub const DEFAULT_HTTP_PORT: u16 = 8080;
/// Default metrics port.
pub const DEFAULT_METRICS_PORT: u16 = 9451;
/// Orders written in one group commit at most.
pub const DEFAULT_MAX_COMMIT_BATCH: usize = 1000;
/// Unconsumed orders at most before `PlaceOrder` answers RESOURCE_EXHAUSTED.
pub const DEFAULT_MAX_BACKLOG: u64 = 1_000_000;
/// How long an idempotency key is remembered.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Configuration of `orderflow-receiver`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "orderflow-receiver",
    version,
    about = "orderflow receiver: accepts orders, makes them durable and follows them to the end"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    /// Orders written in one group commit (one fsync) at most
    #[arg(long, env = "ORDERFLOW_MAX_COMMIT_BATCH", default_value_t = DEFAULT_MAX_COMMIT_BATCH, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000), value_name = "N")]
    pub max_commit_batch: usize,

    /// Orders accepted but not yet consumed downstream at most; beyond it PlaceOrder answers
    /// RESOURCE_EXHAUSTED with a retry hint
    #[arg(long, env = "ORDERFLOW_MAX_BACKLOG", default_value_t = DEFAULT_MAX_BACKLOG, value_parser = clap::value_parser!(u64).range(1..), value_name = "N")]
    pub max_backlog: u64,

    /// How long an idempotency key is remembered
    #[arg(long, env = "ORDERFLOW_IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idempotency_window: Duration,

    /// Address of the HTTP/JSON door (POST /v1/orders, GET /v1/orders/{id}), or `none`
    #[arg(long, env = "ORDERFLOW_HTTP_LISTEN", value_name = "ADDR|none")]
    pub http_listen: OptionalAddr,

    /// Connections the HTTP door serves at once; further ones wait to be accepted
    #[arg(long, env = "ORDERFLOW_HTTP_MAX_CONNECTIONS", default_value_t = http::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000), value_name = "N")]
    pub http_max_connections: usize,

    /// The stock stage, whose log tells the receiver about reservations and rejections (`none`: do
    /// not follow orders)
    #[arg(long, env = "ORDERFLOW_STOCK_URL", value_name = "URL|none")]
    pub stock_url: ProgressLogUrl,

    /// The invoice stage, whose log tells about invoices and payment failures (`none`: do not follow)
    #[arg(long, env = "ORDERFLOW_INVOICE_URL", value_name = "URL|none")]
    pub invoice_url: ProgressLogUrl,

    /// The notifier, whose log tells about notifications and dead letters (`none`: do not follow)
    #[arg(long, env = "ORDERFLOW_NOTIFIER_URL", value_name = "URL|none")]
    pub notifier_url: ProgressLogUrl,
}

/// The URL of a later stage whose log tells the receiver how its orders progress, or `none`.
#[derive(Debug, Clone)]
pub struct ProgressLogUrl(pub Option<UpstreamUrl>);

impl std::str::FromStr for ProgressLogUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" | "" => Ok(ProgressLogUrl(None)),
            url => url.parse().map(|u| ProgressLogUrl(Some(u))),
        }
    }
}

impl Config {
    /// Defaults for a receiver started from code: no HTTP door, not following any stage.
    pub fn new(server: ServerArgs) -> Self {
        Config {
            server,
            max_commit_batch: DEFAULT_MAX_COMMIT_BATCH,
            max_backlog: DEFAULT_MAX_BACKLOG,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            http_listen: OptionalAddr(None),
            http_max_connections: http::DEFAULT_MAX_CONNECTIONS,
            stock_url: ProgressLogUrl(None),
            invoice_url: ProgressLogUrl(None),
            notifier_url: ProgressLogUrl(None),
        }
    }

    /// Follow orders through the stages at these addresses.
    pub fn following(
        mut self,
        stock: UpstreamUrl,
        invoice: UpstreamUrl,
        notifier: UpstreamUrl,
    ) -> Self {
        self.stock_url = ProgressLogUrl(Some(stock));
        self.invoice_url = ProgressLogUrl(Some(invoice));
        self.notifier_url = ProgressLogUrl(Some(notifier));
        self
    }

    /// From the command line and `ORDERFLOW_*` variables; exits with a message on a bad value.
    pub fn from_args() -> Self {
        orderflow_runtime::parse_args(&[
            ("listen", format!("0.0.0.0:{DEFAULT_PORT}")),
            ("data_dir", format!("data/{STAGE}")),
            ("metrics_listen", format!("0.0.0.0:{DEFAULT_METRICS_PORT}")),
            ("http_listen", format!("0.0.0.0:{DEFAULT_HTTP_PORT}")),
            ("stock_url", "http://127.0.0.1:50052".to_owned()),
            ("invoice_url", "http://127.0.0.1:50053".to_owned()),
            ("notifier_url", "http://127.0.0.1:50054".to_owned()),
        ])
    }
}

/// What the RPCs and the HTTP door share.
pub(crate) struct Receiver {
    /// The partitions this replica owns, ascending.
    pub homes: Vec<Home>,
    /// How many partitions the pipeline has.
    pub partitions: u32,
    /// The other replicas, with more than one.
    pub peers: Option<peers::Peers>,
    pub watchers: Arc<progress::Watchers>,
    pub max_backlog: u64,
    /// The data volume's free space against `--min-free-space`: below it, new orders wait.
    pub free_space: Arc<orderflow_runtime::FreeSpace>,
    /// Cancelled when the stage drains: open watches end.
    pub draining: CancellationToken,
}

/// One partition this replica owns: its store and the writer of its new orders.
pub(crate) struct Home {
    pub partition: u32,
    pub store: orderflow_runtime::Store,
    pub intake: intake::Intake,
}

impl Receiver {
    /// The partition `partition` if this replica owns it.
    pub(crate) fn home(&self, partition: u32) -> Option<&Home> {
        self.homes.iter().find(|home| home.partition == partition)
    }

    /// The home partition of `customer_id`'s orders.
    pub(crate) fn home_of(&self, customer_id: &str) -> u32 {
        orderflow_runtime::home_partition(customer_id, self.partitions)
    }
}

/// Opens the receiver's store and binds its sockets; serve the result with [`StageServer::serve`].
pub async fn bind(config: Config) -> Result<StageServer, ServeError> {
    let peers = config
        .server
        .peers()
        .map_err(ServeError::config)?
        .map(|link| peers::Peers::new(link, config.server.replicas, config.server.replica_index()))
        .transpose()
        .map_err(ServeError::config)?;
    let mut server = StageServer::bind_partitions(STAGE, config.server.clone())
        .await?
        .retain_for(CONSUMERS)
        .await?;
    let watchers = Arc::new(progress::Watchers::default());
    let mut homes = Vec::new();
    let mut writers = Vec::new();
    let mut followed = Vec::new();
    for store in server.stores() {
        store
            .call(|store| {
                store.write(|txn| {
                    txn.redb().open_table(intake::ORDERS)?;
                    txn.redb().open_table(progress::STEPS)?;
                    intake::create_tables(txn)
                })
            })
            .await
            .map_err(|status| {
                ServeError::config(format!("cannot prepare the store: {}", status.message()))
            })?;
        let (intake, writer) = intake::Intake::start(
            store.clone(),
            config.max_commit_batch,
            config.idempotency_window,
        );
        writers.push(writer);
        homes.push(Home {
            partition: store.partition().index,
            store: store.clone(),
            intake,
        });
        for (name, url) in [
            ("stock", &config.stock_url),
            ("invoice", &config.invoice_url),
            ("notifier", &config.notifier_url),
        ] {
            if let Some(url) = &url.0 {
                let link = config.server.link(url).map_err(ServeError::config)?;
                followed.push(
                    Subscription::new(
                        STAGE,
                        format!("progress.{name}"),
                        link,
                        store.clone(),
                        Arc::new(progress::Progress::new(
                            name,
                            watchers.clone(),
                            store.partition().count,
                        )),
                    )
                    // Progress is derived from the other stages' logs: a crash may roll it back
                    // with its offsets, to be derived again, so it need not cost an fsync per
                    // batch.
                    .lazy(),
                );
            }
        }
    }
    // The recorder is installed on first use: make sure this gauge is not set before it exists.
    let _ = orderflow_runtime::metrics::handle();
    metrics::gauge!(orderflow_runtime::metrics::MAX_BACKLOG, "stage" => STAGE)
        .set(config.max_backlog as f64);
    let draining = CancellationToken::new();
    let stores: Vec<_> = homes.iter().map(|home| home.store.clone()).collect();
    let receiver = Arc::new(Receiver {
        homes,
        partitions: config.server.partitions,
        peers,
        watchers,
        max_backlog: config.max_backlog,
        free_space: server.free_space(),
        draining: draining.clone(),
    });

    if let Some(addr) = config.http_listen.0 {
        let door = http::Door::bind(
            addr,
            server.tls_identity().cloned(),
            receiver.clone(),
            config.http_max_connections,
        )
        .await
        .map_err(ServeError::config)?;
        let scheme = if server.tls_identity().is_some() {
            "https"
        } else {
            "http"
        };
        server = server.announce("http", format!("{scheme}://{}", door.local_addr()));
        let grace = config.server.shutdown_grace;
        server = server.with_task(move |shutdown| tokio::spawn(door.serve(shutdown, grace)));
    }

    let service = service::OrderReceiverService::new(receiver);
    let mut server = server.with_service(
        Routes::new(
            OrderReceiverServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        ),
        "orderflow.v1.OrderReceiver",
    );
    for subscription in followed {
        server = server.with_task(move |shutdown| tokio::spawn(subscription.run(shutdown)));
    }
    let window = config.idempotency_window;
    for store in stores {
        server = server.with_task(move |shutdown| {
            tokio::spawn(intake::sweep_idempotency_keys(store, window, shutdown))
        });
    }
    // Each writer ends by itself once the service and the HTTP door (its senders) are gone, after
    // committing every order it was handed.
    for writer in writers {
        server = server.with_task(move |_| writer);
    }
    Ok(server.with_task(move |shutdown| {
        tokio::spawn(async move {
            shutdown.cancelled().await;
            draining.cancel();
        })
    }))
}

/// Runs the receiver until `shutdown`.
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
