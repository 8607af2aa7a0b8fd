//! The **invoice creator**: consumes the stock stage's log, prices every reserved order, captures its
//! payment through a [`PaymentGateway`] and numbers the invoice of every paid order — sequential and
//! gap-free, because the counter moves in the same transaction as the invoice and the settled payment.
//! Transient gateway failures are retried with backoff under the order's idempotency key (never
//! charged twice); a decline, or a gateway that keeps failing, becomes `PaymentFailed` and a dead
//! letter. Rejections are passed on unchanged so the notifier can tell the customer.
//!
//! # Layout
//! - [`Config`]: flags and env vars, including the simulated gateway's faults and the retry policy.
//! - `pricing`: integer money arithmetic (line totals, half-up tax).
//! - `invoicing`: the `Apply` for stock events: price and schedule payment.
//! - `payments`: capture attempts and settling them (numbering, dead letters).
//! - `gateway`: the [`PaymentGateway`] trait and the [`SimulatedGateway`] with its ledger.
//! - `tables`: every table of the stage's store.
//! - `get_invoice`, `faults`: the RPCs; `service` only delegates.

mod faults;
mod gateway;
mod get_invoice;
mod invoicing;
mod payments;
mod pricing;
mod service;
mod tables;

use std::{sync::Arc, time::Duration};

use clap::{Args, Parser};
use orderflow_proto::v1::invoice_creator_server::InvoiceCreatorServer;
use orderflow_runtime::{
    MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Partitions, RetryPolicy, RetryQueue, ServeError,
    ServerArgs, StageServer, Subscription, UpstreamArgs,
};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use faults::{parse_latency, parse_probability};
pub use gateway::{
    CaptureRequest, Captured, Faults, PaymentError, PaymentGateway, SimulatedGateway,
};
pub use pricing::MAX_TAX_RATE_BPS;

/// Name of the stage: its store file, logs and health.
pub const STAGE: &str = "invoice";
/// The stages that read this stage's log: it is kept for them unless `--retain-for` says otherwise.
pub const CONSUMERS: &[&str] = &["notifier", "stock", "receiver"];
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50053;
/// Default metrics port.
pub const DEFAULT_METRICS_PORT: u16 = 9453;

/// Configuration of `orderflow-invoice`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "orderflow-invoice",
    version,
    about = "orderflow invoice creator: prices reserved orders, captures payment, numbers invoices"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub upstream: UpstreamArgs,

    /// Tax rate in basis points applied to every invoice (2000 = 20 %), 0 to 10000
    #[arg(long, env = "ORDERFLOW_TAX_RATE_BPS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_TAX_RATE_BPS)), value_name = "BPS")]
    pub tax_rate_bps: u32,

    #[command(flatten)]
    pub gateway: GatewayArgs,

    #[command(flatten)]
    pub retry: PaymentRetryArgs,
}

/// The simulated gateway's faults at start (`SetFaults` changes them at run time).
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Latency the simulated gateway adds to every capture (up to 60s)
    #[arg(long = "gateway-latency", env = "ORDERFLOW_GATEWAY_LATENCY", default_value = "0ms", value_parser = parse_latency, value_name = "DURATION")]
    pub latency: Duration,

    /// Share of captures that fail transiently (unreachable, or timing out after charging), 0.0 to 1.0
    #[arg(long = "gateway-transient-failure-rate", env = "ORDERFLOW_GATEWAY_TRANSIENT_FAILURE_RATE", default_value_t = 0.0, value_parser = parse_probability, value_name = "RATE")]
    pub transient_failure_rate: f64,

    /// Share of captures the simulated gateway declines (final), 0.0 to 1.0
    #[arg(long = "gateway-decline-rate", env = "ORDERFLOW_GATEWAY_DECLINE_RATE", default_value_t = 0.0, value_parser = parse_probability, value_name = "RATE")]
    pub decline_rate: f64,
}

impl Default for GatewayArgs {
    fn default() -> Self {
        GatewayArgs {
            latency: Duration::ZERO,
            transient_failure_rate: 0.0,
            decline_rate: 0.0,
        }
    }
}

/// How payment captures are retried.
#[derive(Args, Debug, Clone)]
pub struct PaymentRetryArgs {
    /// Capture attempts per order at most, the first included
    #[arg(id = "payment_max_attempts", long = "payment-max-attempts", env = "ORDERFLOW_PAYMENT_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100), value_name = "N")]
    pub max_attempts: u32,

    /// Pause before the first retry; it doubles per attempt, with jitter
    #[arg(id = "payment_backoff_min", long = "payment-backoff-min", env = "ORDERFLOW_PAYMENT_BACKOFF_MIN", default_value = "100ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub backoff_min: Duration,

    /// Longest pause between two attempts
    #[arg(id = "payment_backoff_max", long = "payment-backoff-max", env = "ORDERFLOW_PAYMENT_BACKOFF_MAX", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub backoff_max: Duration,

