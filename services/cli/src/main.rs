//! `orderflow`: the whole pipeline in one process for local use (`demo`, `up`), and a client for a
//! running pipeline (`place`, `get`, `watch`, `stock`, `dlq`, `faults`).

mod client;
mod demo;
mod dlq;
mod faults;
mod load;
mod order;
mod pipeline;
mod place;
mod stock;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use orderflow_invoice::{GatewayArgs, PaymentRetryArgs};
use orderflow_notifier::{DeliveryRetryArgs, SinkArgs};
use orderflow_proto::v1::OrderLine;
use orderflow_runtime::{
    OptionalAddr,
    telemetry::{self, LogFormat, TelemetryConfig},
};
use orderflow_stock::CatalogSource;

use crate::{
    client::Connect,
    pipeline::{Pipeline, PipelineConfig},
};

#[derive(Parser, Debug)]
#[command(
    name = "orderflow",
    version,
    about = "orderflow: an order pipeline of four gRPC stages"
)]
struct Cli {
    #[command(flatten)]
    connect: Connect,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the four stages in this process and let simulated customers order; prints every step and
    /// a report
    Demo {
        /// Data directory (default: a fresh temporary directory, removed at the end)
        #[arg(long, env = "ORDERFLOW_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Simulated customers ordering concurrently
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        customers: u64,
        /// Stop after this many orders (instead of --duration)
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        orders: Option<u64>,
        /// How long customers keep ordering
        #[arg(long, default_value = "18s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Orders per second, all customers together
        #[arg(long, default_value_t = 8.0, value_parser = load::parse_orders_per_second)]
        rate: f64,
        /// Tax rate in basis points on every invoice
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(0..=10_000))]
        tax_rate_bps: u32,
        /// Share of payments the simulated gateway declines (the stock is given back)
        #[arg(long, default_value_t = 0.03, value_parser = orderflow_invoice::parse_probability)]
        decline_rate: f64,
        /// Share of payment attempts that fail transiently (they are retried)
        #[arg(long, default_value_t = 0.1, value_parser = orderflow_invoice::parse_probability)]
        transient_failure_rate: f64,
    },
    /// Run the four stages in this process on their default ports and wait (for grpcurl)
    Up(Box<UpArgs>),
    /// Place one order and print its id
    Place {
        /// Customer id
        #[arg(long)]
        customer: String,
        /// An order line, SKU=QTY; repeat for more lines
        #[arg(long = "line", required = true, value_parser = place::parse_line)]
        lines: Vec<OrderLine>,
        /// Retrying with the same key returns the first order instead of placing another
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Print an order and its progress through the stages
    Get {
        order_id: String,
        /// As JSON
        #[arg(long)]
        json: bool,
    },
    /// Follow an order live until it reaches a terminal state
    Watch { order_id: String },
    /// The catalog: list, get, set (admin)
    Stock {
        #[command(subcommand)]
        command: stock::StockCommand,
    },
    /// Dead letters: list, replay (admin)
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// The simulated payment gateway's faults: show, set (admin)
    Faults {
        #[command(subcommand)]
        command: faults::FaultsCommand,
    },
    /// Put load on a receiver: open loop (--rate) or closed loop (--concurrency); reports accept
    /// and placed→notified latency percentiles
    Load(Box<load::LoadArgs>),
}

/// Flags of `orderflow up`.
#[derive(clap::Args, Debug)]
struct UpArgs {
    /// Data directory, kept between runs
    #[arg(long, env = "ORDERFLOW_DATA_DIR", default_value = "orderflow-data")]
    data_dir: PathBuf,
    /// Address the four stages listen on
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Initial catalog: a TOML or JSON file, `demo` or `none`
    #[arg(long, env = "ORDERFLOW_CATALOG", default_value = "demo")]
    catalog: CatalogSource,
    /// Tax rate in basis points on every invoice
    #[arg(long, env = "ORDERFLOW_TAX_RATE_BPS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    tax_rate_bps: u32,
    /// Prometheus metrics of all four stages, or `none`
    #[arg(
        long,
        env = "ORDERFLOW_METRICS_LISTEN",
        default_value = "127.0.0.1:9450"
    )]
    metrics_listen: OptionalAddr,
    /// The receiver's HTTP/JSON door, or `none`
    #[arg(long, env = "ORDERFLOW_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: OptionalAddr,
    /// Log line format
    #[arg(long, env = "ORDERFLOW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    payment_retry: PaymentRetryArgs,
    #[command(flatten)]
    sink: SinkArgs,
    #[command(flatten)]
    delivery_retry: DeliveryRetryArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, one line: users want the reason, not a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs and traces for a process running the four stages: each stage's spans under its own service.
