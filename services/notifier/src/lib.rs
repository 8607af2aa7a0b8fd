//! The **notifier**: consumes the invoice stage's log and tells each customer how their order ended
//! — confirmed with its invoice, rejected with the reason per line, or not paid. Every message goes
//! through a sink (the structured log, a webhook, or a JSON-lines file) with retries, backoff and
//! bounded concurrency; what cannot be delivered becomes a durable dead letter that an operator can
//! list and replay. A delivered message is recorded and announced as the terminal
//! `CustomerNotified` event.
//!
//! # Layout
//! - [`Config`]: flags and env vars, including the sink and the retry policy.
//! - `ending`: what the notifier reads of an invoice-stage event.
//! - `render`: the customer-facing text of confirmations, rejections and payment failures.
//! - `notifying`: the `Apply` for invoice events (schedule a delivery).
//! - `delivery`: delivery attempts and settling them (record, or dead-letter).
//! - `sinks`: log, webhook and file.
//! - `tables`: every table of the stage's store.
//! - `list_notifications`, `dead_letters`: the RPCs; `service` only delegates.

mod dead_letters;
mod delivery;
mod ending;
mod list_notifications;
mod notifying;
mod render;
mod service;
mod sinks;
mod tables;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, Parser};
use orderflow_proto::v1::notifier_server::NotifierServer;
use orderflow_runtime::{
    MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Partitions, RetryPolicy, RetryQueue, ServeError,
    ServerArgs, StageServer, Subscription, UpstreamArgs,
};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use render::reason as describe_rejection;
pub use sinks::SinkKind;

/// Name of the stage: its store file, logs and health.
pub const STAGE: &str = "notifier";
/// The stages that read this stage's log: it is kept for them unless `--retain-for` says otherwise.
pub const CONSUMERS: &[&str] = &["receiver"];
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50054;
/// Default metrics port.
pub const DEFAULT_METRICS_PORT: u16 = 9454;

/// Configuration of `orderflow-notifier`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "orderflow-notifier",
    version,
    about = "orderflow notifier: tells customers how their order ended, with retries and dead letters"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub upstream: UpstreamArgs,

    #[command(flatten)]
    pub sink: SinkArgs,

    #[command(flatten)]
    pub retry: DeliveryRetryArgs,
}

/// Where notifications go.
#[derive(Args, Debug, Clone)]
pub struct SinkArgs {
    /// Where to deliver notifications
    #[arg(long, env = "ORDERFLOW_SINK", value_enum, default_value_t = SinkKind::Log)]
    pub sink: SinkKind,

    /// URL the webhook sink POSTs each notification to
    #[arg(long, env = "ORDERFLOW_WEBHOOK_URL", value_name = "URL")]
    pub webhook_url: Option<String>,

    /// How long one webhook call may take before it counts as a (retried) timeout
    #[arg(long, env = "ORDERFLOW_WEBHOOK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub webhook_timeout: Duration,

    /// File the file sink appends JSON lines to
    #[arg(long, env = "ORDERFLOW_SINK_FILE", value_name = "PATH")]
    pub sink_file: Option<PathBuf>,
}

impl Default for SinkArgs {
    fn default() -> Self {
        SinkArgs {
            sink: SinkKind::Log,
            webhook_url: None,
            webhook_timeout: Duration::from_secs(5),
            sink_file: None,
        }
    }
}

/// How deliveries are retried.
#[derive(Args, Debug, Clone)]
pub struct DeliveryRetryArgs {
    /// Delivery attempts per notification at most, the first included
    #[arg(id = "delivery_max_attempts", long = "delivery-max-attempts", env = "ORDERFLOW_DELIVERY_MAX_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100), value_name = "N")]
    pub max_attempts: u32,

    /// Pause before the first retry; it doubles per attempt, with jitter
    #[arg(id = "delivery_backoff_min", long = "delivery-backoff-min", env = "ORDERFLOW_DELIVERY_BACKOFF_MIN", default_value = "200ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub backoff_min: Duration,