    /// Captures in flight at most
    #[arg(id = "payment_concurrency", long = "payment-concurrency", env = "ORDERFLOW_PAYMENT_CONCURRENCY", default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000), value_name = "N")]
    pub concurrency: usize,

    /// Orders waiting for payment at most before the stage stops reading the stock log
    #[arg(id = "payment_max_pending", long = "payment-max-pending", env = "ORDERFLOW_PAYMENT_MAX_PENDING", default_value_t = 10_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000), value_name = "N")]
    pub max_pending: usize,
}

impl Default for PaymentRetryArgs {
    fn default() -> Self {
        PaymentRetryArgs {
            max_attempts: 5,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            concurrency: 256,
            max_pending: 10_000,
        }
    }
}

impl PaymentRetryArgs {
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
    pub fn new(server: ServerArgs, upstream: UpstreamArgs, tax_rate_bps: u32) -> Self {
        Config {
            server,
            upstream,
            tax_rate_bps,
            gateway: GatewayArgs::default(),
            retry: PaymentRetryArgs::default(),
        }
    }

    /// From the command line and `ORDERFLOW_*` variables; exits with a message on a bad value.
    pub fn from_args() -> Self {
        orderflow_runtime::parse_args(&[
            ("listen", format!("0.0.0.0:{DEFAULT_PORT}")),
            ("data_dir", format!("data/{STAGE}")),
            ("metrics_listen", format!("0.0.0.0:{DEFAULT_METRICS_PORT}")),
            ("upstream", "http://127.0.0.1:50052".to_owned()),
        ])
    }
}

/// Opens the store of every partition this replica owns and the gateway's ledger, and binds the
/// socket.
pub async fn bind(config: Config) -> Result<StageServer, ServeError> {
    if config.tax_rate_bps > MAX_TAX_RATE_BPS {
        return Err(ServeError::Config(format!(
            "--tax-rate-bps / ORDERFLOW_TAX_RATE_BPS must be at most {MAX_TAX_RATE_BPS}"
        )));
    }
    let upstream = config
        .server
        .link(&config.upstream.upstream)
        .map_err(ServeError::config)?;
    let peers = config.server.peer_replicas().map_err(ServeError::config)?;
    let server = StageServer::bind_partitions(STAGE, config.server)
        .await?
        .retain_for(CONSUMERS)
        .await?;
    // One gateway for the replica: every partition's payments go through it.
    let ledger_path = server.args().data_dir.join("gateway.redb");
    let faults = faults::faults_from_flags(
        config.gateway.latency,
        config.gateway.transient_failure_rate,
        config.gateway.decline_rate,
    );
    let replica = server.args().replica_index();
    let opened = tokio::task::spawn_blocking({
        let path = ledger_path.clone();
        move || SimulatedGateway::open_for_replica(&path, faults, replica)
    })
    .await?
    .map_err(|e| {
        ServeError::Config(format!(
            "cannot open the gateway ledger at {}: {e}",
            ledger_path.display()
        ))
    })?;
    let (gateway, ledger_writer) = opened;
    let gateway = Arc::new(gateway);
    let partitions = Partitions::new(server.store(), server.stores(), peers);
    let service =
        service::InvoiceCreatorService::new(partitions, gateway.clone(), server.admin_guard());
    let mut server = server.with_service(
        Routes::new(
            InvoiceCreatorServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        ),
        "orderflow.v1.InvoiceCreator",
    );
    for store in server.stores().to_vec() {
        let refunds = RetryQueue::new(
            STAGE,
            "refund",
            store.clone(),
            Arc::new(payments::Refunds {
                gateway: gateway.clone(),
            }),
            payments::REFUND_POLICY,
        );
        let payments = RetryQueue::new(
            STAGE,
            "payment",
            store.clone(),
            Arc::new(payments::Payments {
                gateway: gateway.clone(),
                refunds: refunds.clone(),
            }),
            config.retry.policy(),
        );
        let tables = payments.clone();
        store
            .call(move |store| invoicing::create_tables(store, &tables))
            .await
            .map_err(|status| {
                ServeError::Config(format!("cannot prepare the store: {}", status.message()))
            })?;
        let subscription = Subscription::new(
            STAGE,
            "stock",
            upstream.clone(),
            store.clone(),
            Arc::new(invoicing::Pricing {
                tax_rate_bps: config.tax_rate_bps,
                partition: store.partition().index,
                partitions: store.partition().count,
                payments: payments.clone(),
            }),
        )
        .with_admission(payments.admission());
        server = server
            .with_task(move |shutdown| tokio::spawn(subscription.run(shutdown)))
            .with_task(move |shutdown| tokio::spawn(payments.run(shutdown)))
            .with_task(move |shutdown| tokio::spawn(refunds.run(shutdown)));
    }
    // The ledger's writer ends once the gateway is dropped with the service and the queues.
    Ok(server.with_task(move |_| ledger_writer))
}

/// Runs the invoice creator until `shutdown`.
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