fn pipeline_telemetry(default_filter: &str, log_format: LogFormat) -> telemetry::Telemetry {
    telemetry::init(&TelemetryConfig {
        service_name: "orderflow".into(),
        service_per_stage: true,
        log_format,
        default_filter: default_filter.into(),
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connect = cli.connect;
    match cli.command {
        Command::Demo {
            data_dir,
            customers,
            orders,
            duration,
            rate,
            tax_rate_bps,
            decline_rate,
            transient_failure_rate,
        } => {
            // Stage logs would drown the demo's own lines: warnings only unless RUST_LOG says more.
            let telemetry = pipeline_telemetry("warn", LogFormat::Text);
            let temp = tempfile::tempdir()?;
            let data_dir = data_dir.unwrap_or_else(|| temp.path().to_owned());
            let result = demo::run(demo::DemoConfig {
                pipeline: PipelineConfig {
                    data_dir,
                    host: IpAddr::from([127, 0, 0, 1]),
                    ports: [0; 4],
                    catalog: CatalogSource::Demo,
                    tax_rate_bps,
                    gateway: GatewayArgs {
                        latency: Duration::from_millis(2),
                        transient_failure_rate,
                        decline_rate,
                    },
                    payment_retry: PaymentRetryArgs {
                        backoff_min: Duration::from_millis(50),
                        backoff_max: Duration::from_millis(500),
                        ..PaymentRetryArgs::default()
                    },
                    sink: SinkArgs::default(),
                    delivery_retry: DeliveryRetryArgs::default(),
                    metrics: None,
                    http: None,
                    also_retain_for: vec![demo::DEMO_CONSUMER.to_owned()],
                },
                customers: customers as usize,
                orders,
                duration,
                rate,
            })
            .await;
            telemetry.shutdown().await;
            result
        }
        Command::Up(args) => {
            let UpArgs {
                data_dir,
                host,
                catalog,
                tax_rate_bps,
                metrics_listen,
                http_listen,
                log_format,
                gateway,
                payment_retry,
                sink,
                delivery_retry,
            } = *args;
            let telemetry = pipeline_telemetry("info", log_format);
            let result = up(PipelineConfig {
                data_dir,
                host,
                ports: [
                    orderflow_receiver::DEFAULT_PORT,
                    orderflow_stock::DEFAULT_PORT,
                    orderflow_invoice::DEFAULT_PORT,
                    orderflow_notifier::DEFAULT_PORT,
                ],
                catalog,
                tax_rate_bps,
                gateway,
                payment_retry,
                sink,
                delivery_retry,
                metrics: metrics_listen.0,
                http: http_listen.0,
                also_retain_for: Vec::new(),
            })
            .await;
            telemetry.shutdown().await;
            result
        }
        command => {
            telemetry::init_logging_with_default("warn");
            client_command(&connect, command).await
        }
    }
}

async fn up(config: PipelineConfig) -> anyhow::Result<()> {
    let shutdown = orderflow_runtime::shutdown_on_signal();
    let data_dir = config.data_dir.clone();
    let mut pipeline = Pipeline::start(config).await?;
    println!(
        "orderflow is up (data in {}); Ctrl-C to stop",
        data_dir.display()
    );
    println!("  receiver  {}", pipeline.receiver);
    println!("  stock     {}", pipeline.stock);
    println!("  invoice   {}", pipeline.invoice);
    println!("  notifier  {}", pipeline.notifier);
    for (what, addr) in &pipeline.announced {
        println!("  {what:<9} {addr}");
    }
    println!("try: orderflow place --customer alice --line KB-01=1");
    tokio::select! {
        () = shutdown.cancelled() => {}
        stage = pipeline.any_stopped() => anyhow::bail!("the {stage} stage stopped unexpectedly"),
    }
    pipeline.stop().await
}

async fn client_command(connect: &Connect, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Place {
            customer,
            lines,
            idempotency_key,
        } => place::place(connect, customer, lines, idempotency_key).await,
        Command::Get { order_id, json } => order::get(connect, order_id, json).await,
        Command::Watch { order_id } => order::watch(connect, order_id).await,
        Command::Stock { command } => stock::run(connect, command).await,
        Command::Dlq { command } => dlq::run(connect, command).await,
        Command::Faults { command } => faults::run(connect, command).await,
        Command::Load(args) => load::run(connect, *args).await,
        Command::Demo { .. } | Command::Up(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn up_takes_the_payment_and_delivery_flags_side_by_side() {
        let cli = Cli::try_parse_from([
            "orderflow",
            "up",
            "--payment-max-attempts",
            "3",
            "--delivery-max-attempts",
            "4",
            "--payment-backoff-min",
            "10ms",
            "--delivery-backoff-min",
            "20ms",
        ])
        .map_err(|e| e.to_string());
        let Ok(Cli {
            command: Command::Up(args),
            ..
        }) = cli
        else {
            panic!("{cli:?}");
        };
        assert_eq!(args.payment_retry.max_attempts, 3);
        assert_eq!(args.delivery_retry.max_attempts, 4);
        assert_eq!(args.payment_retry.backoff_min, Duration::from_millis(10));
        assert_eq!(args.delivery_retry.backoff_min, Duration::from_millis(20));
    }
}