    /// Longest pause between two attempts (a longer Retry-After is still honoured, up to 1 h)
    #[arg(id = "delivery_backoff_max", long = "delivery-backoff-max", env = "ORDERFLOW_DELIVERY_BACKOFF_MAX", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub backoff_max: Duration,

    /// Deliveries in flight at most
    #[arg(id = "delivery_concurrency", long = "delivery-concurrency", env = "ORDERFLOW_DELIVERY_CONCURRENCY", default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000), value_name = "N")]
    pub concurrency: usize,

    /// Notifications waiting for delivery at most before the stage stops reading the invoice log
    #[arg(id = "delivery_max_pending", long = "delivery-max-pending", env = "ORDERFLOW_DELIVERY_MAX_PENDING", default_value_t = 10_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000), value_name = "N")]
    pub max_pending: usize,
}

impl Default for DeliveryRetryArgs {
    fn default() -> Self {
        DeliveryRetryArgs {
            max_attempts: 8,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            concurrency: 64,
            max_pending: 10_000,
        }
    }
}

impl DeliveryRetryArgs {
    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max.max(self.backoff_min),
            concurrency: self.concurrency,
            max_pending: self.max_pending,
        }
    }
}

impl Config {
    pub fn new(server: ServerArgs, upstream: UpstreamArgs) -> Self {
        Config {
            server,
            upstream,
            sink: SinkArgs::default(),
            retry: DeliveryRetryArgs::default(),
        }
    }

    /// From the command line and `ORDERFLOW_*` variables; exits with a message on a bad value.
    pub fn from_args() -> Self {
        orderflow_runtime::parse_args(&[
            ("listen", format!("0.0.0.0:{DEFAULT_PORT}")),
            ("data_dir", format!("data/{STAGE}")),
            ("metrics_listen", format!("0.0.0.0:{DEFAULT_METRICS_PORT}")),
            ("upstream", "http://127.0.0.1:50053".to_owned()),
        ])
    }
}

/// Opens the store of every partition this replica owns and binds the socket.
pub async fn bind(config: Config) -> Result<StageServer, ServeError> {
    let sink = Arc::new(
        sinks::Sink::new(
            config.sink.sink,
            config.sink.webhook_url.as_deref(),
            config.sink.webhook_timeout,
            config.sink.sink_file.as_deref(),
        )
        .map_err(ServeError::Config)?,
    );
    let upstream = config
        .server
        .link(&config.upstream.upstream)
        .map_err(ServeError::config)?;
    let peers = config.server.peer_replicas().map_err(ServeError::config)?;
    let server = StageServer::bind_partitions(STAGE, config.server)
        .await?
        .retain_for(CONSUMERS)
        .await?;
    let mut queues = BTreeMap::new();
    let mut tasks = Vec::new();
    for store in server.stores() {
        let deliveries = RetryQueue::new(
            STAGE,
            "delivery",
            store.clone(),
            Arc::new(delivery::Deliveries { sink: sink.clone() }),
            config.retry.policy(),
        );
        let tables = deliveries.clone();
        store
            .call(move |store| notifying::create_tables(store, &tables))
            .await
            .map_err(|status| {
                ServeError::Config(format!("cannot prepare the store: {}", status.message()))
            })?;
        let subscription = Subscription::new(
            STAGE,
            "invoice",
            upstream.clone(),
            store.clone(),
            Arc::new(notifying::Notifying {
                deliveries: deliveries.clone(),
                partition: store.partition(),
            }),
        )
        .with_admission(deliveries.admission());
        queues.insert(store.partition().index, deliveries.clone());
        tasks.push((subscription, deliveries));
    }
    let service = service::NotifierService::new(
        Partitions::new(server.store(), server.stores(), peers),
        queues,
        server.admin_guard(),
    );
    let mut server = server.with_service(
        Routes::new(
            NotifierServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        ),
        "orderflow.v1.Notifier",
    );
    for (subscription, deliveries) in tasks {
        server = server
            .with_task(move |shutdown| tokio::spawn(subscription.run(shutdown)))
            .with_task(move |shutdown| tokio::spawn(deliveries.run(shutdown)));
    }
    Ok(server)
}

/// Runs the notifier until `shutdown`.
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
